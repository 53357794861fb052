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

/* Placeholder until the blocked kernel lands: the reference product. */
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A, int lda,
          const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- end section: GEMM ---- */

/* ---- section: conv2d (owned by the conv work) ------------------------------------------- */

/* ---- end section: conv2d ---- */

/* ---- section: attention and rotary embedding (owned by the attention work) --------------- */

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

/* Attention runs on tiles of ATTN_BLOCK queries x ATTN_BLOCK keys, so each thread's scratch is
 * O(ATTN_BLOCK * head_dim) and no Nq x Nk matrix ever exists. Operands reach the block product
 * zero-padded (rows to a multiple of ATTN_PAD_ROWS, columns to a multiple of ATTN_PAD_COLS),
 * copied into scratch unless already in that form, so the micro-kernels never meet a ragged
 * edge. */
#define ATTN_BLOCK 64
#define ATTN_PAD_ROWS 8
#define ATTN_PAD_COLS 32

/* OpenMP directives that vanish without OpenMP (a bare pragma warns under NO_OMP=1). */
#ifdef _OPENMP
#define ATTN_OMP(directive) _Pragma(#directive)
#else
#define ATTN_OMP(directive)
#endif

static int round_up(int n, int multiple) { return (n + multiple - 1) / multiple * multiple; }

/* The register tile of the block product below: C[TILE_M, TILE_N] += A[TILE_M, K] B[K, TILE_N]
 * with A(m, k) = A[m * a_rs + k * a_cs]. TILE_M divides ATTN_PAD_ROWS, TILE_N ATTN_PAD_COLS. */
