//! Image and weight formats: PNG and JPEG, 8 and 16 bit, grey, grey+alpha, RGB,
//! RGBA read as 8-bit RGB; masks; safetensors with f32 / f16 / bf16 tensors.

use sam_unet::io::Weights;
use sam_unet::io::image::{read_mask, read_rgb};
use sam_unet::io::weights::write_safetensors;

mod common;

fn tmp(name: &str) -> std::path::PathBuf {
    common::scratch().join(name)
}

/// A fresh folder of its own.
fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn images_of_every_kind_read_as_rgb8() {
    let (w, h) = (5u32, 3u32);
    // 16-bit grey: 65535 -> 255, 257 * 100 -> 100.
    let p = tmp("g16.png");
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(w, h, |x, _| {
        image::Luma([if x == 0 { 65535 } else { 25700 }])
    })
    .save(&p)
    .unwrap();
    let img = read_rgb(&p).unwrap();
    assert_eq!((img.width, img.height), (5, 3));
    assert_eq!(&img.data[..6], &[255, 255, 255, 100, 100, 100]);
    // 8-bit grey + alpha, RGBA: alpha dropped.
    let p = tmp("la.png");
    image::GrayAlphaImage::from_fn(w, h, |_, _| image::LumaA([42, 7]))
        .save(&p)
        .unwrap();
    assert!(read_rgb(&p).unwrap().data.iter().all(|&v| v == 42));
    let p = tmp("rgba.png");
    image::RgbaImage::from_fn(w, h, |_, _| image::Rgba([1, 2, 3, 0]))
        .save(&p)
        .unwrap();
    assert_eq!(&read_rgb(&p).unwrap().data[..3], &[1, 2, 3]);
    // 16-bit RGB.
    let p = tmp("rgb16.png");
    image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(w, h, |_, _| {
        image::Rgb([0, 32896, 65535])
    })
    .save(&p)
    .unwrap();
    assert_eq!(&read_rgb(&p).unwrap().data[..3], &[0, 128, 255]);
    // JPEG (lossy: a flat image stays close).
    let p = tmp("flat.jpg");
    image::RgbImage::from_fn(16, 16, |_, _| image::Rgb([120, 60, 200]))
        .save(&p)
        .unwrap();
    let j = read_rgb(&p).unwrap();
    assert!(j.data.chunks(3).all(|c| (c[0] as i32 - 120).abs() <= 3
        && (c[1] as i32 - 60).abs() <= 3
        && (c[2] as i32 - 200).abs() <= 3));
    // Masks: 0/255 and 0/1 both give 0/1.
    let p = tmp("m.png");
    image::GrayImage::from_fn(4, 1, |x, _| image::Luma([[0, 255, 1, 0][x as usize]]))
        .save(&p)
        .unwrap();
    assert_eq!(read_mask(&p).unwrap().data, vec![0, 1, 1, 0]);
}

#[test]
fn safetensors_f32_f16_bf16_load_as_f32() {
    let v = [1.5f32, -2.25, 0.125];
    let f16: Vec<u8> = v
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = v
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    let f32b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let p = tmp("mixed.safetensors");
    write_safetensors(
        &p,
        &[
            ("a".into(), safetensors::Dtype::F16, vec![3], f16),
            ("b".into(), safetensors::Dtype::BF16, vec![3], bf16),
            ("c".into(), safetensors::Dtype::F32, vec![1, 3], f32b),
        ],
    )
    .unwrap();
    let w = Weights::from_file(&p).unwrap();
    for n in ["a", "b", "c"] {
        assert_eq!(w.get(n).unwrap().as_f32().unwrap(), &v, "{n}");
    }
    assert_eq!(w.get("c").unwrap().dims(), &[1, 3]);
}

/// The real-file samples (scripts/fetch-samples.sh); None, said, when they
/// are not there (a failure in CI).
fn samples() -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(
        std::env::var("SAM_UNET_SAMPLES")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.samples").into()),
    );
    if dir.join("nibabel/anatomical.nii").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").is_err(),
        "samples missing at {} (scripts/fetch-samples.sh)",
        dir.display()
    );
    println!(
        "SKIPPED: no samples at {} (run scripts/fetch-samples.sh)",
        dir.display()
    );
    None
}

/// A header with a real geometry: anisotropic voxels in mm, a rotation in
/// the qform, another affine in the sform.
fn geometry() -> nifti::NiftiHeader {
    nifti::NiftiHeader {
        pixdim: [-1.0, 0.8, 0.7, 2.5, 1.0, 1.0, 1.0, 1.0],
        xyzt_units: 2 | 8,
        qform_code: 1,
        sform_code: 2,
        quatern_b: 0.1,
        quatern_c: -0.2,
        quatern_d: 0.3,
        quatern_x: -90.5,
        quatern_y: 12.25,
        quatern_z: -33.0,
        srow_x: [-0.8, 0.01, 0.0, 90.5],
        srow_y: [0.0, 0.7, 0.02, -12.25],
        srow_z: [0.0, 0.0, 2.5, -33.0],
        ..Default::default()
    }
}

