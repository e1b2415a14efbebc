//! QUIC-LB connection-ID steering in the kernel, packet by packet: a packet carrying a live
//! slot's server ID reaches that slot from any address, every packet the program cannot
//! steer by its connection ID (forged, stale or foreign server IDs, other configs, a
//! client's own connection IDs, unknown versions, truncated datagrams) is still delivered
//! by the table and counted, and a new connection's first flight goes by the table even
//! from a port the flow table holds for an older connection; with `quic_encrypt`, connection
//! IDs encrypted under the key every worker gets reach their slot, and server IDs in the
//! clear do not; in a fresh network namespace with `portshard echo` workers.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::UdpSocket,
    path::Path,
    process::Command,
};

use portshard::{report::QuicReport, table::Slot};
use portshard_common::quic::server_id;
use portshard_harness::daemon::DaemonRun;
use portshard_harness::daemon::workers;
use support::{EXE, PORT, READY, pid_of, sandbox, signal, target, wait_replaced};

const WORKERS: usize = 4;
const CONFIG_ID: u8 = 2;
const NONCE_LEN: usize = 8;
/// Sources per slot: each a fresh socket, so a fresh 4-tuple.
const SOURCES: usize = 24;

/// The QUIC service of `WORKERS` echo workers, with `extra` config lines.
fn config(extra: &str) -> String {
    format!(
        "[[service]]\nname = \"h3\"\nproto = \"udp\"\nlisten = \"127.0.0.1:{PORT}\"\nworkers = {WORKERS}\ncommand = [\"{EXE}\", \"echo\"]\nquic = true\nquic_config_id = {CONFIG_ID}\nquic_nonce_len = {NONCE_LEN}\n{extra}\n"
    )
}

/// A connection ID a worker of the service issues: config rotation bits, server ID `id`
/// and a nonce of `nonce` octets.
fn connection_id(config_id: u8, id: [u8; 3], nonce: u8) -> Vec<u8> {
    let mut cid = vec![(config_id << 5) | 0x0b];
    cid.extend_from_slice(&id);
    cid.extend(std::iter::repeat_n(nonce, NONCE_LEN));
    cid
}

/// A short-header packet whose destination connection ID has config rotation bits
/// `config_id` and server ID `id`, padded like a real packet (packet number and tag).
fn short_header(config_id: u8, id: [u8; 3], nonce: u8) -> Vec<u8> {
    let mut packet = vec![0x40 | 0x01];
    packet.extend(connection_id(config_id, id, nonce));
    packet.extend([0xaa; 24]);
    packet
}

/// QUIC v1's long packet types (RFC 9000 17.2), in the first octet.
const INITIAL: u8 = 0xc0;
const HANDSHAKE: u8 = 0xe0;

/// A long-header packet of `version` whose first octet is `first` and destination
/// connection ID `dcid`, padded to an Initial's 1200 octets.
fn long_header_to(first: u8, version: u32, dcid: &[u8]) -> Vec<u8> {
    let mut packet = vec![first];
    packet.extend_from_slice(&version.to_be_bytes());
    packet.push(dcid.len() as u8);
    packet.extend_from_slice(dcid);
    packet.extend([0; 1]);
    packet.resize(1200, 0);
    packet
}

/// A client's first Initial of `version`: its own 8-octet connection ID.
fn long_header(version: u32) -> Vec<u8> {
    long_header_to(INITIAL, version, &[0x5c; 8])
}

/// Sends `packet` from a fresh socket and returns the slot of the worker that echoed it.
fn answered_by(packet: &[u8]) -> Slot {
    answered_from(&UdpSocket::bind("127.0.0.1:0").unwrap(), packet)
}

