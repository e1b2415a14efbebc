//! `cargo xtask demo`: the real `portshard serve` on its built-in default (UDP and TCP echo on
//! 127.0.0.1:5300, four `portshard echo` workers each) in a private network namespace. One
//! UDP and one TCP worker are killed with SIGKILL under traffic, next to plain
//! `SO_REUSEPORT` with four listeners of which one closes (what the kernel does when a
//! process dies), on the same flows. The last line is
//! `survivor_moved portshard=<f> kernel=<f>`.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use portshard::{config::BUILTIN_PORT, socket::Proto, table::Slot};
use portshard_harness::{
    daemon::{Answer, DaemonRun, UdpFlows, kill_with_queue, portshard_exe, signal, workers},
    flows::lost,
    scenario::{CloseOne, KernelRun, QueuedOnClose, Ratio, Sandbox, survivor_moved},
};

const WORKERS: usize = 4;
const VICTIM: Slot = 1;
const FLOWS: usize = 4096;
const CONNECTIONS: usize = 256;
const READY: Duration = Duration::from_secs(20);

fn main() -> Result<()> {
    let exe = portshard_exe()?;
    let sandbox = Sandbox::enter().context("setting up the demo's private namespace and pins")?;
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], BUILTIN_PORT));
    println!(
        "{WORKERS} UDP and {WORKERS} TCP workers on {target} in a private network namespace; {FLOWS} UDP flows (one source port each), {CONNECTIONS} TCP connections."
    );
    println!("Worker {VICTIM} of each is killed with SIGKILL; the same flows are sent again.\n");

    // Plain SO_REUSEPORT first: its listeners reset their queued connections, so they
    // leave nothing behind on the port.
    let case = CloseOne {
        proto: Proto::Udp,
        ipv6: false,
        listeners: WORKERS,
        victim: usize::from(VICTIM),
        flows: FLOWS,
    };
    let kernel = KernelRun::measure(&case).context("measuring plain SO_REUSEPORT (UDP)")?;
    let kernel_queue = QueuedOnClose {
        ipv6: false,
        listeners: WORKERS,
        victim: usize::from(VICTIM),
        connections: CONNECTIONS,
    }
    .kernel()
    .context("measuring plain SO_REUSEPORT (TCP)")?;

    let mut daemon = DaemonRun::start_builtin(&exe, sandbox.pins())?;
    let ready = daemon.wait_ready(&[("echo-udp", WORKERS), ("echo-tcp", WORKERS)], READY)?;
    let pids = workers(&ready);
    let mut flows = UdpFlows::new(target, FLOWS)?;
    let before = flows.settle(READY)?;
    let orphans: Vec<usize> = (0..FLOWS).filter(|&f| before[f].slot == VICTIM).collect();
    let Some(&orphan) = orphans.first() else {
        bail!("no flow landed on worker {VICTIM}");
    };
    let killed = Instant::now();
    signal(pids["echo-udp"][&VICTIM], libc::SIGKILL)?;
    let failover = flows
        .first_answer(
            orphan,
            |a| a.slot != VICTIM,
            Duration::from_millis(1),
            Duration::from_secs(2),
        )?
        .map(|(at, _)| at - killed);
    let after = flows.round(Duration::from_secs(2))?;
    let survivors = (0..FLOWS).filter(|&f| before[f].slot != VICTIM);
    let our_survivors = Ratio {
        part: survivors
            .clone()
            .filter(|&f| after[f].is_some_and(|a: Answer| a != before[f]))
            .count(),
        whole: survivors.clone().count(),
    };
    let our_lost = after.iter().filter(|a| a.is_none()).count();
    let on_heirs = orphans
        .iter()
        .filter(|&&f| after[f].is_some_and(|a| a.slot != VICTIM))
        .count();
    let our_queue = kill_with_queue(pids["echo-tcp"][&VICTIM], target, CONNECTIONS)?;
    let status = daemon.terminate()?;
    if !status.success() {
        bail!("the daemon exited with {status} on SIGTERM");
    }

    let kernel_survivors = survivor_moved(&kernel.before, &kernel.after_close, case.victim);
    let kernel_orphans = kernel
        .before
        .iter()
        .filter(|l| **l == Some(case.victim))
        .count();
    let failover = failover.map_or_else(
        || "never answered within 2 s".to_owned(),
        |d| format!("first after {:.1} ms", d.as_secs_f64() * 1e3),
    );
    let rows = [
        (
            "surviving UDP flows moved",
            kernel_survivors.to_string(),
            our_survivors.to_string(),
        ),
        (
            "UDP flows lost",
            lost(&kernel.after_close).to_string(),
            our_lost.to_string(),
        ),
        (
            "killed worker's UDP flows",
            format!("{kernel_orphans} rehashed"),
            format!("{on_heirs}/{} to their heirs, {failover}", orphans.len()),
        ),
        (
            "queued TCP connections reset",
            format!("{}/{}", kernel_queue.reset, kernel_queue.queued_at_victim),
            format!(
                "{}/{} ({} answered by other workers)",
                our_queue.reset,
                our_queue.queued,
                our_queue.queued - our_queue.reset
            ),
        ),
    ];
    println!("{:<30} {:<26} portshard", "", "plain SO_REUSEPORT");
    for (what, kernel, portshard) in rows {
        println!("{what:<30} {kernel:<26} {portshard}");
    }
    println!(
        "\nsurvivor_moved portshard={:.3} kernel={:.3}",
        our_survivors.value(),
        kernel_survivors.value()
    );
    Ok(())
}
