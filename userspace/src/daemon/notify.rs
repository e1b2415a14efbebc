//! The daemon's notifications to systemd (`sd_notify`, through the `sd-notify` crate):
//! `READY=1`, `RELOADING=1` with `MONOTONIC_USEC`, `STOPPING=1`, `STATUS=` and
//! `WATCHDOG=1`. Nothing is sent when `NOTIFY_SOCKET` is unset. The variables are left in
//! the environment, so an upgraded image (same pid) keeps notifying; workers never see
//! them (see [`crate::process::spawn`]).
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

use crate::readiness::Notice;

/// Sends notifications if the daemon runs under a service manager that asked for them.
pub(super) struct Notifier {
    enabled: bool,
    status: String,
}

impl Notifier {
    /// Notifies if `NOTIFY_SOCKET` is set.
    pub(super) fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            status: String::new(),
        }
    }

    /// How often `WATCHDOG=1` goes out: half of `WATCHDOG_USEC`, if systemd asked for it
    /// (and `WATCHDOG_PID`, when set, is this process).
    pub(super) fn watchdog_interval() -> Option<Duration> {
        let mut usec = 0;
        sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
    }

    /// Announces `notice`, with the `status` line.
    pub(super) fn notice(&mut self, notice: Notice, status: &str) {
        let monotonic;
        let mut states = match notice {
            Notice::Ready => vec![NotifyState::Ready],
            Notice::Reloading => {
                monotonic = NotifyState::monotonic_usec_now();
                match &monotonic {
                    Ok(now) => vec![NotifyState::Reloading, now.clone()],
                    Err(_) => vec![NotifyState::Reloading],
                }
            }
            Notice::Stopping => vec![NotifyState::Stopping],
        };
        self.status = status.to_owned();
        states.push(NotifyState::Status(status));
        self.send(&states);
    }

    /// Updates the `STATUS=` line if it changed.
    pub(super) fn status(&mut self, status: &str) {
        if self.status != status {
            self.status = status.to_owned();
            self.send(&[NotifyState::Status(status)]);
        }
    }

    /// `WATCHDOG=1`: the event loop is alive.
    pub(super) fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(error) = sd_notify::notify(false, states) {
            warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}
