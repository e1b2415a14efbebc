//! One reuseport group under portshard: the table userspace computes and the dataplane it is
//! written to, changed together. Every change is computed on a copy of the table and only
//! committed once the kernel took it, so a refused change leaves both sides as they were.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::Path,
};

use portshard_common::{MAX_SLOTS, ProbeHealth, ServiceMeta, SlotMeta, SlotState};

mod error;
mod holder;

pub use error::GroupError;
pub use holder::{Holder, start_time};

use crate::{
    dataplane::{Dataplane, DataplaneError, LoadedProgram},
    socket,
    table::{Delta, Slot, Table, TableError},
};

/// A service's table and dataplane.
pub struct Group {
    service: String,
    dataplane: Dataplane,
    table: Table,
    /// The entries each slot owned in its own right (not inherited from another vacated
    /// slot) when it was removed or drained, given back when it returns, so a restarted or
    /// undrained worker gets its own flows back.
    vacated: BTreeMap<Slot, Vec<u32>>,
}

impl Group {
    /// Creates the dataplane of `service` under the pin root `root` (see
    /// [`Dataplane::create`]) and starts it empty: no slot records, an empty table. Refuses
    /// pins whose records say a group is still being served from them, rather than wiping
    /// that group's table. The flow table holds `flow_capacity` flows.
    pub fn create(root: &Path, service: &str, flow_capacity: u32) -> Result<Self, GroupError> {
        let mut dataplane = Dataplane::create(root, service, flow_capacity)?;
        for slot in 0..MAX_SLOTS as Slot {
            let meta = dataplane.meta(slot)?;
            match SlotState::from_raw(meta.state) {
                Some(SlotState::Live | SlotState::Draining | SlotState::Starting) => {
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
            vacated: BTreeMap::new(),
        })
    }

    /// Takes over `dataplane` (see [`Dataplane::adopt`]) as a previous process left it,
    /// without writing anything: `members` (slot, weight) are the slots the pinned table
    /// is over. If the pinned table does not fit them (a process died halfway through a
    /// change), it is rebuilt from scratch over `members`, which moves flows, and
    /// `rebuilt` says so.
    pub fn adopt(
        dataplane: Dataplane,
        members: &[(Slot, u32)],
    ) -> Result<(Self, Option<TableError>), GroupError> {
        let service = dataplane.name();
        let (table, rebuilt) = match Table::adopt(dataplane.read_entries(), members.iter().copied())
        {
            Ok(table) => (table, None),
            Err(error) => {
                let table = Table::with_members(members.iter().copied()).map_err(|source| {
                    GroupError::Table {
                        service: service.clone(),
                        source,
                    }
                })?;
                dataplane.write_all(table.entries())?;
                (table, Some(error))
            }
        };
        Ok((
            Self {
                service,
                dataplane,
                table,
                vacated: BTreeMap::new(),
            },
            rebuilt,
        ))
    }

    /// Records what the service listens on, for `status` and a restarted daemon.
    pub fn record_service(&mut self, meta: ServiceMeta) -> Result<(), GroupError> {
        Ok(self.dataplane.set_service(meta)?)
    }

    /// Records what each of the service's listeners listens on, in order (see
    /// [`Dataplane::set_listeners`]).
    pub fn record_listeners(&mut self, listeners: &[ServiceMeta]) -> Result<(), GroupError> {
        Ok(self.dataplane.set_listeners(listeners)?)
    }

    /// The table as last written to the kernel.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The service's dataplane.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    /// Puts this build's `program` in place of the pinned one, attached through `sockets`,
    /// a live member of each listener's group (see [`Dataplane::replace_program`]).
    pub fn replace_program(
        &mut self,
        program: LoadedProgram,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<(), GroupError> {
        Ok(self.dataplane.replace_program(program, sockets)?)
    }

    /// Puts `socket` (bound with `SO_REUSEPORT`, and listening for TCP), served by
    /// `holder`, in `slot` with `weight`: it takes its share of the table from the most
    /// loaded slots and no other flow moves; a slot that was removed gets the entries it
    /// owned back first (see [`Table::rejoin`]). The program is attached to the socket's
    /// group (again), so a group whose every socket closed meanwhile gets it back.
    pub fn add(
        &mut self,
        slot: Slot,
        socket: BorrowedFd<'_>,
        weight: u32,
        holder: Holder,
    ) -> Result<Delta, GroupError> {
        self.add_all(slot, &[socket], weight, holder)
    }

    /// [`Group::add`] for a worker of a service with several listeners: `sockets[i]`, of
    /// listener `i`, goes in `slot` of that listener's socket array, so the one table
    /// steers every listener alike and the worker's death fails over the same way on each.
    pub fn add_all(
        &mut self,
        slot: Slot,
        sockets: &[BorrowedFd<'_>],
        weight: u32,
        holder: Holder,
    ) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .rejoin(slot, weight, &self.wanted_back(slot))
            .map_err(|source| self.table_error(source))?;
        self.seat(slot, sockets, weight, holder, SlotState::Live)?;
        self.commit(next, delta)
    }

    /// Takes `slot` out of the table: its entries go to their heirs, where the program
    /// already sends their flows if the slot's socket is closed, so nothing moves twice.
    /// A slot that is no longer in the table (drained) is only emptied and recorded dead.
    pub fn remove(&mut self, slot: Slot) -> Result<Delta, GroupError> {
        let former = self.own_entries(slot);
        // Empty the slot before the table forgets it: the program then already sends the
        // slot's flows to their heirs, exactly where the new table puts them, so a failure
        // here leaves traffic where it would be anyway and the table unchanged.
        let mut meta = self.dataplane.meta(slot)?;
        self.dataplane.clear(slot)?;
        meta.state = SlotState::Dead as u32;
        self.dataplane.set_meta(slot, meta)?;
        let delta = if self.table.members().contains_key(&slot) {
            // In place, no copy of the table: a member's removal cannot be refused, and it
            // computes only the entries it changes, so the death costs the daemon little
            // CPU next to the heirs taking the flows over.
            let delta = self
                .table
                .remove(slot)
                .map_err(|source| self.table_error(source))?;
            self.dataplane
                .write_entries(self.table.entries(), &delta.changed)?;
            delta
        } else {
            Delta::default()
        };
        if !former.is_empty() {
            self.vacated.insert(slot, former);
        }
        Ok(delta)
    }

    /// Takes `slot`'s entries away, to their heirs, but leaves its socket in place: its
    /// worker keeps what it already has (established connections) and gets nothing new.
    pub fn drain(&mut self, slot: Slot) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .remove(slot)
            .map_err(|source| self.table_error(source))?;
        let former = self.own_entries(slot);
        let mut meta = self.dataplane.meta(slot)?;
        meta.state = SlotState::Draining as u32;
        self.dataplane.set_meta(slot, meta)?;
        let delta = self.commit(next, delta)?;
        self.vacated.insert(slot, former);
        Ok(delta)
    }

    /// Places `socket`, served by `holder` of a generation not yet switched to, in `slot`
    /// without giving it any entry: it takes no new work until [`Group::switch`] or
    /// [`Group::admit`] gives it some, and [`Group::release`] takes it back out.
    pub fn stage(
        &mut self,
        slot: Slot,
        socket: BorrowedFd<'_>,
        weight: u32,
        holder: Holder,
    ) -> Result<(), GroupError> {
        self.stage_all(slot, &[socket], weight, holder)
    }

    /// [`Group::stage`] for a worker with a socket per listener (see [`Group::add_all`]).
    pub fn stage_all(
        &mut self,
        slot: Slot,
        sockets: &[BorrowedFd<'_>],
        weight: u32,
        holder: Holder,
    ) -> Result<(), GroupError> {
        self.seat(slot, sockets, weight, holder, SlotState::Starting)
    }

    /// Attaches the program to each socket's group, puts `sockets[i]` in `slot` of listener
    /// `i`'s socket array and records the slot, with the first socket's cookie.
    fn seat(
        &mut self,
        slot: Slot,
        sockets: &[BorrowedFd<'_>],
        weight: u32,
        holder: Holder,
        state: SlotState,
    ) -> Result<(), GroupError> {
        let Some(&first) = sockets.first() else {
            return Err(GroupError::Dataplane(DataplaneError::TooManyListeners {
                dir: self.dataplane.dir().to_path_buf(),
                count: 0,
            }));
        };
        let cookie = socket::cookie(first).map_err(|source| GroupError::Cookie {
            fd: first.as_raw_fd(),
            slot,
            source,
        })?;
        for &socket in sockets {
            self.dataplane.attach(socket)?;
        }
        let meta = SlotMeta {
            cookie,
            pid: holder.pid,
            state: state as u32,
            generation: holder.generation,
            weight,
            restarts: holder.restarts,
            started: holder.started,
        };
        Ok(self.dataplane.place_all(slot, sockets, meta)?)
    }

    /// Switches the table from the members `old` to the staged slots `new`, all with
    /// `weight`, as one change (see [`Table::switch`]): each table entry is written once, so
    /// each flow moves at most once, from its old slot to its new one. The old slots keep
    /// their sockets and what they already have, draining; the new ones take new work. On
    /// any error nothing changes: the slot records written so far are put back.
    pub fn switch(&mut self, old: &[Slot], new: &[Slot], weight: u32) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .switch(old, new, weight)
            .map_err(|source| self.table_error(source))?;
        let formers: Vec<(Slot, Vec<u32>)> = old
            .iter()
            .skip(new.len())
            .map(|&slot| (slot, self.own_entries(slot)))
            .collect();
        let saved = new
            .iter()
            .chain(old)
            .map(|&slot| Ok((slot, self.dataplane.meta(slot)?)))
            .collect::<Result<Vec<_>, GroupError>>()?;
        let switched = self
            .record_switch(&saved, new.len(), weight)
            .and_then(|()| self.commit(next, delta));
        match switched {
            Ok(delta) => {
                self.vacated.extend(formers);
                Ok(delta)
            }
            Err(error) => {
                self.put_back(saved);
                Err(error)
            }
        }
    }

    /// Writes back the slot records `saved` before a change that failed.
    fn put_back(&mut self, saved: Vec<(Slot, SlotMeta)>) {
        for (slot, meta) in saved {
            // Best effort: the error the change returns says what went wrong first.
            let _ = self.dataplane.set_meta(slot, meta);
        }
    }

    /// Records a switch: the first `new` of `saved` (slot, record) live with `weight`, the
    /// rest draining. The program reads neither state nor weight, so order does not matter.
    fn record_switch(
        &mut self,
        saved: &[(Slot, SlotMeta)],
        new: usize,
        weight: u32,
    ) -> Result<(), GroupError> {
        for (i, &(slot, mut meta)) in saved.iter().enumerate() {
            if i < new {
                meta.state = SlotState::Live as u32;
                meta.weight = weight;
            } else {
                meta.state = SlotState::Draining as u32;
            }
            self.dataplane.set_meta(slot, meta)?;
        }
        Ok(())
    }

    /// Empties `slot` and forgets it: its socket is out of the socket array and its record
    /// free, for a worker that is gone for good (an old generation's, or a rolled-back new
    /// one's). A slot still in the table is taken out first, its entries to their heirs.
    pub fn release(&mut self, slot: Slot) -> Result<(), GroupError> {
        if self.table.members().contains_key(&slot) {
            self.remove(slot)?;
        }
        self.dataplane.clear(slot)?;
        self.dataplane.set_meta(slot, SlotMeta::FREE)?;
        self.vacated.remove(&slot);
        Ok(())
    }

    /// Puts a drained or staged `slot` in the table with `weight`; only it receives
    /// entries, first those it had when drained.
    pub fn admit(&mut self, slot: Slot, weight: u32) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .rejoin(slot, weight, &self.wanted_back(slot))
            .map_err(|source| self.table_error(source))?;
        let mut meta = self.dataplane.meta(slot)?;
        meta.state = SlotState::Live as u32;
        meta.weight = weight;
        self.dataplane.set_meta(slot, meta)?;
        self.commit(next, delta)
    }

    /// Steers packets from `source` (a health probe's address and port) to `slot`; the
    /// table is not touched.
    pub fn set_probe(&mut self, source: SocketAddr, slot: Slot) -> Result<(), GroupError> {
        Ok(self.dataplane.set_probe(source, slot)?)
    }

    /// Forgets every probe port (left by a previous daemon).
    pub fn clear_probes(&mut self) -> Result<(), GroupError> {
        Ok(self.dataplane.clear_probes()?)
    }

    /// Records the probe results of `slot`'s worker for the CLI.
    pub fn set_health(&mut self, slot: Slot, health: ProbeHealth) -> Result<(), GroupError> {
        Ok(self.dataplane.set_health(slot, health)?)
    }

    /// Records the cookies of `slot`'s sockets, listener by listener, without touching the
    /// table (see [`Dataplane::set_cookies`]).
    pub fn set_cookies(&mut self, slot: Slot, cookies: &[u64]) -> Result<(), GroupError> {
        Ok(self.dataplane.set_cookies(slot, cookies)?)
    }

    /// The service's QUIC-LB key, made and pinned on first use (see
    /// [`Dataplane::quic_key`]).
    pub fn quic_key(&mut self) -> Result<[u8; 16], GroupError> {
        Ok(self.dataplane.quic_key()?)
    }

    /// Records `meta` for `slot` without touching the table (a restart count, a pid).
    pub fn set_meta(&mut self, slot: Slot, meta: SlotMeta) -> Result<(), GroupError> {
        Ok(self.dataplane.set_meta(slot, meta)?)
    }

    /// Gives the members `weights` names their weights as one change (see
    /// [`Table::set_weights`]): a SIGHUP's new weight moves only what the new shares take,
    /// nothing if they keep their proportions. Only the changed entries and the records of
    /// slots whose weight changed are written; on any error the records are put back.
    pub fn set_weights(&mut self, weights: &BTreeMap<Slot, u32>) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next
            .set_weights(weights)
            .map_err(|source| self.table_error(source))?;
        let mut saved = Vec::new();
        let written = weights
            .iter()
            .try_for_each(|(&slot, &weight)| self.record_weight(slot, weight, &mut saved))
            .and_then(|()| self.commit(next, delta));
        if written.is_err() {
            self.put_back(saved);
        }
        written
    }

