// LayerNorm over the last dimension, the CUDA twin of src/ops/norm/cpu.rs.
//
//   y[r, c] = (x[r, c] - mean_r) * rstd_r * w[c] + b[c]
//   mean_r = sum_c x / C,  rstd_r = 1 / sqrt(sum_c (x - mean_r)^2 / C + eps)
// Layout: x, y [rows, C] row-major; one block per row, blockDim.x threads
// striding over C. Two passes over the row (mean, then centred variance),
// accumulated in f32 per thread and reduced through shared memory, which
// matches the CPU twin's two-pass statistics to rounding.
#include "common.cuh"

extern "C" __global__ void layer_norm_f32(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, int rows, int C, float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * C;
    float* yr = y + (long long)r * C;
    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    float mean = block_sum(s, scratch) / C;
    float v = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = xr[c] - mean;
        v += d * d;
    }
    float rstd = rsqrtf(block_sum(v, scratch) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = (xr[c] - mean) * rstd * w[c] + b[c];
}
