//! What one run of the program costs, from the kernel's own BPF run-time statistics
//! (`BPF_ENABLE_STATS`, held only while measuring): portshard's select path (owner live),
//! its heir path (owner closed), and, in the same rounds, two reference programs built by
//! the project's toolchain (`ebpf/src/reference.rs`): one that only returns `SK_PASS` and
//! one that does one array lookup and one `select_reuseport`.
use std::{
    net::{SocketAddr, UdpSocket},
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
use portshard_common::{names, reference};

use super::{
    BenchError, Budget, ROUND_LIMIT, Result,
    overhead::{self, drain, ephemeral, senders},
    report::{Figure, Summary, Target, paired_ratios},
};
use crate::{
    context,
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

/// One measured program: its group's listeners, the flows that run it, its statistics.
struct Subject<'a> {
    name: &'static str,
    listeners: Vec<Option<Listener>>,
    senders: Vec<UdpSocket>,
    stat: Stat<'a>,
}

impl Subject<'_> {
    /// Runs the program `runs` times (one datagram each) and returns its mean ns per run.
    fn measure(&self, runs: usize) -> Result<f64> {
        let (time_before, count_before) = self.stat.read(self.name)?;
        let start = Instant::now();
        let mut sent = 0;
        while sent < runs && start.elapsed() < ROUND_LIMIT {
            let flow = sent % self.senders.len();
            self.senders[flow].send(b"run").map_err(|e| {
                context(
                    e,
                    format!("sending datagram {sent} on flow {flow} of {}", self.name),
                )
            })?;
            sent += 1;
            if sent % 1024 == 0 {
                drain(&self.listeners)?;
            }
        }
        drain(&self.listeners)?;
        let (time_after, count_after) = self.stat.read(self.name)?;
        let runs = count_after.saturating_sub(count_before);
        if runs == 0 {
            return Err(MeasureError::Traffic(format!(
                "{}: {sent} datagrams ran the program 0 times (statistics off?)",
                self.name
            ))
            .into());
        }
        Ok(time_after.saturating_sub(time_before) as f64 / runs as f64)
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

/// `prog_ns_{ref_pass,ref_select,select,heir,flow_table}` (mean ns per run, median of rounds) and
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
    // Known flows: after each flow's first datagram, every run takes the flow-table path.
    let (flow_listeners, flow_group, flow_program) =
        portshard_group(pins, "prog-flow", FLOW_PORT, overhead::FLOW_TABLE)?;
    let orphans = orphan_sources(&mut heir_listeners, HEIR_PORT)?;

    let subjects = [
        Subject {
            name: reference::PASS,
            senders: senders(flows::loopback(false, PASS_PORT), ephemeral(FLOWS))?,
            listeners: pass_listeners,
            stat: Stat::Loaded(reference_program(&ebpf, reference::PASS)?),
        },
        Subject {
            name: reference::SELECT,
            senders: senders(flows::loopback(false, LOOKUP_PORT), ephemeral(FLOWS))?,
            listeners: lookup_listeners,
            stat: Stat::Loaded(reference_program(&ebpf, reference::SELECT)?),
        },
        Subject {
            name: "select",
            senders: senders(flows::loopback(false, SELECT_PORT), ephemeral(FLOWS))?,
            listeners: select_listeners,
            stat: Stat::Pinned(select_program),
        },
        Subject {
            name: "heir",
            senders: senders(flows::loopback(false, HEIR_PORT), orphans)?,
            listeners: heir_listeners,
            stat: Stat::Pinned(heir_program),
        },
        Subject {
            name: "flow",
            senders: senders(flows::loopback(false, FLOW_PORT), ephemeral(FLOWS))?,
            listeners: flow_listeners,
            stat: Stat::Pinned(flow_program),
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
    for service in ["prog-select", "prog-heir", "prog-flow"] {
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
