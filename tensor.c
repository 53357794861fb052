/* tensor.c - float32 tensors and the kernels: GEMM, conv, attention, norms, activations.
 * Every forward kernel sits next to its backward. */
#include "tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- tensors ---------------------------------------------------------------------------- */

/* Element count of a shape, or -1 when invalid or past what we allow (2^40 floats). */
static int64_t shape_numel(int ndim, const int64_t *shape) {
    if (ndim < 1 || ndim > TENSOR_MAX_DIMS) return -1;
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] > 0 && n > ((int64_t)1 << 40) / shape[i])) return -1;
        n *= shape[i];
    }
    return n;
}

static Tensor *tensor_header(int ndim, const int64_t *shape) {
    int64_t n = shape_numel(ndim, shape);
    if (n < 0) return NULL;
    Tensor *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->numel = n;
    return t;
}

Tensor *tensor_new(int ndim, const int64_t *shape) {
    Tensor *t = tensor_header(ndim, shape);
    if (!t) return NULL;
    t->data = calloc(t->numel > 0 ? (size_t)t->numel : 1, sizeof(float));
    if (!t->data) {
        free(t);
        return NULL;
    }
    t->owns_data = true;
    return t;
}

Tensor *tensor_view(float *data, int ndim, const int64_t *shape) {
    Tensor *t = tensor_header(ndim, shape);
    if (t) t->data = data;
    return t;
}

Tensor *tensor_reshape(const Tensor *t, int ndim, const int64_t *shape) {
    if (shape_numel(ndim, shape) != t->numel) return NULL;
    return tensor_view(t->data, ndim, shape);
}

Tensor *tensor_clone(const Tensor *t) {
    Tensor *c = tensor_new(t->ndim, t->shape);
    if (c) memcpy(c->data, t->data, (size_t)t->numel * sizeof(float));
    return c;
}

void tensor_free(Tensor *t) {
    if (!t) return;
    if (t->owns_data) free(t->data);
    free(t);
}

bool tensor_same_shape(const Tensor *a, const Tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

const char *tensor_shape_str(const Tensor *t, char *buf, size_t len) {
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < t->ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (used < len) snprintf(buf + used, len - used, "]");
    return buf;
}

/* ---- section: GEMM (owned by the gemm work) --------------------------------------------- */

void gemm_reference(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                float a = trans_a ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = trans_b ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += (double)a * b;
            }
            float prior = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
            C[(size_t)i * ldc + j] = alpha * (float)acc + prior;
        }
}

/* The blocked GEMM, in the BLIS / GotoBLAS way. Loops, outermost first:
 *   rows of C in blocks of up to GEMM_MC      A block [mc, kc] packed once, shared by the threads
 *     K in blocks of GEMM_KC                  (the only split of the K-sum: fixed by K alone)
 *       work items: column blocks of up to GEMM_NC (x row chunks when N is narrow), in parallel;
 *       each item packs its own B block [kc, nb] (it stays in the core's L2)
 *         rows in steps of GEMM_MR            A micro-panel [kc, MR] stays in L1
 *           columns in steps of GEMM_NR       micro-kernel: C tile [MR, NR] from the two panels
 * Packing copies op(A) and op(B) into the layout the micro-kernel streams, so one kernel serves
 * all four transpose cases, and zero-pads the edge panels so the kernel always computes a full
 * tile (it writes only the part inside C).
 * Every C element is the same sequence of operations whatever the thread count: its K-sum runs
 * in k order inside the kernel, block by block, and blocks are added to C in order. */

#if defined(__AVX512F__)
#define GEMM_AVX512
/* 24 zmm accumulators: 12 rows x 2 vectors of 16 columns. */
#define GEMM_MR 12
#define GEMM_NR 32
#elif defined(__AVX2__) && defined(__FMA__)
#define GEMM_AVX2
/* 12 ymm accumulators: 6 rows x 2 vectors of 8 columns. */
#define GEMM_MR 6
#define GEMM_NR 16
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define GEMM_NEON
/* 24 q-register accumulators: 8 rows x 3 vectors of 4 columns. */
#define GEMM_MR 8
#define GEMM_NR 12
#else
#define GEMM_MR 4
#define GEMM_NR 8
#endif

/* Cache blocks for ~48 KB L1d and ~2 MB L2 per core: an A micro-panel (KC x MR floats, 18 KB
 * at MR = 12) lives in L1, a B block (KC x NC, 720 KB) in L2, the shared A block (MC x KC,
 * 1.4 MB) in L3. MC and NC are multiples of every MR and NR above. */
