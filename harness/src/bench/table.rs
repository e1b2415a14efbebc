//! Figures of the table itself: its exact balance (`balance_table_n{N}`), and how long a
//! change takes at N = 256, computing it and writing the changed entries to the kernel's
//! mapped table (`rebuild_us_{remove,add,weight}[_compute|_write]`), and what a worker's
//! death and replacement cost through the group (`group_us_{remove,rejoin}`).
use std::{os::fd::AsFd as _, path::Path, time::Instant};

use portshard::{
    dataplane::Dataplane,
    group::Holder,
    socket::Proto,
    table::{Delta, Slot, Table, TableError},
};
use portshard_common::TABLE_SIZE;

use super::{
    Budget, Result,
    report::{Figure, Summary, Target},
};
use crate::{flows, scenario, scenario::MeasureError};

/// Members of the table the rebuild figures change.
pub const REBUILD_MEMBERS: usize = 256;

/// A change's computation plus its write must take at most this (µs): a change computes
/// only what it changes.
pub const REBUILD_LIMIT_US: f64 = 100.0;

/// Member counts of the equal-weight balance figures: none divides the table's size, so
/// no exact share is whole and the figure shows what rounding costs.
pub const BALANCE_MEMBERS: [usize; 4] = [3, 7, 100, 255];

/// Weights of the weighted balance figure, slots `0..`.
pub const BALANCE_WEIGHTS: [u32; 7] = [1, 2, 3, 5, 8, 13, 100];

/// `balance_table_n{N}` for N in [`BALANCE_MEMBERS`] and `balance_table_weighted` for
/// [`BALANCE_WEIGHTS`]: the most entries any member owns over its exact share
/// `TABLE_SIZE * w / W`, computed on the table. Target: the best any table can do, every
/// member at most the ceiling of its share.
pub fn balance() -> Result<Vec<Figure>> {
    let mut sets: Vec<(String, Vec<u32>)> = BALANCE_MEMBERS
        .iter()
        .map(|&n| (format!("balance_table_n{n}"), vec![1; n]))
        .collect();
    sets.push(("balance_table_weighted".into(), BALANCE_WEIGHTS.to_vec()));
    sets.into_iter()
        .map(|(name, weights)| {
            let total: u32 = weights.iter().sum();
            let table =
                Table::with_members(weights.iter().enumerate().map(|(s, &w)| (s as Slot, w)))?;
            let counts = table.counts();
            let share = |slot: &Slot| {
                f64::from(TABLE_SIZE as u32) * f64::from(weights[usize::from(*slot)])
                    / f64::from(total)
            };
            let worst = counts
                .iter()
                .map(|(slot, &owned)| f64::from(owned) / share(slot))
                .fold(0.0, f64::max);
            let best = counts
                .keys()
                .map(|slot| share(slot).ceil() / share(slot))
                .fold(0.0, f64::max);
            Ok(Figure::new(name, "max/share", 1.0, worst)
                .n(weights.len())
                .target(Target::AtMost(best)))
        })
        .collect()
}

/// Members of the smaller table the rebuild figures also change (`_n8`): a change there
/// touches an eighth of the table, where one pass over the whole table can be cheaper.
pub const SMALL_MEMBERS: usize = 8;

/// One kind of table change, applied to a copy of a table of equal members.
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

    /// Applies the change to `table` of `members` members; `repetition` picks which slot,
    /// so repetitions differ.
    fn apply(
        self,
        table: &mut Table,
        members: usize,
        repetition: usize,
    ) -> Result<Delta, TableError> {
        let member = (repetition % members) as Slot;
        match self {
            Self::Remove => table.remove(member),
            Self::Add => table.add(members as Slot, 1),
            Self::Weight => table.set_weight(member, 2),
        }
    }
}

/// The rebuild figures: for each change at N = [`REBUILD_MEMBERS`], the median time to
/// compute it, to write the changed entries into a real (pinned, memory-mapped) table, and
/// both together (the target); and both together at N = [`SMALL_MEMBERS`] (`_n8`).
pub fn rebuild(pins: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let service = "rebuild";
    let dataplane = Dataplane::create(pins, service, 0)?;
    let mut figures = Vec::new();
    for members in [REBUILD_MEMBERS, SMALL_MEMBERS] {
        let base = Table::with_members((0..members as Slot).map(|slot| (slot, 1)))?;
        dataplane.write_all(base.entries())?;
        for change in [Change::Remove, Change::Add, Change::Weight] {
            let (mut compute, mut write, mut total) = (Vec::new(), Vec::new(), Vec::new());
            let mut changed = 0;
            for repetition in 0..budget.rebuild_repetitions {
                let mut next = base.clone();
                let started = Instant::now();
                let delta = change.apply(&mut next, members, repetition)?;
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
            let small = format!("_n{SMALL_MEMBERS}");
            let parts: &[(&str, &Vec<f64>)] = if members == REBUILD_MEMBERS {
                &[("_compute", &compute), ("_write", &write), ("", &total)]
            } else {
                &[(small.as_str(), &total)]
            };
            for &(suffix, values) in parts {
                let Some(summary) = Summary::of(values) else {
                    continue;
                };
                let figure = Figure::summarized(format!("{name}{suffix}"), "us", 0.0, summary)
                    .extra("entries_changed", changed as f64);
                figures.push(if suffix.is_empty() {
                    figure.target(Target::AtMost(REBUILD_LIMIT_US))
                } else {
                    figure
                });
            }
        }
    }
    drop(dataplane);
    Dataplane::remove_pins(pins, service)?;
    Ok(figures)
}

/// Port of the group the death figures change (inside the private namespace).
const GROUP_PORT: u16 = 5350;

/// `group_us_{remove,rejoin}`: what a worker's death and its replacement cost the daemon at
/// N = 256, timed through the group as the supervisor calls it (slot emptied and recorded,
/// table changed in place, entries written; then the socket seated again and its entries
/// given back), on 256 real UDP listeners. The death's figure has the table operations'
/// target: the daemon's work on a death must not hold up the heirs.
pub fn group(pins: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let service = "rebuild-group";
    let target = flows::loopback(false, GROUP_PORT);
    let listeners = flows::bind_listeners(Proto::Udp, target, REBUILD_MEMBERS)?;
    let mut group = scenario::steer_with_flows(pins, service, &listeners, 0)?;
    let (mut removes, mut rejoins) = (Vec::new(), Vec::new());
    for repetition in 0..budget.rebuild_repetitions {
        let slot = (repetition * 37 % REBUILD_MEMBERS) as Slot;
        let listener = listeners[usize::from(slot)].as_ref().expect("all open");
        let started = Instant::now();
        group.remove(slot)?;
        let removed = Instant::now();
        group.add(slot, listener.as_fd(), 1, Holder::this_process())?;
        let rejoined = Instant::now();
        removes.push((removed - started).as_secs_f64() * 1e6);
        rejoins.push((rejoined - removed).as_secs_f64() * 1e6);
    }
    drop(group);
    drop(listeners);
    Dataplane::remove_pins(pins, service)?;
    let summary = |values: &[f64]| {
        Summary::of(values).ok_or_else(|| MeasureError::Traffic("no table change timed".into()))
    };
    Ok(vec![
        Figure::summarized("group_us_remove", "us", 0.0, summary(&removes)?)
            .target(Target::AtMost(REBUILD_LIMIT_US)),
        Figure::summarized("group_us_rejoin", "us", 0.0, summary(&rejoins)?),
    ])
}