fn same_geometry(a: &nifti::NiftiHeader, b: &nifti::NiftiHeader) {
    assert_eq!(&a.pixdim[..4], &b.pixdim[..4]);
    assert_eq!(
        (a.qform_code, a.sform_code, a.xyzt_units),
        (b.qform_code, b.sform_code, b.xyzt_units)
    );
    assert_eq!(
        [
            a.quatern_b,
            a.quatern_c,
            a.quatern_d,
            a.quatern_x,
            a.quatern_y,
            a.quatern_z
        ],
        [
            b.quatern_b,
            b.quatern_c,
            b.quatern_d,
            b.quatern_x,
            b.quatern_y,
            b.quatern_z
        ]
    );
    assert_eq!(
        (a.srow_x, a.srow_y, a.srow_z),
        (b.srow_x, b.srow_y, b.srow_z)
    );
}

/// A synthetic volume written and read back (.nii and .nii.gz): every
/// voxel and the geometry; its label volume keeps the geometry too.
#[test]
fn nifti_round_trip_keeps_geometry() {
    use sam_unet::volume::{read_nifti, write_labels, write_nifti};
    let dir = tmpdir("nifti");
    let dims = [7usize, 5, 3];
    let v: Vec<f32> = (0..105).map(|i| i as f32 * 0.5 - 3.0).collect();
    let h = geometry();
    for name in ["v.nii", "v.nii.gz"] {
        let p = dir.join(name);
        write_nifti(&p, &h, dims, 16, bytemuck::cast_slice(&v), "synthetic", 0).unwrap();
        let r = read_nifti(&p).unwrap();
        assert_eq!(r.dims, dims);
        assert_eq!(r.data, v);
        assert_eq!(r.spacing, [0.800000011920929, 0.699999988079071, 2.5]);
        same_geometry(&r.header, &h);
        let labels: Vec<u8> = (0..105).map(|i| (i % 3) as u8).collect();
        let lp = dir.join(format!("labels-{name}"));
        write_labels(&lp, &r, &labels, "CT window W400 L40").unwrap();
        let l = read_nifti(&lp).unwrap();
        assert_eq!(l.dims, dims);
        assert_eq!(l.data, labels.iter().map(|&x| x as f32).collect::<Vec<_>>());
        same_geometry(&l.header, &h);
        assert_eq!((l.header.datatype, l.header.intent_code), (2, 1002));
        assert!(String::from_utf8_lossy(&l.header.descrip).starts_with("CT window W400 L40"));
    }
}

/// Damaged and unsupported files: each an error that names the problem,
/// never a panic; every cut of a good file too.
#[test]
fn bad_nifti_files_fail_cleanly() {
    use sam_unet::volume::{read_nifti, write_nifti};
    let dir = tmpdir("nifti-bad");
    let good = dir.join("good.nii");
    let v = vec![1.0f32; 4 * 4 * 4];
    write_nifti(
        &good,
        &geometry(),
        [4, 4, 4],
        16,
        bytemuck::cast_slice(&v),
        "",
        0,
    )
    .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let err = |name: &str, b: &[u8]| -> String {
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        let r = std::panic::catch_unwind(|| read_nifti(&p));
        let r = r.unwrap_or_else(|_| panic!("{name}: the reader panicked"));
        r.err()
            .unwrap_or_else(|| panic!("{name}: read"))
            .to_string()
    };
    for cut in [0, 10, 200, 348, 352, 360, bytes.len() - 1] {
        let e = err("cut.nii", &bytes[..cut]);
        assert!(
            e.contains("truncated") || e.contains("not a NIfTI"),
            "cut at {cut}: {e}"
        );
    }
    let with = |o: usize, b: &[u8]| {
        let mut v = bytes.clone();
        v[o..o + b.len()].copy_from_slice(b);
        v
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("nifti2", with(0, &540i32.to_le_bytes()), "NIfTI-2"),
        ("pair", with(344, b"ni1\0"), ".hdr/.img pair"),
        ("magic", with(344, b"abcd"), "magic"),
        ("4d", with(40, &[4, 0, 4, 0, 4, 0, 4, 0, 3, 0]), "4-D"),
        ("rgb", with(70, &128i16.to_le_bytes()), "RGB24"),
        ("dim0", with(40, &9i16.to_le_bytes()), "dim[0]"),
        ("negdim", with(42, &(-4i16).to_le_bytes()), "at least 1"),
        ("offset", with(108, &f32::NAN.to_le_bytes()), "voxel offset"),
        ("offset2", with(108, &1e9f32.to_le_bytes()), "truncated"),
        (
            "huge",
            with(42, &[255, 127, 255, 127, 255, 127]),
            "truncated",
        ),
        (
            "random",
            (0..500u32).map(|i| (i * 7919 % 251) as u8).collect(),
            "not a NIfTI",
        ),
    ];
    for (name, b, want) in cases {
        let e = err(&format!("{name}.nii"), &b);
        assert!(e.contains(want), "{name}: {e}");
    }
    // A gzip stream cut short.
    let gz = dir.join("good.nii.gz");
    write_nifti(
        &gz,
        &geometry(),
        [4, 4, 4],
        16,
        bytemuck::cast_slice(&v),
        "",
        0,
    )
    .unwrap();
    let g = std::fs::read(&gz).unwrap();
    let e = err("cut.nii.gz", &g[..g.len() / 2]);
    assert!(e.contains("unreadable") || e.contains("truncated"), "{e}");
}

