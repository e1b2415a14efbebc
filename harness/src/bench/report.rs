//! The bench's figures as data: one row per figure with portshard's value, the kernel's,
//! the ideal and the target; the summaries they are made of (median and spread of rounds);
//! the printed table and the JSON report. Pure, no syscalls.
use std::{collections::BTreeMap, fmt};

use serde::{Serialize, Serializer};

/// What a figure must reach, judged on portshard's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// At most this.
    AtMost(f64),
    /// At least this.
    AtLeast(f64),
    /// Strictly below this.
    Below(f64),
    /// Within `tolerance` (absolute) of `center`.
    Near {
        /// The value aimed at.
        center: f64,
        /// The largest distance allowed.
        tolerance: f64,
    },
}

impl Target {
    /// Whether `value` meets the target.
    pub fn met_by(self, value: f64) -> bool {
        match self {
            Self::AtMost(limit) => value <= limit,
            Self::AtLeast(limit) => value >= limit,
            Self::Below(limit) => value < limit,
            Self::Near { center, tolerance } => (value - center).abs() <= tolerance,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::AtMost(limit) => write!(f, "<= {}", number(limit)),
            Self::AtLeast(limit) => write!(f, ">= {}", number(limit)),
            Self::Below(limit) => write!(f, "< {}", number(limit)),
            Self::Near { center, tolerance } => {
                write!(f, "{} +- {}", number(center), number(tolerance))
            }
        }
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The median of a set of measurements and their range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The median (the mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub count: usize,
}

impl Summary {
    /// The summary of `values`; `None` when there are none (or one is NaN).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            count: sorted.len(),
        })
    }
}

/// Resamples [`median_interval`] draws: enough that the interval's ends move by less than
/// the rounds' own spread from one run to the next.
pub const RESAMPLES: usize = 4000;

/// The 95% interval of the median of `values` by the percentile bootstrap: the median of
/// [`RESAMPLES`] resamples (with replacement, from a fixed seed, so one report gives one
/// interval), cut at its 2.5th and 97.5th percentiles. How far the median of so few rounds
/// can be trusted: a target met by the median but not by the whole interval is met by luck
/// as much as by speed. `None` for fewer than two values (or a NaN).
pub fn median_interval(values: &[f64]) -> Option<[f64; 2]> {
    if values.len() < 2 || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut rng = fastrand::Rng::with_seed(0x5eed_b007);
    let mut resample = vec![0.0; values.len()];
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            for slot in &mut resample {
                *slot = values[rng.usize(..values.len())];
            }
            Summary::of(&resample).map_or(f64::NAN, |s| s.median)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    let at = |q: f64| medians[((medians.len() - 1) as f64 * q).round() as usize];
    Some([at(0.025), at(0.975)])
}

/// `numerators[i] / denominators[i]` for each pair of rounds (as many as the shorter has).
pub fn paired_ratios(numerators: &[f64], denominators: &[f64]) -> Vec<f64> {
    numerators
        .iter()
        .zip(denominators)
        .map(|(n, d)| n / d)
        .collect()
}

/// One figure of the report: a row of the table and an object of `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What is measured, e.g. `survivor_moved_n16_middle`.
    pub name: String,
    /// portshard's value.
    pub portshard: f64,
    /// Plain `SO_REUSEPORT`'s value, where the kernel has the figure.
    pub kernel: Option<f64>,
    /// The best value possible.
    pub ideal: f64,
    /// Unit of the three values.
    pub unit: &'static str,
    /// The range of the rounds portshard's value is the median of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<[f64; 2]>,
    /// The 95% interval of the median (a ratio's, of its paired rounds); see
    /// [`median_interval`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval95: Option<[f64; 2]>,
    /// How many flows, connections, rounds or samples the value is made of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// What portshard's value must reach.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// Whether it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meets_target: Option<bool>,
    /// Further values that explain this one (e.g. the kernel's spread, the exact table share).
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

