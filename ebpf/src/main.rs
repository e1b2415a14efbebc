//! The portshard dataplane: one `SK_REUSEPORT` program per service, attached to its reuseport
//! group with the select-or-migrate attach type.
//!
//! For each new flow (a UDP datagram's 4-tuple, a TCP SYN) and for each queued connection of
//! a closing TCP listener, the program reads `table[hash & TABLE_MASK]` and selects, in
//! order: the entry's owner, its heir, the owners of a few other entries, and otherwise lets
//! the kernel's own hash choose (`SK_PASS` without a selection). It never returns `SK_DROP`,
//! so no flow that a live socket could take is refused.
//!
//! With the flow table on (UDP in `handover` mode or with `sticky`), a datagram of a known
//! flow goes to the slot it was placed on while that slot's socket lives, still holds the
//! same generation, and the flow has not been idle past `flow_idle`. A flow is known by its
//! source address and port and its 4-tuple's hash ([`FlowKey`]), and admitted on its second
//! datagram: the first is steered by the table and recorded in the admission array, so
//! one-datagram flows and floods of them never take a flow table entry, and the table never
//! evicts: a flow leaves it only when the daemon sweeps it as idle. With probes on, a
//! datagram or SYN from the source address and port the daemon registered for a health
//! probe goes to the slot that probe checks.
//!
//! With QUIC-LB on ([`TABLE_QUIC`]), a QUIC packet whose destination connection ID carries
//! the service's config rotation bits and the server ID of a live or draining slot (of the
//! generation that issued it) goes to that slot, whatever its 4-tuple, so a connection
//! survives NAT rebinding and migration. A new connection's first flight (an Initial or
//! 0-RTT packet with the client's own connection ID) goes by the table alone, never by a
//! flow table entry an older connection left on its address and port; every other packet
//! is steered as above. See `portshard_common::quic`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock, sk_action::SK_PASS},
    cty::c_void,
    helpers::bpf_skb_load_bytes_relative,
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use portshard_common::{
    ADMIT_SIZE, BPF_F_MMAPABLE, Counters, Flow, FlowCounters, FlowKey, MAX_LISTENERS, MAX_SLOTS,
    PROBE_STEPS, PROBE_STRIDE, PendingFlow, ProbeHealth, ProbeRoute, ServiceMeta, SlotCookies,
    SlotCounters, SlotMeta, SlotState, TABLE_FLOWS, TABLE_LISTENER_SHIFT, TABLE_MASK, TABLE_PROBES,
    Table, TableEntry, listener_index, listener_kind,
    quic::{QuicCounters, QuicKey, TABLE_QUIC},
};

mod flow;
mod quic;
mod runtime;

use flow::{flow_key, steer_flow};
use quic::{QuicRoute, steer_quic};

/// Slot number to listening socket, of the service's first listener. The kernel clears a
/// slot the moment its socket closes.
#[map(name = "sockets")]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::pinned(MAX_SLOTS, 0);

/// The second listener's sockets: a reuseport group is per transport and address, and the
/// kernel selects only a socket of the group the packet arrived in, so each of a service's
/// listeners has its own array. A worker's sockets sit in the same slot of each.
#[map(name = "sockets_1")]
static SOCKETS_1: ReusePortSockArray = ReusePortSockArray::pinned(MAX_SLOTS, 0);

/// The third listener's sockets.
#[map(name = "sockets_2")]
static SOCKETS_2: ReusePortSockArray = ReusePortSockArray::pinned(MAX_SLOTS, 0);

/// The fourth listener's sockets.
#[map(name = "sockets_3")]
static SOCKETS_3: ReusePortSockArray = ReusePortSockArray::pinned(MAX_SLOTS, 0);

/// What each listener listens on, for the CLI and a restarted daemon; defined here so one
/// object describes every pinned map.
#[map(name = "listeners")]
static LISTENERS: Array<ServiceMeta> = Array::pinned(MAX_LISTENERS as u32, 0);

/// The cookie of each of a slot's sockets, listener by listener, for the daemon's
/// foreign-socket checks; defined here so one object describes every pinned map.
#[map(name = "slot_cookies")]
static COOKIES: Array<SlotCookies> = Array::pinned(MAX_SLOTS, 0);

