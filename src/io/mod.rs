//! Reading and writing: weights (safetensors), images and masks.

pub mod image;
pub mod weights;

pub use weights::Weights;
