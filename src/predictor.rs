//! The predictor: set an image once (the expensive image side, cached), then
//! prompt with any number of boxes (the cheap decoder, all boxes in one batch).
//! CPU, or CUDA (`Device::Cuda`) with f32 or bf16 ViT GEMMs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::cuda::CudaDevice;
use crate::cuda::graph::{self, DecoderGraph, ImageGraph};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::io::image::RgbImage;
use crate::model::config::SamUnetConfig;
use crate::model::sam_unet::postprocess;
use crate::model::{ImageFeatures, SamUnet, Trace};
use crate::preprocess::{
    ResizeInfo, box_to_model_frame, normalize_pad, resize_image, validate_box,
};
use crate::tensor::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct PredictorOptions {
    pub device: Device,
    pub dtype: DType,
}

impl Default for PredictorOptions {
    fn default() -> Self {
        PredictorOptions {
            device: Device::Cpu,
            dtype: DType::F32,
        }
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

/// What `Predictor::cuda_graphs` reports: (batch size or box count, recorded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CudaGraphs {
    pub image_batches: Vec<(usize, bool)>,
    pub decoder_boxes: Vec<(usize, bool)>,
}

/// How many batch sizes / box counts get a CUDA graph of their own (each
/// keeps the memory of its intermediates); the rest run eagerly.
const MAX_IMAGE_GRAPHS: usize = 4;
const MAX_DECODER_GRAPHS: usize = 8;

/// What a CUDA predictor keeps beside the model: the CUDA graphs.
struct Cuda {
    /// The image side recorded per batch size (None: capture failed, run
    /// eagerly); see crate::cuda::graph.
    graphs: RefCell<HashMap<usize, Option<ImageGraph>>>,
    /// The decoder recorded per number of boxes.
    decoders: RefCell<HashMap<usize, Option<DecoderGraph>>>,
    dev: Arc<CudaDevice>,
}

// SAFETY: a Cuda is only ever used through &Predictor / &mut Predictor, and
// Predictor is not Sync (the RefCells), so its graphs are used by one thread
// at a time; moving them to another thread is what CUDA allows: cudarc makes
// the context current before each of its calls, the cuBLAS calls do the same
// (src/cuda/blas.rs), and the graphs are only launched on their own stream.
unsafe impl Send for Cuda {}

impl Cuda {
    /// The image side: eagerly the first time for a batch size (which also
    /// warms cuBLAS up and loads the kernels), then from a recording made
    /// right after.
    fn encode(&self, model: &SamUnet, x: &Tensor) -> Result<ImageFeatures> {
        let eager = || model.encode_image(x, &mut Trace::default());
        if !graph::enabled() {
            return eager();
        }
        let b = x.dims().first().copied().unwrap_or(0);
        let mut graphs = self.graphs.borrow_mut();
        match graphs.get_mut(&b) {
            Some(Some(g)) => g.run(&self.dev, x),
            Some(None) => eager(),
            None => {
                let f = eager()?;
                if graphs.len() < MAX_IMAGE_GRAPHS {
                    let g = ImageGraph::capture(&self.dev, model, x.dims(), &f).ok();
                    graphs.insert(b, g);
                }
                Ok(f)
            }
        }
    }

