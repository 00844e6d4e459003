//! Pre- and post-processing exactly as SAM-UNet's reference: resize the longest
//! side to the model input (PIL bilinear, antialiased), normalise, zero-pad; boxes
//! to the model frame; a mask's box from its largest 8-connected component.

use crate::error::{Error, Result};
use crate::io::image::{Mask, RgbImage};
use crate::ops::resize::resize_u8_pil_bilinear;
use crate::tensor::Tensor;

pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Original and resized sizes of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizeInfo {
    pub orig_h: usize,
    pub orig_w: usize,
    pub new_h: usize,
    pub new_w: usize,
    /// The square model input side (256).
    pub size: usize,
}

impl ResizeInfo {
    /// scale = size / max(H, W); h' = int(H scale + 0.5), w' = int(W scale + 0.5).
    pub fn new(orig_h: usize, orig_w: usize, size: usize) -> Result<Self> {
        if orig_h == 0 || orig_w == 0 {
            return Err(Error::Image(format!("empty image ({orig_w} x {orig_h})")));
        }
        let scale = size as f64 / orig_h.max(orig_w) as f64;
        let new_h = ((orig_h as f64 * scale + 0.5) as usize).max(1);
        let new_w = ((orig_w as f64 * scale + 0.5) as usize).max(1);
        Ok(ResizeInfo {
            orig_h,
            orig_w,
            new_h,
            new_w,
            size,
        })
    }
}

/// Resizes an RGB image so that its longest side is `size`: new_h x new_w x 3.
pub fn resize_image(img: &RgbImage, info: &ResizeInfo) -> Result<Vec<u8>> {
    resize_u8_pil_bilinear(&img.data, img.height, img.width, 3, info.new_h, info.new_w)
}

/// Normalises a resized RGB image (h' x w' x 3) and zero-pads it bottom/right:
/// [3, size, size] values appended to `out`.
pub fn normalize_pad(resized: &[u8], info: &ResizeInfo, out: &mut Vec<f32>) {
    let s = info.size;
    let start = out.len();
    out.resize(start + 3 * s * s, 0.0);
    let dst = &mut out[start..];
    for y in 0..info.new_h {
        for x in 0..info.new_w {
            for c in 0..3 {
                dst[c * s * s + y * s + x] =
                    (resized[(y * info.new_w + x) * 3 + c] as f32 - PIXEL_MEAN[c]) / PIXEL_STD[c];
            }
        }
    }
}

/// The model input of one image: [1, 3, size, size], and its resize info.
pub fn preprocess(img: &RgbImage, size: usize) -> Result<(Tensor, ResizeInfo)> {
    let info = ResizeInfo::new(img.height, img.width, size)?;
    let resized = resize_image(img, &info)?;
    let mut v = Vec::with_capacity(3 * size * size);
    normalize_pad(&resized, &info, &mut v);
    Ok((Tensor::from_f32(v, &[1, 3, size, size]), info))
}

/// Checks a box (x0, y0, x1, y1) in original pixels, max exclusive:
/// finite, 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H.
pub fn validate_box(index: usize, b: [f32; 4], info: &ResizeInfo) -> Result<()> {
    let err = |reason: String| {
        Err(Error::InvalidBox {
            index,
            bbox: b,
            reason,
        })
    };
    if b.iter().any(|v| !v.is_finite()) {
        return err("coordinates must be finite numbers".into());
    }
    if b[2] <= b[0] || b[3] <= b[1] {
        return err("empty or inverted: need x0 < x1 and y0 < y1".into());
    }
    let (w, h) = (info.orig_w as f32, info.orig_h as f32);
    if b[0] < 0.0 || b[1] < 0.0 || b[2] > w || b[3] > h {
        return err(format!(
            "outside the {} x {} image (need 0 <= x0 < x1 <= {}, 0 <= y0 < y1 <= {})",
            info.orig_w, info.orig_h, info.orig_w, info.orig_h
        ));
    }
    Ok(())
}

