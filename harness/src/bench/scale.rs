//! Figures at scale: what a flow table of [`SCALE_FLOWS`] flows costs the kernel in memory
//! (the map's `memlock` in its `fdinfo`, the kernel's own account), and how long the
//! operator's reads take with that many flows in it: `portshard status --json`,
//! `portshard flows --json` and a scrape of the daemon's `/metrics`.
use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use portshard::dataplane::coarse_now_ns;
use portshard_common::{Flow, FlowKey, names};

use super::{
    BenchError, Budget, ROUND_LIMIT, Result,
    report::{Figure, Summary},
    service::proc_field,
};
use crate::{
    context,
    daemon::{DaemonRun, scrape},
    scenario::MeasureError,
};

/// Flows in the scale figures' flow table, every one of them live.
pub const SCALE_FLOWS: u32 = 1_000_000;

const SERVICE: &str = "scale";
const PORT: u16 = 5340;
const METRICS: &str = "127.0.0.1:9340";
const WORKERS: usize = 4;

/// `flow_table_mib_1m`, `status_ms_1m`, `flows_ms_1m`, `scrape_ms_1m`: a daemon serving one
/// sticky UDP service whose flow table holds [`SCALE_FLOWS`] live flows (written through
/// the pinned map, spread over the live workers, stamped now so no sweep removes them).
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
    for (what, values) in timings {
        let summary = Summary::of(&values)
            .ok_or_else(|| MeasureError::Traffic(format!("{what}: not timed")))?;
        figures.push(Figure::summarized(
            format!("{what}_ms_1m"),
            "ms",
            0.0,
            summary,
        ));
    }
    Ok(figures)
}
