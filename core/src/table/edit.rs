//! The record of an operation in progress: each entry it changes with its value before, so
//! the delta comes from the changes themselves rather than from a diff of the whole table.
use portshard_common::TableEntry;

use super::{Delta, radix};

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
    pub(super) fn delta(mut self, entries: &[TableEntry]) -> Delta {
        // By index, stably, so the first record of each index, its value before the
        // operation, comes first.
        radix::sort_by_key(
            &mut self.before,
            index_bits(entries.len()),
            |&(index, _)| index,
        );
        let mut delta = Delta::default();
        let mut last = None;
        for &(index, old) in &self.before {
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

/// Bits enough for every index of a table of `size` entries.
pub(super) fn index_bits(size: usize) -> u32 {
    usize::BITS - size.saturating_sub(1).leading_zeros()
}