/// Maps a box from original pixels to the model frame: x * (w'/W), y * (h'/H),
/// the factor rounded to f32 and the product computed in f32, as the reference
/// does on its float32 box tensor (this decides the last bit of the result).
pub fn box_to_model_frame(b: [f32; 4], info: &ResizeInfo) -> [f32; 4] {
    let sx = (info.new_w as f64 / info.orig_w as f64) as f32;
    let sy = (info.new_h as f64 / info.orig_h as f64) as f32;
    [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]
}

/// The box (min_col, min_row, max_col + 1, max_row + 1) of the largest
/// 8-connected component of a mask (the first in raster order among equals);
/// `None` for an empty mask.
pub fn box_from_mask(mask: &Mask) -> Option<[f32; 4]> {
    let (w, h) = (mask.width, mask.height);
    let mut seen = vec![false; w * h];
    let mut best: Option<(usize, [usize; 4])> = None;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if mask.data[start] == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut area = 0usize;
        let mut bb = [usize::MAX, usize::MAX, 0, 0];
        while let Some(p) = stack.pop() {
            let (y, x) = (p / w, p % w);
            area += 1;
            bb = [bb[0].min(x), bb[1].min(y), bb[2].max(x), bb[3].max(y)];
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (ny, nx) = (y as isize + dy, x as isize + dx);
                    if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                        continue;
                    }
                    let q = ny as usize * w + nx as usize;
                    if mask.data[q] != 0 && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        if best.is_none_or(|(a, _)| area > a) {
            best = Some((area, bb));
        }
    }
    best.map(|(_, b)| {
        [
            b[0] as f32,
            b[1] as f32,
            (b[2] + 1) as f32,
            (b[3] + 1) as f32,
        ]
    })
}

/// Resizes a 0/1 mask like the image (PIL bilinear on uint8, rounded):
/// new_h x new_w values in {0, 1}.
pub fn resize_mask(mask: &Mask, info: &ResizeInfo) -> Result<Vec<u8>> {
    resize_u8_pil_bilinear(
        &mask.data,
        mask.height,
        mask.width,
        1,
        info.new_h,
        info.new_w,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_component_not_whole_mask() {
        // Two blobs: a 2x2 at (0,0) and a 3x3 at (5,5); diagonal touch joins.
        let (w, h) = (10, 10);
        let mut data = vec![0u8; w * h];
        for (y, x) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            data[y * w + x] = 1;
        }
        for y in 5..8 {
            for x in 5..8 {
                data[y * w + x] = 1;
            }
        }
        data[8 * w + 8] = 1; // diagonal neighbour of (7,7): same component
        let m = Mask {
            width: w,
            height: h,
            data,
        };
        assert_eq!(box_from_mask(&m), Some([5.0, 5.0, 9.0, 9.0]));
        let empty = Mask {
            width: 3,
            height: 3,
            data: vec![0; 9],
        };
        assert_eq!(box_from_mask(&empty), None);
    }

    #[test]
    fn resize_info_rounds_like_reference() {
        let i = ResizeInfo::new(181, 258, 256).unwrap();
        assert_eq!((i.new_h, i.new_w), (180, 256));
        let i = ResizeInfo::new(155, 225, 256).unwrap();
        assert_eq!((i.new_h, i.new_w), (176, 256));
    }

    #[test]
    fn bad_boxes_are_typed_errors() {
        let i = ResizeInfo::new(100, 200, 256).unwrap();
        for b in [
            [10., 10., 5., 20.],
            [f32::NAN, 0., 5., 5.],
            [0., 0., 201., 50.],
            [-1., 0., 5., 5.],
            [3., 3., 3., 9.],
        ] {
            assert!(
                matches!(validate_box(0, b, &i), Err(Error::InvalidBox { .. })),
                "{b:?}"
            );
        }
        assert!(validate_box(0, [0., 0., 200., 100.], &i).is_ok());
    }
}
