//! SVG plots with `plotters` (SVG backend only): throughput versus clients for Treaty and each
//! baseline, and the latency CDF of every system at the main client count.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::report::BenchReport;

const SIZE: (u32, u32) = (900, 540);

fn colour(name: &str) -> RGBColor {
    match name {
        "treaty" => RGBColor(0xd6, 0x27, 0x28),
        "treaty_3pc" => RGBColor(0xff, 0x7f, 0x0e),
        "direct" => RGBColor(0x1f, 0x77, 0xb4),
        "direct_pipelined" => RGBColor(0x94, 0x67, 0xbd),
        "independent" => RGBColor(0x2c, 0xa0, 0x2c),
        _ => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

fn to_anyhow<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

/// Writes the plots and returns their paths.
pub fn write_plots(dir: &Path, workload: &str, report: &BenchReport) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let throughput = dir.join(format!("{workload}-throughput-vs-clients.svg"));
    let latency = dir.join(format!("{workload}-latency-cdf.svg"));
    throughput_vs_clients(&throughput, workload, report)?;
    latency_cdf(&latency, workload, report)?;
    Ok(vec![
        throughput.display().to_string(),
        latency.display().to_string(),
    ])
}

fn throughput_vs_clients(path: &Path, workload: &str, report: &BenchReport) -> Result<()> {
    let names: Vec<String> = report.main.systems.iter().map(|s| s.name.clone()).collect();
    let series: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .map(|name| {
            let points = report
                .sweep
                .iter()
                .filter_map(|point| {
                    let system = point.systems.iter().find(|s| &s.name == name)?;
                    Some((point.clients as f64, system.figures().tps))
                })
                .collect();
            (name.clone(), points)
        })
        .collect();
    let max_clients = report.sweep.iter().map(|p| p.clients).max().unwrap_or(1) as f64;
    let max_tps = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(to_anyhow)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: throughput vs clients (fsync on)"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_clients * 1.05, 0f64..max_tps * 1.15)
        .map_err(to_anyhow)?;
    chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .y_desc("commits / s")
        .draw()
        .map_err(to_anyhow)?;
    for (name, points) in series {
        let colour = colour(&name);
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(to_anyhow)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        chart
            .draw_series(PointSeries::of_element(
                points,
                4,
                colour.filled(),
                &|c, s, st| Circle::new(c, s, st),
            ))
            .map_err(to_anyhow)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(to_anyhow)?;
    root.present().map_err(to_anyhow)?;
    Ok(())
}

fn latency_cdf(path: &Path, workload: &str, report: &BenchReport) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = report
        .main
        .systems
        .iter()
        .map(|s| (s.name.clone(), s.counts.latencies.cdf_points()))
        .collect();
    // Up to the largest p99.9 (the max would squash the body of the curve).
    let x_max = report
        .main
        .systems
        .iter()
        .map(|s| s.counts.latencies.quantile_ms(0.999))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(to_anyhow)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{workload}: commit latency CDF, {} clients (to p99.9)",
                report.main.clients
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0f64)
        .map_err(to_anyhow)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms)")
        .y_desc("fraction of commits")
        .draw()
        .map_err(to_anyhow)?;
    for (name, points) in series {
        let colour = colour(&name);
        let points: Vec<(f64, f64)> = points.into_iter().filter(|(x, _)| *x <= x_max).collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(to_anyhow)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(to_anyhow)?;
    root.present().map_err(to_anyhow)?;
    Ok(())
}
