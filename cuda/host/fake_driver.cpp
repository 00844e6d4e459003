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
// Arguments are checked as the CUDA driver and cuBLAS documentation states
// (see check_* below): launches above the limits of sm_80 / sm_90, device
// pointers outside every live allocation or running past one, copies and
// memsets past a buffer, leading dimensions below the stored rows, negative
// or overlapping output strides, type / compute combinations cuBLAS refuses.
// Each refusal prints what was wrong and returns the status the real library
// documents for it.
// Streams run nothing concurrently here, so a missing event between two
// streams would never show as a wrong value; every call is instead checked
// against the order CUDA guarantees (the stream-order check below): memory
// one stream wrote and another reads or writes, or one reads and another
// writes, without an event, a host synchronisation or the legacy default
// stream between them, fails the call ("stream race"). Kernels' accesses are
// known in checked builds (simt.cpp's hooks); copies, memsets, GEMMs and
// stream-ordered frees always.
// What it does not model: concurrency between streams, timing, the GPU's own
// rounding (expf / erff ulps, tensor-core accumulation order). One host
// thread drives the device at a time (the tests' use).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "fake_driver.h"

extern "C" {
int simt_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, void (*entry)(void*), void* ctx, int barrier_free, char* err,
                size_t errlen);
void* simt_alloc(size_t bytes, size_t align);
const unsigned long long* simt_footprints(size_t* n);
void simt_free(void* p);
int simt_is_buffer(const void* p);
int simt_in_buffer(const void* p, size_t bytes);
extern const SimtKernel simt_kernels[];
extern const int simt_kernel_count;
}