#if defined(__AVX512F__)
#define ATTN_TILE_M 8
#define ATTN_TILE_N 32
static void attn_tile(int K, const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs, const float *B,
                      ptrdiff_t ldb, float *C, ptrdiff_t ldc) {
    __m512 lo[8], hi[8];
    for (int r = 0; r < 8; r++) {
        lo[r] = _mm512_loadu_ps(C + r * ldc);
        hi[r] = _mm512_loadu_ps(C + r * ldc + 16);
    }
    for (int k = 0; k < K; k++) {
        __m512 b_lo = _mm512_loadu_ps(B + k * ldb), b_hi = _mm512_loadu_ps(B + k * ldb + 16);
        const float *a = A + k * a_cs;
        for (int r = 0; r < 8; r++) {
            __m512 ar = _mm512_set1_ps(a[r * a_rs]);
            lo[r] = _mm512_fmadd_ps(ar, b_lo, lo[r]);
            hi[r] = _mm512_fmadd_ps(ar, b_hi, hi[r]);
        }
    }
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_ps(C + r * ldc, lo[r]);
        _mm512_storeu_ps(C + r * ldc + 16, hi[r]);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define ATTN_TILE_M 4
#define ATTN_TILE_N 16
static void attn_tile(int K, const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs, const float *B,
                      ptrdiff_t ldb, float *C, ptrdiff_t ldc) {
    __m256 lo[4], hi[4];
    for (int r = 0; r < 4; r++) {
        lo[r] = _mm256_loadu_ps(C + r * ldc);
        hi[r] = _mm256_loadu_ps(C + r * ldc + 8);
    }
    for (int k = 0; k < K; k++) {
        __m256 b_lo = _mm256_loadu_ps(B + k * ldb), b_hi = _mm256_loadu_ps(B + k * ldb + 8);
        const float *a = A + k * a_cs;
        for (int r = 0; r < 4; r++) {
            __m256 ar = _mm256_broadcast_ss(a + r * a_rs);
            lo[r] = _mm256_fmadd_ps(ar, b_lo, lo[r]);
            hi[r] = _mm256_fmadd_ps(ar, b_hi, hi[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        _mm256_storeu_ps(C + r * ldc, lo[r]);
        _mm256_storeu_ps(C + r * ldc + 8, hi[r]);
    }
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define ATTN_TILE_M 4
#define ATTN_TILE_N 16
static void attn_tile(int K, const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs, const float *B,
                      ptrdiff_t ldb, float *C, ptrdiff_t ldc) {
    float32x4_t c[4][4];
    for (int r = 0; r < 4; r++)
        for (int v = 0; v < 4; v++) c[r][v] = vld1q_f32(C + r * ldc + 4 * v);
    for (int k = 0; k < K; k++) {
        float32x4_t b[4];
        for (int v = 0; v < 4; v++) b[v] = vld1q_f32(B + k * ldb + 4 * v);
        const float *a = A + k * a_cs;
        for (int r = 0; r < 4; r++) {
            float32x4_t ar = vdupq_n_f32(a[r * a_rs]);
            for (int v = 0; v < 4; v++) c[r][v] = vfmaq_f32(c[r][v], ar, b[v]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int v = 0; v < 4; v++) vst1q_f32(C + r * ldc + 4 * v, c[r][v]);
}
#endif

/* C[M, N] += A[M, K] B[K, N] on padded operands: M % ATTN_PAD_ROWS == 0, N % ATTN_PAD_COLS == 0,
 * any K. A(m, k) = A[m * a_rs + k * a_cs], so one kernel multiplies by P and by P^T. Each C
 * element sums over k in order, whatever the tiling, so every build path is deterministic. */
static void block_madd(int M, int N, int K, const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs,
                       const float *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc) {
#ifdef ATTN_TILE_M
    for (int m = 0; m < M; m += ATTN_TILE_M)
        for (int n = 0; n < N; n += ATTN_TILE_N)
            attn_tile(K, A + m * a_rs, a_rs, a_cs, B + n, ldb, C + m * ldc + n, ldc);
#else
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) {
            float a = A[m * a_rs + k * a_cs];
            for (int n = 0; n < N; n++) C[m * ldc + n] += a * B[k * ldb + n];
        }
#endif
}

/* e^x within about 1 ulp for -87 <= x <= 88, and exactly 0 below (so e^-inf = 0). Branch-free
 * and libm-free so the tile loops calling it vectorise: a libm call per score would cost about
 * as much as the block products. Range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7
 * polynomial for e^r (the Cephes expf coefficients) and 2^n built in the exponent bits. */
static inline float exp_fast(float x) {
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float xc = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float t = xc * 1.44269504f + round_magic;
    float n = t - round_magic;
    float r = xc - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &t, sizeof bits); /* the low mantissa bits of t hold n */
    bits = (bits - 0x4B400000u + 127u) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.0f ? 0.0f : p * two_n;
}

/* How many keys query row i of batch b sees; they are always keys 0 .. count-1 (causal limit
 * and key padding both cut a suffix). */
static int visible_keys(const AttentionShape *s, int b, int i) {
    int n = s->kv_len;
    if (s->kv_valid && s->kv_valid[b] < n) n = s->kv_valid[b] > 0 ? s->kv_valid[b] : 0;
    if (s->causal) {
        long limit = (long)i + s->kv_len - s->q_len + 1;
        if (limit < n) n = limit > 0 ? (int)limit : 0;
    }
    return n;
}

/* The first query row of batch b that sees key j (q_len when none does). */
static int first_query_seeing(const AttentionShape *s, int b, int j) {
    if (visible_keys(s, b, s->q_len - 1) <= j) return s->q_len;
    if (!s->causal) return 0;
    long i = (long)j - (s->kv_len - s->q_len);
    return i > 0 ? (int)i : 0;
}

/* Every task owns one block (ATTN_BLOCK queries, or keys) and walks over the blocks of the other
 * side. Its own block is transposed once, [head dim][ATTN_BLOCK]; each block it walks over is
 * read as rows, [ATTN_BLOCK][dp]; so a score tile is [walked][own] and nothing is transposed
 * inside the walk. Forward and dq tasks own queries (their tiles are S^T, keys x queries), dk/dv
 * tasks own keys (their tiles are S). */
typedef struct AttnScratch {
    int dp;                   /* head_dim padded to ATTN_PAD_COLS */
    float *own_t, *own2_t;    /* q and dout, or k and v, transposed */
    float *walk, *walk2;      /* k and v, or q and dout, as rows when they must be copied */
    float *s, *ds;            /* [ATTN_BLOCK][ATTN_BLOCK] scores or probabilities, their gradients */
    float *acc, *acc2;        /* [ATTN_BLOCK][dp] out or dq, or dk and dv */
} AttnScratch;

static size_t attn_scratch_floats(int dp) {
    return (size_t)6 * ATTN_BLOCK * dp + (size_t)2 * ATTN_BLOCK * ATTN_BLOCK;
}

static AttnScratch attn_scratch_at(float *base, int dp) {
    size_t block = (size_t)ATTN_BLOCK * dp, tile = (size_t)ATTN_BLOCK * ATTN_BLOCK;
    AttnScratch w = {.dp = dp};
    float **blocks[] = {&w.own_t, &w.own2_t, &w.walk, &w.walk2, &w.acc, &w.acc2};
    for (size_t i = 0; i < sizeof blocks / sizeof *blocks; i++) *blocks[i] = base + i * block;
    w.s = base + 6 * block;
    w.ds = w.s + tile;
    return w;
}

/* One scratch per thread in a single 64-byte aligned allocation, or NULL. */
static float *attn_scratch_pool(int dp, int threads) {
    size_t bytes = attn_scratch_floats(dp) * sizeof(float) * (size_t)threads;
    return aligned_alloc(64, (bytes + 63) / 64 * 64); /* aligned_alloc wants a multiple */
}

static int attn_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static float *attn_thread_scratch(float *pool, int dp) {
#ifdef _OPENMP
    return pool + (size_t)omp_get_thread_num() * attn_scratch_floats(dp);
#else
    (void)dp;
    return pool;
#endif
}

static void fill_nan(float *x, size_t n) {
    for (size_t i = 0; x && i < n; i++) x[i] = NAN;
}

/* rows x cols values, source rows `stride` apart -> dst [rows_pad][dp], zero padded. */
static void load_rows(float *dst, int dp, int rows_pad, const float *src, size_t stride, int rows,
                      int cols) {
    for (int r = 0; r < rows_pad; r++) {
        float *d = dst + (size_t)r * dp;
        int copied = r < rows ? cols : 0;
        if (copied) memcpy(d, src + r * stride, (size_t)cols * sizeof *d);
        memset(d + copied, 0, (size_t)(dp - copied) * sizeof *d);
    }
}

/* The same rows transposed -> dst [cols][ATTN_BLOCK], zero padded from rows to rows_pad. */
static void load_transposed(float *dst, int rows_pad, const float *src, size_t stride, int rows,
                            int cols) {
    for (int r = 0; r < rows_pad; r++)
        for (int c = 0; c < cols; c++) dst[(size_t)c * ATTN_BLOCK + r] = r < rows ? src[r * stride + c] : 0.0f;
}

/* The rows of a walked block as the kernels read them (rows padded to ATTN_PAD_ROWS, dp
 * columns): in place when the source already has that form, else a zero-padded copy in
 * scratch. *ld is their row stride. */
static const float *walk_rows(float *scratch, int dp, const float *src, ptrdiff_t stride, int rows,
                              int cols, ptrdiff_t *ld) {
    if (rows % ATTN_PAD_ROWS == 0 && cols == dp) {
        *ld = stride;
        return src;
    }
    load_rows(scratch, dp, round_up(rows, ATTN_PAD_ROWS), src, (size_t)stride, rows, cols);
    *ld = dp;
    return scratch;
}

/* s[:rows, :cols] = walk own^T, the raw scores of a tile (inner products over head_dim). */
static void tile_scores(const float *walk, ptrdiff_t ld, const float *own_t, float *s, int rows,
                        int cols, int head_dim) {
    for (int r = 0; r < rows; r++) memset(s + r * ATTN_BLOCK, 0, (size_t)cols * sizeof *s);
    block_madd(rows, cols, head_dim, walk, ld, 1, own_t, ATTN_BLOCK, s, ATTN_BLOCK);
}

/* acc[:own_rows] += tile^T walk: each row of the own block gathers the walked rows weighted by
 * its column of the tile (probabilities or score gradients). */
static void tile_gather(float *acc, const float *tile, const float *walk, ptrdiff_t ld,
                        int own_rows, int walked, int dp) {
    block_madd(own_rows, dp, walked, tile, 1, ATTN_BLOCK, walk, ld, acc, dp);
}

/* Folds a tile of scores st [keys][queries] (keys j0 .. j0 + nk - 1) into each query column's
 * running max m and sum l (online softmax): st becomes e^(scale s - m_new) where the key is
 * visible to the query and 0 elsewhere, and alpha is the factor that rescales the query's
 * earlier output to the new max. */
static void softmax_fold_tile(float *st, int nk, int cols, int j0, const int *visible, float scale,
                              float *m, float *l, float *alpha) {
    float shift[ATTN_BLOCK], sum[ATTN_BLOCK];
    for (int i = 0; i < cols; i++) {
        shift[i] = m[i];
        sum[i] = 0.0f;
    }
    for (int j = 0; j < nk; j++) {
        float *row = st + j * ATTN_BLOCK;
        for (int i = 0; i < cols; i++) {
            row[i] = j0 + j < visible[i] ? row[i] * scale : -INFINITY;
            shift[i] = row[i] > shift[i] ? row[i] : shift[i];
        }
    }
    for (int i = 0; i < cols; i++) {
        float m_new = shift[i];
        shift[i] = m_new == -INFINITY ? 0.0f : m_new; /* a column with no key yet stays at 0 */
        alpha[i] = exp_fast(m[i] - shift[i]);       /* 0 on the first keys, where m = -inf */
        m[i] = m_new;
    }
    for (int j = 0; j < nk; j++) {
        float *row = st + j * ATTN_BLOCK;
        for (int i = 0; i < cols; i++) {
            row[i] = exp_fast(row[i] - shift[i]);
            sum[i] += row[i];
        }
    }
    for (int i = 0; i < cols; i++) l[i] = l[i] * alpha[i] + sum[i];
}

/* One block of query rows [i0, i0 + nq) of head h in batch b: out rows and their lse. */
static void attention_forward_block(const AttentionShape *s, float scale, const float *q,
                                    const float *k, const float *v, float *out, float *lse, int b,
                                    int h, int i0, const AttnScratch *w) {
    int D = s->head_dim, dp = w->dp, group = s->heads / s->kv_heads;
    int nq = s->q_len - i0 < ATTN_BLOCK ? s->q_len - i0 : ATTN_BLOCK;
    int rows = round_up(nq, ATTN_PAD_ROWS), cols = round_up(nq, ATTN_PAD_COLS);
    size_t q_stride = (size_t)s->heads * D, kv_stride = (size_t)s->kv_heads * D;
    size_t q_off = ((size_t)b * s->q_len + i0) * q_stride + (size_t)h * D;
    float m[ATTN_BLOCK], l[ATTN_BLOCK], alpha[ATTN_BLOCK];
    int visible[ATTN_BLOCK];
    for (int i = 0; i < ATTN_BLOCK; i++) {
        visible[i] = i < nq ? visible_keys(s, b, i0 + i) : 0;
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    load_transposed(w->own_t, cols, q + q_off, q_stride, nq, D);
    memset(w->acc, 0, (size_t)rows * dp * sizeof *w->acc);
    int kv_end = visible[nq - 1]; /* later rows see more keys */
    for (int j0 = 0; j0 < kv_end; j0 += ATTN_BLOCK) {
        int nk = kv_end - j0 < ATTN_BLOCK ? kv_end - j0 : ATTN_BLOCK;
        size_t kv_off = ((size_t)b * s->kv_len + j0) * kv_stride + (size_t)(h / group) * D;
        ptrdiff_t k_ld, v_ld;
        const float *k_rows = walk_rows(w->walk, dp, k + kv_off, kv_stride, nk, D, &k_ld);
        const float *v_rows = walk_rows(w->walk2, dp, v + kv_off, kv_stride, nk, D, &v_ld);
        tile_scores(k_rows, k_ld, w->own_t, w->s, round_up(nk, ATTN_PAD_ROWS), cols, D);
        softmax_fold_tile(w->s, nk, cols, j0, visible, scale, m, l, alpha);
        for (int i = 0; i < rows; i++)
            if (alpha[i] != 1.0f)
                for (int d = 0; d < dp; d++) w->acc[(size_t)i * dp + d] *= alpha[i];
        tile_gather(w->acc, w->s, v_rows, v_ld, rows, nk, dp);
    }
    float *lse_row = lse + ((size_t)b * s->heads + h) * s->q_len + i0;
    for (int i = 0; i < nq; i++) {
        float *o = out + q_off + i * q_stride;
        float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        for (int d = 0; d < D; d++) o[d] = w->acc[(size_t)i * dp + d] * inv;
        lse_row[i] = l[i] > 0.0f ? m[i] + logf(l[i]) : -INFINITY;
    }
}

void attention_forward(const AttentionShape *s, float scale, const float *q, const float *k,
                       const float *v, float *out, float *lse) {
    int dp = round_up(s->head_dim, ATTN_PAD_COLS), q_blocks = (s->q_len + ATTN_BLOCK - 1) / ATTN_BLOCK;
    long tasks = (long)s->batch * s->heads * q_blocks;
    float *pool = attn_scratch_pool(dp, attn_threads());
    if (!pool) { /* out of memory: NaN outputs rather than a silent wrong answer */
        fill_nan(out, (size_t)s->batch * s->q_len * s->heads * s->head_dim);
        fill_nan(lse, (size_t)s->batch * s->heads * s->q_len);
        return;
    }
    ATTN_OMP(omp parallel)
    {
        AttnScratch w = attn_scratch_at(attn_thread_scratch(pool, dp), dp);
        ATTN_OMP(omp for schedule(dynamic))
        for (long t = 0; t < tasks; t++)
            attention_forward_block(s, scale, q, k, v, out, lse, (int)(t / q_blocks / s->heads),
                                    (int)(t / q_blocks % s->heads), (int)(t % q_blocks) * ATTN_BLOCK, &w);
    }
    free(pool);
}

/* What backward needs per query of a block: visible key count, lse and D_i = rowsum(dout * out);
 * entries past the block's n queries see no key. */
typedef struct QueryStats {
    int n;
    int visible[ATTN_BLOCK];
    float lse[ATTN_BLOCK], di[ATTN_BLOCK];
} QueryStats;

/* di: [B, H, Nq] like lse. */
static void query_stats(const AttentionShape *s, const float *lse, const float *di, int b, int h,
                        int i0, QueryStats *qs) {
    size_t row0 = ((size_t)b * s->heads + h) * s->q_len + i0;
    qs->n = s->q_len - i0 < ATTN_BLOCK ? s->q_len - i0 : ATTN_BLOCK;
    for (int i = 0; i < ATTN_BLOCK; i++) {
        qs->visible[i] = i < qs->n ? visible_keys(s, b, i0 + i) : 0;
        qs->lse[i] = qs->visible[i] > 0 ? lse[row0 + i] : 0.0f; /* -inf rows are masked anyway */
        qs->di[i] = i < qs->n ? di[row0 + i] : 0.0f;
    }
}

/* P = e^(scale S - lse) where the key is visible (0 elsewhere) and dS = scale P (dP - D_i), on a
 * tile of keys j0 + r (rows) x the queries of qs (columns). st becomes P^T, dpt dS^T. */
static void softmax_grad_keys_by_queries(float *st, float *dpt, int rows, int cols, int j0,
                                         const QueryStats *qs, float scale) {
    for (int r = 0; r < rows; r++) {
        float *s_row = st + r * ATTN_BLOCK, *dp_row = dpt + r * ATTN_BLOCK;
        for (int i = 0; i < cols; i++) {
            float e = exp_fast(s_row[i] * scale - qs->lse[i]); /* unconditional, so it vectorises */
            float p = j0 + r < qs->visible[i] ? e : 0.0f;
            s_row[i] = p;
            dp_row[i] = scale * p * (dp_row[i] - qs->di[i]);
        }
    }
}

/* The same on a tile of the queries of qs (rows) x keys j0 + c (columns): s becomes P, dp dS. */
static void softmax_grad_queries_by_keys(float *s, float *dp, int rows, int cols, int j0,
                                         const QueryStats *qs, float scale) {
    for (int i = 0; i < rows; i++) {
        float *s_row = s + i * ATTN_BLOCK, *dp_row = dp + i * ATTN_BLOCK;
        for (int c = 0; c < cols; c++) {
            float e = exp_fast(s_row[c] * scale - qs->lse[i]);
            float p = j0 + c < qs->visible[i] ? e : 0.0f;
            s_row[c] = p;
            dp_row[c] = scale * p * (dp_row[c] - qs->di[i]);
        }
    }
}

/* dq rows [i0, i0 + n) of head h in batch b: dQ = dS K over every key block the rows see. */
static void attention_dq_block(const AttentionShape *s, float scale, const float *q, const float *k,
                               const float *v, const float *lse, const float *di, const float *dout,
                               float *dq, int b, int h, int i0, const AttnScratch *w) {
    int D = s->head_dim, dp = w->dp, group = s->heads / s->kv_heads;
    size_t q_stride = (size_t)s->heads * D, kv_stride = (size_t)s->kv_heads * D;
    size_t q_off = ((size_t)b * s->q_len + i0) * q_stride + (size_t)h * D;
    QueryStats qs;
    query_stats(s, lse, di, b, h, i0, &qs);
    int rows = round_up(qs.n, ATTN_PAD_ROWS), cols = round_up(qs.n, ATTN_PAD_COLS);
    load_transposed(w->own_t, cols, q + q_off, q_stride, qs.n, D);
    load_transposed(w->own2_t, cols, dout + q_off, q_stride, qs.n, D);
    memset(w->acc, 0, (size_t)rows * dp * sizeof *w->acc);
    int kv_end = qs.visible[qs.n - 1];
    for (int j0 = 0; j0 < kv_end; j0 += ATTN_BLOCK) {
        int nk = kv_end - j0 < ATTN_BLOCK ? kv_end - j0 : ATTN_BLOCK, nk_rows = round_up(nk, ATTN_PAD_ROWS);
        size_t kv_off = ((size_t)b * s->kv_len + j0) * kv_stride + (size_t)(h / group) * D;
        ptrdiff_t k_ld, v_ld;
        const float *k_rows = walk_rows(w->walk, dp, k + kv_off, kv_stride, nk, D, &k_ld);
        const float *v_rows = walk_rows(w->walk2, dp, v + kv_off, kv_stride, nk, D, &v_ld);
        tile_scores(k_rows, k_ld, w->own_t, w->s, nk_rows, cols, D);
        tile_scores(v_rows, v_ld, w->own2_t, w->ds, nk_rows, cols, D);
        softmax_grad_keys_by_queries(w->s, w->ds, nk_rows, cols, j0, &qs, scale);
        tile_gather(w->acc, w->ds, k_rows, k_ld, rows, nk, dp);
    }
    for (int i = 0; i < qs.n; i++)
        for (int d = 0; d < D; d++) dq[q_off + i * q_stride + d] += w->acc[(size_t)i * dp + d];
}

/* dk, dv rows [j0, j0 + nk) of kv head g in batch b: dV = P^T dout and dK = dS^T Q summed over
 * the query heads sharing g, then over query blocks, always in that order. */
static void attention_dkdv_block(const AttentionShape *s, float scale, const float *q,
                                 const float *k, const float *v, const float *lse, const float *di,
                                 const float *dout, float *dk, float *dv, int b, int g, int j0,
                                 const AttnScratch *w) {
    int D = s->head_dim, dp = w->dp, group = s->heads / s->kv_heads;
    int nk = s->kv_len - j0 < ATTN_BLOCK ? s->kv_len - j0 : ATTN_BLOCK;
    int rows = round_up(nk, ATTN_PAD_ROWS), cols = round_up(nk, ATTN_PAD_COLS);
    int first = first_query_seeing(s, b, j0);
    if (first >= s->q_len) return; /* padding keys: their gradients are 0 */
    size_t q_stride = (size_t)s->heads * D, kv_stride = (size_t)s->kv_heads * D;
    size_t kv_off = ((size_t)b * s->kv_len + j0) * kv_stride + (size_t)g * D;
    load_transposed(w->own_t, cols, k + kv_off, kv_stride, nk, D);
    load_transposed(w->own2_t, cols, v + kv_off, kv_stride, nk, D);
    memset(w->acc, 0, (size_t)rows * dp * sizeof *w->acc);
    memset(w->acc2, 0, (size_t)rows * dp * sizeof *w->acc2);
    QueryStats qs;
    for (int h = g * group; h < (g + 1) * group; h++)
        for (int i0 = first / ATTN_BLOCK * ATTN_BLOCK; i0 < s->q_len; i0 += ATTN_BLOCK) {
            size_t q_off = ((size_t)b * s->q_len + i0) * q_stride + (size_t)h * D;
            query_stats(s, lse, di, b, h, i0, &qs);
            int nq_rows = round_up(qs.n, ATTN_PAD_ROWS);
            ptrdiff_t q_ld, dout_ld;
            const float *q_rows = walk_rows(w->walk, dp, q + q_off, q_stride, qs.n, D, &q_ld);
            const float *dout_rows = walk_rows(w->walk2, dp, dout + q_off, q_stride, qs.n, D, &dout_ld);
            tile_scores(q_rows, q_ld, w->own_t, w->s, nq_rows, cols, D);
            tile_scores(dout_rows, dout_ld, w->own2_t, w->ds, nq_rows, cols, D);
            softmax_grad_queries_by_keys(w->s, w->ds, nq_rows, cols, j0, &qs, scale);
            if (dv) tile_gather(w->acc2, w->s, dout_rows, dout_ld, rows, qs.n, dp);
            if (dk) tile_gather(w->acc, w->ds, q_rows, q_ld, rows, qs.n, dp);
        }
    for (int j = 0; j < nk; j++)
        for (int d = 0; d < D; d++) {
            if (dk) dk[kv_off + j * kv_stride + d] += w->acc[(size_t)j * dp + d];
            if (dv) dv[kv_off + j * kv_stride + d] += w->acc2[(size_t)j * dp + d];
        }
}

/* D_i = rowsum(dout_i * out_i) for every query: [B, Nq, H, D] -> di [B, H, Nq]. */
static void attention_row_dots(const AttentionShape *s, const float *out, const float *dout, float *di) {
    int D = s->head_dim;
    ATTN_OMP(omp parallel for)
    for (long row = 0; row < (long)s->batch * s->q_len * s->heads; row++) {
        long b = row / ((long)s->q_len * s->heads), i = row / s->heads % s->q_len, h = row % s->heads;
        float dot = 0.0f;
        for (int d = 0; d < D; d++) dot += dout[row * D + d] * out[row * D + d];
        di[(b * s->heads + h) * s->q_len + i] = dot;
    }
}

/* Two passes so that every gradient element has one writer and a fixed summation order: dq
 * parallel over (batch, head, query block), dk and dv over (batch, kv head, key block). Each
 * recomputes the probabilities it needs from q, k and lse. */
void attention_backward(const AttentionShape *s, float scale, const float *q, const float *k,
                        const float *v, const float *out, const float *lse, const float *dout,
                        float *dq, float *dk, float *dv) {
    if (!dq && !dk && !dv) return;
    int dp = round_up(s->head_dim, ATTN_PAD_COLS);
    int q_blocks = (s->q_len + ATTN_BLOCK - 1) / ATTN_BLOCK;
    int kv_blocks = (s->kv_len + ATTN_BLOCK - 1) / ATTN_BLOCK;
    long dq_tasks = dq ? (long)s->batch * s->heads * q_blocks : 0;
    long dkdv_tasks = dk || dv ? (long)s->batch * s->kv_heads * kv_blocks : 0;
    float *pool = attn_scratch_pool(dp, attn_threads());
    float *di = malloc(((size_t)s->batch * s->heads * s->q_len + 1) * sizeof *di);
    if (!pool || !di) { /* out of memory: NaN gradients rather than a silent wrong answer */
        fill_nan(dq, (size_t)s->batch * s->q_len * s->heads * s->head_dim);
        fill_nan(dk, (size_t)s->batch * s->kv_len * s->kv_heads * s->head_dim);
        fill_nan(dv, (size_t)s->batch * s->kv_len * s->kv_heads * s->head_dim);
        free(pool);
        free(di);
        return;
    }
    attention_row_dots(s, out, dout, di);
    ATTN_OMP(omp parallel)
    {
        AttnScratch w = attn_scratch_at(attn_thread_scratch(pool, dp), dp);
        ATTN_OMP(omp for schedule(dynamic))
        for (long t = 0; t < dq_tasks; t++)
            attention_dq_block(s, scale, q, k, v, lse, di, dout, dq, (int)(t / q_blocks / s->heads),
                               (int)(t / q_blocks % s->heads), (int)(t % q_blocks) * ATTN_BLOCK, &w);
        ATTN_OMP(omp for schedule(dynamic))
        for (long t = 0; t < dkdv_tasks; t++)
            attention_dkdv_block(s, scale, q, k, v, lse, di, dout, dk, dv,
                                 (int)(t / kv_blocks / s->kv_heads), (int)(t / kv_blocks % s->kv_heads),
                                 (int)(t % kv_blocks) * ATTN_BLOCK, &w);
    }
    free(pool);
    free(di);
}

/* Rotary embedding, FLUX's interleaved convention (diffusers apply_rotary_emb with
 * use_real_unbind_dim=-1: x * cos + stack(-x_imag, x_real) * sin, cos and sin repeated per pair):
 *   y[2i] = x[2i] cos - x[2i+1] sin,  y[2i+1] = x[2i] sin + x[2i+1] cos.
 * An odd last element is passed through. y may alias x. */
void rope_forward(int batch, int n, int heads, int head_dim, const float *cos_table,
                  const float *sin_table, const float *x, float *y) {
    int half = head_dim / 2;
    ATTN_OMP(omp parallel for)
    for (long row = 0; row < (long)batch * n; row++) {
        const float *c = cos_table + (size_t)(row % n) * half, *sn = sin_table + (size_t)(row % n) * half;
        for (int h = 0; h < heads; h++) {
            const float *xr = x + ((size_t)row * heads + h) * head_dim;
            float *yr = y + ((size_t)row * heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float x0 = xr[2 * i], x1 = xr[2 * i + 1];
                yr[2 * i] = x0 * c[i] - x1 * sn[i];
                yr[2 * i + 1] = x0 * sn[i] + x1 * c[i];
            }
            if (head_dim % 2) yr[head_dim - 1] = xr[head_dim - 1];
        }
    }
}

/* dx += R^T dy: the rotation by -theta. */
void rope_backward(int batch, int n, int heads, int head_dim, const float *cos_table,
                   const float *sin_table, const float *dy, float *dx) {
    int half = head_dim / 2;
    ATTN_OMP(omp parallel for)
    for (long row = 0; row < (long)batch * n; row++) {
        const float *c = cos_table + (size_t)(row % n) * half, *sn = sin_table + (size_t)(row % n) * half;
        for (int h = 0; h < heads; h++) {
            const float *dyr = dy + ((size_t)row * heads + h) * head_dim;
            float *dxr = dx + ((size_t)row * heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float g0 = dyr[2 * i], g1 = dyr[2 * i + 1];
                dxr[2 * i] += g0 * c[i] + g1 * sn[i];
                dxr[2 * i + 1] += g1 * c[i] - g0 * sn[i];
            }
            if (head_dim % 2) dxr[head_dim - 1] += dyr[head_dim - 1];
        }
    }
}

/* ---- end section: attention and rotary embedding ---- */

/* ---- section: norms, activations, resampling, elementwise (owned by the ops work) -------- */

/* ---- end section: norms, activations, resampling, elementwise ---- */
