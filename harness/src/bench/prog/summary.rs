//! The program figures of the measured rounds: each path's mean run time, and its ratio
//! over the one-lookup reference of the same temperature, round by round.
use super::{MAX_RATIO, MAX_RATIO_HOT};
use crate::{
    bench::{
        BenchError, Result,
        report::{Figure, Summary, Target, paired_ratios},
    },
    scenario::MeasureError,
};

/// One subject's rounds.
pub struct Measured {
    /// The subject's name, after `prog_ns_`.
    pub name: &'static str,
    /// Runs per round.
    pub runs: usize,
    /// Distinct flows per round.
    pub flows: usize,
    /// Whether its flows' state came from memory rather than cache.
    pub cold: bool,
    /// Mean ns per run, round by round.
    pub ns: Vec<f64>,
}

/// The figures of the measured rounds; each path's ideal is the one-lookup reference of
/// the same temperature (the no-op reference's, its own).
pub fn summarize(measured: &[Measured]) -> Result<Vec<Figure>> {
    let none = || BenchError::from(MeasureError::Traffic("no program round measured".into()));
    let values = |name: &str| {
        measured
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.ns.as_slice())
            .ok_or_else(none)
    };
    let median = |name: &str| {
        Summary::of(values(name)?)
            .map(|s| s.median)
            .ok_or_else(none)
    };
    let mut figures = Vec::new();
    for m in measured {
        let summary = Summary::of(&m.ns).ok_or_else(none)?;
        let ideal = match (m.name.starts_with("ref_pass"), m.cold) {
            (true, _) => summary.median,
            (false, true) => median("ref_select_cold")?,
            (false, false) => median("ref_select")?,
        };
        figures.push(
            Figure::summarized(format!("prog_ns_{}", m.name), "ns", ideal, summary)
                .n(m.flows)
                .extra("runs_per_round", m.runs as f64)
                .extra("cold", f64::from(u8::from(m.cold))),
        );
    }
    let ratio = |name: &str, path: &str, reference: &str| -> Result<Figure> {
        Figure::ratio(name, 1.0, &paired_ratios(values(path)?, values(reference)?)).ok_or_else(none)
    };
    figures.push(
        ratio("prog_ratio", "select_cold", "ref_select_cold")?.target(Target::AtMost(MAX_RATIO)),
    );
    figures.push(
        ratio("prog_ratio_hot", "select", "ref_select")?.target(Target::AtMost(MAX_RATIO_HOT)),
    );
    figures.push(ratio(
        "prog_ratio_probes",
        "select_probes_cold",
        "ref_select_cold",
    )?);
    figures.push(ratio("prog_ratio_heir", "heir_cold", "ref_select_cold")?);
    figures.push(ratio(
        "prog_ratio_table_size",
        "ref_select_table_cold",
        "ref_select_cold",
    )?);
    figures.push(ratio(
        "prog_ratio_vs_table_size",
        "select_cold",
        "ref_select_table_cold",
    )?);
    figures.push(ratio(
        "prog_ratio_flow_table",
        "flow_table_cold",
        "ref_select_cold",
    )?);
    figures.push(ratio("prog_ratio_quic", "quic_cold", "ref_select_cold")?);
    figures.push(ratio(
        "prog_ratio_quic_vs_select",
        "quic_cold",
        "select_cold",
    )?);
    figures.push(ratio("prog_ratio_quic_aes", "quic_aes_cold", "quic_cold")?);
    Ok(figures)
}
