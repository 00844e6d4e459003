// LayerNorm over the last dimension, the CUDA twin of src/ops/norm/cpu.rs.
//
//   y[r, c] = (x[r, c] - mean_r) * rstd_r * w[c] + b[c]
//   mean_r = sum_c x / C,  rstd_r = 1 / sqrt(sum_c (x - mean_r)^2 / C + eps)
// Layout: x, y [rows, C] row-major; one block per row, blockDim.x threads
// striding over C. Two passes over the row (mean, then centred variance),
// accumulated in f32 per thread and reduced through shared memory, which
// matches the CPU twin's two-pass statistics to rounding.
#include "common.cuh"

#include "mma.cuh"

// OUT: float, or unsigned short for bf16 (the input of a bf16 GEMM, written
// directly instead of through a conversion pass).
// scratch: 32 floats of shared memory, declared by the kernel (a __shared__
// array inside a function template escapes the host emulator's checks).
template <class OUT>
__device__ __forceinline__ void layer_norm_rows(OUT* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                                                int rows, int C, float eps, float* scratch) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * C;
    OUT* yr = y + (long long)r * C;
    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    float mean = block_sum(s, scratch) / C;
    float v = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = xr[c] - mean;
        v += d * d;
    }
    float rstd = rsqrtf(block_sum(v, scratch) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float o = (xr[c] - mean) * rstd * w[c] + b[c];
        if constexpr (sizeof(OUT) == 2) yr[c] = f32_to_bf16_bits(o);
        else yr[c] = o;
    }
}

extern "C" __global__ void layer_norm_f32(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b, int rows,
                                          int C, float eps) {
    __shared__ float scratch[32];
    layer_norm_rows<float>(y, x, w, b, rows, C, eps, scratch);
}

// The same, y in bf16.
extern "C" __global__ void layer_norm_bf16out(unsigned short* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                                              int rows, int C, float eps) {
    __shared__ float scratch[32];
    layer_norm_rows<unsigned short>(y, x, w, b, rows, C, eps, scratch);
}

// LayerNorm2d (SAM) over the channels of an NCHW map, then an activation:
//   y[n, c, p] = act((x[n, c, p] - mean_{n,p}) * rstd_{n,p} * w[c] + b[c])
// Layout: x, y [N, C, P] (P = H * W pixels). One thread per pixel (n, p):
// consecutive threads read consecutive pixels of a channel row, so every load
// is coalesced; two passes over the C channels (mean, centred variance).
// act: 0 none, 1 ReLU, 2 GELU.
extern "C" __global__ void layer_norm2d_f32(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ b, int N, int C, long long P, float eps, int act) {
    GRID_STRIDE(i, (long long)N * P) {
        long long n = i / P, p = i % P;
        const float* xs = x + n * C * P + p;
        float s = 0.0f;
        for (int c = 0; c < C; ++c) s += xs[c * P];
        float mean = s / C;
        float v = 0.0f;
        for (int c = 0; c < C; ++c) {
            float d = xs[c * P] - mean;
            v += d * d;
        }
        float rstd = rsqrtf(v / C + eps);
        float* ys = y + n * C * P + p;
        for (int c = 0; c < C; ++c) {
            float o = (xs[c * P] - mean) * rstd * w[c] + b[c];
            if (act == 1) o = fmaxf(o, 0.0f);
            else if (act == 2) o = 0.5f * o * (1.0f + erff(o * 0.70710678118654752f));
            ys[c * P] = o;
        }
    }
}

