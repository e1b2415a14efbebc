//! One reuseport group under portshard: the table userspace computes and the dataplane it is
//! written to, changed together. Every change is computed on a copy of the table and only
//! committed once the kernel took it, so a refused change leaves both sides as they were.
use std::{
    os::fd::{AsRawFd as _, BorrowedFd},
    path::Path,
};

use portshard_common::{MAX_SLOTS, SlotMeta, SlotState};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    socket,
    table::{Delta, Slot, Table, TableError},
};

/// A group operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The table refused the change; nothing was touched.
    #[error("service {service}: {source}")]
    Table {
        /// The service whose table refused.
        service: String,
        /// Why.
        #[source]
        source: TableError,
    },
    /// The kernel refused the change.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The pins are in use by a group someone still serves.
    #[error(
        "service {service} at {dir} is still in use (slot {slot} is recorded live, pid {pid}): stop what serves it, or remove {dir} if it is gone"
    )]
    InUse {
        /// The service.
        service: String,
        /// Its pin directory.
        dir: std::path::PathBuf,
        /// A slot recorded live.
        slot: Slot,
        /// The process recorded for it.
        pid: u32,
    },
    /// The socket offered for a slot cannot be identified.
    #[error("reading the cookie of socket fd {fd} for slot {slot}: {source}")]
    Cookie {
        /// The socket.
        fd: i32,
        /// The slot it was for.
        slot: Slot,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Who serves a slot's socket, as recorded in the slot's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The serving process.
    pub pid: u32,
    /// The generation it belongs to.
    pub generation: u32,
}

impl Holder {
    /// This process, generation 0: for sockets the caller serves itself.
    pub fn this_process() -> Self {
        Self {
            pid: std::process::id(),
            generation: 0,
        }
    }
}

/// A service's table and dataplane.
pub struct Group {
    service: String,
    dataplane: Dataplane,
    table: Table,
}

impl Group {
    /// Creates the dataplane of `service` under the pin root `root` (see
    /// [`Dataplane::create`]) and starts it empty: no slot records, an empty table. Refuses
    /// pins whose records say a group is still being served from them, rather than wiping
    /// that group's table.
    pub fn create(root: &Path, service: &str) -> Result<Self, GroupError> {
        let mut dataplane = Dataplane::create(root, service)?;
        for slot in 0..MAX_SLOTS as Slot {
            let meta = dataplane.meta(slot)?;
            match SlotState::from_raw(meta.state) {
                Some(SlotState::Live | SlotState::Draining) => {
                    return Err(GroupError::InUse {
                        service: service.to_owned(),
                        dir: dataplane.dir().to_path_buf(),
                        slot,
                        pid: meta.pid,
                    });
                }
                Some(SlotState::Free) => {}
                _ => dataplane.set_meta(slot, SlotMeta::FREE)?,
            }
        }
        let table = Table::new();
        dataplane.write_all(table.entries())?;
        Ok(Self {
            service: service.to_owned(),
            dataplane,
            table,
        })
    }

    /// The table as last written to the kernel.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The service's dataplane.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    /// Puts `socket` (bound with `SO_REUSEPORT`, and listening for TCP), served by
    /// `holder`, in `slot` with `weight`: it takes its share of the table from the most
    /// loaded slots and no other flow moves. The first socket of a group also gets the
    /// program attached.
    pub fn add(
        &mut self,
        slot: Slot,
        socket: BorrowedFd<'_>,
        weight: u32,
        holder: Holder,
    ) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .add(slot, weight)
            .map_err(|source| self.table_error(source))?;
        let cookie = socket::cookie(socket).map_err(|source| GroupError::Cookie {
            fd: socket.as_raw_fd(),
            slot,
            source,
        })?;
        if self.table.members().is_empty() {
            self.dataplane.attach(socket)?;
        }
        let meta = SlotMeta {
            cookie,
            pid: holder.pid,
            state: SlotState::Live as u32,
            generation: holder.generation,
            weight,
        };
        self.dataplane.place(slot, socket, meta)?;
        self.commit(next, delta)
    }

    /// Takes `slot` out of the table: its entries go to their heirs, where the program
    /// already sends their flows if the slot's socket is closed, so nothing moves twice.
    pub fn remove(&mut self, slot: Slot) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .remove(slot)
            .map_err(|source| self.table_error(source))?;
        // Empty the slot before the table forgets it: the program then already sends the
        // slot's flows to their heirs, exactly where the new table puts them, so a failure
        // here leaves traffic where it would be anyway and the table unchanged.
        let mut meta = self.dataplane.meta(slot)?;
        self.dataplane.clear(slot)?;
        meta.state = SlotState::Dead as u32;
        self.dataplane.set_meta(slot, meta)?;
        self.commit(next, delta)
    }

    /// Changes `slot`'s weight, moving the fewest entries that restore every share.
    pub fn set_weight(&mut self, slot: Slot, weight: u32) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .set_weight(slot, weight)
            .map_err(|source| self.table_error(source))?;
        let mut meta = self.dataplane.meta(slot)?;
        meta.weight = weight;
        self.dataplane.set_meta(slot, meta)?;
        self.commit(next, delta)
    }

    /// Writes the entries `delta` changed and makes `next` the current table.
    fn commit(&mut self, next: Table, delta: Delta) -> Result<Delta, GroupError> {
        self.dataplane
            .write_entries(next.entries(), &delta.changed)?;
        self.table = next;
        Ok(delta)
    }

    fn table_error(&self, source: TableError) -> GroupError {
        GroupError::Table {
            service: self.service.clone(),
            source,
        }
    }
}