/// The consistent lookup table, written by userspace through a memory mapping.
#[map(name = "table")]
static TABLE: Array<Table> = Array::pinned(1, BPF_F_MMAPABLE);

/// Userspace's per-slot records: the program reads each slot's generation and state.
#[map(name = "slots")]
static SLOTS: Array<SlotMeta> = Array::pinned(MAX_SLOTS, 0);

/// What the service listens on, for the CLI and a restarted daemon; defined here so one
/// object describes every pinned map.
#[map(name = "service")]
static SERVICE: Array<ServiceMeta> = Array::pinned(1, 0);

/// Per-CPU counters of every decision.
#[map(name = "counters")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(1, 0);

/// The flow table: an admitted UDP flow to the slot that owns it. Userspace sizes it per
/// service at load time; when it is full, new flows are not kept (and counted), and no
/// established flow is evicted.
#[map(name = "flow_table")]
static FLOWS: HashMap<FlowKey, Flow> = HashMap::pinned(1, 0);

/// Flows seen once, in buckets of `ADMIT_WAYS` records, waiting for their second datagram.
#[map(name = "flow_admit")]
static ADMISSION: Array<PendingFlow> = Array::pinned(ADMIT_SIZE, 0);

/// Per-CPU counters of the flow table's events.
#[map(name = "flow_events")]
static FLOW_COUNTERS: PerCpuArray<FlowCounters> = PerCpuArray::pinned(1, 0);

/// Flows the daemon swept as idle; defined here so one object describes every pinned map.
#[map(name = "flow_swept")]
static FLOW_SWEPT: Array<u64> = Array::pinned(1, 0);

/// Health-probe source port to the probe's source address and the slot it checks, written
/// by the daemon.
#[map(name = "probes")]
static PROBES: HashMap<u32, ProbeRoute> = HashMap::pinned(MAX_SLOTS, 0);

/// The daemon's probe results per slot; defined here so one object describes every pinned map.
#[map(name = "health")]
static HEALTH: Array<ProbeHealth> = Array::pinned(MAX_SLOTS, 0);

/// Per-CPU counters of how QUIC packets were steered.
#[map(name = "quic_events")]
static QUIC_COUNTERS: PerCpuArray<QuicCounters> = PerCpuArray::pinned(1, 0);

/// The service's QUIC-LB key, with encrypted connection IDs: its decryption round keys.
#[map(name = "quic_key")]
static QUIC_KEY: Array<QuicKey> = Array::pinned(1, 0);

/// The pin layout version the pins were written in; defined here so one object describes
/// every pinned map.
#[map(name = "layout")]
static LAYOUT: Array<u32> = Array::pinned(1, 0);

/// How a slot came to be chosen; picks the counter to bump.
#[derive(Clone, Copy)]
enum Choice {
    Owner,
    Heir,
    Probe,
}

#[sk_reuseport(migrate)]
pub fn steer(ctx: SkReuseportContext) -> u32 {
    // The build upgrade tests switch to: a few more instructions, so its tag differs, and
    // never a different decision (no packet is that long).
    #[cfg(feature = "upgrade-test")]
    if ctx.len() == u32::MAX as usize {
        return SK_PASS;
    }
    let Some(table) = TABLE.get_ptr(0) else {
        return SK_PASS;
    };
    // SAFETY: `table` points to the map's value; the flags word is inside it.
    let flags = unsafe { core::ptr::read_volatile(&raw const (*table).flags) };
    if flags & TABLE_PROBES != 0
        && ctx.migrating_sk().is_none()
        && let Some(slot) = probed_slot(&ctx)
        && select(&ctx, table, slot)
    {
        // A health probe reached the worker it checks; it is not a flow, so not counted.
        return SK_PASS;
    }
    // A service's TCP listeners share its flags with its UDP ones: QUIC and the flow table
    // are for datagrams only.
    let udp = ctx.ip_protocol() == IPPROTO_UDP;
    let mut first_flight = false;
    if flags & TABLE_QUIC != 0 && udp && ctx.migrating_sk().is_none() {
        match steer_quic(&ctx, table, flags) {
            QuicRoute::Delivered => return SK_PASS,
            QuicRoute::FirstFlight => first_flight = true,
            QuicRoute::Other => {}
        }
    }
    let hash = ctx.hash();
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return SK_PASS;
    };
    // SAFETY: this CPU's value of a per-CPU array; the program cannot be preempted by
    // itself on this CPU while it holds it.
    let counters = unsafe { &mut *counters };
    if flags & TABLE_FLOWS == 0 || !udp || first_flight {
        let chosen = choose(&ctx, table, hash);
        count(counters, ctx.migrating_sk().is_some(), chosen);
        return SK_PASS;
    }

    match source_address(&ctx) {
        Some((family, source)) => {
            steer_flow(&ctx, table, counters, flow_key(&ctx, family, source, hash))
        }
        None => {
            // Not an IP packet we can read a source from: steered, never kept.
            let chosen = choose(&ctx, table, hash);
            count(counters, false, chosen);
        }
    }
    SK_PASS
}

