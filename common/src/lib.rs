//! Everything that crosses the kernel boundary: the layout of each map value, the map and
//! program names, and the constants both the eBPF program and userspace build on.
//!
//! Every type is `#[repr(C)]` and plain data. With the `user` feature they implement
//! `aya::Pod`, so userspace reads and writes exactly the bytes the program sees.
#![no_std]
#![warn(missing_docs)]

/// Number of entries in a service's lookup table. A flow's entry is `hash & TABLE_MASK`.
///
/// A power of two so the program indexes with a mask, and large enough that rounding shares
/// to whole entries costs little: with equal weights, `balance <= 1 + N / TABLE_SIZE`.
pub const TABLE_SIZE: usize = 1 << 16;

/// Mask that turns the kernel's 4-tuple hash into a table index.
pub const TABLE_MASK: u32 = TABLE_SIZE as u32 - 1;

/// Number of sockets (slots) a service can hold: live workers of every generation at once.
pub const MAX_SLOTS: u32 = 512;

/// Slot number that names no socket: an empty table entry, or an entry with no heir.
pub const NO_SLOT: u16 = u16::MAX;

/// Table entries the program tries after owner and heir are both gone, before it lets the
/// kernel's own hash pick (`SK_PASS` without a selection).
pub const PROBE_STEPS: u32 = 4;

/// Distance between probed entries: odd and near `TABLE_SIZE / golden ratio`, so the probed
/// entries, and therefore their owners, are unrelated to the first one.
pub const PROBE_STRIDE: u32 = 40_503;

/// `BPF_F_MMAPABLE`: the table map is memory-mapped by userspace, which rewrites changed
/// entries with plain atomic stores instead of one syscall per entry.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// QUIC-LB connection-ID steering: server IDs, the table's QUIC flags, the QUIC counters.
pub mod quic;

