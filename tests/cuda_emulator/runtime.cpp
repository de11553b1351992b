// The CUDA driver entry points the backend reaches through cudarc, run on the CPU, and the
// scheduler that runs a kernel's threads. See README.md for what this checks and what not.
//
// One device, one context, streams that run everything at once (synchronously), device
// memory that is host memory. A launch runs the grid's blocks one after another; a block's
// threads are fibers on the calling thread, switched only inside __syncthreads and warp
// shuffles, so a kernel's result never depends on how the host schedules threads.

#include "emu.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <vector>

EmuDim3 emu_thread_idx, emu_block_idx, emu_block_dim, emu_grid_dim;

typedef int CUresult;
enum : int {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_INVALID_DEVICE = 101,
    ERR_INVALID_IMAGE = 200,
    ERR_INVALID_HANDLE = 400,
    ERR_NOT_FOUND = 500,
    ERR_NOT_SUPPORTED = 801,
    ERR_CAPTURE_UNSUPPORTED = 900,
};

[[noreturn]] static void fail(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    std::fflush(stderr);
    std::abort();
}

// ---- kernel registry -------------------------------------------------------------------

static std::map<std::string, const EmuKernel*>& registry() {
    static std::map<std::string, const EmuKernel*> kernels;
    return kernels;
}

EmuKernel::EmuKernel(const char* n) : name(n) { registry()[n] = this; }

// ---- fibers ----------------------------------------------------------------------------
//
// emu_switch(save, next): saves the callee-saved registers and the FPU/SSE control words on
// the current stack, stores the stack pointer in *save, and continues on `next`'s stack.
// A new fiber's stack is laid out so that the first switch to it "returns" into
// emu_fiber_start, which calls r13(r12).
extern "C" void emu_switch(void** save, void* next);
extern "C" void emu_fiber_start();
// The MXCSR and x87 control words are not switched: every fiber runs with the defaults.
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch,@function
emu_switch:
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
    .size emu_switch, .-emu_switch
    .globl emu_fiber_start
    .type emu_fiber_start,@function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");

static const size_t STACK_BYTES = 256 * 1024;

struct Barrier {
    int expected = 0;
    int arrived = 0;
    unsigned long generation = 0;
};

enum class State { Ready, Waiting, Done };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;
    State state = State::Ready;
    Barrier* waiting_on = nullptr;
    unsigned long wait_generation = 0;
    EmuDim3 tid{};
    int index = 0;  // in the block; warp index / 32, lane index % 32
    unsigned long shuffles = 0;
};

struct Warp {
    Barrier barrier;
    unsigned int gathered[2][32][EMU_GATHER_MAX];
};

// The block being run.
static struct {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int threads = 0;
    int done = 0;
    bool reverse = false;
    Barrier block;
    Fiber* current = nullptr;
    void* scheduler_sp = nullptr;
    EmuCall* call = nullptr;
    const char* kernel = "";
    // Calls of grid_dependency_sync() (kernels/common.cuh) in the launch being run.
    unsigned long dependency_syncs = 0;
} blk;

void emu_grid_dependency_sync() { blk.dependency_syncs++; }

static void describe_thread(char* out, size_t len) {
    std::snprintf(out, len, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", blk.kernel,
                  emu_block_idx.x, emu_block_idx.y, emu_block_idx.z, emu_thread_idx.x,
                  emu_thread_idx.y, emu_thread_idx.z);
}

[[noreturn]] static void fail_here(const char* what) {
    char where[256];
    describe_thread(where, sizeof where);
    std::string msg = std::string(what) + " (" + where + ")";
    fail(msg.c_str());
}

static bool runnable(const Fiber& f) {
    return f.state == State::Ready ||
           (f.state == State::Waiting && f.waiting_on->generation != f.wait_generation);
}

