// Matrix products y = x · Wᵀ with W [rows][cols] in its stored type (f32, f16, bf16), x and y in
// f32, accumulated in f32. y[t * rows + r] for token t < tokens.
//
// gemv_*: few tokens (decode), bound by reading W once: 16-byte loads, two rows a warp, up to
//   GEMV_TOKENS tokens per pass over the weights, each step's loads issued before the step
//   before it is computed. gemv_norm_* take the residual stream and
//   apply the RMSNorm as they read it: one launch (and one activation round trip) fewer. (Not
//   SwiGLU: every warp reads all of its input, so a GEMV would compute each exp and division
//   once per row pair, about as many instructions as its loads leave room for.)
// gemm_*: many tokens (prefill, large batches): 64×64 output tiles staged in shared memory.
// With `accumulate`, y += the product (the residual add fused in).
//
// SwiGLU (`inter` > 0, the *_swiglu entry points and mma_bf16): W is the fused gate/up matrix,
// interleaved in runs of 8 rows (gate_row in common.cuh), and the kernel writes
// y[t * inter + i] = swiglu(gate i + bias, up i + bias) instead of the two products: a GEMV
// warp takes gate row i and up row i, an mma warp's two n8 tiles are 8 gate and the 8 matching
// up rows. `bias` (or null) is the interleaved rows' bias.

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
        WF32::load8(x + (u64)t * cols + k, out);
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

// Loads the raw weights of one GEMV step: GEMV_UNROLL column runs `step` apart from k, of each
// of the warp's rows (those past the end of the row are not loaded, and not used).
template <class W>
__device__ __forceinline__ void gemv_fetch(const typename W::T* const* row, int k, int step,
                                           int cols, typename W::Raw (&raw)[GEMV_UNROLL][GEMV_ROWS]) {
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++)
        if (k + u * step < cols)
#pragma unroll
            for (int j = 0; j < GEMV_ROWS; j++) raw[u][j] = W::fetch8(row[j] + k + u * step);
}

