// The scheduler of the host SIMT emulator (see simt.h): blocks run one after
// the other; a block's threads are fibers switched at barriers and warp
// collectives; CUDA's synchronisation rules are checked at every switch.
// Entry points (C ABI, called from tests/simt/mod.rs and fake_driver.cpp):
//   simt_launch   runs one kernel launch (grid, block, a callback that calls the
//                 kernel with its arguments, whether the kernel is free of
//                 barriers and warp collectives); returns 0, or 1 with a message.
//   simt_alloc / simt_free   buffers that end at a guard page.
//   simt_configure   the sanitizer on or off, how many thread schedules each
//                 launch runs (1: natural order; 2: + reversed; 3: + a seeded
//                 shuffle), the shuffle's seed.
//   __tsan_read*/__tsan_write*   the sanitizer's hooks, called by the kernels
//                 when they are compiled with -fsanitize=thread (see simt.h).
//
// Racecheck. Time inside a block is cut into intervals by __syncthreads (a
// global counter, g_iv, never reset, so a block's first interval is larger than
// every interval of earlier blocks); inside a warp, __syncwarp and the
// shuffle / vote collectives advance the warp's own epoch. Two accesses to one
// shared byte are ordered when they come from the same thread, from different
// intervals, or from one warp with a warp epoch between them; otherwise, when
// one of them writes and they are not both atomics, it is a race. Each shared
// byte keeps its last write and its last two distinct readers of the current
// interval (a third unordered reader can hide behind them only when both
// others are ordered with the writer: a known blind spot). Initcheck: a read
// of a shared byte whose last write is older than the block's first interval.
// Global memory: per launch, each byte written remembers the first block that
// wrote it (and its value before the launch); another block writing it, or
// reading it, without both being atomics, is a race across blocks.
//
// Not seen: threads of one block racing on global memory (only the order of
// their last stores shows, through the schedules below; a read-modify-write
// `y[i] += v` without atomics by two threads of one block is not caught, as
// fibers never switch between its load and store).
//
// Schedules. The scheduler runs the live threads of a block one after the
// other until each reaches a barrier; the order decides which of two racing
// accesses comes first. The blocks of a launch run in linear order, then
// reversed, then shuffled, so a block reading what a later block writes is
// caught by the read check of the global shadow. With schedules > 1 every launch runs again in reverse
// order (and a shuffled order, drawn anew at every interval) after the bytes
// it wrote are put back, and a launch without atomics must write the same
// bytes with the same values each time.
#include "simt.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

extern "C" {
simt_dim3 simt_threadIdx, simt_blockIdx, simt_blockDim, simt_gridDim;
void simt_switch(void** save_sp, void* load_sp);
// The section of every __shared__ array (simt.h); the linker defines these.
extern char __start_simt_shared[] __attribute__((weak));
extern char __stop_simt_shared[] __attribute__((weak));
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
    int wait_kind = 0;  // at AT_WARP: 1 orders memory (syncwarp, shuffles), 3 does not (mma)
    simt_dim3 tid;
};

constexpr size_t kStack = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;
const size_t kPage = (size_t)sysconf(_SC_PAGESIZE);

std::mutex g_launch;  // one launch at a time: shared memory is static
std::vector<Fiber> g_fibers;
char* g_stacks_lo = nullptr;  // every fiber stack, one reservation
char* g_stacks_hi = nullptr;
std::vector<uint64_t> g_slots;  // 32 per warp
std::vector<unsigned> g_scratch;  // 32 x 16 per warp
void* g_sched_sp = nullptr;
int g_cur = -1;
void (*g_entry)(void*) = nullptr;
void* g_ctx = nullptr;
const char* g_kernel = "";
bool g_abort = false;
std::string g_error;
// Direct mode (no sanitizer, one schedule, a kernel that the kernel table
// marks free of barriers and warp collectives, see tests/simt/mod.rs): a
// block's threads run one after the other to completion in a loop on one
// fiber, natural order, as the fiber scheduler would run them (no barrier
// ever switches), without two switches and a fresh stack per thread (those
// were 40 % of the emulated training step). A barrier reached in this mode
// fails the launch: the table's source scan was wrong.
bool g_direct = false;
unsigned g_direct_n = 0;
volatile sig_atomic_t g_in_kernel = 0;  // a block's threads are running

