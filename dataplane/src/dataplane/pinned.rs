//! The pinned program and maps of a service, opened only after checking that each pin is
//! exactly what this build expects (type, sizes, entries, flags), never reused blindly.
use std::{io, path::Path};

use aya::{
    maps::{Map, MapData, MapError, MapInfo},
    programs::{ProgramError, SkReuseport, sk_reuseport::SkReuseportAttachType},
};
use aya_obj::generated::bpf_prog_type;

use super::{DataplaneError, Result};
use crate::object::MapSpec;

/// Raises the locked-memory limit as far as allowed: kernels before 5.11 charge BPF maps
/// to it, and the table alone is 256 KiB. Later kernels ignore it; a failure is harmless
/// here and explained by the map creation that then fails.
pub(super) fn raise_memlock() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Memlock);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Memlock, limit);
}

/// Turns a program error into one that says what was being done and names the pin.
pub(super) fn program_error(
    path: &Path,
    action: String,
) -> impl FnOnce(ProgramError) -> DataplaneError {
    let path = path.to_path_buf();
    move |source| DataplaneError::Program {
        action,
        path,
        source: Box::new(source),
    }
}

/// Opens the program pinned at `path`, refusing anything but an `SK_REUSEPORT` program.
pub(super) fn open_program(path: &Path) -> Result<SkReuseport> {
    let error = |action: &str| program_error(path, action.to_owned());
    let program = SkReuseport::from_pin(path, SkReuseportAttachType::SelectOrMigrate)
        .map_err(error("opening the pinned program"))?;
    let found = program
        .info()
        .map_err(error("reading the pinned program's type"))?
        .program_type();
    if found == bpf_prog_type::BPF_PROG_TYPE_SK_REUSEPORT {
        Ok(program)
    } else {
        Err(DataplaneError::ProgramMismatch {
            path: path.to_path_buf(),
            found: format!("{found:?}"),
        })
    }
}

/// Opens the map `name` pinned in `dir`, checked against its spec among `specs`.
pub(super) fn open_named(dir: &Path, specs: &[MapSpec], name: &'static str) -> Result<MapData> {
    let spec = specs
        .iter()
        .find(|spec| spec.name == name)
        .ok_or(crate::object::ObjectError::MissingMap(name))?;
    open_map(dir, spec)
}

/// Opens the map pinned at `dir/spec.name` after checking it against `spec`.
pub(super) fn open_map(dir: &Path, spec: &MapSpec) -> Result<MapData> {
    let path = dir.join(spec.name);
    check_pin(&path, spec)?;
    MapData::from_pin(&path).map_err(|source| DataplaneError::OpenPin {
        path,
        source: Box::new(source),
    })
}

/// Refuses a pin that is not exactly the map `spec` describes.
pub(super) fn check_pin(path: &Path, spec: &MapSpec) -> Result<()> {
    let info = MapInfo::from_pin(path).map_err(|source| DataplaneError::OpenPin {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let found_type = info
        .map_type()
        .map_or_else(|e| e.to_string(), |t| format!("{t:?}"));
    let expected_type = map_type_name(spec.map_type);
    let checks = [
        ("map type", found_type, expected_type),
        (
            "key size",
            info.key_size().to_string(),
            spec.key_size.to_string(),
        ),
        (
            "value size",
            info.value_size().to_string(),
            spec.value_size.to_string(),
        ),
        (
            "max entries",
            info.max_entries().to_string(),
            spec.max_entries.to_string(),
        ),
        (
            "flags",
            format!("{:#x}", info.map_flags()),
            format!("{:#x}", spec.flags),
        ),
    ];
    match checks
        .into_iter()
        .find(|(_, found, expected)| found != expected)
    {
        Some((what, found, expected)) => Err(DataplaneError::PinMismatch {
            path: path.to_path_buf(),
            what,
            found,
            expected,
        }),
        None => Ok(()),
    }
}

/// The name aya gives a raw `bpf_map_type`, as [`MapInfo::map_type`] reports a pin's.
pub(super) fn map_type_name(raw: u32) -> String {
    aya_obj::generated::bpf_map_type::try_from(raw)
        .ok()
        .and_then(|t| aya::maps::MapType::try_from(t).ok())
        .map_or_else(|| format!("type {raw}"), |t| format!("{t:?}"))
}

/// Converts an opened map into its typed aya handle.
pub(super) fn typed<T>(dir: &Path, name: &str, data: MapData) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(|source| DataplaneError::OpenPin {
            path,
            source: Box::new(source),
        })
}

pub(super) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataplaneError::PinIo {
            action: "unpinning",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}
