//! Property tests: random tables and random sequences of operations, each checked against
//! the table before it.
use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// One step of a random scenario; indices pick among current members or free slots.
#[derive(Debug, Clone)]
enum Op {
    Remove(usize),
    /// A member dies and comes back (a worker restarted into its slot).
    Rejoin(usize),
    Add(usize, u32),
    Weight(usize, u32),
    /// Several members' weights at once (a SIGHUP or an adoption).
    Weights(Vec<(usize, u32)>),
    /// Every weight multiplied by the factor, then divided back: each moves nothing.
    Scale(u32),
    /// A slot is seated but its entries never written (a daemon killed in between); the
    /// adopted table is then settled.
    Seat(usize, u32),
    /// Every member is replaced by slots not in the table, one more, as many or fewer (by
    /// the first number), all with the given weight: a reload's switch.
    Switch(usize, u32),
}

fn op(weighted: bool) -> impl Strategy<Value = Op> {
    let weight = if weighted { 1..=1000u32 } else { 1..=1u32 };
    prop_oneof![
        any::<usize>().prop_map(Op::Remove),
        any::<usize>().prop_map(Op::Rejoin),
        (any::<usize>(), weight.clone()).prop_map(|(i, w)| Op::Add(i, w)),
        (any::<usize>(), weight.clone()).prop_map(|(i, w)| Op::Weight(i, w)),
        proptest::collection::vec((any::<usize>(), weight.clone()), 1..8).prop_map(Op::Weights),
        (2..=10u32).prop_map(Op::Scale),
        (any::<usize>(), weight.clone()).prop_map(|(i, w)| Op::Seat(i, w)),
        (any::<usize>(), weight).prop_map(|(i, w)| Op::Switch(i, w)),
    ]
}

/// A table size (mostly small, so many cases run; the kernel's in one case of eight),
/// initial members (1..=256 distinct slots, equal or random weights) and up to 12
/// operations.
fn scenario() -> impl Strategy<Value = (usize, Vec<(Slot, u32)>, Vec<Op>, bool)> {
    let size = prop_oneof![
        7 => (10..=14u32).prop_map(|bits| 1usize << bits),
        1 => Just(TABLE_SIZE),
    ];
    (size, any::<bool>()).prop_flat_map(|(size, weighted)| {
        let slots =
            proptest::sample::subsequence((0..MAX_SLOTS as Slot).collect::<Vec<_>>(), 1..=256);
        let weight = if weighted { 1..=1000u32 } else { 1..=1u32 };
        let members = slots.prop_flat_map(move |slots| {
            let n = slots.len();
            (Just(slots), proptest::collection::vec(weight.clone(), n))
                .prop_map(|(s, w)| s.into_iter().zip(w).collect::<Vec<_>>())
        });
        (
            Just(size),
            members,
            proptest::collection::vec(op(weighted), 1..12),
            Just(weighted),
        )
    })
}

/// Checks that `delta` reports exactly what changed from `before` to `after`: the indices
/// whose entry differs, ascending and each once, and how many of them changed owner; and
/// that `after`'s tally counts its entries.
fn check_delta(before: &Table, after: &Table, delta: &Delta) -> Result<(), TestCaseError> {
    let differ: Vec<u32> = (0..after.size() as u32)
        .filter(|&i| before.entries()[i as usize] != after.entries()[i as usize])
        .collect();
    prop_assert_eq!(&delta.changed, &differ, "changed is not what differs");
    let moved = before
        .entries()
        .iter()
        .zip(after.entries())
        .filter(|(old, new)| old.owner != new.owner)
        .count() as u32;
    prop_assert_eq!(delta.moved, moved, "moved is not the owner changes");
    prop_assert_eq!(
        &after.tally,
        &Tally::of(&after.current(), after.entries()),
        "the tally does not count the entries"
    );
    Ok(())
}

