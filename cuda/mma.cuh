// Tensor-core helpers: bf16 <-> f32 on the bits (no cuda_bf16.h, so NVRTC
// needs no headers) and the warp-wide mma.sync.m16n8k16 (bf16 inputs, f32
// accumulation). Fragment layouts, PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type" (g = lane >> 2, t = lane & 3):
//   A 16x16 row-major, 4 x b32:  a[0] = A[g][2t..2t+1]     a[1] = A[g+8][2t..2t+1]
//                                a[2] = A[g][2t+8..2t+9] a[3] = A[g+8][2t+8..2t+9]
//   B 16x8 "col" (B[k][n], k fastest in a register):
//                                b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C/D 16x8 f32:                d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]
// The lower-numbered element sits in the low half of each b32. On the host
// emulator (SIMT_HOST) the same layout is gathered across the warp and
// multiplied in f32, so a kernel whose fragment bookkeeping is wrong fails
// its host test exactly as it would fail on the GPU.
#pragma once

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) { return __uint_as_float((unsigned int)b << 16); }

// Two floats -> one b32 of two bf16 (lo in the low half).
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    return (unsigned int)f32_to_bf16_bits(lo) | ((unsigned int)f32_to_bf16_bits(hi) << 16);
}

#ifndef SIMT_HOST
// d += A B for one 16x8x16 tile of the warp.
__device__ __forceinline__ void mma_16816_bf16(float* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
static inline float simt_bf16_half(unsigned int w, int hi) { return bf16_bits_to_f32((unsigned short)(hi ? w >> 16 : w & 0xffffu)); }

// The fragments go through the warp's scratch (the emulator's registers, not
// kernel memory: unchecked); the exchange waits for the warp like mma.sync but
// is no memory-ordering point for the racecheck (kind 3).
SIMT_UNCHECKED static void mma_16816_bf16(float* d, const unsigned int* a, const unsigned int* b) {
    unsigned int* x = simt_warp_scratch();  // [32 lanes][16 words]
    unsigned lane = simt_lane();
    for (int i = 0; i < 4; ++i) x[lane * 16 + i] = a[i];
    for (int i = 0; i < 2; ++i) x[lane * 16 + 4 + i] = b[i];
    simt_wait(3, 0xffffffffu);
    const int g = (int)lane >> 2, t = (int)lane & 3;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float s = d[e];
        for (int k = 0; k < 16; ++k) {
            // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
            int al = (row & 7) * 4 + ((k & 7) >> 1), ar = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            // B[k][col]: lane col * 4 + (k % 8) / 2, register (k >= 8)
            int bl = col * 4 + ((k & 7) >> 1), br = k >= 8 ? 1 : 0;
            s += simt_bf16_half(x[al * 16 + ar], k & 1) * simt_bf16_half(x[bl * 16 + 4 + br], k & 1);
        }
        out[e] = s;
    }
    simt_wait(3, 0xffffffffu);
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}
#endif
