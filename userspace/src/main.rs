//! The `portshard` command: the daemon (`serve`), the built-in worker (`echo`) and the CLI.
//! Read-only commands read the pinned maps directly, so they work whatever runs (or does
//! not run) the service; commands that change state go through the daemon's control socket.
//! Errors are printed once, on one line, without a backtrace, and the exit code tells
//! scripts what happened (see [`Failure`]).
mod print;

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use portshard::{
    config::Config,
    control::{self, ErrorKind, Reply, Request},
    daemon::{self, Options},
    echo,
    handover::{self, Handover},
    table::Slot,
};

/// Exit codes: 0 done; 1 failed (I/O, kernel, pins); 2 invalid input or refused by the
/// daemon (nothing changed); 3 the daemon is not running; 4 a reload was rolled back (the
/// old generation serves on).
const EXIT_CODES: &str = "Exit codes: 0 done; 1 failed (I/O, kernel, pins); 2 invalid input, or refused by the daemon (nothing changed); 3 the daemon is not running; 4 a reload was rolled back (the old generation serves on).";

/// An outcome with its own exit code, so scripts tell them apart.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// Invalid input, or the daemon refused: nothing changed.
    #[error("{0}")]
    Refused(String),
    /// No daemon answers on the control socket.
    #[error("{0}")]
    NotRunning(String),
    /// A reload was tried and rolled back.
    #[error("{0}")]
    RolledBack(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Refused(_) => 2,
            Self::NotRunning(_) => 3,
            Self::RolledBack(_) => 4,
        }
    }
}

#[derive(Parser)]
#[command(version, about = "eBPF-steered SO_REUSEPORT load balancer", after_help = EXIT_CODES)]
struct Cli {
    /// Root directory of the pins on a BPF filesystem (for every command; a command's own
    /// --bpffs wins).
    #[arg(
        long,
        env = "PORTSHARD_BPFFS",
        default_value = "/sys/fs/bpf/portshard",
        value_name = "DIR"
    )]
    bpffs: PathBuf,
    /// The daemon's control socket (for every command; a command's own --control wins).
    #[arg(
        long,
        env = "PORTSHARD_CONTROL",
        default_value = "/run/portshard/control.sock",
        value_name = "PATH"
    )]
    control: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// Where the pins are, for the commands that read or make them.
#[derive(Args)]
struct Pins {
    /// Root directory of the pins on a BPF filesystem [default: $PORTSHARD_BPFFS, else
    /// /sys/fs/bpf/portshard].
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
}

/// Where the daemon listens, for the commands that ask it.
#[derive(Args)]
struct Control {
    /// The daemon's control socket [default: $PORTSHARD_CONTROL, else
    /// /run/portshard/control.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: start the configured services and their workers, keep them healthy.
    Serve {
        /// The config file (TOML). Without it, a UDP and a TCP echo service on
        /// 127.0.0.1:5300 with four `portshard echo` workers each.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Log lines for humans, or one JSON object per line.
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
        #[command(flatten)]
        pins: Pins,
        #[command(flatten)]
        control: Control,
    },
    /// Show every service: its slots, their workers, states, entries and counters, its
    /// generations and its flow table.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pins: Pins,
    },
    /// Show a service's table: entries, share and heirs per slot, balance, counters.
    Table {
        /// The service (its pin directory under --bpffs).
        service: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pins: Pins,
    },
    /// Move a slot's table entries to their heirs; its worker keeps its connections.
    Drain {
        /// The service.
        service: String,
        /// The slot to drain.
        slot: Slot,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: Control,
    },
    /// Set a slot's weight (a drained slot rejoins the table with it).
    Weight {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
        /// The new weight, 1 to 10000.
        weight: u32,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: Control,
    },
    /// Start a new generation of a service's workers (its config as the file now says) and
    /// switch new work to it once it is ready; exits 4 if it was rolled back.
    Reload {
        /// The service.
        service: String,
        /// Print the outcome (with its progress and the entries moved) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: Control,
    },
    /// Replace the running daemon with the binary now on disk, keeping its pid, workers and
    /// flows: the new binary is checked, then executed in place, and adopts everything;
    /// if it cannot, the old one is executed again (exit 4, with the reason).
    Upgrade {
        /// Print the outcome (with its progress) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: Control,
    },
    /// List a service's UDP flow table: flows per slot and generation.
    Flows {
        /// The service (its pin directory under --bpffs).
        service: String,
        /// Print JSON (every flow) instead of a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pins: Pins,
    },
    /// The built-in socket-activated echo worker (run by `serve`, not by hand).
    Echo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `portshard status | head`: the reader has what it wanted.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", render(&error));
            ExitCode::from(error.downcast_ref::<Failure>().map_or(1, Failure::code))
        }
    }
}

