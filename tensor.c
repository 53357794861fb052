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
 * O(ATTN_BLOCK * head_dim) and no Nq x Nk matrix ever exists. Tiles are copied into zero-padded
 * scratch (rows to a multiple of ATTN_PAD_ROWS, columns to a multiple of ATTN_PAD_COLS) so the
 * micro-kernels never meet a ragged edge. */
#define ATTN_BLOCK 64
#define ATTN_PAD_ROWS 8
#define ATTN_PAD_COLS 32

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

/* C[M, N] += A[M, K] B[K, N] on padded scratch: M % ATTN_PAD_ROWS == 0, N % ATTN_PAD_COLS == 0,
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

/* e^x within about 2 ulp for x <= 88, and exactly 0 for x < -87 (so e^-inf = 0). Branch-free and
 * libm-free so the row loops calling it vectorise: a libm expf per score would cost more than
 * the two block products together. Range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7
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

/* Max over n % 16 == 0 values; sixteen lanes kept apart so the loop vectorises. */
static float row_max(const float *x, int n) {
    float lane[16];
    for (int t = 0; t < 16; t++) lane[t] = -INFINITY;
    for (int j = 0; j < n; j += 16)
        for (int t = 0; t < 16; t++) lane[t] = x[j + t] > lane[t] ? x[j + t] : lane[t];
    float m = lane[0];
    for (int t = 1; t < 16; t++) m = lane[t] > m ? lane[t] : m;
    return m;
}

