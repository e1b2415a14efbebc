use super::*;
use crate::table::Table;

#[test]
fn service_records_round_trip_their_address() {
    for addr in [
        "127.0.0.1:5300",
        "[::1]:53",
        "[2001:db8::7]:443",
        "0.0.0.0:1",
    ] {
        let addr: SocketAddr = addr.parse().unwrap();
        let meta = service_meta(addr, PROTO_TCP, 1, 0);
        assert_eq!(listen_address(&meta), addr);
        let status = ServiceStatus::new(
            &meta,
            TableReport::new("web", &[], &[], &Counters::ZERO),
            None,
        );
        assert_eq!((status.proto, status.mode), ("tcp", "handover"));
        assert_eq!(status.listen, addr.to_string());
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["foreign"], serde_json::json!([]), "{json}");
    }
}

#[test]
fn status_lists_every_listener_the_first_being_proto_and_listen() {
    let tcp4 = service_meta("0.0.0.0:443".parse().unwrap(), PROTO_TCP, 0, 0);
    let udp6 = service_meta("[::]:443".parse().unwrap(), PROTO_UDP, 0, 0);
    let status = ServiceStatus::new(
        &tcp4,
        TableReport::new("web", &[], &[], &Counters::ZERO),
        None,
    );
    assert_eq!(status.listeners, ["tcp:0.0.0.0:443"]);
    // Unused records (zero) are left out; none recorded keeps the service record's.
    let zero = service_meta("0.0.0.0:0".parse().unwrap(), 0, 0, 0);
    let zero = ServiceMeta { family: 0, ..zero };
    let status = status.with_listeners(&[zero; 4]);
    assert_eq!(status.listeners, ["tcp:0.0.0.0:443"]);
    let status = status.with_listeners(&[tcp4, udp6, zero, zero]);
    assert_eq!(status.listeners, ["tcp:0.0.0.0:443", "udp:[::]:443"]);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["proto"], "tcp");
    assert_eq!(json["listen"], "0.0.0.0:443");
    assert_eq!(
        json["listeners"],
        serde_json::json!(["tcp:0.0.0.0:443", "udp:[::]:443"])
    );
    assert_eq!(listener_of(&udp6), Listener::parse("udp:[::]:443"));
    assert_eq!(proto_number(Proto::Udp), PROTO_UDP);
}

fn metas(live: &[(Slot, u32)]) -> Vec<SlotMeta> {
    let mut metas = vec![SlotMeta::FREE; MAX_SLOTS as usize];
    for &(slot, weight) in live {
        metas[usize::from(slot)] = SlotMeta {
            cookie: 1,
            pid: 100 + u32::from(slot),
            state: SlotState::Live as u32,
            generation: 0,
            weight,
            restarts: 0,
            started: 0,
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

#[test]
fn generations_take_the_state_of_their_most_advanced_slot() {
    let table = Table::with_members([(0, 1), (2, 1)]).unwrap();
    let mut metas = metas(&[(0, 1), (1, 1), (2, 1), (3, 1)]);
    for (slot, generation, state) in [
        (0, 1, SlotState::Draining),
        (1, 1, SlotState::Dead),
        (2, 2, SlotState::Live),
        (3, 3, SlotState::Starting),
    ] {
        metas[slot].generation = generation;
        metas[slot].state = state as u32;
    }
    metas.push(SlotMeta::FREE);
    let report = TableReport::new("web", table.entries(), &metas, &Counters::ZERO);
    let states: Vec<(u32, &str, Vec<Slot>)> = generations(&report.slots)
        .into_iter()
        .map(|g| (g.generation, g.state, g.slots))
        .collect();
    assert_eq!(
        states,
        [
            (1, "draining", vec![0, 1]),
            (2, "ready", vec![2]),
            (3, "starting", vec![3])
        ]
    );
}

#[test]
fn flow_table_figures_add_up() {
    let mut counters = Counters::ZERO;
    counters.slots[0].flow_hits = 5;
    counters.slots[3].flow_hits = 7;
    counters.flows_new = 100;
    counters.flows_owner_gone = 2;
    let events = FlowCounters {
        pending: 300,
        displaced: 4,
        ..FlowCounters::default()
    };
    let report = FlowTableReport::new(64, 60, 40, &counters, &events);
    assert_eq!(
        (report.hits, report.new, report.owner_gone, report.swept),
        (12, 100, 2, 40)
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["pending"], 300);
    assert_eq!(json["displaced"], 4);
}

#[test]
fn flows_are_grouped_by_slot_and_generation() {
    let flow = |slot, generation, last_seen| Flow {
        slot,
        reserved: 0,
        generation,
        last_seen,
    };
    let key = |port: u16, hash| FlowKey {
        source: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: port.to_be(),
        family: 4,
        hash,
    };
    let flows = [
        (key(9, 90), flow(1, 2, 5_000_000_000)),
        (key(3, 30), flow(1, 2, 7_000_000_000)),
        (key(5, 50), flow(0, 1, 1_000_000_000)),
    ];
    let report = FlowReport::new("dns", 64, &flows, 8_000_000_000);
    let groups: Vec<(Slot, u32, usize, u64)> = report
        .by_slot
        .iter()
        .map(|g| (g.slot, g.generation, g.flows, g.least_idle_ms))
        .collect();
    assert_eq!(groups, [(0, 1, 1, 7000), (1, 2, 2, 1000)]);
    assert_eq!(
        report
            .flows
            .iter()
            .map(|f| (f.source.to_string(), f.hash))
            .collect::<Vec<_>>(),
        [
            ("127.0.0.1:3".to_owned(), 30),
            ("127.0.0.1:5".to_owned(), 50),
            ("127.0.0.1:9".to_owned(), 90)
        ]
    );
}
