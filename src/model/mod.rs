//! SAM-UNet, mirroring the PyTorch module tree and its state_dict names.

pub mod adapters;
pub mod config;
pub mod image_encoder;
pub mod init;
pub mod mask_decoder;
pub mod prompt_encoder;
pub mod resnet;
pub mod sam_unet;
pub mod transformer;

pub use config::{ResNetConfig, SamUnetConfig};
pub use sam_unet::{ImageFeatures, SamUnet};

use crate::tensor::Tensor;

/// Named intermediates collected during a forward pass (for tests and debugging);
/// collecting is off unless `enabled`, and costs a reference count per entry.
#[derive(Default)]
pub struct Trace {
    pub enabled: bool,
    pub items: Vec<(String, Tensor)>,
}

impl Trace {
    pub fn on() -> Self {
        Trace {
            enabled: true,
            items: vec![],
        }
    }
    pub fn push(&mut self, name: impl Into<String>, t: &Tensor) {
        if self.enabled {
            self.items.push((name.into(), t.clone()));
        }
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.items.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}