/* x[j] = e^(x[j] - shift) over n % 16 == 0 values; returns their sum (fixed lane order). */
static float exp_shifted_sum(float *x, int n, float shift) {
    float lane[16] = {0};
    for (int j = 0; j < n; j += 16)
        for (int t = 0; t < 16; t++) {
            x[j + t] = exp_fast(x[j + t] - shift);
            lane[t] += x[j + t];
        }
    float sum = 0.0f;
    for (int t = 0; t < 16; t++) sum += lane[t];
    return sum;
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

/* Per-thread scratch, head_dim padded to dp. Row blocks are [ATTN_BLOCK][dp]; kt and vt are
 * key blocks transposed, [dp][ATTN_BLOCK]; s and ds are [ATTN_BLOCK][ATTN_BLOCK]. */
typedef struct AttnScratch {
    int dp;
    float *q, *dout, *k, *v, *kt, *vt, *s, *ds, *acc, *acc2;
} AttnScratch;

static size_t attn_scratch_floats(int dp) {
    return (size_t)8 * ATTN_BLOCK * dp + (size_t)2 * ATTN_BLOCK * ATTN_BLOCK;
}

static AttnScratch attn_scratch_at(float *base, int dp) {
    size_t rows = (size_t)ATTN_BLOCK * dp, tile = (size_t)ATTN_BLOCK * ATTN_BLOCK;
    AttnScratch w = {.dp = dp};
    float **row_blocks[] = {&w.q, &w.dout, &w.k, &w.v, &w.kt, &w.vt, &w.acc, &w.acc2};
    for (size_t i = 0; i < sizeof row_blocks / sizeof *row_blocks; i++) *row_blocks[i] = base + i * rows;
    w.s = base + 8 * rows;
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

/* The transpose: dst[c][r] = src[r * stride + c] -> dst [dp][ATTN_BLOCK], zero padded up to
 * rows_pad columns (the rest is never read). */
static void load_transposed(float *dst, int dp, int rows_pad, const float *src, size_t stride,
                            int rows, int cols) {
    for (int c = 0; c < dp; c++) {
        float *d = dst + (size_t)c * ATTN_BLOCK;
        for (int r = 0; r < rows_pad; r++) d[r] = c < cols && r < rows ? src[r * stride + c] : 0.0f;
    }
}

/* s[:mq, :width] = Q K^T from the scratch q and kt: the raw scores of one block pair. */
static void block_scores(const AttnScratch *w, const float *rows, const float *cols_t, float *s,
                         int mq, int width) {
    for (int i = 0; i < mq; i++) memset(s + i * ATTN_BLOCK, 0, (size_t)width * sizeof *s);
    block_madd(mq, width, w->dp, rows, w->dp, 1, cols_t, ATTN_BLOCK, s, ATTN_BLOCK);
}

/* Folds one block of a row's scores into its running max m and sum l (online softmax):
 * srow becomes e^(scale s - m) over the `visible` keys (0 elsewhere) and the row's output
 * accumulator is rescaled to the new max. */
static void softmax_fold_row(float *srow, int width, int visible, float scale, float *m, float *l,
                             float *acc_row, int dp) {
    if (visible <= 0) {
        memset(srow, 0, (size_t)width * sizeof *srow);
        return;
    }
    for (int j = 0; j < width; j++) srow[j] = j < visible ? srow[j] * scale : -INFINITY;
    float m_new = fmaxf(*m, row_max(srow, width));
    float alpha = exp_fast(*m - m_new); /* 0 on the row's first block, where *m = -inf */
    *l = *l * alpha + exp_shifted_sum(srow, width, m_new);
    *m = m_new;
    if (alpha != 1.0f)
        for (int d = 0; d < dp; d++) acc_row[d] *= alpha;
}

/* One block of query rows [i0, i0 + nq) of head h in batch b: out rows and their lse. */
static void attention_forward_block(const AttentionShape *s, float scale, const float *q,
                                    const float *k, const float *v, float *out, float *lse, int b,
                                    int h, int i0, const AttnScratch *w) {
    int D = s->head_dim, dp = w->dp, group = s->heads / s->kv_heads;
    int nq = s->q_len - i0 < ATTN_BLOCK ? s->q_len - i0 : ATTN_BLOCK, mq = round_up(nq, ATTN_PAD_ROWS);
    size_t q_stride = (size_t)s->heads * D, kv_stride = (size_t)s->kv_heads * D;
    size_t q_off = ((size_t)b * s->q_len + i0) * q_stride + (size_t)h * D;
    float m[ATTN_BLOCK], l[ATTN_BLOCK];
    int visible[ATTN_BLOCK];
    for (int i = 0; i < mq; i++) {
        visible[i] = i < nq ? visible_keys(s, b, i0 + i) : 0;
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    load_rows(w->q, dp, mq, q + q_off, q_stride, nq, D);
    memset(w->acc, 0, (size_t)mq * dp * sizeof *w->acc);
    int kv_end = visible[nq - 1]; /* rows see more keys further down */
    for (int j0 = 0; j0 < kv_end; j0 += ATTN_BLOCK) {
        int nk = kv_end - j0 < ATTN_BLOCK ? kv_end - j0 : ATTN_BLOCK, width = round_up(nk, ATTN_PAD_COLS);
        size_t kv_off = ((size_t)b * s->kv_len + j0) * kv_stride + (size_t)(h / group) * D;
        load_transposed(w->kt, dp, width, k + kv_off, kv_stride, nk, D);
        load_rows(w->v, dp, nk, v + kv_off, kv_stride, nk, D);
        block_scores(w, w->q, w->kt, w->s, mq, width);
        for (int i = 0; i < mq; i++)
            softmax_fold_row(w->s + i * ATTN_BLOCK, width, visible[i] - j0, scale, &m[i], &l[i],
                             w->acc + (size_t)i * dp, dp);
        block_madd(mq, dp, nk, w->s, ATTN_BLOCK, 1, w->v, dp, w->acc, dp);
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
#pragma omp parallel
    {
        AttnScratch w = attn_scratch_at(attn_thread_scratch(pool, dp), dp);
#pragma omp for schedule(dynamic)
        for (long t = 0; t < tasks; t++)
            attention_forward_block(s, scale, q, k, v, out, lse, (int)(t / q_blocks / s->heads),
                                    (int)(t / q_blocks % s->heads), (int)(t % q_blocks) * ATTN_BLOCK, &w);
    }
    free(pool);
}

/* Row i of a recomputed block: P = e^(scale S - lse) over the keys the row sees (0 elsewhere)
 * and dS = scale P (dP - D_i), D_i = rowsum(dout_i * out_i). srow becomes P, dprow dS. */
static void softmax_grad_row(float *srow, float *dprow, int width, int visible, float scale,
                             float lse, float di) {
    for (int j = 0; j < width; j++) {
        float p = j < visible ? exp_fast(srow[j] * scale - lse) : 0.0f;
        srow[j] = p;
        dprow[j] = scale * p * (dprow[j] - di);
    }
}

/* The query side of one block of rows [i0, i0 + nq) of head h: q and dout rows into scratch,
 * each row's visible key count, lse and D_i. */
typedef struct QueryBlock {
    int nq, mq;
    int visible[ATTN_BLOCK];
    float lse[ATTN_BLOCK], di[ATTN_BLOCK];
} QueryBlock;

static void load_query_block(const AttentionShape *s, const float *q, const float *out,
                             const float *lse, const float *dout, int b, int h, int i0,
                             const AttnScratch *w, QueryBlock *qb) {
    int D = s->head_dim;
    size_t stride = (size_t)s->heads * D, off = ((size_t)b * s->q_len + i0) * stride + (size_t)h * D;
    const float *lse_row = lse + ((size_t)b * s->heads + h) * s->q_len + i0;
    qb->nq = s->q_len - i0 < ATTN_BLOCK ? s->q_len - i0 : ATTN_BLOCK;
    qb->mq = round_up(qb->nq, ATTN_PAD_ROWS);
    for (int i = 0; i < qb->mq; i++) {
        qb->visible[i] = i < qb->nq ? visible_keys(s, b, i0 + i) : 0;
        qb->lse[i] = qb->visible[i] > 0 ? lse_row[i] : 0.0f; /* -inf rows are masked anyway */
        qb->di[i] = 0.0f;
        if (i < qb->nq)
            for (int d = 0; d < D; d++) qb->di[i] += dout[off + i * stride + d] * out[off + i * stride + d];
    }
    load_rows(w->q, w->dp, qb->mq, q + off, stride, qb->nq, D);
    load_rows(w->dout, w->dp, qb->mq, dout + off, stride, qb->nq, D);
}

/* P and dS of one block pair: s = P, ds = dS for the query block in scratch (q, dout) against
 * the key block in scratch (kt, vt) whose first key is j0 and which has width padded columns. */
static void block_probs_and_grads(const AttnScratch *w, const QueryBlock *qb, int j0, int width,
                                  float scale) {
    block_scores(w, w->q, w->kt, w->s, qb->mq, width);
    block_scores(w, w->dout, w->vt, w->ds, qb->mq, width);
    for (int i = 0; i < qb->mq; i++)
        softmax_grad_row(w->s + i * ATTN_BLOCK, w->ds + i * ATTN_BLOCK, width,
                         qb->visible[i] - j0, scale, qb->lse[i], qb->di[i]);
}

/* dq rows [i0, i0 + nq) of head h in batch b: dQ = dS K over every key block the rows see. */
static void attention_dq_block(const AttentionShape *s, float scale, const float *q, const float *k,
                               const float *v, const float *out, const float *lse,
                               const float *dout, float *dq, int b, int h, int i0,
                               const AttnScratch *w) {
    int D = s->head_dim, dp = w->dp, group = s->heads / s->kv_heads;
    size_t kv_stride = (size_t)s->kv_heads * D, q_stride = (size_t)s->heads * D;
    QueryBlock qb;
    load_query_block(s, q, out, lse, dout, b, h, i0, w, &qb);
    memset(w->acc, 0, (size_t)qb.mq * dp * sizeof *w->acc);
    int kv_end = qb.visible[qb.nq - 1];
    for (int j0 = 0; j0 < kv_end; j0 += ATTN_BLOCK) {
        int nk = kv_end - j0 < ATTN_BLOCK ? kv_end - j0 : ATTN_BLOCK, width = round_up(nk, ATTN_PAD_COLS);
        size_t kv_off = ((size_t)b * s->kv_len + j0) * kv_stride + (size_t)(h / group) * D;
        load_transposed(w->kt, dp, width, k + kv_off, kv_stride, nk, D);
        load_transposed(w->vt, dp, width, v + kv_off, kv_stride, nk, D);
        load_rows(w->k, dp, nk, k + kv_off, kv_stride, nk, D);
        block_probs_and_grads(w, &qb, j0, width, scale);
        block_madd(qb.mq, dp, nk, w->ds, ATTN_BLOCK, 1, w->k, dp, w->acc, dp);
    }
    float *dq_rows = dq + ((size_t)b * s->q_len + i0) * q_stride + (size_t)h * D;
    for (int i = 0; i < qb.nq; i++)
        for (int d = 0; d < D; d++) dq_rows[i * q_stride + d] += w->acc[(size_t)i * dp + d];
}

/* dk, dv rows [j0, j0 + nk) of kv head g in batch b: dV = P^T dout and dK = dS^T Q summed over
 * the query heads sharing g, then over query blocks, always in that order. */
static void attention_dkdv_block(const AttentionShape *s, float scale, const float *q,
                                 const float *k, const float *v, const float *out,
                                 const float *lse, const float *dout, float *dk, float *dv, int b,
                                 int g, int j0, const AttnScratch *w) {
    int D = s->head_dim, dp = w->dp, group = s->heads / s->kv_heads;
    int nk = s->kv_len - j0 < ATTN_BLOCK ? s->kv_len - j0 : ATTN_BLOCK, width = round_up(nk, ATTN_PAD_COLS);
    int first = first_query_seeing(s, b, j0);
    if (first >= s->q_len) return; /* padding keys: their gradients are 0 */
    size_t kv_stride = (size_t)s->kv_heads * D;
    size_t kv_off = ((size_t)b * s->kv_len + j0) * kv_stride + (size_t)g * D;
    load_transposed(w->kt, dp, width, k + kv_off, kv_stride, nk, D);
    load_transposed(w->vt, dp, width, v + kv_off, kv_stride, nk, D);
    memset(w->acc, 0, (size_t)width * dp * sizeof *w->acc);
    memset(w->acc2, 0, (size_t)width * dp * sizeof *w->acc2);
    QueryBlock qb;
    for (int h = g * group; h < (g + 1) * group; h++)
        for (int i0 = first / ATTN_BLOCK * ATTN_BLOCK; i0 < s->q_len; i0 += ATTN_BLOCK) {
            load_query_block(s, q, out, lse, dout, b, h, i0, w, &qb);
            block_probs_and_grads(w, &qb, j0, width, scale);
            if (dv) block_madd(width, dp, qb.nq, w->s, 1, ATTN_BLOCK, w->dout, dp, w->acc2, dp);
            if (dk) block_madd(width, dp, qb.nq, w->ds, 1, ATTN_BLOCK, w->q, dp, w->acc, dp);
        }
    for (int j = 0; j < nk; j++)
        for (int d = 0; d < D; d++) {
            if (dk) dk[kv_off + j * kv_stride + d] += w->acc[(size_t)j * dp + d];
            if (dv) dv[kv_off + j * kv_stride + d] += w->acc2[(size_t)j * dp + d];
        }
}

/* Two passes so that every gradient element has one writer and a fixed summation order: dq
 * parallel over (batch, head, query block), dk and dv over (batch, kv head, key block). Each
 * recomputes the probabilities it needs from q, k and lse. */
void attention_backward(const AttentionShape *s, float scale, const float *q, const float *k,
                        const float *v, const float *out, const float *lse, const float *dout,
                        float *dq, float *dk, float *dv) {
    int dp = round_up(s->head_dim, ATTN_PAD_COLS);
    int q_blocks = (s->q_len + ATTN_BLOCK - 1) / ATTN_BLOCK;
    int kv_blocks = (s->kv_len + ATTN_BLOCK - 1) / ATTN_BLOCK;
    long dq_tasks = dq ? (long)s->batch * s->heads * q_blocks : 0;
    long dkdv_tasks = dk || dv ? (long)s->batch * s->kv_heads * kv_blocks : 0;
    float *pool = attn_scratch_pool(dp, attn_threads());
    if (!pool) { /* out of memory: NaN gradients rather than a silent wrong answer */
        fill_nan(dq, (size_t)s->batch * s->q_len * s->heads * s->head_dim);
        fill_nan(dk, (size_t)s->batch * s->kv_len * s->kv_heads * s->head_dim);
        fill_nan(dv, (size_t)s->batch * s->kv_len * s->kv_heads * s->head_dim);
        return;
    }
#pragma omp parallel
    {
        AttnScratch w = attn_scratch_at(attn_thread_scratch(pool, dp), dp);
#pragma omp for schedule(dynamic)
        for (long t = 0; t < dq_tasks; t++)
            attention_dq_block(s, scale, q, k, v, out, lse, dout, dq, (int)(t / q_blocks / s->heads),
                               (int)(t / q_blocks % s->heads), (int)(t % q_blocks) * ATTN_BLOCK, &w);
#pragma omp for schedule(dynamic)
        for (long t = 0; t < dkdv_tasks; t++)
            attention_dkdv_block(s, scale, q, k, v, out, lse, dout, dk, dv,
                                 (int)(t / kv_blocks / s->kv_heads), (int)(t / kv_blocks % s->kv_heads),
                                 (int)(t % kv_blocks) * ATTN_BLOCK, &w);
    }
    free(pool);
}

/* Rotary embedding, FLUX's interleaved convention (diffusers apply_rotary_emb with
 * use_real_unbind_dim=-1: x * cos + stack(-x_imag, x_real) * sin, cos and sin repeated per pair):
 *   y[2i] = x[2i] cos - x[2i+1] sin,  y[2i+1] = x[2i] sin + x[2i+1] cos.
 * An odd last element is passed through. y may alias x. */
void rope_forward(int batch, int n, int heads, int head_dim, const float *cos_table,
                  const float *sin_table, const float *x, float *y) {
    int half = head_dim / 2;
#pragma omp parallel for
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
#pragma omp parallel for
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
