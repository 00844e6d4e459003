//! Compiles every `cuda/*.cu` to PTX (compute_80), with `nvcc` when it is on the
//! PATH, otherwise with NVRTC when its library loads (the PyPI wheels installed by
//! `scripts/install-cuda-tools.sh` into `.cuda-tools/`, or a system CUDA), and
//! otherwise warns: the CUDA backend then reports at run time that kernels were
//! not built. With `ptxas` available, each PTX is also assembled for sm_80 and
//! sm_90 and the registers, shared memory and spills of every kernel are printed.
//! `SAM_UNET_REQUIRE_KERNELS=1` (CI) turns a missing compiler into an error.
//! Never calls nvidia-smi: no GPU is needed to build.

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tools_dir() -> Option<PathBuf> {
    let d = std::env::var_os("SAM_UNET_CUDA_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cuda-tools"));
    d.join("nvidia").exists().then_some(d)
}

type NvrtcProgram = *mut std::ffi::c_void;

/// NVRTC through its C API, loaded at build time.
fn nvrtc_compile(
    lib: &libloading::Library,
    name: &str,
    src: &str,
    include: &[PathBuf],
) -> Result<String, String> {
    // SAFETY: the symbols are NVRTC's documented C API with these signatures; all
    // pointers passed are valid NUL-terminated strings or out-parameters, and the
    // program is destroyed on every path.
    unsafe {
        let create: libloading::Symbol<
            unsafe extern "C" fn(
                *mut NvrtcProgram,
                *const c_char,
                *const c_char,
                c_int,
                *const *const c_char,
                *const *const c_char,
            ) -> c_int,
        > = lib.get(b"nvrtcCreateProgram").map_err(|e| e.to_string())?;
        let compile: libloading::Symbol<
            unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int,
        > = lib.get(b"nvrtcCompileProgram").map_err(|e| e.to_string())?;
        let log_size: libloading::Symbol<unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int> =
            lib.get(b"nvrtcGetProgramLogSize")
                .map_err(|e| e.to_string())?;
        let get_log: libloading::Symbol<unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int> =
            lib.get(b"nvrtcGetProgramLog").map_err(|e| e.to_string())?;
        let ptx_size: libloading::Symbol<unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int> =
            lib.get(b"nvrtcGetPTXSize").map_err(|e| e.to_string())?;
        let get_ptx: libloading::Symbol<unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int> =
            lib.get(b"nvrtcGetPTX").map_err(|e| e.to_string())?;
        let destroy: libloading::Symbol<unsafe extern "C" fn(*mut NvrtcProgram) -> c_int> =
            lib.get(b"nvrtcDestroyProgram").map_err(|e| e.to_string())?;
        let csrc = CString::new(src).map_err(|e| e.to_string())?;
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        let mut prog: NvrtcProgram = std::ptr::null_mut();
        if create(
            &mut prog,
            csrc.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        ) != 0
        {
            return Err("nvrtcCreateProgram failed".into());
        }
        let mut opts: Vec<CString> = vec![
            CString::new("--gpu-architecture=compute_80").unwrap(),
            CString::new("--std=c++17").unwrap(),
            CString::new("-lineinfo").unwrap(),
        ];
        for i in include {
            opts.push(CString::new(format!("-I{}", i.display())).unwrap());
        }
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let rc = compile(prog, ptrs.len() as c_int, ptrs.as_ptr());
        let mut n = 0usize;
        log_size(prog, &mut n);
        let mut log = vec![0u8; n.max(1)];
        get_log(prog, log.as_mut_ptr() as *mut c_char);
        let log = CStr::from_bytes_until_nul(&log)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if rc != 0 {
            destroy(&mut prog);
            return Err(format!("NVRTC error {rc}:\n{log}"));
        }
        ptx_size(prog, &mut n);
        let mut ptx = vec![0u8; n];
        get_ptx(prog, ptx.as_mut_ptr() as *mut c_char);
        destroy(&mut prog);
        Ok(CStr::from_bytes_until_nul(&ptx)
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned())
    }
}

fn load_nvrtc(tools: Option<&Path>) -> Option<libloading::Library> {
    let mut candidates: Vec<PathBuf> = vec![];
    if let Some(t) = tools {
        candidates.push(t.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12"));
    }
    for n in ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"] {
        candidates.push(PathBuf::from(n));
    }
    candidates.into_iter().find_map(|c| {
        // SAFETY: loading NVRTC runs only its initialisers; it is a plain C library.
        unsafe { libloading::Library::new(&c) }.ok()
    })
}

