//! QUIC connections under portshard's QUIC-LB steering, with quinn on both ends, each test in
//! a fresh network namespace (root and BPF, like every daemon test): connections that
//! rebind to a new client port keep their worker (and, without QUIC-LB, with plain
//! `SO_REUSEPORT` or portshard's 4-tuple table, most break); a worker's death breaks no
//! other worker's connection; a handover reload under load breaks none, puts every new
//! connection on the new generation and lets the old one drain and exit.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    os::fd::AsFd as _,
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

mod support;

use portshard::process::{self, Activation, QuicLbEnv};
use portshard_harness::daemon::{DaemonRun, kill_and_wait, signal, wait_exit, workers};
use portshard_quic_echo::client;
use quinn::{Connection, Endpoint};
use socket2::{Domain, Socket, Type};
use support::{CONFIG_ID, NONCE_LEN, READY, WORKERS, built, runtime, sandbox, service};
use tokio::task::JoinSet;

/// Which worker answered: its slot and pid.
type Worker = (String, u32);

/// One client connection, on an endpoint (a client socket) of its own, and the worker that
/// first answered it.
struct Client {
    endpoint: Endpoint,
    connection: Connection,
    home: Worker,
}

/// One request on a new stream of `connection`: the answering worker, or `None` if no
/// answer came within [`READY`] (the connection is broken).
async fn ask(connection: Connection) -> Option<Worker> {
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

/// Opens a connection to `server` from a new client port and asks who serves it.
async fn open(server: SocketAddr) -> Client {
    let endpoint = client::endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let connection = tokio::time::timeout(READY, endpoint.connect(server, "localhost").unwrap())
        .await
        .expect("connecting timed out")
        .expect("connecting");
    let home = ask(connection.clone())
        .await
        .expect("no answer on a new connection");
    Client {
        endpoint,
        connection,
        home,
    }
}

/// `count` connections to `server`, opened concurrently.
async fn open_many(server: SocketAddr, count: usize) -> Vec<Client> {
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        tasks.spawn_local(open(server));
    }
    let mut clients = Vec::new();
    while let Some(client) = tasks.join_next().await {
        clients.push(client.unwrap());
    }
    clients
}

/// Asks every client's connection at once; the answers in the clients' order.
async fn ask_all(clients: &[Client]) -> Vec<Option<Worker>> {
    let mut tasks = JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        let connection = client.connection.clone();
        tasks.spawn_local(async move { (index, ask(connection).await) });
    }
    let mut answers = vec![None; clients.len()];
    while let Some(answered) = tasks.join_next().await {
        let (index, answer) = answered.unwrap();
        answers[index] = answer;
    }
    answers
}

