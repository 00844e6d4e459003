//! SAM-UNet: box-prompted medical image segmentation (SAM ViT-B + a ResNet branch),
//! inference and training, on CPU (the reference backend) and NVIDIA GPUs.
//!
//! ```no_run
//! use sam_unet::{Predictor, io::image::read_rgb};
//! let mut p = Predictor::from_file("sam-unet.safetensors", Default::default())?;
//! let img = read_rgb("ct.png")?;
//! p.set_image(&img)?;
//! let out = p.predict(&[[30.0, 40.0, 120.0, 160.0]])?;
//! println!("{} masks of {} x {}", out.masks.len(), out.height, out.width);
//! # Ok::<(), sam_unet::Error>(())
//! ```

pub mod autograd;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod nn;
pub mod ops;
pub mod predictor;
pub mod preprocess;
pub mod profile;
pub mod tensor;
#[cfg(test)]
pub(crate) mod testing;
pub mod train;
pub mod volume;

pub use error::{Error, Result};
pub use predictor::{CudaGraphs, Prediction, Predictor, PredictorOptions};
pub use tensor::{DType, Device, Shape, Tensor};
