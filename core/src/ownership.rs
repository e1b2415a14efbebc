//! A service's reuseport group is portshard's alone: which sockets on a service's port share
//! its address, and which of those are not portshard's (foreign). Pure: the sockets come
//! from sock_diag and their holders from `/proc`, both read by the caller.
//!
//! What the kernel puts in one reuseport group: sockets that all set `SO_REUSEPORT`, of one
//! family with the same `IPV6_V6ONLY`, owned by the same uid, bound to the same device, the
//! same port and exactly the same local address (`inet_rcv_saddr_equal` without wildcard
//! match), from `listen()` on for TCP and from `bind()` on for UDP. A socket on the
//! wildcard address of that port (`0.0.0.0`, or `[::]`, which takes IPv4 too unless
//! IPv6-only) is in another group, and so is one on a specific address when the service
//! listens on the wildcard; but the kernel's lookup prefers the exact address's group and
//! falls back to the wildcard's, so such a socket takes the service's traffic (it listens on
//! the specific address the service's wildcard covers), or takes it over the moment the
//! service's sockets close (a wildcard behind the service's address). Either way the
//! address is shared, so both count as overlapping, like a socket in the group itself.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use serde::Serialize;

use crate::service::Proto;

/// A socket sock_diag reports on a service's port: a TCP listener, or a UDP socket in any
/// state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundSocket {
    /// The local address it is bound to.
    pub local: SocketAddr,
    /// An IPv6 socket's `IPV6_V6ONLY`, when reported (the kernel reports it for listening
    /// and unconnected sockets); `None` for IPv4 sockets and connected ones.
    pub v6only: Option<bool>,
    /// Its `SO_COOKIE`: what portshard records for its slots' sockets.
    pub cookie: u64,
    /// Its inode, how `/proc/<pid>/fd` names it (`socket:[inode]`).
    pub inode: u32,
    /// The uid that owns it.
    pub uid: u32,
}

/// Whether a socket bound to `socket` (`v6only` as [`BoundSocket::v6only`]) shares the
/// address of a portshard service listening on `service` (see the module's doc): same port,
/// and the same address, or either one the wildcard that covers the other. portshard's own
/// IPv6 sockets are IPv6-only, so they never share an IPv4 service's address; an IPv6 socket
/// on a v4-mapped address, or a dual-stack one on `[::]` (an unreported `IPV6_V6ONLY`
/// counts as dual-stack), takes IPv4 traffic and so can.
pub fn overlaps(service: SocketAddr, socket: SocketAddr, v6only: Option<bool>) -> bool {
    let covers = |a: IpAddr, b: IpAddr| a == b || a.is_unspecified() || b.is_unspecified();
    if service.port() != socket.port() {
        return false;
    }
    match (service.ip(), socket.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => covers(service.ip(), socket.ip()),
        (IpAddr::V4(_), IpAddr::V6(theirs)) => {
            let dual_stack = theirs.is_unspecified() && v6only != Some(true);
            let ipv4 = theirs
                .to_ipv4_mapped()
                .or(dual_stack.then_some(Ipv4Addr::UNSPECIFIED));
            ipv4.is_some_and(|theirs| covers(service.ip(), theirs.into()))
        }
        (IpAddr::V6(_), IpAddr::V6(theirs)) => {
            theirs.to_ipv4_mapped().is_none() && covers(service.ip(), socket.ip())
        }
        (IpAddr::V6(_), IpAddr::V4(_)) => false,
    }
}

/// The sockets of `found` that share `service`'s address (see [`overlaps`]) and whose
/// cookie is not among `known`, the cookies portshard recorded for the service's slots.
pub fn foreign(
    service: SocketAddr,
    found: &[BoundSocket],
    known: &BTreeSet<u64>,
) -> Vec<BoundSocket> {
    found
        .iter()
        .filter(|socket| {
            overlaps(service, socket.local, socket.v6only) && !known.contains(&socket.cookie)
        })
        .copied()
        .collect()
}

/// A foreign socket as `status` shows it, so an operator can find and stop its process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignSocket {
    /// Its `SO_COOKIE` (`ss -e` shows it in hex as `sk:`).
    pub cookie: u64,
    /// The address it is bound to: the service's own, or one overlapping it.
    pub address: String,
    /// The processes holding it when it was first seen; empty if none in this pid
    /// namespace does.
    pub pids: Vec<u32>,
    /// The uid that owns it.
    pub uid: u32,
}

impl ForeignSocket {
    /// `socket`, held by `pids`.
    pub fn new(socket: &BoundSocket, pids: Vec<u32>) -> Self {
        Self {
            cookie: socket.cookie,
            address: socket.local.to_string(),
            pids,
            uid: socket.uid,
        }
    }
}

/// A process holding a socket, named so an operator knows what to stop: its command name
/// and, unless it is init's, its parent's (a supervised worker is stopped through its
/// supervisor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub name: String,
    /// Its parent's pid and command name; `None` for init's children or when unknown.
    pub parent: Option<(u32, String)>,
}

