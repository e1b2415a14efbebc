//! The kernel side of one service: its program and maps, loaded from the embedded object and
//! pinned under `<root>/<service>/`, and the few operations userspace performs on them.
//!
//! Everything here is a thin wrapper over a syscall. The pins are the state: a handle is
//! always opened from them, so the process that created them and one that comes later see
//! the same program and maps.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, ReusePortSockArray},
    programs::SkReuseport,
};
use portshard_common::{
    Counters, Flow, FlowCounters, FlowKey, MAX_SLOTS, PIN_LAYOUT, ProbeHealth, ProbeRoute,
    ServiceMeta, SlotCookies, SlotMeta, TABLE_SIZE, TableEntry, names,
    quic::{QuicCounters, QuicKey, TABLE_QUIC},
};
use portshard_core::supervisor::Switches;

mod batch;
mod error;
mod flows;
mod layout;
mod listeners;
mod mapped;
mod pinned;
mod probes;
mod program;
mod quic;
mod records;

pub use error::DataplaneError;
use error::Result;
pub use flows::Sweep;
use mapped::MappedTable;
use pinned::{check_pin, open_named, open_program, program_error, remove_if_present, typed};
pub use program::{Adopted, LoadedProgram, format_tag};
pub use records::{PinnedRecords, SlotRecords};

use crate::{
    bpffs,
    object::{self, OBJECT},
    report::{FlowReport, FlowTableReport, QuicReport, ServiceStatus, TableReport},
    table::Slot,
};

/// The clock the program stamps flows with (`bpf_ktime_get_coarse_ns`), in nanoseconds:
/// what a flow written from userspace must be stamped with to count as just seen.
pub fn coarse_now_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Checks that `name` can be a service's pin directory: 1 to 32 of `a-z`, `0-9`, `-`.
pub fn check_service_name(name: &str) -> Result<()> {
    if portshard_core::service::is_valid_name(name) {
        Ok(())
    } else {
        Err(DataplaneError::BadServiceName {
            name: name.to_owned(),
        })
    }
}

/// An open handle on one service's pinned program and maps.
pub struct Dataplane {
    dir: PathBuf,
    program: SkReuseport,
    /// The socket array of each listener, by index ([`names::LISTENER_SOCKETS`]).
    sockets: Vec<ReusePortSockArray<MapData>>,
    /// What each listener listens on.
    listeners: Array<MapData, ServiceMeta>,
    /// How many listeners the service has, as recorded (1 when none is).
    listener_count: usize,
    /// The cookies of each slot's sockets, listener by listener.
    cookies: Array<MapData, SlotCookies>,
    records: PinnedRecords,
    counters: PerCpuArray<MapData, Counters>,
    flows: HashMap<MapData, FlowKey, Flow>,
    flow_counters: PerCpuArray<MapData, FlowCounters>,
    quic_counters: PerCpuArray<MapData, QuicCounters>,
    quic_key: Array<MapData, QuicKey>,
    flow_swept: Array<MapData, u64>,
    flow_capacity: u32,
    probes: HashMap<MapData, u32, ProbeRoute>,
    health: Array<MapData, ProbeHealth>,
    table: MappedTable,
}

