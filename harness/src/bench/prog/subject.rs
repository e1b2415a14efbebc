//! One measured program and the load that runs it: where its run-time statistics come
//! from, which datagrams it sees (a few connected flows over and over, hot; a cycle over
//! tens of thousands of flood flows, cold; new flows of a flood), and the mean run time of
//! a round.
use std::{cell::Cell, net::UdpSocket, path::PathBuf, time::Instant};

use aya::programs::{ProgramInfo, SkReuseport};

use super::super::{BenchError, ROUND_LIMIT, Result, overhead::drain};
use crate::{context, flood::Flood, flows::Listener, scenario::MeasureError};

/// Datagrams measured between two readings of the statistics. For second datagrams, their
/// flows' first ones are sent just before, unmeasured: few enough flows that no admission
/// record is displaced meanwhile.
const CHUNK: u32 = 1024;

/// Where a program's statistics are read from.
pub enum Stat<'a> {
    /// A program this process loaded.
    Loaded(&'a SkReuseport),
    /// A pinned program.
    Pinned(PathBuf),
}

impl Stat<'_> {
    /// Total run time (ns) and run count so far of the program measured as `name`.
    fn read(&self, name: &str) -> Result<(u64, u64)> {
        let (info, what) = match self {
            Self::Loaded(program) => (program.info(), format!("reference program {name}")),
            Self::Pinned(path) => (
                ProgramInfo::from_pin(path),
                format!("program {}", path.display()),
            ),
        };
        let info = info.map_err(BenchError::bpf(format!(
            "reading the run-time statistics of {what}"
        )))?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }
}

/// What runs a subject's program.
pub enum Load {
    /// Datagrams carrying `payload` round-robin over these connected sockets: a few flows,
    /// their table entries and flow records in cache (hot).
    Sockets {
        /// The connected sockets.
        senders: Vec<UdpSocket>,
        /// What each datagram carries.
        payload: Vec<u8>,
    },
    /// One datagram from each flood flow of `flows` in turn, round after round: as many
    /// distinct 4-tuples as `flows` holds, so tables and records come from memory (cold).
    Cycle {
        /// The flood towards the subject's port.
        flood: Flood,
        /// The flow numbers cycled over.
        flows: Vec<u32>,
        /// Where the next chunk starts in `flows`.
        next: Cell<usize>,
    },
    /// One datagram from each new flow of the flood, the next flow numbered `next`.
    NewFlows {
        /// The flood towards the subject's port.
        flood: Flood,
        /// The next flow number.
        next: Cell<u32>,
    },
    /// Second datagrams of new flows, [`CHUNK`] flows at a time: their first datagrams
    /// just before, unmeasured.
    SecondDatagrams {
        /// The flood towards the subject's port.
        flood: Flood,
        /// The next flow number.
        next: Cell<u32>,
    },
}

impl Load {
    /// A cold cycle over `flows` of `flood`.
    pub fn cycle(flood: Flood, flows: Vec<u32>) -> Self {
        Self::Cycle {
            flood,
            flows,
            next: Cell::new(0),
        }
    }

    /// Whether each run's flow state (table entry, flow record) comes from memory rather
    /// than cache: every load but a few connected flows.
    pub fn is_cold(&self) -> bool {
        !matches!(self, Self::Sockets { .. })
    }

    /// How many distinct flows a round of `runs` datagrams covers: the figure's `n`.
    pub fn flows(&self, runs: usize) -> usize {
        match self {
            Self::Sockets { senders, .. } => senders.len().min(runs),
            Self::Cycle { flows, .. } => flows.len().min(runs),
            Self::NewFlows { .. } | Self::SecondDatagrams { .. } => runs,
        }
    }
}

/// One measured program: its group's listeners, the load that runs it, its statistics.
pub struct Subject<'a> {
    /// The figure's name, after `prog_ns_`.
    pub name: &'static str,
    /// The group's listeners, drained after each chunk.
    pub listeners: &'a [Option<Listener>],
    /// What sends its datagrams.
    pub load: Load,
    /// Where its statistics are read.
    pub stat: Stat<'a>,
}

impl Subject<'_> {
    /// Runs the program `runs` times (one datagram each) and returns its mean ns per run.
    pub fn measure(&self, runs: usize) -> Result<f64> {
        let start = Instant::now();
        let (mut time, mut count) = (0, 0);
        while (count as usize) < runs && start.elapsed() < ROUND_LIMIT {
            let chunk = (runs - count as usize).min(CHUNK as usize) as u32;
            let flows = self.prepare(chunk)?;
            let (before, before_count) = self.stat.read(self.name)?;
            self.send(&flows)?;
            let (after, after_count) = self.stat.read(self.name)?;
            drain(self.listeners)?;
            if after_count == before_count {
                return Err(MeasureError::Traffic(format!(
                    "{}: {chunk} datagrams ran the program 0 times (statistics off?)",
                    self.name
                ))
                .into());
            }
            time += after.saturating_sub(before);
            count += after_count - before_count;
        }
        Ok(time as f64 / count as f64)
    }

    /// The flows of the next `chunk` measured datagrams; for second datagrams, their
    /// first ones are sent here, before the measurement.
    fn prepare(&self, chunk: u32) -> Result<Vec<u32>> {
        match &self.load {
            Load::Sockets { .. } => Ok((0..chunk).collect()),
            Load::Cycle { flows, next, .. } => {
                let first = next.get();
                next.set((first + chunk as usize) % flows.len());
                Ok((0..chunk as usize)
                    .map(|i| flows[(first + i) % flows.len()])
                    .collect())
            }
            Load::NewFlows { next, .. } => {
                let first = next.replace(next.get() + chunk);
                Ok((first..first + chunk).collect())
            }
            Load::SecondDatagrams { flood, next } => {
                let first = next.replace(next.get() + chunk);
                flood
                    .send(first..first + chunk, 1)
                    .map_err(|e| context(e, format!("first datagrams of {}", self.name)))?;
                Ok((first..first + chunk).collect())
            }
        }
    }

    /// Sends one datagram from each of `flows`.
    fn send(&self, flows: &[u32]) -> Result<()> {
        match &self.load {
            Load::Sockets { senders, payload } => {
                for &n in flows {
                    let flow = n as usize % senders.len();
                    senders[flow].send(payload).map_err(|e| {
                        context(e, format!("sending on flow {flow} of {}", self.name))
                    })?;
                }
            }
            Load::Cycle { flood, .. }
            | Load::NewFlows { flood, .. }
            | Load::SecondDatagrams { flood, .. } => {
                flood
                    .send(flows.iter().copied(), 1)
                    .map_err(|e| context(e, format!("flooding {}", self.name)))?;
            }
        }
        Ok(())
    }
}
