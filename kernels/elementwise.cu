// Element-wise steps: bias add, SwiGLU, and RoPE fused with the paged KV append.

// y[t][c] += bias[c] for rows of `cols`.
extern "C" __global__ void add_bias(float* y, const float* bias, int cols, u64 n) {
    grid_dependency_sync();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] += bias[i % cols];
}

// SwiGLU on the fused gate/up product, rows of 2 × inter8 (inter rounded up to a multiple of 8)
// interleaved in runs of 8 (gate_row in common.cuh): out[t][i] = swiglu(gate i, up i).
extern "C" __global__ void silu_mul(const float* gu, float* out, int inter, u64 n) {
    grid_dependency_sync();
    u64 stride = 2 * (u64)((inter + 7) & ~7);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 t = i / inter, c = i % inter;
        const float* row = gu + t * stride + gate_row((int)c);
        out[i] = swiglu(row[0], row[8]);
    }
}

// HF rotate_half RoPE on the q and k heads of each token's fused q/k/v row (stride floats:
// q heads, then kv heads of k, then of v), fused with the paged KV append: q is rotated in
// place, the rotated k and the v go to the token's cache slot, in the cache's type (KV: WF32,
// or WF16 rounding as the CPU's f16 cache does). cos/sin: [token][head_dim / 2], from the
// host. One block per token.
template <class KV>
__device__ void rope_kv_append(float* qkv, int stride, int heads, int kv_heads, int d,
                               const float* cos, const float* sin, const int* slots,
                               typename KV::T* kc, typename KV::T* vc) {
    grid_dependency_sync();
    int half = d / 2, kv_dim = kv_heads * d;
    float* row = qkv + (u64)blockIdx.x * stride;
    const float* c = cos + (u64)blockIdx.x * half;
    const float* s = sin + (u64)blockIdx.x * half;
    u64 dst = (u64)slots[blockIdx.x] * kv_dim;
    for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
        int h = idx / half, i = idx % half;
        float* p = row + h * d;
        float a = p[i], b = p[i + half];
        float lo = a * c[i] - b * s[i], hi = b * c[i] + a * s[i];
        if (h < heads) {
            p[i] = lo;
            p[i + half] = hi;
        } else {
            u64 off = dst + (h - heads) * d;
            KV::store(kc, off + i, lo);
            KV::store(kc, off + i + half, hi);
        }
    }
    const float* v = row + (heads + kv_heads) * d;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) KV::store(vc, dst + i, v[i]);
}

#define ROPE_ENTRY(name, KV)                                                                     \
    extern "C" __global__ void rope_kv_append_##name(                                            \
        float* qkv, int stride, int heads, int kv_heads, int d, const float* cos,                \
        const float* sin, const int* slots, KV::T* kc, KV::T* vc) {                              \
        rope_kv_append<KV>(qkv, stride, heads, kv_heads, d, cos, sin, slots, kc, vc);            \
    }

ROPE_ENTRY(f32, WF32)
ROPE_ENTRY(f16, WF16)
