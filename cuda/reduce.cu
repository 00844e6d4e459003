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
