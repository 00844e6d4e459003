//! Reading and writing: weights (safetensors), images and masks.

pub mod image;
pub mod pickle;
pub mod pth;
pub mod pth_write;
pub mod weights;
pub mod zip;

pub use weights::Weights;
