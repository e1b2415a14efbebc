//! Who else is on a service's address: the sockets sock_diag finds there that are not the
//! ones portshard recorded for the service's slots, and the processes holding them (see
//! [`crate::ownership`] for what shares an address). Used by the daemon before it binds a
//! new service and then periodically, and by `status`.
use std::{collections::BTreeSet, io, net::SocketAddr};

use portshard_common::MAX_SLOTS;

use crate::{
    dataplane::{DataplaneError, SlotRecords},
    ownership::{self, AddressInUse, BoundSocket, ForeignSocket},
    process,
    sockdiag::SockDiag,
    socket::Proto,
    table::Slot,
};

/// The sockets on an address could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum OwnersError {
    /// sock_diag could not list them.
    #[error("listing the {proto} sockets on {listen} with sock_diag: {source}")]
    Listing {
        /// The transport.
        proto: Proto,
        /// The service's address.
        listen: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The service's slot records could not be read.
    #[error(transparent)]
    Records(#[from] DataplaneError),
    /// `/proc` could not be listed to find their processes.
    #[error("finding the processes holding the sockets on {listen}/{proto} in /proc: {source}")]
    Holders {
        /// The transport.
        proto: Proto,
        /// The service's address.
        listen: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The foreign sockets on `listen`: those sharing it (see [`ownership::overlaps`]) whose
/// cookie is not recorded for one of the service's slots in `records` (its pins, if any).
/// `known` holds the cookies recorded so far: the records are read again, into it, only when
/// a socket shows up that it does not name, and only after the sockets are listed (the
/// daemon records a slot's cookie before it binds the slot's socket, so every portshard
/// socket the listing saw is recorded by then). A socket once recorded stays known.
pub fn foreign(
    diag: &mut SockDiag,
    proto: Proto,
    listen: SocketAddr,
    records: Option<&dyn SlotRecords>,
    known: &mut BTreeSet<u64>,
) -> Result<Vec<BoundSocket>, OwnersError> {
    let found = diag
        .bound(proto, listen.port())
        .map_err(|source| OwnersError::Listing {
            proto,
            listen,
            source,
        })?;
    let unknown = ownership::foreign(listen, &found, known);
    match records {
        Some(records) if !unknown.is_empty() => {
            *known = recorded_cookies(records)?;
            Ok(ownership::foreign(listen, &unknown, known))
        }
        _ => Ok(unknown),
    }
}

/// The cookies recorded for the service's slots, whatever their state (a cookie is never
/// reused, so an old record names nobody else's socket).
fn recorded_cookies(records: &dyn SlotRecords) -> Result<BTreeSet<u64>, DataplaneError> {
    let mut cookies = BTreeSet::new();
    for slot in 0..MAX_SLOTS as Slot {
        cookies.insert(records.slot_record(slot)?.cookie);
        // Every listener's sockets of the slot, for a service with several.
        cookies.extend(records.listener_cookies(slot)?);
    }
    cookies.remove(&0);
    Ok(cookies)
}

/// What stands in the way of creating service `name` on `listen`: the foreign sockets there
/// (anything not recorded in `records`, the service's pins when it is adopted) with the
/// processes holding them; `None` if the address is free.
pub fn in_use(
    diag: &mut SockDiag,
    name: &str,
    proto: Proto,
    listen: SocketAddr,
    records: Option<&dyn SlotRecords>,
) -> Result<Option<AddressInUse>, OwnersError> {
    let sockets = foreign(diag, proto, listen, records, &mut BTreeSet::new())?;
    if sockets.is_empty() {
        return Ok(None);
    }
    let holders = holders(&sockets, proto, listen)?;
    Ok(Some(AddressInUse {
        service: name.to_owned(),
        proto,
        listen,
        sockets: sockets
            .into_iter()
            .map(|socket| {
                let pids = holders.get(&socket.inode).map_or(&[][..], Vec::as_slice);
                (
                    socket,
                    pids.iter().map(|&pid| process::holder(pid)).collect(),
                )
            })
            .collect(),
    }))
}

/// The foreign sockets on `listen` as `status` shows them, with the processes holding them.
pub fn report(
    diag: &mut SockDiag,
    proto: Proto,
    listen: SocketAddr,
    records: &dyn SlotRecords,
) -> Result<Vec<ForeignSocket>, OwnersError> {
    let sockets = foreign(diag, proto, listen, Some(records), &mut BTreeSet::new())?;
    if sockets.is_empty() {
        return Ok(Vec::new());
    }
    let mut holders = holders(&sockets, proto, listen)?;
    Ok(sockets
        .iter()
        .map(|socket| ForeignSocket::new(socket, holders.remove(&socket.inode).unwrap_or_default()))
        .collect())
}

/// The pids holding each of `sockets`, by inode (see [`process::socket_holders`]).
fn holders(
    sockets: &[BoundSocket],
    proto: Proto,
    listen: SocketAddr,
) -> Result<std::collections::BTreeMap<u32, Vec<u32>>, OwnersError> {
    let inodes = sockets.iter().map(|socket| socket.inode).collect();
    process::socket_holders(&inodes).map_err(|source| OwnersError::Holders {
        proto,
        listen,
        source,
    })
}
