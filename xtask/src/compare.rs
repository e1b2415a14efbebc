//! `cargo xtask compare OLD.json NEW.json` and `cargo xtask bench --compare OLD.json`: each
//! figure's portshard value in two bench reports, the change, and the figures whose target
//! status flipped or that only one report has. Pure: reports in, text out.
use std::fmt::Write as _;

use serde_json::Value;

use crate::report;

/// How a figure fared from the old report to the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// In both, and its target status (if any) did not flip.
    Same,
    /// Met its target before, misses it now.
    Regressed,
    /// Missed its target before, meets it now.
    Fixed,
    /// Its target is not the one it had (a flip means nothing then): see the row's targets.
    TargetChanged,
    /// Only in the new report.
    OnlyNew,
    /// Only in the old report.
    OnlyOld,
}

/// One figure of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The figure's name.
    pub name: String,
    /// Its portshard value in the old report, if it had one.
    pub old: Option<f64>,
    /// Its portshard value in the new report, if it has one.
    pub new: Option<f64>,
    /// Its unit (the new report's, else the old's).
    pub unit: String,
    /// Its target in the old report and in the new one, where it had one.
    pub targets: [Option<String>; 2],
    /// How it fared.
    pub status: Status,
}

impl Row {
    /// `new - old`, where both are there.
    pub fn change(&self) -> Option<f64> {
        Some(self.new? - self.old?)
    }

    /// The change as a percentage of the old value, where that is not zero (a change from 0
    /// to 0 is 0 %).
    pub fn percent(&self) -> Option<f64> {
        let (old, change) = (self.old?, self.change()?);
        if old != 0.0 {
            Some(100.0 * change / old.abs())
        } else if change == 0.0 {
            Some(0.0)
        } else {
            None
        }
    }
}

fn met(figure: &Value) -> Option<bool> {
    figure.get("meets_target")?.as_bool()
}

fn target(figure: &Value) -> Option<String> {
    Some(figure.get("target")?.as_str()?.to_owned())
}

/// Every figure of `new` in its order, then those only `old` has, in theirs.
pub fn compare(old: &[Value], new: &[Value]) -> Vec<Row> {
    let find = |figures: &'_ [Value], name: &str| -> Option<Value> {
        figures
            .iter()
            .find(|f| report::name(f) == Some(name))
            .cloned()
    };
    let unit = |f: &Value| {
        f.get("unit")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let mut rows: Vec<Row> = new
        .iter()
        .filter_map(|figure| {
            let name = report::name(figure)?;
            let before = find(old, name);
            let targets = [before.as_ref().and_then(target), target(figure)];
            let status = match &before {
                None => Status::OnlyNew,
                Some(_) if targets[0].is_some() && targets[0] != targets[1] => {
                    Status::TargetChanged
                }
                Some(before) => match (met(before), met(figure)) {
                    (Some(true), Some(false)) => Status::Regressed,
                    (Some(false), Some(true)) => Status::Fixed,
                    _ => Status::Same,
                },
            };
            Some(Row {
                name: name.to_owned(),
                old: before.and_then(|b| report::value(&b, "portshard")),
                new: report::value(figure, "portshard"),
                unit: unit(figure),
                targets,
                status,
            })
        })
        .collect();
    rows.extend(old.iter().filter_map(|figure| {
        let name = report::name(figure)?;
        find(new, name).is_none().then(|| Row {
            name: name.to_owned(),
            old: report::value(figure, "portshard"),
            new: None,
            unit: unit(figure),
            targets: [target(figure), None],
            status: Status::OnlyOld,
        })
    }));
    rows
}

