//! SVG charts drawn with plotters' SVG backend, returned as strings to inline into a report.
//!
//! The crate is built with `default-features = false` and only `svg_backend`, `line_series` and
//! `point_series`. That leaves out `ttf` (font-kit, which needs fontconfig and installed fonts) and
//! `ab_glyph`, so plotters falls back to its "naive" font: text sizes are estimated from the character
//! count for layout, and the SVG backend writes every label as a plain `<text font-family="sans-serif">`
//! element that the browser renders. Nothing reads a font file, so charts render the same on a machine
//! with no fonts installed.
//!
//! Legends are not drawn inside the SVG: the report puts them in HTML next to the chart ([`Svg::legend`]).
//! That keeps every element in a series colour a data mark, which is what the in-page check of
//! [`super::html`] counts to decide that a chart has drawn content.

use std::ops::Range;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Series colours (Tableau 10). Axes, grid and text use black and greys, never one of these.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0xED, 0xC9, 0x48),
];

const GRID: RGBColor = RGBColor(0xE4, 0xE4, 0xE4);
const REFERENCE: RGBColor = RGBColor(0x99, 0x99, 0x99);
const SIZE: (u32, u32) = (640, 400);
/// Wider: one panel per metric, each with a bar and a value label per series.
const BAR_SIZE: (u32, u32) = (860, 380);

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot `{title}`: {message}")]
    Draw { title: String, message: String },
    #[error("plot `{0}`: nothing to draw")]
    Empty(String),
}

/// A drawn chart: the `<svg>` element and the legend entries (name, `#RRGGBB`) of its data series.
#[derive(Debug, Clone)]
pub struct Svg {
    pub title: String,
    pub svg: String,
    pub legend: Vec<(String, String)>,
}

/// `#RRGGBB` as plotters' SVG backend writes it (upper-case hex).
pub fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

fn draw_err<E: std::fmt::Debug>(title: &str) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw { title: title.to_string(), message: format!("{e:?}") }
}

/// How a series of a line chart is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Line,
    /// Points with a line through them (short series such as validation losses).
    LinePoints,
    Points,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub mark: Mark,
}

/// A chart of (x, y) series over numeric axes.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Fixed axis ranges (ROC and PR live in the unit square); `None` fits the data.
    pub x_range: Option<Range<f64>>,
    pub y_range: Option<Range<f64>>,
    pub series: Vec<Series>,
    /// Grey dashed reference segments drawn under the data (the ROC chance diagonal, say).
    pub references: Vec<[(f64, f64); 2]>,
}

fn fit(values: impl Iterator<Item = f64>) -> Option<Range<f64>> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.05 };
    Some(lo - pad..hi + pad)
}

fn new_area(buf: &mut String, size: (u32, u32)) -> DrawingArea<SVGBackend<'_>, Shift> {
    SVGBackend::with_string(buf, size).into_drawing_area()
}

pub fn line_chart(c: &LineChart) -> Result<Svg, PlotError> {
    let series: Vec<&Series> = c.series.iter().filter(|s| !s.points.is_empty()).collect();
    if series.is_empty() {
        return Err(PlotError::Empty(c.title.clone()));
    }
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_range = c.x_range.clone().or_else(|| fit(all().map(|p| p.0))).expect("non-empty series");
    let y_range = c.y_range.clone().or_else(|| fit(all().map(|p| p.1))).expect("non-empty series");
    let mut legend = Vec::new();
    let mut buf = String::new();
    {
        let e = draw_err(&c.title);
        let root = new_area(&mut buf, SIZE);
        root.fill(&WHITE).map_err(&e)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(58)
            .build_cartesian_2d(x_range, y_range)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc(c.x_label.as_str())
            .y_desc(c.y_label.as_str())
            .max_light_lines(2)
            .light_line_style(GRID.mix(0.5))
            .bold_line_style(GRID)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(&e)?;
        for r in &c.references {
            chart.draw_series(DashedLineSeries::new(r.to_vec(), 6, 4, REFERENCE.stroke_width(1))).map_err(&e)?;
        }
        for (i, s) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            legend.push((s.name.clone(), hex(color)));
            if s.mark != Mark::Points {
                chart.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2))).map_err(&e)?;
            }
            if s.mark != Mark::Line {
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(&e)?;
            }
        }
        root.present().map_err(&e)?;
    }
    Ok(Svg { title: c.title.clone(), svg: buf, legend })
}

/// Grouped bars: one panel per group (each metric on its own axis), one bar per series inside it.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    /// Panel names (metrics).
    pub groups: Vec<String>,
    /// (series name, one value per group; `None` leaves a gap).
    pub series: Vec<(String, Vec<Option<f64>>)>,
    /// The value axis of every panel; `None` fits each panel's values from zero.
    pub y_range: Option<Range<f64>>,
}

