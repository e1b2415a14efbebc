//! What `portshard table` and `portshard status` show: per slot, the entries it owns, its
//! share, who inherits its entries and what the program counted; the table's balance; and
//! what each service listens on. Computed from what is pinned, without syscalls.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use portshard_common::{
    Counters, Flow, FlowCounters, FlowKey, MAX_SLOTS, NO_SLOT, ProbeHealth, ProbeState,
    ServiceMeta, SlotCounters, SlotMeta, SlotState, TABLE_SIZE, TableEntry,
};
use serde::Serialize;

use crate::{
    ownership::ForeignSocket,
    service::{Listener, Proto},
    table::Slot,
};

mod quic;
pub use quic::{QuicReport, QuicSlotReport};

/// One slot's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotReport {
    /// Slot number.
    pub slot: Slot,
    /// `live`, `dead`, `draining`, `starting` or `free`.
    pub state: &'static str,
    /// Process serving the slot's socket.
    pub pid: u32,
    /// Generation the slot belongs to.
    pub generation: u32,
    /// Weight in the table.
    pub weight: u32,
    /// How many times its worker was restarted.
    pub restarts: u32,
    /// Table entries it owns.
    pub entries: u32,
    /// The fraction of the table (and so of new flows) it owns.
    pub share: f64,
    /// How many of its entries each other slot inherits, by slot.
    pub heirs: BTreeMap<Slot, u32>,
    /// The program's counters for the slot.
    pub counters: SlotCounters,
    /// The health probe's verdict on its worker: `none` (no probe, or not probed yet),
    /// `passing` or `failing`.
    pub probe: &'static str,
    /// Probes failed in a row.
    pub probe_failures: u32,
    /// The address and port its health probes come from (the program sends packets from
    /// there, and only from there, to this slot); `null` if it is not probed.
    pub probe_source: Option<String>,
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableReport {
    /// Service name.
    pub service: String,
    /// Slots that own entries or have a record.
    pub slots: Vec<SlotReport>,
    /// Largest `entries / (TABLE_SIZE * weight / total weight)` over the owning slots: 1.0
    /// is perfect; rounding to whole entries allows up to `1 + 1 / exact share` (with equal
    /// weights, `1 + N / TABLE_SIZE`).
    pub balance: f64,
    /// Program runs that found no live slot and let the kernel's hash choose.
    pub fell_through: u64,
}

impl TableReport {
    /// Summarises `entries`, the slot records `metas` (indexed by slot; any beyond
    /// `MAX_SLOTS` are ignored) and `counters`.
    pub fn new(
        service: &str,
        entries: &[TableEntry],
        metas: &[SlotMeta],
        counters: &Counters,
    ) -> Self {
        let mut owned = vec![0u32; MAX_SLOTS as usize];
        let mut heirs = vec![BTreeMap::<Slot, u32>::new(); MAX_SLOTS as usize];
        for entry in entries.iter().filter(|e| u32::from(e.owner) < MAX_SLOTS) {
            owned[usize::from(entry.owner)] += 1;
            if entry.heir != NO_SLOT {
                *heirs[usize::from(entry.owner)]
                    .entry(entry.heir)
                    .or_default() += 1;
            }
        }
        let slots: Vec<SlotReport> = metas
            .iter()
            .take(MAX_SLOTS as usize)
            .enumerate()
            .filter(|&(slot, meta)| owned[slot] > 0 || meta.state != SlotState::Free as u32)
            .map(|(slot, meta)| SlotReport {
                slot: slot as Slot,
                state: state_name(meta.state),
                pid: meta.pid,
                generation: meta.generation,
                weight: meta.weight,
                restarts: meta.restarts,
                entries: owned[slot],
                share: f64::from(owned[slot]) / TABLE_SIZE as f64,
                heirs: std::mem::take(&mut heirs[slot]),
                counters: counters.slots[slot],
                probe: probe_name(ProbeState::Unprobed as u32),
                probe_failures: 0,
                probe_source: None,
            })
            .collect();
        let owners = || slots.iter().filter(|s| s.entries > 0);
        let total_weight: f64 = owners().map(|s| f64::from(s.weight.max(1))).sum();
        let balance = owners()
            .map(|s| {
                f64::from(s.entries)
                    / (TABLE_SIZE as f64 * f64::from(s.weight.max(1)) / total_weight)
            })
            .fold(0.0, f64::max);
        Self {
            service: service.to_owned(),
            slots,
            balance,
            fell_through: counters.fell_through,
        }
    }
}

