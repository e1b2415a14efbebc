//! Which flows move: when a listener closes (`survivor_moved`), when one joins
//! (`add_moved`), and how evenly flows spread (`balance_flows`), each with the same flows
//! sent to plain `SO_REUSEPORT` and to portshard.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use portshard::{dataplane::Dataplane, socket::Proto};
use portshard_common::TABLE_SIZE;

use super::{
    Budget, Result,
    report::{Figure, Target},
};
use crate::{
    flows::{self, Flows, Landing, MAX_FLOWS},
    scenario::{self, CloseOne, KernelRun, MeasureError, PortshardRun, Ratio, survivor_moved},
};

/// Listener counts the moved-flow figures are measured at: enough points, powers of two and
/// not, to plot the kernel's and portshard's shares against N.
pub const LISTENERS: [usize; 7] = [3, 4, 8, 16, 32, 64, 128];

/// Listener counts the observed balance is measured at.
pub const BALANCE_LISTENERS: [usize; 3] = [4, 16, 64];

/// `add_moved` target: the largest distance (absolute) between the joining share and `1/(N+1)`.
pub const ADD_TOLERANCE: f64 = 0.01;

/// Both sides of one close-one case, with portshard's counters checked against the flows.
fn measure(case: &CloseOne, pins: &Path) -> Result<(KernelRun, PortshardRun)> {
    let kernel = KernelRun::measure(case)?;
    let ours = PortshardRun::measure(case, pins)?;
    if !ours.counter_errors.is_empty() {
        return Err(MeasureError::Traffic(format!(
            "{} listeners, listener {} closed: the program's counters disagree with the flows: {:?}",
            case.listeners, case.victim, ours.counter_errors
        ))
        .into());
    }
    Ok((kernel, ours))
}

/// `survivor_moved_n{N}_{first,middle,last}`: of the flows not on the listener that
/// closed, the share that moved, for N in [`LISTENERS`].
pub fn survivors(pins: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for n in LISTENERS {
        for (position, victim) in [("first", 0), ("middle", n / 2), ("last", n - 1)] {
            let mut case = CloseOne::new(Proto::Udp, false, n, victim);
            if let Some(flows) = budget.survivor_flows {
                case.flows = flows;
            }
            let (kernel, ours) = measure(&case, pins)?;
            let theirs = survivor_moved(&kernel.before, &kernel.after_close, victim);
            let mine = survivor_moved(&ours.before, &ours.after_close, victim);
            figures.push(
                Figure::new(
                    format!("survivor_moved_n{n}_{position}"),
                    "fraction",
                    0.0,
                    mine.value(),
                )
                .kernel(theirs.value())
                .n(mine.whole)
                .target(Target::AtMost(0.0)),
            );
        }
    }
    Ok(figures)
}

/// `add_moved_n{N}`: the share of all flows that moved when one listener joined N, for N
/// in [`LISTENERS`]. Measured in the close-one case of N + 1 listeners whose last closes,
/// so N remain when one joins; `table` is the exact share of entries the newcomer took.
pub fn additions(pins: &Path) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for n in LISTENERS {
        let case = CloseOne::new(Proto::Udp, false, n + 1, n);
        let (kernel, ours) = measure(&case, pins)?;
        let share = |before: &Landing, after: &Landing| Ratio {
            part: flows::moved(before, after),
            whole: case.flows,
        };
        let ideal = 1.0 / (n + 1) as f64;
        figures.push(
            Figure::new(
                format!("add_moved_n{n}"),
                "fraction",
                ideal,
                share(&ours.after_remove, &ours.after_add).value(),
            )
            .kernel(share(&kernel.after_close, &kernel.after_add).value())
            .n(case.flows)
            .target(Target::Near {
                center: ideal,
                tolerance: ADD_TOLERANCE,
            })
            .extra("table", f64::from(ours.entries_taken) / TABLE_SIZE as f64),
        );
    }
    Ok(figures)
}

/// Port of the balance group (inside the private namespace).
const BALANCE_PORT: u16 = 5301;

/// `balance_flows_n{N}`: the most flows any listener got over the mean, with `flows` UDP
/// flows, each a distinct 4-tuple (source ports of several loopback addresses, to a group
/// bound to the wildcard address), first through the kernel's hash, then through portshard.
pub fn observed_balance(pins: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for n in BALANCE_LISTENERS {
        let wildcard = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), BALANCE_PORT);
        let listeners = flows::bind_listeners(Proto::Udp, wildcard, n)?;
        let parts: Vec<Flows> = (0..budget.balance_flows.div_ceil(MAX_FLOWS))
            .map(|part| {
                let count = (budget.balance_flows - part * MAX_FLOWS).min(MAX_FLOWS);
                let target = SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + part as u8)),
                    BALANCE_PORT,
                );
                Flows::new(Proto::Udp, target, count)
            })
            .collect();
        let spread = |listeners: &[Option<flows::Listener>]| -> Result<f64> {
            let mut per_listener = vec![0usize; n];
            for part in &parts {
                for slot in part.round(listeners)?.into_iter().flatten() {
                    per_listener[slot] += 1;
                }
            }
            Ok(max_over_mean(&per_listener))
        };
        let kernel = spread(&listeners)?;
        let service = "balance";
        let group = scenario::steer(pins, service, &listeners)?;
        let ours = spread(&listeners)?;
        drop(group);
        drop(listeners);
        Dataplane::remove_pins(pins, service)?;
        figures.push(
            Figure::new(format!("balance_flows_n{n}"), "max/mean", 1.0, ours)
                .kernel(kernel)
                .n(budget.balance_flows),
        );
    }
    Ok(figures)
}

/// The largest count over the mean count; 0 when nothing was counted.
pub fn max_over_mean(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let max = counts.iter().copied().max().unwrap_or(0);
    max as f64 * counts.len() as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_over_mean_of_counts() {
        assert_eq!(max_over_mean(&[10, 10, 10, 10]), 1.0);
        assert_eq!(max_over_mean(&[20, 10, 10, 0]), 2.0);
        assert_eq!(max_over_mean(&[0, 0]), 0.0);
    }
}
