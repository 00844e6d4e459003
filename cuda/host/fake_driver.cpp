// An emulated CUDA driver and cuBLAS on the host, so that the whole CUDA path
// of the crate (cudarc, the launchers, cuBLAS calls, GpuSamUnet) runs on a
// machine without a GPU: the same library as simt.cpp, loaded before cudarc
// looks for libcuda (its soname is libcuda.so), and named to src/cuda/blas.rs
// through SAM_UNET_CUBLAS. Tests only (tests/simt/mod.rs builds it).
//
// What it models: one device, streams that run each call to completion before
// returning (so stream order holds trivially), stream capture into graphs
// (kernels, cuBLAS calls, device copies and memsets are recorded and replayed
// by cuGraphLaunch; allocations made during capture belong to the graph; a
// host copy, a synchronisation or freeing older memory during capture breaks
// the capture, as on a GPU), device memory in guard-paged
// host buffers filled with NaN bytes (a read of memory nothing wrote shows up
// as NaN in the results), modules whose entry points are read off the PTX and
// must exist in the host kernel table, cuLaunchKernel through the SIMT
// scheduler (barrier and bounds checks included), and cuBLAS's column-major
// Sgemm / GemmEx (f32, bf16 inputs) with beta = 0 never reading C.
// What it does not model: concurrency between streams, timing, the GPU's own
// rounding (FMA contraction, expf / erff ulps).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "fake_driver.h"

extern "C" {
int simt_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, void (*entry)(void*), void* ctx, char* err, size_t errlen);
void* simt_alloc(size_t bytes, size_t align);
void simt_free(void* p);
extern const SimtKernel simt_kernels[];
extern const int simt_kernel_count;
}

namespace {

typedef int CUresult;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101, NOT_FOUND = 500, LAUNCH_FAILED = 719, NOT_SUPPORTED = 801,
                   CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901;

// A captured graph: the recorded operations, in stream order, and the memory
// allocated while capturing (the graph's own, freed with it).
struct Graph {
    std::vector<std::function<CUresult()>> ops;
    std::set<void*> owned;
};

struct Stream {
    Graph* capture = nullptr;
    bool invalid = false;
};

// Runs `op` now, or records it when the stream is being captured.
CUresult submit(void* stream, std::function<CUresult()> op) {
    Stream* s = (Stream*)stream;
    if (s && s->capture) {
        if (s->invalid) return CAPTURE_INVALIDATED;
        s->capture->ops.push_back(std::move(op));
        return OK;
    }
    return op();
}

// A call that a capturing stream does not allow: it breaks the capture.
CUresult refuse_in_capture(void* stream, const char* what) {
    Stream* s = (Stream*)stream;
    if (s && s->capture) {
        std::fprintf(stderr, "fake CUDA driver: %s during stream capture\n", what);
        s->invalid = true;
        return CAPTURE_UNSUPPORTED;
    }
    return OK;
}

struct Module {
    std::set<std::string> entries;
};

struct Launch {
    const SimtKernel* k;
    void** params;
};

void run_thread(void* ctx) {
    Launch* l = (Launch*)ctx;
    l->k->call(l->k->fn, l->params);
}

int g_ctx_token, g_event_token;

void* dev_alloc(size_t bytes) {
    void* p = simt_alloc(bytes ? bytes : 1, 256 < bytes ? 256 : 4);
    if (p) std::memset(p, 0xff, bytes);  // NaN as f32: unwritten memory is visible
    return p;
}

}  // namespace

extern "C" {

typedef unsigned long long CUdeviceptr;

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) {
    *v = 12080;
    return OK;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, (size_t)len, "host SIMT emulator (no GPU)");
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;   // max threads per block
        case 2: case 3: *v = 1024; break;
        case 4: *v = 1024; break;
        case 5: *v = 2147483647; break;
        case 6: case 7: *v = 65535; break;
        case 8: *v = 49152; break;  // shared memory per block
        case 10: *v = 32; break;    // warp size
        case 16: *v = 1; break;     // multiprocessors
        case 75: *v = 8; break;     // compute capability 8.0
        case 76: *v = 0; break;
        case 115: *v = 1; break;    // memory pools: cudarc allocates stream-ordered, as on a GPU
        default: *v = 0; break;     // unified addressing, ...: no
    }
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* b, int) {
    *b = (size_t)8 << 30;
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &g_ctx_token;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuDevicePrimaryCtxRelease(int) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** c) {
    *c = &g_ctx_token;
    return OK;
}
CUresult cuCtxPushCurrent_v2(void*) { return OK; }
CUresult cuCtxPopCurrent_v2(void** c) {
    if (c) *c = &g_ctx_token;
    return OK;
}
CUresult cuCtxGetDevice(int* d) {
    *d = 0;
    return OK;
}
CUresult cuCtxSynchronize() { return OK; }
CUresult cuDeviceGetDefaultMemPool(void**, int) { return NOT_SUPPORTED; }
CUresult cuMemPoolSetAttribute(void*, int, void*) { return NOT_SUPPORTED; }

