//! The consistent lookup table: which slot owns each of the `TABLE_SIZE` entries, and which
//! slot inherits it when the owner dies. Pure computation, no syscalls.
//!
//! Minimal disruption holds by construction rather than by hashing luck:
//! - every member owns the floor or the ceiling of its exact share `TABLE_SIZE * w / W`
//!   (with unequal weights, see [`Table::is_exactly_balanced`] for the edge cases);
//! - removing a slot hands each of its entries to the entry's precomputed heir and changes
//!   no other owner; the heirs of a slot are chosen so that, after its removal, no survivor
//!   exceeds the ceiling of its new share and, wherever that is possible without moving a
//!   survivor's own entries (always, with equal weights), each owns its floor or ceiling;
//!   with equal weights this spreads a slot's heirs over the survivors within one entry of
//!   even, with unequal weights in proportion to weight within two entries;
//! - adding a slot moves only the entries it takes, from the most loaded slots; changing
//!   weights (any number of them, as one change) moves the fewest entries that restore every
//!   member's bounds, so weights that keep their proportions move nothing;
//! - settling a table taken over from a process killed halfway through a change moves
//!   nothing if the table is one the operations leave, and otherwise gives every member its
//!   share with the fewest moves.
//!
//! Every operation is deterministic: the same sequence gives the same table.
//!
//! Removing, adding, rejoining and reweighting compute only what changes: the table keeps
//! a tally of its entries per owner and per (owner, heir), an operation records the
//! entries it changes as it goes, and an owner keeps every heir that is still within
//! bounds, so only the entries whose owner changed, whose heir is gone, or whose owner's
//! heirs no longer fit are rewritten. Rarer operations (building, switching, settling)
//! recompute every heir by the same rule, so a table they leave is one the others keep.
mod check;
mod edit;
mod error;
mod heirs;
mod members;
mod radix;
mod rebalance;
mod tally;
mod targets;

use std::collections::BTreeMap;

use portshard_common::{TABLE_SIZE, TableEntry};

pub use self::error::TableError;
use self::{
    edit::Edit,
    error::{check_size, check_slot, check_weight},
    members::Members,
    rebalance::Moved,
    tally::Tally,
};

/// Members from which an addition or a weight change changes only what it must, entry by
/// entry. With fewer, each member owns so large a part of the table that a change touches
/// thousands of entries, and one pass over the whole table is faster (measured with
/// `rebuild_us_*_n8` in the bench).
const INCREMENTAL_MIN_MEMBERS: usize = 8;

/// The same for a removal, which touches twice as many entries: the removed slot's and
/// those naming it as heir.
const INCREMENTAL_MIN_MEMBERS_REMOVE: usize = 16;

/// A slot number: index of a socket in the service's socket array.
pub type Slot = u16;

/// The largest weight a slot may have; keeps every share computation exact in 64 bits.
pub const MAX_WEIGHT: u32 = 10_000;

/// The fewest entries a table may have: enough for a few members to own several each.
pub const MIN_TABLE_SIZE: usize = 16;

/// The entries an operation changed, for writing to the kernel's copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Indices whose owner or heir changed, ascending.
    pub changed: Vec<u32>,
    /// How many of them changed owner, i.e. how many entries' flows move.
    pub moved: u32,
}

