//! A service's group at start or SIGHUP: created, or adopted from the pins a previous
//! daemon left, read into the [`Adoption`] the supervisor decides on. Only the reading
//! happens here; what to keep, heal or stop is the supervisor's.
use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use portshard_common::{MAX_SLOTS, PIN_LAYOUT, SlotMeta, SlotState, names};
use tracing::{debug, info, warn};

use super::DaemonError;
use crate::{
    config::{Mode, Service},
    dataplane::{Dataplane, LoadedProgram, PinnedRecords, format_tag},
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
        group.record_listeners(&listener_records(spec))?;
        (group, Adoption::default(), Vec::new())
    };
    // Probe ports of a previous daemon are closed now, free for anyone to use.
    group.clear_probes()?;
    group
        .dataplane()
        .set_switches(Supervisor::<()>::table_switches(spec));
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

/// The pinned records of `spec`'s listeners: none for a service with one listener (its
/// one is the service record), so its pins read as those of layouts before 4.
fn listener_records(spec: &Service) -> Vec<portshard_common::ServiceMeta> {
    if spec.listeners.len() == 1 {
        return Vec::new();
    }
    spec.listeners
        .iter()
        .map(|l| report::service_meta(l.addr, report::proto_number(l.proto), 0, 0))
        .collect()
}

/// Checks, changing nothing, that the pins of `spec` (if any) can be adopted by this build:
/// a layout it knows, every pin as it expects, and the service the config describes.
/// Returns the layout the pins are in, `None` if there are none.
pub(super) fn check(root: &Path, spec: &Service) -> Result<Option<u32>, DaemonError> {
    if !is_pinned(root, spec) {
        return Ok(None);
    }
    let layout = Dataplane::check_adoptable(root, &spec.name)?;
    // Pins still in an older layout cannot be opened whole: the records alone are read.
    let records = PinnedRecords::open(root, &spec.name)?;
    same_service(&records, spec)?;
    if layout == PIN_LAYOUT {
        same_listeners(&Dataplane::open(root, &spec.name)?, spec)?;
    } else if spec.listeners.len() > 1 {
        // Older layouts had one listener.
        same_listeners_as(records.dir(), &[], spec)?;
    }
    Ok(Some(layout))
}

/// Refuses pins that record another service than `spec` describes.
fn same_service(records: &PinnedRecords, spec: &Service) -> Result<(), DaemonError> {
    let pinned = records.service()?;
    let configured = service_record(spec);
    if pinned == configured {
        return Ok(());
    }
    Err(DaemonError::Changed {
        service: spec.name.clone(),
        dir: records.dir().to_path_buf(),
        pinned: describe(&pinned),
        configured: describe(&configured),
    })
}

/// Refuses pins whose listeners differ from those `spec` describes.
fn same_listeners(dataplane: &Dataplane, spec: &Service) -> Result<(), DaemonError> {
    same_listeners_as(dataplane.dir(), &dataplane.listener_records()?, spec)
}

/// Refuses `pinned` listener records (of the pins in `dir`) that differ from `spec`'s.
fn same_listeners_as(
    dir: &Path,
    pinned: &[portshard_common::ServiceMeta],
    spec: &Service,
) -> Result<(), DaemonError> {
    let configured = listener_records(spec);
    if pinned == configured.as_slice() {
        return Ok(());
    }
    let describe = |records: &[portshard_common::ServiceMeta]| {
        if records.is_empty() {
            return "one listener".to_owned();
        }
        let listeners: Vec<String> = records
            .iter()
            .filter_map(report::listener_of)
            .map(|l| l.to_string())
            .collect();
        format!("listeners {}", listeners.join(", "))
    };
    Err(DaemonError::Changed {
        service: spec.name.clone(),
        dir: dir.to_path_buf(),
        pinned: describe(pinned),
        configured: describe(&configured),
    })
}

