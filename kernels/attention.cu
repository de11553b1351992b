// Attention over the paged KV cache, for decode tokens and prefill chunks alike, split along
// the keys (flash-decoding) so that long contexts use the whole GPU:
//
// attention_split: one block of 4 warps per (token, query head, split of `split_keys` keys).
//   Each warp walks every 4th group of 4 keys of the split with its own online softmax (running
//   max m, sum l, weighted values acc): a group's keys and values are loaded before any is
//   used, so that their load latencies overlap instead of adding up key after key. The warps
//   merge, and the block writes (m, l, acc) for its split. The last block of a (token, head)
//   to finish (counted in `counters`, which start and end at zero) merges the splits into the
//   output row, in split order whichever block it is: no second launch.
//
// q rows: q_stride floats per token, head h at h * d. Cache: [slot][kv_head][d] in f32, slot =
// block_table[pos / 16] * 16 + pos % 16. Token t attends to positions first..=pos[t], first =
// pos - window + 1 with a sliding window (window > 0), else 0. head_dim d <= 256.

#define KV_BLOCK 16
#define MAX_D_PER_LANE 8
#define WARPS 4
#define KEYS_AT_ONCE 4

// Merges the splits' (m, l, acc) of (token t, head h) into out: [token][heads * d]. The
// partials were written by other blocks: read through volatile pointers, not from L1.
__device__ void merge_splits(const volatile float* part_ml, const volatile float* part_acc,
                             int t, int h, int heads, int d, int splits, float* out) {
    u64 base = ((u64)t * heads + h) * splits;
    float m = NEG_INF;
    for (int s = 0; s < splits; s++)
        if (part_ml[(base + s) * 2 + 1] > 0.0f) m = fmaxf(m, part_ml[(base + s) * 2]);
    float l = 0.0f;
    for (int s = 0; s < splits; s++) {
        float ls = part_ml[(base + s) * 2 + 1];
        if (ls > 0.0f) l += ls * expf(part_ml[(base + s) * 2] - m);
    }
    float inv = 1.0f / l;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < splits; s++) {
            float ls = part_ml[(base + s) * 2 + 1];
            if (ls > 0.0f) a += part_acc[(base + s) * d + i] * expf(part_ml[(base + s) * 2] - m);
        }
        out[((u64)t * heads + h) * d + i] = a * inv;
    }
}

extern "C" __global__ void __launch_bounds__(128) attention_split(
    const float* q, int q_stride, const float* kc, const float* vc, const int* tables,
    const int* tok_table, const int* tok_pos, int heads, int kv_heads, int d, int window,
    float scale, int split_keys, float* part_ml, float* part_acc, int* counters, float* out) {
    __shared__ float sm_m[WARPS], sm_l[WARPS];
    __shared__ float sm_acc[WARPS][MAX_D_PER_LANE * 32];
    int t = blockIdx.x, h = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int pos = tok_pos[t];
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    int start = first + split * split_keys;
    int end = min(pos + 1, start + split_keys);
    int kvh = h / (heads / kv_heads), kv_dim = kv_heads * d;
    const int* table = tables + tok_table[t];
    const float* qh = q + (u64)t * q_stride + h * d;

    float qv[MAX_D_PER_LANE], acc[MAX_D_PER_LANE];
#pragma unroll
    for (int c = 0; c < MAX_D_PER_LANE; c++) {
        int i = lane + 32 * c;
        qv[c] = i < d ? qh[i] * scale : 0.0f;
        acc[c] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int j0 = start + warp * KEYS_AT_ONCE; j0 < end; j0 += WARPS * KEYS_AT_ONCE) {
        float kv[KEYS_AT_ONCE][MAX_D_PER_LANE], vv[KEYS_AT_ONCE][MAX_D_PER_LANE];
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            int j = j0 + u;
            bool valid = j < end;
            u64 slot = valid ? (u64)table[j / KV_BLOCK] * KV_BLOCK + j % KV_BLOCK : 0;
            const float* kp = kc + slot * kv_dim + kvh * d;
            const float* vp = vc + slot * kv_dim + kvh * d;
#pragma unroll
            for (int c = 0; c < MAX_D_PER_LANE; c++) {
                int i = lane + 32 * c;
                kv[u][c] = valid && i < d ? kp[i] : 0.0f;
                vv[u][c] = valid && i < d ? vp[i] : 0.0f;
            }
        }
        // Scores; keys past the end score -inf (weight 0). j0 < end: the first is a key.
        float dot[KEYS_AT_ONCE], m_new = m;
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            float s = 0.0f;
#pragma unroll
            for (int c = 0; c < MAX_D_PER_LANE; c++)
                if (lane + 32 * c < d) s += qv[c] * kv[u][c];
            dot[u] = warp_sum(s);
            if (j0 + u >= end) dot[u] = NEG_INF;
            m_new = fmaxf(m_new, dot[u]);
        }
        float corr = expf(m - m_new);  // 0 while m is -inf
        float p[KEYS_AT_ONCE], psum = 0.0f;
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            p[u] = expf(dot[u] - m_new);
            psum += p[u];
        }
        l = l * corr + psum;
#pragma unroll
        for (int c = 0; c < MAX_D_PER_LANE; c++) {
            if (lane + 32 * c < d) {
                float a = acc[c] * corr;
#pragma unroll
                for (int u = 0; u < KEYS_AT_ONCE; u++) a += p[u] * vv[u][c];
                acc[c] = a;
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < MAX_D_PER_LANE; c++) sm_acc[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    float mb = NEG_INF;
    for (int w = 0; w < WARPS; w++) mb = fmaxf(mb, sm_m[w]);
    u64 part = ((u64)t * heads + h) * splits + split;
    if (threadIdx.x == 0) {
        float lb = 0.0f;
        for (int w = 0; w < WARPS; w++)
            if (sm_l[w] > 0.0f) lb += sm_l[w] * expf(sm_m[w] - mb);
        part_ml[part * 2] = mb;
        part_ml[part * 2 + 1] = lb;
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < WARPS; w++)
            if (sm_l[w] > 0.0f) a += sm_acc[w][i] * expf(sm_m[w] - mb);
        part_acc[part * d + i] = a;
    }
    // Each thread's partials are visible device-wide before the block is counted; the block
    // that counts last sees every split's.
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = counters + (u64)t * heads + h;
        last = atomicAdd(counter, 1) == splits - 1;
        if (last) *counter = 0;  // zero again for the next pass (and graph replay)
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    merge_splits(part_ml, part_acc, t, h, heads, d, splits, out);
}

