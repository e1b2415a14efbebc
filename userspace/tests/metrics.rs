//! The Prometheus endpoint of a real daemon in a fresh network namespace: it answers
//! scrapes, refuses what it does not serve, and idle or slow clients cannot pile up.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use portshard_harness::daemon::{DaemonRun, scrape};
use support::{EXE, READY, config, sandbox};

/// Connections the daemon serves at once (`daemon::metrics_http::MAX_CONNECTIONS`).
const MAX_CONNECTIONS: usize = 64;

fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection; returns what it sent.
fn until_closed(stream: &mut TcpStream) -> String {
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

#[test]
fn metrics_are_served_and_idle_clients_are_limited_and_timed_out() {
    let sandbox = sandbox();
    let address = SocketAddr::from(([127, 0, 0, 1], 9300));
    let mut daemon = DaemonRun::start_with_args(
        Path::new(EXE),
        &config(&[("dns", "udp", 2)]),
        sandbox.pins(),
        &["--metrics", &address.to_string()],
    )
    .unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();

    let metrics = scrape(address).unwrap();
    assert!(
        metrics.contains("portshard_table_entries{service=\"dns\",slot=\"0\"}"),
        "{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");

    let mut other = connect(address);
    other.write_all(b"GET /other HTTP/1.0\r\n\r\n").unwrap();
    assert!(until_closed(&mut other).starts_with("HTTP/1.0 404"));

    // Idle clients fill every slot; one more is closed at once, unanswered.
    let mut idle: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| connect(address)).collect();
    let mut extra = connect(address);
    extra.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(
        until_closed(&mut extra),
        "",
        "a connection beyond the limit was served"
    );
    // The idle ones are closed after the header timeout, and scrapes work again.
    for stream in &mut idle {
        let answer = until_closed(stream);
        assert!(!answer.contains(" 200 "), "an idle client got {answer}");
    }
    assert!(scrape(address).unwrap().contains("portshard_table_entries"));
    daemon.terminate().unwrap();
}