impl Figure {
    /// A figure with portshard's `value` and nothing else yet.
    pub fn new(name: impl Into<String>, unit: &'static str, ideal: f64, value: f64) -> Self {
        Self {
            name: name.into(),
            portshard: value,
            kernel: None,
            ideal,
            unit,
            spread: None,
            interval95: None,
            n: None,
            target: None,
            meets_target: None,
            extra: BTreeMap::new(),
        }
    }

    /// A figure whose value is the median of `summary`, with its spread and count.
    pub fn summarized(
        name: impl Into<String>,
        unit: &'static str,
        ideal: f64,
        summary: Summary,
    ) -> Self {
        let mut figure = Self::new(name, unit, ideal, summary.median);
        figure.spread = Some([summary.min, summary.max]);
        figure.n = Some(summary.count as u64);
        figure
    }

    /// A ratio figure: the median of the paired rounds' ratios `values`, with its spread,
    /// count and 95% interval; `None` when no round was measured.
    pub fn ratio(name: impl Into<String>, ideal: f64, values: &[f64]) -> Option<Self> {
        let mut figure = Self::summarized(name, "ratio", ideal, Summary::of(values)?);
        figure.interval95 = median_interval(values);
        Some(figure)
    }

    /// Sets the kernel's value.
    pub fn kernel(mut self, value: f64) -> Self {
        self.kernel = Some(value);
        self
    }

    /// Sets how many samples the value is made of.
    pub fn n(mut self, n: usize) -> Self {
        self.n = Some(n as u64);
        self
    }

    /// Sets the target and judges portshard's value against it.
    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self.meets_target = Some(target.met_by(self.portshard));
        self
    }

    /// Adds an explanatory value under `key`.
    pub fn extra(mut self, key: &str, value: f64) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }
}

/// `value` with as many decimals as its size deserves.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || (value.fract() == 0.0 && magnitude < 1e15) {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

