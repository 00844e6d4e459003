// Layout changes between channels-first maps and channels-last tokens, the
// CUDA twins of src/ops/layout: y[b, p, c] = x[b, c, p] and back. One thread per
// output element (reads strided, writes coalesced; these maps are small).
#include "common.cuh"

extern "C" __global__ void nchw_to_nhwc_f32(float* __restrict__ y, const float* __restrict__ x, int B, int C, long long P) {
    GRID_STRIDE(i, (long long)B * C * P) {
        int c = i % C;
        long long t = i / C;
        long long p = t % P;
        long long b = t / P;
        y[i] = x[(b * C + c) * P + p];
    }
}

extern "C" __global__ void nhwc_to_nchw_f32(float* __restrict__ y, const float* __restrict__ x, int B, int C, long long P) {
    GRID_STRIDE(i, (long long)B * C * P) {
        long long p = i % P;
        long long t = i / P;
        int c = t % C;
        long long b = t / C;
        y[i] = x[(b * P + p) * C + c];
    }
}

// y[r, i] = x[i] for r < n: one buffer of len values repeated n times (the
// decoder's image tokens and positional encoding, once per box).
extern "C" __global__ void repeat_f32(float* __restrict__ y, const float* __restrict__ x, long long len, long long n) {
    GRID_STRIDE(i, len * n) { y[i] = x[i % len]; }
}

// Row copies between token sequences, the CUDA twin of src/ops/layout's
// narrow and cat: for each item i < n and row r < rows,
//   y[i * ys + (y0 + r) * C + c] = x[i * xs + (x0 + r) * C + c]
// with xs = 0 when every item reads the same x (a shared prefix, e.g. the
// decoder's med token ahead of each box's corner tokens).
extern "C" __global__ void copy_rows_f32(float* __restrict__ y, const float* __restrict__ x, long long n, int rows, int C, long long xs, int x0, long long ys,
                                         int y0) {
    GRID_STRIDE(i, n * rows * C) {
        int c = i % C;
        long long t = i / C;
        int r = t % rows;
        long long item = t / rows;
        y[item * ys + (long long)(y0 + r) * C + c] = x[item * xs + (long long)(x0 + r) * C + c];
    }
}