/// Reads the pinned state of `spec`: its layout is migrated if older, this build's program
/// put in place if it differs, the table taken over as it is (rebuilt only if
/// inconsistent), each slot's record read, and a pidfd opened on every worker still
/// running (same pid and start time).
fn adopt(root: &Path, spec: &Service) -> Result<(Group, Adoption, Vec<Alive>), DaemonError> {
    same_service(&PinnedRecords::open(root, &spec.name)?, spec)?;
    let (dataplane, adopted) = Dataplane::adopt(root, &spec.name)?;
    same_listeners(&dataplane, spec)?;
    if let Some(from) = adopted.migrated_from {
        info!(service = %spec.name, from, to = PIN_LAYOUT, "migrated the pins to this build's layout in place; no slot or table entry changed, but the flow table of layouts before 3 (keyed by the flow hash alone) cannot be carried over: its UDP flows are steered by the table again, once each");
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
    let members: Vec<(Slot, u32)> = metas
        .iter()
        .enumerate()
        .filter(|&(slot, meta)| owns[slot] || meta.state == SlotState::Live as u32)
        .map(|(slot, meta)| (slot as Slot, meta.weight.max(1)))
        .collect();
    let (mut group, rebuilt) = Group::adopt(dataplane, &members)?;
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
    match adopted.replacement {
        Some(program) => put_in_place(
            &mut group,
            spec,
            program,
            adopted.pinned_tag,
            &metas,
            &alive,
        )?,
        None => reattach(&group, spec, &metas, &alive)?,
    }
    let adoption = Adoption {
        generation,
        members: group.table().members().clone(),
        slots,
    };
    Ok((group, adoption, alive))
}

/// Puts this build's `program` in place of the pinned one (tag `pinned_tag`): attached to
/// each listener's group through a running worker's listening socket (the slot's recorded
/// cookie tells the first among the worker's sockets), then pinned. With workers running
/// but none of their sockets reachable it refuses, rather than leave the old program
/// steering unnoticed.
fn put_in_place(
    group: &mut Group,
    spec: &Service,
    program: LoadedProgram,
    pinned_tag: u64,
    metas: &[SlotMeta],
    alive: &[Alive],
) -> Result<(), DaemonError> {
    let service = group.dataplane().name();
    let members = member_sockets(group.dataplane(), spec, metas, alive)?;
    let new_tag = program.tag();
    let sockets: Vec<_> = members
        .as_ref()
        .map(|(_, sockets)| sockets.iter().map(AsFd::as_fd).collect())
        .unwrap_or_default();
    group.replace_program(program, &sockets)?;
    info!(
        service = %service,
        from = %format_tag(pinned_tag),
        to = %format_tag(new_tag),
        through = ?members.as_ref().map(|(pid, _)| pid),
        "put this build's program in place of the pinned one (its tag differs, or the pins were migrated): attached to the group, then pinned; the maps, and so every flow, stay"
    );
    Ok(())
}

/// Attaches the pinned program to each listener's group again, through a running worker's
/// sockets: the groups then run the program their pins name, whatever any other process
/// attached meanwhile (attaching replaces a group's program atomically; the kernel cannot
/// be asked which one a group runs).
fn reattach(
    group: &Group,
    spec: &Service,
    metas: &[SlotMeta],
    alive: &[Alive],
) -> Result<(), DaemonError> {
    let service = group.dataplane().name();
    if let Some((pid, sockets)) = member_sockets(group.dataplane(), spec, metas, alive)? {
        for socket in &sockets {
            group.dataplane().attach(socket.as_fd())?;
        }
        debug!(service = %service, through = pid, "attached the pinned program to the group again");
    }
    Ok(())
}

/// The listening sockets of one of the running workers `alive`, one per listener of
/// `spec` in order, and its pid; `None` when none runs. Each is told among the worker's
/// sockets by the cookie recorded for it (the slot's record, `slot_cookies` in
/// `dataplane`); one recorded nowhere by its transport and address (looked for first where
/// socket activation put it). An error when workers run but no one of them has all its
/// sockets reachable.
fn member_sockets(
    dataplane: &Dataplane,
    spec: &Service,
    metas: &[SlotMeta],
    alive: &[Alive],
) -> Result<Option<(u32, Vec<OwnedFd>)>, DaemonError> {
    let service = &spec.name;
    let sockets = alive.iter().find_map(|(slot, pid, pidfd)| {
        let cookie = metas[usize::from(*slot)].cookie;
        let first = match process::socket_of(pidfd.as_fd(), *pid, cookie) {
            Ok(socket) => socket?,
            Err(error) => {
                warn!(service = %service, slot, pid, %error, "cannot reach this worker's listening socket");
                return None;
            }
        };
        let mut sockets = vec![first];
        let recorded = dataplane.cookies(*slot).unwrap_or_default().cookies;
        let listeners = spec.listeners.iter().zip(process::LISTEN_FD..).zip(recorded);
        for ((listener, fd), cookie) in listeners.skip(1) {
            let by_cookie = match cookie {
                0 => Ok(None),
                cookie => process::socket_of(pidfd.as_fd(), *pid, cookie),
            };
            let found = match by_cookie {
                Ok(Some(socket)) => Ok(Some(socket)),
                _ => process::member_socket_of(
                    pidfd.as_fd(),
                    *pid,
                    fd,
                    listener.proto,
                    listener.addr,
                ),
            };
            match found {
                Ok(Some(socket)) => sockets.push(socket),
                Ok(None) => {
                    warn!(service = %service, slot, pid, %listener, "this worker holds no socket of this listener");
                    return None;
                }
                Err(error) => {
                    warn!(service = %service, slot, pid, %listener, %error, "cannot reach this worker's listening socket");
                    return None;
                }
            }
        }
        Some((*pid, sockets))
    });
    if sockets.is_none() && !alive.is_empty() {
        return Err(DaemonError::Unreachable {
            service: service.to_owned(),
            pids: alive.iter().map(|(_, pid, _)| *pid).collect(),
        });
    }
    Ok(sockets)
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