impl Dataplane {
    /// Loads the program for `service` and pins it and its maps under `root/service/`,
    /// mounting the BPF filesystem if needed, with room for `flow_capacity` flows in the
    /// flow table (at least 1). Maps already pinned there are reused if, and only if, they
    /// are exactly what this build expects; anything else is refused.
    pub fn create(root: &Path, service: &str, flow_capacity: u32) -> Result<Self> {
        check_service_name(service)?;
        let dir = root.join(service);
        bpffs::ensure_dir(&dir)?;
        let flow_capacity = flow_capacity.max(1);
        for spec in object::map_specs(OBJECT, flow_capacity)? {
            let path = dir.join(spec.name);
            if path.exists() {
                check_pin(&path, &spec)?;
            }
        }
        match layout::pinned_layout(&dir)? {
            _ if !dir.join(names::LAYOUT).exists() => {
                layout::pin_layout(&dir, PIN_LAYOUT).inspect_err(|_| {
                    // Nothing was pinned; leave no empty directory behind (one with other pins
                    // in it stays).
                    let _ = std::fs::remove_dir(&dir);
                })?
            }
            PIN_LAYOUT => {}
            found => {
                return Err(DataplaneError::UnknownLayout {
                    dir,
                    source: portshard_core::layout::UnknownLayout { found },
                });
            }
        }
        let loaded = LoadedProgram::load(&dir, flow_capacity).inspect_err(|_| {
            // Nothing but the layout was pinned; leave no such directory behind (one with
            // other pins in it stays).
            let _ = std::fs::remove_file(dir.join(names::LAYOUT));
            let _ = std::fs::remove_dir(&dir);
        })?;
        loaded.pin()?;
        Self::open_dir(dir)
    }

    /// Opens the pins of `service` under `root`, checking every map against this build.
    pub fn open(root: &Path, service: &str) -> Result<Self> {
        check_service_name(service)?;
        Self::open_dir(root.join(service))
    }

