//! `cargo xtask bench`: measures every figure of portshard next to plain `SO_REUSEPORT` in a
//! private network namespace on loopback, prints them as a table with their ideal, target
//! and whether it is met, and writes them to a JSON report (a list of
//! `{"name","portshard","kernel","ideal","unit",...}` objects).
use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use portshard_harness::{
    bench::{self, Budget, moves, overhead, prog, report, report::Figure, scale, service, table},
    scenario::{PinRoot, Sandbox},
};

#[derive(Parser)]
#[command(about = "portshard benchmarks (needs root)")]
struct Args {
    /// Fewer flows, rounds and repetitions: under a minute instead of five.
    #[arg(long)]
    quick: bool,
    /// The reference programs' object (`portshard-reference`, built by the project toolchain).
    #[arg(long)]
    reference: PathBuf,
    /// The `portshard` binary: the daemon and its `echo` workers.
    #[arg(long)]
    portshard: PathBuf,
    /// Where to write the JSON report.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let budget = if args.quick {
        Budget::QUICK
    } else {
        Budget::FULL
    };
    let sandbox = Sandbox::enter().context("setting up the bench's private namespace and pins")?;
    let pins = sandbox.pins();
    let one = |figure: bench::Result<Figure>| figure.map(|f| vec![f]);
    let daemon_pins = || PinRoot::new().map_err(bench::BenchError::from);
    type Section<'a> = (
        &'static str,
        Box<dyn Fn() -> bench::Result<Vec<Figure>> + 'a>,
    );
    let sections: Vec<Section> = vec![
        ("balance_table", Box::new(table::balance)),
        ("rebuild", Box::new(|| table::rebuild(pins, &budget))),
        ("group", Box::new(|| table::group(pins, &budget))),
        (
            "survivor_moved",
            Box::new(|| moves::survivors(pins, &budget)),
        ),
        ("add_moved", Box::new(|| moves::additions(pins))),
        (
            "balance_flows",
            Box::new(|| moves::observed_balance(pins, &budget)),
        ),
        ("udp_overhead", Box::new(|| overhead::udp(pins, &budget))),
        (
            "tcp_overhead",
            Box::new(|| one(overhead::tcp(pins, &budget))),
        ),
        (
            "prog_ns",
            Box::new(|| prog::figures(pins, &args.reference, &budget)),
        ),
        (
            "resets_on_close",
            Box::new(|| one(service::resets_on_close(pins))),
        ),
        (
            "failover_us",
            Box::new(|| {
                one(service::failover(
                    &args.portshard,
                    daemon_pins()?.path(),
                    &budget,
                ))
            }),
        ),
        (
            "scale",
            Box::new(|| scale::million_flows(&args.portshard, daemon_pins()?.path(), &budget)),
        ),
        (
            "daemon_rss_mib",
            Box::new(|| one(service::daemon_rss(&args.portshard, daemon_pins()?.path()))),
        ),
        (
            "daemon_rss_mib_max",
            Box::new(|| {
                one(service::daemon_rss_max(
                    &args.portshard,
                    daemon_pins()?.path(),
                    &budget,
                ))
            }),
        ),
    ];

    let started = Instant::now();
    let mut figures = Vec::new();
    let mut failed = Vec::new();
    for (name, run) in &sections {
        let section = Instant::now();
        match run() {
            Ok(measured) => figures.extend(measured),
            Err(e) => {
                eprintln!("bench: {name} failed: {e}");
                failed.push(*name);
            }
        }
        eprintln!(
            "bench: {name} done in {:.1} s",
            section.elapsed().as_secs_f64()
        );
    }

    println!(
        "\nportshard bench ({}), {:.0} s\n",
        if args.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );
    print!("{}", report::render(&figures));
    write(&args.out, &figures)?;
    println!("report: {}", args.out.display());
    let missed = report::missed(&figures);
    if !missed.is_empty() {
        println!("short of target: {}", missed.join(", "));
    }
    if !failed.is_empty() {
        bail!("could not measure: {}", failed.join(", "));
    }
    Ok(())
}

fn write(path: &Path, figures: &[Figure]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(figures).context("encoding the report")?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}
