//! PyTorch checkpoints without Python: the fixture files (zip, legacy, views,
//! trainer checkpoint, ResNet, SAM), the starting-weights conversion, and
//! malicious or broken files refused cleanly.

mod common;

use std::path::Path;

use common::*;
use sam_unet::Error;
use sam_unet::io::Weights;
use sam_unet::io::pth::{RawDType, read_pth, read_pth_bytes, read_tensors};
use sam_unet::model::SamUnet;
use sam_unet::model::init::{InitReport, sam_to_input_size, starting_weights};

fn expected(path: &Path) -> Vec<(String, RawDType, Vec<usize>, Vec<u8>)> {
    read_tensors(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(n, t)| (n, t.dtype, t.shape, t.data))
        .collect()
}

fn check_equal(pth: &Path, want: &Path, floats_only: bool) {
    let ck = read_pth(pth).unwrap();
    let want = expected(want);
    let got: Vec<_> = ck
        .tensors
        .iter()
        .filter(|(_, t)| !floats_only || t.dtype.is_float())
        .collect();
    assert_eq!(got.len(), want.len(), "{}: tensor count", pth.display());
    for (name, dt, shape, data) in &want {
        let (_, t) = got
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{} lacks `{name}`", pth.display()));
        assert_eq!((&t.dtype, &t.shape), (dt, shape), "{name}");
        assert_eq!(&t.data, data, "{name}: values differ");
    }
}

#[test]
fn views_legacy_and_trainer_checkpoints_equal_their_expected_files() {
    let Some(dir) = fixtures() else { return };
    check_equal(
        &fixture(&dir, "ckpt_views.pth"),
        &fixture(&dir, "ckpt_views_expected.safetensors"),
        false,
    );
    check_equal(
        &fixture(&dir, "ckpt_legacy.pth"),
        &fixture(&dir, "ckpt_legacy_expected.safetensors"),
        false,
    );
    check_equal(
        &fixture(&dir, "ckpt_trainer_ckpt.pth"),
        &fixture(&dir, "ckpt_trainer_ckpt_model.safetensors"),
        true,
    );
    let ck = read_pth(fixture(&dir, "ckpt_trainer_ckpt.pth")).unwrap();
    assert_eq!(ck.source, "model");
    assert!(
        ck.skipped
            .iter()
            .any(|s| s.contains("torch.optim.adam.Adam")),
        "{:?}",
        ck.skipped
    );
}

/// [numel, sum, sum of squares, first, last] in f64.
fn stats(v: &[f32]) -> [f64; 5] {
    let s: f64 = v.iter().map(|&x| x as f64).sum();
    let q: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
    [
        v.len() as f64,
        s,
        q,
        *v.first().unwrap_or(&0.0) as f64,
        *v.last().unwrap_or(&0.0) as f64,
    ]
}

fn check_stats(name: &str, got: &[f32], want: &[f32]) {
    let g = stats(got);
    for i in 0..5 {
        let (a, b) = (g[i], want[i] as f64);
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{name}: stat {i}: {a} vs {b}"
        );
    }
}

#[test]
fn resnet18_matches_its_statistics() {
    let Some(dir) = fixtures() else { return };
    let ck = read_pth(fixture(&dir, "ckpt_resnet18.pth")).unwrap();
    let fx = Fixture::load(&fixture(&dir, "ckpt_resnet18_expected.safetensors"));
    let mut n = 0;
    for (name, t) in &ck.tensors {
        if let Some(v) = t.to_f32() {
            check_stats(name, &v, &fx.f(&format!("stats/{name}")).1);
            n += 1;
        }
    }
    assert_eq!(n, fx.f32s.len(), "every floating tensor has its statistics");
}

