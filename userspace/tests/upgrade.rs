//! Upgrading portshard itself under load, for real: `portshard upgrade` to a second build
//! whose eBPF program differs (the `upgrade-test` feature, built by `cargo xtask test`),
//! `kill -9` and a start of another build, an old pin layout, and binaries that cannot take
//! over. Socket-activated Python workers serve UDP and TCP in a fresh network namespace
//! while clients check that no datagram is lost, no surviving flow moves, no connection is
//! reset or refused, and held connections keep echoing.
mod support;

use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use portshard_common::{PIN_LAYOUT, names};
use portshard_harness::daemon::{Answer, DaemonRun, UdpFlows, echo, tcp_greeting, workers};
use support::{EXE, Notifications, READY, cli, cli_at, config, sandbox, target};

/// Where `cargo xtask test` puts the second build.
const UPGRADE_TEST_BINARY: &str = "PORTSHARD_UPGRADE_TEST_BINARY";

/// The services: UDP and TCP on the same port, four Python workers each.
const SERVICES: [(&str, &str, usize); 2] = [("dns", "udp", 4), ("web", "tcp", 4)];

/// How long one datagram or connection may take on a loaded host before it counts as lost.
const ANSWER: Duration = Duration::from_secs(5);

/// The second build, with a different program.
fn second_build() -> PathBuf {
    let path = std::env::var_os(UPGRADE_TEST_BINARY).unwrap_or_else(|| {
        panic!(
            "{UPGRADE_TEST_BINARY} is not set: run the tests through `cargo xtask test`, which builds the second portshard (feature upgrade-test) they upgrade to"
        )
    });
    PathBuf::from(path)
}

/// The binary an operator installed, replaced the way a package upgrade does: the new
/// file is written beside it and renamed over it, so the running one is untouched.
struct Installed {
    dir: tempfile::TempDir,
}

impl Installed {
    fn new(from: &Path) -> Self {
        let installed = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        installed.install(from);
        installed
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("portshard")
    }

    /// Copies `from` in. The copy is written by `cp`, never through a descriptor of this
    /// process: a test thread forking meanwhile would hold it open across its fork and make
    /// executing the copy fail with "text file busy".
    fn install(&self, from: &Path) {
        let staged = self.dir.path().join("portshard.new");
        let copied = Command::new("cp").arg(from).arg(&staged).status().unwrap();
        assert!(
            copied.success(),
            "cp {} {}",
            from.display(),
            staged.display()
        );
        std::fs::rename(&staged, self.path()).unwrap();
    }

    /// A "binary" that refuses, as a broken or foreign build would (written by `sh`, for
    /// the reason in [`Installed::install`]).
    fn install_script(&self, text: &str) {
        let staged = self.dir.path().join("portshard.new");
        let written = Command::new("sh")
            .args([
                "-c",
                "printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"",
                "sh",
                text,
            ])
            .arg(&staged)
            .status()
            .unwrap();
        assert!(written.success());
        std::fs::rename(&staged, self.path()).unwrap();
    }
}

/// Each service's program tag.
fn tags(daemon: &DaemonRun) -> BTreeMap<String, String> {
    daemon
        .status()
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.program_tag))
        .collect()
}

fn layouts(daemon: &DaemonRun) -> BTreeMap<String, u32> {
    daemon
        .status()
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.pin_layout))
        .collect()
}

/// What the clients saw while the load ran.
#[derive(Debug, Default)]
struct Seen {
    udp_rounds: usize,
    datagrams: usize,
    lost: Vec<(usize, usize)>,
    moved: Vec<(usize, Answer, Answer)>,
    connections: usize,
    tcp_failures: Vec<String>,
}

/// Continuous UDP rounds over flows with known owners, and a stream of new TCP
/// connections that are greeted and echo, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    udp: JoinHandle<(Seen, UdpFlows)>,
    tcp: JoinHandle<Seen>,
}