impl TableReport {
    /// Adds the probe results `health` (indexed by slot) to each slot's line.
    pub fn with_health(mut self, health: &[ProbeHealth]) -> Self {
        for slot in &mut self.slots {
            if let Some(h) = health.get(usize::from(slot.slot)) {
                slot.probe = probe_name(h.state);
                slot.probe_failures = h.failures;
            }
        }
        self
    }

    /// Adds where each probed slot's probes come from.
    pub fn with_probe_sources(mut self, sources: &BTreeMap<Slot, SocketAddr>) -> Self {
        for slot in &mut self.slots {
            slot.probe_source = sources.get(&slot.slot).map(SocketAddr::to_string);
        }
        self
    }
}

/// The name of a recorded probe state.
fn probe_name(state: u32) -> &'static str {
    match ProbeState::from_raw(state) {
        Some(ProbeState::Passing) => "passing",
        Some(ProbeState::Failing) => "failing",
        Some(ProbeState::Unprobed) | None => "none",
    }
}

/// One service as `portshard status` shows it: the design's stable fields (`name`,
/// `proto`, `listen`, `mode`, and per slot `slot`, `pid`, `state`, `entries`,
/// `generation`) and more, among them `foreign` (`cookie`, `address`, `pids`, `uid`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// `udp` or `tcp`.
    pub proto: &'static str,
    /// The address its workers listen on (its first listener's).
    pub listen: String,
    /// Every listener, `PROTO:ADDRESS` in config order (the first is `proto` and `listen`).
    pub listeners: Vec<String>,
    /// `balance` or `handover`.
    pub mode: &'static str,
    /// See [`TableReport::balance`].
    pub balance: f64,
    /// See [`TableReport::fell_through`].
    pub fell_through: u64,
    /// Slots that own entries or have a record.
    pub slots: Vec<SlotReport>,
    /// The generations that have slots, oldest first.
    pub generations: Vec<GenerationReport>,
    /// The UDP flow table, if the service has one.
    pub flow_table: Option<FlowTableReport>,
    /// QUIC connection-ID steering, if the service has it (`quic = true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<QuicReport>,
    /// The pinned program's tag (16 hex digits, as `bpftool prog` shows it): which build's
    /// program steers the group.
    pub program_tag: String,
    /// The layout the service's pins are in (see [`portshard_common::PIN_LAYOUT`]).
    pub pin_layout: u32,
    /// Sockets of other processes sharing its address (in its reuseport group, or
    /// overlapping it through a wildcard; see [`crate::ownership`]): each takes flows meant
    /// for the service, so an operator must know.
    pub foreign: Vec<ForeignSocket>,
}

/// One generation of a service's workers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationReport {
    /// Its number: each reload starts the next one.
    pub generation: u32,
    /// `starting` (its workers are not switched to yet), `ready` (it takes new work),
    /// `draining` (it keeps only what it has) or `exited`.
    pub state: &'static str,
    /// Its slots.
    pub slots: Vec<Slot>,
}

/// The flow table's use: how often known flows were found, how many were admitted, swept
/// as idle or could not be kept, and what floods of new flows did to admission.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowTableReport {
    /// Flows it holds at most.
    pub capacity: u32,
    /// Flows it holds now.
    pub flows: u64,
    /// Datagrams of known flows delivered to their slot.
    pub hits: u64,
    /// Flows entered (admitted on their second datagram).
    pub new: u64,
    /// Datagrams of known flows whose slot's socket was gone (steered by the table again).
    pub owner_gone: u64,
    /// Flows the daemon removed as idle past `flow_idle`.
    pub swept: u64,
    /// The program's flow table events: first datagrams recorded for admission, records
    /// displaced before their second datagram, flows not kept because the table was full,
    /// flows found expired, and flows whose slot held another generation.
    #[serde(flatten)]
    pub events: FlowCounters,
}