/// `#include "common.cuh"` resolved by inlining, for NVRTC without file access.
fn inline_includes(src: &str, dir: &Path) -> String {
    src.lines()
        .map(|l| {
            match l
                .trim()
                .strip_prefix("#include \"")
                .and_then(|r| r.strip_suffix('"'))
            {
                Some(f) => std::fs::read_to_string(dir.join(f))
                    .unwrap_or_else(|e| panic!("{f}: {e}"))
                    .replace("#pragma once", ""),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SAM_UNET_CUDA_TOOLS");
    println!("cargo:rerun-if-env-changed=SAM_UNET_REQUIRE_KERNELS");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let require = std::env::var("SAM_UNET_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let mut files: Vec<PathBuf> = std::fs::read_dir("cuda")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let tools = tools_dir();
    let nvcc = Command::new("nvcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let nvrtc = if nvcc {
        None
    } else {
        load_nvrtc(tools.as_deref())
    };
    let mut entries = vec![];
    let mut missing = None;
    if !nvcc && nvrtc.is_none() {
        missing = Some("no CUDA compiler at build time (neither nvcc nor NVRTC; run scripts/install-cuda-tools.sh)".to_string());
        if require {
            panic!(
                "SAM_UNET_REQUIRE_KERNELS=1 but {}",
                missing.as_ref().unwrap()
            );
        }
        println!(
            "cargo:warning=CUDA kernels not built: {}",
            missing.as_ref().unwrap()
        );
    }
    let include: Vec<PathBuf> = tools
        .iter()
        .map(|t| t.join("nvidia/cuda_runtime/include"))
        .filter(|p| p.exists())
        .collect();
    let ptxas = tools
        .as_ref()
        .map(|t| t.join("nvidia/cuda_nvcc/bin/ptxas"))
        .filter(|p| p.exists())
        .or_else(|| {
            Command::new("ptxas")
                .arg("--version")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| PathBuf::from("ptxas"))
        });
    if missing.is_none() {
        for f in &files {
            let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
            let ptx_path = out.join(format!("{stem}.ptx"));
            if nvcc {
                let o = Command::new("nvcc")
                    .args([
                        "-ptx",
                        "-arch=compute_80",
                        "-std=c++17",
                        "-lineinfo",
                        "-Icuda",
                        "-o",
                    ])
                    .arg(&ptx_path)
                    .arg(f)
                    .output()
                    .expect("nvcc");
                if !o.status.success() {
                    panic!(
                        "nvcc failed on {}:\n{}",
                        f.display(),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            } else {
                let src = inline_includes(
                    &std::fs::read_to_string(f).expect("read .cu"),
                    Path::new("cuda"),
                );
                match nvrtc_compile(
                    nvrtc.as_ref().unwrap(),
                    &format!("{stem}.cu"),
                    &src,
                    &include,
                ) {
                    Ok(ptx) => std::fs::write(&ptx_path, ptx).expect("write ptx"),
                    Err(e) => panic!("CUDA kernel {} does not compile:\n{e}", f.display()),
                }
            }
            if let Some(px) = &ptxas {
                for arch in ["sm_80", "sm_90"] {
                    let o = Command::new(px)
                        .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null"])
                        .arg(&ptx_path)
                        .output()
                        .expect("ptxas");
                    if !o.status.success() {
                        panic!(
                            "ptxas {arch} failed on {}:\n{}",
                            f.display(),
                            String::from_utf8_lossy(&o.stderr)
                        );
                    }
                    let log = String::from_utf8_lossy(&o.stderr);
                    let mut kernel = String::new();
                    for l in log.lines() {
                        if let Some(k) = l.split("Compiling entry function '").nth(1) {
                            kernel = k.split('\'').next().unwrap_or("").to_string();
                        } else if l.contains("Used") || l.contains("spill") {
                            let l = l.trim_start_matches("ptxas info    : ");
                            println!("cargo:warning=ptxas {arch} {stem}::{kernel}: {l}");
                        }
                    }
                }
            }
            entries.push((stem, ptx_path));
        }
    }
    let mut code = String::from("// Generated by build.rs: the PTX of every cuda/*.cu.\n");
    code.push_str(&format!(
        "pub const NOT_BUILT: Option<&str> = {:?};\n",
        missing
    ));
    code.push_str("pub const PTX: &[(&str, &str)] = &[\n");
    for (stem, p) in &entries {
        code.push_str(&format!(
            "    ({:?}, include_str!({:?})),\n",
            stem,
            p.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), code).expect("write kernels.rs");
}