CUresult cuStreamCreate(void** s, unsigned) {
    *s = new Stream;
    return OK;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) {
    *s = new Stream;
    return OK;
}
CUresult cuStreamDestroy_v2(void* s) {
    delete (Stream*)s;
    return OK;
}
CUresult cuStreamSynchronize(void* s) { return refuse_in_capture(s, "cuStreamSynchronize"); }
CUresult cuStreamBeginCapture_v2(void* stream, int) {
    Stream* s = (Stream*)stream;
    if (!s || s->capture) return INVALID_VALUE;
    s->capture = new Graph;
    s->invalid = false;
    return OK;
}
CUresult cuStreamEndCapture(void* stream, void** graph) {
    Stream* s = (Stream*)stream;
    if (!s || !s->capture) return INVALID_VALUE;
    Graph* g = s->capture;
    s->capture = nullptr;
    if (s->invalid) {
        for (void* p : g->owned) simt_free(p);
        delete g;
        *graph = nullptr;
        return CAPTURE_INVALIDATED;
    }
    *graph = g;
    return OK;
}
CUresult cuStreamIsCapturing(void* stream, int* status) {
    Stream* s = (Stream*)stream;
    *status = s && s->capture ? (s->invalid ? 2 : 1) : 0;
    return OK;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = graph;  // the executable graph is the recording itself
    return OK;
}
CUresult cuGraphLaunch(void* exec, void* stream) {
    Graph* g = (Graph*)exec;
    return submit(stream, [g]() {
        for (auto& op : g->ops) {
            CUresult r = op();
            if (r != OK) return r;
        }
        return OK;
    });
}
CUresult cuGraphUpload(void*, void*) { return OK; }
CUresult cuGraphExecDestroy(void*) { return OK; }
CUresult cuGraphDestroy(void* graph) {
    Graph* g = (Graph*)graph;
    for (void* p : g->owned) simt_free(p);
    delete g;
    return OK;
}
CUresult cuStreamQuery(void*) { return OK; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
CUresult cuEventCreate(void** e, unsigned) {
    *e = &g_event_token;
    return OK;
}
CUresult cuEventDestroy_v2(void*) { return OK; }
CUresult cuEventRecord(void*, void*) { return OK; }
CUresult cuEventSynchronize(void*) { return OK; }
CUresult cuEventQuery(void*) { return OK; }
CUresult cuEventElapsedTime(float* ms, void*, void*) {
    *ms = 0.0f;
    return OK;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* m = dev_alloc(bytes);
    if (!m) return OUT_OF_MEMORY;
    *p = (CUdeviceptr)m;
    return OK;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream) {
    Stream* s = (Stream*)stream;
    if (s && s->capture && s->invalid) return CAPTURE_INVALIDATED;
    CUresult r = cuMemAlloc_v2(p, bytes);
    if (r == OK && s && s->capture) s->capture->owned.insert((void*)*p);
    return r;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    simt_free((void*)p);
    return OK;
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    Stream* s = (Stream*)stream;
    if (s && s->capture) {
        // After a refused call the capture is broken: every later call on the
        // stream fails until the capture ends, as on a GPU.
        if (s->invalid) return CAPTURE_INVALIDATED;
        // The graph's own memory lives as long as the graph; older memory may
        // not be freed by a recording we replay (our code never does).
        if (s->capture->owned.count((void*)p)) return OK;
        return refuse_in_capture(stream, "cuMemFreeAsync of memory allocated before the capture");
    }
    return cuMemFree_v2(p);
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *free_b = (size_t)8 << 30;
    *total = (size_t)8 << 30;
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    std::memcpy((void*)d, h, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    std::memcpy(h, (const void*)d, n);
    return OK;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    std::memmove((void*)d, (const void*)s, n);
    return OK;
}
// Host copies from pageable memory cannot be captured.
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void* st) {
    if (CUresult r = refuse_in_capture(st, "cuMemcpyHtoDAsync")) return r;
    return cuMemcpyHtoD_v2(d, h, n);
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void* st) {
    if (CUresult r = refuse_in_capture(st, "cuMemcpyDtoHAsync")) return r;
    return cuMemcpyDtoH_v2(h, d, n);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void* st) {
    return submit(st, [=]() { return cuMemcpyDtoD_v2(d, s, n); });
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    std::memset((void*)d, v, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* st) {
    return submit(st, [=]() { return cuMemsetD8_v2(d, v, n); });
}
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
    for (size_t i = 0; i < n; ++i) ((unsigned*)d)[i] = v;
    return OK;
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void* st) {
    return submit(st, [=]() { return cuMemsetD32_v2(d, v, n); });
}

// Modules: the entry points named in the PTX; each must be in the host table.
CUresult cuModuleLoadData(void** m, const void* image) {
    Module* mod = new Module;
    const char* s = (const char*)image;
    while ((s = std::strstr(s, ".entry ")) != nullptr) {
        s += 7;
        const char* e = s;
        while (*e && *e != '(' && *e != ' ' && *e != '\n') ++e;
        mod->entries.insert(std::string(s, (size_t)(e - s)));
    }
    *m = mod;
    return OK;
}
CUresult cuModuleUnload(void* m) {
    delete (Module*)m;
    return OK;
}
CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
    if (!((Module*)m)->entries.count(name)) return NOT_FOUND;
    for (int i = 0; i < simt_kernel_count; ++i) {
        if (std::strcmp(simt_kernels[i].name, name) == 0) {
            *f = (void*)&simt_kernels[i];
            return OK;
        }
    }
    std::fprintf(stderr, "fake CUDA driver: kernel %s is in the PTX but not in the host table\n", name);
    return NOT_FOUND;
}
CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return OK;
}
CUresult cuFuncSetAttribute(void*, int, int) { return OK; }
CUresult cuFuncSetCacheConfig(void*, int) { return OK; }

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, void* stream, void** params,
                        void** extra) {
    const SimtKernel* k = (const SimtKernel*)f;
    if (smem != 0 || extra != nullptr || params == nullptr) {
        std::fprintf(stderr, "fake CUDA driver: %s: dynamic shared memory / extra launch parameters are not emulated\n", k->name);
        return INVALID_VALUE;
    }
    // The argument values, copied now (as the driver does): a recorded launch
    // replays with these values whatever happened to the caller's variables.
    std::vector<std::vector<char>> args((size_t)k->nparams);
    for (int i = 0; i < k->nparams; ++i) args[(size_t)i].assign((const char*)params[i], (const char*)params[i] + k->sizes[i]);
    return submit(stream, [=]() mutable {
        std::vector<void*> ptrs;
        for (auto& a : args) ptrs.push_back(a.data());
        Launch l{k, ptrs.data()};
        char err[1024];
        if (simt_launch(k->name, gx, gy, gz, bx, by, bz, run_thread, &l, err, sizeof err) != 0) {
            std::fprintf(stderr, "fake CUDA driver: %s\n", err);
            return LAUNCH_FAILED;
        }
        return OK;
    });
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "no error"; break;
        case INVALID_VALUE: *s = "invalid argument"; break;
        case OUT_OF_MEMORY: *s = "out of memory"; break;
        case INVALID_DEVICE: *s = "invalid device ordinal"; break;
        case NOT_FOUND: *s = "named symbol not found"; break;
        case LAUNCH_FAILED: *s = "unspecified launch failure (emulated kernel broke a rule; see stderr)"; break;
        case NOT_SUPPORTED: *s = "operation not supported"; break;
        case CAPTURE_UNSUPPORTED: *s = "operation not permitted when stream is capturing"; break;
        case CAPTURE_INVALIDATED: *s = "operation failed due to a previous error during capture"; break;
        default: *s = "unknown error"; break;
    }
    return OK;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        case CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return OK;
}

