//! PNG bar charts: panels of horizontal bars (one per contender) with min–max whiskers, drawn on
//! an RGB buffer; text is rasterized with ab_glyph from a TrueType font (DejaVu Sans), encoded
//! with the `png` crate.

use std::fs;
use std::io::BufWriter;
use std::path::Path;

use ab_glyph::{Font as _, FontVec, PxScale, ScaleFont as _};
use anyhow::{Context as _, Result};

use crate::stats::fmt_num;

pub const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

pub struct Bar {
    pub label: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub highlight: bool,
}

pub struct Panel {
    pub title: String,
    /// What the axis counts, e.g. "MB/s"; `higher_is_better` goes in the title's note.
    pub unit: String,
    pub higher_is_better: bool,
    pub bars: Vec<Bar>,
}

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [20, 20, 20];
const GREY: Rgb = [200, 200, 200];
const BAR: Rgb = [110, 140, 190];
const BAR_HI: Rgb = [220, 110, 50];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
    font: FontVec,
}

impl Canvas {
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.max(0)..y1.min(self.h as i64) {
            for x in x0.max(0)..x1.min(self.w as i64) {
                let i = (y as usize * self.w + x as usize) * 3;
                self.px[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    fn blend(&mut self, x: i64, y: i64, c: Rgb, a: f32) {
        if x < 0 || y < 0 || x >= self.w as i64 || y >= self.h as i64 {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        for (px, target) in self.px[i..i + 3].iter_mut().zip(c) {
            let old = f32::from(*px);
            *px = (old + (f32::from(target) - old) * a.clamp(0.0, 1.0)) as u8;
        }
    }

    fn text_width(&self, s: &str, size: f32) -> f32 {
        let f = self.font.as_scaled(PxScale::from(size));
        s.chars().map(|ch| f.h_advance(f.glyph_id(ch))).sum()
    }

    /// Draws `s` with its baseline at `y`, starting at `x` (or ending at `x` when `right`).
    fn text(&mut self, s: &str, x: f32, y: f32, size: f32, c: Rgb, right: bool) {
        let scale = PxScale::from(size);
        let mut pen = if right { x - self.text_width(s, size) } else { x };
        let glyphs: Vec<_> = {
            let f = self.font.as_scaled(scale);
            s.chars()
                .map(|ch| {
                    let g = f.glyph_id(ch).with_scale_and_position(scale, ab_glyph::point(pen, y));
                    pen += f.h_advance(f.glyph_id(ch));
                    g
                })
                .collect()
        };
        for g in glyphs {
            if let Some(outline) = self.font.outline_glyph(g) {
                let b = outline.px_bounds();
                let mut hits = Vec::new();
                outline.draw(|gx, gy, cov| {
                    hits.push((b.min.x as i64 + i64::from(gx), b.min.y as i64 + i64::from(gy), cov))
                });
                for (px, py, cov) in hits {
                    self.blend(px, py, c, cov);
                }
            }
        }
    }
}

/// A "nice" axis end at or above `max`: 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten.
pub fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(max.log10().floor());
    for m in [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if m * mag >= max {
            return m * mag;
        }
    }
    10.0 * mag
}

pub fn load_font() -> Result<FontVec> {
    for p in FONT_PATHS {
        if let Ok(bytes) = fs::read(p) {
            return FontVec::try_from_vec(bytes).with_context(|| format!("parsing {p}"));
        }
    }
    anyhow::bail!("no TrueType font found (install fonts-dejavu-core): looked at {FONT_PATHS:?}")
}

/// Renders `panels` one under the other into a PNG at `path`.
pub fn render(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    const W: usize = 1000;
    const LABEL_W: f32 = 170.0;
    const RIGHT_W: f32 = 150.0;
    const ROW: f32 = 26.0;
    let heights: Vec<f32> = panels.iter().map(|p| 56.0 + ROW * p.bars.len() as f32 + 26.0).collect();
    let h = (50.0 + heights.iter().sum::<f32>()) as usize;
    let mut c = Canvas {
        w: W,
        h,
        px: vec![255; W * h * 3],
        font: load_font()?,
    };
    c.rect(0, 0, W as i64, h as i64, WHITE);
    c.text(title, 16.0, 32.0, 22.0, BLACK, false);
    let mut top = 50.0_f32;
    for (panel, ph) in panels.iter().zip(&heights) {
        let better = if panel.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        c.text(
            &format!("{} ({}, {better})", panel.title, panel.unit),
            16.0,
            top + 22.0,
            16.0,
            BLACK,
            false,
        );
        let x0 = LABEL_W;
        let x1 = W as f32 - RIGHT_W;
        let axis_max = nice_ceiling(panel.bars.iter().map(|b| b.max.max(b.median)).fold(0.0, f64::max));
        let sx = |v: f64| x0 + ((v / axis_max).clamp(0.0, 1.0) as f32) * (x1 - x0);
        let bars_top = top + 40.0;
        let bars_bottom = bars_top + ROW * panel.bars.len() as f32;
        for k in 0..=4 {
            let v = axis_max * f64::from(k) / 4.0;
            let x = sx(v);
            c.rect(x as i64, bars_top as i64, x as i64 + 1, bars_bottom as i64, GREY);
            let label = fmt_num(v);
            let tw = c.text_width(&label, 12.0);
            c.text(&label, x - tw / 2.0, bars_bottom + 15.0, 12.0, BLACK, false);
        }
        for (i, b) in panel.bars.iter().enumerate() {
            let y = bars_top + ROW * i as f32;
            c.text(&b.label, x0 - 8.0, y + 18.0, 14.0, BLACK, true);
            if b.median.is_finite() {
                let color = if b.highlight { BAR_HI } else { BAR };
                c.rect(
                    x0 as i64,
                    (y + 4.0) as i64,
                    sx(b.median) as i64,
                    (y + ROW - 4.0) as i64,
                    color,
                );
                let (wx0, wx1) = (sx(b.min) as i64, sx(b.max) as i64);
                let ym = (y + ROW / 2.0) as i64;
                c.rect(wx0, ym, wx1 + 1, ym + 1, BLACK);
                c.rect(wx0, ym - 5, wx0 + 1, ym + 6, BLACK);
                c.rect(wx1, ym - 5, wx1 + 1, ym + 6, BLACK);
                c.text(&fmt_num(b.median), x1 + 10.0, y + 18.0, 14.0, BLACK, false);
            } else {
                c.text("no result", x0 + 6.0, y + 18.0, 14.0, BLACK, false);
            }
        }
        top += ph;
    }
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), W as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&c.px)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_ends_are_round_numbers_above_the_data() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(830.0), 1000.0);
        assert_eq!(nice_ceiling(1700.0), 2000.0);
        assert_eq!(nice_ceiling(2100.0), 2500.0);
        assert_eq!(nice_ceiling(42.0), 50.0);
    }
}