pub fn bar_chart(c: &BarChart) -> Result<Svg, PlotError> {
    let present = |i: usize| c.series.iter().any(|(_, v)| v.get(i).copied().flatten().is_some());
    let groups: Vec<usize> = (0..c.groups.len()).filter(|&i| present(i)).collect();
    if groups.is_empty() || c.series.is_empty() {
        return Err(PlotError::Empty(c.title.clone()));
    }
    let mut buf = String::new();
    let mut used = vec![false; c.series.len()];
    {
        let e = draw_err(&c.title);
        let root = new_area(&mut buf, BAR_SIZE);
        root.fill(&WHITE).map_err(&e)?;
        let panels = root.split_evenly((1, groups.len()));
        let n = c.series.len();
        for (panel, &g) in panels.iter().zip(&groups) {
            let values: Vec<Option<f64>> = c.series.iter().map(|(_, v)| v.get(g).copied().flatten()).collect();
            let top = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
            let y = c.y_range.clone().unwrap_or(0.0..if top > 0.0 { top * 1.1 } else { 1.0 });
            let mut chart = ChartBuilder::on(panel)
                .caption(c.groups[g].as_str(), ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(10)
                .y_label_area_size(40)
                .build_cartesian_2d((0..n as i32).into_segmented(), y.clone())
                .map_err(&e)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(1)
                .x_label_formatter(&|_| String::new())
                .max_light_lines(2)
                .light_line_style(GRID.mix(0.5))
                .bold_line_style(GRID)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(&e)?;
            for (i, v) in values.iter().enumerate() {
                let Some(v) = v else { continue };
                used[i] = true;
                let color = PALETTE[i % PALETTE.len()];
                let (x0, x1) = (SegmentValue::Exact(i as i32), SegmentValue::Exact(i as i32 + 1));
                let v_drawn = v.clamp(y.start, y.end);
                let mut bar = Rectangle::new([(x0, y.start), (x1, v_drawn)], color.filled());
                bar.set_margin(0, 0, 3, 3);
                chart.draw_series(std::iter::once(bar)).map_err(&e)?;
                let label = Text::new(
                    format!("{v:.3}"),
                    (SegmentValue::CenterOf(i as i32), v_drawn),
                    ("sans-serif", 10).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    )),
                );
                chart.draw_series(std::iter::once(label)).map_err(&e)?;
            }
        }
        root.present().map_err(&e)?;
    }
    let legend = c
        .series
        .iter()
        .enumerate()
        .filter(|(i, _)| used[*i])
        .map(|(i, (name, _))| (name.clone(), hex(PALETTE[i % PALETTE.len()])))
        .collect();
    Ok(Svg { title: c.title.clone(), svg: buf, legend })
}

/// One row of a box chart: the distribution of a value within one group.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxRow {
    pub label: String,
    pub n: usize,
    /// 5th, 25th, 50th, 75th and 95th percentiles.
    pub p5: f64,
    pub p25: f64,
    pub median: f64,
    pub p75: f64,
    pub p95: f64,
    pub mean: f64,
}

