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
 *   rows of C in blocks of mc              A block [mc, K] packed once, shared by the threads
 *     work items, in parallel: column blocks of up to GEMM_NC (x row chunks when N is narrow)
 *       K in blocks of GEMM_KC             the item packs its B block [kc, nb] (core's L2);
 *                                          the only split of the K-sum, fixed by K alone
 *         rows in steps of GEMM_MR         A micro-panel [kc, MR] stays in L1
 *           columns in steps of GEMM_NR    micro-kernel: C tile [MR, NR] from the two panels
 * Packing copies op(A) and op(B) into the layout the micro-kernel streams, so one kernel serves
 * all four transpose cases, and zero-pads the edge panels so the kernel always computes a full
 * tile (it writes only the part inside C).
 * Every C element is the same sequence of operations whatever the thread count: its K-sum runs
 * in k order inside the kernel, block by block, and blocks are added to C in order.
 * The threads wait for each other only twice per row block (A packed, items done), so on a
 * shared machine one thread put aside by the OS seldom holds up the others. */

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
/* The portable kernel's 4 x 8 tile fits the 16 registers of plain SSE2 or NEON. */
#define GEMM_MR 4
#define GEMM_NR 8
#endif

/* Cache blocks for ~48 KB L1d and ~2 MB L2 per core: an A micro-panel (KC x MR floats, 18 KB
 * at MR = 12) lives in L1, a B block (KC x NC, 720 KB) in L2; the shared A block (mc x K, at
 * most GEMM_A_BLOCK_FLOATS, 4 MB) is streamed from L3. NC is a multiple of every NR above. */
#define GEMM_KC 384
#define GEMM_NC 480
#define GEMM_A_BLOCK_FLOATS (1 << 20)
/* Depth steps per pass when the packer transposes: one 64-byte line of each lane. */
#define GEMM_PACK_CHUNK 16

/* Below about a million multiply-adds (~10 us on one core) starting a parallel region costs
 * about what it saves. */
#define GEMM_PARALLEL_MIN_WORK (1 << 20)

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
    if (live >= 16) return (__mmask16)0xFFFF;
    return live <= 0 ? (__mmask16)0 : (__mmask16)((1u << live) - 1);
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
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - first), lane);
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

/* Packs `lanes` lanes of `depth` elements into ceil(lanes / width) micro-panels, panel p at
 * dst + p * width * depth laid out [depth][width], zero-filling the lanes past `lanes` in the
 * last one. Element (lane l, depth k) of the source is src[l * lane_stride + k * depth_stride];
 * one of the two strides is 1, and the loops walk the source along it. */
static void gemm_pack(const float *src, ptrdiff_t lane_stride, ptrdiff_t depth_stride, int lanes,
                      int depth, int width, float *dst) {
    if (lane_stride == 1) {
        /* Lanes are contiguous: copy each depth step's whole run of lanes, panel by panel. */
        for (int k = 0; k < depth; k++)
            for (int l0 = 0; l0 < lanes; l0 += width) {
                const float *s = src + k * depth_stride + l0;
                float *d = dst + (size_t)l0 * depth + (size_t)k * width;
                int n = gemm_min(width, lanes - l0);
                for (int l = 0; l < n; l++) d[l] = s[l];
                for (int l = n; l < width; l++) d[l] = 0.0f;
            }
        return;
    }
    /* A transpose, a 64-byte line of each lane at a time so reads and writes stay in L1. */
    for (int l0 = 0; l0 < lanes; l0 += width) {
        float *panel = dst + (size_t)l0 * depth;
        int n = gemm_min(width, lanes - l0);
        for (int k0 = 0; k0 < depth; k0 += GEMM_PACK_CHUNK) {
            int k1 = gemm_min(k0 + GEMM_PACK_CHUNK, depth);
            for (int l = 0; l < n; l++)
                for (int k = k0; k < k1; k++)
                    panel[(size_t)k * width + l] = src[(l0 + l) * lane_stride + k * depth_stride];
            for (int k = k0; k < k1; k++)
                for (int l = n; l < width; l++) panel[(size_t)k * width + l] = 0.0f;
        }
    }
}

/* How one call splits its work. Row blocks of C are mc rows; inside one, the work items are
 * a grid of row_chunk x col_block pieces, col_block a multiple of NR, row_chunk of MR. */
typedef struct GemmPlan {
    int threads;
    int mc;        /* rows per A block, a multiple of MR */
    int col_block; /* columns per work item */
    int row_chunk; /* rows per work item inside an A block */
} GemmPlan;

/* Equal-sized blocks (rounded up to the tile size) so the threads get equal work: column blocks
 * number a multiple of the thread count when N allows, and narrow products are split by rows. */
