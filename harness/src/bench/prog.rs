//! What one run of the program costs, from the kernel's own BPF run-time statistics
//! (`BPF_ENABLE_STATS`, held only while measuring): portshard's select path (owner live),
//! its heir path (owner closed), its flow table's paths (a known flow's datagram; a new
//! flow's first datagram under a flood, when it displaces an admission record; a second
//! datagram admitting its flow; the same when the table is full and it is not kept), and,
//! in the same rounds, two reference programs built by the project's toolchain
//! (`ebpf/src/reference.rs`): one that only returns `SK_PASS` and one that does one array
//! lookup and one `select_reuseport`.
use std::{
    cell::Cell,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{Array, ReusePortSockArray},
    programs::{ProgramInfo, SkReuseport},
    sys::{Stats, enable_stats},
};
use portshard::{dataplane::Dataplane, group::Group, socket::Proto};
use portshard_common::{ADMIT_SIZE, names, reference};

use super::{
    BenchError, Budget, ROUND_LIMIT, Result,
    overhead::{self, drain, ephemeral, senders},
    report::{Figure, Summary, Target, paired_ratios},
};
use crate::{
    context,
    flood::Flood,
    flows::{self, FIRST_SOURCE_PORT, Flows, Listener},
    scenario::MeasureError,
};

/// Listeners of each measured group.
const LISTENERS: usize = 8;
/// Flows (connected sockets) each group's datagrams are spread over.
const FLOWS: usize = 64;
/// Flows tried to find those whose owner is the heir group's closed listener.
const HEIR_CANDIDATES: usize = 1024;
/// The most portshard's select path may cost over the one-lookup reference.
pub const MAX_RATIO: f64 = 1.25;

const PASS_PORT: u16 = 5310;
const LOOKUP_PORT: u16 = 5311;
const SELECT_PORT: u16 = 5312;
const HEIR_PORT: u16 = 5313;
const FLOW_PORT: u16 = 5314;
const FLOW_NEW_PORT: u16 = 5315;
const FLOW_ADMIT_PORT: u16 = 5316;
const FLOW_FULL_PORT: u16 = 5317;

/// Datagrams measured between two readings of the statistics. For second datagrams, their
/// flows' first ones are sent just before, unmeasured: few enough flows that no admission
/// record is displaced meanwhile.
const CHUNK: u32 = 1024;
/// The flow table of the full-table subject: filled before measuring.
const FULL_TABLE: u32 = 1024;
/// Where each flood subject's flows start among the flood's sources: far enough apart
/// that no two subjects share a flow.
const FLOOD_RANGES: [u32; 3] = [0, 4 << 20, 8 << 20];

/// Where a program's statistics are read from.
enum Stat<'a> {
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
enum Load {
    /// Datagrams round-robin over these connected sockets.
    Sockets(Vec<UdpSocket>),
    /// One datagram from each new flow of the flood, the next flow numbered `next`.
    NewFlows { flood: Flood, next: Cell<u32> },
    /// Second datagrams of new flows, [`CHUNK`] flows at a time: their first
    /// datagrams just before, unmeasured.
    SecondDatagrams { flood: Flood, next: Cell<u32> },
}

/// One measured program: its group's listeners, the load that runs it, its statistics.
struct Subject<'a> {
    name: &'static str,
    listeners: Vec<Option<Listener>>,
    load: Load,
    stat: Stat<'a>,
}