namespace {

typedef int CUresult;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101, NOT_FOUND = 500, LAUNCH_FAILED = 719, NOT_SUPPORTED = 801,
                   CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901;

// A captured graph: the recorded operations, in stream order, and the memory
// allocated while capturing (the graph's own, freed with it).
struct Clock {
    std::vector<uint64_t> t;
    uint64_t at(size_t i) const { return i < t.size() ? t[i] : 0; }
    void join(const Clock& o) {
        if (o.t.size() > t.size()) t.resize(o.t.size());
        for (size_t i = 0; i < o.t.size(); ++i)
            if (o.t[i] > t[i]) t[i] = o.t[i];
    }
    void tick(size_t i) {
        if (i >= t.size()) t.resize(i + 1);
        ++t[i];
    }
};

struct Graph {
    std::vector<std::function<CUresult()>> ops;
    std::set<void*> owned;
    Clock last;  // the stream's clock at the end of its last launch
};

// ---- stream order ------------------------------------------------------------
// Vector clocks: each stream counts the operations run on it, and knows, per
// stream, how many of that stream's operations are ordered before its next
// one (its own, an event it waited for, what the host had waited for when it
// submitted, the legacy default stream's implicit joins). Each access to
// device memory is recorded as (stream, count, byte range, read / write); an
// access conflicts with a recorded one of another stream when either writes,
// the ranges meet, and the clock of the accessing stream has not reached it.

struct Stream {
    Graph* capture = nullptr;
    bool invalid = false;
    unsigned id = 0;        // 0: the legacy default stream (handle NULL)
    bool blocking = true;   // synchronises with the legacy default stream
    Clock vc;
};
Stream g_null;                   // the legacy default stream
std::vector<Stream*> g_streams;  // the live streams made by cuStreamCreate
Clock g_retired;                 // destroyed streams' clocks (a device sync waits for their work)
unsigned g_next_stream = 1;
Clock g_host;  // what the host has waited for (synchronisations, blocking copies)

struct Event {
    Clock vc;  // the work it was recorded after
};

// The operation running now: its stream and what it is (for messages).
Stream* g_op = nullptr;

struct Rec {
    unsigned stream;
    uint64_t epoch;
    uintptr_t lo, hi;
    bool write;
    const char* what;
};
std::map<uintptr_t, std::vector<Rec>> g_recs;  // by allocation start
std::map<void*, size_t> g_sizes;                // live allocations
unsigned long long g_stream_races = 0;

Stream* stream_of(void* h) { return h ? (Stream*)h : &g_null; }

// The start of an operation on `s`: it is ordered after what the host waited
// for before submitting it and, on the legacy default stream, after all
// earlier work of the blocking streams (and they after its).
void legacy_joins(Stream* s) {
    s->vc.join(g_host);
    if (s == &g_null) {
        for (Stream* t : g_streams)
            if (t->blocking) s->vc.join(t->vc);
    } else if (s->blocking) {
        s->vc.join(g_null.vc);
    }
}
void begin_op(Stream* s) {
    legacy_joins(s);
    s->vc.tick(s->id);
    g_op = s;
}

struct OpScope {
    Stream* prev;
    explicit OpScope(void* stream) : prev(g_op) { begin_op(stream_of(stream)); }
    ~OpScope() { g_op = prev; }
};

// The operation running now reads or writes [lo, hi) of device memory:
// false (and a message) when that races with another stream's access.
bool touch(uintptr_t lo, uintptr_t hi, bool write, const char* what) {
    if (!g_op || hi <= lo || g_sizes.empty()) return true;
    auto it = g_sizes.upper_bound((void*)lo);
    if (it == g_sizes.begin()) return true;
    --it;
    uintptr_t base = (uintptr_t)it->first;
    size_t size = it->second;
    if (lo >= base + (size ? size : 1)) return true;
    std::vector<Rec>& recs = g_recs[base];
    const Stream* s = g_op;
    bool ok = true;
    for (const Rec& r : recs) {
        if (r.stream == s->id || r.hi <= lo || hi <= r.lo || !(write || r.write) || s->vc.at(r.stream) >= r.epoch) continue;
        g_stream_races += 1;
        uintptr_t a = lo > r.lo ? lo : r.lo, b = hi < r.hi ? hi : r.hi;
        std::fprintf(stderr,
                     "fake CUDA driver: stream race: %s on stream %u %s bytes [%zu, %zu) of the %zu-byte allocation at %p, which %s on stream %u %s, and "
                     "nothing orders the two (no event recorded on stream %u after it that stream %u waited for, no host synchronisation with it "
                     "before this call)\n",
                     what, s->id, write ? "writes" : "reads", (size_t)(a - base), (size_t)(b - base), size, (void*)base, r.what, r.stream,
                     r.write ? "wrote" : "read", r.stream, s->id);
        ok = false;
        break;
    }
    // Forget what can no longer race: what the host has waited for (every
    // later operation is ordered after it), and this stream's own earlier
    // accesses that this one covers (whatever is unordered with those is
    // unordered with this one too).
    uint64_t now = s->vc.at(s->id);
    size_t k = 0;
    for (size_t i = 0; i < recs.size(); ++i) {
        const Rec& r = recs[i];
        bool covered = r.stream == s->id && r.lo >= lo && r.hi <= hi && (write || !r.write);
        if (!covered && g_host.at(r.stream) < r.epoch) recs[k++] = r;
    }
    recs.resize(k);
    recs.push_back(Rec{s->id, now, lo, hi, write, what});
    return ok;
}
bool touch_ptr(unsigned long long p, size_t bytes, bool write, const char* what) { return touch((uintptr_t)p, (uintptr_t)p + bytes, write, what); }

// Runs `op` now, or records it when the stream is being captured (a replay
// runs it as part of the graph launch's operation).
CUresult submit(void* stream, std::function<CUresult()> op) {
    Stream* s = (Stream*)stream;
    if (s && s->capture) {
        if (s->invalid) return CAPTURE_INVALIDATED;
        s->capture->ops.push_back(std::move(op));
        return OK;
    }
    if (g_op) return op();  // inside a graph launch
    OpScope scope(stream);
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

int g_ctx_token;

// A device range [p, p + bytes) that is not inside one live allocation: the
// driver's CUDA_ERROR_INVALID_VALUE (an illegal address on a GPU, found later).
bool bad_range(const char* call, const char* what, unsigned long long p, size_t bytes) {
    if (bytes == 0 || simt_in_buffer((const void*)p, bytes)) return false;
    std::fprintf(stderr, "fake CUDA driver: %s: %s [%p, +%zu bytes) is not inside one live device allocation\n", call, what, (void*)p, bytes);
    return true;
}

// Launch limits of compute capability 8.0 and 9.0 (CUDA C++ Programming Guide,
// "Technical Specifications per Compute Capability"): 1024 threads per block,
// block (1024, 1024, 64), grid (2^31 - 1, 65535, 65535), 48 KB of static
// shared memory per block (more only as dynamic memory after an opt-in:
// 163 KB on sm_80, 227 KB on sm_90; we never opt in).
const char* launch_limit(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, size_t smem) {
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0) return "a zero grid or block dimension";
    if (bx > 1024 || by > 1024 || bz > 64) return "a block dimension above (1024, 1024, 64)";
    if ((unsigned long long)bx * by * bz > 1024) return "more than 1024 threads per block";
    if (gx > 2147483647u || gy > 65535 || gz > 65535) return "a grid dimension above (2^31 - 1, 65535, 65535)";
    if (smem > 48 * 1024) return "more than 48 KB of shared memory per block (static + dynamic, without the opt-in)";
    return nullptr;
}

// What the crate asks of the driver, counted (fake_driver_counters): the
// guard of tests/cuda_counts.rs that a refactoring costs no extra kernel
// launches, GEMMs or memory. In dry-run mode kernels and GEMMs are checked
// and counted but not run (the counts do not depend on the data), so the
// full-size model costs milliseconds.
struct Counts {
    unsigned long long launch_calls = 0;  // cuLaunchKernel calls (eager or recorded)
    unsigned long long kernels = 0;       // kernels executed (eager or replayed)
    unsigned long long gemm_calls = 0;    // cuBLAS GEMM calls (eager or recorded)
    unsigned long long gemms = 0;         // GEMMs executed (batched: one each)
    unsigned long long graph_launches = 0;
    unsigned long long allocs = 0;        // cuMemAlloc / cuMemAllocAsync calls
    unsigned long long alloc_bytes = 0;   // bytes they asked for
    unsigned long long live_bytes = 0;    // device memory allocated now
    unsigned long long peak_bytes = 0;    // its maximum since the last reset
};
Counts g_counts;
bool g_dry_run = false;

// The emulated device's memory (what cuMemGetInfo reports).
constexpr size_t kDeviceBytes = (size_t)8 << 30;

void* dev_alloc(size_t bytes) {
    // More than the device has fails as on a GPU (CUDA_ERROR_OUT_OF_MEMORY),
    // not as a host mmap that overcommit might grant.
    if (bytes > kDeviceBytes) return nullptr;
    void* p = simt_alloc(bytes ? bytes : 1, 256 < bytes ? 256 : 4);
    if (p) std::memset(p, 0xff, bytes);  // NaN as f32: unwritten memory is visible
    return p;
}

}  // namespace

