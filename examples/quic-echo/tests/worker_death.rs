//! The worker under the real daemon, in a fresh network namespace (root and BPF, like every
//! daemon test): QUIC connections spread over the workers, and when one worker is killed
//! every connection of the others goes on, on the same worker, which is what portshard
//! promises a QUIC service. Each connection comes from its own client port, so it is its own
//! UDP flow.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use portshard_harness::{
    daemon::{DaemonRun, signal},
    scenario::Sandbox,
};
use portshard_quic_echo::client;
use quinn::{Connection, Endpoint};

const WORKERS: usize = 4;
const CONNECTIONS: usize = 24;
/// How long the daemon, a worker or an answer may take on a loaded host.
const READY: Duration = Duration::from_secs(20);

/// A binary cargo built beside this test (`cargo test --workspace --bins` and
/// `cargo xtask test` build them all): the test runs from `target/<profile>/deps/`.
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo xtask test builds every binary)",
        path.display()
    );
    path
}

/// One request on a new stream of `connection`: the answer's `(slot, pid)`.
async fn ask(connection: &Connection) -> Option<(String, u32)> {
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await.ok()?;
        send.write_all(b"who?").await.ok()?;
        send.finish().ok()?;
        let answer = String::from_utf8(recv.read_to_end(1024).await.ok()?).ok()?;
        let line = answer.lines().next()?;
        let (slot, pid) = line.strip_prefix("slot=")?.split_once(" pid=")?;
        Some((slot.to_owned(), pid.parse().ok()?))
    };
    tokio::time::timeout(READY, exchange).await.ok()?
}

#[test]
fn connections_of_surviving_workers_go_on_when_one_dies() {
    let sandbox = Sandbox::enter().unwrap_or_else(|e| panic!("sandbox (needs root and BPF): {e}"));
    let worker = built("portshard-quic-echo");
    let config = format!(
        "[[service]]\nname = \"quic\"\nproto = \"udp\"\nlisten = \"127.0.0.1:4433\"\nworkers = {WORKERS}\ncommand = [\"{}\"]\nrestart_delay = \"100ms\"\nstop_timeout = \"2s\"\n",
        worker.display()
    );
    let mut daemon =
        DaemonRun::start(&built("portshard"), &config, sandbox.pins()).expect("starting portshard");
    daemon
        .wait_ready(&[("quic", WORKERS)], READY)
        .expect("the workers did not come up");
    let server: SocketAddr = "127.0.0.1:4433".parse().unwrap();

    // The namespace is this thread's: the runtime must run here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut open: Vec<(Endpoint, Connection, (String, u32))> = Vec::new();
        for _ in 0..CONNECTIONS {
            let endpoint = client::endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
            let connection = tokio::time::timeout(READY, endpoint.connect(server, "localhost").unwrap())
                .await
                .expect("connecting timed out")
                .expect("connecting");
            let answer = ask(&connection).await.expect("no answer on a new connection");
            open.push((endpoint, connection, answer));
        }
        let mut per_worker: BTreeMap<(String, u32), usize> = BTreeMap::new();
        for (_, _, answer) in &open {
            *per_worker.entry(answer.clone()).or_default() += 1;
        }
        assert!(
            per_worker.len() >= 2,
            "{CONNECTIONS} connections all went to one worker: {per_worker:?}"
        );

        // Kill the worker of the first connection.
        let (victim_slot, victim_pid) = open[0].2.clone();
        signal(victim_pid, libc::SIGKILL).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut survivors = 0;
        for (_, connection, before) in &open {
            if before.1 == victim_pid {
                continue;
            }
            let after = ask(connection).await;
            assert_eq!(
                after.as_ref(),
                Some(before),
                "a connection of slot {} (pid {}) broke or moved when slot {victim_slot} died (workers: {per_worker:?})",
                before.0,
                before.1
            );
            survivors += 1;
        }
        assert!(survivors > 0);
        for (endpoint, connection, _) in open {
            connection.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        }
    });
    daemon.terminate().expect("stopping portshard");
}
