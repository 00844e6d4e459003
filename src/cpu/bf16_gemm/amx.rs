//! AMX tiles for the bf16 GEMM (Intel Sapphire Rapids and later).
//!
//! `tdpbf16ps tmm_c, tmm_a, tmm_b` adds to a 16 x 16 f32 tile C the product
//! of A (16 rows x 16 k-pairs, each a 32-bit word of two bf16 values) and B
//! (16 k-pair rows x 16 columns of such words): 16 384 FLOP in one
//! instruction. A block of C of 32 x 32 is four C tiles fed by two A and two
//! B tiles, the eight tile registers there are.
//!
//! The AMX intrinsics are not stable Rust (rust-lang/rust#126622), so the
//! instructions are written with `asm!` (the assembler knows them whatever
//! the target features); the tile registers are invisible to the compiler,
//! which never allocates them.
//!
//! Linux hands out the 8 KiB of tile state per process on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): `available`
//! asks once, after CPUID and XCR0 say the CPU and the kernel have AMX.

/// Rows and columns of C one `block` computes.
pub(super) const BLOCK: usize = 32;

/// Whether AMX-TILE and AMX-BF16 can be used by this process (checked, and
/// permission asked, once).
pub(super) fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::asm;
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY (the three cpuid calls): CPUID exists on every x86-64 CPU and
    // leaves 1, 7 and 0xd are read only when leaf 0 says they exist.
    #[allow(unused_unsafe)]
    let max = unsafe { __cpuid(0) }.eax;
    if max < 0xd {
        return false;
    }
    #[allow(unused_unsafe)]
    let osxsave = unsafe { __cpuid(1) }.ecx & (1 << 27) != 0;
    #[allow(unused_unsafe)]
    let edx7 = unsafe { __cpuid_count(7, 0) }.edx;
    let (amx_bf16, amx_tile) = (edx7 & (1 << 22) != 0, edx7 & (1 << 24) != 0);
    if !(osxsave && amx_bf16 && amx_tile) {
        return false;
    }
    let xcr0: u32;
    // SAFETY: xgetbv is available where CPUID reports OSXSAVE (checked);
    // it reads XCR0 into eax:edx and touches nothing else.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") xcr0, out("edx") _,
             options(nomem, nostack, preserves_flags));
    }
    // XTILECFG (bit 17) and XTILEDATA (bit 18) enabled by the kernel.
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with these arguments only grants
    // this process the AMX tile state (or fails with -errno); the syscall
    // instruction clobbers rcx and r11, declared.
    unsafe {
        asm!("syscall",
             inlateout("rax") SYS_ARCH_PRCTL => ret,
             in("rdi") ARCH_REQ_XCOMP_PERM,
             in("rsi") XFEATURE_XTILEDATA,
             lateout("rcx") _, lateout("r11") _,
             options(nostack));
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The tile configuration: palette 1, all eight tiles 16 rows x 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little end)
        c[48 + t] = 16; // rows
        t += 1;
    }
    Config(c)
};

/// Releases the tiles when dropped (also on unwinding).
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // SAFETY: only reached after `with_tiles` configured the tiles,
        // which needs AMX (`available`); tilerelease only resets tile state.
        unsafe {
            std::arch::asm!("tilerelease", options(nomem, nostack, preserves_flags));
        }
    }
}

/// Runs `f` with the tiles configured on this thread, released after.
/// `f` must not start parallel work (another task on this thread would
/// reconfigure and release them).
pub(super) fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    assert!(available(), "amx::with_tiles without AMX");
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    // SAFETY: AMX is available and permitted (asserted); CONFIG is a valid
    // 64-byte palette-1 configuration, 64-byte aligned.
    unsafe {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(),
                        options(readonly, nostack, preserves_flags));
    }
    let _release = Release;
    f()
}

