//! The Prometheus (OpenMetrics text) exposition of a status snapshot: per service and slot,
//! the program's counters, table entries and worker restarts, the foreign sockets on its
//! address, and the daemon's probe outcomes. Pure: it formats what it is given, with the maintained `prometheus-client`
//! crate doing the encoding.
use std::collections::BTreeMap;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    probe::OutcomeCounts,
    report::{FlowTableReport, QuicReport, StatusReport},
    table::Slot,
};

/// The health probes' outcomes so far, by service and slot.
pub type ProbeOutcomes = BTreeMap<(String, Slot), OutcomeCounts>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    service: String,
    slot: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    service: String,
    slot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    service: String,
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    service: String,
    state: String,
}

/// The OpenMetrics text of `status` and of the daemon's probe outcomes `probes`.
pub fn encode_status(status: &StatusReport, probes: &ProbeOutcomes) -> String {
    let mut registry = Registry::with_prefix("portshard");
    let slot_counter = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<SlotLabels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    };
    let selected = slot_counter(
        &mut registry,
        "selected",
        "New flows and connections sent to the slot as its table entry's owner",
    );
    let failed_over = slot_counter(
        &mut registry,
        "failed_over",
        "New flows sent to the slot as heir because the owner's socket was gone",
    );
    let probed = slot_counter(
        &mut registry,
        "probed",
        "New flows sent to the slot by the probe because owner and heir were gone",
    );
    let migrated = slot_counter(
        &mut registry,
        "migrated",
        "Queued connections of a closing listener handed to the slot",
    );
    let flow_hits = slot_counter(
        &mut registry,
        "flow_hits",
        "Datagrams of known UDP flows the flow table delivered to the slot",
    );
    let restarts = slot_counter(
        &mut registry,
        "worker_restarts",
        "Times the slot's worker was restarted after it died",
    );
    let entries = Family::<SlotLabels, Gauge>::default();
    registry.register(
        "table_entries",
        "Lookup-table entries the slot owns (its share of new flows, out of 65536)",
        entries.clone(),
    );
    let fell_through = Family::<ServiceLabels, Counter>::default();
    registry.register(
        "fell_through",
        "Program runs that found no live slot and let the kernel's hash choose",
        fell_through.clone(),
    );
    let service_counter = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<ServiceLabels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    };
    // Each flow table counter: its name, its help, and where the report holds it.
    type FlowCount = fn(&FlowTableReport) -> u64;
    let flow_events: Vec<(Family<ServiceLabels, Counter>, FlowCount)> = [
        (
            "flow_table_new",
            "UDP flows entered in the flow table (on their second datagram)",
            (|t| t.new) as FlowCount,
        ),
        (
            "flow_table_owner_gone",
            "Datagrams of known flows whose slot was gone, steered by the table again",
            (|t| t.owner_gone) as FlowCount,
        ),
        (
            "flow_table_swept",
            "Flows removed from the flow table after flow_idle without a datagram",
            (|t| t.swept) as FlowCount,
        ),
        (
            "flow_table_pending",
            "First datagrams of flows not in the flow table, recorded for admission",
            (|t| t.events.pending) as FlowCount,
        ),
        (
            "flow_table_displaced",
            "Admission records overwritten by another new flow before their flow's second datagram (a flood of new flows shows here)",
            (|t| t.events.displaced) as FlowCount,
        ),
        (
            "flow_table_unkept",
            "Second datagrams whose flow could not be entered because the flow table was full (a flow not kept is counted again on each later datagram): it follows the table, unkept",
            (|t| t.events.unkept) as FlowCount,
        ),
        (
            "flow_table_expired",
            "Datagrams of flows idle past flow_idle, steered as new flows",
            (|t| t.events.expired) as FlowCount,
        ),
        (
            "flow_table_reused_slot",
            "Datagrams of known flows whose slot now holds another generation, steered by the table instead",
            (|t| t.events.reused_slot) as FlowCount,
        ),
    ]
    .into_iter()
    .map(|(name, help, count)| (service_counter(&mut registry, name, help), count))
    .collect();
    // Each QUIC counter: its name, its help, and where the report holds it.
    type QuicCount = fn(&QuicReport) -> u64;
    let quic_events: Vec<(Family<ServiceLabels, Counter>, QuicCount)> = [
        (
            "quic_long_header",
            "QUIC long-header packets whose connection ID names no serving slot (Initial, 0-RTT, Handshake), steered as any datagram",
            (|q| q.long_header) as QuicCount,
        ),
        (
            "quic_first_flight",
            "QUIC Initial and 0-RTT packets with the client's own connection ID (a new connection's first flight), steered by the table alone, not by the flow table",
            (|q| q.first_flight) as QuicCount,
        ),
        (
            "quic_unknown_version",
            "QUIC long-header packets of a version other than 1 and 2, steered by the table",
            (|q| q.unknown_version) as QuicCount,
        ),
        (
            "quic_other_config",
            "QUIC short-header packets whose connection ID has another config rotation codepoint (not issued under this service's QUIC-LB config), steered by the table",
            (|q| q.other_config) as QuicCount,
        ),
        (
            "quic_unknown_server_id",
            "QUIC short-header packets whose server ID names no slot (forged or foreign), steered by the table",
            (|q| q.unknown_server_id) as QuicCount,
        ),
        (
            "quic_malformed",
            "Datagrams of a QUIC service too short for its connection IDs, steered by the table",
            (|q| q.malformed) as QuicCount,
        ),
    ]
    .into_iter()
    .map(|(name, help, count)| (service_counter(&mut registry, name, help), count))
    .collect();
    let by_connection_id = slot_counter(
        &mut registry,
        "quic_by_connection_id",
        "QUIC packets (short headers, and long headers of a handshake under way) delivered to the slot by the server ID in their connection ID, whatever their address",
    );
    let stale_server_id = slot_counter(
        &mut registry,
        "quic_stale_server_id",
        "QUIC short-header packets naming the slot when it no longer served their connection (another generation, dead, starting, socket closed): steered by the table",
    );
    let flows = Family::<ServiceLabels, Gauge>::default();
    registry.register(
        "flow_table_flows",
        "UDP flows the flow table holds",
        flows.clone(),
    );
    let generation = Family::<ServiceLabels, Gauge>::default();
    registry.register(
        "generation",
        "The newest generation of the service's workers that takes new work",
        generation.clone(),
    );
    let foreign = Family::<ServiceLabels, Gauge>::default();
    registry.register(
        "foreign_sockets",
        "Sockets of other processes on the service's address and port (in its reuseport group, or on a wildcard or specific address overlapping it): they take flows meant for the service; `portshard status` names their pids. Alert when above 0",
        foreign.clone(),
    );
    let listeners = Family::<ListenerLabels, Gauge>::default();
    registry.register(
        "listener",
        "1 for each of the service's listeners (`PROTO:ADDRESS`): each worker holds a socket of each, in its slot, so every counter of the slot covers them all",
        listeners.clone(),
    );
    let workers = Family::<WorkerLabels, Gauge>::default();
    registry.register(
        "workers",
        "Slots of the service by state (live, draining, dead, starting)",
        workers.clone(),
    );
    let probe_outcomes = Family::<ProbeLabels, Counter>::default();
    registry.register(
        "probes",
        "Health probes of the slot's workers by outcome: answered, unanswered (counted towards a hang), or excused because the prober was late, the worker was running (busy), waited for a CPU (starved) or was exiting",
        probe_outcomes.clone(),
    );
    for ((service, slot), counts) in probes {
        for (outcome, count) in counts.named() {
            probe_outcomes
                .get_or_create(&ProbeLabels {
                    service: service.clone(),
                    slot: slot.to_string(),
                    outcome: outcome.to_owned(),
                })
                .inc_by(count);
        }
    }
    for service in &status.services {
        let labels = ServiceLabels {
            service: service.name.clone(),
        };
        fell_through
            .get_or_create(&labels)
            .inc_by(service.fell_through);
        for listener in &service.listeners {
            listeners
                .get_or_create(&ListenerLabels {
                    service: service.name.clone(),
                    listener: listener.clone(),
                })
                .set(1);
        }
        foreign
            .get_or_create(&labels)
            .set(i64::try_from(service.foreign.len()).unwrap_or(i64::MAX));
        if let Some(table) = &service.flow_table {
            for (family, count) in &flow_events {
                family.get_or_create(&labels).inc_by(count(table));
            }
            flows
                .get_or_create(&labels)
                .set(i64::try_from(table.flows).unwrap_or(i64::MAX));
        }
        if let Some(quic) = &service.quic {
            for (family, count) in &quic_events {
                family.get_or_create(&labels).inc_by(count(quic));
            }
            for slot in &quic.slots {
                let labels = SlotLabels {
                    service: service.name.clone(),
                    slot: slot.slot.to_string(),
                };
                by_connection_id
                    .get_or_create(&labels)
                    .inc_by(slot.by_connection_id);
                stale_server_id
                    .get_or_create(&labels)
                    .inc_by(slot.stale_server_id);
            }
        }
        if let Some(newest) = service.generations.iter().rfind(|g| g.state == "ready") {
            generation
                .get_or_create(&labels)
                .set(i64::from(newest.generation));
        }
        for slot in &service.slots {
            let labels = SlotLabels {
                service: service.name.clone(),
                slot: slot.slot.to_string(),
            };
            selected
                .get_or_create(&labels)
                .inc_by(slot.counters.selected);
            failed_over
                .get_or_create(&labels)
                .inc_by(slot.counters.failed_over);
            probed.get_or_create(&labels).inc_by(slot.counters.probed);
            flow_hits
                .get_or_create(&labels)
                .inc_by(slot.counters.flow_hits);
            migrated
                .get_or_create(&labels)
                .inc_by(slot.counters.migrated);
            restarts
                .get_or_create(&labels)
                .inc_by(u64::from(slot.restarts));
            entries.get_or_create(&labels).set(i64::from(slot.entries));
            workers
                .get_or_create(&WorkerLabels {
                    service: service.name.clone(),
                    state: slot.state.to_owned(),
                })
                .inc();
        }
    }
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use portshard_common::{Counters, MAX_SLOTS, SlotMeta, SlotState};

    use super::*;
    use crate::ownership::ForeignSocket;
    use crate::report::{PROTO_UDP, ServiceStatus, TableReport, service_meta};
    use crate::table::Table;

    #[test]
    fn counters_entries_and_restarts_are_exposed_per_slot() {
        let table = Table::with_members([(0, 1), (1, 1)]).unwrap();
        let mut metas = vec![SlotMeta::FREE; MAX_SLOTS as usize];
        for (slot, meta) in metas.iter_mut().enumerate().take(2) {
            *meta = SlotMeta {
                pid: 10 + slot as u32,
                state: SlotState::Live as u32,
                weight: 1,
                restarts: 3 * slot as u32,
                ..SlotMeta::FREE
            };
        }
        let mut counters = Counters::ZERO;
        counters.slots[1].selected = 12;
        counters.slots[0].migrated = 5;
        counters.fell_through = 2;
        counters.slots[0].flow_hits = 9;
        counters.flows_new = 4;
        let foreign = ForeignSocket {
            cookie: 7,
            address: "0.0.0.0:53".to_owned(),
            pids: vec![99],
            uid: 0,
        };
        let service = ServiceStatus::new(
            &service_meta("127.0.0.1:53".parse().unwrap(), PROTO_UDP, 0, 16),
            TableReport::new("dns", table.entries(), &metas, &counters),
            Some(FlowTableReport::new(
                16,
                3,
                1,
                &counters,
                &portshard_common::FlowCounters {
                    displaced: 7,
                    ..Default::default()
                },
            )),
        )
        .with_foreign(vec![foreign])
        .with_quic(Some(QuicReport::new(
            portshard_common::quic::quic_flags(0, 8, false),
            &{
                let mut quic = portshard_common::quic::QuicCounters::default();
                quic.slots[1].by_connection_id = 40;
                quic.slots[0].stale_server_id = 6;
                quic.unknown_server_id = 2;
                quic.long_header = 5;
                quic.first_flight = 3;
                quic
            },
        )));
        let mut outcomes = OutcomeCounts::default();
        outcomes.add(crate::probe::Outcome::Answered);
        outcomes.add(crate::probe::Outcome::Excused(
            crate::probe::Excuse::WorkerStarved,
        ));
        let probes = ProbeOutcomes::from([(("dns".to_owned(), 1), outcomes)]);
        let text = encode_status(
            &StatusReport {
                services: vec![service],
            },
            &probes,
        );
        for line in [
            "portshard_selected_total{service=\"dns\",slot=\"1\"} 12",
            "portshard_migrated_total{service=\"dns\",slot=\"0\"} 5",
            "portshard_worker_restarts_total{service=\"dns\",slot=\"1\"} 3",
            "portshard_table_entries{service=\"dns\",slot=\"0\"} 32768",
            "portshard_fell_through_total{service=\"dns\"} 2",
            "portshard_workers{service=\"dns\",state=\"live\"} 2",
            "portshard_flow_hits_total{service=\"dns\",slot=\"0\"} 9",
            "portshard_flow_table_new_total{service=\"dns\"} 4",
            "portshard_flow_table_swept_total{service=\"dns\"} 1",
            "portshard_flow_table_displaced_total{service=\"dns\"} 7",
            "portshard_flow_table_unkept_total{service=\"dns\"} 0",
            "portshard_flow_table_flows{service=\"dns\"} 3",
            "portshard_generation{service=\"dns\"} 0",
            "portshard_foreign_sockets{service=\"dns\"} 1",
            "portshard_listener{service=\"dns\",listener=\"udp:127.0.0.1:53\"} 1",
            "portshard_probes_total{service=\"dns\",slot=\"1\",outcome=\"answered\"} 1",
            "portshard_probes_total{service=\"dns\",slot=\"1\",outcome=\"worker_starved\"} 1",
            "portshard_probes_total{service=\"dns\",slot=\"1\",outcome=\"unanswered\"} 0",
            "portshard_quic_by_connection_id_total{service=\"dns\",slot=\"1\"} 40",
            "portshard_quic_stale_server_id_total{service=\"dns\",slot=\"0\"} 6",
            "portshard_quic_unknown_server_id_total{service=\"dns\"} 2",
            "portshard_quic_malformed_total{service=\"dns\"} 0",
            "portshard_quic_long_header_total{service=\"dns\"} 5",
            "portshard_quic_first_flight_total{service=\"dns\"} 3",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
