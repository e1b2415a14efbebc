//! `cargo xtask demo`: eight UDP listeners on loopback in a private network namespace, a few
//! thousand flows, one listener closed. Prints what plain `SO_REUSEPORT` and portshard did to
//! the flows of the listeners that stayed up; the last line is
//! `survivor_moved portshard=<f> kernel=<f>`.
use anyhow::{Context as _, Result, ensure};
use portshard::socket::Proto;
use portshard_harness::{
    flows::{lost, moved},
    scenario::{CloseOne, KernelRun, PortshardRun, Ratio, Sandbox, survivor_moved},
};

const LISTENERS: usize = 8;
const VICTIM: usize = 3;
const FLOWS: usize = 4096;

fn main() -> Result<()> {
    let sandbox = Sandbox::enter().context("setting up the demo's private namespace and pins")?;
    let case = CloseOne {
        proto: Proto::Udp,
        ipv6: false,
        listeners: LISTENERS,
        victim: VICTIM,
        flows: FLOWS,
    };

    println!(
        "{LISTENERS} UDP listeners on {} in a private network namespace, {FLOWS} flows (one source port each).",
        case.target()
    );
    println!("Listener {VICTIM} closes; nobody reacts; the same flows are sent again.\n");
    let kernel = KernelRun::measure(&case).context("measuring plain SO_REUSEPORT")?;
    let ours = PortshardRun::measure(&case, sandbox.pins()).context("measuring portshard")?;
    ensure!(
        ours.counter_errors.is_empty(),
        "counters disagree: {:?}",
        ours.counter_errors
    );

    let kernel_survivors = survivor_moved(&kernel.before, &kernel.after_close, VICTIM);
    let our_survivors = survivor_moved(&ours.before, &ours.after_close, VICTIM);
    let orphans =
        |before: &Vec<Option<usize>>| before.iter().filter(|l| **l == Some(VICTIM)).count();
    let on_heir = (0..FLOWS)
        .filter(|&f| ours.before[f] == Some(VICTIM) && ours.after_close[f] == ours.heirs[f])
        .count();
    let kernel_join = Ratio {
        part: moved(&kernel.after_close, &kernel.after_add),
        whole: FLOWS,
    };
    let our_join = Ratio {
        part: moved(&ours.after_remove, &ours.after_add),
        whole: FLOWS,
    };

    let rows = [
        (
            "surviving flows moved",
            kernel_survivors.to_string(),
            our_survivors.to_string(),
        ),
        (
            "flows lost after the close",
            lost(&kernel.after_close).to_string(),
            lost(&ours.after_close).to_string(),
        ),
        (
            "closed listener's flows",
            format!("{} rehashed", orphans(&kernel.before)),
            format!("{on_heir}/{} to their heir", orphans(&ours.before)),
        ),
        (
            "flows moved when one joins",
            kernel_join.to_string(),
            format!("{our_join}, ideal {:.3}", 1.0 / LISTENERS as f64),
        ),
    ];
    println!("{:<28} {:<26} portshard", "", "plain SO_REUSEPORT");
    for (what, kernel, portshard) in rows {
        println!("{what:<28} {kernel:<26} {portshard}");
    }
    println!(
        "\nsurvivor_moved portshard={:.3} kernel={:.3}",
        our_survivors.value(),
        kernel_survivors.value()
    );
    Ok(())
}
