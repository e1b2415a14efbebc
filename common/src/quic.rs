//! QUIC-LB connection-ID steering (draft-ietf-quic-load-balancers-21, unencrypted mode): what
//! the program and the daemon agree on. Each worker of a `quic` service issues connection
//! IDs whose first octet carries the service's config rotation bits and whose next
//! [`SERVER_ID_LEN`] octets are its server ID: its slot and the low octet of its
//! generation. The program sends a packet whose destination connection ID carries a live
//! slot's server ID to that slot, whatever the packet's 4-tuple, so a connection survives
//! NAT rebinding and migration; a new connection's first flight (the client's own
//! connection ID) goes by the table alone; every other packet as any datagram.

use crate::MAX_SLOTS;

mod aes;

pub use aes::{QuicKey, ROUND_KEY_WORDS, decrypt_block};

/// Octets of a portshard server ID: the slot (big-endian `u16`) and its generation's low
/// octet, so a slot reused by another generation does not take the old one's connections.
pub const SERVER_ID_LEN: usize = 3;

/// [`crate::Table::flags`] bit: the service's UDP packets are parsed as QUIC, and steered by
/// the server ID in their destination connection ID.
pub const TABLE_QUIC: u32 = 4;

/// [`crate::Table::flags`] bit: the workers' connection IDs are encrypted in the draft's
/// single-pass mode (server ID and nonce are one AES-128 block) under the key in the
/// `quic_key` map, and the program decrypts them.
pub const TABLE_QUIC_ENCRYPTED: u32 = 8;

/// The nonce of an encrypted connection ID: with the server ID, the one AES block the
/// single-pass mode needs, the only encrypted mode the program decrypts.
pub const ENCRYPTED_NONCE_LEN: u8 = (16 - SERVER_ID_LEN) as u8;

/// The [`crate::Table::flags`] bits holding the config rotation codepoint (0..=6) workers use.
const CONFIG_ID_SHIFT: u32 = 8;
/// The [`crate::Table::flags`] bits holding the length of the workers' connection IDs.
const CID_LEN_SHIFT: u32 = 11;

/// The config rotation codepoint the draft reserves for connection IDs no load balancer
/// can route (`0b111`).
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;

/// Smallest nonce the draft allows.
pub const MIN_NONCE_LEN: u8 = 4;
/// Largest nonce that keeps the connection ID within QUIC's 20 octets with our server ID.
pub const MAX_NONCE_LEN: u8 = (MAX_CID_LEN - 1 - SERVER_ID_LEN) as u8;
/// QUIC v1's longest connection ID.
pub const MAX_CID_LEN: usize = 20;

/// The smallest short-header datagram the program reads a connection ID from, past the
/// connection ID: a packet number (1..4 octets) and an AEAD tag (16) at least.
pub const MIN_SHORT_TAIL: u32 = 17;

/// A portshard server ID: slot and generation as the program compares them.
pub const fn server_id(slot: u16, generation: u32) -> [u8; SERVER_ID_LEN] {
    let [high, low] = slot.to_be_bytes();
    [high, low, generation as u8]
}

/// The slot and generation octet a server ID names (the inverse of [`server_id`]).
pub const fn decode_server_id(id: [u8; SERVER_ID_LEN]) -> (u16, u8) {
    (u16::from_be_bytes([id[0], id[1]]), id[2])
}

/// Whether a decoded slot number can name a slot at all.
pub const fn slot_in_range(slot: u16) -> bool {
    (slot as u32) < MAX_SLOTS
}

/// The [`crate::Table::flags`] bits of a QUIC service: [`TABLE_QUIC`], its config rotation
/// codepoint, its connection IDs' length (1 + [`SERVER_ID_LEN`] + nonce) and, if
/// `encrypted`, [`TABLE_QUIC_ENCRYPTED`].
pub const fn quic_flags(config_id: u8, nonce_len: u8, encrypted: bool) -> u32 {
    let cid_len = 1 + SERVER_ID_LEN as u32 + nonce_len as u32;
    let encrypted = if encrypted { TABLE_QUIC_ENCRYPTED } else { 0 };
    TABLE_QUIC
        | encrypted
        | ((config_id as u32 & 0b111) << CONFIG_ID_SHIFT)
        | (cid_len << CID_LEN_SHIFT)
}

/// The config rotation codepoint in a table's flags.
pub const fn config_id_of(flags: u32) -> u8 {
    ((flags >> CONFIG_ID_SHIFT) & 0b111) as u8
}

