//! The shell's watch over its services' addresses, so each reuseport group stays
//! portshard's alone: a service is not created where anything else already listens, and a
//! foreign socket that shows up later is reported (in `status`, in the metrics, and once in
//! the log) within [`CHECK_EVERY`].
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use tracing::{info, warn};

use super::Shell;
use crate::{
    config::{DEFAULT_PROBE_INTERVAL, Service},
    daemon::{DaemonError, pins},
    dataplane::{PinnedRecords, SlotRecords},
    owners,
    ownership::Sightings,
    process,
    sockdiag::SockDiag,
};

/// How often every service's address is checked: the health probes' default interval, so a
/// foreign socket is reported within one probe interval. Each check is one sock_diag dump
/// per address family and service; the slot records are read only when a socket shows up
/// that they did not name before, and `/proc` only for a new foreign socket.
pub(in crate::daemon) const CHECK_EVERY: Duration = DEFAULT_PROBE_INTERVAL;

/// What the checks need and saw.
#[derive(Default)]
pub(super) struct Watch {
    /// The sock_diag socket, opened at the first check (again after it failed).
    diag: Option<SockDiag>,
    /// The foreign sockets on each service's address at its latest check.
    pub(super) sightings: Sightings,
    /// The cookies recorded for each service's slots, as last read.
    known: BTreeMap<String, BTreeSet<u64>>,
    /// The services whose last check failed, so a failure is logged once.
    failing: BTreeSet<String>,
}

impl Watch {
    /// The sock_diag socket, opened if need be.
    fn diag(&mut self) -> std::io::Result<&mut SockDiag> {
        if self.diag.is_none() {
            self.diag = Some(SockDiag::open()?);
        }
        Ok(self.diag.as_mut().expect("just opened"))
    }

    /// Forgets what was seen of `service` (removed).
    pub(super) fn forget(&mut self, service: &str) {
        self.sightings.forget(service);
        self.known.remove(service);
        self.failing.remove(service);
    }
}

impl Shell {
    /// Refuses to create `spec` (first start, or added by SIGHUP) where any socket but those
    /// recorded for its own slots (when its pins are adopted) shares its address, naming the
    /// processes that hold them. A check that cannot be made is logged and refuses nothing:
    /// the kernel's own bind rules still apply.
    pub(super) fn refuse_shared(&mut self, spec: &Service) -> Result<(), DaemonError> {
        // The pins may be in an older layout still: only the slot records are read.
        let records = if pins::is_pinned(&self.root, spec) {
            Some(PinnedRecords::open(&self.root, &spec.name)?)
        } else {
            None
        };
        // Every listener's address, each its own reuseport group.
        let mut checked = Ok(None);
        for listener in &spec.listeners {
            checked = self
                .watch
                .diag()
                .map_err(|source| owners::OwnersError::Listing {
                    proto: listener.proto,
                    listen: listener.addr,
                    source,
                })
                .and_then(|diag| {
                    owners::in_use(
                        diag,
                        &spec.name,
                        listener.proto,
                        listener.addr,
                        records.as_ref().map(|r| r as &dyn SlotRecords),
                    )
                });
            if !matches!(checked, Ok(None)) {
                break;
            }
        }
        match checked {
            Ok(None) => Ok(()),
            Ok(Some(in_use)) => Err(in_use.into()),
            Err(error) => {
                self.watch.diag = None;
                warn!(service = %spec.name, %error, "cannot check whether anything else listens on the service's address; creating it anyway");
                Ok(())
            }
        }
    }

    /// Checks every service's address for foreign sockets: a new one is logged once as a
    /// warning (with the processes holding it), one that went away once as information.
    pub(super) fn check_owners(&mut self) {
        for (service, group) in self.groups.iter().enumerate() {
            let (Some(group), Some((spec, _))) = (group, self.supervisor.spec(service)) else {
                continue;
            };
            let name = &spec.name;
            let mut known = self.watch.known.remove(name).unwrap_or_default();
            // Every listener's address, each its own reuseport group.
            let mut checked: Result<Vec<_>, owners::OwnersError> = Ok(Vec::new());
            for listener in &spec.listeners {
                let found = match self.watch.diag() {
                    Ok(diag) => owners::foreign(
                        diag,
                        listener.proto,
                        listener.addr,
                        Some(group.dataplane() as &dyn SlotRecords),
                        &mut known,
                    ),
                    Err(source) => Err(owners::OwnersError::Listing {
                        proto: listener.proto,
                        listen: listener.addr,
                        source,
                    }),
                };
                checked = checked.and_then(|mut all: Vec<_>| {
                    all.extend(found?);
                    Ok(all)
                });
            }
            self.watch.known.insert(name.clone(), known);
            let found = match checked {
                Ok(found) => found,
                Err(error) => {
                    self.watch.diag = None;
                    if self.watch.failing.insert(name.clone()) {
                        warn!(service = %name, %error, "cannot check the service's address for foreign sockets; trying again every {CHECK_EVERY:?}");
                    }
                    continue;
                }
            };
            if self.watch.failing.remove(name) {
                info!(service = %name, "the service's address can be checked for foreign sockets again");
            }
            let change = self.watch.sightings.update(name, &found, |inodes| {
                process::socket_holders(inodes).unwrap_or_else(|error| {
                    warn!(service = %name, %error, "cannot find the processes holding the foreign sockets");
                    BTreeMap::new()
                })
            });
            for socket in change.new {
                warn!(
                    service = %name,
                    listen = %spec.listen,
                    proto = %spec.proto,
                    address = %socket.address,
                    cookie = socket.cookie,
                    pids = ?socket.pids,
                    uid = socket.uid,
                    "a foreign socket shares the service's address: another process listens there and takes flows meant for the service; stop it (pids as listed) or move it to another address"
                );
            }
            for socket in change.gone {
                info!(service = %name, address = %socket.address, cookie = socket.cookie, pids = ?socket.pids, "the foreign socket on the service's address is gone");
            }
        }
    }
}