impl Subject<'_> {
    /// Runs the program `runs` times (one datagram each) and returns its mean ns per run.
    fn measure(&self, runs: usize) -> Result<f64> {
        let start = Instant::now();
        let (mut time, mut count) = (0, 0);
        while (count as usize) < runs && start.elapsed() < ROUND_LIMIT {
            let chunk = (runs - count as usize).min(CHUNK as usize) as u32;
            let flows = self.prepare(chunk)?;
            let (before, before_count) = self.stat.read(self.name)?;
            self.send(flows)?;
            let (after, after_count) = self.stat.read(self.name)?;
            drain(&self.listeners)?;
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
    fn prepare(&self, chunk: u32) -> Result<std::ops::Range<u32>> {
        let (flood, next) = match &self.load {
            Load::Sockets(_) => return Ok(0..chunk),
            Load::NewFlows { flood, next } | Load::SecondDatagrams { flood, next } => (flood, next),
        };
        let first = next.replace(next.get() + chunk);
        if let Load::SecondDatagrams { .. } = self.load {
            flood
                .send(first..first + chunk, 1)
                .map_err(|e| context(e, format!("first datagrams of {}", self.name)))?;
        }
        Ok(first..first + chunk)
    }

    /// Sends one datagram from each of `flows`.
    fn send(&self, flows: std::ops::Range<u32>) -> Result<()> {
        match &self.load {
            Load::Sockets(senders) => {
                for n in flows {
                    let flow = n as usize % senders.len();
                    senders[flow].send(b"run").map_err(|e| {
                        context(e, format!("sending on flow {flow} of {}", self.name))
                    })?;
                }
            }
            Load::NewFlows { flood, .. } | Load::SecondDatagrams { flood, .. } => {
                flood
                    .send(flows, 1)
                    .map_err(|e| context(e, format!("flooding {}", self.name)))?;
            }
        }
        Ok(())
    }
}

/// The reference object, loaded, with its two programs verified.
fn load_reference(object: &Path) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load_file(object).map_err(|source| BenchError::Bpf {
        what: format!("loading the reference object {}", object.display()),
        source: Box::new(source),
    })?;
    for name in [reference::PASS, reference::SELECT] {
        let program: &mut SkReuseport = ebpf
            .program_mut(name)
            .ok_or_else(|| no_program(name))?
            .try_into()
            .map_err(BenchError::bpf(format!("reference program {name}")))?;
        program.load().map_err(BenchError::bpf(format!(
            "verifying reference program {name}"
        )))?;
    }
    Ok(ebpf)
}

/// The loaded reference program `name`.
fn reference_program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a SkReuseport> {
    ebpf.program(name)
        .ok_or_else(|| no_program(name))?
        .try_into()
        .map_err(BenchError::bpf(format!("reference program {name}")))
}

fn no_program(name: &str) -> BenchError {
    MeasureError::Traffic(format!("the reference object has no program {name}")).into()
}

/// Puts `listeners` in the reference object's socket array, slot `i` for listener `i`, and
/// spreads the lookup array over them.
fn fill_reference_maps(ebpf: &mut Ebpf, listeners: &[Option<Listener>]) -> Result<()> {
    let map_error = |what: String| {
        move |source: aya::maps::MapError| BenchError::Bpf {
            what,
            source: Box::new(source),
        }
    };
    let map = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| MeasureError::Traffic(format!("the reference object has no map {name}")))
    };
    let mut sockets = ReusePortSockArray::try_from(map(ebpf, reference::SOCKETS)?)
        .map_err(map_error(format!("opening map {}", reference::SOCKETS)))?;
    for (slot, listener) in listeners.iter().enumerate() {
        let listener = listener.as_ref().expect("all open");
        sockets
            .set(slot as u32, &listener.as_fd(), 0)
            .map_err(map_error(format!(
                "placing listener {slot} in {}",
                reference::SOCKETS
            )))?;
    }
    let mut slots: Array<_, u32> = Array::try_from(map(ebpf, reference::SLOT_OF)?)
        .map_err(map_error(format!("opening map {}", reference::SLOT_OF)))?;
    for index in 0..reference::SLOTS {
        slots
            .set(index, index % listeners.len() as u32, 0)
            .map_err(map_error(format!(
                "writing entry {index} of {}",
                reference::SLOT_OF
            )))?;
    }
    Ok(())
}

/// A portshard group on `port` (with the flow table if `flow_capacity` is not 0) and the
/// path of its pinned program.
fn portshard_group(
    pins: &Path,
    service: &str,
    port: u16,
    flow_capacity: u32,
) -> Result<(Vec<Option<Listener>>, Group, PathBuf)> {
    let target = flows::loopback(false, port);
    let (listeners, group) =
        overhead::group(pins, service, Proto::Udp, target, LISTENERS, flow_capacity)?;
    let program = group.dataplane().dir().join(names::PROGRAM);
    Ok((listeners, group, program))
}

