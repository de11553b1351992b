// Greedy sampling support: the index of each row's largest logit (the lowest index on ties, NaN
// never chosen: as the CPU's argmax picks), and that choice's log-probability under the row's
// softmax (what a streamed token reports). One block per row; blockDim.x a power of two, at
// most 1024.

extern "C" __global__ void argmax_rows(const float* logits, int vocab, u32* out, float* logprob) {
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
    const float m = best_v[0];
    const u32 chosen = best_i[0];
    __syncthreads();  // every thread has read the maximum before best_v holds sums
    // log(sum(e^(l - m))) with NaN left out, as the host's log_sum_exp.
    float s = 0.0f;
    if (m != NEG_INF) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float l = row[i];
            if (l == l) s += expf(l - m);
        }
    }
    best_v[threadIdx.x] = s;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) best_v[threadIdx.x] += best_v[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[blockIdx.x] = chosen;
        // The host's arithmetic: lse = max + ln(sum) (just max when nothing is finite), then
        // the chosen logit minus it.
        float lse = m == NEG_INF ? m : m + logf(best_v[0]);
        logprob[blockIdx.x] = row[chosen] - lse;
    }
}
