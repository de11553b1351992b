// RMSNorm as HF's LlamaRMSNorm computes it in f32: out = w * (x * 1/sqrt(mean(x²) + eps)).
// One block per row.

__device__ __forceinline__ void norm_row(const float* x, const float* w, float* out, int h, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[i] = w[i] * (x[i] * inv);
}

extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int h, float eps) {
    grid_dependency_sync();
    u64 row = (u64)blockIdx.x * h;
    norm_row(x + row, w, out + row, h, eps);
}

// out[i] = rmsnorm(x[rows[i]]): the final norm of the rows that want logits, packed together.
// One block per wanted row.
extern "C" __global__ void gather_rms_norm(const float* x, const int* rows, const float* w, float* out, int h, float eps) {
    grid_dependency_sync();
    norm_row(x + (u64)rows[blockIdx.x] * h, w, out + (u64)blockIdx.x * h, h, eps);
}
