//! The sweep chart: latency percentiles (p50, p90, p99, p99.9; log-scale
//! milliseconds) against offered load, one line per percentile, drawn to a
//! PNG with plotters. Text uses a TTF/OTF font registered with plotters'
//! pure-Rust `ab_glyph` renderer; without a font the chart has no text.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

/// The percentiles drawn: (legend, JSON key of the run, colour).
const LINES: [(&str, &str, RGBColor); 4] = [
    ("p50", "p50_us", RGBColor(31, 119, 180)),
    ("p90", "p90_us", RGBColor(44, 160, 44)),
    ("p99", "p99_us", RGBColor(255, 127, 14)),
    ("p99.9", "p999_us", RGBColor(214, 39, 40)),
];

/// Fonts tried when --font is not given.
const SYSTEM_FONTS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// One sweep step: offered load and its latency percentiles in µs.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub offered: f64,
    pub us: [u64; 4],
}

/// The chart points of the sweep's run objects (those with an `offered_rps`).
pub fn points(runs: &[Value]) -> Vec<Point> {
    runs.iter()
        .filter_map(|r| {
            let offered = r.get("offered_rps")?.as_f64()?;
            let mut us = [0u64; 4];
            for (slot, (_, key, _)) in us.iter_mut().zip(LINES) {
                *slot = r.get(key)?.as_u64()?;
            }
            Some(Point { offered, us })
        })
        .collect()
}

/// Registers the chart font as "sans-serif"; false (and a note on stderr)
/// when none could be loaded, in which case the chart is drawn without text.
pub fn load_font(requested: Option<&Path>) -> bool {
    let candidates = requested
        .map(Path::to_path_buf)
        .into_iter()
        .chain(SYSTEM_FONTS.iter().map(Into::into));
    for path in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        // plotters keeps a 'static reference: the font lives as long as the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
            return true;
        }
        eprintln!("loadgen: {} is not a usable font", path.display());
    }
    eprintln!(
        "loadgen: no font found (install fonts-dejavu-core or pass --font): chart without text"
    );
    false
}

/// Draws the chart to `path` (PNG); `text` says whether a font is registered.
pub fn draw(path: &Path, points: &[Point], text: bool) -> Result<(), String> {
    draw_inner(path, points, text).map_err(|e| format!("--chart {}: {e}", path.display()))
}

fn draw_inner(path: &Path, points: &[Point], text: bool) -> Result<(), Box<dyn std::error::Error>> {
    let ms = |us: u64| (us.max(1) as f64) / 1000.0;
    let all = points.iter().flat_map(|p| p.us.iter().copied().map(ms));
    let lo = all.clone().fold(f64::INFINITY, f64::min);
    let hi = all.fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() {
        (lo / 1.5, hi * 1.5)
    } else {
        (0.01, 10.0)
    };
    let x_max = points.iter().map(|p| p.offered).fold(1.0, f64::max) * 1.05;

    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption("Latency against offered load", ("sans-serif", 26))
            .x_label_area_size(55)
            .y_label_area_size(75);
    }
    let (bold, light) = log_ticks(lo, hi);
    let y = (lo..hi)
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light);
    let mut chart = builder.build_cartesian_2d(0.0..x_max, y)?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235));
    if text {
        mesh.x_desc("offered load (requests/s)")
            .y_desc("latency (ms, log scale)")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 18))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| tick_label(*y));
    }
    mesh.draw()?;
    for (i, (name, _, color)) in LINES.into_iter().enumerate() {
        let series = points.iter().map(|p| (p.offered, ms(p.us[i])));
        let drawn =
            chart.draw_series(LineSeries::new(series, color.stroke_width(2)).point_size(4))?;
        if text {
            drawn.label(name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Log-axis ticks within `lo..=hi`: labelled 1-2-5 steps, and light grid
/// lines at every 1..9 of each decade.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let steps = |ms: &[f64]| -> Vec<f64> {
        (first..=last)
            .flat_map(|d| ms.iter().map(move |m| m * 10f64.powi(d)))
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    (
        steps(&[1.0, 2.0, 5.0]),
        steps(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
    )
}

/// `0.5`, `2`, `100`: the shortest decimal (up to 3 places).
fn tick_label(y: f64) -> String {
    let s = format!("{y:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_runs() -> Vec<Value> {
        [(500.0, 300), (1000.0, 450), (2000.0, 9000)]
            .iter()
            .map(|&(rate, base)| {
                serde_json::json!({"offered_rps": rate, "p50_us": base, "p90_us": base * 2,
                    "p99_us": base * 5, "p999_us": base * 9})
            })
            .collect()
    }

    #[test]
    fn log_ticks_are_one_two_five() {
        let (bold, light) = log_ticks(0.3, 25.0);
        assert_eq!(bold, [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        assert_eq!(light.len(), 7 + 9 + 2);
        let labels: Vec<String> = bold.iter().map(|&y| tick_label(y)).collect();
        assert_eq!(labels, ["0.5", "1", "2", "5", "10", "20"]);
    }

    #[test]
    fn points_come_from_open_loop_runs() {
        let mut runs = sample_runs();
        runs.push(serde_json::json!({"offered_rps": null, "p50_us": 1}));
        let p = points(&runs);
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[2],
            Point {
                offered: 2000.0,
                us: [9000, 18000, 45000, 81000]
            }
        );
    }

    #[test]
    fn chart_without_font_is_still_a_png() {
        let path = std::env::temp_dir().join(format!("loadgen-chart-{}.png", std::process::id()));
        draw(&path, &points(&sample_runs()), false).expect("chart drawn");
        let bytes = std::fs::read(&path).expect("chart file");
        let _ = std::fs::remove_file(&path);
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 1000);
    }
}
