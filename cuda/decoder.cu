// Mask-decoder kernels, the CUDA twins of src/ops/attention/cpu.rs::attention
// and of the last step of src/model/mask_decoder.rs.
//
//   mha_f32: multi-head attention on projected q [N, Lq, I], k, v [N, Lk, I]
//            (I = heads * hd, hd <= 64): out = softmax(q_h k_h^T / sqrt(hd)) v_h.
//            Each of q, k, v may instead be [1, L, I], shared by all N (its
//            flag bq / bk / bv 0): the image keys of one image serve all boxes.
//            One warp per (n, head, query); keys in tiles of 32, lane j computes
//            key j's logit, online softmax, lanes own channels lane and lane + 32.
//   mask_dot_f32: low[n, p] = sum_c h[n, c] (f[n, c, p] + msf[c, p]), the
//            hypernetwork dot product; one thread per (n, p), coalesced over p.
#include "common.cuh"

extern "C" __global__ void mha_f32(float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                   int N, int Lq, int Lk, int I, int heads, int bq, int bk, int bv) {
    int lane = threadIdx.x & 31;
    long long wid = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long total = (long long)N * heads * Lq;
    if (wid >= total) return;
    int qi = wid % Lq;
    int h = (wid / Lq) % heads;
    int n = wid / ((long long)Lq * heads);
    int hd = I / heads;
    float sd = sqrtf((float)hd);
    const float* qp = q + ((long long)(bq ? n : 0) * Lq + qi) * I + h * hd;
    const float* kb = k + (long long)(bk ? n : 0) * Lk * I + h * hd;
    const float* vb = v + (long long)(bv ? n : 0) * Lk * I + h * hd;
    float m = -SAM_INF, l = 0.f, a0 = 0.f, a1 = 0.f;
    for (int t0 = 0; t0 < Lk; t0 += 32) {
        int j = t0 + lane;
        float logit = -SAM_INF;
        if (j < Lk) {
            const float* kp = kb + (long long)j * I;
            float s = 0.f;
            for (int c = 0; c < hd; ++c) s += qp[c] * kp[c];
            logit = s / sd;
        }
        float tmax = logit;
        for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
        float mnew = fmaxf(m, tmax);
        float p = j < Lk ? expf(logit - mnew) : 0.f;
        float corr = expf(m - mnew);
        l = l * corr + warp_sum(p);
        a0 *= corr;
        a1 *= corr;
        int nk = min(32, Lk - t0);
        for (int jj = 0; jj < nk; ++jj) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const float* vp = vb + (long long)(t0 + jj) * I;
            if (lane < hd) a0 += pj * vp[lane];
            if (lane + 32 < hd) a1 += pj * vp[lane + 32];
        }
        m = mnew;
    }
    float* op = out + ((long long)n * Lq + qi) * I + h * hd;
    if (lane < hd) op[lane] = a0 / l;
    if (lane + 32 < hd) op[lane + 32] = a1 / l;
}

extern "C" __global__ void mask_dot_f32(float* __restrict__ low, const float* __restrict__ h, const float* __restrict__ f, const float* __restrict__ msf,
                                        int N, int C, long long P) {
    GRID_STRIDE(i, (long long)N * P) {
        long long n = i / P, p = i % P;
        float s = 0.f;
        for (int c = 0; c < C; ++c) s += h[n * C + c] * (f[(n * C + c) * P + p] + msf[c * P + p]);
        low[i] = s;
    }
}

// mask_dot backward, the CUDA twin of mask_dot's recorded backward
// (src/ops/linear/mod.rs): low[i, p] = sum_c h[i, c] (f[i, c, p] + m[c, p]).
//   mask_dot_backward_h: dh[i, c] = sum_p g[i, p] (f[i, c, p] + m[c, p]), p in order, f64
//   mask_dot_backward_f: df[i, c, p] = g[i, p] h[i, c]
//   mask_dot_backward_m: dm[c, p] = sum_i g[i, p] h[i, c], i in order, f32
// Layout: g [n, p], h [n, c], f [n, c, p], m [c, p].
extern "C" __global__ void mask_dot_backward_h(float* __restrict__ dh, const float* __restrict__ g, const float* __restrict__ f,
                                               const float* __restrict__ m, int n, int c, long long p) {
    GRID_STRIDE(t, (long long)n * c) {
        long long i = t / c, ch = t % c;
        const float* gi = g + i * p;
        const float* fr = f + t * p;
        const float* mr = m + ch * p;
        double acc = 0.0;
        for (long long q = 0; q < p; ++q) acc += (double)__fmul_rn(gi[q], __fadd_rn(fr[q], mr[q]));
        dh[t] = (float)acc;
    }
}

extern "C" __global__ void mask_dot_backward_f(float* __restrict__ df, const float* __restrict__ g, const float* __restrict__ h, int n, int c,
                                               long long p) {
    GRID_STRIDE(t, (long long)n * c * p) {
        long long q = t % p, r = t / p;  // r = i c + ch
        long long i = r / c;
        df[t] = __fmul_rn(g[i * p + q], h[r]);
    }
}

extern "C" __global__ void mask_dot_backward_m(float* __restrict__ dm, const float* __restrict__ g, const float* __restrict__ h, int n, int c,
                                               long long p) {
    GRID_STRIDE(t, (long long)c * p) {
        long long q = t % p, ch = t / p;
        float acc = 0.0f;
        for (int i = 0; i < n; ++i) acc = __fadd_rn(acc, __fmul_rn(g[(long long)i * p + q], h[(long long)i * c + ch]));
        dm[t] = acc;
    }
}