static GemmPlan gemm_plan(int M, int N, int K, int max_threads) {
    GemmPlan p;
    double work = (double)M * N * K;
    p.threads = work < GEMM_PARALLEL_MIN_WORK ? 1 : max_threads;
    int mc_max = GEMM_A_BLOCK_FLOATS / K / GEMM_MR * GEMM_MR;
    if (mc_max < GEMM_MR) mc_max = GEMM_MR;
    p.mc = gemm_round_up(gemm_ceil_div(M, gemm_ceil_div(M, mc_max)), GEMM_MR);
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

/* The packed A block: rows [ic, ic + mc) of op(A) over all of K, depth block p0 at
 * a_block + block_rows * p0, each [ceil(mc / MR)][kc][MR]. */
static void gemm_pack_a_block(const GemmOperand *a_op, int ic, int mc, int K, int block_rows,
                              float *a_block) {
    int panels = gemm_ceil_div(mc, GEMM_MR);
    int depth_blocks = gemm_ceil_div(K, GEMM_KC);
    #pragma omp for collapse(2) schedule(dynamic, 4)
    for (int d = 0; d < depth_blocks; d++)
        for (int q = 0; q < panels; q++) {
            int p0 = d * GEMM_KC, kc = gemm_min(GEMM_KC, K - p0), i = q * GEMM_MR;
            gemm_pack(a_op->data + (ic + i) * a_op->lane_stride + p0 * a_op->depth_stride,
                      a_op->lane_stride, a_op->depth_stride, gemm_min(GEMM_MR, mc - i), kc,
                      GEMM_MR, a_block + (size_t)block_rows * p0 + (size_t)i * kc);
        }
}

/* One work item: rows [i0, i0 + m) and columns [j0, j0 + n) of C over all of K. Its rows start
 * at row `r` of the packed A block. */
static void gemm_item(const GemmOperand *b_op, int K, int i0, int m, int j0, int n,
                      const float *a_block, int block_rows, int r, float *b_block, float alpha,
                      float beta, float *C, int ldc) {
    for (int p0 = 0; p0 < K; p0 += GEMM_KC) {
        int kc = gemm_min(GEMM_KC, K - p0);
        const float *a = a_block + (size_t)block_rows * p0 + (size_t)r * kc;
        gemm_pack(b_op->data + j0 * b_op->lane_stride + p0 * b_op->depth_stride,
                  b_op->lane_stride, b_op->depth_stride, n, kc, GEMM_NR, b_block);
        /* C already holds beta * C + the earlier depth blocks: add the rest with beta 1. */
        float beta_now = p0 == 0 ? beta : 1.0f;
        for (int i = 0; i < m; i += GEMM_MR)
            for (int j = 0; j < n; j += GEMM_NR)
                gemm_microkernel(kc, a + (size_t)i * kc, b_block + (size_t)j * kc,
                                 gemm_min(GEMM_MR, m - i), gemm_min(GEMM_NR, n - j), alpha,
                                 beta_now, C + (size_t)(i0 + i) * ldc + j0 + j, ldc);
    }
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
        gemm_pack_a_block(a_op, ic, mc, K, p->mc, a_block);
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int c = 0; c < col_blocks; c++)
            for (int q = 0; q < row_chunks; q++) {
                int r = q * p->row_chunk, j0 = c * p->col_block;
                if (r >= mc) continue;
                float *b_block = b_blocks + b_block_floats * gemm_thread_index();
                gemm_item(b_op, K, ic + r, gemm_min(p->row_chunk, mc - r), j0,
                          gemm_min(p->col_block, N - j0), a_block, p->mc, r, b_block, alpha,
                          beta, C, ldc);
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
    float *a_block = gemm_alloc((size_t)plan.mc * K);
    float *b_blocks = gemm_alloc(b_block_floats * plan.threads);
    if (a_block && b_blocks) {
        #pragma omp parallel num_threads(plan.threads) if (plan.threads > 1)
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

/* OpenMP only where the work pays for waking the threads; without OpenMP the pragma vanishes
 * (a bare "#pragma omp" would warn under NO_OMP=1). Every such loop writes disjoint outputs. */
#ifdef _OPENMP
#define OPS_PRAGMA(text) _Pragma(#text)
#define OPS_PARALLEL_FOR_IF(cond) OPS_PRAGMA(omp parallel for if (cond))
#else
#define OPS_PARALLEL_FOR_IF(cond)
#endif

#define OPS_PARALLEL_MIN ((size_t)1 << 15)      /* elements of cheap arithmetic */
#define OPS_PARALLEL_MIN_MATH ((size_t)1 << 12) /* elements that each take an exp or erfc */
#define OPS_COLUMN_BLOCK 64                     /* columns one thread owns in a column sum */
#define OPS_REDUCE_CHUNKS 64                    /* fixed chunks of a whole-array reduction */

/* Sum of n floats in double: eight interleaved lanes (so it vectorises), then the lanes and the
 * tail in order. The order depends on n alone. */
static double sum_f64(size_t n, const float *x) {
    double lane[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) lane[k] += x[i + k];
    double s = 0.0;
    for (; i < n; i++) s += x[i];
    for (int k = 0; k < 8; k++) s += lane[k];
    return s;
}

/* Sum of (x - mean)^2 in double, in the same lane order as sum_f64. */
static double sum_sq_dev_f64(size_t n, const float *x, double mean) {
    double lane[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) {
            double d = x[i + k] - mean;
            lane[k] += d * d;
        }
    double s = 0.0;
    for (; i < n; i++) s += (x[i] - mean) * (x[i] - mean);
    for (int k = 0; k < 8; k++) s += lane[k];
    return s;
}

/* Mean and 1/sqrt(biased variance + eps) of n contiguous values, two passes in double. */
static void norm_stats(size_t n, const float *x, float eps, float *mean, float *rstd) {
    double m = sum_f64(n, x) / (double)n;
    double var = sum_sq_dev_f64(n, x, m) / (double)n;
    *mean = (float)m;
    *rstd = (float)(1.0 / sqrt(var + eps));
}

/* Column sums over rows for the gradients of per-column parameters. x, dy: [rows, C]:
 *   dw[c] += sum_r dy[r, c] * (x[r, c] - mean[r]) * rstd[r],   db[c] += sum_r dy[r, c]
 * mean and rstd may be NULL (0 and 1); dw or db NULL is skipped. Each thread owns a block of
 * columns and walks the rows in order, accumulating in double: the thread count cannot change
 * a bit. */
static void column_grads(int rows, int C, const float *x, const float *mean, const float *rstd,
                         const float *dy, float *dw, float *db) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && C > OPS_COLUMN_BLOCK)
    for (int c0 = 0; c0 < C; c0 += OPS_COLUMN_BLOCK) {
        int width = C - c0 < OPS_COLUMN_BLOCK ? C - c0 : OPS_COLUMN_BLOCK;
        double acc_w[OPS_COLUMN_BLOCK] = {0}, acc_b[OPS_COLUMN_BLOCK] = {0};
        for (int r = 0; r < rows; r++) {
            const float *dy_row = dy + (size_t)r * C + c0;
            if (dw) {
                const float *x_row = x + (size_t)r * C + c0;
                float m = mean ? mean[r] : 0.0f, s = rstd ? rstd[r] : 1.0f;
                for (int j = 0; j < width; j++) acc_w[j] += dy_row[j] * ((x_row[j] - m) * s);
            }
            if (db)
                for (int j = 0; j < width; j++) acc_b[j] += dy_row[j];
        }
        for (int j = 0; j < width; j++) {
            if (dw) dw[c0 + j] += (float)acc_w[j];
            if (db) db[c0 + j] += (float)acc_b[j];
        }
    }
}

/* Sums over batch and pixels of channel c, in double, in a fixed order. x, dy: [B, C, HW]:
 *   *sum_dy = sum dy,   *sum_dy_xhat = sum dy * (x - mean[b * stat_stride]) * rstd[b * stat_stride]
 * x == NULL skips the second sum. */
static void channel_sums(int B, int C, int HW, int c, const float *x, const float *mean,
                         const float *rstd, int stat_stride, const float *dy, double *sum_dy,
                         double *sum_dy_xhat) {
    double s_dy = 0.0, s_dy_xhat = 0.0;
    for (int b = 0; b < B; b++) {
        const float *dy_plane = dy + ((size_t)b * C + c) * HW;
        s_dy += sum_f64((size_t)HW, dy_plane);
        if (!x) continue;
        const float *x_plane = x + ((size_t)b * C + c) * HW;
        float m = mean[(size_t)b * stat_stride], s = rstd[(size_t)b * stat_stride];
        double lane[8] = {0};
        int i = 0;
        for (; i + 8 <= HW; i += 8)
            for (int k = 0; k < 8; k++) lane[k] += dy_plane[i + k] * ((x_plane[i + k] - m) * s);
        for (; i < HW; i++) s_dy_xhat += dy_plane[i] * ((x_plane[i] - m) * s);
        for (int k = 0; k < 8; k++) s_dy_xhat += lane[k];
    }
    *sum_dy = s_dy;
    *sum_dy_xhat = s_dy_xhat;
}

/* ---- layernorm ---- */

void layernorm_forward(int rows, int C, float eps, const float *x, const float *w, const float *b,
                       float *y, float *mean, float *rstd) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * C;
        float *yr = y + (size_t)r * C;
        float m, s;
        norm_stats((size_t)C, xr, eps, &m, &s);
        for (int c = 0; c < C; c++) {
            float xhat = (xr[c] - m) * s;
            yr[c] = xhat * (w ? w[c] : 1.0f) + (b ? b[c] : 0.0f);
        }
        mean[r] = m;
        rstd[r] = s;
    }
}