/// C[rows, cols] (at `c`, row stride `ldc` floats) = or += A B for a block
/// of up to 32 x 32: A 32 rows of `16 k16` k-pair words (row r at
/// `a[r lda..]`), B `16 k16` k-pair rows of 32 column words (row q at
/// `b[q ldb..]`). Rows of A and columns of B past the block's are read and
/// must be zero or ignored; C outside [rows, cols] is never touched.
///
/// # Safety
/// Inside `with_tiles`; `c` with row stride `ldc` is valid for reads and
/// writes of the block [rows, cols] and touched by no one else.
#[allow(clippy::too_many_arguments)]
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) unsafe fn block(
    k16: usize,
    a: &[u32],
    lda: usize,
    b: &[u32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::asm;
    assert!(
        rows <= BLOCK && cols <= BLOCK,
        "amx::block: {rows} x {cols}"
    );
    assert!(
        k16 == 0 || (a.len() >= 31 * lda + 16 * k16 && b.len() >= (16 * k16 - 1) * ldb + 32),
        "amx::block: operands too short"
    );
    #[repr(C, align(64))]
    struct Scratch([f32; BLOCK * BLOCK]);
    // Not zeroed (4 KiB per call, most of them whole blocks that never use
    // it): the tiles read it whole, but past [rows, cols] what they load only
    // lands in scratch lanes that are never copied back.
    let mut tmp = std::mem::MaybeUninit::<Scratch>::uninit();
    let tp = tmp.as_mut_ptr() as *mut f32;
    let full = rows == BLOCK && cols == BLOCK;
    // Where the tiles load and store C: C itself for a whole block, else
    // the scratch block (holding C's values when accumulating).
    let (cp, cs) = if full {
        (c, ldc)
    } else {
        if accumulate {
            for i in 0..rows {
                for j in 0..cols {
                    // SAFETY: (i, j) lies in the block (contract) and in
                    // the scratch (i < rows <= 32, j < cols <= 32).
                    unsafe { tp.add(i * BLOCK + j).write(*c.add(i * ldc + j)) };
                }
            }
        }
        (tp, BLOCK)
    };
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let (sa, sb, sc) = (lda * 4, ldb * 4, cs * 4);
    // SAFETY: tiles are configured (contract); every load reads 16 rows of
    // 64 bytes inside a / b (asserted above) or inside the C block; every
    // store writes 16 rows of 64 bytes inside the C block or the scratch.
    unsafe {
        let c10 = cp.add(16 * cs);
        if accumulate {
            asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) cp, s = in(reg) sc, options(readonly, nostack, preserves_flags));
            asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) cp.add(16), s = in(reg) sc, options(readonly, nostack, preserves_flags));
            asm!("tileloadd tmm2, [{p} + {s}*1]", p = in(reg) c10, s = in(reg) sc, options(readonly, nostack, preserves_flags));
            asm!("tileloadd tmm3, [{p} + {s}*1]", p = in(reg) c10.add(16), s = in(reg) sc, options(readonly, nostack, preserves_flags));
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nomem, nostack, preserves_flags)
            );
        }
        for s in 0..k16 {
            let a0 = ap.add(16 * s);
            let b0 = bp.add(16 * s * ldb);
            asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) a0, s = in(reg) sa, options(readonly, nostack, preserves_flags));
            asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) b0, s = in(reg) sb, options(readonly, nostack, preserves_flags));
            asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) b0.add(16), s = in(reg) sb, options(readonly, nostack, preserves_flags));
            asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) a0.add(16 * lda), s = in(reg) sa, options(readonly, nostack, preserves_flags));
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nomem, nostack, preserves_flags)
            );
        }
        asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) cp, s = in(reg) sc, options(nostack, preserves_flags));
        asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) cp.add(16), s = in(reg) sc, options(nostack, preserves_flags));
        asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) c10, s = in(reg) sc, options(nostack, preserves_flags));
        asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) c10.add(16), s = in(reg) sc, options(nostack, preserves_flags));
    }
    if !full {
        for i in 0..rows {
            for j in 0..cols {
                // SAFETY: (i, j) lies in the block (contract); the tile
                // stores above wrote the whole scratch.
                unsafe { *c.add(i * ldc + j) = tp.add(i * BLOCK + j).read() };
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(super) unsafe fn block(
    _: usize,
    _: &[u32],
    _: usize,
    _: &[u32],
    _: usize,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("amx::available is false off x86-64 Linux")
}

/// The AMX roofline, for benchmarks: `iters` rounds of 4 independent
/// `tdpbf16ps` on registers on every rayon thread; returns the FLOP done
/// (16 x 16 x 32 x 2 per instruction). 0 without AMX.
pub fn roofline(iters: usize) -> u64 {
    use rayon::prelude::*;
    if !available() {
        return 0;
    }
    let threads = rayon::current_num_threads();
    (0..threads).into_par_iter().for_each(|_| {
        with_tiles(|| {
            for _ in 0..iters {
                #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                // SAFETY: tiles are configured (with_tiles); registers only.
                unsafe {
                    std::arch::asm!(
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        options(nomem, nostack, preserves_flags)
                    );
                }
            }
        })
    });
    (threads * iters * 4 * 16 * 16 * 32 * 2) as u64
}