/// The slot whose worker answers `packet` sent from `socket`.
fn answered_from(socket: &UdpSocket, packet: &[u8]) -> Slot {
    socket.set_read_timeout(Some(READY)).unwrap();
    socket.send_to(packet, target()).unwrap();
    let mut buffer = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buffer).unwrap_or_else(|e| {
        panic!(
            "no answer to a {}-octet datagram within {READY:?}: {e}",
            packet.len()
        )
    });
    let text = String::from_utf8_lossy(&buffer[..n]);
    text.split(' ')
        .next()
        .and_then(|slot| slot.parse().ok())
        .unwrap_or_else(|| panic!("not an echo answer: {text:?}"))
}

/// The live slots of the service and their generations.
fn live(daemon: &DaemonRun) -> BTreeMap<Slot, u32> {
    let status = daemon.status().unwrap();
    status[0]
        .slots
        .iter()
        .filter(|s| s.state == "live")
        .map(|s| (s.slot, s.generation))
        .collect()
}

fn quic_report(daemon: &DaemonRun) -> QuicReport {
    daemon.status().unwrap()[0]
        .quic
        .clone()
        .expect("a quic service reports its QUIC counters")
}

#[test]
fn a_short_header_packet_reaches_the_slot_its_server_id_names_from_any_address() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(Path::new(EXE), &config(""), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let slots = live(&daemon);
    assert_eq!(slots.len(), WORKERS);
    for (&slot, &generation) in &slots {
        for source in 0..SOURCES {
            let id = server_id(slot, generation);
            let packet = short_header(CONFIG_ID, id, source as u8);
            assert_eq!(answered_by(&packet), slot, "short header, source {source}");
            // A handshake's later packets carry the connection ID the worker chose too.
            let cid = connection_id(CONFIG_ID, id, source as u8);
            let packet = long_header_to(HANDSHAKE, 1, &cid);
            assert_eq!(answered_by(&packet), slot, "handshake, source {source}");
        }
    }
    let report = quic_report(&daemon);
    assert_eq!((report.config_id, report.cid_len), (CONFIG_ID, 12));
    assert_eq!(
        (report.long_header, report.first_flight),
        (0, 0),
        "{report:?}"
    );
    for &slot in slots.keys() {
        let row = report.slots.iter().find(|r| r.slot == slot).unwrap();
        assert_eq!(row.by_connection_id, 2 * SOURCES as u64, "slot {slot}");
        assert_eq!(row.stale_server_id, 0, "slot {slot}");
    }
    let text = std::process::Command::new(EXE)
        .args(["status", "--bpffs"])
        .arg(sandbox.pins())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "{} packets delivered by connection ID",
            2 * SOURCES * WORKERS
        )),
        "{text}"
    );
}