impl Load {
    fn start(mut flows: UdpFlows, owners: Vec<Answer>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let udp = {
            let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
            thread::spawn(move || {
                let mut seen = Seen::default();
                while !stop.load(Ordering::Relaxed) {
                    let answers = flows.round(ANSWER).unwrap();
                    seen.udp_rounds += 1;
                    seen.datagrams += answers.len();
                    for (flow, answer) in answers.into_iter().enumerate() {
                        match answer {
                            None => seen.lost.push((seen.udp_rounds, flow)),
                            Some(answer) if answer.pid != owners[flow].pid => {
                                seen.moved.push((flow, owners[flow], answer))
                            }
                            Some(_) => {}
                        }
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
                (seen, flows)
            })
        };
        let tcp = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut seen = Seen::default();
                while !stop.load(Ordering::Relaxed) {
                    let opened = tcp_greeting(target(), ANSWER)
                        .and_then(|(mut stream, _)| echo(&mut stream, "ping", ANSWER));
                    match opened {
                        Ok(()) => seen.connections += 1,
                        Err(error) => seen.tcp_failures.push(error.to_string()),
                    }
                }
                seen
            })
        };
        Self {
            stop,
            rounds,
            udp,
            tcp,
        }
    }

    /// Waits until `more` UDP rounds have completed since the call.
    fn wait_rounds(&self, more: usize) {
        let until = self.rounds.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + READY * 3;
        while self.rounds.load(Ordering::Relaxed) < until {
            assert!(Instant::now() < deadline, "the UDP load made no progress");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the clients; returns what they saw and the flows.
    fn stop(self) -> (Seen, UdpFlows) {
        self.stop.store(true, Ordering::Relaxed);
        let (udp, flows) = self.udp.join().unwrap();
        let tcp = self.tcp.join().unwrap();
        let seen = Seen {
            connections: tcp.connections,
            tcp_failures: tcp.tcp_failures,
            ..udp
        };
        (seen, flows)
    }
}

/// Asserts the zero figures of one phase and prints them.
fn assert_untouched(phase: &str, seen: &Seen) {
    println!(
        "{phase}: {} UDP rounds, {} datagrams, {} lost, {} flows moved; {} TCP connections, {} failed",
        seen.udp_rounds,
        seen.datagrams,
        seen.lost.len(),
        seen.moved.len(),
        seen.connections,
        seen.tcp_failures.len()
    );
    assert!(
        seen.udp_rounds >= 2 && seen.connections > 0,
        "{phase}: no load ran: {seen:?}"
    );
    assert!(
        seen.lost.is_empty(),
        "{phase}: datagrams lost: {:?}",
        seen.lost
    );
    assert!(
        seen.moved.is_empty(),
        "{phase}: flows moved: {:?}",
        seen.moved
    );
    assert!(
        seen.tcp_failures.is_empty(),
        "{phase}: connections failed: {:?}",
        seen.tcp_failures
    );
}

/// A daemon of [`SERVICES`] run from `installed` with `env`, serving, with UDP flows whose
/// owners are known and 16 held TCP connections.
struct Serving {
    daemon: DaemonRun,
    notifications: Notifications,
    flows: Option<UdpFlows>,
    owners: Vec<Answer>,
    held: Vec<(TcpStream, Answer)>,
}

impl Serving {
    fn start(
        sandbox: &portshard_harness::scenario::Sandbox,
        installed: &Installed,
        env: &[(&str, &str)],
    ) -> Self {
        let notifications = Notifications::bind();
        let mut vars = vec![("NOTIFY_SOCKET", notifications.path())];
        vars.extend_from_slice(env);
        let mut daemon =
            DaemonRun::start_with_env(&installed.path(), &config(&SERVICES), sandbox.pins(), &vars)
                .unwrap();
        daemon.wait_ready(&[("dns", 4), ("web", 4)], READY).unwrap();
        notifications.wait_for("READY=1", READY);
        let mut flows = UdpFlows::new(target(), 128).unwrap();
        let owners = flows.settle(READY).unwrap();
        let held = (0..16)
            .map(|_| tcp_greeting(target(), ANSWER).unwrap())
            .collect();
        Self {
            daemon,
            notifications,
            flows: Some(flows),
            owners,
            held,
        }
    }

    /// Starts the daemon again (after `kill -9`) and waits until it serves.
    fn respawn(&mut self) {
        self.daemon.spawn().unwrap();
        self.daemon
            .wait_ready(&[("dns", 4), ("web", 4)], READY)
            .unwrap();
        self.notifications.wait_for("READY=1", READY);
    }

    fn load(&mut self) -> Load {
        let flows = self.flows.take().expect("one load at a time");
        let load = Load::start(flows, self.owners.clone());
        load.wait_rounds(5);
        load
    }

    /// Stops `load`, takes its flows back and checks the held connections still echo.
    fn settle(&mut self, phase: &str, load: Load) -> Seen {
        let (seen, flows) = load.stop();
        self.flows = Some(flows);
        for (i, (stream, answer)) in self.held.iter_mut().enumerate() {
            echo(stream, &format!("held {i}"), ANSWER)
                .unwrap_or_else(|e| panic!("{phase}: held connection {i} to {answer:?}: {e}"));
        }
        seen
    }
}

/// Runs `portshard upgrade` on `serving` and checks it: the notifications, the answer,
/// the same daemon and worker pids, every service's program now `binary`'s. Prints how long
/// it took. Returns the new program tags.
fn upgrade_to(
    serving: &Serving,
    installed: &Installed,
    binary: &Path,
    phase: &str,
) -> BTreeMap<String, String> {
    let pid = serving.daemon.pid().unwrap();
    let workers_before = workers(&serving.daemon.status().unwrap());
    let tags_before = tags(&serving.daemon);
    installed.install(binary);
    let asked = Instant::now();
    let upgrade = {
        let control = serving.daemon.control().to_path_buf();
        thread::spawn(move || {
            let out = cli_at(&control, &["upgrade"]);
            (out, asked.elapsed())
        })
    };
    let (reloading, message, _) = serving.notifications.wait_for("RELOADING=1", READY);
    assert!(message.contains("MONOTONIC_USEC="), "{message}");
    let (ready, _, _) = serving.notifications.wait_for("READY=1", READY);
    let (out, answered) = upgrade.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{phase} failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        serving.daemon.log_text()
    );
    println!(
        "{phase}: from the request, RELOADING=1 after {} ms, the answer after {} ms, READY=1 after {} ms; it said:\n{stdout}",
        reloading.duration_since(asked).as_millis(),
        answered.as_millis(),
        ready.duration_since(asked).as_millis()
    );
    assert_eq!(serving.daemon.pid(), Some(pid));
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(workers(&serving.daemon.status().unwrap()), workers_before);
    let after = tags(&serving.daemon);
    for (service, tag) in &after {
        assert_ne!(
            tag, &tags_before[service],
            "{phase}: {service}'s program not replaced"
        );
        assert!(
            stdout.contains(&format!("{service} program {tag}")),
            "{stdout}"
        );
    }
    after
}