/// The error and each cause not already in the text, on one line: a cause whose
/// message its wrapper repeats is printed once.
fn render(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<()> {
    let root = |pins: Pins| pins.bpffs.unwrap_or_else(|| cli.bpffs.clone());
    let socket = |control: Control| control.control.unwrap_or_else(|| cli.control.clone());
    match cli.command {
        Command::Serve {
            config,
            metrics,
            log_format,
            pins,
            control,
        } => serve(config, root(pins), socket(control), metrics, log_format),
        Command::Status { json, pins } => print::status(&root(pins), json),
        Command::Table {
            service,
            json,
            pins,
        } => print::table(&root(pins), &service, json),
        Command::Drain {
            service,
            slot,
            json,
            control,
        } => request(&socket(control), &Request::Drain { service, slot }, json),
        Command::Weight {
            service,
            slot,
            weight,
            json,
            control,
        } => request(
            &socket(control),
            &Request::Weight {
                service,
                slot,
                weight,
            },
            json,
        ),
        Command::Reload {
            service,
            json,
            control,
        } => request(&socket(control), &Request::Reload { service }, json),
        Command::Upgrade { json, control } => request(&socket(control), &Request::Upgrade, json),
        Command::Flows {
            service,
            json,
            pins,
        } => print::flows(&root(pins), &service, json),
        Command::Echo => Ok(echo::serve()?),
    }
}

/// Every table change works on a copy of the 256 KiB table. glibc's adaptive threshold soon
/// serves such blocks from the heap and keeps their pages once they are freed (about 20 MiB
/// with 8 services of 32 workers); a fixed threshold maps each large block on its own and
/// gives it back to the kernel when it is freed.
fn return_large_frees_to_the_os() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; it runs before the daemon starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn serve(
    config: Option<PathBuf>,
    bpffs: PathBuf,
    control: PathBuf,
    metrics: Option<SocketAddr>,
    log_format: LogFormat,
) -> Result<()> {
    let checking = std::env::var_os(handover::CHECK_ENV).is_some();
    let handover = std::env::var(handover::ENV)
        .ok()
        .map(|value| Handover::parse(&value))
        .transpose()
        .map_err(|e| Failure::Refused(e.to_string()))?;
    // SAFETY: no other thread runs yet; workers must not see these.
    unsafe {
        std::env::remove_var(handover::CHECK_ENV);
        std::env::remove_var(handover::ENV);
    }
    let options = Options {
        config,
        bpffs,
        control,
        metrics,
        handover,
    };
    if checking {
        let config = read_config(options.config.as_deref())?;
        let summary = daemon::check_takeover(config, &options)
            .map_err(|e| Failure::Refused(e.to_string()))?;
        println!("{summary}");
        return Ok(());
    }
    return_large_frees_to_the_os();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if options.config.is_none() {
        tracing::warn!(
            "no --config given: running the BUILT-IN DEMO services (UDP and TCP echo on 127.0.0.1:5300, four `portshard echo` workers each); give --config FILE to serve your own"
        );
    }
    let handover = options.handover.clone();
    let served = read_config(options.config.as_deref()).and_then(|config| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        match runtime.block_on(daemon::serve(config, options.clone())) {
            // A program or account the config names is missing: invalid input.
            Err(error @ daemon::DaemonError::Unlaunchable { .. }) => {
                Err(Failure::Refused(error.to_string()).into())
            }
            other => Ok(other?),
        }
    });
    if let (Err(error), Some(handover)) = (&served, handover.filter(|h| h.previous.is_some())) {
        // This image cannot take over: the previous one gets everything back.
        let reason = render(error);
        tracing::error!(%reason, "upgrade: this binary cannot take over; executing the previous one again");
        let back = daemon::go_back(&handover, &reason);
        tracing::error!(error = %back, "cannot execute the previous binary again");
    }
    served
}

/// The config file at `path`, or the built-in default (the echo workers are this binary).
fn read_config(path: Option<&Path>) -> Result<Config> {
    match path {
        Some(path) => Ok(daemon::read_config(path).map_err(|e| Failure::Refused(e.to_string()))?),
        None => {
            let exe = std::env::current_exe()
                .context("finding this program's path for the built-in echo workers")?;
            Ok(Config::builtin(&exe))
        }
    }
}

/// What a request to the daemon came to, for `--json`.
#[derive(serde::Serialize)]
struct Outcome<'a> {
    /// `done`, `refused` or `rolled_back`.
    outcome: &'a str,
    /// The daemon's last word.
    message: &'a str,
    /// Table entries whose owner changed.
    moved: u32,
    /// The progress the daemon reported on the way (a reload's steps).
    progress: &'a [String],
}

/// Sends one request to the daemon and prints its answer (its progress as it comes, or
/// all of it as one JSON object); fails with the exit code of a refusal or rollback.
fn request(path: &Path, request: &Request, json: bool) -> Result<()> {
    let mut stream = UnixStream::connect(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on control socket {}: only root may control portshard",
            path.display()
        ),
        _ => Failure::NotRunning(format!(
            "the portshard daemon is not running (no daemon answers on control socket {}: {error}): start it with `portshard serve`, or pass --control/PORTSHARD_CONTROL",
            path.display()
        ))
        .into(),
    })?;
    stream
        .write_all(&control::encode_request(request))
        .with_context(|| format!("sending the request to {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    let mut progress = Vec::new();
    let mut reader = BufReader::new(&stream);
    let (outcome, message, moved) = loop {
        let mut line = Vec::new();
        reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading the reply from {}", path.display()))?;
        if line.is_empty() {
            bail!(
                "the daemon closed the control connection {} without answering",
                path.display()
            );
        }
        match control::decode_reply(line.trim_ascii_end())? {
            Reply::Progress { message } => {
                if !json {
                    writeln!(out, "{message}").context("writing to stdout")?;
                }
                progress.push(message);
            }
            Reply::Done { message, moved } => break ("done", message, moved),
            Reply::Error { message, kind } => match kind {
                ErrorKind::Refused => break ("refused", message, 0),
                ErrorKind::RolledBack => break ("rolled_back", message, 0),
            },
        }
    };
    if json {
        let report = Outcome {
            outcome,
            message: &message,
            moved,
            progress: &progress,
        };
        serde_json::to_writer(&mut out, &report).context("writing JSON to stdout")?;
        writeln!(out).context("writing to stdout")?;
    }
    match outcome {
        "done" => {
            if !json {
                writeln!(out, "{message}").context("writing to stdout")?;
            }
            Ok(())
        }
        "rolled_back" => Err(Failure::RolledBack(message).into()),
        _ => Err(Failure::Refused(format!("the daemon refused: {message}")).into()),
    }
}
