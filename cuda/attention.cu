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