/// The NIfTI samples nibabel ships (written by other tools): the 3-D ones
/// read, keep their geometry through a label volume; the 4-D, NIfTI-2 and
/// CIFTI ones are refused by name; none panics, nor does any cut of them.
#[test]
fn real_nifti_samples_read_or_fail_cleanly() {
    use sam_unet::volume::{read_nifti, write_labels};
    let Some(dir) = samples() else { return };
    let dir = dir.join("nibabel");
    let out = tmpdir("nifti-samples");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = std::panic::catch_unwind(|| read_nifti(&p))
            .unwrap_or_else(|_| panic!("{name}: the reader panicked"));
        let expect_err = match name.as_str() {
            "example4d.nii.gz" | "functional.nii" => Some("4-D"),
            "example_nifti2.nii.gz" | "row_major.dconn.nii" => Some("NIfTI-2"),
            _ => None,
        };
        match (r, expect_err) {
            (Ok(v), None) => {
                let n: usize = v.dims.iter().product();
                assert_eq!(v.data.len(), n, "{name}");
                // NaN voxels are data (resampled_anat_moved.nii has them
                // outside its field of view): the window maps them to 0.
                let nan = v.data.iter().filter(|x| !x.is_finite()).count();
                let labels: Vec<u8> = v.data.iter().map(|&x| (x > 0.0) as u8).collect();
                let lp = out.join(format!("{name}-labels.nii.gz"));
                write_labels(&lp, &v, &labels, "test").unwrap();
                let l = read_nifti(&lp).unwrap();
                assert_eq!(l.dims, v.dims, "{name}");
                same_geometry(&l.header, &v.header);
                println!(
                    "{name}: {:?} voxels of {:?} read ({nan} not finite); labels written and read back",
                    v.dims, v.spacing
                );
            }
            (Err(e), Some(want)) => {
                let e = e.to_string();
                assert!(e.contains(want), "{name}: {e}");
                println!("{name}: refused: {e}");
            }
            (Ok(v), Some(want)) => {
                panic!("{name} read as {:?}; expected an error ({want})", v.dims)
            }
            (Err(e), None) => panic!("{name}: {e}"),
        }
        // Cut anywhere: an error, not a panic.
        let b = std::fs::read(&p).unwrap();
        for cut in [b.len() / 3, b.len() - 1] {
            let c = out.join(format!("cut-{name}"));
            std::fs::write(&c, &b[..cut]).unwrap();
            let r = std::panic::catch_unwind(|| read_nifti(&c))
                .unwrap_or_else(|_| panic!("{name} cut at {cut}: the reader panicked"));
            assert!(r.is_err(), "{name} cut at {cut} read");
        }
        seen += 1;
    }
    assert!(seen >= 8, "{seen} samples");
}

/// A copy of `file` alone in a fresh folder (a one-slice series).
fn alone(out: &std::path::Path, file: &std::path::Path) -> std::path::PathBuf {
    let d = out.join(file.file_name().unwrap());
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(file, d.join("slice.dcm")).unwrap();
    d
}