/// The figures as a table for people: name, portshard (with the 95% interval of its median
/// in brackets where it has one, and its rounds' range in parentheses), kernel, ideal,
/// unit, target and whether it is met.
pub fn render(figures: &[Figure]) -> String {
    let header = [
        "figure",
        "portshard",
        "kernel",
        "ideal",
        "unit",
        "target",
        "met",
    ];
    let rows: Vec<[String; 7]> = figures
        .iter()
        .map(|f| {
            let mut portshard = number(f.portshard);
            if let Some([low, high]) = f.interval95 {
                portshard += &format!(" [{}, {}]", number(low), number(high));
            }
            if let Some([low, high]) = f.spread {
                portshard += &format!(" ({}..{})", number(low), number(high));
            }
            [
                f.name.clone(),
                portshard,
                f.kernel.map_or_else(|| "-".to_owned(), number),
                number(f.ideal),
                f.unit.to_owned(),
                f.target.map_or_else(|| "-".to_owned(), |t| t.to_string()),
                match f.meets_target {
                    Some(true) => "yes".to_owned(),
                    Some(false) => "NO".to_owned(),
                    None => "-".to_owned(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(&header.map(str::to_owned));
    for row in &rows {
        out += &line(row);
    }
    out
}

/// Figures that have a target and miss it, by name.
pub fn missed(figures: &[Figure]) -> Vec<&str> {
    figures
        .iter()
        .filter(|f| f.meets_target == Some(false))
        .map(|f| f.name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        let odd = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            (odd.median, odd.min, odd.max, odd.count),
            (2.0, 1.0, 3.0, 3)
        );
        let even = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn the_interval_holds_the_median_and_narrows_with_rounds() {
        let few = [0.94, 0.97, 0.99, 0.95, 1.01];
        let [low, high] = median_interval(&few).unwrap();
        let median = Summary::of(&few).unwrap().median;
        assert!(low <= median && median <= high, "{low} {median} {high}");
        assert!(low >= 0.94 && high <= 1.01);
        assert_eq!(
            median_interval(&few),
            Some([low, high]),
            "seeded: reproducible"
        );
        let many: Vec<f64> = (0..101).map(|i| 0.9 + f64::from(i) * 0.002).collect();
        let [l, h] = median_interval(&many).unwrap();
        assert!(
            h - l < high - low,
            "101 rounds: {l}..{h}, 5 rounds: {low}..{high}"
        );
        assert_eq!(median_interval(&[1.0]), None);
        assert_eq!(median_interval(&[1.0, f64::NAN]), None);
        let constant = median_interval(&[2.0; 7]).unwrap();
        assert_eq!(constant, [2.0, 2.0]);
    }

    #[test]
    fn ratio_figures_carry_their_interval() {
        let figure = Figure::ratio("udp_overhead", 1.0, &[0.96, 0.98, 0.97]).unwrap();
        assert_eq!(figure.portshard, 0.97);
        let json = serde_json::to_value(&figure).unwrap();
        assert!(json["interval95"].as_array().is_some_and(|a| a.len() == 2));
        assert!(render(&[figure]).contains("0.970 ["));
        assert!(Figure::ratio("x", 1.0, &[]).is_none());
    }

    #[test]
    fn ratios_pair_rounds() {
        assert_eq!(paired_ratios(&[2.0, 3.0, 9.0], &[4.0, 3.0]), vec![0.5, 1.0]);
    }

    #[test]
    fn targets_judge_portshard() {
        assert!(Target::AtMost(0.0).met_by(0.0));
        assert!(!Target::AtMost(1.25).met_by(1.26));
        assert!(Target::AtLeast(0.97).met_by(0.97));
        assert!(!Target::Below(1000.0).met_by(1000.0));
        let near = Target::Near {
            center: 0.2,
            tolerance: 0.01,
        };
        assert!(near.met_by(0.209) && near.met_by(0.191) && !near.met_by(0.22));
        assert_eq!(near.to_string(), "0.200 +- 0.010");
        assert_eq!(Target::Below(1000.0).to_string(), "< 1000");
    }

    #[test]
    fn figures_serialize_with_the_stable_keys() {
        let figure = Figure::summarized(
            "udp_overhead",
            "ratio",
            1.0,
            Summary::of(&[0.99, 1.0, 1.01]).unwrap(),
        )
        .target(Target::AtLeast(0.97))
        .extra("kernel_rate", 5.0);
        let json = serde_json::to_value(&figure).unwrap();
        for key in ["name", "portshard", "kernel", "ideal", "unit"] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["kernel"], serde_json::Value::Null);
        assert_eq!(json["spread"], serde_json::json!([0.99, 1.01]));
        assert_eq!(json["target"], ">= 0.970");
        assert_eq!(json["meets_target"], true);
        assert_eq!(json["kernel_rate"], 5.0);
        let plain = serde_json::to_value(Figure::new("x", "us", 0.0, 1.0)).unwrap();
        assert!(plain.get("target").is_none() && plain.get("spread").is_none());
    }

    #[test]
    fn the_table_has_every_column_and_flags_misses() {
        let figures = [
            Figure::new("survivor_moved_n4_first", "fraction", 0.0, 0.0)
                .kernel(0.667)
                .target(Target::AtMost(0.0)),
            Figure::new("prog_ratio", "ratio", 1.0, 1.4).target(Target::AtMost(1.25)),
            Figure::new("balance_flows_n16", "ratio", 1.0, 1.021),
        ];
        let table = render(&figures);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("figure") && lines[0].ends_with("met"));
        assert!(lines[1].contains("0.667") && lines[1].ends_with("yes"));
        assert!(lines[2].ends_with("NO"));
        assert!(lines[3].ends_with('-'));
        assert_eq!(missed(&figures), vec!["prog_ratio"]);
    }

    #[test]
    fn numbers_keep_meaningful_digits() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(0.1234), "0.123");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(145.6), "146");
        assert_eq!(number(64.0), "64");
    }
}