/// Names of the program and of the maps: ELF symbols on the eBPF side, pin file names
/// (`<bpffs root>/<service>/<name>`) on the user side. At most 15 bytes each (kernel limit).
pub mod names {
    /// The `SK_REUSEPORT` select-or-migrate program.
    pub const PROGRAM: &str = "steer";
    /// Where a new program is pinned before it is renamed over [`PROGRAM`] (the BPF
    /// filesystem refuses names with a dot).
    pub const PROGRAM_STAGED: &str = "steer_new";
    /// `REUSEPORT_SOCKARRAY`: slot number to socket, of the service's first listener.
    pub const SOCKETS: &str = "sockets";
    /// `REUSEPORT_SOCKARRAY` of the service's second listener (a reuseport group is per
    /// transport and address, and a socket array selects only within one group).
    pub const SOCKETS_1: &str = "sockets_1";
    /// `REUSEPORT_SOCKARRAY` of the service's third listener.
    pub const SOCKETS_2: &str = "sockets_2";
    /// `REUSEPORT_SOCKARRAY` of the service's fourth listener.
    pub const SOCKETS_3: &str = "sockets_3";
    /// The socket array of each listener, by listener index ([`crate::MAX_LISTENERS`]).
    pub const LISTENER_SOCKETS: [&str; crate::MAX_LISTENERS] =
        [SOCKETS, SOCKETS_1, SOCKETS_2, SOCKETS_3];
    /// Array of [`crate::ServiceMeta`], one per listener ([`crate::MAX_LISTENERS`]): what
    /// each of the service's listeners listens on; entries past the last listener are
    /// zero. Pins of layouts before 4 have none: their one listener is in [`SERVICE`].
    pub const LISTENERS: &str = "listeners";
    /// Array of [`crate::SlotCookies`], one per slot: the cookie of each of the slot's
    /// sockets, listener by listener, so a socket of any listener tells as portshard's.
    pub const COOKIES: &str = "slot_cookies";
    /// Array with one [`crate::Table`] value: the consistent lookup table.
    pub const TABLE: &str = "table";
    /// Array of [`crate::SlotMeta`], one per slot, for the CLI and for a restarting daemon.
    pub const SLOTS: &str = "slots";
    /// Per-CPU array with one [`crate::Counters`] value.
    pub const COUNTERS: &str = "counters";
    /// Array with one [`crate::ServiceMeta`] value: what the service listens on.
    pub const SERVICE: &str = "service";
    /// Hash from a UDP flow's [`crate::FlowKey`] to its [`crate::Flow`]: the flow table.
    pub const FLOWS: &str = "flow_table";
    /// Array of [`crate::PendingFlow`], [`crate::ADMIT_SIZE`] records: flows seen once,
    /// waiting for a second datagram to be admitted to the flow table.
    pub const ADMISSION: &str = "flow_admit";
    /// Per-CPU array with one [`crate::FlowCounters`] value: the flow table's events.
    pub const FLOW_COUNTERS: &str = "flow_events";
    /// Array with one `u64`: flows the daemon removed from the flow table as idle. Only
    /// userspace writes it; the table holds `flows_new` minus this many flows.
    pub const FLOW_SWEPT: &str = "flow_swept";
    /// The flow table of pin layouts 1 and 2 (an LRU hash keyed by the flow hash alone),
    /// removed when pins are migrated to layout 3.
    pub const LEGACY_FLOWS: &str = "flows";
    /// Hash of health-probe source port (`u32`) to its [`crate::ProbeRoute`].
    pub const PROBES: &str = "probes";
    /// Array of [`crate::ProbeHealth`], one per slot: the daemon's probe results.
    pub const HEALTH: &str = "health";
    /// Array with one `u32`: the pin layout version ([`crate::PIN_LAYOUT`]) the pins were
    /// written in, so a build never reuses pins it does not understand.
    pub const LAYOUT: &str = "layout";
    /// Per-CPU array with one [`crate::quic::QuicCounters`] value: how QUIC packets were
    /// steered.
    pub const QUIC_COUNTERS: &str = "quic_events";
    /// Every map the program's object defines, in a fixed order.
    pub const MAPS: [&str; 18] = [
        SOCKETS,
        TABLE,
        SLOTS,
        COUNTERS,
        SERVICE,
        FLOWS,
        PROBES,
        HEALTH,
        LAYOUT,
        ADMISSION,
        FLOW_COUNTERS,
        FLOW_SWEPT,
        QUIC_COUNTERS,
        SOCKETS_1,
        SOCKETS_2,
        SOCKETS_3,
        LISTENERS,
        COOKIES,
    ];
    /// The maps pin layout 3 added, created when older pins are migrated.
    pub const ADDED_IN_LAYOUT_3: [&str; 4] = [FLOWS, ADMISSION, FLOW_COUNTERS, FLOW_SWEPT];
    /// The maps pin layout 4 added (the QUIC counters, the other listeners' socket arrays,
    /// the listeners' addresses and their sockets' cookies), created when older pins are
    /// migrated.
    pub const ADDED_IN_LAYOUT_4: [&str; 6] = [
        QUIC_COUNTERS,
        SOCKETS_1,
        SOCKETS_2,
        SOCKETS_3,
        LISTENERS,
        COOKIES,
    ];
}

/// The version of the pin layout (which maps a service's pin directory holds, and the
/// shape of each) this build writes. Pins without a `layout` map are layout 1 (every
/// build before the version was recorded); layout 2 adds the `layout` map itself; layout 3
/// keys the flow table by the flow's source as well as its hash and adds admission, its
/// counters and the swept count; layout 4 adds the QUIC counters, the socket arrays of a
/// service's second to fourth listeners and the `listeners` records. A build migrates the layouts it knows in
/// place and refuses any other before touching it.
pub const PIN_LAYOUT: u32 = 4;

/// The most listeners (transport and address pairs) one service has, each its own
/// reuseport group with its own socket array; a worker holds one socket of each, all in
/// the same slot, so the one table steers every listener alike.
pub const MAX_LISTENERS: usize = 4;

/// Which of the four kinds of listening socket the program runs for: `(UDP) << 1 | (IPv6)`.
/// A service has at most one listener of each kind, so the kind finds the listener.
pub const fn listener_kind(udp: bool, ipv6: bool) -> u32 {
    ((udp as u32) << 1) | ipv6 as u32
}

