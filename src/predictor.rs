//! The predictor: set an image once (the expensive image side, cached), then
//! prompt with any number of boxes (the cheap decoder, all boxes in one batch).
//! CPU, or CUDA (`Device::Cuda`) with f32 or bf16 ViT GEMMs.

use std::path::Path;

use crate::cuda::CudaDevice;
use crate::cuda::blas::Blas;
use crate::cuda::model::{GpuFeatures, GpuSamUnet};
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

struct Cuda {
    // Fields drop in this order: the graphs (which reference cuBLAS kernels)
    // before the model's buffers, cuBLAS and the device.
    /// The image side recorded per batch size (None: capture failed, run
    /// eagerly); see crate::cuda::graph.
    graphs: std::cell::RefCell<
        std::collections::HashMap<usize, Option<crate::cuda::graph::ImageGraph>>,
    >,
    /// The decoder recorded per number of boxes.
    decoders: std::cell::RefCell<
        std::collections::HashMap<usize, Option<crate::cuda::graph::DecoderGraph>>,
    >,
    model: GpuSamUnet,
    blas: Blas,
    dev: CudaDevice,
}

// SAFETY: a Cuda backend is only ever used through &Predictor / &mut
// Predictor, and Predictor is not Sync (the RefCells), so its CUDA objects are
// used by one thread at a time; moving them to another thread is what CUDA
// allows: cudarc makes the context current before each of its calls, and the
// cuBLAS calls do the same (src/cuda/blas.rs); the graphs are only launched
// on their own stream.
unsafe impl Send for Cuda {}

