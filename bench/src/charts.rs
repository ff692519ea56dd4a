//! PNG charts with plotters: per group, one horizontal bar chart per unit,
//! bars at the median, whiskers from min to max, reference rows in grey.
//!
//! Text is rendered with ab_glyph from a TTF file read at run time
//! (DejaVu Sans from Debian's fonts-dejavu-core, which the bench's setup
//! installs), so no fontconfig or freetype is needed.

use std::{path::Path, sync::OnceLock};

use anyhow::{anyhow, bail, Result};
use plotters::{prelude::*, style::text_anchor};

use crate::{harness::fmt_value, report::GroupFile};

/// Where Debian's fonts-dejavu-core puts the font.
pub const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

const WIDTH: u32 = 1100;
const ROW: u32 = 30;
const PANEL_EXTRA: u32 = 90;

/// Registers the font once; fails if the file is missing or unreadable.
fn font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT_FILE).map_err(|e| format!("reading {FONT_FILE}: {e}"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT_FILE}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One bar of a panel.
struct Bar {
    label: String,
    min: f64,
    median: f64,
    max: f64,
    colour: RGBColor,
    text: String,
}

const BLUE_BAR: RGBColor = RGBColor(70, 120, 190);
const GREEN_BAR: RGBColor = RGBColor(60, 150, 80);
const RED_BAR: RGBColor = RGBColor(200, 70, 60);
const GREY_BAR: RGBColor = RGBColor(170, 170, 170);

fn bars(file: &GroupFile, unit: &str) -> Vec<Bar> {
    let mut out: Vec<Bar> = file
        .figures
        .iter()
        .filter(|f| f.unit == unit)
        .map(|f| {
            let colour = match f.target_met {
                Some(true) => GREEN_BAR,
                Some(false) => RED_BAR,
                None => BLUE_BAR,
            };
            let ratio = match (f.ratio, &f.baseline) {
                (Some(r), Some(b)) => format!("  ({r:.2}× {b})"),
                _ => String::new(),
            };
            Bar {
                label: f.case.clone(),
                min: f.min,
                median: f.median,
                max: f.max,
                colour,
                text: format!("{} {}{}", fmt_value(f.median), f.unit, ratio),
            }
        })
        .collect();
    out.extend(
        file.references
            .iter()
            .filter(|r| r.unit == unit)
            .map(|r| Bar {
                label: format!("reference: {}", r.case),
                min: r.value,
                median: r.value,
                max: r.value,
                colour: GREY_BAR,
                text: format!("{} {} (reference)", fmt_value(r.value), r.unit),
            }),
    );
    out
}

/// Draws `file`'s chart into `path` (PNG).
pub fn draw_group(path: &Path, file: &GroupFile) -> Result<()> {
    font()?;
    let panels: Vec<(String, Vec<Bar>)> = file
        .by_unit()
        .into_iter()
        .map(|(unit, _)| (unit.clone(), bars(file, &unit)))
        .collect();
    if panels.is_empty() {
        bail!("no figures");
    }
    let heights: Vec<u32> = panels
        .iter()
        .map(|(_, b)| PANEL_EXTRA + ROW * b.len() as u32)
        .collect();
    let total: u32 = heights.iter().sum::<u32>() + 40;
    let longest = panels
        .iter()
        .flat_map(|(_, b)| b)
        .map(|b| b.label.chars().count())
        .max()
        .unwrap_or(10);
    let label_width = (longest as u32 * 8 + 20).clamp(120, 560);

    let root = BitMapBackend::new(path, (WIDTH, total)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let (title, mut rest) = root.split_vertically(40);
    title
        .titled(
            &format!("{}: median, whiskers min–max", file.group),
            (FONT, 22),
        )
        .map_err(|e| anyhow!("{e:?}"))?;
    for ((unit, bars), h) in panels.iter().zip(&heights) {
        let (panel, below) = rest.split_vertically(*h);
        rest = below;
        draw_panel(&panel, unit, bars, label_width)?;
    }
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    unit: &str,
    bars: &[Bar],
    label_width: u32,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let n = bars.len();
    let lo = bars.iter().map(|b| b.min).fold(0.0f64, f64::min);
    let hi = bars.iter().map(|b| b.max).fold(0.0f64, f64::max);
    let span = if hi - lo > 0.0 { hi - lo } else { 1.0 };
    // Room on the right for the value text.
    let x_range = lo - if lo < 0.0 { 0.05 * span } else { 0.0 }..hi + 0.45 * span;
    let y_range = -0.5f64..n as f64 - 0.5;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let formatter = |y: &f64| {
        let i = y.round();
        if (y - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            // Top to bottom in input order.
            labels[n - 1 - i as usize].clone()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .margin_right(20)
        .x_label_area_size(40)
        .y_label_area_size(label_width)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n + 1)
        .y_label_formatter(&formatter)
        .x_desc(unit)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    for (k, b) in bars.iter().enumerate() {
        let y = (n - 1 - k) as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.32), (b.median, y + 0.32)],
                b.colour.filled(),
            )))
            .map_err(err)?;
        if b.max > b.min {
            let whisker = BLACK.stroke_width(2);
            chart
                .draw_series([
                    PathElement::new(vec![(b.min, y), (b.max, y)], whisker),
                    PathElement::new(vec![(b.min, y - 0.18), (b.min, y + 0.18)], whisker),
                    PathElement::new(vec![(b.max, y - 0.18), (b.max, y + 0.18)], whisker),
                ])
                .map_err(err)?;
        }
        let style = TextStyle::from((FONT, 13).into_font()).pos(text_anchor::Pos::new(
            text_anchor::HPos::Left,
            text_anchor::VPos::Center,
        ));
        let x = b.max.max(b.median).max(0.0) + 0.01 * span;
        chart
            .draw_series(std::iter::once(Text::new(b.text.clone(), (x, y), style)))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        harness::{Figure, Machine, Reference},
        report::records,
    };

    /// Draws a chart with two units and a reference row (skipped without the font).
    #[test]
    fn draws_a_png() {
        if !Path::new(FONT_FILE).exists() {
            eprintln!("skipped: {FONT_FILE} missing");
            return;
        }
        let figs = vec![
            Figure::new("g", "floor", "ns", vec![20.0, 22.0, 21.0], false),
            Figure::new("g", "case a", "ns", vec![40.0, 45.0, 41.0], false)
                .target("<= 50 ns", true),
            Figure::new("g", "case b", "ns", vec![-2.0, 5.0, 3.0], false).baseline("floor"),
            Figure::new("g", "size", "MiB", vec![3.0, 3.0, 3.0], false),
        ];
        let file = GroupFile {
            group: "g".into(),
            quick: true,
            machine: Machine::probe(Path::new(".")),
            description: None,
            notes: vec![],
            references: vec![Reference {
                case: "other".into(),
                unit: "ns".into(),
                value: 60.0,
                source: "s".into(),
            }],
            figures: records(&figs),
            error: None,
        };
        let path =
            std::env::temp_dir().join(format!("xdplb-bench-chart-{}.png", std::process::id()));
        draw_group(&path, &file).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
