//! The UDP flow table's paths: a known flow's datagram to its slot, a new flow's admission
//! on its second datagram, and the admission array's records.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::SkReuseportContext};
use portshard_common::{
    ADMIT_BUCKET_MASK, ADMIT_WAYS, Counters, Flow, FlowCounters, FlowKey, PendingFlow, SlotState,
    Table,
};

use crate::{ADMISSION, FLOW_COUNTERS, FLOWS, SLOTS, choose, count, select};

/// Steers a UDP datagram of flow `key` with the flow table on: a known flow to its slot, a
/// flow's second datagram to where its first went (admitting it), a first datagram by the
/// table (recording it for admission).
#[inline(always)]
pub(crate) fn steer_flow(
    ctx: &SkReuseportContext,
    table: *const Table,
    counters: &mut Counters,
    key: FlowKey,
) {
    // SAFETY: a helper with no arguments and no side effects.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: `table` points to the map's value; the word is inside it.
    let idle_s = unsafe { core::ptr::read_volatile(&raw const (*table).flow_idle_s) };
    let idle_ns = u64::from(idle_s) * 1_000_000_000;

    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a value pointer of the flow table, valid while the program runs.
        let flow = unsafe { &mut *flow };
        if now.wrapping_sub(flow.last_seen) > idle_ns {
            if let Some(events) = flow_events() {
                events.expired += 1;
            }
        } else if generation_of(flow.slot) != Some(flow.generation) {
            // The slot was freed, or holds another generation's socket now.
            if is_vacant(flow.slot) {
                counters.flows_owner_gone += 1;
            } else if let Some(events) = flow_events() {
                events.reused_slot += 1;
            }
        } else if select(ctx, table, flow.slot) {
            if flow.last_seen != now {
                flow.last_seen = now;
            }
            if let Some(row) = counters.slots.get_mut(usize::from(flow.slot)) {
                row.flow_hits += 1;
            }
            return;
        } else {
            counters.flows_owner_gone += 1;
        }
        // Placed again where it is: the table's choice for it now.
        let chosen = choose(ctx, table, key.hash);
        count(counters, false, chosen);
        if let Some((slot, _)) = chosen {
            *flow = placed(slot, now);
        }
        return;
    }

    // A datagram of a flow not (or no longer) kept: the rarer paths, which count events.
    let Some(events) = flow_events() else {
        return;
    };
    let Some(admission) = admission_record(&key, now, idle_ns) else {
        return;
    };
    // SAFETY: a value pointer of the admission array, valid while the program runs. Two
    // CPUs may write one record at once; the worst a torn record does is admit a flow to
    // a slot the table also chose for another new flow.
    let (record, found) = match admission {
        Admission::Found(record) => (unsafe { &mut *record }, true),
        Admission::Free(record) => (unsafe { &mut *record }, false),
        Admission::Displace(record) => {
            events.displaced += 1;
            (unsafe { &mut *record }, false)
        }
    };
    if found {
        // Its second datagram: admitted where its first went, while that slot still holds
        // the same generation; otherwise where the table sends it now.
        let slot = if generation_of(record.slot) == Some(record.generation)
            && select(ctx, table, record.slot)
        {
            if let Some(row) = counters.slots.get_mut(usize::from(record.slot)) {
                row.flow_hits += 1;
            }
            Some(record.slot)
        } else {
            let chosen = choose(ctx, table, key.hash);
            count(counters, false, chosen);
            chosen.map(|(slot, _)| slot)
        };
        record.seen = 0;
        if let Some(slot) = slot {
            match FLOWS.insert(key, placed(slot, now), BPF_NOEXIST) {
                Ok(()) => counters.flows_new += 1,
                // Another CPU admitted it meanwhile.
                Err(error) if error == -EEXIST => {}
                Err(_) => events.unkept += 1,
            }
        }
        return;
    }
    let chosen = choose(ctx, table, key.hash);
    count(counters, false, chosen);
    if let Some((slot, _)) = chosen {
        *record = PendingFlow {
            key,
            slot,
            reserved: 0,
            generation: generation_of(slot).unwrap_or(0),
            seen: now,
        };
        events.pending += 1;
    }
}

