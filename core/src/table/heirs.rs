//! Heirs: which member inherits each entry when its owner dies, chosen so that any later
//! removal keeps every survivor within its new share and spreads the estate evenly.
use std::cmp::Ordering;

use portshard_common::{MAX_SLOTS, NO_SLOT, TableEntry};

use super::{
    edit::{self, Edit},
    members::{Members, ShareCache, interleave_into, pack, unpack},
    radix,
    tally::Tally,
    targets::Targets,
};

/// Gives every entry an heir among the other members by the same rule as every operation
/// ([`reassign`], every entry without a valid heir an orphan), so that a table built or
/// settled from scratch is one the operations keep as it is; returns its tally. Entries
/// without a member owner are emptied (there are none unless there are no members).
pub(super) fn assign_all(members: &Members, entries: &mut [TableEntry]) -> Tally {
    let n = members.len();
    let mut orphans = Vec::new();
    for (index, entry) in entries.iter_mut().enumerate() {
        let Some(d) = members.position(entry.owner) else {
            *entry = TableEntry::EMPTY;
            continue;
        };
        if n < 2 {
            entry.heir = NO_SLOT;
        } else if members.position(entry.heir).is_none_or(|h| h == d) {
            orphans.push(index as u32);
        }
    }
    let mut tally = Tally::of(members, entries);
    if n >= 2 {
        reassign(members, entries, &mut tally, orphans, &mut Edit::default());
    }
    tally
}

/// How many of a dying member's entries each other member inherits: enough to lift every
/// survivor to the floor of its new share, the rest one each to the survivors furthest
/// behind their fair part of the inheritance, never above the ceiling of the new share.
/// Holds its buffers so that computing it for every member allocates nothing.
pub(super) struct HeirQuotas {
    quota: Vec<u32>,
    /// Candidates for one more entry, as `(ahead << 10) | position` (see [`keep_smallest`](super::members::keep_smallest)).
    ranked: Vec<i64>,
}

impl HeirQuotas {
    pub(super) fn new(members: usize) -> Self {
        Self {
            quota: vec![0; members],
            ranked: Vec::with_capacity(members),
        }
    }

    /// Quotas indexed like `members`; the dying member's own is 0.
    pub(super) fn compute(&mut self, members: &Members, counts: &[u32], dying: usize) -> &[u32] {
        let Self { quota, ranked } = self;
        quota.fill(0);
        let survivors_weight = members.total - u64::from(members.weights[dying]);
        if survivors_weight == 0 {
            return quota;
        }
        let estate = counts[dying];
        // quota_i * W' - estate * w_i: how far ahead of its fair inheritance survivor i is.
        let ahead = |quota: u32, i: usize| {
            i64::from(quota) * survivors_weight as i64
                - i64::from(estate) * i64::from(members.weights[i])
        };
        let mut shares = ShareCache::new(members.size, survivors_weight);
        ranked.clear();
        let mut needed = 0;
        for i in (0..members.len()).filter(|&i| i != dying) {
            let (floor, ceiling) = shares.share(members.weights[i]);
            quota[i] = floor.saturating_sub(counts[i]);
            needed += quota[i];
            if counts[i] + quota[i] < ceiling {
                ranked.push(pack(ahead(quota[i], i), i));
            }
        }
        if needed <= estate && (estate - needed) as usize <= ranked.len() {
            let extra = (estate - needed) as usize;
            if extra > 0 && extra < ranked.len() {
                ranked.select_nth_unstable(extra - 1);
            }
            ranked[..extra]
                .iter()
                .for_each(|&key| quota[unpack(key)] += 1);
            return quota;
        }
        // Rare cases, one entry at a time: the estate cannot lift every survivor to its
        // floor (hold back from whoever is most ahead), or, impossible while the shares sum
        // to the table's size, the ceilings cannot absorb it (give to whoever is most behind).
        let survivors = || (0..members.len()).filter(|&i| i != dying);
        while needed > estate {
            let i = survivors()
                .filter(|&i| quota[i] > 0)
                .max_by_key(|&i| pack(ahead(quota[i], i), members.len() - i))
                .expect("a survivor has a quota while more is needed than inherited");
            quota[i] -= 1;
            needed -= 1;
        }
        while needed < estate {
            let i = survivors()
                .min_by_key(|&i| pack(ahead(quota[i], i), i))
                .expect("there are survivors");
            quota[i] += 1;
            needed += 1;
        }
        quota
    }
}

