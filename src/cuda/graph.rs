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

use cudarc::driver::CudaGraph;

use crate::cuda::blas::Blas;
use crate::cuda::model::{GpuFeatures, GpuSamUnet};
use crate::cuda::{CudaDevice, GpuTensor, driver_err, launch_err};
use crate::error::{Error, Result};
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
    let capturing = st.capture_status().map_or(true, |c| {
        c != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    });
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

/// The image side recorded for one input shape.
pub struct ImageGraph {
    /// [B, 3, S, S]
    input: GpuTensor,
    out: GpuFeatures,
    graph: CudaGraph,
}

impl ImageGraph {
    /// Records `model`'s image side for inputs of `dims` = [B, 3, S, S]; `like`
    /// gives the shapes of its outputs (from an eager run).
    pub fn capture(
        dev: &CudaDevice,
        blas: &Blas,
        model: &GpuSamUnet,
        dims: &[usize],
        like: &GpuFeatures,
    ) -> Result<Self> {
        let input = GpuTensor::zeros(dev, dims)?;
        let mut out = GpuFeatures {
            image_embeddings: GpuTensor::zeros(dev, &like.image_embeddings.dims)?,
            multi_scale_feature: GpuTensor::zeros(dev, &like.multi_scale_feature.dims)?,
        };
        let st = dev.stream();
        let graph = record(dev, || {
            let f = model.encode_device(dev, blas, &input)?;
            if f.image_embeddings.dims != out.image_embeddings.dims
                || f.multi_scale_feature.dims != out.multi_scale_feature.dims
            {
                return Err(Error::shape(
                    "image graph",
                    "features of another shape than the eager run's",
                ));
            }
            st.memcpy_dtod(&f.image_embeddings.data, &mut out.image_embeddings.data)
                .map_err(driver_err("copy"))?;
            st.memcpy_dtod(
                &f.multi_scale_feature.data,
                &mut out.multi_scale_feature.data,
            )
            .map_err(driver_err("copy"))?;
            Ok(())
            // f is dropped here, inside the capture: its memory is the graph's.
        })?;
        Ok(ImageGraph { input, out, graph })
    }

    /// Runs the recording on `x` (host, [B, 3, S, S] as captured): features in
    /// new buffers.
    pub fn run(&mut self, dev: &CudaDevice, x: &Tensor) -> Result<GpuFeatures> {
        if x.dims() != self.input.dims.as_slice() {
            return Err(Error::shape(
                "image graph",
                format!("input {:?}, recorded for {:?}", x.dims(), self.input.dims),
            ));
        }
        let st = dev.stream();
        st.memcpy_htod(x.as_f32()?, &mut self.input.data)
            .map_err(driver_err("copy to device"))?;
        self.graph.launch().map_err(launch_err("graph launch"))?;
        let copy = |t: &GpuTensor| -> Result<GpuTensor> {
            let mut y = dev.alloc(t.numel())?;
            st.memcpy_dtod(&t.data, &mut y)
                .map_err(driver_err("copy"))?;
            Ok(GpuTensor {
                data: y,
                dims: t.dims.clone(),
            })
        };
        Ok(GpuFeatures {
            image_embeddings: copy(&self.out.image_embeddings)?,
            multi_scale_feature: copy(&self.out.multi_scale_feature)?,
        })
    }
}

/// The decoder recorded for one number of boxes, on one image's features.
pub struct DecoderGraph {
    /// [N * 4], model frame
    boxes: cudarc::driver::CudaSlice<f32>,
    /// one image: [1, C, G, G] and [1, 32, 4G, 4G]
    feats: GpuFeatures,
    /// [N, 1, 4G, 4G]
    low: GpuTensor,
    graph: CudaGraph,
}

impl DecoderGraph {
    /// Records `model`'s decoder for `n` boxes; `feats` gives the feature
    /// shapes (any batch), `low` the output's (from an eager run).
    pub fn capture(
        dev: &CudaDevice,
        blas: &Blas,
        model: &GpuSamUnet,
        n: usize,
        feats: &GpuFeatures,
        low: &GpuTensor,
    ) -> Result<Self> {
        let one = |t: &GpuTensor| -> Result<GpuTensor> {
            let mut d = t.dims.clone();
            d[0] = 1;
            GpuTensor::zeros(dev, &d)
        };
        let boxes = dev.alloc_zeros(n * 4)?;
        let input = GpuFeatures {
            image_embeddings: one(&feats.image_embeddings)?,
            multi_scale_feature: one(&feats.multi_scale_feature)?,
        };
        let mut out = GpuTensor::zeros(dev, &low.dims)?;
        let st = dev.stream();
        let graph = record(dev, || {
            let l = model.decode_device(dev, blas, &input, 0, &boxes)?;
            if l.dims != out.dims {
                return Err(Error::shape(
                    "decoder graph",
                    "logits of another shape than the eager run's",
                ));
            }
            st.memcpy_dtod(&l.data, &mut out.data)
                .map_err(driver_err("copy"))?;
            Ok(())
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
        dev: &CudaDevice,
        f: &GpuFeatures,
        index: usize,
        boxes: &[[f32; 4]],
    ) -> Result<GpuTensor> {
        let st = dev.stream();
        if boxes.len() * 4 != self.boxes.len() {
            return Err(Error::shape(
                "decoder graph",
                format!(
                    "{} boxes, recorded for {}",
                    boxes.len(),
                    self.boxes.len() / 4
                ),
            ));
        }
        for (src, dst) in [
            (&f.image_embeddings, &mut self.feats.image_embeddings),
            (&f.multi_scale_feature, &mut self.feats.multi_scale_feature),
        ] {
            let per = dst.numel();
            if src.dims[1..] != dst.dims[1..] || index >= src.dims[0] {
                return Err(Error::shape(
                    "decoder graph",
                    format!(
                        "features {:?} (image {index}), recorded for {:?}",
                        src.dims, dst.dims
                    ),
                ));
            }
            st.memcpy_dtod(
                &src.data.slice(index * per..(index + 1) * per),
                &mut dst.data,
            )
            .map_err(driver_err("copy"))?;
        }
        let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
        st.memcpy_htod(&flat, &mut self.boxes)
            .map_err(driver_err("copy to device"))?;
        self.graph.launch().map_err(launch_err("graph launch"))?;
        let mut y = dev.alloc(self.low.numel())?;
        st.memcpy_dtod(&self.low.data, &mut y)
            .map_err(driver_err("copy"))?;
        Ok(GpuTensor {
            data: y,
            dims: self.low.dims.clone(),
        })
    }
}
