//! The edge of pin layouts (see [`portshard_core::layout`]): reading which layout a
//! service's pins are in, checking every pin before anything is changed, and carrying out
//! a migration's steps.
use std::path::Path;

use aya::maps::{Array, Map, MapData, MapInfo};
use portshard_common::{PIN_LAYOUT, names};
use portshard_core::layout::{self, Step};

use super::{
    DataplaneError, Result,
    pinned::{check_pin, typed},
};
use crate::object::{self, OBJECT, ObjectError};

/// The layout of the pins in `dir`: what their `layout` map holds, or 1 when they have none
/// (every build before the layout was recorded).
pub(super) fn pinned_layout(dir: &Path) -> Result<u32> {
    let path = dir.join(names::LAYOUT);
    if !path.exists() {
        return Ok(layout::OLDEST_MIGRATABLE);
    }
    let data = MapData::from_pin(&path).map_err(|source| DataplaneError::OpenPin {
        path: path.clone(),
        source: Box::new(source),
    })?;
    let array: Array<MapData, u32> = typed(dir, names::LAYOUT, data)?;
    array.get(&0, 0).map_err(|source| DataplaneError::Map {
        action: "reading the pin layout".to_owned(),
        path,
        source: Box::new(source),
    })
}

/// Checks the pins in `dir` without changing anything: their layout is one this build
/// adopts, and every map that layout has is pinned, exactly as this build expects it.
/// Returns the migration's steps (none when the layout is this build's).
pub(super) fn check(dir: &Path) -> Result<Vec<Step>> {
    let found = pinned_layout(dir)?;
    let steps = layout::migration(found).map_err(|source| DataplaneError::UnknownLayout {
        dir: dir.to_path_buf(),
        source,
    })?;
    let flows = dir.join(names::FLOWS);
    let flow_capacity = MapInfo::from_pin(&flows)
        .map_err(|source| DataplaneError::OpenPin {
            path: flows,
            source: Box::new(source),
        })?
        .max_entries();
    for spec in object::map_specs(OBJECT, flow_capacity)? {
        let path = dir.join(spec.name);
        let added_by_migration = spec.name == names::LAYOUT && steps.contains(&Step::RecordLayout);
        if path.exists() {
            check_pin(&path, &spec)?;
        } else if !added_by_migration {
            return Err(DataplaneError::MissingPin {
                path,
                layout: found,
            });
        }
    }
    Ok(steps)
}

/// Carries out `steps` on the pins in `dir`, which [`check`] found to need them.
pub(super) fn migrate(dir: &Path, steps: &[Step]) -> Result<()> {
    for step in steps {
        match step {
            Step::RecordLayout => pin_layout(dir)?,
        }
    }
    Ok(())
}

/// Pins the `layout` map holding this build's layout. The number is written before the
/// map is pinned, so the pin never holds another one, whenever this process dies.
pub(super) fn pin_layout(dir: &Path) -> Result<()> {
    let path = dir.join(names::LAYOUT);
    let map_error = |action: &str| {
        let (action, path) = (action.to_owned(), path.clone());
        move |source| DataplaneError::Map {
            action,
            path,
            source: Box::new(source),
        }
    };
    let parsed = aya_obj::Object::parse(OBJECT).map_err(ObjectError::from)?;
    let spec = parsed
        .maps
        .get(names::LAYOUT)
        .cloned()
        .ok_or(ObjectError::MissingMap(names::LAYOUT))?;
    // The first map a fresh service creates: a refusal here is the kernel refusing BPF,
    // and is explained as such.
    let data =
        MapData::create(spec, names::LAYOUT, None).map_err(|source| DataplaneError::Load {
            dir: dir.to_path_buf(),
            source: Box::new(aya::EbpfError::MapError(source)),
        })?;
    let mut map = Map::Array(data);
    Array::<&mut MapData, u32>::try_from(&mut map)
        .and_then(|mut array| array.set(0, PIN_LAYOUT, 0))
        .map_err(map_error("recording the pin layout"))?;
    let Map::Array(data) = map else {
        unreachable!("built as an array just above");
    };
    data.pin(&path).map_err(|source| DataplaneError::PinIo {
        action: "pinning the pin layout map at",
        path,
        source: std::io::Error::other(source),
    })
}