extern "C" {

typedef unsigned long long CUdeviceptr;
CUresult cuMemFree_v2(CUdeviceptr p);

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
        case 4: *v = 64; break;     // max block z
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
    *b = kDeviceBytes;
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
CUresult cuCtxSynchronize() {
    g_host.join(g_null.vc);
    g_host.join(g_retired);
    for (Stream* t : g_streams) g_host.join(t->vc);
    return OK;
}
CUresult cuDeviceGetDefaultMemPool(void**, int) { return NOT_SUPPORTED; }
CUresult cuMemPoolSetAttribute(void*, int, void*) { return NOT_SUPPORTED; }

// A new stream is ordered after nothing but what the host has waited for;
// CU_STREAM_NON_BLOCKING (1) streams do not join the legacy default stream.
CUresult cuStreamCreate(void** s, unsigned flags) {
    Stream* st = new Stream;
    st->id = g_next_stream++;
    st->blocking = (flags & 1) == 0;
    g_streams.push_back(st);
    *s = st;
    return OK;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
// Its work still completes (the host does not wait): a later device
// synchronisation covers it.
CUresult cuStreamDestroy_v2(void* s) {
    for (size_t i = 0; i < g_streams.size(); ++i)
        if (g_streams[i] == s) g_streams.erase(g_streams.begin() + (long)i);
    if (s) g_retired.join(((Stream*)s)->vc);
    delete (Stream*)s;
    return OK;
}
CUresult cuStreamSynchronize(void* s) {
    if (CUresult r = refuse_in_capture(s, "cuStreamSynchronize")) return r;
    g_host.join(stream_of(s)->vc);
    return OK;
}
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
        for (void* p : g->owned) cuMemFree_v2((CUdeviceptr)p);
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
    g_counts.graph_launches += 1;
    // A launch of a graph is ordered after its previous launch, on whatever
    // stream that ran.
    return submit(stream, [g]() {
        if (g_op) g_op->vc.join(g->last);
        CUresult r = OK;
        for (auto& op : g->ops) {
            r = op();
            if (r != OK) break;
        }
        if (g_op) g->last = g_op->vc;
        return r;
    });
}
CUresult cuGraphUpload(void*, void*) { return OK; }
CUresult cuGraphExecDestroy(void*) { return OK; }
CUresult cuGraphDestroy(void* graph) {
    Graph* g = (Graph*)graph;
    for (void* p : g->owned) cuMemFree_v2((CUdeviceptr)p);
    delete g;
    return OK;
}
// Every stream is always idle here: a query says so, and the host then knows
// the stream's work is done.
CUresult cuStreamQuery(void* s) {
    g_host.join(stream_of(s)->vc);
    return OK;
}
// Events carry the clock of the stream they were recorded on; waiting for one
// joins it. (Events inside a stream capture are not emulated: the graphs we
// capture are one stream's.)
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    if (!e) return INVALID_VALUE;
    Stream* st = (Stream*)s;
    if (st && st->capture) return OK;
    stream_of(s)->vc.join(((Event*)e)->vc);
    return OK;
}
CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event;
    return OK;
}
CUresult cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return OK;
}
CUresult cuEventRecord(void* e, void* s) {
    if (!e) return INVALID_VALUE;
    Stream* st = (Stream*)s;
    if (st && st->capture) return OK;
    // On the legacy default stream (or a blocking one) the event also
    // follows what that stream implicitly waits for.
    Stream* rs = stream_of(s);
    legacy_joins(rs);
    ((Event*)e)->vc = rs->vc;
    return OK;
}
CUresult cuEventSynchronize(void* e) {
    if (!e) return INVALID_VALUE;
    g_host.join(((Event*)e)->vc);
    return OK;
}
CUresult cuEventQuery(void* e) { return cuEventSynchronize(e); }
CUresult cuEventElapsedTime(float* ms, void*, void*) {
    *ms = 0.0f;
    return OK;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* m = dev_alloc(bytes);
    if (!m) return OUT_OF_MEMORY;
    g_counts.allocs += 1;
    g_counts.alloc_bytes += bytes;
    g_counts.live_bytes += bytes;
    if (g_counts.live_bytes > g_counts.peak_bytes) g_counts.peak_bytes = g_counts.live_bytes;
    g_sizes[m] = bytes;
    *p = (CUdeviceptr)m;
    return OK;
}
// Stream-ordered: the memory is the allocating stream's until another stream
// is ordered after the allocation (recorded as a write of all of it).
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream) {
    Stream* s = (Stream*)stream;
    if (s && s->capture && s->invalid) return CAPTURE_INVALIDATED;
    CUresult r = cuMemAlloc_v2(p, bytes);
    if (r == OK && s && s->capture) s->capture->owned.insert((void*)*p);
    if (r == OK && !(s && s->capture)) {
        OpScope op(stream);
        touch_ptr(*p, bytes, true, "cuMemAllocAsync");
    }
    return r;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    if (p && !simt_is_buffer((const void*)p)) {
        std::fprintf(stderr, "fake CUDA driver: cuMemFree of %p, which is not a live allocation\n", (void*)p);
        return INVALID_VALUE;
    }
    auto it = g_sizes.find((void*)p);
    if (it != g_sizes.end()) {
        g_counts.live_bytes -= it->second;
        g_sizes.erase(it);
    }
    g_recs.erase((uintptr_t)p);
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
    // Freeing is a write of the whole allocation in stream order: another
    // stream's access to it must be ordered before the free.
    bool ok = true;
    if (p) {
        auto it = g_sizes.find((void*)p);
        OpScope op(stream);
        if (it != g_sizes.end()) ok = touch_ptr(p, it->second, true, "cuMemFreeAsync");
    }
    CUresult r = cuMemFree_v2(p);
    return r == OK && !ok ? LAUNCH_FAILED : r;
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *free_b = kDeviceBytes;
    *total = kDeviceBytes;
    return OK;
}
}  // extern "C"

