// Image-encoder attention with decomposed relative position bias, the CUDA twin
// of src/ops/attention/cpu.rs::rel_pos_attention (flash-style: no attention
// matrix is materialised; an online softmax runs over tiles of keys).
//
// Math, per image b, window (wy, wx), head h, query at window position (qy, qx):
//   logit(k) = (q * hd^-0.5) . k + q . Rh[qy - ky + S - 1] + q . Rw[qx - kx + S - 1]
//   out      = sum_k softmax(logit)_k v_k
// over all S x S window positions k; a position outside the G x G grid (the
// zero padding to a multiple of S) has k = k-bias and v = v-bias, exactly what
// the reference computes for its zero tokens. Queries outside the grid are not
// computed (the model drops them). Global attention: S = G, one window.
//
// Layout: qkv [B, G, G, 3D] channels-last with channel = which * D + h * 64 + c;
// bias [3D]; rel_h, rel_w [2S - 1, 64]; out [B, G, G, D] (same channel order).
// Head dim is 64: each lane of a warp owns channels 2 lane and 2 lane + 1.
//
// Schedule: a block of 8 warps takes 8 queries of one (b, window, head); keys
// and values stream through shared memory 32 at a time; in a tile, lane j
// computes the logit of key j, the warp updates its running max / sum, then
// broadcasts each probability to accumulate p v into the lanes' channels.
// Accumulation in f32. Backward (later): recompute the softmax per tile from
// the saved log-sum-exp, dq/dk/dv written (=), rel-pos table gradients (+=).
#include "common.cuh"

#define HD 64
#define WARPS 8
#define KT 32

extern "C" __global__ void rel_pos_attention_f32(float* __restrict__ out, const float* __restrict__ qkv, const float* __restrict__ bias,
                                                 const float* __restrict__ rel_h, const float* __restrict__ rel_w, int B, int G, int D, int S) {
    __shared__ float ks[KT][HD + 1];  // +1: lane j reads row j without bank conflicts
    __shared__ float vs[KT][HD];
    __shared__ float qs[WARPS][HD];
    __shared__ float relh[WARPS][32];
    __shared__ float relw[WARPS][32];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwin = (G + S - 1) / S;
    const int h = blockIdx.y;
    const int b = blockIdx.z / (nwin * nwin);
    const int win = blockIdx.z % (nwin * nwin);
    const int wy = win / nwin, wx = win % nwin;
    const int SS = S * S;
    const int p = blockIdx.x * WARPS + warp;  // this warp's query position in the window
    const int qy = p / S, qx = p % S;
    const int gy = wy * S + qy, gx = wx * S + qx;
    const bool valid = p < SS && gy < G && gx < G;
    // A block whose 8 queries are all padding (most of the last window) has
    // nothing to do: leave before the first barrier, all threads together.
    bool any = false;
    for (int w = 0; w < WARPS; ++w) {
        int pw = blockIdx.x * WARPS + w;
        any |= pw < SS && wy * S + pw / S < G && wx * S + pw % S < G;
    }
    if (!any) return;
    const long long C3 = 3LL * D;
    const float scale = 0.125f;  // HD^-0.5 exactly, as the CPU twin

    // This warp's query (unscaled) into shared memory.
    if (valid) {
        const float* q = qkv + (((long long)b * G + gy) * G + gx) * C3 + h * HD;
        qs[warp][2 * lane] = q[2 * lane];
        qs[warp][2 * lane + 1] = q[2 * lane + 1];
    }
    __syncwarp();
    // Decomposed bias rows: lane t < S computes q . Rh[qy - t + S - 1], q . Rw[qx - t + S - 1].
    if (valid && lane < S) {
        const float* rh = rel_h + (long long)(qy - lane + S - 1) * HD;
        const float* rw = rel_w + (long long)(qx - lane + S - 1) * HD;
        float sh = 0.f, sw = 0.f;
        for (int c = 0; c < HD; ++c) {
            sh += qs[warp][c] * rh[c];
            sw += qs[warp][c] * rw[c];
        }
        relh[warp][lane] = sh;
        relw[warp][lane] = sw;
    }
    __syncwarp();

    float m = -SAM_INF, l = 0.f, acc0 = 0.f, acc1 = 0.f;
    for (int t0 = 0; t0 < SS; t0 += KT) {
        // Load up to KT keys / values of the window (biases at padded positions).
        __syncthreads();
        for (int i = threadIdx.x; i < KT * HD; i += blockDim.x) {
            int j = i / HD, c = i % HD, kp = t0 + j;
            float kv = 0.f, vv = 0.f;
            if (kp < SS) {
                int ky = wy * S + kp / S, kx = wx * S + kp % S;
                if (ky < G && kx < G) {
                    const float* t = qkv + (((long long)b * G + ky) * G + kx) * C3 + h * HD + c;
                    kv = t[D];
                    vv = t[2 * D];
                } else {
                    kv = bias[D + h * HD + c];
                    vv = bias[2 * D + h * HD + c];
                }
            }
            ks[j][c] = kv;
            vs[j][c] = vv;
        }
        __syncthreads();
        if (!valid) continue;
        // Lane j: logit of key t0 + j.
        int kp = t0 + lane;
        float logit = -SAM_INF;
        if (kp < SS) {
            float s = 0.f;
            for (int c = 0; c < HD; ++c) s += (qs[warp][c] * scale) * ks[lane][c];
            logit = s + relh[warp][kp / S] + relw[warp][kp % S];
        }
        float tmax = logit;
        for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
        float mnew = fmaxf(m, tmax);
        float pj = kp < SS ? expf(logit - mnew) : 0.f;
        float corr = expf(m - mnew);  // 0 on the first tile (m = -inf)
        l = l * corr + warp_sum(pj);
        acc0 *= corr;
        acc1 *= corr;
        int nk = min(KT, SS - t0);
        for (int j = 0; j < nk; ++j) {
            float pjj = __shfl_sync(0xffffffffu, pj, j);
            acc0 += pjj * vs[j][2 * lane];
            acc1 += pjj * vs[j][2 * lane + 1];
        }
        m = mnew;
    }
    if (valid) {
        float* o = out + (((long long)b * G + gy) * G + gx) * D + h * HD;
        o[2 * lane] = acc0 / l;
        o[2 * lane + 1] = acc1 / l;
    }
}

