// Attention over the paged KV cache, for decode tokens and prefill chunks alike, split along
// the keys (flash-decoding) so that long contexts use the whole GPU.
//
// attention_split: one block per (token, group of up to 8 query heads that share a KV head,
// split of `split_keys` keys), so that each key and value the block loads serves every head of
// the group (from L1) instead of being read from L2 once per head. The block's warps are
// `group_heads` heads × `blockDim.x / 32 / group_heads` streams of keys; each warp walks every
// so-many-th run of 4 keys of the split with its own online softmax (running max m, sum l,
// weighted values acc), loading a run's keys and values before scoring any, so that their
// load latencies overlap. The warps of a head merge, and the block writes (m, l, acc) per head
// for its split. The last block of a (token, head group) to finish (counted in `counters`,
// which start and end at zero) merges the splits of each of its heads into the output row, in
// split order whichever block it is: no second launch.
//
// q rows: q_stride floats per token, head h at h * d. Cache: [slot][kv_head][d] in f32 or f16
// (the kernels named attention_split_f32_* or _f16_*), slot =
// block_table[pos / 16] * 16 + pos % 16. Token t attends to positions first..=pos[t], first =
// pos - window + 1 with a sliding window (window > 0), else 0. head_dim d <= 256; one kernel
// per bound on d (_d32, _d64, _d128, _d256: DPL = d / 32 values a lane), so
// that a warp's registers hold only what d needs and 8 keys' keys and values fit at once.

#define KV_BLOCK 16
#define MAX_D_PER_LANE 8
#define MAX_WARPS 8

// Merges the splits' (m, l, acc) of (token t, head h) into out: [token][heads * d]; called by
// every thread of the block. The partials were written by other blocks: read through volatile
// pointers, not from L1, each (m, l) once: the split weights exp(m_s - m) go to shared memory
// before the d outputs sum their splits.
#define MAX_SPLITS 64
__device__ void merge_splits(const volatile float* part_ml, const volatile float* part_acc,
                             int t, int h, int heads, int d, int splits, float* out) {
    __shared__ float sm_ms[MAX_SPLITS], sm_ls[MAX_SPLITS], sm_w[MAX_SPLITS];
    __shared__ float sm_inv;
    u64 base = ((u64)t * heads + h) * splits;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        sm_ms[s] = part_ml[(base + s) * 2];
        sm_ls[s] = part_ml[(base + s) * 2 + 1];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = NEG_INF;
        for (int s = 0; s < splits; s++)
            if (sm_ls[s] > 0.0f) m = fmaxf(m, sm_ms[s]);
        float l = 0.0f;
        for (int s = 0; s < splits; s++) {
            float w = sm_ls[s] > 0.0f ? expf(sm_ms[s] - m) : 0.0f;
            sm_w[s] = w;
            if (sm_ls[s] > 0.0f) l += sm_ls[s] * w;
        }
        sm_inv = 1.0f / l;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < splits; s++)
            if (sm_ls[s] > 0.0f) a += part_acc[(base + s) * d + i] * sm_w[s];
        out[((u64)t * heads + h) * d + i] = a * sm_inv;
    }
    __syncthreads();  // the shared arrays are reused for the block's next head
}