/// Applies `op` (ignoring ops that make no sense in the current state), checking every
/// property of the operation against the table before it.
fn apply_and_check(table: &mut Table, op: &Op, weighted: bool) -> Result<(), TestCaseError> {
    let before = table.clone();
    let members: Vec<Slot> = before.members().keys().copied().collect();
    match *op {
        Op::Remove(pick) => {
            if members.is_empty() {
                return Ok(());
            }
            let dying = members[pick % members.len()];
            let delta = table.remove(dying).unwrap();
            check_delta(&before, table, &delta)?;
            for (old, new) in before.entries().iter().zip(table.entries()) {
                if old.owner == dying {
                    prop_assert_eq!(
                        new.owner,
                        old.heir,
                        "an orphan went elsewhere than its heir"
                    );
                } else {
                    prop_assert_eq!(new.owner, old.owner, "a survivor's entry moved");
                }
            }
            prop_assert_eq!(delta.moved, owned(&before, dying));
        }
        Op::Rejoin(pick) => {
            if members.is_empty() {
                return Ok(());
            }
            let slot = members[pick % members.len()];
            let weight = before.members()[&slot];
            let former = table.owned_by(slot);
            let removal = table.remove(slot).unwrap();
            check_delta(&before, table, &removal)?;
            let after_removal = table.clone();
            let delta = table.rejoin(slot, weight, &former).unwrap();
            check_delta(&after_removal, table, &delta)?;
            for (old, new) in after_removal.entries().iter().zip(table.entries()) {
                if old.owner != new.owner {
                    prop_assert_eq!(new.owner, slot, "an entry moved between other members");
                }
            }
            if !weighted || before.is_exactly_balanced() {
                prop_assert_eq!(
                    owners(table),
                    owners(&before),
                    "the slot did not get its entries back"
                );
                prop_assert_eq!(delta.moved, removal.moved);
            }
        }
        Op::Add(pick, weight) => {
            // Keep N within 1..=256 as the property range asks.
            if members.len() >= 256 {
                return Ok(());
            }
            let free: Vec<Slot> = (0..MAX_SLOTS as Slot)
                .filter(|s| !members.contains(s))
                .collect();
            let newcomer = free[pick % free.len()];
            let delta = table.add(newcomer, weight).unwrap();
            check_delta(&before, table, &delta)?;
            for (old, new) in before.entries().iter().zip(table.entries()) {
                if old.owner != new.owner {
                    prop_assert_eq!(new.owner, newcomer, "an entry moved between old members");
                }
            }
            let (share, total) = exact_share(table, newcomer);
            prop_assert!(
                u64::from(delta.moved) <= share.div_ceil(total),
                "took more than its share plus one"
            );
            prop_assert_eq!(delta.moved, owned(table, newcomer));
            prop_assert!(
                u64::from(delta.moved) >= share / total,
                "took less than its floor"
            );
            if !weighted {
                prop_assert_eq!(
                    delta.moved,
                    minimal_moves(&before, table),
                    "not the fewest moves"
                );
            }
        }
        Op::Weight(pick, weight) => {
            if members.is_empty() {
                return Ok(());
            }
            let slot = members[pick % members.len()];
            let delta = table.set_weight(slot, weight).unwrap();
            check_delta(&before, table, &delta)?;
            check_rebalanced(&before, table, delta.moved)?;
        }
        Op::Weights(ref picks) => {
            if members.is_empty() {
                return Ok(());
            }
            let weights: BTreeMap<Slot, u32> = picks
                .iter()
                .map(|&(pick, weight)| (members[pick % members.len()], weight))
                .collect();
            let delta = table.set_weights(&weights).unwrap();
            check_delta(&before, table, &delta)?;
            for (slot, weight) in &weights {
                prop_assert_eq!(table.members()[slot], *weight);
            }
            check_rebalanced(&before, table, delta.moved)?;
        }
        Op::Scale(factor) => {
            // Exact first (what a scaling would otherwise do on the way), and heirs by the
            // operations' rule: an adopted table that settling left as it was may have heirs
            // computed for other members (a seated slot that owns nothing), which any
            // change of weights recomputes, moving no flow.
            let settled = table.set_weights(&BTreeMap::new()).unwrap();
            check_delta(&before, table, &settled)?;
            if before.is_exactly_balanced() {
                prop_assert_eq!(settled.moved, 0, "an exact table's reweight moved entries");
            } else {
                check_rebalanced(&before, table, settled.moved)?;
            }
            let exact = table.clone();
            let scaled: BTreeMap<Slot, u32> = exact
                .members()
                .iter()
                .map(|(&s, &w)| (s, w * factor))
                .collect();
            prop_assert_eq!(table.set_weights(&scaled).unwrap(), Delta::default());
            prop_assert_eq!(
                table.set_weights(exact.members()).unwrap(),
                Delta::default()
            );
            prop_assert_eq!(&*table, &exact);
        }
        Op::Seat(pick, weight) => {
            // Under two members no entry has an heir, so the pins cannot hold a table over
            // two or more: adoption refuses them and the daemon builds afresh.
            if !(2..256).contains(&members.len()) {
                return Ok(());
            }
            let free: Vec<Slot> = (0..MAX_SLOTS as Slot)
                .filter(|s| !members.contains(s))
                .collect();
            let seated = free[pick % free.len()];
            let mut live = before.members().clone();
            live.insert(seated, weight);
            *table = Table::adopt(before.entries().to_vec(), live.clone()).unwrap();
            let adopted = table.clone();
            let delta = table.settle();
            check_delta(&adopted, table, &delta)?;
            if delta.moved == 0 {
                // A share so small that owning nothing is within one entry of it.
                prop_assert!(
                    weighted,
                    "an entryless member of equal weight was not settled"
                );
                prop_assert_eq!(&*table, &adopted);
                prop_assert_eq!(table.validate(), Ok(()));
                return Ok(());
            }
            check_rebalanced(&adopted, table, delta.moved)?;
            // With equal weights only the seated slot receives (with unequal ones, members
            // between their bounds may take an entry the seated slot's ceiling cannot hold).
            if !weighted {
                prop_assert_eq!(delta.moved, owned(table, seated));
                for (old, new) in adopted.entries().iter().zip(table.entries()) {
                    if old.owner != new.owner {
                        prop_assert_eq!(new.owner, seated, "an entry moved between other members");
                    }
                }
            }
        }
        Op::Switch(count, weight) => {
            if members.is_empty() {
                return Ok(());
            }
            let count = (members.len() + count % 3).saturating_sub(1).clamp(1, 256);
            let new: Vec<Slot> = (0..MAX_SLOTS as Slot)
                .rev()
                .filter(|s| !members.contains(s))
                .take(count)
                .collect();
            let delta = table.switch(&members, &new, weight).unwrap();
            check_delta(&before, table, &delta)?;
            let expected: BTreeMap<Slot, u32> = new.iter().map(|&s| (s, weight)).collect();
            prop_assert_eq!(table.members(), &expected);
            prop_assert_eq!(
                delta.moved,
                table.size() as u32,
                "an entry stayed with the old generation"
            );
            prop_assert!(
                table.is_exactly_balanced(),
                "shares not exact after a switch"
            );
            // With as many slots and one weight throughout, old slot i's entries all go to new
            // slot i.
            let same = before.members().values().all(|&w| w == weight);
            if same && new.len() == members.len() && before.is_exactly_balanced() {
                for (was, is) in before.entries().iter().zip(table.entries()) {
                    let i = members.iter().position(|&m| m == was.owner).unwrap();
                    prop_assert_eq!(is.owner, new[i], "an entry went to another new slot");
                }
            }
        }
    }
    prop_assert_eq!(table.validate(), Ok(()), "after {:?}", op);
    prop_assert_eq!(
        table.clone().settle(),
        Delta::default(),
        "settling moved entries after {:?}",
        op
    );
    if !weighted
        || matches!(
            op,
            Op::Weight(..) | Op::Weights(..) | Op::Scale(..) | Op::Seat(..)
        )
    {
        prop_assert!(
            table.is_exactly_balanced(),
            "not within [floor, ceil] after {:?}",
            op
        );
    }
    let n = table.members().len();
    if n > 0 && !weighted {
        let max = *table.counts().values().max().unwrap();
        let size = table.size() as f64;
        let ratio = f64::from(max) / (size / n as f64);
        prop_assert!(ratio <= 1.0 + n as f64 / size, "balance {ratio} at N={n}");
    }
    check_heir_spread(table, weighted)
}