// ---------------------------------------------------------------------------
// The same attention on tensor cores (bf16 inputs, f32 accumulation), for the
// bf16 path: FlashAttention-2's schedule with mma.sync m16n8k16 (mma.cuh).
//
// Queries are indexed compactly by the real tokens of the window (rows
// rh = min(S, G - wy S), columns rw = min(S, G - wx S); query i sits at window
// position (i / rw, i % rw)), so the partial windows of the padded grid cost
// no padding rows beyond the last tile. A block of 4 warps takes 64 queries
// of one (image, window, head); warp w owns rows 16w..16w+15. Keys stream
// through shared memory 64 at a time over all S x S window positions (padded
// ones are the k / v biases, as in the f32 kernel). Per key tile:
//   S = (0.125 q) K^T           mma, Q fragments held in registers all along
//   S += relh[row][ky] + relw[row][kx], keys past S x S masked to -inf
//   online softmax per row (the 4 lanes of a row group reduce by shuffles;
//   the row sums stay per lane and are reduced once at the end)
//   O = O corr + P V            P re-packed from the S accumulators as A
//                               fragments (the C layout of two adjacent
//                               8-key tiles is the A layout of 16 keys)
// relh / relw are q . Rh / q . Rw per (query, key row / column), computed
// once per block on CUDA cores from the bf16 q. `biased` = 0 means qkv comes
// straight from a GEMM without its bias: the kernel adds it while loading.
// Shared memory rows are 72 bf16 apart so that fragment loads (8 rows x 4
// words per warp) hit 32 distinct banks. V is stored transposed (Vt[c][key])
// so that its B fragments are single 32-bit loads.
#include "mma.cuh"

#define TC_BQ 64
#define TC_BK 64
#define TC_STR 72
#define TC_MAXS 32