impl Cuda {
    /// The image side: eagerly the first time for a batch size (which also
    /// warms cuBLAS up), then from a recording made right after.
    fn encode(&self, x: &Tensor) -> Result<GpuFeatures> {
        if !crate::cuda::graph::enabled() {
            return self.model.encode_image(&self.dev, &self.blas, x);
        }
        let b = x.dims().first().copied().unwrap_or(0);
        let mut graphs = self.graphs.borrow_mut();
        match graphs.get_mut(&b) {
            Some(Some(g)) => g.run(&self.dev, x),
            Some(None) => self.model.encode_image(&self.dev, &self.blas, x),
            None => {
                let f = self.model.encode_image(&self.dev, &self.blas, x)?;
                if graphs.len() < MAX_IMAGE_GRAPHS {
                    let g = crate::cuda::graph::ImageGraph::capture(
                        &self.dev,
                        &self.blas,
                        &self.model,
                        x.dims(),
                        &f,
                    )
                    .ok();
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
        f: &GpuFeatures,
        index: usize,
        boxes: &[[f32; 4]],
    ) -> Result<crate::cuda::GpuTensor> {
        if !crate::cuda::graph::enabled() {
            return self.model.decode(&self.dev, &self.blas, f, index, boxes);
        }
        let mut decoders = self.decoders.borrow_mut();
        match decoders.get_mut(&boxes.len()) {
            Some(Some(g)) => g.run(&self.dev, f, index, boxes),
            Some(None) => self.model.decode(&self.dev, &self.blas, f, index, boxes),
            None => {
                let low = self.model.decode(&self.dev, &self.blas, f, index, boxes)?;
                // Each recording keeps its own intermediates' memory: only the
                // first few box counts get one.
                if decoders.len() < MAX_DECODER_GRAPHS {
                    let g = crate::cuda::graph::DecoderGraph::capture(
                        &self.dev,
                        &self.blas,
                        &self.model,
                        boxes.len(),
                        f,
                        &low,
                    )
                    .ok();
                    decoders.insert(boxes.len(), g);
                }
                Ok(low)
            }
        }
    }
}

enum Backend {
    Cpu(SamUnet),
    Cuda(Box<Cuda>),
}

enum Features {
    Cpu(ImageFeatures),
    Cuda(GpuFeatures),
}

pub struct Predictor {
    backend: Backend,
    options: PredictorOptions,
    image: Option<(Features, ResizeInfo)>,
}

impl Predictor {
    /// A CPU predictor around a built model (f32).
    pub fn new(model: SamUnet, options: PredictorOptions) -> Result<Self> {
        match (options.device, options.dtype) {
            (Device::Cpu, DType::F32) => Ok(Predictor {
                backend: Backend::Cpu(model),
                options,
                image: None,
            }),
            (Device::Cpu, dt) => Err(Error::input(
                "Predictor",
                format!("the CPU backend computes in f32, not {}", dt.name()),
            )),
            (Device::Cuda(_), _) => Err(Error::input(
                "Predictor",
                "a CUDA predictor is built from weights: use Predictor::from_weights",
            )),
        }
    }

    /// Builds the model the weights describe on the chosen device.
    pub fn from_weights(w: &Weights, options: PredictorOptions) -> Result<Self> {
        match options.device {
            Device::Cpu => Self::new(SamUnet::from_weights(w)?, options),
            Device::Cuda(i) => {
                if options.dtype == DType::F16 {
                    return Err(Error::input("Predictor", "CUDA runs f32 or bf16, not f16"));
                }
                let dev = CudaDevice::new(i)?;
                let blas = Blas::new(dev.stream())?;
                let model = GpuSamUnet::from_weights(&dev, w, options.dtype)?;
                Ok(Predictor {
                    backend: Backend::Cuda(Box::new(Cuda {
                        dev,
                        blas,
                        model,
                        graphs: Default::default(),
                        decoders: Default::default(),
                    })),
                    options,
                    image: None,
                })
            }
        }
    }

    /// Loads weights (safetensors or a PyTorch checkpoint) and builds the model.
    pub fn from_file(path: impl AsRef<Path>, options: PredictorOptions) -> Result<Self> {
        Self::from_weights(&Weights::from_file(path)?, options)
    }

    pub fn config(&self) -> &SamUnetConfig {
        match &self.backend {
            Backend::Cpu(m) => &m.config,
            Backend::Cuda(c) => &c.model.config,
        }
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

    /// For a CUDA predictor, the CUDA graphs made so far: the batch sizes
    /// whose image side has been seen and the box counts the decoder has
    /// seen, each with whether it was recorded (false: capturing failed and it
    /// runs eagerly). Empty on the CPU.
    pub fn cuda_graphs(&self) -> CudaGraphs {
        fn sorted(mut v: Vec<(usize, bool)>) -> Vec<(usize, bool)> {
            v.sort();
            v
        }
        match &self.backend {
            Backend::Cuda(c) => CudaGraphs {
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
            Backend::Cpu(_) => CudaGraphs::default(),
        }
    }

    /// Only the image side, for a batch of preprocessed inputs [B, 3, S, S]
    /// (benchmarks); the features are dropped.
    pub fn encode_only(&self, x: &Tensor) -> Result<()> {
        let f = self.encode(x)?;
        if let (Backend::Cuda(c), Features::Cuda(_)) = (&self.backend, &f) {
            c.dev.synchronize()?;
        }
        Ok(())
    }

    fn encode(&self, x: &Tensor) -> Result<Features> {
        Ok(match &self.backend {
            Backend::Cpu(m) => Features::Cpu(m.encode_image(x, &mut Trace::default())?),
            Backend::Cuda(c) => Features::Cuda(c.encode(x)?),
        })
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
        f: &Features,
        index: usize,
        info: &ResizeInfo,
        boxes: &[[f32; 4]],
    ) -> Result<Prediction> {
        check_boxes(boxes, info)?;
        let model_boxes: Vec<[f32; 4]> =
            boxes.iter().map(|b| box_to_model_frame(*b, info)).collect();
        let (low, logits) = match (&self.backend, f) {
            (Backend::Cpu(m), Features::Cpu(f)) => {
                let low = m.decode(f, index, &model_boxes, &mut Trace::default())?;
                let logits = postprocess(&low, info, self.config().img_size)?;
                (low, logits)
            }
            (Backend::Cuda(c), Features::Cuda(f)) => {
                // Post-processing on the device too: only the logits come back.
                let low = c.decode(f, index, &model_boxes)?;
                let logits = crate::ops::resize::cuda::postprocess(
                    &c.dev,
                    &low,
                    info,
                    self.config().img_size,
                )?;
                (low.download(&c.dev)?, logits.download(&c.dev)?)
            }
            _ => return Err(Error::input("predict", "features from another backend")),
        };
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
