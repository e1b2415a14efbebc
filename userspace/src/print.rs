//! The read-only commands (`status`, `table`, `flows`): what the pins say, as text for
//! people or JSON for scripts.
use std::{io::Write as _, path::Path};

use anyhow::{Context as _, Result};
use portshard::{
    dataplane::Dataplane,
    owners,
    ownership::ForeignSocket,
    report::{PROTO_TCP, StatusReport, listen_address},
    sockdiag::SockDiag,
    socket::Proto,
};

use crate::Failure;

const STDOUT: &str = "writing to stdout";

/// Prints a service's flow table, read from its pins.
/// The pinned dataplane of `service`; an unknown one is refused with the services there
/// are.
fn open(root: &Path, service: &str) -> Result<Dataplane> {
    if !root.join(service).exists() {
        let pinned = Dataplane::pinned_services(root).unwrap_or_default();
        let there = if pinned.is_empty() {
            format!("none is pinned under {}", root.display())
        } else {
            format!("pinned under {} are {}", root.display(), pinned.join(", "))
        };
        return Err(Failure::Refused(format!(
            "no service {service:?}: {there} (`portshard status` lists them; --bpffs names another pin root)"
        ))
        .into());
    }
    Ok(Dataplane::open(root, service)?)
}

pub fn flows(root: &Path, service: &str, json: bool) -> Result<()> {
    let dataplane = open(root, service)?;
    if dataplane.service()?.flow_table == 0 {
        return Err(Failure::Refused(format!(
            "service {service} has no flow table: only UDP services in handover mode or with `sticky = true` keep one (see docs/configuration.md)"
        ))
        .into());
    }
    let report = dataplane.flow_report()?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &report).context(STDOUT)?;
        writeln!(out).context(STDOUT)?;
        return Ok(());
    }
    writeln!(
        out,
        "service {service}: {} of {} flows",
        report.flows.len(),
        report.capacity
    )
    .context(STDOUT)?;
    writeln!(
        out,
        "{:>6} {:>10} {:>8} {:>14}",
        "slot", "generation", "flows", "newest idle ms"
    )
    .context(STDOUT)?;
    for group in &report.by_slot {
        writeln!(
            out,
            "{:>6} {:>10} {:>8} {:>14}",
            group.slot, group.generation, group.flows, group.least_idle_ms
        )
        .context(STDOUT)?;
    }
    Ok(())
}

pub fn status(root: &Path, json: bool) -> Result<()> {
    let mut diag = SockDiag::open();
    let services = Dataplane::pinned_services(root)?
        .iter()
        .map(|name| {
            let dataplane = Dataplane::open(root, name)?;
            let status = dataplane.status()?;
            Ok(status.with_foreign(foreign(&mut diag, &dataplane)))
        })
        .collect::<Result<Vec<_>>>()?;
    let report = StatusReport { services };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &report).context(STDOUT)?;
        writeln!(out).context(STDOUT)?;
        return Ok(());
    }
    if report.services.is_empty() {
        writeln!(out, "no service is pinned under {}", root.display()).context(STDOUT)?;
    }
    for service in &report.services {
        // One listener: `udp 127.0.0.1:53`; several: `tcp:0.0.0.0:443 udp:0.0.0.0:443`.
        let listens = if service.listeners.len() > 1 {
            service.listeners.join(" ")
        } else {
            format!("{} {}", service.proto, service.listen)
        };
        writeln!(
            out,
            "{} {} ({}): balance {:.4}, {} runs fell through; program {}, pin layout {}",
            service.name,
            listens,
            service.mode,
            service.balance,
            service.fell_through,
            service.program_tag,
            service.pin_layout
        )
        .context(STDOUT)?;
        writeln!(
            out,
            "{:>6}  {:<8} {:>8} {:>4} {:>8} {:>8} {:>10} {:>11} {:>8}  probe",
            "slot",
            "state",
            "pid",
            "gen",
            "entries",
            "restarts",
            "selected",
            "failed_over",
            "migrated"
        )
        .context(STDOUT)?;
        for slot in &service.slots {
            writeln!(
                out,
                "{:>6}  {:<8} {:>8} {:>4} {:>8} {:>8} {:>10} {:>11} {:>8}  {}",
                slot.slot,
                slot.state,
                slot.pid,
                slot.generation,
                slot.entries,
                slot.restarts,
                slot.counters.selected,
                slot.counters.failed_over,
                slot.counters.migrated,
                match slot.probe_failures {
                    0 => slot.probe.to_owned(),
                    n => format!("{} ({n} in a row)", slot.probe),
                }
            )
            .context(STDOUT)?;
        }
        for generation in &service.generations {
            writeln!(
                out,
                "  generation {} {}: slots {:?}",
                generation.generation, generation.state, generation.slots
            )
            .context(STDOUT)?;
        }
        for socket in &service.foreign {
            let held = match socket.pids.as_slice() {
                [] => "no process in this pid namespace".to_owned(),
                [pid] => format!("pid {pid}"),
                pids => format!("pids {pids:?}"),
            };
            writeln!(
                out,
                "  FOREIGN socket on {} (cookie {}, uid {}), held by {held}: another process shares this service's address and takes flows meant for it; stop it or move it elsewhere",
                socket.address, socket.cookie, socket.uid
            )
            .context(STDOUT)?;
        }
        if let Some(flows) = &service.flow_table {
            writeln!(
                out,
                "  flow table: {} of {} flows; {} datagrams of known flows, {} flows admitted, {} swept idle, {} not kept (full), {} whose slot was gone; admission: {} first datagrams, {} displaced",
                flows.flows,
                flows.capacity,
                flows.hits,
                flows.new,
                flows.swept,
                flows.events.unkept,
                flows.owner_gone,
                flows.events.pending,
                flows.events.displaced
            )
            .context(STDOUT)?;
        }
        if let Some(quic) = &service.quic {
            writeln!(
                out,
                "  QUIC-LB: config {} with {}-octet connection IDs{}; {} packets delivered by connection ID, {} naming a slot that no longer served them; by the table: {} long headers ({} first flights of new connections, {} of unknown versions), {} of another config, {} naming no slot, {} malformed",
                quic.config_id,
                quic.cid_len,
                if quic.encrypted { " (encrypted)" } else { "" },
                quic.by_connection_id,
                quic.stale_server_id,
                quic.long_header,
                quic.first_flight,
                quic.unknown_version,
                quic.other_config,
                quic.unknown_server_id,
                quic.malformed
            )
            .context(STDOUT)?;
        }
    }
    Ok(())
}