namespace {

// Copies and memsets: the work itself (bounds checked, accesses recorded on
// the running operation's stream), then the synchronous entry points on the
// legacy default stream (the host waits for them) and the asynchronous ones
// on theirs.
CUresult copy_htod(CUdeviceptr d, const void* h, size_t n, const char* what) {
    if (bad_range(what, "destination", d, n)) return INVALID_VALUE;
    std::memcpy((void*)d, h, n);
    return touch_ptr(d, n, true, what) ? OK : LAUNCH_FAILED;
}
CUresult copy_dtoh(void* h, CUdeviceptr d, size_t n, const char* what) {
    if (bad_range(what, "source", d, n)) return INVALID_VALUE;
    std::memcpy(h, (const void*)d, n);
    return touch_ptr(d, n, false, what) ? OK : LAUNCH_FAILED;
}
CUresult copy_dtod(CUdeviceptr d, CUdeviceptr s, size_t n, const char* what) {
    if (bad_range(what, "destination", d, n) || bad_range(what, "source", s, n)) return INVALID_VALUE;
    std::memmove((void*)d, (const void*)s, n);
    bool ok = touch_ptr(s, n, false, what);
    ok = touch_ptr(d, n, true, what) && ok;
    return ok ? OK : LAUNCH_FAILED;
}
CUresult set_d8(CUdeviceptr d, unsigned char v, size_t n, const char* what) {
    if (bad_range(what, "destination", d, n)) return INVALID_VALUE;
    std::memset((void*)d, v, n);
    return touch_ptr(d, n, true, what) ? OK : LAUNCH_FAILED;
}
CUresult set_d32(CUdeviceptr d, unsigned v, size_t n, const char* what) {
    if (d % 4 != 0 || bad_range(what, "destination", d, n * 4)) return INVALID_VALUE;
    for (size_t i = 0; i < n; ++i) ((unsigned*)d)[i] = v;
    return touch_ptr(d, n * 4, true, what) ? OK : LAUNCH_FAILED;
}
// A synchronous call runs on the legacy default stream; what the host then
// knows is done follows CUDA's "API synchronization behavior": a copy to
// (pageable) host memory is complete when it returns; a copy from host
// memory waits for the work before it but may return before landing; a
// device-to-device copy or a memset does not synchronise the host.
enum class HostWaits { After, Before, No };
template <class F>
CUresult blocking(HostWaits w, F f) {
    Clock before = g_null.vc;
    for (Stream* t : g_streams)
        if (t->blocking) before.join(t->vc);
    CUresult r;
    {
        OpScope op(nullptr);
        r = f();
    }
    if (w == HostWaits::After) g_host.join(g_null.vc);
    if (w == HostWaits::Before) g_host.join(before);
    return r;
}

}  // namespace

