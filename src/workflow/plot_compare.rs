//! `coin compare --plot FILE.svg|FILE.png`: one figure comparing the branches (methods).
//!
//! Top panel, per task: for each branch, the score right after the step that trained the task
//! (hollow circle) joined to the score after the branch's last step (filled circle); the drop
//! is the task's forgetting, the filled circles' mean is MFN. Bottom panel: each branch's mean
//! forgetting against its wall time as a multiple of the first branch's, labelled with its
//! MAA; the cost–forgetting trade-off that continual-learning papers report. Colours follow
//! the order of the branches (as the legend says). The style is `coin matrix --plot`'s.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::compare::{BranchSummary, Comparison};
use super::plot::{plot_ext, truncate, write_plot, FONT, PALETTE};
use super::plot_font::GLYPH_W;
use super::WorkflowError;

const TOP_H: i32 = 340;
const BOTTOM_H: i32 = 320;
const HEADER_H: i32 = 84;

/// One task's two scores on one branch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskPoints {
    /// The score right after the step that trained the task (`None`: not trained on this
    /// branch, or not evaluated then).
    pub after_training: Option<f64>,
    /// The score after the branch's last step.
    pub last: Option<f64>,
}

/// The trained tasks of all branches, in order of first appearance (the top panel's columns).
pub fn compared_tasks(c: &Comparison) -> Vec<String> {
    let mut tasks: Vec<String> = Vec::new();
    for b in &c.branches {
        for r in &b.matrix.checkpoints {
            if !tasks.contains(&r.task) {
                tasks.push(r.task.clone());
            }
        }
    }
    tasks
}

/// `task`'s scores on branch `b`: right after it was trained, and after the last step.
pub fn task_points(b: &BranchSummary, task: &str) -> TaskPoints {
    let m = &b.matrix.matrix;
    let Some(j) = m.tasks.iter().position(|t| t == task) else {
        return TaskPoints {
            after_training: None,
            last: None,
        };
    };
    let after_training = b
        .matrix
        .checkpoints
        .iter()
        .position(|r| r.task == task)
        .and_then(|k| m.rows.get(k))
        .and_then(|row| row.get(j).copied().flatten());
    let last = m.rows.last().and_then(|row| row.get(j).copied().flatten());
    TaskPoints {
        after_training,
        last,
    }
}

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

fn size(c: &Comparison, n_tasks: usize) -> (u32, u32) {
    let group_w = (c.branches.len() as i32 * 16).max(64);
    let legend_w: i32 = c
        .branches
        .iter()
        .map(|b| legend_label(b).chars().count() as i32 * GLYPH_W as i32 + 40)
        .sum();
    let width = (90 + group_w * n_tasks as i32 + 40)
        .max(760)
        .max(legend_w + 20);
    (width as u32, (HEADER_H + TOP_H + BOTTOM_H + 20) as u32)
}

fn legend_label(b: &BranchSummary) -> String {
    let label = b.method.label();
    if label == "—" || label == b.name {
        b.name.clone()
    } else {
        format!("{} ({label})", b.name)
    }
}

