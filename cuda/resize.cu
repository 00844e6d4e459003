// Bilinear resizing of f32 planes, the CUDA twin of src/ops/resize/cpu.rs::bilinear
// (PyTorch's F.interpolate(mode='bilinear', align_corners=False), no antialias),
// for the mask post-processing: 64 x 64 logits -> img_size -> crop -> H x W.
//
//   src(d)  = max(scale (d + 0.5) - 0.5, 0),  scale = in / out   (f32)
//   i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), l1 = src - i0, l0 = 1 - l1
//   y[p, oy, ox] = ly0 (lx0 x[y0, x0] + lx1 x[y0, x1]) + ly1 (lx0 x[y1, x0] + lx1 x[y1, x1])
// Every product and sum is rounded on its own (__fmul_rn / __fadd_rn: no FMA
// contraction), in the CPU twin's order, so the two agree bit for bit.
//
// Layout: x holds `planes` planes, plane p starting at p * plane_stride, row r
// of a plane at r * ld; only the top-left h x w of each is read, which is how
// the crop to the resized image is fused into the second resize. y [planes, oh, ow].
#include "common.cuh"

__device__ __forceinline__ void bilinear_tap(int d, int in, float scale, int& i0, int& i1, float& l0, float& l1) {
    float src = __fadd_rn(__fmul_rn(scale, __fadd_rn((float)d, 0.5f)), -0.5f);
    src = src > 0.0f ? src : 0.0f;
    i0 = (int)src;
    if (i0 > in - 1) i0 = in - 1;
    l1 = __fadd_rn(src, -(float)i0);
    l0 = __fadd_rn(1.0f, -l1);
    i1 = i0 < in - 1 ? i0 + 1 : i0;
}

extern "C" __global__ void bilinear_f32(float* __restrict__ y, const float* __restrict__ x, long long planes, int h, int w, int ld, long long plane_stride,
                                        int oh, int ow) {
    const float sy = __fdiv_rn((float)h, (float)oh), sx = __fdiv_rn((float)w, (float)ow);
    GRID_STRIDE(i, planes * oh * ow) {
        int ox = i % ow;
        long long t = i / ow;
        int oy = t % oh;
        long long p = t / oh;
        int y0, y1, x0, x1;
        float ly0, ly1, lx0, lx1;
        bilinear_tap(oy, h, sy, y0, y1, ly0, ly1);
        bilinear_tap(ox, w, sx, x0, x1, lx0, lx1);
        const float* r0 = x + p * plane_stride + (long long)y0 * ld;
        const float* r1 = x + p * plane_stride + (long long)y1 * ld;
        float a = __fadd_rn(__fmul_rn(lx0, r0[x0]), __fmul_rn(lx1, r0[x1]));
        float b = __fadd_rn(__fmul_rn(lx0, r1[x0]), __fmul_rn(lx1, r1[x1]));
        y[i] = __fadd_rn(__fmul_rn(ly0, a), __fmul_rn(ly1, b));
    }
}

// bilinear backward as gathers, the CUDA twin of bilinear_backward in
// src/ops/resize/cpu.rs. The reverse taps (which outputs read an input index,
// with which weight) come as CSR tables built on the host: off[i] .. off[i+1]
// index (o, w) pairs, outputs in order. Two passes, the CPU's:
//   bilinear_backward_cols: tmp[pl, oy, x] = sum over (ox, w) of x's taps of w g[pl, oy, ox]
//   bilinear_backward_rows: dx[pl, y, x]   = sum over (oy, w) of y's taps of w tmp[pl, oy, x]
// Each sum in tap order, each product and sum rounded on its own.
extern "C" __global__ void bilinear_backward_cols(float* __restrict__ tmp, const float* __restrict__ g, const int* __restrict__ off,
                                                  const int* __restrict__ idx, const float* __restrict__ wt, long long planes, int oh, int ow,
                                                  int w) {
    GRID_STRIDE(i, planes * oh * w) {
        int x = (int)(i % w);
        long long row = i / w;  // pl * oh + oy
        const float* gr = g + row * ow;
        float acc = 0.0f;
        for (int t = off[x]; t < off[x + 1]; ++t) acc = __fadd_rn(acc, __fmul_rn(wt[t], gr[idx[t]]));
        tmp[i] = acc;
    }
}

extern "C" __global__ void bilinear_backward_rows(float* __restrict__ dx, const float* __restrict__ tmp, const int* __restrict__ off,
                                                  const int* __restrict__ idx, const float* __restrict__ wt, long long planes, int h, int oh,
                                                  int w) {
    GRID_STRIDE(i, planes * h * w) {
        int x = (int)(i % w);
        int y = (int)((i / w) % h);
        long long pl = i / ((long long)h * w);
        const float* tp = tmp + pl * oh * w;
        float acc = 0.0f;
        for (int t = off[y]; t < off[y + 1]; ++t) acc = __fadd_rn(acc, __fmul_rn(wt[t], tp[(long long)idx[t] * w + x]));
        dx[i] = acc;
    }
}