/* With g = dy * w and xhat = (x - mean) * rstd:
 * dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw = sum_rows dy * xhat, db = sum_rows dy. */
void layernorm_backward(int rows, int C, const float *x, const float *w, const float *mean,
                        const float *rstd, const float *dy, float *dx, float *dw, float *db) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * C, *dyr = dy + (size_t)r * C;
            float *dxr = dx + (size_t)r * C;
            float m = mean[r], s = rstd[r];
            double sum_g = 0.0, sum_g_xhat = 0.0;
            for (int c = 0; c < C; c++) {
                float g = dyr[c] * (w ? w[c] : 1.0f);
                sum_g += g;
                sum_g_xhat += g * ((xr[c] - m) * s);
            }
            float mean_g = (float)(sum_g / C), mean_g_xhat = (float)(sum_g_xhat / C);
            for (int c = 0; c < C; c++) {
                float g = dyr[c] * (w ? w[c] : 1.0f);
                float xhat = (xr[c] - m) * s;
                dxr[c] += s * (g - mean_g - xhat * mean_g_xhat);
            }
        }
    }
    column_grads(rows, C, x, mean, rstd, dy, dw, db);
}

/* ---- groupnorm ---- */

/* Group g of sample b is the contiguous block of channels [g * C/groups, (g+1) * C/groups). */
void groupnorm_forward(int B, int C, int HW, int groups, float eps, const float *x, const float *w,
                       const float *b, float *y, float *mean, float *rstd) {
    int group_ch = C / groups;
    size_t group_len = (size_t)group_ch * HW;
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * groups > 1)
    for (int bg = 0; bg < B * groups; bg++) {
        const float *xg = x + (size_t)bg * group_len;
        float *yg = y + (size_t)bg * group_len;
        float m, s;
        norm_stats(group_len, xg, eps, &m, &s);
        for (int k = 0; k < group_ch; k++) {
            int c = (bg % groups) * group_ch + k;
            /* (x - m) first: folding m into the shift would cancel badly when rstd is large */
            float scale = s * (w ? w[c] : 1.0f), shift = b ? b[c] : 0.0f;
            const float *xc = xg + (size_t)k * HW;
            float *yc = yg + (size_t)k * HW;
            for (int i = 0; i < HW; i++) yc[i] = (xc[i] - m) * scale + shift;
        }
        mean[bg] = m;
        rstd[bg] = s;
    }
}