/// A service's address is already taken by sockets that are not its own: creating the
/// service there would share its reuseport group (or its address) with them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct AddressInUse {
    /// The service.
    pub service: String,
    /// Its transport.
    pub proto: Proto,
    /// Its address.
    pub listen: SocketAddr,
    /// The sockets found there, each with the processes that hold it.
    pub sockets: Vec<(BoundSocket, Vec<Holder>)>,
}

/// Holders a refusal names together: same command name, parent, and socket address (empty
/// when it is the service's own).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Alike<'a> {
    name: &'a str,
    parent: Option<&'a (u32, String)>,
    at: String,
}

/// How many groups of holders a refusal names before it counts the rest.
const NAMED: usize = 4;

impl fmt::Display for AddressInUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |socket: &BoundSocket| {
            if socket.local == self.listen {
                String::new()
            } else {
                format!(" on {}", socket.local)
            }
        };
        // Holders alike (same command, parent and address) are named together.
        let mut alike: BTreeMap<Alike<'_>, BTreeSet<u32>> = BTreeMap::new();
        let mut unheld = Vec::new();
        for (socket, holders) in &self.sockets {
            if holders.is_empty() {
                unheld.push(format!(
                    "a socket{} of uid {} (cookie {}) that no process in this pid namespace holds",
                    at(socket),
                    socket.uid,
                    socket.cookie
                ));
            }
            for holder in holders {
                alike
                    .entry(Alike {
                        name: &holder.name,
                        parent: holder.parent.as_ref(),
                        at: at(socket),
                    })
                    .or_default()
                    .insert(holder.pid);
            }
        }
        let holders = alike.values().map(BTreeSet::len).sum::<usize>() + unheld.len();
        let mut who: Vec<String> = alike
            .iter()
            .take(NAMED)
            .map(|(Alike { name, parent, at }, pids)| {
                let list = pids.iter().map(u32::to_string).collect::<Vec<_>>();
                let (noun, children) = if pids.len() == 1 {
                    ("pid", "child")
                } else {
                    ("pids", "children")
                };
                let parent = parent
                    .as_ref()
                    .map(|(pid, name)| format!("; {children} of pid {pid} {name}"))
                    .unwrap_or_default();
                format!("{noun} {} ({name}{parent}){at}", list.join(", "))
            })
            .collect();
        if alike.len() > NAMED {
            who.push(format!("{} more groups of processes", alike.len() - NAMED));
        }
        who.extend(unheld);
        let (them, those) = if holders > 1 {
            ("them", "those processes")
        } else {
            ("it", "that process")
        };
        write!(
            f,
            "service {}: {}/{} is already in use by {} — a reuseport group there would be shared with {them}; stop {those} or choose another address",
            self.service,
            self.listen,
            self.proto,
            who.join(", ")
        )
    }
}

/// The foreign sockets seen on each service's address at its latest check, so each new one
/// is reported once and its holders looked up once (a scan of every process's descriptors).
#[derive(Debug, Default)]
pub struct Sightings {
    services: BTreeMap<String, Vec<ForeignSocket>>,
}

/// What changed on a service's address since its previous check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Foreign sockets that were not there before.
    pub new: Vec<ForeignSocket>,
    /// Foreign sockets that are gone.
    pub gone: Vec<ForeignSocket>,
}

impl Sightings {
    /// No sighting yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes in a check of `service` that found the foreign sockets `found`. `holders`
    /// looks up the pids holding the given inodes, and is only asked about sockets not seen
    /// before: those seen before keep the holders they had then.
    pub fn update(
        &mut self,
        service: &str,
        found: &[BoundSocket],
        holders: impl FnOnce(&BTreeSet<u32>) -> BTreeMap<u32, Vec<u32>>,
    ) -> Change {
        let before = self.services.remove(service).unwrap_or_default();
        let seen = |cookie| before.iter().find(|known| known.cookie == cookie);
        let unseen: BTreeSet<u32> = found
            .iter()
            .filter(|socket| seen(socket.cookie).is_none())
            .map(|socket| socket.inode)
            .collect();
        let held = if unseen.is_empty() {
            BTreeMap::new()
        } else {
            holders(&unseen)
        };
        let mut change = Change::default();
        let now: Vec<ForeignSocket> = found
            .iter()
            .map(|socket| {
                seen(socket.cookie).cloned().unwrap_or_else(|| {
                    let pids = held.get(&socket.inode).cloned().unwrap_or_default();
                    let sighted = ForeignSocket::new(socket, pids);
                    change.new.push(sighted.clone());
                    sighted
                })
            })
            .collect();
        change.gone = before
            .into_iter()
            .filter(|known| !now.iter().any(|socket| socket.cookie == known.cookie))
            .collect();
        if !now.is_empty() {
            self.services.insert(service.to_owned(), now);
        }
        change
    }

    /// The foreign sockets on `service`'s address at its latest check.
    pub fn of(&self, service: &str) -> &[ForeignSocket] {
        self.services.get(service).map_or(&[], Vec::as_slice)
    }

    /// Forgets `service` (removed).
    pub fn forget(&mut self, service: &str) {
        self.services.remove(service);
    }
}

#[cfg(test)]
mod tests;
