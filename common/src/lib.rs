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

pub mod names;
pub mod quic;

/// The UDP flow table's keys, values, admission records and counters.
mod flow;
/// A service's listeners: how many, and how the table's flags name each kind's.
mod listener;
/// Health probes' routes and results.
mod probe;

pub use flow::*;
pub use listener::*;
pub use probe::*;

/// The version of the pin layout (which maps a service's pin directory holds, and the
/// shape of each) this build writes. Pins without a `layout` map are layout 1 (every
/// build before the version was recorded); layout 2 adds the `layout` map itself; layout 3
/// keys the flow table by the flow's source as well as its hash and adds admission, its
/// counters and the swept count; layout 4 adds the QUIC counters, the socket arrays of a
/// service's second to fourth listeners, the `listeners` records and the slots' socket
/// cookies. A build migrates the layouts it knows in place and refuses any other before
/// touching it.
pub const PIN_LAYOUT: u32 = 4;

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
    assert!(size_of::<quic::QuicKey>() == 16 + 4 * quic::ROUND_KEY_WORDS);
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
    unsafe impl aya::Pod for super::quic::QuicKey {}
}
