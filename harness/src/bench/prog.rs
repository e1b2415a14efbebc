//! What one run of the program costs, from the kernel's own BPF run-time statistics
//! (`BPF_ENABLE_STATS`, held only while measuring), each path hot and cold: portshard's
//! select path (owner live), the same with health probes on, its heir path (owner closed),
//! its flow table's paths (a known flow's datagram; a new flow's first datagram under a
//! flood, when it displaces an admission record; a second datagram admitting its flow; the
//! same when the table is full and it is not kept), and, in the same rounds, two reference
//! programs built by the project's toolchain (`ebpf/src/reference.rs`): one that only
//! returns `SK_PASS` and one that does one array lookup and one `select_reuseport`, that
//! one also over an array of the table's size (`prog_ratio_table_size`: what the table's
//! size alone costs, cold).
//!
//! Hot, a path runs over 64 flows, so its table entries and flow records stay in the
//! CPU's cache; cold, over at least [`COLD_FLOWS`] distinct 4-tuples per round (a flood
//! from as many source addresses), so the 256 KiB table and the flow records come from
//! memory as they do on a busy server, while the reference's 256-byte array stays cached.
//! A new flow's paths are cold by nature: every run is another flow.
use std::{
    cell::Cell,
    net::SocketAddrV4,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::sys::{Stats, enable_stats};
use portshard::{
    dataplane::Dataplane, group::Group, socket::Proto, supervisor::Switches, table::Slot,
};
use portshard_common::{ADMIT_SIZE, TABLE_PROBES, TABLE_SIZE, names, reference as refs};

use super::{
    BenchError, Budget, Result,
    overhead::{self, ephemeral, senders},
    report::Figure,
};
use crate::{
    context,
    flood::Flood,
    flows::{self, Listener},
};

mod quic;
mod reference;
mod setup;
mod subject;
mod summary;

use quic::quic_subject;
use setup::{orphan_flows, orphan_sources, prime};
use subject::{Load, Stat, Subject};
use summary::{Measured, summarize};

/// Listeners of each measured group.
const LISTENERS: usize = 8;
/// Flows (connected sockets) each hot subject's datagrams are spread over.
const FLOWS: usize = 64;
/// Distinct flows each cold subject's rounds cycle over: one per table entry.
pub const COLD_FLOWS: usize = TABLE_SIZE;
/// Listeners of the cold heir group: with two, half the flood's flows are the closed one's.
const HEIR_COLD_LISTENERS: usize = 2;
/// The most portshard's select path may cost over the one-lookup reference, cold.
pub const MAX_RATIO: f64 = 1.10;
/// The same, hot (the table entry in cache): the target before cold figures existed.
pub const MAX_RATIO_HOT: f64 = 1.25;

const PROBES_PORT: u16 = 5309;
const PASS_PORT: u16 = 5310;
const LOOKUP_PORT: u16 = 5311;
const SELECT_PORT: u16 = 5312;
const HEIR_PORT: u16 = 5313;
const FLOW_PORT: u16 = 5314;
const FLOW_NEW_PORT: u16 = 5315;
const FLOW_ADMIT_PORT: u16 = 5316;
const FLOW_FULL_PORT: u16 = 5317;
const HEIR_COLD_PORT: u16 = 5318;
const TABLE_PORT: u16 = 5319;
const QUIC_PORT: u16 = 5329;
const QUIC_AES_PORT: u16 = 5328;

/// The flow table of the full-table subject: filled before measuring.
const FULL_TABLE: u32 = 1024;
/// The flow table of the cold flow-table subject: room for every cold flow.
const COLD_TABLE: u32 = 2 * COLD_FLOWS as u32;
/// Where each flood subject's flows start among the flood's sources: far enough apart
/// that no two subjects share a flow (the cold cycles, each to its own port, share theirs).
const FLOOD_RANGES: [u32; 3] = [0, 4 << 20, 8 << 20];
/// The first flood flow of the cold cycles (and of the search for the heir's).
const FIRST_COLD_FLOW: u32 = 12 << 20;

/// A portshard group on `port` over `listeners` listeners (with the flow table if
/// `flow_capacity` is not 0) and the path of its pinned program.
fn portshard_group(
    pins: &Path,
    service: &str,
    port: u16,
    listeners: usize,
    flow_capacity: u32,
) -> Result<(Vec<Option<Listener>>, Group, PathBuf)> {
    let target = flows::loopback(false, port);
    let (listeners, group) =
        overhead::group(pins, service, Proto::Udp, target, listeners, flow_capacity)?;
    let program = group.dataplane().dir().join(names::PROGRAM);
    Ok((listeners, group, program))
}

/// A flood towards `port` on 127.0.0.1.
fn flood(port: u16) -> Result<Flood> {
    flood_with(port, b"flood")
}

/// A flood towards `port` on 127.0.0.1 whose datagrams carry `payload`.
fn flood_with(port: u16, payload: &[u8]) -> Result<Flood> {
    Ok(Flood::with_payload(
        SocketAddrV4::new([127, 0, 0, 1].into(), port),
        payload.to_vec(),
    )
    .map_err(|e| context(e, format!("opening a raw socket to flood port {port}")))?)
}

/// The cold flows every cold cycle but the heir's goes over.
fn cold_flows() -> std::ops::Range<u32> {
    FIRST_COLD_FLOW..FIRST_COLD_FLOW + COLD_FLOWS as u32
}

/// Hot connected flows to `port`, each datagram carrying `payload`.
fn hot_with(port: u16, payload: &[u8]) -> Result<Load> {
    Ok(Load::Sockets {
        senders: senders(flows::loopback(false, port), ephemeral(FLOWS))?,
        payload: payload.to_vec(),
    })
}

/// Hot connected flows to `port`.
fn hot(port: u16) -> Result<Load> {
    hot_with(port, b"run")
}

/// A cold cycle of [`cold_flows`] towards `port`.
fn cold(port: u16) -> Result<Load> {
    Ok(Load::cycle(flood(port)?, cold_flows().collect()))
}

/// `prog_ns_*` (mean ns per run, median of rounds, for each path hot and cold) and the
/// ratios of portshard's paths over the one-lookup reference, round by round:
/// `prog_ratio` (select path, cold; the target), `prog_ratio_hot`, and, cold,
/// `prog_ratio_{probes,heir,flow_table,table_size}` and `prog_ratio_vs_table_size` (the
/// select path over the reference that reads an array of the table's size).
pub fn figures(pins: &Path, object: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let mut ebpf = reference::load(object)?;
    let pass_listeners =
        flows::bind_listeners(Proto::Udp, flows::loopback(false, PASS_PORT), LISTENERS)?;
    let lookup_listeners =
        flows::bind_listeners(Proto::Udp, flows::loopback(false, LOOKUP_PORT), LISTENERS)?;
    let table_listeners =
        flows::bind_listeners(Proto::Udp, flows::loopback(false, TABLE_PORT), LISTENERS)?;
    reference::fill_maps(
        &mut ebpf,
        (refs::SOCKETS, refs::SLOT_OF, refs::SLOTS),
        &lookup_listeners,
    )?;
    reference::fill_maps(
        &mut ebpf,
        (refs::TABLE_SOCKETS, refs::TABLE_SLOT_OF, TABLE_SIZE as u32),
        &table_listeners,
    )?;
    for (name, listeners) in [
        (refs::PASS, &pass_listeners),
        (refs::SELECT, &lookup_listeners),
        (refs::SELECT_TABLE, &table_listeners),
    ] {
        let member = listeners[0].as_ref().expect("all open").as_fd();
        reference::program(&ebpf, name)?
            .attach(member)
            .map_err(BenchError::bpf(format!(
                "attaching {name} to the group of fd {member:?}"
            )))?;
    }
    let services = [
        "prog-select",
        "prog-probes",
        "prog-heir",
        "prog-heir-cold",
        "prog-flow",
        "prog-flow-new",
        "prog-flow-admit",
        "prog-flow-full",
        "prog-quic",
        "prog-quic-aes",
    ];
    let (select_listeners, select_group, select_program) =
        portshard_group(pins, services[0], SELECT_PORT, LISTENERS, 0)?;
    // Probes on, one per slot, from sources the measured datagrams never use: each
    // datagram pays the look-up of its source port among the probes'.
    let (probes_listeners, mut probes_group, probes_program) =
        portshard_group(pins, services[1], PROBES_PORT, LISTENERS, 0)?;
    probes_group.dataplane().set_switches(Switches {
        flags: TABLE_PROBES,
        flow_idle_s: 0,
    });
    for slot in 0..LISTENERS as Slot {
        probes_group.set_probe(flows::loopback(false, 40_000 + slot), slot)?;
    }
    let (mut heir_listeners, heir_group, heir_program) =
        portshard_group(pins, services[2], HEIR_PORT, LISTENERS, 0)?;
    let orphans = orphan_sources(&mut heir_listeners, HEIR_PORT)?;
    let (mut heir_cold_listeners, heir_cold_group, heir_cold_program) =
        portshard_group(pins, services[3], HEIR_COLD_PORT, HEIR_COLD_LISTENERS, 0)?;
    let heir_flood = flood(HEIR_COLD_PORT)?;
    let cold_orphans = orphan_flows(&heir_flood, &mut heir_cold_listeners)?;
    // Known flows: after each flow's second datagram (which admits it), every run takes
    // the flow-table path; the cold flows are admitted the same way before measuring.
    let (flow_listeners, flow_group, flow_program) =
        portshard_group(pins, services[4], FLOW_PORT, LISTENERS, COLD_TABLE)?;
    prime(&flood(FLOW_PORT)?, cold_flows(), 2, &flow_listeners)?;
    // The flow table's other paths, driven by floods of new flows.
    let (new_listeners, new_group, new_program) = portshard_group(
        pins,
        services[5],
        FLOW_NEW_PORT,
        LISTENERS,
        overhead::FLOW_TABLE,
    )?;
    let (admit_listeners, admit_group, admit_program) =
        portshard_group(pins, services[6], FLOW_ADMIT_PORT, LISTENERS, 1 << 21)?;
    let (full_listeners, full_group, full_program) =
        portshard_group(pins, services[7], FLOW_FULL_PORT, LISTENERS, FULL_TABLE)?;
    // Every admission record taken by a recent flow: each new flow then displaces one, as
    // under a flood. And a full flow table: every admission is refused.
    let new_flood = flood(FLOW_NEW_PORT)?;
    prime(
        &new_flood,
        FLOOD_RANGES[0]..FLOOD_RANGES[0] + ADMIT_SIZE * 2,
        1,
        &new_listeners,
    )?;
    let full_flood = flood(FLOW_FULL_PORT)?;
    prime(
        &full_flood,
        FLOOD_RANGES[2]..FLOOD_RANGES[2] + FULL_TABLE * 2,
        2,
        &full_listeners,
    )?;

    // QUIC-LB on: every datagram is a short-header packet naming one live slot, in the
    // clear or encrypted.
    let plain = quic_subject(pins, services[8], QUIC_PORT, false)?;
    let encrypted = quic_subject(pins, services[9], QUIC_AES_PORT, true)?;

    let pass_stat = || reference::program(&ebpf, refs::PASS).map(Stat::Loaded);
    let lookup_stat = || reference::program(&ebpf, refs::SELECT).map(Stat::Loaded);
    let table_stat = || reference::program(&ebpf, refs::SELECT_TABLE).map(Stat::Loaded);
    let subject = |name, listeners, load, stat| Subject {
        name,
        listeners,
        load,
        stat,
    };
    let cold_runs = budget.prog_runs.max(COLD_FLOWS);
    let subjects = [
        (
            subject("ref_pass", &pass_listeners, hot(PASS_PORT)?, pass_stat()?),
            budget.prog_runs,
        ),
        (
            subject(
                "ref_select",
                &lookup_listeners,
                hot(LOOKUP_PORT)?,
                lookup_stat()?,
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "select",
                &select_listeners,
                hot(SELECT_PORT)?,
                Stat::Pinned(select_program.clone()),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "select_probes",
                &probes_listeners,
                hot(PROBES_PORT)?,
                Stat::Pinned(probes_program.clone()),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "heir",
                &heir_listeners,
                Load::Sockets {
                    senders: senders(flows::loopback(false, HEIR_PORT), orphans)?,
                    payload: b"run".to_vec(),
                },
                Stat::Pinned(heir_program),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "flow_table",
                &flow_listeners,
                hot(FLOW_PORT)?,
                Stat::Pinned(flow_program.clone()),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "quic",
                &plain.listeners,
                hot_with(QUIC_PORT, &plain.packet)?,
                Stat::Pinned(plain.program.clone()),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "quic_aes",
                &encrypted.listeners,
                hot_with(QUIC_AES_PORT, &encrypted.packet)?,
                Stat::Pinned(encrypted.program.clone()),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "ref_pass_cold",
                &pass_listeners,
                cold(PASS_PORT)?,
                pass_stat()?,
            ),
            cold_runs,
        ),
        (
            subject(
                "ref_select_cold",
                &lookup_listeners,
                cold(LOOKUP_PORT)?,
                lookup_stat()?,
            ),
            cold_runs,
        ),
        (
            subject(
                "ref_select_table_cold",
                &table_listeners,
                cold(TABLE_PORT)?,
                table_stat()?,
            ),
            cold_runs,
        ),
        (
            subject(
                "select_cold",
                &select_listeners,
                cold(SELECT_PORT)?,
                Stat::Pinned(select_program),
            ),
            cold_runs,
        ),
        (
            subject(
                "select_probes_cold",
                &probes_listeners,
                cold(PROBES_PORT)?,
                Stat::Pinned(probes_program),
            ),
            cold_runs,
        ),
        (
            subject(
                "heir_cold",
                &heir_cold_listeners,
                Load::cycle(heir_flood, cold_orphans),
                Stat::Pinned(heir_cold_program),
            ),
            cold_runs,
        ),
        (
            subject(
                "flow_table_cold",
                &flow_listeners,
                cold(FLOW_PORT)?,
                Stat::Pinned(flow_program),
            ),
            cold_runs,
        ),
        (
            subject(
                "quic_cold",
                &plain.listeners,
                Load::cycle(
                    flood_with(QUIC_PORT, &plain.packet)?,
                    cold_flows().collect(),
                ),
                Stat::Pinned(plain.program.clone()),
            ),
            cold_runs,
        ),
        (
            subject(
                "quic_aes_cold",
                &encrypted.listeners,
                Load::cycle(
                    flood_with(QUIC_AES_PORT, &encrypted.packet)?,
                    cold_flows().collect(),
                ),
                Stat::Pinned(encrypted.program.clone()),
            ),
            cold_runs,
        ),
        (
            subject(
                "flow_new",
                &new_listeners,
                Load::NewFlows {
                    flood: new_flood,
                    next: Cell::new(FLOOD_RANGES[0] + ADMIT_SIZE * 2),
                },
                Stat::Pinned(new_program),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "flow_admit",
                &admit_listeners,
                Load::SecondDatagrams {
                    flood: flood(FLOW_ADMIT_PORT)?,
                    next: Cell::new(FLOOD_RANGES[1]),
                },
                Stat::Pinned(admit_program),
            ),
            budget.prog_runs,
        ),
        (
            subject(
                "flow_full",
                &full_listeners,
                Load::SecondDatagrams {
                    flood: full_flood,
                    next: Cell::new(FLOOD_RANGES[2] + FULL_TABLE * 2),
                },
                Stat::Pinned(full_program),
            ),
            budget.prog_runs,
        ),
    ];

    let stats = enable_stats(Stats::RunTime).map_err(|source| BenchError::Bpf {
        what: "enabling BPF run-time statistics (BPF_ENABLE_STATS)".into(),
        source: Box::new(source),
    })?;
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    for _ in 0..budget.prog_rounds {
        for ((subject, runs), values) in subjects.iter().zip(&mut ns) {
            values.push(subject.measure(*runs)?);
        }
    }
    drop(stats);
    let measured: Vec<Measured> = subjects
        .iter()
        .zip(ns)
        .map(|((subject, runs), ns)| Measured {
            name: subject.name,
            runs: *runs,
            flows: subject.load.flows(*runs),
            cold: subject.load.is_cold(),
            ns,
        })
        .collect();
    drop(subjects);
    plain.check_steered(services[8])?;
    encrypted.check_steered(services[9])?;
    drop((
        select_group,
        probes_group,
        heir_group,
        heir_cold_group,
        flow_group,
    ));
    drop((new_group, admit_group, full_group, plain, encrypted));
    for service in services {
        Dataplane::remove_pins(pins, service)?;
    }
    summarize(&measured)
}
