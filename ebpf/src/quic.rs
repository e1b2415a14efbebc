//! QUIC-LB connection-ID steering: a packet whose destination connection ID carries a
//! serving slot's server ID (in the clear, or in one AES-128 block the program decrypts)
//! goes to that slot; a new connection's first flight goes by the table alone.
use aya_ebpf::{cty::c_void, helpers::bpf_skb_load_bytes, programs::SkReuseportContext};
use portshard_common::{
    SlotState, Table,
    quic::{
        MIN_SHORT_TAIL, QuicCounters, QuicKey, SERVER_ID_LEN, TABLE_QUIC_ENCRYPTED, cid_len_of,
        config_id_of, decode_server_id, decrypt_block, slot_in_range,
    },
};

use crate::{QUIC_COUNTERS, QUIC_KEY, SLOTS, select};

/// UDP header octets before the QUIC packet.
const UDP_HEADER: u32 = 8;
/// Where a long header's destination connection ID length is: past its first octet and
/// its version.
const LONG_DCID_LEN: usize = 5;
/// Where a long header's destination connection ID starts.
const LONG_DCID: usize = LONG_DCID_LEN + 1;
/// Where a short header's destination connection ID starts.
const SHORT_DCID: usize = 1;
/// Octets read at the start of a QUIC packet: enough for a long header's destination
/// connection ID's first octet and server ID (a short header's lie before them).
const PLAIN_PREFIX: usize = LONG_DCID + 1 + SERVER_ID_LEN;
/// The same with encrypted connection IDs: the whole AES block after the first octet.
const ENCRYPTED_PREFIX: usize = LONG_DCID + 1 + 16;
/// QUIC v1 (RFC 9000) and v2 (RFC 9369): the versions whose long headers are parsed.
const QUIC_V1: u32 = 1;
const QUIC_V2: u32 = 0x6b33_43cf;

/// What the QUIC header decided for a datagram.
pub(crate) enum QuicRoute {
    /// Delivered to the slot its destination connection ID's server ID names.
    Delivered,
    /// An Initial or 0-RTT packet whose connection ID is not one a worker issued: a new
    /// connection's first flight, which the table alone places. A flow table entry for its
    /// address and port is an older connection's (a client reuses ports), and would pin a
    /// connection opened after a handover to the old generation.
    FirstFlight,
    /// Anything else: steered as any datagram of the service.
    Other,
}

/// Steers a QUIC datagram of a service with the QUIC-LB flag in `flags`: to the slot its
/// destination connection ID names, if that ID has the service's config rotation bits (and,
/// in a long header, its length), the slot is live or draining, holds the generation that
/// issued it and its socket takes the packet. Every other case is counted.
#[inline(always)]
pub(crate) fn steer_quic(ctx: &SkReuseportContext, table: *const Table, flags: u32) -> QuicRoute {
    let Some(counters) = QUIC_COUNTERS.get_ptr_mut(0) else {
        return QuicRoute::Other;
    };
    // SAFETY: this CPU's value of a per-CPU array; the program cannot be preempted by
    // itself on this CPU while it holds it.
    let counters = unsafe { &mut *counters };
    if flags & TABLE_QUIC_ENCRYPTED == 0 {
        return steer_by::<PLAIN_PREFIX>(ctx, table, flags, counters, None);
    }
    match QUIC_KEY.get(0) {
        Some(key) => steer_by::<ENCRYPTED_PREFIX>(ctx, table, flags, counters, Some(key)),
        None => QuicRoute::Other,
    }
}

/// [`steer_quic`] reading `N` octets of the packet: the server ID in the clear without a
/// `key`, decrypted with it.
#[inline(always)]
fn steer_by<const N: usize>(
    ctx: &SkReuseportContext,
    table: *const Table,
    flags: u32,
    counters: &mut QuicCounters,
    key: Option<&QuicKey>,
) -> QuicRoute {
    let cid_len = cid_len_of(flags);
    let Some(prefix) = quic_prefix::<N>(ctx) else {
        counters.malformed += 1;
        return QuicRoute::Other;
    };
    if prefix[0] & 0x80 != 0 {
        return steer_long(ctx, table, flags, counters, &prefix, key);
    }
    if (ctx.len() as u32) < UDP_HEADER + 1 + cid_len + MIN_SHORT_TAIL {
        counters.malformed += 1;
        return QuicRoute::Other;
    }
    if prefix[SHORT_DCID] >> 5 != config_id_of(flags) {
        counters.other_config += 1;
        return QuicRoute::Other;
    }
    let (slot, generation) = decode_server_id(server_id(&prefix, SHORT_DCID, key));
    if !slot_in_range(slot) {
        counters.unknown_server_id += 1;
        return QuicRoute::Other;
    }
    if deliver(ctx, table, slot, generation) {
        if let Some(row) = counters.slots.get_mut(usize::from(slot)) {
            row.by_connection_id += 1;
        }
        return QuicRoute::Delivered;
    }
    if let Some(row) = counters.slots.get_mut(usize::from(slot)) {
        row.stale_server_id += 1;
    }
    QuicRoute::Other
}

