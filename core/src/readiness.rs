//! What the daemon tells its service manager (systemd's `sd_notify`), decided from where
//! it is: starting, ready, reloading or stopping. Pure: the daemon's edge sends the
//! notices, and asks [`crate::supervisor::Supervisor::is_ready`] whether it serves.
/// A state change to announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`: every service serves as configured.
    Ready,
    /// `RELOADING=1` (with `MONOTONIC_USEC`): a SIGHUP or an upgrade is being applied.
    Reloading,
    /// `STOPPING=1`: the daemon stops its workers and exits.
    Stopping,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Reloading,
    Stopping,
}

/// Where the daemon is, as its service manager was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    phase: Phase,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            phase: Phase::Starting,
        }
    }
}

impl Readiness {
    /// A daemon starting: `READY=1` comes once it serves.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reload (SIGHUP) or upgrade begins; nothing once stopping.
    pub fn reloading(&mut self) -> Option<Notice> {
        self.to(Phase::Reloading, Notice::Reloading)
    }

    /// The stop begins; announced once.
    pub fn stopping(&mut self) -> Option<Notice> {
        (self.phase != Phase::Stopping).then(|| {
            self.phase = Phase::Stopping;
            Notice::Stopping
        })
    }

    /// After each event: `READY=1` when starting or reloading and every service now
    /// serves (`ready`).
    pub fn settled(&mut self, ready: bool) -> Option<Notice> {
        match self.phase {
            Phase::Starting | Phase::Reloading if ready => self.to(Phase::Ready, Notice::Ready),
            _ => None,
        }
    }

    fn to(&mut self, phase: Phase, notice: Notice) -> Option<Notice> {
        (self.phase != Phase::Stopping).then(|| {
            self.phase = phase;
            notice
        })
    }
}

/// The `STATUS=` line `systemctl status` shows: services, workers serving, last event.
pub fn status_line(services: usize, serving: (usize, usize), last: &str) -> String {
    let (serving, wanted) = serving;
    let plural = if services == 1 { "" } else { "s" };
    format!("{services} service{plural}, {serving}/{wanted} workers serving; last: {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_serving_then_again_after_each_reload() {
        let mut readiness = Readiness::new();
        assert_eq!(readiness.settled(false), None);
        assert_eq!(readiness.settled(true), Some(Notice::Ready));
        assert_eq!(readiness.settled(true), None, "announced once");
        assert_eq!(readiness.reloading(), Some(Notice::Reloading));
        assert_eq!(readiness.settled(false), None);
        assert_eq!(readiness.settled(true), Some(Notice::Ready));
    }

    #[test]
    fn nothing_but_stopping_once_stopping() {
        let mut readiness = Readiness::new();
        assert_eq!(readiness.stopping(), Some(Notice::Stopping));
        assert_eq!(readiness.stopping(), None);
        assert_eq!(readiness.reloading(), None);
        assert_eq!(readiness.settled(true), None);
    }

    #[test]
    fn the_status_line_counts_services_and_workers() {
        assert_eq!(
            status_line(2, (7, 8), "worker 12 of dns slot 3 ended"),
            "2 services, 7/8 workers serving; last: worker 12 of dns slot 3 ended"
        );
        assert_eq!(
            status_line(1, (1, 1), "started"),
            "1 service, 1/1 workers serving; last: started"
        );
    }
}
