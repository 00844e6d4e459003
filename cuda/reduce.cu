// Deterministic sums over rows, the CUDA twin of src/ops/reduce: out[c] =
// sum_r x[r, c] for x [rows, cols] (a bias gradient, a broadcast operand's
// gradient). Two stages with a fixed chunking, so that the result does not
// depend on the launch geometry and equals the CPU's bit for bit:
//   sum_rows_partial: part[k, c] = sum over rows k*CH .. (k+1)*CH - 1, in order, in f64
//   sum_rows_finish:  out[c] = (float) sum_k part[k, c], k in order, in f64
// No atomics. One thread per (chunk, column), then one per column.
#include "common.cuh"

extern "C" __global__ void sum_rows_partial(double* __restrict__ part, const float* __restrict__ x, long long rows, int cols, int chunk) {
    long long chunks = (rows + chunk - 1) / chunk;
    GRID_STRIDE(i, chunks * cols) {
        int c = (int)(i % cols);
        long long k = i / cols;
        long long r0 = k * chunk, r1 = min(rows, r0 + chunk);
        double acc = 0.0;
        for (long long r = r0; r < r1; ++r) acc += (double)x[r * cols + c];
        part[i] = acc;
    }
}

extern "C" __global__ void sum_rows_finish(float* __restrict__ out, const double* __restrict__ part, long long chunks, int cols) {
    GRID_STRIDE(c, (long long)cols) {
        double acc = 0.0;
        for (long long k = 0; k < chunks; ++k) acc += part[k * cols + c];
        out[c] = (float)acc;
    }
}

// Sum of squares in f64 (a gradient norm), the twin of
// src/ops/reduce::sum_squares_cpu: x in chunks of `chunk` values, one
// 256-thread block per chunk; value q of a chunk into lane q mod 256, the
// lanes added in order by thread 0 into part[k]. The host adds the chunks'
// sums in order. Products and adds _rn: no FMA contraction leaves the order.
#define SQ_LANES 256
extern "C" __global__ void sumsq_chunks(double* __restrict__ part, const float* __restrict__ x, long long n, int chunk) {
    __shared__ double lanes[SQ_LANES];
    if (blockDim.x != SQ_LANES) return;
    long long chunks = (n + chunk - 1) / chunk;
    for (long long k = blockIdx.x; k < chunks; k += gridDim.x) {
        long long q0 = k * chunk, q1 = min(n, q0 + chunk);
        double l = 0.0;
        for (long long q = q0 + threadIdx.x; q < q1; q += SQ_LANES) {
            double v = (double)x[q];
            l = __dadd_rn(l, __dmul_rn(v, v));
        }
        lanes[threadIdx.x] = l;
        __syncthreads();
        if (threadIdx.x == 0) {
            double s = 0.0;
            for (int j = 0; j < SQ_LANES; ++j) s = __dadd_rn(s, lanes[j]);
            part[k] = s;
        }
        __syncthreads();
    }
}
