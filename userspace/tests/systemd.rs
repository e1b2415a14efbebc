//! portshard under systemd, without systemd running: the notifications a unit of
//! `Type=notify` relies on, caught on a socket the test owns, with socket-activated Python
//! workers in a fresh network namespace; and the Debian package (`cargo xtask package`)
//! installed with `dpkg -i`, its unit checked by `systemd-analyze verify`.
mod support;

use std::{
    io::Write as _,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use portshard_harness::daemon::DaemonRun;
use support::{EXE, Notifications, READY, config, sandbox, signal};

/// Where `cargo xtask test` puts the package.
const DEB: &str = "PORTSHARD_DEB";

/// The watchdog interval the tests ask for; `WATCHDOG=1` is due every half of it.
const WATCHDOG: Duration = Duration::from_millis(800);

/// A probed UDP service of two Python workers: `READY=1` waits for their answers.
fn probed_config() -> String {
    config(&[("dns", "udp", 2)]) + "probe = \"udp:ping\"\nprobe_interval = \"200ms\"\n"
}

/// The gaps between the `WATCHDOG=1` messages that arrive within `window`; panics on any
/// other message.
fn watchdog_gaps(notifications: &Notifications, window: Duration) -> Vec<Duration> {
    let end = Instant::now() + window;
    let mut last = None;
    let mut gaps = Vec::new();
    while let Some((at, message)) =
        notifications.next(end.saturating_duration_since(Instant::now()))
    {
        if message.lines().any(|line| line.starts_with("STATUS="))
            && !message.contains("WATCHDOG=1")
        {
            continue;
        }
        assert_eq!(
            message.trim_end(),
            "WATCHDOG=1",
            "only the watchdog was expected"
        );
        if let Some(last) = last {
            gaps.push(at.duration_since(last));
        }
        last = Some(at);
        if Instant::now() >= end {
            break;
        }
    }
    gaps
}

#[test]
fn notifications_follow_readiness_reloads_the_watchdog_and_the_stop() {
    let sandbox = sandbox();
    let notifications = Notifications::bind();
    let watchdog_usec = WATCHDOG.as_micros().to_string();
    let mut daemon = DaemonRun::start_with_env(
        Path::new(EXE),
        &probed_config(),
        sandbox.pins(),
        &[
            ("NOTIFY_SOCKET", notifications.path()),
            ("WATCHDOG_USEC", &watchdog_usec),
        ],
    )
    .unwrap();

    // READY=1 only once every worker answers its probe.
    let (_, ready, before) = notifications.wait_for("READY=1", READY);
    assert!(!before.iter().any(|m| m.contains("READY=1")));
    let status = daemon.status().unwrap();
    // Every worker was probed before READY=1 (a probe may have failed since).
    let probes: Vec<&str> = status[0].slots.iter().map(|s| s.probe).collect();
    assert!(
        probes.len() == 2 && probes.iter().all(|&p| p != "none"),
        "READY=1 came before every worker answered: {probes:?}"
    );
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=1 service, 2/2 workers serving")),
        "{ready}"
    );

    // WATCHDOG=1 at about half of WATCHDOG_USEC, from the event loop.
    let gaps = watchdog_gaps(&notifications, WATCHDOG * 3);
    assert!(gaps.len() >= 3, "too few WATCHDOG=1: {gaps:?}");
    let mut sorted = gaps.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    println!("watchdog gaps {gaps:?}, median {median:?} for WATCHDOG_USEC {watchdog_usec}");
    assert!(
        median >= WATCHDOG / 4 && median <= WATCHDOG,
        "WATCHDOG=1 every {median:?}, not about {:?}",
        WATCHDOG / 2
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    daemon.hangup().unwrap();
    let (_, reloading, _) = notifications.wait_for("RELOADING=1", READY);
    let usec: u64 = reloading
        .lines()
        .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    notifications.wait_for("READY=1", READY);

    // An event loop blocked on purpose (SIGHUP reads the config from a FIFO no one writes
    // yet) sends no WATCHDOG=1; it resumes once the loop does.
    let config_path = daemon.control().parent().unwrap().join("portshard.toml");
    std::fs::remove_file(&config_path).unwrap();
    nix_mkfifo(&config_path);
    daemon.hangup().unwrap();
    notifications.wait_for("RELOADING=1", READY);
    let quiet = WATCHDOG * 3;
    let blocked = Instant::now();
    while let Some((_, message)) = notifications.next(quiet.saturating_sub(blocked.elapsed())) {
        assert!(
            !message.contains("WATCHDOG=1"),
            "WATCHDOG=1 while the loop is blocked, {:?} after SIGHUP",
            blocked.elapsed()
        );
        if blocked.elapsed() >= quiet {
            break;
        }
    }
    let writer = {
        let (path, text) = (config_path.clone(), probed_config());
        thread::spawn(move || {
            let mut fifo = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            fifo.write_all(text.as_bytes()).unwrap();
        })
    };
    writer.join().unwrap();
    notifications.wait_for("READY=1", READY);
    notifications.wait_for("WATCHDOG=1", READY);

    // SIGTERM: STOPPING=1.
    signal(daemon.pid().unwrap(), libc::SIGTERM);
    let (_, stopping, _) = notifications.wait_for("STOPPING=1", READY);
    println!("stopping: {stopping:?}");
    assert!(
        daemon.wait_exit().unwrap().success(),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn workers_never_see_systemds_variables() {
    let sandbox = sandbox();
    let notifications = Notifications::bind();
    let mut daemon = DaemonRun::start_with_env(
        Path::new(EXE),
        &probed_config(),
        sandbox.pins(),
        &[
            ("NOTIFY_SOCKET", notifications.path()),
            ("WATCHDOG_USEC", "60000000"),
        ],
    )
    .unwrap();
    daemon.wait_ready(&[("dns", 2)], READY).unwrap();
    for slot in daemon.status().unwrap()[0]
        .slots
        .iter()
        .filter(|s| s.pid != 0)
    {
        let environ = std::fs::read(format!("/proc/{}/environ", slot.pid)).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        for variable in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="] {
            assert!(
                !environ.split('\0').any(|v| v.starts_with(variable)),
                "worker {} sees {variable}",
                slot.pid
            );
        }
    }
}

#[test]
fn the_package_installs_and_its_unit_passes_systemd_analyze_verify() {
    let deb = std::env::var_os(DEB).unwrap_or_else(|| {
        panic!("{DEB} is not set: run the tests through `cargo xtask test`, which builds the package (`cargo xtask package`)")
    });
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run("dpkg", &["-i", deb.to_str().unwrap()]);
    let version = run("/usr/bin/portshard", &["--version"]);
    assert_eq!(
        version.trim(),
        format!("portshard {}", env!("CARGO_PKG_VERSION"))
    );
    let unit = "/usr/lib/systemd/system/portshard.service";
    let verify = Command::new("systemd-analyze")
        .args(["verify", unit])
        .output()
        .unwrap();
    let config = std::fs::read_to_string("/etc/portshard/portshard.toml").unwrap();
    let conffiles = run(
        "dpkg-query",
        &["--showformat=${Conffiles}", "--show", "portshard"],
    );
    run("dpkg", &["--purge", "portshard"]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify {unit}: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        conffiles.contains("/etc/portshard/portshard.toml"),
        "{conffiles}"
    );
    portshard::config::Config::parse(&config, Path::new("/etc/portshard/portshard.toml"))
        .unwrap_or_else(|e| panic!("the packaged example config: {e}"));
    assert!(!Path::new("/usr/bin/portshard").exists(), "purged");
}

#[test]
fn serve_without_a_config_says_first_that_it_runs_the_demo() {
    let sandbox = sandbox();
    let mut daemon = DaemonRun::start_builtin(Path::new(EXE), sandbox.pins()).unwrap();
    daemon.wait_control(READY).unwrap();
    let log = daemon.log_text();
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.contains("WARN") && first.contains("BUILT-IN DEMO") && first.contains("--config"),
        "first log line: {first:?}"
    );
}

/// Makes a FIFO at `path`.
fn nix_mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}
