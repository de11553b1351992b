// Prepended by the backend to every kernel file before NVRTC compiles it: NVRTC here finds no
// CUDA headers, so the few types and helpers the kernels share are defined here.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    // Host compilers (the CPU emulator in tests/cuda_emulator): the same value by bits.
    u32 sign = ((u32)h & 0x8000u) << 16, exp = ((u32)h >> 10) & 0x1fu, man = (u32)h & 0x3ffu;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf, NaN
    if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
    // Zero and subnormals: man * 2^-24, exact in f32.
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
#endif
}

// f32 → f16 bits, rounded to nearest even, after clamping to f16's largest finite value (as
// the CPU's f16 KV cache stores); a NaN stays a NaN.
__device__ __forceinline__ u16 f16_bits(float f) {
    f = f > 65504.0f ? 65504.0f : (f < -65504.0f ? -65504.0f : f);  // NaN compares false
#ifdef __CUDA_ARCH__
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    // Host compilers (tests/cuda_emulator): the same rounding by bits.
    u32 x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (u16)(sign | 0x7e00u);
    if (ax >= 0x38800000u) {  // normal in f16 (at least 2^-14): rebias, round 13 bits off
        u32 r = ax - 0x38000000u, h = r >> 13, rest = r & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
        return (u16)(sign | h);
    }
    // Subnormal or zero in f16: a multiple of 2^-24, rounded to nearest even.
    return (u16)(sign | (u32)rintf(__uint_as_float(ax) * 16777216.0f));
#endif
}

// Programmatic dependent launch (compute capability 9.0 and later, when the backend launches
// with it): the next kernel in the stream may be scheduled while this one still runs, and its
// blocks start early, so that launch latency and their first weight loads overlap this
// kernel's tail. Every kernel calls grid_dependency_sync() before it touches any memory an
// earlier kernel writes or reads (activations, the KV cache, outputs): it lets the next
// kernel be scheduled once every block of this one has started (`launch_dependents`), then
// waits until the kernels before this one have finished and their writes are visible
// (`wait`). Only loads of weights, which no kernel writes, may come before it. For a kernel
// launched without the attribute both are no-ops. Activations are never `const __restrict__`
// parameters: the compiler may read such a pointer through the non-coherent read-only path
// (`ld.global.nc`), which the wait's visibility guarantee does not cover; weights may be.
__device__ __forceinline__ void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#elif !defined(__CUDA_ARCH__)
    // Host compilers (tests/cuda_emulator): counted, so a kernel that never calls it fails.
    emu_grid_dependency_sync();
#endif
}

// Weight element types: `at` widens one element, `load8` eight consecutive ones from a
// 16-byte-aligned address (one or two vector loads); `fetch8` only loads them (`Raw`, as
// stored) and `widen8` converts, so that loads can be issued well before their values are used.
struct F32x8 {
    float4 a, b;
};

struct WF32 {
    typedef float T;
    typedef F32x8 Raw;
    static __device__ __forceinline__ float at(const float* p, u64 i) { return p[i]; }
    static __device__ __forceinline__ Raw fetch8(const float* p) {
        return Raw{((const float4*)p)[0], ((const float4*)p)[1]};
    }
    static __device__ __forceinline__ void widen8(const Raw& r, float* out) {
        out[0] = r.a.x; out[1] = r.a.y; out[2] = r.a.z; out[3] = r.a.w;
        out[4] = r.b.x; out[5] = r.b.y; out[6] = r.b.z; out[7] = r.b.w;
    }
    static __device__ __forceinline__ void load8(const float* p, float* out) { widen8(fetch8(p), out); }
    // The KV cache stores through it.
    static __device__ __forceinline__ void store(float* p, u64 i, float v) { p[i] = v; }
};

struct WBF16 {
    typedef u16 T;
    typedef uint4 Raw;
    static __device__ __forceinline__ float at(const u16* p, u64 i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ Raw fetch8(const u16* p) { return *(const uint4*)p; }
    static __device__ __forceinline__ void load8(const u16* p, float* out) { widen8(fetch8(p), out); }
    static __device__ __forceinline__ void widen8(const uint4& v, float* out) {
        u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            out[2 * i] = __uint_as_float(w[i] << 16);
            out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
};

struct WF16 {
    typedef u16 T;
    typedef uint4 Raw;
    static __device__ __forceinline__ float at(const u16* p, u64 i) { return f16_to_f32(p[i]); }
    static __device__ __forceinline__ Raw fetch8(const u16* p) { return *(const uint4*)p; }
    static __device__ __forceinline__ void load8(const u16* p, float* out) { widen8(fetch8(p), out); }
    static __device__ __forceinline__ void store(u16* p, u64 i, float v) { p[i] = f16_bits(v); }
    static __device__ __forceinline__ void widen8(const uint4& v, float* out) {
        u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            out[2 * i] = f16_to_f32((u16)(w[i] & 0xffffu));
            out[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
        }
    }
};

// f32 → bf16 bits, rounded to nearest even; a NaN stays a (quiet) NaN, where the rounding
// would carry it into the sign bit.
__device__ __forceinline__ u32 bf16_bits(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (b >> 16) | 0x40u;
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

// d += a · b on the tensor cores for one warp: a 16×16 (row-major) bf16 tile, b 16×8
// (column-major) bf16, d 16×8 f32, in the m16n8k16 fragment layout of the PTX ISA (lane =
// 4 · group + index in group; a[0..3] hold rows group and group + 8 at columns 2·index and
// 2·index + 8, two values a register, lower column in the low half; b[0..1] column group at
// rows 2·index and 2·index + 8; d rows group and group + 8, columns 2·index, 2·index + 1).
// Only launched on sm_80 and later.
__device__ __forceinline__ void mma_bf16_16816(float* d, const u32* a, u32 b0, u32 b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(__CUDA_ARCH__)
    asm volatile("trap;");
#else
    // Host compilers (tests/cuda_emulator): the same layout, computed by the emulator.
    emu_mma_bf16_16816(d, a, b0, b1);
#endif
}

// SwiGLU of one gate/up pair: silu(g) * u, silu(g) = g / (1 + exp(-g)).
__device__ __forceinline__ float swiglu(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// The fused gate/up matrices (and products) interleave gate and up in runs of 8 rows: rows
// 16j..16j+7 are gate rows 8j..8j+7 and rows 16j+8..16j+15 the up rows, the intermediate size
// padded to a multiple of 8 with zero rows. The row of gate row i (its up row is 8 further):
__device__ __forceinline__ int gate_row(int i) { return 16 * (i >> 3) + (i & 7); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    float total = partial[0];
    __syncthreads();
    return total;
}
