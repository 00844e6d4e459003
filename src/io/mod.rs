//! Reading and writing: weights (safetensors), images and masks.

pub mod image;
pub mod pickle;
pub mod pth;
pub mod pth_write;
pub mod weights;
pub mod zip;

pub use weights::Weights;

/// Writes a file whole or not at all: a temporary file beside it (`.NAME.tmp`),
/// synced to disk, then renamed over `path`; on failure the temporary file is
/// removed and `path` is left as it was.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> crate::error::Result<()> {
    use std::io::Write;
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    r.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        crate::error::Error::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}
