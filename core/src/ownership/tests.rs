use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn socket(local: &str, v6only: Option<bool>, cookie: u64) -> BoundSocket {
    BoundSocket {
        local: addr(local),
        v6only,
        cookie,
        inode: 1000 + cookie as u32,
        uid: 0,
    }
}

#[test]
fn an_address_is_shared_with_its_wildcard_both_ways_and_only_on_its_port() {
    let cases = [
        // (service, socket, v6only, overlaps)
        ("127.0.0.1:53", "127.0.0.1:53", None, true),
        ("127.0.0.1:53", "0.0.0.0:53", None, true),
        ("0.0.0.0:53", "127.0.0.1:53", None, true),
        ("127.0.0.1:53", "127.0.0.2:53", None, false),
        ("127.0.0.1:53", "127.0.0.1:54", None, false),
        ("0.0.0.0:53", "0.0.0.0:54", None, false),
        // A dual-stack IPv6 socket on [::] takes IPv4 traffic too; an IPv6-only one not.
        ("127.0.0.1:53", "[::]:53", Some(false), true),
        ("127.0.0.1:53", "[::]:53", None, true),
        ("127.0.0.1:53", "[::]:53", Some(true), false),
        ("127.0.0.1:53", "[::1]:53", Some(false), false),
        // A v4-mapped bind is an IPv4 bind.
        ("127.0.0.1:53", "[::ffff:127.0.0.1]:53", Some(false), true),
        ("0.0.0.0:53", "[::ffff:10.0.0.1]:53", Some(false), true),
        ("127.0.0.1:53", "[::ffff:10.0.0.1]:53", Some(false), false),
        // portshard's IPv6 sockets are IPv6-only: IPv4 sockets never share their address.
        ("[::1]:53", "[::1]:53", Some(true), true),
        ("[::1]:53", "[::]:53", Some(false), true),
        ("[::]:53", "[::1]:53", Some(true), true),
        ("[::1]:53", "[::2]:53", Some(true), false),
        ("[::1]:53", "0.0.0.0:53", None, false),
        ("[::]:53", "127.0.0.1:53", None, false),
        ("[::]:53", "[::ffff:127.0.0.1]:53", Some(false), false),
    ];
    for (service, theirs, v6only, expected) in cases {
        assert_eq!(
            overlaps(addr(service), addr(theirs), v6only),
            expected,
            "service {service}, socket {theirs} v6only {v6only:?}"
        );
    }
}

#[test]
fn foreign_sockets_share_the_address_and_are_not_recorded_for_a_slot() {
    let found = [
        socket("127.0.0.1:53", None, 1),
        socket("127.0.0.1:53", None, 2),
        socket("0.0.0.0:53", None, 3),
        socket("127.0.0.2:53", None, 4),
    ];
    let known = BTreeSet::from([1]);
    let cookies: Vec<u64> = foreign(addr("127.0.0.1:53"), &found, &known)
        .iter()
        .map(|s| s.cookie)
        .collect();
    assert_eq!(cookies, [2, 3]);
    assert!(foreign(addr("127.0.0.1:53"), &found[..1], &known).is_empty());
}

fn holder(pid: u32, name: &str, parent: Option<(u32, &str)>) -> Holder {
    Holder {
        pid,
        name: name.to_owned(),
        parent: parent.map(|(pid, name)| (pid, name.to_owned())),
    }
}

fn in_use(sockets: Vec<(BoundSocket, Vec<Holder>)>) -> String {
    AddressInUse {
        service: "dns".to_owned(),
        proto: Proto::Udp,
        listen: addr("127.0.0.1:5300"),
        sockets,
    }
    .to_string()
}

#[test]
fn a_refusal_names_the_holders_and_what_to_do() {
    let alone = in_use(vec![(
        socket("127.0.0.1:5300", None, 9),
        vec![holder(1234, "python3", None)],
    )]);
    assert_eq!(
        alone,
        "service dns: 127.0.0.1:5300/udp is already in use by pid 1234 (python3) — a reuseport group there would be shared with it; stop that process or choose another address"
    );
    // Another daemon's workers: named together, with the daemon that restarts them.
    let workers = (0..3)
        .map(|i| {
            (
                socket("127.0.0.1:5300", None, i),
                vec![holder(
                    201 + i as u32,
                    "portshard",
                    Some((200, "portshard")),
                )],
            )
        })
        .chain([(
            socket("0.0.0.0:5300", Some(false), 7),
            vec![holder(300, "nc", Some((299, "bash")))],
        )])
        .collect();
    assert_eq!(
        in_use(workers),
        "service dns: 127.0.0.1:5300/udp is already in use by pid 300 (nc; child of pid 299 bash) on 0.0.0.0:5300, pids 201, 202, 203 (portshard; children of pid 200 portshard) — a reuseport group there would be shared with them; stop those processes or choose another address"
    );
    let unheld = in_use(vec![(socket("[::]:5300", Some(false), 5), vec![])]);
    assert!(
        unheld.contains(
            "in use by a socket on [::]:5300 of uid 0 (cookie 5) that no process in this pid namespace holds"
        ),
        "{unheld}"
    );
}

#[test]
fn a_refusal_counts_what_it_does_not_name() {
    let many = (0..6)
        .map(|i| {
            (
                socket("127.0.0.1:5300", None, i),
                vec![holder(100 + i as u32, &format!("server{i}"), None)],
            )
        })
        .collect();
    let text = in_use(many);
    assert!(
        text.contains("pid 103 (server3), 2 more groups of processes —"),
        "{text}"
    );
    assert!(!text.contains("server4"), "{text}");
}

#[test]
fn each_foreign_socket_is_new_once_and_its_holders_looked_up_once() {
    let mut sightings = Sightings::new();
    let first = [socket("127.0.0.1:53", None, 1)];
    let change = sightings.update("dns", &first, |inodes| {
        assert_eq!(inodes, &BTreeSet::from([1001]));
        BTreeMap::from([(1001, vec![42])])
    });
    assert_eq!(change.new, [ForeignSocket::new(&first[0], vec![42])]);
    assert!(change.gone.is_empty());
    assert_eq!(sightings.of("dns")[0].pids, [42]);
    assert!(sightings.of("web").is_empty());

    // Seen again, with a second one: only the second is new and looked up.
    let both = [first[0], socket("0.0.0.0:53", None, 2)];
    let change = sightings.update("dns", &both, |inodes| {
        assert_eq!(inodes, &BTreeSet::from([1002]));
        BTreeMap::new()
    });
    assert_eq!(change.new.len(), 1);
    assert_eq!(
        (change.new[0].cookie, change.new[0].address.as_str()),
        (2, "0.0.0.0:53")
    );
    assert!(change.new[0].pids.is_empty(), "nobody holds it here");
    assert_eq!(sightings.of("dns").len(), 2);

    // The first goes away.
    let change = sightings.update("dns", &both[1..], |_| panic!("nothing new to look up"));
    assert!(change.new.is_empty());
    assert_eq!(change.gone, [ForeignSocket::new(&first[0], vec![42])]);
    sightings.forget("dns");
    assert!(sightings.of("dns").is_empty());
}

#[test]
fn foreign_sockets_serialise_with_stable_field_names() {
    let json =
        serde_json::to_value(ForeignSocket::new(&socket("[::]:53", None, 7), vec![3])).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"cookie": 7, "address": "[::]:53", "pids": [3], "uid": 0})
    );
}