#define GEMM_KC 384
#define GEMM_MC 960
#define GEMM_NC 480
/* The packer moves a transposed source in runs of one 64-byte line per lane. */
#define GEMM_PACK_CHUNK 16

/* Below about a million multiply-adds (~10 us on one core) starting a parallel region costs
 * about what it saves. */
#define GEMM_PARALLEL_MIN_WORK (1 << 20)

#ifdef _OPENMP
#define GEMM_OMP(directive) _Pragma(#directive)
#else
#define GEMM_OMP(directive)
#endif

#if defined(GEMM_AVX512) || defined(GEMM_AVX2)
#include <immintrin.h>
#elif defined(GEMM_NEON)
#include <arm_neon.h>
#endif

static int gemm_min(int a, int b) { return a < b ? a : b; }
static int gemm_ceil_div(int a, int b) { return (a + b - 1) / b; }
static int gemm_round_up(int a, int b) { return gemm_ceil_div(a, b) * b; }

/* The micro-kernel, one per instruction set, all with this contract:
 *   a: [kc][MR], b: [kc][NR] packed panels, C: [m, n] with m <= MR, n <= NR (row stride ldc)
 *   C = alpha * (sum over k of a[k] (outer) b[k]) + beta * C;   beta == 0 never reads C.
 * Each element accumulates k = 0, 1, ... in order, with a fused multiply-add where the
 * instruction set has one. Partial tiles (m < MR or n < NR) occur only at the edges of C. */
#if defined(GEMM_AVX512)
/* The lanes of 16 columns, starting at column `first`, that lie inside the first n columns. */
static __mmask16 gemm_mask16(int n, int first) {
    int live = n - first;
    return live >= 16 ? (__mmask16)0xFFFF : live <= 0 ? (__mmask16)0 : (__mmask16)((1u << live) - 1);
}

static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        for (int i = 0; i < GEMM_MR; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    __mmask16 lo = gemm_mask16(n, 0), hi = gemm_mask16(n, 16);
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    for (int i = 0; i < GEMM_MR && i < m; i++) {
        float *c = C + (size_t)i * ldc;
        __m512 c0 = _mm512_mul_ps(va, acc[i][0]), c1 = _mm512_mul_ps(va, acc[i][1]);
        if (beta != 0.0f) {
            c0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(lo, c), c0);
            c1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(hi, c + 16), c1);
        }
        _mm512_mask_storeu_ps(c, lo, c0);
        _mm512_mask_storeu_ps(c + 16, hi, c1);
    }
}
#elif defined(GEMM_AVX2)
/* The lanes of 8 columns, starting at column `first`, that lie inside the first n columns. */
static __m256i gemm_mask8(int n, int first) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    __m256 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int i = 0; i < GEMM_MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    __m256i lo = gemm_mask8(n, 0), hi = gemm_mask8(n, 8);
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    for (int i = 0; i < GEMM_MR && i < m; i++) {
        float *c = C + (size_t)i * ldc;
        __m256 c0 = _mm256_mul_ps(va, acc[i][0]), c1 = _mm256_mul_ps(va, acc[i][1]);
        if (beta != 0.0f) {
            c0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(c, lo), c0);
            c1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(c + 8, hi), c1);
        }
        _mm256_maskstore_ps(c, lo, c0);
        _mm256_maskstore_ps(c + 8, hi, c1);
    }
}
#else
/* C: [m, n] (row stride ldc) = alpha * tile + beta * C, tile: [MR, NR]. */
static void gemm_tile_update(int m, int n, float alpha, const float *tile, float beta, float *C,
                             int ldc) {
    for (int i = 0; i < m; i++) {
        float *c = C + (size_t)i * ldc;
        const float *t = tile + i * GEMM_NR;
        if (beta == 0.0f)
            for (int j = 0; j < n; j++) c[j] = alpha * t[j];
        else
            for (int j = 0; j < n; j++) c[j] = alpha * t[j] + beta * c[j];
    }
}