/// The foreign sockets on the address of `dataplane`'s service, checked now (so `status`
/// needs no daemon); a check that cannot be made is said on stderr and shows none.
fn foreign(diag: &mut std::io::Result<SockDiag>, dataplane: &Dataplane) -> Vec<ForeignSocket> {
    let mut checked = || -> Result<Vec<ForeignSocket>> {
        let meta = dataplane.service()?;
        // Every listener's address; a service of one listener records only `service`.
        let mut listeners = dataplane.listener_records()?;
        if listeners.is_empty() {
            listeners.push(meta);
        }
        let diag = diag
            .as_mut()
            .map_err(|error| anyhow::anyhow!("opening a sock_diag socket: {error}"))?;
        let mut found = Vec::new();
        for meta in &listeners {
            let proto = if meta.proto == PROTO_TCP {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            found.extend(owners::report(
                diag,
                proto,
                listen_address(meta),
                dataplane,
            )?);
        }
        Ok(found)
    };
    checked().unwrap_or_else(|error| {
        eprintln!(
            "warning: service {}: cannot check its address for foreign sockets: {error:#}",
            dataplane.name()
        );
        Vec::new()
    })
}

pub fn table(root: &Path, service: &str, json: bool) -> Result<()> {
    let report = open(root, service)?.table_report()?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report).context(STDOUT)?;
        writeln!(out).context(STDOUT)?;
        return Ok(());
    }
    let owners = report.slots.iter().filter(|s| s.entries > 0).count();
    writeln!(
        out,
        "service {}: {owners} slots own entries, balance {:.4}, {} runs fell through to the kernel",
        report.service, report.balance, report.fell_through
    )
    .context(STDOUT)?;
    writeln!(
        out,
        "{:>4}  {:<8} {:>8} {:>6} {:>8} {:>7}  {:>10} {:>11} {:>7} {:>8}  if it dies",
        "slot",
        "state",
        "pid",
        "weight",
        "entries",
        "share",
        "selected",
        "failed_over",
        "probed",
        "migrated"
    )
    .context(STDOUT)?;
    for slot in &report.slots {
        let heirs = match (
            slot.heirs.keys().next(),
            slot.heirs.values().min(),
            slot.heirs.values().max(),
        ) {
            (Some(heir), _, _) if slot.heirs.len() == 1 => format!("its entries go to slot {heir}"),
            (_, Some(min), Some(max)) if min == max => format!(
                "its entries go to {} other slots, {min} each",
                slot.heirs.len()
            ),
            (_, Some(min), Some(max)) => format!(
                "its entries go to {} other slots, {min} to {max} each",
                slot.heirs.len()
            ),
            _ if slot.entries == 0 => "owns no entry".to_owned(),
            _ => "no other slot to take its entries".to_owned(),
        };
        let c = slot.counters;
        writeln!(
            out,
            "{:>4}  {:<8} {:>8} {:>6} {:>8} {:>6.2}%  {:>10} {:>11} {:>7} {:>8}  {heirs}",
            slot.slot,
            slot.state,
            slot.pid,
            slot.weight,
            slot.entries,
            slot.share * 100.0,
            c.selected,
            c.failed_over,
            c.probed,
            c.migrated
        )
        .context(STDOUT)?;
    }
    Ok(())
}
