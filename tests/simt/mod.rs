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
    i32,
    *mut c_char,
    usize,
) -> i32;
type AllocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type ConfigureFn = unsafe extern "C" fn(i32, i32, u64);

pub struct Simt {
    lib: libloading::Library,
    path: PathBuf,
    /// Which build this is (`checked`, `checked+fma`, `fast`, or a mutant's name).
    pub name: String,
    launch: LaunchFn,
    alloc: AllocFn,
    free: FreeFn,
}

/// How the kernels are compiled for the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Build {
    /// The sanitizer (cuda/host/simt.cpp): racecheck, initcheck, cross-block
    /// global writes, and the thread schedules of SAM_UNET_SIMT_SCHEDULES
    /// (default 3: natural, reversed, shuffled). Costs a call per memory
    /// access and a run per schedule: for op tests at small shapes.
    pub checks: bool,
    /// `a * b + c` contracted into FMAs (-mfma -ffp-contract=fast), as nvcc
    /// does by default; otherwise every operation is rounded on its own.
    pub fma: bool,
}

impl Build {
    /// The op tests' default: checks on, no contraction.
    pub const CHECKED: Build = Build {
        checks: true,
        fma: false,
    };
    /// Checks on, FMA contraction on.
    pub const CHECKED_FMA: Build = Build {
        checks: true,
        fma: true,
    };
    /// No sanitizer, one schedule: the whole-model tests (full-size
    /// SAM-UNet-50), which would take hours checked; every kernel they run is
    /// checked at small shapes by tests/kernels_host.rs and tests/cuda_ops.rs.
    pub const FAST: Build = Build {
        checks: false,
        fma: false,
    };

    fn name(self) -> String {
        match (self.checks, self.fma) {
            (true, false) => "checked".into(),
            (true, true) => "checked+fma".into(),
            (false, false) => "fast".into(),
            (false, true) => "fast+fma".into(),
        }
    }
}

/// The .cu sources of the emulator's library: cuda/*.cu and the rule-breaking
/// kernels of the emulator's own tests (cuda/host/*.cu).
pub fn sources() -> Result<Vec<PathBuf>, String> {
    let cuda = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut sources = vec![];
    for dir in [cuda.clone(), cuda.join("host")] {
        sources.extend(
            std::fs::read_dir(&dir)
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu")),
        );
    }
    sources.sort();
    Ok(sources)
}

fn build(b: Build) -> Result<Simt, String> {
    // A sibling process (`Sibling`) loads the library its parent built.
    if let Ok(v) = std::env::var(PREBUILT)
        && let Some((name, path)) = v.split_once('=')
        && name == b.name()
    {
        return load(name, b, PathBuf::from(path));
    }
    build_from(&b.name(), b, &sources()?)
}

/// `<build name>=<path of its libsimt.so>`: set for a `Sibling`.
const PREBUILT: &str = "SAM_UNET_SIMT_PREBUILT";
/// Set in a `Sibling`'s environment: it runs the tests it was given and
/// starts no sibling of its own.
pub const SIBLING: &str = "SAM_UNET_TEST_SIBLING";