/* The layernorm formula over each group, with w per channel; dw, db per channel over (b, hw). */
void groupnorm_backward(int B, int C, int HW, int groups, const float *x, const float *w,
                        const float *mean, const float *rstd, const float *dy, float *dx,
                        float *dw, float *db) {
    int group_ch = C / groups;
    size_t group_len = (size_t)group_ch * HW;
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * groups > 1)
        for (int bg = 0; bg < B * groups; bg++) {
            int c0 = (bg % groups) * group_ch;
            const float *xg = x + (size_t)bg * group_len, *dyg = dy + (size_t)bg * group_len;
            float *dxg = dx + (size_t)bg * group_len;
            /* sum(g) and sum(g * xhat): per channel (seen as a [1, 1, HW] tensor), times w[c] */
            double sum_g = 0.0, sum_g_xhat = 0.0;
            for (int k = 0; k < group_ch; k++) {
                double s_dy, s_dy_xhat;
                channel_sums(1, 1, HW, 0, xg + (size_t)k * HW, &mean[bg], &rstd[bg], 0,
                             dyg + (size_t)k * HW, &s_dy, &s_dy_xhat);
                float wc = w ? w[c0 + k] : 1.0f;
                sum_g += wc * s_dy;
                sum_g_xhat += wc * s_dy_xhat;
            }
            float m = mean[bg], s = rstd[bg];
            float mean_g = (float)(sum_g / group_len);
            float mean_g_xhat = (float)(sum_g_xhat / group_len);
            for (int k = 0; k < group_ch; k++) {
                float wc = w ? w[c0 + k] : 1.0f;
                const float *xc = xg + (size_t)k * HW, *dyc = dyg + (size_t)k * HW;
                float *dxc = dxg + (size_t)k * HW;
                for (int i = 0; i < HW; i++) {
                    /* g rounded on its own (no fused multiply-subtract): a group of one value
                     * then gets g - mean(g) = 0 exactly, not a rounding error times rstd */
                    float g = dyc[i] * wc;
                    float xhat = (xc[i] - m) * s;
                    dxc[i] += s * (g - mean_g - xhat * mean_g_xhat);
                }
            }
        }
    }
    if (!dw && !db) return;
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        double s_dy, s_dy_xhat;
        int g = c / group_ch;
        channel_sums(B, C, HW, c, dw ? x : NULL, mean + g, rstd + g, groups, dy, &s_dy,
                     &s_dy_xhat);
        if (dw) dw[c] += (float)s_dy_xhat;
        if (db) db[c] += (float)s_dy;
    }
}

/* ---- rmsnorm ---- */