/// Moves `client` to a new client port, as a NAT rebinding or a migrating client does.
fn rebind(client: &Client) {
    client
        .endpoint
        .rebind(UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
}

/// Of `clients` and their `answers`: (kept: answered by their first worker, moved: by
/// another, broken: no answer).
fn tally(clients: &[Client], answers: &[Option<Worker>]) -> (usize, usize, usize) {
    clients
        .iter()
        .zip(answers)
        .fold(
            (0, 0, 0),
            |(kept, moved, broken), (client, answer)| match answer {
                Some(worker) if *worker == client.home => (kept + 1, moved, broken),
                Some(_) => (kept, moved + 1, broken),
                None => (kept, moved, broken + 1),
            },
        )
}

async fn close(clients: Vec<Client>) {
    for client in &clients {
        client.connection.close(0u32.into(), b"done");
    }
    for client in clients {
        client.endpoint.wait_idle().await;
    }
}

/// `WORKERS` workers on a plain `SO_REUSEPORT` group on `port` (no program attached),
/// spawned as the daemon spawns them, QUIC-LB environment included; their pids.
fn plain_group(port: u16) -> Vec<u32> {
    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    let program = built("portshard-quic-echo");
    let command = vec![program.display().to_string()];
    (0..WORKERS as u16)
        .map(|slot| {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
            socket.set_reuse_port(true).unwrap();
            socket.bind(&addr.into()).unwrap();
            let names = ["plain".to_owned()];
            let spawned = process::spawn(
                &program,
                &command,
                &[socket.as_fd()],
                &Activation {
                    names: &names,
                    slot,
                    quic_lb: Some(QuicLbEnv {
                        config_id: CONFIG_ID,
                        server_id: portshard_common::quic::server_id(slot, 0),
                        nonce_len: NONCE_LEN,
                        key: None,
                    }),
                },
                None,
            )
            .unwrap();
            spawned.pid
        })
        .collect()
}

#[test]
fn rebinding_connections_keep_their_worker_with_quic_lb_and_mostly_break_without() {
    const CONNECTIONS: usize = 256;
    let sandbox = sandbox();
    let encrypted = format!("quic = true\nquic_config_id = {CONFIG_ID}\nquic_encrypt = true");
    let config = format!(
        "{}{}{}",
        service("quic", 4433, true, ""),
        service("tuple", 4434, false, ""),
        service("encrypted", 4436, false, &encrypted),
    );
    let mut daemon = DaemonRun::start(&built("portshard"), &config, sandbox.pins()).unwrap();
    daemon
        .wait_ready(
            &[
                ("quic", WORKERS),
                ("tuple", WORKERS),
                ("encrypted", WORKERS),
            ],
            READY,
        )
        .unwrap();
    let plain = plain_group(4435);

    let runtime = runtime();
    let local = tokio::task::LocalSet::new();
    let mut results = BTreeMap::new();
    for (name, port) in [
        ("quic-lb", 4433),
        ("quic-lb encrypted", 4436),
        ("4-tuple", 4434),
        ("plain", 4435),
    ] {
        let server = SocketAddr::from(([127, 0, 0, 1], port));
        let (spread, after) = local.block_on(&runtime, async {
            let clients = open_many(server, CONNECTIONS).await;
            let spread: BTreeSet<Worker> = clients.iter().map(|c| c.home.clone()).collect();
            clients.iter().for_each(rebind);
            let answers = ask_all(&clients).await;
            let after = tally(&clients, &answers);
            close(clients).await;
            (spread, after)
        });
        eprintln!(
            "rebinding {name}: {CONNECTIONS} connections over {} workers; after each rebound to a new client port: kept {}, moved {}, broken {}",
            spread.len(),
            after.0,
            after.1,
            after.2
        );
        assert_eq!(spread.len(), WORKERS, "{name}: connections on {spread:?}");
        results.insert(name, after);
    }
    for pid in plain {
        signal(pid, libc::SIGKILL).unwrap();
        wait_exit(pid, READY).unwrap();
    }
    assert_eq!(results["quic-lb"], (CONNECTIONS, 0, 0));
    assert_eq!(results["quic-lb encrypted"], (CONNECTIONS, 0, 0));
    // A new 4-tuple lands on another of the 4 workers 3 times in 4: most connections break.
    for name in ["4-tuple", "plain"] {
        let (kept, _, _) = results[name];
        assert!(kept < CONNECTIONS / 2, "{name}: {:?}", results[name]);
    }
    let status = daemon.status().unwrap();
    for (name, encrypted) in [("quic", false), ("encrypted", true)] {
        let service = status.iter().find(|s| s.name == name).unwrap();
        let report = service.quic.as_ref().unwrap();
        assert_eq!(report.encrypted, encrypted, "{name}: {report:?}");
        assert!(report.by_connection_id > 0, "{name}: {report:?}");
        assert_eq!(
            report.stale_server_id + report.unknown_server_id,
            0,
            "{name}: {report:?}"
        );
    }
    daemon.terminate().unwrap();
}

#[test]
fn a_killed_worker_breaks_no_connection_of_the_others_even_as_they_rebind() {
    const CONNECTIONS: usize = 64;
    let sandbox = sandbox();
    let config = service("quic", 4433, true, "");
    let mut daemon = DaemonRun::start(&built("portshard"), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("quic", WORKERS)], READY).unwrap();
    let server = SocketAddr::from(([127, 0, 0, 1], 4433));
    let runtime = runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let clients = open_many(server, CONNECTIONS).await;
        let victim = clients[0].home.1;
        kill_and_wait(victim, READY).unwrap();
        let (survivors, theirs): (Vec<Client>, Vec<Client>) =
            clients.into_iter().partition(|c| c.home.1 != victim);
        let answers = ask_all(&survivors).await;
        let after_kill = tally(&survivors, &answers);
        survivors.iter().for_each(rebind);
        let answers = ask_all(&survivors).await;
        let after_rebind = tally(&survivors, &answers);
        eprintln!(
            "kill: {} connections of the killed worker, {} of the others; the others after the kill (kept, moved, broken) {after_kill:?}, after rebinding {after_rebind:?}",
            theirs.len(),
            survivors.len()
        );
        assert!(!survivors.is_empty());
        assert_eq!(after_kill, (survivors.len(), 0, 0));
        assert_eq!(after_rebind, (survivors.len(), 0, 0));
        close(survivors).await;
        for client in theirs {
            client.connection.close(0u32.into(), b"done");
        }
    });
    daemon.terminate().unwrap();
}

