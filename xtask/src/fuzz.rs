//! `cargo xtask fuzz`: every fuzz target in turn on the stable toolchain, installing
//! cargo-fuzz first if needed.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo_command, root, setup};

/// The fuzz targets in `fuzz/fuzz_targets`, with their corpora in `fuzz/corpus/<target>`.
const FUZZ_TARGETS: [&str; 4] = ["config", "control", "table", "quic-lb"];

/// An input running longer than this counts as a hang.
const FUZZ_TIMEOUT_SECONDS: u64 = 10;

/// The rate libFuzzer's closing line (`Done 92906 runs in 31 second(s)`) gives, as
/// `N exec/s`.
fn executions_per_second(done: &str) -> String {
    let numbers: Vec<u64> = done
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    match numbers[..] {
        [runs, seconds] if seconds > 0 => format!("{} exec/s", runs / seconds),
        _ => "exec/s unknown".to_owned(),
    }
}

/// Runs each fuzz target for `seconds` on the stable toolchain (`RUSTC_BOOTSTRAP` unlocks
/// the flags cargo-fuzz passes; no sanitizer, so no nightly runtime is needed) and prints
/// how many inputs each ran.
pub fn fuzz(seconds: u64) -> Result<()> {
    setup()?;
    let has_cargo_fuzz = cargo_command(&["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_cargo_fuzz {
        println!("fuzz: installing cargo-fuzz");
        let status = cargo_command(&["install", "cargo-fuzz", "--locked"])
            .status()
            .context("could not start cargo install")?;
        if !status.success() {
            bail!(
                "installing cargo-fuzz failed ({status}); install it with `cargo install cargo-fuzz`"
            );
        }
    }
    let mut summary = Vec::new();
    for target in FUZZ_TARGETS {
        // New inputs go to a corpus under target/ that grows locally; the committed one
        // (fuzz/corpus) is only read, so a run leaves the checkout as it was.
        let grown = format!("target/fuzz-corpus/{target}");
        std::fs::create_dir_all(root().join(&grown))
            .with_context(|| format!("creating {grown}"))?;
        let committed = format!("fuzz/corpus/{target}");
        let mut child = cargo_command(&[
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "--sanitizer",
            "none",
            target,
            &grown,
            &committed,
            "--",
        ])
        .args([
            format!("-max_total_time={seconds}"),
            format!("-timeout={FUZZ_TIMEOUT_SECONDS}"),
        ])
        .env("RUSTC_BOOTSTRAP", "1")
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start cargo fuzz")?;
        // libFuzzer reports on stderr; its progress lines (`#123 NEW ...`, indented
        // details) are left out.
        let mut done = None;
        for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
            let line = line.context("reading cargo fuzz's output")?;
            if line.starts_with("Done ") {
                done = Some(line.clone());
            }
            if !line.starts_with(['#', '\t', ' ']) {
                eprintln!("{line}");
            }
        }
        let status = child.wait().context("waiting for cargo fuzz")?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}): the input is in fuzz/artifacts/{target}; fix the bug and keep the input as a regression test"
            );
        }
        let done = done.with_context(|| format!("fuzz target {target} reported no run count"))?;
        summary.push(format!(
            "fuzz {target}: {done} ({})",
            executions_per_second(&done)
        ));
    }
    for line in &summary {
        println!("{line}");
    }
    println!(
        "fuzz: {} targets, {seconds} s each, no crash or hang",
        FUZZ_TARGETS.len()
    );
    Ok(())
}
