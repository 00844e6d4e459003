//! Line plots of a run's curves, stacked panels sharing the x axis: as SVG
//! (titles, tick labels) and as PNG (the same curves and tick values drawn
//! into pixels, for viewers without SVG). No plotting crate: a few polylines
//! do not need one.

use crate::error::{Error, Result};

pub struct Panel {
    pub title: String,
    /// (points (x, y), RGB colour), drawn in order.
    pub series: Vec<(Vec<(f64, f64)>, [u8; 3])>,
    /// Fixed y range, or None to fit the data.
    pub y_range: Option<(f64, f64)>,
}

pub struct Figure {
    pub panels: Vec<Panel>,
    pub x_label: String,
}

const W: f64 = 720.0;
const PANEL_H: f64 = 240.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// A panel's plotting box and its data ranges.
struct Frame {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    xr: (f64, f64),
    yr: (f64, f64),
}

impl Frame {
    fn map(&self, x: f64, y: f64) -> (f64, f64) {
        let fx = (x - self.xr.0) / (self.xr.1 - self.xr.0);
        let fy = (y - self.yr.0) / (self.yr.1 - self.yr.0);
        (
            self.x0 + fx * self.w,
            self.y0 + (1.0 - fy.clamp(-0.05, 1.05)) * self.h,
        )
    }
}

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

/// About five round tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + step * 1e-9 && out.len() < 12 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Figure {
    fn frames(&self) -> Vec<Frame> {
        let xr = range(
            self.panels
                .iter()
                .flat_map(|p| p.series.iter().flat_map(|s| s.0.iter().map(|q| q.0))),
        );
        self.panels
            .iter()
            .enumerate()
            .map(|(i, p)| Frame {
                x0: LEFT,
                y0: i as f64 * PANEL_H + TOP,
                w: W - LEFT - RIGHT,
                h: PANEL_H - TOP - BOTTOM,
                xr,
                yr: p.y_range.unwrap_or_else(|| {
                    range(p.series.iter().flat_map(|s| s.0.iter().map(|q| q.1)))
                }),
            })
            .collect()
    }

    fn height(&self) -> f64 {
        self.panels.len() as f64 * PANEL_H
    }

    pub fn svg(&self) -> String {
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
            self.height()
        );
        for (p, f) in self.panels.iter().zip(self.frames()) {
            s += &format!(
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n",
                f.x0, f.y0, f.w, f.h
            );
            s += &format!(
                "<text x=\"{}\" y=\"{}\" font-size=\"14\">{}</text>\n",
                f.x0,
                f.y0 - 8.0,
                escape(&p.title)
            );
            for t in ticks(f.yr.0, f.yr.1) {
                let (_, y) = f.map(f.xr.0, t);
                s += &format!(
                    "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                    f.x0,
                    f.x0 + f.w,
                    f.x0 - 6.0,
                    y + 4.0,
                    label(t)
                );
            }
            for t in ticks(f.xr.0, f.xr.1) {
                let (x, _) = f.map(t, f.yr.0);
                s += &format!(
                    "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                    f.y0 + f.h + 16.0,
                    label(t)
                );
            }
            s += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                f.x0 + f.w / 2.0,
                f.y0 + f.h + 32.0,
                escape(&self.x_label)
            );
            for (pts, c) in &p.series {
                let path: Vec<String> = pts
                    .iter()
                    .filter(|q| q.1.is_finite())
                    .map(|&(x, y)| {
                        let (a, b) = f.map(x, y);
                        format!("{a:.1},{b:.1}")
                    })
                    .collect();
                let col = format!("rgb({},{},{})", c[0], c[1], c[2]);
                if path.len() == 1 {
                    let (a, b) = path[0].split_once(',').expect("x,y");
                    s += &format!("<circle cx=\"{a}\" cy=\"{b}\" r=\"3\" fill=\"{col}\"/>\n");
                } else if !path.is_empty() {
                    s += &format!(
                        "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                        path.join(" ")
                    );
                }
            }
        }
        s + "</svg>\n"
    }

    /// The same figure as PNG bytes (tick values drawn with a 3 x 5 digit
    /// font; the titles are the SVG's).
    pub fn png(&self) -> Result<Vec<u8>> {
        let (w, h) = (W as u32, self.height() as u32);
        let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
        for (p, f) in self.panels.iter().zip(self.frames()) {
            for t in ticks(f.yr.0, f.yr.1) {
                let (_, y) = f.map(f.xr.0, t);
                line(&mut img, (f.x0, y), (f.x0 + f.w, y), [225, 225, 225]);
                text(&mut img, &label(t), f.x0 - 6.0, y - 5.0, true);
            }
            for t in ticks(f.xr.0, f.xr.1) {
                let (x, _) = f.map(t, f.yr.0);
                text(&mut img, &label(t), x + 6.0, f.y0 + f.h + 6.0, true);
            }
            let (x1, y1) = (f.x0 + f.w, f.y0 + f.h);
            for (a, b) in [
                ((f.x0, f.y0), (x1, f.y0)),
                ((x1, f.y0), (x1, y1)),
                ((x1, y1), (f.x0, y1)),
                ((f.x0, y1), (f.x0, f.y0)),
            ] {
                line(&mut img, a, b, [68, 68, 68]);
            }
            for (pts, c) in &p.series {
                let q: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|q| q.1.is_finite())
                    .map(|&(x, y)| f.map(x, y))
                    .collect();
                if q.len() == 1 {
                    for d in [(-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)] {
                        line(&mut img, q[0], (q[0].0 + d.0 * 2.0, q[0].1 + d.1 * 2.0), *c);
                    }
                }
                for s in q.windows(2) {
                    line(&mut img, s[0], s[1], *c);
                }
            }
        }
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| Error::Image(format!("writing the plot: {e}")))?;
        Ok(out.into_inner())
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn put(img: &mut image::RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, image::Rgb(c));
    }
}

/// A line by uniform steps along its longer axis.
fn line(img: &mut image::RgbImage, a: (f64, f64), b: (f64, f64), c: [u8; 3]) {
    let n = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        put(img, x.round() as i64, y.round() as i64, c);
    }
}

/// 3 x 5 glyphs of the characters tick labels use, rows top to bottom,
/// bit 2 the left column.
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

/// Text at twice the glyph size; `right`: x is where it ends.
fn text(img: &mut image::RgbImage, s: &str, x: f64, y: f64, right: bool) {
    let adv = 8.0;
    let x0 = if right {
        x - adv * s.chars().count() as f64
    } else {
        x
    };
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        for (r, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(
                            img,
                            (x0 + i as f64 * adv) as i64 + col * 2 + dx,
                            y as i64 + r as i64 * 2 + dy,
                            [40, 40, 40],
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        assert!(
            t.iter()
                .zip([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
                .all(|(a, b)| (a - b).abs() < 1e-12)
        );
        let t = ticks(3.0, 97.0);
        assert_eq!(t.first(), Some(&20.0));
        assert!(t.iter().all(|v| (3.0..=97.0).contains(v)));
    }

    #[test]
    fn figure_renders_svg_and_png() {
        let f = Figure {
            panels: vec![Panel {
                title: "a < b".into(),
                series: vec![(vec![(1.0, 2.0), (2.0, 1.0), (3.0, f64::NAN)], [0, 0, 255])],
                y_range: None,
            }],
            x_label: "update".into(),
        };
        let s = f.svg();
        assert!(s.contains("polyline") && s.contains("a &lt; b"));
        let png = f.png().unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