template <class KV, int DPL, int KEYS_AT_ONCE>
__device__ void attention_split(const float* q, int q_stride, const typename KV::T* kc,
                                const typename KV::T* vc,
                                const int* tables, const int* tok_table, const int* tok_pos,
                                int heads, int kv_heads, int d, int window, float scale,
                                int split_keys, int group_heads, float* part_ml,
                                float* part_acc, int* counters, float* out) {
    grid_dependency_sync();
    __shared__ float sm_m[MAX_WARPS], sm_l[MAX_WARPS];
    __shared__ float sm_acc[MAX_WARPS][MAX_D_PER_LANE * 32];
    int t = blockIdx.x, split = blockIdx.z, splits = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int streams = (blockDim.x >> 5) / group_heads;  // warps per head
    int per_kv = heads / kv_heads, groups = (per_kv + group_heads - 1) / group_heads;
    int kvh = blockIdx.y / groups, h0 = kvh * per_kv + (blockIdx.y % groups) * group_heads;
    int in_block = min(group_heads, kvh * per_kv + per_kv - h0);  // heads of this block
    int hl = warp / streams, stream = warp % streams;
    int pos = tok_pos[t];
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    int start = first + split * split_keys;
    // A warp past the group's last head walks no keys (it still meets the barriers).
    int end = hl < in_block ? min(pos + 1, start + split_keys) : start;
    int kv_dim = kv_heads * d;
    const int* table = tables + tok_table[t];
    const float* qh = q + (u64)t * q_stride + (h0 + min(hl, in_block - 1)) * d;

    float qv[DPL], acc[DPL];
#pragma unroll
    for (int c = 0; c < DPL; c++) {
        int i = lane + 32 * c;
        qv[c] = i < d ? qh[i] * scale : 0.0f;
        acc[c] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int j0 = start + stream * KEYS_AT_ONCE; j0 < end; j0 += streams * KEYS_AT_ONCE) {
        float kv[KEYS_AT_ONCE][DPL], vv[KEYS_AT_ONCE][DPL];
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            int j = j0 + u;
            bool valid = j < end;
            u64 slot = valid ? (u64)table[j / KV_BLOCK] * KV_BLOCK + j % KV_BLOCK : 0;
            const typename KV::T* kp = kc + slot * kv_dim + kvh * d;
            const typename KV::T* vp = vc + slot * kv_dim + kvh * d;
#pragma unroll
            for (int c = 0; c < DPL; c++) {
                int i = lane + 32 * c;
                kv[u][c] = valid && i < d ? KV::at(kp, i) : 0.0f;
                vv[u][c] = valid && i < d ? KV::at(vp, i) : 0.0f;
            }
        }
        // Scores; keys past the end score -inf (weight 0). j0 < end: the first is a key.
        float dot[KEYS_AT_ONCE], m_new = m;
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            float s = 0.0f;
#pragma unroll
            for (int c = 0; c < DPL; c++)
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
        for (int c = 0; c < DPL; c++) {
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
    for (int c = 0; c < DPL; c++) sm_acc[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    // The partials of each head: its warps' (m, l, acc) merged, in warp order.
    for (int e = threadIdx.x; e < in_block * d; e += blockDim.x) {
        int hh = e / d, i = e % d, w0 = hh * streams;
        float mb = NEG_INF;
        for (int w = w0; w < w0 + streams; w++) mb = fmaxf(mb, sm_m[w]);
        u64 part = ((u64)t * heads + h0 + hh) * splits + split;
        float a = 0.0f, lb = 0.0f;
        for (int w = w0; w < w0 + streams; w++) {
            if (sm_l[w] > 0.0f) {
                float f = expf(sm_m[w] - mb);
                a += sm_acc[w][i] * f;
                lb += sm_l[w] * f;
            }
        }
        part_acc[part * d + i] = a;
        if (i == 0) {
            part_ml[part * 2] = mb;
            part_ml[part * 2 + 1] = lb;
        }
    }
    // Each thread's partials are visible device-wide before the block is counted; the block
    // that counts last sees every split's.
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = counters + (u64)t * gridDim.y + blockIdx.y;
        last = atomicAdd(counter, 1) == splits - 1;
        if (last) *counter = 0;  // zero again for the next pass (and graph replay)
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int hh = 0; hh < in_block; hh++)
        merge_splits(part_ml, part_acc, t, h0 + hh, heads, d, splits, out);
}

#define ATTENTION_ENTRY(name, KV, DPL, KEYS)                                                      \
    extern "C" __global__ void __launch_bounds__(256) attention_split_##name(                    \
        const float* q, int q_stride, const KV::T* kc, const KV::T* vc, const int* tables,      \
        const int* tok_table, const int* tok_pos, int heads, int kv_heads, int d, int window,   \
        float scale, int split_keys, int group_heads, float* part_ml, float* part_acc,          \
        int* counters, float* out) {                                                            \
        attention_split<KV, DPL, KEYS>(q, q_stride, kc, vc, tables, tok_table, tok_pos, heads,  \
                                       kv_heads, d, window, scale, split_keys, group_heads,     \
                                       part_ml, part_acc, counters, out);                       \
    }

// Keys at once: 8 while a lane's 8 keys and values take at most 32 registers, else fewer.
// Per cache type: f32, and f16 (widened as it is read).
ATTENTION_ENTRY(f32_d32, WF32, 1, 8)
ATTENTION_ENTRY(f32_d64, WF32, 2, 8)
ATTENTION_ENTRY(f32_d128, WF32, 4, 4)
ATTENTION_ENTRY(f32_d256, WF32, 8, 2)
ATTENTION_ENTRY(f16_d32, WF16, 1, 8)
ATTENTION_ENTRY(f16_d64, WF16, 2, 8)
ATTENTION_ENTRY(f16_d128, WF16, 4, 4)
ATTENTION_ENTRY(f16_d256, WF16, 8, 2)
