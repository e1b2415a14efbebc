//! The flow table sweeper: a thread that removes UDP flows idle past their service's
//! `flow_idle` from the flow tables, so their room goes to new flows. The program already
//! treats such a flow as new on its next datagram; the sweep only frees its entry. It
//! reads the tables in batches off the event loop, which never walks a flow table.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use portshard_common::TABLE_FLOWS;
use tracing::{debug, info, warn};

use crate::dataplane::Dataplane;

/// The shortest and longest time between two sweeps.
const INTERVAL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Starts the sweeper over the services pinned under `root`.
pub(super) fn start(root: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("portshard-sweep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(sweep_all(&root));
            }
        })
        .map(drop)
}

/// Sweeps every service with a flow table once; returns how long to wait before the next
/// sweep: a quarter of the shortest `flow_idle`, within [`INTERVAL`].
fn sweep_all(root: &Path) -> Duration {
    let mut shortest_idle = None;
    for service in Dataplane::pinned_services(root).unwrap_or_default() {
        // A service being created or removed meanwhile is swept next time, or never.
        let Ok(mut dataplane) = Dataplane::open(root, &service) else {
            continue;
        };
        let switches = dataplane.switches();
        if switches.flags & TABLE_FLOWS == 0 {
            continue;
        }
        let idle = Duration::from_secs(u64::from(switches.flow_idle_s));
        shortest_idle = Some(shortest_idle.map_or(idle, |s: Duration| s.min(idle)));
        match dataplane.sweep_idle_flows() {
            Ok(sweep) if sweep.removed > 0 => info!(
                %service,
                removed = sweep.removed,
                read = sweep.seen,
                "swept flows idle for over {}",
                humantime::format_duration(idle)
            ),
            Ok(sweep) => debug!(%service, read = sweep.seen, "no idle flow to sweep"),
            Err(error) => warn!(%service, %error, "sweeping idle flows failed; trying again later"),
        }
    }
    interval(shortest_idle)
}

/// The time between sweeps for the shortest `flow_idle` of the services (none: the
/// longest interval).
fn interval(shortest_idle: Option<Duration>) -> Duration {
    shortest_idle.map_or(INTERVAL.1, |idle| (idle / 4).clamp(INTERVAL.0, INTERVAL.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_come_at_a_quarter_of_the_shortest_idle_time_within_bounds() {
        assert_eq!(interval(None), Duration::from_secs(30));
        assert_eq!(
            interval(Some(Duration::from_secs(120))),
            Duration::from_secs(30)
        );
        assert_eq!(
            interval(Some(Duration::from_secs(20))),
            Duration::from_secs(5)
        );
        assert_eq!(
            interval(Some(Duration::from_secs(2))),
            Duration::from_secs(1)
        );
        assert_eq!(
            interval(Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
    }
}