void rmsnorm_forward(int rows, int C, float eps, const float *x, const float *w, float *y,
                     float *rstd) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * C;
        float *yr = y + (size_t)r * C;
        float s = (float)(1.0 / sqrt(sum_sq_dev_f64((size_t)C, xr, 0.0) / C + eps));
        for (int c = 0; c < C; c++) yr[c] = xr[c] * s * (w ? w[c] : 1.0f);
        rstd[r] = s;
    }
}

/* With g = dy * w: dx = rstd * (g - x * rstd^2 * mean(g * x)), dw = sum_rows dy * x * rstd. */
void rmsnorm_backward(int rows, int C, const float *x, const float *w, const float *rstd,
                      const float *dy, float *dx, float *dw) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * C, *dyr = dy + (size_t)r * C;
            float *dxr = dx + (size_t)r * C;
            float s = rstd[r];
            double sum_gx = 0.0;
            for (int c = 0; c < C; c++) sum_gx += dyr[c] * (w ? w[c] : 1.0f) * xr[c];
            float k = (float)(sum_gx / C) * s * s;
            for (int c = 0; c < C; c++) dxr[c] += s * (dyr[c] * (w ? w[c] : 1.0f) - xr[c] * k);
        }
    }
    column_grads(rows, C, x, NULL, rstd, dy, dw, NULL);
}

/* ---- batchnorm with running statistics ---- */

void batchnorm_eval_forward(int B, int C, int HW, float eps, const float *mean, const float *var,
                            const float *w, const float *b, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * C > 1)
    for (int bc = 0; bc < B * C; bc++) {
        int c = bc % C;
        float scale = (w ? w[c] : 1.0f) / sqrtf(var[c] + eps), shift = b ? b[c] : 0.0f;
        const float *xp = x + (size_t)bc * HW;
        float *yp = y + (size_t)bc * HW;
        for (int i = 0; i < HW; i++) yp[i] = (xp[i] - mean[c]) * scale + shift;
    }
}

/* The statistics are constants: dx = dy * w * rstd, dw = sum dy * xhat, db = sum dy. */
void batchnorm_eval_backward(int B, int C, int HW, float eps, const float *mean, const float *var,
                             const float *w, const float *x, const float *dy, float *dx,
                             float *dw, float *db) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * C > 1)
        for (int bc = 0; bc < B * C; bc++) {
            int c = bc % C;
            float scale = (w ? w[c] : 1.0f) / sqrtf(var[c] + eps);
            const float *dyp = dy + (size_t)bc * HW;
            float *dxp = dx + (size_t)bc * HW;
            for (int i = 0; i < HW; i++) dxp[i] += dyp[i] * scale;
        }
    }
    if (!dw && !db) return;
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        float rstd = 1.0f / sqrtf(var[c] + eps);
        double s_dy, s_dy_xhat;
        channel_sums(B, C, HW, c, dw ? x : NULL, mean + c, &rstd, 0, dy, &s_dy, &s_dy_xhat);
        if (dw) dw[c] += (float)s_dy_xhat;
        if (db) db[c] += (float)s_dy;
    }
}

/* ---- pointwise activations ---- */

#define OPS_SQRT1_2 0.70710678118654752f      /* 1/sqrt(2) */
#define OPS_INV_SQRT_2PI 0.39894228040143268f /* 1/sqrt(2 pi) */
#define OPS_SQRT_2_PI 0.79788456080286536f    /* sqrt(2/pi) */
#define OPS_GELU_CUBIC 0.044715f

/* e^x for x <= 0, the only exponentials sigmoid, SiLU, GELU and softmax need (they never
 * overflow), to ~2 ulp in plain C that compilers vectorise, unlike a call to expf.
 * x = n ln2 + r with |r| <= ln2/2; e^r by its Taylor series to degree 7 (truncation < 1e-8);
 * 2^n goes straight into the exponent bits. Below -87.3 e^x is subnormal and flushes to 0,
 * positive x saturates at 1, NaN stays NaN (and never reaches the integer conversion). */
static inline float exp_nonpositive(float x) {
    float xc = x > -87.3f ? x : -87.3f;
    xc = xc < 0.0f ? xc : 0.0f;
    /* round to the nearest integer by adding and removing 1.5 * 2^23 */
    float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;
    /* ln2 = 0.693359375 - 2.12194440e-4: the first part has 9 bits, so n times it is exact */
    float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    float y = p * two_n;
    return x < -87.3f ? 0.0f : (x == x ? y : x);
}

/* erfc(z) for z >= 0 with a relative error below 1.2e-7 everywhere, tails included: the
 * Chebyshev fit of Press et al., Numerical Recipes (2nd ed.) 6.2, erfc = t exp(-z^2 + P(t)). */
static inline float erfc_nonnegative(float z) {
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    return t * exp_nonpositive(p - z * z);
}