/// First bit of the listener indexes in [`Table::flags`]: two bits per listener kind
/// ([`listener_kind`]), bits `16 + 2 * kind` and the next, hold the index (0 to 3) of the
/// service's listener of that kind, whose socket array the program selects from. A
/// single-listener service leaves them 0: its socket array is [`names::SOCKETS`].
pub const TABLE_LISTENER_SHIFT: u32 = 16;

/// The [`Table::flags`] bits that say the listener of `kind` is listener `index`.
pub const fn listener_flags(kind: u32, index: u32) -> u32 {
    (index & 3) << (TABLE_LISTENER_SHIFT + 2 * kind)
}

/// The index of the listener of `kind` recorded in `flags` (see [`listener_flags`]).
pub const fn listener_index(flags: u32, kind: u32) -> u32 {
    (flags >> (TABLE_LISTENER_SHIFT + 2 * kind)) & 3
}

/// The reference programs `cargo xtask bench` measures the program against, in their own
/// object (`portshard-reference`), never loaded by the daemon.
pub mod reference {
    /// Program that only returns `SK_PASS`: the floor of any `SK_REUSEPORT` program.
    pub const PASS: &str = "ref_pass";
    /// Program that does one array lookup and one `select_reuseport`.
    pub const SELECT: &str = "ref_select";
    /// `REUSEPORT_SOCKARRAY` of the reference group: slot number to socket.
    pub const SOCKETS: &str = "ref_sockets";
    /// Array of `u32`: the slot each masked hash goes to.
    pub const SLOT_OF: &str = "ref_slots";
    /// Entries of both maps; a power of two, so the hash is masked into the array.
    pub const SLOTS: u32 = 64;
    /// Program that does one lookup in an array as large as portshard's table and one
    /// `select_reuseport`: what any table-steered program pays for a table of that size.
    pub const SELECT_TABLE: &str = "ref_select_table";
    /// Array of `u32` of [`crate::TABLE_SIZE`] entries: the slot each masked hash goes to.
    pub const TABLE_SLOT_OF: &str = "ref_table";
    /// `REUSEPORT_SOCKARRAY` of [`SELECT_TABLE`]'s group (a socket array serves one group).
    pub const TABLE_SOCKETS: &str = "ref_table_sockets";
}

/// One lookup-table entry: the slot that owns the flows hashing here, and the slot that
/// takes them over if the owner's socket is gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableEntry {
    /// Slot whose socket receives flows of this entry; [`NO_SLOT`] when the table is empty.
    pub owner: u16,
    /// Slot that receives them while the owner's socket is closed; [`NO_SLOT`] if none.
    pub heir: u16,
}

impl TableEntry {
    /// An entry that names no socket: the program lets the kernel choose.
    pub const EMPTY: Self = Self {
        owner: NO_SLOT,
        heir: NO_SLOT,
    };

    /// The entry as the one 32-bit word userspace stores atomically into the mapped table,
    /// so the program never sees an owner from one version and an heir from another.
    pub const fn to_word(self) -> u32 {
        u32::from_ne_bytes(unsafe { core::mem::transmute::<Self, [u8; 4]>(self) })
    }

    /// The inverse of [`TableEntry::to_word`].
    pub const fn from_word(word: u32) -> Self {
        unsafe { core::mem::transmute::<[u8; 4], Self>(word.to_ne_bytes()) }
    }
}

/// The whole lookup table, stored as the single value of the `table` array map so the
/// program needs one (inlined) map lookup per packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Table {
    /// Indexed by `hash & TABLE_MASK`.
    pub entries: [TableEntry; TABLE_SIZE],
    /// [`TABLE_FLOWS`] and other switches, read by the program with the entry it needs,
    /// so a switch costs no extra map lookup.
    pub flags: u32,
    /// Seconds without a datagram after which a flow is forgotten (`flow_idle`): its next
    /// datagram is steered as a new flow's. Read only when [`TABLE_FLOWS`] is set.
    pub flow_idle_s: u32,
}

/// [`Table::flags`] bit: UDP flows stick to the slot that took their first datagram (the
/// flow table) while its socket lives; only new flows, and flows whose slot is gone,
/// are steered by the table. Set for UDP services in `handover` mode or with `sticky`.
pub const TABLE_FLOWS: u32 = 1;

/// [`Table::flags`] bit: the service has health probes; a datagram or SYN from a source
/// port in the `probes` map goes to the slot it checks. Off, the program never looks.
pub const TABLE_PROBES: u32 = 2;

