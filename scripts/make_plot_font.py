#!/usr/bin/env python3
"""Rasterise printable ASCII (+ a few symbols) of DejaVu Sans Mono into 1-bit cells and write
src/workflow/plot_font.rs, the font `coin matrix --plot FILE.png` draws text with (plotters'
bitmap backend cannot draw text without system font libraries).

Run by hand: python3 scripts/make_plot_font.py /usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf
(needs Pillow). DejaVu fonts are free to use and modify (Bitstream Vera licence)."""
import sys
from PIL import Image, ImageDraw, ImageFont

W, H, SIZE = 7, 13, 11
font = ImageFont.truetype(sys.argv[1], SIZE)
chars = [chr(c) for c in range(32, 127)] + ["—", "→", "−", "≤"]
ascent, _ = font.getmetrics()
rows_out = []
for ch in chars:
    img = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(img)
    d.text((0, H - 2 - ascent), ch, fill=255, font=font)
    rows = []
    for y in range(H):
        bits = 0
        for x in range(W):
            if img.getpixel((x, y)) >= 96:
                bits |= 1 << (W - 1 - x)
        rows.append(bits)
    rows_out.append((ch, rows))
with open("src/workflow/plot_font.rs", "w") as f:
    f.write("//! A 1-bit monospace font for PNG plots, rasterised from DejaVu Sans Mono by\n")
    f.write("//! scripts/make_plot_font.py (generated; do not edit).\n\n")
    f.write(f"/// Glyph cell width in pixels.\npub const GLYPH_W: usize = {W};\n")
    f.write(f"/// Glyph cell height in pixels.\npub const GLYPH_H: usize = {H};\n\n")
    f.write("/// Each glyph: its character and one bit mask per row (bit W-1 = leftmost pixel).\n")
    f.write(f"pub const GLYPHS: [(char, [u8; {H}]); {len(rows_out)}] = [\n")
    for ch, rows in rows_out:
        esc = {"'": "\\'", "\\": "\\\\"}.get(ch, ch)
        f.write(f"    ('{esc}', [{', '.join(str(r) for r in rows)}]),\n")
    f.write("];\n")