/// `IPPROTO_UDP`, as `ip_protocol` gives it.
const IPPROTO_UDP: u32 = 17;

/// The slot the table picks for `hash`, and how: its entry's owner, else the entry's heir,
/// else the owner of one of a few unrelated entries; `None` if none has a live socket.
#[inline(always)]
fn choose(ctx: &SkReuseportContext, table: *const Table, hash: u32) -> Option<(u16, Choice)> {
    let sockets = listener_sockets(ctx, table);
    let index = hash & TABLE_MASK;
    let entry = read(table, index);
    if select_in(ctx, sockets, entry.owner) {
        return Some((entry.owner, Choice::Owner));
    }
    if select_in(ctx, sockets, entry.heir) {
        return Some((entry.heir, Choice::Heir));
    }
    for step in 1..=PROBE_STEPS {
        let other = read(table, index.wrapping_add(step * PROBE_STRIDE));
        if other.owner != entry.owner
            && other.owner != entry.heir
            && select_in(ctx, sockets, other.owner)
        {
            return Some((other.owner, Choice::Probe));
        }
    }
    any_live(ctx, sockets).map(|slot| (slot, Choice::Probe))
}

/// The first slot recorded live whose socket takes the packet: the last resort before the
/// kernel's own hash, which could pick a socket that is not portshard's (any process of
/// the same user can join the group).
#[inline(always)]
fn any_live(ctx: &SkReuseportContext, sockets: &ReusePortSockArray) -> Option<u16> {
    for slot in 0..MAX_SLOTS {
        let live = SLOTS
            .get(slot)
            .is_some_and(|meta| meta.state == SlotState::Live as u32);
        if live && sockets.select_reuseport(ctx, slot).is_ok() {
            return Some(slot as u16);
        }
    }
    None
}

/// The socket array of the listener the program runs for. A service has at most one
/// listener of each kind (transport, IP family), and the table's flags word holds each
/// kind's listener index; single-listener services leave it 0 (`sockets`). The family is
/// the listening socket's, never the packet's: a dual-stack socket receives IPv4 packets.
#[inline(always)]
fn listener_sockets(ctx: &SkReuseportContext, table: *const Table) -> &'static ReusePortSockArray {
    const AF_INET6: u32 = 10;
    // SAFETY: `table` points to the map's value; the flags word is inside it.
    let flags = unsafe { core::ptr::read_volatile(&raw const (*table).flags) };
    if flags >> TABLE_LISTENER_SHIFT == 0 {
        // One listener: its sockets are in `sockets`, whatever the socket's family.
        return &SOCKETS;
    }
    // SAFETY: `sk` is the listening socket the kernel runs the program for (Linux 5.14+),
    // never null; `ip_protocol` is that socket's protocol.
    let family = unsafe {
        let sk: *const bpf_sock = (*ctx.md).__bindgen_anon_3.sk;
        (*sk).family
    };
    let kind = listener_kind(ctx.ip_protocol() == IPPROTO_UDP, family == AF_INET6);
    match listener_index(flags, kind) {
        1 => &SOCKETS_1,
        2 => &SOCKETS_2,
        3 => &SOCKETS_3,
        _ => &SOCKETS,
    }
}