/// Index of the [`Table::flags`] word when the table is read as 32-bit words.
pub const FLAGS_WORD: usize = TABLE_SIZE;

/// Index of the [`Table::flow_idle_s`] word when the table is read as 32-bit words.
pub const FLOW_IDLE_WORD: usize = TABLE_SIZE + 1;

/// Records in the admission array ([`names::ADMISSION`]), in buckets of [`ADMIT_WAYS`].
/// A new flow's record goes in bucket `hash & ADMIT_BUCKET_MASK`, in a free or stale
/// record, else in place of the bucket's oldest: only when more than [`ADMIT_WAYS`] new
/// flows meet in one bucket before their second datagrams is one displaced.
pub const ADMIT_SIZE: u32 = 1 << 16;

/// Records per admission bucket, searched one by one on a flow table miss.
pub const ADMIT_WAYS: u32 = 8;

/// Mask that turns the flow hash into an admission bucket's number.
pub const ADMIT_BUCKET_MASK: u32 = ADMIT_SIZE / ADMIT_WAYS - 1;

/// Which flow a datagram belongs to: its source address and port as the packet carries
/// them, and the kernel's hash of its whole 4-tuple (which covers the destination, the
/// one part that differs between flows from one source only on a wildcard listener).
/// Two flows share a key only if they come from the same address and port and their
/// 4-tuples' hashes collide too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The source address; an IPv4 address fills the first 4 bytes, the rest are 0.
    pub source: [u8; 16],
    /// The source port, in network byte order as read from the UDP header.
    pub port: u16,
    /// 4 or 6: which IP header `source` was read from.
    pub family: u16,
    /// The kernel's reuseport hash of the flow's 4-tuple.
    pub hash: u32,
}

impl FlowKey {
    /// The source address and port.
    pub fn source(&self) -> core::net::SocketAddr {
        let port = u16::from_be(self.port);
        if self.family == 4 {
            let [a, b, c, d, ..] = self.source;
            core::net::SocketAddr::new(core::net::Ipv4Addr::new(a, b, c, d).into(), port)
        } else {
            core::net::SocketAddr::new(core::net::Ipv6Addr::from(self.source).into(), port)
        }
    }
}

/// A flow seen once: where its first datagram went. Its second datagram admits it to the
/// flow table with this slot, so a one-datagram flow (a DNS query, a spoofed flood) never
/// takes a flow table entry and never evicts an established flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingFlow {
    /// The flow.
    pub key: FlowKey,
    /// The slot its first datagram went to.
    pub slot: u16,
    /// Keeps `generation` aligned.
    pub reserved: u16,
    /// That slot's generation then.
    pub generation: u32,
    /// Coarse monotonic time (ns since boot) of its first datagram; 0 for an empty record.
    pub seen: u64,
}

/// The flow table's events, counted per CPU by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FlowCounters {
    /// First datagrams of flows not in the table, recorded for admission.
    pub pending: u64,
    /// Admission records overwritten by another flow's first datagram before their own
    /// flow's second one: flows that stay unadmitted (a flood's mark).
    pub displaced: u64,
    /// Second datagrams whose flow could not be entered because the table was full: the
    /// flow follows the table, unkept.
    pub unkept: u64,
    /// Datagrams of known flows idle past `flow_idle`, steered as new flows.
    pub expired: u64,
    /// Datagrams of known flows whose slot now holds another generation's socket, steered
    /// by the table again rather than delivered there.
    pub reused_slot: u64,
}

impl FlowCounters {
    /// Adds `other` to these counters (to sum the CPUs' copies).
    pub fn add(&mut self, other: &Self) {
        self.pending = self.pending.wrapping_add(other.pending);
        self.displaced = self.displaced.wrapping_add(other.displaced);
        self.unkept = self.unkept.wrapping_add(other.unkept);
        self.expired = self.expired.wrapping_add(other.expired);
        self.reused_slot = self.reused_slot.wrapping_add(other.reused_slot);
    }
}