/// The comparison as an aligned text table, with a closing line of counts.
pub fn render(rows: &[Row]) -> String {
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|row| {
            let signed = |v: Option<f64>| match v {
                Some(v) if v >= 0.0 => format!("+{}", report::number(Some(v))),
                v => report::number(v),
            };
            let status = match row.status {
                Status::Same => String::new(),
                Status::Regressed => "REGRESSED (target met -> missed)".to_owned(),
                Status::Fixed => "fixed (target missed -> met)".to_owned(),
                Status::TargetChanged => format!(
                    "target changed: {} -> {}",
                    row.targets[0].as_deref().unwrap_or("none"),
                    row.targets[1].as_deref().unwrap_or("none")
                ),
                Status::OnlyNew => "only in the new report".to_owned(),
                Status::OnlyOld => "only in the old report".to_owned(),
            };
            [
                row.name.clone(),
                report::number(row.old),
                report::number(row.new),
                signed(row.change()),
                row.percent()
                    .map_or_else(|| "—".to_owned(), |p| format!("{p:+.1}%")),
                row.unit.clone(),
                status,
            ]
        })
        .collect();
    let header = ["figure", "old", "new", "change", "change %", "unit", ""].map(str::to_owned);
    let mut widths = [0; 7];
    for line in std::iter::once(&header).chain(&cells) {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&cells) {
        let mut text = String::new();
        for (i, (cell, &width)) in line.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(width - cell.chars().count());
            match i {
                0 | 5 | 6 => text.push_str(&format!("{cell}{pad}  ")),
                _ => text.push_str(&format!("{pad}{cell}  ")),
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    }
    let count = |status| rows.iter().filter(|r| r.status == status).count();
    let _ = writeln!(
        out,
        "compare: {} figures; {} regressed, {} fixed, {} with another target, {} only in the new report, {} only in the old",
        rows.len(),
        count(Status::Regressed),
        count(Status::Fixed),
        count(Status::TargetChanged),
        count(Status::OnlyNew),
        count(Status::OnlyOld),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(json: &str) -> Vec<Value> {
        report::parse(json).unwrap()
    }

    fn sample() -> Vec<Row> {
        let old = figures(
            r#"[{"name":"udp_overhead","portshard":0.95,"unit":"ratio","meets_target":false},
                {"name":"tcp_overhead","portshard":0.98,"unit":"ratio","meets_target":true},
                {"name":"survivor_moved_n4_first","portshard":0.0,"unit":"fraction","meets_target":true},
                {"name":"gone","portshard":3.0,"unit":"us"}]"#,
        );
        let new = figures(
            r#"[{"name":"udp_overhead","portshard":0.98,"unit":"ratio","meets_target":true},
                {"name":"tcp_overhead","portshard":0.96,"unit":"ratio","meets_target":false},
                {"name":"survivor_moved_n4_first","portshard":0.0,"unit":"fraction","meets_target":true},
                {"name":"added","portshard":1.0,"unit":"us"}]"#,
        );
        compare(&old, &new)
    }

    #[test]
    fn flips_and_one_sided_figures_are_flagged() {
        let rows = sample();
        let status: Vec<(&str, Status)> =
            rows.iter().map(|r| (r.name.as_str(), r.status)).collect();
        assert_eq!(
            status,
            [
                ("udp_overhead", Status::Fixed),
                ("tcp_overhead", Status::Regressed),
                ("survivor_moved_n4_first", Status::Same),
                ("added", Status::OnlyNew),
                ("gone", Status::OnlyOld),
            ]
        );
        assert_eq!((rows[3].old, rows[3].new), (None, Some(1.0)));
        assert_eq!((rows[4].old, rows[4].new), (Some(3.0), None));
    }

    #[test]
    fn a_new_target_is_named_not_called_a_regression() {
        let rows = compare(
            &figures(
                r#"[{"name":"rebuild_us_add","portshard":480.0,"unit":"us","target":"< 1000","meets_target":true}]"#,
            ),
            &figures(
                r#"[{"name":"rebuild_us_add","portshard":150.0,"unit":"us","target":"<= 100","meets_target":false}]"#,
            ),
        );
        assert_eq!(rows[0].status, Status::TargetChanged);
        let text = render(&rows);
        assert!(text.contains("target changed: < 1000 -> <= 100"), "{text}");
        assert!(text.contains("0 regressed") && text.contains("1 with another target"));
    }

    #[test]
    fn changes_are_absolute_and_relative() {
        let rows = sample();
        assert!((rows[0].change().unwrap() - 0.03).abs() < 1e-12);
        assert!((rows[1].percent().unwrap() + 100.0 * 0.02 / 0.98).abs() < 1e-9);
        assert_eq!(rows[2].percent(), Some(0.0));
        assert_eq!(rows[3].change(), None);
        let from_zero = Row {
            name: "x".into(),
            old: Some(0.0),
            new: Some(1.0),
            unit: String::new(),
            targets: [None, None],
            status: Status::Same,
        };
        assert_eq!((from_zero.change(), from_zero.percent()), (Some(1.0), None));
    }

    #[test]
    fn the_text_has_a_line_per_figure_and_a_count() {
        let text = render(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        assert!(lines[1].starts_with("udp_overhead "));
        assert!(lines[1].contains("+0.0300") && lines[1].contains("+3.2%"));
        assert!(lines[1].ends_with("fixed (target missed -> met)"));
        assert!(lines[2].contains("-0.0200") && lines[2].contains("REGRESSED"));
        assert!(lines[4].contains("only in the new report"));
        assert_eq!(
            lines[6],
            "compare: 5 figures; 1 regressed, 1 fixed, 0 with another target, 1 only in the new report, 1 only in the old"
        );
    }
}