/// The connection ID length in a table's flags.
pub const fn cid_len_of(flags: u32) -> u32 {
    (flags >> CID_LEN_SHIFT) & 0b1_1111
}

const _: () = assert!(MAX_NONCE_LEN >= MIN_NONCE_LEN);

/// Per-slot QUIC counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct QuicSlotCounters {
    /// Packets (short-header, and long-header ones of a handshake under way) delivered here
    /// by the server ID in their connection ID.
    pub by_connection_id: u64,
    /// Short-header packets whose connection ID names this slot, but a generation it no
    /// longer holds, a state that takes no packets (free, dead, starting) or a closed
    /// socket: steered by the table instead.
    pub stale_server_id: u64,
}

/// The value of the per-CPU `quic_events` map: one row per slot and the service-wide rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicCounters {
    /// Indexed by the slot a connection ID names.
    pub slots: [QuicSlotCounters; MAX_SLOTS as usize],
    /// Long-header packets whose connection ID names no serving slot: steered as any
    /// datagram (by the table, or the flow table), but see [`Self::first_flight`].
    pub long_header: u64,
    /// Of [`Self::long_header`], the Initial and 0-RTT packets: a new connection's first
    /// flight, steered by the table alone, since a flow table entry on the client's
    /// address and port is an older connection's.
    pub first_flight: u64,
    /// Long-header packets of a version other than QUIC v1 and v2 (still steered by the
    /// table; a server answers them with version negotiation).
    pub unknown_version: u64,
    /// Short-header packets whose connection ID has other config rotation bits (another
    /// configuration, or the unroutable codepoint): steered by the table.
    pub other_config: u64,
    /// Short-header packets whose server ID names no slot (a forged or foreign ID).
    pub unknown_server_id: u64,
    /// Datagrams too short to hold a QUIC packet with the service's connection ID, or
    /// unreadable: steered by the table.
    pub malformed: u64,
}

impl QuicCounters {
    /// Adds `other` to these counters (to sum the CPUs' copies).
    pub fn add(&mut self, other: &Self) {
        for (mine, theirs) in self.slots.iter_mut().zip(other.slots.iter()) {
            mine.by_connection_id = mine.by_connection_id.wrapping_add(theirs.by_connection_id);
            mine.stale_server_id = mine.stale_server_id.wrapping_add(theirs.stale_server_id);
        }
        self.long_header = self.long_header.wrapping_add(other.long_header);
        self.first_flight = self.first_flight.wrapping_add(other.first_flight);
        self.unknown_version = self.unknown_version.wrapping_add(other.unknown_version);
        self.other_config = self.other_config.wrapping_add(other.other_config);
        self.unknown_server_id = self.unknown_server_id.wrapping_add(other.unknown_server_id);
        self.malformed = self.malformed.wrapping_add(other.malformed);
    }
}

impl Default for QuicCounters {
    fn default() -> Self {
        Self {
            slots: [QuicSlotCounters::default(); MAX_SLOTS as usize],
            long_header: 0,
            first_flight: 0,
            unknown_version: 0,
            other_config: 0,
            unknown_server_id: 0,
            malformed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_id_names_its_slot_and_generation_octet() {
        for (slot, generation) in [(0, 0), (5, 1), (511, 257), (300, u32::MAX)] {
            assert_eq!(
                decode_server_id(server_id(slot, generation)),
                (slot, generation as u8)
            );
        }
    }

    #[test]
    fn flags_carry_config_id_and_length_without_touching_other_bits() {
        for config_id in 0..=6 {
            for nonce_len in MIN_NONCE_LEN..=MAX_NONCE_LEN {
                for encrypted in [false, true] {
                    let flags = quic_flags(config_id, nonce_len, encrypted);
                    assert_eq!(config_id_of(flags), config_id);
                    assert_eq!(cid_len_of(flags), 4 + u32::from(nonce_len));
                    assert!(cid_len_of(flags) as usize <= MAX_CID_LEN);
                    assert_eq!(flags & TABLE_QUIC_ENCRYPTED != 0, encrypted);
                    let quic_bits = TABLE_QUIC
                        | TABLE_QUIC_ENCRYPTED
                        | (0b111 << CONFIG_ID_SHIFT)
                        | (0b1_1111 << CID_LEN_SHIFT);
                    assert_eq!(flags & !quic_bits, 0);
                    assert_eq!(flags & (crate::TABLE_FLOWS | crate::TABLE_PROBES), 0);
                }
            }
        }
    }
}
