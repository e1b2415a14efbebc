//! The picture of the README (`docs/moves.svg`, and `target/bench/moves.svg` after each bench):
//! the share of flows moved against the number of listeners N, the kernel's and portshard's,
//! when one listener closes (`survivor_moved_n{N}_{first,middle,last}`, the mean of the three
//! cases) and when one is added (`add_moved_n{N}`, with the ideal `1/(N+1)`). Drawn with
//! plotters into a string, so the same report always gives the same bytes.
use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;
use serde_json::Value;

use crate::report;

/// The picture's size in pixels.
const SIZE: (u32, u32) = (760, 440);
const KERNEL: RGBColor = RGBColor(0xc0, 0x50, 0x4d);
const PORTSHARD: RGBColor = RGBColor(0x1f, 0x6f, 0xb4);
const IDEAL: RGBColor = RGBColor(0x80, 0x80, 0x80);

/// What the report says at one N.
#[derive(Debug, Default, PartialEq)]
struct AtN {
    /// Surviving flows moved when one closes, one value per case (first, middle, last).
    survivor_kernel: Vec<f64>,
    survivor_portshard: Vec<f64>,
    /// Flows moved when one joins.
    add_kernel: Option<f64>,
    add_portshard: Option<f64>,
}

/// The figures of the picture, by N.
fn by_n(figures: &[Value]) -> BTreeMap<u32, AtN> {
    let mut at = BTreeMap::<u32, AtN>::new();
    for figure in figures {
        let Some(name) = report::name(figure) else {
            continue;
        };
        let (kernel, portshard) = (
            report::value(figure, "kernel"),
            report::value(figure, "portshard"),
        );
        if let Some(rest) = name.strip_prefix("survivor_moved_n") {
            let Some(Ok(n)) = rest.split_once('_').map(|(n, _case)| n.parse()) else {
                continue;
            };
            let entry = at.entry(n).or_default();
            entry.survivor_kernel.extend(kernel);
            entry.survivor_portshard.extend(portshard);
        } else if let Some(Ok(n)) = name.strip_prefix("add_moved_n").map(str::parse) {
            let entry = at.entry(n).or_default();
            entry.add_kernel = kernel;
            entry.add_portshard = portshard;
        }
    }
    at
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The x axis is log2 N, in thousandths: plotters puts ticks at given points only on an
/// integer axis.
const X_SCALE: f64 = 1000.0;

/// Where `n` sits on the x axis.
fn x_of(n: u32) -> i32 {
    (f64::from(n.max(1)).log2() * X_SCALE).round() as i32
}

/// The points `(x, y)` of one series.
fn series(at: &BTreeMap<u32, AtN>, y: impl Fn(&AtN) -> Option<f64>) -> Vec<(i32, f64)> {
    at.iter()
        .filter_map(|(&n, at)| Some((x_of(n), y(at)?)))
        .collect()
}

/// The SVG of the picture; an error if the report has none of its figures.
pub fn moves_svg(figures: &[Value]) -> Result<String> {
    let at = by_n(figures);
    let (Some(&low), Some(&high)) = (at.keys().next(), at.keys().next_back()) else {
        bail!("the report has no survivor_moved_n* or add_moved_n* figure to plot");
    };
    let (low, high) = (x_of(low), x_of(high));
    let ticks: Vec<i32> = at.keys().copied().map(x_of).collect();
    let plotted = [
        (
            "kernel: surviving flows moved when one closes",
            KERNEL,
            series(&at, |a| mean(&a.survivor_kernel)),
            false,
        ),
        (
            "portshard: surviving flows moved when one closes",
            PORTSHARD,
            series(&at, |a| mean(&a.survivor_portshard)),
            false,
        ),
        (
            "kernel: flows moved when one is added",
            KERNEL,
            series(&at, |a| a.add_kernel),
            true,
        ),
        (
            "portshard: flows moved when one is added",
            PORTSHARD,
            series(&at, |a| a.add_portshard),
            true,
        ),
    ];
    let adding: Vec<i32> = at
        .iter()
        .filter(|(_, a)| a.add_portshard.is_some())
        .map(|(&n, _)| x_of(n))
        .collect();
    let mut svg = String::new();
    draw(&mut svg, (low, high), ticks, &plotted, &adding)
        .map_err(|e| anyhow!("drawing the moves plot: {e}"))?;
    Ok(svg)
}

type Plotted = (&'static str, RGBColor, Vec<(i32, f64)>, bool);

fn draw(
    svg: &mut String,
    (low, high): (i32, i32),
    ticks: Vec<i32>,
    plotted: &[Plotted],
    adding: &[i32],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let margin = (high - low).max(1000) / 4;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Share of flows moved, one listener closing (mean of first, middle, last) or added",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(
            ((low - margin)..(high + margin)).with_key_points(ticks),
            0f64..1f64,
        )?;
    chart
        .configure_mesh()
        .x_desc("N (listeners before the change)")
        .y_desc("share of flows moved")
        .x_label_formatter(&|&x| format!("{:.0}", (f64::from(x) / X_SCALE).exp2()))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .max_light_lines(0)
        .bold_line_style(BLACK.mix(0.1))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (label, colour, points, added) in plotted {
        let style = colour.stroke_width(2);
        let marker = |c: (i32, f64)| -> DynElement<'static, SVGBackend, (i32, f64)> {
            if *added {
                TriangleMarker::new(c, 6, colour.filled()).into_dyn()
            } else {
                Circle::new(c, 5, colour.filled()).into_dyn()
            }
        };
        if *added {
            chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))?;
        } else {
            chart.draw_series(LineSeries::new(points.clone(), style))?;
        }
        let entry = chart
            .draw_series(points.iter().map(|&c| marker(c)))?
            .label(*label);
        let line = move || PathElement::new(vec![(0, 0), (20, 0)], colour.stroke_width(2));
        if *added {
            entry.legend(move |c| {
                EmptyElement::at(c) + line() + TriangleMarker::new((10, 0), 6, colour.filled())
            });
        } else {
            entry.legend(move |c| {
                EmptyElement::at(c) + line() + Circle::new((10, 0), 5, colour.filled())
            });
        }
    }
    if let (Some(&first), Some(&last)) = (adding.first(), adding.last()) {
        let curve = (first..last).step_by(25).chain([last]).map(|x| {
            let n = (f64::from(x) / X_SCALE).exp2();
            (x, 1.0 / (n + 1.0))
        });
        chart
            .draw_series(DashedLineSeries::new(curve, 3, 4, IDEAL.stroke_width(1)))?
            .label("ideal for adding: 1/(N+1)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], IDEAL.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Vec<Value> {
        report::parse(
            r#"[
            {"name":"survivor_moved_n4_first","portshard":0.0,"kernel":0.6},
            {"name":"survivor_moved_n4_middle","portshard":0.0,"kernel":0.3},
            {"name":"survivor_moved_n16_last","portshard":0.0,"kernel":0.5},
            {"name":"add_moved_n4","portshard":0.2,"kernel":0.5},
            {"name":"add_moved_n16","portshard":0.06,"kernel":0.49},
            {"name":"udp_overhead","portshard":0.95,"kernel":null}
        ]"#,
        )
        .unwrap()
    }

    #[test]
    fn survivors_are_averaged_over_their_cases_by_n() {
        let at = by_n(&figures());
        assert_eq!(at.keys().copied().collect::<Vec<_>>(), [4, 16]);
        let four = &at[&4];
        assert_eq!(mean(&four.survivor_kernel), Some((0.6 + 0.3) / 2.0));
        assert_eq!(four.add_portshard, Some(0.2));
        let points = series(&at, |a| mean(&a.survivor_kernel));
        assert_eq!(points, [(2000, (0.6 + 0.3) / 2.0), (4000, 0.5)]);
    }

    #[test]
    fn the_svg_is_deterministic_and_labelled() {
        let svg = moves_svg(&figures()).unwrap();
        assert_eq!(svg, moves_svg(&figures()).unwrap());
        assert!(svg.starts_with("<svg"));
        for text in [
            "kernel: surviving flows moved when one closes",
            "portshard: flows moved when one is added",
            "ideal for adding: 1/(N+1)",
            "\n16\n",
        ] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
    }

    #[test]
    fn a_report_without_moves_has_no_picture() {
        let only_overhead = report::parse(r#"[{"name":"udp_overhead","portshard":0.9}]"#).unwrap();
        assert!(moves_svg(&only_overhead).is_err());
    }
}