/* sigmoid(x), and its slope s (1 - s) in *slope, both from e = e^-|x|: any x is safe, and
 * neither cancels (1 - s computed as a difference would be 0 long before s (1 - s) is). */
static inline float sigmoid_scalar(float x, float *slope) {
    float e = exp_nonpositive(-fabsf(x));
    float s_abs = 1.0f / (1.0f + e); /* sigmoid(|x|) */
    float s_neg = e * s_abs; /* sigmoid(-|x|), computed before the select so that it vectorises */
    *slope = s_neg * s_abs;
    return x >= 0.0f ? s_abs : s_neg;
}

/* The normal CDF Phi(x) = erfc(-x / sqrt 2) / 2, from the tail beyond |x| so that it keeps
 * its relative accuracy for negative x (1 + erf(x / sqrt 2) would cancel there). */
static inline float normal_cdf(float x) {
    float tail = 0.5f * erfc_nonnegative(fabsf(x) * OPS_SQRT1_2);
    float upper = 1.0f - tail;
    return x <= 0.0f ? tail : upper;
}

/* GELU x Phi(x) and its derivative Phi(x) + x phi(x). */
static inline float gelu_erf_scalar(float x) {
    return x * normal_cdf(x);
}

static inline float gelu_erf_grad(float x) {
    return normal_cdf(x) + x * OPS_INV_SQRT_2PI * exp_nonpositive(-0.5f * x * x);
}

/* torch's approximate="tanh": 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed
 * as x sigmoid(2u), the same function without the cancellation of 1 + tanh(u) for u << 0. */
static inline float gelu_tanh_scalar(float x) {
    float slope;
    return x * sigmoid_scalar(2.0f * OPS_SQRT_2_PI * (x + OPS_GELU_CUBIC * x * x * x), &slope);
}

static inline float gelu_tanh_grad(float x) {
    float slope, s = sigmoid_scalar(2.0f * OPS_SQRT_2_PI * (x + OPS_GELU_CUBIC * x * x * x), &slope);
    float du = 2.0f * OPS_SQRT_2_PI * (1.0f + 3.0f * OPS_GELU_CUBIC * x * x);
    return s + x * slope * du;
}

/* One loop per form: a branch inside the loop would keep it from vectorising. */
void gelu_forward(size_t n, bool tanh_approx, const float *x, float *y) {
    if (tanh_approx) {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) y[i] = gelu_tanh_scalar(x[i]);
    } else {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) y[i] = gelu_erf_scalar(x[i]);
    }
}

void gelu_backward(size_t n, bool tanh_approx, const float *x, const float *dy, float *dx) {
    if (tanh_approx) {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) dx[i] += dy[i] * gelu_tanh_grad(x[i]);
    } else {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) dx[i] += dy[i] * gelu_erf_grad(x[i]);
    }
}

void silu_forward(size_t n, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope;
        y[i] = x[i] * sigmoid_scalar(x[i], &slope);
    }
}

/* d/dx x s(x) = s + x s (1 - s) */
void silu_backward(size_t n, const float *x, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope, s = sigmoid_scalar(x[i], &slope);
        dx[i] += dy[i] * (s + x[i] * slope);
    }
}

/* x < 0 ? 0 : x keeps a NaN a NaN, as torch.relu does. */
void relu_forward(size_t n, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = x[i] < 0.0f ? 0.0f : x[i];
}

/* Gradient only where x > 0 (zero at x == 0), as torch's (y > 0) mask. */
void relu_backward(size_t n, const float *x, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += x[i] > 0.0f ? dy[i] : 0.0f;
}

void sigmoid_forward(size_t n, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope;
        y[i] = sigmoid_scalar(x[i], &slope);
    }
}

void sigmoid_backward(size_t n, const float *y, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += dy[i] * y[i] * (1.0f - y[i]);
}

/* ---- softmax ---- */

/* Shifted by the row max so exp never overflows; a row holding a NaN comes out all NaN. */
void softmax_forward(int rows, int C, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN_MATH && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * C;
        float *yr = y + (size_t)r * C;
        float max = -INFINITY;
        for (int c = 0; c < C; c++) max = xr[c] > max ? xr[c] : max;
        for (int c = 0; c < C; c++) yr[c] = exp_nonpositive(xr[c] - max);
        float inv = (float)(1.0 / sum_f64((size_t)C, yr));
        for (int c = 0; c < C; c++) yr[c] *= inv;
    }
}

/* dx = y * (dy - sum(dy * y)) per row. */
void softmax_backward(int rows, int C, const float *y, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * C, *dyr = dy + (size_t)r * C;
        float *dxr = dx + (size_t)r * C;
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += dyr[c] * yr[c];
        float d = (float)dot;
        for (int c = 0; c < C; c++) dxr[c] += yr[c] * (dyr[c] - d);
    }
}

/* ---- resampling ---- */

