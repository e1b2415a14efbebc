//! Owner moves: the fewest entries that bring every member within its share, and a
//! returning member's former entries.
use std::cmp::Ordering;

use portshard_common::{MAX_SLOTS, TableEntry};

use super::{
    Slot,
    members::{Members, interleave, keep_smallest},
};

/// An entry an operation gave to another owner: its index and the position of the member
/// that owned it (`None` if no member did), so the caller can update what it counts.
pub(super) type Moved = (u32, Option<usize>);

/// Moves the fewest entries that put every member within `[floor, ceil]` of its exact
/// share, and gives every entry without a member owner to a member. With `only`, no
/// member but that one receives anything (an addition moves only what the newcomer
/// takes): members below their floor stay there, and if the newcomer's ceiling cannot
/// hold all that members above their ceiling must shed, the least loaded of those keep
/// one entry too many.
pub(super) fn rebalance(
    members: &Members,
    counts: &[u32],
    entries: &mut [TableEntry],
    only: Option<usize>,
) -> Vec<Moved> {
    let shares: Vec<(u32, u32)> = members.weights.iter().map(|&w| members.share(w)).collect();
    let unowned = entries.len() as u32 - counts.iter().sum::<u32>();
    let may_receive = |i: usize| only.is_none_or(|p| p == i);
    let excess = |i: usize| {
        i64::from(counts[i]) * members.total as i64
            - members.size as i64 * i64::from(members.weights[i])
    };

    // The least each member must receive or give to reach its bounds.
    let mut receive: Vec<u32> = (0..members.len())
        .map(|i| {
            if may_receive(i) {
                shares[i].0.saturating_sub(counts[i])
            } else {
                0
            }
        })
        .collect();
    let mut give: Vec<u32> = (0..members.len())
        .map(|i| counts[i].saturating_sub(shares[i].1))
        .collect();
    let mut released_count = unowned + give.iter().sum::<u32>();
    if let Some(p) = only {
        // Whatever the one receiver cannot hold stays with the least loaded givers.
        let capacity = shares[p].1.saturating_sub(counts[p]);
        while released_count > capacity {
            let Some(i) = (0..members.len())
                .filter(|&i| give[i] > 0)
                .min_by_key(|&i| (excess(i), i))
            else {
                break;
            };
            give[i] -= 1;
            released_count -= 1;
        }
    }
    let received_count: u32 = receive.iter().sum();

    // Members between their bounds take up the difference, one entry each: those already
    // receiving (or giving) first, so adding a slot moves entries to that slot only, then
    // whoever is furthest below (or above) its exact share; ties to the lower slot.
    match released_count.cmp(&received_count) {
        Ordering::Greater => {
            let mut room: Vec<usize> = (0..members.len())
                .filter(|&i| may_receive(i) && counts[i] + receive[i] < shares[i].1)
                .collect();
            keep_smallest(&mut room, (released_count - received_count) as usize, |i| {
                (i64::from(receive[i] == 0) << 45) + excess(i)
            });
            room.into_iter().for_each(|i| receive[i] += 1);
        }
        Ordering::Less => {
            let mut room: Vec<usize> = (0..members.len())
                .filter(|&i| counts[i] - give[i] > shares[i].0)
                .collect();
            keep_smallest(&mut room, (received_count - released_count) as usize, |i| {
                (i64::from(give[i] == 0) << 45) - excess(i)
            });
            room.into_iter().for_each(|i| give[i] += 1);
        }
        Ordering::Equal => {}
    }

    // Release unowned entries and, from each giver, entries evenly spaced among its own
    // (its k-th released entry is its `(2k+1) * owned / (2 * give)`-th), in one pass.
    let released = if unowned == 0 {
        release_owned(members, counts, &give, entries, released_count)
    } else {
        release(members, counts, &give, entries, released_count)
    };
    let quotas: Vec<(Slot, u32)> = members.slots.iter().copied().zip(receive).collect();
    for (&(index, _), owner) in released.iter().zip(interleave(&quotas)) {
        entries[index as usize].owner = owner;
    }
    released
}

/// Gives the member at position `p` each entry of `former` whose owner stays at or above its
/// floor, until `p` reaches its ceiling; `counts` are the members' entries before.
pub(super) fn take_back(
    members: &Members,
    counts: &[u32],
    entries: &mut [TableEntry],
    p: usize,
    former: &[u32],
) -> Vec<Moved> {
    let mut counts = counts.to_vec();
    let mut moved = Vec::new();
    let ceiling = members.share(members.weights[p]).1;
    for &index in former {
        if counts[p] >= ceiling {
            break;
        }
        let Some(entry) = entries.get_mut(index as usize) else {
            continue;
        };
        let Some(o) = members.position(entry.owner).filter(|&o| o != p) else {
            continue;
        };
        if counts[o] > members.share(members.weights[o]).0 {
            entry.owner = members.slots[p];
            counts[o] -= 1;
            counts[p] += 1;
            moved.push((index, Some(o)));
        }
    }
    moved
}

/// The `(2k+1) * owned / (2 * give)`-th entry of a member owning `owned` and giving `give`:
/// the one it releases `k`-th.
fn nth_released(k: u32, owned: u32, give: u32) -> u32 {
    ((2 * u64::from(k) + 1) * u64::from(owned) / (2 * u64::from(give))) as u32
}

/// The entries [`rebalance`] releases, owner and all, when some are unowned.
fn release(
    members: &Members,
    counts: &[u32],
    give: &[u32],
    entries: &[TableEntry],
    released_count: u32,
) -> Vec<Moved> {
    let mut seen = vec![0u32; members.len()];
    let mut given = vec![0u32; members.len()];
    let mut released = Vec::with_capacity(released_count as usize);
    for (index, entry) in entries.iter().enumerate() {
        let Some(i) = members.position(entry.owner) else {
            released.push((index as u32, None));
            continue;
        };
        if given[i] < give[i] && seen[i] == nth_released(given[i], counts[i], give[i]) {
            released.push((index as u32, Some(i)));
            given[i] += 1;
        }
        seen[i] += 1;
    }
    released
}

/// [`release`] when every entry is owned by a member: counters indexed by slot, so the
/// pass is one comparison per entry.
fn release_owned(
    members: &Members,
    counts: &[u32],
    give: &[u32],
    entries: &[TableEntry],
    released_count: u32,
) -> Vec<Moved> {
    const NONE: u32 = u32::MAX;
    let slots = MAX_SLOTS as usize;
    // next[slot]: how many of its entries come before the next one it releases.
    let mut next = vec![NONE; slots];
    let mut seen = vec![0u32; slots];
    let mut given = vec![0u32; members.len()];
    for (i, &slot) in members.slots.iter().enumerate() {
        if give[i] > 0 {
            next[usize::from(slot)] = nth_released(0, counts[i], give[i]);
        }
    }
    let mut released = Vec::with_capacity(released_count as usize);
    // No need to count the entries after the last one released.
    let total: u32 = give.iter().sum();
    for (index, entry) in entries.iter().enumerate() {
        if released.len() == total as usize {
            break;
        }
        let slot = usize::from(entry.owner) & (slots - 1);
        if seen[slot] == next[slot] {
            let i = members.position(entry.owner).expect("owned by a member");
            released.push((index as u32, Some(i)));
            given[i] += 1;
            next[slot] = if given[i] < give[i] {
                nth_released(given[i], counts[i], give[i])
            } else {
                NONE
            };
        }
        seen[slot] += 1;
    }
    released
}
