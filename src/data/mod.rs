//! Training data: a segmentation folder (SA-Med2D layout or plain images and
//! masks) prepared once into memory-mappable shards in the model's frame
//! (`prepare`), read back by the online loader (`loader`: masks drawn and
//! boxes jittered as the authors' dataset class does, keyed random numbers),
//! and the grouping its file names carry (`names`).

pub mod loader;
pub mod names;
pub mod prepare;
pub mod synth;
