// Matrix products y = x · Wᵀ with W [rows][cols] in its stored type (f32, f16, bf16), x and y in
// f32, accumulated in f32. y[t * rows + r] for token t < tokens.
//
// gemv_*: few tokens (decode), bound by reading W once: 16-byte loads, two rows a warp, up to
//   GEMV_TOKENS tokens per pass over the weights. gemv_norm_* take the residual stream and
//   apply the RMSNorm as they read it: one launch (and one activation round trip) fewer. (Not
//   SwiGLU: every warp reads all of its input, so a GEMV would compute each exp and division
//   once per row pair, about as many instructions as its loads leave room for.)
// gemm_*: many tokens (prefill, large batches): 64×64 output tiles staged in shared memory.
// With `accumulate`, y += the product (the residual add fused in).

#define GEMV_TOKENS 8
#define GEMV_ROWS 2
#define GEMV_UNROLL 2

// How a GEMV reads its input x[t][k] (k < cols): `load8` eight values from k (a multiple of
// 8, with cols one too), `at` one. `prologue` runs once per block, in every thread, first.

// The rows as they are.
struct InPlain {
    const float* x;
    int cols;
    __device__ __forceinline__ void prologue(int) {}
    __device__ __forceinline__ void load8(int t, int k, float* out) const {
        const float4* p = (const float4*)(x + (u64)t * cols + k);
        float4 a = p[0], b = p[1];
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    }
    __device__ __forceinline__ float at(int t, int k) const { return x[(u64)t * cols + k]; }
};

// RMSNorm of the rows with weight w, as norm.cu computes it: w * (x * 1/sqrt(mean(x²) + eps)).
// Each block sums the squares of its tokens' rows itself (they are read from L2), all tokens
// in one pass and one reduction, so that a pass of 8 tokens waits no longer than one of 1.
struct InNorm {
    const float* x;
    const float* w;
    float eps;
    int cols;
    float inv[GEMV_TOKENS];
    __device__ __forceinline__ void prologue(int tokens) {
        __shared__ float sums[8][GEMV_TOKENS];  // [warp][token]; blocks of at most 8 warps
        float ss[GEMV_TOKENS];
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) ss[t] = 0.0f;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
#pragma unroll
            for (int t = 0; t < GEMV_TOKENS; t++) {
                if (t < tokens) {
                    float v = x[(u64)t * cols + i];
                    ss[t] += v * v;
                }
            }
        }
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) {
            if (t < tokens) {  // the same in every thread: the shuffles stay converged
                float s = warp_sum(ss[t]);
                if (lane == 0) sums[warp][t] = s;
            }
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) {
            float total = 0.0f;
            if (t < tokens)
                for (int v = 0; v < warps; v++) total += sums[v][t];
            inv[t] = t < tokens ? 1.0f / sqrtf(total / (float)cols + eps) : 0.0f;
        }
    }
    __device__ __forceinline__ void load8(int t, int k, float* out) const {
        const float4* p = (const float4*)(x + (u64)t * cols + k);
        const float4* q = (const float4*)(w + k);
        float4 a = p[0], b = p[1], wa = q[0], wb = q[1];
        float r = inv[t];
        out[0] = wa.x * (a.x * r); out[1] = wa.y * (a.y * r);
        out[2] = wa.z * (a.z * r); out[3] = wa.w * (a.w * r);
        out[4] = wb.x * (b.x * r); out[5] = wb.y * (b.y * r);
        out[6] = wb.z * (b.z * r); out[7] = wb.w * (b.w * r);
    }
    __device__ __forceinline__ float at(int t, int k) const {
        return w[k] * (x[(u64)t * cols + k] * inv[t]);
    }
};

template <class W, class In>
__device__ void gemv(const typename W::T* __restrict__ w, In in, float* __restrict__ y, int rows,
                     int cols, int tokens, int wpr, int accumulate) {
    __shared__ float partial[8][GEMV_ROWS][GEMV_TOKENS];
    in.prologue(tokens);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r0 = (blockIdx.x * (8 / wpr) + warp / wpr) * GEMV_ROWS;
    int part = warp % wpr;
    float acc[GEMV_ROWS][GEMV_TOKENS];
#pragma unroll
    for (int j = 0; j < GEMV_ROWS; j++)
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) acc[j][t] = 0.0f;
    // Rows past the end read the last row again (and are not written).
    const typename W::T* row[GEMV_ROWS];