#[test]
fn sam1024_converted_for_256_matches_the_official_loader() {
    let Some(dir) = fixtures() else { return };
    let ck = read_pth(fixture(&dir, "ckpt_sam1024.pth")).unwrap();
    let fx = Fixture::load(&fixture(&dir, "ckpt_sam1024_expected256.safetensors"));
    let got = sam_to_input_size(&ck.tensors, 256, &mut InitReport::default()).unwrap();
    let want_names: Vec<&String> = fx
        .f32s
        .keys()
        .filter_map(|k| k.strip_prefix("stats/").map(|_| k))
        .collect();
    assert_eq!(got.len(), want_names.len(), "kept tensors");
    for (name, t) in &got {
        let v = t.as_f32().unwrap();
        check_stats(name, v, &fx.f(&format!("stats/{name}")).1);
        if let Some((shape, full)) = fx.f32s.get(name) {
            // pos_embed and every rel-pos table in full, to 1e-6.
            assert_eq!(t.dims(), shape.as_slice(), "{name}");
            let maxd = v
                .iter()
                .zip(full)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(maxd <= 1e-6, "{name}: max diff {maxd}");
        }
    }
    assert!(fx.f32s.contains_key("image_encoder.pos_embed"));
}

#[test]
fn starting_point_runs_through_info_and_segment() {
    let Some(dir) = fixtures() else { return };
    let sam = read_pth(fixture(&dir, "ckpt_sam1024.pth")).unwrap();
    let rn = read_pth(fixture(&dir, "ckpt_resnet18.pth")).unwrap();
    let (w, cfg, rep) = starting_weights(&sam.tensors, &rn.tensors, 256, 0).unwrap();
    assert_eq!(cfg.resnet.name(), "ResNet-18");
    assert!(rep.dropped.iter().any(|n| n == "fc.weight"));
    assert!(
        rep.dropped
            .iter()
            .any(|n| n.starts_with("mask_decoder.iou_prediction_head"))
    );
    assert!(
        rep.initialised
            .iter()
            .any(|(n, how)| n == "adapters_in.0.reshaper.0.weight" && how.contains("kaiming"))
    );
    // Reproducible: the same seed gives the same weights.
    let (w2, _, _) = starting_weights(&sam.tensors, &rn.tensors, 256, 0).unwrap();
    assert_eq!(
        w.get("mask_decoder.med_token.weight")
            .unwrap()
            .as_f32()
            .unwrap(),
        w2.get("mask_decoder.med_token.weight")
            .unwrap()
            .as_f32()
            .unwrap()
    );
    let out = common::scratch().join("init.safetensors");
    w.save(&out).unwrap();
    let loaded = Weights::from_file(&out).unwrap();
    let model = SamUnet::from_weights(&loaded).unwrap();
    let mut p = sam_unet::Predictor::new(model, Default::default()).unwrap();
    p.set_image(
        &sam_unet::io::image::read_rgb(data_demo(&dir).join("test/images/s0619_32.png")).unwrap(),
    )
    .unwrap();
    let pred = p.predict(&[[30.0, 20.0, 120.0, 100.0]]).unwrap();
    assert!(pred.logits.as_f32().unwrap().iter().all(|v| v.is_finite()));
    // Loading .pth directly wherever weights are accepted: a trainer checkpoint's model.
    let tw = Weights::from_file(fixture(&dir, "ckpt_trainer_ckpt.pth")).unwrap();
    assert!(tw.get("conv.weight").is_some());
    std::fs::remove_file(out).ok();
}

#[test]
fn malicious_checkpoint_is_refused_and_runs_nothing() {
    let Some(dir) = fixtures() else { return };
    let p = fixture(&dir, "ckpt_malicious_system.pth");
    let e = read_pth(&p).unwrap_err();
    assert!(
        matches!(&e, Error::WeightsFile { msg, .. } if msg.contains("posix.system")),
        "{e}"
    );
    assert!(Weights::from_file(&p).is_err());
    // The converter leaves no output and no temporary file.
    let out = common::scratch_dir("mal");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_convert"))
        .arg("--in")
        .arg(&p)
        .arg("--out")
        .arg(out.join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("posix.system"));
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "conversion left files behind"
    );
}

