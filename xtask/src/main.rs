//! `cargo xtask`: the developer commands. Each installs what it needs first, so a fresh
//! clone on a fresh machine needs nothing but cargo.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use portshard_toolchain as toolchain;

#[derive(Parser)]
#[command(about = "portshard developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF toolchain lacks (Debian packages, bpf-linker); idempotent.
    Setup,
    /// Compile the eBPF program (installing the toolchain first if needed).
    BuildEbpf,
    /// Build everything and run the unit, property and kernel tests (needs root).
    Test {
        /// Extra arguments for the test binaries, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Show flows surviving a listener's close: plain SO_REUSEPORT vs portshard (needs root).
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf().map(drop),
        Task::Test { args } => test(&args),
        Task::Demo => demo(),
    }
}

/// The workspace root: xtask lives one level below it.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

fn setup() -> Result<()> {
    let missing = toolchain::missing();
    if missing.is_empty() {
        println!("setup: eBPF toolchain complete, nothing to install");
        return Ok(());
    }
    for item in &missing {
        println!("setup: missing {item}");
    }
    for mut command in toolchain::install_plan(&missing) {
        println!("setup: running {command:?}");
        let status = command
            .status()
            .with_context(|| format!("could not start {command:?}"))?;
        if !status.success() {
            bail!("setup: {command:?} failed ({status}); nothing after it was attempted");
        }
    }
    let still_missing = toolchain::missing();
    if !still_missing.is_empty() {
        let list: Vec<String> = still_missing.iter().map(ToString::to_string).collect();
        bail!(
            "setup: installed everything, but still missing: {}",
            list.join(", ")
        );
    }
    println!("setup: eBPF toolchain complete");
    Ok(())
}

fn build_ebpf() -> Result<PathBuf> {
    setup()?;
    let root = root();
    let object = toolchain::build_object(&root.join("ebpf"), &root.join("target/ebpf"))
        .map_err(anyhow::Error::msg)?;
    let size = std::fs::metadata(&object)
        .with_context(|| format!("reading {}", object.display()))?
        .len();
    println!("build-ebpf: {} ({size} bytes)", object.display());
    Ok(object)
}

fn test(args: &[String]) -> Result<()> {
    build_ebpf()?;
    cargo(
        &[
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "portshard-ebpf",
            "--",
        ],
        args,
    )
}

fn demo() -> Result<()> {
    build_ebpf()?;
    cargo(
        &[
            "run",
            "--release",
            "--quiet",
            "--package",
            "portshard-harness",
            "--bin",
            "portshard-demo",
            "--",
        ],
        &[],
    )
}

/// Runs cargo in the workspace root with `args` then `extra`, failing on a non-zero exit.
fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .args(args)
        .args(extra)
        .status()
        .context("could not start cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