// Leaves the current fiber (waiting or done) for the next runnable thread of the block in
// round-robin order, switching to it directly; to the launch's own stack once every thread
// is done. No runnable thread while some wait means they wait at different barriers.
static void switch_away() {
    Fiber* from = blk.current;
    if (blk.done == blk.threads) {
        emu_switch(&from->sp, blk.scheduler_sp);
        return;
    }
    int n = blk.threads;
    for (int step = 1; step <= n; step++) {
        int i = blk.reverse ? (from->index - step + 2 * n) % n : (from->index + step) % n;
        Fiber& f = blk.fibers[i];
        if (!runnable(f)) continue;
        f.state = State::Ready;
        if (&f == from) return;
        blk.current = &f;
        emu_thread_idx = f.tid;
        emu_switch(&from->sp, f.sp);
        return;
    }
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "kernel %s, block (%u,%u,%u): threads wait at different barriers (divergent "
                  "__syncthreads or shuffle)",
                  blk.kernel, emu_block_idx.x, emu_block_idx.y, emu_block_idx.z);
    fail(msg);
}

// Every expected thread has arrived at `b`: the waiting ones may go on.
static void release(Barrier& b) {
    b.arrived = 0;
    b.generation++;
}

static void fiber_main(void*) {
    blk.call->run();
    Fiber* f = blk.current;
    f->state = State::Done;
    blk.done++;
    // A finished thread no longer counts at its block's barrier; a lane that leaves while its
    // warp waits in a shuffle skipped a shuffle the others are in (undefined on a GPU).
    Warp& w = blk.warps[f->index / 32];
    if (w.barrier.arrived > 0) fail_here("a thread exited while its warp waits in a shuffle");
    w.barrier.expected--;
    blk.block.expected--;
    if (blk.block.arrived > 0 && blk.block.arrived == blk.block.expected) release(blk.block);
    switch_away();
    fail("a finished fiber was resumed");
}

// Arrive at `b`; run other threads until every expected thread has arrived.
static void arrive_and_wait(Barrier& b) {
    Fiber* f = blk.current;
    if (++b.arrived == b.expected) {
        release(b);
        return;
    }
    f->state = State::Waiting;
    f->waiting_on = &b;
    f->wait_generation = b.generation;
    switch_away();
}

void emu_syncthreads() { arrive_and_wait(blk.block); }

// A warp-wide operation: every lane passes `n` words, waits for the whole warp, and reads all
// lanes' words. Double-buffered on the count of the warp's operations (shuffles and gathers):
// buffer k & 1 is written again at operation k + 2, which no lane enters before every lane
// has left operation k + 1, by when every lane has read what operation k gave it.
const unsigned int* emu_warp_gather(const unsigned int* mine, int n) {
    if (n < 0 || n > EMU_GATHER_MAX) fail_here("a warp gather of too many words");
    Fiber* f = blk.current;
    Warp& w = blk.warps[f->index / 32];
    if (w.barrier.expected != 32) fail_here("a warp-wide operation in a warp with exited lanes");
    unsigned long k = f->shuffles++;
    int lane = f->index % 32;
    std::memcpy(w.gathered[k & 1][lane], mine, n * sizeof(unsigned int));
    arrive_and_wait(w.barrier);
    return &w.gathered[k & 1][0][0];
}

unsigned int emu_shfl_xor(unsigned int mask, unsigned int bits, int lane_mask) {
    if (mask != 0xffffffffu) fail_here("only full-warp shuffles are emulated");
    const unsigned int* all = emu_warp_gather(&bits, 1);
    int src = (blk.current->index % 32) ^ lane_mask;
    return src < 32 ? all[src * EMU_GATHER_MAX] : bits;
}

static bool reverse_order() {
    static const bool reverse = [] {
        const char* v = std::getenv("CLLM_EMU_BLOCK_ORDER");
        return v && std::string(v) == "reverse";
    }();
    return reverse;
}

static char* new_stack() {
    void* p = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    return (char*)p;
}

