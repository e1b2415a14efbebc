//! The `portshard` command. Read-only commands read the pinned maps directly, so they work
//! whatever runs (or does not run) the service.
use std::{io::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use portshard::{dataplane::Dataplane, report::TableReport, table::Slot};
use portshard_common::MAX_SLOTS;

#[derive(Parser)]
#[command(version, about = "eBPF-steered SO_REUSEPORT load balancer")]
struct Cli {
    /// Root directory of the pins on a BPF filesystem.
    #[arg(
        long,
        global = true,
        env = "PORTSHARD_BPFFS",
        default_value = "/sys/fs/bpf/portshard"
    )]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a service's table: entries, share and heirs per slot, balance, counters.
    Table {
        /// The service (its pin directory under --bpffs).
        service: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Table { service, json } => table(&cli.bpffs, &service, json),
    }
}

fn table(root: &std::path::Path, service: &str, json: bool) -> Result<()> {
    let dataplane = Dataplane::open(root, service)?;
    let metas = (0..MAX_SLOTS as Slot)
        .map(|slot| dataplane.meta(slot))
        .collect::<Result<Vec<_>, _>>()?;
    let report = TableReport::new(
        service,
        &dataplane.read_entries(),
        &metas,
        &dataplane.counters()?,
    );
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report).context("writing JSON to stdout")?;
        writeln!(out).context("writing to stdout")?;
        return Ok(());
    }
    let owners = report.slots.iter().filter(|s| s.entries > 0).count();
    writeln!(
        out,
        "service {}: {owners} slots own entries, balance {:.4}, {} runs fell through to the kernel",
        report.service, report.balance, report.fell_through
    )
    .context("writing to stdout")?;
    writeln!(
        out,
        "{:>4}  {:<8} {:>8} {:>6} {:>8} {:>7}  {:>10} {:>11} {:>7} {:>8}  heirs",
        "slot",
        "state",
        "pid",
        "weight",
        "entries",
        "share",
        "selected",
        "failed_over",
        "probed",
        "migrated"
    )
    .context("writing to stdout")?;
    for slot in &report.slots {
        let heirs = match (slot.heirs.values().min(), slot.heirs.values().max()) {
            (Some(min), Some(max)) => {
                format!("{} slots, {min}-{max} entries each", slot.heirs.len())
            }
            _ => "none".to_owned(),
        };
        let c = slot.counters;
        writeln!(
            out,
            "{:>4}  {:<8} {:>8} {:>6} {:>8} {:>6.2}%  {:>10} {:>11} {:>7} {:>8}  {heirs}",
            slot.slot,
            slot.state,
            slot.pid,
            slot.weight,
            slot.entries,
            slot.share * 100.0,
            c.selected,
            c.failed_over,
            c.probed,
            c.migrated
        )
        .context("writing to stdout")?;
    }
    Ok(())
}
