//! Unit and property tests of the table, checked exactly on the entries.
use std::collections::BTreeMap;

use portshard_common::{MAX_SLOTS, NO_SLOT};
use proptest::prelude::*;

use super::{members::interleave, *};

mod props;

fn owners(table: &Table) -> Vec<Slot> {
    table.entries().iter().map(|e| e.owner).collect()
}

fn owned(table: &Table, slot: Slot) -> u32 {
    table.counts().get(&slot).copied().unwrap_or(0)
}

/// Exact share of `slot` as a fraction `size * w / W`, returned as (numerator, denominator).
fn exact_share(table: &Table, slot: Slot) -> (u64, u64) {
    let total: u64 = table.members().values().map(|&w| u64::from(w)).sum();
    (
        table.size() as u64 * u64::from(table.members()[&slot]),
        total,
    )
}

/// For each member `s`, how many of its entries each other member inherits (zeros included).
fn heir_counts(table: &Table) -> BTreeMap<Slot, BTreeMap<Slot, u32>> {
    let mut all: BTreeMap<Slot, BTreeMap<Slot, u32>> = table
        .members()
        .keys()
        .map(|&s| {
            let others = table
                .members()
                .keys()
                .filter(|&&o| o != s)
                .map(|&o| (o, 0))
                .collect();
            (s, others)
        })
        .collect();
    for entry in table.entries() {
        if entry.heir != NO_SLOT {
            *all.get_mut(&entry.owner)
                .unwrap()
                .get_mut(&entry.heir)
                .unwrap() += 1;
        }
    }
    all
}

/// The fewest owner changes that can bring `before`'s owners within the shares of `after`'s
/// members: max(what must come in, what must go out).
fn minimal_moves(before: &Table, after: &Table) -> u32 {
    let members = Members::of(after.members(), after.size());
    let owned_before = before.counts();
    let (mut come_in, mut go_out) = (0, 0);
    for (slot, &weight) in members.slots.iter().zip(&members.weights) {
        let owned = owned_before.get(slot).copied().unwrap_or(0);
        let (floor, ceiling) = members.share(weight);
        come_in += floor.saturating_sub(owned);
        go_out += owned.saturating_sub(ceiling);
    }
    come_in.max(go_out)
}

/// How many entries each slot lost from `before` to `after`, summed: the entries that left
/// their owner, if no entry passed through a member on its way.
fn losses(before: &Table, after: &Table) -> u32 {
    let now = after.counts();
    before
        .counts()
        .iter()
        .map(|(slot, &was)| was.saturating_sub(now.get(slot).copied().unwrap_or(0)))
        .sum()
}

/// Checks a rebalance from `before` to `after` that moved `moved` entries: the fewest that
/// can bring every member within its bounds, only members that end with fewer entries
/// giving (so no entry passes through a member), and every share exact afterwards.
fn check_rebalanced(before: &Table, after: &Table, moved: u32) -> Result<(), TestCaseError> {
    prop_assert_eq!(moved, minimal_moves(before, after), "not the fewest moves");
    prop_assert_eq!(
        moved,
        losses(before, after),
        "an entry moved more than its surplus"
    );
    prop_assert!(after.is_exactly_balanced(), "shares not exact");
    prop_assert_eq!(after.validate(), Ok(()));
    Ok(())
}

fn unit(slots: impl IntoIterator<Item = Slot>) -> Vec<(Slot, u32)> {
    slots.into_iter().map(|s| (s, 1)).collect()
}

#[test]
fn adoption_keeps_a_working_table_whatever_its_shares_and_refuses_a_broken_one() {
    let table = Table::with_members([(0, 1), (1, 3), (2, 1)]).unwrap();
    let members = || table.members().iter().map(|(&s, &w)| (s, w));
    // The same entries under other weights are off their shares, but every entry still
    // names a member owner and heir: kept as it is, nothing moves.
    let reweighted: Vec<(Slot, u32)> = members().map(|(s, _)| (s, 1)).collect();
    let adopted = Table::adopt(table.entries().to_vec(), reweighted).unwrap();
    assert_eq!(adopted.entries(), table.entries());
    assert!(adopted.validate().is_err(), "the shares really are off");
    // Entries naming a slot that is not a member (as owner or heir) are refused.
    let without_2: Vec<(Slot, u32)> = members().filter(|&(s, _)| s != 2).collect();
    let refused = Table::adopt(table.entries().to_vec(), without_2)
        .unwrap_err()
        .to_string();
    assert!(
        refused.starts_with("the pinned table is inconsistent with its slot records: entry")
            && refused.ends_with(" 2"),
        "{refused}"
    );
}

