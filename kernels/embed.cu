// Embedding gather: out[t] = table[ids[t]] widened to f32. One block per token.

template <class W>
__device__ void embed(const typename W::T* table, const u32* ids, float* out, int hidden) {
    grid_dependency_sync();
    u64 src = (u64)ids[blockIdx.x] * hidden;
    float* dst = out + (u64)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = W::at(table, src + i);
}

extern "C" __global__ void embed_f32(const float* t, const u32* ids, float* out, int h) { embed<WF32>(t, ids, out, h); }
extern "C" __global__ void embed_f16(const u16* t, const u32* ids, float* out, int h) { embed<WF16>(t, ids, out, h); }
extern "C" __global__ void embed_bf16(const u16* t, const u32* ids, float* out, int h) { embed<WBF16>(t, ids, out, h); }
