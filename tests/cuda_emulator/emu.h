// The CUDA built-ins that kernels/*.cu use, for a host C++ compiler: each kernel file is
// compiled as `emu.h`, `common.cuh`, the file, and the registration of its kernels.
// The thread and block indices are globals that the scheduler (runtime.cpp) sets before it
// switches to a thread's fiber; threads switch only inside the synchronisation calls below,
// which are defined in another file, so the compiler reloads the indices after each of them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

struct EmuDim3 {
    unsigned int x, y, z;
};

extern EmuDim3 emu_thread_idx, emu_block_idx, emu_block_dim, emu_grid_dim;

#define threadIdx emu_thread_idx
#define blockIdx emu_block_idx
#define blockDim emu_block_dim
#define gridDim emu_grid_dim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Shared memory: one copy for the block being run (blocks run one at a time).
#define __shared__ static

void emu_syncthreads();
void emu_grid_dependency_sync();
unsigned int emu_shfl_xor(unsigned int mask, unsigned int bits, int lane_mask);

inline void __syncthreads() { emu_syncthreads(); }
// Kernels run one after another here: there is nothing to wait for.
inline void __nanosleep(unsigned int) {}

// One block runs at a time and its threads switch only at synchronisation points: a fence has
// nothing to order, and an atomic add is a plain one.
inline void __threadfence() {}
inline int atomicAdd(int* p, int v) {
    int old = *p;
    *p = old + v;
    return old;
}

// Every lane of the warp passes `n` words and gets all lanes' (at [lane * EMU_GATHER_MAX + i]),
// readable until the lane's next warp-wide call: a synchronisation point, as an mma.sync is.
#define EMU_GATHER_MAX 8
const unsigned int* emu_warp_gather(const unsigned int* mine, int n);

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline float __uint_as_float(unsigned int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, 4);
    return v;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int v;
    std::memcpy(&v, &f, 4);
    return v;
}

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
    return __uint_as_float(emu_shfl_xor(mask, __float_as_uint(v), lane_mask));
}
inline int __shfl_xor_sync(unsigned int mask, int v, int lane_mask) {
    return (int)emu_shfl_xor(mask, (unsigned int)v, lane_mask);
}
inline unsigned int __shfl_xor_sync(unsigned int mask, unsigned int v, int lane_mask) {
    return emu_shfl_xor(mask, v, lane_mask);
}

inline float emu_bf16_value(unsigned int bits16) {
    unsigned int v = bits16 << 16;
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (d += a · b) in the fragment layout the
// PTX ISA gives for it: lane = 4 · group + index; A register 0 holds row group, columns
// 2·index and 2·index + 1 (low half first), register 1 row group + 8 at the same columns,
// registers 2 and 3 the same rows 8 columns further; B register 0 holds column group, rows
// 2·index and 2·index + 1, register 1 rows 8 further; D holds rows group (d[0], d[1]) and
// group + 8 (d[2], d[3]) at columns 2·index and 2·index + 1. Products of bf16 values are
// exact in f32; the sums here run in k order.
inline void emu_mma_bf16_16816(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
    unsigned int mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const unsigned int* all = emu_warp_gather(mine, 6);
    int lane = (int)(emu_thread_idx.x % 32), g = lane >> 2, q = lane & 3;
    // This lane's rows of A (g, g + 8) and columns of B (2q, 2q + 1), from the four lanes of
    // the group that holds each.
    float A[2][16], B[2][16];
    for (int src = 0; src < 4; src++) {
        const unsigned int* r = all + (g * 4 + src) * EMU_GATHER_MAX;
        for (int e = 0; e < 2; e++) {
            int shift = 16 * e;
            A[0][2 * src + e] = emu_bf16_value((r[0] >> shift) & 0xffffu);
            A[1][2 * src + e] = emu_bf16_value((r[1] >> shift) & 0xffffu);
            A[0][2 * src + 8 + e] = emu_bf16_value((r[2] >> shift) & 0xffffu);
            A[1][2 * src + 8 + e] = emu_bf16_value((r[3] >> shift) & 0xffffu);
        }
        for (int c = 0; c < 2; c++) {
            const unsigned int* rb = all + ((2 * q + c) * 4 + src) * EMU_GATHER_MAX;
            for (int e = 0; e < 2; e++) {
                int shift = 16 * e;
                B[c][2 * src + e] = emu_bf16_value((rb[4] >> shift) & 0xffffu);
                B[c][2 * src + 8 + e] = emu_bf16_value((rb[5] >> shift) & 0xffffu);
            }
        }
    }
    for (int i = 0; i < 4; i++) {
        const float* row = A[i >> 1];
        const float* col = B[i & 1];
        float s = d[i];
        for (int k = 0; k < 16; k++) s += row[k] * col[k];
        d[i] = s;
    }
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};

// Registration: each kernel file's `extern "C"` kernels, found by build.sh, are listed as
// EMU_KERNEL(name) after the file, which records the kernel's parameter types so that a launch
// can copy its arguments out of cuLaunchKernel's `void**` array.
struct EmuCall {
    virtual void run() = 0;
    virtual ~EmuCall() = default;
};

struct EmuKernel {
    const char* name;
    explicit EmuKernel(const char* n);
    virtual EmuCall* bind(void** params) const = 0;
    virtual ~EmuKernel() = default;
};

template <class... A>
struct EmuBoundCall : EmuCall {
    void (*f)(A...);
    std::tuple<A...> args;
    EmuBoundCall(void (*fn)(A...), std::tuple<A...> a) : f(fn), args(a) {}
    void run() override { std::apply(f, args); }
};

template <class... A>
struct EmuTypedKernel : EmuKernel {
    void (*f)(A...);
    EmuTypedKernel(const char* n, void (*fn)(A...)) : EmuKernel(n), f(fn) {}
    template <std::size_t... I>
    EmuCall* bind_at(void** params, std::index_sequence<I...>) const {
        return new EmuBoundCall<A...>(f, std::tuple<A...>(*static_cast<A*>(params[I])...));
    }
    EmuCall* bind(void** params) const override {
        return bind_at(params, std::index_sequence_for<A...>{});
    }
};

template <class... A>
EmuTypedKernel<A...>* emu_register(const char* name, void (*fn)(A...)) {
    return new EmuTypedKernel<A...>(name, fn);
}

#define EMU_KERNEL(name) static EmuKernel* emu_registered_##name = emu_register(#name, &name);
