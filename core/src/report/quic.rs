//! What `status` shows of a QUIC service's connection-ID steering: the connection IDs the
//! program expects, how many packets it delivered by them, and why the others went by the
//! table.
use portshard_common::quic::{QuicCounters, TABLE_QUIC_ENCRYPTED, cid_len_of, config_id_of};
use serde::Serialize;

use crate::table::Slot;

/// A QUIC service's steering counters, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuicReport {
    /// The config rotation codepoint the program expects in connection IDs.
    pub config_id: u8,
    /// The length of the workers' connection IDs.
    pub cid_len: u32,
    /// Whether connection IDs are encrypted (single-pass AES-128); the program decrypts
    /// them with the service's key.
    pub encrypted: bool,
    /// Packets delivered by the server ID in their connection ID.
    pub by_connection_id: u64,
    /// Short-header packets naming a slot that no longer serves their connection (another
    /// generation, dead, starting, or socket closed): steered by the table.
    pub stale_server_id: u64,
    /// Long-header packets whose connection ID names no serving slot, steered as any
    /// datagram.
    pub long_header: u64,
    /// Of `long_header`, a new connection's Initial and 0-RTT packets: steered by the table
    /// alone, never by a flow table entry of an older connection on the same port.
    pub first_flight: u64,
    /// Long-header packets of a version other than QUIC v1 and v2.
    pub unknown_version: u64,
    /// Short-header packets with another config rotation codepoint: steered by the table.
    pub other_config: u64,
    /// Short-header packets whose server ID names no slot: steered by the table.
    pub unknown_server_id: u64,
    /// Datagrams too short for the service's connection IDs: steered by the table.
    pub malformed: u64,
    /// The slots with a count, by slot.
    pub slots: Vec<QuicSlotReport>,
}

/// One slot's connection-ID counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuicSlotReport {
    /// The slot the server IDs named.
    pub slot: Slot,
    /// Packets delivered to it by connection ID.
    pub by_connection_id: u64,
    /// Packets naming it that it no longer serves.
    pub stale_server_id: u64,
}

impl QuicReport {
    /// The report of a service whose table flags are `flags` (carrying the QUIC bits) and
    /// whose program counted `counters`.
    pub fn new(flags: u32, counters: &QuicCounters) -> Self {
        let slots: Vec<QuicSlotReport> = counters
            .slots
            .iter()
            .enumerate()
            .filter(|(_, row)| row.by_connection_id != 0 || row.stale_server_id != 0)
            .map(|(slot, row)| QuicSlotReport {
                slot: slot as Slot,
                by_connection_id: row.by_connection_id,
                stale_server_id: row.stale_server_id,
            })
            .collect();
        Self {
            config_id: config_id_of(flags),
            cid_len: cid_len_of(flags),
            encrypted: flags & TABLE_QUIC_ENCRYPTED != 0,
            by_connection_id: slots.iter().map(|s| s.by_connection_id).sum(),
            stale_server_id: slots.iter().map(|s| s.stale_server_id).sum(),
            long_header: counters.long_header,
            first_flight: counters.first_flight,
            unknown_version: counters.unknown_version,
            other_config: counters.other_config,
            unknown_server_id: counters.unknown_server_id,
            malformed: counters.malformed,
            slots,
        }
    }
}

#[cfg(test)]
mod tests {
    use portshard_common::quic::quic_flags;

    use super::*;

    #[test]
    fn totals_are_the_sum_of_the_slots_and_empty_slots_are_left_out() {
        let mut counters = QuicCounters::default();
        counters.slots[3].by_connection_id = 10;
        counters.slots[7].by_connection_id = 5;
        counters.slots[7].stale_server_id = 2;
        counters.malformed = 1;
        let report = QuicReport::new(quic_flags(2, 8, false), &counters);
        assert_eq!((report.config_id, report.cid_len), (2, 12));
        assert!(!report.encrypted);
        assert!(QuicReport::new(quic_flags(2, 13, true), &counters).encrypted);
        assert_eq!((report.by_connection_id, report.stale_server_id), (15, 2));
        assert_eq!(report.malformed, 1);
        let slots: Vec<Slot> = report.slots.iter().map(|s| s.slot).collect();
        assert_eq!(slots, [3, 7]);
    }
}
