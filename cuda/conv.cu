// Convolution helpers, the CUDA twins of src/ops/conv/cpu.rs. The GEMMs run in
// cuBLAS; these kernels build and scatter around them.
//
//   im2col_f32:  col[n, (c * kh + ky) * kw + kx, oy * Wo + ox] = x[n, c, oy s + ky - p, ox s + kx - p]
//                (0 outside): x [N, C, H, W] -> col [N, C kh kw, Ho Wo], one
//                GEMM operand per image for a strided-batched GEMM (im2col_bf16: bf16).
//   conv_epilogue_f32: y[n, o, q] = act(y[n, o, q] + bias[o] + residual[n, o, q])
//   convt_scatter_f32: a transposed conv with kernel = stride = k: every input
//                pixel owns its k x k output patch.
//                tmp [N, O k k, H W] -> y[n, o, y k + ky, x k + kx] = tmp[n, (o k + ky) k + kx, y W + x] + bias[o]
//   max_pool2d_f32: max over the window, padding is -inf (PyTorch).
#include "common.cuh"
#include "mma.cuh"

template <class OUT>
__device__ __forceinline__ void im2col(OUT* __restrict__ col, const float* __restrict__ x, int N, int C, int H, int W, int kh, int kw, int stride, int pad, int Ho,
                                       int Wo) {
    long long total = (long long)N * C * kh * kw * Ho * Wo;
    GRID_STRIDE(i, total) {
        int ox = i % Wo;
        long long t = i / Wo;
        int oy = t % Ho;
        t /= Ho;
        int kx = t % kw;
        t /= kw;
        int ky = t % kh;
        t /= kh;
        int c = t % C;
        long long n = t / C;
        int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
        float v = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((n * C + c) * H + iy) * W + ix] : 0.0f;
        if constexpr (sizeof(OUT) == 2) col[i] = f32_to_bf16_bits(v);
        else col[i] = v;
    }
}

extern "C" __global__ void im2col_f32(float* __restrict__ col, const float* __restrict__ x, int N, int C, int H, int W, int kh, int kw, int stride, int pad,
                                      int Ho, int Wo) {
    im2col<float>(col, x, N, C, H, W, kh, kw, stride, pad, Ho, Wo);
}

// The same, col in bf16: the input of a bf16 convolution GEMM.
extern "C" __global__ void im2col_bf16(unsigned short* __restrict__ col, const float* __restrict__ x, int N, int C, int H, int W, int kh, int kw, int stride,
                                       int pad, int Ho, int Wo) {
    im2col<unsigned short>(col, x, N, C, H, W, kh, kw, stride, pad, Ho, Wo);
}

extern "C" __global__ void conv_epilogue_f32(float* __restrict__ y, const float* __restrict__ bias, const float* __restrict__ residual,
                                             int N, int O, long long Q, int act) {
    GRID_STRIDE(i, (long long)N * O * Q) {
        int o = (i / Q) % O;
        float v = y[i] + (bias ? bias[o] : 0.0f) + (residual ? residual[i] : 0.0f);
        if (act == 1) v = fmaxf(v, 0.0f);
        else if (act == 2) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        y[i] = v;
    }
}

extern "C" __global__ void convt_scatter_f32(float* __restrict__ y, const float* __restrict__ tmp, const float* __restrict__ bias, int N, int O, int H,
                                             int W, int k, int act) {
    long long OH = (long long)H * k, OW = (long long)W * k;
    GRID_STRIDE(i, (long long)N * O * OH * OW) {
        int ox = i % OW;
        long long t = i / OW;
        int oy = t % OH;
        t /= OH;
        int o = t % O;
        long long n = t / O;
        int yy = oy / k, ky = oy % k, xx = ox / k, kx = ox % k;
        float v = tmp[(n * O * k * k + (long long)(o * k + ky) * k + kx) * H * W + (long long)yy * W + xx] + (bias ? bias[o] : 0.0f);
        if (act == 1) v = fmaxf(v, 0.0f);
        else if (act == 2) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        y[i] = v;
    }
}

extern "C" __global__ void max_pool2d_f32(float* __restrict__ y, const float* __restrict__ x, long long planes, int H, int W, int Ho, int Wo, int k,
                                          int s, int p) {
    GRID_STRIDE(i, planes * Ho * Wo) {
        int ox = i % Wo;
        long long t = i / Wo;
        int oy = t % Ho;
        long long pl = t / Ho;
        const float* xp = x + pl * H * W;
        float m = -SAM_INF;
        for (int ky = 0; ky < k; ++ky) {
            int iy = oy * s + ky - p;
            if (iy < 0 || iy >= H) continue;
            for (int kx = 0; kx < k; ++kx) {
                int ix = ox * s + kx - p;
                if (ix < 0 || ix >= W) continue;
                float v = xp[iy * W + ix];
                if (v > m || v != v) m = v;
            }
        }
        y[i] = m;
    }
}