#[test]
fn packets_the_program_cannot_steer_by_connection_id_are_delivered_by_the_table_and_counted() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(Path::new(EXE), &config(""), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let slots = live(&daemon);
    let (&slot, &generation) = slots.iter().next().unwrap();
    let free_slot = (0..512).find(|s| !slots.contains_key(s)).unwrap();

    // Each kind, from many sources: none is dropped, each answered by a live worker.
    let kinds: [(&str, Vec<u8>); 8] = [
        (
            "stale",
            short_header(CONFIG_ID, server_id(slot, generation + 1), 1),
        ),
        ("free", short_header(CONFIG_ID, server_id(free_slot, 0), 2)),
        ("unknown", short_header(CONFIG_ID, [0xff, 0xff, 0], 3)),
        (
            "other_config",
            short_header(CONFIG_ID + 1, server_id(slot, generation), 4),
        ),
        (
            "unroutable",
            short_header(7, server_id(slot, generation), 5),
        ),
        (
            "truncated",
            short_header(CONFIG_ID, server_id(slot, generation), 6)[..20].to_vec(),
        ),
        ("unknown_version", long_header(0x1a2a_3a4a)),
        (
            "stale_handshake",
            long_header_to(
                HANDSHAKE,
                1,
                &connection_id(CONFIG_ID, server_id(slot, generation + 1), 7),
            ),
        ),
    ];
    for (kind, packet) in &kinds {
        let mut seen = BTreeMap::<Slot, usize>::new();
        for _ in 0..SOURCES {
            *seen.entry(answered_by(packet)).or_default() += 1;
        }
        assert!(
            seen.keys().all(|s| slots.contains_key(s)),
            "{kind}: answered by {seen:?}, live {slots:?}"
        );
        // The table spreads sources: a packet steered by its (forged) ID would all land on
        // one slot.
        assert!(seen.len() > 1, "{kind}: every source answered by {seen:?}");
    }
    let long = long_header(1);
    for _ in 0..SOURCES {
        answered_by(&long);
    }

    let report = quic_report(&daemon);
    let sources = SOURCES as u64;
    let stale: u64 = report.slots.iter().map(|r| r.stale_server_id).sum();
    assert_eq!(stale, 2 * sources, "{report:?}");
    assert_eq!(
        report
            .slots
            .iter()
            .find(|r| r.slot == free_slot)
            .map(|r| r.stale_server_id),
        Some(sources),
        "{report:?}"
    );
    assert_eq!(report.by_connection_id, 0, "{report:?}");
    assert_eq!(report.unknown_server_id, sources, "{report:?}");
    assert_eq!(report.other_config, 2 * sources, "{report:?}");
    assert_eq!(report.malformed, sources, "{report:?}");
    // Long headers: the stale handshake, the unknown version, the client's Initials; of
    // them only the Initials are a first flight.
    assert_eq!(report.long_header, 3 * sources, "{report:?}");
    assert_eq!(report.unknown_version, sources, "{report:?}");
    assert_eq!(report.first_flight, sources, "{report:?}");
}

#[test]
fn a_new_connection_from_a_port_the_flow_table_holds_goes_to_the_new_generation() {
    let sandbox = sandbox();
    // Long enough that the old generation drains for the whole test.
    let extra = "mode = \"handover\"\ndrain_idle = \"120s\"";
    let mut daemon = DaemonRun::start(Path::new(EXE), &config(extra), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let old = live(&daemon);
    // Flows of an old connection whose connection IDs the program does not steer by (another
    // config): two datagrams each, so the flow table keeps them on their old slot.
    let sockets: Vec<UdpSocket> = (0..SOURCES)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let foreign = short_header(CONFIG_ID + 1, [0; 3], 9);
    let kept: Vec<Slot> = sockets
        .iter()
        .map(|socket| {
            let first = answered_from(socket, &foreign);
            assert_eq!(answered_from(socket, &foreign), first);
            first
        })
        .collect();

    let reloaded = Command::new(EXE)
        .args(["reload", "h3", "--control"])
        .arg(daemon.control())
        .output()
        .unwrap();
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    let new = live(&daemon);
    let new_slots: BTreeSet<Slot> = new.keys().copied().collect();
    assert!(new_slots.is_disjoint(&old.keys().copied().collect()));

    for ((socket, &was), source) in sockets.iter().zip(&kept).zip(0u8..) {
        // The old connection's flow stays where it was.
        assert_eq!(answered_from(socket, &foreign), was, "source {source}");
        // A new connection from the same port: its Initial goes by the table, to the new
        // generation, though the flow table holds the port for the old one.
        let initial = long_header_to(INITIAL, 1, &[source; 8]);
        let placed = answered_from(socket, &initial);
        assert!(
            new_slots.contains(&placed),
            "source {source}: Initial answered by slot {placed}, new generation {new_slots:?}"
        );
        // Its handshake, by the connection ID the new worker chose.
        let (&other, &generation) = new.iter().find(|(s, _)| **s != placed).unwrap();
        let cid = connection_id(CONFIG_ID, server_id(other, generation), source);
        assert_eq!(
            answered_from(socket, &long_header_to(HANDSHAKE, 1, &cid)),
            other
        );
        // And an old connection's handshake, by its old worker's connection ID.
        let cid = connection_id(CONFIG_ID, server_id(was, old[&was]), source);
        assert_eq!(
            answered_from(socket, &long_header_to(HANDSHAKE, 1, &cid)),
            was
        );
    }
    let report = quic_report(&daemon);
    assert_eq!(report.first_flight, SOURCES as u64, "{report:?}");
    assert_eq!(report.by_connection_id, 2 * SOURCES as u64, "{report:?}");
}

/// The QUIC-LB key in the environment the daemon gave worker `pid`.
fn worker_key(pid: u32) -> [u8; 16] {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let hex = environ
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(b"PORTSHARD_QUIC_LB_KEY="))
        .unwrap_or_else(|| panic!("worker {pid} has no PORTSHARD_QUIC_LB_KEY"));
    portshard_quic_lb::parse_hex(std::str::from_utf8(hex).unwrap())
        .and_then(|key| key.try_into().ok())
        .unwrap_or_else(|| panic!("worker {pid}: not a 16-octet hex key"))
}

