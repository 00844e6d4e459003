// Element-wise activations, the CUDA twins of src/ops/activation/cpu.rs.
//
//   gelu_f32:  y[i] = 0.5 x (1 + erf(x / sqrt 2))   (exact GELU, CUDA's erff)
//   relu_f32:  y[i] = max(x, 0)
//   add_f32:   y[i] = a[i] + b[i]
// Layout: flat arrays of n floats; one thread per element, grid-stride.
// Backward (later, beside them): dgelu = Phi(x) + x phi(x), activation
// gradients written (=), never accumulated.
#include "common.cuh"

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

// f32 -> bf16 (round to nearest even, NaN kept quiet), for GEMM inputs.
// Written on the bits so that no header is needed; bf16 is the top half of f32.
extern "C" __global__ void f32_to_bf16(unsigned short* __restrict__ y, const float* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) {
        unsigned int u = __float_as_uint(x[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            y[i] = (unsigned short)((u >> 16) | 0x40u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            y[i] = (unsigned short)(u >> 16);
        }
    }
}