extern "C" {

CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    return blocking(HostWaits::Before, [&] { return copy_htod(d, h, n, "cuMemcpyHtoD"); });
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    return blocking(HostWaits::After, [&] { return copy_dtoh(h, d, n, "cuMemcpyDtoH"); });
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    return blocking(HostWaits::No, [&] { return copy_dtod(d, s, n, "cuMemcpyDtoD"); });
}
// Host copies from pageable memory cannot be captured. A copy to pageable
// memory returns when it is done: the host has waited for the stream.
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void* st) {
    if (CUresult r = refuse_in_capture(st, "cuMemcpyHtoDAsync")) return r;
    OpScope op(st);
    return copy_htod(d, h, n, "cuMemcpyHtoDAsync");
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void* st) {
    if (CUresult r = refuse_in_capture(st, "cuMemcpyDtoHAsync")) return r;
    CUresult r;
    {
        OpScope op(st);
        r = copy_dtoh(h, d, n, "cuMemcpyDtoHAsync");
    }
    g_host.join(stream_of(st)->vc);
    return r;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void* st) {
    if (bad_range("cuMemcpyDtoDAsync", "destination", d, n) || bad_range("cuMemcpyDtoDAsync", "source", s, n)) return INVALID_VALUE;
    return submit(st, [=]() { return copy_dtod(d, s, n, "cuMemcpyDtoDAsync"); });
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    return blocking(HostWaits::No, [&] { return set_d8(d, v, n, "cuMemsetD8"); });
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* st) {
    if (bad_range("cuMemsetD8Async", "destination", d, n)) return INVALID_VALUE;
    return submit(st, [=]() { return set_d8(d, v, n, "cuMemsetD8Async"); });
}
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
    return blocking(HostWaits::No, [&] { return set_d32(d, v, n, "cuMemsetD32"); });
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void* st) {
    if (d % 4 != 0 || bad_range("cuMemsetD32Async", "destination", d, n * 4)) return INVALID_VALUE;
    return submit(st, [=]() { return set_d32(d, v, n, "cuMemsetD32Async"); });
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
    if (const char* why = launch_limit(gx, gy, gz, bx, by, bz, k->shared_bytes + smem)) {
        std::fprintf(stderr, "fake CUDA driver: %s: grid (%u, %u, %u), block (%u, %u, %u), %zu + %u bytes of shared memory: %s\n", k->name, gx, gy, gz, bx, by,
                     bz, k->shared_bytes, smem, why);
        return INVALID_VALUE;
    }
    if (smem != 0 || extra != nullptr || params == nullptr) {
        std::fprintf(stderr, "fake CUDA driver: %s: dynamic shared memory / extra launch parameters are not emulated\n", k->name);
        return INVALID_VALUE;
    }
    // The argument values, copied now (as the driver does): a recorded launch
    // replays with these values whatever happened to the caller's variables.
    g_counts.launch_calls += 1;
    std::vector<std::vector<char>> args((size_t)k->nparams);
    for (int i = 0; i < k->nparams; ++i) args[(size_t)i].assign((const char*)params[i], (const char*)params[i] + k->sizes[i]);
    return submit(stream, [=]() mutable {
        std::vector<void*> ptrs;
        for (auto& a : args) ptrs.push_back(a.data());
        Launch l{k, ptrs.data()};
        g_counts.kernels += 1;
        if (g_dry_run) return OK;
        char err[1024];
        if (simt_launch(k->name, gx, gy, gz, bx, by, bz, run_thread, &l, k->barrier_free, err, sizeof err) != 0) {
            std::fprintf(stderr, "fake CUDA driver: %s\n", err);
            return LAUNCH_FAILED;
        }
        // What it read and wrote (checked builds), in stream order.
        size_t nf = 0;
        const unsigned long long* f = simt_footprints(&nf);
        bool ok = true;
        for (size_t i = 0; i < nf; ++i, f += 6) {
            if (f[2] < f[3]) ok = touch(f[2], f[3], false, k->name) && ok;
            if (f[4] < f[5]) ok = touch(f[4], f[5], true, k->name) && ok;
        }
        return ok ? OK : LAUNCH_FAILED;
    });
}

