// Greedy sampling support: the index of each row's largest logit (the lowest index on ties, as
// the CPU's argmax picks). One block per row; blockDim.x a power of two, at most 1024.

extern "C" __global__ void argmax_rows(const float* logits, int vocab, u32* out) {
    grid_dependency_sync();
    __shared__ float best_v[1024];
    __shared__ u32 best_i[1024];
    const float* row = logits + (u64)blockIdx.x * vocab;
    float v = NEG_INF;
    u32 idx = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (row[i] > v) {
            v = row[i];
            idx = i;
        }
    }
    best_v[threadIdx.x] = v;
    best_i[threadIdx.x] = idx;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ov = best_v[threadIdx.x + stride];
            u32 oi = best_i[threadIdx.x + stride];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0];
}