/// This CPU's flow table event counters; looked up only on the paths that count one, so a
/// known flow's datagram does not pay for it.
#[inline(always)]
fn flow_events() -> Option<&'static mut FlowCounters> {
    let events = FLOW_COUNTERS.get_ptr_mut(0)?;
    // SAFETY: this CPU's value of a per-CPU array; the program cannot be preempted by
    // itself on this CPU while it holds it.
    Some(unsafe { &mut *events })
}

/// Where a flow's admission record is, or goes.
enum Admission {
    /// The flow's own record, from its first datagram.
    Found(*mut PendingFlow),
    /// A free or stale record of the flow's bucket, for its first datagram.
    Free(*mut PendingFlow),
    /// The oldest record of a full bucket, for its first datagram in place of another's.
    Displace(*mut PendingFlow),
}

/// Searches `key`'s admission bucket for its record, noting the free record or, in a full
/// bucket, the oldest one its first datagram would take.
#[inline(always)]
fn admission_record(key: &FlowKey, now: u64, idle_ns: u64) -> Option<Admission> {
    let first = (key.hash & ADMIT_BUCKET_MASK) * ADMIT_WAYS;
    let mut free = None;
    let mut oldest: Option<(*mut PendingFlow, u64)> = None;
    for way in 0..ADMIT_WAYS {
        let record = ADMISSION.get_ptr_mut(first + way)?;
        // SAFETY: a value pointer of the admission array, valid while the program runs.
        let (seen, matches) = unsafe { ((*record).seen, same_flow(&(*record).key, key)) };
        let recent = seen != 0 && now.wrapping_sub(seen) <= idle_ns;
        if !recent {
            free.get_or_insert(record);
        } else if matches {
            return Some(Admission::Found(record));
        } else if oldest.is_none_or(|(_, at)| seen < at) {
            oldest = Some((record, seen));
        }
    }
    match (free, oldest) {
        (Some(record), _) => Some(Admission::Free(record)),
        (None, Some((record, _))) => Some(Admission::Displace(record)),
        (None, None) => None,
    }
}

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;
/// `EEXIST`, as helpers return it (negated).
const EEXIST: i32 = 17;

/// A flow placed on `slot` now, with the slot's generation.
#[inline(always)]
fn placed(slot: u16, now: u64) -> Flow {
    Flow {
        slot,
        reserved: 0,
        generation: generation_of(slot).unwrap_or(0),
        last_seen: now,
    }
}

/// Whether userspace recorded `slot` as holding no socket (free, or its socket closed).
#[inline(always)]
fn is_vacant(slot: u16) -> bool {
    SLOTS.get(u32::from(slot)).is_none_or(|meta| {
        meta.state == SlotState::Free as u32 || meta.state == SlotState::Dead as u32
    })
}

/// The generation userspace recorded for `slot`.
#[inline(always)]
fn generation_of(slot: u16) -> Option<u32> {
    SLOTS.get(u32::from(slot)).map(|meta| meta.generation)
}

/// Whether two keys name the same flow, compared as three 64-bit words (the eBPF target
/// has no `memcmp`).
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    // SAFETY: `FlowKey` is 24 bytes of plain integers, so it is three `u64`s' worth.
    let (a, b) = unsafe {
        (
            core::mem::transmute::<FlowKey, [u64; 3]>(*a),
            core::mem::transmute::<FlowKey, [u64; 3]>(*b),
        )
    };
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2]
}

/// The flow of a datagram from `source` (of IP `family`), whose source port is the first
/// two bytes of its UDP header (where the packet data starts).
#[inline(always)]
pub(crate) fn flow_key(
    ctx: &SkReuseportContext,
    family: u16,
    source: [u8; 16],
    hash: u32,
) -> FlowKey {
    let (data, end) = (ctx.data(), ctx.data_end());
    let port = if data + 2 <= end {
        // SAFETY: the two bytes are inside the packet, as checked against `data_end`.
        unsafe { core::ptr::read_unaligned(data as *const u16) }
    } else {
        0
    };
    FlowKey {
        source,
        port,
        family,
        hash,
    }
}