// The counters since the last reset, in Counts' order (9 values).
void fake_driver_counters(unsigned long long* out) {
    const unsigned long long v[] = {g_counts.launch_calls, g_counts.kernels, g_counts.gemm_calls, g_counts.gemms, g_counts.graph_launches,
                                    g_counts.allocs, g_counts.alloc_bytes, g_counts.live_bytes, g_counts.peak_bytes};
    for (int i = 0; i < 9; ++i) out[i] = v[i];
}
// Zeroes the counters; the peak starts again from what is live now.
void fake_driver_reset_counters() {
    unsigned long long live = g_counts.live_bytes;
    g_counts = Counts{};
    g_counts.live_bytes = live;
    g_counts.peak_bytes = live;
}
void fake_driver_dry_run(int on) { g_dry_run = on != 0; }
// Stream races found so far (each also failed its call).
unsigned long long fake_driver_stream_races() { return g_stream_races; }

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
int cublasSetWorkspace_v2(void*, void* p, size_t bytes) {
    if (bytes > 0 && !simt_in_buffer(p, bytes)) {
        std::fprintf(stderr, "fake cuBLAS: cublasSetWorkspace: [%p, +%zu bytes) is not inside one live device allocation\n", p, bytes);
        return 7;
    }
    return 0;
}

}  // extern "C"

namespace {

float bf16_to_f32(unsigned short b) {
    unsigned u = (unsigned)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Rows i0..i1 of sums[m][n] = a[m][k] b[k][n] (row-major). Every element is
// 0 + a0 b0 + a1 b1 + ... in k order, one rounding per multiply and per add
// (-ffp-contract=off), whatever the vector width: lanes are separate sums.
// Blocks of 4 rows x 16 columns keep their 64 sums in registers for the
// whole k loop; the column blocks are the outer loop so that a block's
// k x 16 panel of b stays in cache while every row block of a passes by
// (the emulated training step spent a third of its time here with the row
// blocks outside). Compiled for AVX2 too, chosen at run time; no UB
// instrumentation in the loop (the indices are bounded by the checked
// arguments). The edges take the scalar loop.
__attribute__((target_clones("avx2", "default"), no_sanitize("undefined"))) void gemm_rows(const float* a, const float* b, float* sums, int i0, int i1, int n, int k) {
    typedef float v8 __attribute__((vector_size(32)));
    const size_t N = (size_t)n, K = (size_t)k;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        int i = i0;
        for (; i + 4 <= i1; i += 4) {
            v8 acc[4][2] = {};
            const float* ar = a + (size_t)i * K;
            for (size_t p = 0; p < K; ++p) {
                v8 b0, b1;
                std::memcpy(&b0, b + p * N + j, sizeof b0);
                std::memcpy(&b1, b + p * N + j + 8, sizeof b1);
                for (int r = 0; r < 4; ++r) {
                    float av = ar[r * K + p];
                    acc[r][0] += b0 * av;
                    acc[r][1] += b1 * av;
                }
            }
            for (int r = 0; r < 4; ++r)
                for (int e = 0; e < 8; ++e) {
                    sums[(size_t)(i + r) * N + j + e] = acc[r][0][e];
                    sums[(size_t)(i + r) * N + j + 8 + e] = acc[r][1][e];
                }
        }
        for (; i < i1; ++i)
            for (int jj = j; jj < j + 16; ++jj) {
                float acc = 0.0f;
                for (size_t p = 0; p < K; ++p) acc += a[(size_t)i * K + p] * b[p * N + jj];
                sums[(size_t)i * N + jj] = acc;
            }
    }
    for (int i = i0; i < i1; ++i)
        for (int jj = j; jj < n; ++jj) {
            float acc = 0.0f;
            for (size_t p = 0; p < K; ++p) acc += a[(size_t)i * K + p] * b[p * N + jj];
            sums[(size_t)i * N + jj] = acc;
        }
}

// Column-major C[m, n] = alpha op(A) op(B) + beta C, accumulated in f32 over
// k in order; beta = 0 never reads C (cuBLAS's contract: C may be garbage).
// load(i) reads element i of a matrix of the given storage type.
// Arguments already checked (check_gemm).
int gemm(int ta, int tb, int m, int n, int k, float alpha, const void* A, int atype, int lda, const void* B, int btype, int ldb, float beta, float* C, int ldc) {
    auto ld = [](const void* p, int t, long long i) { return t == 0 ? ((const float*)p)[i] : bf16_to_f32(((const unsigned short*)p)[i]); };
    // Row-major copies: a[i][p] = op(A)(i, p), b[p][j] = op(B)(p, j), so that the
    // inner loop runs over contiguous j.
    std::vector<float> a((size_t)m * k), b((size_t)k * n);
    for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p) a[(size_t)i * k + p] = ld(A, atype, ta ? (long long)i * lda + p : (long long)p * lda + i);
    for (int p = 0; p < k; ++p)
        for (int j = 0; j < n; ++j) b[(size_t)p * n + j] = ld(B, btype, tb ? (long long)p * ldb + j : (long long)j * ldb + p);
    // Sums in a row-major buffer, then scaled into C (column-major) by alpha / beta.
    std::vector<float> sums((size_t)m * n);
    unsigned threads = std::thread::hardware_concurrency();
    if (threads < 1) threads = 1;
    if ((long long)m * n * k < (1 << 20)) threads = 1;
    std::vector<std::thread> pool;
    int step = ((m + (int)threads - 1) / (int)threads + 3) / 4 * 4;
    for (unsigned t = 0; t < threads; ++t) {
        int i0 = (int)t * step, i1 = i0 + step < m ? i0 + step : m;
        if (i0 < i1) pool.emplace_back(gemm_rows, a.data(), b.data(), sums.data(), i0, i1, n, k);
    }
    for (auto& th : pool) th.join();
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float* c = &C[(long long)j * ldc + i];
            float acc = sums[(size_t)i * n + j];
            *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
        }
    return 0;
}

}  // namespace