#[test]
fn encrypted_connection_ids_reach_their_slot_and_server_ids_in_the_clear_do_not() {
    const ENCRYPTED_NONCE_LEN: usize = 13;
    let sandbox = sandbox();
    let config = config("").replace(
        &format!("quic_nonce_len = {NONCE_LEN}"),
        "quic_encrypt = true",
    );
    let mut daemon = DaemonRun::start(Path::new(EXE), &config, sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let slots = live(&daemon);
    let pids = workers(&daemon.status().unwrap())["h3"].clone();
    let keys: BTreeSet<[u8; 16]> = pids.values().map(|&pid| worker_key(pid)).collect();
    assert_eq!(keys.len(), 1, "every worker gets the service's one key");
    let key = *keys.first().unwrap();

    for (&slot, &generation) in &slots {
        let quic_lb = portshard_quic_lb::Config::new(
            CONFIG_ID,
            &server_id(slot, generation),
            ENCRYPTED_NONCE_LEN,
            Some(key),
        )
        .unwrap();
        for source in 0..SOURCES {
            let cid = quic_lb.encode(&[source as u8; ENCRYPTED_NONCE_LEN], 0);
            let mut short = vec![0x41];
            short.extend_from_slice(cid.as_bytes());
            short.extend([0xaa; 24]);
            assert_eq!(answered_by(&short), slot, "short header, source {source}");
            let handshake = long_header_to(HANDSHAKE, 1, cid.as_bytes());
            assert_eq!(answered_by(&handshake), slot, "handshake, source {source}");
        }
    }
    // The same server IDs in the clear: not what the workers issue, so by the table.
    let (&slot, &generation) = slots.iter().next().unwrap();
    let mut seen = BTreeSet::new();
    for source in 0..SOURCES {
        let mut short = vec![0x41, (CONFIG_ID << 5) | 16];
        short.extend_from_slice(&server_id(slot, generation));
        short.extend([source as u8; ENCRYPTED_NONCE_LEN]);
        short.extend([0xaa; 24]);
        seen.insert(answered_by(&short));
    }
    assert!(
        seen.len() > 1,
        "server IDs in the clear steered to {seen:?}"
    );
    let report = quic_report(&daemon);
    assert!(report.encrypted, "{report:?}");
    assert_eq!(report.cid_len, 17, "{report:?}");
    assert_eq!(
        report.by_connection_id,
        (2 * SOURCES * WORKERS) as u64,
        "{report:?}"
    );

    // The key lives in the pins: a daemon restarted after `kill -9` gives a new worker the
    // same one.
    daemon.kill9().unwrap();
    daemon.spawn().unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let old = pid_of(&daemon, "h3", slot);
    signal(old, libc::SIGKILL);
    let replacement = wait_replaced(&daemon, "h3", slot, old);
    assert_eq!(worker_key(replacement), key);
}