#[test]
fn an_upgrade_to_a_build_with_another_program_keeps_the_pid_the_workers_and_every_flow() {
    let sandbox = sandbox();
    let installed = Installed::new(Path::new(EXE));
    let mut serving = Serving::start(&sandbox, &installed, &[]);
    let workers_before = workers(&serving.daemon.status().unwrap());
    let first = tags(&serving.daemon);

    // 1. `portshard upgrade` to the second build, and back: an upgraded image upgrades too.
    let load = serving.load();
    let second = upgrade_to(&serving, &installed, &second_build(), "upgrade");
    load.wait_rounds(10);
    let back = upgrade_to(&serving, &installed, Path::new(EXE), "upgrade back");
    load.wait_rounds(10);
    let seen = serving.settle("upgrade and back", load);
    assert_untouched("upgrade and back", &seen);
    assert_eq!(back, first);
    assert!(
        serving
            .daemon
            .log_text()
            .contains("put this build's program in place of the pinned one")
    );

    // 2. `kill -9` of the daemon, then a start of the second build.
    let load = serving.load();
    serving.daemon.kill9().unwrap();
    installed.install(&second_build());
    serving.respawn();
    load.wait_rounds(10);
    let seen = serving.settle("kill -9 and start", load);
    assert_untouched("kill -9 and start", &seen);
    assert_eq!(workers(&serving.daemon.status().unwrap()), workers_before);
    assert_eq!(
        tags(&serving.daemon),
        second,
        "the second build's program steers"
    );
}