extern "C" {

}  // extern "C"

namespace {

struct Span {
    unsigned long long lo, hi;
    bool write;
};

// The bytes of a GEMM's operands for the stream-order check: per matrix
// (cols - 1) ld + rows elements, `batch` of them `stride` elements apart;
// A and B read, C written (and read when beta != 0).
std::vector<Span> gemm_spans(int ta, int tb, int m, int n, int k, const void* A, int atype, int lda, long long sa, const void* B, int btype, int ldb, long long sb,
                             const void* C, int ldc, long long sc, int batch, float beta) {
    auto span = [&](const void* p, long long rows, long long cols, long long ld, long long stride, size_t esize, bool write) {
        long long e = rows == 0 || cols == 0 || batch == 0 ? 0 : (cols - 1) * ld + rows;
        long long lo = stride < 0 ? stride * (batch - 1) : 0, hi = (stride > 0 ? stride * (batch - 1) : 0) + e;
        unsigned long long b = (unsigned long long)p;
        return e == 0 ? Span{0, 0, write} : Span{b + (unsigned long long)(lo * (long long)esize), b + (unsigned long long)(hi * (long long)esize), write};
    };
    std::vector<Span> v;
    if (k > 0) {
        v.push_back(span(A, ta ? k : m, ta ? m : k, lda, sa, atype == 0 ? 4 : 2, false));
        v.push_back(span(B, tb ? n : k, tb ? k : n, ldb, sb, btype == 0 ? 4 : 2, false));
    }
    if (beta != 0.0f) v.push_back(span(C, m, n, ldc, sc, 4, false));
    v.push_back(span(C, m, n, ldc, sc, 4, true));
    return v;
}

}  // namespace