// Configuration (simt_configure).
bool g_checks = true;
int g_schedules = 1;
uint64_t g_seed = 0x5eed;

// Schedule of the current run: 0 natural, 1 reversed, 2 shuffled.
int g_sched = 0;
uint64_t g_rng = 0;
uint64_t g_launch_no = 0;
std::vector<unsigned> g_order;

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

const char* sched_name(int s) { return s == 0 ? "natural" : s == 1 ? "reversed" : "shuffled"; }

std::string tid_str(unsigned t) {
    unsigned x = t % simt_blockDim.x, y = (t / simt_blockDim.x) % simt_blockDim.y, z = t / (simt_blockDim.x * simt_blockDim.y);
    return "(" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")";
}

std::string block_str() {
    return "block (" + std::to_string(simt_blockIdx.x) + ", " + std::to_string(simt_blockIdx.y) + ", " + std::to_string(simt_blockIdx.z) + ")";
}

std::string where(int t) {
    char b[160];
    const simt_dim3& i = g_fibers[t].tid;
    std::snprintf(b, sizeof b, "%s: block (%u, %u, %u) thread (%u, %u, %u)", g_kernel, simt_blockIdx.x, simt_blockIdx.y, simt_blockIdx.z, i.x, i.y, i.z);
    return b;
}

// ---- source lines and shared-array names, for the reports (slow; errors only)

std::string run_tool(const std::string& cmd) {
    std::string out;
    if (FILE* f = popen(cmd.c_str(), "r")) {
        char buf[512];
        while (std::fgets(buf, sizeof buf, f)) out += buf;
        pclose(f);
    }
    return out;
}

// "file.cu:line" of a code address inside the library (the instruction after
// the sanitizer's call), through addr2line; the raw offset if that fails.
std::string source_of(const void* pc) {
    Dl_info info{};
    if (!pc || !dladdr(pc, &info) || !info.dli_fname) return "?";
    uintptr_t off = (uintptr_t)pc - (uintptr_t)info.dli_fbase - 1;
    char hex[32];
    std::snprintf(hex, sizeof hex, "0x%lx", (unsigned long)off);
    std::string out = run_tool(std::string("addr2line -e '") + info.dli_fname + "' " + hex + " 2>/dev/null");
    size_t nl = out.find('\n');
    if (nl != std::string::npos) out.resize(nl);
    size_t slash = out.rfind('/');
    if (slash != std::string::npos) out = out.substr(slash + 1);
    if (out.empty() || out[0] == '?') return std::string("library offset ") + hex;
    return out;
}

// "kernel::array + offset" for a shared address: the static's symbol, from nm.
std::string shared_name(const char* a) {
    Dl_info info{};
    char off_s[64];
    std::snprintf(off_s, sizeof off_s, "simt_shared + %ld", (long)(a - __start_simt_shared));
    if (!dladdr(a, &info) || !info.dli_fname) return off_s;
    uintptr_t off = (uintptr_t)a - (uintptr_t)info.dli_fbase;
    std::string table = run_tool(std::string("nm -C -S --defined-only '") + info.dli_fname + "' 2>/dev/null");
    size_t pos = 0;
    while (pos < table.size()) {
        size_t nl = table.find('\n', pos);
        if (nl == std::string::npos) nl = table.size();
        std::string line = table.substr(pos, nl - pos);
        pos = nl + 1;
        unsigned long addr = 0, size = 0;
        char type = 0;
        int used = 0;
        if (std::sscanf(line.c_str(), "%lx %lx %c %n", &addr, &size, &type, &used) >= 3 && off >= addr && off < addr + size) {
            return line.substr((size_t)used) + " + " + std::to_string(off - addr) + " bytes";
        }
    }
    return off_s;
}

// ---- racecheck and initcheck state

// Interval and warp epochs are 32-bit (the shadow of a shared byte stays
// small: it is read and written on every access); at 2^31 the shadow and the
// counters start over (begin_block).
uint32_t g_iv = 1;        // current barrier interval (global across blocks and launches)
uint32_t g_block_iv = 1;  // the first interval of the running block
std::vector<uint32_t> g_wep;  // epoch of each warp: advanced by __syncwarp / collectives
uintptr_t g_code_base = 0;    // access sites are kept as 32-bit offsets from here

