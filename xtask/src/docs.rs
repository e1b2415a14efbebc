//! `cargo xtask docs`: the measured figures in the docs, generated from a committed report,
//! never pasted. It copies the bench's `target/bench/report.json` to `docs/bench/report.json`
//! and regenerates from that: the table of every figure between the markers of
//! `docs/measurements.md`, and the README's picture `docs/moves.svg`. `--check` regenerates
//! in memory and fails where the files differ, so a hand edit is caught (CI runs it).
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{plot, report};

const BEGIN: &str = "<!-- BEGIN generated: cargo xtask docs -->";
const END: &str = "<!-- END generated -->";

/// Where the bench writes its report.
pub const BENCH_REPORT: &str = "target/bench/report.json";
/// The committed report the docs are generated from.
pub const COMMITTED_REPORT: &str = "docs/bench/report.json";
/// The doc whose marked block holds the table.
const MEASUREMENTS: &str = "docs/measurements.md";
/// The README's picture.
const PICTURE: &str = "docs/moves.svg";

/// What the docs' generated files hold for one report.
#[derive(Debug)]
struct Rendered {
    /// `docs/measurements.md` with its marked block regenerated.
    measurements: String,
    /// `docs/moves.svg`.
    picture: String,
}

/// The generated files for `figures`, given the current text of `docs/measurements.md`.
fn render(figures: &[Value], measurements: &str) -> Result<Rendered> {
    Ok(Rendered {
        measurements: replace_generated(measurements, &table(figures))
            .with_context(|| format!("in {MEASUREMENTS}"))?,
        picture: plot::moves_svg(figures)?,
    })
}

/// Copies the bench's report into the docs (if there is one) and regenerates the docs from
/// the committed report.
pub fn generate(root: &Path) -> Result<()> {
    let fresh = root.join(BENCH_REPORT);
    let committed = root.join(COMMITTED_REPORT);
    if fresh.exists() {
        report::load(&fresh)?;
        let dir = committed.parent().expect("a path in docs/bench");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::copy(&fresh, &committed)
            .with_context(|| format!("copying {} to {}", fresh.display(), committed.display()))?;
        println!("docs: copied {BENCH_REPORT} to {COMMITTED_REPORT}");
    } else {
        println!(
            "docs: no {BENCH_REPORT} (`cargo xtask bench` writes it); regenerating from {COMMITTED_REPORT}"
        );
    }
    let figures = report::load(&committed)?;
    let (measurements, picture) = (root.join(MEASUREMENTS), root.join(PICTURE));
    let doc = read(&measurements)?;
    let rendered = render(&figures, &doc)?;
    for (path, text) in [
        (&measurements, &rendered.measurements),
        (&picture, &rendered.picture),
    ] {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "docs: {} figures from {COMMITTED_REPORT} into {MEASUREMENTS} and {PICTURE}",
        figures.len()
    );
    Ok(())
}

/// Regenerates the docs in memory from the committed report and fails, naming each file,
/// where the committed files differ.
pub fn check(root: &Path) -> Result<()> {
    let figures = report::load(&root.join(COMMITTED_REPORT))?;
    let measurements = root.join(MEASUREMENTS);
    let rendered = render(&figures, &read(&measurements)?)?;
    let mut stale = Vec::new();
    for (path, what, expected) in [
        (MEASUREMENTS, "the generated block", &rendered.measurements),
        (PICTURE, "the picture", &rendered.picture),
    ] {
        let actual = std::fs::read_to_string(root.join(path)).ok();
        if let Some(problem) = difference(expected, actual.as_deref()) {
            stale.push(format!("  {path}: {what} {problem}"));
        }
    }
    if !stale.is_empty() {
        bail!(
            "docs --check: the docs do not match {COMMITTED_REPORT}:\n{}\nrun `cargo xtask docs` after `cargo xtask bench` (or `cargo xtask docs` alone to regenerate from the committed report), and commit the result",
            stale.join("\n")
        );
    }
    println!("docs --check: {MEASUREMENTS} and {PICTURE} match {COMMITTED_REPORT}");
    Ok(())
}