static void run_block(int threads) {
    if ((int)blk.fibers.size() < threads) blk.fibers.resize(threads);
    blk.warps.assign((threads + 31) / 32, Warp{});
    blk.block = Barrier{};
    blk.block.expected = threads;
    blk.threads = threads;
    blk.done = 0;
    for (int i = 0; i < threads; i++) {
        Fiber& f = blk.fibers[i];
        if (!f.stack) f.stack = new_stack();
        f.state = State::Ready;
        f.waiting_on = nullptr;
        f.shuffles = 0;
        f.tid = EmuDim3{(unsigned)(i % emu_block_dim.x),
                        (unsigned)(i / emu_block_dim.x % emu_block_dim.y),
                        (unsigned)(i / (emu_block_dim.x * emu_block_dim.y))};
        f.index = i;
        blk.warps[i / 32].barrier.expected++;
        // Initial frame, from the stack pointer up: r15, r14, r13, r12, rbx, rbp, return
        // address. The return address sits 8 bytes below a 16-byte boundary, so the stack is
        // aligned for the call in emu_fiber_start.
        // Stacks are page-aligned mappings: without an offset every fiber's hot frame would sit
        // in the same cache sets, and switching among 256 of them would miss on every switch.
        size_t color = (size_t)i * 1088 % (STACK_BYTES / 4) / 16 * 16;
        uint64_t* top = (uint64_t*)(f.stack + STACK_BYTES - color);
        uint64_t* frame = top - 7;
        frame[6] = (uint64_t)&emu_fiber_start;  // at top - 8
        frame[5] = 0;                             // rbp
        frame[4] = 0;                             // rbx
        frame[3] = 0;                             // r12: argument
        frame[2] = (uint64_t)&fiber_main;         // r13: function
        frame[1] = 0;                             // r14
        frame[0] = 0;                             // r15
        f.sp = frame;
    }
    Fiber& first = blk.fibers[blk.reverse ? threads - 1 : 0];
    blk.current = &first;
    emu_thread_idx = first.tid;
    emu_switch(&blk.scheduler_sp, first.sp);
    if (blk.done != threads) fail("a block returned before all its threads finished");
}

static std::recursive_mutex& device_lock() {
    static std::recursive_mutex m;
    return m;
}

static void segv_handler(int) {
    char where[256];
    describe_thread(where, sizeof where);
    std::fprintf(stderr,
                 "cuda emulator: memory access outside every allocation (a guard page or "
                 "unmapped memory) in %s\n",
                 where);
    std::fflush(stderr);
    std::_Exit(134);
}

static void run_kernel(const EmuKernel* k, EmuCall* call, unsigned gx, unsigned gy, unsigned gz,
                       unsigned bx, unsigned by, unsigned bz) {
    static char alt_stack[64 * 1024];
    static bool handler = false;
    if (!handler) {
        stack_t ss{};
        ss.ss_sp = alt_stack;
        ss.ss_size = sizeof alt_stack;
        sigaltstack(&ss, nullptr);
        struct sigaction sa {};
        sa.sa_handler = segv_handler;
        sa.sa_flags = SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
        handler = true;
    }
    blk.call = call;
    blk.kernel = k->name;
    blk.reverse = reverse_order();
    emu_grid_dim = EmuDim3{gx, gy, gz};
    emu_block_dim = EmuDim3{bx, by, bz};
    unsigned long blocks = (unsigned long)gx * gy * gz;
    blk.dependency_syncs = 0;
    for (unsigned long n = 0; n < blocks; n++) {
        unsigned long b = blk.reverse ? blocks - 1 - n : n;
        emu_block_idx = EmuDim3{(unsigned)(b % gx), (unsigned)(b / gx % gy), (unsigned)(b / gx / gy)};
        run_block((int)(bx * by * bz));
    }
    // Under programmatic dependent launch a kernel runs beside the one before it until it
    // waits: every thread of every kernel must call grid_dependency_sync().
    unsigned long threads = blocks * bx * by * bz;
    if (blk.dependency_syncs != threads) {
        char what[256];
        std::snprintf(what, sizeof what,
                      "kernel %s: %lu of its %lu threads called grid_dependency_sync() (each "
                      "must, once, before it touches memory another kernel writes)",
                      k->name, blk.dependency_syncs, threads);
        fail(what);
    }
}

// ---- device memory ---------------------------------------------------------------------
//
// Each allocation is its own mapping, with its end 256-byte aligned just below a page that
// cannot be touched. Fresh memory is 0xff bytes (NaN as f32), as a stand-in for the garbage a
// real allocation holds.

struct Allocation {
    char* map;
    size_t map_bytes;
    size_t bytes;
};

static std::map<uint64_t, Allocation>& allocations() {
    static std::map<uint64_t, Allocation> all;
    return all;
}

static size_t total_memory() {
    static const size_t total = [] {
        const char* v = std::getenv("CLLM_EMU_MEMORY_MB");
        size_t mb = v ? std::strtoull(v, nullptr, 10) : 1024;
        return (mb ? mb : 1024) << 20;
    }();
    return total;
}

