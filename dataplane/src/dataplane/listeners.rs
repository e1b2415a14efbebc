//! A service's listeners: each one's record and socket array, and the cookies of a slot's
//! sockets, one per listener.
use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya::maps::MapError;
use portshard_common::{MAX_LISTENERS, ServiceMeta, SlotCookies, SlotMeta, names};

use super::{Dataplane, DataplaneError, Result};
use crate::table::Slot;

impl Dataplane {
    /// Records what each of the service's listeners listens on, in order (at most
    /// [`MAX_LISTENERS`]); the records past the last are zeroed.
    pub fn set_listeners(&mut self, listeners: &[ServiceMeta]) -> Result<()> {
        let zero = ServiceMeta {
            addr: [0; 16],
            port: 0,
            family: 0,
            proto: 0,
            mode: 0,
            flow_table: 0,
            reserved: 0,
        };
        for index in 0..MAX_LISTENERS {
            let meta = listeners.get(index).copied().unwrap_or(zero);
            let error = self.map_error(names::LISTENERS, format!("recording listener {index}"));
            self.listeners.set(index as u32, meta, 0).map_err(error)?;
        }
        self.listener_count = listeners.len().clamp(1, MAX_LISTENERS);
        Ok(())
    }

    /// The listeners recorded by [`Dataplane::set_listeners`], in order; none for pins
    /// that never recorded any (a service of an older layout has one listener, the one
    /// [`Dataplane::service`] records).
    pub fn listener_records(&self) -> Result<Vec<ServiceMeta>> {
        let mut records = Vec::new();
        for index in 0..MAX_LISTENERS as u32 {
            let error = self.map_error(names::LISTENERS, format!("reading listener {index}"));
            let meta = self.listeners.get(&index, 0).map_err(error)?;
            if meta.family == 0 {
                break;
            }
            records.push(meta);
        }
        Ok(records)
    }

    /// Records the cookies of `slot`'s sockets, listener by listener (see
    /// [`SlotCookies`]), before they join their groups.
    pub fn set_cookies(&mut self, slot: Slot, cookies: &[u64]) -> Result<()> {
        let mut value = SlotCookies::default();
        for (to, &cookie) in value.cookies.iter_mut().zip(cookies) {
            *to = cookie;
        }
        let error = self.map_error(
            names::COOKIES,
            format!("recording the cookies of slot {slot}"),
        );
        self.cookies.set(u32::from(slot), value, 0).map_err(error)
    }

    /// The cookies recorded for `slot`'s sockets, listener by listener.
    pub fn cookies(&self, slot: Slot) -> Result<SlotCookies> {
        let error = self.map_error(
            names::COOKIES,
            format!("reading the cookies of slot {slot}"),
        );
        self.cookies.get(&u32::from(slot), 0).map_err(error)
    }

    /// How many listeners the service has: each has its socket array, slot for slot.
    pub fn listener_count(&self) -> usize {
        self.listener_count
    }

    /// Records `meta` for `slot` and puts `sockets[i]` in slot `slot` of listener `i`'s
    /// socket array, for each of a worker's listeners, as [`Dataplane::place`] does. If one
    /// cannot be placed, those placed are taken out again and the old record is restored.
    pub fn place_all(
        &mut self,
        slot: Slot,
        sockets: &[BorrowedFd<'_>],
        meta: SlotMeta,
    ) -> Result<()> {
        let before = self.meta(slot)?;
        self.set_meta(slot, meta)?;
        let mut placed = Ok(());
        for (index, socket) in sockets.iter().enumerate() {
            let Some(array) = self.sockets.get_mut(index) else {
                placed = Err(DataplaneError::TooManyListeners {
                    dir: self.dir.clone(),
                    count: sockets.len(),
                });
                break;
            };
            placed = array
                .set(u32::from(slot), &socket.as_raw_fd(), 0)
                .map_err(|source| DataplaneError::Map {
                    action: format!("placing socket fd {} in slot {slot}", socket.as_raw_fd()),
                    path: self.dir.join(names::LISTENER_SOCKETS[index]),
                    source: Box::new(source),
                });
            if placed.is_err() {
                break;
            }
        }
        if placed.is_err() {
            for index in 0..sockets.len().min(MAX_LISTENERS) {
                let _ = self.clear_in(index, slot);
            }
            let _ = self.set_meta(slot, before);
        }
        placed
    }

    /// Empties `slot` of every listener's socket array (a no-op where its socket already
    /// closed).
    pub fn clear(&mut self, slot: Slot) -> Result<()> {
        for index in 0..self.listener_count {
            self.clear_in(index, slot)?;
        }
        Ok(())
    }

    /// Empties `slot` of listener `index`'s socket array.
    fn clear_in(&mut self, index: usize, slot: Slot) -> Result<()> {
        let path = self.dir.join(names::LISTENER_SOCKETS[index]);
        match self.sockets[index].clear_index(&u32::from(slot)) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            result => result.map_err(|source| DataplaneError::Map {
                action: format!("clearing slot {slot}"),
                path,
                source: Box::new(source),
            }),
        }
    }
}