// ---- cuBLAS ----------------------------------------------------------------

struct BlasHandle {
    void* stream = nullptr;
};
int cublasCreate_v2(void** h) {
    *h = new BlasHandle;
    return 0;
}
int cublasDestroy_v2(void* h) {
    delete (BlasHandle*)h;
    return 0;
}
int cublasSetStream_v2(void* h, void* s) {
    ((BlasHandle*)h)->stream = s;
    return 0;
}
int cublasSetMathMode(void*, int) { return 0; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }

}  // extern "C"

namespace {

float bf16_to_f32(unsigned short b) {
    unsigned u = (unsigned)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Column-major C[m, n] = alpha op(A) op(B) + beta C, accumulated in f32 over
// k in order; beta = 0 never reads C (cuBLAS's contract: C may be garbage).
// load(i) reads element i of a matrix of the given storage type.
int gemm(int ta, int tb, int m, int n, int k, float alpha, const void* A, int atype, int lda, const void* B, int btype, int ldb, float beta, float* C, int ldc) {
    if (m < 0 || n < 0 || k < 0 || (atype != 0 && atype != 14) || (btype != 0 && btype != 14)) return 7;  // CUBLAS_STATUS_INVALID_VALUE
    auto ld = [](const void* p, int t, long long i) { return t == 0 ? ((const float*)p)[i] : bf16_to_f32(((const unsigned short*)p)[i]); };
    // Row-major copies: a[i][p] = op(A)(i, p), b[p][j] = op(B)(p, j), so that the
    // inner loop runs over contiguous j.
    std::vector<float> a((size_t)m * k), b((size_t)k * n);
    for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p) a[(size_t)i * k + p] = ld(A, atype, ta ? (long long)i * lda + p : (long long)p * lda + i);
    for (int p = 0; p < k; ++p)
        for (int j = 0; j < n; ++j) b[(size_t)p * n + j] = ld(B, btype, tb ? (long long)p * ldb + j : (long long)j * ldb + p);
    auto rows = [&](int i0, int i1) {
        std::vector<float> acc((size_t)n);
        for (int i = i0; i < i1; ++i) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int p = 0; p < k; ++p) {
                float av = a[(size_t)i * k + p];
                const float* br = &b[(size_t)p * n];
                for (int j = 0; j < n; ++j) acc[j] += av * br[j];
            }
            for (int j = 0; j < n; ++j) {
                float* c = &C[(long long)j * ldc + i];
                *c = beta == 0.0f ? alpha * acc[j] : alpha * acc[j] + beta * *c;
            }
        }
    };
    unsigned threads = std::thread::hardware_concurrency();
    if (threads < 1) threads = 1;
    if ((long long)m * n * k < (1 << 20)) threads = 1;
    std::vector<std::thread> pool;
    int step = (m + (int)threads - 1) / (int)threads;
    for (unsigned t = 0; t < threads; ++t) {
        int i0 = (int)t * step, i1 = i0 + step < m ? i0 + step : m;
        if (i0 < i1) pool.emplace_back(rows, i0, i1);
    }
    for (auto& th : pool) th.join();
    return 0;
}

}  // namespace

