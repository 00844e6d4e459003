// The decoder's tokens for box prompts, the CUDA twin of src/ops/prompt
// (box_tokens; with lead = 1 the med token goes in front, as the mask decoder
// lays them out, with lead = 0 only the corners are written and med may be null):
//   tok[n, 0, :] = med                                          (lead = 1)
//   tok[n, lead, :]     = pe((b0 + 0.5) / S, (b1 + 0.5) / S) + e0
//   tok[n, lead + 1, :] = pe((b2 + 0.5) / S, (b3 + 0.5) / S) + e1
//   pe(cx, cy)[j] = sin u_j (j < C/2), cos u_{j - C/2} (j >= C/2),
//   u_j = 2 pi ((2 cx - 1) G[0, j] + (2 cy - 1) G[1, j])
// Roundings one by one in the CPU's order (no FMA contraction); sinf / cosf
// are CUDA's (2 ulp). Layout: boxes [N, 4], gauss [2, C/2], med / e0 / e1 [C],
// tok [N, 2 + lead, C]; one thread per output value.
#include "common.cuh"

__device__ __forceinline__ float unit(float v, float s) {
    // 2 (v + 0.5) / S - 1
    return __fadd_rn(__fmul_rn(2.0f, __fdiv_rn(__fadd_rn(v, 0.5f), s)), -1.0f);
}

extern "C" __global__ void box_tokens_f32(float* __restrict__ tok, const float* __restrict__ boxes, const float* __restrict__ gauss, const float* __restrict__ med,
                                          const float* __restrict__ e0, const float* __restrict__ e1, int N, int C, float S, int lead) {
    const float two_pi = 2.0f * 3.14159265358979323846f;
    const int half = C / 2;
    const int T = 2 + lead;
    GRID_STRIDE(i, (long long)N * T * C) {
        int c = i % C;
        // -1: the lead token (med), 0 / 1: the corners
        int slot = (int)((i / C) % T) - lead;
        long long n = i / ((long long)T * C);
        if (slot < 0) {
            tok[i] = med[c];
            continue;
        }
        const float* b = boxes + n * 4 + slot * 2;
        float x = unit(b[0], S), y = unit(b[1], S);
        int j = c < half ? c : c - half;
        float u = __fmul_rn(two_pi, __fadd_rn(__fmul_rn(x, gauss[j]), __fmul_rn(y, gauss[half + j])));
        float pe = c < half ? sinf(u) : cosf(u);
        tok[i] = __fadd_rn(pe, (slot == 0 ? e0 : e1)[c]);
    }
}
