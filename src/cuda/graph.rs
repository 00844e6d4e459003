//! CUDA graphs: a single image costs a few hundred kernel launches and cuBLAS
//! calls and a prompt about a hundred, whose CPU cost (a few microseconds
//! each) would bound latency. The predictor records the image side once per
//! batch size and the decoder once per box count (stream capture) and replays
//! them: one launch each.
//!
//! A recording reads its inputs from buffers of its own and leaves its
//! outputs in buffers of its own (both allocated before the capture, so they
//! outlive it); everything in between is allocated and freed inside the
//! capture and so belongs to the graph. A replay copies the host input into
//! the input buffer, launches the graph, and copies the features out, so that
//! the caller's features stay valid when the graph runs again.
//!
//! Capturing may fail on a driver or cuBLAS that does not support it; the
//! caller then runs eagerly. `SAM_UNET_CUDA_GRAPHS=0` turns graphs off.

use std::sync::Arc;

use cudarc::driver::CudaGraph;

use crate::cuda::{CudaDevice, driver_err, launch_err};
use crate::error::{Error, Result};
use crate::model::{ImageFeatures, SamUnet, Trace};
use crate::tensor::Tensor;

/// Whether the predictor may use CUDA graphs (`SAM_UNET_CUDA_GRAPHS=0`: no).
pub fn enabled() -> bool {
    std::env::var("SAM_UNET_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

/// Records what `body` submits to the device's stream (thread-local capture,
/// so other threads' CUDA calls do not break it) into an instantiated graph.
/// Whatever fails, the stream is left out of capture mode and usable for
/// eager work.
pub fn record(dev: &CudaDevice, body: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    use cudarc::driver::sys;
    let st = dev.stream();
    st.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(driver_err("begin graph capture"))?;
    let recorded = body();
    // cudarc keeps the errors of its drops (a free refused by a broken
    // capture) and would return them from end_capture before ending the
    // capture: take them first.
    let pending = st.context().check_err();
    let graph = st.end_capture(sys::CUgraphInstantiate_flags(0));
    // Still capturing, or the status unknown: end it by hand below.
    let capturing = !st
        .capture_status()
        .is_ok_and(|c| c == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE);
    if capturing {
        // SAFETY: ends the capture begun above on this stream; the graph it
        // hands back (if any) is ours and destroyed at once.
        unsafe {
            if let Ok(g) = cudarc::driver::result::stream::end_capture(st.cu_stream())
                && !g.is_null()
            {
                let _ = cudarc::driver::result::graph::destroy(g);
            }
        }
        let _ = st.context().check_err();
    }
    recorded?;
    pending.map_err(driver_err("graph capture"))?;
    let graph = graph
        .map_err(driver_err("end graph capture"))?
        .ok_or_else(|| Error::CudaDriver {
            op: "end graph capture",
            msg: "the capture recorded nothing".into(),
        })?;
    graph.upload().map_err(driver_err("upload graph"))?;
    Ok(graph)
}

/// A zero f32 tensor of `dims` on `dev`.
fn zeros(dev: &Arc<CudaDevice>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_cuda_f32(dev, dev.alloc_zeros(dims.iter().product())?, dims.to_vec())
}

/// dst = src, both f32 on `dev`, of one shape (dst's own buffer, written in place).
fn copy_into(dev: &CudaDevice, dst: &mut Tensor, src: &Tensor, op: &'static str) -> Result<()> {
    if dst.dims() != src.dims() {
        return Err(Error::shape(
            op,
            format!("{:?} into {:?}", src.dims(), dst.dims()),
        ));
    }
    let s = src.cuda_f32(op)?;
    let mut d = dst.cuda_f32_mut(op)?;
    dev.stream()
        .memcpy_dtod(&s, &mut d)
        .map_err(driver_err("copy"))
}

/// A copy of t in a buffer of its own: what a replay hands out, so that the
/// caller's tensors stay valid when the graph runs again.
fn dup(dev: &Arc<CudaDevice>, t: &Tensor, op: &'static str) -> Result<Tensor> {
    let mut y = zeros_uninit(dev, t.dims())?;
    copy_into(dev, &mut y, t, op)?;
    Ok(y)
}

fn zeros_uninit(dev: &Arc<CudaDevice>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_cuda_f32(dev, dev.alloc(dims.iter().product())?, dims.to_vec())
}

/// The image side recorded for one input shape.
pub struct ImageGraph {
    /// [B, 3, S, S]
    input: Tensor,
    out: ImageFeatures,
    graph: CudaGraph,
}

impl ImageGraph {
    /// Records `model`'s image side (on `dev`) for inputs of `dims` =
    /// [B, 3, S, S]; `like` gives the shapes of its outputs (from an eager run).
    pub fn capture(
        dev: &Arc<CudaDevice>,
        model: &SamUnet,
        dims: &[usize],
        like: &ImageFeatures,
    ) -> Result<Self> {
        const OP: &str = "image graph";
        let input = zeros(dev, dims)?;
        let mut out = ImageFeatures {
            image_embeddings: zeros(dev, like.image_embeddings.dims())?,
            multi_scale_feature: zeros(dev, like.multi_scale_feature.dims())?,
        };
        let graph = record(dev, || {
            let f = model.encode_image(&input, &mut Trace::default())?;
            copy_into(dev, &mut out.image_embeddings, &f.image_embeddings, OP)?;
            copy_into(
                dev,
                &mut out.multi_scale_feature,
                &f.multi_scale_feature,
                OP,
            )?;
            Ok(())
            // f is dropped here, inside the capture: its memory is the graph's.
        })?;
        Ok(ImageGraph { input, out, graph })
    }

    /// Runs the recording on `x` (host, [B, 3, S, S] as captured): features in
    /// new buffers.
    pub fn run(&mut self, dev: &Arc<CudaDevice>, x: &Tensor) -> Result<ImageFeatures> {
        const OP: &str = "image graph";
        if x.dims() != self.input.dims() {
            return Err(Error::shape(
                OP,
                format!("input {:?}, recorded for {:?}", x.dims(), self.input.dims()),
            ));
        }
        let host = x.to_host()?;
        {
            let mut dst = self.input.cuda_f32_mut(OP)?;
            dev.stream()
                .memcpy_htod(host.as_f32()?, &mut dst)
                .map_err(driver_err("copy to device"))?;
        }
        self.graph.launch().map_err(launch_err("graph launch"))?;
        Ok(ImageFeatures {
            image_embeddings: dup(dev, &self.out.image_embeddings, OP)?,
            multi_scale_feature: dup(dev, &self.out.multi_scale_feature, OP)?,
        })
    }
}

/// The decoder recorded for one number of boxes, on one image's features.
pub struct DecoderGraph {
    /// [N, 4], model frame
    boxes: Tensor,
    /// one image: [1, C, G, G] and [1, 32, 4G, 4G]
    feats: ImageFeatures,
    /// [N, 1, 4G, 4G]
    low: Tensor,
    graph: CudaGraph,
}

impl DecoderGraph {
    /// Records `model`'s decoder for `n` boxes; `feats` gives the feature
    /// shapes (any batch), `low` the output's (from an eager run).
    pub fn capture(
        dev: &Arc<CudaDevice>,
        model: &SamUnet,
        n: usize,
        feats: &ImageFeatures,
        low: &Tensor,
    ) -> Result<Self> {
        const OP: &str = "decoder graph";
        let one = |t: &Tensor| -> Result<Tensor> {
            let mut d = t.dims().to_vec();
            d[0] = 1;
            zeros(dev, &d)
        };
        let boxes = zeros(dev, &[n, 4])?;
        let input = ImageFeatures {
            image_embeddings: one(&feats.image_embeddings)?,
            multi_scale_feature: one(&feats.multi_scale_feature)?,
        };
        let mut out = zeros(dev, low.dims())?;
        let graph = record(dev, || {
            let l = model.decode_boxes(&input, 0, &boxes, &mut Trace::default())?;
            copy_into(dev, &mut out, &l, OP)
        })?;
        Ok(DecoderGraph {
            boxes,
            feats: input,
            low: out,
            graph,
        })
    }

    /// Runs the recording for image `index` of `f` and `boxes` (as many as
    /// recorded): low-res logits [N, 1, 4G, 4G] in a new buffer.
    pub fn run(
        &mut self,
        dev: &Arc<CudaDevice>,
        f: &ImageFeatures,
        index: usize,
        boxes: &[[f32; 4]],
    ) -> Result<Tensor> {
        const OP: &str = "decoder graph";
        if boxes.len() != self.boxes.dims()[0] {
            return Err(Error::shape(
                OP,
                format!(
                    "{} boxes, recorded for {}",
                    boxes.len(),
                    self.boxes.dims()[0]
                ),
            ));
        }
        for (src, dst) in [
            (&f.image_embeddings, &mut self.feats.image_embeddings),
            (&f.multi_scale_feature, &mut self.feats.multi_scale_feature),
        ] {
            let per = dst.numel();
            if src.dims().get(1..) != dst.dims().get(1..) || index >= src.dims()[0] {
                return Err(Error::shape(
                    OP,
                    format!(
                        "features {:?} (image {index}), recorded for {:?}",
                        src.dims(),
                        dst.dims()
                    ),
                ));
            }
            copy_into(dev, dst, &src.view(index * per, dst.dims().to_vec())?, OP)?;
        }
        let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
        {
            let mut dst = self.boxes.cuda_f32_mut(OP)?;
            dev.stream()
                .memcpy_htod(&flat, &mut dst)
                .map_err(driver_err("copy to device"))?;
        }
        self.graph.launch().map_err(launch_err("graph launch"))?;
        dup(dev, &self.low, OP)
    }
}
