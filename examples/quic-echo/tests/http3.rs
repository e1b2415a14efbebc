//! HTTP/3 under portshard, with a real HTTP/3 stack (`h3` on quinn) on both ends, in a fresh
//! network namespace (root and BPF, like every daemon test): requests on connections that
//! move to new client ports mid-connection keep reaching the worker that accepted them.
mod support;

use std::{collections::BTreeSet, net::SocketAddr};

use portshard_harness::daemon::DaemonRun;
use portshard_quic_echo::http3::Http3Client;
use support::{READY, WORKERS, built, runtime, sandbox, service};
use tokio::time::timeout;

/// The worker line of an answer (`slot=.. pid=..`), if `body` is one for `request`.
fn worker_of(body: &str, request: &str) -> Option<String> {
    let mut lines = body.lines();
    let worker = lines.next()?.to_owned();
    (worker.starts_with("slot=") && lines.next() == Some(request)).then_some(worker)
}

#[test]
fn http3_requests_keep_their_worker_as_connections_rebind() {
    const CONNECTIONS: usize = 64;
    let sandbox = sandbox();
    let config = service("h3", 4443, true, "");
    let mut daemon = DaemonRun::start(&built("portshard"), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let server = SocketAddr::from(([127, 0, 0, 1], 4443));
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));

    let runtime = runtime();
    let local = tokio::task::LocalSet::new();
    let (homes, after) = local.block_on(&runtime, async {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            let client = timeout(READY, Http3Client::connect(bind, server))
                .await
                .expect("connecting timed out")
                .expect("connecting");
            clients.push(client);
        }
        let mut homes = Vec::new();
        for (i, client) in clients.iter_mut().enumerate() {
            let path = format!("/before/{i}");
            let body = timeout(READY, client.get(&path))
                .await
                .expect("no answer in time")
                .expect("GET");
            let worker = worker_of(&body, &format!("GET {path}"))
                .unwrap_or_else(|| panic!("not an answer to GET {path}: {body:?}"));
            homes.push(worker);
        }
        for client in &clients {
            client.rebind(bind).unwrap();
        }
        let mut after = Vec::new();
        for client in &mut clients {
            let answer = timeout(READY, client.get("/after")).await;
            let body = answer.ok().and_then(Result::ok).unwrap_or_default();
            after.push(worker_of(&body, "GET /after"));
        }
        for client in clients {
            client.close().await;
        }
        (homes, after)
    });

    let spread: BTreeSet<&String> = homes.iter().collect();
    let (mut kept, mut moved, mut broken) = (0, 0, 0);
    for (home, answer) in homes.iter().zip(&after) {
        match answer {
            Some(worker) if worker == home => kept += 1,
            Some(_) => moved += 1,
            None => broken += 1,
        }
    }
    let quic = daemon.status().unwrap()[0]
        .quic
        .clone()
        .expect("a quic service reports its QUIC counters");
    eprintln!(
        "http3: {CONNECTIONS} connections over {} workers; after each rebound to a new client port: kept {kept}, moved {moved}, broken {broken}; QUIC packets by connection ID {}",
        spread.len(),
        quic.by_connection_id
    );
    assert_eq!(spread.len(), WORKERS, "connections on {spread:?}");
    assert_eq!((kept, moved, broken), (CONNECTIONS, 0, 0));
    assert!(quic.by_connection_id > 0, "{quic:?}");
    daemon.terminate().unwrap();
}
