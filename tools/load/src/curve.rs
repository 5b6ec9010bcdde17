//! The latency/throughput curve of a sweep as data and as a picture.
//!
//! A [`Curve`] is one target's measurements: one [`Point`] per offered rate with the delivered rate and the p50, p99
//! and p99.9 send→deliver latency. [`write`] stores curves as `sweep.json` (the same structure, readable back with
//! [`read_json`]) and `sweep.svg`: an upper panel of latency (log scale, ms) against offered msg/s with one line per
//! percentile and target, and a lower panel of delivered against offered msg/s with the "delivered = offered"
//! diagonal, so several targets (relayd, an MQTT broker) share the same axes.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One offered rate and what came of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Offered rate as a percentage of the measured saturation.
    pub offered_pct: f64,
    /// Offered rate, sends per second over all clients.
    pub offered_per_s: f64,
    /// Delivered rate, msg/s from the first send to the last delivery.
    pub delivered_per_s: f64,
    /// Messages delivered.
    pub delivered: u64,
    /// Median send→deliver latency, ms, counted from each send's scheduled time; `None` if nothing was delivered.
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile, ms.
    pub p999_ms: Option<f64>,
    /// Failed requests.
    pub errors: u64,
    /// False when the point's time bound ran out before every send was delivered.
    pub complete: bool,
}

/// One target's sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// What was measured, e.g. `relayd`.
    pub target: String,
    /// Clients (connections).
    pub clients: usize,
    /// Envelope size, bytes.
    pub size: usize,
    /// Requests in flight per client.
    pub window: usize,
    /// Seconds of sending per point.
    pub seconds_per_point: u64,
    /// Delivered msg/s of the closed-loop run that the percentages refer to.
    pub saturation_per_s: f64,
    /// The points, in the order they were run.
    pub points: Vec<Point>,
}

/// Reads one latency percentile of a point.
type Percentile = fn(&Point) -> Option<f64>;

/// The percentiles drawn, with the accessor of each.
const PERCENTILES: [(&str, Percentile); 3] = [("p50", |p| p.p50_ms), ("p99", |p| p.p99_ms), ("p99.9", |p| p.p999_ms)];

/// Writes `dir/sweep.json` and `dir/sweep.svg` for `curves`, creating `dir` if needed.
pub fn write(dir: &Path, curves: &[Curve]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = dir.join("sweep.json");
    std::fs::write(&json, serde_json::to_string_pretty(curves)? + "\n")
        .with_context(|| format!("cannot write {}", json.display()))?;
    let svg = dir.join("sweep.svg");
    std::fs::write(&svg, render(curves)?).with_context(|| format!("cannot write {}", svg.display()))?;
    Ok(())
}

/// Reads back what [`write`] stored as JSON.
pub fn read_json(path: &Path) -> Result<Vec<Curve>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a sweep", path.display()))
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the sweep: {e:?}")
}

/// Colours per percentile; targets after the first are drawn with thinner strokes.
const COLOURS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(214, 39, 40)];
const DELIVERED_COLOURS: [RGBColor; 4] =
    [RGBColor(44, 160, 44), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(23, 190, 207)];