    /// The decoder for one image's boxes: eagerly the first time for a box
    /// count, then from a recording made right after.
    fn decode(
        &self,
        model: &SamUnet,
        f: &ImageFeatures,
        index: usize,
        boxes: &[[f32; 4]],
    ) -> Result<Tensor> {
        let eager = || model.decode(f, index, boxes, &mut Trace::default());
        if !graph::enabled() {
            return eager();
        }
        let mut decoders = self.decoders.borrow_mut();
        match decoders.get_mut(&boxes.len()) {
            Some(Some(g)) => g.run(&self.dev, f, index, boxes),
            Some(None) => eager(),
            None => {
                let low = eager()?;
                // Each recording keeps its own intermediates' memory: only the
                // first few box counts get one.
                if decoders.len() < MAX_DECODER_GRAPHS {
                    let g = DecoderGraph::capture(&self.dev, model, boxes.len(), f, &low).ok();
                    decoders.insert(boxes.len(), g);
                }
                Ok(low)
            }
        }
    }
}

/// A batch of images after the image side (`Predictor::encode_images`).
pub struct EncodedImages {
    feats: ImageFeatures,
    infos: Vec<ResizeInfo>,
}

impl EncodedImages {
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
}

/// Set an image, then prompt it with boxes: one model tree on the CPU or a
/// CUDA device (`PredictorOptions`).
pub struct Predictor {
    // Fields drop in this order: the features and the graphs (which reference
    // cuBLAS kernels and the device's memory) before the model.
    image: Option<(ImageFeatures, ResizeInfo)>,
    cuda: Option<Box<Cuda>>,
    model: SamUnet,
    options: PredictorOptions,
}

impl Predictor {
    /// A predictor around a built model: the model moves to the options'
    /// device and dtype (f32; or bf16 for the image side's GEMMs: on CUDA
    /// see SamUnet::to_device, on the CPU the ViT's linears through the
    /// AVX512_BF16 GEMM, or f32 with a notice where the CPU lacks it).
    pub fn new(mut model: SamUnet, mut options: PredictorOptions) -> Result<Self> {
        if (options.device, options.dtype) == (Device::Cpu, DType::BF16)
            && !crate::cpu::bf16_gemm::has_avx512_bf16()
        {
            // Said (once per process), and run in f32: never an illegal
            // instruction. `options().dtype` then reads f32.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                eprintln!(
                    "note: bf16 on the CPU needs AVX512_BF16, which this CPU lacks: running f32"
                )
            });
            options.dtype = DType::F32;
        }
        let cuda = match (options.device, options.dtype) {
            (Device::Cpu, DType::F32 | DType::BF16) => None,
            (Device::Cpu, dt) => {
                return Err(Error::input(
                    "Predictor",
                    format!("the CPU backend computes in f32, not {}", dt.name()),
                ));
            }
            (Device::Cuda(_), DType::F16) => {
                return Err(Error::input("Predictor", "CUDA runs f32 or bf16, not f16"));
            }
            (Device::Cuda(i), _) => {
                if model.config.head_dim() != 64 {
                    return Err(Error::Config(format!(
                        "the CUDA attention kernels need head dim 64, this model has {}",
                        model.config.head_dim()
                    )));
                }
                let dev = crate::cuda::shared_device(i)?;
                // cuBLAS loads now (its workspace too): a missing library is
                // an error here, not at the first image.
                dev.with_blas(|_| Ok(()))?;
                Some(Box::new(Cuda {
                    dev,
                    graphs: Default::default(),
                    decoders: Default::default(),
                }))
            }
        };
        model.to_device(options.device, options.dtype)?;
        Ok(Predictor {
            image: None,
            cuda,
            model,
            options,
        })
    }

    /// Builds the model the weights describe on the chosen device.
    pub fn from_weights(w: &Weights, options: PredictorOptions) -> Result<Self> {
        Self::new(SamUnet::from_weights(w)?, options)
    }

    /// Loads weights (safetensors or a PyTorch checkpoint) and builds the model.
    pub fn from_file(path: impl AsRef<Path>, options: PredictorOptions) -> Result<Self> {
        Self::from_weights(&Weights::from_file(path)?, options)
    }

    pub fn config(&self) -> &SamUnetConfig {
        &self.model.config
    }

    /// The model, on the predictor's device.
    pub fn model(&self) -> &SamUnet {
        &self.model
    }

    pub fn options(&self) -> PredictorOptions {
        self.options
    }

    /// Runs the image side (ResNet, ViT, adapters, neck) and caches its features.
    pub fn set_image(&mut self, img: &RgbImage) -> Result<()> {
        let (x, info) = self.prepare(std::slice::from_ref(img))?;
        self.image = None;
        let f = self.encode(&x)?;
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
        let (f, info) = self
            .image
            .as_ref()
            .ok_or_else(|| Error::input("predict", "no image set: call set_image first"))?;
        self.decode(f, 0, info, boxes)
    }

    /// A batch of images through the image side in one call, then each image's boxes.
    pub fn predict_batch(
        &self,
        images: &[RgbImage],
        boxes: &[Vec<[f32; 4]>],
    ) -> Result<Vec<Prediction>> {
        if images.len() != boxes.len() {
            return Err(Error::input(
                "predict_batch",
                format!("{} images but {} box lists", images.len(), boxes.len()),
            ));
        }
        if images.is_empty() {
            return Ok(vec![]);
        }
        let (x, infos) = self.prepare(images)?;
        // Validate every box before the expensive part.
        for (info, bs) in infos.iter().zip(boxes) {
            check_boxes(bs, info)?;
        }
        let f = self.encode(&x)?;
        infos
            .iter()
            .zip(boxes)
            .enumerate()
            .map(|(i, (info, bs))| self.decode(&f, i, info, bs))
            .collect()
    }

    /// Images through the image side in one call, their features kept, to
    /// be prompted later in any order (`predict_encoded`): a volume's
    /// slices, each encoded once for every object.
    pub fn encode_images(&self, images: &[RgbImage]) -> Result<EncodedImages> {
        if images.is_empty() {
            return Err(Error::input("encode_images", "no images"));
        }
        let (x, infos) = self.prepare(images)?;
        let feats = self.encode(&x)?;
        Ok(EncodedImages { feats, infos })
    }

    /// Boxes on image `index` of `encode_images`' batch -> its masks.
    pub fn predict_encoded(
        &self,
        enc: &EncodedImages,
        index: usize,
        boxes: &[[f32; 4]],
    ) -> Result<Prediction> {
        let info = enc.infos.get(index).ok_or_else(|| {
            Error::input(
                "predict_encoded",
                format!("image {index} of a batch of {}", enc.infos.len()),
            )
        })?;
        self.decode(&enc.feats, index, info, boxes)
    }

    /// For a CUDA predictor, the CUDA graphs made so far: the batch sizes
    /// whose image side has been seen and the box counts the decoder has
    /// seen, each with whether it was recorded (false: capturing failed and it
    /// runs eagerly). Empty on the CPU.
    pub fn cuda_graphs(&self) -> CudaGraphs {
        fn sorted(mut v: Vec<(usize, bool)>) -> Vec<(usize, bool)> {
            v.sort();
            v
        }
        match &self.cuda {
            Some(c) => CudaGraphs {
                image_batches: sorted(
                    c.graphs
                        .borrow()
                        .iter()
                        .map(|(b, g)| (*b, g.is_some()))
                        .collect(),
                ),
                decoder_boxes: sorted(
                    c.decoders
                        .borrow()
                        .iter()
                        .map(|(n, g)| (*n, g.is_some()))
                        .collect(),
                ),
            },
            None => CudaGraphs::default(),
        }
    }

    /// Only the image side, for a batch of preprocessed inputs [B, 3, S, S]
    /// (benchmarks); the features are dropped.
    pub fn encode_only(&self, x: &Tensor) -> Result<()> {
        let _f = self.encode(x)?;
        if let Some(c) = &self.cuda {
            c.dev.synchronize()?;
        }
        Ok(())
    }

    fn encode(&self, x: &Tensor) -> Result<ImageFeatures> {
        match &self.cuda {
            None => self.model.encode_image(x, &mut Trace::default()),
            Some(c) => c.encode(&self.model, x),
        }
    }

    fn prepare(&self, images: &[RgbImage]) -> Result<(Tensor, Vec<ResizeInfo>)> {
        let s = self.config().img_size;
        let mut v = Vec::with_capacity(images.len() * 3 * s * s);
        let mut infos = Vec::with_capacity(images.len());
        for img in images {
            if img.width == 0 || img.height == 0 || img.data.len() != img.width * img.height * 3 {
                return Err(Error::Image(format!(
                    "invalid image: {} x {} with {} bytes",
                    img.width,
                    img.height,
                    img.data.len()
                )));
            }
            let info = ResizeInfo::new(img.height, img.width, s)?;
            normalize_pad(&resize_image(img, &info)?, &info, &mut v);
            infos.push(info);
        }
        Ok((Tensor::from_f32(v, &[images.len(), 3, s, s]), infos))
    }

    fn decode(
        &self,
        f: &ImageFeatures,
        index: usize,
        info: &ResizeInfo,
        boxes: &[[f32; 4]],
    ) -> Result<Prediction> {
        check_boxes(boxes, info)?;
        let model_boxes: Vec<[f32; 4]> =
            boxes.iter().map(|b| box_to_model_frame(*b, info)).collect();
        let low = match &self.cuda {
            None => self
                .model
                .decode(f, index, &model_boxes, &mut Trace::default())?,
            Some(c) => c.decode(&self.model, f, index, &model_boxes)?,
        };
        // Post-processing on the model's device too: on CUDA only the logits
        // come back.
        let logits = postprocess(&low, info, self.config().img_size)?.to_host()?;
        let low = low.to_host()?;
        let hw = info.orig_h * info.orig_w;
        let masks = logits
            .as_f32()?
            .chunks(hw)
            .map(|m| m.iter().map(|&v| v > 0.0).collect())
            .collect();
        Ok(Prediction {
            width: info.orig_w,
            height: info.orig_h,
            masks,
            logits,
            low_res_logits: low,
            model_boxes,
        })
    }
}

fn check_boxes(boxes: &[[f32; 4]], info: &ResizeInfo) -> Result<()> {
    if boxes.is_empty() {
        return Err(Error::input(
            "predict",
            "no boxes given: pass at least one (x0, y0, x1, y1)",
        ));
    }
    for (i, b) in boxes.iter().enumerate() {
        validate_box(i, *b, info)?;
    }
    Ok(())
}
