//! The grouping that SA-Med2D-16M file names carry (EVAL.md): images
//! `{modality}_{sub}--{Dataset}--{case}--{axis}_{slice:04d}`, masks
//! `{image stem}--{class:04d}_{instance:03d}`. Names that do not follow the
//! pattern (data_demo's, a plain folder's) group as `unknown`, never fail.

/// What an image's name says about where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageGroup {
    /// ct, mr, pet, x, ultrasound, fundus, endoscopy, dermoscopy, ... (the
    /// name before the first `_`, as the authors take it).
    pub modality: String,
    pub dataset: String,
    pub case: String,
}

pub const UNKNOWN: &str = "unknown";

/// The stem of a file name (no folders, no extension).
pub fn stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.rsplit_once('.').map_or(base, |(s, _)| s)
}

/// The grouping of an image name (a path or a stem).
pub fn image_group(name: &str) -> ImageGroup {
    let parts: Vec<&str> = stem(name).split("--").collect();
    let unknown = || ImageGroup {
        modality: UNKNOWN.into(),
        dataset: UNKNOWN.into(),
        case: UNKNOWN.into(),
    };
    if parts.len() < 4 || parts.iter().any(|p| p.is_empty()) {
        return unknown();
    }
    let Some((modality, _sub)) = parts[0].split_once('_') else {
        return unknown();
    };
    if modality.is_empty() {
        return unknown();
    }
    ImageGroup {
        modality: modality.to_string(),
        dataset: parts[1].to_string(),
        case: parts[2].to_string(),
    }
}

/// A mask name's class and instance (`--{class:04d}_{instance:03d}` after the
/// image stem), when it has them.
pub fn mask_class(name: &str) -> Option<(u32, u32)> {
    let (_, tail) = stem(name).rsplit_once("--")?;
    let (c, i) = tail.split_once('_')?;
    if c.len() != 4 || i.len() != 3 {
        return None;
    }
    Some((c.parse().ok()?, i.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sa_med2d_names_and_others() {
        let g = image_group("images/ct_00--AMOS2022--amos_0004--x_0075.png");
        assert_eq!(
            (g.modality.as_str(), g.dataset.as_str(), g.case.as_str()),
            ("ct", "AMOS2022", "amos_0004")
        );
        assert_eq!(
            image_group("train/images/amos_0004_75.png").modality,
            UNKNOWN
        );
        assert_eq!(image_group("x_00--A--b").dataset, UNKNOWN);
        assert_eq!(image_group("").case, UNKNOWN);
        assert_eq!(
            mask_class("masks/ct_00--AMOS2022--amos_0004--x_0075--0003_001.png"),
            Some((3, 1))
        );
        assert_eq!(mask_class("amos_0004_75_liver_000.png"), None);
        assert_eq!(stem("a/b/c.d.png"), "c.d");
    }
}
