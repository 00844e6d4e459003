//! Images and masks on disk: PNG and JPEG, 8 or 16 bit, grey, grey+alpha, RGB or
//! RGBA. Colour images are used as RGB (alpha dropped), grey images are
//! replicated to three channels, 16-bit samples are scaled to 8 bit
//! (v * 255 / 65535, rounded), as SAM-UNet's loader sees an 8-bit RGB image.

use std::path::Path;

use image::{DynamicImage, GenericImageView};

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major, interleaved: data[(y * width + x) * 3 + c].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::Image(format!("empty image ({width} x {height})")));
        }
        if data.len() != width * height * 3 {
            return Err(Error::Image(format!(
                "{} bytes cannot be a {width} x {height} RGB image",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

/// A binary mask, row-major, values 0 or 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

fn open(path: &Path) -> Result<DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let img = reader
        .decode()
        .map_err(|e| Error::Image(format!("{}: cannot decode: {e}", path.display())))?;
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Image(format!(
            "{}: empty image ({w} x {h})",
            path.display()
        )));
    }
    Ok(img)
}

/// Reads an image file as 8-bit RGB.
pub fn read_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let img = open(path)?;
    let (w, h) = img.dimensions();
    // `to_rgb8` replicates grey, drops alpha and scales 16-bit samples to 8 bit.
    RgbImage::new(w as usize, h as usize, img.to_rgb8().into_raw())
}

/// Reads a single-channel mask (0/255 or 0/1; any non-zero value is foreground).
pub fn read_mask(path: impl AsRef<Path>) -> Result<Mask> {
    let path = path.as_ref();
    let img = open(path)?;
    let (w, h) = img.dimensions();
    let data = img
        .to_luma8()
        .into_raw()
        .into_iter()
        .map(|v| u8::from(v > 0))
        .collect();
    Ok(Mask {
        width: w as usize,
        height: h as usize,
        data,
    })
}

/// Writes a mask as an 8-bit grey PNG with values 0 / 255.
pub fn write_mask_png(
    path: impl AsRef<Path>,
    width: usize,
    height: usize,
    mask: &[bool],
) -> Result<()> {
    let path = path.as_ref();
    let buf: Vec<u8> = mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
    let img = image::GrayImage::from_raw(width as u32, height as u32, buf).ok_or_else(|| {
        Error::Image(format!(
            "mask of {} pixels is not {width} x {height}",
            mask.len()
        ))
    })?;
    img.save(path)
        .map_err(|e| Error::Image(format!("{}: cannot write: {e}", path.display())))
}

/// A distinct colour per mask index.
pub fn palette(i: usize) -> [u8; 3] {
    const P: [[u8; 3]; 10] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 190],
    ];
    P[i % P.len()]
}

/// Writes the image with each mask blended in its colour (alpha 0.45) and each
/// box outlined.
pub fn write_overlay_png(
    path: impl AsRef<Path>,
    img: &RgbImage,
    masks: &[Vec<bool>],
    boxes: &[[f32; 4]],
) -> Result<()> {
    let path = path.as_ref();
    let (w, h) = (img.width, img.height);
    let mut out = img.data.clone();
    for (i, m) in masks.iter().enumerate() {
        let col = palette(i);
        for (p, &on) in m.iter().enumerate().take(w * h) {
            if on {
                for c in 0..3 {
                    let v = out[p * 3 + c] as f32 * 0.55 + col[c] as f32 * 0.45;
                    out[p * 3 + c] = v.round() as u8;
                }
            }
        }
    }
    for (i, b) in boxes.iter().enumerate() {
        let col = palette(i);
        let clampx = |v: f32| (v.max(0.0) as usize).min(w - 1);
        let clampy = |v: f32| (v.max(0.0) as usize).min(h - 1);
        let (x0, y0, x1, y1) = (
            clampx(b[0]),
            clampy(b[1]),
            clampx(b[2] - 1.0),
            clampy(b[3] - 1.0),
        );
        let mut put =
            |x: usize, y: usize| out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&col);
        for x in x0..=x1.max(x0) {
            put(x, y0);
            put(x, y1);
        }
        for y in y0..=y1.max(y0) {
            put(x0, y);
            put(x1, y);
        }
    }
    let img = image::RgbImage::from_raw(w as u32, h as u32, out)
        .ok_or_else(|| Error::Image("overlay size".into()))?;
    img.save(path)
        .map_err(|e| Error::Image(format!("{}: cannot write: {e}", path.display())))
}
