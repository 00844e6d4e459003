// Adam as torch.optim.Adam computes it (no weight decay, no amsgrad), the CUDA
// twin of src/ops/optim: one thread per value,
//   m = m + (1 - b1) (g - m)                      (torch's lerp)
//   v = v b2 + ((1 - b2) g) g                      (torch's mul_ + addcmul_)
//   p = p - step_size (m / (sqrt(v) / bc2_sqrt + eps))
// Every product and sum rounded on its own, in this order, like the CPU twin.
// The step's scalars come from device memory, h[6] = {step_size, 1 - b1, b2,
// 1 - b2, bc2_sqrt, eps} (computed in f64 on the host, then rounded, as
// PyTorch's Python scalars are), so that a recorded step reads the current
// learning rate and bias corrections. Layout: p, g, m, v flat [n].
#include "common.cuh"

extern "C" __global__ void adam_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                                    const float* __restrict__ h, long long n) {
    const float step_size = h[0], omb1 = h[1], b2 = h[2], omb2 = h[3], bc2s = h[4], eps = h[5];
    GRID_STRIDE(i, n) {
        float gi = g[i];
        float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(gi, m[i]), omb1));
        float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(omb2, gi), gi));
        float denom = __fadd_rn(__fdiv_rn(sqrtf(vi), bc2s), eps);
        p[i] = __fsub_rn(p[i], __fmul_rn(step_size, __fdiv_rn(mi, denom)));
        m[i] = mi;
        v[i] = vi;
    }
}