    /// Gives every member its share if a change cut short left one with too few entries (see
    /// [`Table::settle`]): after an adoption, a live slot the previous process seated but
    /// never gave entries takes its share from the others' surplus. Writes only the changed
    /// entries, none if every share is within what the operations leave.
    pub fn settle(&mut self) -> Result<Delta, GroupError> {
        let mut next = self.table.clone();
        let delta = next.settle();
        self.commit(next, delta)
    }

    /// Records `weight` for `slot` if its record says otherwise, saving the record it had.
    fn record_weight(
        &mut self,
        slot: Slot,
        weight: u32,
        saved: &mut Vec<(Slot, SlotMeta)>,
    ) -> Result<(), GroupError> {
        let meta = self.dataplane.meta(slot)?;
        if meta.weight != weight {
            self.dataplane.set_meta(slot, SlotMeta { weight, ..meta })?;
            saved.push((slot, meta));
        }
        Ok(())
    }

    /// The entries `slot` owns in its own right: those it holds, less those it inherited
    /// from a slot that is still vacated (that slot takes them back when it returns).
    fn own_entries(&self, slot: Slot) -> Vec<u32> {
        let inherited: std::collections::BTreeSet<u32> = self
            .vacated
            .iter()
            .filter(|&(&other, _)| other != slot)
            .flat_map(|(_, entries)| entries.iter().copied())
            .collect();
        let mut own = self.table.owned_by(slot);
        own.retain(|index| !inherited.contains(index));
        own
    }

    /// The entries a returning `slot` asks for, in order: its own former entries, then
    /// those of slots still vacated. Taking the latter first (rather than whatever the
    /// rebalance picks) means a survivor's own flows never move when several slots return
    /// one by one: those entries move anyway when their slot returns.
    fn wanted_back(&self, slot: Slot) -> Vec<u32> {
        let own = self.vacated.get(&slot).into_iter().flatten();
        let others = self
            .vacated
            .iter()
            .filter(|&(&other, _)| other != slot)
            .flat_map(|(_, entries)| entries);
        own.chain(others).copied().collect()
    }

    /// Writes the entries `delta` changed and makes `next` the current table.
    fn commit(&mut self, next: Table, delta: Delta) -> Result<Delta, GroupError> {
        self.dataplane
            .write_entries(next.entries(), &delta.changed)?;
        for slot in next.members().keys() {
            if !self.table.members().contains_key(slot) {
                self.vacated.remove(slot);
            }
        }
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
