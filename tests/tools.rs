//! The tools as a user runs them, README commands included.

use std::process::Command;

mod common;

fn run(bin: &str, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn readme_segment_command_writes_masks_and_overlay() {
    let out = common::scratch().join("readme");
    let out_s = out.to_string_lossy().into_owned();
    let logits = out.join("l.safetensors").to_string_lossy().into_owned();
    let (ok, stdout, stderr) = run(
        env!("CARGO_BIN_EXE_segment"),
        &[
            "--random-weights",
            "sam-unet-50",
            "--image",
            "examples/demo/amos_0004_75.png",
            "--box-from-mask",
            "examples/demo/amos_0004_75_liver_000.png",
            "--box",
            "150,120,380,330",
            "--out",
            &out_s,
            "--logits",
            &logits,
        ],
    );
    assert!(ok, "segment failed: {stderr}");
    assert!(
        stderr.contains("random"),
        "no warning about random weights: {stderr}"
    );
    for f in [
        "amos_0004_75_mask0.png",
        "amos_0004_75_mask1.png",
        "amos_0004_75_overlay.png",
        "l.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing; stdout: {stdout}");
    }
    let m = sam_unet::io::image::read_mask(out.join("amos_0004_75_mask0.png")).unwrap();
    assert_eq!((m.width, m.height), (512, 512));
    let w = sam_unet::io::Weights::from_file(out.join("l.safetensors")).unwrap();
    assert_eq!(w.get("logits").unwrap().dims(), &[2, 1, 512, 512]);
    assert_eq!(w.get("low_res_logits").unwrap().dims(), &[2, 1, 64, 64]);
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn info_prints_the_papers_parameter_counts() {
    let (ok, out, _) = run(env!("CARGO_BIN_EXE_info"), &["--arch", "sam-unet-50"]);
    assert!(
        ok && out.contains("138,428,204") && out.contains("51,755,564"),
        "{out}"
    );
    let (ok, out, _) = run(env!("CARGO_BIN_EXE_info"), &["--arch", "sam-unet-34"]);
    assert!(
        ok && out.contains("116,019,884") && out.contains("29,347,244"),
        "{out}"
    );
}

#[test]
fn tools_fail_cleanly_on_bad_input() {
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_segment"),
        &[
            "--random-weights",
            "sam-unet-50",
            "--image",
            "examples/demo/s0619_32.png",
            "--box",
            "10,10,500,50",
            "--out",
            "/tmp/never",
        ],
    );
    assert!(
        !ok && err.contains("outside the 225 x 155 image") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_segment"),
        &[
            "--random-weights",
            "sam-unet-50",
            "--image",
            "no-such.png",
            "--box",
            "1,1,2,2",
            "--out",
            "/tmp/never",
        ],
    );
    assert!(
        !ok && err.contains("no-such.png") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = run(env!("CARGO_BIN_EXE_info"), &["--weights", "Cargo.toml"]);
    assert!(
        !ok && err.starts_with("error:") && !err.contains("panicked"),
        "{err}"
    );
}

/// `convert --sam ckpt_sam1024.pth --resnet ckpt_resnet18.pth`, then `info` and `segment` on the result.
#[test]
fn convert_then_info_then_segment() {
    let dir = std::env::var("SAM_UNET_FIXTURES").unwrap_or_else(|_| "../shared/fixtures".into());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    if !dir.join("ckpt_sam1024.pth").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "fixtures missing at {} (CI=true: a failure)",
            dir.display()
        );
        eprintln!("SKIPPED: fixtures not found at {}", dir.display());
        return;
    }
    let tmp = common::scratch_dir("convert");
    let init = tmp.join("init.safetensors");
    let (sam, rn) = (dir.join("ckpt_sam1024.pth"), dir.join("ckpt_resnet18.pth"));
    let (ok, out, err) = run(
        env!("CARGO_BIN_EXE_convert"),
        &[
            "--sam",
            sam.to_str().unwrap(),
            "--resnet",
            rn.to_str().unwrap(),
            "--out",
            init.to_str().unwrap(),
        ],
    );
    assert!(ok, "convert: {err}");
    assert!(
        out.contains("interpolated image_encoder.pos_embed: 64 x 64 -> 16 x 16")
            && out.contains("dropped")
            && out.contains("initialised"),
        "{out}"
    );
    let (ok, out, err) = run(
        env!("CARGO_BIN_EXE_info"),
        &["--weights", init.to_str().unwrap()],
    );
    assert!(
        ok && out.contains("ResNet-18") && out.contains("width 64"),
        "info: {out} {err}"
    );
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_segment"),
        &[
            "--weights",
            init.to_str().unwrap(),
            "--image",
            "examples/demo/s0619_32.png",
            "--box",
            "20,20,120,100",
            "--out",
            tmp.to_str().unwrap(),
        ],
    );
    assert!(
        ok && tmp.join("s0619_32_mask0.png").exists(),
        "segment: {err}"
    );
    // The trainer checkpoint's .pth is accepted directly by info (its model is not a SAM-UNet: a clear error).
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_info"),
        &[
            "--weights",
            dir.join("ckpt_trainer_ckpt.pth").to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.starts_with("error:") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::remove_dir_all(tmp).ok();
}