static size_t used_memory = 0;

static const size_t PAGE = 4096;

static uint64_t device_alloc(size_t bytes) {
    size_t body = (bytes + 255) / 256 * 256;
    size_t pages = (body + PAGE - 1) / PAGE;
    size_t map_bytes = (pages + 1) * PAGE;
    void* p = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return 0;
    char* map = (char*)p;
    mprotect(map + pages * PAGE, PAGE, PROT_NONE);
    char* start = map + pages * PAGE - body;
    // Large buffers (the KV cache) are zeroed by the backend right away; filling them first
    // would only cost memory.
    if (bytes <= (64u << 20)) std::memset(start, 0xff, bytes);
    allocations()[(uint64_t)start] = Allocation{map, map_bytes, bytes};
    used_memory += bytes;
    return (uint64_t)start;
}

// The allocation holding [ptr, ptr + bytes), or null.
static const Allocation* find(uint64_t ptr, size_t bytes) {
    auto& all = allocations();
    auto it = all.upper_bound(ptr);
    if (it == all.begin()) return nullptr;
    --it;
    if (ptr + bytes > it->first + it->second.bytes) return nullptr;
    return &it->second;
}

// ---- streams, graphs, events -----------------------------------------------------------

struct Launch {
    const EmuKernel* kernel;
    std::shared_ptr<EmuCall> call;
    unsigned grid[3], block[3];
};

struct Stream {
    bool capturing = false;
    std::vector<Launch> captured;
};

struct Graph {
    std::vector<Launch> launches;
};

struct Event {
    double ms = 0.0;
};

static double now_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static Stream default_stream;

static Stream* stream_of(void* s) { return s ? (Stream*)s : &default_stream; }

static void run_launch(const Launch& l) {
    run_kernel(l.kernel, l.call.get(), l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1],
               l.block[2]);
}

// ---- the driver API --------------------------------------------------------------------

static int fake_context;
static thread_local void* current_context = nullptr;

#define API extern "C" __attribute__((visibility("default"))) CUresult

API cuInit(unsigned) { return OK; }
API cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
API cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
API cuDeviceGet(int* dev, int ordinal) {
    if (ordinal != 0) return ERR_INVALID_DEVICE;
    *dev = 0;
    return OK;
}
API cuDeviceGetAttribute(int* value, int attribute, int) {
    switch (attribute) {
        case 1: *value = 1024; break;   // max threads per block
        case 10: *value = 32; break;    // warp size
        case 16: {                      // multiprocessors: few, so attention splits stay small
            const char* v = std::getenv("CLLM_EMU_SMS");
            *value = v ? std::atoi(v) : 4;
            break;
        }
        case 75: *value = 9; break;     // compute capability 9.0: kernels built for sm_90
        case 76: *value = 0; break;
        case 115: *value = 0; break;    // no memory pools: plain cuMemAlloc
        default: *value = 0;
    }
    return OK;
}
API cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "cllm CUDA emulator (CPU)");
    return OK;
}
API cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = total_memory();
    return OK;
}
API cuDeviceGetUuid(char* uuid, int) {
    std::memset(uuid, 0, 16);
    return OK;
}
API cuDeviceGetUuid_v2(char* uuid, int) {
    std::memset(uuid, 0, 16);
    return OK;
}
API cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &fake_context;
    return OK;
}
API cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API cuCtxGetCurrent(void** ctx) {
    *ctx = current_context;
    return OK;
}
API cuCtxSetCurrent(void* ctx) {
    current_context = ctx;
    return OK;
}
API cuCtxSynchronize() { return OK; }
API cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    *least = 0;
    *greatest = 0;
    return OK;
}