// LayerNorm backward (both forms), the CUDA twin of layer_norm_backward in
// src/ops/norm/cpu.rs: `groups` groups of C values, value ch of group j at
// base(j) + ch * stride, base(j) = j C (P = 0, the last-dim form) or
// (j / P) C P + j % P (LayerNorm2d over NCHW, P pixels). One thread per group,
// the CPU's order, in f64:
//   mean, biased var, rstd = 1 / sqrt(var + eps), xhat = (x - mean) rstd,
//   dx = rstd (g w - mean(g w) - xhat mean(g w xhat))
// and the per-group terms of the weight and bias gradients, pw[j, ch] =
// g xhat, pb[j, ch] = g ([groups, C], summed over groups by ops::reduce).
extern "C" __global__ void layer_norm_backward_f32(float* __restrict__ dx, float* __restrict__ pw, float* __restrict__ pb,
                                                   const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ g,
                                                   long long groups, int C, long long stride, long long P, float eps) {
    GRID_STRIDE(j, groups) {
        long long base = P == 0 ? j * C : (j / P) * C * P + j % P;
        double s = 0.0;
        for (int ch = 0; ch < C; ++ch) s += (double)x[base + ch * stride];
        double mean = s / C;
        double v = 0.0;
        for (int ch = 0; ch < C; ++ch) {
            double d = (double)x[base + ch * stride] - mean;
            v += d * d;
        }
        double rstd = 1.0 / sqrt(v / C + (double)eps);
        double mgw = 0.0, mgwx = 0.0;
        for (int ch = 0; ch < C; ++ch) {
            long long at = base + ch * stride;
            double xhat = ((double)x[at] - mean) * rstd;
            double gv = (double)g[at];
            double gw = gv * (double)w[ch];
            mgw += gw;
            mgwx += gw * xhat;
            if (pw) pw[j * C + ch] = (float)(gv * xhat);
            if (pb) pb[j * C + ch] = (float)gv;
        }
        mgw /= C;
        mgwx /= C;
        for (int ch = 0; ch < C; ++ch) {
            long long at = base + ch * stride;
            double xhat = ((double)x[at] - mean) * rstd;
            double gw = (double)g[at] * (double)w[ch];
            dx[at] = (float)(rstd * (gw - mgw - xhat * mgwx));
        }
    }
}

// Train-mode BatchNorm2d, the CUDA twin of batch_norm_train (src/ops/norm):
// x [N, C, P] (P = H W).
//   bn_stats_f64:    per channel (one 256-thread block each, BN_LANES), the
//                    mean and the biased variance in f64, each a sum over
//                    images of per-plane sums, the CPU's order.
//   bn_apply_f32:    y = x scale + shift, scale = rstd gamma, shift = beta -
//                    mean rstd gamma (computed in f64, rounded once), then
//                    + residual and ReLU when asked.
//   bn_backward_sums: per channel, dgamma = sum g xhat and dbeta = sum g (f64).
//   bn_backward_dx:  dx = gamma rstd (g - dbeta / M - xhat dgamma / M), M = N P
//                    (or all ranks' count under SyncBatchNorm).
// A plane's sums in the CPU's order (src/ops/norm/cpu.rs lane_sums2): 256
// interleaved f64 partial sums (element q into lane q mod 256, one lane per
// thread of a 256-thread block: coalesced loads), then the lanes added in
// order by thread 0. The adds (and the terms' products) are _rn so that no
// FMA contraction leaves that order. One block per channel.
#define BN_LANES 256

// Thread 0 gets sum over lanes of `mine` (every thread's lane), in lane
// order; `lanes` is BN_LANES doubles of shared memory.
__device__ __forceinline__ double bn_lanes_total(double mine, double* lanes) {
    lanes[threadIdx.x] = mine;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x == 0)
        for (int j = 0; j < BN_LANES; ++j) s = __dadd_rn(s, lanes[j]);
    __syncthreads();
    return s;
}

