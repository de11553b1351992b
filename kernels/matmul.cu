// Matrix products y = x · Wᵀ with W [rows][cols] in its stored type (f32, f16, bf16), x and y in
// f32, accumulated in f32. y[t * rows + r] for token t < tokens.
//
// gemv_*: few tokens (decode), bound by reading W once: 16-byte loads, two rows a warp, up to
//   GEMV_TOKENS tokens per pass over the weights.
// gemm_*: many tokens (prefill, large batches): 64×64 output tiles staged in shared memory.
// With `accumulate`, y += the product (the residual add fused in).

#define GEMV_TOKENS 8
#define GEMV_ROWS 2
#define GEMV_UNROLL 2

// y[t * rows + r] (+)= x[t] · W[r] for t < tokens (<= GEMV_TOKENS), bound by reading W once.
// Blocks of 256 threads (8 warps). A warp computes GEMV_ROWS rows, so that each input value it
// loads serves several rows; `wpr` warps (1, 2, 4 or 8) share those rows, each taking every
// wpr-th 256-element chunk, so that short, wide matrices still fill the GPU (their sums meet
// in shared memory). Each lane keeps GEMV_ROWS * GEMV_UNROLL 16-byte weight loads in flight.
template <class W>
__device__ void gemv(const typename W::T* __restrict__ w, const float* __restrict__ x,
                     float* __restrict__ y, int rows, int cols, int tokens, int wpr,
                     int accumulate) {
    __shared__ float partial[8][GEMV_ROWS][GEMV_TOKENS];
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
                                const float4* xp = (const float4*)(x + (u64)t * cols + k);
                                float4 a = xp[0], b = xp[1];
#pragma unroll
                                for (int j = 0; j < GEMV_ROWS; j++)
                                    acc[j][t] += wv[u][j][0] * a.x + wv[u][j][1] * a.y +
                                                 wv[u][j][2] * a.z + wv[u][j][3] * a.w +
                                                 wv[u][j][4] * b.x + wv[u][j][5] * b.y +
                                                 wv[u][j][6] * b.z + wv[u][j][7] * b.w;
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
                        if (t < tokens) acc[j][t] += wk * x[(u64)t * cols + k];
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
        gemv<W>(w, x, y, rows, cols, tokens, wpr, accumulate);                                    \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemm_##name(                                \
        const W::T* w, const float* x, float* y, int rows, int cols, int tokens, int accumulate) { \
        gemm<W>(w, x, y, rows, cols, tokens, accumulate);                                         \
    }

MATMUL_ENTRY(f32, WF32)
MATMUL_ENTRY(f16, WF16)
MATMUL_ENTRY(bf16, WBF16)
