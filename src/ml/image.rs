//! Image preprocessing as LLaVA-1.5 and HF's CLIPImageProcessor do it, bit for bit.
//!
//! Modes: `pad` (LLaVA's `expand2square` with the integer CLIP mean colour, then the CLIP path;
//! training's path and the default), `crop` (CLIPImageProcessor: shortest side to the tower size,
//! bicubic, center crop) and `resize` (bicubic straight to the tower size, aspect not kept).
//! Resizing reimplements PIL's 8-bit bicubic (Keys kernel a = −0.5, support widened by the scale
//! when downscaling, 22-bit fixed-point coefficients, horizontal then vertical pass with
//! rounding to u8 in between), so pixel values match PIL exactly.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::config::read_json;
use super::{MlError, Result};

/// How an image is brought to the tower's square input.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AspectMode {
    /// Pad to square with the mean colour, then resize (LLaVA-1.5 training).
    Pad,
    /// Resize straight to the square size.
    Resize,
    /// Shortest side to the size, then center crop (CLIPImageProcessor).
    Crop,
}

/// An RGB image, 8 bits per channel, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `3 * width * height` bytes, RGB interleaved.
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// Decode a PNG or JPEG file (converted to RGB).
    pub fn open(path: &Path) -> Result<Self> {
        let img = image::open(path).map_err(|e| match e {
            image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::NotFound => {
                MlError::MissingImage {
                    path: path.to_path_buf(),
                }
            }
            image::ImageError::IoError(io) => MlError::Read {
                path: path.to_path_buf(),
                source: io,
            },
            other => MlError::Image {
                path: path.to_path_buf(),
                source: other,
            },
        })?;
        let rgb = img.to_rgb8();
        Ok(Rgb8 {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            data: rgb.into_raw(),
        })
    }

    /// A solid image.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&rgb);
        }
        Rgb8 {
            width,
            height,
            data,
        }
    }

    fn px(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * 3 + c]
    }

    /// LLaVA's `expand2square`: paste centred on a square of `bg`.
    pub fn expand_to_square(&self, bg: [u8; 3]) -> Rgb8 {
        let (w, h) = (self.width, self.height);
        if w == h {
            return self.clone();
        }
        let side = w.max(h);
        let mut out = Rgb8::filled(side, side, bg);
        let (ox, oy) = if w > h {
            (0, (w - h) / 2)
        } else {
            ((h - w) / 2, 0)
        };
        for y in 0..h {
            let src = &self.data[y * w * 3..(y + 1) * w * 3];
            let start = ((y + oy) * side + ox) * 3;
            out.data[start..start + w * 3].copy_from_slice(src);
        }
        out
    }

    /// Crop a rectangle (must lie inside the image).
    pub fn crop(&self, left: usize, top: usize, width: usize, height: usize) -> Rgb8 {
        let mut data = Vec::with_capacity(width * height * 3);
        for y in top..top + height {
            let start = (y * self.width + left) * 3;
            data.extend_from_slice(&self.data[start..start + width * 3]);
        }
        Rgb8 {
            width,
            height,
            data,
        }
    }

    /// PIL's `Image.resize((width, height), BICUBIC)` for 8-bit RGB.
    pub fn resize_bicubic(&self, width: usize, height: usize) -> Rgb8 {
        let mut img = self.clone();
        if width != img.width {
            let (bounds, k) = pil_coeffs(img.width, width);
            let mut data = vec![0u8; width * img.height * 3];
            for y in 0..img.height {
                for (xx, &(xmin, n)) in bounds.iter().enumerate() {
                    for c in 0..3 {
                        let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                        for (x, &kx) in k[xx][..n].iter().enumerate() {
                            ss += img.px(xmin + x, y, c) as i64 * kx as i64;
                        }
                        data[(y * width + xx) * 3 + c] = clip8(ss);
                    }
                }
            }
            img = Rgb8 {
                width,
                height: img.height,
                data,
            };
        }
        if height != img.height {
            let (bounds, k) = pil_coeffs(img.height, height);
            let mut data = vec![0u8; img.width * height * 3];
            for (yy, &(ymin, n)) in bounds.iter().enumerate() {
                for x in 0..img.width {
                    for c in 0..3 {
                        let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                        for (y, &ky) in k[yy][..n].iter().enumerate() {
                            ss += img.px(x, ymin + y, c) as i64 * ky as i64;
                        }
                        data[(yy * img.width + x) * 3 + c] = clip8(ss);
                    }
                }
            }
            img = Rgb8 {
                width: img.width,
                height,
                data,
            };
        }
        img
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// PIL `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel (first input, count)
/// and fixed-point weights.
fn pil_coeffs(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<Vec<i32>>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut ks = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let mut k: Vec<f64> = (0..xmax)
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            for v in &mut k {
                *v /= ww;
            }
        }
        let fixed: Vec<i32> = k
            .iter()
            .map(|&v| {
                let s = v * (1u64 << PRECISION_BITS) as f64;
                if v < 0.0 {
                    (-0.5 + s) as i32
                } else {
                    (0.5 + s) as i32
                }
            })
            .collect();
        bounds.push((xmin as usize, xmax.max(0) as usize));
        ks.push(fixed);
    }
    (bounds, ks)
}