void upsample_nearest2x_forward(int planes, int H, int W, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)planes * H * W >= OPS_PARALLEL_MIN / 4)
    for (size_t row = 0; row < (size_t)planes * H; row++) {
        const float *xr = x + row * W;
        float *y0 = y + row * 4 * W, *y1 = y0 + 2 * W; /* output rows 2i and 2i+1 */
        for (int j = 0; j < W; j++) y0[2 * j] = y0[2 * j + 1] = xr[j];
        memcpy(y1, y0, 2 * (size_t)W * sizeof *y1);
    }
}

/* Each input pixel gathers the 2x2 block it was copied to. */
void upsample_nearest2x_backward(int planes, int H, int W, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF((size_t)planes * H * W >= OPS_PARALLEL_MIN / 4)
    for (size_t row = 0; row < (size_t)planes * H; row++) {
        const float *d0 = dy + row * 4 * W, *d1 = d0 + 2 * W;
        float *dxr = dx + row * W;
        for (int j = 0; j < W; j++)
            dxr[j] += (d0[2 * j] + d0[2 * j + 1]) + (d1[2 * j] + d1[2 * j + 1]);
    }
}

/* The two source samples and their weights for output index dst of one axis. */
typedef struct LinearTap {
    int i0, i1;
    float w0, w1;
} LinearTap;

/* As torch's CPU kernel computes it for interpolate(size=..., align_corners=False): the scale
 * in float (in / out), the source position (dst + 0.5) * scale - 0.5 in double, clamped at 0,
 * truncated to the left sample; the right one is clamped to the last. Equal sizes copy. */
static LinearTap linear_tap(int dst, int in, int out) {
    LinearTap t = {dst, dst, 1.0f, 0.0f};
    if (in == out) return t;
    float scale = (float)in / (float)out;
    double src = (double)scale * (dst + 0.5) - 0.5;
    if (src < 0.0) src = 0.0;
    t.i0 = (int)src;
    t.i1 = t.i0 < in - 1 ? t.i0 + 1 : t.i0;
    t.w1 = (float)(src - t.i0);
    t.w0 = 1.0f - t.w1;
    return t;
}

#define OPS_TAP_CHUNK 256 /* output columns whose taps are computed once and reused by every row */

/* Output columns [j0, j0 + width) of one plane. x: [H, W] -> y: [Ho, Wo] */
static void resize_plane_columns(int H, int W, int Ho, int Wo, int j0, int width, const float *x,
                                 float *y) {
    LinearTap tw[OPS_TAP_CHUNK];
    for (int j = 0; j < width; j++) tw[j] = linear_tap(j0 + j, W, Wo);
    for (int i = 0; i < Ho; i++) {
        LinearTap th = linear_tap(i, H, Ho);
        const float *x0 = x + (size_t)th.i0 * W, *x1 = x + (size_t)th.i1 * W;
        float *yr = y + (size_t)i * Wo + j0;
        for (int j = 0; j < width; j++) {
            float top = x0[tw[j].i0] * tw[j].w0 + x0[tw[j].i1] * tw[j].w1;
            float bottom = x1[tw[j].i0] * tw[j].w0 + x1[tw[j].i1] * tw[j].w1;
            yr[j] = top * th.w0 + bottom * th.w1;
        }
    }
}

void resize_bilinear_forward(int planes, int H, int W, int Ho, int Wo, const float *x, float *y) {
    int chunks = (Wo + OPS_TAP_CHUNK - 1) / OPS_TAP_CHUNK;
    OPS_PARALLEL_FOR_IF((size_t)planes * Ho * Wo >= OPS_PARALLEL_MIN / 4 && planes * chunks > 1)
    for (int task = 0; task < planes * chunks; task++) {
        int p = task / chunks, j0 = task % chunks * OPS_TAP_CHUNK;
        int width = Wo - j0 < OPS_TAP_CHUNK ? Wo - j0 : OPS_TAP_CHUNK;
        resize_plane_columns(H, W, Ho, Wo, j0, width, x + (size_t)p * H * W,
                             y + (size_t)p * Ho * Wo);
    }
}

/* Scatters each output gradient to its four sources. Sources are shared between neighbouring
 * outputs, so threads split planes only, and each plane is walked in one fixed order (column
 * chunk, then row, then column). */
