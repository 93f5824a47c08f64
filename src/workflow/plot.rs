//! `coin matrix --plot FILE.svg|FILE.png`: the accuracy matrix as a heatmap (values written in
//! the cells) above per-task accuracy curves across training steps (each curve labelled at its
//! end in its colour, so no legend is needed). Drawn with plotters; the PNG path draws text
//! with a built-in bitmap font ([`super::plot_font`]) because plotters' bitmap backend needs
//! system font libraries for text.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::FontTransform;
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
};

use super::matrix::BranchMatrix;
use super::plot_font::{GLYPHS, GLYPH_H, GLYPH_W};
use super::WorkflowError;

/// Distinct line colours (Tableau 10).
pub(super) const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

const CELL_H: i32 = 26;
pub(super) const FONT: (&str, u32) = ("sans-serif", 14);

/// Draw `bm` to `path`; the extension picks the format (`.svg` or `.png`).
pub fn plot_matrix(bm: &BranchMatrix, title: &str, path: &Path) -> Result<(), WorkflowError> {
    plot_ext(path)?;
    if bm.matrix.tasks.is_empty() {
        return Err(WorkflowError::Input(format!(
            "cannot plot to '{}': the matrix is empty, no eval records on this history yet",
            path.display()
        )));
    }
    write_plot(
        path,
        layout(bm).size,
        |root| draw(root, bm, title),
        |root| draw(root, bm, title),
    )
}

/// Draw a figure of `size` pixels to `path`: `.svg` with `svg`, `.png` with `png` (the same
/// drawing on the two backends), written atomically.
pub(super) fn write_plot(
    path: &Path,
    size: (u32, u32),
    svg: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String>,
    png: impl FnOnce(&DrawingArea<TextBitmap<'_>, Shift>) -> Result<(), String>,
) -> Result<(), WorkflowError> {
    let err = |message: String| WorkflowError::Plot {
        path: path.to_path_buf(),
        message,
    };
    match plot_ext(path)?.as_str() {
        "svg" => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
                svg(&root).map_err(err)?;
                root.present().map_err(|e| err(e.to_string()))?;
            }
            crate::store::fsutil::write_atomic(path, text.as_bytes())
                .map_err(WorkflowError::io("write the plot", path))
        }
        _ => {
            let (w, h) = size;
            let mut buf = vec![255u8; w as usize * h as usize * 3];
            {
                let inner = BitMapBackend::with_buffer(&mut buf, size);
                let root = TextBitmap { inner }.into_drawing_area();
                png(&root).map_err(err)?;
                root.present().map_err(|e| err(e.to_string()))?;
            }
            let img = image::RgbImage::from_raw(w, h, buf)
                .ok_or_else(|| err("the drawing buffer does not match the image size".into()))?;
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| err(e.to_string()))?;
            crate::store::fsutil::write_atomic(path, &png)
                .map_err(WorkflowError::io("write the plot", path))
        }
    }
}

/// The plot format `path` names (`svg` or `png`); anything else is refused.
pub(super) fn plot_ext(path: &Path) -> Result<String, WorkflowError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "svg" | "png" => Ok(ext),
        _ => Err(WorkflowError::Input(format!(
            "cannot plot to '{}': the plot file must end in .svg or .png",
            path.display()
        ))),
    }
}

struct Layout {
    size: (u32, u32),
    label_w: i32,
    cell_w: i32,
    heat_top: i32,
    heat_h: i32,
}

fn row_labels(bm: &BranchMatrix) -> Vec<String> {
    let mut labels = Vec::new();
    if bm.matrix.zero_shot.is_some() {
        labels.push("0 zero-shot".to_string());
    }
    for (k, r) in bm.checkpoints.iter().enumerate() {
        labels.push(format!("{} {}", k + 1, r.task));
    }
    labels
}