/// The preprocessing settings of a model (from `preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// Target of the shortest side.
    pub shortest_edge: usize,
    /// Center-crop size (height, width).
    pub crop: (usize, usize),
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel std.
    pub std: [f32; 3],
    /// Usually 1/255.
    pub rescale_factor: f64,
}

/// CLIP's normalisation mean.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's normalisation std.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl ImageProcessor {
    /// CLIP defaults for a tower of `size` pixels.
    pub fn clip(size: usize) -> Self {
        ImageProcessor {
            shortest_edge: size,
            crop: (size, size),
            mean: CLIP_MEAN,
            std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
        }
    }

    /// Read `preprocessor_config.json` from `dir`, or use CLIP defaults for `size` if absent.
    pub fn from_dir(dir: &Path, size: usize) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::clip(size));
        }
        let v = read_json(&path)?;
        let mut p = Self::clip(size);
        let num = |x: &Value| x.as_u64().map(|u| u as usize);
        match v.get("size") {
            Some(Value::Object(m)) => {
                if let Some(s) = m.get("shortest_edge").and_then(num) {
                    p.shortest_edge = s;
                } else if let Some(s) = m.get("height").and_then(num) {
                    p.shortest_edge = s;
                }
            }
            Some(x) => {
                if let Some(s) = num(x) {
                    p.shortest_edge = s;
                }
            }
            None => {}
        }
        match v.get("crop_size") {
            Some(Value::Object(m)) => {
                if let (Some(h), Some(w)) =
                    (m.get("height").and_then(num), m.get("width").and_then(num))
                {
                    p.crop = (h, w);
                }
            }
            Some(x) => {
                if let Some(s) = num(x) {
                    p.crop = (s, s);
                }
            }
            None => {}
        }
        let triple = |k: &str| -> Option<[f32; 3]> {
            let a = v.get(k)?.as_array()?;
            if a.len() != 3 {
                return None;
            }
            Some([
                a[0].as_f64()? as f32,
                a[1].as_f64()? as f32,
                a[2].as_f64()? as f32,
            ])
        };
        if let Some(m) = triple("image_mean") {
            p.mean = m;
        }
        if let Some(s) = triple("image_std") {
            p.std = s;
        }
        if let Some(r) = v.get("rescale_factor").and_then(Value::as_f64) {
            p.rescale_factor = r;
        }
        if p.crop != (size, size) {
            return Err(MlError::Unsupported {
                path,
                message: format!(
                    "crop_size {:?} differs from the vision tower's image_size {size}",
                    p.crop
                ),
            });
        }
        Ok(p)
    }

    /// The `preprocessor_config.json` of these settings (CLIPImageProcessor).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_resize": true,
            "size": {"shortest_edge": self.shortest_edge},
            "resample": 3,
            "do_center_crop": true,
            "crop_size": {"height": self.crop.0, "width": self.crop.1},
            "do_rescale": true,
            "rescale_factor": self.rescale_factor,
            "do_normalize": true,
            "image_mean": self.mean,
            "image_std": self.std,
            "do_convert_rgb": true,
        })
    }

    /// LLaVA's padding colour: `int(m * 255)` of the mean.
    pub fn pad_colour(&self) -> [u8; 3] {
        [
            (self.mean[0] as f64 * 255.0) as u8,
            (self.mean[1] as f64 * 255.0) as u8,
            (self.mean[2] as f64 * 255.0) as u8,
        ]
    }

    /// The image after geometric preprocessing (before normalisation).
    pub fn geometry(&self, img: &Rgb8, mode: AspectMode) -> Rgb8 {
        let (ch, cw) = self.crop;
        match mode {
            AspectMode::Resize => img.resize_bicubic(cw, ch),
            AspectMode::Pad => self.shortest_and_crop(&img.expand_to_square(self.pad_colour())),
            AspectMode::Crop => self.shortest_and_crop(img),
        }
    }

    fn shortest_and_crop(&self, img: &Rgb8) -> Rgb8 {
        let (w, h) = (img.width, img.height);
        let s = self.shortest_edge;
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = (s as f64 * long as f64 / short as f64) as usize;
        let (nh, nw) = if w <= h { (new_long, s) } else { (s, new_long) };
        let r = img.resize_bicubic(nw, nh);
        let (ch, cw) = self.crop;
        let mut r = r;
        if r.width < cw || r.height < ch {
            // CLIPImageProcessor pads with zeros when the image is smaller than the crop.
            let mut padded = Rgb8::filled(cw.max(r.width), ch.max(r.height), [0, 0, 0]);
            let ox = (padded.width - r.width) / 2;
            let oy = (padded.height - r.height) / 2;
            for y in 0..r.height {
                let start = ((y + oy) * padded.width + ox) * 3;
                padded.data[start..start + r.width * 3]
                    .copy_from_slice(&r.data[y * r.width * 3..(y + 1) * r.width * 3]);
            }
            r = padded;
        }
        let top = (r.height - ch) / 2;
        let left = (r.width - cw) / 2;
        r.crop(left, top, cw, ch)
    }

    /// Normalised CHW f32 values of a geometric result.
    pub fn normalize(&self, img: &Rgb8) -> Vec<f32> {
        let (w, h) = (img.width, img.height);
        let mut out = vec![0f32; 3 * w * h];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let v = (img.px(x, y, c) as f64 * self.rescale_factor) as f32;
                    out[c * w * h + y * w + x] = (v - self.mean[c]) / self.std[c];
                }
            }
        }
        out
    }

    /// Pixel values (3, H, W) for the model.
    pub fn preprocess(&self, img: &Rgb8, mode: AspectMode, device: &Device) -> Result<Tensor> {
        let g = self.geometry(img, mode);
        let v = self.normalize(&g);
        Ok(Tensor::from_vec(v, (3, g.height, g.width), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_colour_is_llava_integer_mean() {
        assert_eq!(ImageProcessor::clip(336).pad_colour(), [122, 116, 104]);
    }

    #[test]
    fn expand_to_square_centres_the_image() {
        let img = Rgb8::filled(4, 2, [255, 0, 0]);
        let sq = img.expand_to_square([1, 2, 3]);
        assert_eq!((sq.width, sq.height), (4, 4));
        assert_eq!(sq.px(0, 0, 0), 1);
        assert_eq!(sq.px(0, 1, 0), 255);
        assert_eq!(sq.px(3, 2, 0), 255);
        assert_eq!(sq.px(3, 3, 2), 3);
    }

    #[test]
    fn bicubic_keeps_constant_images_and_coefficients_sum_to_one() {
        let img = Rgb8::filled(37, 23, [10, 128, 250]);
        let r = img.resize_bicubic(16, 40);
        assert!(r.data.chunks(3).all(|p| p == [10, 128, 250]));
        for (i, o) in [(37, 16), (16, 40), (64, 32), (5, 5)] {
            let (_, ks) = pil_coeffs(i, o);
            for k in ks {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{s}");
            }
        }
    }

    #[test]
    fn shortest_edge_then_center_crop_sizes() {
        let p = ImageProcessor::clip(32);
        let img = Rgb8::filled(80, 40, [0, 0, 0]);
        for m in [AspectMode::Pad, AspectMode::Crop, AspectMode::Resize] {
            let g = p.geometry(&img, m);
            assert_eq!((g.width, g.height), (32, 32), "{m:?}");
        }
    }
}
