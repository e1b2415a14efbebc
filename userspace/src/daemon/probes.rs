//! Health probes in the daemon: each probed worker has a task that probes it every
//! interval, on a thread of its own ([`ProbeThread`]), so neither the event loop's work
//! (table rebuilds, status snapshots, spawns) delays a probe nor does probing block the
//! event loop. Outcomes go back to the event loop; the supervisor keeps the verdicts.
use std::{net::SocketAddr, sync::Arc, thread};

use tokio::{runtime, sync::oneshot, task::JoinHandle};
use tracing::warn;

use crate::{
    config::{Probe, ProbeKind},
    probe::{Excuse, Outcome},
    prober::Prober,
    table::Slot,
};

/// Into how many fractions of an interval the slots' first probes are spread.
const STAGGER: u32 = 8;

/// The thread the probes run on, with its own runtime; it ends when this is dropped.
pub(super) struct ProbeThread {
    handle: runtime::Handle,
    _stop: oneshot::Sender<()>,
}

impl ProbeThread {
    /// Starts the probe thread.
    pub(super) fn start() -> std::io::Result<Self> {
        let runtime = runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        thread::Builder::new()
            .name("portshard-probes".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }

    /// Binds a slot's prober; its sockets join the probe thread's reactor.
    pub(super) fn bind(&self, kind: &ProbeKind, listen: SocketAddr) -> std::io::Result<Prober> {
        let _runtime = self.handle.enter();
        Prober::bind(kind, listen)
    }

    /// Probes worker `pid` of `slot` every interval with `prober`, handing each outcome to
    /// `report`, until the task is aborted or `report` says nobody listens any more.
    pub(super) fn probe(
        &self,
        prober: Arc<Prober>,
        probe: Probe,
        slot: Slot,
        pid: u32,
        service: String,
        report: impl Fn(Outcome) -> bool + Send + 'static,
    ) -> JoinHandle<()> {
        // Slots start a fraction of an interval apart, so their probes do not all fall due
        // at once on the probe thread.
        let start = tokio::time::Instant::now()
            + probe.interval
            + probe.interval * (u32::from(slot) % STAGGER) / STAGGER;
        self.handle.spawn(async move {
            let mut ticks = tokio::time::interval_at(start, probe.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut previous_end = start;
            loop {
                // A probe that ran past its successor's tick delays it; only the time
                // beyond that says the prober was late.
                let due = ticks.tick().await.max(previous_end);
                let outcome = match prober.check(pid, due, &probe).await {
                    Ok(outcome) => outcome,
                    Err(error) => {
                        warn!(service, slot, pid, %error, source = %prober.source(), "the probe itself failed; not counted against the worker");
                        Outcome::Excused(Excuse::ProbeError)
                    }
                };
                previous_end = tokio::time::Instant::now();
                if !report(outcome) {
                    return;
                }
            }
        })
    }
}