fn check_heir_spread(table: &Table, weighted: bool) -> Result<(), TestCaseError> {
    let total: u64 = table.members().values().map(|&w| u64::from(w)).sum();
    let counts = table.counts();
    for (dying, heirs) in heir_counts(table) {
        if heirs.is_empty() {
            continue;
        }
        if weighted {
            let estate = f64::from(counts[&dying]);
            let rest = (total - u64::from(table.members()[&dying])) as f64;
            for (heir, &n) in &heirs {
                let fair = estate * f64::from(table.members()[heir]) / rest;
                prop_assert!(
                    (f64::from(n) - fair).abs() < 2.0,
                    "slot {heir} inherits {n} of {dying}, fair {fair}"
                );
            }
        } else {
            let (min, max) = (heirs.values().min().unwrap(), heirs.values().max().unwrap());
            prop_assert!(max - min <= 1, "heirs of {dying} uneven: {min}..{max}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn operations_keep_every_promise((size, members, ops, weighted) in scenario()) {
        let mut table = Table::sized_with_members(size, members.clone()).unwrap();
        prop_assert_eq!(table.validate(), Ok(()));
        prop_assert!(table.is_exactly_balanced());
        check_heir_spread(&table, weighted)?;
        for op in &ops {
            apply_and_check(&mut table, op, weighted)?;
        }
        // Determinism: the same sequence from scratch gives the same table.
        let mut replay = Table::sized_with_members(size, members).unwrap();
        for op in &ops {
            apply_and_check(&mut replay, op, weighted)?;
        }
        prop_assert_eq!(owners(&replay), owners(&table));
        prop_assert_eq!(replay, table);
    }
}

/// One removal, addition or weight change on a random table (up to 256 members, equal or
/// random weights), the operations computed incrementally.
#[derive(Debug, Clone)]
enum Single {
    Remove(usize),
    Add(usize, u32),
    Weight(usize, u32),
}

fn single() -> impl Strategy<Value = (usize, Vec<(Slot, u32)>, Single)> {
    let size = (10..=16u32).prop_map(|bits| 1usize << bits);
    let slots = proptest::sample::subsequence((0..MAX_SLOTS as Slot).collect::<Vec<_>>(), 1..=256);
    let members = (slots, any::<bool>()).prop_flat_map(|(slots, weighted)| {
        let weight = if weighted { 1..=1000u32 } else { 1..=1u32 };
        let n = slots.len();
        (Just(slots), proptest::collection::vec(weight, n))
            .prop_map(|(s, w)| s.into_iter().zip(w).collect::<Vec<_>>())
    });
    let op = prop_oneof![
        any::<usize>().prop_map(Single::Remove),
        (any::<usize>(), 1..=1000u32).prop_map(|(i, w)| Single::Add(i, w)),
        (any::<usize>(), 1..=1000u32).prop_map(|(i, w)| Single::Weight(i, w)),
    ];
    (size, members, op)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn each_change_reports_exactly_the_entries_it_changed((size, members, op) in single()) {
        let before = Table::sized_with_members(size, members).unwrap();
        let slots: Vec<Slot> = before.members().keys().copied().collect();
        let mut table = before.clone();
        let delta = match op {
            Single::Remove(pick) => {
                let dying = slots[pick % slots.len()];
                let delta = table.remove(dying).unwrap();
                for (old, new) in before.entries().iter().zip(table.entries()) {
                    if old.owner != dying {
                        prop_assert_eq!(new.owner, old.owner, "a survivor's entry moved");
                    }
                }
                delta
            }
            Single::Add(pick, weight) => {
                let free: Vec<Slot> =
                    (0..MAX_SLOTS as Slot).filter(|s| !slots.contains(s)).collect();
                table.add(free[pick % free.len()], weight).unwrap()
            }
            Single::Weight(pick, weight) => {
                table.set_weight(slots[pick % slots.len()], weight).unwrap()
            }
        };
        check_delta(&before, &table, &delta)?;
        prop_assert_eq!(table.validate(), Ok(()));
    }
}