API cuStreamCreate(void** s, unsigned) {
    *s = new Stream();
    return OK;
}
API cuStreamCreateWithPriority(void** s, unsigned, int) {
    *s = new Stream();
    return OK;
}
API cuStreamDestroy_v2(void* s) {
    if (s) delete (Stream*)s;
    return OK;
}
API cuStreamSynchronize(void* s) { return stream_of(s)->capturing ? ERR_CAPTURE_UNSUPPORTED : OK; }
API cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
API cuStreamBeginCapture_v2(void* s, int) {
    Stream* st = stream_of(s);
    if (st->capturing) return ERR_INVALID_VALUE;
    st->capturing = true;
    st->captured.clear();
    return OK;
}
API cuStreamEndCapture(void* s, void** graph) {
    Stream* st = stream_of(s);
    if (!st->capturing) return ERR_INVALID_VALUE;
    st->capturing = false;
    Graph* g = new Graph();
    g->launches.swap(st->captured);
    *graph = g;
    return OK;
}
API cuStreamIsCapturing(void* s, int* status) {
    *status = stream_of(s)->capturing ? 1 : 0;
    return OK;
}
API cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    if (!graph) return ERR_INVALID_VALUE;
    *exec = new Graph(*(Graph*)graph);
    return OK;
}
API cuGraphUpload(void*, void*) { return OK; }
API cuGraphLaunch(void* exec, void* s) {
    if (stream_of(s)->capturing) return ERR_CAPTURE_UNSUPPORTED;
    std::lock_guard<std::recursive_mutex> lock(device_lock());
    for (const Launch& l : ((Graph*)exec)->launches) run_launch(l);
    return OK;
}
API cuGraphDestroy(void* g) {
    delete (Graph*)g;
    return OK;
}
API cuGraphExecDestroy(void* g) {
    delete (Graph*)g;
    return OK;
}

API cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return OK;
}
API cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return OK;
}
API cuEventRecord(void* e, void* s) {
    if (stream_of(s)->capturing) return ERR_CAPTURE_UNSUPPORTED;
    ((Event*)e)->ms = now_ms();
    return OK;
}
API cuEventSynchronize(void*) { return OK; }
API cuEventQuery(void*) { return OK; }
API cuEventElapsedTime(float* ms, void* start, void* end) {
    *ms = (float)(((Event*)end)->ms - ((Event*)start)->ms);
    return OK;
}
API cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

struct Module {};

API cuModuleLoadData(void** module, const void* image) {
    // The backend passes NVRTC's CUBIN: an ELF image. The kernels themselves come from the
    // emulator's own build of the same sources.
    if (!image || std::memcmp(image, "\x7f" "ELF", 4) != 0) return ERR_INVALID_IMAGE;
    *module = new Module();
    return OK;
}
API cuModuleUnload(void* m) {
    delete (Module*)m;
    return OK;
}
API cuModuleGetFunction(void** f, void*, const char* name) {
    auto it = registry().find(name);
    if (it == registry().end()) return ERR_NOT_FOUND;
    *f = (void*)it->second;
    return OK;
}
API cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return OK;
}
API cuFuncSetAttribute(void*, int, int) { return OK; }
API cuFuncSetCacheConfig(void*, int) { return OK; }

API cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned shared_bytes, void* s, void** params, void** extra) {
    if (!f) return ERR_INVALID_HANDLE;
    if (extra) return ERR_NOT_SUPPORTED;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) return ERR_INVALID_VALUE;
    if ((unsigned long)bx * by * bz > 1024 || gy > 65535 || gz > 65535) return ERR_INVALID_VALUE;
    if (shared_bytes > 48 * 1024) return ERR_INVALID_VALUE;
    const EmuKernel* k = (const EmuKernel*)f;
    Launch l{k, std::shared_ptr<EmuCall>(k->bind(params)), {gx, gy, gz}, {bx, by, bz}};
    Stream* st = stream_of(s);
    if (st->capturing) {
        st->captured.push_back(l);
        return OK;
    }
    std::lock_guard<std::recursive_mutex> lock(device_lock());
    run_launch(l);
    return OK;
}

// The launch of CUDA 12 with attributes: the one the backend passes, programmatic stream
// serialization (programmatic dependent launch), changes nothing here, where kernels run one
// after another; any other is refused.
struct LaunchAttribute {
    int id;
    char pad[4];
    union {
        char bytes[64];
        int value;
    };
};
struct LaunchConfig {
    unsigned grid[3], block[3], shared_bytes;
    void* stream;
    LaunchAttribute* attrs;
    unsigned attr_count;
};
static const int ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6;

API cuLaunchKernelEx(const LaunchConfig* c, void* f, void** params, void** extra) {
    if (!c) return ERR_INVALID_VALUE;
    for (unsigned i = 0; i < c->attr_count; i++)
        if (c->attrs[i].id != ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) return ERR_NOT_SUPPORTED;
    return cuLaunchKernel(f, c->grid[0], c->grid[1], c->grid[2], c->block[0], c->block[1],
                          c->block[2], c->shared_bytes, c->stream, params, extra);
}

