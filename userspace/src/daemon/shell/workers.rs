//! The shell's syscalls on workers and groups: spawning, watching and reaping workers,
//! signalling them, changing a group, reading how busy retiring workers are.
use std::{
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd},
};

use tokio::io::{Interest, unix::AsyncFd};
use tracing::{error, warn};

use super::{Input, Process, Shell};
use crate::{
    daemon::{DaemonError, Launch},
    group::Holder,
    process::{self, Activation, Exit, QuicLbEnv},
    sockdiag::SockDiag,
    socket::{self, Proto, SocketError},
    supervisor::{self, Activity, ServiceId, Signal, Spawn, TableOp},
    table::Slot,
};

impl Shell {
    pub(super) fn name(&self, service: ServiceId) -> String {
        self.supervisor
            .spec(service)
            .map_or_else(|| format!("#{service}"), |(spec, _)| spec.name.clone())
    }

    /// Binds a socket for `slot`, starts a worker on it, hands the socket to the group
    /// (into the table, or staged), closes the daemon's copy and watches the worker.
    pub(super) fn spawn(&mut self, spawn: &Spawn<Launch>) -> Result<u32, DaemonError> {
        let Spawn {
            service,
            slot,
            ref spec,
            ref launch,
            generation,
            restarts,
            staged,
        } = *spawn;
        let Some(group) = self.groups[service].as_mut() else {
            return Err(DaemonError::Removed {
                service: spec.name.clone(),
            });
        };
        // Workers encrypting connection IDs get the service's key, made on first use,
        // before any socket joins the group.
        let quic_key = match spec.quic {
            Some(quic) if quic.encrypted => Some(group.quic_key()?),
            _ => None,
        };
        let socket_error = |source| DaemonError::Socket {
            service: spec.name.clone(),
            source,
        };
        // One socket per listener, in config order; each goes in this slot of its
        // listener's socket array, and to the worker as fd 3, 4, ...
        let sockets = spec
            .listeners
            .iter()
            .map(|l| socket::reuseport_socket(l.proto, l.addr).map_err(socket_error))
            .collect::<Result<Vec<_>, _>>()?;
        // The slot records the first socket's cookie before it joins the group, so whoever
        // lists the sockets on the address (the foreign-socket check, `status`) finds it
        // recorded.
        let cookies = sockets
            .iter()
            .zip(&spec.listeners)
            .map(|(socket, listener)| {
                socket::cookie(socket.as_fd()).map_err(|source| {
                    socket_error(SocketError {
                        action: "reading SO_COOKIE of",
                        proto: listener.proto,
                        addr: listener.addr,
                        source,
                    })
                })
            })
            .collect::<Result<Vec<u64>, _>>()?;
        let mut meta = group.dataplane().meta(slot)?;
        meta.cookie = cookies[0];
        group.set_meta(slot, meta)?;
        if spec.listeners.len() > 1 {
            group.set_cookies(slot, &cookies)?;
        }
        for (socket, listener) in sockets.iter().zip(&spec.listeners) {
            socket::join(socket, listener.proto, listener.addr).map_err(socket_error)?;
        }
        let fds: Vec<_> = sockets.iter().map(|socket| socket.as_fd()).collect();
        let names: Vec<String> = spec
            .listeners
            .iter()
            .map(|l| l.fd_name(&spec.name, spec.listeners.len()))
            .collect();
        let spawned = process::spawn(
            &launch.program,
            &spec.command,
            &fds,
            &Activation {
                names: &names,
                slot,
                quic_lb: spec.quic.map(|quic| QuicLbEnv {
                    config_id: quic.config_id,
                    server_id: portshard_common::quic::server_id(slot, generation),
                    nonce_len: quic.nonce_len,
                    key: quic_key,
                }),
            },
            launch.credentials.as_ref(),
        )
        .map_err(|source| DaemonError::Worker {
            service: spec.name.clone(),
            slot,
            source,
        })?;
        let holder = Holder {
            pid: spawned.pid,
            generation,
            started: process::start_time(spawned.pid).unwrap_or(0),
            restarts,
        };
        let placed = if staged {
            group.stage_all(slot, &fds, spec.weight, holder)
        } else {
            group.add_all(slot, &fds, spec.weight, holder).map(drop)
        };
        if let Err(error) = placed {
            let _ = process::signal(spawned.pidfd.as_fd(), Signal::Kill);
            return Err(error.into());
        }
        drop(fds);
        drop(sockets);
        self.track(service, slot, spawned.pid, spawned.pidfd);
        Ok(spawned.pid)
    }

    /// Keeps `pidfd` for worker `pid` of `slot` and sends [`Input::Exited`] when it ends.
    pub(super) fn track(&mut self, service: ServiceId, slot: Slot, pid: u32, pidfd: OwnedFd) {
        let events = self.events.clone();
        match exit_watch(&pidfd) {
            Ok(fd) => {
                tokio::spawn(async move {
                    let _ = fd.readable().await;
                    let _ = events.send(Input::Exited { service, slot, pid });
                });
            }
            Err(e) => {
                error!(pid, error = %e, "cannot watch worker; treating it as dead");
                let _ = events.send(Input::Exited { service, slot, pid });
            }
        }
        self.processes
            .insert((service, slot), Process { pid, pidfd });
    }

    /// A worker's pidfd became readable: reap it and tell the supervisor how it ended.
    pub(super) fn exited(&mut self, service: ServiceId, slot: Slot, pid: u32) {
        let Some(process) = self.process(service, slot, pid) else {
            return;
        };
        let exit = process::reap(process.pidfd.as_fd())
            .ok()
            .flatten()
            .unwrap_or(Exit::Unknown);
        self.processes.remove(&(service, slot));
        self.feed(supervisor::Event::Exited {
            service,
            slot,
            pid,
            exit,
        });
    }

