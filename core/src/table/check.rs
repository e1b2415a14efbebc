//! The invariants the kernel and the operations rely on, checked on demand: by the
//! property tests after every operation, and on a table adopted from the kernel.
use portshard_common::NO_SLOT;

use super::{Slot, Table, error::check_size, members::Members};

impl Table {
    /// Checks every invariant the kernel and the operations rely on; `Err` names the first
    /// one broken. Shares are within their floor and ceiling, or with unequal weights within
    /// one entry more either way (see [`Table::is_exactly_balanced`]); [`Table::settle`]
    /// relies on the floor's side. The property tests run it after every operation.
    pub fn validate(&self) -> Result<(), String> {
        self.check_structure()?;
        for (slot, owned, (lowest, highest)) in self.share_bounds() {
            if owned > highest {
                return Err(format!(
                    "slot {slot} owns {owned} entries, more than the {highest} its share allows"
                ));
            }
            if owned < lowest {
                return Err(format!(
                    "slot {slot} owns {owned} entries, fewer than the {lowest} its share needs"
                ));
            }
        }
        Ok(())
    }

    /// Each member with the entries it owns and the fewest and most its share allows after
    /// any operation: its floor and ceiling, with unequal weights one entry more above and
    /// two below. A removal hands the dead member's entries to their heirs only, in
    /// proportion to weight but in whole entries, so a survivor whose floor rises by less
    /// than one entry may inherit none: one left a floor short by an earlier operation ends
    /// two short, and only moving another member's flows would fix it.
    pub(super) fn share_bounds(&self) -> Vec<(Slot, u32, (u32, u32))> {
        let members = Members::of(&self.weights, self.entries.len());
        let slack = u32::from(!members.weights.windows(2).all(|w| w[0] == w[1]));
        let (below, above) = (2 * slack, slack);
        let counts = members.counts(&self.entries);
        (0..members.len())
            .map(|i| {
                let (floor, ceiling) = members.share(members.weights[i]);
                let bounds = (floor.saturating_sub(below), ceiling + above);
                (members.slots[i], counts[i], bounds)
            })
            .collect()
    }

    /// Checks what the kernel relies on, whatever the shares: a whole table whose every
    /// entry is owned by a member (or is empty, when there are none) and has a member other
    /// than its owner as heir (or none, with fewer than two members).
    pub fn check_structure(&self) -> Result<(), String> {
        check_size(self.entries.len()).map_err(|error| error.to_string())?;
        for (index, entry) in self.entries.iter().enumerate() {
            let owner_ok = if self.weights.is_empty() {
                entry.owner == NO_SLOT
            } else {
                self.weights.contains_key(&entry.owner)
            };
            if !owner_ok {
                return Err(format!(
                    "entry {index} is owned by non-member slot {}",
                    entry.owner
                ));
            }
            let heir_ok = if self.weights.len() <= 1 {
                entry.heir == NO_SLOT
            } else {
                entry.heir != entry.owner && self.weights.contains_key(&entry.heir)
            };
            if !heir_ok {
                return Err(format!(
                    "entry {index} (owner {}) has invalid heir {}",
                    entry.owner, entry.heir
                ));
            }
        }
        Ok(())
    }

    /// Whether every member owns the floor or the ceiling of its exact share. With equal
    /// weights every operation keeps it, and with any weights building and reweighting
    /// restore it. With unequal weights a removal can leave a survivor below its floor and an
    /// addition can leave a member one entry above its ceiling, because fixing either would
    /// move flows of a member that is not involved, which those operations never do.
    pub fn is_exactly_balanced(&self) -> bool {
        let counts = self.counts();
        let members = Members::of(&self.weights, self.entries.len());
        members
            .slots
            .iter()
            .zip(&members.weights)
            .all(|(slot, &weight)| {
                let (floor, ceiling) = members.share(weight);
                (floor..=ceiling).contains(&counts[slot])
            })
    }
}
