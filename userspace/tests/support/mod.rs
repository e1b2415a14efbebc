//! What the daemon's test files share: the binary, the Python worker, the address and the
//! daemon's start in a fresh sandbox. Each test file uses a part of it.
#![allow(dead_code)]

use std::{net::SocketAddr, path::Path, time::Duration};

use portshard::table::Slot;
use portshard_harness::{
    daemon::{DaemonRun, workers},
    scenario::Sandbox,
};

/// The portshard binary under test.
pub const EXE: &str = env!("CARGO_BIN_EXE_portshard");
/// The Python socket-activated echo worker.
pub const WORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/echo.py");
/// The port every test service listens on, in its own namespace.
pub const PORT: u16 = 5300;
/// How long a daemon, worker or flow may take to be ready on a loaded host.
pub const READY: Duration = Duration::from_secs(20);

/// The address every test service listens on.
pub fn target() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

/// A config of `services` (name, proto, workers), all served by the Python worker.
pub fn config(services: &[(&str, &str, usize)]) -> String {
    services
        .iter()
        .map(|(name, proto, workers)| {
            format!(
                "[[service]]\nname = \"{name}\"\nproto = \"{proto}\"\nlisten = \"127.0.0.1:{PORT}\"\nworkers = {workers}\ncommand = [\"python3\", \"{WORKER}\"]\nrestart_delay = \"100ms\"\nstop_timeout = \"2s\"\n\n"
            )
        })
        .collect()
}

/// The daemon serving `services` (see [`config`]) on `sandbox`'s pins.
pub fn start(sandbox: &Sandbox, services: &[(&str, &str, usize)]) -> DaemonRun {
    DaemonRun::start(Path::new(EXE), &config(services), sandbox.pins()).unwrap()
}

/// A fresh network namespace with its own pin root; fails loudly without root and BPF.
pub fn sandbox() -> Sandbox {
    Sandbox::enter().unwrap_or_else(|e| panic!("kernel test sandbox (needs root and BPF): {e}"))
}

/// Sends signal `number` to `pid`.
pub fn signal(pid: u32, number: i32) {
    portshard_harness::daemon::signal(pid, number).unwrap();
}

/// The pid of the live worker of `slot`, if it has one.
pub fn live_pid(daemon: &DaemonRun, service: &str, slot: Slot) -> Option<u32> {
    workers(&daemon.status().unwrap())
        .get(service)
        .and_then(|slots| slots.get(&slot).copied())
}

/// The pid of the live worker of `slot`; panics if it has none.
pub fn pid_of(daemon: &DaemonRun, service: &str, slot: Slot) -> u32 {
    live_pid(daemon, service, slot)
        .unwrap_or_else(|| panic!("{service} slot {slot} has no live worker"))
}

/// Waits until `slot` of `service` has a live worker other than `old`; returns its pid.
pub fn wait_replaced(daemon: &DaemonRun, service: &str, slot: Slot, old: u32) -> u32 {
    let deadline = std::time::Instant::now() + READY;
    loop {
        if let Some(pid) = live_pid(daemon, service, slot)
            && pid != old
        {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{service} slot {slot} worker {old} never replaced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the daemon tells systemd, caught on a datagram socket the test owns (the daemon's
/// `NOTIFY_SOCKET`): one message per datagram, newline-separated `KEY=value` lines.
pub struct Notifications {
    socket: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Notifications {
    /// A fresh socket in a directory of its own.
    pub fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// The next message and when it arrived, if one comes within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<(std::time::Instant, String)> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut buffer = [0u8; 4096];
        let n = self.socket.recv(&mut buffer).ok()?;
        Some((
            std::time::Instant::now(),
            String::from_utf8_lossy(&buffer[..n]).into_owned(),
        ))
    }

    /// Reads messages until one has the line `line` (e.g. `READY=1`); returns it, when it
    /// arrived, and every message before it. Panics after `timeout`.
    pub fn wait_for(
        &self,
        line: &str,
        timeout: Duration,
    ) -> (std::time::Instant, String, Vec<String>) {
        let deadline = std::time::Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Some((at, message)) = self.next(left) else {
                panic!("no {line} within {timeout:?}; messages so far: {before:?}");
            };
            if message.lines().any(|l| l == line) {
                return (at, message, before);
            }
            before.push(message);
        }
    }
}

/// Runs `portshard <args> --control <daemon's>` and returns its output.
pub fn cli(daemon: &DaemonRun, args: &[&str]) -> std::process::Output {
    cli_at(daemon.control(), args)
}

/// Runs `portshard <args> --control <control>` and returns its output.
pub fn cli_at(control: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(EXE)
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .unwrap()
}