#[test]
fn a_handover_reload_under_quic_load_breaks_no_connection_and_the_old_generation_drains() {
    const LONG_LIVED: usize = 64;
    let sandbox = sandbox();
    let config = service(
        "h3",
        4433,
        true,
        "mode = \"handover\"\ndrain_idle = \"1s\"\ndrain_timeout = \"120s\"\n",
    );
    let mut daemon = DaemonRun::start(&built("portshard"), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let old: BTreeSet<u32> = workers(&daemon.status().unwrap())["h3"]
        .values()
        .copied()
        .collect();
    let server = SocketAddr::from(([127, 0, 0, 1], 4433));
    let control = daemon.control().to_path_buf();
    let portshard = built("portshard");
    let runtime = runtime();
    let local = tokio::task::LocalSet::new();
    let (long_lived, during, after) = local.block_on(&runtime, async {
        let long_lived = open_many(server, LONG_LIVED).await;
        let reload = reload_in_background(&portshard, &control);
        // Until the switch is done: new connections open, the long-lived ones exchange
        // data, and a few of them rebind each round.
        let mut during = Vec::new();
        let mut round = 0;
        while !reload.is_finished() {
            during.extend(open_many(server, 4).await);
            let answers = ask_all(&long_lived).await;
            assert_eq!(
                tally(&long_lived, &answers),
                (LONG_LIVED, 0, 0),
                "round {round}"
            );
            for client in long_lived.iter().skip(round % 8).step_by(8) {
                rebind(client);
            }
            round += 1;
        }
        let output = reload.join().unwrap();
        assert!(
            output.status.success(),
            "reload failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let after = open_many(server, 32).await;
        long_lived.iter().for_each(rebind);
        let long_answers = ask_all(&long_lived).await;
        let during_answers = ask_all(&during).await;
        let tallies = (
            tally(&long_lived, &long_answers),
            tally(&during, &during_answers),
        );
        let result = (
            tallies.0,
            tallies.1,
            after.iter().map(|c| c.home.1).collect::<Vec<_>>(),
        );
        close(long_lived).await;
        close(during).await;
        close(after).await;
        result
    });
    let new: BTreeSet<u32> = workers(&daemon.status().unwrap())["h3"]
        .values()
        .copied()
        .collect();
    let quic = daemon.status().unwrap()[0]
        .quic
        .clone()
        .expect("a quic service reports its QUIC counters");
    eprintln!(
        "reload: long-lived (kept, moved, broken) {long_lived:?}; opened during the switch {during:?}; opened after it: {} of {} on the new generation, over {} workers; QUIC packets by connection ID {}, first flights by the table {}, other long headers {}",
        after.iter().filter(|pid| new.contains(pid)).count(),
        after.len(),
        after.iter().collect::<BTreeSet<_>>().len(),
        quic.by_connection_id,
        quic.first_flight,
        quic.long_header - quic.first_flight,
    );
    assert_eq!(long_lived, (LONG_LIVED, 0, 0));
    assert_eq!((during.1, during.2), (0, 0), "{during:?}");
    assert!(old.is_disjoint(&new), "old {old:?}, new {new:?}");
    assert!(
        after.iter().all(|pid| new.contains(pid)),
        "connections opened after the switch on {after:?}, new generation {new:?}"
    );
    // Every connection closed: the old generation drains and exits.
    for pid in old {
        wait_exit(pid, Duration::from_secs(120)).unwrap();
    }
    daemon.terminate().unwrap();
}

/// `portshard reload h3` on a thread of its own: it returns once the switch is done.
fn reload_in_background(
    portshard: &Path,
    control: &Path,
) -> thread::JoinHandle<std::process::Output> {
    let (portshard, control) = (portshard.to_path_buf(), control.to_path_buf());
    thread::spawn(move || {
        Command::new(portshard)
            .args(["reload", "h3", "--control"])
            .arg(control)
            .output()
            .unwrap()
    })
}