/// Writes the bench's own table and picture next to its report: `report.md` and `moves.svg`
/// in `dir`. Returns the paths written.
pub fn write_bench_outputs(dir: &Path, figures: &[Value]) -> Result<Vec<PathBuf>> {
    let markdown = dir.join("report.md");
    std::fs::write(&markdown, bench_markdown(figures))
        .with_context(|| format!("writing {}", markdown.display()))?;
    let picture = dir.join("moves.svg");
    std::fs::write(&picture, plot::moves_svg(figures)?)
        .with_context(|| format!("writing {}", picture.display()))?;
    Ok(vec![markdown, picture])
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Why `actual` is not `expected`: missing, or the first line that differs.
fn difference(expected: &str, actual: Option<&str>) -> Option<String> {
    let actual = match actual {
        None => return Some("is missing".to_owned()),
        Some(actual) if actual == expected => return None,
        Some(actual) => actual,
    };
    let mut lines = expected.lines().zip(actual.lines());
    let line = lines
        .position(|(e, a)| e != a)
        .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
    Some(format!("differs, first at line {}", line + 1))
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

/// `target/bench/report.md`: the table, under a heading that says where it came from.
fn bench_markdown(figures: &[Value]) -> String {
    format!(
        "# Bench report\n\nFrom `{BENCH_REPORT}`; `cargo xtask docs` puts it into the docs.\n\n{}",
        table(figures)
    )
}

/// `lo–hi` for a pair under `key`, `—` without one.
fn range(figure: &Value, key: &str) -> String {
    report::pair(figure, key).map_or_else(
        || "—".to_owned(),
        |(lo, hi)| format!("{}–{}", report::number(Some(lo)), report::number(Some(hi))),
    )
}

/// The Markdown table of every figure.
fn table(figures: &[Value]) -> String {
    let mut out = String::from(
        "| figure | portshard | 95% interval | rounds' range | kernel | ideal | unit | n | target | met |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for figure in figures {
        let met = match figure.get("meets_target").and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let text = |key| figure.get(key).and_then(Value::as_str);
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {met} |",
            report::name(figure).unwrap_or("?"),
            report::number(report::value(figure, "portshard")),
            range(figure, "interval95"),
            range(figure, "spread"),
            report::number(report::value(figure, "kernel")),
            report::number(report::value(figure, "ideal")),
            text("unit").unwrap_or(""),
            report::number(report::value(figure, "n")),
            text("target").unwrap_or("—"),
        );
    }
    out
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
        let reversed = format!("{END}\n{BEGIN}\n");
        assert!(replace_generated(&reversed, "x").is_err());
    }

    #[test]
    fn figures_become_rows_with_their_interval_when_they_have_one() {
        let figures = report::parse(
            r#"[{"name":"survivor_moved_n4_first","portshard":0.0,"kernel":0.66,"ideal":0.0,"unit":"share","spread":[0.0,0.0],"n":4096,"meets_target":true},
                {"name":"udp_overhead","portshard":0.955,"kernel":null,"ideal":1.0,"unit":"ratio","spread":[0.93,0.99],"interval95":[0.94,0.97],"n":11,"target":">= 0.970","meets_target":false}]"#,
        )
        .unwrap();
        let table = table(&figures);
        assert!(table.contains(
            "| `survivor_moved_n4_first` | 0 | — | 0–0 | 0.6600 | 0 | share | 4096 | — | yes |"
        ));
        assert!(table.contains(
            "| `udp_overhead` | 0.9550 | 0.9400–0.9700 | 0.9300–0.9900 | — | 1 | ratio | 11 | >= 0.970 | **no** |"
        ));
        assert!(bench_markdown(&figures).ends_with(&table));
    }

    #[test]
    fn rendering_keeps_the_hand_written_text_and_draws_the_picture() {
        let figures = report::parse(
            r#"[{"name":"add_moved_n4","portshard":0.2,"kernel":0.5,"ideal":0.2,"unit":"fraction"}]"#,
        )
        .unwrap();
        let doc = format!("# Title\n{BEGIN}\nstale\n{END}\nend\n");
        let rendered = render(&figures, &doc).unwrap();
        assert!(rendered.measurements.starts_with("# Title\n"));
        assert!(rendered.measurements.contains("`add_moved_n4`"));
        assert!(!rendered.measurements.contains("stale"));
        assert!(rendered.measurements.ends_with(&format!("{END}\nend\n")));
        assert!(rendered.picture.contains("<svg"));
    }

    #[test]
    fn differences_name_the_first_line() {
        assert_eq!(difference("a\nb\n", Some("a\nb\n")), None);
        assert_eq!(difference("a\nb\n", None).unwrap(), "is missing");
        assert_eq!(
            difference("a\nb\nc\n", Some("a\nB\nc\n")).unwrap(),
            "differs, first at line 2"
        );
        assert_eq!(
            difference("a\nb\n", Some("a\nb\nextra\n")).unwrap(),
            "differs, first at line 3"
        );
    }
}