/// Draw the comparison to `path`; the extension picks the format (`.svg` or `.png`).
pub fn plot_comparison(c: &Comparison, path: &Path) -> Result<(), WorkflowError> {
    plot_ext(path)?;
    let tasks = compared_tasks(c);
    if tasks.is_empty() {
        return Err(WorkflowError::Input(format!(
            "cannot plot to '{}': none of the compared branches has a training step",
            path.display()
        )));
    }
    write_plot(
        path,
        size(c, tasks.len()),
        |root| draw(root, c, &tasks),
        |root| draw(root, c, &tasks),
    )
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    c: &Comparison,
    tasks: &[String],
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let left = Pos::new(HPos::Left, VPos::Center);
    let centre = Pos::new(HPos::Center, VPos::Top);
    let font = FONT.into_font();
    let grey = RGBColor(90, 90, 90);
    let names: Vec<&str> = c.branches.iter().map(|b| b.name.as_str()).collect();
    root.draw(&Text::new(
        format!("Methods compared: {}", names.join(", ")),
        (10, 18),
        font.clone().color(&BLACK).pos(left),
    ))
    .map_err(e)?;
    root.draw(&Text::new(
        "top: per task, hollow dot = right after training it, filled dot = after the last step"
            .to_string(),
        (10, 38),
        font.clone().color(&grey).pos(left),
    ))
    .map_err(e)?;
    // Legend.
    let mut x = 10;
    for (i, b) in c.branches.iter().enumerate() {
        let label = legend_label(b);
        root.draw(&Rectangle::new([(x, 58), (x + 12, 70)], colour(i).filled()))
            .map_err(e)?;
        root.draw(&Text::new(
            label.clone(),
            (x + 18, 64),
            font.clone().color(&colour(i)).pos(left),
        ))
        .map_err(e)?;
        x += (label.chars().count() * GLYPH_W) as i32 + 40;
    }

    // Top panel: after training vs after the last step, per task and branch.
    let (w, _) = root.dim_in_pixel();
    let top = root.clone().shrink((0, HEADER_H as u32), (w, TOP_H as u32));
    let n = tasks.len() as f64;
    let mut chart = ChartBuilder::on(&top)
        .margin_left(10)
        .margin_right(30)
        .margin_top(6)
        .x_label_area_size(34)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..n, 0f64..100f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(tasks.len() + 1)
        .x_label_formatter(&|_| String::new())
        .y_labels(6)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("score")
        .label_style(FONT)
        .axis_desc_style(FONT)
        .light_line_style(RGBColor(245, 245, 245))
        .draw()
        .map_err(e)?;
    let nb = c.branches.len() as f64;
    let slot = 0.8 / nb;
    let group_px = chart.backend_coord(&(1.0, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0;
    let max_chars = (group_px.max(GLYPH_W as i32 * 4) as usize - 4) / GLYPH_W;
    for (j, task) in tasks.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(j as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            truncate(task, max_chars),
            (px, py + 8),
            font.clone().color(&BLACK).pos(centre),
        ))
        .map_err(e)?;
        for (i, b) in c.branches.iter().enumerate() {
            let x = j as f64 + 0.1 + slot * (i as f64 + 0.5);
            let p = task_points(b, task);
            let col = colour(i);
            if let (Some(a), Some(l)) = (p.after_training, p.last) {
                chart
                    .draw_series(LineSeries::new(
                        vec![(x, a), (x, l)],
                        Color::stroke_width(&col, 2),
                    ))
                    .map_err(e)?;
            }
            if let Some(a) = p.after_training {
                chart
                    .draw_series(std::iter::once(Circle::new(
                        (x, a),
                        4,
                        Color::stroke_width(&col, 2),
                    )))
                    .map_err(e)?;
            }
            if let Some(l) = p.last {
                chart
                    .draw_series(std::iter::once(Circle::new((x, l), 4, col.filled())))
                    .map_err(e)?;
            }
        }
    }

    // Bottom panel: mean forgetting against wall time (× the first branch), labelled with MAA.
    let bottom_top = (HEADER_H + TOP_H + 10) as u32;
    let bottom = root.clone().shrink((0, bottom_top), (w, BOTTOM_H as u32));
    let points: Vec<(usize, f64, f64)> = c
        .branches
        .iter()
        .enumerate()
        .filter_map(|(i, b)| Some((i, c.wall_ratio(i)?, b.metrics.forgetting?)))
        .collect();
    let first = c.branches.first().map_or("", |b| b.name.as_str());
    if points.is_empty() {
        bottom
            .draw(&Text::new(
                format!(
                    "bottom: no point to draw (the records of {first} hold no time, or no \
                     branch has a forgetting value)"
                ),
                (10, 20),
                font.clone().color(&grey).pos(left),
            ))
            .map_err(e)?;
        return Ok(());
    }
    let x_max = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.25;
    let y_hi = points.iter().map(|p| p.2).fold(1.0f64, f64::max) * 1.25;
    // A margin below the lowest point, so that a branch without forgetting is not drawn on
    // the axis.
    let y_lo = points.iter().map(|p| p.2).fold(0.0f64, f64::min) * 1.25 - 0.05 * y_hi;
    let x_desc = format!("wall time as a multiple of {first}");
    let mut chart = ChartBuilder::on(&bottom)
        .margin_left(10)
        .margin_right(30)
        .margin_top(24)
        .margin_bottom(6)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..x_max, y_lo..y_hi)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_labels(6)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc(x_desc.as_str())
        .y_desc("mean forgetting")
        .label_style(FONT)
        .axis_desc_style(FONT)
        .light_line_style(RGBColor(245, 245, 245))
        .draw()
        .map_err(e)?;
    bottom
        .draw(&Text::new(
            "bottom: mean forgetting vs wall time (lower left is better), label = MAA".to_string(),
            (10, 10),
            font.clone().color(&grey).pos(left),
        ))
        .map_err(e)?;
    for (i, x, y) in points {
        let col = colour(i);
        chart
            .draw_series(std::iter::once(Circle::new((x, y), 5, col.filled())))
            .map_err(e)?;
        let (px, py) = chart.backend_coord(&(x, y));
        let b = &c.branches[i];
        let maa = b
            .metrics
            .maa
            .map_or_else(|| "—".to_string(), |v| format!("{v:.1}"));
        root.draw(&Text::new(
            format!("{} MAA {maa}", b.name),
            (px + 8, py),
            font.clone().color(&col).pos(left),
        ))
        .map_err(e)?;
    }
    Ok(())
}
