//! Drawing for CoIN-mini: an RGB canvas, filled shapes, a built-in 5×7 bitmap font, and a
//! byte-stable PNG encoder (stored deflate blocks, our own CRC-32 and Adler-32), so the same
//! seed always gives the same bytes whatever the version of any image crate.

/// An RGB image.
#[derive(Clone, Debug)]
pub struct Canvas {
    /// Width = height in pixels.
    pub size: u32,
    /// Row-major RGB bytes.
    pub pixels: Vec<u8>,
}

/// The shapes CoIN-mini draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// An axis-aligned square.
    Square,
    /// A disc.
    Circle,
    /// A triangle pointing up.
    Triangle,
    /// A square rotated 45°.
    Diamond,
    /// A plus sign.
    Cross,
    /// A wide, flat rectangle.
    Bar,
}

impl Canvas {
    /// A canvas filled with one colour.
    pub fn new(size: u32, bg: [u8; 3]) -> Self {
        let n = (size * size) as usize;
        let mut pixels = Vec::with_capacity(n * 3);
        for _ in 0..n {
            pixels.extend_from_slice(&bg);
        }
        Canvas { size, pixels }
    }

    /// Set one pixel (ignored outside the canvas).
    pub fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        let s = i64::from(self.size);
        if x >= 0 && y >= 0 && x < s && y < s {
            let i = ((y * s + x) * 3) as usize;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fill a shape centred at (cx, cy) with "radius" r (pixels).
    pub fn shape(&mut self, shape: Shape, cx: f64, cy: f64, r: f64, c: [u8; 3]) {
        let s = self.size as i64;
        for y in 0..s {
            for x in 0..s {
                let dx = x as f64 + 0.5 - cx;
                let dy = y as f64 + 0.5 - cy;
                let inside = match shape {
                    Shape::Square => dx.abs() <= r * 0.8 && dy.abs() <= r * 0.8,
                    Shape::Circle => dx * dx + dy * dy <= r * r,
                    Shape::Triangle => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
                    Shape::Diamond => dx.abs() + dy.abs() <= r,
                    Shape::Cross => {
                        (dx.abs() <= r * 0.3 && dy.abs() <= r)
                            || (dy.abs() <= r * 0.3 && dx.abs() <= r)
                    }
                    Shape::Bar => dx.abs() <= r && dy.abs() <= r * 0.35,
                };
                if inside {
                    self.put(x, y, c);
                }
            }
        }
    }

    /// Fill a rectangle [x0, x1) × [y0, y1).
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.put(x, y, c);
            }
        }
    }

    /// Draw upper-case text with the built-in font at integer `scale`, top-left at (x, y).
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let Some(rows) = glyph(ch) else { continue };
            let ox = x + i as i64 * 6 * scale;
            for (ry, row) in rows.iter().enumerate() {
                for (rx, bit) in row.bytes().enumerate() {
                    if bit == b'#' {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                self.put(
                                    ox + rx as i64 * scale + sx,
                                    y + ry as i64 * scale + sy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Encode as PNG (8-bit RGB, no filtering, stored deflate).
    pub fn png(&self) -> Vec<u8> {
        let w = self.size as usize;
        let mut raw = Vec::with_capacity((w * 3 + 1) * w);
        for row in self.pixels.chunks(w * 3) {
            raw.push(0);
            raw.extend_from_slice(row);
        }
        let mut z = vec![0x78, 0x01];
        let mut chunks = raw.chunks(65535).peekable();
        if chunks.peek().is_none() {
            z.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
        }
        while let Some(block) = chunks.next() {
            z.push(u8::from(chunks.peek().is_none()));
            let len = block.len() as u16;
            z.extend_from_slice(&len.to_le_bytes());
            z.extend_from_slice(&(!len).to_le_bytes());
            z.extend_from_slice(block);
        }
        z.extend_from_slice(&adler32(&raw).to_be_bytes());
        let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&self.size.to_be_bytes());
        ihdr.extend_from_slice(&self.size.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// The 5×7 glyph of an upper-case letter or digit (lower case is drawn upper case).
pub fn glyph(c: char) -> Option<[&'static str; 7]> {
    Some(match c.to_ascii_uppercase() {
        'A' => [
            ".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'B' => [
            "####.", "#...#", "#...#", "####.", "#...#", "#...#", "####.",
        ],
        'C' => [
            ".###.", "#...#", "#....", "#....", "#....", "#...#", ".###.",
        ],
        'D' => [
            "####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####.",
        ],
        'E' => [
            "#####", "#....", "#....", "####.", "#....", "#....", "#####",
        ],
        'F' => [
            "#####", "#....", "#....", "####.", "#....", "#....", "#....",
        ],
        'G' => [
            ".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####",
        ],
        'H' => [
            "#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'I' => [
            ".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        'J' => [
            "..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##..",
        ],
        'K' => [
            "#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#",
        ],
        'L' => [
            "#....", "#....", "#....", "#....", "#....", "#....", "#####",
        ],
        'M' => [
            "#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#",
        ],
        'N' => [
            "#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#",
        ],
        'O' => [
            ".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'P' => [
            "####.", "#...#", "#...#", "####.", "#....", "#....", "#....",
        ],
        'Q' => [
            ".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#",
        ],
        'R' => [
            "####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#",
        ],
        'S' => [
            ".####", "#....", "#....", ".###.", "....#", "....#", "####.",
        ],
        'T' => [
            "#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..",
        ],
        'U' => [
            "#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'V' => [
            "#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#..",
        ],
        'W' => [
            "#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#.",
        ],
        'X' => [
            "#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#",
        ],
        'Y' => [
            "#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#..",
        ],
        'Z' => [
            "#####", "....#", "...#.", "..#..", ".#...", "#....", "#####",
        ],
        '0' => [
            ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
        ],
        '1' => [
            "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        '2' => [
            ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
        ],
        '3' => [
            "####.", "....#", "....#", ".###.", "....#", "....#", "####.",
        ],
        '4' => [
            "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
        ],
        '5' => [
            "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
        ],
        '6' => [
            ".###.", "#....", "#....", "####.", "#...#", "#...#", ".###.",
        ],
        '7' => [
            "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
        ],
        '8' => [
            ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
        ],
        '9' => [
            ".###.", "#...#", "#...#", ".####", "....#", "....#", ".###.",
        ],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_decodes_with_the_image_crate() {
        let mut c = Canvas::new(40, [250, 250, 250]);
        c.shape(Shape::Circle, 10.0, 10.0, 6.0, [200, 0, 0]);
        c.text(2, 25, "AB12", 1, [0, 0, 0]);
        let bytes = c.png();
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (40, 40));
        assert_eq!(img.get_pixel(10, 10).0, [200, 0, 0]);
        assert_eq!(img.get_pixel(39, 0).0, [250, 250, 250]);
        // 'A' top row is ".###." → pixel (3, 25) is ink, (2, 25) is not.
        assert_eq!(img.get_pixel(3, 25).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(2, 25).0, [250, 250, 250]);
        // A large image needs several stored blocks.
        let big = Canvas::new(200, [1, 2, 3]).png();
        let img = image::load_from_memory(&big).unwrap().to_rgb8();
        assert_eq!(img.get_pixel(199, 199).0, [1, 2, 3]);
    }

    #[test]
    fn every_glyph_is_five_wide_and_distinct() {
        let chars: Vec<char> = ('A'..='Z').chain('0'..='9').collect();
        let mut seen = std::collections::HashSet::new();
        for c in chars {
            let g = glyph(c).unwrap();
            assert!(g.iter().all(|r| r.len() == 5), "{c}");
            assert!(seen.insert(g), "{c} duplicates another glyph");
        }
        assert!(glyph('?').is_none());
    }

    #[test]
    fn checksums() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