/// The table and the weights of its members (the slots entitled to a share of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    entries: Vec<TableEntry>,
    weights: BTreeMap<Slot, u32>,
    /// What the entries count up to, so operations need not count them again.
    tally: Tally,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    /// An empty table of the kernel's size ([`TABLE_SIZE`]): no members, every entry
    /// [`TableEntry::EMPTY`].
    pub fn new() -> Self {
        Self::empty(TABLE_SIZE)
    }

    /// An empty table of `size` entries, so tests and fuzzing can run the same algorithm on
    /// smaller tables, many times faster. Refused unless `size` is a power of two from
    /// [`MIN_TABLE_SIZE`] to [`TABLE_SIZE`] (the program indexes with `hash & (size - 1)`).
    pub fn with_size(size: usize) -> Result<Self, TableError> {
        check_size(size)?;
        Ok(Self::empty(size))
    }

    fn empty(size: usize) -> Self {
        Self {
            entries: vec![TableEntry::EMPTY; size],
            weights: BTreeMap::new(),
            tally: Tally::default(),
        }
    }

    /// How many entries the table has.
    pub fn size(&self) -> usize {
        self.entries.len()
    }

    /// A table spread over `members` (slot, weight) from scratch.
    pub fn with_members(
        members: impl IntoIterator<Item = (Slot, u32)>,
    ) -> Result<Self, TableError> {
        Self::sized_with_members(TABLE_SIZE, members)
    }

    /// A table of `size` entries (see [`Table::with_size`]) spread over `members` from
    /// scratch.
    pub fn sized_with_members(
        size: usize,
        members: impl IntoIterator<Item = (Slot, u32)>,
    ) -> Result<Self, TableError> {
        let mut table = Self::with_size(size)?;
        for (slot, weight) in members {
            check_slot(slot)?;
            check_weight(slot, weight)?;
            if table.weights.insert(slot, weight).is_some() {
                return Err(TableError::AlreadyMember { slot });
            }
        }
        table.rebalance(None);
        table.assign_heirs();
        Ok(table)
    }

    /// Takes over a table a previous process computed (`entries`, as read back from the
    /// kernel, with its `members`), so a restarted daemon goes on from it without moving a
    /// flow. Refused unless every entry names a member as owner and a valid heir
    /// ([`Table::check_structure`]); shares off their bound are kept as they are, since
    /// rebuilding would move the flows of healthy slots. A member may own nothing (a
    /// process killed between seating a slot and writing its entries): once the caller
    /// knows which members stay, [`Table::settle`] gives each its share, moving only other
    /// members' surplus.
    pub fn adopt(
        entries: Vec<TableEntry>,
        members: impl IntoIterator<Item = (Slot, u32)>,
    ) -> Result<Self, TableError> {
        let mut table = Self {
            entries,
            weights: BTreeMap::new(),
            tally: Tally::default(),
        };
        for (slot, weight) in members {
            check_slot(slot)?;
            check_weight(slot, weight)?;
            table.weights.insert(slot, weight);
        }
        table
            .check_structure()
            .map_err(|reason| TableError::Inconsistent { reason })?;
        table.tally = Tally::of(&table.current(), &table.entries);
        Ok(table)
    }

    /// All entries, indexed by `hash & TABLE_MASK`.
    pub fn entries(&self) -> &[TableEntry] {
        &self.entries
    }

    /// The members and their weights, by slot.
    pub fn members(&self) -> &BTreeMap<Slot, u32> {
        &self.weights
    }

    /// The indices of the entries `slot` owns, ascending.
    pub fn owned_by(&self, slot: Slot) -> Vec<u32> {
        let mut owned = Vec::new();
        // Chunks first, with a test that vectorizes: with many members, few chunks hold
        // one of `slot`'s entries.
        for (chunk, part) in self.entries.chunks(16).enumerate() {
            if !part.iter().fold(false, |hit, e| hit | (e.owner == slot)) {
                continue;
            }
            owned.extend(
                (0..part.len())
                    .filter(|&k| part[k].owner == slot)
                    .map(|k| (chunk * 16 + k) as u32),
            );
        }
        owned
    }

    /// How many entries each member owns (the `entries` of `status`).
    pub fn counts(&self) -> BTreeMap<Slot, u32> {
        let owned = self.tally.owned().iter().copied();
        self.weights.keys().copied().zip(owned).collect()
    }

    /// Adds `slot` with `weight`: it takes its share from the most loaded members, and
    /// nothing else moves (see [`Table::is_exactly_balanced`] for what that can leave).
    pub fn add(&mut self, slot: Slot, weight: u32) -> Result<Delta, TableError> {
        check_slot(slot)?;
        check_weight(slot, weight)?;
        if self.weights.contains_key(&slot) {
            return Err(TableError::AlreadyMember { slot });
        }
        if self.weights.len() < 2 || self.weights.len() < INCREMENTAL_MIN_MEMBERS {
            // From no heirs to some: every entry gets one. Or few members: see the constant.
            return Ok(self.apply(|table| {
                table.weights.insert(slot, weight);
                table.rebalance(Some(slot));
            }));
        }
        let (members, p) = self.join(slot, weight);
        let mut edit = Edit::default();
        let mut orphans = Vec::new();
        self.rebalance_in_place(&members, Some(p), &mut edit, &mut orphans);
        Ok(self.finish(&members, edit, orphans))
    }

    /// Adds `slot` back after a removal: it first takes back the entries in `former` (the
    /// indices it owned, from [`Table::owned_by`] before its removal) from members that can spare
    /// them, so a restarted worker gets its old flows back and, if nothing else changed
    /// meanwhile, the table returns to exactly the owners it had; anything still missing
    /// comes as in [`Table::add`]. As with `add`, only `slot` receives entries.
    pub fn rejoin(&mut self, slot: Slot, weight: u32, former: &[u32]) -> Result<Delta, TableError> {
        check_slot(slot)?;
        check_weight(slot, weight)?;
        if self.weights.contains_key(&slot) {
            return Err(TableError::AlreadyMember { slot });
        }
        if self.weights.len() < 2 || self.weights.len() < INCREMENTAL_MIN_MEMBERS {
            return Ok(self.apply(|table| {
                let (members, p) = table.join(slot, weight);
                let counts = members.counts(&table.entries);
                rebalance::take_back(&members, &counts, &mut table.entries, p, former);
                table.rebalance(Some(slot));
            }));
        }
        let (members, p) = self.join(slot, weight);
        let mut edit = Edit::default();
        let mut orphans = Vec::new();
        let owned = self.tally.owned();
        let moves = rebalance::take_back(&members, owned, &mut self.entries, p, former);
        self.moved(&members, &moves, &mut edit, &mut orphans);
        self.rebalance_in_place(&members, Some(p), &mut edit, &mut orphans);
        Ok(self.finish(&members, edit, orphans))
    }

    /// Removes `slot`: each entry it owned goes to that entry's heir, which is where the
    /// program already sends those flows once the slot's socket is closed.
    pub fn remove(&mut self, slot: Slot) -> Result<Delta, TableError> {
        if !self.weights.contains_key(&slot) {
            return Err(TableError::NotMember { slot });
        }
        if self.weights.len() <= 2 || self.weights.len() < INCREMENTAL_MIN_MEMBERS_REMOVE {
            // To one member or none: no heirs left. Or few members: see the constant.
            return Ok(self.apply(|table| {
                table.weights.remove(&slot);
                for entry in &mut table.entries {
                    if entry.owner == slot {
                        entry.owner = entry.heir;
                    }
                }
            }));
        }
        let p = self.current().position(slot).expect("a member");
        let mut edit = Edit::default();
        let orphans = inherit(&mut self.entries, slot, &mut edit);
        self.weights.remove(&slot);
        self.tally.remove_member(p);
        let members = self.current();
        Ok(self.finish(&members, edit, orphans))
    }

    /// Hands the table from the members `old` (a reload passes all of them) to the slots
    /// `new`, none of them a member, all with `weight`: a reload's switch. `old[i]`'s
    /// entries go to `new[i]`; a surplus old slot's entries and a surplus new slot's share
    /// are then settled by moving the fewest entries that make every share exact, as are
    /// shares that were uneven before; members not in `old` keep their weight. It is one
    /// change, each entry written once, so a flow moves at most once. Nothing changes on
    /// error.
    pub fn switch(&mut self, old: &[Slot], new: &[Slot], weight: u32) -> Result<Delta, TableError> {
        if new.is_empty() {
            return Err(TableError::NoNewSlot);
        }
        for (i, &slot) in old.iter().enumerate() {
            if old[..i].contains(&slot) {
                return Err(TableError::NamedTwice { slot });
            }
            if !self.weights.contains_key(&slot) {
                return Err(TableError::NotMember { slot });
            }
        }
        for (i, &slot) in new.iter().enumerate() {
            check_slot(slot)?;
            check_weight(slot, weight)?;
            if new[..i].contains(&slot) {
                return Err(TableError::NamedTwice { slot });
            }
            if self.weights.contains_key(&slot) {
                return Err(TableError::AlreadyMember { slot });
            }
        }
        let successor: BTreeMap<Slot, Slot> =
            old.iter().copied().zip(new.iter().copied()).collect();
        Ok(self.apply(|table| {
            for slot in old {
                table.weights.remove(slot);
            }
            table.weights.extend(new.iter().map(|&slot| (slot, weight)));
            for entry in &mut table.entries {
                if let Some(&slot) = successor.get(&entry.owner) {
                    entry.owner = slot;
                }
            }
            table.rebalance(None);
        }))
    }

    /// Changes `slot`'s weight: [`Table::set_weights`] for one member.
    pub fn set_weight(&mut self, slot: Slot, weight: u32) -> Result<Delta, TableError> {
        self.set_weights(&BTreeMap::from([(slot, weight)]))
    }

    /// Gives each member `weights` names its weight there (the others keep theirs) as one
    /// change, moving the fewest entries that put every member within `[floor, ceil]` of its
    /// new share: only members above their share give, only members below it receive. Done
    /// member by member, a change of several weights would move entries back and forth
    /// through the shares in between; done at once, weights that keep their proportions
    /// (every weight doubled) move nothing from exact shares. Nothing changes on error.
    pub fn set_weights(&mut self, weights: &BTreeMap<Slot, u32>) -> Result<Delta, TableError> {
        for (&slot, &weight) in weights {
            check_weight(slot, weight)?;
            if !self.weights.contains_key(&slot) {
                return Err(TableError::NotMember { slot });
            }
        }
        if self.weights.len() < 2 || self.weights.len() < INCREMENTAL_MIN_MEMBERS {
            return Ok(self.apply(|table| {
                table.weights.extend(weights);
                table.rebalance(None);
            }));
        }
        self.weights.extend(weights);
        let members = self.current();
        let mut edit = Edit::default();
        let mut orphans = Vec::new();
        self.rebalance_in_place(&members, None, &mut edit, &mut orphans);
        Ok(self.finish(&members, edit, orphans))
    }

    /// The members as they are now.
    fn current(&self) -> Members {
        Members::of(&self.weights, self.entries.len())
    }

    /// Makes `slot` a member with `weight`, owning nothing yet; returns the members and its
    /// position among them.
    fn join(&mut self, slot: Slot, weight: u32) -> (Members, usize) {
        self.weights.insert(slot, weight);
        let members = self.current();
        let p = members.position(slot).expect("just joined");
        self.tally.insert_member(p);
        (members, p)
    }

    /// [`rebalance::rebalance`] on a table whose tally is up to date, recording the moves.
    fn rebalance_in_place(
        &mut self,
        members: &Members,
        only: Option<usize>,
        edit: &mut Edit,
        orphans: &mut Vec<u32>,
    ) {
        let owned = self.tally.owned();
        let moves = rebalance::rebalance(members, owned, &mut self.entries, only);
        self.moved(members, &moves, edit, orphans);
    }

    /// Records `moves` in the tally and in `edit`, and their orphans.
    fn moved(
        &mut self,
        members: &Members,
        moves: &[Moved],
        edit: &mut Edit,
        orphans: &mut Vec<u32>,
    ) {
        self.tally
            .moved(members, &self.entries, moves, edit, orphans);
    }

    /// Ends an owner change made in place: gives the `orphans` heirs, moves the heirs the
    /// new counts require (see [`heirs::reassign`]), and reports what changed.
    fn finish(&mut self, members: &Members, mut edit: Edit, orphans: Vec<u32>) -> Delta {
        heirs::reassign(
            members,
            &mut self.entries,
            &mut self.tally,
            orphans,
            &mut edit,
        );
        edit.delta(&self.entries)
    }

    /// Moves the fewest entries that bring every member within its share (see
    /// [`rebalance::rebalance`]), with `only` the one member that may receive.
    fn rebalance(&mut self, only: Option<Slot>) {
        let members = Members::of(&self.weights, self.entries.len());
        let counts = members.counts(&self.entries);
        let only = only.and_then(|slot| members.position(slot));
        rebalance::rebalance(&members, &counts, &mut self.entries, only);
    }

    /// Gives every entry an heir (see [`heirs::assign_all`]) and counts the table afresh.
    fn assign_heirs(&mut self) {
        let members = self.current();
        self.tally = heirs::assign_all(&members, &mut self.entries);
    }

    /// Runs an owner change, recomputes every heir, and reports what changed: for the rare
    /// operations, and those that give every entry an heir or none.
    fn apply(&mut self, change: impl FnOnce(&mut Self)) -> Delta {
        let before = self.entries.clone();
        change(self);
        self.assign_heirs();
        delta(&before, &self.entries)
    }

    /// Gives every member its share, moving the fewest entries and only from members above
    /// theirs, if some member owns fewer entries than any operation leaves it (see
    /// [`Table::validate`]): what a process killed halfway through a change leaves, such as
    /// a member seated but never given its entries. Any other table is kept as it is, so
    /// settling an adopted table moves a flow only where a change was cut short.
    pub fn settle(&mut self) -> Delta {
        let short = self
            .share_bounds()
            .into_iter()
            .any(|(_, owned, (lowest, _))| owned < lowest);
        if !short {
            return Delta::default();
        }
        self.apply(|table| table.rebalance(None))
    }
}