    /// A reload's new worker may have ended while its exit event is still on its way:
    /// report such exits before the reload's readiness timer.
    pub(super) fn notice_staged_exits(&mut self, service: ServiceId) {
        for (slot, pid) in self.supervisor.staged(service) {
            let ended = self
                .process(service, slot, pid)
                .is_some_and(|p| process::has_exited(p.pidfd.as_fd()));
            if ended {
                self.exited(service, slot, pid);
            }
        }
    }

    /// Worker `pid` of `slot`, if it is the one the shell knows there.
    fn process(&self, service: ServiceId, slot: Slot, pid: u32) -> Option<&Process> {
        self.processes
            .get(&(service, slot))
            .filter(|p| p.pid == pid)
    }

    pub(super) fn signal(&self, service: ServiceId, slot: Slot, pid: u32, signal: Signal) {
        let Some(process) = self.process(service, slot, pid) else {
            return;
        };
        if let Err(error) = process::signal(process.pidfd.as_fd(), signal) {
            warn!(service = %self.name(service), slot, pid, ?signal, %error, "cannot signal the worker");
        }
    }

    /// Makes a change to a group: entries moved, or the group's error.
    pub(super) fn change(&mut self, service: ServiceId, op: &TableOp) -> Result<u32, String> {
        let Some(group) = self.groups[service].as_mut() else {
            return Err(format!("service {} was removed", self.name(service)));
        };
        let moved = match op {
            TableOp::Remove(slot) => group.remove(*slot).map(|d| d.moved),
            TableOp::Release(slot) => group.release(*slot).map(|()| 0),
            TableOp::Drain(slot) => group.drain(*slot).map(|d| d.moved),
            TableOp::Admit { slot, weight } => group.admit(*slot, *weight).map(|d| d.moved),
            TableOp::SetWeights(weights) => group.set_weights(weights).map(|d| d.moved),
            TableOp::Settle => group.settle().map(|d| d.moved),
            TableOp::Switch { old, new, weight } => {
                group.switch(old, new, *weight).map(|d| d.moved)
            }
            TableOp::SetSwitches(switches) => {
                group.dataplane().set_switches(*switches);
                Ok(0)
            }
            TableOp::SetHealth { slot, health } => group.set_health(*slot, *health).map(|()| 0),
        };
        moved.map_err(|error| error.to_string())
    }

    /// How busy each retiring worker is: datagrams delivered to its slot (UDP) or its
    /// established connections (TCP). Each service's counters, and each port's established
    /// connections (one sock_diag dump), are read once per tick, whatever the number of
    /// retiring workers.
    pub(super) fn activity(&self) -> Vec<(ServiceId, Slot, Activity)> {
        let retiring = self.supervisor.retiring();
        let mut counters = HashMap::new();
        let mut established = HashMap::new();
        retiring
            .into_iter()
            .map(|(service, slot, pid)| {
                let Some((spec, _)) = self.supervisor.spec(service) else {
                    return (service, slot, Activity::Unknown);
                };
                // Every listener's selections count in the slot's row; a TCP listener's
                // connections are counted on its port.
                let udp = spec.listeners.iter().any(|l| l.proto == Proto::Udp);
                let mut tcp_ports: Vec<u16> = spec
                    .listeners
                    .iter()
                    .filter(|l| l.proto == Proto::Tcp)
                    .map(|l| l.addr.port())
                    .collect();
                tcp_ports.sort_unstable();
                tcp_ports.dedup();
                let delivered = udp.then(|| {
                    counters
                        .entry(service)
                        .or_insert_with(|| {
                            let dataplane = self.groups[service].as_ref()?.dataplane();
                            let quic = match spec.quic {
                                Some(_) => Some(dataplane.quic_counters().ok()?),
                                None => None,
                            };
                            Some((dataplane.counters().ok()?, quic))
                        })
                        .as_ref()
                        .and_then(|(c, quic)| {
                            let c = c.slots.get(usize::from(slot))?;
                            // QUIC packets delivered by connection ID are a connection's
                            // traffic as much as the flow table's hits are.
                            let by_id = quic.as_ref().map_or(0, |q| {
                                q.slots
                                    .get(usize::from(slot))
                                    .map_or(0, |row| row.by_connection_id)
                            });
                            Some(
                                c.selected
                                    + c.failed_over
                                    + c.probed
                                    + c.migrated
                                    + c.flow_hits
                                    + by_id,
                            )
                        })
                });
                let connections = (!tcp_ports.is_empty()).then(|| {
                    tcp_ports.iter().try_fold(0, |sum, &port| {
                        established
                            .entry(port)
                            .or_insert_with(|| {
                                SockDiag::open()
                                    .and_then(|mut diag| diag.established_inodes(port))
                                    .ok()
                            })
                            .as_ref()
                            .and_then(|inodes| process::established_connections(pid, inodes).ok())
                            .map(|open| sum + open)
                    })
                });
                let activity = match (delivered, connections) {
                    (Some(Some(delivered)), None) => Activity::Delivered(delivered),
                    (None, Some(Some(connections))) => Activity::Connections(connections),
                    (Some(Some(delivered)), Some(Some(connections))) => Activity::Both {
                        delivered,
                        connections,
                    },
                    _ => Activity::Unknown,
                };
                (service, slot, activity)
            })
            .collect()
    }
}

/// Registers a copy of `pidfd` with the reactor, so its worker's exit can be awaited: a
/// pidfd becomes readable when its process ends.
fn exit_watch(pidfd: &OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = pidfd.try_clone()?;
    // SAFETY: `fd` is an `OwnedFd`, so it stays open and refers to the same pidfd until the
    // `AsyncFd` drops it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
