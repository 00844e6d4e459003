//! The kernels of cuda/*.cu on the CPU, through the host SIMT emulator
//! (cuda/host/simt.h, simt.cpp): built once per test run with the system C++
//! compiler (`$CXX`, else `c++`) into a shared library, loaded with libloading.
//! Buffers end at a guard page and outputs start as NaN, so a kernel that reads
//! past a buffer stops the run and one that leaves an output element unwritten
//! fails the comparison.
#![allow(dead_code)]

use std::ffi::{CString, c_char, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use cudarc::driver::LaunchConfig;

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    extern "C" fn(*mut c_void),
    *mut c_void,
    *mut c_char,
    usize,
) -> i32;
type AllocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);

pub struct Simt {
    lib: libloading::Library,
    path: PathBuf,
    launch: LaunchFn,
    alloc: AllocFn,
    free: FreeFn,
}

fn build() -> Result<Simt, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cuda = root.join("cuda");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    // The rule-breaking kernels of the emulator's own tests come along.
    sources.extend(
        std::fs::read_dir(cuda.join("host"))
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "cu")),
    );
    sources.sort();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("simt");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    // One library per test binary (cargo runs test binaries one at a time).
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let lib_path = out_dir.join(format!("libsimt_{exe}.so"));
    let registry = out_dir.join(format!("registry_{exe}.cpp"));
    std::fs::write(&registry, kernel_table(&sources)?).map_err(|e| e.to_string())?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut cmd = Command::new(&cxx);
    cmd.args([
        "-std=c++20",
        "-O2",
        "-g",
        "-fPIC",
        "-shared",
        "-Wall",
        "-Wno-unused-function",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        // Undefined behaviour in a kernel (signed overflow in index arithmetic,
        // misaligned word access, out-of-range shifts) stops the run, naming
        // the source line.
        "-fsanitize=undefined",
        "-fno-sanitize-recover=all",
    ])
    .arg(format!("-I{}", cuda.display()))
    .arg("-include")
    .arg(cuda.join("host/simt.h"))
    .args(["-x", "c++"])
    .args(&sources)
    .args(["-x", "none"])
    .arg(cuda.join("host/simt.cpp"))
    .arg(cuda.join("host/fake_driver.cpp"))
    .arg(&registry)
    .arg(format!("-I{}", cuda.join("host").display()))
    // The emulated driver answers to cudarc's dlopen("libcuda.so") once loaded.
    .arg("-Wl,-soname,libcuda.so")
    .arg("-pthread")
    .arg("-o")
    .arg(&lib_path);
    let o = cmd
        .output()
        .map_err(|e| format!("no C++ compiler `{cxx}` ({e})"))?;
    if !o.status.success() {
        // A compiler that exists but fails on our kernels is a real failure.
        panic!(
            "the kernels do not compile for the host emulator:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // SAFETY: the library was just built from our sources; its initialisers only
    // set up static data.
    let lib = unsafe { libloading::Library::new(&lib_path) }.map_err(|e| e.to_string())?;
    // SAFETY: these symbols are defined in simt.cpp with exactly these C signatures.
    let (launch, alloc, free) = unsafe {
        (
            *lib.get::<LaunchFn>(b"simt_launch")
                .map_err(|e| e.to_string())?,
            *lib.get::<AllocFn>(b"simt_alloc")
                .map_err(|e| e.to_string())?,
            *lib.get::<FreeFn>(b"simt_free").map_err(|e| e.to_string())?,
        )
    };
    Ok(Simt {
        lib,
        path: lib_path,
        launch,
        alloc,
        free,
    })
}

/// The C++ table of every `extern "C" __global__` kernel of the sources
/// (fake_driver.h): declarations copied from the .cu files, then the entries.
fn kernel_table(sources: &[PathBuf]) -> Result<String, String> {
    const KEY: &str = "extern \"C\" __global__ void ";
    let mut decls = String::new();
    let mut names = vec![];
    for f in sources {
        let src = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let mut rest = src.as_str();
        while let Some(at) = rest.find(KEY) {
            let mut after = rest[at + KEY.len()..].trim_start();
            if let Some(lb) = after.strip_prefix("__launch_bounds__") {
                // __launch_bounds__(...) sits between `void` and the name.
                after = lb[lb.find(')').ok_or("unclosed __launch_bounds__")? + 1..].trim_start();
            }
            let open = after.find('(').ok_or("kernel without parameters")?;
            let close = after.find(')').ok_or("kernel without parameters")?;
            let name = after[..open].trim();
            decls.push_str(&format!(
                "extern \"C\" void {name}{};\n",
                &after[open..=close]
            ));
            names.push(name.to_string());
            rest = &after[close..];
        }
    }
    let entries: Vec<String> = names
        .iter()
        .map(|n| format!("    SIMT_KERNEL({n}),"))
        .collect();
    Ok(format!(
        "// Generated by tests/simt/mod.rs from cuda/*.cu.\n#include \"fake_driver.h\"\n{decls}extern \"C\" const SimtKernel simt_kernels[] = {{\n{}\n}};\nextern \"C\" const int simt_kernel_count = {};\n",
        entries.join("\n"),
        names.len()
    ))
}

/// Makes the crate's CUDA backend run on the emulator: the library (soname
/// libcuda.so) is already loaded, so cudarc's dlopen("libcuda.so") gets its
/// driver API, and SAM_UNET_CUBLAS points src/cuda/blas.rs at its cuBLAS.
/// Call before the first CudaDevice::new, while the process has one thread.
pub fn emulate_gpu() -> Option<&'static Simt> {
    let s = simt()?;
    // SAFETY: called from the single-threaded start of a harness=false test
    // binary, before any thread reads the environment.
    unsafe { std::env::set_var("SAM_UNET_CUBLAS", &s.path) };
    Some(s)
}