/// A library of the kernels in `sources`, built with `b`, named `name` (one
/// per test binary and name: cargo runs test binaries one at a time).
fn build_from(name: &str, b: Build, sources: &[PathBuf]) -> Result<Simt, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cuda = root.join("cuda");
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("simt")
        .join(format!("{exe}-{}", name.replace(['+', '/'], "_")));
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let lib_path = out_dir.join("libsimt.so");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let common = [
        "-std=c++20",
        "-O2",
        "-g",
        "-fPIC",
        "-Wall",
        "-Wno-unused-function",
        "-fno-strict-aliasing",
        // Undefined behaviour in a kernel (signed overflow in index arithmetic,
        // misaligned word access, out-of-range shifts) stops the run, naming
        // the source line.
        "-fsanitize=undefined",
        "-fno-sanitize-recover=all",
    ];
    // 1. The kernels, one object each (the sanitizer's instrumentation and the
    //    contraction mode apply to them only, not to the emulator itself).
    let mut cmd = Command::new(&cxx);
    cmd.current_dir(&out_dir).args(common).arg("-c");
    if b.checks {
        // Calls to __tsan_read/__tsan_write before every memory access, which
        // simt.cpp implements (no TSan runtime is linked).
        cmd.args([
            "-fsanitize=thread",
            "--param=tsan-instrument-func-entry-exit=0",
        ]);
    }
    if b.fma {
        cmd.args(["-mfma", "-ffp-contract=fast"]);
    } else {
        cmd.arg("-ffp-contract=off");
    }
    cmd.arg(format!("-I{}", cuda.display()))
        .arg("-include")
        .arg(cuda.join("host/simt.h"))
        .args(["-x", "c++"]);
    // Object names: the file stems are unique (cuda/*.cu, cuda/host/*.cu).
    let mut objects = vec![];
    for (i, src) in sources.iter().enumerate() {
        let obj = out_dir.join(format!(
            "{i}_{}.o",
            src.file_stem().unwrap_or_default().to_string_lossy()
        ));
        let mut c = Command::new(&cxx);
        c.current_dir(&out_dir);
        c.args(cmd.get_args());
        c.arg(src).arg("-o").arg(&obj);
        objects.push((c, obj));
    }
    // Two compilers at a time (the CI machine has two cores).
    let mut pending: Vec<(std::process::Child, PathBuf)> = vec![];
    let mut objs = vec![];
    let wait = |(child, obj): (std::process::Child, PathBuf)| -> Result<PathBuf, String> {
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        if !o.status.success() {
            // A compiler that exists but fails on our kernels is a real failure.
            panic!(
                "the kernels do not compile for the host emulator ({name}):\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(obj)
    };
    for (mut c, obj) in objects {
        if pending.len() == 2 {
            objs.push(wait(pending.remove(0))?);
        }
        let child = c
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("no C++ compiler `{cxx}` ({e})"))?;
        pending.push((child, obj));
    }
    for p in pending {
        objs.push(wait(p)?);
    }
    let shared = shared_memory(&objs)?;
    let registry = out_dir.join("registry.cpp");
    std::fs::write(&registry, kernel_table(sources, &shared)?).map_err(|e| e.to_string())?;
    // 2. The emulator, the emulated driver and the kernel table, linked with them.
    let mut cmd = Command::new(&cxx);
    cmd.current_dir(&out_dir)
        .args(common)
        // UBSan watches the kernels (above), not the emulator's own hot loops
        // (the shadow checks, the fibers, the emulated cuBLAS); its runtime
        // is still linked for the kernels' objects (-lubsan below).
        .arg("-fno-sanitize=undefined")
        .args(["-shared", "-ffp-contract=off"])
        .arg(format!("-I{}", cuda.join("host").display()))
        .arg(cuda.join("host/simt.cpp"))
        .arg(cuda.join("host/fake_driver.cpp"))
        .arg(&registry)
        .args(&objs)
        .arg("-lubsan")
        // Every symbol resolved at link time (a sanitizer hook we do not
        // define is a link error, not a crash at the first call); references
        // inside the library bind to its own definitions, so two builds can be
        // loaded in one process.
        .args(["-Wl,-z,defs", "-Wl,-Bsymbolic"])
        // The emulated driver answers to cudarc's dlopen("libcuda.so") once loaded.
        .arg("-Wl,-soname,libcuda.so")
        .arg("-pthread")
        .arg("-o")
        .arg(&lib_path);
    let o = cmd
        .output()
        .map_err(|e| format!("no C++ compiler `{cxx}` ({e})"))?;
    if !o.status.success() {
        panic!(
            "the host emulator does not link ({name}):\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    load(name, b, lib_path)
}

/// Loads a library that `build_from` made and configures its checks.
fn load(name: &str, b: Build, lib_path: PathBuf) -> Result<Simt, String> {
    // SAFETY: the library was built from our sources (by this process or its
    // parent, `Sibling`); its initialisers only set up static data.
    let lib = unsafe { libloading::Library::new(&lib_path) }.map_err(|e| e.to_string())?;
    // SAFETY: these symbols are defined in simt.cpp with exactly these C signatures.
    let (launch, alloc, free, configure) = unsafe {
        (
            *lib.get::<LaunchFn>(b"simt_launch")
                .map_err(|e| e.to_string())?,
            *lib.get::<AllocFn>(b"simt_alloc")
                .map_err(|e| e.to_string())?,
            *lib.get::<FreeFn>(b"simt_free").map_err(|e| e.to_string())?,
            *lib.get::<ConfigureFn>(b"simt_configure")
                .map_err(|e| e.to_string())?,
        )
    };
    let schedules: i32 = std::env::var("SAM_UNET_SIMT_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("SAM_UNET_SIMT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0001);
    // SAFETY: plain values; no launch runs yet.
    unsafe { configure(b.checks as i32, schedules, seed) };
    Ok(Simt {
        lib,
        path: lib_path,
        name: name.to_string(),
        launch,
        alloc,
        free,
    })
}

/// The static shared memory of each kernel (bytes, by kernel name), read off
/// the objects' symbol tables: every writable function-local static of a
/// kernel is a `__shared__` array in the section simt_shared (simt.h), its
/// symbol `_ZZ<len><kernel>E...` names the kernel. The emulated driver checks
/// launches against the 48 KB limit with it.
///
/// GCC ignores the section of a static inside a function template (it goes
/// to a COMDAT `.bss._ZZ...` of its own), which would leave that array
/// unchecked by the sanitizer and its reuse by the next block reported as a
/// global race: refused here by name.
fn shared_memory(objs: &[PathBuf]) -> Result<std::collections::HashMap<String, u64>, String> {
    let mut shared = std::collections::HashMap::new();
    for obj in objs {
        let o = Command::new("objdump")
            .arg("-t")
            .arg(obj)
            .output()
            .map_err(|e| format!("objdump (binutils) is needed by the host emulator: {e}"))?;
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // value flags... section size name
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || !f[f.len() - 1].starts_with("_ZZ") {
                continue;
            }
            let (name, size, section) = (f[f.len() - 1], f[f.len() - 2], f[f.len() - 3]);
            if section == "simt_shared" {
                // _ZZ<len><kernel>E..., or _ZZL<len>... for a static helper.
                let rest = name[3..].strip_prefix('L').unwrap_or(&name[3..]);
                let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
                let len: usize = rest[..digits].parse().unwrap_or(0);
                if let Some(kernel) = rest.get(digits..digits + len) {
                    *shared.entry(kernel.to_string()).or_insert(0) +=
                        u64::from_str_radix(size, 16).unwrap_or(0);
                }
            } else if section.starts_with(".bss") || section.starts_with(".data") {
                panic!(
                    "{}: the static {name} lies in {section}, not in simt_shared: a __shared__ \
                     array declared inside a function template? Declare it in the extern \"C\" \
                     kernel and pass it in (cuda/attention.cu's TcShared), so that the \
                     emulator's racecheck sees it",
                    obj.display()
                );
            }
        }
    }
    Ok(shared)
}

/// A library built from the sources with one text replaced in one file (a
/// mutation test: the change must make the emulator report an error). Every
/// .cu and .cuh is copied into one folder, the mutated file among them, so
/// that `#include "common.cuh"` finds the mutated header too.
/// Only the .cu files named in `build` are compiled (a mutant is built for
/// one test: the fewer sources, the sooner it runs).
pub fn mutant(name: &str, file: &str, from: &str, to: &str, build: &[&str]) -> &'static Simt {
    mutant_with(Build::CHECKED, name, file, from, to, build)
}

