//! Sequences of table operations: after each one every invariant holds
//! ([`Table::validate`]; with equal weights, exact balance), the reported delta is exactly
//! what changed, a refused operation changed nothing, a removal moved only the removed
//! slot's entries, each to its heir, an addition moved entries only to the newcomer, and a
//! reload's switch left exactly the new slots, all with the new weight.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use portshard_core::table::{Delta, MIN_TABLE_SIZE, Slot, Table, TableError};
use portshard_common::MAX_SLOTS;

/// Slots in use: the heir quotas cost O(members^2) per operation, so 64 members keep
/// inputs fast (the unit and property tests cover up to 256).
const USED: Slot = 64;

/// Slot numbers the operations name: `0..USED`, then two beyond the last valid one, to
/// exercise the refusals.
const SLOTS: Slot = USED + 2;

/// The slot an operation's number names.
fn slot_of(n: Slot) -> Slot {
    match n % SLOTS {
        n if n < USED => n,
        n => MAX_SLOTS as Slot + (n - USED),
    }
}

/// Operations per input: enough for long histories, few enough to stay fast.
const MAX_OPS: usize = 48;

/// The largest table fuzzed: the algorithm is the same at every size (the unit and
/// property tests cover the kernel's), and small tables run many times more inputs per
/// second.
const MAX_TABLE_BITS: u8 = 10;

/// A table size and the operations to run on it.
#[derive(Arbitrary, Debug)]
struct Input {
    /// The table has `2^(4 + size_bits % 7)` entries: 16 to 1024.
    size_bits: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add {
        slot: Slot,
        weight: u16,
    },
    Remove {
        slot: Slot,
    },
    Weight {
        slot: Slot,
        weight: u16,
    },
    /// The daemon's worker restart: remove `slot`, then rejoin it with what it owned.
    Restart {
        slot: Slot,
    },
    /// A reload's switch from every member to `count` slots from `first` on (which may be
    /// members or out of range: refused).
    Switch {
        first: Slot,
        count: u8,
        weight: u16,
    },
}

fuzz_target!(|input: Input| {
    let min_bits = MIN_TABLE_SIZE.trailing_zeros() as u8;
    let bits = min_bits + input.size_bits % (MAX_TABLE_BITS - min_bits + 1);
    let mut table = Table::with_size(1 << bits).expect("a power of two in the allowed range");
    for op in input.ops.into_iter().take(MAX_OPS) {
        match op {
            Op::Add { slot, weight } => {
                let slot = slot_of(slot);
                step(&mut table, |t| t.add(slot, weight.into()), Some(slot));
            }
            Op::Remove { slot } => {
                remove(&mut table, slot_of(slot));
            }
            Op::Weight { slot, weight } => {
                step(
                    &mut table,
                    |t| t.set_weight(slot_of(slot), weight.into()),
                    None,
                );
            }
            Op::Restart { slot } => {
                let slot = slot_of(slot);
                let former = table.owned_by(slot);
                if let Some(&weight) = table.members().get(&slot)
                    && remove(&mut table, slot)
                {
                    let rejoined =
                        step(&mut table, |t| t.rejoin(slot, weight, &former), Some(slot));
                    assert!(
                        rejoined,
                        "slot {slot} could not rejoin right after its removal"
                    );
                }
            }
            Op::Switch {
                first,
                count,
                weight,
            } => {
                let old: Vec<Slot> = table.members().keys().copied().collect();
                let new: Vec<Slot> = (0..Slot::from(count))
                    .map(|i| slot_of(first % SLOTS + i))
                    .collect();
                let weight = u32::from(weight);
                let before = table.clone();
                if step(&mut table, |t| t.switch(&old, &new, weight), None) {
                    // Every entry belonged to an old slot: every one moved, once.
                    assert!(
                        before.entries().iter().zip(table.entries()).all(|(o, n)| o.owner != n.owner),
                        "an entry stayed with the old slots after a switch to {new:?}"
                    );
                    assert!(
                        table.members().len() == new.len()
                            && new.iter().all(|s| table.members().get(s) == Some(&weight)),
                        "after a switch to {new:?} with weight {weight}: {:?}",
                        table.members()
                    );
                }
            }
        }
    }
});

/// Removes `slot`, checking that only its entries changed owner, each to its heir.
fn remove(table: &mut Table, slot: Slot) -> bool {
    let before = table.clone();
    let removed = step(table, |t| t.remove(slot), None);
    if removed {
        for (index, (old, new)) in before.entries().iter().zip(table.entries()).enumerate() {
            let expected = if old.owner == slot {
                old.heir
            } else {
                old.owner
            };
            assert_eq!(
                new.owner, expected,
                "entry {index} after removing slot {slot}"
            );
        }
    }
    removed
}

/// Runs `op` on `table` and checks the invariants; with `receiver`, only that slot may have
/// gained entries. Returns whether the operation was accepted.
fn step(
    table: &mut Table,
    op: impl FnOnce(&mut Table) -> Result<Delta, TableError>,
    receiver: Option<Slot>,
) -> bool {
    let before = table.clone();
    let result = op(table);
    if let Err(broken) = table.validate() {
        panic!("invariant broken: {broken}");
    }
    let weights: Vec<u32> = table.members().values().copied().collect();
    if weights.windows(2).all(|w| w[0] == w[1]) {
        assert!(
            table.is_exactly_balanced(),
            "equal weights, but not exactly balanced"
        );
    }
    let Ok(delta) = result else {
        assert_eq!(*table, before, "a refused operation changed the table");
        return false;
    };
    let pairs = || before.entries().iter().zip(table.entries()).enumerate();
    let changed: Vec<u32> = pairs()
        .filter(|(_, (o, n))| o != n)
        .map(|(i, _)| i as u32)
        .collect();
    let moved = pairs().filter(|(_, (o, n))| o.owner != n.owner).count() as u32;
    assert_eq!(
        (delta.changed, delta.moved),
        (changed, moved),
        "the delta is not what changed"
    );
    if let Some(slot) = receiver {
        for (index, (old, new)) in pairs() {
            assert!(
                old.owner == new.owner || new.owner == slot,
                "entry {index} moved from {} to {} while only slot {slot} joined",
                old.owner,
                new.owner
            );
        }
    }
    true
}
