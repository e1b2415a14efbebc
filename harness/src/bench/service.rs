//! Figures of the running service: how fast a killed worker's flows reach its heir
//! (`failover_us`, the real daemon), what a closing TCP listener's queue loses
//! (`resets_on_close`), and the daemon's memory with many services (`daemon_rss_mib`).
use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use portshard::{
    config::{FILES_BASE, FILES_PER_SERVICE, FILES_PER_WORKER, MAX_SERVICES},
    process,
    table::Slot,
};

use super::{
    BenchError, Budget, ROUND_LIMIT, Result,
    report::{Figure, Summary, Target},
};
use crate::{
    context,
    daemon::{DaemonRun, workers},
    scenario::{MeasureError, QueuedOnClose},
};

/// Failover must take less than this (µs).
pub const FAILOVER_LIMIT_US: f64 = 1000.0;
/// The daemon's resident memory must stay below this (MiB).
pub const RSS_LIMIT_MIB: f64 = 30.0;
/// Services of the memory figure.
pub const RSS_SERVICES: usize = 8;
/// Workers per service of the memory figure.
pub const RSS_WORKERS: usize = 32;

const FAILOVER_WORKERS: usize = 8;
const FAILOVER_PORT: u16 = 5320;
const RSS_FIRST_PORT: u16 = 5330;
/// Sleep between two probes of a killed worker's flow (plus the timer's slack), leaving the
/// CPU to the dying worker, the heir and the daemon.
const PROBE_EVERY: Duration = Duration::from_micros(20);
/// Tries to find a flow of a given worker.
const FLOW_TRIES: usize = 512;

/// One `[[service]]` of `workers` workers running `command` (a TOML array's inside).
fn service(name: &str, proto: &str, port: u16, workers: usize, command: &str) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nproto = \"{proto}\"\nlisten = \"127.0.0.1:{port}\"\nworkers = {workers}\ncommand = [{command}]\nrestart_delay = \"100ms\"\nstop_timeout = \"2s\"\n\n"
    )
}

/// The command of `portshard echo` workers, for [`service`].
fn echo(exe: &Path) -> String {
    format!("\"{}\", \"echo\"", exe.display())
}

/// The live pid of each slot of `service`.
fn live(daemon: &DaemonRun, service: &str) -> Result<Vec<(Slot, u32)>> {
    Ok(workers(&daemon.status()?)
        .remove(service)
        .unwrap_or_default()
        .into_iter()
        .filter(|&(_, pid)| pid != 0)
        .collect())
}

/// `failover_us`: the time from a worker's `SIGKILL` to the first answer from its heir on
/// one of its flows, which is probed every [`PROBE_EVERY`]; median over `failovers` kills
/// of different workers (each replaced by the daemon, and the replacement answering, before
/// the next). `exit_us` is when the killed worker had ended (its pidfd readable). The
/// probing client runs at normal priority, sharing the CPUs with the daemon, which must
/// not delay it with its own work on the death.
pub fn failover(exe: &Path, pins: &Path, budget: &Budget) -> Result<Figure> {
    let name = "failover";
    let config = service(name, "udp", FAILOVER_PORT, FAILOVER_WORKERS, &echo(exe));
    let mut daemon = DaemonRun::start(exe, &config, pins)?;
    daemon.wait_ready(&[(name, FAILOVER_WORKERS)], ROUND_LIMIT)?;
    let target = SocketAddr::from(([127, 0, 0, 1], FAILOVER_PORT));
    let (mut failovers, mut exits) = (Vec::new(), Vec::new());
    for kill in 0..budget.failovers {
        let workers = live(&daemon, name)?;
        let (slot, pid) = workers[kill % workers.len()];
        let identity = format!("{slot} {pid} ");
        let flow = flow_of(target, &identity)?;
        let pidfd = process::pidfd_open(pid)
            .map_err(|e| context(e, format!("opening a pidfd on worker {pid} (slot {slot})")))?;
        let started = Instant::now();
        process::signal(pidfd.as_fd(), portshard::supervisor::Signal::Kill)
            .map_err(|e| context(e, format!("killing worker {pid} (slot {slot})")))?;
        let (answered, exited) = first_other_answer(&flow, &identity, pidfd.as_fd(), started)?;
        failovers.push(answered.as_secs_f64() * 1e6);
        exits.push(exited.as_secs_f64() * 1e6);
        // The next kill's heir may be this slot: wait until its new worker answers.
        let replacement = wait_replaced(&daemon, name, slot, pid)?;
        flow_of(target, &format!("{slot} {replacement} "))?;
    }
    let summary = |values: &[f64]| {
        Summary::of(values)
            .ok_or_else(|| BenchError::from(MeasureError::Traffic("no worker was killed".into())))
    };
    Ok(
        Figure::summarized("failover_us", "us", 0.0, summary(&failovers)?)
            .target(Target::Below(FAILOVER_LIMIT_US))
            .extra("exit_us", summary(&exits)?.median),
    )
}

