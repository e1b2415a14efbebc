//! Config parsing: the design's example, defaults, and one test per kind of mistake, each
//! checking the line, the field and the advice of the error.
use proptest::prelude::*;

use super::*;

const FILE: &str = "/etc/portshard.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE))
}

/// The single problem of `text`, as printed: `file:line:col: what: message`.
fn problem(text: &str) -> String {
    let error = parse(text).unwrap_err();
    assert_eq!(error.problems.len(), 1, "{error}");
    error.to_string().lines().nth(1).unwrap().trim().to_owned()
}

const DNS: &str = r#"
[[service]]
name = "dns"
proto = "udp"
listen = "127.0.0.1:5300"
workers = 4
command = ["/usr/bin/my-server", "--flag"]
mode = "balance"
"#;

#[test]
fn the_design_example_parses_with_defaults() {
    let config = parse(DNS).unwrap();
    let dns = &config.services[0];
    assert_eq!(dns.name, "dns");
    assert_eq!(dns.proto, Proto::Udp);
    assert_eq!(dns.listen, "127.0.0.1:5300".parse().unwrap());
    assert_eq!(dns.workers, 4);
    assert_eq!(dns.command, ["/usr/bin/my-server", "--flag"]);
    assert_eq!(dns.mode, Mode::Balance);
    assert_eq!(dns.weight, 1);
    assert!(!dns.sticky);
    assert_eq!(dns.drain_idle, Duration::from_secs(30));
    assert_eq!(dns.drain_timeout, Duration::from_secs(300));
    assert_eq!(dns.flow_table, 65_536);
    assert_eq!(dns.restart, RestartPolicy::default());
}

#[test]
fn every_optional_field_is_read() {
    let text = r#"
[[service]]
name = "web"
proto = "tcp"
listen = "[::1]:8080"
workers = 256
command = ["srv"]
mode = "handover"
weight = 3
sticky = true
drain_idle = "5s"
drain_timeout = "2m"
flow_table = 1024
restart_delay = "50ms"
restart_delay_max = "2s"
restart_limit = 3
restart_window = "10s"
stop_timeout = "1s"
ready_delay = "250ms"
"#;
    let web = parse(text).unwrap().services.remove(0);
    assert_eq!(web.listen, "[::1]:8080".parse().unwrap());
    assert_eq!(
        (web.proto, web.mode, web.workers, web.weight),
        (Proto::Tcp, Mode::Handover, 256, 3)
    );
    assert!(web.sticky);
    assert_eq!(web.drain_idle, Duration::from_secs(5));
    assert_eq!(web.drain_timeout, Duration::from_secs(120));
    assert_eq!(web.flow_table, 1024);
    assert_eq!(
        web.restart,
        RestartPolicy {
            delay: Duration::from_millis(50),
            delay_max: Duration::from_secs(2),
            limit: 3,
            window: Duration::from_secs(10),
        }
    );
    assert_eq!(web.stop_timeout, Duration::from_secs(1));
    assert_eq!(web.ready_delay, Duration::from_millis(250));
}

#[test]
fn only_udp_services_in_handover_mode_or_sticky_have_a_flow_table() {
    let service = |proto: &str, extra: &str| {
        let text = format!(
            "[[service]]\nname = \"s\"\nproto = \"{proto}\"\nlisten = \"127.0.0.1:1\"\nworkers = 1\ncommand = [\"srv\"]\nflow_table = 99\n{extra}"
        );
        parse(&text).unwrap().services.remove(0)
    };
    assert_eq!(service("udp", "mode = \"handover\"").flow_capacity(), 99);
    assert_eq!(service("udp", "sticky = true").flow_capacity(), 99);
    assert_eq!(service("udp", "").flow_capacity(), 0);
    assert_eq!(service("tcp", "mode = \"handover\"").flow_capacity(), 0);
}

#[test]
fn a_udp_and_a_tcp_service_may_share_an_address() {
    let text = format!(
        "{DNS}{}",
        DNS.replace("\"dns\"", "\"dns-tcp\"")
            .replace("\"udp\"", "\"tcp\"")
    );
    assert_eq!(parse(&text).unwrap().services.len(), 2);
}