// col2im as a gather (conv2d's input gradient, no atomics): one thread per
// input value, dx[n, c, iy, ix] = sum over the taps (ky, kx) that read it,
// ky then kx ascending (the CPU twin's order), of dcol[n, (c kh + ky) kw + kx,
// oy Wo + ox] with oy s + ky - p = iy, ox s + kx - p = ix.
// Layout: dcol [N, C kh kw, Ho Wo], dx [N, C, H, W].
extern "C" __global__ void col2im_f32(float* __restrict__ dx, const float* __restrict__ dcol, int N, int C, int H, int W, int kh, int kw, int stride,
                                      int pad, int Ho, int Wo) {
    long long total = (long long)N * C * H * W;
    GRID_STRIDE(i, total) {
        int ix = i % W;
        long long t = i / W;
        int iy = t % H;
        t /= H;
        int c = t % C;
        long long n = t / C;
        const float* base = dcol + ((n * C + c) * kh * kw) * (long long)Ho * Wo;
        float acc = 0.0f;
        for (int ky = 0; ky < kh; ++ky) {
            int ty = iy + pad - ky;
            if (ty < 0 || ty % stride != 0 || ty / stride >= Ho) continue;
            int oy = ty / stride;
            for (int kx = 0; kx < kw; ++kx) {
                int tx = ix + pad - kx;
                if (tx < 0 || tx % stride != 0 || tx / stride >= Wo) continue;
                int ox = tx / stride;
                acc = __fadd_rn(acc, base[(long long)(ky * kw + kx) * Ho * Wo + oy * Wo + ox]);
            }
        }
        dx[i] = acc;
    }
}

// convt_gather_f32: the transposed conv's backward layout, the inverse of
// convt_scatter: g [N, O, H k, W k] -> gt [N, O k k, H W],
// gt[n, (o k + ky) k + kx, y W + x] = g[n, o, y k + ky, x k + kx].
extern "C" __global__ void convt_gather_f32(float* __restrict__ gt, const float* __restrict__ g, int N, int O, int H, int W, int k) {
    long long OH = (long long)H * k, OW = (long long)W * k;
    GRID_STRIDE(i, (long long)N * O * OH * OW) {
        int ox = i % OW;
        long long t = i / OW;
        int oy = t % OH;
        t /= OH;
        int o = t % O;
        long long n = t / O;
        int yy = oy / k, ky = oy % k, xx = ox / k, kx = ox % k;
        gt[(n * O * k * k + (long long)(o * k + ky) * k + kx) * H * W + (long long)yy * W + xx] = g[i];
    }
}

// max_pool2d backward as a gather (no atomics): every input pixel sums the
// gradients of the outputs whose window picked it (the first maximum in scan
// order, NaN winning, as the forward), outputs in (oy, ox) order.
// Layout: x, dx [planes, H, W]; g [planes, Ho, Wo].
__device__ __forceinline__ int pool_argmax(const float* __restrict__ xp, int H, int W, int oy, int ox, int k, int s, int p) {
    float m = -SAM_INF;
    int at = -1;
    for (int ky = 0; ky < k; ++ky) {
        int iy = oy * s + ky - p;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
            int ix = ox * s + kx - p;
            if (ix < 0 || ix >= W) continue;
            float v = xp[iy * W + ix];
            if (at < 0 || v > m || v != v) {
                m = v;
                at = iy * W + ix;
            }
        }
    }
    return at;
}

extern "C" __global__ void max_pool2d_backward_f32(float* __restrict__ dx, const float* __restrict__ x, const float* __restrict__ g, long long planes,
                                                   int H, int W, int Ho, int Wo, int k, int s, int p) {
    GRID_STRIDE(i, planes * H * W) {
        int ix = i % W;
        long long t = i / W;
        int iy = t % H;
        long long pl = t / H;
        const float* xp = x + pl * H * W;
        const float* gp = g + pl * (long long)Ho * Wo;
        // Outputs whose window holds (iy, ix): oy s - p <= iy <= oy s - p + k - 1.
        int oy0 = max(0, (iy + p - k + s) / s), oy1 = min(Ho - 1, (iy + p) / s);
        int ox0 = max(0, (ix + p - k + s) / s), ox1 = min(Wo - 1, (ix + p) / s);
        float acc = 0.0f;
        int self = iy * W + ix;
        for (int oy = oy0; oy <= oy1; ++oy)
            for (int ox = ox0; ox <= ox1; ++ox)
                if (pool_argmax(xp, H, W, oy, ox, k, s, p) == self) acc = __fadd_rn(acc, gp[oy * Wo + ox]);
        dx[i] = acc;
    }
}
