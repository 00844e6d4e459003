// The authors' training loss, the CUDA twin of src/ops/loss: p = sigmoid(x),
//   focal = sum(-0.25 y (1-p)^2 log(p + 1e-12) - 0.75 (1-y) p^2 log(1-p + 1e-12)) / count
//   dice  = 1 - (2 sum(p y) + 1) / (sum p + sum y + 1),  loss = focal + w dice
// and its gradient with respect to x, in one pass each:
//   loss_partial: part[k, 0..4] = (sum focal term, sum p y, sum p, sum y) over
//                 elements k*CH .. (k+1)*CH - 1, in order, in f64
//   loss_finish:  sums[0..4] = the chunk partials added in order (one thread)
//   loss_grad:    g = (dfocal/dp / count + w ddice/dp) p (1 - p) * scale[0],
//                 from sums (the backward, scale = the loss's own gradient)
// The CPU twin has the same chunks and orders; p differs by expf's rounding.
// Deterministic, no atomics.
#include "common.cuh"

__device__ __forceinline__ double lsig(float x) { return (double)(1.0f / (1.0f + expf(-x))); }

extern "C" __global__ void loss_partial(double* __restrict__ part, const float* __restrict__ x, const float* __restrict__ y, long long n,
                                        long long chunk) {
    long long chunks = (n + chunk - 1) / chunk;
    GRID_STRIDE(k, chunks) {
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        long long e = min(n, (k + 1) * chunk);
        for (long long i = k * chunk; i < e; ++i) {
            double p = lsig(x[i]), t = (double)y[i];
            s0 += -0.25 * t * (1.0 - p) * (1.0 - p) * log(p + 1e-12) - 0.75 * (1.0 - t) * p * p * log(1.0 - p + 1e-12);
            s1 += p * t;
            s2 += p;
            s3 += t;
        }
        part[k * 4 + 0] = s0;
        part[k * 4 + 1] = s1;
        part[k * 4 + 2] = s2;
        part[k * 4 + 3] = s3;
    }
}

extern "C" __global__ void loss_finish(double* __restrict__ sums, const double* __restrict__ part, long long chunks) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double s[4] = {0.0, 0.0, 0.0, 0.0};
        for (long long k = 0; k < chunks; ++k)
            for (int j = 0; j < 4; ++j) s[j] += part[k * 4 + j];
        for (int j = 0; j < 4; ++j) sums[j] = s[j];
    }
}

extern "C" __global__ void loss_grad(float* __restrict__ g, const float* __restrict__ x, const float* __restrict__ y, const double* __restrict__ sums,
                                     const float* __restrict__ scale, long long n, double dice_weight) {
    double count = (double)n;
    double inter = sums[1], den = sums[2] + sums[3] + 1.0;
    GRID_STRIDE(i, n) {
        double p = lsig(x[i]), t = (double)y[i];
        double l1 = log(p + 1e-12), l0 = log(1.0 - p + 1e-12);
        double dfocal = -0.25 * t * (-2.0 * (1.0 - p) * l1 + (1.0 - p) * (1.0 - p) / (p + 1e-12)) -
                        0.75 * (1.0 - t) * (2.0 * p * l0 - p * p / (1.0 - p + 1e-12));
        double ddice = -(2.0 * t * den - (2.0 * inter + 1.0)) / (den * den);
        g[i] = (float)((dfocal / count + dice_weight * ddice) * p * (1.0 - p)) * scale[0];
    }
}