/// The emulator, or None with the reason printed (no C++ compiler). With
/// SAM_UNET_REQUIRE_SIMT=1 (CI) a missing compiler is a failure.
pub fn simt() -> Option<&'static Simt> {
    static S: OnceLock<Result<Simt, String>> = OnceLock::new();
    match S.get_or_init(build) {
        Ok(s) => Some(s),
        Err(e) => {
            if std::env::var("SAM_UNET_REQUIRE_SIMT").is_ok_and(|v| v == "1") {
                panic!("SAM_UNET_REQUIRE_SIMT=1 but the host emulator is unavailable: {e}");
            }
            println!("SKIPPED: host SIMT emulator unavailable: {e}");
            None
        }
    }
}

/// A buffer of T that ends at a guard page.
pub struct Buf<T: Copy> {
    ptr: *mut T,
    len: usize,
    simt: &'static Simt,
}

impl<T: Copy> Buf<T> {
    fn alloc(simt: &'static Simt, len: usize) -> Self {
        // SAFETY: simt_alloc returns len * size_of::<T>() writable bytes aligned to T, or null.
        let ptr = unsafe { (simt.alloc)(len * size_of::<T>(), align_of::<T>()) } as *mut T;
        assert!(!ptr.is_null(), "simt_alloc of {len} elements failed");
        Buf { ptr, len, simt }
    }
    pub fn from(simt: &'static Simt, v: &[T]) -> Self {
        let b = Self::alloc(simt, v.len());
        // SAFETY: b holds v.len() elements; the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), b.ptr, v.len()) };
        b
    }
    /// An output buffer, every byte 0xff (NaN as f32): elements a kernel does
    /// not write stay NaN.
    pub fn out(simt: &'static Simt, len: usize) -> Self {
        let b = Self::alloc(simt, len);
        // SAFETY: b holds len elements of plain data.
        unsafe { std::ptr::write_bytes(b.ptr as *mut u8, 0xff, len * size_of::<T>()) };
        b
    }
    pub fn p(&self) -> *const T {
        self.ptr
    }
    pub fn m(&self) -> *mut T {
        self.ptr
    }
    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: the buffer holds len initialised elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl<T: Copy> Drop for Buf<T> {
    fn drop(&mut self) {
        // SAFETY: ptr came from simt_alloc and is freed once.
        unsafe { (self.simt.free)(self.ptr as *mut c_void) }
    }
}

extern "C" fn trampoline<C: Fn()>(ctx: *mut c_void) {
    // SAFETY: ctx is the &C passed to simt_launch below, alive for the launch.
    let c = unsafe { &*(ctx as *const C) };
    c();
}

fn trampoline_of<C: Fn()>(_: &C) -> extern "C" fn(*mut c_void) {
    trampoline::<C>
}

impl Simt {
    /// Runs `kernel` (type F, its extern "C" signature) with the geometry of
    /// `cfg`: `call` receives the kernel and calls it with its arguments, once
    /// per emulated thread. Err: a broken synchronisation rule, with the block
    /// and thread that broke it.
    pub fn launch<F: Copy>(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        call: impl Fn(F),
    ) -> Result<(), String> {
        assert_eq!(
            cfg.shared_mem_bytes, 0,
            "dynamic shared memory is not emulated"
        );
        // SAFETY: F is the kernel's C signature as declared in its .cu file.
        let f: F = unsafe {
            *self
                .lib
                .get::<F>(kernel.as_bytes())
                .map_err(|e| format!("kernel {kernel}: {e}"))?
        };
        let body = move || call(f);
        let name = CString::new(kernel).unwrap();
        let mut err = vec![0u8; 1024];
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        // SAFETY: body outlives the call; the trampoline matches its type; err
        // has the length passed.
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                g.0,
                g.1,
                g.2,
                b.0,
                b.1,
                b.2,
                trampoline_of(&body),
                &body as *const _ as *mut c_void,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
            Err(String::from_utf8_lossy(&err[..end]).into_owned())
        }
    }
}

/// How the GPU tests run: on cuda:0 when there is one, else on the emulated
/// driver. Ok(description) or Err(why not). SAM_UNET_REQUIRE_GPU=1 (the GPU
/// check script) refuses the emulator; SAM_UNET_EMULATE_GPU=0 turns it off.
pub fn gpu_or_emulator() -> Result<String, String> {
    let e = match sam_unet::cuda::CudaDevice::new(0) {
        Ok(d) => return Ok(format!("cuda:0 ({})", d.name())),
        Err(e) => e,
    };
    if std::env::var("SAM_UNET_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        return Err(format!("SAM_UNET_REQUIRE_GPU=1 but {e}"));
    }
    if std::env::var("SAM_UNET_EMULATE_GPU").is_ok_and(|v| v == "0") {
        return Err(format!("no GPU ({e}) and SAM_UNET_EMULATE_GPU=0"));
    }
    if emulate_gpu().is_none() {
        return Err(format!("no GPU ({e}) and no host emulator"));
    }
    match sam_unet::cuda::CudaDevice::new(0) {
        Ok(d) => Ok(format!("no GPU ({e}): the emulated driver, {}", d.name())),
        Err(e2) => Err(format!(
            "no GPU ({e}); the emulated driver failed too: {e2}"
        )),
    }
}