/// The flows of the heir group whose owner is listener 0, which is then closed: every
/// datagram of theirs takes the heir path. Returns their source addresses.
fn orphan_sources(listeners: &mut [Option<Listener>], port: u16) -> Result<Vec<SocketAddr>> {
    let target = flows::loopback(false, port);
    let landing = Flows::new(Proto::Udp, target, HEIR_CANDIDATES).round(listeners)?;
    listeners[0] = None;
    let sources: Vec<SocketAddr> = (0..HEIR_CANDIDATES)
        .filter(|&flow| landing[flow] == Some(0))
        .take(FLOWS)
        .map(|flow| SocketAddr::new(target.ip(), FIRST_SOURCE_PORT + flow as u16))
        .collect();
    if sources.is_empty() {
        return Err(MeasureError::Traffic(format!(
            "none of {HEIR_CANDIDATES} flows to {target} is owned by listener 0"
        ))
        .into());
    }
    Ok(sources)
}

/// `prog_ns_{ref_pass,ref_select,select,heir,flow_table,flow_new,flow_admit,flow_full}` (mean
/// ns per run, median of rounds) and
/// `prog_ratio` (portshard's select path over the one-lookup reference, round by round).
pub fn figures(pins: &Path, reference: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let mut ebpf = load_reference(reference)?;
    let pass_listeners =
        flows::bind_listeners(Proto::Udp, flows::loopback(false, PASS_PORT), LISTENERS)?;
    let lookup_listeners =
        flows::bind_listeners(Proto::Udp, flows::loopback(false, LOOKUP_PORT), LISTENERS)?;
    fill_reference_maps(&mut ebpf, &lookup_listeners)?;
    for (name, listeners) in [
        (reference::PASS, &pass_listeners),
        (reference::SELECT, &lookup_listeners),
    ] {
        let member = listeners[0].as_ref().expect("all open").as_fd();
        reference_program(&ebpf, name)?
            .attach(member)
            .map_err(BenchError::bpf(format!(
                "attaching {name} to the group of fd {member:?}"
            )))?;
    }
    let (select_listeners, select_group, select_program) =
        portshard_group(pins, "prog-select", SELECT_PORT, 0)?;
    let (mut heir_listeners, heir_group, heir_program) =
        portshard_group(pins, "prog-heir", HEIR_PORT, 0)?;
    // Known flows: after each flow's second datagram (which admits it), every run takes
    // the flow-table path.
    let (flow_listeners, flow_group, flow_program) =
        portshard_group(pins, "prog-flow", FLOW_PORT, overhead::FLOW_TABLE)?;
    let orphans = orphan_sources(&mut heir_listeners, HEIR_PORT)?;
    // The flow table's other paths, driven by floods of new flows.
    let (new_listeners, new_group, new_program) =
        portshard_group(pins, "prog-flow-new", FLOW_NEW_PORT, overhead::FLOW_TABLE)?;
    let (admit_listeners, admit_group, admit_program) =
        portshard_group(pins, "prog-flow-admit", FLOW_ADMIT_PORT, 1 << 21)?;
    let (full_listeners, full_group, full_program) =
        portshard_group(pins, "prog-flow-full", FLOW_FULL_PORT, FULL_TABLE)?;
    let flood = |port: u16| {
        Flood::new(SocketAddrV4::new([127, 0, 0, 1].into(), port))
            .map_err(|e| context(e, format!("opening a raw socket to flood port {port}")))
    };
    // Every admission record taken by a recent flow: each new flow then displaces one, as
    // under a flood. And a full flow table: every admission is refused.
    let new_flood = flood(FLOW_NEW_PORT)?;
    new_flood
        .send(FLOOD_RANGES[0]..FLOOD_RANGES[0] + ADMIT_SIZE * 2, 1)
        .map_err(|e| context(e, "filling the admission array".into()))?;
    let full_flood = flood(FLOW_FULL_PORT)?;
    full_flood
        .send(FLOOD_RANGES[2]..FLOOD_RANGES[2] + FULL_TABLE * 2, 2)
        .map_err(|e| context(e, "filling the flow table".into()))?;
    drain(&new_listeners)?;
    drain(&full_listeners)?;

    let subjects = [
        Subject {
            name: reference::PASS,
            load: Load::Sockets(senders(
                flows::loopback(false, PASS_PORT),
                ephemeral(FLOWS),
            )?),
            listeners: pass_listeners,
            stat: Stat::Loaded(reference_program(&ebpf, reference::PASS)?),
        },
        Subject {
            name: reference::SELECT,
            load: Load::Sockets(senders(
                flows::loopback(false, LOOKUP_PORT),
                ephemeral(FLOWS),
            )?),
            listeners: lookup_listeners,
            stat: Stat::Loaded(reference_program(&ebpf, reference::SELECT)?),
        },
        Subject {
            name: "select",
            load: Load::Sockets(senders(
                flows::loopback(false, SELECT_PORT),
                ephemeral(FLOWS),
            )?),
            listeners: select_listeners,
            stat: Stat::Pinned(select_program),
        },
        Subject {
            name: "heir",
            load: Load::Sockets(senders(flows::loopback(false, HEIR_PORT), orphans)?),
            listeners: heir_listeners,
            stat: Stat::Pinned(heir_program),
        },
        Subject {
            name: "flow",
            load: Load::Sockets(senders(
                flows::loopback(false, FLOW_PORT),
                ephemeral(FLOWS),
            )?),
            listeners: flow_listeners,
            stat: Stat::Pinned(flow_program),
        },
        Subject {
            name: "flow_new",
            load: Load::NewFlows {
                flood: new_flood,
                next: Cell::new(FLOOD_RANGES[0] + ADMIT_SIZE * 2),
            },
            listeners: new_listeners,
            stat: Stat::Pinned(new_program),
        },
        Subject {
            name: "flow_admit",
            load: Load::SecondDatagrams {
                flood: flood(FLOW_ADMIT_PORT)?,
                next: Cell::new(FLOOD_RANGES[1]),
            },
            listeners: admit_listeners,
            stat: Stat::Pinned(admit_program),
        },
        Subject {
            name: "flow_full",
            load: Load::SecondDatagrams {
                flood: full_flood,
                next: Cell::new(FLOOD_RANGES[2] + FULL_TABLE * 2),
            },
            listeners: full_listeners,
            stat: Stat::Pinned(full_program),
        },
    ];

    let stats = enable_stats(Stats::RunTime).map_err(|source| BenchError::Bpf {
        what: "enabling BPF run-time statistics (BPF_ENABLE_STATS)".into(),
        source: Box::new(source),
    })?;
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    for _ in 0..budget.prog_rounds {
        for (subject, values) in subjects.iter().zip(&mut ns) {
            values.push(subject.measure(budget.prog_runs)?);
        }
    }
    drop(stats);
    drop(subjects);
    drop((select_group, heir_group, flow_group));
    drop((new_group, admit_group, full_group));
    for service in [
        "prog-select",
        "prog-heir",
        "prog-flow",
        "prog-flow-new",
        "prog-flow-admit",
        "prog-flow-full",
    ] {
        Dataplane::remove_pins(pins, service)?;
    }

    let summary = |index: usize| {
        Summary::of(&ns[index]).ok_or_else(|| {
            BenchError::from(MeasureError::Traffic("no program round measured".into()))
        })
    };
    let lookup = summary(1)?.median;
    let mut figures = Vec::new();
    for (index, (name, ideal)) in [
        ("prog_ns_ref_pass", summary(0)?.median),
        ("prog_ns_ref_select", lookup),
        ("prog_ns_select", lookup),
        ("prog_ns_heir", lookup),
        ("prog_ns_flow_table", lookup),
        ("prog_ns_flow_new", lookup),
        ("prog_ns_flow_admit", lookup),
        ("prog_ns_flow_full", lookup),
    ]
    .into_iter()
    .enumerate()
    {
        figures.push(
            Figure::summarized(name, "ns", ideal, summary(index)?)
                .extra("runs_per_round", budget.prog_runs as f64),
        );
    }
    let ratio = Summary::of(&paired_ratios(&ns[2], &ns[1])).ok_or_else(|| {
        BenchError::from(MeasureError::Traffic("no program round measured".into()))
    })?;
    figures.push(
        Figure::summarized("prog_ratio", "ratio", 1.0, ratio)
            .target(Target::AtMost(MAX_RATIO))
            .extra(
                "heir_ratio",
                Summary::of(&paired_ratios(&ns[3], &ns[1])).map_or(f64::NAN, |s| s.median),
            )
            .extra(
                "flow_table_ratio",
                Summary::of(&paired_ratios(&ns[4], &ns[1])).map_or(f64::NAN, |s| s.median),
            ),
    );
    Ok(figures)
}
