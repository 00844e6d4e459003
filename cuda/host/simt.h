// SIMT on the host: lets the kernels of cuda/*.cu compile as C++ (g++ / clang,
// -std=c++20) and run on the CPU, so that their logic and launch geometry are
// tested against the CPU twins on machines without a GPU (CI). Not a
// performance path and not part of the library: tests/simt/mod.rs builds
// `cuda/*.cu` + simt.cpp into a shared library with this header forced in
// (-include) and calls the kernels through simt_launch.
//
// Model: one kernel launch runs its blocks one after the other; the threads of
// a block are fibers (user-mode stacks) on one OS thread, switched only at
// __syncthreads, __syncwarp and the warp collectives (shuffles, votes). So
// `__shared__` can be a function-local static (one block alive at a time), and
// the scheduler checks CUDA's rules as it goes: a barrier that not every live
// thread of the block reaches, or a full-mask warp collective with a lane that
// exited or waits elsewhere, is reported as an error naming the kernel, block
// and thread instead of hanging. Buffers from simt_alloc end at a guard page:
// a read or write past the end stops the process with the kernel's name.
//
// Sanitizer (simt.cpp, "checks"): the kernel sources are compiled with
// -fsanitize=thread, which makes the compiler call __tsan_read/__tsan_write
// before every memory access; simt.cpp implements those hooks itself (no TSan
// runtime). Every `__shared__` array lives in the section `simt_shared`, so a
// hook knows shared from global memory by address, and checks what
// compute-sanitizer's racecheck and initcheck would: two threads touching one
// shared byte in one barrier interval (at least one writing, not both
// atomics), a read of shared memory no thread of the block wrote, and two
// blocks of a launch touching one global byte that either of them wrote. The
// helpers below that move data between lanes (the warp exchange slots, the
// emulated mma fragments) are the emulator's own registers, not memory a
// kernel could race on: they carry SIMT_UNCHECKED.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct simt_dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

extern "C" {
extern simt_dim3 simt_threadIdx, simt_blockIdx, simt_blockDim, simt_gridDim;
// Barrier primitives of the scheduler (simt.cpp). `kind` 1: warp, 2: block.
void simt_wait(int kind, unsigned mask);
// An atomic read-modify-write of `bytes` at p (racecheck: two atomics on one
// byte do not race).
void simt_atomic(void* p, unsigned bytes);
// Exchange slot of the calling lane in its warp (64 bits per lane).
uint64_t* simt_warp_slots();
// Scratch of the calling warp for fragment exchanges: [32 lanes][16 words].
unsigned int* simt_warp_scratch();
}

#define SIMT_HOST 1
// Not instrumented by the sanitizer build (see above).
#define SIMT_UNCHECKED __attribute__((no_sanitize("thread"), noinline))

#define threadIdx simt_threadIdx
#define blockIdx simt_blockIdx
#define blockDim simt_blockDim
#define gridDim simt_gridDim
#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline
#define __noinline__
// One block runs at a time, so a block's shared memory can be a static; all of
// it in one section, which the sanitizer tells apart from global memory.
#define __shared__ static __attribute__((section("simt_shared")))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

static inline void __syncthreads() { simt_wait(2, 0xffffffffu); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { simt_wait(1, mask); }

template <class T>
static inline uint64_t simt_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp collectives move at most 64 bits");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
static inline T simt_from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

static inline unsigned simt_lane() {
    unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return t & 31u;
}

// Every collective: publish, wait for the warp, read, wait again (so no lane
// overwrites its slot before all have read it).
template <class T>
SIMT_UNCHECKED static T simt_shfl(unsigned mask, T v, int src) {
    uint64_t* slot = simt_warp_slots();
    unsigned lane = simt_lane();
    slot[lane] = simt_bits(v);
    simt_wait(1, mask);
    uint64_t r = slot[src & 31];
    simt_wait(1, mask);
    return simt_from_bits<T>(r);
}

template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = (int)simt_lane();
    return simt_shfl(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lanemask, int width = 32) {
    int lane = (int)simt_lane();
    int src = lane ^ lanemask;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
    return simt_shfl(mask, v, src);
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)simt_lane();
    int src = lane + (int)delta;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
    return simt_shfl(mask, v, src);
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)simt_lane();
    int src = lane - (int)delta;
    if (src < (lane & ~(width - 1))) src = lane;
    return simt_shfl(mask, v, src);
}
SIMT_UNCHECKED static unsigned __ballot_sync(unsigned mask, int pred) {
    uint64_t* slot = simt_warp_slots();
    slot[simt_lane()] = pred != 0;
    simt_wait(1, mask);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) r |= (unsigned)(slot[l] & 1u) << l;
    simt_wait(1, mask);
    return r;
}
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
static inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// Fibers switch only at barriers, so read-modify-write is atomic here; the
// sanitizer is told it was an atomic.
template <class T>
SIMT_UNCHECKED static T simt_atomic_add(T* p, T v) {
    simt_atomic(p, sizeof(T));
    T o = *p;
    *p = o + v;
    return o;
}
static inline float atomicAdd(float* p, float v) { return simt_atomic_add(p, v); }
static inline int atomicAdd(int* p, int v) { return simt_atomic_add(p, v); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return simt_atomic_add(p, v); }

// Bit casts and math as CUDA names them.
static inline float __int_as_float(int i) { return simt_from_bits<float>((uint32_t)i); }
static inline float __uint_as_float(unsigned u) { return simt_from_bits<float>(u); }
static inline int __float_as_int(float f) { return (int)(uint32_t)simt_bits(f); }
static inline unsigned __float_as_uint(float f) { return (unsigned)simt_bits(f); }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <class T>
static inline T __ldg(const T* p) { return *p; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
// expf, erff, sqrtf, fmaxf, ...: the C library's, declared by <cmath> at global scope.
// IEEE round-to-nearest operations that CUDA never contracts into an FMA.
// The emulator is also built with contraction on (-ffp-contract=fast -mfma, as
// nvcc's default), and an inlined `a * b` would then fuse with the caller's
// add: the empty asm makes each operand and result an opaque register value,
// so every one of these rounds on its own, as on the GPU.
#define SIMT_OPAQUE(x) __asm__("" : "+x"(x))
static inline float __fadd_rn(float a, float b) {
    SIMT_OPAQUE(a);
    SIMT_OPAQUE(b);
    float r = a + b;
    SIMT_OPAQUE(r);
    return r;
}
static inline float __fsub_rn(float a, float b) {
    SIMT_OPAQUE(a);
    SIMT_OPAQUE(b);
    float r = a - b;
    SIMT_OPAQUE(r);
    return r;
}
static inline float __fmul_rn(float a, float b) {
    SIMT_OPAQUE(a);
    SIMT_OPAQUE(b);
    float r = a * b;
    SIMT_OPAQUE(r);
    return r;
}
static inline double __dadd_rn(double a, double b) {
    SIMT_OPAQUE(a);
    SIMT_OPAQUE(b);
    double r = a + b;
    SIMT_OPAQUE(r);
    return r;
}
static inline double __dmul_rn(double a, double b) {
    SIMT_OPAQUE(a);
    SIMT_OPAQUE(b);
    double r = a * b;
    SIMT_OPAQUE(r);
    return r;
}
static inline float __fdiv_rn(float a, float b) {
    SIMT_OPAQUE(a);
    SIMT_OPAQUE(b);
    float r = a / b;
    SIMT_OPAQUE(r);
    return r;
}