#[test]
fn duplicate_name_names_both_services() {
    let text = format!("{DNS}{}", DNS.replace("5300", "5301"));
    assert_eq!(
        problem(&text),
        format!(
            "{FILE}:11:8: service \"dns\" field `name`: duplicate name: service #1 already has it; names must be unique"
        )
    );
}

#[test]
fn duplicate_address_is_refused() {
    let text = format!("{DNS}{}", DNS.replace("\"dns\"", "\"dns2\""));
    assert_eq!(
        problem(&text),
        format!(
            "{FILE}:13:10: service \"dns2\" field `listen`: duplicate address: service \"dns\" already listens on udp 127.0.0.1:5300; give each service its own address or port"
        )
    );
}

#[test]
fn overlapping_addresses_are_refused_other_transports_and_families_are_not() {
    let wildcard = DNS
        .replace("\"dns\"", "\"any\"")
        .replace("127.0.0.1:5300", "0.0.0.0:5300");
    assert_eq!(
        problem(&format!("{DNS}{wildcard}")),
        format!(
            "{FILE}:13:10: service \"any\" field `listen`: overlapping address: service \"dns\" listens on udp 127.0.0.1:5300, and one of the two addresses is the wildcard that covers the other, so they would share traffic; give each service its own port"
        )
    );
    let tcp = wildcard.replace("\"udp\"", "\"tcp\"");
    let ipv6 = DNS
        .replace("\"dns\"", "\"dns6\"")
        .replace("127.0.0.1:5300", "[::]:5300");
    assert_eq!(
        parse(&format!("{DNS}{tcp}{ipv6}")).unwrap().services.len(),
        3
    );
}

#[test]
fn bad_values_name_their_field_and_what_is_allowed() {
    let cases = [
        (
            "workers = 4",
            "workers = 0",
            "6:11: service \"dns\" field `workers`: 0 is out of range: use 1 to 256",
        ),
        (
            "workers = 4",
            "workers = 257",
            "6:11: service \"dns\" field `workers`: 257 is out of range: use 1 to 256",
        ),
        (
            "\"127.0.0.1:5300\"",
            "\"localhost\"",
            "5:10: service \"dns\" field `listen`: \"localhost\" is not an address: write \"127.0.0.1:5300\" or \"[::1]:5300\"",
        ),
        (
            "\"127.0.0.1:5300\"",
            "\"127.0.0.1:0\"",
            "5:10: service \"dns\" field `listen`: port 0 is not allowed: workers of one service must share a fixed port",
        ),
        (
            "[\"/usr/bin/my-server\", \"--flag\"]",
            "[]",
            "7:11: service \"dns\" field `command`: is empty: give the program and its arguments, like [\"/usr/bin/my-server\", \"--flag\"]",
        ),
        (
            "\"udp\"",
            "\"sctp\"",
            "4:9: service \"dns\" field `proto`: \"sctp\" is not a transport: use \"udp\" or \"tcp\"",
        ),
        (
            "\"balance\"",
            "\"random\"",
            "8:8: service \"dns\" field `mode`: \"random\" is not a mode: use \"balance\" or \"handover\"",
        ),
        (
            "name = \"dns\"",
            "name = \"DNS!\"",
            "3:8: service #1 field `name`: \"DNS!\" is not a valid name: use 1 to 32 characters from a-z, 0-9 and '-'",
        ),
        (
            "mode = \"balance\"",
            "drain_idle = \"soon\"",
            "8:14: service \"dns\" field `drain_idle`: \"soon\" is not a duration: write a number and a unit, like \"100ms\", \"30s\" or \"5m\"",
        ),
        (
            "mode = \"balance\"",
            "weight = 0",
            "8:10: service \"dns\" field `weight`: 0 is out of range: use 1 to 10000",
        ),
    ];
    for (from, to, expected) in cases {
        let text = DNS.replace(from, to);
        assert_eq!(problem(&text), format!("{FILE}:{expected}"), "{to}");
    }
}