#if defined(GEMM_NEON)
static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    float32x4_t acc[GEMM_MR][3];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = acc[i][2] = vdupq_n_f32(0.0f);
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        float32x4_t b0 = vld1q_f32(b), b1 = vld1q_f32(b + 4), b2 = vld1q_f32(b + 8);
        for (int i = 0; i < GEMM_MR; i++) {
            float32x4_t ai = vdupq_n_f32(a[i]);
            acc[i][0] = vfmaq_f32(acc[i][0], ai, b0);
            acc[i][1] = vfmaq_f32(acc[i][1], ai, b1);
            acc[i][2] = vfmaq_f32(acc[i][2], ai, b2);
        }
    }
    float tile[GEMM_MR * GEMM_NR];
    for (int i = 0; i < GEMM_MR; i++) {
        vst1q_f32(tile + i * GEMM_NR, acc[i][0]);
        vst1q_f32(tile + i * GEMM_NR + 4, acc[i][1]);
        vst1q_f32(tile + i * GEMM_NR + 8, acc[i][2]);
    }
    gemm_tile_update(m, n, alpha, tile, beta, C, ldc);
}
#else
/* The portable kernel: the plain formula, which compilers vectorise well enough. */
static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR)
        for (int i = 0; i < GEMM_MR; i++)
            for (int j = 0; j < GEMM_NR; j++) acc[i][j] += a[i] * b[j];
    gemm_tile_update(m, n, alpha, &acc[0][0], beta, C, ldc);
}
#endif
#endif

/* Packs `lanes` (<= width) lanes of `depth` elements into one micro-panel dst: [depth][width],
 * zero-filling lanes lanes..width-1. Element (lane l, depth k) of the source is
 * src[l * lane_stride + k * depth_stride]. When a lane is contiguous in the source the copy is a
 * transpose: it goes a line of each lane at a time, so reads and writes both stay in L1. */
static void gemm_pack_panel(const float *src, ptrdiff_t lane_stride, ptrdiff_t depth_stride,
                            int lanes, int depth, int width, float *dst) {
    if (depth_stride == 1) {
        for (int k0 = 0; k0 < depth; k0 += GEMM_PACK_CHUNK)
            for (int l = 0; l < lanes; l++)
                for (int k = k0; k < gemm_min(k0 + GEMM_PACK_CHUNK, depth); k++)
                    dst[(size_t)k * width + l] = src[l * lane_stride + k];
    } else {
        for (int k = 0; k < depth; k++)
            for (int l = 0; l < lanes; l++)
                dst[(size_t)k * width + l] = src[l * lane_stride + k * depth_stride];
    }
    for (int k = 0; k < depth; k++)
        for (int l = lanes; l < width; l++) dst[(size_t)k * width + l] = 0.0f;
}

/* How one call splits its work. Row blocks of C are mc rows; inside one, the work items are
 * a grid of row_chunk x col_block pieces, col_block a multiple of NR, row_chunk of MR. */
typedef struct GemmPlan {
    int threads;
    int mc;        /* rows per A block */
    int col_block; /* columns per work item */
    int row_chunk; /* rows per work item inside an A block */
} GemmPlan;

/* Equal-sized blocks (rounded up to the tile size) so the threads get equal work: column blocks
 * number a multiple of the thread count when N allows, and narrow products are split by rows. */
static GemmPlan gemm_plan(int M, int N, int K, int max_threads) {
    GemmPlan p;
    double work = (double)M * N * K;
    p.threads = work < GEMM_PARALLEL_MIN_WORK ? 1 : max_threads;
    p.mc = gemm_round_up(gemm_ceil_div(M, gemm_ceil_div(M, GEMM_MC)), GEMM_MR);
    int col_tiles = gemm_ceil_div(N, GEMM_NR);
    int col_blocks = gemm_round_up(gemm_ceil_div(N, GEMM_NC), p.threads);
    col_blocks = gemm_min(col_blocks, col_tiles);
    p.col_block = gemm_round_up(gemm_ceil_div(N, col_blocks), GEMM_NR);
    col_blocks = gemm_ceil_div(N, p.col_block);
    int row_chunks = gemm_min(gemm_ceil_div(p.threads, col_blocks), gemm_ceil_div(p.mc, GEMM_MR));
    p.row_chunk = gemm_round_up(gemm_ceil_div(p.mc, row_chunks), GEMM_MR);
    p.threads = gemm_min(p.threads, col_blocks * gemm_ceil_div(p.mc, p.row_chunk));
    return p;
}

/* Strides of op(X)[r][k] in X for the packer: lane = the row (of A) or column (of B) index. */
typedef struct GemmOperand {
    const float *data;
    ptrdiff_t lane_stride, depth_stride;
} GemmOperand;

static int gemm_thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* One work item: rows [i0, i0 + m) and columns [j0, j0 + n) of C for the depth block
 * [p0, p0 + kc). a_block holds the packed rows of this A block starting at row i0. */