/// The slot a health probe checks, if the packet's source port (the first two bytes of the
/// UDP or TCP header, where the packet data starts) is a registered probe port and its
/// source address that probe's.
#[inline(always)]
fn probed_slot(ctx: &SkReuseportContext) -> Option<u16> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 2 > end {
        return None;
    }
    // SAFETY: the two bytes are inside the packet, as checked against `data_end`.
    let port = u16::from_be(unsafe { core::ptr::read_unaligned(data as *const u16) });
    // SAFETY: the value is plain data the daemon writes whole.
    let route = unsafe { PROBES.get(u32::from(port)) }?;
    if !from_probe_source(ctx, route) {
        return None;
    }
    u16::try_from(route.slot).ok()
}

/// The packet's IP family (4 or 6) and source address, read from its IP header (the
/// packet data starts after it); an IPv4 address fills the first 4 bytes.
#[inline(always)]
fn source_address(ctx: &SkReuseportContext) -> Option<(u16, [u8; 16])> {
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    let mut source = [0u8; 16];
    let skb = ctx.md as *const c_void;
    let to = source.as_mut_ptr().cast::<c_void>();
    let protocol = ctx.eth_protocol();
    // The helper's length must be a constant: one call per family. The source address is
    // at byte 12 of an IPv4 header, at byte 8 of an IPv6 one.
    // SAFETY: the helper writes at most `len` bytes into `source`, which holds 16.
    let loaded = if protocol == u32::from(ETH_P_IP.to_be()) {
        unsafe { bpf_skb_load_bytes_relative(skb, 12, to, 4, BPF_HDR_START_NET) == 0 }.then_some(4)
    } else if protocol == u32::from(ETH_P_IPV6.to_be()) {
        unsafe { bpf_skb_load_bytes_relative(skb, 8, to, 16, BPF_HDR_START_NET) == 0 }.then_some(6)
    } else {
        None
    };
    loaded.map(|family| (family, source))
}

/// Whether the packet comes from `route`'s source address.
#[inline(always)]
fn from_probe_source(ctx: &SkReuseportContext, route: &ProbeRoute) -> bool {
    source_address(ctx)
        .is_some_and(|(family, source)| u32::from(family) == route.family && source == route.source)
}

/// Reads entry `index & TABLE_MASK` as the one 32-bit word userspace stores it as, so owner
/// and heir always come from the same version of the entry. Goes through a raw pointer:
/// userspace rewrites the table while the program runs, so no reference to it may exist.
#[inline(always)]
fn read(table: *const Table, index: u32) -> TableEntry {
    // SAFETY: `table` points to the map's value, valid while the program runs; the masked
    // index is inside it, and each entry is 4 bytes, 4-byte aligned.
    let word = unsafe {
        let entry = &raw const (*table).entries[(index & TABLE_MASK) as usize];
        core::ptr::read_volatile(entry.cast::<u32>())
    };
    TableEntry::from_word(word)
}

/// Asks the kernel to deliver to `slot`'s socket; false if the slot names no socket, or its
/// socket is closed (`-ENOENT`) or otherwise unusable.
#[inline(always)]
fn select(ctx: &SkReuseportContext, table: *const Table, slot: u16) -> bool {
    select_in(ctx, listener_sockets(ctx, table), slot)
}

/// [`select`] in `sockets`, the socket array of the listener the program runs for
/// ([`listener_sockets`], looked up once by a caller that selects several times).
#[inline(always)]
fn select_in(ctx: &SkReuseportContext, sockets: &ReusePortSockArray, slot: u16) -> bool {
    u32::from(slot) < MAX_SLOTS && sockets.select_reuseport(ctx, u32::from(slot)).is_ok()
}

/// Bumps this CPU's counter for the decision taken.
#[inline(always)]
fn count(counters: &mut Counters, migrating: bool, chosen: Option<(u16, Choice)>) {
    let Some((slot, choice)) = chosen else {
        counters.fell_through += 1;
        return;
    };
    let Some(row) = counters.slots.get_mut(usize::from(slot)) else {
        return;
    };
    bump(row, migrating, choice);
}

#[inline(always)]
fn bump(row: &mut SlotCounters, migrating: bool, choice: Choice) {
    let counter = if migrating {
        &mut row.migrated
    } else {
        match choice {
            Choice::Owner => &mut row.selected,
            Choice::Heir => &mut row.failed_over,
            Choice::Probe => &mut row.probed,
        }
    };
    *counter += 1;
}
