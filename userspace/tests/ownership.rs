//! A service's reuseport group is portshard's alone, against the real kernel in fresh
//! network namespaces: sock_diag finds what is bound on an address (cookies as `SO_COOKIE`,
//! wildcards overlapping), a second daemon on the first's address refuses to start while
//! the first serves on, a process that joins a service's group later is reported, and a
//! service SIGHUP adds where another process listens is refused while the rest applies.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, UdpSocket},
    os::fd::AsFd as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

mod support;

use portshard::{
    config::DEFAULT_PROBE_INTERVAL,
    dataplane::Dataplane,
    ownership::{self, BoundSocket},
    sockdiag::SockDiag,
    socket::{self, Proto, bind_reuseport},
};
use portshard_harness::{
    daemon::{DaemonRun, UdpFlows, scrape, tcp_greeting},
    scenario::PinRoot,
};
use serde_json::{Value, json};
use support::{EXE, PORT, READY, config, sandbox, target};

/// The sockets bound on `addr`'s port that share `addr` (exact or through a wildcard).
fn sharing(diag: &mut SockDiag, proto: Proto, addr: SocketAddr) -> Vec<BoundSocket> {
    let found = diag.bound(proto, addr.port()).unwrap();
    ownership::foreign(addr, &found, &BTreeSet::new())
}

fn cookies(sockets: &[BoundSocket]) -> BTreeSet<u64> {
    sockets.iter().map(|s| s.cookie).collect()
}