static void gemm_item(const GemmOperand *b_op, int p0, int kc, int i0, int m, int j0, int n,
                      const float *a_block, float *b_block, float alpha, float beta, float *C,
                      int ldc) {
    for (int j = 0; j < n; j += GEMM_NR)
        gemm_pack_panel(b_op->data + (j0 + j) * b_op->lane_stride + p0 * b_op->depth_stride,
                        b_op->lane_stride, b_op->depth_stride, gemm_min(GEMM_NR, n - j), kc,
                        GEMM_NR, b_block + (size_t)j * kc);
    for (int i = 0; i < m; i += GEMM_MR)
        for (int j = 0; j < n; j += GEMM_NR)
            gemm_microkernel(kc, a_block + (size_t)i * kc, b_block + (size_t)j * kc,
                             gemm_min(GEMM_MR, m - i), gemm_min(GEMM_NR, n - j), alpha, beta,
                             C + (size_t)(i0 + i) * ldc + j0 + j, ldc);
}

/* The loops of the comment above, run by every thread of the team (or by one without OpenMP).
 * a_block is shared; b_blocks holds one private B block of b_block_floats per thread. */
static void gemm_blocked(const GemmPlan *p, const GemmOperand *a_op, const GemmOperand *b_op,
                         int M, int N, int K, float alpha, float beta, float *C, int ldc,
                         float *a_block, float *b_blocks, size_t b_block_floats) {
    int row_chunks = gemm_ceil_div(p->mc, p->row_chunk);
    int col_blocks = gemm_ceil_div(N, p->col_block);
    for (int ic = 0; ic < M; ic += p->mc) {
        int mc = gemm_min(p->mc, M - ic);
        for (int p0 = 0; p0 < K; p0 += GEMM_KC) {
            int kc = gemm_min(GEMM_KC, K - p0);
            GEMM_OMP(omp for schedule(static))
            for (int i = 0; i < mc; i += GEMM_MR)
                gemm_pack_panel(a_op->data + (ic + i) * a_op->lane_stride + p0 * a_op->depth_stride,
                                a_op->lane_stride, a_op->depth_stride, gemm_min(GEMM_MR, mc - i),
                                kc, GEMM_MR, a_block + (size_t)i * kc);
            /* C already holds beta * C + the earlier depth blocks: add the rest with beta 1. */
            float beta_now = p0 == 0 ? beta : 1.0f;
            GEMM_OMP(omp for collapse(2) schedule(dynamic, 1))
            for (int r = 0; r < row_chunks; r++)
                for (int c = 0; c < col_blocks; c++) {
                    int i0 = r * p->row_chunk, j0 = c * p->col_block;
                    if (i0 >= mc) continue;
                    float *b_block = b_blocks + b_block_floats * gemm_thread_index();
                    gemm_item(b_op, p0, kc, ic + i0, gemm_min(p->row_chunk, mc - i0), j0,
                              gemm_min(p->col_block, N - j0), a_block + (size_t)i0 * kc, b_block,
                              alpha, beta_now, C, ldc);
                }
        }
    }
}

/* C = beta * C, for the products with nothing to add (K == 0 or alpha == 0). */
static void gemm_scale(int M, int N, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
}

static float *gemm_alloc(size_t floats) {
    size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    return aligned_alloc(64, bytes ? bytes : 64);
}

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A, int lda,
          const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {
        gemm_scale(M, N, beta, C, ldc);
        return;
    }
    int max_threads = 1;
#ifdef _OPENMP
    if (!omp_in_parallel()) max_threads = omp_get_max_threads();
#endif
    GemmPlan plan = gemm_plan(M, N, K, max_threads);
    GemmOperand a_op = {A, trans_a ? 1 : lda, trans_a ? lda : 1};
    GemmOperand b_op = {B, trans_b ? ldb : 1, trans_b ? 1 : ldb};
    int kc_max = gemm_min(GEMM_KC, K);
    size_t b_block_floats = (size_t)plan.col_block * kc_max;
    float *a_block = gemm_alloc((size_t)plan.mc * kc_max);
    float *b_blocks = gemm_alloc(b_block_floats * plan.threads);
    if (a_block && b_blocks) {
        GEMM_OMP(omp parallel num_threads(plan.threads) if (plan.threads > 1))
        gemm_blocked(&plan, &a_op, &b_op, M, N, K, alpha, beta, C, ldc, a_block, b_blocks,
                     b_block_floats);
    } else {
        /* Out of memory for the packing buffers: the reference loop needs none. */
        gemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
    free(a_block);
    free(b_blocks);
}

/* ---- end section: GEMM ---- */

/* ---- section: conv2d (owned by the conv work) ------------------------------------------- */

/* ---- end section: conv2d ---- */

/* ---- section: attention and rotary embedding (owned by the attention work) --------------- */

/* ---- end section: attention and rotary embedding ---- */

/* ---- section: norms, activations, resampling, elementwise (owned by the ops work) -------- */

/* ---- end section: norms, activations, resampling, elementwise ---- */
