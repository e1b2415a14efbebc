//! QUIC-LB connection-ID steering in the kernel, packet by packet: a short-header packet
//! carrying a live slot's server ID reaches that slot from any address, and every packet
//! the program cannot steer by its connection ID (forged, stale or foreign server IDs,
//! other configs, long headers, unknown versions, truncated datagrams) is still delivered
//! by the table and counted, in a fresh network namespace with `portshard echo` workers.
mod support;

use std::{collections::BTreeMap, net::UdpSocket, path::Path};

use portshard::{report::QuicReport, table::Slot};
use portshard_common::quic::server_id;
use portshard_harness::daemon::DaemonRun;
use support::{EXE, PORT, READY, sandbox, target};

const WORKERS: usize = 4;
const CONFIG_ID: u8 = 2;
const NONCE_LEN: usize = 8;
/// Sources per slot: each a fresh socket, so a fresh 4-tuple.
const SOURCES: usize = 24;

fn config() -> String {
    format!(
        "[[service]]\nname = \"h3\"\nproto = \"udp\"\nlisten = \"127.0.0.1:{PORT}\"\nworkers = {WORKERS}\ncommand = [\"{EXE}\", \"echo\"]\nquic = true\nquic_config_id = {CONFIG_ID}\nquic_nonce_len = {NONCE_LEN}\n"
    )
}

/// A short-header packet whose destination connection ID has config rotation bits
/// `config_id` and server ID `id`, padded like a real packet (packet number and tag).
fn short_header(config_id: u8, id: [u8; 3], nonce: u8) -> Vec<u8> {
    let mut packet = vec![0x40 | 0x01, (config_id << 5) | 0x0b];
    packet.extend_from_slice(&id);
    packet.extend(std::iter::repeat_n(nonce, NONCE_LEN));
    packet.extend([0xaa; 24]);
    packet
}

/// A long-header packet (an Initial) of `version`.
fn long_header(version: u32) -> Vec<u8> {
    let mut packet = vec![0xc0];
    packet.extend_from_slice(&version.to_be_bytes());
    packet.extend([8; 1]);
    packet.extend([0x5c; 8]);
    packet.extend([0; 1200 - 14]);
    packet
}

/// Sends `packet` from a fresh socket and returns the slot of the worker that echoed it.
fn answered_by(packet: &[u8]) -> Slot {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
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
    let mut daemon = DaemonRun::start(Path::new(EXE), &config(), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let slots = live(&daemon);
    assert_eq!(slots.len(), WORKERS);
    for (&slot, &generation) in &slots {
        for source in 0..SOURCES {
            let packet = short_header(CONFIG_ID, server_id(slot, generation), source as u8);
            assert_eq!(answered_by(&packet), slot, "source {source}");
        }
    }
    let report = quic_report(&daemon);
    assert_eq!((report.config_id, report.cid_len), (CONFIG_ID, 12));
    for &slot in slots.keys() {
        let row = report.slots.iter().find(|r| r.slot == slot).unwrap();
        assert_eq!(row.by_connection_id, SOURCES as u64, "slot {slot}");
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
            SOURCES * WORKERS
        )),
        "{text}"
    );
}

#[test]
fn packets_the_program_cannot_steer_by_connection_id_are_delivered_by_the_table_and_counted() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start(Path::new(EXE), &config(), sandbox.pins()).unwrap();
    daemon.wait_ready(&[("h3", WORKERS)], READY).unwrap();
    let slots = live(&daemon);
    let (&slot, &generation) = slots.iter().next().unwrap();
    let free_slot = (0..512).find(|s| !slots.contains_key(s)).unwrap();

    // Each kind, from many sources: none is dropped, each answered by a live worker.
    let kinds: [(&str, Vec<u8>); 7] = [
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
    assert_eq!(report.long_header, 2 * sources, "{report:?}");
    assert_eq!(report.unknown_version, sources, "{report:?}");
}