/// The DICOM files pydicom ships (written by other tools), each as a
/// one-slice series: CT and MR read with their modality values; the MR
/// slice in every transfer syntax this reader decodes (big-endian,
/// explicit, implicit, RLE, padded) gives the same pixels; JPEG-LS and
/// JPEG 2000 are refused by name, the truncated file fails; no file of the
/// 79 makes the reader panic.
#[test]
fn real_dicom_samples_read_or_fail_cleanly() {
    use sam_unet::volume::read_dicom_series;
    let Some(dir) = samples() else { return };
    let dir = dir.join("pydicom");
    let out = tmpdir("dicom-samples");
    let read = |name: &str| read_dicom_series(&alone(&out, &dir.join(name)));
    let ct = read("CT_small.dcm").unwrap();
    assert_eq!(ct.dims, [128, 128, 1]);
    let (lo, hi) = ct
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    println!(
        "CT_small: {:?}, spacing {:?}, values {lo} .. {hi}",
        ct.dims, ct.spacing
    );
    assert!(
        lo < 0.0 && hi > 100.0,
        "CT values {lo} .. {hi} (Hounsfield units expected)"
    );
    let mr = read("MR_small.dcm").unwrap();
    assert_eq!(mr.dims, [64, 64, 1]);
    for name in [
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_padded.dcm",
    ] {
        let v = read(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.dims, mr.dims, "{name}");
        assert!(v.data == mr.data, "{name}: pixels differ from MR_small.dcm");
        assert_eq!(v.spacing, mr.spacing, "{name}");
    }
    for (name, want) in [
        ("MR_small_jp2klossless.dcm", "JPEG 2000"),
        ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS"),
    ] {
        let e = read(name).err().unwrap().to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
    assert!(read("MR_truncated.dcm").is_err());
    let (mut ok, mut refused) = (0, 0);
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = std::panic::catch_unwind(|| read_dicom_series(&alone(&out, &p)))
            .unwrap_or_else(|_| panic!("{name}: the reader panicked"));
        match r {
            Ok(v) => {
                assert_eq!(v.data.len(), v.dims.iter().product::<usize>(), "{name}");
                ok += 1;
            }
            Err(e) => {
                refused += 1;
                let e = e.to_string();
                let why = e.rsplit(".dcm: ").next().unwrap_or(&e);
                println!("{name}: {}", why.chars().take(110).collect::<String>());
            }
        }
    }
    println!("pydicom samples: {ok} read, {refused} refused with an error, none panicked");
    assert!(ok >= 8 && ok + refused >= 79);
}

/// A series written here from CT_small.dcm: five slices whose file names,
/// InstanceNumbers and positions disagree; the volume follows the positions
/// along the slice normal; the rescale intercept (1000 x position rank)
/// comes through; the sform steps 2.5 mm; a second series in the folder is
/// refused.
#[test]
fn dicom_series_sorts_by_position() {
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    use sam_unet::volume::read_dicom_series;
    let Some(dir) = samples() else { return };
    let src = dir.join("pydicom/CT_small.dcm");
    let out = tmpdir("dicom-series");
    let base = dicom_object::open_file(&src).unwrap();
    let pos0 = base
        .element(Tag(0x0020, 0x0032))
        .unwrap()
        .to_multi_float64()
        .unwrap();
    let one = read_dicom_series(&alone(&out, &src)).unwrap();
    // Positions 2.5 mm apart along the normal (CT_small is axial: +z).
    let ranks = [4usize, 0, 3, 1, 2];
    for (file, &rank) in ranks.iter().enumerate() {
        let mut o = base.clone();
        let z = pos0[2] + 2.5 * rank as f64;
        let p = format!("{}\\{}\\{}", pos0[0], pos0[1], z);
        o.put(DataElement::new(
            Tag(0x0020, 0x0032),
            VR::DS,
            PrimitiveValue::from(p),
        ));
        o.put(DataElement::new(
            Tag(0x0020, 0x0013),
            VR::IS,
            PrimitiveValue::from(format!("{}", 10 - file)),
        ));
        let icpt = base
            .element(Tag(0x0028, 0x1052))
            .map(|e| e.to_float64().unwrap())
            .unwrap_or(0.0);
        o.put(DataElement::new(
            Tag(0x0028, 0x1052),
            VR::DS,
            PrimitiveValue::from(format!("{}", icpt + 1000.0 * rank as f64)),
        ));
        o.write_to_file(out.join(format!("f{file}.dcm"))).unwrap();
    }
    let v = read_dicom_series(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v.dims, [128, 128, 5]);
    let plane = 128 * 128;
    for z in 0..5 {
        for i in (0..plane).step_by(997) {
            let want = one.data[i] + 1000.0 * z as f32;
            assert!(
                (v.data[z * plane + i] - want).abs() < 1e-3,
                "slice {z}: {} vs {want}",
                v.data[z * plane + i]
            );
        }
    }
    assert!((v.spacing[2] - 2.5).abs() < 1e-9);
    assert!((v.header.srow_z[2] - 2.5).abs() < 1e-6);
    assert!((v.header.srow_z[3] as f64 - pos0[2]).abs() < 1e-3);
    // Another series beside it.
    let mut o = base.clone();
    o.put(DataElement::new(
        Tag(0x0020, 0x000E),
        VR::UI,
        PrimitiveValue::from("1.2.3.4.5"),
    ));
    o.write_to_file(out.join("other.dcm")).unwrap();
    let e = read_dicom_series(&out).err().unwrap().to_string();
    assert!(e.contains("2 series"), "{e}");
}
