//! A service's records alone (what it listens on, and each slot), read from the two pins
//! that hold them. Those pins are the same in every pin layout, so the records of pins not
//! yet migrated to this build's layout can be read before anything is changed.
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData};
use portshard_common::{ServiceMeta, SlotMeta, names};

use super::{
    DataplaneError, Result, check_service_name,
    pinned::{open_named, typed},
};
use crate::{
    object::{self, OBJECT},
    table::Slot,
};

/// Reads a service's slot records: from a whole [`super::Dataplane`], or from
/// [`PinnedRecords`] where the rest of the pins may be in an older layout.
pub trait SlotRecords {
    /// `slot`'s recorded metadata.
    fn slot_record(&self, slot: Slot) -> Result<SlotMeta>;
}

impl SlotRecords for super::Dataplane {
    fn slot_record(&self, slot: Slot) -> Result<SlotMeta> {
        self.meta(slot)
    }
}

/// The `service` and `slots` pins of one service.
pub struct PinnedRecords {
    dir: PathBuf,
    service: Array<MapData, ServiceMeta>,
    slots: Array<MapData, SlotMeta>,
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
        let specs = object::map_specs(OBJECT, 1)?;
        let open = |name: &'static str| open_named(&dir, &specs, name);
        let service = typed(&dir, names::SERVICE, open(names::SERVICE)?)?;
        let slots = typed(&dir, names::SLOTS, open(names::SLOTS)?)?;
        Ok(Self {
            dir,
            service,
            slots,
        })
    }

    /// What the service listens on, as recorded.
    pub fn service(&self) -> Result<ServiceMeta> {
        self.service
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                action: "reading the service record".to_owned(),
                path: self.dir.join(names::SERVICE),
                source: Box::new(source),
            })
    }

    /// The service's pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl SlotRecords for PinnedRecords {
    fn slot_record(&self, slot: Slot) -> Result<SlotMeta> {
        self.slots
            .get(&u32::from(slot), 0)
            .map_err(|source| DataplaneError::Map {
                action: format!("reading slot {slot}"),
                path: self.dir.join(names::SLOTS),
                source: Box::new(source),
            })
    }
}