#[test]
fn empty_table_names_no_slot() {
    let table = Table::new();
    assert!(table.entries().iter().all(|e| *e == TableEntry::EMPTY));
    table.validate().unwrap();
}

#[test]
fn single_member_owns_everything_without_heir() {
    let table = Table::with_members(unit([7])).unwrap();
    assert_eq!(owned(&table, 7), TABLE_SIZE as u32);
    assert!(table.entries().iter().all(|e| e.heir == NO_SLOT));
    table.validate().unwrap();
}

#[test]
fn four_equal_members_split_exactly_and_spread_heirs() {
    let table = Table::with_members(unit(0..4)).unwrap();
    for slot in 0..4 {
        assert_eq!(owned(&table, slot), 16_384);
    }
    for (_, heirs) in heir_counts(&table) {
        let (min, max) = (heirs.values().min().unwrap(), heirs.values().max().unwrap());
        assert!(max - min <= 1, "heirs uneven: {heirs:?}");
        assert_eq!(heirs.values().sum::<u32>(), 16_384);
    }
}

#[test]
fn owners_are_spread_over_the_table() {
    // Every 1/64th of the table holds each of 4 members within one entry of a quarter.
    let table = Table::with_members(unit(0..4)).unwrap();
    for chunk in table.entries().chunks(TABLE_SIZE / 64) {
        for slot in 0..4 {
            let n = chunk.iter().filter(|e| e.owner == slot).count();
            assert!(
                n.abs_diff(chunk.len() / 4) <= 1,
                "slot {slot} has {n} of {}",
                chunk.len()
            );
        }
    }
}

#[test]
fn removing_the_last_member_empties_the_table() {
    let mut table = Table::with_members(unit([3])).unwrap();
    let delta = table.remove(3).unwrap();
    assert_eq!(delta.moved, TABLE_SIZE as u32);
    assert!(table.entries().iter().all(|e| *e == TableEntry::EMPTY));
    table.validate().unwrap();
}

#[test]
fn refused_operations_change_nothing() {
    let mut table = Table::with_members([(0, 1), (1, 2)]).unwrap();
    let before = table.clone();
    assert_eq!(table.add(1, 1), Err(TableError::AlreadyMember { slot: 1 }));
    assert_eq!(
        table.add(MAX_SLOTS as Slot, 1),
        Err(TableError::SlotOutOfRange { slot: 512 })
    );
    assert_eq!(
        table.add(2, 0),
        Err(TableError::BadWeight { slot: 2, weight: 0 })
    );
    assert_eq!(
        table.set_weight(0, MAX_WEIGHT + 1),
        Err(TableError::BadWeight {
            slot: 0,
            weight: MAX_WEIGHT + 1
        })
    );
    assert_eq!(table.remove(5), Err(TableError::NotMember { slot: 5 }));
    assert_eq!(
        table.set_weight(5, 1),
        Err(TableError::NotMember { slot: 5 })
    );
    // Several weights at once: one bad one refuses them all.
    assert_eq!(
        table.set_weights(&[(0, 2), (5, 1)].into()),
        Err(TableError::NotMember { slot: 5 })
    );
    assert_eq!(
        table.set_weights(&[(0, 2), (1, 0)].into()),
        Err(TableError::BadWeight { slot: 1, weight: 0 })
    );
    for (old, new, error) in [
        (&[0, 1][..], &[][..], TableError::NoNewSlot),
        (&[0, 0], &[2], TableError::NamedTwice { slot: 0 }),
        (&[0, 1], &[2, 2], TableError::NamedTwice { slot: 2 }),
        (&[0, 5], &[2], TableError::NotMember { slot: 5 }),
        (&[0, 1], &[2, 1], TableError::AlreadyMember { slot: 1 }),
        (
            &[0, 1],
            &[MAX_SLOTS as Slot],
            TableError::SlotOutOfRange { slot: 512 },
        ),
    ] {
        assert_eq!(table.switch(old, new, 1), Err(error), "{old:?} to {new:?}");
    }
    assert_eq!(table, before);
    assert_eq!(
        Table::with_members([(1, 1), (1, 1)]),
        Err(TableError::AlreadyMember { slot: 1 })
    );
}

#[test]
fn error_messages_name_the_slot_and_the_allowed_range() {
    let message = TableError::BadWeight { slot: 4, weight: 0 }.to_string();
    assert_eq!(
        message,
        "weight 0 for slot 4 is out of range: use 1 to 10000"
    );
    let message = TableError::SlotOutOfRange { slot: 600 }.to_string();
    assert_eq!(
        message,
        "slot 600 is out of range: slots are numbered 0 to 511"
    );
}

