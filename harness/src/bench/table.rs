//! Figures of the table itself: its exact balance (`balance_table_n{N}`), and how long a
//! change takes at N = 256, computing it and writing the changed entries to the kernel's
//! mapped table (`rebuild_us_{remove,add,weight}[_compute|_write]`).
use std::{path::Path, time::Instant};

use portshard::{
    dataplane::Dataplane,
    table::{Delta, Slot, Table, TableError},
};
use portshard_common::TABLE_SIZE;

use super::{
    Budget, Result,
    moves::LISTENERS,
    report::{Figure, Summary, Target},
};

/// Members of the table the rebuild figures change.
pub const REBUILD_MEMBERS: usize = 256;

/// A change's computation plus its write must take less than this (µs).
pub const REBUILD_LIMIT_US: f64 = 1000.0;

/// A table of `n` members of weight 1, slots `0..n`.
fn equal(n: usize) -> Result<Table> {
    Ok(Table::with_members((0..n as Slot).map(|slot| (slot, 1)))?)
}

/// `balance_table_n{N}`: the most entries any slot owns over its exact share `TABLE_SIZE/N`,
/// computed on the table, for N in [`LISTENERS`]. Target `1 + N/TABLE_SIZE` (one entry).
pub fn balance() -> Result<Vec<Figure>> {
    LISTENERS
        .iter()
        .map(|&n| {
            let table = equal(n)?;
            let most = table.counts().into_values().max().unwrap_or(0);
            let share = TABLE_SIZE as f64 / n as f64;
            Ok(Figure::new(
                format!("balance_table_n{n}"),
                "max/share",
                1.0,
                f64::from(most) / share,
            )
            .n(TABLE_SIZE)
            .target(Target::AtMost(1.0 + n as f64 / TABLE_SIZE as f64)))
        })
        .collect()
}

/// One kind of table change, applied to a copy of the table of [`REBUILD_MEMBERS`] members.
#[derive(Debug, Clone, Copy)]
enum Change {
    Remove,
    Add,
    Weight,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Self::Remove => "remove",
            Self::Add => "add",
            Self::Weight => "weight",
        }
    }

    /// Applies the change to `table`; `repetition` picks which slot, so repetitions differ.
    fn apply(self, table: &mut Table, repetition: usize) -> Result<Delta, TableError> {
        let member = (repetition % REBUILD_MEMBERS) as Slot;
        match self {
            Self::Remove => table.remove(member),
            Self::Add => table.add(REBUILD_MEMBERS as Slot, 1),
            Self::Weight => table.set_weight(member, 2),
        }
    }
}

/// The rebuild figures: for each change, the median time to compute it, to write the
/// changed entries into a real (pinned, memory-mapped) table, and both together.
pub fn rebuild(pins: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let service = "rebuild";
    let dataplane = Dataplane::create(pins, service, 0)?;
    let base = equal(REBUILD_MEMBERS)?;
    dataplane.write_all(base.entries())?;
    let mut figures = Vec::new();
    for change in [Change::Remove, Change::Add, Change::Weight] {
        let (mut compute, mut write, mut total) = (Vec::new(), Vec::new(), Vec::new());
        let mut changed = 0;
        for repetition in 0..budget.rebuild_repetitions {
            let mut next = base.clone();
            let started = Instant::now();
            let delta = change.apply(&mut next, repetition)?;
            let computed = Instant::now();
            dataplane.write_entries(next.entries(), &delta.changed)?;
            let written = Instant::now();
            // Put the kernel's table back for the next repetition (not timed).
            dataplane.write_entries(base.entries(), &delta.changed)?;
            let micros = |d: std::time::Duration| d.as_secs_f64() * 1e6;
            compute.push(micros(computed - started));
            write.push(micros(written - computed));
            total.push(micros(written - started));
            changed = delta.changed.len();
        }
        let name = format!("rebuild_us_{}", change.name());
        for (suffix, values) in [("_compute", &compute), ("_write", &write), ("", &total)] {
            let Some(summary) = Summary::of(values) else {
                continue;
            };
            let figure = Figure::summarized(format!("{name}{suffix}"), "us", 0.0, summary)
                .extra("entries_changed", changed as f64);
            figures.push(if suffix.is_empty() {
                figure.target(Target::Below(REBUILD_LIMIT_US))
            } else {
                figure
            });
        }
    }
    drop(dataplane);
    Dataplane::remove_pins(pins, service)?;
    Ok(figures)
}