impl FlowTableReport {
    /// The flow table of `capacity` holding `flows` now, `swept` removed as idle so far,
    /// with the program's `counters` and flow table `events`.
    pub fn new(
        capacity: u32,
        flows: u64,
        swept: u64,
        counters: &Counters,
        events: &FlowCounters,
    ) -> Self {
        Self {
            capacity,
            flows,
            hits: counters.slots.iter().map(|s| s.flow_hits).sum(),
            new: counters.flows_new,
            owner_gone: counters.flows_owner_gone,
            swept,
            events: *events,
        }
    }
}

/// The generations of `slots`, oldest first, each in the state of its most advanced slot.
pub fn generations(slots: &[SlotReport]) -> Vec<GenerationReport> {
    let mut by_generation: BTreeMap<u32, Vec<&SlotReport>> = BTreeMap::new();
    for slot in slots.iter().filter(|s| s.state != "free") {
        by_generation.entry(slot.generation).or_default().push(slot);
    }
    by_generation
        .into_iter()
        .map(|(generation, slots)| {
            let any = |state: &str| slots.iter().any(|s| s.state == state);
            let state = if any("starting") {
                "starting"
            } else if any("live") {
                "ready"
            } else if any("draining") {
                "draining"
            } else {
                "exited"
            };
            GenerationReport {
                generation,
                state,
                slots: slots.iter().map(|s| s.slot).collect(),
            }
        })
        .collect()
}

/// One flow of the flow table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowLine {
    /// The flow's source address and port.
    pub source: SocketAddr,
    /// The kernel's hash of the flow's 4-tuple.
    pub hash: u32,
    /// The slot it belongs to.
    pub slot: Slot,
    /// That slot's generation when the flow was placed.
    pub generation: u32,
    /// Milliseconds since its latest datagram.
    pub idle_ms: u64,
}

/// The flows of one slot and generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowGroup {
    /// The slot.
    pub slot: Slot,
    /// The generation.
    pub generation: u32,
    /// How many flows.
    pub flows: usize,
    /// Milliseconds since the latest datagram of any of them.
    pub least_idle_ms: u64,
}

/// What `portshard flows` prints: the flow table, flow by flow and per slot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowReport {
    /// Service name.
    pub service: String,
    /// Flows the table holds at most.
    pub capacity: u32,
    /// Per slot and generation, by slot.
    pub by_slot: Vec<FlowGroup>,
    /// Every flow, by source.
    pub flows: Vec<FlowLine>,
}

impl FlowReport {
    /// Summarises `flows` of a table of `capacity`, read at coarse monotonic time `now_ns`
    /// (the program's clock).
    pub fn new(service: &str, capacity: u32, flows: &[(FlowKey, Flow)], now_ns: u64) -> Self {
        let mut lines: Vec<FlowLine> = flows
            .iter()
            .map(|(key, flow)| FlowLine {
                source: key.source(),
                hash: key.hash,
                slot: flow.slot,
                generation: flow.generation,
                idle_ms: now_ns.saturating_sub(flow.last_seen) / 1_000_000,
            })
            .collect();
        lines.sort_by_key(|line| (line.source, line.hash));
        let mut groups: BTreeMap<(Slot, u32), FlowGroup> = BTreeMap::new();
        for line in &lines {
            let group = groups
                .entry((line.slot, line.generation))
                .or_insert(FlowGroup {
                    slot: line.slot,
                    generation: line.generation,
                    flows: 0,
                    least_idle_ms: u64::MAX,
                });
            group.flows += 1;
            group.least_idle_ms = group.least_idle_ms.min(line.idle_ms);
        }
        Self {
            service: service.to_owned(),
            capacity,
            by_slot: groups.into_values().collect(),
            flows: lines,
        }
    }
}