/// A connected UDP socket whose flow `identity` (`"<slot> <pid> "`) answers.
fn flow_of(target: SocketAddr, identity: &str) -> Result<UdpSocket> {
    for attempt in 0..FLOW_TRIES {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| {
                socket.connect(target)?;
                socket.set_read_timeout(Some(Duration::from_millis(200)))?;
                socket.send(b"who")?;
                Ok(socket)
            })
            .map_err(|e| context(e, format!("probing flow {attempt} to {target}")))?;
        let mut buffer = [0u8; 64];
        if let Ok(n) = socket.recv(&mut buffer)
            && buffer[..n].starts_with(identity.as_bytes())
        {
            socket
                .set_nonblocking(true)
                .map_err(|e| context(e, format!("flow {attempt} to {target}")))?;
            return Ok(socket);
        }
    }
    Err(MeasureError::Traffic(format!(
        "none of {FLOW_TRIES} flows to {target} reached worker {identity:?}"
    ))
    .into())
}

/// Probes `flow` every [`PROBE_EVERY`] until something other than `identity` answers;
/// returns the time since `started` of that answer and of the worker's exit (its `pidfd`
/// becoming readable), so the figure shows how much of it is the kernel's teardown of the
/// killed process.
fn first_other_answer(
    flow: &UdpSocket,
    identity: &str,
    pidfd: BorrowedFd<'_>,
    started: Instant,
) -> Result<(Duration, Duration)> {
    let mut buffer = [0u8; 64];
    let mut exited = None;
    while started.elapsed() < ROUND_LIMIT {
        // A send may be refused while the dead worker's socket closes; probe again.
        let _ = flow.send(b"probe");
        thread::sleep(PROBE_EVERY);
        if exited.is_none()
            && readable(pidfd).map_err(|e| context(e, "polling a worker's pidfd".into()))?
        {
            exited = Some(started.elapsed());
        }
        loop {
            match flow.recv(&mut buffer) {
                Ok(n) if !buffer[..n].starts_with(identity.as_bytes()) => {
                    let answered = started.elapsed();
                    return Ok((answered, exited.unwrap_or(answered)));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                Err(e) => return Err(context(e, "receiving on the probed flow".into()).into()),
            }
        }
    }
    Err(MeasureError::Traffic(format!(
        "no heir answered the flow of {identity:?} within {ROUND_LIMIT:?}"
    ))
    .into())
}

/// Whether `fd` is readable now (a pidfd is once its process has ended).
fn readable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    match unsafe { libc::poll(&mut poll, 1, 0) } {
        -1 => Err(io::Error::last_os_error()),
        ready => Ok(ready > 0),
    }
}

/// Waits until `slot` has a live worker other than `pid`, and returns its pid.
fn wait_replaced(daemon: &DaemonRun, service: &str, slot: Slot, pid: u32) -> Result<u32> {
    let deadline = Instant::now() + ROUND_LIMIT;
    while Instant::now() < deadline {
        if let Some(&(_, replacement)) = live(daemon, service)?
            .iter()
            .find(|&&(s, p)| s == slot && p != pid)
        {
            return Ok(replacement);
        }
        thread::sleep(Duration::from_millis(5));
    }
    Err(MeasureError::Traffic(format!(
        "slot {slot} of {service} got no new worker after pid {pid} was killed"
    ))
    .into())
}

/// `resets_on_close`: TCP connections queued on a listener that closes (8 listeners, 128
/// connections) that are reset, with plain `SO_REUSEPORT` and with portshard.
pub fn resets_on_close(pins: &Path) -> Result<Figure> {
    let case = QueuedOnClose {
        ipv6: false,
        listeners: 8,
        victim: 3,
        connections: 128,
    };
    let kernel = case.kernel()?;
    let ours = case.portshard(pins)?;
    Ok(Figure::new(
        "resets_on_close",
        "connections",
        0.0,
        ours.outcome.reset as f64,
    )
    .kernel(kernel.reset as f64)
    .extra("queued_portshard", ours.outcome.queued_at_victim as f64)
    .extra("queued_kernel", kernel.queued_at_victim as f64))
}

