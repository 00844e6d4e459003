//! Training data: a segmentation folder (SA-Med2D layout or plain images and
//! masks) prepared once into memory-mappable shards in the model's frame
//! (`prepare`), and the grouping its file names carry (`names`).

pub mod names;
pub mod prepare;