#[test]
fn delta_lists_exactly_the_changed_entries() {
    let mut table = Table::with_members(unit(0..5)).unwrap();
    let before = table.clone();
    let delta = table.remove(2).unwrap();
    let expected: Vec<u32> = (0..TABLE_SIZE as u32)
        .filter(|&i| before.entries()[i as usize] != table.entries()[i as usize])
        .collect();
    assert_eq!(delta.changed, expected);
    assert_eq!(delta.moved, owned(&before, 2));
}

#[test]
fn an_equal_reweight_moves_nothing_where_one_member_at_a_time_did() {
    let table = Table::with_members(unit(0..5)).unwrap();
    let doubled: BTreeMap<Slot, u32> = (0..5).map(|s| (s, 2)).collect();
    let mut at_once = table.clone();
    let delta = at_once.set_weights(&doubled).unwrap();
    assert_eq!(
        delta,
        Delta::default(),
        "no entry, owner or heir, may change"
    );
    assert_eq!(at_once.entries(), table.entries());
    assert_eq!(at_once.members(), &doubled);
    // The same change member by member passes through unequal shares on the way.
    let mut one_by_one = table.clone();
    let moved: u32 = (0..5)
        .map(|s| one_by_one.set_weight(s, 2).unwrap().moved)
        .sum();
    assert_eq!(moved, 35_757);
    assert_ne!(owners(&one_by_one), owners(&table));
    // Proportions kept with unequal weights too.
    let weighted = Table::with_members([(0, 1), (1, 3), (2, 2)]).unwrap();
    let mut scaled = weighted.clone();
    let delta = scaled
        .set_weights(&[(0, 5), (1, 15), (2, 10)].into())
        .unwrap();
    assert_eq!(delta, Delta::default());
    assert_eq!(scaled.entries(), weighted.entries());
}

#[test]
fn several_weights_change_as_one_rebalance_with_the_fewest_moves() {
    let before = Table::with_members(unit(0..4)).unwrap();
    let mut table = before.clone();
    let delta = table.set_weights(&[(0, 3), (2, 2)].into()).unwrap();
    // Shares 3/7, 1/7, 2/7, 1/7 of 65536 (28086.9, 9362.3, 18724.6, 9362.3) from 16384
    // each: slots 0 and 2 need 11702 + 2340 to reach their floors, slots 1 and 3 must give
    // 7021 each to reach their ceilings; 14042 moves do both.
    assert_eq!(delta.moved, 14_042);
    assert_eq!(delta.moved, minimal_moves(&before, &table));
    assert_eq!(delta.moved, losses(&before, &table));
    for (old, new) in before.entries().iter().zip(table.entries()) {
        if old.owner != new.owner {
            assert!([1, 3].contains(&old.owner) && [0, 2].contains(&new.owner));
        }
    }
    assert!(table.is_exactly_balanced());
    table.validate().unwrap();
}

#[test]
fn an_adopted_member_that_owns_nothing_gets_its_share_from_the_others_surplus() {
    // A daemon seated slot 3 and was killed before writing its entries: the pinned table
    // is over slots 0 to 2, the records say 3 is live too.
    let pinned = Table::with_members(unit(0..3)).unwrap();
    let live = unit(0..4);
    let mut table = Table::adopt(pinned.entries().to_vec(), live.clone()).unwrap();
    assert_eq!(
        owned(&table, 3),
        0,
        "adoption alone keeps the table as it is"
    );
    let before = table.clone();
    let delta = table.settle();
    assert_eq!(owned(&table, 3), 16_384);
    assert_eq!(delta.moved, 16_384);
    for slot in 0..3 {
        assert_eq!(owned(&table, slot), 16_384);
    }
    for (old, new) in before.entries().iter().zip(table.entries()) {
        if old.owner != new.owner {
            assert_eq!(
                new.owner, 3,
                "an entry moved between the members that had some"
            );
        }
    }
    check_rebalanced(&before, &table, delta.moved).unwrap();

    // With weights: slot 5 (weight 2) joins 0, 1, 2 (weights 1, 3, 1).
    let pinned = Table::with_members([(0, 1), (1, 3), (2, 1)]).unwrap();
    let live = [(0, 1), (1, 3), (2, 1), (5, 2)];
    let mut table = Table::adopt(pinned.entries().to_vec(), live).unwrap();
    let before = table.clone();
    let delta = table.settle();
    assert_eq!(delta.moved, owned(&table, 5));
    assert_eq!(delta.moved, 18_724);
    check_rebalanced(&before, &table, delta.moved).unwrap();
    // Settled, or as any operation leaves it, a table settles to itself.
    assert_eq!(table.settle(), Delta::default());
}