/// Steers a long-header packet: by its destination connection ID when a worker issued it
/// (a handshake's later packets, from any address), else by the table; an Initial or 0-RTT
/// packet whose connection ID names no serving slot is a new connection's first flight.
/// Only QUIC v1 and v2 are parsed; other versions are counted and steered as any datagram.
#[inline(always)]
fn steer_long<const N: usize>(
    ctx: &SkReuseportContext,
    table: *const Table,
    flags: u32,
    counters: &mut QuicCounters,
    prefix: &[u8; N],
    key: Option<&QuicKey>,
) -> QuicRoute {
    let version = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    // The long packet type codepoints of the Initial and 0-RTT packets (RFC 9000 17.2,
    // RFC 9369 3.2).
    let (initial, zero_rtt) = match version {
        QUIC_V1 => (0, 1),
        QUIC_V2 => (1, 2),
        _ => {
            counters.long_header += 1;
            counters.unknown_version += 1;
            return QuicRoute::Other;
        }
    };
    if u32::from(prefix[LONG_DCID_LEN]) == cid_len_of(flags)
        && prefix[LONG_DCID] >> 5 == config_id_of(flags)
    {
        let (slot, generation) = decode_server_id(server_id(prefix, LONG_DCID, key));
        if slot_in_range(slot) && deliver(ctx, table, slot, generation) {
            if let Some(row) = counters.slots.get_mut(usize::from(slot)) {
                row.by_connection_id += 1;
            }
            return QuicRoute::Delivered;
        }
    }
    counters.long_header += 1;
    let packet_type = (prefix[0] >> 4) & 0b11;
    if packet_type == initial || packet_type == zero_rtt {
        counters.first_flight += 1;
        QuicRoute::FirstFlight
    } else {
        QuicRoute::Other
    }
}

/// The server ID of the connection ID at `dcid` in `prefix`: the octets after its first,
/// in the clear or, with `key`, the first of the AES block they make decrypted.
#[inline(always)]
fn server_id<const N: usize>(
    prefix: &[u8; N],
    dcid: usize,
    key: Option<&QuicKey>,
) -> [u8; SERVER_ID_LEN] {
    let Some(key) = key else {
        return [prefix[dcid + 1], prefix[dcid + 2], prefix[dcid + 3]];
    };
    let mut block = [0u8; 16];
    for (i, octet) in block.iter_mut().enumerate() {
        *octet = prefix[(dcid + 1 + i) % N];
    }
    let plain = decrypt_block(&key.round_keys, &block);
    [plain[0], plain[1], plain[2]]
}

/// Selects `slot`'s socket if the slot is live or draining and holds the generation whose
/// low octet is `generation`; true if selected.
#[inline(always)]
fn deliver(ctx: &SkReuseportContext, table: *const Table, slot: u16, generation: u8) -> bool {
    let serving = SLOTS.get(u32::from(slot)).is_some_and(|meta| {
        (meta.state == SlotState::Live as u32 || meta.state == SlotState::Draining as u32)
            && meta.generation as u8 == generation
    });
    serving && select(ctx, table, slot)
}

/// The first `N` octets of the datagram's QUIC packet: read in place when they are in the
/// packet's linear data, else copied out; `None` if the datagram is shorter (no QUIC
/// packet of the service is: a short header carries its connection ID, at least a packet
/// number and a tag).
#[inline(always)]
fn quic_prefix<const N: usize>(ctx: &SkReuseportContext) -> Option<[u8; N]> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let start = data + UDP_HEADER as usize;
    if start + N <= end {
        // SAFETY: the octets are inside the packet, as checked against `data_end`.
        return Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) });
    }
    let mut prefix = [0u8; N];
    // SAFETY: the helper writes at most `N` octets into `prefix`, which holds that many,
    // and fails on a shorter packet.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.md as *const c_void,
            UDP_HEADER,
            prefix.as_mut_ptr().cast::<c_void>(),
            N as u32,
        )
    };
    (loaded == 0).then_some(prefix)
}