#[test]
fn unknown_keys_and_syntax_errors_point_at_the_place() {
    let unknown = problem(&DNS.replace("mode = \"balance\"", "modes = \"balance\""));
    assert_eq!(
        unknown,
        format!("{FILE}:8:1: service \"dns\": unknown field `modes`: did you mean `mode`?")
    );
    let far = problem(&DNS.replace("mode = \"balance\"", "colour = \"blue\""));
    assert!(
        far.contains("unknown field `colour`: a service takes name, proto"),
        "{far}"
    );
    let missing = problem(&DNS.replace("workers = 4\n", ""));
    assert!(
        missing.contains("service \"dns\": missing field `workers`"),
        "{missing}"
    );
    let syntax = problem("[[service]\nname = 1");
    assert!(syntax.starts_with(&format!("{FILE}:1:")), "{syntax}");
    let wrong_type = problem(&DNS.replace("workers = 4", "workers = \"four\""));
    assert_eq!(
        wrong_type,
        format!(
            "{FILE}:6:11: service \"dns\" field `workers`: expected a whole number, found the string \"four\""
        )
    );
    let duration = problem(&DNS.replace("mode = \"balance\"", "drain_idle = \"soon\""));
    assert!(
        duration.ends_with("\"soon\" is not a duration: write a number and a unit, like \"100ms\", \"30s\" or \"5m\""),
        "{duration}"
    );
}