struct Acc {
    uint32_t iv = 0, wep = 0;
    uint16_t tid = 0;
    uint16_t atomic = 0;
    uint32_t pc = 0;  // the access site, relative to g_code_base
};
struct ShByte {
    Acc w, r1, r2;
};
std::vector<ShByte> g_shadow;  // one per byte of the simt_shared section

// Global memory written in the running launch, per page.
struct GPage {
    uint32_t who[4096];     // 0: not written in this launch; else the writer block + 1
    uint8_t atomic[4096];   // every write to it so far was an atomic
    uint8_t orig[4096];     // the value before the launch
};
std::unordered_map<uintptr_t, GPage*> g_pages;
std::vector<GPage*> g_free_pages;
// Direct-mapped cache of page lookups, misses included (most reads are of
// pages the launch never writes): a hash lookup per access would dominate.
struct PageSlot {
    uintptr_t key = ~(uintptr_t)0;
    GPage* page = nullptr;
};
PageSlot g_page_cache[256];
bool g_launch_atomics = false;

// Stops the running thread with an error: the block is abandoned, the launch fails.
void fail(const std::string& msg) {
    if (!g_abort) {
        g_error = msg;
        g_abort = true;
    }
    simt_switch(&g_fibers[g_cur].sp, g_sched_sp);
    __builtin_unreachable();
}

uint32_t pc_off(const void* pc) { return (uint32_t)((uintptr_t)pc - g_code_base); }
const void* pc_of(uint32_t off) { return off ? (const void*)(g_code_base + off) : nullptr; }

bool ordered(const Acc& p, const Acc& c) {
    if (p.iv != c.iv || p.tid == c.tid) return true;
    return p.tid / 32 == c.tid / 32 && p.wep != c.wep;
}

const char* verb(bool write, bool atomic) { return atomic ? "atomically updated" : write ? "wrote" : "read"; }

[[noreturn]] void shared_race(const char* a, const Acc& p, bool p_write, const Acc& c, bool c_write) {
    std::string msg = std::string("racecheck: ") + g_kernel + ": " + block_str() + ": thread " + tid_str(p.tid) + " " + verb(p_write, p.atomic) + " shared " +
                      shared_name(a) + " (" + source_of(pc_of(p.pc)) + ") and thread " + tid_str(c.tid) + " " + verb(c_write, c.atomic) + " it (" + source_of(pc_of(c.pc)) +
                      ") with no __syncthreads between" + (p.tid / 32 == c.tid / 32 ? " (same warp: no __syncwarp either)" : "") + "; schedule " +
                      sched_name(g_sched);
    fail(msg);
    __builtin_unreachable();
}

void shared_access(char* a, size_t n, bool write, bool atomic, const void* pc) {
    const unsigned tid = (unsigned)g_cur;
    const Acc c{g_iv, g_wep[tid / 32], (uint16_t)tid, (uint16_t)(atomic ? 1 : 0), pc_off(pc)};
    if (a + n > __stop_simt_shared) n = (size_t)(__stop_simt_shared - a);
    ShByte* sh = &g_shadow[(size_t)(a - __start_simt_shared)];
    for (size_t i = 0; i < n; ++i) {
        ShByte& s = sh[i];
        if ((!write || atomic) && s.w.iv < g_block_iv) {
            fail(std::string("initcheck: ") + g_kernel + ": " + block_str() + ": thread " + tid_str(tid) + " " + verb(write, atomic) + " shared " + shared_name(a + i) +
                 " (" + source_of(pc) + ") that no thread of the block wrote (shared memory starts undefined in every block)");
        }
        if (s.w.iv == c.iv && !ordered(s.w, c) && !(s.w.atomic && atomic)) shared_race(a + i, s.w, true, c, write);
        if (write) {
            if (s.r1.iv == c.iv && !ordered(s.r1, c) && !(s.r1.atomic && atomic)) shared_race(a + i, s.r1, false, c, true);
            if (s.r2.iv == c.iv && !ordered(s.r2, c) && !(s.r2.atomic && atomic)) shared_race(a + i, s.r2, false, c, true);
            s.w = c;
        } else if (s.r1.iv == c.iv && s.r1.tid == tid) {
            s.r1.wep = c.wep;  // the latest epoch decides ordering with a later write
            s.r1.pc = c.pc;
        } else if (s.r1.iv != c.iv) {
            s.r1 = c;
            s.r2 = Acc{};
        } else {
            s.r2 = s.r1;
            s.r1 = c;
        }
    }
}

