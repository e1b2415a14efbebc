//! The portshard dataplane: one `SK_REUSEPORT` program per service, attached to its reuseport
//! group with the select-or-migrate attach type.
//!
//! For each new flow (a UDP datagram's 4-tuple, a TCP SYN) and for each queued connection of
//! a closing TCP listener, the program reads `table[hash & TABLE_MASK]` and selects, in
//! order: the entry's owner, its heir, the owners of a few other entries, and otherwise lets
//! the kernel's own hash choose (`SK_PASS` without a selection). It never returns `SK_DROP`,
//! so no flow that a live socket could take is refused. A datagram or SYN from a source
//! port the daemon registered for a health probe goes to the slot that probe checks.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use portshard_common::{
    BPF_F_MMAPABLE, Counters, MAX_SLOTS, PROBE_STEPS, PROBE_STRIDE, ProbeHealth, ServiceMeta,
    SlotCounters, SlotMeta, TABLE_MASK, Table, TableEntry,
};

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

/// Health-probe source port to the slot it checks, written by the daemon.
#[map(name = "probes")]
static PROBES: HashMap<u32, u32> = HashMap::pinned(MAX_SLOTS, 0);

/// The daemon's probe results per slot; defined here so one object describes every pinned map.
#[map(name = "health")]
static HEALTH: Array<ProbeHealth> = Array::pinned(MAX_SLOTS, 0);

/// How a slot came to be chosen; picks the counter to bump.
#[derive(Clone, Copy)]
enum Choice {
    Owner,
    Heir,
    Probe,
}

#[sk_reuseport(migrate)]
pub fn steer(ctx: SkReuseportContext) -> u32 {
    let Some(table) = TABLE.get_ptr(0) else {
        return SK_PASS;
    };
    if ctx.migrating_sk().is_none()
        && let Some(slot) = probed_slot(&ctx)
        && select(&ctx, slot)
    {
        // A health probe reached the worker it checks; it is not a flow, so not counted.
        return SK_PASS;
    }
    let index = ctx.hash() & TABLE_MASK;
    let entry = read(table, index);

    let mut chosen = None;
    if select(&ctx, entry.owner) {
        chosen = Some((entry.owner, Choice::Owner));
    } else if select(&ctx, entry.heir) {
        chosen = Some((entry.heir, Choice::Heir));
    } else {
        for step in 1..=PROBE_STEPS {
            let other = read(table, index.wrapping_add(step * PROBE_STRIDE));
            if other.owner != entry.owner && other.owner != entry.heir && select(&ctx, other.owner)
            {
                chosen = Some((other.owner, Choice::Probe));
                break;
            }
        }
    }
    count(&ctx, chosen);
    SK_PASS
}

/// The slot a health probe checks, if the packet's source port (the first two bytes of the
/// UDP or TCP header, where the packet data starts) is a registered probe port.
#[inline(always)]
fn probed_slot(ctx: &SkReuseportContext) -> Option<u16> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 2 > end {
        return None;
    }
    // SAFETY: the two bytes are inside the packet, as checked against `data_end`.
    let port = u16::from_be(unsafe { core::ptr::read_unaligned(data as *const u16) });
    // SAFETY: the value is a plain u32 the daemon writes whole.
    let slot = unsafe { PROBES.get(u32::from(port)) }.copied()?;
    u16::try_from(slot).ok()
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
fn count(ctx: &SkReuseportContext, chosen: Option<(u16, Choice)>) {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the pointer is this CPU's value of a per-CPU array; the program cannot be
    // preempted by itself on this CPU while it holds it.
    let counters = unsafe { &mut *counters };
    let Some((slot, choice)) = chosen else {
        counters.fell_through += 1;
        return;
    };
    let Some(row) = counters.slots.get_mut(usize::from(slot)) else {
        return;
    };
    bump(row, ctx.migrating_sk().is_some(), choice);
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

/// Only for the BPF target: a host check of this crate (clippy over the workspace) links
/// `std`, whose panic handler would clash.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel checks the license of programs that call GPL-only helpers; ours calls none,
/// but the verifier log is clearer with one.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
