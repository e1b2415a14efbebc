//! One listener of N closes with no userspace reaction, userspace then removes its slot, and
//! a new listener joins: the same flows measured against plain `SO_REUSEPORT` and portshard,
//! UDP and TCP, IPv4 and IPv6, N in {2, 4, 8, 16, 64}, closing the first, middle and last
//! listener. Every case runs in a fresh network namespace.
use portshard::socket::Proto;
use portshard_harness::{
    flows::{lost, moved},
    scenario::{CloseOne, KernelRun, PortshardRun, Ratio, Sandbox, survivor_moved},
};

fn close_one_each_position(proto: Proto, ipv6: bool, n: usize) {
    for victim in [0, n / 2, n - 1] {
        close_one(CloseOne::new(proto, ipv6, n, victim));
    }
}

fn close_one(case: CloseOne) {
    let sandbox = Sandbox::enter().unwrap_or_else(|e| panic!("kernel test sandbox: {e}"));
    let label = format!(
        "{} {} N={} victim={} flows={}",
        case.proto,
        if case.ipv6 { "ipv6" } else { "ipv4" },
        case.listeners,
        case.victim,
        case.flows
    );
    let kernel = KernelRun::measure(&case).unwrap_or_else(|e| panic!("{label}: kernel run: {e:#}"));
    let ours = PortshardRun::measure(&case, sandbox.pins())
        .unwrap_or_else(|e| panic!("{label}: portshard run: {e:#}"));

    for (round, landing) in [
        ("kernel before", &kernel.before),
        ("kernel after close", &kernel.after_close),
        ("kernel after add", &kernel.after_add),
        ("portshard before", &ours.before),
        ("heir view", &ours.heirs),
        ("portshard after close", &ours.after_close),
        ("portshard after remove", &ours.after_remove),
        ("portshard after add", &ours.after_add),
    ] {
        assert_eq!(
            lost(landing),
            0,
            "{label}: {round}: flows reached no listener"
        );
    }

    // Closing a listener moves none of the other listeners' flows...
    let survivors = survivor_moved(&ours.before, &ours.after_close, case.victim);
    assert_eq!(
        survivors.part, 0,
        "{label}: portshard moved surviving flows: {survivors}"
    );
    // ...and each of the closed listener's flows lands exactly on its table heir.
    let orphans: Vec<usize> = (0..case.flows)
        .filter(|&f| ours.before[f] == Some(case.victim))
        .collect();
    assert!(!orphans.is_empty(), "{label}: the victim had no flows");
    let astray = orphans
        .iter()
        .filter(|&&f| ours.after_close[f] != ours.heirs[f])
        .count();
    assert_eq!(
        astray,
        0,
        "{label}: {astray} of {} orphaned flows missed their heir",
        orphans.len()
    );

    // Userspace removing the slot moves nothing further.
    let after_remove = moved(&ours.after_close, &ours.after_remove);
    assert_eq!(
        after_remove, 0,
        "{label}: removing the slot moved {after_remove} flows"
    );

    // A listener joining takes only its own share.
    let newcomer = case.listeners;
    let joined = Ratio {
        part: moved(&ours.after_remove, &ours.after_add),
        whole: case.flows,
    };
    let elsewhere = (0..case.flows)
        .filter(|&f| {
            ours.after_add[f] != ours.after_remove[f] && ours.after_add[f] != Some(newcomer)
        })
        .count();
    assert_eq!(
        elsewhere, 0,
        "{label}: {elsewhere} flows moved between old listeners on add"
    );
    let ideal = 1.0 / case.listeners as f64;
    assert!(
        (joined.value() - ideal).abs() <= 0.01,
        "{label}: the newcomer took {joined} of the flows, ideal {ideal:.3} (its table share {:.4})",
        f64::from(ours.entries_taken) / portshard_common::TABLE_SIZE as f64
    );

    assert!(
        ours.counter_errors.is_empty(),
        "{label}: counters disagree with flows:\n{}",
        ours.counter_errors.join("\n")
    );

    // The same flows do move under plain SO_REUSEPORT, so this test can see movement.
    let kernel_survivors = survivor_moved(&kernel.before, &kernel.after_close, case.victim);
    let kernel_joined = Ratio {
        part: moved(&kernel.after_close, &kernel.after_add),
        whole: case.flows,
    };
    if case.listeners > 2 {
        assert!(
            kernel_survivors.part > 0,
            "{label}: plain SO_REUSEPORT moved no surviving flow"
        );
    }
    assert!(
        kernel_joined.part > 0,
        "{label}: plain SO_REUSEPORT moved no flow on add"
    );
    eprintln!(
        "{label}: survivor_moved portshard={survivors} kernel={kernel_survivors}; orphans to heir {}/{}; add_moved portshard={joined} kernel={kernel_joined} ideal={ideal:.3}",
        orphans.len() - astray,
        orphans.len()
    );
}

macro_rules! close_one_tests {
    ($($name:ident: $proto:ident, $ipv6:expr, $n:expr;)*) => {
        $(
            #[test]
            fn $name() {
                close_one_each_position(Proto::$proto, $ipv6, $n);
            }
        )*
    };
}

close_one_tests! {
    udp_ipv4_2: Udp, false, 2;
    udp_ipv4_4: Udp, false, 4;
    udp_ipv4_8: Udp, false, 8;
    udp_ipv4_16: Udp, false, 16;
    udp_ipv4_64: Udp, false, 64;
    udp_ipv6_2: Udp, true, 2;
    udp_ipv6_4: Udp, true, 4;
    udp_ipv6_8: Udp, true, 8;
    udp_ipv6_16: Udp, true, 16;
    udp_ipv6_64: Udp, true, 64;
    tcp_ipv4_2: Tcp, false, 2;
    tcp_ipv4_4: Tcp, false, 4;
    tcp_ipv4_8: Tcp, false, 8;
    tcp_ipv4_16: Tcp, false, 16;
    tcp_ipv4_64: Tcp, false, 64;
    tcp_ipv6_2: Tcp, true, 2;
    tcp_ipv6_4: Tcp, true, 4;
    tcp_ipv6_8: Tcp, true, 8;
    tcp_ipv6_16: Tcp, true, 16;
    tcp_ipv6_64: Tcp, true, 64;
}
