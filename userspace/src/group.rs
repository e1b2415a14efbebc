//! One reuseport group under portshard: the table userspace computes and the dataplane it is
//! written to, changed together. Every change is computed on a copy of the table and only
//! committed once the kernel took it, so a refused change leaves both sides as they were.
use std::{
    os::fd::{AsRawFd as _, BorrowedFd},
    path::Path,
};

use portshard_common::{SlotMeta, SlotState, TABLE_SIZE};

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

/// A service's table and dataplane.
pub struct Group {
    service: String,
    dataplane: Dataplane,
    table: Table,
}

impl Group {
    /// Creates the dataplane of `service` under the pin root `root` (see
    /// [`Dataplane::create`]) and writes an empty table to it.
    pub fn create(root: &Path, service: &str) -> Result<Self, GroupError> {
        let dataplane = Dataplane::create(root, service)?;
        let table = Table::new();
        dataplane.write_entries(table.entries(), 0..TABLE_SIZE as u32);
        Ok(Self {
            service: service.to_owned(),
            dataplane,
            table,
        })
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The table as last written to the kernel.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The service's dataplane.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    /// Puts `socket` (bound with `SO_REUSEPORT`, and listening for TCP) in `slot` with
    /// `weight`: it takes its share of the table from the most loaded slots and no other
    /// flow moves. The first socket of a group also gets the program attached.
    pub fn add(
        &mut self,
        slot: Slot,
        socket: BorrowedFd<'_>,
        weight: u32,
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
            pid: std::process::id(),
            state: SlotState::Live as u32,
            generation: 0,
            weight,
        };
        self.dataplane.place(slot, socket, meta)?;
        Ok(self.commit(next, delta))
    }

    /// Takes `slot` out of the table: its entries go to their heirs, where the program
    /// already sends their flows if the slot's socket is closed, so nothing moves twice.
    pub fn remove(&mut self, slot: Slot) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .remove(slot)
            .map_err(|source| self.table_error(source))?;
        let mut meta = self.dataplane.meta(slot)?;
        let delta = self.commit(next, delta);
        self.dataplane.clear(slot)?;
        meta.state = SlotState::Dead as u32;
        self.dataplane.set_meta(slot, meta)?;
        Ok(delta)
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
        Ok(self.commit(next, delta))
    }

    /// Writes the entries `delta` changed and makes `next` the current table.
    fn commit(&mut self, next: Table, delta: Delta) -> Delta {
        self.dataplane
            .write_entries(next.entries(), delta.changed.iter().copied());
        self.table = next;
        delta
    }

    fn table_error(&self, source: TableError) -> GroupError {
        GroupError::Table {
            service: self.service.clone(),
            source,
        }
    }
}