#[test]
fn a_binary_that_cannot_take_over_leaves_the_running_one_serving() {
    let sandbox = sandbox();
    let installed = Installed::new(Path::new(EXE));
    // The second build fails on purpose once it has adopted everything (the variable does
    // nothing in the first).
    let mut serving = Serving::start(
        &sandbox,
        &installed,
        &[("PORTSHARD_UPGRADE_TEST_FAIL", "1")],
    );
    let pid = serving.daemon.pid().unwrap();
    let workers_before = workers(&serving.daemon.status().unwrap());
    let first = tags(&serving.daemon);
    let load = serving.load();

    // A new image that fails after the exec: the previous one comes back.
    installed.install(&second_build());
    let out = cli(&serving.daemon, &["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{stderr}\n{}",
        serving.daemon.log_text()
    );
    assert!(
        stderr.contains("could not take over") && stderr.contains("on purpose"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the previous binary serves again"),
        "{stderr}"
    );
    serving.notifications.wait_for("READY=1", READY);
    assert_eq!(tags(&serving.daemon), first, "the previous program is back");

    // A binary refused by its check: nothing is executed.
    installed.install_script(
        "#!/bin/sh\necho 'error: not a portshard this daemon can run' >&2\nexit 2\n",
    );
    let out = cli(&serving.daemon, &["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot take over")
            && stderr.contains("not a portshard this daemon can run"),
        "{stderr}"
    );

    // Pins in a layout this build does not know: refused before anything is touched.
    write_layout(sandbox.pins(), "dns", 99);
    installed.install(&second_build());
    let out = cli(&serving.daemon, &["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("pin layout 99") && stderr.contains(&format!("writes {PIN_LAYOUT}")),
        "{stderr}"
    );
    assert_eq!(layouts(&serving.daemon)["dns"], 99, "untouched");
    write_layout(sandbox.pins(), "dns", PIN_LAYOUT);

    load.wait_rounds(10);
    let seen = serving.settle("refused upgrades", load);
    assert_untouched("refused upgrades", &seen);
    assert_eq!(serving.daemon.pid(), Some(pid));
    assert_eq!(workers(&serving.daemon.status().unwrap()), workers_before);
    assert_eq!(tags(&serving.daemon), first);
    assert!(
        support::cli(&serving.daemon, &["reload", "dns"])
            .status
            .success(),
        "still controllable"
    );
}

#[test]
fn an_old_pin_layout_is_migrated_in_place_under_load() {
    let sandbox = sandbox();
    let installed = Installed::new(Path::new(EXE));
    let mut serving = Serving::start(&sandbox, &installed, &[]);
    let workers_before = workers(&serving.daemon.status().unwrap());
    let load = serving.load();
    serving.daemon.kill9().unwrap();
    // Pins as every build before the layout was recorded wrote them: no `layout` map.
    for (service, _, _) in SERVICES {
        std::fs::remove_file(sandbox.pins().join(service).join(names::LAYOUT)).unwrap();
    }
    assert!(layouts(&serving.daemon).values().all(|&layout| layout == 1));
    serving.respawn();
    load.wait_rounds(10);
    let seen = serving.settle("layout migration", load);
    assert_untouched("layout migration", &seen);
    assert!(
        layouts(&serving.daemon)
            .values()
            .all(|&layout| layout == PIN_LAYOUT)
    );
    assert_eq!(workers(&serving.daemon.status().unwrap()), workers_before);
    assert_eq!(
        serving
            .daemon
            .log_text()
            .matches("migrated the pins")
            .count(),
        SERVICES.len()
    );
}

/// Writes `layout` into `service`'s pinned layout map, as a build of another layout would.
fn write_layout(pins: &Path, service: &str, layout: u32) {
    let data = MapData::from_pin(pins.join(service).join(names::LAYOUT)).unwrap();
    let mut array: Array<MapData, u32> = Array::try_from(Map::Array(data)).unwrap();
    array.set(0, layout, 0).unwrap();
}
