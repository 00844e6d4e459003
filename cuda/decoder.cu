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

// mha backward, the CUDA twin of attention_backward (src/ops/attention/cpu.rs),
// flash-style: nothing of the forward's attention matrix is kept.
//   mha_backward_q:  one thread per (n, head, query): the softmax row again
//                    (max, sum), dP_j = dO . v_j, D = sum_j P_j dP_j,
//                    dS_j = P_j (dP_j - D) / sqrt(hd), dq = sum_j dS_j k_j;
//                    it also leaves lse = max + log(sum) and D for the keys' pass.
//   mha_backward_kv: one thread per (n, head, key): over the queries in order,
//                    P = exp(s - lse), dS as above, dk = sum_i dS_i q_i,
//                    dv = sum_i P_i dO_i.
// Gradients are written per item ([N, L, I]); an operand shared by the items
// (flag 0) is summed over them afterwards by the deterministic row sums.
// hd <= 64 (checked by the launcher).
extern "C" __global__ void mha_backward_q(float* __restrict__ dq, float* __restrict__ lse, float* __restrict__ dd, const float* __restrict__ q,
                                          const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ dout, int N,
                                          int Lq, int Lk, int I, int heads, int bq, int bk, int bv) {
    GRID_STRIDE(t, (long long)N * heads * Lq) {
        int qi = t % Lq;
        int h = (t / Lq) % heads;
        int n = t / ((long long)Lq * heads);
        int hd = I / heads;
        float sd = sqrtf((float)hd);
        const float* qp = q + ((long long)(bq ? n : 0) * Lq + qi) * I + h * hd;
        const float* kb = k + (long long)(bk ? n : 0) * Lk * I + h * hd;
        const float* vb = v + (long long)(bv ? n : 0) * Lk * I + h * hd;
        const float* go = dout + ((long long)n * Lq + qi) * I + h * hd;
        float m = -SAM_INF;
        for (int j = 0; j < Lk; ++j) {
            float s = 0.f;
            for (int d = 0; d < hd; ++d) s += qp[d] * kb[(long long)j * I + d];
            m = fmaxf(m, s / sd);
        }
        float l = 0.f, D = 0.f;
        for (int j = 0; j < Lk; ++j) {
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < hd; ++d) {
                s += qp[d] * kb[(long long)j * I + d];
                dp += go[d] * vb[(long long)j * I + d];
            }
            float e = expf(s / sd - m);
            l += e;
            D += e * dp;
        }
        D /= l;
        float acc[64];
        for (int d = 0; d < hd; ++d) acc[d] = 0.f;
        for (int j = 0; j < Lk; ++j) {
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < hd; ++d) {
                s += qp[d] * kb[(long long)j * I + d];
                dp += go[d] * vb[(long long)j * I + d];
            }
            float p = expf(s / sd - m) / l;
            float ds = p * (dp - D) / sd;
            for (int d = 0; d < hd; ++d) acc[d] += ds * kb[(long long)j * I + d];
        }
        float* dqp = dq + ((long long)n * Lq + qi) * I + h * hd;
        for (int d = 0; d < hd; ++d) dqp[d] = acc[d];
        lse[t] = m + logf(l);
        dd[t] = D;
    }
}

extern "C" __global__ void mha_backward_kv(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ lse, const float* __restrict__ dd,
                                           const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                           const float* __restrict__ dout, int N, int Lq, int Lk, int I, int heads, int bq, int bk, int bv) {
    GRID_STRIDE(t, (long long)N * heads * Lk) {
        int kj = t % Lk;
        int h = (t / Lk) % heads;
        int n = t / ((long long)Lk * heads);
        int hd = I / heads;
        float sd = sqrtf((float)hd);
        const float* kp = k + ((long long)(bk ? n : 0) * Lk + kj) * I + h * hd;
        const float* vp = v + ((long long)(bv ? n : 0) * Lk + kj) * I + h * hd;
        const float* qb = q + (long long)(bq ? n : 0) * Lq * I + h * hd;
        const float* gb = dout + (long long)n * Lq * I + h * hd;
        float ak[64], av[64];
        for (int d = 0; d < hd; ++d) ak[d] = av[d] = 0.f;
        for (int qi = 0; qi < Lq; ++qi) {
            const float* qp = qb + (long long)qi * I;
            const float* go = gb + (long long)qi * I;
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < hd; ++d) {
                s += qp[d] * kp[d];
                dp += go[d] * vp[d];
            }
            long long r = ((long long)n * heads + h) * Lq + qi;
            float p = expf(s / sd - lse[r]);
            float ds = p * (dp - dd[r]) / sd;
            for (int d = 0; d < hd; ++d) {
                ak[d] += ds * qp[d];
                av[d] += p * go[d];
            }
        }
        float* dkp = dk + ((long long)n * Lk + kj) * I + h * hd;
        float* dvp = dv + ((long long)n * Lk + kj) * I + h * hd;
        for (int d = 0; d < hd; ++d) {
            dkp[d] = ak[d];
            dvp[d] = av[d];
        }
    }
}
