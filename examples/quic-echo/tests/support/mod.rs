//! What the daemon tests of the QUIC worker share: the binaries, the sandbox, the service
//! config and the runtime. Each test file uses a part of it.
#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use portshard_harness::scenario::Sandbox;

pub const WORKERS: usize = 4;
/// How long the daemon, a worker, a connection or an answer may take on a loaded host.
pub const READY: Duration = Duration::from_secs(20);
/// The QUIC-LB config of the tests' services and of the plain group's workers.
pub const CONFIG_ID: u8 = 1;
pub const NONCE_LEN: u8 = 8;

/// A binary cargo built beside this test (`cargo xtask test` builds them all): the test
/// runs from `target/<profile>/deps/`.
pub fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo xtask test builds every binary)",
        path.display()
    );
    path
}

pub fn sandbox() -> Sandbox {
    Sandbox::enter().unwrap_or_else(|e| panic!("sandbox (needs root and BPF): {e}"))
}

/// A UDP service of the QUIC worker on `port`, QUIC-LB on if `quic`, with `extra` lines.
pub fn service(name: &str, port: u16, quic: bool, extra: &str) -> String {
    let quic = if quic {
        format!("quic = true\nquic_config_id = {CONFIG_ID}\nquic_nonce_len = {NONCE_LEN}\n")
    } else {
        String::new()
    };
    format!(
        "[[service]]\nname = \"{name}\"\nproto = \"udp\"\nlisten = \"127.0.0.1:{port}\"\nworkers = {WORKERS}\ncommand = [\"{}\"]\nrestart_delay = \"100ms\"\nstop_timeout = \"5s\"\n{quic}{extra}\n",
        built("portshard-quic-echo").display()
    )
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