#[test]
fn sock_diag_finds_the_sockets_on_an_address_by_their_cookies() {
    let _sandbox = sandbox();
    let mut diag = SockDiag::open().unwrap();
    let loopback = target();
    for proto in [Proto::Udp, Proto::Tcp] {
        let first = bind_reuseport(proto, loopback).unwrap();
        let second = bind_reuseport(proto, loopback).unwrap();
        let ours = [&first, &second].map(|s| socket::cookie(s.as_fd()).unwrap());
        let found = sharing(&mut diag, proto, loopback);
        assert_eq!(cookies(&found), BTreeSet::from(ours), "{proto}: {found:?}");
        assert!(
            found.iter().all(|s| s.inode != 0 && s.uid == 0),
            "{found:?}"
        );
        // Another port, another address of the port, another transport: not there.
        let _elsewhere =
            bind_reuseport(proto, SocketAddr::from(([127, 0, 0, 1], PORT + 10))).unwrap();
        let _other = bind_reuseport(proto, SocketAddr::from(([127, 0, 0, 2], PORT))).unwrap();
        let other_proto = if proto == Proto::Udp {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        let _other_proto = bind_reuseport(other_proto, loopback).unwrap();
        assert_eq!(
            cookies(&sharing(&mut diag, proto, loopback)),
            BTreeSet::from(ours)
        );
        // The wildcard overlaps both ways; an IPv6-only socket on [::] does not.
        let wildcard = bind_reuseport(proto, SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap();
        let _v6only = bind_reuseport(proto, "[::]:5300".parse().unwrap()).unwrap();
        let wildcard_cookie = socket::cookie(wildcard.as_fd()).unwrap();
        let found = sharing(&mut diag, proto, loopback);
        assert!(cookies(&found).contains(&wildcard_cookie), "{found:?}");
        assert_eq!(found.len(), 3, "{found:?}");
        let from_wildcard = sharing(&mut diag, proto, "0.0.0.0:5300".parse().unwrap());
        assert_eq!(
            from_wildcard.len(),
            4,
            "both loopback addresses too: {from_wildcard:?}"
        );
    }
    // A dual-stack IPv6 socket takes IPv4 traffic: it shares an IPv4 address.
    let dual = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    dual.set_only_v6(false).unwrap();
    dual.bind(&"[::]:5301".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let found = sharing(&mut diag, Proto::Udp, "127.0.0.1:5301".parse().unwrap());
    assert_eq!(
        found
            .iter()
            .map(|s| (s.cookie, s.v6only))
            .collect::<Vec<_>>(),
        [(socket::cookie(dual.as_fd()).unwrap(), Some(false))]
    );
    // A connected UDP socket on the port is found too.
    let connected = UdpSocket::bind("127.0.0.1:5302").unwrap();
    connected.connect("127.0.0.1:9").unwrap();
    let found = sharing(&mut diag, Proto::Udp, "127.0.0.1:5302".parse().unwrap());
    assert_eq!(
        cookies(&found),
        BTreeSet::from([socket::cookie(connected.as_fd()).unwrap()])
    );
    // A TCP socket bound but not listening is not in any group.
    let unlistened = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    unlistened
        .bind(&"127.0.0.1:5303".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    assert!(sharing(&mut diag, Proto::Tcp, "127.0.0.1:5303".parse().unwrap()).is_empty());
}

/// `portshard status --json` of the pins at `pins`, as the CLI prints it.
fn status_json(pins: &Path) -> Value {
    let out = Command::new(EXE)
        .args(["status", "--json", "--bpffs"])
        .arg(pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The datagrams the program steered to `service`'s slots so far.
fn selected(status: &Value, service: &str) -> u64 {
    service_of(status, service)["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|slot| slot["counters"]["selected"].as_u64().unwrap())
        .sum()
}

fn service_of<'a>(status: &'a Value, service: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("no service {service} in {status}"))
}

/// Polls `check` until it gives a value; panics with `what` after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A plain Python process holding a socket with `SO_REUSEPORT` on an address: the outsider
/// a group must not be shared with. It counts the datagrams or connections it receives
/// until its standard input closes, and exits when dropped.
struct Outsider {
    child: Child,
}

impl Outsider {
    /// Binds (and for TCP listens on) `addr` with `proto`, and waits until it has.
    fn bind(proto: Proto, addr: SocketAddr) -> Self {
        let (kind, listen, take) = match proto {
            Proto::Udp => ("SOCK_DGRAM", "", "s.recv(65536)"),
            Proto::Tcp => ("SOCK_STREAM", "s.listen()", "s.accept()[0].close()"),
        };
        let script = format!(
            "import select, socket, sys\n\
             s = socket.socket(socket.AF_INET, socket.{kind})\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
             s.bind(('{}', {}))\n\
             {listen}\n\
             print('bound', flush=True)\n\
             received = 0\n\
             while True:\n\
             \x20   ready, _, _ = select.select([s, sys.stdin], [], [])\n\
             \x20   if s in ready:\n\
             \x20       {take}\n\
             \x20       received += 1\n\
             \x20   if sys.stdin in ready and not sys.stdin.read(1):\n\
             \x20       break\n\
             print(received, flush=True)\n",
            addr.ip(),
            addr.port()
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "bound\n", "the outsider could not bind {addr}");
        Self { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many datagrams or connections it received, once told to stop.
    fn received(mut self) -> u64 {
        drop(self.child.stdin.take());
        let mut line = String::new();
        BufReader::new(self.child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("outsider said {line:?}"))
    }
}

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_second_daemon_on_the_first_ones_address_refuses_to_start_and_the_first_serves_on() {
    let sandbox = sandbox();
    let config = config(&[("dns", "udp", 2)]);
    let mut first = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    first.wait_ready(&[("dns", 2)], READY).unwrap();
    let first_pid = first.pid().unwrap();
    let mut flows = UdpFlows::new(target(), 64).unwrap();
    flows.settle(READY).unwrap();
    let before = selected(&status_json(sandbox.pins()), "dns");

    // Its own pins and control socket, the same address.
    let other = PinRoot::new().unwrap();
    let mut second = DaemonRun::start(Path::new(EXE), &config, other.path()).unwrap();
    let exit = second.wait_exit().unwrap();
    let log = second.log_text();
    assert!(!exit.success(), "the second daemon started: {log}");
    assert!(
        log.contains("service dns: 127.0.0.1:5300/udp is already in use by pids "),
        "{log}"
    );
    assert!(
        log.contains(&format!("(python3; children of pid {first_pid} portshard)")),
        "the refusal names the first daemon: {log}"
    );
    assert!(
        log.contains("stop those processes or choose another address"),
        "{log}"
    );
    assert!(
        Dataplane::pinned_services(other.path()).unwrap().is_empty(),
        "the refused daemon left pins"
    );

    // The first one's counters keep moving, and it saw nothing foreign.
    flows.settle(READY).unwrap();
    let status = status_json(sandbox.pins());
    let after = selected(&status, "dns");
    assert!(after >= before + 64, "selected {before} -> {after}");
    assert_eq!(service_of(&status, "dns")["foreign"], json!([]));
    assert_eq!(
        first.wait_ready(&[("dns", 2)], READY).unwrap()[0]
            .slots
            .len(),
        2
    );
}

#[test]
fn a_process_joining_a_services_group_is_reported_and_forgotten_once_gone() {
    let sandbox = sandbox();
    let metrics: SocketAddr = "127.0.0.1:9900".parse().unwrap();
    let mut daemon = DaemonRun::start_with_args(
        Path::new(EXE),
        &config(&[("dns", "udp", 2)]),
        sandbox.pins(),
        &["--metrics", &metrics.to_string()],
    )
    .unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    let gauge = |count: u32| format!("portshard_foreign_sockets{{service=\"dns\"}} {count}");
    let text = wait_for("the metrics endpoint", READY, || scrape(metrics).ok());
    assert!(text.contains(&gauge(0)), "{text}");
    assert!(
        text.contains("# HELP portshard_foreign_sockets Sockets of other processes"),
        "{text}"
    );
    assert_eq!(
        service_of(&status_json(sandbox.pins()), "dns")["foreign"],
        json!([])
    );

    let outsider = Outsider::bind(Proto::Udp, target());
    let joined = Instant::now();
    let foreign = wait_for("the outsider in `status --json`", READY, || {
        let status = status_json(sandbox.pins());
        let foreign = service_of(&status, "dns")["foreign"].clone();
        (foreign != json!([])).then_some(foreign)
    });
    let in_status = joined.elapsed();
    assert_eq!(foreign[0]["pids"], json!([outsider.pid()]), "{foreign}");
    assert_eq!(foreign[0]["uid"], json!(0));
    assert_eq!(foreign[0]["address"], json!("127.0.0.1:5300"));
    assert!(foreign[0]["cookie"].as_u64().unwrap() > 0);
    assert_eq!(foreign.as_array().unwrap().len(), 1, "{foreign}");
    let human = Command::new(EXE)
        .args(["status", "--bpffs"])
        .arg(sandbox.pins())
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains(&format!(
            "FOREIGN socket on 127.0.0.1:5300 (cookie {}, uid 0), held by pid {}",
            foreign[0]["cookie"],
            outsider.pid()
        )),
        "{human}"
    );

    // The daemon's own check: the metric, and one warning naming the outsider.
    wait_for("the outsider in the metrics", READY, || {
        scrape(metrics).ok().filter(|text| text.contains(&gauge(1)))
    });
    let in_metrics = joined.elapsed();
    let warned = wait_for("the daemon's warning", READY, || {
        let log = daemon.log_text();
        log.contains("a foreign socket shares the service's address")
            .then_some(log)
    });
    assert!(
        warned.contains(&format!("pids=[{}]", outsider.pid())),
        "{warned}"
    );
    eprintln!(
        "outsider reported after {in_status:?} in `status`, {in_metrics:?} in the metrics (checked every {DEFAULT_PROBE_INTERVAL:?})"
    );

    drop(outsider);
    wait_for("the outsider gone from the metrics", READY, || {
        scrape(metrics).ok().filter(|text| text.contains(&gauge(0)))
    });
    assert_eq!(
        service_of(&status_json(sandbox.pins()), "dns")["foreign"],
        json!([])
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches("a foreign socket shares the service's address")
            .count(),
        1,
        "warned once: {log}"
    );
    assert!(
        log.contains("the foreign socket on the service's address is gone"),
        "{log}"
    );
}

#[test]
fn a_service_added_by_sighup_where_another_process_listens_is_refused_and_the_rest_applies() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(
        Path::new(EXE),
        &config(&[("dns", "udp", 2)]),
        sandbox.pins(),
    )
    .unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    // On the wildcard address: it shares 127.0.0.1:5300/tcp.
    let outsider = Outsider::bind(Proto::Tcp, SocketAddr::from(([0, 0, 0, 0], PORT)));
    daemon
        .set_config(&config(&[("dns", "udp", 3), ("web", "tcp", 1)]))
        .unwrap();
    daemon.hangup().unwrap();
    daemon.wait_ready(&[("dns", 3)], READY).unwrap();
    let log = wait_for("the refusal in the log", READY, || {
        let log = daemon.log_text();
        log.contains("SIGHUP: cannot add the service")
            .then_some(log)
    });
    assert!(
        log.contains(&format!(
            "service web: 127.0.0.1:5300/tcp is already in use by pid {} (python3; child of pid {} ",
            outsider.pid(),
            std::process::id()
        )),
        "{log}"
    );
    assert!(log.contains(") on 0.0.0.0:5300 — a reuseport group there would be shared with it; stop that process or choose another address"), "{log}");
    assert_eq!(
        Dataplane::pinned_services(sandbox.pins()).unwrap(),
        ["dns"],
        "web was not created"
    );
}

#[test]
fn an_outsider_in_a_services_group_receives_no_datagram_and_no_connection() {
    const FLOWS: usize = 4096;
    const CONNECTIONS: usize = 512;
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(
        Path::new(EXE),
        &config(&[("dns", "udp", 2), ("web", "tcp", 2)]),
        sandbox.pins(),
    )
    .unwrap();
    daemon.wait_ready(&[("dns", 2), ("web", 2)], READY).unwrap();
    let udp = Outsider::bind(Proto::Udp, target());
    let tcp = Outsider::bind(Proto::Tcp, target());

    let mut flows = UdpFlows::new(target(), FLOWS).unwrap();
    let answered = flows.settle(READY).unwrap().len();
    let again = flows.round(Duration::from_secs(2)).unwrap();
    let mut served = 0;
    for _ in 0..CONNECTIONS {
        if tcp_greeting(target(), Duration::from_secs(5)).is_ok() {
            served += 1;
        }
    }
    let (to_udp, to_tcp) = (udp.received(), tcp.received());
    eprintln!(
        "outsiders: {answered} + {} datagrams answered by workers, {to_udp} reached the UDP outsider; {served} of {CONNECTIONS} connections served by workers, {to_tcp} reached the TCP outsider",
        again.iter().flatten().count()
    );
    assert_eq!((to_udp, to_tcp), (0, 0));
    assert_eq!(answered, FLOWS);
    assert_eq!(served, CONNECTIONS);
}
