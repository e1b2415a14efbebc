//! `cargo xtask`: the developer commands. Each installs what it needs first, so a fresh
//! clone on a fresh machine needs nothing but cargo.
mod bench;
mod compare;
mod docs;
mod fuzz;
mod package;
mod plot;
mod report;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
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
        /// Run the tests with a busy loop pinned to every CPU at normal priority, as on a
        /// loaded production host.
        #[arg(long)]
        under_load: bool,
        /// Extra arguments for the test binaries, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the daemon on its built-in default, kill a UDP and a TCP worker, and compare
    /// with plain SO_REUSEPORT on the same flows (needs root).
    Demo,
    /// Build and run the daemon in the foreground (`portshard serve`; needs root). Without
    /// arguments it serves the built-in default: UDP and TCP echo on 127.0.0.1:5300.
    Run {
        /// Arguments for `portshard serve`, e.g. `--config portshard.toml`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure every figure, portshard next to plain SO_REUSEPORT, print the table and write
    /// target/bench/report.json, with its table (report.md) and picture (moves.svg) beside it
    /// (needs root; at most 5 minutes, `--quick` under 1).
    Bench {
        /// Fewer flows, rounds and repetitions.
        #[arg(long)]
        quick: bool,
        /// Then print each figure against this earlier report (as `cargo xtask compare`).
        #[arg(long, value_name = "OLD.json")]
        compare: Option<PathBuf>,
    },
    /// Print each figure of two bench reports: old and new value, the change, and the
    /// figures whose target status flipped or that only one report has.
    Compare {
        /// The earlier report.
        old: PathBuf,
        /// The later report.
        new: PathBuf,
    },
    /// Chaos under load: the daemon with 2 UDP and 2 TCP services of 8 workers while workers
    /// and the daemon are killed, stopped, drained and reweighted; ends with
    /// `soak faults=<n> violations=<n>` and fails on any violation (needs root).
    Soak {
        /// How long the chaos runs.
        #[arg(long, default_value_t = 1.0)]
        minutes: f64,
    },
    /// Copy target/bench/report.json to docs/bench/report.json and generate the docs' measured
    /// figures from it: docs/measurements.md's table and the README's picture, docs/moves.svg.
    Docs {
        /// Change nothing: fail if the docs differ from what docs/bench/report.json gives.
        #[arg(long)]
        check: bool,
    },
    /// Run every fuzz target (config parser, control decoder, table operations) in turn,
    /// installing cargo-fuzz first if needed; fails on the first crash or hang.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Build the Debian package (target/debian/*.deb, with cargo-deb, installed first if
    /// needed): the binary, the systemd unit and the example config.
    Package,
    /// One busy loop of `--under-load`, run as a child of xtask.
    #[command(hide = true)]
    Spin {
        /// The CPU it is pinned to.
        cpu: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf().map(drop),
        Task::Test { under_load, args } => test(under_load, &args),
        Task::Spin { cpu } => spin(cpu),
        Task::Demo => demo(),
        Task::Run { args } => run(&args),
        Task::Bench { quick, compare } => bench::bench(quick, compare.as_deref()),
        Task::Compare { old, new } => {
            let (old, new) = (report::load(&old)?, report::load(&new)?);
            print!("{}", compare::render(&compare::compare(&old, &new)));
            Ok(())
        }
        Task::Fuzz { seconds } => fuzz::fuzz(seconds),
        Task::Docs { check: false } => docs::generate(&root()),
        Task::Docs { check: true } => docs::check(&root()),
        Task::Package => package::package().map(drop),
        Task::Soak { minutes } => harness_binary(
            "portshard-soak",
            &["--minutes", &minutes.to_string()],
            "the soak",
        ),
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
    let object = ebpf_object(toolchain::OBJECT_NAME)?;
    let size = std::fs::metadata(&object)
        .with_context(|| format!("reading {}", object.display()))?
        .len();
    println!("build-ebpf: {} ({size} bytes)", object.display());
    Ok(object)
}

/// Compiles the eBPF crate (every object it has) and returns the path of object `name`.
fn ebpf_object(name: &str) -> Result<PathBuf> {
    let root = root();
    Ok(toolchain::build_object(
        &root.join("ebpf"),
        &root.join("target/ebpf"),
        name,
        &[],
    )?)
}

fn test(under_load: bool, args: &[String]) -> Result<()> {
    build_ebpf()?;
    // What the upgrade and packaging tests need, built before the tests: the release
    // binary the tests build comes last, so the second build never overwrites it.
    package::install_test_tools()?;
    let upgrade_test = package::upgrade_test_binary()?;
    let deb = package::package()?;
    const TEST: [&str; 9] = [
        "test",
        "--release",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "portshard-ebpf",
        "--lib",
        "--bins",
        "--tests",
    ];
    // Built first, so a load only weighs on the tests themselves.
    let built = cargo_command(&TEST)
        .env(package::UPGRADE_TEST_BINARY_ENV, &upgrade_test)
        .env(package::DEB_ENV, &deb)
        .arg("--no-run")
        .status()
        .context("could not start cargo test --no-run")?;
    if !built.success() {
        bail!("building the tests failed ({built})");
    }
    let load = if under_load {
        Some(BusyLoops::start()?)
    } else {
        None
    };
    let mut child = cargo_command(&TEST)
        .env(package::UPGRADE_TEST_BINARY_ENV, &upgrade_test)
        .env(package::DEB_ENV, &deb)
        .arg("--")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start cargo test")?;
    // Pass the output through while adding up every test binary's result line.
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count_before(result, " passed");
            failed += count_before(result, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if let Some(load) = load {
        load.stop()?;
    }
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// A busy loop pinned to every CPU this process may use, at normal priority, for as long
/// as it is kept: the load of `cargo xtask test --under-load`.
struct BusyLoops(Vec<(usize, std::process::Child)>);

impl BusyLoops {
    fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("finding the xtask binary")?;
        let cpus = allowed_cpus()?;
        let loops = cpus
            .iter()
            .map(|&cpu| {
                Command::new(&exe)
                    .args(["spin", &cpu.to_string()])
                    .spawn()
                    .map(|child| (cpu, child))
                    .with_context(|| format!("starting the busy loop on CPU {cpu}"))
            })
            .collect::<Result<Vec<_>>>()?;
        println!("test: a busy loop on each of CPUs {cpus:?} for the whole run");
        Ok(Self(loops))
    }

    /// Ends the loops; an error if one had ended by itself, so the run was not under load.
    fn stop(mut self) -> Result<()> {
        let mut ended = Vec::new();
        for (cpu, child) in &mut self.0 {
            if let Ok(Some(status)) = child.try_wait() {
                ended.push(format!("CPU {cpu}: {status}"));
            }
        }
        drop(self);
        if ended.is_empty() {
            Ok(())
        } else {
            bail!(
                "busy loops ended during the run, which was not fully loaded: {}",
                ended.join(", ")
            )
        }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: sched_getaffinity fills a cpu set of the size given.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!(
                "reading this process's CPU affinity: {}",
                std::io::Error::last_os_error()
            );
        }
        set
    };
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: a lookup in a cpu set we own, within its size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    if cpus.is_empty() {
        bail!("this process may run on no CPU");
    }
    Ok(cpus)
}

/// Spins on `cpu` until the parent xtask ends.
fn spin(cpu: usize) -> Result<()> {
    // SAFETY: prctl and sched_setaffinity on this process, with a cpu set built here.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            bail!("spin: prctl: {}", std::io::Error::last_os_error());
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "spin: pinning to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let mut spins = 0u64;
    loop {
        spins = std::hint::black_box(spins.wrapping_add(1));
    }
}

/// The number just before `label` in a `test result:` line (`ok. 18 passed; 0 failed; ...`).
fn count_before(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim_end().strip_suffix(label))
        .and_then(|part| part.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn demo() -> Result<()> {
    harness_binary("portshard-demo", &[], "the demo")
}

/// Builds the daemon and runs harness binary `name` with `args`: the demo and the soak run
/// the real daemon, the `portshard` binary next to their own.
fn harness_binary(name: &str, args: &[&str], what: &str) -> Result<()> {
    build_ebpf()?;
    build_portshard()?;
    let status = harness_command(name)
        .args(args)
        .status()
        .context("could not start cargo run")?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `cargo run` of harness binary `name` in release, its arguments to follow.
fn harness_command(name: &str) -> Command {
    cargo_command(&[
        "run",
        "--release",
        "--quiet",
        "--package",
        "portshard-harness",
        "--bin",
        name,
        "--",
    ])
}

fn run(args: &[String]) -> Result<()> {
    setup()?;
    let status = portshard_cargo("run")
        .args(["--", "serve"])
        .args(args)
        .status()
        .context("could not start cargo run")?;
    if !status.success() {
        bail!("portshard serve exited with {status}");
    }
    Ok(())
}

/// Builds the `portshard` binary (release), for what runs the real daemon.
fn build_portshard() -> Result<()> {
    let built = portshard_cargo("build")
        .status()
        .context("could not start cargo build")?;
    if !built.success() {
        bail!("building portshard failed ({built})");
    }
    Ok(())
}

/// `cargo VERB` of the release `portshard` binary (`build`, or `run` with its arguments
/// added after `--`).
fn portshard_cargo(verb: &str) -> Command {
    cargo_command(&[
        verb,
        "--release",
        "--quiet",
        "--package",
        "portshard",
        "--bin",
        "portshard",
    ])
}

/// Cargo, in the workspace root, with `args`.
fn cargo_command(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root()).args(args);
    command
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_counts_from_result_lines() {
        let ok =
            "ok. 18 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 22.29s";
        assert_eq!(
            (count_before(ok, " passed"), count_before(ok, " failed")),
            (18, 0)
        );
        let failed =
            "FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.09s";
        assert_eq!(
            (
                count_before(failed, " passed"),
                count_before(failed, " failed")
            ),
            (5, 1)
        );
    }
}