extern "C" {

// A GEMM runs on the handle's stream: recorded there while it is captured.
int on_stream(void* h, std::vector<Span> spans, std::function<int()> g) {
    g_counts.gemm_calls += 1;
    CUresult r = submit(((BlasHandle*)h)->stream, [g, spans]() {
        g_counts.gemms += 1;
        if (g_dry_run) return OK;
        if (g()) return LAUNCH_FAILED;
        bool ok = true;
        for (const Span& sp : spans) ok = touch(sp.lo, sp.hi, sp.write, "a cuBLAS GEMM") && ok;
        return ok ? OK : LAUNCH_FAILED;
    });
    return r == OK ? 0 : 13;  // CUBLAS_STATUS_EXECUTION_FAILED
}

// The argument checks of cublas<t>gemm / cublasGemmEx /
// cublasGemmStridedBatchedEx (cuBLAS documentation): CUBLAS_STATUS_INVALID_VALUE
// (7) for m, n, k or batchCount < 0, lda < max(1, rows of A as stored), ldb
// likewise, ldc < max(1, m); CUBLAS_STATUS_NOT_SUPPORTED (15) for a type /
// compute combination outside its table (of which we emulate the two we use:
// f32 x f32 -> f32 and bf16 x bf16 -> f32, both CUBLAS_COMPUTE_32F). Also
// refused, as errors rather than the undefined behaviour cuBLAS documents:
// output matrices of a batch that overlap (or a negative output stride), and
// matrices that are not inside one live device allocation.
static int check_gemm(const char* call, int ta, int tb, int m, int n, int k, const void* A, int atype, int lda, long long sa, const void* B, int btype, int ldb,
               long long sb, const void* C, int ctype, int ldc, long long sc, int batch, int compute) {
    auto fail = [&](int status, const char* why) {
        std::fprintf(stderr, "fake cuBLAS: %s (m %d n %d k %d, lda %d ldb %d ldc %d, strides %lld / %lld / %lld, batch %d): %s\n", call, m, n, k, lda, ldb, ldc, sa,
                     sb, sc, batch, why);
        return status;
    };
    if (m < 0 || n < 0 || k < 0 || batch < 0) return fail(7, "a negative dimension or batch count");
    if ((ta != 0 && ta != 1) || (tb != 0 && tb != 1)) return fail(7, "transa / transb other than N or T");
    const int arows = ta ? k : m, brows = tb ? n : k;
    const int acols = ta ? m : k, bcols = tb ? k : n;
    if (lda < (arows > 1 ? arows : 1)) return fail(7, "lda below the rows of A as stored");
    if (ldb < (brows > 1 ? brows : 1)) return fail(7, "ldb below the rows of B as stored");
    if (ldc < (m > 1 ? m : 1)) return fail(7, "ldc below m");
    bool f32 = atype == 0 && btype == 0 && ctype == 0, bf16 = atype == 14 && btype == 14 && ctype == 0;
    if (compute != 68 || !(f32 || bf16)) return fail(15, "type / compute combination not supported (emulated: 32F x 32F -> 32F and 16BF x 16BF -> 32F, COMPUTE_32F)");
    if (m == 0 || n == 0 || batch == 0) return 0;
    // Extent of one column-major matrix: (cols - 1) ld + rows elements.
    auto extent = [](long long rows, long long cols, long long ld) { return rows == 0 || cols == 0 ? 0 : (cols - 1) * ld + rows; };
    long long ec = extent(m, n, ldc);
    // Outputs one after another (strideC >= (n - 1) ldc + m), or interleaved
    // within each column (strideC >= m and all of them inside ldc).
    bool apart = sc >= ec || (sc >= m && (long long)(batch - 1) * sc + m <= ldc);
    if (batch > 1 && !apart) return fail(7, sc < 0 ? "negative output stride" : "the output matrices of the batch overlap");
    auto inside = [&](const void* p, long long stride, long long elems, size_t esize) {
        if (elems == 0) return true;
        long long lo = stride < 0 ? stride * (batch - 1) : 0, hi = (stride > 0 ? stride * (batch - 1) : 0) + elems;
        return simt_in_buffer((const char*)p + lo * (long long)esize, (size_t)(hi - lo) * esize) != 0;
    };
    if (k > 0 && !inside(A, sa, extent(arows, acols, lda), atype == 0 ? 4 : 2)) return fail(7, "A is not inside one live device allocation");
    if (k > 0 && !inside(B, sb, extent(brows, bcols, ldb), btype == 0 ? 4 : 2)) return fail(7, "B is not inside one live device allocation");
    if (!inside(C, sc, ec, 4)) return fail(7, "C is not inside one live device allocation");
    return 0;
}

int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta, float* C,
                   int ldc) {
    if (int r = check_gemm("cublasSgemm", ta, tb, m, n, k, A, 0, lda, 0, B, 0, ldb, 0, C, 0, ldc, 0, 1, 68)) return r;
    float al = *alpha, be = *beta;
    return on_stream(h, gemm_spans(ta, tb, m, n, k, A, 0, lda, 0, B, 0, ldb, 0, C, ldc, 0, 1, be),
                     [=]() { return gemm(ta, tb, m, n, k, al, A, 0, lda, B, 0, ldb, be, C, ldc); });
}

int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int atype, int lda, const void* B, int btype, int ldb,
                 const void* beta, void* C, int ctype, int ldc, int compute, int) {
    if (int r = check_gemm("cublasGemmEx", ta, tb, m, n, k, A, atype, lda, 0, B, btype, ldb, 0, C, ctype, ldc, 0, 1, compute)) return r;
    float al = *(const float*)alpha, be = *(const float*)beta;
    return on_stream(h, gemm_spans(ta, tb, m, n, k, A, atype, lda, 0, B, btype, ldb, 0, C, ldc, 0, 1, be),
                     [=]() { return gemm(ta, tb, m, n, k, al, A, atype, lda, B, btype, ldb, be, (float*)C, ldc); });
}

int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int atype, int lda, long long sa, const void* B,
                               int btype, int ldb, long long sb, const void* beta, void* C, int ctype, int ldc, long long sc, int batch, int compute, int) {
    if (int r = check_gemm("cublasGemmStridedBatchedEx", ta, tb, m, n, k, A, atype, lda, sa, B, btype, ldb, sb, C, ctype, ldc, sc, batch, compute)) return r;
    float al = *(const float*)alpha, be = *(const float*)beta;
    return on_stream(h, gemm_spans(ta, tb, m, n, k, A, atype, lda, sa, B, btype, ldb, sb, C, ldc, sc, batch, be), [=]() {
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