extern "C" __global__ void bn_stats_f64(double* __restrict__ mean, double* __restrict__ var, const float* __restrict__ x, int N, int C,
                                        long long P) {
    __shared__ double lanes[BN_LANES];
    __shared__ double bcast;
    if (blockDim.x != BN_LANES) return;
    for (int ch = blockIdx.x; ch < C; ch += gridDim.x) {
        double s = 0.0;
        for (int i = 0; i < N; ++i) {
            const float* pl = x + ((long long)i * C + ch) * P;
            double l = 0.0;
            for (long long q = threadIdx.x; q < P; q += BN_LANES) l = __dadd_rn(l, (double)pl[q]);
            s = __dadd_rn(s, bn_lanes_total(l, lanes));
        }
        if (threadIdx.x == 0) bcast = s / ((double)N * P);
        __syncthreads();
        double m = bcast;
        double v = 0.0;
        for (int i = 0; i < N; ++i) {
            const float* pl = x + ((long long)i * C + ch) * P;
            double l = 0.0;
            for (long long q = threadIdx.x; q < P; q += BN_LANES) {
                double d = (double)pl[q] - m;
                l = __dadd_rn(l, __dmul_rn(d, d));
            }
            v = __dadd_rn(v, bn_lanes_total(l, lanes));
        }
        if (threadIdx.x == 0) {
            mean[ch] = m;
            var[ch] = v / ((double)N * P);
        }
        __syncthreads();
    }
}

// residual (null for none) is added after the affine, then ReLU when relu
// is 1: the residual block's tail in one pass, in the unfused ops' order.
extern "C" __global__ void bn_apply_f32(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ gamma,
                                        const float* __restrict__ beta, const double* __restrict__ mean, const double* __restrict__ var,
                                        const float* __restrict__ residual, int relu, int N, int C, long long P, float eps) {
    GRID_STRIDE(i, (long long)N * C * P) {
        int ch = (int)((i / P) % C);
        double rstd = 1.0 / sqrt(var[ch] + (double)eps);
        float scale = (float)(rstd * (double)gamma[ch]);
        float shift = (float)((double)beta[ch] - mean[ch] * rstd * (double)gamma[ch]);
        float v = __fadd_rn(__fmul_rn(x[i], scale), shift);
        if (residual) v = __fadd_rn(v, residual[i]);
        if (relu) v = fmaxf(v, 0.0f);
        y[i] = v;
    }
}

extern "C" __global__ void bn_backward_sums(double* __restrict__ dgamma, double* __restrict__ dbeta, const float* __restrict__ x,
                                            const float* __restrict__ g, const double* __restrict__ mean, const double* __restrict__ var,
                                            int N, int C, long long P, float eps) {
    __shared__ double lanes[BN_LANES];
    if (blockDim.x != BN_LANES) return;
    for (int ch = blockIdx.x; ch < C; ch += gridDim.x) {
        double rstd = 1.0 / sqrt(var[ch] + (double)eps);
        double dg = 0.0, db = 0.0;
        for (int i = 0; i < N; ++i) {
            long long r = ((long long)i * C + ch) * P;
            double lg = 0.0, lb = 0.0;
            for (long long q = threadIdx.x; q < P; q += BN_LANES) {
                double gv = (double)g[r + q];
                lg = __dadd_rn(lg, __dmul_rn(__dmul_rn(gv, (double)x[r + q] - mean[ch]), rstd));
                lb = __dadd_rn(lb, gv);
            }
            dg = __dadd_rn(dg, bn_lanes_total(lg, lanes));
            db = __dadd_rn(db, bn_lanes_total(lb, lanes));
        }
        if (threadIdx.x == 0) {
            dgamma[ch] = dg;
            dbeta[ch] = db;
        }
    }
}

extern "C" __global__ void bn_backward_dx(float* __restrict__ dx, const float* __restrict__ x, const float* __restrict__ g,
                                          const float* __restrict__ gamma, const double* __restrict__ mean, const double* __restrict__ var,
                                          const double* __restrict__ dgamma, const double* __restrict__ dbeta, int N, int C, long long P,
                                          float eps, double M) {
    // M: the values per channel the statistics came from (N P, or every
    // rank's together under SyncBatchNorm).
    GRID_STRIDE(i, (long long)N * C * P) {
        int ch = (int)((i / P) % C);
        double rstd = 1.0 / sqrt(var[ch] + (double)eps);
        double xhat = ((double)x[i] - mean[ch]) * rstd;
        double k = (double)gamma[ch] * rstd;
        dx[i] = (float)(k * ((double)g[i] - dbeta[ch] / M - xhat * dgamma[ch] / M));
    }
}
