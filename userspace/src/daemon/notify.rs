//! The daemon's notifications to systemd (`sd_notify`): `READY=1`, `RELOADING=1` with
//! `MONOTONIC_USEC`, `STOPPING=1`, `STATUS=` and `WATCHDOG=1`. Nothing is sent when
//! `NOTIFY_SOCKET` is unset. The variables are left in the environment, so an upgraded
//! image (same pid) keeps notifying; workers never see them (see
//! [`crate::process::spawn`]).
//!
//! The `sd-notify` crate writes the messages; they are sent here,
//! without blocking: the crate's send blocks while the receiver's queue is full, and the
//! event loop must never wait on its service manager (a notification that finds the
//! queue full is dropped, and said so).
use std::{
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram},
    },
    time::Duration,
};

use sd_notify::NotifyState;
use tracing::warn;

use crate::readiness::Notice;

/// Sends notifications if the daemon runs under a service manager that asked for them.
pub(super) struct Notifier {
    /// `NOTIFY_SOCKET`, if set.
    socket: Option<String>,
    status: String,
}

impl Notifier {
    /// Notifies if `NOTIFY_SOCKET` is set.
    pub(super) fn from_env() -> Self {
        Self {
            socket: std::env::var("NOTIFY_SOCKET").ok(),
            status: String::new(),
        }
    }

    /// How often `WATCHDOG=1` goes out: half of `WATCHDOG_USEC`, if systemd asked for it
    /// and `WATCHDOG_PID`, when set, is this process (as `sd_watchdog_enabled(3)` reads
    /// them; the crate's reading wants `WATCHDOG_PID` always set).
    pub(super) fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        let for_us =
            std::env::var("WATCHDOG_PID").map_or(true, |pid| pid.parse() == Ok(std::process::id()));
        (usec > 0 && for_us).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
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
        let Some(path) = &self.socket else {
            return;
        };
        let message: String = states.iter().map(|state| format!("{state}\n")).collect();
        if let Err(error) = send(path, message.as_bytes()) {
            warn!(socket = %path, %error, message = %message.trim_end().replace('\n', " "), "cannot notify the service manager (NOTIFY_SOCKET); the notification is dropped");
        }
    }
}

/// Sends one datagram to `path` (`@name` for an abstract socket) without blocking.
fn send(path: &str, message: &[u8]) -> io::Result<()> {
    let address = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    socket.connect_addr(&address)?;
    socket.send(message).map(drop)
}
