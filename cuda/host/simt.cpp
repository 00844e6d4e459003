// The scheduler of the host SIMT emulator (see simt.h): blocks run one after
// the other; a block's threads are fibers switched at barriers and warp
// collectives; CUDA's synchronisation rules are checked at every switch.
// Entry points (C ABI, called from tests/common/simt.rs):
//   simt_launch   runs one kernel launch (grid, block, a callback that calls the
//                 kernel with its arguments); returns 0, or 1 with a message.
//   simt_alloc / simt_free   buffers that end at a guard page.
#include "simt.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

extern "C" {
simt_dim3 simt_threadIdx, simt_blockIdx, simt_blockDim, simt_gridDim;
void simt_switch(void** save_sp, void* load_sp);
}

// Saves the callee-saved registers of the System V x86-64 ABI on the current
// stack, stores the stack pointer into *save_sp, loads load_sp and restores
// the registers saved there. No signal mask is touched (ucontext's
// swapcontext makes a system call per switch; a kernel test makes millions).
#if defined(__x86_64__)
asm(R"(
    .pushsection .text
    .globl simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch
    .popsection
)");
#else
#error "the host SIMT emulator switches fibers with x86-64 assembly"
#endif

namespace {

enum State { RUN, AT_WARP, AT_BLOCK, DONE };

struct Fiber {
    void* sp = nullptr;
    State st = DONE;
    simt_dim3 tid;
};

constexpr size_t kStack = 256 * 1024;
const size_t kPage = (size_t)sysconf(_SC_PAGESIZE);

std::mutex g_launch;  // one launch at a time: shared memory is static
std::vector<Fiber> g_fibers;
std::vector<char*> g_stacks;   // usable top of each fiber's stack
std::vector<uint64_t> g_slots;  // 32 per warp
std::vector<unsigned> g_scratch;  // 32 x 16 per warp
void* g_sched_sp = nullptr;
int g_cur = -1;
void (*g_entry)(void*) = nullptr;
void* g_ctx = nullptr;
const char* g_kernel = "";
bool g_abort = false;
std::string g_error;

std::string where(int t) {
    char b[160];
    const simt_dim3& i = g_fibers[t].tid;
    std::snprintf(b, sizeof b, "%s: block (%u, %u, %u) thread (%u, %u, %u)", g_kernel, simt_blockIdx.x, simt_blockIdx.y, simt_blockIdx.z, i.x, i.y, i.z);
    return b;
}

[[noreturn]] void fiber_main() {
    g_entry(g_ctx);
    g_fibers[g_cur].st = DONE;
    simt_switch(&g_fibers[g_cur].sp, g_sched_sp);
    __builtin_unreachable();
}

// A fresh stack whose first switch-in "returns" into fiber_main with the
// alignment of a call (rsp = 8 mod 16 at entry).
void* fresh_stack(char* top) {
    uintptr_t t = (uintptr_t)top & ~(uintptr_t)15;
    void** sp = (void**)t;
    *--sp = nullptr;                    // fiber_main's return address: never used
    *--sp = (void*)&fiber_main;         // popped by simt_switch's ret
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12..r15
    return sp;
}

void ensure_fibers(size_t n) {
    while (g_stacks.size() < n) {
        // Stack with a guard page below it: an overflow faults instead of
        // corrupting the neighbour.
        size_t len = kStack + kPage;
        void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "simt: cannot map a fiber stack\n");
            std::abort();
        }
        mprotect(m, kPage, PROT_NONE);
        g_stacks.push_back((char*)m + len);
    }
    if (g_fibers.size() < n) g_fibers.resize(n);
    size_t warps = (n + 31) / 32;
    if (g_slots.size() < warps * 32) g_slots.resize(warps * 32);
    if (g_scratch.size() < warps * 32 * 16) g_scratch.resize(warps * 32 * 16);
}

// Guard-page buffers and the fault handler that names the kernel.
struct Region {
    char* base;
    size_t len;
    char* user;
};
std::mutex g_regions_lock;
std::vector<Region> g_regions;
struct sigaction g_prev_segv;
bool g_handler = false;
volatile sig_atomic_t g_in_kernel = 0;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    char* a = (char*)info->si_addr;
    bool guard = false;
    for (const Region& r : g_regions)
        if (a >= r.base && a < r.base + r.len) guard = true;
    if (guard && g_in_kernel) {
        char msg[256];
        int n = std::snprintf(msg, sizeof msg, "simt: kernel %s touched memory outside its buffers (a guard page) in block (%u, %u, %u) thread (%u, %u, %u)\n", g_kernel,
                              simt_blockIdx.x, simt_blockIdx.y, simt_blockIdx.z, simt_threadIdx.x, simt_threadIdx.y, simt_threadIdx.z);
        if (n > 0) (void)!write(2, msg, (size_t)n);
        _exit(86);
    }
    // Not ours: put the previous handler back; the fault repeats into it.
    sigaction(SIGSEGV, &g_prev_segv, nullptr);
    (void)sig;
    (void)uctx;
}

void install_handler() {
    if (g_handler) return;
    static char alt[64 * 1024];
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
    g_handler = true;
}