    fn open_dir(dir: PathBuf) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DataplaneError::NotPinned { dir });
        }
        // The flow table's size is the service's own; everything else is this build's.
        let flow_capacity = layout::pinned_flow_capacity(&dir)?;
        let specs = object::map_specs(OBJECT, flow_capacity)?;
        let open = |name: &'static str| open_named(&dir, &specs, name);
        let sockets = names::LISTENER_SOCKETS
            .iter()
            .map(|&name| typed(&dir, name, open(name)?))
            .collect::<Result<Vec<_>>>()?;
        let listeners: Array<MapData, ServiceMeta> =
            typed(&dir, names::LISTENERS, open(names::LISTENERS)?)?;
        let cookies = typed(&dir, names::COOKIES, open(names::COOKIES)?)?;
        let records = PinnedRecords::open_in(&dir, &specs)?;
        let counters = typed(&dir, names::COUNTERS, open(names::COUNTERS)?)?;
        let flows = typed(&dir, names::FLOWS, open(names::FLOWS)?)?;
        let flow_counters = typed(&dir, names::FLOW_COUNTERS, open(names::FLOW_COUNTERS)?)?;
        let flow_swept = typed(&dir, names::FLOW_SWEPT, open(names::FLOW_SWEPT)?)?;
        let quic_counters = typed(&dir, names::QUIC_COUNTERS, open(names::QUIC_COUNTERS)?)?;
        let quic_key = typed(&dir, names::QUIC_KEY, open(names::QUIC_KEY)?)?;
        let probes = typed(&dir, names::PROBES, open(names::PROBES)?)?;
        let health = typed(&dir, names::HEALTH, open(names::HEALTH)?)?;
        let table = MappedTable::new(open(names::TABLE)?, &dir.join(names::TABLE))?;
        let program = open_program(&dir.join(names::PROGRAM))?;
        let mut dataplane = Self {
            dir,
            program,
            sockets,
            listeners,
            listener_count: 1,
            cookies,
            records,
            counters,
            flows,
            flow_counters,
            quic_counters,
            quic_key,
            flow_swept,
            flow_capacity,
            probes,
            health,
            table,
        };
        dataplane.listener_count = dataplane.listener_records()?.len().max(1);
        Ok(dataplane)
    }

    /// The services pinned under `root`: every directory there, by name. Empty when `root`
    /// does not exist.
    pub fn pinned_services(root: &Path) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(DataplaneError::PinIo {
                    action: "listing pin root",
                    path: root.to_path_buf(),
                    source,
                });
            }
        };
        let mut services = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| DataplaneError::PinIo {
                action: "listing pin root",
                path: root.to_path_buf(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && check_service_name(&name).is_ok() {
                services.push(name);
            }
        }
        services.sort();
        Ok(services)
    }

    /// Refuses a pin root that holds anything but services' pins, so a daemon never
    /// overwrites another program's state (see [`bpffs::check_root`]).
    pub fn check_root(root: &Path) -> Result<()> {
        let pins: Vec<&str> = names::MAPS
            .iter()
            .copied()
            .chain([names::PROGRAM, names::PROGRAM_STAGED, names::LEGACY_FLOWS])
            .collect();
        Ok(bpffs::check_root(
            root,
            |name| check_service_name(name).is_ok(),
            &pins,
        )?)
    }

    /// Everything `status` shows about this service, read from the pins.
    pub fn status(&self) -> Result<ServiceStatus> {
        let service = self.service()?;
        let flow_table = if service.flow_table > 0 {
            Some(FlowTableReport::new(
                self.flow_capacity,
                self.flows_held()?,
                self.flows_swept()?,
                &self.counters()?,
                &self.flow_counters()?,
            ))
        } else {
            None
        };
        let flags = self.table.flags();
        let quic = if flags & TABLE_QUIC != 0 {
            Some(QuicReport::new(flags, &self.quic_counters()?))
        } else {
            None
        };
        Ok(
            ServiceStatus::new(&service, self.table_report()?, flow_table)
                .with_quic(quic)
                .with_listeners(&self.listener_records()?)
                .with_program(format_tag(self.program_tag()?), self.layout()?),
        )
    }

    /// Everything `table` shows about this service, read from the pins.
    pub fn table_report(&self) -> Result<TableReport> {
        let metas = (0..MAX_SLOTS as Slot)
            .map(|slot| self.meta(slot))
            .collect::<Result<Vec<_>>>()?;
        let health = (0..MAX_SLOTS as Slot)
            .map(|slot| self.health(slot))
            .collect::<Result<Vec<_>>>()?;
        Ok(TableReport::new(
            &self.name(),
            &self.read_entries(),
            &metas,
            &self.counters()?,
        )
        .with_health(&health)
        .with_probe_sources(&self.probe_sources()))
    }

    /// Records what the service listens on (see [`ServiceMeta`]).
    pub fn set_service(&mut self, meta: ServiceMeta) -> Result<()> {
        self.records.set_service(meta)
    }

    /// What the service listens on, as recorded by [`Dataplane::set_service`].
    pub fn service(&self) -> Result<ServiceMeta> {
        self.records.service()
    }

    /// The service's name: its pin directory's.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }

    /// The service's pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Attaches the program to the reuseport group of `socket`, which must already be bound
    /// (and, for TCP, listening): attaching to a lone socket before `listen()` would make
    /// the group's other sockets fail to listen. The group keeps the program until its
    /// last socket closes, whatever happens to this process.
    pub fn attach(&self, socket: BorrowedFd<'_>) -> Result<()> {
        let action = format!(
            "attaching the program to the reuseport group of socket fd {}",
            socket.as_raw_fd()
        );
        self.program
            .attach(socket)
            .map_err(program_error(&self.dir.join(names::PROGRAM), action))
    }

    /// Records `meta` for `slot` and puts `socket` in it. The record goes first: the
    /// program delivers a known flow to its slot only while the slot's recorded generation
    /// is the flow's, so a socket of a new generation placed in a slot an old one used never
    /// receives the old flows. If the socket cannot be placed, the old record is restored.
    pub fn place(&mut self, slot: Slot, socket: BorrowedFd<'_>, meta: SlotMeta) -> Result<()> {
        self.place_all(slot, &[socket], meta)
    }

    /// Records `meta` as `slot`'s metadata.
    pub fn set_meta(&mut self, slot: Slot, meta: SlotMeta) -> Result<()> {
        self.records.set_slot_record(slot, meta)
    }

    /// Turns a map error into one that names what was being done and the map's pin.
    fn map_error(
        &self,
        map: &str,
        action: String,
    ) -> impl FnOnce(MapError) -> DataplaneError + use<> {
        let path = self.dir.join(map);
        move |source| DataplaneError::Map {
            action,
            path,
            source: Box::new(source),
        }
    }

    /// `slot`'s recorded metadata.
    pub fn meta(&self, slot: Slot) -> Result<SlotMeta> {
        self.records.slot_record(slot)
    }

    /// Writes `entries[i]` into the kernel's table for each `i` in `indices`. Each entry is
    /// one atomic 32-bit store into the mapped table: no syscall, and the program never sees
    /// half an entry. Nothing is written unless `entries` is a whole table and every index
    /// is inside it.
    pub fn write_entries(&self, entries: &[TableEntry], indices: &[u32]) -> Result<()> {
        let path = || self.dir.join(names::TABLE);
        if entries.len() != TABLE_SIZE {
            return Err(DataplaneError::TableLength {
                path: path(),
                len: entries.len(),
            });
        }
        if let Some(&index) = indices.iter().find(|&&i| i as usize >= TABLE_SIZE) {
            return Err(DataplaneError::TableIndex {
                path: path(),
                index,
            });
        }
        for &index in indices {
            self.table.store(index as usize, entries[index as usize]);
        }
        Ok(())
    }

    /// Writes the whole table `entries` (see [`Dataplane::write_entries`]).
    pub fn write_all(&self, entries: &[TableEntry]) -> Result<()> {
        let all: Vec<u32> = (0..TABLE_SIZE as u32).collect();
        self.write_entries(entries, &all)
    }

    /// The kernel's table as it is now.
    pub fn read_entries(&self) -> Vec<TableEntry> {
        (0..TABLE_SIZE).map(|i| self.table.load(i)).collect()
    }

    /// Sets the switches the program reads beside the table: one atomic store each,
    /// which the program sees on its next run.
    pub fn set_switches(&self, switches: Switches) {
        self.table.set_flow_idle(switches.flow_idle_s);
        self.table.set_flags(switches.flags);
    }

    /// The switches as the program reads them.
    pub fn switches(&self) -> Switches {
        Switches {
            flags: self.table.flags(),
            flow_idle_s: self.table.flow_idle(),
        }
    }

    /// Everything `portshard flows` shows about this service, read from the pins.
    pub fn flow_report(&self) -> Result<FlowReport> {
        let name = self.name();
        Ok(FlowReport::new(
            &name,
            self.flow_capacity,
            &self.flows()?,
            coarse_now_ns(),
        ))
    }

    /// How many flows the flow table holds at most.
    pub fn flow_capacity(&self) -> u32 {
        self.flow_capacity
    }

    /// The program's counters, summed over all CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let per_cpu = self
            .counters
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                action: "reading the counters".to_owned(),
                path: self.dir.join(names::COUNTERS),
                source: Box::new(source),
            })?;
        let mut sum = Counters::ZERO;
        per_cpu.iter().for_each(|cpu| sum.add(cpu));
        Ok(sum)
    }

    /// Unpins the service's program and maps and removes its directory. Groups the program
    /// is attached to keep it until their last socket closes.
    pub fn remove_pins(root: &Path, service: &str) -> Result<()> {
        check_service_name(service)?;
        let dir = root.join(service);
        for name in names::MAPS.iter().chain([
            &names::PROGRAM,
            &names::PROGRAM_STAGED,
            &names::LEGACY_FLOWS,
        ]) {
            remove_if_present(&dir.join(name))?;
        }
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataplaneError::PinIo {
                action: "removing pin directory",
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_checked() {
        for good in ["dns", "a", "web-1", &"x".repeat(32)] {
            check_service_name(good).unwrap();
        }
        for bad in ["", "DNS", "a/b", "..", "a_b", &"x".repeat(33)] {
            let error = check_service_name(bad).unwrap_err().to_string();
            assert!(error.contains("use 1 to 32 characters"), "{bad:?}: {error}");
        }
    }
}
