//! A service's group at start or SIGHUP: created, or adopted from the pins a previous
//! daemon left, read into the [`Adoption`] the supervisor decides on. Only the reading
//! happens here; what to keep, heal or stop is the supervisor's.
use std::{os::fd::OwnedFd, path::Path};

use portshard_common::{MAX_SLOTS, SlotMeta, SlotState, names};
use tracing::warn;

use super::DaemonError;
use crate::{
    config::{Mode, Service},
    dataplane::Dataplane,
    group::Group,
    process,
    report::{self, PROTO_TCP, PROTO_UDP, listen_address},
    socket::Proto,
    supervisor::{AdoptedSlot, Adoption, Supervisor},
    table::Slot,
};

/// A worker found running at adoption: its slot, pid and a pidfd on it.
pub(super) type Alive = (Slot, u32, OwnedFd);

/// Creates the group of `spec`, or adopts it if pinned; returns it with what adoption
/// found and the workers still running.
pub(super) fn open(
    root: &Path,
    spec: &Service,
) -> Result<(Group, Adoption, Vec<Alive>), DaemonError> {
    let (mut group, adoption, alive) = if is_pinned(root, spec) {
        adopt(root, spec)?
    } else {
        let mut group = Group::create(root, &spec.name, spec.flow_capacity())?;
        group.record_service(service_record(spec))?;
        (group, Adoption::default(), Vec::new())
    };
    // Probe ports of a previous daemon are closed now, free for anyone to use.
    group.clear_probes()?;
    group
        .dataplane()
        .set_flags(Supervisor::<()>::table_flags(spec));
    Ok((group, adoption, alive))
}

/// Whether `root` holds pins of `spec` (a restarted daemon adopts them).
pub(super) fn is_pinned(root: &Path, spec: &Service) -> bool {
    root.join(&spec.name).join(names::PROGRAM).exists()
}

/// The pinned record of `spec`.
fn service_record(spec: &Service) -> portshard_common::ServiceMeta {
    let proto = match spec.proto {
        Proto::Udp => PROTO_UDP,
        Proto::Tcp => PROTO_TCP,
    };
    report::service_meta(
        spec.listen,
        proto,
        u32::from(spec.mode == Mode::Handover),
        spec.flow_capacity(),
    )
}

/// Reads the pinned state of `spec`: the table is taken over as it is (rebuilt only if
/// inconsistent), each slot's record is read, and a pidfd is opened on every worker
/// still running (same pid and start time).
fn adopt(root: &Path, spec: &Service) -> Result<(Group, Adoption, Vec<Alive>), DaemonError> {
    let dataplane = Dataplane::open(root, &spec.name)?;
    let pinned = dataplane.service()?;
    let configured = service_record(spec);
    if pinned != configured {
        return Err(DaemonError::Changed {
            service: spec.name.clone(),
            dir: dataplane.dir().to_path_buf(),
            pinned: describe(&pinned),
            configured: describe(&configured),
        });
    }
    let entries = dataplane.read_entries();
    let mut owns = vec![false; MAX_SLOTS as usize];
    entries
        .iter()
        .filter(|e| u32::from(e.owner) < MAX_SLOTS)
        .for_each(|e| owns[usize::from(e.owner)] = true);
    let metas: Vec<SlotMeta> = (0..MAX_SLOTS as Slot)
        .map(|slot| dataplane.meta(slot))
        .collect::<Result<_, _>>()?;
    drop(dataplane);
    let members: Vec<(Slot, u32)> = metas
        .iter()
        .enumerate()
        .filter(|&(slot, meta)| owns[slot] || meta.state == SlotState::Live as u32)
        .map(|(slot, meta)| (slot as Slot, meta.weight.max(1)))
        .collect();
    let (group, rebuilt) = Group::adopt(root, &spec.name, &members)?;
    if let Some(reason) = rebuilt {
        warn!(service = %spec.name, %reason, "rebuilt the table from scratch; some flows moved");
    }
    // The current generation: the newest with live slots (else with any recorded slot).
    let newest = |states: &[SlotState]| {
        metas
            .iter()
            .filter(|m| SlotState::from_raw(m.state).is_some_and(|s| states.contains(&s)))
            .map(|m| m.generation)
            .max()
    };
    let generation = newest(&[SlotState::Live])
        .or_else(|| newest(&[SlotState::Dead, SlotState::Draining]))
        .unwrap_or(1);
    let mut alive = Vec::new();
    let mut slots = Vec::new();
    for (slot, meta) in metas.iter().enumerate() {
        let slot = slot as Slot;
        let Some(state) = SlotState::from_raw(meta.state).filter(|&s| s != SlotState::Free) else {
            continue;
        };
        let recorded = matches!(
            state,
            SlotState::Live | SlotState::Draining | SlotState::Starting
        );
        let pidfd = recorded.then(|| running(meta)).flatten();
        slots.push(AdoptedSlot {
            slot,
            state,
            pid: meta.pid,
            generation: meta.generation,
            restarts: meta.restarts,
            alive: pidfd.is_some(),
        });
        if let Some(pidfd) = pidfd {
            alive.push((slot, meta.pid, pidfd));
        }
    }
    let adoption = Adoption {
        generation,
        members: group.table().members().clone(),
        slots,
    };
    Ok((group, adoption, alive))
}

/// A pidfd on the process `meta` records, if that very process (same start time) runs.
fn running(meta: &SlotMeta) -> Option<OwnedFd> {
    if meta.pid == 0 {
        return None;
    }
    let pidfd = process::pidfd_open(meta.pid).ok()?;
    (process::start_time(meta.pid).ok()? == meta.started).then_some(pidfd)
}

fn describe(meta: &portshard_common::ServiceMeta) -> String {
    let proto = if meta.proto == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    };
    let mode = if meta.mode == 1 {
        "handover"
    } else {
        "balance"
    };
    let flows = match meta.flow_table {
        0 => String::new(),
        n => format!(", flow table of {n}"),
    };
    format!("{proto} {} ({mode}{flows})", listen_address(meta))
}