fn layout(bm: &BranchMatrix) -> Layout {
    let longest_task = bm
        .matrix
        .tasks
        .iter()
        .map(|t| t.chars().count())
        .max()
        .unwrap_or(4);
    let cell_w = ((longest_task * GLYPH_W) as i32 + 10).clamp(56, 120);
    let label_w = row_labels(bm)
        .iter()
        .map(|l| (l.chars().count() * GLYPH_W) as i32 + 16)
        .max()
        .unwrap_or(80)
        .max(80);
    let n_rows = row_labels(bm).len().max(1) as i32;
    let heat_top = 60;
    let heat_h = (n_rows + 1) * CELL_H;
    let name_w = (longest_task * GLYPH_W) as i32 + 24;
    let width = (label_w + cell_w * bm.matrix.tasks.len() as i32 + 20)
        .max(640)
        .max(420 + name_w);
    let height = heat_top + heat_h + 40 + 340;
    Layout {
        size: (width as u32, height as u32),
        label_w,
        cell_w,
        heat_top,
        heat_h,
    }
}

/// White → dark blue by score; the text colour that stays readable on it.
fn heat_colour(score: f64) -> (RGBColor, RGBColor) {
    let t = (score / 100.0).clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    let bg = RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0));
    let fg = if t > 0.55 { WHITE } else { BLACK };
    (bg, fg)
}

