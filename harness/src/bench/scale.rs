//! Figures at scale: what a flow table of [`SCALE_FLOWS`] flows costs the kernel in memory
//! (the map's `memlock` in its `fdinfo`, the kernel's own account), and how long the
//! operator's reads take with that many flows in it: `portshard status --json`,
//! `portshard flows --json` and a scrape of the daemon's `/metrics`; and how soon the daemon
//! heals the table after a worker dies while it is being scraped back to back.
use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use portshard::dataplane::{Dataplane, coarse_now_ns};
use portshard_common::{Flow, FlowKey, names};

use super::{
    BenchError, Budget, ROUND_LIMIT, Result,
    report::{Figure, Summary, Target},
    service::proc_field,
};
use crate::{
    context,
    daemon::{DaemonRun, kill_and_wait, scrape, workers},
    scenario::MeasureError,
};

/// Flows in the scale figures' flow table, every one of them live.
pub const SCALE_FLOWS: u32 = 1_000_000;

const SERVICE: &str = "scale";
const PORT: u16 = 5340;
const METRICS: &str = "127.0.0.1:9340";
const WORKERS: usize = 4;
/// `status --json` and a scrape must answer within this at [`SCALE_FLOWS`] flows.
const READ_LIMIT_MS: f64 = 100.0;
/// A dead worker's entries must all have gone to their heirs within this of its exit.
const HEAL_LIMIT_MS: f64 = 5.0;