std::string global_name(uintptr_t a);

GPage* page_of(uintptr_t key, bool create) {
    PageSlot& slot = g_page_cache[key & 255];
    if (slot.key == key && (slot.page || !create)) return slot.page;
    auto it = g_pages.find(key);
    GPage* p = nullptr;
    if (it != g_pages.end()) {
        p = it->second;
    } else if (create) {
        if (g_free_pages.empty()) {
            p = new GPage;
        } else {
            p = g_free_pages.back();
            g_free_pages.pop_back();
        }
        std::memset(p->who, 0, sizeof p->who);
        g_pages.emplace(key, p);
    }
    slot.key = key;
    slot.page = p;
    return p;
}

void global_access(uintptr_t a, size_t n, bool write, bool atomic, const void* pc) {
    if (!write && g_pages.empty()) return;
    if (atomic) g_launch_atomics = true;
    const uint32_t me = 1 + simt_blockIdx.x + simt_gridDim.x * (simt_blockIdx.y + simt_gridDim.y * simt_blockIdx.z);
    GPage* p = nullptr;
    uintptr_t key = ~(uintptr_t)0;
    for (size_t i = 0; i < n; ++i) {
        uintptr_t b = a + i;
        if (b >> 12 != key) {
            key = b >> 12;
            p = page_of(key, write);
        }
        if (!p) continue;  // nothing on this page was written in this launch
        size_t k = b & 4095;
        uint32_t who = p->who[k];
        if (who == me) {
            if (write && !atomic) p->atomic[k] = 0;
        } else if (who == 0) {
            if (!write) continue;
            p->orig[k] = *(const uint8_t*)b;
            p->who[k] = me;
            p->atomic[k] = atomic;
        } else if (!(atomic && p->atomic[k])) {
            uint32_t o = who - 1;
            unsigned ox = o % simt_gridDim.x, oy = (o / simt_gridDim.x) % simt_gridDim.y, oz = o / (simt_gridDim.x * simt_gridDim.y);
            fail(std::string("racecheck: ") + g_kernel + ": block (" + std::to_string(ox) + ", " + std::to_string(oy) + ", " + std::to_string(oz) + ") " +
                 (p->atomic[k] ? "atomically updated" : "wrote") + " global " + global_name(b) + " and " + block_str() + " thread " + tid_str((unsigned)g_cur) +
                 " " + verb(write, atomic) + " it (" + source_of(pc) + ") in the same launch" + (write ? " without atomics" : "") + "; schedule " +
                 sched_name(g_sched));
        }
    }
}

// ---- footprints: for the driver's stream-order check (fake_driver.cpp), the
// bytes of each device buffer the running launch read and wrote, as covers
// (lowest to highest byte; an atomic counts as both). Checked builds only:
// the accesses are seen through the same hooks.
struct Foot {
    uintptr_t lo, hi;    // the buffer
    uintptr_t rlo, rhi;  // read: [rlo, rhi), empty when rlo >= rhi
    uintptr_t wlo, whi;  // written
};
std::vector<Foot> g_feet;
// Direct-mapped cache of 4 KB pages: the page's footprint (an index into
// g_feet), or -1 for a page no buffer overlaps (a __constant__ table, ...).
// Each buffer has pages of its own (simt_alloc), so a page maps to one.
struct FootSlot {
    uintptr_t page = ~(uintptr_t)0;
    long idx = -1;
};
FootSlot g_foot_cache[256];
long find_foot(uintptr_t a, bool* page_free);

inline void foot_access(uintptr_t a, size_t n, bool write, bool atomic) {
    FootSlot& slot = g_foot_cache[(a >> 12) & 255];
    long idx = slot.idx;
    if (slot.page != a >> 12 || (idx >= 0 && (a < g_feet[(size_t)idx].lo || a >= g_feet[(size_t)idx].hi))) {
        bool page_free = false;
        idx = find_foot(a, &page_free);
        if (idx >= 0 || page_free) slot = FootSlot{a >> 12, idx};
    }
    if (idx < 0) return;  // not device memory
    Foot* f = &g_feet[(size_t)idx];
    uintptr_t e = a + n;
    if (write || atomic) {
        if (a < f->wlo) f->wlo = a;
        if (e > f->whi) f->whi = e;
    }
    if (!write || atomic) {
        if (a < f->rlo) f->rlo = a;
        if (e > f->rhi) f->rhi = e;
    }
}