#pragma unroll
    for (int j = 0; j < GEMV_ROWS; j++) row[j] = w + (u64)min(r0 + j, rows - 1) * cols;
    if (r0 < rows) {
        if ((cols & 7) == 0) {
            int step = wpr * 256;
            for (int k0 = (part * 32 + lane) * 8; k0 < cols; k0 += GEMV_UNROLL * step) {
                float wv[GEMV_UNROLL][GEMV_ROWS][8];
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; u++)
                    if (k0 + u * step < cols)
#pragma unroll
                        for (int j = 0; j < GEMV_ROWS; j++) W::load8(row[j] + k0 + u * step, wv[u][j]);
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; u++) {
                    int k = k0 + u * step;
                    if (k < cols) {
#pragma unroll
                        for (int t = 0; t < GEMV_TOKENS; t++) {
                            if (t < tokens) {
                                float xv[8];
                                in.load8(t, k, xv);
#pragma unroll
                                for (int j = 0; j < GEMV_ROWS; j++)
                                    acc[j][t] += wv[u][j][0] * xv[0] + wv[u][j][1] * xv[1] +
                                                 wv[u][j][2] * xv[2] + wv[u][j][3] * xv[3] +
                                                 wv[u][j][4] * xv[4] + wv[u][j][5] * xv[5] +
                                                 wv[u][j][6] * xv[6] + wv[u][j][7] * xv[7];
                            }
                        }
                    }
                }
            }
        } else {
            for (int k = part * 32 + lane; k < cols; k += wpr * 32) {
#pragma unroll
                for (int j = 0; j < GEMV_ROWS; j++) {
                    float wk = W::at(row[j], k);
#pragma unroll
                    for (int t = 0; t < GEMV_TOKENS; t++)
                        if (t < tokens) acc[j][t] += wk * in.at(t, k);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < GEMV_ROWS; j++)
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) {
            float s = warp_sum(acc[j][t]);
            if (lane == 0) partial[warp][j][t] = s;
        }
    __syncthreads();
    // The first warp of each group writes: lane = row * GEMV_TOKENS + token.
    int j = lane / GEMV_TOKENS, t = lane % GEMV_TOKENS;
    if (part == 0 && j < GEMV_ROWS && t < tokens && r0 + j < rows) {
        float s = 0.0f;
        for (int p = 0; p < wpr; p++) s += partial[warp + p][j][t];
        u64 at = (u64)t * rows + r0 + j;
        y[at] = accumulate ? y[at] + s : s;
    }
}

#define TILE 64
#define TK 16

// 256 threads; thread (ty, tx) computes tokens ty*4..+4 × rows tx*4..+4 of the block's tile.
template <class W>
__device__ void gemm(const typename W::T* __restrict__ w, const float* __restrict__ x,
                     float* __restrict__ y, int rows, int cols, int tokens, int accumulate) {
    __shared__ float xs[TK][TILE + 4];
    __shared__ float ws[TK][TILE + 4];
    int r0 = blockIdx.x * TILE, t0 = blockIdx.y * TILE;
    int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < cols; k0 += TK) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int e = tid + i * 256, a = e >> 4, kk = e & 15, k = k0 + kk;
            int t = t0 + a, r = r0 + a;
            xs[kk][a] = (t < tokens && k < cols) ? x[(u64)t * cols + k] : 0.0f;
            ws[kk][a] = (r < rows && k < cols) ? W::at(w, (u64)r * cols + k) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; kk++) {
            float xa[4], wb[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                xa[i] = xs[kk][ty * 4 + i];
                wb[i] = ws[kk][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += xa[i] * wb[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = t0 + ty * 4 + i;
        if (t >= tokens) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = r0 + tx * 4 + j;
            if (r < rows) {
                u64 at = (u64)t * rows + r;
                y[at] = accumulate ? y[at] + acc[i][j] : acc[i][j];
            }
        }
    }
}

#define MATMUL_ENTRY(name, W)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gemv_##name(                                \
        const W::T* w, const float* x, float* y, int rows, int cols, int tokens, int wpr,         \
        int accumulate) {                                                                         \
        gemv<W>(w, InPlain{x, cols}, y, rows, cols, tokens, wpr, accumulate);                     \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemv_norm_##name(                           \
        const W::T* w, const float* x, const float* norm_w, float eps, float* y, int rows,        \
        int cols, int tokens, int wpr, int accumulate) {                                          \
        InNorm in{x, norm_w, eps, cols};                                                          \
        gemv<W>(w, in, y, rows, cols, tokens, wpr, accumulate);                                   \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemm_##name(                                \
        const W::T* w, const float* x, float* y, int rows, int cols, int tokens, int accumulate) { \
        gemm<W>(w, x, y, rows, cols, tokens, accumulate);                                         \
    }

MATMUL_ENTRY(f32, WF32)
MATMUL_ENTRY(f16, WF16)
MATMUL_ENTRY(bf16, WBF16)
