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

// Every thread of the block sums 1 through shuffles and shared memory: 64
// (one output per thread of the grid).
extern "C" __global__ void selftest_block_sum(float* y) {
    __shared__ float scratch[32];
    y[blockIdx.x * blockDim.x + threadIdx.x] = block_sum(1.0f, scratch);
}

// A warp sums its lanes' values through shared memory, halving the active
// lanes at each step; __syncwarp orders each step's writes before the next
// step's reads (lane l reads what lane l + o wrote). y[warp] = 32 per warp.
// tests/kernels_host.rs removes the __syncwarp (a mutant): a race.
extern "C" __global__ void selftest_warp_reduce_shared(float* y) {
    __shared__ float s[32 * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* w = s + warp * 32;
    w[lane] = 1.0f;
    __syncwarp();
    for (int o = 16; o > 0; o >>= 1) {
        float v = lane < o ? w[lane] + w[lane + o] : 0.0f;
        if (lane < o) w[lane] = v;  // no lane of this step reads w[0, o) of another lane
        __syncwarp();  // this step's stores before the next step's loads
    }
    if (lane == 0) y[blockIdx.x * (blockDim.x >> 5) + warp] = w[0];
}

// Atomics on shared and global memory from every thread of every block: no
// race (y[0] must start at 0; it ends at the number of threads of the grid).
extern "C" __global__ void selftest_atomic_count(float* y) {
    __shared__ float count;
    if (threadIdx.x == 0) count = 0.0f;
    __syncthreads();
    atomicAdd(&count, 1.0f);
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(y, count);
}

// Every thread of one block writes its index to y[0]: no shared memory, no
// second block, so the racecheck has nothing to say, but the value left
// depends on which thread ran last; the schedule variation catches it.
extern "C" __global__ void selftest_last_writer_wins(float* y) { y[0] = (float)threadIdx.x; }

// Reads shared memory that no thread of the block wrote (initcheck).
extern "C" __global__ void selftest_uninitialised_shared(float* y) {
    __shared__ float s[64];
    if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

// Block b reads y[b + 1], which block b + 1 writes: a race between blocks
// (seen when block b + 1 runs first: the reversed schedule).
extern "C" __global__ void selftest_neighbour_read(float* y) {
    if (threadIdx.x == 0) {
        float next = blockIdx.x + 1 < gridDim.x ? y[blockIdx.x + 1] : 0.0f;
        y[blockIdx.x] = next + 1.0f;
    }
}

// Each thread takes a slot with an atomic on shared memory and writes its
// index there: which thread gets which slot depends on the schedule, which
// atomics make legitimate (each block's y is a permutation of 0..blockDim).
extern "C" __global__ void selftest_shared_atomic_slots(float* y) {
    __shared__ unsigned count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    unsigned slot = atomicAdd(&count, 1u);
    y[blockIdx.x * blockDim.x + slot] = (float)threadIdx.x;
}
