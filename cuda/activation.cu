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