/// Gives an heir to each of `orphans` (entries whose heir is no longer a member other than
/// their owner) and moves the fewest other heirs that bring every owner's heirs within their
/// bounds again (see [`Targets`]), recording each change in `edit`. The bounds depend on
/// the counts only, so an owner whose heirs already fit keeps them all. `tally` must count
/// `entries` over `members`, which must be two or more.
pub(super) fn reassign(
    members: &Members,
    entries: &mut [TableEntry],
    tally: &mut Tally,
    mut orphans: Vec<u32>,
    edit: &mut Edit,
) {
    let n = members.len();
    let mut targets = Targets::new(members, tally.owned());
    // (d * n + h, how many): heirs of member d's entries to take from member h, or give it.
    let mut surplus: Vec<(u32, u32)> = Vec::new();
    let mut deficit: Vec<(u32, u32)> = Vec::new();
    for d in 0..n {
        let row = tally.row(d);
        let target = targets.of(tally.owned(), row, d);
        for (chunk, (have, want)) in row.chunks(16).zip(target.chunks(16)).enumerate() {
            if have == want {
                continue;
            }
            for (k, (&have, &want)) in have.iter().zip(want).enumerate() {
                let key = (d * n + chunk * 16 + k) as u32;
                match have.cmp(&want) {
                    Ordering::Greater => surplus.push((key, have - want)),
                    Ordering::Less => deficit.push((key, want - have)),
                    Ordering::Equal => {}
                }
            }
        }
    }
    if !surplus.is_empty() {
        release(members, entries, tally, surplus, &mut orphans);
    }
    let mut orphans: Vec<(usize, u32)> = orphans
        .into_iter()
        .map(|index| {
            let owner = members.position(entries[index as usize].owner);
            (owner.expect("orphans are owned by members"), index)
        })
        .collect();
    // By owner, then index: one linear pass per byte of the key, or, when the orphans come
    // in index order already (a whole table's), per byte of the owner alone.
    let owner_bits = edit::index_bits(n + 1);
    if orphans.is_sorted_by_key(|&(_, index)| index) {
        radix::sort_by_key(&mut orphans, owner_bits, |&(d, _)| d as u32);
    } else {
        let shift = edit::index_bits(entries.len());
        radix::sort_by_key(&mut orphans, shift + owner_bits, |&(d, index)| {
            ((d as u32) << shift) | index
        });
    }
    let mut deficit = deficit.into_iter().peekable();
    let (mut quotas, mut heirs) = (Vec::new(), Vec::new());
    for group in orphans.chunk_by(|a, b| a.0 == b.0) {
        let d = group[0].0;
        quotas.clear();
        while let Some((key, count)) = deficit.next_if(|&(key, _)| key as usize / n <= d) {
            if key as usize / n == d {
                quotas.push((members.slots[key as usize % n], count));
            }
        }
        interleave_into(&quotas, &mut heirs);
        debug_assert_eq!(heirs.len(), group.len(), "heirs for every orphan of {d}");
        for (&(_, index), &(_, _, heir)) in group.iter().zip(&heirs) {
            let owner = entries[index as usize].owner;
            edit.set(entries, index, TableEntry { owner, heir });
            let h = members.position(heir).expect("heirs are members");
            *tally.pair_mut(d, h) += 1;
        }
    }
}

/// Makes orphans of the entries `surplus` names (`(d * n + h, count)`, ascending): `count`
/// of member d's entries whose heir is member h, the first in index order, in one pass that
/// looks closer only at entries whose heir has a surplus somewhere.
fn release(
    members: &Members,
    entries: &[TableEntry],
    tally: &mut Tally,
    mut surplus: Vec<(u32, u32)>,
    orphans: &mut Vec<u32>,
) {
    let n = members.len();
    let mut hot = [false; MAX_SLOTS as usize];
    for &(key, _) in &surplus {
        hot[usize::from(members.slots[key as usize % n])] = true;
    }
    let mut left: u32 = surplus.iter().map(|&(_, count)| count).sum();
    // first[d]..first[d + 1]: member d's surpluses, ascending: one or two after a removal,
    // up to one per member after an addition to few members.
    let mut first = vec![0u32; n + 1];
    for &(key, _) in &surplus {
        first[key as usize / n + 1] += 1;
    }
    for d in 0..n {
        first[d + 1] += first[d];
    }
    // With many surpluses (an addition to a few dozen members gives most owners several),
    // one counter per (owner, heir) pair is cheaper than a search per entry.
    let mut dense = (surplus.len() > 2 * n).then(|| {
        let mut dense = vec![0u32; n * n];
        for &(key, count) in &surplus {
            dense[key as usize] = count;
        }
        dense
    });
    for (index, entry) in entries.iter().enumerate() {
        // NO_SLOT aliases the last slot here; its position, none, tells them apart.
        if !hot[usize::from(entry.heir) & (MAX_SLOTS as usize - 1)] {
            continue;
        }
        let (Some(d), Some(h)) = (members.position(entry.owner), members.position(entry.heir))
        else {
            continue;
        };
        let remaining = match &mut dense {
            Some(dense) => &mut dense[d * n + h],
            None => {
                let key = (d * n + h) as u32;
                let row = first[d] as usize..first[d + 1] as usize;
                let Ok(k) = surplus[row.clone()].binary_search_by_key(&key, |&(key, _)| key) else {
                    continue;
                };
                &mut surplus[row.start + k].1
            }
        };
        if *remaining > 0 {
            *remaining -= 1;
            *tally.pair_mut(d, h) -= 1;
            orphans.push(index as u32);
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
}
