//! The bench's report (`target/bench/report.json`, committed as `docs/bench/report.json`): a
//! JSON list of figures, each `{"name", "portshard", "kernel", "ideal", "unit", ...}`, read
//! as JSON values so a key the bench adds never breaks the commands that read it.
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Reads the figures of the report at `path`.
pub fn load(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("{} is not a bench report", path.display()))
}

/// The figures of a report's text: a JSON list, or an object whose `figures` is one.
pub fn parse(text: &str) -> Result<Vec<Value>> {
    let report: Value = serde_json::from_str(text).context("invalid JSON")?;
    let figures = report
        .as_array()
        .or_else(|| report.get("figures")?.as_array())
        .context("no list of figures")?;
    if let Some(bad) = figures.iter().position(|f| name(f).is_none()) {
        bail!("figure {bad} has no name");
    }
    Ok(figures.clone())
}

/// A figure's name (every figure of a parsed report has one).
pub fn name(figure: &Value) -> Option<&str> {
    figure.get("name")?.as_str()
}

/// The number under `key` of a figure, if it has one.
pub fn value(figure: &Value, key: &str) -> Option<f64> {
    figure.get(key)?.as_f64()
}

/// A `[lo, hi]` pair under `key` (`spread`, `interval95`), if the figure has one.
pub fn pair(figure: &Value, key: &str) -> Option<(f64, f64)> {
    match figure.get(key)?.as_array()?.as_slice() {
        [lo, hi] => Some((lo.as_f64()?, hi.as_f64()?)),
        _ => None,
    }
}

/// A figure's number as the docs and the comparison print it: whole numbers bare, large ones
/// to 0.1, the rest to 4 decimals; `—` for none.
pub fn number(value: Option<f64>) -> String {
    match value {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e12 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.4}"),
        None => "—".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_list_or_an_object_of_figures() {
        let list = parse(r#"[{"name":"a","portshard":1.5,"interval95":[1.0,2.0]}]"#).unwrap();
        assert_eq!(name(&list[0]), Some("a"));
        assert_eq!(value(&list[0], "portshard"), Some(1.5));
        assert_eq!(pair(&list[0], "interval95"), Some((1.0, 2.0)));
        assert_eq!(pair(&list[0], "spread"), None);
        let object = parse(r#"{"figures":[{"name":"b"}]}"#).unwrap();
        assert_eq!(name(&object[0]), Some("b"));
    }

    #[test]
    fn refuses_what_is_not_a_report() {
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"x":1}"#).is_err());
        let unnamed = parse(r#"[{"name":"a"},{"portshard":1}]"#).unwrap_err();
        assert!(format!("{unnamed:#}").contains("figure 1 has no name"));
    }

    #[test]
    fn numbers_print_by_size() {
        assert_eq!(number(Some(0.0)), "0");
        assert_eq!(number(Some(499.704)), "499.7");
        assert_eq!(number(Some(0.95492)), "0.9549");
        assert_eq!(number(None), "—");
    }
}