/// A flow table value: which slot (of which generation) a UDP flow belongs to. The program
/// delivers a flow's datagrams to its slot only while that slot holds the same generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The slot whose socket receives the flow's datagrams.
    pub slot: u16,
    /// Keeps `generation` aligned.
    pub reserved: u16,
    /// The slot's generation when the flow was placed.
    pub generation: u32,
    /// Coarse monotonic time (ns since boot) of the flow's latest datagram.
    pub last_seen: u64,
}

/// What a slot is doing, as recorded in [`SlotMeta::state`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// No socket was ever placed here, or its record was cleared.
    Free = 0,
    /// A listening socket serves this slot.
    Live = 1,
    /// The socket closed; its entries belong to their heirs.
    Dead = 2,
    /// The socket stays open for its existing flows but takes no new ones.
    Draining = 3,
    /// A new generation's socket, placed but owning no entries until its generation is
    /// ready and switched to.
    Starting = 4,
}

impl SlotState {
    /// Decodes a state read from the `slots` map; `None` for a value this build never writes.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Free),
            1 => Some(Self::Live),
            2 => Some(Self::Dead),
            3 => Some(Self::Draining),
            4 => Some(Self::Starting),
            _ => None,
        }
    }
}

/// Userspace's record of one slot: it lets the CLI and a restarted daemon know who holds
/// each slot without asking anyone. The program reads its `generation` (a flow reaches
/// only a slot of its own generation) and `state` (its last resort is a live slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotMeta {
    /// `SO_COOKIE` of the socket placed in the slot: identifies it across processes.
    pub cookie: u64,
    /// Process serving the socket, 0 if unknown.
    pub pid: u32,
    /// A [`SlotState`] as `u32`.
    pub state: u32,
    /// Generation the slot was started in (reloads start a new one).
    pub generation: u32,
    /// Relative share of the table this slot should own.
    pub weight: u32,
    /// How many times this slot's worker was restarted after dying.
    pub restarts: u32,
    /// Start time of the serving process in clock ticks after boot (`/proc/<pid>/stat`
    /// field 22), so a restarted daemon never mistakes a reused pid for its worker.
    pub started: u64,
}

impl SlotMeta {
    /// The record of a slot that holds nothing.
    pub const FREE: Self = Self {
        cookie: 0,
        pid: 0,
        state: SlotState::Free as u32,
        generation: 0,
        weight: 0,
        restarts: 0,
        started: 0,
    };
}

/// The `SO_COOKIE` of each of a slot's sockets, by listener index (0 past the service's
/// last listener), recorded before the sockets join their groups. The first is also in
/// [`SlotMeta::cookie`]. The program never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCookies {
    /// By listener index.
    pub cookies: [u64; MAX_LISTENERS],
}

/// What a service listens on and how it steers, recorded once when its dataplane is
/// created, so the CLI and a restarted daemon know the service from its pins alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// Listening address: 16 bytes of IPv6, or an IPv4 address in its first 4 bytes.
    pub addr: [u8; 16],
    /// Listening port.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    /// 17 for UDP, 6 for TCP (IP protocol numbers).
    pub proto: u8,
    /// 0 for `balance`, 1 for `handover`.
    pub mode: u32,
    /// Capacity of the flow table; 0 when the service has none (TCP, or UDP in `balance`
    /// mode without `sticky`).
    pub flow_table: u32,
    /// Keeps the size a multiple of 8.
    pub reserved: u32,
}

/// A health probe's route, the `probes` map's value under the probe's source port: the slot
/// it checks, and the address it comes from. The program steers a packet from that port to
/// the slot only when it also comes from that address, so a client elsewhere that happens
/// to use the same source port still follows the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeRoute {
    /// The slot the probe checks.
    pub slot: u32,
    /// [`PROBE_FROM_V4`] or [`PROBE_FROM_V6`]: which IP header the source address is read from.
    pub family: u32,
    /// The source address as the packet carries it; an IPv4 address fills the first 4 bytes.
    pub source: [u8; 16],
}

/// [`ProbeRoute::family`] of a probe sent over IPv4.
pub const PROBE_FROM_V4: u32 = 4;
/// [`ProbeRoute::family`] of a probe sent over IPv6.
pub const PROBE_FROM_V6: u32 = 6;

