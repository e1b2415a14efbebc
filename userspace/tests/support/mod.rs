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