#[test]
fn an_unknown_key_or_a_wrong_type_hides_no_other_problem() {
    let text = "[[service]]\nname = \"Bad Name\"\nproto = \"sctp\"\nlisten = \"localhost\"\nworkers = \"four\"\ncommand = []\nweight = 0\nflow_table = -1\ndrain_idle = \"soon\"\nunknown_key = 1\n\n[[service]]\nname = \"web\"\nworkers = 100000\n";
    let error = parse(text).unwrap_err();
    let report = error.to_string();
    for expected in [
        "2:8: service #1 field `name`: \"Bad Name\" is not a valid name",
        "3:9: service #1 field `proto`: \"sctp\" is not a transport",
        "4:10: service #1 field `listen`: \"localhost\" is not an address",
        "5:11: service #1 field `workers`: expected a whole number, found the string \"four\"",
        "6:11: service #1 field `command`: is empty",
        "7:10: service #1 field `weight`: 0 is out of range",
        "8:14: service #1 field `flow_table`: -1 is out of range",
        "9:14: service #1 field `drain_idle`: \"soon\" is not a duration",
        "10:1: service #1: unknown field `unknown_key`",
        "service \"web\": missing field `proto`",
        "service \"web\": missing field `listen`",
        "service \"web\": missing field `command`",
        "14:11: service \"web\" field `workers`: 100000 is out of range",
    ] {
        assert!(report.contains(expected), "{expected} not in\n{report}");
    }
    assert_eq!(error.problems.len(), 13, "{report}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = DNS
        .replace("workers = 4", "workers = 0")
        .replace("\"udp\"", "\"sctp\"");
    let error = parse(&text).unwrap_err();
    assert_eq!(error.problems.len(), 2);
    assert_eq!((error.problems[0].line, error.problems[1].line), (4, 6));
    assert!(error.to_string().starts_with(&format!(
        "config {FILE} is invalid (2 problems); nothing was started"
    )));
}

#[test]
fn an_empty_file_says_what_to_add() {
    assert_eq!(
        problem(""),
        format!(
            "{FILE}:1:1: the file is empty: add at least one [[service]] table, like the example in docs/configuration.md"
        )
    );
    assert!(problem("# nothing yet\n[other]\n").contains("unknown field `other`"));
}

#[test]
fn workers_may_run_as_another_user_and_group() {
    let text = DNS.replace("mode = \"balance\"", "user = \"nobody\"\ngroup = \"65534\"");
    let dns = parse(&text).unwrap().services.remove(0);
    assert_eq!(
        dns.run_as,
        Some(RunAs {
            user: "nobody".into(),
            group: Some("65534".into())
        })
    );
    let user_only = DNS.replace("mode = \"balance\"", "user = \"_svc-1\"");
    let dns = parse(&user_only).unwrap().services.remove(0);
    assert_eq!(dns.run_as.unwrap().group, None);
    assert_eq!(parse(DNS).unwrap().services[0].run_as, None);
}

#[test]
fn bad_users_and_a_group_without_a_user_are_refused() {
    let cases = [
        (
            "user = \"Root!\"",
            "8:8: service \"dns\" field `user`: \"Root!\" is not a user name: use a name like \"nobody\"",
        ),
        (
            "user = \"nobody\"\ngroup = \"99999999999\"",
            "9:9: service \"dns\" field `group`: \"99999999999\" is not a group name",
        ),
        (
            "group = \"nogroup\"",
            "8:9: service \"dns\" field `group`: is set without `user`, which would leave the workers running as root: set `user` too",
        ),
    ];
    for (to, expected) in cases {
        let text = DNS.replace("mode = \"balance\"", to);
        let found = problem(&text);
        assert!(found.starts_with(&format!("{FILE}:{expected}")), "{found}");
    }
}

#[test]
fn limits_on_services_workers_and_the_flow_table_are_enforced() {
    let many: String = (0..=MAX_SERVICES)
        .map(|i| {
            DNS.replace("\"dns\"", &format!("\"s{i}\""))
                .replace("5300", &format!("{}", 1000 + i))
        })
        .collect();
    let error = parse(&many).unwrap_err().to_string();
    assert!(
        error.contains(&format!(
            "{} services, at most {MAX_SERVICES} are allowed: split them over several daemons",
            MAX_SERVICES + 1
        )),
        "{error}"
    );
    for (field, value, allowed) in [
        (
            "workers",
            MAX_WORKERS + 1,
            format!("use 1 to {MAX_WORKERS}"),
        ),
        (
            "flow_table",
            MAX_FLOW_TABLE + 1,
            format!("use 1 to {MAX_FLOW_TABLE}"),
        ),
        ("flow_table", 0, format!("use 1 to {MAX_FLOW_TABLE}")),
    ] {
        let line = format!("{field} = {value}");
        let text = if field == "workers" {
            DNS.replace("workers = 4", &line)
        } else {
            format!("{DNS}{line}\n")
        };
        let found = problem(&text);
        assert!(
            found.contains(&format!(
                "service \"dns\" field `{field}`: {value} is out of range: {allowed}"
            )),
            "{found}"
        );
    }
}

#[test]
fn probes_are_read_with_their_defaults() {
    let text = DNS.replace("mode = \"balance\"", "probe = \"udp:ping me\"\nprobe_interval = \"200ms\"\nprobe_timeout = \"50ms\"\nprobe_failures = 2");
    let probe = parse(&text).unwrap().services.remove(0).probe.unwrap();
    assert_eq!(
        probe,
        Probe {
            kind: ProbeKind::Udp(b"ping me".to_vec()),
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(50),
            failures: 2,
        }
    );
    let tcp = DNS
        .replace("\"udp\"", "\"tcp\"")
        .replace("mode = \"balance\"", "probe = \"tcp\"");
    let probe = parse(&tcp).unwrap().services.remove(0).probe.unwrap();
    assert_eq!(
        (probe.kind, probe.interval, probe.timeout, probe.failures),
        (
            ProbeKind::Tcp,
            DEFAULT_PROBE_INTERVAL,
            DEFAULT_PROBE_TIMEOUT,
            DEFAULT_PROBE_FAILURES
        )
    );
    assert_eq!(parse(DNS).unwrap().services[0].probe, None);
}

#[test]
fn bad_probes_name_their_field_and_what_is_allowed() {
    let cases = [
        (
            "probe = \"tcp\"",
            "8:9: service \"dns\" field `probe`: \"tcp\" is not a probe for a udp service: use \"udp:<payload>\"",
        ),
        (
            "probe = \"udp:\"",
            "8:9: service \"dns\" field `probe`: \"udp:\" is not a probe for a udp service",
        ),
        (
            "probe_failures = 3",
            "8:18: service \"dns\" field `probe_failures`: is set without `probe`",
        ),
        (
            "probe = \"udp:x\"\nprobe_interval = \"100ms\"\nprobe_timeout = \"1s\"",
            "10:17: service \"dns\" field `probe_timeout`: 1s is longer than probe_interval 100ms",
        ),
        (
            "probe = \"udp:x\"\nprobe_failures = 0",
            "9:18: service \"dns\" field `probe_failures`: 0 is out of range: use 1 to 100",
        ),
    ];
    for (to, expected) in cases {
        let text = DNS.replace("mode = \"balance\"", to);
        let found = problem(&text);
        assert!(found.starts_with(&format!("{FILE}:{expected}")), "{found}");
    }
}

const WEB: &str = r#"
[[service]]
name = "web"
listen = ["tcp:0.0.0.0:443", "udp:0.0.0.0:443", "tcp:[::]:443", "udp:[::]:443"]
workers = 2
command = ["/usr/bin/h3-server"]
"#;

#[test]
fn listen_may_be_a_list_of_listeners_without_proto() {
    let web = parse(WEB).unwrap().services.remove(0);
    let listeners: Vec<String> = web.listeners.iter().map(ToString::to_string).collect();
    assert_eq!(
        listeners,
        [
            "tcp:0.0.0.0:443",
            "udp:0.0.0.0:443",
            "tcp:[::]:443",
            "udp:[::]:443"
        ]
    );
    // `proto` and `listen` are the first listener's.
    assert_eq!(
        (web.proto, web.listen),
        (Proto::Tcp, "0.0.0.0:443".parse().unwrap())
    );
    // Ports may differ; a list of one is a single listener.
    let text = WEB.replace(
        r#"["tcp:0.0.0.0:443", "udp:0.0.0.0:443", "tcp:[::]:443", "udp:[::]:443"]"#,
        r#"["udp:[::1]:8443"]"#,
    );
    let one = parse(&text).unwrap().services.remove(0);
    assert_eq!(
        (one.proto, one.listen.port(), one.listeners.len()),
        (Proto::Udp, 8443, 1)
    );
    // The single form keeps its one listener.
    let dns = parse(DNS).unwrap().services.remove(0);
    assert_eq!(dns.listeners, [Listener::new(Proto::Udp, dns.listen)]);
}

#[test]
fn a_service_with_a_udp_listener_among_others_may_have_a_flow_table() {
    let sticky = parse(&format!("{WEB}sticky = true\n")).unwrap();
    assert_eq!(sticky.services[0].flow_capacity(), DEFAULT_FLOW_TABLE);
    let tcp_only = WEB
        .replace(r#""udp:0.0.0.0:443", "#, "")
        .replace(r#", "udp:[::]:443""#, "");
    let tcp_only = parse(&format!("{tcp_only}sticky = true\n")).unwrap();
    assert_eq!(tcp_only.services[0].flow_capacity(), 0);
}

#[test]
fn two_listeners_of_one_transport_and_family_are_refused_naming_both() {
    let text = WEB.replace(r#""tcp:[::]:443""#, r#""tcp:127.0.0.1:80""#);
    assert_eq!(
        problem(&text),
        format!(
            "{FILE}:4:10: service \"web\" field `listen`: listeners \"tcp:0.0.0.0:443\" and \"tcp:127.0.0.1:80\" are both tcp4: a service takes one listener per transport and IP family (tcp4, tcp6, udp4, udp6); give the other one its own service"
        )
    );
}

#[test]
fn bad_listener_lists_name_the_field_and_what_to_do() {
    let cases = [
        (
            WEB.replace("listen = [", "proto = \"tcp\"\nlisten = ["),
            "4:9: service \"web\" field `proto`: is set, but `listen` is a list of listeners",
        ),
        (
            WEB.replace(r#""tcp:[::]:443""#, r#""sctp:[::]:443""#),
            "4:10: service \"web\" field `listen`: \"sctp:[::]:443\" is not a listener: write \"PROTO:ADDRESS\"",
        ),
        (
            WEB.replace(r#""tcp:[::]:443""#, r#""[::]:443""#),
            "4:10: service \"web\" field `listen`: \"[::]:443\" is not a listener",
        ),
        (
            WEB.replace(r#""tcp:[::]:443""#, r#""tcp:[::]:0""#),
            "4:10: service \"web\" field `listen`: port 0 is not allowed",
        ),
        (
            WEB.replace(r#""udp:[::]:443"]"#, r#""udp:[::]:443", "udp:[::1]:444"]"#),
            "4:10: service \"web\" field `listen`: 5 listeners, a service has 1 to 4",
        ),
        (
            WEB.replace(
                r#"["tcp:0.0.0.0:443", "udp:0.0.0.0:443", "tcp:[::]:443", "udp:[::]:443"]"#,
                "[]",
            ),
            "4:10: service \"web\" field `listen`: 0 listeners",
        ),
        (
            WEB.replace(r#""tcp:[::]:443""#, "3"),
            "4:10: service \"web\" field `listen`: expected an address like",
        ),
    ];
    for (text, expected) in cases {
        let found = problem(&text);
        assert!(found.starts_with(&format!("{FILE}:{expected}")), "{found}");
    }
}

#[test]
fn listeners_of_two_services_may_not_overlap() {
    let text = format!("{WEB}{}", DNS.replace("127.0.0.1:5300", "[::]:443"));
    let found = problem(&text);
    assert!(
        found.contains("service \"dns\" field `listen`: duplicate address: service \"web\" already listens on udp [::]:443"),
        "{found}"
    );
}

#[test]
fn the_builtin_default_is_a_valid_config() {
    let builtin = Config::builtin(Path::new("/usr/bin/portshard"));
    let text: String = builtin
        .services
        .iter()
        .map(|s| {
            format!(
                "[[service]]\nname = {:?}\nproto = \"{}\"\nlisten = \"{}\"\nworkers = {}\ncommand = {:?}\n",
                s.name, s.proto, s.listen, s.workers, s.command
            )
        })
        .collect();
    assert_eq!(parse(&text).unwrap(), builtin);
}

proptest! {
    /// Whatever the bytes, parsing returns a config or a located error; it never panics.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC*") {
        if let Err(error) = parse(&text) {
            prop_assert!(!error.problems.is_empty());
        }
    }

    /// Mutating one value of a valid file gives either a valid config or errors that all
    /// carry a line inside the file.
    #[test]
    fn mutated_values_are_located(value in "[ -~]{0,12}", line in 2usize..8) {
        let mut lines: Vec<String> = DNS.lines().map(str::to_owned).collect();
        if let Some((key, _)) = lines[line].split_once(" = ") {
            lines[line] = format!("{key} = {value}");
        }
        let text = lines.join("\n");
        if let Err(error) = parse(&text) {
            for p in &error.problems {
                prop_assert!(p.line >= 1 && p.line <= lines.len(), "{}", error);
            }
        }
    }
}

#[test]
fn open_files_grow_with_services_and_workers() {
    let one = |workers: u32| {
        format!(
            "[[service]]\nname = \"a\"\nproto = \"udp\"\nlisten = \"127.0.0.1:5300\"\nworkers = {workers}\ncommand = [\"/bin/true\"]\n"
        )
    };
    let small = parse(&one(1)).unwrap().open_files_needed();
    let large = parse(&one(256)).unwrap().open_files_needed();
    assert_eq!(small, FILES_BASE + FILES_PER_SERVICE + FILES_PER_WORKER);
    assert_eq!(large - small, 255 * FILES_PER_WORKER);
    // The largest config: 64 services of 256 workers need more than a default 20 000.
    let most = MAX_SERVICES as u64 * (FILES_PER_SERVICE + FILES_PER_WORKER * 256) + FILES_BASE;
    assert!(most > 20_000, "{most}");
    // Each worker's socket of each further listener, twice over during a reload.
    let four = parse(&WEB.replace("workers = 2", "workers = 256")).unwrap();
    assert_eq!(
        four.open_files_needed(),
        large + 3 * FILES_PER_EXTRA_LISTENER * 256
    );
}

mod quic;
