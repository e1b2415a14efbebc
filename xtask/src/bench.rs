//! `cargo xtask bench [--quick] [--compare OLD.json]`: runs the bench binary, which writes
//! `target/bench/report.json`, then writes the report's table (`report.md`) and picture
//! (`moves.svg`) beside it and, with `--compare`, prints each figure against the old report.
use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use portshard_toolchain as toolchain;

use crate::{
    build_ebpf, build_portshard, compare, docs, ebpf_object, harness_command, report, root,
};

/// Measures every figure; see the module's doc.
pub fn bench(quick: bool, compare_with: Option<&Path>) -> Result<()> {
    // The old report is read first, so a wrong path fails before minutes of measuring.
    let old = compare_with
        .map(|path| report::load(path).map(|figures| (path, figures)))
        .transpose()?;
    build_ebpf()?;
    let reference = ebpf_object(toolchain::REFERENCE_OBJECT_NAME)?;
    build_portshard()?;
    let out = root().join(docs::BENCH_REPORT);
    let mut bench = harness_command("portshard-bench");
    bench
        .arg("--reference")
        .arg(reference)
        .arg("--portshard")
        .arg(root().join("target/release/portshard"))
        .arg("--out")
        .arg(&out);
    if quick {
        bench.arg("--quick");
    }
    // A second of slack: file times come from a coarser clock than `now`.
    let started = SystemTime::now() - Duration::from_secs(1);
    let status = bench.status().context("could not start cargo run")?;
    // A bench that failed part way still writes the figures it measured.
    let written = std::fs::metadata(&out)
        .and_then(|m| m.modified())
        .is_ok_and(|modified| modified >= started);
    if !written {
        if !status.success() {
            bail!("the bench failed ({status}) and wrote no report");
        }
        bail!("the bench succeeded but did not write {}", out.display());
    }
    let figures = report::load(&out)?;
    let dir = out.parent().expect("target/bench");
    let outputs = docs::write_bench_outputs(dir, &figures);
    match &outputs {
        Ok(paths) => {
            let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            println!("bench: wrote {} and {}", out.display(), paths.join(" and "));
        }
        Err(e) => eprintln!("bench: {e:#}"),
    }
    if let Some((path, old)) = old {
        println!("bench: {} against {}", out.display(), path.display());
        print!("{}", compare::render(&compare::compare(&old, &figures)));
    }
    if !status.success() {
        bail!(
            "the bench failed ({status}); the figures it measured are in {}",
            out.display()
        );
    }
    outputs.map(drop)
}