/// Everything `portshard status --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// The pinned services, by name.
    pub services: Vec<ServiceStatus>,
}

impl ServiceStatus {
    /// The status of a service recorded as `service`, whose table is `table`, with its
    /// flow table's figures if it has one.
    pub fn new(
        service: &ServiceMeta,
        table: TableReport,
        flow_table: Option<FlowTableReport>,
    ) -> Self {
        let proto = match service.proto {
            PROTO_TCP => "tcp",
            PROTO_UDP => "udp",
            _ => "unknown",
        };
        let listen = listen_address(service).to_string();
        Self {
            name: table.service,
            proto,
            listeners: vec![format!("{proto}:{listen}")],
            listen,
            mode: if service.mode == 1 {
                "handover"
            } else {
                "balance"
            },
            balance: table.balance,
            fell_through: table.fell_through,
            generations: generations(&table.slots),
            slots: table.slots,
            flow_table,
            quic: None,
            program_tag: String::new(),
            pin_layout: 0,
            foreign: Vec::new(),
        }
    }

    /// The same status, with the listeners the pins record (see
    /// [`portshard_common::names::LISTENERS`]); none recorded (pins of an older layout, or
    /// a service with one listener) keeps the one of the service record.
    pub fn with_listeners(self, listeners: &[ServiceMeta]) -> Self {
        let listeners: Vec<String> = listeners
            .iter()
            .filter_map(listener_of)
            .map(|listener| listener.to_string())
            .collect();
        if listeners.is_empty() {
            return self;
        }
        Self { listeners, ..self }
    }

    /// The same status, with the foreign sockets found on its address.
    pub fn with_foreign(self, foreign: Vec<ForeignSocket>) -> Self {
        Self { foreign, ..self }
    }

    /// The same status, with its QUIC connection-ID steering counters.
    pub fn with_quic(self, quic: Option<QuicReport>) -> Self {
        Self { quic, ..self }
    }

    /// The same status, with the pinned program's tag and the pins' layout.
    pub fn with_program(self, program_tag: String, pin_layout: u32) -> Self {
        Self {
            program_tag,
            pin_layout,
            ..self
        }
    }
}

/// IP protocol number of TCP, as [`ServiceMeta::proto`] records it.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP, as [`ServiceMeta::proto`] records it.
pub const PROTO_UDP: u8 = 17;

/// The socket address a [`ServiceMeta`] records.
pub fn listen_address(service: &ServiceMeta) -> SocketAddr {
    let ip = if service.family == 4 {
        let [a, b, c, d, ..] = service.addr;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(service.addr))
    };
    SocketAddr::new(ip, service.port)
}

/// The listener a [`ServiceMeta`] of the `listeners` records holds; `None` for an unused
/// (zero) record.
pub fn listener_of(meta: &ServiceMeta) -> Option<Listener> {
    let proto = match meta.proto {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    matches!(meta.family, 4 | 6).then(|| Listener::new(proto, listen_address(meta)))
}

/// The IP protocol number [`ServiceMeta::proto`] records for `proto`.
pub fn proto_number(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    }
}

/// The record of a service listening on `listen` with IP protocol `proto` in `mode`
/// (0 balance, 1 handover), with a flow table of `flow_table` flows (0: none).
pub fn service_meta(listen: SocketAddr, proto: u8, mode: u32, flow_table: u32) -> ServiceMeta {
    let (addr, family) = match listen.ip() {
        IpAddr::V4(v4) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&v4.octets());
            (addr, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    };
    ServiceMeta {
        addr,
        port: listen.port(),
        family,
        proto,
        mode,
        flow_table,
        reserved: 0,
    }
}

fn state_name(raw: u32) -> &'static str {
    match SlotState::from_raw(raw) {
        Some(SlotState::Free) => "free",
        Some(SlotState::Live) => "live",
        Some(SlotState::Dead) => "dead",
        Some(SlotState::Draining) => "draining",
        Some(SlotState::Starting) => "starting",
        None => "unknown",
    }
}

#[cfg(test)]
mod tests;