extern "C" {

// A GEMM runs on the handle's stream: recorded there while it is captured.
int on_stream(void* h, std::function<int()> g) {
    CUresult r = submit(((BlasHandle*)h)->stream, [g]() { return g() ? LAUNCH_FAILED : OK; });
    return r == OK ? 0 : 13;  // CUBLAS_STATUS_EXECUTION_FAILED
}

int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta, float* C,
                   int ldc) {
    float al = *alpha, be = *beta;
    return on_stream(h, [=]() { return gemm(ta, tb, m, n, k, al, A, 0, lda, B, 0, ldb, be, C, ldc); });
}

int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int atype, int lda, const void* B, int btype, int ldb,
                 const void* beta, void* C, int ctype, int ldc, int compute, int) {
    if (ctype != 0 || compute != 68) return 7;  // f32 output, CUBLAS_COMPUTE_32F only
    float al = *(const float*)alpha, be = *(const float*)beta;
    return on_stream(h, [=]() { return gemm(ta, tb, m, n, k, al, A, atype, lda, B, btype, ldb, be, (float*)C, ldc); });
}

int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int atype, int lda, long long sa, const void* B,
                               int btype, int ldb, long long sb, const void* beta, void* C, int ctype, int ldc, long long sc, int batch, int compute, int) {
    if (ctype != 0 || compute != 68 || batch < 0) return 7;
    float al = *(const float*)alpha, be = *(const float*)beta;
    return on_stream(h, [=]() {
        size_t ea = atype == 0 ? 4 : 2, eb = btype == 0 ? 4 : 2;
        for (int i = 0; i < batch; ++i) {
            int r = gemm(ta, tb, m, n, k, al, (const char*)A + (size_t)(sa * i) * ea, atype, lda, (const char*)B + (size_t)(sb * i) * eb, btype, ldb, be,
                         (float*)C + sc * i, ldc);
            if (r) return r;
        }
        return 0;
    });
}

}  // extern "C"