pub(super) fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max_chars.saturating_sub(1)).collect();
        t.push('.');
        t
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    bm: &BranchMatrix,
    title: &str,
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    let lay = layout(bm);
    root.fill(&WHITE).map_err(e)?;
    let centre = Pos::new(HPos::Center, VPos::Center);
    let left = Pos::new(HPos::Left, VPos::Center);
    let font = FONT.into_font();
    root.draw(&Text::new(
        format!("Accuracy matrix: {title}"),
        (10, 18),
        font.clone().color(&BLACK).pos(left),
    ))
    .map_err(e)?;
    root.draw(&Text::new(
        "row = after training step k, column = task; darker = higher score".to_string(),
        (10, 38),
        font.clone().color(&RGBColor(90, 90, 90)).pos(left),
    ))
    .map_err(e)?;

    // Heatmap.
    let max_chars = (lay.cell_w as usize - 6) / GLYPH_W;
    let y0 = lay.heat_top;
    for (j, t) in bm.matrix.tasks.iter().enumerate() {
        let x = lay.label_w + j as i32 * lay.cell_w + lay.cell_w / 2;
        root.draw(&Text::new(
            truncate(t, max_chars),
            (x, y0 + CELL_H / 2),
            font.clone().color(&BLACK).pos(centre),
        ))
        .map_err(e)?;
    }
    let mut rows: Vec<&Vec<Option<f64>>> = Vec::new();
    if let Some(z) = &bm.matrix.zero_shot {
        rows.push(z);
    }
    rows.extend(bm.matrix.rows.iter());
    for (i, (label, row)) in row_labels(bm).iter().zip(rows).enumerate() {
        let top = y0 + (i as i32 + 1) * CELL_H;
        root.draw(&Text::new(
            label.clone(),
            (8, top + CELL_H / 2),
            font.clone().color(&BLACK).pos(left),
        ))
        .map_err(e)?;
        for (j, cell) in row.iter().enumerate() {
            let x = lay.label_w + j as i32 * lay.cell_w;
            let (bg, fg, text) = match cell {
                Some(v) => {
                    let (bg, fg) = heat_colour(*v);
                    (bg, fg, format!("{v:.1}"))
                }
                None => (RGBColor(235, 235, 235), RGBColor(150, 150, 150), "—".into()),
            };
            root.draw(&Rectangle::new(
                [(x, top), (x + lay.cell_w - 2, top + CELL_H - 2)],
                bg.filled(),
            ))
            .map_err(e)?;
            root.draw(&Text::new(
                text,
                (x + lay.cell_w / 2, top + CELL_H / 2),
                font.clone().color(&fg).pos(centre),
            ))
            .map_err(e)?;
        }
    }

    // Per-task curves.
    let (w, h) = root.dim_in_pixel();
    let curves_top = (lay.heat_top + lay.heat_h + 30) as u32;
    let area = root.clone().shrink((0, curves_top), (w, h - curves_top));
    let name_w = bm
        .matrix
        .tasks
        .iter()
        .map(|t| t.chars().count() * GLYPH_W)
        .max()
        .unwrap_or(40) as i32
        + 24;
    let has_zero = bm.matrix.zero_shot.is_some();
    let steps = bm.matrix.rows.len() as f64;
    let x_min = if has_zero { -0.2 } else { 0.8 };
    let x_max = steps.max(1.0) + 0.2;
    let mut chart = ChartBuilder::on(&area)
        .margin_left(10)
        .margin_right(name_w)
        .margin_top(10)
        .margin_bottom(10)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(x_min..x_max, 0f64..100f64)
        .map_err(e)?;
    let n_ticks = (steps as usize + usize::from(has_zero)).max(2);
    chart
        .configure_mesh()
        .x_labels(n_ticks)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
                format!("{}", x.round() as i64)
            } else {
                String::new()
            }
        })
        .y_labels(6)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc(if has_zero {
            "after step (0 = zero-shot)"
        } else {
            "after step"
        })
        .y_desc("score")
        .label_style(FONT)
        .axis_desc_style(FONT)
        .light_line_style(RGBColor(248, 248, 248))
        .draw()
        .map_err(e)?;
    let mut ends: Vec<(i32, i32, String, RGBColor)> = Vec::new();
    for (j, task) in bm.matrix.tasks.iter().enumerate() {
        let (r, g, b) = PALETTE[j % PALETTE.len()];
        let colour = RGBColor(r, g, b);
        let mut points: Vec<(f64, f64)> = Vec::new();
        if let Some(v) = bm.matrix.zero_shot.as_ref().and_then(|z| z[j]) {
            points.push((0.0, v));
        }
        for (k, row) in bm.matrix.rows.iter().enumerate() {
            if let Some(v) = row[j] {
                points.push(((k + 1) as f64, v));
            }
        }
        let Some(&last) = points.last() else { continue };
        chart
            .draw_series(LineSeries::new(
                points.clone(),
                Color::stroke_width(&colour, 2),
            ))
            .map_err(e)?;
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .map_err(e)?;
        let (px, py) = chart.backend_coord(&last);
        ends.push((px, py, task.clone(), colour));
    }
    // Labels at the line ends, pushed apart vertically so they never overlap.
    ends.sort_by_key(|(_, y, ..)| *y);
    let gap = GLYPH_H as i32 + 2;
    let mut placed: Vec<i32> = Vec::new();
    for (_, y, ..) in &ends {
        let y = placed.last().map_or(*y, |p| (*y).max(p + gap));
        placed.push(y);
    }
    let label_x = chart.backend_coord(&(x_max, 0.0)).0 + 8;
    for ((px, py, task, colour), ly) in ends.iter().zip(placed) {
        root.draw(&PathElement::new(
            vec![(*px, *py), (label_x - 2, ly)],
            Color::stroke_width(&colour, 1),
        ))
        .map_err(e)?;
        root.draw(&Text::new(
            task.clone(),
            (label_x, ly),
            font.clone().color(colour).pos(left),
        ))
        .map_err(e)?;
    }
    Ok(())
}

/// plotters' bitmap backend with text drawn from [`super::plot_font`].
pub(super) struct TextBitmap<'a> {
    inner: BitMapBackend<'a>,
}

fn glyph(c: char) -> &'static [u8; GLYPH_H] {
    GLYPHS
        .iter()
        .find(|(g, _)| *g == c)
        .or_else(|| GLYPHS.iter().find(|(g, _)| *g == '?'))
        .map(|(_, rows)| rows)
        .expect("the font has '?'")
}