/// `daemon_rss_mib`: the daemon's resident memory (`VmRSS`) once [`RSS_SERVICES`] services
/// of [`RSS_WORKERS`] `portshard echo` workers each are up, UDP and TCP alternately.
pub fn daemon_rss(exe: &Path, pins: &Path) -> Result<Figure> {
    let kib = rss_kib(exe, pins, RSS_SERVICES, RSS_WORKERS, &echo(exe))?;
    Ok(
        Figure::new("daemon_rss_mib", "MiB", 0.0, kib as f64 / 1024.0)
            .n(RSS_SERVICES * RSS_WORKERS)
            .target(Target::Below(RSS_LIMIT_MIB)),
    )
}

/// `daemon_rss_mib_max`: the same with the most services a config may name
/// ([`MAX_SERVICES`]), each with `budget.rss_max_workers` workers
/// ([`portshard::config::MAX_WORKERS`] in the full run) or as many as the open-file hard
/// limit lets the daemon hold ([`portshard::config::Config::open_files_needed`]), whichever is fewer; the
/// workers are `sleep infinity`, since what is measured is the daemon.
pub fn daemon_rss_max(exe: &Path, pins: &Path, budget: &Budget) -> Result<Figure> {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    let services = MAX_SERVICES as u64;
    let room = hard.saturating_sub(FILES_BASE + services * FILES_PER_SERVICE)
        / (services * FILES_PER_WORKER);
    let workers = budget.rss_max_workers.min(room as usize);
    if workers == 0 {
        return Err(MeasureError::Traffic(format!(
            "an open-file hard limit of {hard} leaves no room for a worker in each of {MAX_SERVICES} services"
        ))
        .into());
    }
    let kib = rss_kib(exe, pins, MAX_SERVICES, workers, "\"sleep\", \"infinity\"")?;
    Ok(
        Figure::new("daemon_rss_mib_max", "MiB", 0.0, kib as f64 / 1024.0)
            .n(MAX_SERVICES * workers)
            .extra("services", MAX_SERVICES as f64)
            .extra("workers_per_service", workers as f64)
            .extra("open_files_hard_limit", hard as f64)
            .extra(
                "kib_per_worker",
                kib as f64 / (MAX_SERVICES * workers) as f64,
            ),
    )
}

/// The daemon's `VmRSS` (KiB) once `services` services of `workers` workers running
/// `command` (a TOML array's inside) each (`per_service`) are up, UDP and TCP alternately.
fn rss_kib(
    exe: &Path,
    pins: &Path,
    services: usize,
    per_service: usize,
    command: &str,
) -> Result<u64> {
    let names: Vec<String> = (0..services).map(|i| format!("rss-{i}")).collect();
    let config: String = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let proto = if i % 2 == 0 { "udp" } else { "tcp" };
            service(name, proto, RSS_FIRST_PORT + i as u16, per_service, command)
        })
        .collect();
    let mut daemon = DaemonRun::start(exe, &config, pins)?;
    let ready: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), per_service)).collect();
    let timeout = ROUND_LIMIT * (3 + (services * per_service / 1024) as u32);
    let status = daemon.wait_ready(&ready, timeout)?;
    let worker = workers(&status)
        .values()
        .flat_map(|slots| slots.values().copied())
        .find(|&pid| pid != 0)
        .ok_or_else(|| MeasureError::Traffic("the daemon reports no worker".into()))?;
    let daemon_pid = proc_field(&proc_status(worker)?, "PPid")
        .ok_or_else(|| MeasureError::Traffic(format!("/proc/{worker}/status has no PPid")))?;
    let kib = proc_field(&proc_status(daemon_pid)?, "VmRSS")
        .ok_or_else(|| MeasureError::Traffic(format!("/proc/{daemon_pid}/status has no VmRSS")))?;
    drop(daemon);
    Ok(kib)
}

fn proc_status(pid: impl std::fmt::Display) -> Result<String> {
    let path = format!("/proc/{pid}/status");
    Ok(std::fs::read_to_string(&path).map_err(|e| context(e, format!("reading {path}")))?)
}

/// The number at the start of field `name` of a `/proc/<pid>/status` text (`VmRSS` is in
/// kB) or of a `/proc/<pid>/fdinfo/<fd>` text (`memlock`, in bytes).
pub fn proc_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::proc_field;

    #[test]
    fn reads_proc_status_fields() {
        let status = "Name:\tportshard\nPPid:\t4242\nVmRSS:\t   12345 kB\nVmRSSX:\t1 kB\n";
        assert_eq!(proc_field(status, "PPid"), Some(4242));
        assert_eq!(proc_field(status, "VmRSS"), Some(12_345));
        assert_eq!(proc_field(status, "VmSwap"), None);
        let fdinfo = "pos:\t0\nmap_type:\t1\nmemlock:\t118222848\nmap_id:\t42\n";
        assert_eq!(proc_field(fdinfo, "memlock"), Some(118_222_848));
    }
}
