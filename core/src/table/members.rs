//! The members of a table as dense arrays, their shares, and the small selections the
//! operations share: which members get one entry more, and how turns interleave.
use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, binary_heap::PeekMut},
};

use portshard_common::{MAX_SLOTS, TableEntry};

use super::Slot;

/// Shares out of one total weight, remembering the last one computed, so that equal
/// weights (the usual case) cost one division per dying member rather than one per survivor.
pub(super) struct ShareCache {
    pub(super) size: u64,
    total: u64,
    last: Option<(u32, (u32, u32))>,
}

impl ShareCache {
    pub(super) fn new(size: u64, total: u64) -> Self {
        Self {
            size,
            total,
            last: None,
        }
    }

    pub(super) fn share(&mut self, weight: u32) -> (u32, u32) {
        match self.last {
            Some((w, share)) if w == weight => share,
            _ => {
                let share = share(self.size, weight, self.total);
                self.last = Some((weight, share));
                share
            }
        }
    }
}

/// Floor and ceiling of the exact share `size * weight / total`.
pub(super) fn share(size: u64, weight: u32, total: u64) -> (u32, u32) {
    let scaled = size * u64::from(weight);
    let floor = (scaled / total) as u32;
    (floor, floor + u32::from(!scaled.is_multiple_of(total)))
}

/// Packs a rank and a position (below 1024) into one integer that orders by rank, then by
/// position, so selections compare plain integers.
pub(super) fn pack(rank: i64, position: usize) -> i64 {
    debug_assert!(position < 1 << 10 && rank.unsigned_abs() < 1 << 52);
    (rank << 10) | position as i64
}

/// The position [`pack`] packed into `key`.
pub(super) fn unpack(key: i64) -> usize {
    (key & ((1 << 10) - 1)) as usize
}

/// Keeps in `items` (positions) only the `n` with the smallest `rank`, ties to the smaller
/// position, in no particular order.
pub(super) fn keep_smallest(items: &mut Vec<usize>, n: usize, rank: impl Fn(usize) -> i64) {
    if n >= items.len() {
        return;
    }
    let mut keys: Vec<i64> = items.iter().map(|&i| pack(rank(i), i)).collect();
    if n > 0 {
        keys.select_nth_unstable(n - 1);
    }
    items.clear();
    items.extend(keys[..n].iter().map(|&k| unpack(k)));
}

/// The members of a table as dense, slot-ordered arrays, with their total weight and each
/// slot's position among them.
pub(super) struct Members {
    /// Entries in the table.
    pub(super) size: u64,
    pub(super) slots: Vec<Slot>,
    pub(super) weights: Vec<u32>,
    pub(super) total: u64,
    /// Each valid slot's position (`u16::MAX` for none); small, so building it is cheap
    /// even for a small table.
    positions: Vec<u16>,
}

impl Members {
    pub(super) fn of(weights: &BTreeMap<Slot, u32>, size: usize) -> Self {
        let (slots, weights): (Vec<Slot>, Vec<u32>) = weights.iter().map(|(&s, &w)| (s, w)).unzip();
        let total = weights.iter().map(|&w| u64::from(w)).sum();
        let mut positions = vec![u16::MAX; MAX_SLOTS as usize];
        for (i, &slot) in slots.iter().enumerate() {
            positions[usize::from(slot)] = i as u16;
        }
        Self {
            size: size as u64,
            slots,
            weights,
            total,
            positions,
        }
    }

    /// Position of `slot` among the members, `None` if it is not one (or is [`portshard_common::NO_SLOT`]).
    pub(super) fn position(&self, slot: Slot) -> Option<usize> {
        let p = self.positions.get(usize::from(slot)).copied()?;
        (p != u16::MAX).then_some(usize::from(p))
    }

    /// How many entries each member owns, indexed by position.
    pub(super) fn counts(&self, entries: &[TableEntry]) -> Vec<u32> {
        let mut counts = vec![0u32; self.len()];
        for entry in entries {
            if let Some(i) = self.position(entry.owner) {
                counts[i] += 1;
            }
        }
        counts
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Floor and ceiling of the exact share of a member with `weight`.
    pub(super) fn share(&self, weight: u32) -> (u32, u32) {
        share(self.size, weight, self.total)
    }
}

/// Each slot of `quotas` as many times as its quota, each slot's turns evenly spread over
/// the sequence: slot `j`'s `k`-th turn sits at `(k + 1/2) / quota_j` of the way.
pub(super) fn interleave(quotas: &[(Slot, u32)]) -> Vec<Slot> {
    let mut turns = Vec::new();
    interleave_into(quotas, &mut turns);
    turns.into_iter().map(|(_, _, slot)| slot).collect()
}

/// A turn of [`interleave`]: `(2k + 1, 2 * quota, slot)`, at `(2k + 1) / (2 * quota)`.
pub(super) type Turn = (u64, u64, Slot);

/// [`interleave`] into `turns`, whose buffer is reused: the slots are the turns' last
/// fields, in order (earliest first, ties to the lower slot). Each slot's turns come in
/// order, so they are merged: the next turn of every slot waits in a heap, which costs
/// `log(slots)` a turn rather than a sort's `log(turns)`; with few slots (a removal from
/// few members gives thousands of turns to one or two heirs) that is all but linear.
pub(super) fn interleave_into(quotas: &[(Slot, u32)], turns: &mut Vec<Turn>) {
    turns.clear();
    let total: u64 = quotas.iter().map(|&(_, quota)| u64::from(quota)).sum();
    if total <= 4 * quotas.len() as u64 {
        // A turn or few per slot (an owner's heirs among many members): sorting them is
        // cheaper than a heap as large as the slots.
        turns.extend(quotas.iter().flat_map(|&(slot, quota)| {
            (0..u64::from(quota)).map(move |k| (2 * k + 1, 2 * u64::from(quota), slot))
        }));
        turns.sort_unstable_by_key(|&turn| NextTurn(turn));
        return;
    }
    let mut next: BinaryHeap<Reverse<NextTurn>> = quotas
        .iter()
        .filter(|&&(_, quota)| quota > 0)
        .map(|&(slot, quota)| Reverse(NextTurn((1, 2 * u64::from(quota), slot))))
        .collect();
    while let Some(mut earliest) = next.peek_mut() {
        let Reverse(NextTurn(turn)) = *earliest;
        turns.push(turn);
        let (odd, twice_quota, slot) = turn;
        if odd + 2 < twice_quota {
            // The slot's next turn takes its place: one sift, not a pop and a push.
            *earliest = Reverse(NextTurn((odd + 2, twice_quota, slot)));
        } else {
            PeekMut::pop(earliest);
        }
    }
}

/// A slot's next turn in [`interleave_into`]'s merge, ordered by where it sits, then slot.
#[derive(Clone, Copy)]
struct NextTurn(Turn);

impl PartialEq for NextTurn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for NextTurn {}

impl Ord for NextTurn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.0, other.0);
        (a.0 * b.1).cmp(&(b.0 * a.1)).then(a.2.cmp(&b.2))
    }
}

impl PartialOrd for NextTurn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