API cuMemAlloc_v2(uint64_t* ptr, size_t bytes) {
    std::lock_guard<std::recursive_mutex> lock(device_lock());
    if (bytes == 0) return ERR_INVALID_VALUE;
    if (used_memory + bytes > total_memory()) return ERR_OUT_OF_MEMORY;
    uint64_t p = device_alloc(bytes);
    if (!p) return ERR_OUT_OF_MEMORY;
    *ptr = p;
    return OK;
}
API cuMemFree_v2(uint64_t ptr) {
    std::lock_guard<std::recursive_mutex> lock(device_lock());
    auto it = allocations().find(ptr);
    if (it == allocations().end()) return ERR_INVALID_VALUE;
    munmap(it->second.map, it->second.map_bytes);
    used_memory -= it->second.bytes;
    allocations().erase(it);
    return OK;
}
API cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    *total = total_memory();
    *free_bytes = total_memory() - used_memory;
    return OK;
}

// Copies: both ends checked against the allocations; no copy from or to the host while the
// stream is being captured.
static CUresult copy(uint64_t dst, bool dst_device, uint64_t src, bool src_device, size_t bytes,
                     void* s) {
    if (stream_of(s)->capturing) return ERR_CAPTURE_UNSUPPORTED;
    std::lock_guard<std::recursive_mutex> lock(device_lock());
    if (dst_device && !find(dst, bytes)) return ERR_INVALID_VALUE;
    if (src_device && !find(src, bytes)) return ERR_INVALID_VALUE;
    std::memmove((void*)dst, (const void*)src, bytes);
    return OK;
}
API cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t n) { return copy(dst, true, (uint64_t)src, false, n, nullptr); }
API cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t n, void* s) { return copy(dst, true, (uint64_t)src, false, n, s); }
API cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t n) { return copy((uint64_t)dst, false, src, true, n, nullptr); }
API cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t n, void* s) { return copy((uint64_t)dst, false, src, true, n, s); }
API cuMemcpyDtoD_v2(uint64_t dst, uint64_t src, size_t n) { return copy(dst, true, src, true, n, nullptr); }
API cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void* s) { return copy(dst, true, src, true, n, s); }

static CUresult memset8(uint64_t dst, unsigned char v, size_t n, void* s) {
    if (stream_of(s)->capturing) return ERR_CAPTURE_UNSUPPORTED;
    std::lock_guard<std::recursive_mutex> lock(device_lock());
    if (!find(dst, n)) return ERR_INVALID_VALUE;
    // Zeroing whole pages returns them to the kernel (they read as zero again), so that a
    // large KV cache costs no memory until it is written.
    uint64_t lo = (dst + PAGE - 1) / PAGE * PAGE, hi = (dst + n) / PAGE * PAGE;
    if (v == 0 && hi > lo + 16 * PAGE) {
        std::memset((void*)dst, 0, lo - dst);
        madvise((void*)lo, hi - lo, MADV_DONTNEED);
        std::memset((void*)hi, 0, dst + n - hi);
    } else {
        std::memset((void*)dst, v, n);
    }
    return OK;
}
API cuMemsetD8_v2(uint64_t dst, unsigned char v, size_t n) { return memset8(dst, v, n, nullptr); }
API cuMemsetD8Async(uint64_t dst, unsigned char v, size_t n, void* s) { return memset8(dst, v, n, s); }

static const char* error_name(CUresult e) {
    switch (e) {
        case OK: return "CUDA_SUCCESS";
        case ERR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case ERR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case ERR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case ERR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case ERR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case ERR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case ERR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case ERR_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        default: return "CUDA_ERROR_UNKNOWN";
    }
}
API cuGetErrorName(CUresult e, const char** s) {
    *s = error_name(e);
    return OK;
}
API cuGetErrorString(CUresult e, const char** s) {
    *s = error_name(e);
    return OK;
}

// NVRTC opens the driver library too and asks for its private tables; it compiles without
// them (as on a machine with no driver) when they are not there.
API cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return ERR_NOT_FOUND;
}
