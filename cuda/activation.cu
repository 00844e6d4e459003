// Element-wise activations, the CUDA twins of src/ops/activation/cpu.rs.
//
//   gelu_f32:  y[i] = 0.5 x (1 + erf(x / sqrt 2))   (exact GELU, CUDA's erff)
//   relu_f32:  y[i] = max(x, 0)
//   add_f32:   y[i] = a[i] + b[i]
// Layout: flat arrays of n floats; one thread per element, grid-stride.
// Backward (later, beside them): dgelu = Phi(x) + x phi(x), activation
// gradients written (=), never accumulated.
#include "common.cuh"
#include "mma.cuh"

extern "C" __global__ void gelu_f32(float* __restrict__ y, const float* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

extern "C" __global__ void relu_f32(float* __restrict__ y, const float* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) { y[i] = fmaxf(x[i], 0.0f); }
}

extern "C" __global__ void add_f32(float* __restrict__ y, const float* __restrict__ a, const float* __restrict__ b, long long n) {
    GRID_STRIDE(i, n) { y[i] = a[i] + b[i]; }
}

// y[r, c] = act(y[r, c] + bias[c]) in place, the epilogue of a GEMM.
// act: 0 none, 1 ReLU, 2 GELU. Layout: y [rows, cols] row-major.
extern "C" __global__ void bias_act_f32(float* __restrict__ y, const float* __restrict__ bias, long long rows, int cols, int act) {
    GRID_STRIDE(i, rows * cols) {
        float v = y[i] + (bias ? bias[i % cols] : 0.0f);
        if (act == 1) v = fmaxf(v, 0.0f);
        else if (act == 2) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        y[i] = v;
    }
}

// f32 -> bf16 (round to nearest even, NaN kept quiet), for GEMM inputs; on
// the bits (mma.cuh) so that no header is needed: bf16 is the top half of f32.
extern "C" __global__ void f32_to_bf16(unsigned short* __restrict__ y, const float* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) { y[i] = f32_to_bf16_bits(x[i]); }
}

// bf16 -> f32 (exact: bf16 is the top half of an f32), for Tensor::to_dtype.
extern "C" __global__ void bf16_to_f32(float* __restrict__ y, const unsigned short* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) { y[i] = bf16_bits_to_f32(x[i]); }
}

// y16[r, c] = bf16(act(y[r, c] + bias[c])): a GEMM's f32 output turned into
// the bf16 input of the next GEMM in one pass (the ViT MLP's lin1 -> lin2).
extern "C" __global__ void bias_act_bf16out(unsigned short* __restrict__ y16, const float* __restrict__ y, const float* __restrict__ bias, long long rows,
                                            int cols, int act) {
    GRID_STRIDE(i, rows * cols) {
        float v = y[i] + (bias ? bias[i % cols] : 0.0f);
        if (act == 1) v = fmaxf(v, 0.0f);
        else if (act == 2) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        y16[i] = f32_to_bf16_bits(v);
    }
}

// y[r, c] = x[r, c] + bias[c]: the residual plus the bias of the GEMM that
// then accumulates onto it (beta = 1), so neither needs a pass of its own.
extern "C" __global__ void add_bias_rows_f32(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ bias, long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) { y[i] = x[i] + bias[i % cols]; }
}

// Activation backward: dx[i] = g[i] act'(x[i]) from the saved input x.
// act: 1 ReLU (g where x > 0), 2 exact GELU (Phi(x) + x phi(x), CUDA's erff /
// expf). Layout: flat arrays of n floats, written (=), never accumulated.
extern "C" __global__ void act_backward_f32(float* __restrict__ dx, const float* __restrict__ x, const float* __restrict__ g, long long n,
                                            int act) {
    GRID_STRIDE(i, n) {
        float v = x[i], gi = g[i];
        float d;
        if (act == 1) {
            d = v > 0.0f ? gi : 0.0f;
        } else if (act == 2) {
            float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
            float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
            d = gi * (cdf + v * pdf);
        } else {
            d = gi;
        }
        dx[i] = d;
    }
}