/// The SVG text of the two panels.
pub fn render(curves: &[Curve]) -> Result<String> {
    let points = || curves.iter().flat_map(|c| c.points.iter());
    let x_max = points().map(|p| p.offered_per_s.max(p.delivered_per_s)).fold(1.0_f64, f64::max) * 1.05;
    let latencies = || points().flat_map(|p| PERCENTILES.iter().filter_map(move |(_, f)| f(p)));
    let lat_min = latencies().fold(f64::INFINITY, f64::min);
    let lat_max = latencies().fold(0.0_f64, f64::max);
    let (lat_lo, lat_hi) = if lat_min.is_finite() {
        ((lat_min / 2.0).max(0.001), (lat_max * 2.0).max(lat_min * 4.0))
    } else {
        (0.1, 10.0)
    };
    let title = match curves.first() {
        Some(c) => format!("online open loop: {} clients, {} B, window {}", c.clients, c.size, c.window),
        None => "online open loop".to_owned(),
    };

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(&title, ("sans-serif", 20)).map_err(draw_err)?;
        let (upper, lower) = root.split_vertically(400);

        let mut chart = ChartBuilder::on(&upper)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, (lat_lo..lat_hi).log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .max_light_lines(2)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .x_desc("offered msg/s")
            .y_desc("send→deliver latency, ms")
            .draw()
            .map_err(draw_err)?;
        for (ci, curve) in curves.iter().enumerate() {
            let width = if ci == 0 { 2 } else { 1 };
            for (pi, (name, value)) in PERCENTILES.iter().enumerate() {
                let colour = COLOURS[pi];
                let series: Vec<(f64, f64)> =
                    curve.points.iter().filter_map(|p| value(p).map(|v| (p.offered_per_s, v.max(lat_lo)))).collect();
                chart
                    .draw_series(LineSeries::new(series.clone(), colour.stroke_width(width)))
                    .map_err(draw_err)?
                    .label(format!("{} {name}", curve.target))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(width)));
                chart
                    .draw_series(series.into_iter().map(|xy| Circle::new(xy, 3, colour.filled())))
                    .map_err(draw_err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;

        let mut chart = ChartBuilder::on(&lower)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..x_max)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .max_light_lines(2)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc("offered msg/s")
            .y_desc("delivered msg/s")
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(LineSeries::new(vec![(0.0, 0.0), (x_max, x_max)], BLACK.mix(0.3)))
            .map_err(draw_err)?
            .label("delivered = offered")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
        for (ci, curve) in curves.iter().enumerate() {
            let colour = DELIVERED_COLOURS[ci % DELIVERED_COLOURS.len()];
            let series: Vec<(f64, f64)> = curve.points.iter().map(|p| (p.offered_per_s, p.delivered_per_s)).collect();
            chart
                .draw_series(LineSeries::new(series.clone(), colour.stroke_width(2)))
                .map_err(draw_err)?
                .label(format!("{} delivered", curve.target))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            chart.draw_series(series.into_iter().map(|xy| Circle::new(xy, 3, colour.filled()))).map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(pct: f64, offered: f64, delivered: f64, p50: f64) -> Point {
        Point {
            offered_pct: pct,
            offered_per_s: offered,
            delivered_per_s: delivered,
            delivered: delivered as u64 * 2,
            p50_ms: Some(p50),
            p99_ms: Some(p50 * 4.0),
            p999_ms: Some(p50 * 9.0),
            errors: 0,
            complete: true,
        }
    }

    fn curve() -> Curve {
        Curve {
            target: "relayd".into(),
            clients: 4,
            size: 256,
            window: 32,
            seconds_per_point: 2,
            saturation_per_s: 1000.0,
            points: vec![
                point(25.0, 250.0, 250.0, 1.5),
                point(50.0, 500.0, 499.0, 2.5),
                Point { p50_ms: None, p99_ms: None, p999_ms: None, complete: false, ..point(120.0, 1200.0, 0.0, 1.0) },
            ],
        }
    }

    /// Element names of `svg` in document order, checking that every opened element is closed in order.
    fn balanced_elements(svg: &str) -> Result<Vec<String>, String> {
        let mut stack = Vec::new();
        let mut names = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').ok_or("unterminated tag")? + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                if open != name.trim() {
                    return Err(format!("</{name}> closes <{open}>"));
                }
                continue;
            }
            let name = tag.split_whitespace().next().ok_or("empty tag")?.trim_end_matches('/').to_owned();
            names.push(name.clone());
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        if let Some(open) = stack.pop() {
            return Err(format!("<{open}> never closed"));
        }
        Ok(names)
    }

    /// The text of every `<text>` element, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_owned()))
            .collect()
    }

    /// `<polyline>` elements stroked in `colour`: the series lines and their legend samples (axes are black).
    fn lines_in(svg: &str, colour: RGBColor) -> usize {
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", colour.0, colour.1, colour.2);
        svg.split('<').filter(|e| e.starts_with("polyline") && e.contains(&stroke)).count()
    }

    #[test]
    fn svg_is_well_formed_with_axes_and_one_line_per_percentile() {
        let svg = render(&[curve()]).expect("renders");
        let names = balanced_elements(&svg).expect("well-formed");
        assert_eq!(names.first().map(String::as_str), Some("svg"));
        let texts = texts(&svg);
        for label in ["offered msg/s", "send→deliver latency, ms", "delivered msg/s", "delivered = offered"] {
            assert!(texts.iter().any(|t| t == label), "axis or legend text {label:?} missing");
        }
        // One legend entry per series, and each series drawn once as a line and once as its legend sample.
        for name in ["relayd p50", "relayd p99", "relayd p99.9", "relayd delivered"] {
            assert_eq!(texts.iter().filter(|t| *t == name).count(), 1, "one legend entry for {name}");
        }
        for colour in COLOURS.iter().chain(&DELIVERED_COLOURS[..1]) {
            assert_eq!(lines_in(&svg, *colour), 2, "line and legend sample in {colour:?}");
        }
        // One marker per point that has a value: 2 points × 3 percentiles + 3 delivered points.
        assert_eq!(names.iter().filter(|n| *n == "circle").count(), 2 * 3 + 3);
    }

    #[test]
    fn two_targets_share_the_axes() {
        let mut other = curve();
        other.target = "mqtt".into();
        let svg = render(&[curve(), other]).expect("renders");
        balanced_elements(&svg).expect("well-formed");
        let texts = texts(&svg);
        for name in ["relayd p99", "mqtt p99", "relayd delivered", "mqtt delivered"] {
            assert!(texts.iter().any(|t| t == name), "{name} missing from the legend");
        }
        for colour in COLOURS {
            assert_eq!(lines_in(&svg, colour), 2 * 2, "each target's line and legend sample in {colour:?}");
        }
        assert_eq!(lines_in(&svg, DELIVERED_COLOURS[1]), 2);
    }

    #[test]
    fn json_reads_back_what_was_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let curves = vec![curve()];
        write(dir.path(), &curves).expect("writes");
        assert_eq!(read_json(&dir.path().join("sweep.json")).expect("reads"), curves);
        let svg = std::fs::read_to_string(dir.path().join("sweep.svg")).expect("svg written");
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn an_empty_sweep_still_draws_axes() {
        let svg = render(&[]).expect("renders");
        balanced_elements(&svg).expect("well-formed");
        assert!(svg.contains("offered msg/s"));
    }
}