void resize_bilinear_backward(int planes, int H, int W, int Ho, int Wo, const float *dy,
                              float *dx) {
    OPS_PARALLEL_FOR_IF((size_t)planes * Ho * Wo >= OPS_PARALLEL_MIN / 4 && planes > 1)
    for (int p = 0; p < planes; p++) {
        float *dxp = dx + (size_t)p * H * W;
        for (int j0 = 0; j0 < Wo; j0 += OPS_TAP_CHUNK) {
            int width = Wo - j0 < OPS_TAP_CHUNK ? Wo - j0 : OPS_TAP_CHUNK;
            LinearTap tw[OPS_TAP_CHUNK];
            for (int j = 0; j < width; j++) tw[j] = linear_tap(j0 + j, W, Wo);
            for (int i = 0; i < Ho; i++) {
                LinearTap th = linear_tap(i, H, Ho);
                const float *dyr = dy + ((size_t)p * Ho + i) * Wo + j0;
                float *dx0 = dxp + (size_t)th.i0 * W, *dx1 = dxp + (size_t)th.i1 * W;
                for (int j = 0; j < width; j++) {
                    float g = dyr[j];
                    dx0[tw[j].i0] += th.w0 * tw[j].w0 * g;
                    dx0[tw[j].i1] += th.w0 * tw[j].w1 * g;
                    dx1[tw[j].i0] += th.w1 * tw[j].w0 * g;
                    dx1[tw[j].i1] += th.w1 * tw[j].w1 * g;
                }
            }
        }
    }
}

/* ---- elementwise ---- */

void add_forward(size_t n, const float *a, const float *b, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

void mul_forward(size_t n, const float *a, const float *b, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = a[i] * b[i];
}

/* y += a * b */
static void add_product(size_t n, const float *a, const float *b, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] += a[i] * b[i];
}

void mul_backward(size_t n, const float *a, const float *b, const float *dy, float *da, float *db) {
    if (da) add_product(n, dy, b, da);
    if (db) add_product(n, dy, a, db);
}

void scale_forward(size_t n, float s, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = s * x[i];
}

void axpy(size_t n, float alpha, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* Written so that a NaN passes through, as torch.clamp does. */
void clamp_forward(size_t n, float lo, float hi, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
}

void clamp_backward(size_t n, float lo, float hi, const float *x, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += x[i] >= lo && x[i] <= hi ? dy[i] : 0.0f;
}

void pow_forward(size_t n, float p, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) y[i] = powf(x[i], p);
}

void pow_backward(size_t n, float p, const float *x, const float *dy, float *dx) {
    if (p == 0.0f) return;
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) dx[i] += dy[i] * p * powf(x[i], p - 1.0f);
}

/* ---- broadcasts and reductions ---- */

void add_rows_forward(int rows, int C, const float *x, const float *v, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) y[(size_t)r * C + c] = x[(size_t)r * C + c] + v[c];
}

void mul_rows_forward(int rows, int C, const float *x, const float *v, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) y[(size_t)r * C + c] = x[(size_t)r * C + c] * v[c];
}

void mul_rows_backward(int rows, int C, const float *x, const float *v, const float *dy, float *dx,
                       float *dv) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < C; c++) dx[(size_t)r * C + c] += dy[(size_t)r * C + c] * v[c];
    }
    column_grads(rows, C, x, NULL, NULL, dy, dv, NULL);
}

void sum_rows_add(int rows, int C, const float *x, float *out) {
    column_grads(rows, C, NULL, NULL, NULL, x, NULL, out);
}

void add_channels_forward(int B, int C, int HW, const float *x, const float *v, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * C > 1)
    for (int bc = 0; bc < B * C; bc++) {
        float vc = v[bc % C];
        for (int i = 0; i < HW; i++) y[(size_t)bc * HW + i] = x[(size_t)bc * HW + i] + vc;
    }
}

void sum_channels_add(int B, int C, int HW, const float *x, float *out) {
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        double s_x, unused;
        channel_sums(B, C, HW, c, NULL, NULL, NULL, 0, x, &s_x, &unused);
        out[c] += (float)s_x;
    }
}

/* The bounds of chunk k when n values are cut into OPS_REDUCE_CHUNKS fixed pieces. */
static void reduce_chunk(size_t n, int k, size_t *lo, size_t *hi) {
    size_t len = (n + OPS_REDUCE_CHUNKS - 1) / OPS_REDUCE_CHUNKS;
    *lo = (size_t)k * len < n ? (size_t)k * len : n;
    *hi = *lo + len < n ? *lo + len : n;
}

double sum_array(size_t n, const float *x) {
    double part[OPS_REDUCE_CHUNKS];
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) {
        size_t lo, hi;
        reduce_chunk(n, k, &lo, &hi);
        part[k] = sum_f64(hi - lo, x + lo);
    }
    double s = 0.0;
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) s += part[k];
    return s;
}

float max_array(size_t n, const float *x) {
    float part[OPS_REDUCE_CHUNKS];
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) {
        size_t lo, hi;
        reduce_chunk(n, k, &lo, &hi);
        float max = -INFINITY;
        bool any_nan = false;
        for (size_t i = lo; i < hi; i++) {
            any_nan |= isnan(x[i]);
            max = x[i] > max ? x[i] : max;
        }
        part[k] = any_nan ? NAN : max;
    }
    float max = -INFINITY;
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) {
        if (isnan(part[k])) return NAN;
        max = part[k] > max ? part[k] : max;
    }
    return max;
}

/* ---- end section: norms, activations, resampling, elementwise ---- */