inline void check(void* addr, size_t n, bool write, bool atomic, const void* pc) {
    if (!g_in_kernel || !g_checks || g_abort) return;
    char* a = (char*)addr;
    if (a >= __start_simt_shared && a < __stop_simt_shared) {
        shared_access(a, n, write, atomic, pc);
    } else if (a >= g_stacks_lo && a < g_stacks_hi) {
        return;  // a thread's own locals
    } else {
        foot_access((uintptr_t)a, n, write, atomic);
        global_access((uintptr_t)a, n, write, atomic, pc);
    }
}

// What the first schedule wrote: per page, which bytes and their values.
struct Snap {
    uint8_t mask[4096];
    uint8_t val[4096];
};
std::unordered_map<uintptr_t, Snap> g_snap;

void take_snapshot() {
    g_snap.clear();
    for (auto& [key, p] : g_pages) {
        Snap& s = g_snap[key];
        const uint8_t* mem = (const uint8_t*)(key << 12);
        for (size_t k = 0; k < 4096; ++k) {
            s.mask[k] = p->who[k] != 0;
            s.val[k] = s.mask[k] ? mem[k] : 0;
        }
    }
}

// "" when this schedule wrote the same bytes with the same values as the
// first; else where they differ.
std::string diff_snapshot() {
    char b[200];
    for (auto& [key, p] : g_pages) {
        auto it = g_snap.find(key);
        const uint8_t* mem = (const uint8_t*)(key << 12);
        for (size_t k = 0; k < 4096; ++k) {
            bool now = p->who[k] != 0, then = it != g_snap.end() && it->second.mask[k];
            if (now != then || (now && mem[k] != it->second.val[k])) {
                uintptr_t a = (key << 12) | k;
                if (now && then)
                    std::snprintf(b, sizeof b, "%s is 0x%02x after the natural order, 0x%02x", global_name(a).c_str(), it->second.val[k], mem[k]);
                else
                    std::snprintf(b, sizeof b, "%s was written %s the natural order but %s", global_name(a).c_str(), then ? "in" : "not in", now ? "now" : "not now");
                return b;
            }
        }
    }
    for (auto& [key, snap] : g_snap) {
        if (g_pages.count(key)) continue;
        for (size_t k = 0; k < 4096; ++k)
            if (snap.mask[k]) {
                std::snprintf(b, sizeof b, "%s was written in the natural order but not now", global_name((key << 12) | k).c_str());
                return b;
            }
    }
    return "";
}

// Puts back what the launch overwrote (before running it again).
void restore() {
    for (auto& kv : g_pages)
        for (size_t k = 0; k < 4096; ++k)
            if (kv.second->who[k]) *(uint8_t*)((kv.first << 12) | k) = kv.second->orig[k];
}

void clear_pages() {
    for (auto& kv : g_pages) g_free_pages.push_back(kv.second);
    g_pages.clear();
    for (PageSlot& s : g_page_cache) s = PageSlot{};
}

[[noreturn]] void fiber_main() {
    g_entry(g_ctx);
    g_fibers[g_cur].st = DONE;
    simt_switch(&g_fibers[g_cur].sp, g_sched_sp);
    __builtin_unreachable();
}

// Direct mode's one fiber: every thread of the block in natural order.
[[noreturn]] void fiber_direct_main() {
    for (unsigned t = 0; t < g_direct_n; ++t) {
        g_cur = (int)t;
        simt_threadIdx = {t % simt_blockDim.x, (t / simt_blockDim.x) % simt_blockDim.y, t / (simt_blockDim.x * simt_blockDim.y)};
        g_entry(g_ctx);
        g_fibers[t].st = DONE;
    }
    simt_switch(&g_fibers[0].sp, g_sched_sp);
    __builtin_unreachable();
}

// A fresh stack whose first switch-in "returns" into `main` with the
// alignment of a call (rsp = 8 mod 16 at entry).
void* fresh_stack(char* top, void (*main)() = &fiber_main) {
    uintptr_t t = (uintptr_t)top & ~(uintptr_t)15;
    void** sp = (void**)t;
    *--sp = nullptr;                    // main's return address: never used
    *--sp = (void*)main;                // popped by simt_switch's ret
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12..r15
    return sp;
}

char* stack_top(unsigned t) { return g_stacks_lo + (size_t)(t + 1) * (kStack + kPage); }

