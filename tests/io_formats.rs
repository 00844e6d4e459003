//! Image and weight formats: PNG and JPEG, 8 and 16 bit, grey, grey+alpha, RGB,
//! RGBA read as 8-bit RGB; masks; safetensors with f32 / f16 / bf16 tensors.

use sam_unet::io::Weights;
use sam_unet::io::image::{read_mask, read_rgb};
use sam_unet::io::weights::write_safetensors;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sam-unet-io-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
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
