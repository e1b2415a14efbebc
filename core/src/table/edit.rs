//! The record of an operation in progress: each entry it changes with its value before, so
//! the delta comes from the changes themselves rather than from a diff of the whole table.
use portshard_common::TableEntry;

use super::Delta;

/// The entries an operation has changed so far, each with its value before the operation.
#[derive(Default)]
pub(super) struct Edit {
    before: Vec<(u32, TableEntry)>,
}

impl Edit {
    /// Sets entry `index` to `entry`, remembering what it was.
    pub(super) fn set(&mut self, entries: &mut [TableEntry], index: u32, entry: TableEntry) {
        let slot = &mut entries[index as usize];
        self.before.push((index, *slot));
        *slot = entry;
    }

    /// Remembers that entry `index` was `old` before a change made in place.
    pub(super) fn note(&mut self, index: u32, old: TableEntry) {
        self.before.push((index, old));
    }

    /// The entries that now differ from what they were before the operation, ascending, and
    /// how many of them changed owner: an entry changed twice counts once, and one changed
    /// back not at all.
    pub(super) fn delta(self, entries: &[TableEntry]) -> Delta {
        // By index, then by when recorded, so the first record of each index, its value
        // before the operation, comes first: one unstable sort of plain integers.
        let mut order: Vec<u64> = (self.before.iter().enumerate())
            .map(|(k, &(index, _))| (u64::from(index) << 32) | k as u64)
            .collect();
        order.sort_unstable();
        let mut delta = Delta::default();
        let mut last = None;
        for key in order {
            let (index, old) = self.before[key as u32 as usize];
            if last.replace(index) == Some(index) {
                continue;
            }
            let new = entries[index as usize];
            if new != old {
                delta.changed.push(index);
                delta.moved += u32::from(new.owner != old.owner);
            }
        }
        delta
    }
}