void ensure_fibers(size_t n) {
    if (!g_stacks_lo) {
        // Every stack in one reservation (so the sanitizer tells a thread's
        // locals from global memory with one range test), each with a guard
        // page below it: an overflow faults instead of corrupting the neighbour.
        size_t len = kMaxThreads * (kStack + kPage);
        void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "simt: cannot map the fiber stacks\n");
            std::abort();
        }
        g_stacks_lo = (char*)m;
        g_stacks_hi = g_stacks_lo + len;
        for (unsigned t = 0; t < kMaxThreads; ++t) mprotect(g_stacks_lo + (size_t)t * (kStack + kPage), kPage, PROT_NONE);
        g_shadow.resize((size_t)(__stop_simt_shared - __start_simt_shared));
        Dl_info info{};
        if (dladdr((void*)&fresh_stack, &info)) g_code_base = (uintptr_t)info.dli_fbase;
    }
    if (g_fibers.size() < n) g_fibers.resize(n);
    size_t warps = (n + 31) / 32;
    if (g_slots.size() < warps * 32) g_slots.resize(warps * 32);
    if (g_scratch.size() < warps * 32 * 16) g_scratch.resize(warps * 32 * 16);
    if (g_wep.size() < warps) g_wep.resize(warps, 1);
}

// Guard-page buffers and the fault handler that names the kernel.
struct Region {
    char* base;
    size_t len;
    char* user;
};
std::mutex g_regions_lock;
std::vector<Region> g_regions;
std::vector<std::pair<char*, size_t>> g_buffers;  // (user pointer, bytes) of live buffers
struct sigaction g_prev_segv;
bool g_handler = false;

// The footprint of the buffer holding a (made at its first access), or -1;
// *page_free: no buffer overlaps a's page.
long find_foot(uintptr_t a, bool* page_free) {
    for (size_t i = 0; i < g_feet.size(); ++i)
        if (a >= g_feet[i].lo && a < g_feet[i].hi) return (long)i;
    std::lock_guard<std::mutex> lock(g_regions_lock);
    uintptr_t pg = a & ~(uintptr_t)4095;
    *page_free = true;
    for (auto& [p, len] : g_buffers) {
        uintptr_t lo = (uintptr_t)p;
        if (a >= lo && a < lo + len) {
            g_feet.push_back(Foot{lo, lo + len, ~(uintptr_t)0, 0, ~(uintptr_t)0, 0});
            return (long)g_feet.size() - 1;
        }
        if (lo < pg + 4096 && lo + len > pg) *page_free = false;
    }
    return -1;
}

std::string global_name(uintptr_t a) {
    char b[96];
    for (auto& [p, len] : g_buffers) {
        if (a >= (uintptr_t)p && a < (uintptr_t)p + len) {
            std::snprintf(b, sizeof b, "byte %lu of the buffer at %p (%zu bytes)", (unsigned long)(a - (uintptr_t)p), (void*)p, len);
            return b;
        }
    }
    std::snprintf(b, sizeof b, "address %p", (void*)a);
    return b;
}

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

// The order in which the scheduler runs the threads of the next interval.
void next_order(unsigned n) {
    g_order.resize(n);
    for (unsigned t = 0; t < n; ++t) g_order[t] = g_sched == 1 ? n - 1 - t : t;
    if (g_sched == 2)
        for (unsigned t = n; t > 1; --t) std::swap(g_order[t - 1], g_order[splitmix(g_rng) % t]);
}