/// Hands each entry `slot` owns to its heir, in place, recording it in `edit`; returns those
/// entries and the ones naming `slot` as heir: all the entries left without an heir.
fn inherit(entries: &mut [TableEntry], slot: Slot, edit: &mut Edit) -> Vec<u32> {
    let mut orphans = Vec::new();
    // Chunks first, with a test that vectorizes: few hold any such entry. An entry names
    // `slot` if a half of its word xor `slot` in both halves is zero, which the borrow of
    // subtracting 1 from each half finds (a borrow out of a zero half can only mark the
    // half above it, so a chunk without a zero half has no mark).
    let both = u32::from(slot) * 0x0001_0001;
    for (chunk, part) in entries.chunks_mut(16).enumerate() {
        let hits = part.iter().fold(0u32, |hits, e| {
            let x = e.to_word() ^ both;
            hits | (x.wrapping_sub(0x0001_0001) & !x & 0x8000_8000)
        });
        if hits == 0 {
            continue;
        }
        for (k, entry) in part.iter_mut().enumerate() {
            if entry.owner == slot || entry.heir == slot {
                let index = (chunk * 16 + k) as u32;
                edit.note(index, *entry);
                if entry.owner == slot {
                    entry.owner = entry.heir;
                }
                orphans.push(index);
            }
        }
    }
    orphans
}

/// The entries that differ between `before` and `after`.
fn delta(before: &[TableEntry], after: &[TableEntry]) -> Delta {
    let mut delta = Delta::default();
    for (index, (old, new)) in before.iter().zip(after).enumerate() {
        if old != new {
            delta.changed.push(index as u32);
            delta.moved += u32::from(old.owner != new.owner);
        }
    }
    delta
}

#[cfg(test)]
mod tests;
