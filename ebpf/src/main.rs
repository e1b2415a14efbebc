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
//! flow goes to the slot that took the flow's first datagram while that slot's socket
//! lives; only new flows, and flows whose slot is gone, go through the table. With probes
//! on, a datagram or SYN from the source address and port the daemon registered for a
//! health probe goes to the slot that probe checks.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS},
    cty::c_void,
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_load_bytes_relative},
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use portshard_common::{
    BPF_F_MMAPABLE, Counters, Flow, MAX_SLOTS, PROBE_FROM_V4, PROBE_FROM_V6, PROBE_STEPS,
    PROBE_STRIDE, ProbeHealth, ProbeRoute, ServiceMeta, SlotCounters, SlotMeta, TABLE_FLOWS,
    TABLE_MASK, TABLE_PROBES, Table, TableEntry,
};

mod runtime;

/// Slot number to listening socket. The kernel clears a slot the moment its socket closes.
#[map(name = "sockets")]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::pinned(MAX_SLOTS, 0);

/// The consistent lookup table, written by userspace through a memory mapping.
#[map(name = "table")]
static TABLE: Array<Table> = Array::pinned(1, BPF_F_MMAPABLE);

/// Userspace's per-slot records; defined here so one object describes every pinned map.
#[map(name = "slots")]
static SLOTS: Array<SlotMeta> = Array::pinned(MAX_SLOTS, 0);

/// What the service listens on, for the CLI and a restarted daemon; defined here so one
/// object describes every pinned map.
#[map(name = "service")]
static SERVICE: Array<ServiceMeta> = Array::pinned(1, 0);

/// Per-CPU counters of every decision.
#[map(name = "counters")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(1, 0);

/// The flow table: a UDP flow's hash to the slot that owns it. Userspace sizes it per
/// service at load time; least recently used flows make room for new ones.
#[map(name = "flows")]
static FLOWS: LruHashMap<u32, Flow> = LruHashMap::pinned(1, 0);

/// Health-probe source port to the probe's source address and the slot it checks, written
/// by the daemon.
#[map(name = "probes")]
static PROBES: HashMap<u32, ProbeRoute> = HashMap::pinned(MAX_SLOTS, 0);

/// The daemon's probe results per slot; defined here so one object describes every pinned map.
#[map(name = "health")]
static HEALTH: Array<ProbeHealth> = Array::pinned(MAX_SLOTS, 0);

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
        && select(&ctx, slot)
    {
        // A health probe reached the worker it checks; it is not a flow, so not counted.
        return SK_PASS;
    }
    let hash = ctx.hash();
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return SK_PASS;
    };
    // SAFETY: this CPU's value of a per-CPU array; the program cannot be preempted by
    // itself on this CPU while it holds it.
    let counters = unsafe { &mut *counters };
    if flags & TABLE_FLOWS == 0 {
        let chosen = choose(&ctx, table, hash);
        count(counters, ctx.migrating_sk().is_some(), chosen);
        return SK_PASS;
    }

    // SAFETY: a helper with no arguments and no side effects.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let known = FLOWS.get_ptr_mut(hash);
    if let Some(flow) = known {
        // SAFETY: a value pointer of the flow table, valid while the program runs.
        let flow = unsafe { &mut *flow };
        if select(&ctx, flow.slot) {
            if flow.last_seen != now {
                flow.last_seen = now;
            }
            if let Some(row) = counters.slots.get_mut(usize::from(flow.slot)) {
                row.flow_hits += 1;
            }
            return SK_PASS;
        }
        counters.flows_owner_gone += 1;
    }
    let chosen = choose(&ctx, table, hash);
    count(counters, false, chosen);
    if let Some((slot, _)) = chosen {
        let generation = SLOTS.get(u32::from(slot)).map_or(0, |meta| meta.generation);
        let flow = Flow {
            slot,
            reserved: 0,
            generation,
            last_seen: now,
        };
        match known {
            // A known flow whose slot is gone: rewritten where it is, no new element.
            // SAFETY: the same value pointer as above, still valid while the program runs.
            Some(entry) => unsafe { *entry = flow },
            None => {
                if FLOWS.insert(hash, flow, 0).is_ok() {
                    counters.flows_new += 1;
                }
            }
        }
    }
    SK_PASS
}

/// The slot the table picks for `hash`, and how: its entry's owner, else the entry's heir,
/// else the owner of one of a few unrelated entries; `None` if none has a live socket.
#[inline(always)]
fn choose(ctx: &SkReuseportContext, table: *const Table, hash: u32) -> Option<(u16, Choice)> {
    let index = hash & TABLE_MASK;
    let entry = read(table, index);
    if select(ctx, entry.owner) {
        return Some((entry.owner, Choice::Owner));
    }
    if select(ctx, entry.heir) {
        return Some((entry.heir, Choice::Heir));
    }
    for step in 1..=PROBE_STEPS {
        let other = read(table, index.wrapping_add(step * PROBE_STRIDE));
        if other.owner != entry.owner && other.owner != entry.heir && select(ctx, other.owner) {
            return Some((other.owner, Choice::Probe));
        }
    }
    None
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

/// Whether the packet comes from `route`'s source address, read from its IP header (the
/// packet data starts after it).
#[inline(always)]
fn from_probe_source(ctx: &SkReuseportContext, route: &ProbeRoute) -> bool {
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    let mut source = [0u8; 16];
    let skb = ctx.md as *const c_void;
    let to = source.as_mut_ptr().cast::<c_void>();
    // The helper's length must be a constant: one call per family. The source address is
    // at byte 12 of an IPv4 header, at byte 8 of an IPv6 one.
    // SAFETY: the helper writes at most `len` bytes into `source`, which holds 16.
    let loaded = if route.family == PROBE_FROM_V4 {
        ctx.eth_protocol() == u32::from(ETH_P_IP.to_be())
            && unsafe { bpf_skb_load_bytes_relative(skb, 12, to, 4, BPF_HDR_START_NET) } == 0
    } else if route.family == PROBE_FROM_V6 {
        ctx.eth_protocol() == u32::from(ETH_P_IPV6.to_be())
            && unsafe { bpf_skb_load_bytes_relative(skb, 8, to, 16, BPF_HDR_START_NET) } == 0
    } else {
        false
    };
    loaded && source == route.source
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
fn select(ctx: &SkReuseportContext, slot: u16) -> bool {
    u32::from(slot) < MAX_SLOTS && SOCKETS.select_reuseport(ctx, u32::from(slot)).is_ok()
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