impl BoxRow {
    /// Summarise `values` (linear interpolation between order statistics, numpy's default);
    /// `None` when there are none.
    pub fn of(label: impl Into<String>, values: &[f64]) -> Option<BoxRow> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let pos = p * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Some(BoxRow {
            label: label.into(),
            n: v.len(),
            p5: q(0.05),
            p25: q(0.25),
            median: q(0.5),
            p75: q(0.75),
            p95: q(0.95),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
}

/// Horizontal boxes (25th–75th percentile, median bar, 5th–95th whiskers, mean dot), one row per group.
#[derive(Debug, Clone)]
pub struct BoxChart {
    pub title: String,
    pub x_label: String,
    pub x_range: Option<Range<f64>>,
    pub rows: Vec<BoxRow>,
    /// Legend name of the boxes.
    pub name: String,
}

pub fn box_chart(c: &BoxChart) -> Result<Svg, PlotError> {
    if c.rows.is_empty() {
        return Err(PlotError::Empty(c.title.clone()));
    }
    let x = c.x_range.clone().or_else(|| fit(c.rows.iter().flat_map(|r| [r.p5, r.p95]))).expect("rows");
    let color = PALETTE[0];
    let mut buf = String::new();
    {
        let e = draw_err(&c.title);
        let root = new_area(&mut buf, SIZE);
        root.fill(&WHITE).map_err(&e)?;
        let n = c.rows.len() as i32;
        let labels: Vec<String> = c.rows.iter().map(|r| format!("{} (n={})", r.label, r.n)).collect();
        let fmt = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) if (0..n).contains(i) => labels[*i as usize].clone(),
            _ => String::new(),
        };
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(110)
            .build_cartesian_2d(x, (0..n).into_segmented())
            .map_err(&e)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(c.rows.len())
            .y_label_formatter(&fmt)
            .x_desc(c.x_label.as_str())
            .max_light_lines(2)
            .light_line_style(GRID.mix(0.5))
            .bold_line_style(GRID)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(&e)?;
        for (i, r) in c.rows.iter().enumerate() {
            let i = i as i32;
            let mid = || SegmentValue::CenterOf(i);
            let mut body = Rectangle::new([(r.p25, SegmentValue::Exact(i)), (r.p75, SegmentValue::Exact(i + 1))], {
                color.mix(0.35).filled()
            });
            body.set_margin(6, 6, 0, 0);
            let mut outline =
                Rectangle::new([(r.p25, SegmentValue::Exact(i)), (r.p75, SegmentValue::Exact(i + 1))], color);
            outline.set_margin(6, 6, 0, 0);
            chart.draw_series([body, outline]).map_err(&e)?;
            let whiskers = [vec![(r.p5, mid()), (r.p25, mid())], vec![(r.p75, mid()), (r.p95, mid())]];
            chart.draw_series(whiskers.into_iter().map(|w| PathElement::new(w, color.stroke_width(2)))).map_err(&e)?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(r.median, SegmentValue::Exact(i)), (r.median, SegmentValue::Exact(i + 1))],
                    color.stroke_width(3),
                )))
                .map_err(&e)?;
            chart.draw_series(std::iter::once(Circle::new((r.mean, mid()), 4, BLACK.filled()))).map_err(&e)?;
        }
        root.present().map_err(&e)?;
    }
    Ok(Svg { title: c.title.clone(), svg: buf, legend: vec![(c.name.clone(), hex(color))] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(svg: &str, needle: &str) -> usize {
        svg.matches(needle).count()
    }

    #[test]
    fn line_chart_draws_each_series_in_its_colour_with_text_labels() {
        let c = LineChart {
            title: "t".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            x_range: None,
            y_range: None,
            series: vec![
                Series { name: "train".into(), points: vec![(0.0, 2.0), (1.0, 1.5), (2.0, 1.0)], mark: Mark::Line },
                Series { name: "val".into(), points: vec![(1.0, 1.7), (2.0, 1.2)], mark: Mark::LinePoints },
                Series { name: "empty".into(), points: vec![], mark: Mark::Line },
            ],
            references: vec![],
        };
        let s = line_chart(&c).unwrap();
        assert!(s.svg.starts_with("<svg"), "{}", &s.svg[..60]);
        assert_eq!(s.legend, vec![("train".into(), "#4E79A7".into()), ("val".into(), "#F28E2B".into())]);
        assert_eq!(count(&s.svg, "stroke=\"#4E79A7\""), 1, "one polyline for train");
        assert_eq!(count(&s.svg, "fill=\"#F28E2B\""), 2, "two points for val");
        // Axis descriptions are plain <text> elements: no font file was needed to lay them out.
        assert!(s.svg.contains(">\nstep\n</text>") && s.svg.contains(">\nloss\n</text>"), "{}", s.svg);
        let none = LineChart { series: vec![], ..c };
        assert!(matches!(line_chart(&none), Err(PlotError::Empty(_))));
    }

    #[test]
    fn bar_chart_has_one_panel_per_metric_and_a_bar_per_value() {
        let c = BarChart {
            title: "b".into(),
            groups: vec!["auc".into(), "map".into(), "mrr".into()],
            series: vec![
                ("model".into(), vec![Some(0.9), Some(0.8), None]),
                ("random".into(), vec![Some(0.5), Some(0.4), None]),
            ],
            y_range: Some(0.0..1.0),
        };
        let s = bar_chart(&c).unwrap();
        assert_eq!(count(&s.svg, "fill=\"#4E79A7\""), 2);
        assert_eq!(count(&s.svg, "fill=\"#F28E2B\""), 2);
        assert!(s.svg.contains(">\nauc\n</text>") && s.svg.contains(">\n0.900\n</text>"), "{}", s.svg);
        assert!(!s.svg.contains(">\nmrr\n</text>"), "a metric without values gets no panel");
    }

    #[test]
    fn box_rows_interpolate_percentiles_like_numpy() {
        let r = BoxRow::of("x", &[4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!((r.p25, r.median, r.p75, r.mean, r.n), (2.0, 3.0, 4.0, 3.0, 5));
        // numpy.percentile([1,2,3,4,5], 5) == 1.2
        assert!((r.p5 - 1.2).abs() < 1e-12 && (r.p95 - 4.8).abs() < 1e-12);
        assert!(BoxRow::of("x", &[]).is_none());
        let s = box_chart(&BoxChart {
            title: "d".into(),
            x_label: "score".into(),
            x_range: Some(0.0..1.0),
            rows: vec![r.clone(), BoxRow { label: "y".into(), ..r }],
            name: "score".into(),
        })
        .unwrap();
        assert!(s.svg.contains(">\nx (n=5)\n</text>") && s.svg.contains(">\ny (n=5)\n</text>"), "{}", s.svg);
        assert_eq!(count(&s.svg, "stroke-width=\"3\""), 2, "a median bar per row");
    }
}
