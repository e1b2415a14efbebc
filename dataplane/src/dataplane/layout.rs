//! The edge of pin layouts (see [`portshard_core::layout`]): reading which layout a
//! service's pins are in, checking every pin before anything is changed, and carrying out
//! a migration's steps.
use std::path::Path;

use aya::maps::{Array, Map, MapData, MapInfo};
use portshard_common::names;
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

/// The flow table capacity of the pins in `dir`: the flow table's, or the legacy flow
/// table's for pins not yet migrated to layout 3.
pub(super) fn pinned_flow_capacity(dir: &Path) -> Result<u32> {
    let current = dir.join(names::FLOWS);
    let path = if current.exists() {
        current
    } else {
        dir.join(names::LEGACY_FLOWS)
    };
    Ok(MapInfo::from_pin(&path)
        .map_err(|source| DataplaneError::OpenPin {
            path,
            source: Box::new(source),
        })?
        .max_entries())
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
    let flow_capacity = pinned_flow_capacity(dir)?;
    for spec in object::map_specs(OBJECT, flow_capacity)? {
        let path = dir.join(spec.name);
        let added_by_migration = steps
            .iter()
            .any(|step| added_by(*step).contains(&spec.name));
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

/// The maps `step` pins.
fn added_by(step: Step) -> &'static [&'static str] {
    match step {
        Step::RecordLayout => &[names::LAYOUT],
        Step::KeyFlowsBySource => &names::ADDED_IN_LAYOUT_3,
        Step::PinListeners => &names::ADDED_IN_LAYOUT_4,
    }
}

/// Carries out `steps` on the pins in `dir`, which [`check`] found to need them. Each
/// step pins the maps it adds (those a step interrupted earlier pinned already are kept)
/// and then records the layout it reaches, so an interrupted migration resumes.
pub(super) fn migrate(dir: &Path, steps: &[Step]) -> Result<()> {
    let flow_capacity = pinned_flow_capacity(dir)?;
    for step in steps {
        match step {
            Step::RecordLayout => pin_layout(dir, step.reaches())?,
            Step::KeyFlowsBySource | Step::PinListeners => {
                for name in added_by(*step) {
                    if !dir.join(name).exists() {
                        pin_new_map(dir, name, flow_capacity)?;
                    }
                }
                record_layout(dir, step.reaches())?;
            }
        }
    }
    Ok(())
}

/// Creates this build's map `name` (the flow table with `flow_capacity` entries) and pins
/// it in `dir`.
fn pin_new_map(dir: &Path, name: &'static str, flow_capacity: u32) -> Result<()> {
    let data = create_map(dir, name, flow_capacity)?;
    pin(dir, name, &data)
}

/// Creates this build's map `name`, unpinned. A refusal is the kernel refusing BPF, and is
/// explained as such.
fn create_map(dir: &Path, name: &'static str, flow_capacity: u32) -> Result<MapData> {
    let parsed = aya_obj::Object::parse(OBJECT).map_err(ObjectError::from)?;
    let mut spec = parsed
        .maps
        .get(name)
        .cloned()
        .ok_or(ObjectError::MissingMap(name))?;
    if name == names::FLOWS {
        spec.set_max_entries(flow_capacity);
    }
    MapData::create(spec, name, None).map_err(|source| DataplaneError::Load {
        dir: dir.to_path_buf(),
        source: Box::new(aya::EbpfError::MapError(source)),
    })
}

fn pin(dir: &Path, name: &str, data: &MapData) -> Result<()> {
    let path = dir.join(name);
    data.pin(&path).map_err(|source| DataplaneError::PinIo {
        action: "pinning a new map at",
        path,
        source: std::io::Error::other(source),
    })
}

/// Writes `layout` into the pinned `layout` map.
fn record_layout(dir: &Path, layout: u32) -> Result<()> {
    let path = dir.join(names::LAYOUT);
    let data = MapData::from_pin(&path).map_err(|source| DataplaneError::OpenPin {
        path: path.clone(),
        source: Box::new(source),
    })?;
    let mut array: Array<MapData, u32> = typed(dir, names::LAYOUT, data)?;
    array
        .set(0, layout, 0)
        .map_err(|source| DataplaneError::Map {
            action: "recording the pin layout".to_owned(),
            path,
            source: Box::new(source),
        })
}

/// Pins the `layout` map holding `layout` (this build's, for a fresh service). The number
/// is written before the map is pinned, so the pin never holds another one, whenever this
/// process dies.
pub(super) fn pin_layout(dir: &Path, layout: u32) -> Result<()> {
    // The first map a fresh service creates.
    let data = create_map(dir, names::LAYOUT, 0)?;
    let mut map = Map::Array(data);
    Array::<&mut MapData, u32>::try_from(&mut map)
        .and_then(|mut array| array.set(0, layout, 0))
        .map_err(|source| DataplaneError::Map {
            action: "recording the pin layout".to_owned(),
            path: dir.join(names::LAYOUT),
            source: Box::new(source),
        })?;
    let Map::Array(data) = map else {
        unreachable!("built as an array just above");
    };
    pin(dir, names::LAYOUT, &data)
}