/// `mutant`, compiled with `b`.
pub fn mutant_with(
    b: Build,
    name: &str,
    file: &str,
    from: &str,
    to: &str,
    build: &[&str],
) -> &'static Simt {
    let cuda = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("simt")
        .join(format!("mutant-src-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut found = false;
    let mut srcs = vec![];
    for d in [cuda.clone(), cuda.join("host")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let ext = path.extension().map(|e| e.to_string_lossy().into_owned());
            if !matches!(ext.as_deref(), Some("cu") | Some("cuh")) {
                continue;
            }
            let fname = path.file_name().unwrap().to_owned();
            let mut text = std::fs::read_to_string(&path).unwrap();
            if fname == file {
                assert_eq!(
                    text.matches(from).count(),
                    1,
                    "mutant {name}: `{from}` must occur exactly once in {file}"
                );
                text = text.replacen(from, to, 1);
                found = true;
            }
            let copy = dir.join(&fname);
            std::fs::write(&copy, text).unwrap();
            if build.iter().any(|b| fname == *b) {
                srcs.push(copy);
            }
        }
    }
    assert!(found, "mutant {name}: no source {file}");
    assert_eq!(srcs.len(), build.len(), "mutant {name}: sources {build:?}");
    srcs.sort();
    Box::leak(Box::new(
        build_from(&format!("mutant-{name}"), b, &srcs).unwrap(),
    ))
}