impl ProbeRoute {
    /// The route of a probe from `source` (an IPv4-mapped IPv6 address sends IPv4 packets,
    /// so it is recorded as IPv4) checking `slot`.
    pub fn new(slot: u32, source: core::net::IpAddr) -> Self {
        let v4 = |ip: core::net::Ipv4Addr| {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&ip.octets());
            (PROBE_FROM_V4, bytes)
        };
        let (family, bytes) = match source {
            core::net::IpAddr::V4(ip) => v4(ip),
            core::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(ip) => v4(ip),
                None => (PROBE_FROM_V6, ip.octets()),
            },
        };
        Self {
            slot,
            family,
            source: bytes,
        }
    }

    /// The source address, as [`ProbeRoute::new`] was given it (IPv4-mapped ones as IPv4).
    pub fn source(&self) -> core::net::IpAddr {
        if self.family == PROBE_FROM_V4 {
            let [a, b, c, d, ..] = self.source;
            core::net::IpAddr::V4(core::net::Ipv4Addr::new(a, b, c, d))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from(self.source))
        }
    }
}

/// What the daemon's health probes found for one slot, for the CLI. The program never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeHealth {
    /// A [`ProbeState`] as `u32`.
    pub state: u32,
    /// Probes failed in a row.
    pub failures: u32,
}

/// A slot's probe state, as recorded in [`ProbeHealth::state`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeState {
    /// The service has no probe, or the slot's worker was not probed yet.
    Unprobed = 0,
    /// The last probe was answered.
    Passing = 1,
    /// The last probe (and `failures` in a row) went unanswered.
    Failing = 2,
}

impl ProbeState {
    /// Decodes a state read from the `health` map; `None` for a value never written.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Unprobed),
            1 => Some(Self::Passing),
            2 => Some(Self::Failing),
            _ => None,
        }
    }
}

/// What the program did for one slot, counted per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SlotCounters {
    /// New flows and datagrams sent to this slot as the entry's owner.
    pub selected: u64,
    /// Sent here as the entry's heir because the owner's socket was gone.
    pub failed_over: u64,
    /// Sent here by the bounded probe because owner and heir were both gone.
    pub probed: u64,
    /// Queued connections of a closing TCP listener handed to this slot.
    pub migrated: u64,
    /// Datagrams of known flows delivered here by the flow table.
    pub flow_hits: u64,
}

/// The value of the per-CPU `counters` map: one row per slot and the service-wide rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by slot.
    pub slots: [SlotCounters; MAX_SLOTS as usize],
    /// Program runs that found no live slot and let the kernel's own hash choose.
    pub fell_through: u64,
    /// Flows entered in the flow table (admitted on their second datagram).
    pub flows_new: u64,
    /// Datagrams of a known flow whose slot's socket was gone, steered by the table again.
    pub flows_owner_gone: u64,
}

impl SlotCounters {
    /// Applies `op` to each counter of `self` and the same counter of `other`.
    fn combine(&mut self, other: &Self, op: fn(u64, u64) -> u64) {
        self.selected = op(self.selected, other.selected);
        self.failed_over = op(self.failed_over, other.failed_over);
        self.probed = op(self.probed, other.probed);
        self.migrated = op(self.migrated, other.migrated);
        self.flow_hits = op(self.flow_hits, other.flow_hits);
    }
}

impl Counters {
    /// Adds `other` to these counters, counter by counter (to sum the CPUs' copies).
    pub fn add(&mut self, other: &Self) {
        self.combine(other, u64::wrapping_add);
    }

    /// What was counted between `then` and these counters, counter by counter.
    pub fn since(&self, then: &Self) -> Self {
        let mut delta = *self;
        delta.combine(then, u64::wrapping_sub);
        delta
    }

    fn combine(&mut self, other: &Self, op: fn(u64, u64) -> u64) {
        for (mine, theirs) in self.slots.iter_mut().zip(&other.slots) {
            mine.combine(theirs, op);
        }
        self.fell_through = op(self.fell_through, other.fell_through);
        self.flows_new = op(self.flows_new, other.flows_new);
        self.flows_owner_gone = op(self.flows_owner_gone, other.flows_owner_gone);
    }

