//! QUIC-LB connection-ID steering: a short-header packet goes to the slot its destination
//! connection ID's server ID names, while that slot serves the generation that issued it.
use aya_ebpf::{cty::c_void, helpers::bpf_skb_load_bytes, programs::SkReuseportContext};
use portshard_common::{
    SlotState, Table,
    quic::{
        MIN_SHORT_TAIL, SERVER_ID_LEN, cid_len_of, config_id_of, decode_server_id, slot_in_range,
    },
};

use crate::{QUIC_COUNTERS, SLOTS, select};

/// UDP header octets before the QUIC packet.
const UDP_HEADER: u32 = 8;
/// Octets read at the start of a QUIC packet: a short header's first octet, its connection
/// ID's first octet and the server ID; or a long header's first octet and its version.
const QUIC_PREFIX: usize = 2 + SERVER_ID_LEN;
/// QUIC v1 (RFC 9000) and v2 (RFC 9369): the versions whose long headers are not counted
/// as unknown.
const QUIC_V1: u32 = 1;
const QUIC_V2: u32 = 0x6b33_43cf;

/// Delivers a short-header QUIC packet to the slot its connection ID's server ID names, if
/// that slot is live or draining, holds the generation that issued it and its socket takes
/// the packet; true if delivered. Anything else is counted and left to the table.
#[inline(always)]
pub(crate) fn steer_quic(ctx: &SkReuseportContext, table: *const Table, flags: u32) -> bool {
    let Some(counters) = QUIC_COUNTERS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's value of a per-CPU array; the program cannot be preempted by
    // itself on this CPU while it holds it.
    let counters = unsafe { &mut *counters };
    let cid_len = cid_len_of(flags);
    let Some(prefix) = quic_prefix(ctx) else {
        counters.malformed += 1;
        return false;
    };
    if prefix[0] & 0x80 != 0 {
        counters.long_header += 1;
        let version = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        if version != QUIC_V1 && version != QUIC_V2 {
            counters.unknown_version += 1;
        }
        return false;
    }
    if (ctx.len() as u32) < UDP_HEADER + 1 + cid_len + MIN_SHORT_TAIL {
        counters.malformed += 1;
        return false;
    }
    if prefix[1] >> 5 != config_id_of(flags) {
        counters.other_config += 1;
        return false;
    }
    let (slot, generation) = decode_server_id([prefix[2], prefix[3], prefix[4]]);
    if !slot_in_range(slot) {
        counters.unknown_server_id += 1;
        return false;
    }
    let serving = SLOTS.get(u32::from(slot)).is_some_and(|meta| {
        (meta.state == SlotState::Live as u32 || meta.state == SlotState::Draining as u32)
            && meta.generation as u8 == generation
    });
    let Some(row) = counters.slots.get_mut(usize::from(slot)) else {
        return false;
    };
    if serving && select(ctx, table, slot) {
        row.by_connection_id += 1;
        true
    } else {
        row.stale_server_id += 1;
        false
    }
}

/// The first [`QUIC_PREFIX`] octets of the datagram's QUIC packet: read in place when they
/// are in the packet's linear data, else copied out; `None` if the datagram is shorter.
#[inline(always)]
fn quic_prefix(ctx: &SkReuseportContext) -> Option<[u8; QUIC_PREFIX]> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let start = data + UDP_HEADER as usize;
    if start + QUIC_PREFIX <= end {
        // SAFETY: the octets are inside the packet, as checked against `data_end`.
        return Some(unsafe { core::ptr::read_unaligned(start as *const [u8; QUIC_PREFIX]) });
    }
    let mut prefix = [0u8; QUIC_PREFIX];
    // SAFETY: the helper writes at most `QUIC_PREFIX` octets into `prefix`, which holds
    // that many, and fails on a shorter packet.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.md as *const c_void,
            UDP_HEADER,
            prefix.as_mut_ptr().cast::<c_void>(),
            QUIC_PREFIX as u32,
        )
    };
    (loaded == 0).then_some(prefix)
}
