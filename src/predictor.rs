//! The predictor: set an image once (the expensive image side, cached), then
//! prompt with any number of boxes (the cheap decoder, all boxes in one batch).

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::image::RgbImage;
use crate::io::Weights;
use crate::model::{ImageFeatures, SamUnet, Trace};
use crate::preprocess::{box_to_model_frame, normalize_pad, resize_image, validate_box, ResizeInfo};
use crate::tensor::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct PredictorOptions {
    pub device: Device,
    pub dtype: DType,
}

impl Default for PredictorOptions {
    fn default() -> Self {
        PredictorOptions { device: Device::Cpu, dtype: DType::F32 }
    }
}

/// The masks of one image's boxes.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub width: usize,
    pub height: usize,
    /// One H x W row-major mask per box (logit > 0).
    pub masks: Vec<Vec<bool>>,
    /// [N, 1, H, W]
    pub logits: Tensor,
    /// [N, 1, 64, 64]
    pub low_res_logits: Tensor,
    /// The boxes in the model frame (256), as the decoder saw them.
    pub model_boxes: Vec<[f32; 4]>,
}

pub struct Predictor {
    model: SamUnet,
    options: PredictorOptions,
    image: Option<(ImageFeatures, ResizeInfo)>,
}

impl Predictor {
    pub fn new(model: SamUnet, options: PredictorOptions) -> Result<Self> {
        match (options.device, options.dtype) {
            (Device::Cpu, DType::F32) => {}
            (Device::Cpu, dt) => {
                return Err(Error::input("Predictor", format!("the CPU backend computes in f32, not {}", dt.name())));
            }
            (Device::Cuda(i), _) => {
                return Err(Error::CudaUnavailable(format!("cuda:{i} requested, but this build has no CUDA backend yet; use --device cpu")));
            }
        }
        Ok(Predictor { model, options, image: None })
    }

    /// Loads weights (safetensors) and builds the model they describe.
    pub fn from_file(path: impl AsRef<Path>, options: PredictorOptions) -> Result<Self> {
        let w = Weights::from_file(path)?;
        Self::new(SamUnet::from_weights(&w)?, options)
    }

    pub fn model(&self) -> &SamUnet {
        &self.model
    }

    pub fn options(&self) -> PredictorOptions {
        self.options
    }

    /// Runs the image side (ResNet, ViT, adapters, neck) and caches its features.
    pub fn set_image(&mut self, img: &RgbImage) -> Result<()> {
        let (x, info) = self.prepare(std::slice::from_ref(img))?;
        let f = self.model.encode_image(&x, &mut Trace::default())?;
        self.image = Some((f, info[0]));
        Ok(())
    }

    /// Whether an image is set.
    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// Boxes (x0, y0, x1, y1) in original pixels, max exclusive -> masks. All boxes
    /// go through the decoder as one batch.
    pub fn predict(&self, boxes: &[[f32; 4]]) -> Result<Prediction> {
        let (f, info) = self.image.as_ref().ok_or_else(|| Error::input("predict", "no image set: call set_image first"))?;
        self.decode(f, 0, info, boxes)
    }

    /// A batch of images through the image side in one call, then each image's boxes.
    pub fn predict_batch(&self, images: &[RgbImage], boxes: &[Vec<[f32; 4]>]) -> Result<Vec<Prediction>> {
        if images.len() != boxes.len() {
            return Err(Error::input("predict_batch", format!("{} images but {} box lists", images.len(), boxes.len())));
        }
        if images.is_empty() {
            return Ok(vec![]);
        }
        let (x, infos) = self.prepare(images)?;
        // Validate every box before the expensive part.
        for (info, bs) in infos.iter().zip(boxes) {
            check_boxes(bs, info)?;
        }
        let f = self.model.encode_image(&x, &mut Trace::default())?;
        infos.iter().zip(boxes).enumerate().map(|(i, (info, bs))| self.decode(&f, i, info, bs)).collect()
    }

    fn prepare(&self, images: &[RgbImage]) -> Result<(Tensor, Vec<ResizeInfo>)> {
        let s = self.model.config.img_size;
        let mut v = Vec::with_capacity(images.len() * 3 * s * s);
        let mut infos = Vec::with_capacity(images.len());
        for img in images {
            if img.width == 0 || img.height == 0 || img.data.len() != img.width * img.height * 3 {
                return Err(Error::Image(format!("invalid image: {} x {} with {} bytes", img.width, img.height, img.data.len())));
            }
            let info = ResizeInfo::new(img.height, img.width, s)?;
            normalize_pad(&resize_image(img, &info)?, &info, &mut v);
            infos.push(info);
        }
        Ok((Tensor::from_f32(v, &[images.len(), 3, s, s]), infos))
    }

    fn decode(&self, f: &ImageFeatures, index: usize, info: &ResizeInfo, boxes: &[[f32; 4]]) -> Result<Prediction> {
        check_boxes(boxes, info)?;
        let model_boxes: Vec<[f32; 4]> = boxes.iter().map(|b| box_to_model_frame(*b, info)).collect();
        let low = self.model.decode(f, index, &model_boxes, &mut Trace::default())?;
        let logits = self.model.postprocess(&low, info)?;
        let hw = info.orig_h * info.orig_w;
        let masks = logits.as_f32()?.chunks(hw).map(|m| m.iter().map(|&v| v > 0.0).collect()).collect();
        Ok(Prediction { width: info.orig_w, height: info.orig_h, masks, logits, low_res_logits: low, model_boxes })
    }
}

fn check_boxes(boxes: &[[f32; 4]], info: &ResizeInfo) -> Result<()> {
    if boxes.is_empty() {
        return Err(Error::input("predict", "no boxes given: pass at least one (x0, y0, x1, y1)"));
    }
    for (i, b) in boxes.iter().enumerate() {
        validate_box(i, *b, info)?;
    }
    Ok(())
}