// The kernel's shared memory, declared by each extern "C" kernel and passed
// in: a __shared__ array inside a function template would be fine for nvcc,
// but the host emulator can only check shared arrays declared in non-template
// functions (tests/simt refuses to build otherwise).
struct TcShared {
    // 16-byte aligned: the fragments are read as 32-bit words (a u16 array
    // alone is only 2-byte aligned).
    __align__(16) unsigned short qs[TC_BQ][TC_STR];  // 0.125 q, bf16
    __align__(16) unsigned short ks[TC_BK][TC_STR];  // k, bf16
    __align__(16) unsigned short vt[HD][TC_STR];     // v transposed: vt[c][key]
    // +1: the 8 rows a warp reads at once fall in 8 banks, not one.
    float relh[TC_BQ][TC_MAXS + 1];
    float relw[TC_BQ][TC_MAXS + 1];
};

template <bool BF16_OUT>
__device__ __forceinline__ void rel_pos_attention_tc(TcShared& sm, void* __restrict__ out, const float* __restrict__ qkv, const float* __restrict__ bias,
                                                     const float* __restrict__ rel_h, const float* __restrict__ rel_w, int B, int G, int D, int S,
                                                     int biased) {
    auto& qs = sm.qs;
    auto& ks = sm.ks;
    auto& vt = sm.vt;
    auto& relh = sm.relh;
    auto& relw = sm.relw;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int nwin = (G + S - 1) / S;
    const int h = blockIdx.y;
    const int b = blockIdx.z / (nwin * nwin);
    const int win = blockIdx.z % (nwin * nwin);
    const int wy = win / nwin, wx = win % nwin;
    const int rh = min(S, G - wy * S), rw = min(S, G - wx * S);
    const int nq = rh * rw, q0 = blockIdx.x * TC_BQ;
    if (q0 >= nq) return;  // the whole block: before any barrier
    const int SS = S * S;
    const long long C3 = 3LL * D;
    const float* bq = bias + h * HD;
    const float* bk = bias + D + h * HD;
    const float* bv = bias + 2 * D + h * HD;

    // Q tile (rows past nq are zero: finite logits, never written).
    for (int e = tid; e < TC_BQ * HD; e += blockDim.x) {
        int r = e / HD, c = e % HD, i = q0 + r;
        float v = 0.0f;
        if (i < nq) {
            int gy = wy * S + i / rw, gx = wx * S + i % rw;
            v = qkv[(((long long)b * G + gy) * G + gx) * C3 + h * HD + c] + (biased ? 0.0f : bq[c]);
        }
        qs[r][c] = f32_to_bf16_bits(v * 0.125f);
    }
    __syncthreads();
    // Decomposed relative position terms of every query row.
    for (int e = tid; e < TC_BQ * S; e += blockDim.x) {
        int r = e / S, j = e % S, i = q0 + r;
        float sh = 0.0f, sw = 0.0f;
        if (i < nq) {
            const float* ph = rel_h + (long long)(i / rw - j + S - 1) * HD;
            const float* pw = rel_w + (long long)(i % rw - j + S - 1) * HD;
            for (int c = 0; c < HD; ++c) {
                float q = bf16_bits_to_f32(qs[r][c]);
                sh += q * ph[c];
                sw += q * pw[c];
            }
        }
        relh[r][j] = 8.0f * sh;  // qs holds 0.125 q: exact powers of two
        relw[r][j] = 8.0f * sw;
    }
    // This warp's Q fragments for the 4 k-steps of the head dim.
    unsigned int qa[4][4];
    const int r0 = warp * 16 + g, r1 = r0 + 8;
    for (int kk = 0; kk < 4; ++kk) {
        int c = kk * 16 + 2 * t;
        qa[kk][0] = *(const unsigned int*)&qs[r0][c];
        qa[kk][1] = *(const unsigned int*)&qs[r1][c];
        qa[kk][2] = *(const unsigned int*)&qs[r0][c + 8];
        qa[kk][3] = *(const unsigned int*)&qs[r1][c + 8];
    }

    float o[8][4];
    for (int n = 0; n < 8; ++n)
        for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
    float m[2] = {-SAM_INF, -SAM_INF}, l[2] = {0.0f, 0.0f};

    for (int t0 = 0; t0 < SS; t0 += TC_BK) {
        __syncthreads();  // the previous tile's K / V are no longer read (and relh is complete)
        for (int e = tid; e < TC_BK * HD; e += blockDim.x) {
            int j = e / HD, c = e % HD, kp = t0 + j;
            float kv = 0.0f, vv = 0.0f;
            if (kp < SS) {
                int gy = wy * S + kp / S, gx = wx * S + kp % S;
                if (gy < G && gx < G) {
                    const float* p = qkv + (((long long)b * G + gy) * G + gx) * C3 + h * HD + c;
                    kv = p[D] + (biased ? 0.0f : bk[c]);
                    vv = p[2 * D] + (biased ? 0.0f : bv[c]);
                } else {
                    kv = bk[c];
                    vv = bv[c];
                }
            }
            ks[j][c] = f32_to_bf16_bits(kv);
            vt[c][j] = f32_to_bf16_bits(vv);
        }
        __syncthreads();
        // S = Q K^T: 8 tiles of 8 keys.
        float s[8][4];
        for (int n = 0; n < 8; ++n) {
            for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
            for (int kk = 0; kk < 4; ++kk) {
                unsigned int kb[2];
                kb[0] = *(const unsigned int*)&ks[n * 8 + g][kk * 16 + 2 * t];
                kb[1] = *(const unsigned int*)&ks[n * 8 + g][kk * 16 + 8 + 2 * t];
                mma_16816_bf16(s[n], qa[kk], kb);
            }
        }
        // Relative position bias, mask, online softmax.
        float mx[2] = {-SAM_INF, -SAM_INF};
        for (int n = 0; n < 8; ++n)
            for (int e = 0; e < 4; ++e) {
                int key = t0 + n * 8 + 2 * t + (e & 1);
                int r = e < 2 ? r0 : r1;
                float v = key < SS ? s[n][e] + relh[r][key / S] + relw[r][key % S] : -SAM_INF;
                s[n][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        float corr[2];
        for (int rr = 0; rr < 2; ++rr) {
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
            float mn = fmaxf(m[rr], mx[rr]);  // finite: every tile has a real key
            corr[rr] = expf(m[rr] - mn);      // 0 on the first tile
            m[rr] = mn;
            l[rr] *= corr[rr];
        }
        for (int n = 0; n < 8; ++n)
            for (int e = 0; e < 4; ++e) {
                float p = expf(s[n][e] - m[e >> 1]);  // masked keys: exp(-inf) = 0
                s[n][e] = p;
                l[e >> 1] += p;
                o[n][e] *= corr[e >> 1];
            }
        // O += P V: 4 steps of 16 keys, 8 tiles of 8 channels.
        for (int kk = 0; kk < 4; ++kk) {
            unsigned int pa[4];
            pa[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            for (int n = 0; n < 8; ++n) {
                unsigned int vb[2];
                vb[0] = *(const unsigned int*)&vt[n * 8 + g][kk * 16 + 2 * t];
                vb[1] = *(const unsigned int*)&vt[n * 8 + g][kk * 16 + 8 + 2 * t];
                mma_16816_bf16(o[n], pa, vb);
            }
        }
    }
    // Row sums over the 4 lanes of each row group, then the output rows.
    for (int rr = 0; rr < 2; ++rr) {
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
    }
    for (int rr = 0; rr < 2; ++rr) {
        int i = q0 + (rr ? r1 : r0);
        if (i >= nq) continue;
        int gy = wy * S + i / rw, gx = wx * S + i % rw;
        long long base = (((long long)b * G + gy) * G + gx) * D + h * HD;
        float inv = 1.0f / l[rr];
        for (int n = 0; n < 8; ++n) {
            int c = n * 8 + 2 * t;
            float v0 = o[n][2 * rr] * inv, v1 = o[n][2 * rr + 1] * inv;
            if (BF16_OUT) {
                *(unsigned int*)((unsigned short*)out + base + c) = pack_bf16x2(v0, v1);
            } else {
                ((float*)out)[base + c] = v0;
                ((float*)out)[base + c + 1] = v1;
            }
        }
    }
}

// out [B, G, G, D] f32.
extern "C" __global__ void __launch_bounds__(128) rel_pos_attention_tc_f32(float* __restrict__ out, const float* __restrict__ qkv, const float* __restrict__ bias,
                                                                        const float* __restrict__ rel_h, const float* __restrict__ rel_w, int B, int G, int D,
                                                                        int S, int biased) {
    __shared__ TcShared sm;
    rel_pos_attention_tc<false>(sm, out, qkv, bias, rel_h, rel_w, B, G, D, S, biased);
}

// out [B, G, G, D] bf16 (the proj GEMM's input).
extern "C" __global__ void __launch_bounds__(128) rel_pos_attention_tc_bf16(unsigned short* __restrict__ out, const float* __restrict__ qkv,
                                                                         const float* __restrict__ bias, const float* __restrict__ rel_h,
                                                                         const float* __restrict__ rel_w, int B, int G, int D, int S, int biased) {
    __shared__ TcShared sm;
    rel_pos_attention_tc<true>(sm, out, qkv, bias, rel_h, rel_w, B, G, D, S, biased);
}

// Backward (input gradient only: the image encoder is frozen, so the qkv bias
// and the rel-pos tables get none; the padded keys are constants), the CUDA
// twin of rel_pos_attention_backward in src/ops/attention/cpu.rs. Nothing of
// the forward is kept: each pass recomputes the logits.
//   rel_pos_backward_q:  one thread per (b, window, head, window position),
//       real queries only: the softmax row again (max, sum), dP_j = dO . v_j,
//       D = sum_j P_j dP_j, dS_j = P_j (dP_j - D), and
//       dq = scale sum_j dS_j k_j + sum_ky (sum_kx dS) Rh[qy - ky + S - 1]
//                                 + sum_kx (sum_ky dS) Rw[qx - kx + S - 1];
//       it leaves lse = max + log(sum) and D per query for the keys' pass.
//   rel_pos_backward_kv: one thread per (b, window, head, window position),
//       real keys only: over the window's real queries in order,
//       P = exp(logit - lse), dS as above, dk = sum dS (q scale), dv = sum P dO.
// dqkv [B, G, G, 3D] is written at every real token (q, k and v parts).
__device__ __forceinline__ const float* rp_key(const float* qkv, const float* bias, int b, int G, int D, int S, int wy, int wx, int h, int p,
                                               int which) {
    int y = wy * S + p / S, x = wx * S + p % S;
    if (y < G && x < G) return qkv + (((long long)b * G + y) * G + x) * 3 * D + which * D + h * 64;
    return bias + which * D + h * 64;
}

__device__ __forceinline__ float rp_logit(const float* q, const float* kv, const float* rh, const float* rw, float scale, int S, int qp, int kp) {
    int qy = qp / S, qx = qp % S, ky = kp / S, kx = kp % S;
    const float* rhr = rh + (long long)(qy - ky + S - 1) * 64;
    const float* rwr = rw + (long long)(qx - kx + S - 1) * 64;
    float dot = 0.f, bh = 0.f, bw = 0.f;
    for (int d = 0; d < 64; ++d) {
        dot += (q[d] * scale) * kv[d];
        bh += q[d] * rhr[d];
        bw += q[d] * rwr[d];
    }
    return dot + (bh + bw);
}

extern "C" __global__ void rel_pos_backward_q(float* __restrict__ dqkv, float* __restrict__ lse, float* __restrict__ dd, const float* __restrict__ qkv,
                                              const float* __restrict__ bias, const float* __restrict__ rh, const float* __restrict__ rw,
                                              const float* __restrict__ g, int B, int G, int D, int S) {
    int heads = D / 64, nwin = (G + S - 1) / S, SS = S * S;
    float scale = rsqrtf(64.0f);
    GRID_STRIDE(t, (long long)B * nwin * nwin * heads * SS) {
        int qp = t % SS;
        int h = (t / SS) % heads;
        int w = (t / ((long long)SS * heads)) % (nwin * nwin);
        int b = t / ((long long)SS * heads * nwin * nwin);
        int wy = w / nwin, wx = w % nwin;
        int y = wy * S + qp / S, x = wx * S + qp % S;
        if (y >= G || x >= G) continue;
        long long tok = ((long long)b * G + y) * G + x;
        const float* q = qkv + tok * 3 * D + h * 64;
        const float* go = g + tok * D + h * 64;
        float m = -SAM_INF;
        for (int kp = 0; kp < SS; ++kp) m = fmaxf(m, rp_logit(q, rp_key(qkv, bias, b, G, D, S, wy, wx, h, kp, 1), rh, rw, scale, S, qp, kp));
        float l = 0.f, Dv = 0.f;
        for (int kp = 0; kp < SS; ++kp) {
            float e = expf(rp_logit(q, rp_key(qkv, bias, b, G, D, S, wy, wx, h, kp, 1), rh, rw, scale, S, qp, kp) - m);
            const float* v = rp_key(qkv, bias, b, G, D, S, wy, wx, h, kp, 2);
            float dp = 0.f;
            for (int d = 0; d < 64; ++d) dp += go[d] * v[d];
            l += e;
            Dv += e * dp;
        }
        Dv /= l;
        float acc[64];
        for (int d = 0; d < 64; ++d) acc[d] = 0.f;
        int qy = qp / S, qx = qp % S;
        for (int kp = 0; kp < SS; ++kp) {
            const float* k = rp_key(qkv, bias, b, G, D, S, wy, wx, h, kp, 1);
            const float* v = rp_key(qkv, bias, b, G, D, S, wy, wx, h, kp, 2);
            float p = expf(rp_logit(q, k, rh, rw, scale, S, qp, kp) - m) / l;
            float dp = 0.f;
            for (int d = 0; d < 64; ++d) dp += go[d] * v[d];
            float ds = p * (dp - Dv);
            const float* rhr = rh + (long long)(qy - kp / S + S - 1) * 64;
            const float* rwr = rw + (long long)(qx - kp % S + S - 1) * 64;
            for (int d = 0; d < 64; ++d) acc[d] += ds * (scale * k[d] + rhr[d] + rwr[d]);
        }
        float* dq = dqkv + tok * 3 * D + h * 64;
        for (int d = 0; d < 64; ++d) dq[d] = acc[d];
        lse[t] = m + logf(l);
        dd[t] = Dv;
    }
}

extern "C" __global__ void rel_pos_backward_kv(float* __restrict__ dqkv, const float* __restrict__ lse, const float* __restrict__ dd,
                                               const float* __restrict__ qkv, const float* __restrict__ bias, const float* __restrict__ rh,
                                               const float* __restrict__ rw, const float* __restrict__ g, int B, int G, int D, int S) {
    int heads = D / 64, nwin = (G + S - 1) / S, SS = S * S;
    float scale = rsqrtf(64.0f);
    GRID_STRIDE(t, (long long)B * nwin * nwin * heads * SS) {
        int kp = t % SS;
        int h = (t / SS) % heads;
        int w = (t / ((long long)SS * heads)) % (nwin * nwin);
        int b = t / ((long long)SS * heads * nwin * nwin);
        int wy = w / nwin, wx = w % nwin;
        int y = wy * S + kp / S, x = wx * S + kp % S;
        if (y >= G || x >= G) continue;
        long long tok = ((long long)b * G + y) * G + x;
        const float* k = qkv + tok * 3 * D + D + h * 64;
        const float* v = qkv + tok * 3 * D + 2 * D + h * 64;
        float ak[64], av[64];
        for (int d = 0; d < 64; ++d) ak[d] = av[d] = 0.f;
        long long row0 = t - kp;  // this (b, window, head)'s first window position
        for (int qp = 0; qp < SS; ++qp) {
            int qy = wy * S + qp / S, qx = wx * S + qp % S;
            if (qy >= G || qx >= G) continue;
            long long qtok = ((long long)b * G + qy) * G + qx;
            const float* q = qkv + qtok * 3 * D + h * 64;
            const float* go = g + qtok * D + h * 64;
            float p = expf(rp_logit(q, k, rh, rw, scale, S, qp, kp) - lse[row0 + qp]);
            float dp = 0.f;
            for (int d = 0; d < 64; ++d) dp += go[d] * v[d];
            float ds = p * (dp - dd[row0 + qp]);
            for (int d = 0; d < 64; ++d) {
                ak[d] += ds * (q[d] * scale);
                av[d] += p * go[d];
            }
        }
        float* dk = dqkv + tok * 3 * D + D + h * 64;
        float* dv = dqkv + tok * 3 * D + 2 * D + h * 64;
        for (int d = 0; d < 64; ++d) {
            dk[d] = ak[d];
            dv[d] = av[d];
        }
    }
}
