//! What the table counts as it changes: how many entries each member owns and, for each
//! owner, how many of its entries name each other member as heir. Kept up to date by every
//! operation, so that none needs a pass over the whole table to learn them.
use portshard_common::TableEntry;

use super::{edit::Edit, members::Members, rebalance::Moved};

/// Entries per owner and per (owner, heir), indexed by member position. A function of the
/// entries and the members, so tables equal in those are equal in this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tally {
    owned: Vec<u32>,
    /// `pairs[d * n + h]`: entries owned by member `d` whose heir is member `h`; entries
    /// whose heir is not a member other than their owner are not counted.
    pairs: Vec<u32>,
}

impl Tally {
    /// Counts `entries` in one pass: for adoption and full recomputations only.
    pub(super) fn of(members: &Members, entries: &[TableEntry]) -> Self {
        let n = members.len();
        let mut tally = Self {
            owned: vec![0; n],
            pairs: vec![0; n * n],
        };
        for entry in entries {
            let Some(d) = members.position(entry.owner) else {
                continue;
            };
            tally.owned[d] += 1;
            if let Some(h) = members.position(entry.heir).filter(|&h| h != d) {
                tally.pairs[d * n + h] += 1;
            }
        }
        tally
    }

    /// Entries each member owns, by position.
    pub(super) fn owned(&self) -> &[u32] {
        &self.owned
    }

    /// How many of member `d`'s entries name each member as heir, by position.
    pub(super) fn row(&self, d: usize) -> &[u32] {
        let n = self.owned.len();
        &self.pairs[d * n..(d + 1) * n]
    }

    /// The count of member `d`'s entries with member `h` as heir.
    pub(super) fn pair_mut(&mut self, d: usize, h: usize) -> &mut u32 {
        &mut self.pairs[d * self.owned.len() + h]
    }

    /// Makes room for a member joining at position `p`, owning nothing yet.
    pub(super) fn insert_member(&mut self, p: usize) {
        let n = self.owned.len();
        let wide = n + 1;
        self.pairs.resize(wide * wide, 0);
        // Last row first: each moves to a place at or after its own.
        for d in (0..n).rev() {
            let (from, to) = (d * n, (d + usize::from(d >= p)) * wide);
            self.pairs.copy_within(from + p..from + n, to + p + 1);
            self.pairs.copy_within(from..from + p, to);
            self.pairs[to + p] = 0;
        }
        self.pairs[p * wide..(p + 1) * wide].fill(0);
        self.owned.insert(p, 0);
    }

    /// Drops the member at position `p`, whose entries its heirs inherit: each heir owns
    /// what it inherits, and the inherited entries, like those that named `p` as heir, are
    /// no longer counted under any heir.
    pub(super) fn remove_member(&mut self, p: usize) {
        let n = self.owned.len();
        for h in 0..n {
            self.owned[h] += self.pairs[p * n + h];
        }
        // Drops row p and column p, as gaps in ascending order: what lies between two gaps
        // moves as one run, first run first, each to a place at or before its own.
        let gaps = (0..p)
            .map(|d| (d * n + p, d * n + p + 1))
            .chain([(p * n, (p + 1) * n)])
            .chain((p + 1..n).map(|d| (d * n + p, d * n + p + 1)))
            .chain([(n * n, n * n)]);
        let (mut to, mut from) = (0, 0);
        for (start, end) in gaps {
            self.pairs.copy_within(from..start, to);
            to += start - from;
            from = end;
        }
        self.pairs.truncate(to);
        self.owned.remove(p);
    }

    /// Counts entries that changed owner in place (`moves`, from rebalancing), records them
    /// in `edit` and adds to `orphans` those whose heir is now their owner.
    pub(super) fn moved(
        &mut self,
        members: &Members,
        entries: &[TableEntry],
        moves: &[Moved],
        edit: &mut Edit,
        orphans: &mut Vec<u32>,
    ) {
        for &(index, from) in moves {
            let entry = entries[index as usize];
            let from = from.expect("an incremental change starts with every entry owned");
            let to = members
                .position(entry.owner)
                .expect("entries move to members");
            edit.note(
                index,
                TableEntry {
                    owner: members.slots[from],
                    ..entry
                },
            );
            self.owned[from] -= 1;
            self.owned[to] += 1;
            let heir = members.position(entry.heir);
            if let Some(h) = heir.filter(|&h| h != from) {
                *self.pair_mut(from, h) -= 1;
            }
            match heir {
                Some(h) if h != to => *self.pair_mut(to, h) += 1,
                _ => orphans.push(index),
            }
        }
    }
}