// Runs one block to completion; false (with g_error) on a broken rule.
bool run_block(unsigned n) {
    if (g_direct) {
        g_direct_n = n;
        simt_switch(&g_sched_sp, fresh_stack(stack_top(0), &fiber_direct_main));
        return !g_abort;
    }
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = g_fibers[t];
        f.tid.x = t % simt_blockDim.x;
        f.tid.y = (t / simt_blockDim.x) % simt_blockDim.y;
        f.tid.z = t / (simt_blockDim.x * simt_blockDim.y);
        f.st = RUN;
        f.sp = fresh_stack(stack_top(t));
    }
    // A new block: an interval later than any before, so nothing in shared
    // memory counts as written by it yet.
    if (g_iv > 0x7fffffffu) {
        std::fill(g_shadow.begin(), g_shadow.end(), ShByte{});
        std::fill(g_wep.begin(), g_wep.end(), 1u);
        g_iv = 1;
    }
    g_block_iv = ++g_iv;
    for (;;) {
        next_order(n);
        for (unsigned i = 0; i < n; ++i) {
            unsigned t = g_order[i];
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
                bool orders = false;
                for (unsigned t = lo; t < hi; ++t) {
                    orders |= g_fibers[t].wait_kind == 1;
                    g_fibers[t].st = RUN;
                }
                if (orders) ++g_wep[w];
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
            ++g_iv;  // __syncthreads: a new interval for the whole block
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

// Runs every block of the grid, one after the other: in linear order in the
// natural schedule, reversed in the reversed one, shuffled in the shuffled
// one, so that a block reading what another block of the launch writes is
// seen (the read check needs the writer to run first).
bool run_grid(unsigned gx, unsigned gy, unsigned gz, unsigned n) {
    uint64_t blocks = (uint64_t)gx * gy * gz;
    std::vector<uint64_t> order;
    if (g_sched == 2) {
        order.resize(blocks);
        for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
        for (uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[splitmix(g_rng) % i]);
    }
    for (uint64_t i = 0; i < blocks; ++i) {
        uint64_t b = g_sched == 0 ? i : g_sched == 1 ? blocks - 1 - i : order[i];
        simt_blockIdx = {(unsigned)(b % gx), (unsigned)(b / gx % gy), (unsigned)(b / ((uint64_t)gx * gy))};
        if (!run_block(n)) return false;
    }
    return true;
}

}  // namespace

extern "C" {

void simt_wait(int kind, unsigned mask) {
    unsigned n = simt_blockDim.x * simt_blockDim.y * simt_blockDim.z;
    unsigned lanes = n - (unsigned)g_cur / 32 * 32;
    if (g_direct) {
        // The direct fiber is abandoned where it stands, as an aborted
        // thread's fiber is.
        g_error = where(g_cur) + ": a barrier or warp collective in a kernel that the kernel table (tests/simt/mod.rs, kernel_table) marks free of them";
        g_abort = true;
        simt_switch(&g_fibers[0].sp, g_sched_sp);
        __builtin_unreachable();
    }
    if (mask != 0xffffffffu) {
        g_error = where(g_cur) + ": warp collectives with a partial mask are not emulated";
        g_abort = true;
    } else if (kind != 2 && lanes < 32) {
        // The mask names lanes that do not exist (a block that is not a
        // multiple of 32 threads): undefined on a GPU.
        g_error = where(g_cur) + ": a full-mask warp collective / __syncwarp in a warp of " + std::to_string(lanes) + " threads";
        g_abort = true;
    } else {
        g_fibers[g_cur].st = kind == 2 ? AT_BLOCK : AT_WARP;
        g_fibers[g_cur].wait_kind = kind;
    }
    simt_switch(&g_fibers[g_cur].sp, g_sched_sp);
}

void simt_atomic(void* p, unsigned bytes) {
    // Float atomics (shared or global) make a launch's result depend on the
    // order of its threads: such launches are exempt from the byte comparison.
    if (g_in_kernel) g_launch_atomics = true;
    check(p, bytes, true, true, __builtin_return_address(0));
}

// The sanitizer's hooks (the kernels are compiled with -fsanitize=thread).
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define SIMT_HOOKS(N)                                                                                    \
    void __tsan_read##N(void* p) { check(p, N, false, false, __builtin_return_address(0)); }            \
    void __tsan_write##N(void* p) { check(p, N, true, false, __builtin_return_address(0)); }            \
    void __tsan_unaligned_read##N(void* p) { check(p, N, false, false, __builtin_return_address(0)); }  \
    void __tsan_unaligned_write##N(void* p) { check(p, N, true, false, __builtin_return_address(0)); }
SIMT_HOOKS(1)
SIMT_HOOKS(2)
SIMT_HOOKS(4)
SIMT_HOOKS(8)
SIMT_HOOKS(16)
#undef SIMT_HOOKS
void __tsan_read_range(void* p, size_t n) { check(p, n, false, false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, size_t n) { check(p, n, true, false, __builtin_return_address(0)); }

void simt_configure(int checks, int schedules, unsigned long long seed) {
    std::lock_guard<std::mutex> lock(g_launch);
    g_checks = checks != 0;
    g_schedules = schedules < 1 ? 1 : schedules > 3 ? 3 : schedules;
    g_seed = seed;
}

uint64_t* simt_warp_slots() {
    unsigned t = simt_threadIdx.x + simt_blockDim.x * (simt_threadIdx.y + simt_blockDim.y * simt_threadIdx.z);
    return &g_slots[(t / 32) * 32];
}

unsigned int* simt_warp_scratch() {
    unsigned t = simt_threadIdx.x + simt_blockDim.x * (simt_threadIdx.y + simt_blockDim.y * simt_threadIdx.z);
    return &g_scratch[(t / 32) * 32 * 16];
}

int simt_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, void (*entry)(void*), void* ctx,
                int barrier_free, char* err, size_t errlen) {
    std::lock_guard<std::mutex> lock(g_launch);
    install_handler();
    g_kernel = kernel;
    g_error.clear();
    g_abort = false;
    g_feet.clear();
    for (FootSlot& f : g_foot_cache) f = FootSlot{};
    unsigned n = bx * by * bz;
    bool ok = true;
    if (n == 0 || n > kMaxThreads || bx > 1024 || by > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 ||
        gz > 65535) {
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
        ++g_launch_no;
        g_launch_atomics = false;
        // Without the sanitizer nothing records what a launch wrote, so it
        // cannot be put back and run again.
        int schedules = g_checks ? g_schedules : 1;
        g_direct = barrier_free != 0 && !g_checks;
        for (int s = 0; ok && s < schedules; ++s) {
            g_sched = s;
            g_rng = g_seed ^ (g_launch_no * 0x9e3779b97f4a7c15ull);
            g_in_kernel = 1;
            ok = run_grid(gx, gy, gz, n);
            g_in_kernel = 0;
            if (ok && schedules > 1) {
                if (s == 0) {
                    take_snapshot();
                } else if (!g_launch_atomics) {
                    // A kernel without atomics must not depend on the order of its threads.
                    std::string d = diff_snapshot();
                    if (!d.empty()) {
                        g_error = std::string("schedule: ") + kernel + " wrote different results when its threads ran in " + sched_name(s) + " order: " + d +
                                  " (a race the racecheck does not see: e.g. threads of one block storing different values to one global element)";
                        ok = false;
                    }
                }
                if (ok && s + 1 < schedules) restore();
            }
            clear_pages();
        }
        g_snap.clear();
        g_direct = false;
    }
    if (!ok && err && errlen) std::snprintf(err, errlen, "%s", g_error.c_str());
    return ok ? 0 : 1;
}

// What the last launch read and wrote of each device buffer (checked builds;
// none otherwise): *n covers of 6 values each (buffer start and end, read
// [lo, hi), written [lo, hi); an empty cover has lo >= hi).
const unsigned long long* simt_footprints(size_t* n) {
    static_assert(sizeof(Foot) == 6 * sizeof(unsigned long long), "Foot is six 64-bit values");
    *n = g_feet.size();
    return (const unsigned long long*)g_feet.data();
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
    // Alignment may leave a few bytes between the buffer and the guard page:
    // NaN bytes, so a read past the end that misses the guard is visible.
    std::memset(user + bytes, 0xff, (size_t)(end - (user + bytes)));
    std::lock_guard<std::mutex> lock(g_regions_lock);
    g_regions.push_back({base, kPage, user});
    g_regions.push_back({end, kPage, user});
    g_buffers.emplace_back(user, bytes);
    return user;
}

// 1 when p is the start of a live buffer.
int simt_is_buffer(const void* p) {
    std::lock_guard<std::mutex> lock(g_regions_lock);
    for (auto& [u, len] : g_buffers)
        if (u == p) return 1;
    return 0;
}

// 1 when [p, p + bytes) lies inside one live buffer.
int simt_in_buffer(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(g_regions_lock);
    uintptr_t a = (uintptr_t)p;
    for (auto& [u, len] : g_buffers)
        if (a >= (uintptr_t)u && a - (uintptr_t)u <= len && bytes <= len - (a - (uintptr_t)u)) return 1;
    return 0;
}

void simt_free(void* p) {
    std::lock_guard<std::mutex> lock(g_regions_lock);
    for (size_t i = 0; i < g_buffers.size(); ++i) {
        if (g_buffers[i].first == p) {
            g_buffers.erase(g_buffers.begin() + (long)i);
            break;
        }
    }
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