impl<'a> DrawingBackend for TextBitmap<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn estimate_text_size<TStyle: BackendTextStyle>(
        &self,
        text: &str,
        _style: &TStyle,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        Ok(((text.chars().count() * GLYPH_W) as u32, GLYPH_H as u32))
    }

    fn draw_text<TStyle: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let w = (text.chars().count() * GLYPH_W) as i32;
        let h = GLYPH_H as i32;
        let anchor = style.anchor();
        let vertical = matches!(
            style.transform(),
            FontTransform::Rotate90 | FontTransform::Rotate270
        );
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Center => -w / 2,
            HPos::Right => -w,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let color = style.color();
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (gy, bits) in rows.iter().enumerate() {
                for gx in 0..GLYPH_W {
                    if bits >> (GLYPH_W - 1 - gx) & 1 == 1 {
                        let (x, y) = (dx + (i * GLYPH_W + gx) as i32, dy + gy as i32);
                        // Rotated text (the y axis title) is drawn bottom-to-top.
                        let p = if vertical {
                            (pos.0 + y, pos.1 - x)
                        } else {
                            (pos.0 + x, pos.1 + y)
                        };
                        self.inner.draw_pixel(p, color)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::AccuracyMatrix;
    use crate::workflow::matrix::MatrixRow;

    fn sample() -> BranchMatrix {
        let id = crate::history::CheckpointId::from_hex("0123456789abcdef0123456789abcdef01234567")
            .expect("oid");
        BranchMatrix {
            checkpoints: vec![
                MatrixRow {
                    id,
                    task: "mini-GQA".into(),
                },
                MatrixRow {
                    id,
                    task: "mini-OCRVQA".into(),
                },
            ],
            zero_shot: Some(MatrixRow {
                id,
                task: "base".into(),
            }),
            matrix: AccuracyMatrix {
                tasks: vec!["mini-GQA".into(), "mini-OCRVQA".into()],
                rows: vec![vec![Some(80.0), Some(10.0)], vec![Some(55.5), None]],
                zero_shot: Some(vec![Some(20.0), Some(5.0)]),
            },
        }
    }

    #[test]
    fn svg_has_cells_values_and_end_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.svg");
        plot_matrix(&sample(), "main", &path).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for needle in ["80.0", "55.5", "20.0", "—", "0 zero-shot", "2 mini-OCRVQA"] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        // The task names label the curves (and the columns).
        assert!(svg.matches("mini-GQA").count() >= 3);
    }

    #[test]
    fn png_is_a_decodable_image_with_text_pixels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.png");
        plot_matrix(&sample(), "main", &path).expect("plot");
        let img = image::open(&path).expect("decode").to_rgb8();
        let lay = layout(&sample());
        assert_eq!(img.dimensions(), lay.size);
        // The title is drawn in black at the top left: some dark pixels there.
        let dark = (0..300)
            .flat_map(|x| (8..28).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 60))
            .count();
        assert!(dark > 50, "title pixels: {dark}");
        // Row 1 under the zero-shot row, column 0 (80.0) is dark blue; the zero-shot cell
        // above it (20.0) is light.
        let x = (lay.label_w + 3) as u32;
        let light = img.get_pixel(x, (lay.heat_top + CELL_H + 3) as u32).0;
        assert!(light.iter().all(|&c| c > 180), "{light:?}");
        let y = (lay.heat_top + 2 * CELL_H + 3) as u32;
        let p = img.get_pixel(x, y).0;
        assert!(p[2] > p[0] && p[0] < 100, "{p:?}");
    }

    #[test]
    fn other_extensions_and_empty_matrices_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let msg = plot_matrix(&sample(), "m", &dir.path().join("m.jpg"))
            .expect_err("jpg")
            .to_string();
        assert!(msg.contains(".svg or .png"), "{msg}");
        let mut empty = sample();
        empty.matrix.tasks.clear();
        assert!(plot_matrix(&empty, "m", &dir.path().join("m.svg")).is_err());
    }
}