/// `flow_table_mib_1m`, `status_ms_1m`, `flows_ms_1m`, `scrape_ms_1m`, `heal_ms_1m`: a daemon
/// serving one sticky UDP service whose flow table holds [`SCALE_FLOWS`] live flows (written
/// through the pinned map, spread over the live workers, stamped now so no sweep removes
/// them).
pub fn million_flows(exe: &Path, pins: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    let config = format!(
        "[[service]]\nname = \"{SERVICE}\"\nproto = \"udp\"\nlisten = \"127.0.0.1:{PORT}\"\nworkers = {WORKERS}\ncommand = [\"{}\", \"echo\"]\nsticky = true\nflow_table = {SCALE_FLOWS}\nflow_idle = \"1h\"\n",
        exe.display()
    );
    let mut daemon = DaemonRun::start_with_args(exe, &config, pins, &["--metrics", METRICS])?;
    let status = daemon.wait_ready(&[(SERVICE, WORKERS)], ROUND_LIMIT)?;
    let live: Vec<(u16, u32)> = status
        .iter()
        .find(|s| s.name == SERVICE)
        .map(|s| {
            s.slots
                .iter()
                .filter(|slot| slot.state == "live")
                .map(|slot| (slot.slot, slot.generation))
                .collect()
        })
        .unwrap_or_default();
    let path = pins.join(SERVICE).join(names::FLOWS);
    let data = MapData::from_pin(&path).map_err(|source| BenchError::Bpf {
        what: format!("opening the pinned flow table {}", path.display()),
        source: Box::new(source),
    })?;
    let fdinfo = format!("/proc/self/fdinfo/{}", data.fd().as_fd().as_raw_fd());
    let mut flows: HashMap<_, FlowKey, Flow> =
        HashMap::try_from(Map::HashMap(data)).map_err(|source| BenchError::Bpf {
            what: format!("opening {} as a hash map", path.display()),
            source: Box::new(source),
        })?;
    let now = coarse_now_ns();
    for n in 0..SCALE_FLOWS {
        let (slot, generation) = live[n as usize % live.len()];
        let mut source = [0u8; 16];
        source[..4].copy_from_slice(&(0x0a00_0000 + n).to_be_bytes());
        let key = FlowKey {
            source,
            port: (1024 + (n % 60_000) as u16).to_be(),
            family: 4,
            hash: n.wrapping_mul(0x9e37_79b9),
        };
        let flow = Flow {
            slot,
            reserved: 0,
            generation,
            last_seen: now,
        };
        flows
            .insert(key, flow, 0)
            .map_err(|source| BenchError::Bpf {
                what: format!("inserting flow {n} into {}", path.display()),
                source: Box::new(source),
            })?;
    }
    let info =
        std::fs::read_to_string(&fdinfo).map_err(|e| context(e, format!("reading {fdinfo}")))?;
    let memlock = proc_field(&info, "memlock")
        .ok_or_else(|| MeasureError::Traffic(format!("{fdinfo} has no memlock line")))?;

    let repetitions = budget.prog_rounds.max(3);
    let cli = |args: &[&str]| -> Result<Duration> {
        let started = Instant::now();
        let output = Command::new(exe)
            .arg("--bpffs")
            .arg(pins)
            .args(args)
            .output()
            .map_err(|e| context(e, format!("running {} {}", exe.display(), args.join(" "))))?;
        if !output.status.success() {
            return Err(MeasureError::Traffic(format!(
                "`portshard {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
            .into());
        }
        Ok(started.elapsed())
    };
    let metrics: SocketAddr = METRICS.parse().expect("a valid address");
    let scraped = || -> Result<Duration> {
        let started = Instant::now();
        let text = scrape(metrics)?;
        if !text.contains("portshard_") {
            return Err(MeasureError::Traffic(format!(
                "{metrics}/metrics served no portshard metric"
            ))
            .into());
        }
        Ok(started.elapsed())
    };
    let mut timings: [(&str, Vec<f64>); 3] =
        [("status", vec![]), ("flows", vec![]), ("scrape", vec![])];
    for _ in 0..repetitions {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        timings[0].1.push(ms(cli(&["status", "--json"])?));
        timings[1].1.push(ms(cli(&["flows", SERVICE, "--json"])?));
        timings[2].1.push(ms(scraped()?));
    }
    let heals = heal_times(&daemon, pins, metrics, repetitions)?;
    drop(flows);
    drop(daemon);

    let mut figures = vec![
        Figure::new(
            "flow_table_mib_1m",
            "MiB",
            0.0,
            memlock as f64 / f64::from(1u32 << 20),
        )
        .n(SCALE_FLOWS as usize)
        .extra("bytes_per_flow", memlock as f64 / f64::from(SCALE_FLOWS)),
    ];
    // Listing every flow is an export, not a read the operator waits on: no target.
    let limits = [Some(READ_LIMIT_MS), None, Some(READ_LIMIT_MS)];
    for (what, values, limit) in timings
        .into_iter()
        .zip(limits)
        .map(|((what, values), limit)| (what, values, limit))
        .chain([("heal", heals, Some(HEAL_LIMIT_MS))])
    {
        let summary = Summary::of(&values)
            .ok_or_else(|| MeasureError::Traffic(format!("{what}: not timed")))?;
        let figure = Figure::summarized(format!("{what}_ms_1m"), "ms", 0.0, summary);
        figures.push(match limit {
            Some(limit) => figure.target(Target::AtMost(limit)),
            None => figure,
        });
    }
    Ok(figures)
}

/// Kills one live worker per repetition while a thread scrapes `/metrics` back to back, and
/// times, in milliseconds, from the worker's pidfd firing until its slot owns no table entry;
/// the daemon's replacement is awaited before the next.
fn heal_times(
    daemon: &DaemonRun,
    pins: &Path,
    metrics: SocketAddr,
    repetitions: usize,
) -> Result<Vec<f64>> {
    let dataplane = Dataplane::open(pins, SERVICE)?;
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || -> Result<usize> {
            let mut scrapes = 0;
            while !stop.load(Ordering::Relaxed) {
                scrape(metrics)?;
                scrapes += 1;
            }
            Ok(scrapes)
        })
    };
    let heal = || -> Result<f64> {
        let live = workers(&daemon.status()?)
            .remove(SERVICE)
            .unwrap_or_default();
        let (&slot, &pid) = live.iter().next().ok_or_else(|| {
            MeasureError::Traffic(format!("service {SERVICE} has no live worker to kill"))
        })?;
        let fired = kill_and_wait(pid, ROUND_LIMIT)?;
        while dataplane.read_entries().iter().any(|e| e.owner == slot) {
            if fired.elapsed() > ROUND_LIMIT {
                return Err(MeasureError::Traffic(format!(
                    "slot {slot} of {SERVICE} still owns table entries {ROUND_LIMIT:?} after its worker (pid {pid}) exited"
                ))
                .into());
            }
        }
        let healed = fired.elapsed().as_secs_f64() * 1e3;
        while workers(&daemon.status()?)
            .remove(SERVICE)
            .and_then(|live| live.get(&slot).copied())
            .is_none_or(|now| now == pid)
        {
            if fired.elapsed() > ROUND_LIMIT {
                return Err(MeasureError::Traffic(format!(
                    "slot {slot} of {SERVICE} was not given a new worker within {ROUND_LIMIT:?} of pid {pid} exiting"
                ))
                .into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(healed)
    };
    let heals: Result<Vec<f64>> = (0..repetitions).map(|_| heal()).collect();
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper
        .join()
        .map_err(|_| MeasureError::Traffic("the scraping thread panicked".to_owned()))??;
    if scrapes == 0 {
        return Err(MeasureError::Traffic(format!(
            "{metrics}/metrics was never scraped while workers died"
        ))
        .into());
    }
    heals
}
