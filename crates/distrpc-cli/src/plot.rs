//! `distrpc plot RUN.jsonl OUT.png`: the picture in BENCHMARKS.md, drawn from the JSON lines of
//! one `distrpc bench` run — latency percentiles next to the raw ping-pong, and bandwidth against
//! message size next to the raw single stream.

use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde_json::Value;

/// DejaVu Sans (Bitstream Vera license, `assets/DejaVuSans.LICENSE`), so that drawing text needs
/// no font installed on the machine.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Workloads drawn in the latency panel, in order, with their labels.
const LATENCY: &[(&str, &str)] = &[
    ("raw_pingpong", "raw TCP"),
    ("latency", "rpc_sync"),
    ("latency_pool", "rpc_sync on the pool"),
    ("echo", "echo tensor"),
    ("remote", "remote+to_here"),
    ("raw_pingpong_busy", "raw TCP busy"),
    ("latency_busy", "rpc_sync busy"),
];

pub(crate) fn run(input: &Path, output: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a line is not JSON")?;
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let of = |w: &'static str| {
        lines
            .iter()
            .filter(move |v| v.get("workload").and_then(Value::as_str) == Some(w))
    };
    let latency: Vec<(&str, [f64; 3])> = LATENCY
        .iter()
        .filter_map(|(w, label)| {
            let v = of(w).next()?;
            Some((
                *label,
                [
                    field(v, "p50_us")?,
                    field(v, "p90_us")?,
                    field(v, "p99_us")?,
                ],
            ))
        })
        .collect();
    const MIB: f64 = (1 << 20) as f64;
    let bandwidth: Vec<(f64, f64)> = of("bandwidth")
        .filter_map(|v| Some((field(v, "bytes")? / MIB, field(v, "gb_per_s")?)))
        .collect();
    let raw_bw = of("raw_bandwidth")
        .next()
        .and_then(|v| field(v, "gb_per_s"));
    if latency.is_empty() && bandwidth.is_empty() {
        bail!("{} has no latency or bandwidth lines", input.display());
    }
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the embedded font does not load"))?;

    let root = BitMapBackend::new(output, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(640);

    // Latency: p50, p90, p99 of each workload.
    let top = latency.iter().map(|(_, p)| p[2]).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("latency percentiles (µs), 2 processes", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..latency.len() as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("µs")
        .draw()?;
    // Each group's name above its bars.
    chart.draw_series(latency.iter().enumerate().map(|(i, (label, p))| {
        Text::new(
            label.to_string(),
            (i as f64 + 0.12, p[2] + top * 0.02),
            ("sans-serif", 12).into_font(),
        )
    }))?;
    let colors = [
        RGBColor(70, 130, 180),
        RGBColor(240, 150, 40),
        RGBColor(200, 60, 60),
    ];
    for (k, (name, color)) in ["p50", "p90", "p99"].iter().zip(colors).enumerate() {
        chart
            .draw_series(latency.iter().enumerate().map(|(i, (_, p))| {
                let x0 = i as f64 + 0.15 + k as f64 * 0.23;
                Rectangle::new([(x0, 0.0), (x0 + 0.21, p[k])], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;

    // Bandwidth against size, log-log, with the raw single-stream limit.
    if !bandwidth.is_empty() {
        let max_bw = bandwidth
            .iter()
            .map(|b| b.1)
            .chain(raw_bw)
            .fold(0.1, f64::max)
            * 1.3;
        let (lo, hi) = (bandwidth[0].0 / 2.0, bandwidth[bandwidth.len() - 1].0 * 2.0);
        let mut chart = ChartBuilder::on(&right)
            .caption("bandwidth (GB/s) by tensor size (MiB)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).log_scale(), (0.005..max_bw).log_scale())?;
        chart
            .configure_mesh()
            .x_label_formatter(&|m| format!("{m} MiB"))
            .y_desc("GB/s")
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                bandwidth.iter().copied(),
                RGBColor(70, 130, 180).stroke_width(3),
            ))?
            .label("distrpc rpc_sync with one tensor")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(70, 130, 180)));
        chart.draw_series(
            bandwidth
                .iter()
                .map(|&p| Circle::new(p, 4, RGBColor(70, 130, 180).filled())),
        )?;
        if let Some(raw) = raw_bw {
            chart
                .draw_series(LineSeries::new(
                    [(lo, raw), (hi, raw)],
                    RGBColor(120, 120, 120).stroke_width(2),
                ))?
                .label("raw single TCP stream")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(120, 120, 120)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
