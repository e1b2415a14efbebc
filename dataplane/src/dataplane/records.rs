//! A service's records alone (what it listens on, and each slot), read from the two pins
//! that hold them. Those pins are the same in every pin layout, so the records of pins not
//! yet migrated to this build's layout can be read before anything is changed. The cookies
//! of every listener's sockets are read too where pinned (layout 4 on).
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, MapError};
use portshard_common::{ServiceMeta, SlotCookies, SlotMeta, names};

use super::{
    DataplaneError, Result, check_service_name,
    pinned::{open_named, typed},
};
use crate::{
    object::{self, MapSpec, OBJECT},
    table::Slot,
};

/// Reads a service's slot records: from a whole [`super::Dataplane`], or from
/// [`PinnedRecords`] where the rest of the pins may be in an older layout.
pub trait SlotRecords {
    /// `slot`'s recorded metadata.
    fn slot_record(&self, slot: Slot) -> Result<SlotMeta>;

    /// The cookies recorded for `slot`'s sockets of every listener; none where only the
    /// slot's record holds one (pins of layouts before 4, with one listener).
    fn listener_cookies(&self, _slot: Slot) -> Result<Vec<u64>> {
        Ok(Vec::new())
    }
}

impl SlotRecords for super::Dataplane {
    fn slot_record(&self, slot: Slot) -> Result<SlotMeta> {
        self.meta(slot)
    }

    fn listener_cookies(&self, slot: Slot) -> Result<Vec<u64>> {
        Ok(self.cookies(slot)?.cookies.to_vec())
    }
}

/// The `service` and `slots` pins of one service, and its `slot_cookies` where pinned
/// (layout 4 on).
pub struct PinnedRecords {
    dir: PathBuf,
    service: Array<MapData, ServiceMeta>,
    slots: Array<MapData, SlotMeta>,
    cookies: Option<Array<MapData, SlotCookies>>,
}

impl PinnedRecords {
    /// Opens the records of `service` under `root`, checking both pins against this build.
    pub fn open(root: &Path, service: &str) -> Result<Self> {
        check_service_name(service)?;
        let dir = root.join(service);
        if !dir.is_dir() {
            return Err(DataplaneError::NotPinned { dir });
        }
        // The flow table's size plays no part in these two maps.
        Self::open_in(&dir, &object::map_specs(OBJECT, 1)?)
    }

    /// Opens the records pinned in `dir`, checked against their specs among `specs`.
    pub(super) fn open_in(dir: &Path, specs: &[MapSpec]) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            service: typed(dir, names::SERVICE, open_named(dir, specs, names::SERVICE)?)?,
            slots: typed(dir, names::SLOTS, open_named(dir, specs, names::SLOTS)?)?,
            cookies: if dir.join(names::COOKIES).exists() {
                Some(typed(
                    dir,
                    names::COOKIES,
                    open_named(dir, specs, names::COOKIES)?,
                )?)
            } else {
                None
            },
        })
    }

    /// What the service listens on, as recorded.
    pub fn service(&self) -> Result<ServiceMeta> {
        self.service
            .get(&0, 0)
            .map_err(self.error(names::SERVICE, "reading the service record".to_owned()))
    }

    /// Records what the service listens on.
    pub(super) fn set_service(&mut self, meta: ServiceMeta) -> Result<()> {
        let error = self.error(names::SERVICE, "recording the service".to_owned());
        self.service.set(0, meta, 0).map_err(error)
    }

    /// Records `meta` as `slot`'s metadata.
    pub(super) fn set_slot_record(&mut self, slot: Slot, meta: SlotMeta) -> Result<()> {
        let error = self.error(names::SLOTS, format!("recording slot {slot}"));
        self.slots.set(u32::from(slot), meta, 0).map_err(error)
    }

    /// The service's pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Turns a map error into one naming what was done and the map's pin.
    fn error(&self, map: &str, action: String) -> impl FnOnce(MapError) -> DataplaneError + use<> {
        let path = self.dir.join(map);
        move |source| DataplaneError::Map {
            action,
            path,
            source: Box::new(source),
        }
    }
}

impl SlotRecords for PinnedRecords {
    fn slot_record(&self, slot: Slot) -> Result<SlotMeta> {
        self.slots
            .get(&u32::from(slot), 0)
            .map_err(self.error(names::SLOTS, format!("reading slot {slot}")))
    }

    fn listener_cookies(&self, slot: Slot) -> Result<Vec<u64>> {
        let Some(cookies) = &self.cookies else {
            return Ok(Vec::new());
        };
        let error = self.error(
            names::COOKIES,
            format!("reading the cookies of slot {slot}"),
        );
        Ok(cookies
            .get(&u32::from(slot), 0)
            .map_err(error)?
            .cookies
            .to_vec())
    }
}
