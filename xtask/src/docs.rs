//! `cargo xtask docs`: the measured figures in the docs, generated from the bench's
//! `target/bench/report.json`, never pasted: the table of every figure between the markers
//! of `docs/measurements.md`, and the README's picture (`docs/surviving-flows.svg`: the
//! share of surviving flows that moved when one listener closed, the kernel's and
//! portshard's side by side).
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

const BEGIN: &str = "<!-- BEGIN generated: cargo xtask docs -->";
const END: &str = "<!-- END generated -->";

/// Regenerates the docs' figures from `root/target/bench/report.json`.
pub fn generate(root: &Path) -> Result<()> {
    let path = root.join("target/bench/report.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: run `cargo xtask bench` first, it writes the report",
            path.display()
        )
    })?;
    let report: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not the bench's JSON report", path.display()))?;
    let figures =
        figures(&report).with_context(|| format!("{} holds no list of figures", path.display()))?;
    let measurements = root.join("docs/measurements.md");
    let doc = std::fs::read_to_string(&measurements)
        .with_context(|| format!("reading {}", measurements.display()))?;
    let updated = replace_generated(&doc, &table(figures))
        .with_context(|| format!("in {}", measurements.display()))?;
    std::fs::write(&measurements, updated)
        .with_context(|| format!("writing {}", measurements.display()))?;
    let svg = root.join("docs/surviving-flows.svg");
    std::fs::write(&svg, surviving_flows_svg(figures))
        .with_context(|| format!("writing {}", svg.display()))?;
    println!(
        "docs: {} figures from {} into {} and {}",
        figures.len(),
        path.display(),
        measurements.display(),
        svg.display()
    );
    Ok(())
}

fn figures(report: &Value) -> Option<&Vec<Value>> {
    report
        .as_array()
        .or_else(|| report.get("figures")?.as_array())
}

/// `doc` with what lies between its markers replaced by `generated`.
fn replace_generated(doc: &str, generated: &str) -> Result<String> {
    let (Some(begin), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        bail!("the markers `{BEGIN}` and `{END}` are missing");
    };
    if end < begin {
        bail!("`{END}` comes before `{BEGIN}`");
    }
    Ok(format!(
        "{}{BEGIN}\n{generated}{}",
        &doc[..begin],
        &doc[end..]
    ))
}

fn number(value: Option<&Value>) -> String {
    match value.and_then(Value::as_f64) {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e12 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.4}"),
        None => "—".to_owned(),
    }
}

/// The Markdown table of every figure.
fn table(figures: &[Value]) -> String {
    let mut out = String::from(
        "| figure | portshard | rounds' range | kernel | ideal | unit | n | target | met |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for figure in figures {
        let spread = figure.get("spread").and_then(Value::as_array).map_or_else(
            || "—".to_owned(),
            |s| format!("{}–{}", number(s.first()), number(s.get(1))),
        );
        let met = match figure.get("meets_target").and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {spread} | {} | {} | {} | {} | {} | {met} |",
            figure.get("name").and_then(Value::as_str).unwrap_or("?"),
            number(figure.get("portshard")),
            number(figure.get("kernel")),
            number(figure.get("ideal")),
            figure.get("unit").and_then(Value::as_str).unwrap_or(""),
            number(figure.get("n")),
            figure.get("target").and_then(Value::as_str).unwrap_or("—"),
        );
    }
    out
}

/// A bar chart of `survivor_moved_n{N}_{first,middle,last}`: the kernel's bar and
/// portshard's for each case.
fn surviving_flows_svg(figures: &[Value]) -> String {
    let cases: Vec<(String, f64, f64)> = figures
        .iter()
        .filter_map(|f| {
            let name = f.get("name")?.as_str()?;
            let case = name.strip_prefix("survivor_moved_")?;
            Some((
                case.replace('_', " "),
                f.get("kernel")?.as_f64()?,
                f.get("portshard")?.as_f64()?,
            ))
        })
        .collect();
    let (left, top, height, group) = (60.0, 40.0, 200.0, 70.0);
    let width = left + group * cases.len() as f64 + 20.0;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="310" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="13">Surviving flows moved when one of N listeners closes (generated from target/bench/report.json)</text>
<rect x="{left}" y="26" width="10" height="10" fill="#b0b0b0"/><text x="{:.0}" y="35">plain SO_REUSEPORT</text>
<rect x="{:.0}" y="26" width="10" height="10" fill="#1f6fb4"/><text x="{:.0}" y="35">portshard</text>
"##,
        left + 14.0,
        left + 140.0,
        left + 154.0
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = top + height * (1.0 - tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.0}" y="{:.1}" text-anchor="end">{tick:.2}</text>"##,
            width - 20.0,
            left - 4.0,
            y + 4.0
        );
    }
    for (i, (case, kernel, portshard)) in cases.iter().enumerate() {
        let x = left + group * i as f64 + 10.0;
        for (offset, value, colour) in [(0.0, kernel, "#b0b0b0"), (24.0, portshard, "#1f6fb4")] {
            let bar = (height * value.clamp(0.0, 1.0)).max(1.0);
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="22" height="{bar:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{value:.3}</text>"##,
                x + offset,
                top + height - bar,
                x + offset + 11.0,
                top + height - bar - 3.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{case}</text>"##,
            x + 23.0,
            top + height + 16.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_block_replaces_only_what_is_between_the_markers() {
        let doc = format!("intro\n{BEGIN}\nold\n{END}\nafter\n");
        let new = replace_generated(&doc, "| new |\n").unwrap();
        assert_eq!(new, format!("intro\n{BEGIN}\n| new |\n{END}\nafter\n"));
        assert!(replace_generated("no markers", "x").is_err());
    }

    #[test]
    fn figures_become_rows_and_bars() {
        let report: Value = serde_json::from_str(
            r#"[{"name":"survivor_moved_n4_first","portshard":0.0,"kernel":0.66,"ideal":0.0,"unit":"share","spread":[0.0,0.0],"n":4096,"meets_target":true}]"#,
        )
        .unwrap();
        let figures = figures(&report).unwrap();
        assert!(table(figures).contains(
            "| `survivor_moved_n4_first` | 0 | 0–0 | 0.6600 | 0 | share | 4096 | — | yes |"
        ));
        let svg = surviving_flows_svg(figures);
        assert!(svg.contains("n4 first") && svg.contains("0.660"));
    }
}
