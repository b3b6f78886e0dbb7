//! Charts, drawn as SVG on the server (plotters' SVG backend): nothing is
//! fetched and no script draws them. Labels are the page's own HTML around
//! the chart, so the SVG carries shapes only and needs no fonts.

use plotters::prelude::*;

/// Colours of the console's palette.
const REQUESTS: RGBColor = RGBColor(0x3b, 0x6e, 0xd8);
const COST: RGBColor = RGBColor(0xd9, 0x7a, 0x1e);
const GRID: RGBColor = RGBColor(0xe4, 0xe7, 0xec);

/// One day's point.
#[derive(Clone, Debug)]
pub(crate) struct Day {
    pub(crate) requests: u64,
    /// USD, for drawing only (the page prints the exact figures).
    pub(crate) cost: f64,
}

/// Requests as bars and cost as a line over the days, each on its own
/// scale (0 to its maximum), in a `width` × `height` SVG.
pub(crate) fn daily(days: &[Day], width: u32, height: u32) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let count = days.len().max(1);
        let max_requests = days.iter().map(|d| d.requests).max().unwrap_or(0).max(1) as f64;
        let max_cost = days
            .iter()
            .map(|d| d.cost)
            .fold(0.0_f64, f64::max)
            .max(f64::MIN_POSITIVE);
        let chart = ChartBuilder::on(&root)
            .margin(8)
            .build_cartesian_2d(0.0..count as f64, 0.0..1.05);
        let Ok(mut chart) = chart else {
            return svg_fallback(width, height);
        };
        for step in 1..=4 {
            let y = f64::from(step) / 4.0;
            let _ = chart.draw_series(LineSeries::new([(0.0, y), (count as f64, y)], GRID));
        }
        let bars = days.iter().enumerate().map(|(i, day)| {
            let x = i as f64;
            let top = day.requests as f64 / max_requests;
            Rectangle::new([(x + 0.15, 0.0), (x + 0.85, top)], REQUESTS.filled())
        });
        let _ = chart.draw_series(bars);
        let line = days
            .iter()
            .enumerate()
            .map(|(i, day)| (i as f64 + 0.5, day.cost / max_cost));
        let _ = chart.draw_series(LineSeries::new(line, COST.stroke_width(3)));
        let _ = root.present();
    }
    svg
}

/// Horizontal bars, one per value, longest for the largest.
pub(crate) fn bars(values: &[f64], width: u32, row: u32) -> String {
    let rows = values.len().max(1) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, rows * row)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let max = values
            .iter()
            .copied()
            .fold(0.0_f64, f64::max)
            .max(f64::MIN_POSITIVE);
        for (i, value) in values.iter().enumerate() {
            let length = ((value / max) * f64::from(width)).round() as i32;
            let top = i as i32 * row as i32;
            let _ = root.draw(&Rectangle::new(
                [(0, top + 3), (length.max(1), top + row as i32 - 3)],
                COST.filled(),
            ));
        }
        let _ = root.present();
    }
    svg
}

fn svg_fallback(width: u32, height: u32) -> String {
    format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daily_chart_has_one_bar_a_day_and_a_cost_line() {
        let days = [
            Day {
                requests: 10,
                cost: 0.5,
            },
            Day {
                requests: 0,
                cost: 0.0,
            },
            Day {
                requests: 40,
                cost: 2.0,
            },
        ];
        let svg = daily(&days, 600, 200);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.matches("<rect").count() >= 3, "{svg}");
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(!svg.contains("<text"), "no fonts needed");
        let empty = daily(&[], 600, 200);
        assert!(empty.starts_with("<svg"));
    }

    #[test]
    fn bars_scale_to_the_largest() {
        let svg = bars(&[1.0, 4.0], 400, 20);
        assert!(svg.contains("width=\"400\""), "{svg}");
        assert!(svg.matches("<rect").count() >= 2, "{svg}");
    }
}
