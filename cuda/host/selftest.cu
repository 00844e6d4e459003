// Kernels that break CUDA's rules on purpose, built only into the host
// emulator's test library (tests/kernels_host.rs checks that each is reported).
#include "common.cuh"

// Half of warp 0 waits at __syncthreads, the other half at a shuffle.
extern "C" __global__ void selftest_divergent_barrier(float* y) {
    if (threadIdx.x < 16) __syncthreads();
    else y[threadIdx.x] = warp_sum(1.0f);
}

// Lane 0 exits, the rest of its warp then shuffles with the full mask.
extern "C" __global__ void selftest_shuffle_after_exit(float* y) {
    if (threadIdx.x == 0) return;
    y[threadIdx.x] = warp_sum(1.0f);
}

// Every thread of the block sums 1 through shuffles and shared memory: 64.
extern "C" __global__ void selftest_block_sum(float* y) {
    __shared__ float scratch[32];
    y[threadIdx.x] = block_sum(1.0f, scratch);
}