/// A stored zip with the given records (what torch.save writes, minus alignment).
fn zip(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in records {
        let off = out.len() as u32;
        let crc = 0u32;
        let mut h = vec![];
        h.extend(0x0403_4b50u32.to_le_bytes());
        h.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        h.extend(crc.to_le_bytes());
        h.extend((data.len() as u32).to_le_bytes());
        h.extend((data.len() as u32).to_le_bytes());
        h.extend((name.len() as u16).to_le_bytes());
        h.extend(0u16.to_le_bytes());
        out.extend(h);
        out.extend(name.as_bytes());
        out.extend(*data);
        let mut c = vec![];
        c.extend(0x0201_4b50u32.to_le_bytes());
        c.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        c.extend(crc.to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((name.len() as u16).to_le_bytes());
        c.extend([0u8; 12]);
        c.extend(off.to_le_bytes());
        c.extend(name.as_bytes());
        central.extend(c);
    }
    let cd_off = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_off.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// {'w': tensor of `numel` f32 with size (rows, cols)} pointing at storage '0'.
fn state_pickle(numel: u8, rows: u8, cols: u8) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK".to_vec();
    p.push(numel);
    p.extend(b"tQK\x00K");
    p.push(rows);
    p.push(b'K');
    p.push(cols);
    p.extend(b"\x86K");
    p.push(cols);
    p.extend(b"K\x01\x86\x89ccollections\nOrderedDict\n)RtRs.");
    p
}

/// `{'w': <rows x cols view of a 4-element storage with strides (0, 0)>}`: an
/// expanded (broadcast) tensor, sizes as 4-byte ints.
fn broadcast_pickle(rows: u32, cols: u32) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00".to_vec();
    for v in [rows, cols] {
        p.push(b'J');
        p.extend(v.to_le_bytes());
    }
    p.extend(b"\x86K\x00K\x00\x86\x89ccollections\nOrderedDict\n)RtRs.");
    p
}

/// A few bytes must not ask for terabytes: a broadcast view is materialised
/// only up to 256 MiB (a small one still reads), and a size that would
/// overflow is refused before any allocation.
#[test]
fn broadcast_views_are_bounded() {
    let floats: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let ck = read_pth_bytes(&zip(&[
        ("a/data.pkl", &broadcast_pickle(3, 2)),
        ("a/data/0", &floats),
    ]))
    .unwrap();
    assert_eq!(ck.tensors[0].1.to_f32().unwrap(), vec![0.0; 6]);
    for (rows, cols) in [
        (100_000, 1_000),
        (1_000_000, 1_000_000),
        (i32::MAX as u32, i32::MAX as u32),
    ] {
        let e = read_pth_bytes(&zip(&[
            ("a/data.pkl", &broadcast_pickle(rows, cols)),
            ("a/data/0", &floats),
        ]))
        .unwrap_err();
        assert!(
            e.contains("broadcast") || e.contains("overflows"),
            "{rows} x {cols}: {e}"
        );
    }
}

