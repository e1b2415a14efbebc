//! `cargo xtask bench`: every figure that says how well portshard does its job, measured on
//! real sockets on loopback in a private network namespace, next to what plain
//! `SO_REUSEPORT` does with the same flows, and judged against the project's targets.
//!
//! [`report`] is the pure part (figures, summaries, targets, the table); the other modules
//! drive sockets, programs and the daemon, each in bounded loops (a count and a time limit).
use std::time::Duration;

use portshard::{dataplane::DataplaneError, group::GroupError, table::TableError};

use crate::scenario::MeasureError;

pub mod moves;
pub mod overhead;
pub mod prog;
pub mod report;
pub mod scale;
pub mod service;
pub mod table;

/// A figure could not be measured; the message says what failed, on which socket, map,
/// program, pid or path.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A scenario or a socket failed.
    #[error(transparent)]
    Measure(#[from] MeasureError),
    /// A socket or file operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// portshard refused to set up or change a group.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A dataplane operation failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// A table operation was refused.
    #[error(transparent)]
    Table(#[from] TableError),
    /// Loading, attaching or reading a BPF program or map failed.
    #[error("{what}: {source}")]
    Bpf {
        /// What was being done, naming the program, map or socket.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BenchError {
    /// A [`BenchError::Bpf`] saying what was being done.
    pub fn bpf(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        let what = what.into();
        move |source| Self::Bpf {
            what,
            source: Box::new(source),
        }
    }
}

/// `Result` with a [`BenchError`].
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// How much work each figure gets: a full run (at most 5 minutes on 2 cores) or a quick one
/// (under 1 minute) with fewer flows, rounds and repetitions.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Flows per `survivor_moved` case; `None` for [`crate::scenario::CloseOne::new`]'s
    /// count. (`add_moved` always uses that count, which resolves the joining share to one
    /// percentage point.)
    pub survivor_flows: Option<usize>,
    /// UDP flows over which balance is observed.
    pub balance_flows: usize,
    /// Rounds of each overhead measurement, with and without the program.
    pub overhead_rounds: usize,
    /// Datagrams per UDP overhead round.
    pub udp_datagrams: usize,
    /// Connections per TCP overhead round.
    pub tcp_connections: usize,
    /// Rounds of the program run-time measurement.
    pub prog_rounds: usize,
    /// Program runs per program per round.
    pub prog_runs: usize,
    /// Workers killed for the failover figure.
    pub failovers: usize,
    /// Repetitions of each table operation.
    pub rebuild_repetitions: usize,
    /// Workers of each of the most services a config may name, for the daemon's memory at
    /// scale.
    pub rss_max_workers: usize,
}

impl Budget {
    /// The full run.
    pub const FULL: Self = Self {
        survivor_flows: None,
        balance_flows: 100_000,
        overhead_rounds: 11,
        udp_datagrams: 200_000,
        tcp_connections: 8_000,
        prog_rounds: 7,
        prog_runs: 100_000,
        failovers: 15,
        rebuild_repetitions: 25,
        rss_max_workers: portshard::config::MAX_WORKERS as usize,
    };

    /// The quick run.
    pub const QUICK: Self = Self {
        survivor_flows: Some(4096),
        balance_flows: 20_000,
        overhead_rounds: 5,
        udp_datagrams: 50_000,
        tcp_connections: 2_000,
        prog_rounds: 3,
        prog_runs: 10_000,
        failovers: 3,
        rebuild_repetitions: 9,
        rss_max_workers: 8,
    };
}

/// The longest any one load loop (a round of traffic, a wait for the daemon) may run.
pub const ROUND_LIMIT: Duration = Duration::from_secs(20);
