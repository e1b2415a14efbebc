//! What `portshard table` shows: per slot, the entries it owns, its share, who inherits its
//! entries and what the program counted; and the table's balance. Computed from what is
//! pinned, without syscalls.
use std::collections::BTreeMap;

use portshard_common::{
    Counters, MAX_SLOTS, NO_SLOT, SlotCounters, SlotMeta, SlotState, TABLE_SIZE, TableEntry,
};
use serde::Serialize;

use crate::table::Slot;

/// One slot's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotReport {
    /// Slot number.
    pub slot: Slot,
    /// `live`, `dead`, `draining` or `free`.
    pub state: &'static str,
    /// Process serving the slot's socket.
    pub pid: u32,
    /// Generation the slot belongs to.
    pub generation: u32,
    /// Weight in the table.
    pub weight: u32,
    /// Table entries it owns.
    pub entries: u32,
    /// The fraction of the table (and so of new flows) it owns.
    pub share: f64,
    /// How many of its entries each other slot inherits, by slot.
    pub heirs: BTreeMap<Slot, u32>,
    /// The program's counters for the slot.
    pub counters: SlotCounters,
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableReport {
    /// Service name.
    pub service: String,
    /// Slots that own entries or have a record.
    pub slots: Vec<SlotReport>,
    /// Largest `entries / (TABLE_SIZE * weight / total weight)` over the owning slots: 1.0
    /// is perfect; rounding to whole entries allows up to `1 + 1 / exact share` (with equal
    /// weights, `1 + N / TABLE_SIZE`).
    pub balance: f64,
    /// Program runs that found no live slot and let the kernel's hash choose.
    pub fell_through: u64,
}

impl TableReport {
    /// Summarises `entries`, the slot records `metas` (indexed by slot; any beyond
    /// `MAX_SLOTS` are ignored) and `counters`.
    pub fn new(
        service: &str,
        entries: &[TableEntry],
        metas: &[SlotMeta],
        counters: &Counters,
    ) -> Self {
        let mut owned = vec![0u32; MAX_SLOTS as usize];
        let mut heirs = vec![BTreeMap::<Slot, u32>::new(); MAX_SLOTS as usize];
        for entry in entries.iter().filter(|e| u32::from(e.owner) < MAX_SLOTS) {
            owned[usize::from(entry.owner)] += 1;
            if entry.heir != NO_SLOT {
                *heirs[usize::from(entry.owner)]
                    .entry(entry.heir)
                    .or_default() += 1;
            }
        }
        let slots: Vec<SlotReport> = metas
            .iter()
            .take(MAX_SLOTS as usize)
            .enumerate()
            .filter(|&(slot, meta)| owned[slot] > 0 || meta.state != SlotState::Free as u32)
            .map(|(slot, meta)| SlotReport {
                slot: slot as Slot,
                state: state_name(meta.state),
                pid: meta.pid,
                generation: meta.generation,
                weight: meta.weight,
                entries: owned[slot],
                share: f64::from(owned[slot]) / TABLE_SIZE as f64,
                heirs: std::mem::take(&mut heirs[slot]),
                counters: counters.slots[slot],
            })
            .collect();
        let owners = || slots.iter().filter(|s| s.entries > 0);
        let total_weight: f64 = owners().map(|s| f64::from(s.weight.max(1))).sum();
        let balance = owners()
            .map(|s| {
                f64::from(s.entries)
                    / (TABLE_SIZE as f64 * f64::from(s.weight.max(1)) / total_weight)
            })
            .fold(0.0, f64::max);
        Self {
            service: service.to_owned(),
            slots,
            balance,
            fell_through: counters.fell_through,
        }
    }
}

fn state_name(raw: u32) -> &'static str {
    match SlotState::from_raw(raw) {
        Some(SlotState::Free) => "free",
        Some(SlotState::Live) => "live",
        Some(SlotState::Dead) => "dead",
        Some(SlotState::Draining) => "draining",
        None => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Table;

    fn metas(live: &[(Slot, u32)]) -> Vec<SlotMeta> {
        let mut metas = vec![SlotMeta::FREE; MAX_SLOTS as usize];
        for &(slot, weight) in live {
            metas[usize::from(slot)] = SlotMeta {
                cookie: 1,
                pid: 100 + u32::from(slot),
                state: SlotState::Live as u32,
                generation: 0,
                weight,
            };
        }
        metas
    }

    #[test]
    fn reports_entries_heirs_and_balance() {
        let members = [(0, 1), (1, 1), (5, 2)];
        let table = Table::with_members(members).unwrap();
        let mut counters = Counters::ZERO;
        counters.slots[5].selected = 7;
        let report = TableReport::new("dns", table.entries(), &metas(&members), &counters);
        let entries: Vec<(Slot, u32)> = report.slots.iter().map(|s| (s.slot, s.entries)).collect();
        assert_eq!(entries, [(0, 16_384), (1, 16_384), (5, 32_768)]);
        assert_eq!(report.balance, 1.0);
        assert_eq!(report.slots[2].share, 0.5);
        assert_eq!(report.slots[2].counters.selected, 7);
        assert_eq!(report.slots[2].pid, 105);
        // Slot 5's entries go to slots 0 and 1 half and half.
        assert_eq!(
            report.slots[2].heirs,
            BTreeMap::from([(0, 16_384), (1, 16_384)])
        );
    }

    #[test]
    fn dead_slots_are_listed_with_no_entries() {
        let mut table = Table::with_members([(0, 1), (1, 1)]).unwrap();
        table.remove(1).unwrap();
        let mut metas = metas(&[(0, 1), (1, 1)]);
        metas[1].state = SlotState::Dead as u32;
        let report = TableReport::new("dns", table.entries(), &metas, &Counters::ZERO);
        assert_eq!(report.slots[1].state, "dead");
        assert_eq!(report.slots[1].entries, 0);
        assert!(report.slots[0].heirs.is_empty(), "a lone slot has no heir");
    }

    #[test]
    fn serialises_with_stable_field_names() {
        let table = Table::with_members([(2, 1)]).unwrap();
        let report = TableReport::new("web", table.entries(), &metas(&[(2, 1)]), &Counters::ZERO);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["service"], "web");
        assert_eq!(json["slots"][0]["slot"], 2);
        assert_eq!(json["slots"][0]["state"], "live");
        assert_eq!(json["slots"][0]["entries"], 65_536);
        assert_eq!(json["slots"][0]["counters"]["failed_over"], 0);
    }
}