/// The kernels of `sources` that reach no barrier and no warp collective:
/// those the emulator may run in direct mode (cuda/host/simt.cpp, g_direct).
/// A source scan of the .cu files, the headers beside them (cuda/*.cuh) and
/// the emulator's own simt.h: every function and macro whose body names
/// `simt_wait` (which __syncthreads, __syncwarp, the shuffles, votes and
/// the emulated mma call), or a function or macro that does, transitively, is
/// a barrier; a kernel whose body names none is barrier-free. Both branches
/// of an #if count, and an overloaded name is a barrier if any of its bodies
/// is: the scan errs toward fibers. A kernel that reaches a barrier in
/// direct mode anyway fails its launch, naming itself.
pub fn barrier_free_kernels(
    sources: &[PathBuf],
) -> Result<std::collections::HashSet<String>, String> {
    let cuda = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut texts = vec![];
    for f in sources {
        texts.push(std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    let mut headers: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
        .collect();
    headers.push(cuda.join("host/simt.h"));
    headers.sort();
    for f in &headers {
        texts.push(std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    Ok(barrier_free_in(&texts))
}

/// `barrier_free_kernels` on source texts: the names of the `extern "C"
/// __global__` kernels among them that reach no `simt_wait`.
pub fn barrier_free_in(texts: &[&str]) -> std::collections::HashSet<String> {
    use std::collections::{HashMap, HashSet};
    // name -> the identifiers named in each of its bodies
    let mut bodies: HashMap<String, Vec<HashSet<String>>> = HashMap::new();
    let mut kernels = vec![];
    for text in texts {
        let (code, macros) = strip_source(text);
        for (name, body) in macros {
            bodies.entry(name).or_default().push(identifiers(&body));
        }
        for (name, sig, body) in function_bodies(&code) {
            if sig.contains("__global__") {
                kernels.push(name.clone());
            }
            bodies.entry(name).or_default().push(identifiers(body));
        }
    }
    let mut barrier: HashSet<String> = HashSet::from(["simt_wait".to_string()]);
    loop {
        let before = barrier.len();
        for (name, uses) in &bodies {
            if !barrier.contains(name) && uses.iter().any(|u| u.iter().any(|i| barrier.contains(i)))
            {
                barrier.insert(name.clone());
            }
        }
        if barrier.len() == before {
            break;
        }
    }
    kernels
        .into_iter()
        .filter(|k| !barrier.contains(k))
        .collect()
}

/// The source without comments, string and character literals and
/// preprocessor lines (newlines kept), and the `#define`s as (name, body).
fn strip_source(text: &str) -> (String, Vec<(String, String)>) {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut line_start = true;
    let mut macros = vec![];
    while i < b.len() {
        let c = b[i];
        if line_start && c == b'#' {
            // A preprocessor line, with its continuations.
            let mut j = i;
            let mut line = String::new();
            while j < b.len() {
                if b[j] == b'\\' && j + 1 < b.len() && b[j + 1] == b'\n' {
                    j += 2;
                    line.push(' ');
                    continue;
                }
                if b[j] == b'\n' {
                    break;
                }
                line.push(b[j] as char);
                j += 1;
            }
            let rest = line[1..].trim_start();
            if let Some(def) = rest.strip_prefix("define") {
                let def = def.trim_start();
                let end = def
                    .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                    .unwrap_or(def.len());
                macros.push((def[..end].to_string(), def[end..].to_string()));
            }
            i = j;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
            continue;
        }
        if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
            continue;
        }
        if c == b'\n' {
            line_start = true;
        } else if !c.is_ascii_whitespace() {
            line_start = false;
        }
        out.push(c as char);
        i += 1;
    }
    (out, macros)
}

/// Every `name(...) ... { body }` in code at any depth (so member functions
/// count too): (name, the text from the previous `;`, `{` or `}` up to the
/// brace, the body). Control statements (`if (...) {`) are skipped; their
/// blocks are part of the enclosing body anyway.
fn function_bodies(code: &str) -> Vec<(String, &str, &str)> {
    const KEYWORDS: [&str; 6] = ["if", "for", "while", "switch", "catch", "return"];
    let b = code.as_bytes();
    let mut found = vec![];
    for (open, _) in code.match_indices('{') {
        let sig_start = code[..open].rfind([';', '{', '}']).map_or(0, |p| p + 1);
        let sig = &code[sig_start..open];
        // The last parenthesised group of the signature at depth 0 is the
        // parameter list (`__launch_bounds__(256) name(...)` has two).
        let Some(close) = sig.rfind(')') else {
            continue;
        };
        let mut depth = 0usize;
        let mut paren = None;
        for (k, ch) in sig[..=close].char_indices().rev() {
            match ch {
                ')' => depth += 1,
                '(' => {
                    depth -= 1;
                    if depth == 0 {
                        paren = Some(k);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(paren) = paren else { continue };
        let before = sig[..paren].trim_end();
        let start = before
            .rfind(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .map_or(0, |p| p + 1);
        let name = &before[start..];
        if name.is_empty() || name.as_bytes()[0].is_ascii_digit() || KEYWORDS.contains(&name) {
            continue;
        }
        // The body: up to the matching brace.
        let mut depth = 0usize;
        let mut end = b.len();
        for (k, &ch) in b.iter().enumerate().skip(open) {
            match ch {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k;
                        break;
                    }
                }
                _ => {}
            }
        }
        found.push((name.to_string(), sig, &code[open..end]));
    }
    found
}

fn identifiers(text: &str) -> std::collections::HashSet<String> {
    text.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .filter(|w| !w.is_empty() && !w.as_bytes()[0].is_ascii_digit())
        .map(str::to_string)
        .collect()
}

/// The C++ table of every `extern "C" __global__` kernel of the sources
/// (fake_driver.h): declarations copied from the .cu files, then the entries.
fn kernel_table(
    sources: &[PathBuf],
    shared: &std::collections::HashMap<String, u64>,
) -> Result<String, String> {
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
    let free = barrier_free_kernels(sources)?;
    let entries: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                "    SIMT_KERNEL({n}, {}, {}),",
                shared.get(n).copied().unwrap_or(0),
                free.contains(n) as i32
            )
        })
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
pub fn emulate_gpu(b: Build) -> Option<&'static Simt> {
    let s = simt_build(b)?;
    // SAFETY: called from the single-threaded start of a harness=false test
    // binary, before any thread reads the environment.
    unsafe { std::env::set_var("SAM_UNET_CUBLAS", &s.path) };
    Some(s)
}

/// The emulator's checked build (see Build::CHECKED), or None with the reason
/// printed (no C++ compiler). With SAM_UNET_REQUIRE_SIMT=1 (CI) a missing
/// compiler is a failure.
pub fn simt() -> Option<&'static Simt> {
    simt_build(Build::CHECKED)
}

/// Both checked builds, without and with FMA contraction: the kernel tests run
/// on each (empty when there is no C++ compiler, the reason printed).
pub fn builds() -> Vec<&'static Simt> {
    [Build::CHECKED, Build::CHECKED_FMA]
        .into_iter()
        .filter_map(simt_build)
        .collect()
}

/// Runs `test` on each checked build, saying which one runs (a failure's
/// output shows the build it failed under).
pub fn each_build(test: impl Fn(&'static Simt)) {
    for s in builds() {
        println!("--- host emulator build: {}", s.name);
        test(s);
    }
}

pub fn simt_build(b: Build) -> Option<&'static Simt> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Cache = Mutex<HashMap<String, &'static Result<Simt, String>>>;
    static S: OnceLock<Cache> = OnceLock::new();
    let r: &'static Result<Simt, String> = {
        let mut m = S.get_or_init(Default::default).lock().unwrap();
        m.entry(b.name())
            .or_insert_with(|| Box::leak(Box::new(build(b))))
    };
    match r {
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
    /// A C function of the library (the emulated driver and cuBLAS, for
    /// tests of their argument checks).
    ///
    /// # Safety
    /// F must be the symbol's C signature.
    pub unsafe fn sym<F: Copy>(&self, name: &str) -> F {
        // SAFETY: the caller names F correctly.
        unsafe { *self.lib.get::<F>(name.as_bytes()).unwrap() }
    }

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
        self.launch_in(kernel, cfg, false, call)
    }

    /// `launch` in direct mode (cuda/host/simt.cpp, g_direct: in a build
    /// without the sanitizer, every thread of a block runs to completion in
    /// turn on one fiber), as the emulated driver launches the kernels that
    /// `barrier_free_kernels` names.
    pub fn launch_direct<F: Copy>(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        call: impl Fn(F),
    ) -> Result<(), String> {
        self.launch_in(kernel, cfg, true, call)
    }

    fn launch_in<F: Copy>(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        direct: bool,
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
                direct as i32,
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
pub fn gpu_or_emulator(b: Build) -> Result<String, String> {
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
    if emulate_gpu(b).is_none() {
        return Err(format!("no GPU ({e}) and no host emulator"));
    }
    match sam_unet::cuda::CudaDevice::new(0) {
        Ok(d) => Ok(format!(
            "no GPU ({e}): the emulated driver, {} ({} build)",
            d.name(),
            b.name()
        )),
        Err(e2) => Err(format!(
            "no GPU ({e}); the emulated driver failed too: {e2}"
        )),
    }
}

/// Another process of this test binary, started beside this one with
/// `args` and `envs`: the emulator runs one launch at a time on one core,
/// so on the two-core CI machine a long emulated test runs in a sibling
/// while this process runs the others. With `prebuilt`, the sibling loads
/// that library instead of building its own (same build, no second
/// compile). Its output is collected and printed by `finish`, after this
/// process's own results, so that the two never interleave.
pub struct Sibling {
    what: String,
    child: std::process::Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Sibling {
    pub fn spawn(
        what: &str,
        args: &[String],
        envs: &[(&str, String)],
        prebuilt: Option<&Simt>,
    ) -> Result<Sibling, String> {
        use std::io::Read;
        use std::process::Stdio;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env(SIBLING, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        if let Some(s) = prebuilt {
            cmd.env(PREBUILT, format!("{}={}", s.name, s.path.display()));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the sibling ({what}): {e}"))?;
        // Both pipes drained while it runs (a full pipe would stop it).
        fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
            std::thread::spawn(move || {
                let mut b = vec![];
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut b);
                }
                String::from_utf8_lossy(&b).into_owned()
            })
        }
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Ok(Sibling {
            what: what.to_string(),
            child,
            out,
            err,
        })
    }

    /// On the emulator, the test `longest` in a sibling on this process's
    /// library of `b`, when it is selected beside others and this process
    /// is not a sibling itself; None when it runs here (a sibling that
    /// cannot start is said and not fatal). `selected`: the test names this
    /// process was asked for.
    pub fn longest_beside(longest: &str, selected: &[&str], b: Build) -> Option<Sibling> {
        if std::env::var_os(SIBLING).is_some() || selected.len() < 2 || !selected.contains(&longest)
        {
            return None;
        }
        let lib = simt_build(b);
        Sibling::spawn(longest, &[longest.to_string()], &[], lib)
            .map_err(|e| println!("{e}; running it in this process"))
            .ok()
    }

    /// Waits for the sibling, prints its output; true when it passed.
    pub fn finish(mut self) -> bool {
        let status = self.child.wait();
        let out = self.out.join().unwrap_or_default();
        let err = self.err.join().unwrap_or_default();
        println!(
            "--- {} (a sibling process, run beside the above):",
            self.what
        );
        print!("{out}");
        if !err.is_empty() {
            println!("--- its stderr:");
            print!("{err}");
        }
        match status {
            Ok(s) if s.success() => true,
            Ok(s) => {
                println!("--- {} failed: {s}", self.what);
                false
            }
            Err(e) => {
                println!("--- {}: cannot wait for it: {e}", self.what);
                false
            }
        }
    }
}