#[test]
fn broken_archives_give_clear_errors() {
    let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    // A well-formed one first.
    let good = zip(&[
        ("a/data.pkl", &state_pickle(6, 2, 3)),
        ("a/data/0", &floats),
    ]);
    let ck = read_pth_bytes(&good).unwrap();
    assert_eq!(
        ck.tensors[0].1.to_f32().unwrap(),
        vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
    // Truncated archive (every prefix).
    for n in [0, 10, good.len() / 2, good.len() - 1] {
        assert!(read_pth_bytes(&good[..n]).is_err(), "prefix {n}");
    }
    // Missing storage record.
    let e = read_pth_bytes(&zip(&[("a/data.pkl", &state_pickle(6, 2, 3))])).unwrap_err();
    assert!(e.contains("missing"), "{e}");
    // A storage shorter than its tensor: 6 declared, 4 stored.
    let e = read_pth_bytes(&zip(&[
        ("a/data.pkl", &state_pickle(6, 2, 3)),
        ("a/data/0", &floats[..16]),
    ]))
    .unwrap_err();
    assert!(e.contains("bytes"), "{e}");
    // A tensor reaching past its storage: 2 x 3 on a storage of 4.
    let e = read_pth_bytes(&zip(&[
        ("a/data.pkl", &state_pickle(4, 2, 3)),
        ("a/data/0", &floats[..16]),
    ]))
    .unwrap_err();
    assert!(e.contains("reaches element"), "{e}");
    // Garbage.
    assert!(read_pth_bytes(b"PK\x03\x04 nothing else").is_err());
    assert!(read_pth_bytes(b"\x80\x02 garbage").is_err());
    // Through the file API: a typed error naming the file.
    let f = common::scratch().join("trunc.pth");
    std::fs::write(&f, &good[..good.len() - 30]).unwrap();
    assert!(matches!(read_pth(&f), Err(Error::WeightsFile { .. })));
    std::fs::remove_file(f).ok();
}

/// Inputs the fuzzer found (fuzz/regressions): each must give an error, not a panic.
#[test]
fn fuzz_regressions_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            read_pth_bytes(&bytes).is_err(),
            "{} was accepted",
            p.display()
        );
        n += 1;
    }
    assert!(n > 0, "no regression inputs in {}", dir.display());
}

/// The .pth writer (`convert --out X.pth`, for PyTorch users): the small34
/// fixture weights with an int64 BatchNorm counter, written and read back by
/// our reader (every tensor equal) and, where Python has torch, by
/// `torch.load(weights_only=True)` comparing every tensor's bytes.
#[test]
fn pth_export_reads_back_here_and_in_pytorch() {
    use sam_unet::io::pth::RawTensor;
    let Some(dir) = fixtures() else { return };
    let ck = read_tensors(fixture(&dir, "small34_weights.safetensors")).unwrap();
    let mut tensors = ck.tensors.clone();
    tensors.push((
        "resnet.bn1.num_batches_tracked".into(),
        RawTensor {
            dtype: RawDType::I64,
            shape: vec![],
            data: 42i64.to_le_bytes().to_vec(),
        },
    ));
    let out = common::scratch().join("export.pth");
    sam_unet::io::pth_write::write_pth(&out, &tensors).unwrap();
    let back = read_pth(&out).unwrap();
    assert_eq!(back.source, "model");
    assert_eq!(back.tensors, tensors);
    // PyTorch, when there is one.
    let py = std::env::var("SAM_UNET_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = std::process::Command::new(&py)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        eprintln!("SKIPPED the PyTorch half: no torch for {py} (set SAM_UNET_PYTHON)");
        return;
    }
    let want = out.with_extension("safetensors");
    sam_unet::io::weights::write_safetensors(
        &want,
        &sam_unet::io::pth::safetensors_records(&tensors),
    )
    .unwrap();
    let script = r#"
import sys, json, struct, torch
sd = torch.load(sys.argv[1], weights_only=True)["model"]
raw = open(sys.argv[2], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
hdr.pop("__metadata__", None)
assert list(sd.keys()) == sorted(hdr.keys()) or set(sd.keys()) == set(hdr.keys()), "names"
for k, m in hdr.items():
    a, b = m["data_offsets"]
    t = sd[k]
    assert list(t.shape) == m["shape"], k
    assert t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() == raw[8 + n + a:8 + n + b], k
print(len(sd), "tensors equal in torch", torch.__version__)
"#;
    let o = std::process::Command::new(&py)
        .args(["-c", script])
        .arg(&out)
        .arg(&want)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "torch.load refused or differs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{}", String::from_utf8_lossy(&o.stdout).trim());
}
