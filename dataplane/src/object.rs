//! The eBPF object this binary was built with, and what its maps must look like. Parsing
//! only, no syscalls: the edge compares these specifications with what it finds pinned.
use portshard_common::names;

/// The compiled program, embedded at build time from `OUT_DIR` (see `build.rs`), so the
/// binary can never load an object other than the one built from its own sources.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portshard.bpf.o"));

/// What a map must be for this build's program to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    /// Map (and pin file) name.
    pub name: &'static str,
    /// `bpf_map_type` number.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Number of entries.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
}

/// The object could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The ELF does not parse as an eBPF object.
    #[error("the embedded eBPF object does not parse: {0}")]
    Parse(#[from] aya_obj::ParseError),
    /// The program the userspace side loads is absent.
    #[error("the embedded eBPF object has no program named `{0}`; it was built from other sources")]
    MissingProgram(&'static str),
    /// A map the userspace side relies on is absent.
    #[error("the embedded eBPF object has no map named `{0}`; it was built from other sources")]
    MissingMap(&'static str),
}

/// The specifications of every map in [`names::MAPS`], as `object` defines them, with the
/// flow table sized for `flow_capacity` flows (its size is per service, set at load time).
pub fn map_specs(object: &[u8], flow_capacity: u32) -> Result<Vec<MapSpec>, ObjectError> {
    let parsed = aya_obj::Object::parse(object)?;
    names::MAPS
        .iter()
        .map(|&name| {
            let map = parsed.maps.get(name).ok_or(ObjectError::MissingMap(name))?;
            Ok(MapSpec {
                name,
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: if name == names::FLOWS {
                    flow_capacity
                } else {
                    map.max_entries()
                },
                flags: map.map_flags(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use portshard_common::{
        ADMIT_SIZE, BPF_F_MMAPABLE, Counters, Flow, FlowCounters, FlowKey, MAX_LISTENERS,
        MAX_SLOTS, PendingFlow, ProbeHealth, ProbeRoute, ServiceMeta, SlotCookies, SlotMeta, Table,
        quic::{QuicCounters, QuicKey},
    };

    use super::*;

    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;

    /// The kernel side and the user side agree on every map, because both are built from
    /// `portshard-common`; this checks that the embedded object really was.
    #[test]
    fn embedded_object_matches_the_shared_layout() {
        let specs = map_specs(OBJECT, 1234).unwrap();
        let expected = [
            (
                names::SOCKETS,
                BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
                4,
                4,
                MAX_SLOTS,
                0,
            ),
            (
                names::TABLE,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<Table>(),
                1,
                BPF_F_MMAPABLE,
            ),
            (
                names::SLOTS,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<SlotMeta>(),
                MAX_SLOTS,
                0,
            ),
            (
                names::COUNTERS,
                BPF_MAP_TYPE_PERCPU_ARRAY,
                4,
                size_of::<Counters>(),
                1,
                0,
            ),
            (
                names::SERVICE,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<ServiceMeta>(),
                1,
                0,
            ),
            (
                names::FLOWS,
                BPF_MAP_TYPE_HASH,
                size_of::<FlowKey>(),
                size_of::<Flow>(),
                1234,
                0,
            ),
            (
                names::PROBES,
                BPF_MAP_TYPE_HASH,
                4,
                size_of::<ProbeRoute>(),
                MAX_SLOTS,
                0,
            ),
            (
                names::HEALTH,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<ProbeHealth>(),
                MAX_SLOTS,
                0,
            ),
            (names::LAYOUT, BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0),
            (
                names::ADMISSION,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<PendingFlow>(),
                ADMIT_SIZE,
                0,
            ),
            (
                names::FLOW_COUNTERS,
                BPF_MAP_TYPE_PERCPU_ARRAY,
                4,
                size_of::<FlowCounters>(),
                1,
                0,
            ),
            (names::FLOW_SWEPT, BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0),
            (
                names::QUIC_COUNTERS,
                BPF_MAP_TYPE_PERCPU_ARRAY,
                4,
                size_of::<QuicCounters>(),
                1,
                0,
            ),
            (
                names::SOCKETS_1,
                BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
                4,
                4,
                MAX_SLOTS,
                0,
            ),
            (
                names::SOCKETS_2,
                BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
                4,
                4,
                MAX_SLOTS,
                0,
            ),
            (
                names::SOCKETS_3,
                BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
                4,
                4,
                MAX_SLOTS,
                0,
            ),
            (
                names::LISTENERS,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<ServiceMeta>(),
                MAX_LISTENERS as u32,
                0,
            ),
            (
                names::COOKIES,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<SlotCookies>(),
                MAX_SLOTS,
                0,
            ),
            (
                names::QUIC_KEY,
                BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<QuicKey>(),
                1,
                0,
            ),
        ];
        assert_eq!(specs.len(), expected.len());
        for (name, map_type, key_size, value_size, max_entries, flags) in expected {
            let spec = specs
                .iter()
                .find(|spec| spec.name == name)
                .unwrap_or_else(|| panic!("no map {name}"));
            assert_eq!(
                spec,
                &MapSpec {
                    name,
                    map_type,
                    key_size: key_size as u32,
                    value_size: value_size as u32,
                    max_entries,
                    flags
                }
            );
        }
    }

    /// Every listener's socket array is its own map, pinned under its own name.
    #[test]
    fn each_listener_has_a_socket_array() {
        let specs = map_specs(OBJECT, 1).unwrap();
        for name in names::LISTENER_SOCKETS {
            let spec = specs.iter().find(|spec| spec.name == name).unwrap();
            assert_eq!(spec.map_type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, "{name}");
        }
        for name in names::ADDED_IN_LAYOUT_4 {
            assert!(names::MAPS.contains(&name), "{name}");
        }
    }

    #[test]
    fn embedded_object_has_the_program() {
        let parsed = aya_obj::Object::parse(OBJECT).unwrap();
        assert!(parsed.programs.contains_key(names::PROGRAM));
    }

    #[test]
    fn garbage_is_a_parse_error() {
        let error = map_specs(b"not an elf", 1).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the embedded eBPF object does not parse")
        );
    }
}