template <class W, class In>
__device__ void gemv(const typename W::T* __restrict__ w, In in, float* __restrict__ y, int rows,
                     int cols, int tokens, int wpr, int accumulate, int inter,
                     const float* __restrict__ bias) {
    __shared__ float partial[8][GEMV_ROWS][GEMV_TOKENS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // The warp's unit: a pair of rows r0, r0 + 1, or with SwiGLU output i = unit, from gate
    // row gate_row(i) and the up row 8 further.
    int unit = blockIdx.x * (8 / wpr) + warp / wpr;
    int r0 = inter > 0 ? (unit < inter ? gate_row(unit) : rows) : unit * GEMV_ROWS;
    int row_step = inter > 0 ? 8 : 1;
    int part = warp % wpr;
    float acc[GEMV_ROWS][GEMV_TOKENS];
#pragma unroll
    for (int j = 0; j < GEMV_ROWS; j++)
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) acc[j][t] = 0.0f;
    // Rows past the end read the last row again (and are not written).
    const typename W::T* row[GEMV_ROWS];
#pragma unroll
    for (int j = 0; j < GEMV_ROWS; j++) row[j] = w + (u64)min(r0 + j * row_step, rows - 1) * cols;
    // The weight loads are software-pipelined: a step's loads go out before the previous
    // step's products are computed. The first step's go out before the wait for the previous
    // kernel (the weights are no kernel's output), and before the norm's prologue.
    bool vectors = r0 < rows && (cols & 7) == 0;
    int step = wpr * 256;
    int k0 = (part * 32 + lane) * 8;
    typename W::Raw raw[GEMV_UNROLL][GEMV_ROWS];
    if (vectors) gemv_fetch<W>(row, k0, step, cols, raw);
    grid_dependency_sync();
    in.prologue(tokens);
    if (vectors) {
        for (; k0 < cols; k0 += GEMV_UNROLL * step) {
            typename W::Raw cur[GEMV_UNROLL][GEMV_ROWS];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
                for (int j = 0; j < GEMV_ROWS; j++) cur[u][j] = raw[u][j];
            gemv_fetch<W>(row, k0 + GEMV_UNROLL * step, step, cols, raw);
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) {
                int k = k0 + u * step;
                if (k < cols) {
                    // Widened one step at a time: fewer registers than the whole batch.
                    float wv[GEMV_ROWS][8];
#pragma unroll
                    for (int j = 0; j < GEMV_ROWS; j++) W::widen8(cur[u][j], wv[j]);
#pragma unroll
                    for (int t = 0; t < GEMV_TOKENS; t++) {
                        if (t < tokens) {
                            float xv[8];
                            in.load8(t, k, xv);
#pragma unroll
                            for (int j = 0; j < GEMV_ROWS; j++)
                                acc[j][t] += wv[j][0] * xv[0] + wv[j][1] * xv[1] +
                                             wv[j][2] * xv[2] + wv[j][3] * xv[3] +
                                             wv[j][4] * xv[4] + wv[j][5] * xv[5] +
                                             wv[j][6] * xv[6] + wv[j][7] * xv[7];
                        }
                    }
                }
            }
        }
    } else if (r0 < rows) {
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
    if (part != 0 || j >= GEMV_ROWS || t >= tokens) return;
    if (inter > 0) {
        if (j != 0 || unit >= inter) return;
        float g = 0.0f, u = 0.0f;
        for (int p = 0; p < wpr; p++) {
            g += partial[warp + p][0][t];
            u += partial[warp + p][1][t];
        }
        if (bias) {
            g += bias[r0];
            u += bias[r0 + 8];
        }
        y[(u64)t * inter + unit] = swiglu(g, u);
    } else if (r0 + j < rows) {
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
__device__ void gemm(const typename W::T* __restrict__ w, const float* x,
                     float* __restrict__ y, int rows, int cols, int tokens, int accumulate) {
    __shared__ float xs[TK][TILE + 4];
    __shared__ float ws[TK][TILE + 4];
    grid_dependency_sync();
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

// mma_bf16: products of 2 or more tokens with bf16 weights on the tensor cores (sm_80 and
// later), m16n8k16 with f32 accumulators. The f32 input is split into two bf16 parts,
// hi = bf16(x) and lo = bf16(x - hi), and each part is multiplied (two mmas): the input
// keeps 16 significant bits (error within 2^-18 of |x|, against f32's 2^-24), the products
// are exact and summed in f32, so the result is within about 1e-5 of what the f32 GEMV
// computes instead of bf16 rounding's 1e-3.
//
// A warp computes 16 rows of W (two n8 tiles) for up to 64 tokens (four m16 tiles) over its
// share of the columns; `wpr` warps share a row group (columns dealt in chunks of 32) and sum
// in shared memory. blockIdx.x picks the 64-token tile and blockIdx.y the rows, so that the
// blocks that read the same rows of W run one after another (the second read comes from L2). In a chunk, lane (group g, index q)
// loads 8 consecutive columns 8q..8q+7 of W rows g and 8 + g (one 16-byte load each) and of
// the input rows; the mma's k order is a permutation of the chunk's columns, the same for
// A and B: step s takes columns 8q + 4s + {0, 1} as k = 2q + {0, 1} and 8q + 4s + {2, 3} as
// k = 8 + 2q + {0, 1}. Needs cols % 8 == 0 (the backend checks).
#define MMA_TILES_M 4
#define MMA_ROWS 16

__device__ __forceinline__ u32 pack_bf16(u32 lo_col, u32 hi_col) { return lo_col | (hi_col << 16); }

// The 8 columns from k of a lane's two W rows, zeros past the end (cols % 8 == 0).
__device__ __forceinline__ void mma_fetch(const u16* const* wrow, int k, int cols, uint4* out) {
#pragma unroll
    for (int n = 0; n < 2; n++)
        out[n] = k < cols ? *(const uint4*)(wrow[n] + k) : uint4{0u, 0u, 0u, 0u};
}

// Three blocks a multiprocessor (at most 85 registers a thread; sm_90 needs 80 with no spills):
// the weight prefetch would otherwise take it to 93 registers and two blocks.
extern "C" __global__ void __launch_bounds__(256, 3) mma_bf16(const u16* __restrict__ w,
                                                           const float* x,
                                                           float* __restrict__ y, int rows,
                                                           int cols, int tokens, int wpr,
                                                           int accumulate, int inter,
                                                           const float* __restrict__ bias) {
    // The accumulators, acc[(m * 2 + n) * 4 + r]: m16 tile m, n8 tile n, register r.
    const int ACC = MMA_TILES_M * 2 * 4;
    __shared__ float partial[8][ACC][32];  // [warp][accumulator][lane]
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int n0 = (blockIdx.y * (8 / wpr) + warp / wpr) * MMA_ROWS;
    int part = warp % wpr;
    int t0 = blockIdx.x * (16 * MMA_TILES_M);
    int mtiles = min(MMA_TILES_M, (tokens - t0 + 15) / 16);
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.0f;
    // Rows past the end of W or of the input read the last one again (and are not written).
    const u16* wrow[2];
#pragma unroll
    for (int n = 0; n < 2; n++) wrow[n] = w + (u64)min(n0 + 8 * n + g, rows - 1) * cols;
    // The weights of a chunk are loaded while the previous chunk's mmas run, the first
    // chunk's before the wait for the previous kernel (the weights are no kernel's output).
    uint4 next[2];
    mma_fetch(wrow, part * 32 + 8 * q, cols, next);
    grid_dependency_sync();
    if (n0 < rows) {
        for (int c = part; c * 32 < cols; c += wpr) {
            int k = c * 32 + 8 * q;
            bool in = k < cols;  // cols % 8 == 0: a lane's 8 columns are all in or all out
            uint4 wv[2] = {next[0], next[1]};
            mma_fetch(wrow, k + wpr * 32, cols, next);
#pragma unroll
            for (int m = 0; m < MMA_TILES_M; m++) {
                if (m >= mtiles) continue;  // the same in every lane: the mmas stay converged
                // hi[h][j], lo[h][j]: columns 8q + 2j, 8q + 2j + 1 of input row g + 8h.
                u32 hi[2][4], lo[2][4];
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    int t = min(t0 + 16 * m + 8 * h + g, tokens - 1);
                    float v[8];
                    if (in) {
                        WF32::load8(x + (u64)t * cols + k, v);
                    } else {
#pragma unroll
                        for (int e = 0; e < 8; e++) v[e] = 0.0f;
                    }
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        u32 h0 = bf16_bits(v[2 * j]), h1 = bf16_bits(v[2 * j + 1]);
                        u32 l0 = bf16_bits(v[2 * j] - __uint_as_float(h0 << 16));
                        u32 l1 = bf16_bits(v[2 * j + 1] - __uint_as_float(h1 << 16));
                        hi[h][j] = pack_bf16(h0, h1);
                        lo[h][j] = pack_bf16(l0, l1);
                    }
                }
#pragma unroll
                for (int s = 0; s < 2; s++) {
                    u32 ahi[4] = {hi[0][2 * s], hi[1][2 * s], hi[0][2 * s + 1], hi[1][2 * s + 1]};
                    u32 alo[4] = {lo[0][2 * s], lo[1][2 * s], lo[0][2 * s + 1], lo[1][2 * s + 1]};
#pragma unroll
                    for (int n = 0; n < 2; n++) {
                        u32 b0 = s == 0 ? wv[n].x : wv[n].z, b1 = s == 0 ? wv[n].y : wv[n].w;
                        mma_bf16_16816(acc + (m * 2 + n) * 4, ahi, b0, b1);
                        mma_bf16_16816(acc + (m * 2 + n) * 4, alo, b0, b1);
                    }
                }
            }
        }
    }
    if (wpr > 1) {
#pragma unroll
        for (int i = 0; i < ACC; i++) partial[warp][i][lane] = acc[i];
        __syncthreads();
        if (part != 0) return;
#pragma unroll
        for (int i = 0; i < ACC; i++) {
            float sum = 0.0f;
            for (int p = 0; p < wpr; p++) sum += partial[warp + p][i][lane];
            acc[i] = sum;
        }
    }
#pragma unroll
    for (int i = 0; i < ACC; i++) {
        int m = i / 8, n = (i / 4) % 2, r = i % 4;
        int t = t0 + 16 * m + g + (r >= 2 ? 8 : 0), row = n0 + 8 * n + 2 * q + (r & 1);
        if (m >= mtiles || t >= tokens) continue;
        if (inter > 0) {
            // Tile 0 holds gate rows, tile 1 the matching up rows: output n0 / 2 + column.
            int out = n0 / 2 + 2 * q + (r & 1);
            if (n == 0 && out < inter) {
                float gv = acc[i], uv = acc[i + 4];
                if (bias) {
                    gv += bias[row];
                    uv += bias[row + 8];
                }
                y[(u64)t * inter + out] = swiglu(gv, uv);
            }
        } else if (row < rows) {
            u64 at = (u64)t * rows + row;
            y[at] = accumulate ? y[at] + acc[i] : acc[i];
        }
    }
}

#define MATMUL_ENTRY(name, W)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gemv_##name(                                \
        const W::T* w, const float* x, float* y, int rows, int cols, int tokens, int wpr,         \
        int accumulate) {                                                                         \
        gemv<W>(w, InPlain{x, cols}, y, rows, cols, tokens, wpr, accumulate, 0, nullptr);         \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemv_norm_##name(                           \
        const W::T* w, const float* x, const float* norm_w, float eps, float* y, int rows,        \
        int cols, int tokens, int wpr, int accumulate) {                                          \
        InNorm in{x, norm_w, eps, cols};                                                          \
        gemv<W>(w, in, y, rows, cols, tokens, wpr, accumulate, 0, nullptr);                      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemv_norm_swiglu_##name(                    \
        const W::T* w, const float* x, const float* norm_w, float eps, const float* bias,         \
        float* y, int rows, int cols, int tokens, int wpr, int inter) {                           \
        InNorm in{x, norm_w, eps, cols};                                                          \
        gemv<W>(w, in, y, rows, cols, tokens, wpr, 0, inter, bias);                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemm_##name(                                \
        const W::T* w, const float* x, float* y, int rows, int cols, int tokens, int accumulate) { \
        gemm<W>(w, x, y, rows, cols, tokens, accumulate);                                         \
    }

MATMUL_ENTRY(f32, WF32)
MATMUL_ENTRY(f16, WF16)
MATMUL_ENTRY(bf16, WBF16)