    /// All counters at zero.
    pub const ZERO: Self = Self {
        slots: [SlotCounters {
            selected: 0,
            failed_over: 0,
            probed: 0,
            migrated: 0,
            flow_hits: 0,
        }; MAX_SLOTS as usize],
        fell_through: 0,
        flows_new: 0,
        flows_owner_gone: 0,
    };
}

// The layout facts the rest of the project relies on, checked at compile time on both sides.
const _: () = {
    assert!(TABLE_SIZE.is_power_of_two() && TABLE_SIZE >= 65_536);
    assert!(MAX_SLOTS < NO_SLOT as u32);
    assert!(PROBE_STRIDE % 2 == 1 && PROBE_STRIDE < TABLE_SIZE as u32);
    assert!(reference::SLOTS.is_power_of_two());
    assert!(size_of::<TableEntry>() == 4);
    assert!(size_of::<Table>() == 4 * TABLE_SIZE + 8);
    assert!(size_of::<SlotMeta>() == 40);
    assert!(size_of::<ServiceMeta>() == 32);
    assert!(size_of::<Flow>() == 16);
    assert!(size_of::<FlowKey>() == 24);
    assert!(size_of::<PendingFlow>() == 40);
    assert!(size_of::<FlowCounters>() == 40);
    assert!(ADMIT_SIZE.is_power_of_two() && ADMIT_WAYS.is_power_of_two());
    assert!(size_of::<ProbeHealth>() == 8);
    assert!(size_of::<SlotCookies>() == 8 * MAX_LISTENERS);
    assert!(size_of::<ProbeRoute>() == 24);
    assert!(MAX_LISTENERS == names::LISTENER_SOCKETS.len() && MAX_LISTENERS <= 4);
    assert!(listener_flags(3, 3) >> TABLE_LISTENER_SHIFT == 0xc0);
    assert!(listener_flags(3, 3) & (TABLE_FLOWS | TABLE_PROBES) == 0);
    // A per-CPU map value is limited to 32 KiB by the kernel's per-CPU allocator.
    assert!(size_of::<Counters>() <= 32 * 1024);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `repr(C)`, `Copy`, made only of integers, and has no padding
    // (the sizes are asserted above), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::TableEntry {}
    unsafe impl aya::Pod for super::Table {}
    unsafe impl aya::Pod for super::SlotMeta {}
    unsafe impl aya::Pod for super::ServiceMeta {}
    unsafe impl aya::Pod for super::SlotCookies {}
    unsafe impl aya::Pod for super::ProbeHealth {}
    unsafe impl aya::Pod for super::ProbeRoute {}
    unsafe impl aya::Pod for super::SlotCounters {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::PendingFlow {}
    unsafe impl aya::Pod for super::FlowCounters {}
    unsafe impl aya::Pod for super::quic::QuicSlotCounters {}
    unsafe impl aya::Pod for super::quic::QuicCounters {}
}

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn a_probe_route_records_the_address_as_its_packets_carry_it() {
        let v4 = ProbeRoute::new(3, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!((v4.slot, v4.family), (3, PROBE_FROM_V4));
        assert_eq!(v4.source[..4], [127, 0, 0, 1]);
        assert_eq!(v4.source[4..], [0; 12]);
        // A v4-mapped address sends IPv4 packets: recorded as IPv4.
        let mapped = ProbeRoute::new(3, IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped()));
        assert_eq!(mapped, v4);
        let v6 = ProbeRoute::new(5, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(v6.family, PROBE_FROM_V6);
        assert_eq!(v6.source(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(v4.source(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn each_listener_kind_has_its_own_two_bits() {
        let mut flags = TABLE_FLOWS | TABLE_PROBES;
        for kind in 0..4 {
            flags |= listener_flags(kind, 3 - kind);
        }
        for kind in 0..4 {
            assert_eq!(listener_index(flags, kind), 3 - kind);
        }
        assert_eq!(flags & 3, TABLE_FLOWS | TABLE_PROBES);
        assert_eq!(listener_kind(false, false), 0);
        assert_eq!(listener_kind(false, true), 1);
        assert_eq!(listener_kind(true, false), 2);
        assert_eq!(listener_kind(true, true), 3);
        assert_eq!(listener_index(TABLE_FLOWS | TABLE_PROBES, 3), 0);
    }
}