#[test]
fn settling_keeps_shares_the_operations_can_leave_and_fixes_a_shorter_one() {
    // Weights 1, 1, 2 over 16 entries: shares 4, 4 and 8.
    let exact = Table::sized_with_members(16, [(0, 1), (1, 1), (2, 2)]).unwrap();
    let members = || exact.members().iter().map(|(&s, &w)| (s, w));
    // Hands one of slot 2's entries to slot `to` (one whose heir is the other one).
    let shift = |entries: &mut [TableEntry], to: Slot| {
        let entry = entries
            .iter_mut()
            .find(|e| e.owner == 2 && e.heir == 1 - to)
            .unwrap();
        entry.owner = to;
    };
    // Two entries short of slot 2's floor, as weighted removals can leave it: kept.
    let mut entries = exact.entries().to_vec();
    shift(&mut entries, 0);
    shift(&mut entries, 1);
    let mut table = Table::adopt(entries.clone(), members()).unwrap();
    table.validate().unwrap();
    let kept = table.clone();
    assert_eq!(table.settle(), Delta::default());
    assert_eq!(table, kept);
    // Slot 2 three short (slot 0 then two over): no operation leaves that, so it is
    // settled, with the fewest moves.
    shift(&mut entries, 0);
    let mut table = Table::adopt(entries, members()).unwrap();
    assert_eq!(
        table.validate(),
        Err("slot 0 owns 6 entries, more than the 5 its share allows".to_owned())
    );
    let before = table.clone();
    let delta = table.settle();
    assert_eq!(delta.moved, 3);
    check_rebalanced(&before, &table, delta.moved).unwrap();
}

#[test]
fn an_addition_written_halfway_is_settled_with_the_missing_entries_only() {
    // A daemon killed while writing slot 4's addition: the kernel holds the first half of
    // the changed entries as the addition left them, the rest as before.
    let old = Table::with_members(unit(0..4)).unwrap();
    let mut added = old.clone();
    let delta = added.add(4, 1).unwrap();
    let mut entries = old.entries().to_vec();
    let half = delta.changed.len() / 2;
    for &index in &delta.changed[..half] {
        entries[index as usize] = added.entries()[index as usize];
    }
    let live = unit(0..5);
    let mut table = Table::adopt(entries, live.clone()).unwrap();
    let before = table.clone();
    let short = 13_107 - owned(&before, 4);
    assert!(short > 0);
    let settled = table.settle();
    assert_eq!(settled.moved, short);
    for (old, new) in before.entries().iter().zip(table.entries()) {
        if old.owner != new.owner {
            assert_eq!(new.owner, 4);
        }
    }
    check_rebalanced(&before, &table, settled.moved).unwrap();
}

#[test]
fn interleave_spreads_each_slot_evenly() {
    let seq = interleave(&[(1, 3), (2, 1), (3, 2)]);
    assert_eq!(seq.len(), 6);
    assert_eq!(seq.iter().filter(|&&s| s == 1).count(), 3);
    // Slot 1's turns at 1/6, 3/6, 5/6; slot 3's at 1/4, 3/4; slot 2's at 1/2.
    assert_eq!(seq, vec![1, 3, 1, 2, 3, 1]);
}

#[test]
fn a_giver_releases_evenly_spaced_entries() {
    // Slot 0 owns all 65536 entries; adding three more slots makes it give 3/4 of them,
    // taken at even spacing, so each newcomer's entries spread over the whole table too.
    let mut table = Table::with_members(unit([0])).unwrap();
    table.add(1, 3).unwrap();
    for chunk in table.entries().chunks(TABLE_SIZE / 16) {
        let kept = chunk.iter().filter(|e| e.owner == 0).count();
        assert!(
            kept.abs_diff(chunk.len() / 4) <= 1,
            "slot 0 kept {kept} of {}",
            chunk.len()
        );
    }
}

#[test]
fn owned_by_lists_exactly_the_slots_entries_in_order() {
    let table = Table::with_members((0..7).map(|slot| (slot, 1 + u32::from(slot)))).unwrap();
    for slot in 0..8 {
        let naive: Vec<u32> = (0..table.size() as u32)
            .filter(|&i| table.entries()[i as usize].owner == slot)
            .collect();
        assert_eq!(table.owned_by(slot), naive, "slot {slot}");
    }
    assert!(table.owned_by(7).is_empty());
}