// Runs one block to completion; false (with g_error) on a broken rule.
bool run_block(unsigned n) {
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = g_fibers[t];
        f.tid.x = t % simt_blockDim.x;
        f.tid.y = (t / simt_blockDim.x) % simt_blockDim.y;
        f.tid.z = t / (simt_blockDim.x * simt_blockDim.y);
        f.st = RUN;
        f.sp = fresh_stack(g_stacks[t]);
    }
    for (;;) {
        for (unsigned t = 0; t < n; ++t) {
            if (g_fibers[t].st != RUN) continue;
            g_cur = (int)t;
            simt_threadIdx = g_fibers[t].tid;
            simt_switch(&g_sched_sp, g_fibers[t].sp);
            if (g_abort) return false;
        }
        // Every live thread now waits at a barrier (or all are done).
        bool released = false, live = false;
        for (unsigned w = 0; w * 32 < n; ++w) {
            unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
            unsigned waiting = 0, done = 0;
            for (unsigned t = lo; t < hi; ++t) {
                waiting += g_fibers[t].st == AT_WARP;
                done += g_fibers[t].st == DONE;
            }
            live |= done < hi - lo;
            if (waiting > 0 && waiting + done == hi - lo) {
                if (done > 0) {
                    unsigned t = lo;
                    while (g_fibers[t].st != AT_WARP) ++t;
                    g_error = where((int)t) + ": a full-mask warp collective / __syncwarp while " + std::to_string(done) + " lane(s) of its warp have exited";
                    return false;
                }
                for (unsigned t = lo; t < hi; ++t) g_fibers[t].st = RUN;
                released = true;
            }
        }
        if (!live) return true;
        if (released) continue;
        bool all_block = true;
        for (unsigned t = 0; t < n; ++t) all_block &= g_fibers[t].st == AT_BLOCK || g_fibers[t].st == DONE;
        if (all_block) {
            for (unsigned t = 0; t < n; ++t)
                if (g_fibers[t].st == AT_BLOCK) g_fibers[t].st = RUN;
            continue;
        }
        // Deadlock: some threads wait at __syncthreads, others of their warp at
        // a warp collective: a barrier in divergent code.
        int tw = -1, tb = -1;
        for (unsigned t = 0; t < n; ++t) {
            if (g_fibers[t].st == AT_WARP && tw < 0) tw = (int)t;
            if (g_fibers[t].st == AT_BLOCK && tb < 0) tb = (int)t;
        }
        g_error = "divergent barrier: " + where(tw) + " waits at a warp collective while " + where(tb) + " waits at __syncthreads";
        return false;
    }
}

}  // namespace

extern "C" {

void simt_wait(int kind, unsigned mask) {
    if (mask != 0xffffffffu) {
        g_error = where(g_cur) + ": warp collectives with a partial mask are not emulated";
        g_abort = true;
    } else {
        g_fibers[g_cur].st = kind == 1 ? AT_WARP : AT_BLOCK;
    }
    simt_switch(&g_fibers[g_cur].sp, g_sched_sp);
}

uint64_t* simt_warp_slots() {
    unsigned t = simt_threadIdx.x + simt_blockDim.x * (simt_threadIdx.y + simt_blockDim.y * simt_threadIdx.z);
    return &g_slots[(t / 32) * 32];
}

unsigned int* simt_warp_scratch() {
    unsigned t = simt_threadIdx.x + simt_blockDim.x * (simt_threadIdx.y + simt_blockDim.y * simt_threadIdx.z);
    return &g_scratch[(t / 32) * 32 * 16];
}

int simt_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, void (*entry)(void*), void* ctx, char* err,
                size_t errlen) {
    std::lock_guard<std::mutex> lock(g_launch);
    install_handler();
    g_kernel = kernel;
    g_error.clear();
    g_abort = false;
    unsigned n = bx * by * bz;
    bool ok = true;
    if (n == 0 || n > 1024 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) {
        g_error = std::string(kernel) + ": invalid launch configuration (grid " + std::to_string(gx) + "x" + std::to_string(gy) + "x" + std::to_string(gz) + ", block " +
                  std::to_string(bx) + "x" + std::to_string(by) + "x" + std::to_string(bz) + ")";
        ok = false;
    }
    if (ok) {
        ensure_fibers(n);
        g_entry = entry;
        g_ctx = ctx;
        simt_gridDim = {gx, gy, gz};
        simt_blockDim = {bx, by, bz};
        g_in_kernel = 1;
        for (unsigned z = 0; ok && z < gz; ++z)
            for (unsigned y = 0; ok && y < gy; ++y)
                for (unsigned x = 0; ok && x < gx; ++x) {
                    simt_blockIdx = {x, y, z};
                    ok = run_block(n);
                }
        g_in_kernel = 0;
    }
    if (!ok && err && errlen) std::snprintf(err, errlen, "%s", g_error.c_str());
    return ok ? 0 : 1;
}

// `bytes` of memory whose end touches a guard page (start aligned to `align`).
void* simt_alloc(size_t bytes, size_t align) {
    size_t body = (bytes + kPage - 1) / kPage * kPage;
    if (body == 0) body = kPage;
    size_t len = body + 2 * kPage;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    char* base = (char*)m;
    mprotect(base, kPage, PROT_NONE);
    mprotect(base + kPage + body, kPage, PROT_NONE);
    char* end = base + kPage + body;
    char* user = (char*)((uintptr_t)(end - bytes) & ~(uintptr_t)(align ? align - 1 : 0));
    std::lock_guard<std::mutex> lock(g_regions_lock);
    g_regions.push_back({base, kPage, user});
    g_regions.push_back({end, kPage, user});
    return user;
}

void simt_free(void* p) {
    std::lock_guard<std::mutex> lock(g_regions_lock);
    for (size_t i = 0; i < g_regions.size(); ++i) {
        if (g_regions[i].user == p) {
            char* base = g_regions[i].base;
            char* end = g_regions[i + 1].base;
            munmap(base, (size_t)(end - base) + kPage);
            g_regions.erase(g_regions.begin() + (long)i, g_regions.begin() + (long)i + 2);
            return;
        }
    }
}

}  // extern "C"