/// Data-parallel training from the README's commands: `--nproc 2` on this
/// machine; two ranks started by hand with torchrun's variables, one of
/// them killed mid-run (the other stops with an error naming it, instead of
/// hanging); resuming on 4 ranks (the global batch kept) and refused on 3.
#[test]
fn train_on_several_ranks_from_the_readme_commands() {
    let dir = common::scratch_dir("ranks");
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    let (synth, prepare, train) = (
        env!("CARGO_BIN_EXE_synth"),
        env!("CARGO_BIN_EXE_prepare"),
        env!("CARGO_BIN_EXE_train"),
    );
    let (ok, _, e) = run(
        synth,
        &[
            "--out",
            &p("syn"),
            "--train",
            "12",
            "--test",
            "2",
            "--size",
            "128",
        ],
    );
    assert!(ok, "{e}");
    let (ok, _, e) = run(prepare, &["--data", &p("syn/train"), "--out", &p("prep")]);
    assert!(ok, "{e}");
    let common = |out: &str| -> Vec<String> {
        [
            "--data",
            &p("prep"),
            "--init",
            "random:sam-unet-small-18",
            "--out",
            &p(out),
            "--batch",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // --nproc 2.
    let mut args = common("a");
    args.extend(["--max-steps", "2", "--nproc", "2", "--bucket-mb", "0.5"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, e) = run(train, &argv);
    assert!(ok, "{out}\n{e}");
    assert!(out.contains("x 2 ranks (SyncBatchNorm)"), "{out}");
    assert!(
        dir.join("a/checkpoints/step-00000002/model.safetensors")
            .is_file()
    );
    let log = std::fs::read_to_string(dir.join("a/log.jsonl")).unwrap();
    assert!(log.contains("\"world\":2"), "{log}");
    assert!(log.contains("\"bucket_mb\":0.5"), "{log}");
    assert_eq!(log.matches("\"event\":\"step\"").count(), 2);
    // Resumed on 3 ranks: 2 x 2 images do not divide among 3.
    let (ok, _, e) = run(
        train,
        &["--resume", &p("a"), "--nproc", "3", "--max-steps", "3"],
    );
    assert!(!ok);
    assert!(e.contains("does not divide among 3 ranks"), "{e}");
    // On 4: 1 image each.
    let (ok, out, e) = run(
        train,
        &["--resume", &p("a"), "--nproc", "4", "--max-steps", "3"],
    );
    assert!(ok, "{out}\n{e}");
    assert!(
        out.contains("2 rank(s) x 2 images -> 4 ranks x 1 images"),
        "{out}"
    );
    assert!(dir.join("a/checkpoints/step-00000003").is_dir());
    // By hand, as torchrun starts them; rank 1 killed once training runs.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = common("b");
    args.extend(["--max-steps", "500", "--timeout", "600"].map(String::from));
    let spawn = |rank: usize| {
        Command::new(train)
            .args(&args)
            .env("WORLD_SIZE", "2")
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut r0, mut r1) = (spawn(0), spawn(1));
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(dir.join("b/log.jsonl"))
        .unwrap_or_default()
        .contains("\"event\":\"step\"")
    {
        assert!(t.elapsed().as_secs() < 300, "no update within 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    let killed = std::time::Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed().as_secs() > 120 {
            let _ = r0.kill();
            panic!("rank 0 still running 2 minutes after rank 1 was killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("rank 1 closed the connection"), "{err}");
    println!(
        "rank 0 stopped {:.1} s after rank 1 was killed: {}",
        killed.elapsed().as_secs_f64(),
        err.lines().last().unwrap_or_default()
    );
}

/// `segment-volume` on a synthetic CT-like volume (a bright ellipsoid in
/// Hounsfield-like units, anisotropic voxels, a rotated qform): one label
/// volume on the source grid with the window in its description; bad boxes
/// and a 4-D image refused. (Random weights: the masks are not judged.)
#[test]
fn segment_volume_writes_labels_on_the_source_grid() {
    use sam_unet::volume::{read_nifti, write_nifti};
    let dir = common::scratch_dir("volume");
    let (nx, ny, nz) = (48usize, 40usize, 9usize);
    let mut v = vec![-1000.0f32; nx * ny * nz];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (dx, dy, dz) = (
                    (x as f32 - 24.0) / 12.0,
                    (y as f32 - 20.0) / 9.0,
                    (z as f32 - 4.0) / 4.0,
                );
                if dx * dx + dy * dy + dz * dz < 1.0 {
                    v[(z * ny + y) * nx + x] = 60.0;
                }
            }
        }
    }
    let h = nifti::NiftiHeader {
        pixdim: [1.0, 0.75, 0.75, 3.0, 1.0, 1.0, 1.0, 1.0],
        xyzt_units: 2,
        qform_code: 1,
        sform_code: 1,
        quatern_d: 0.2,
        quatern_x: -10.0,
        srow_x: [0.75, 0.0, 0.0, -10.0],
        srow_y: [0.0, 0.75, 0.0, 4.0],
        srow_z: [0.0, 0.0, 3.0, 7.5],
        ..Default::default()
    };
    let img = dir.join("ct.nii.gz");
    write_nifti(&img, &h, [nx, ny, nz], 16, bytemuck::cast_slice(&v), "", 0).unwrap();
    let out = dir.join("labels.nii.gz");
    let bin = env!("CARGO_BIN_EXE_segment-volume");
    let (img_s, out_s) = (img.to_str().unwrap(), out.to_str().unwrap());
    let (ok, stdout, e) = run(
        bin,
        &[
            "--weights",
            "random:sam-unet-small-18:1",
            "--image",
            img_s,
            "--box3d",
            "10,10,1,38,31,8",
            "--box3d",
            "20,15,3,30,25,6",
            "--window",
            "abdomen",
            "--out",
            out_s,
        ],
    );
    assert!(ok, "{stdout}\n{e}");
    assert!(stdout.contains("CT window W400 L40"), "{stdout}");
    assert!(stdout.contains("object 2:"), "{stdout}");
    let l = read_nifti(&out).unwrap();
    assert_eq!(l.dims, [nx, ny, nz]);
    assert!(l.data.iter().all(|&x| x == 0.0 || x == 1.0 || x == 2.0));
    // Outside both boxes' slices nothing is labelled.
    let plane = nx * ny;
    assert!(l.data[..plane].iter().all(|&x| x == 0.0));
    assert!(l.data[8 * plane..].iter().all(|&x| x == 0.0));
    assert_eq!((l.header.srow_x, l.header.srow_z), (h.srow_x, h.srow_z));
    assert_eq!((l.header.quatern_d, l.header.pixdim[3]), (0.2, 3.0));
    assert!(String::from_utf8_lossy(&l.header.descrip).contains("CT window W400 L40"));
    // Refused: a box past the volume, a folder (DICOM), a bad window.
    for (args, want) in [
        (vec!["--box3d", "10,10,1,38,31,10"], "leaves the volume"),
        (vec!["--box3d", "10,10,1,38,31"], "six numbers"),
        (
            vec!["--box3d", "10,10,1,38,31,8", "--window", "bony"],
            "give abdomen",
        ),
    ] {
        let mut a = vec![
            "--weights",
            "random:sam-unet-small-18",
            "--image",
            img_s,
            "--out",
            out_s,
        ];
        a.extend(args);
        let (ok, _, e) = run(bin, &a);
        assert!(!ok);
        assert!(e.contains(want), "{e}");
    }
    // Scored against the ellipsoid as reference (3-D Dice per label).
    let truth: Vec<u8> = v.iter().map(|&x| u8::from(x > 0.0)).collect();
    let reference = dir.join("reference.nii.gz");
    write_nifti(&reference, &h, [nx, ny, nz], 2, &truth, "", 1002).unwrap();
    let ev = dir.join("eval");
    let (ok, stdout, e) = run(
        env!("CARGO_BIN_EXE_eval"),
        &[
            "--volume",
            out_s,
            "--labels",
            reference.to_str().unwrap(),
            "--out",
            ev.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stdout}\n{e}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev.join("volume_summary.json")).unwrap())
            .unwrap();
    let labels = doc["labels"].as_array().unwrap();
    let one = labels
        .iter()
        .find(|l| l["label"] == 1)
        .expect("label 1 is in the reference");
    assert_eq!(
        one["reference_voxels"],
        truth.iter().filter(|&&t| t == 1).count()
    );
    assert!(
        one["dice"]
            .as_f64()
            .is_some_and(|d| (0.0..=1.0).contains(&d))
    );
    // The reference against itself: Dice 1.
    let (ok, stdout, _) = run(
        env!("CARGO_BIN_EXE_eval"),
        &[
            "--volume",
            reference.to_str().unwrap(),
            "--labels",
            reference.to_str().unwrap(),
            "--out",
            ev.to_str().unwrap(),
        ],
    );
    assert!(
        ok && stdout.contains("| 1.0000 | 1.0000 | 1.0000 | 0.00 |"),
        "{stdout}"
    );
    let d = dir.to_str().unwrap();
    let (ok, _, e) = run(
        bin,
        &[
            "--weights",
            "random:sam-unet-small-18",
            "--image",
            d,
            "--box3d",
            "1,1,1,2,2,2",
            "--out",
            out_s,
        ],
    );
    assert!(!ok && e.contains("no readable DICOM slice"), "{e}");
}

/// What a mistyped command must not do: replace one of its inputs, write a
/// format nobody asked for, or fail after half its outputs. Each refusal comes
/// before any work and leaves the files as they were.
#[test]
fn tools_refuse_to_overwrite_their_inputs() {
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let dir = common::scratch_dir("refuse");
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    std::fs::copy("examples/demo/amos_0004_75.png", dir.join("a.png")).unwrap();
    std::fs::copy(
        "examples/demo/amos_0004_75_liver_000.png",
        dir.join("a_mask0.png"),
    )
    .unwrap();
    std::fs::write(dir.join("v.nii"), b"not really a volume").unwrap();
    std::fs::write(dir.join("c.pth"), b"not really a checkpoint").unwrap();
    let inputs = ["a.png", "a_mask0.png", "v.nii", "c.pth"];
    let read_all = || -> Vec<Vec<u8>> {
        inputs
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect()
    };
    let before = read_all();
    let (img, mask, vol, ck) = (p("a.png"), p("a_mask0.png"), p("v.nii"), p("c.pth"));
    let refused = |bin: &str, args: &[&str], says: &str| {
        let (ok, _, err) = run(bin, args);
        assert!(
            !ok && err.contains(says) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    };
    let seg = env!("CARGO_BIN_EXE_segment");
    let small = ["--random-weights", "sam-unet-small-18", "--image", &img];
    let with = |more: &[&str]| -> Vec<String> {
        small.iter().chain(more).map(|s| s.to_string()).collect()
    };
    // The mask written for the first box would be the mask the box came from.
    let a = with(&["--box-from-mask", &mask, "--out", &p("")]);
    refused(seg, &strs(&a), "is the --box-from-mask input");
    // --logits onto the image; then into a folder that does not exist.
    let (o, none) = (p("o"), p("none/l.safetensors"));
    let a = with(&["--box", "1,1,50,50", "--out", &o, "--logits", &img]);
    refused(seg, &strs(&a), "must end in .safetensors");
    let a = with(&["--box", "1,1,50,50", "--out", &o, "--logits", &none]);
    refused(seg, &strs(&a), "does not exist");
    assert!(
        !dir.join("o").exists(),
        "no mask written before the refusal"
    );
    // segment-volume: labels over the volume, or into a .png.
    let sv = env!("CARGO_BIN_EXE_segment-volume");
    let v = [
        "--weights",
        "random:sam-unet-small-18",
        "--image",
        &vol,
        "--box3d",
        "1,1,0,5,5,1",
        "--out",
    ];
    let a: Vec<&str> = v.iter().copied().chain([vol.as_str()]).collect();
    refused(sv, &a, "is the --image input");
    let a: Vec<&str> = v.iter().copied().chain([img.as_str()]).collect();
    refused(sv, &a, "must end in .nii or .nii.gz");
    // convert: a checkpoint over itself (a trainer checkpoint would lose its
    // optimiser state), an unknown format, an input side the model cannot take.
    let conv = env!("CARGO_BIN_EXE_convert");
    refused(conv, &["--in", &ck, "--out", &ck], "is the --in input");
    refused(
        conv,
        &["--in", &ck, "--out", &p("c.txt")],
        "must end in .safetensors",
    );
    let init = p("i.safetensors");
    for size in ["80", "0", "100000", "4294967296"] {
        refused(
            conv,
            &[
                "--sam",
                &ck,
                "--resnet",
                &ck,
                "--img-size",
                size,
                "--out",
                &init,
            ],
            "multiple of 32",
        );
    }
    // eval --merge into one of the runs it merges.
    std::fs::create_dir_all(dir.join("r0")).unwrap();
    std::fs::create_dir_all(dir.join("r1")).unwrap();
    let (r0, r1) = (p("r0"), p("r1"));
    refused(
        env!("CARGO_BIN_EXE_eval"),
        &["--merge", &r0, &r1, "--out", &r0],
        "is the --merge input",
    );
    // train --resume keeps the run's settings: a new learning rate is refused.
    refused(
        env!("CARGO_BIN_EXE_train"),
        &["--resume", &p("run"), "--lr", "0.1"],
        "cannot be used with",
    );
    // prepare: a model frame no model takes, refused before the folder is made.
    refused(
        env!("CARGO_BIN_EXE_prepare"),
        &[
            "--data",
            &p("nowhere"),
            "--out",
            &p("prep"),
            "--size",
            "100000",
        ],
        "multiple of 32",
    );
    assert!(!dir.join("prep").exists());
    assert!(before == read_all(), "an input changed");
}
