//! Reading and writing: weights (safetensors), images and masks.

pub mod image;
pub mod pickle;
pub mod pth;
pub mod zip;
pub mod weights;

pub use weights::Weights;
