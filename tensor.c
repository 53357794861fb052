/* tensor.c - float32 tensors and the kernels: GEMM, conv, attention, norms, activations.
 * Every forward kernel sits next to its backward.
 *
 * Contents: tensors (and the allocation of large buffers); helpers shared by the kernels; GEMM
 * (the reference, then the packed and blocked one); conv2d (im2col, Winograd F(4x4, 3x3), then
 * the reference); attention and rotary embedding (the blocked one, then the reference); norms,
 * activations, resampling, elementwise, transposes; random numbers (PyTorch's CPU generator). */
#include "tensor.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* === tensors === */

/* Transparent huge pages are 2 MB. */
#define HUGE_PAGE_BYTES ((size_t)2 << 20)

/* Marks the whole 2 MB pages inside [p, p + bytes) MADV_HUGEPAGE where Linux has it (its usual
 * setting, "madvise", gives huge pages only to memory so marked); a hint, nothing when bytes is
 * small. malloc maps a large block fresh on every call, and one 2 MB fault then replaces 512
 * faults of 4 KB, each ~10 us on a virtual machine: 512 MB first touched in 1.3 s with 4 KB
 * pages, 0.08-0.8 s with huge pages, on this project's 2-core VM. */
static void huge_pages_hint(void *p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    uintptr_t first = ((uintptr_t)p + HUGE_PAGE_BYTES - 1) & ~(uintptr_t)(HUGE_PAGE_BYTES - 1);
    uintptr_t end = ((uintptr_t)p + bytes) & ~(uintptr_t)(HUGE_PAGE_BYTES - 1);
    if (p && end > first) madvise((void *)first, end - first, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
}

/* Memory for a buffer that may be large (a tensor, a kernel's scratch), freed with free(), or
 * NULL: malloc's, with huge_pages_hint. */
static void *buffer_new(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    huge_pages_hint(p, bytes);
    return p;
}

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

/* n zeroed floats, freed with free(): calloc's, which leaves a freshly mapped block untouched
 * (already zero), so the hint comes before its first touch. */
static float *tensor_data_new(size_t n) {
    float *p = calloc(n > 0 ? n : 1, sizeof(float));
    huge_pages_hint(p, n * sizeof(float));
    return p;
}

Tensor *tensor_new(int ndim, const int64_t *shape) {
    Tensor *t = tensor_header(ndim, shape);
    if (!t) return NULL;
    t->data = tensor_data_new((size_t)t->numel);
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

/* === helpers shared by the kernels === */

/* Loops wake the threads only past this much work: floats of cheap arithmetic, or elements
 * that each take an exp or erfc. */
#define PARALLEL_MIN ((size_t)1 << 15)
#define PARALLEL_MIN_MATH ((size_t)1 << 12)

/* The kernels have no status to return: when scratch memory runs out they poison their
 * outputs with NaN, so the failure cannot pass for a result. */
static void fill_nan(float *p, size_t n) {
    if (p)
        for (size_t i = 0; i < n; i++) p[i] = NAN;
}

/* Scratch of `bytes` on a 64-byte boundary inside a buffer_new block (free(*block) releases
 * it), or NULL. Not aligned_alloc: glibc's asks its heap for more than the chunk it took last
 * time, so a kernel that allocated, freed and allocated again got new pages (a page fault per
 * 4 KB) on each of its first calls: on a 2-core VM, 1024^3 GEMMs ran at half speed for 8 calls. */
static float *scratch_new(size_t bytes, void **block) {
    *block = bytes <= SIZE_MAX - 64 ? buffer_new(bytes + 64) : NULL;
    if (!*block) return NULL;
    return (float *)(((uintptr_t)*block + 63) & ~(uintptr_t)63);
}

/* e^x for x <= 0, the only exponentials sigmoid, SiLU, GELU, softmax and attention need (they
 * never overflow), to ~2 ulp in plain C that compilers vectorise, unlike a call to expf.
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

/* === GEMM === */

/* An operand's elements as stored: f32, or bf16 / f16 widened to f32 as they are packed (both
 * exactly), so that a weight can be read where it lies in a mapped file. Little-endian. */
typedef struct GemmSource {
    const void *data;
    DType dtype; /* DTYPE_F32, DTYPE_BF16 or DTYPE_F16 */
} GemmSource;

/* Element i of src as f32 (any alignment). */
static inline float gemm_source_at(GemmSource src, ptrdiff_t i) {
    if (src.dtype == DTYPE_F32) return ((const float *)src.data)[i];
    const unsigned char *p = (const unsigned char *)src.data + 2 * i;
    uint16_t h = (uint16_t)(p[0] | p[1] << 8);
    return src.dtype == DTYPE_BF16 ? bits_float((uint32_t)h << 16) : f16_to_f32(h);
}

/* The textbook triple loop over B as stored, each dot product in double. */
static void gemm_reference_source(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                                  const float *A, int lda, GemmSource B, int ldb, float beta,
                                  float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                float a = trans_a ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = gemm_source_at(B, trans_b ? (ptrdiff_t)j * ldb + k
                                                    : (ptrdiff_t)k * ldb + j);
                acc += (double)a * b;
            }
            float prior = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
            C[(size_t)i * ldc + j] = alpha * (float)acc + prior;
        }
}

void gemm_reference(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_reference_source(trans_a, trans_b, M, N, K, alpha, A, lda, (GemmSource){B, DTYPE_F32},
                          ldb, beta, C, ldc);
}

/* The blocked GEMM, in the BLIS / GotoBLAS way. Loops, outermost first:
 *   rows of C in blocks of mc              A block [mc, K] packed once, shared by the threads,
 *                                          each panel by the first to need it (GemmABlock)
 *     work items, in parallel: row chunks x column blocks of up to GEMM_NC (gemm_plan)
 *       K in blocks of GEMM_KC             the item packs its B block [kc, nb] (core's L2);
 *                                          the only split of the K-sum, fixed by K alone
 *         rows in steps of GEMM_MR         A micro-panel [kc, MR] stays in L1
 *           columns in steps of GEMM_NR    micro-kernel: C tile [MR, NR] from the two panels
 * Packing copies op(A) and op(B) into the layout the micro-kernel streams, so one kernel serves
 * all four transpose cases, and zero-pads the edge panels so the kernel always computes a full
 * tile (it writes only the part inside C).
 * Every C element is the same sequence of operations whatever the thread count: its K-sum runs
 * in k order inside the kernel, block by block, and blocks are added to C in order.
 * The threads wait for each other once per row block (its items done), so on a shared machine
 * one thread put aside by the OS seldom holds up the others. */

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

/* The bf16 products (gemm_stored_bf16) run on the same MR x NR tiles: on AVX512-BF16's
 * vdpbf16ps or ARMv8.6's BFDOT where the build has them, else on a portable kernel. */
#if defined(GEMM_AVX512) && defined(__AVX512BF16__)
#define GEMM_BF16_AVX512
#elif defined(GEMM_NEON) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define GEMM_BF16_NEON
#else
#define GEMM_BF16_PORTABLE
#endif

/* Cache blocks for ~48 KB L1d and ~2 MB L2 per core: an A micro-panel (KC x MR floats, 18 KB
 * at MR = 12) lives in L1, a B block (KC x NC, 720 KB) in L2; the shared A block (mc x K, at
 * most GEMM_A_BLOCK_FLOATS, 128 MB) is streamed from L3 or memory, an item's rows once per
 * depth block for up to NC columns. NC is a multiple of every NR above.
 * Every row block packs all of B again, so the A block holds a transformer's tokens in one
 * block: a 512x512 klein-4B's 1536 at K up to 12288 (75 MB). Against 16 MB, 1536 x 3072 x
 * 12288 products ran 269 -> 292 GFLOPS on a 2-core Emerald Rapids; against 4 MB, 512 x 9728 x
 * 2560 (Qwen3's down_proj) 139 -> 161 on a 2-core Zen 3 (README, Benchmarks). */
#define GEMM_KC 384
#define GEMM_NC 480
#define GEMM_A_BLOCK_FLOATS (1 << 25)
/* Depth steps per pass when the packer transposes: one 64-byte line of each lane. */
#define GEMM_PACK_CHUNK 16
/* When it copies runs of lanes, the packer asks for the run this many depth steps ahead: each
 * run (a row of B) lies in its own 4 KB page, where the hardware prefetcher starts anew. A cold
 * 4 MB B packed 15-20% faster with it (2-core Zen 5). */
#define GEMM_PACK_AHEAD 4

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
 * instruction set has one. Partial tiles (m < MR or n < NR) occur only at the edges of C.
 * The bf16 micro-kernel has the same contract over depth pairs: every 4-byte slot of a and b
 * holds two bf16 values (gemm_pack_pairs), and step k adds both products of each pair. */

/* Every micro-kernel asks for its C tile [m, n] (row stride ldc) before its k loop, which then
 * hides the wait for it (C comes from memory at each depth block after the first, and on the
 * first one the stores would wait): the lines holding the first and last element of each row
 * (a row of NR <= 32 floats spans two, three when unaligned: the middle one is left to the
 * hardware prefetcher). */
static inline void gemm_prefetch_tile(int m, int n, const float *C, int ldc) {
    for (int i = 0; i < m; i++) {
        __builtin_prefetch(C + (size_t)i * ldc);
        __builtin_prefetch(C + (size_t)i * ldc + n - 1);
    }
}

/* C: [m, n] (row stride ldc) = alpha * tile + beta * C, tile: [MR, NR]. */
#if !(defined(GEMM_AVX512) || defined(GEMM_AVX2)) || defined(GEMM_BF16_PORTABLE)
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
#endif

#if defined(GEMM_AVX512)
/* The lanes of 16 columns, starting at column `first`, that lie inside the first n columns. */
static __mmask16 gemm_mask16(int n, int first) {
    int live = n - first;
    if (live >= 16) return (__mmask16)0xFFFF;
    return live <= 0 ? (__mmask16)0 : (__mmask16)((1u << live) - 1);
}

/* C: [m, n] = alpha * acc + beta * C, from an AVX-512 tile's 24 accumulators. */
static inline void gemm_store_zmm(__m512 acc[GEMM_MR][2], int m, int n, float alpha, float beta,
                                  float *C, int ldc) {
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

/* The micro-kernel (contract above) in AVX-512: the C tile in 24 zmm accumulators. */
static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    gemm_prefetch_tile(m, n, C, ldc);
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        for (int i = 0; i < GEMM_MR; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    gemm_store_zmm(acc, m, n, alpha, beta, C, ldc);
}

#if defined(GEMM_BF16_AVX512)
/* The bf16 micro-kernel in AVX512-BF16: vdpbf16ps adds a row's pair times each column's pair
 * (both products, exact in f32) to the column's accumulator, 16 columns at a time. */
static void gemm_microkernel_bf16(int kc, const float *a, const float *b, int m, int n,
                                  float alpha, float beta, float *C, int ldc) {
    const uint32_t *pa = (const uint32_t *)a;
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    gemm_prefetch_tile(m, n, C, ldc);
    for (int k = 0; k < kc; k++, pa += GEMM_MR, b += GEMM_NR) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
        for (int i = 0; i < GEMM_MR; i++) {
            __m512bh ai = (__m512bh)_mm512_set1_epi32((int)pa[i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
        }
    }
    gemm_store_zmm(acc, m, n, alpha, beta, C, ldc);
}
#endif
#elif defined(GEMM_AVX2)
/* The lanes of 8 columns, starting at column `first`, that lie inside the first n columns. */
static __m256i gemm_mask8(int n, int first) {
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - first), lane);
}

/* The micro-kernel (contract above) in AVX2: the C tile in 12 ymm accumulators. */
static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    __m256 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    gemm_prefetch_tile(m, n, C, ldc);
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
#elif defined(GEMM_NEON)
/* C: [m, n] = alpha * acc + beta * C, from a NEON tile's 24 accumulators. */
static inline void gemm_store_q(float32x4_t acc[GEMM_MR][3], int m, int n, float alpha,
                                float beta, float *C, int ldc) {
    float tile[GEMM_MR * GEMM_NR];
    for (int i = 0; i < GEMM_MR; i++) {
        vst1q_f32(tile + i * GEMM_NR, acc[i][0]);
        vst1q_f32(tile + i * GEMM_NR + 4, acc[i][1]);
        vst1q_f32(tile + i * GEMM_NR + 8, acc[i][2]);
    }
    gemm_tile_update(m, n, alpha, tile, beta, C, ldc);
}

/* The micro-kernel (contract above) in NEON: the C tile in 24 q-register accumulators. */
static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    float32x4_t acc[GEMM_MR][3];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = acc[i][2] = vdupq_n_f32(0.0f);
    gemm_prefetch_tile(m, n, C, ldc);
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        float32x4_t b0 = vld1q_f32(b), b1 = vld1q_f32(b + 4), b2 = vld1q_f32(b + 8);
        for (int i = 0; i < GEMM_MR; i++) {
            float32x4_t ai = vdupq_n_f32(a[i]);
            acc[i][0] = vfmaq_f32(acc[i][0], ai, b0);
            acc[i][1] = vfmaq_f32(acc[i][1], ai, b1);
            acc[i][2] = vfmaq_f32(acc[i][2], ai, b2);
        }
    }
    gemm_store_q(acc, m, n, alpha, beta, C, ldc);
}

#if defined(GEMM_BF16_NEON)
/* Row i of the tile (one lane of the four rows' pairs in av) times the 12 columns' pairs. */
#define GEMM_BFDOT_ROW(i, av, lane)                                \
    do {                                                           \
        acc[i][0] = vbfdotq_laneq_f32(acc[i][0], b0, av, lane);    \
        acc[i][1] = vbfdotq_laneq_f32(acc[i][1], b1, av, lane);    \
        acc[i][2] = vbfdotq_laneq_f32(acc[i][2], b2, av, lane);    \
    } while (0)

/* The bf16 micro-kernel in ARMv8.6 BF16: BFDOT adds each column's pair times a row's pair (the
 * lane of a vector of four rows' pairs) to the column's accumulator, 4 columns at a time. */
static void gemm_microkernel_bf16(int kc, const float *a, const float *b, int m, int n,
                                  float alpha, float beta, float *C, int ldc) {
    const bfloat16_t *pa = (const bfloat16_t *)a, *pb = (const bfloat16_t *)b;
    float32x4_t acc[GEMM_MR][3];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = acc[i][2] = vdupq_n_f32(0.0f);
    gemm_prefetch_tile(m, n, C, ldc);
    for (int k = 0; k < kc; k++, pa += 2 * GEMM_MR, pb += 2 * GEMM_NR) {
        bfloat16x8_t b0 = vld1q_bf16(pb), b1 = vld1q_bf16(pb + 8), b2 = vld1q_bf16(pb + 16);
        for (int r = 0; r < GEMM_MR; r += 4) {
            bfloat16x8_t av = vld1q_bf16(pa + 2 * r);
            GEMM_BFDOT_ROW(r, av, 0);
            GEMM_BFDOT_ROW(r + 1, av, 1);
            GEMM_BFDOT_ROW(r + 2, av, 2);
            GEMM_BFDOT_ROW(r + 3, av, 3);
        }
    }
    gemm_store_q(acc, m, n, alpha, beta, C, ldc);
}
#undef GEMM_BFDOT_ROW
#endif
#else
/* The portable kernel: the plain formula, which compilers vectorise well enough. */
static void gemm_microkernel(int kc, const float *a, const float *b, int m, int n, float alpha,
                             float beta, float *C, int ldc) {
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};
    gemm_prefetch_tile(m, n, C, ldc);
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR)
        for (int i = 0; i < GEMM_MR; i++)
            for (int j = 0; j < GEMM_NR; j++) acc[i][j] += a[i] * b[j];
    gemm_tile_update(m, n, alpha, &acc[0][0], beta, C, ldc);
}
#endif

#if defined(GEMM_BF16_PORTABLE)
/* The bf16 micro-kernel in plain C, for CPUs without bf16 dot products: each pair's products
 * (exact in f32) added to the sum in vdpbf16ps's order, the second depth's first. */
static void gemm_microkernel_bf16(int kc, const float *a, const float *b, int m, int n,
                                  float alpha, float beta, float *C, int ldc) {
    const uint32_t *pa = (const uint32_t *)a, *pb = (const uint32_t *)b;
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};
    gemm_prefetch_tile(m, n, C, ldc);
    for (int k = 0; k < kc; k++, pa += GEMM_MR, pb += GEMM_NR)
        for (int i = 0; i < GEMM_MR; i++) {
            float a0 = bits_float(pa[i] << 16), a1 = bits_float(pa[i] & 0xffff0000u);
            for (int j = 0; j < GEMM_NR; j++) {
                acc[i][j] += a1 * bits_float(pb[j] & 0xffff0000u);
                acc[i][j] += a0 * bits_float(pb[j] << 16);
            }
        }
    gemm_tile_update(m, n, alpha, &acc[0][0], beta, C, ldc);
}
#endif

#if defined(GEMM_AVX512) || defined(GEMM_AVX2)
/* Elements i .. i + 7 of src as f32. */
static inline __m256 gemm_source_load8(GemmSource src, ptrdiff_t i) {
    if (src.dtype == DTYPE_F32) return _mm256_loadu_ps((const float *)src.data + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src.data + i));
    if (src.dtype == DTYPE_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#ifdef __F16C__
    return _mm256_cvtph_ps(h);
#else
    float f[8];
    for (int k = 0; k < 8; k++) f[k] = gemm_source_at(src, i + k);
    return _mm256_loadu_ps(f);
#endif
}

/* r[i][k] -> r[k][i]: eight rows of eight transposed in registers (pairs of rows interleaved,
 * then pairs of pairs, then the 128-bit halves swapped). Rows a..h:
 *   t: a0 b0 a1 b1 | a4 b4 a5 b5    s: a0 b0 c0 d0 | a4 b4 c4 d4    out: a0 .. h0, a4 .. h4 */
static inline void transpose8x8_registers(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);     /* columns 0 1 | 4 5 of rows i, i+1 */
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]); /* columns 2 3 | 6 7 */
    }
    for (int i = 0; i < 8; i += 4) {
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));         /* 0 | 4 */
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));     /* 1 | 5 */
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0)); /* 2 | 6 */
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2)); /* 3 | 7 */
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x20);
        r[k + 4] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x31);
    }
}

/* dst[k * width + l] = r[l][k] for 8 lanes l and 8 depth steps k: the eight lanes' rows
 * transposed in registers, stored as eight depth rows of the panel. */
static inline void gemm_store_transposed8x8(const __m256 r[8], float *dst, int width) {
    __m256 c[8];
    for (int i = 0; i < 8; i++) c[i] = r[i];
    transpose8x8_registers(c);
    for (int k = 0; k < 8; k++) _mm256_storeu_ps(dst + (size_t)k * width, c[k]);
}

/* dst[k * width + l] = src[at + l * lane_stride + k] for 8 lanes and 8 depth steps. */
static void gemm_transpose8x8(GemmSource src, ptrdiff_t at, ptrdiff_t lane_stride, float *dst,
                              int width) {
    __m256 r[8];
    for (int i = 0; i < 8; i++) r[i] = gemm_source_load8(src, at + i * lane_stride);
    gemm_store_transposed8x8(r, dst, width);
}

/* dst[k * width + l] = src[at + l * lane_stride + k] for 4 lanes and 8 depth steps: the first two
 * steps of transpose8x8_registers on four rows leave depth k of the four lanes in the low
 * half of s[k] and depth k + 4 in its high half. */
static void gemm_transpose4x8(GemmSource src, ptrdiff_t at, ptrdiff_t lane_stride, float *dst,
                              int width) {
    __m256 r[4], t[4], s[4];
    for (int i = 0; i < 4; i++) r[i] = gemm_source_load8(src, at + i * lane_stride);
    t[0] = _mm256_unpacklo_ps(r[0], r[1]); /* a0 b0 a1 b1 | a4 b4 a5 b5 */
    t[1] = _mm256_unpackhi_ps(r[0], r[1]); /* a2 b2 a3 b3 | a6 b6 a7 b7 */
    t[2] = _mm256_unpacklo_ps(r[2], r[3]);
    t[3] = _mm256_unpackhi_ps(r[2], r[3]);
    s[0] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(1, 0, 1, 0)); /* a0 b0 c0 d0 | a4 .. d4 */
    s[1] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(3, 2, 3, 2));
    s[2] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(1, 0, 1, 0));
    s[3] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(3, 2, 3, 2));
    for (int k = 0; k < 4; k++) {
        _mm_storeu_ps(dst + (size_t)k * width, _mm256_castps256_ps128(s[k]));
        _mm_storeu_ps(dst + (size_t)(k + 4) * width, _mm256_extractf128_ps(s[k], 1));
    }
}
#endif

/* panel[k * width + l] = src[at + l * lane_stride + k] for lanes [0, lanes) and depths [k0, k1):
 * in blocks of 8 lanes x 8 depths where the instruction set has them, then of 4 lanes, element
 * by element for the rest. */
static void gemm_transpose_block(GemmSource src, ptrdiff_t at, ptrdiff_t lane_stride, int lanes,
                                 int k0, int k1, float *panel, int width) {
    int full_lanes = 0, full_k1 = k0;
#if defined(GEMM_AVX512) || defined(GEMM_AVX2)
    full_k1 = k0 + (k1 - k0) / 8 * 8;
    for (; full_lanes + 8 <= lanes; full_lanes += 8)
        for (int k = k0; k < full_k1; k += 8)
            gemm_transpose8x8(src, at + full_lanes * lane_stride + k, lane_stride,
                              panel + (size_t)k * width + full_lanes, width);
    for (; full_lanes + 4 <= lanes; full_lanes += 4)
        for (int k = k0; k < full_k1; k += 8)
            gemm_transpose4x8(src, at + full_lanes * lane_stride + k, lane_stride,
                              panel + (size_t)k * width + full_lanes, width);
#endif
    for (int l = 0; l < lanes; l++)
        for (int k = l < full_lanes ? full_k1 : k0; k < k1; k++)
            panel[(size_t)k * width + l] = gemm_source_at(src, at + l * lane_stride + k);
}

/* Asks for the 64-byte lines of elements [i, i + n) of src. */
static void gemm_prefetch_run(GemmSource src, ptrdiff_t i, int n) {
    size_t size = src.dtype == DTYPE_F32 ? 4 : 2;
    const char *p = (const char *)src.data + (size_t)i * size;
    for (size_t b = 0; b < (size_t)n * size; b += 64) __builtin_prefetch(p + b);
}

/* Packs `lanes` lanes of `depth` elements into ceil(lanes / width) micro-panels, panel p at
 * dst + p * width * depth laid out [depth][width], zero-filling the lanes past `lanes` in the
 * last one. Element (lane l, depth k) of the source is src[at + l * lane_stride + k *
 * depth_stride]; one of the two strides is 1, and the loops walk the source along it. */
static void gemm_pack(GemmSource src, ptrdiff_t at, ptrdiff_t lane_stride, ptrdiff_t depth_stride,
                      int lanes, int depth, int width, float *dst) {
    if (lane_stride == 1) {
        /* Lanes are contiguous: copy each depth step's whole run of lanes, panel by panel. */
        for (int k = 0; k < depth; k++) {
            if (k + GEMM_PACK_AHEAD < depth)
                gemm_prefetch_run(src, at + (k + GEMM_PACK_AHEAD) * depth_stride, lanes);
            for (int l0 = 0; l0 < lanes; l0 += width) {
                ptrdiff_t s = at + k * depth_stride + l0;
                float *d = dst + (size_t)l0 * depth + (size_t)k * width;
                int n = gemm_min(width, lanes - l0);
                if (src.dtype == DTYPE_F32) {
                    const float *f = (const float *)src.data + s;
                    for (int l = 0; l < n; l++) d[l] = f[l];
                } else {
                    for (int l = 0; l < n; l++) d[l] = gemm_source_at(src, s + l);
                }
                for (int l = n; l < width; l++) d[l] = 0.0f;
            }
        }
        return;
    }
    /* A transpose (depth_stride is 1), a 64-byte line of each lane at a time so reads and
     * writes stay in L1. */
    for (int l0 = 0; l0 < lanes; l0 += width) {
        float *panel = dst + (size_t)l0 * depth;
        int n = gemm_min(width, lanes - l0);
        for (int k0 = 0; k0 < depth; k0 += GEMM_PACK_CHUNK) {
            int k1 = gemm_min(k0 + GEMM_PACK_CHUNK, depth);
            gemm_transpose_block(src, at + l0 * lane_stride, lane_stride, n, k0, k1, panel, width);
            for (int k = k0; k < k1; k++)
                for (int l = n; l < width; l++) panel[(size_t)k * width + l] = 0.0f;
        }
    }
}

/* The bf16 pair of one lane at depths k and k + 1, elements i and i + depth_stride of src
 * rounded to nearest even (exact for bf16): k's bits in the low half, k + 1's in the high half,
 * which is 0 when the lane ends at k (!second). */
static inline uint32_t gemm_pair_at(GemmSource src, ptrdiff_t i, ptrdiff_t depth_stride,
                                    bool second) {
    uint32_t high = second ? f32_to_bf16(gemm_source_at(src, i + depth_stride)) : 0;
    return f32_to_bf16(gemm_source_at(src, i)) | high << 16;
}

#if defined(GEMM_BF16_AVX512)
/* The 8 pairs of elements i .. i + 15 of src, as gemm_pair_at makes them (vcvtneps2bf16 rounds
 * to nearest even too; a denormal it makes 0, which vdpbf16ps would do anyway). */
static inline __m256 gemm_pairs_load8(GemmSource src, ptrdiff_t i) {
    if (src.dtype == DTYPE_BF16)
        return _mm256_castsi256_ps(
            _mm256_loadu_si256((const __m256i *)((const uint16_t *)src.data + i)));
    if (src.dtype == DTYPE_F32)
        return _mm256_castsi256_ps(
            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps((const float *)src.data + i)));
    __m128i low = (__m128i)_mm256_cvtneps_pbh(gemm_source_load8(src, i));
    __m128i high = (__m128i)_mm256_cvtneps_pbh(gemm_source_load8(src, i + 8));
    return _mm256_castsi256_ps(_mm256_set_m128i(high, low));
}
#endif

/* gemm_pack for bf16 pairs: `lanes` lanes of `depth` elements into ceil(lanes / width)
 * micro-panels of pairs = ceil(depth / 2) slots (gemm_pair_at's), panel p at dst + p * width *
 * pairs laid out [pairs][width], the lanes past `lanes` zero. Element (lane l, depth k) is
 * src[at + l * lane_stride + k * depth_stride]. Where depths lie in a row (depth_stride 1: a
 * weight [N, K], activations [M, K]) and the CPU has bf16, 8 lanes x 8 pairs at a time go
 * through gemm_store_transposed8x8, 16 depths (a line of f32) of each lane at a time. */
static void gemm_pack_pairs(GemmSource src, ptrdiff_t at, ptrdiff_t lane_stride,
                            ptrdiff_t depth_stride, int lanes, int depth, int width,
                            uint32_t *dst) {
    int pairs = depth / 2 + depth % 2;
    for (int l0 = 0; l0 < lanes; l0 += width) {
        uint32_t *panel = dst + (size_t)l0 * pairs;
        ptrdiff_t lane0 = at + l0 * lane_stride;
        int n = gemm_min(width, lanes - l0), full_lanes = 0, full_pairs = 0;
#if defined(GEMM_BF16_AVX512)
        if (depth_stride == 1) {
            full_lanes = n / 8 * 8;
            full_pairs = depth / 16 * 8;
            for (int q = 0; q < full_pairs; q += 8)
                for (int l = 0; l < full_lanes; l += 8) {
                    __m256 r[8];
                    for (int i = 0; i < 8; i++)
                        r[i] = gemm_pairs_load8(src, lane0 + (l + i) * lane_stride + 2 * q);
                    gemm_store_transposed8x8(r, (float *)(panel + (size_t)q * width + l), width);
                }
        }
#endif
        for (int l = 0; l < width; l++)
            for (int q = l < full_lanes ? full_pairs : 0; q < pairs; q++)
                panel[(size_t)q * width + l] =
                    l >= n ? 0
                           : gemm_pair_at(src, lane0 + l * lane_stride + 2 * q * depth_stride,
                                          depth_stride, 2 * q + 1 < depth);
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

/* What an item of rows x cols costs besides its rows x cols multiply-adds per depth step, in
 * multiply-adds per row and per column: its A rows stream in from the shared block (L3) and its
 * B columns are packed from memory, where a multiply-add of the micro-kernel reads from L1. */
#define GEMM_ITEM_EDGE_COST 32

/* The time of one row block split into row_chunks x col_blocks items (per depth step, in
 * multiply-adds): the items run in waves of `threads`, each item its area plus its edge. */
static double gemm_grid_cost(int mc, int N, int row_chunks, int col_blocks, int threads) {
    int rows = gemm_round_up(gemm_ceil_div(mc, row_chunks), GEMM_MR);
    int cols = gemm_round_up(gemm_ceil_div(N, col_blocks), GEMM_NR);
    int items = gemm_ceil_div(mc, rows) * gemm_ceil_div(N, cols);
    double item = (double)rows * cols + GEMM_ITEM_EDGE_COST * (double)(rows + cols);
    return gemm_ceil_div(items, threads) * item;
}

/* One thread: column blocks of GEMM_NC (its B block fits the core's L2). More: the grid of row
 * chunks x column blocks (column blocks still at most GEMM_NC wide) of the least
 * gemm_grid_cost, so that every thread gets equal work in tiles that reuse their A rows and B
 * columns over each other: a tall narrow item re-reads its rows from L3 for few columns. */
static GemmPlan gemm_plan(int M, int N, int K, int max_threads) {
    GemmPlan p;
    double work = (double)M * N * K;
    p.threads = work < GEMM_PARALLEL_MIN_WORK ? 1 : max_threads;
    int mc_max = GEMM_A_BLOCK_FLOATS / K / GEMM_MR * GEMM_MR;
    if (mc_max < GEMM_MR) mc_max = GEMM_MR;
    p.mc = gemm_round_up(gemm_ceil_div(M, gemm_ceil_div(M, mc_max)), GEMM_MR);
    int row_panels = gemm_ceil_div(p.mc, GEMM_MR), col_tiles = gemm_ceil_div(N, GEMM_NR);
    int fewest_cols = gemm_ceil_div(N, GEMM_NC), best_rows = 1, best_cols = fewest_cols;
    double best = gemm_grid_cost(p.mc, N, best_rows, best_cols, p.threads);
    /* r row chunks need at most 2 threads / r more column blocks than the fewest to give every
     * thread two items: O(threads log threads) grids. */
    int most_rows = p.threads > 1 ? gemm_min(row_panels, p.threads) : 0; /* 1 thread: 1 x 1 */
    for (int r = 1; r <= most_rows; r++)
        for (int c = fewest_cols; c <= gemm_min(col_tiles, fewest_cols + 2 * p.threads / r); c++) {
            double cost = gemm_grid_cost(p.mc, N, r, c, p.threads);
            if (cost < best) best = cost, best_rows = r, best_cols = c;
        }
    p.row_chunk = gemm_round_up(gemm_ceil_div(p.mc, best_rows), GEMM_MR);
    p.col_block = gemm_round_up(gemm_ceil_div(N, best_cols), GEMM_NR);
    int items = gemm_ceil_div(p.mc, p.row_chunk) * gemm_ceil_div(N, p.col_block);
    p.threads = gemm_min(p.threads, items);
    return p;
}

/* Strides of op(X)[r][k] in X for the packer: lane = the row (of A) or column (of B) index.
 * With pairs, the operand is packed as bf16 pairs of its `depth` elements (gemm_pack_pairs), and
 * a depth step of the loops (a slot) is a pair. */
typedef struct GemmOperand {
    GemmSource source;
    ptrdiff_t lane_stride, depth_stride;
    bool pairs;
    int depth;
} GemmOperand;

/* Lanes [l0, l0 + lanes) of op at depth steps [p0, p0 + kc) into micro-panels of width:
 * gemm_pack's f32 elements, or gemm_pack_pairs's pairs of elements 2 p0 .. */
static void gemm_pack_operand(const GemmOperand *op, int l0, int lanes, int p0, int kc, int width,
                              float *dst) {
    ptrdiff_t k0 = op->pairs ? 2 * (ptrdiff_t)p0 : p0;
    ptrdiff_t at = l0 * op->lane_stride + k0 * op->depth_stride;
    if (op->pairs)
        gemm_pack_pairs(op->source, at, op->lane_stride, op->depth_stride, lanes,
                        (int)(2 * (ptrdiff_t)kc < op->depth - k0 ? 2 * kc : op->depth - k0),
                        width, (uint32_t *)dst);
    else
        gemm_pack(op->source, at, op->lane_stride, op->depth_stride, lanes, kc, width, dst);
}

/* The threads a parallel region started here would get: 1 inside one (nested regions stay
 * serial) or without OpenMP. */
static int team_size(void) {
#ifdef _OPENMP
    if (!omp_in_parallel()) return omp_get_max_threads();
#endif
    return 1;
}

static int gemm_thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* The threads of the team running this code: 1 outside a parallel region or without OpenMP. */
static int team_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* The packed A block of rows [ic, ic + mc) of op(A) over all of K: depth block p0 at
 * a_block + block_rows * p0, each [ceil(mc / MR)][kc][MR]. This packs its panel q (rows
 * ic + q MR ..) of depth block p0. */
static void gemm_pack_a_panel(const GemmOperand *a_op, int ic, int mc, int K, int block_rows,
                              int p0, int q, float *a_block) {
    int kc = gemm_min(GEMM_KC, K - p0), i = q * GEMM_MR;
    gemm_pack_operand(a_op, ic + i, gemm_min(GEMM_MR, mc - i), p0, kc, GEMM_MR,
                      a_block + (size_t)block_rows * p0 + (size_t)i * kc);
}

/* C [m, n] (row stride ldc) from one depth block of kc steps: the A micro-panels at a, MR rows
 * each kc x MR, and the B micro-panels at b, NR columns each, b_col_stride slots per column
 * apart (kc when packed per depth block, K when the panels hold all of K); bf16 pairs in both
 * when pairs, else f32. */
static void gemm_tiles(bool pairs, int kc, int m, int n, const float *a, const float *b,
                       size_t b_col_stride, float alpha, float beta, float *C, int ldc) {
    for (int i = 0; i < m; i += GEMM_MR)
        for (int j = 0; j < n; j += GEMM_NR)
            (pairs ? gemm_microkernel_bf16 : gemm_microkernel)(
                kc, a + (size_t)i * kc, b + j * b_col_stride, gemm_min(GEMM_MR, m - i),
                gemm_min(GEMM_NR, n - j), alpha, beta, C + (size_t)i * ldc + j, ldc);
}

/* The shared A block of one row block, packed while the products run: each panel (MR rows of
 * one depth block) by the first thread that needs it, so that one thread's copying overlaps
 * the other threads' products (packed all before them, the threads copied at once, bound by
 * memory: 0.35 of 7.8 ms at 1024^3 on 2 threads). A panel's state holds 2 g - 1 while it is
 * being packed for row block g = 1, 2, ... and 2 g once it is; below 2 g - 1, not yet. */
typedef struct GemmABlock {
    const GemmOperand *op;
    float *data;       /* depth block p0 at data + rows * p0, gemm_pack_a_panel's layout */
    int rows;          /* rows of the block (plan.mc) */
    int panels;        /* row panels of MR per depth block */
    atomic_int *state; /* [depth blocks][panels] */
    int ic, mc, K, g;  /* this row block: rows [ic, ic + mc) of op(A), number g */
} GemmABlock;

/* Panel q of depth block p0 / KC ready in a->data: packed here, or by another thread (waited
 * for). */
static void gemm_a_panel_ready(GemmABlock *a, int p0, int q) {
    atomic_int *state = &a->state[(size_t)(p0 / GEMM_KC) * a->panels + q];
    int now = atomic_load_explicit(state, memory_order_acquire);
    if (now < 2 * a->g - 1 &&
        atomic_compare_exchange_strong_explicit(state, &now, 2 * a->g - 1,
                                                memory_order_acquire, memory_order_acquire)) {
        gemm_pack_a_panel(a->op, a->ic, a->mc, a->K, a->rows, p0, q, a->data);
        atomic_store_explicit(state, 2 * a->g, memory_order_release);
        return;
    }
    while (atomic_load_explicit(state, memory_order_acquire) != 2 * a->g) continue;
}

/* One work item: rows [i0, i0 + m) and columns [j0, j0 + n) of C over all K steps, its rows
 * from row r of the A block. Each depth block runs its row panels from a point that depends on
 * the thread, so that threads on items with the same rows pack different panels. */
static void gemm_item(const GemmOperand *b_op, int i0, int m, int j0, int n, GemmABlock *a,
                      int r, float *b_block, float alpha, float beta, float *C, int ldc) {
    int panels = gemm_ceil_div(m, GEMM_MR);
    int start = panels * gemm_thread_index() / team_threads();
    for (int p0 = 0; p0 < a->K; p0 += GEMM_KC) {
        int kc = gemm_min(GEMM_KC, a->K - p0);
        gemm_pack_operand(b_op, j0, n, p0, kc, GEMM_NR, b_block);
        /* C already holds beta * C + the earlier depth blocks: add the rest with beta 1. */
        float beta_now = p0 == 0 ? beta : 1.0f;
        for (int t = 0; t < panels; t++) {
            int q = (start + t) % panels, i = q * GEMM_MR;
            gemm_a_panel_ready(a, p0, r / GEMM_MR + q);
            gemm_tiles(b_op->pairs, kc, gemm_min(GEMM_MR, m - i), n,
                       a->data + (size_t)a->rows * p0 + (size_t)(r + i) * kc, b_block,
                       (size_t)kc, alpha, beta_now, C + (size_t)(i0 + i) * ldc + j0, ldc);
        }
    }
}

/* The loops of "The blocked GEMM" (the comment above GEMM_MR), run by every thread of the team
 * (or by one without OpenMP). a->data and a->state are shared (the states zero); b_blocks
 * holds one private B block of b_block_floats per thread. */
static void gemm_blocked(const GemmPlan *p, GemmABlock a, const GemmOperand *b_op, int M, int N,
                         float alpha, float beta, float *C, int ldc, float *b_blocks,
                         size_t b_block_floats) {
    int row_chunks = gemm_ceil_div(p->mc, p->row_chunk);
    int col_blocks = gemm_ceil_div(N, p->col_block);
    for (int ic = 0; ic < M; ic += p->mc) {
        a.ic = ic, a.mc = gemm_min(p->mc, M - ic), a.g = ic / p->mc + 1;
        /* The barrier at the end of each row block's items keeps the next one from packing
         * over panels still in use. */
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int c = 0; c < col_blocks; c++)
            for (int q = 0; q < row_chunks; q++) {
                int r = q * p->row_chunk, j0 = c * p->col_block;
                if (r >= a.mc) continue;
                float *b_block = b_blocks + b_block_floats * gemm_thread_index();
                gemm_item(b_op, ic + r, gemm_min(p->row_chunk, a.mc - r), j0,
                          gemm_min(p->col_block, N - j0), &a, r, b_block, alpha, beta, C, ldc);
            }
    }
}

/* C = beta * C, for the products with nothing to add (K == 0 or alpha == 0). */
static void gemm_scale(int M, int N, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
}

/* gemm_stored (f32 products) and gemm_stored_bf16 (pairs): the blocked loops over K depth steps
 * of one element each, or over ceil(K / 2) of a bf16 pair each. */
static void gemm_run(bool pairs, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                     const float *A, int lda, const void *B, DType b_dtype, int ldb, float beta,
                     float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {
        gemm_scale(M, N, beta, C, ldc);
        return;
    }
    int steps = pairs ? K / 2 + K % 2 : K;
    GemmPlan plan = gemm_plan(M, N, steps, team_size());
    GemmOperand a_op = {{A, DTYPE_F32}, trans_a ? 1 : lda, trans_a ? lda : 1, pairs, K};
    GemmOperand b_op = {{B, b_dtype}, trans_b ? ldb : 1, trans_b ? 1 : ldb, pairs, K};
    int kc_max = gemm_min(GEMM_KC, steps);
    size_t b_block_floats = ((size_t)plan.col_block * kc_max + 15) / 16 * 16;
    /* One block of scratch: the A block, then the threads' B blocks, each on a cache line,
     * then the A block's panel states. */
    size_t a_block_floats = ((size_t)plan.mc * steps + 15) / 16 * 16;
    size_t floats = a_block_floats + b_block_floats * plan.threads;
    int panels = gemm_ceil_div(plan.mc, GEMM_MR);
    size_t states = (size_t)panels * gemm_ceil_div(steps, GEMM_KC);
    void *scratch;
    float *a_block = scratch_new(floats * sizeof(float) + states * sizeof(atomic_int), &scratch);
    if (a_block) {
        GemmABlock a = {.op = &a_op, .data = a_block, .rows = plan.mc, .panels = panels,
                        .state = (atomic_int *)(a_block + floats), .K = steps};
        for (size_t i = 0; i < states; i++) atomic_init(&a.state[i], 0);
        #pragma omp parallel num_threads(plan.threads) if (plan.threads > 1)
        gemm_blocked(&plan, a, &b_op, M, N, alpha, beta, C, ldc, a_block + a_block_floats,
                     b_block_floats);
    } else {
        /* Out of memory for the packing buffers: the reference loop needs none (in f32, the
         * more exact result, also for bf16 products). */
        gemm_reference_source(trans_a, trans_b, M, N, K, alpha, A, lda, b_op.source, ldb, beta,
                              C, ldc);
    }
    free(scratch);
}

void gemm_stored(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A,
                 int lda, const void *B, DType b_dtype, int ldb, float beta, float *C, int ldc) {
    gemm_run(false, trans_a, trans_b, M, N, K, alpha, A, lda, B, b_dtype, ldb, beta, C, ldc);
}

void gemm_stored_bf16(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const void *B, DType b_dtype, int ldb, float beta,
                      float *C, int ldc) {
    gemm_run(true, trans_a, trans_b, M, N, K, alpha, A, lda, B, b_dtype, ldb, beta, C, ldc);
}

bool gemm_bf16_native(void) {
#if defined(GEMM_BF16_PORTABLE)
    return false;
#else
    return true;
#endif
}

size_t gemm_packed_a_floats(int M, int K) {
    return (size_t)gemm_round_up(M, GEMM_MR) * (K > 0 ? K : 0);
}

/* op(A) [M, K] (A [K, M] when trans_a; row stride lda) -> packed: gemm_blocked's A block over
 * all M rows, depth block p0 at packed + round_up(M, MR) * p0, each [ceil(M / MR)][kc][MR]
 * (gemm_pack_a_panel's layout). */
void gemm_pack_a(bool trans_a, int M, int K, const float *A, int lda, float *packed) {
    if (M <= 0 || K <= 0) return;
    GemmOperand a_op = {{A, DTYPE_F32}, trans_a ? 1 : lda, trans_a ? lda : 1, false, K};
    int rows = gemm_round_up(M, GEMM_MR), panels = rows / GEMM_MR;
    int depth_blocks = gemm_ceil_div(K, GEMM_KC);
    #pragma omp parallel for collapse(2) schedule(dynamic, 4) \
        if (team_size() > 1 && (double)M * K > GEMM_PARALLEL_MIN_WORK)
    for (int d = 0; d < depth_blocks; d++)
        for (int q = 0; q < panels; q++)
            gemm_pack_a_panel(&a_op, 0, M, K, rows, d * GEMM_KC, q, packed);
}

size_t gemm_panels_floats(int K, int N) {
    return (size_t)gemm_round_up(N > 0 ? N : 0, GEMM_NR) * (K > 0 ? K : 0);
}

size_t gemm_panel_offset(int K, int k, int j) {
    return ((size_t)(j / GEMM_NR) * K + k) * GEMM_NR + j % GEMM_NR;
}

/* gemm_item's depth blocks over operands already packed, on the calling thread: each B panel's
 * depth block is its [kc][NR] run from row p0. */
void gemm_packed(int M, int N, int K, const float *packed_a, const float *panels_b, float *C,
                 int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) gemm_scale(M, N, 0.0f, C, ldc);
    size_t rows = (size_t)gemm_round_up(M, GEMM_MR);
    for (int p0 = 0; p0 < K; p0 += GEMM_KC) {
        float beta = p0 == 0 ? 0.0f : 1.0f; /* C holds the earlier depth blocks */
        gemm_tiles(false, gemm_min(GEMM_KC, K - p0), M, N, packed_a + rows * p0,
                   panels_b + (size_t)p0 * GEMM_NR, (size_t)K, 1.0f, beta, C, ldc);
    }
}

/* C = alpha op(A) op(B) + beta C (tensor.h): gemm_stored with f32 operands, which packs them and
 * runs gemm_blocked's loop nest over gemm_microkernel's register tiles. */
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A, int lda,
          const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_stored(trans_a, trans_b, M, N, K, alpha, A, lda, B, DTYPE_F32, ldb, beta, C, ldc);
}

/* === conv2d === */

/* Convolution as GEMM over bands of output pixels (torch.nn.functional.conv2d semantics: zero
 * padding, no dilation). For each image and group the output pixels p = oh*Wo + ow are taken in
 * bands of consecutive pixels; im2col_band copies the receptive fields of one band into
 * col: [K, n] with K = Cin/g*kh*kw, and one GEMM gives y_band[Cout/g, n] = w_g[Cout/g, K] col.
 *
 * Scratch bound: a band holds n = min(Ho*Wo, max(CONV_BAND_MIN_PIXELS, budget / K)) pixels, so
 * col takes at most max(budget, 512 * K bytes). The backward's budget is CONV_COL_BUDGET (4 MiB
 * for a 3x3 conv over 128 or 512 channels at any image size): its sums over pixels (dw) and over
 * overlapping receptive fields (dx) run band by band, so the band must not depend on the thread
 * count for the results not to. The forward's results do not depend on the band (each output is
 * one GEMM K-sum), and its budget grows with the threads, CONV_COL_BUDGET per two of them: with
 * many threads a 4 MiB band's GEMM is too small to share (on a 16-core machine, 32 MiB bands ran
 * 3x3 convs over 128-512 channels 1.3-1.9x faster; on one or two threads here they ran
 * 128-channel convs up to 20% slower). Forward and backward each use one buffer (backward
 * reuses it for x's columns and then for their gradient). A 1x1 stride-1 unpadded conv needs no
 * col: its col is x itself. Depthwise convs take a direct loop and Wo*kh*kw floats per thread. */
#define CONV_COL_BUDGET      (1 << 20) /* floats in one im2col band: 4 MiB */
#define CONV_BAND_MIN_PIXELS 128       /* thinner bands starve the GEMM */

/* Threads only split independent outputs (col rows, dx planes, channels), and only when the
 * loop touches more than PARALLEL_MIN floats. */

/* Output length along one axis; 0 when the kernel does not fit the padded input. */
static int conv_out_len(int in, int kernel, int stride, int pad) {
    if (in < 0 || kernel < 1 || stride < 1 || pad < 0 || in + 2 * pad < kernel) return 0;
    return (in + 2 * pad - kernel) / stride + 1;
}

int conv2d_out_h(const Conv2dShape *s) {
    return conv_out_len(s->in_h, s->kernel_h, s->stride_h, s->pad_h);
}

int conv2d_out_w(const Conv2dShape *s) {
    return conv_out_len(s->in_w, s->kernel_w, s->stride_w, s->pad_w);
}

/* The sizes every conv kernel below works with, derived once from the shape. */
typedef struct ConvDims {
    int out_h, out_w, pixels; /* the output plane: Ho, Wo, Ho*Wo */
    int in_plane;             /* H*W */
    int in_per_group, out_per_group;
    int col_rows;   /* K = Cin/g*kh*kw: the GEMM's reduction length */
    int band;       /* output pixels per im2col band */
    bool pointwise; /* 1x1, stride 1, no padding: col is x itself */
} ConvDims;

/* The forward's im2col budget in floats: CONV_COL_BUDGET per two threads, at least one. */
static int conv_forward_budget(void) {
    int pairs = team_size() / 2;
    return CONV_COL_BUDGET * (pairs < 1 ? 1 : pairs < 64 ? pairs : 64);
}

/* budget: floats of im2col scratch for a band (CONV_COL_BUDGET, or conv_forward_budget()). */
static ConvDims conv_dims(const Conv2dShape *s, int budget) {
    ConvDims d;
    d.out_h = conv2d_out_h(s);
    d.out_w = conv2d_out_w(s);
    d.pixels = d.out_h * d.out_w;
    d.in_plane = s->in_h * s->in_w;
    d.in_per_group = s->in_ch / s->groups;
    d.out_per_group = s->out_ch / s->groups;
    d.col_rows = d.in_per_group * s->kernel_h * s->kernel_w;
    d.pointwise = s->kernel_h == 1 && s->kernel_w == 1 && s->stride_h == 1 && s->stride_w == 1 &&
                  s->pad_h == 0 && s->pad_w == 0;
    int band = budget / (d.col_rows > 0 ? d.col_rows : 1);
    if (band < CONV_BAND_MIN_PIXELS) band = CONV_BAND_MIN_PIXELS;
    d.band = d.pointwise || band > d.pixels ? d.pixels : band;
    return d;
}

/* Nothing to compute: an empty output, or a shape the kernels cannot take. */
static bool conv_shape_empty(const Conv2dShape *s) {
    return s->batch < 1 || s->groups < 1 || s->in_ch < s->groups || s->out_ch < s->groups ||
           s->in_ch % s->groups || s->out_ch % s->groups || conv2d_out_h(s) < 1 ||
           conv2d_out_w(s) < 1;
}

static bool conv_is_depthwise(const Conv2dShape *s) {
    return s->groups == s->in_ch && s->out_ch == s->in_ch;
}

/* Output positions o in [*lo, *hi) whose input position o*stride + offset lies in [0, in_len);
 * the others read zero padding. */
static void conv_valid_range(int out_len, int in_len, int stride, int offset, int *lo, int *hi) {
    int first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int end = in_len - offset <= 0 ? 0 : (in_len - 1 - offset) / stride + 1;
    *lo = first < out_len ? first : out_len;
    *hi = end < out_len ? end : out_len;
    if (*hi < *lo) *hi = *lo;
}

/* Row primitives of the im2col and depthwise loops. The stride-1 case is split out because it
 * is the common one and the compiler vectorises it; the strided loop is the same formula. */

/* dst[t] = src[t * stride] */
static void gather_row(int n, const float *restrict src, int stride, float *restrict dst) {
    if (stride == 1)
        memcpy(dst, src, (size_t)n * sizeof *dst);
    else
        for (int t = 0; t < n; t++) dst[t] = src[(size_t)t * stride];
}

/* dst[t * stride] += a * src[t] */
static void scatter_axpy_row(int n, float a, const float *restrict src, float *restrict dst,
                             int stride) {
    if (stride == 1)
        for (int t = 0; t < n; t++) dst[t] += a * src[t];
    else
        for (int t = 0; t < n; t++) dst[(size_t)t * stride] += a * src[t];
}

/* dst[t] += a * src[t * stride] */
static void gather_axpy_row(int n, float a, const float *restrict src, int stride,
                            float *restrict dst) {
    if (stride == 1)
        for (int t = 0; t < n; t++) dst[t] += a * src[t];
    else
        for (int t = 0; t < n; t++) dst[t] += a * src[(size_t)t * stride];
}

/* acc[t] += dy[t] * src[t * stride] */
static void gather_mul_add_row(int n, const float *restrict dy, const float *restrict src,
                               int stride, float *restrict acc) {
    if (stride == 1)
        for (int t = 0; t < n; t++) acc[t] += dy[t] * src[t];
    else
        for (int t = 0; t < n; t++) acc[t] += dy[t] * src[(size_t)t * stride];
}

/* x: [C, H, W] (one image, the channels of one group) -> col: [C*kh*kw, n] for the band of
 * output pixels p = oh*Wo + ow in [p0, p0 + n):
 * col[(c*kh + i)*kw + j][p - p0] = x[c, oh*sh - ph + i, ow*sw - pw + j], 0 in the padding.
 * A band may start and end mid-row, so each col row is filled one output-row piece at a time. */
static void im2col_band(const Conv2dShape *s, const ConvDims *d, const float *x, int p0, int n,
                        float *col) {
    int kh = s->kernel_h, kw = s->kernel_w, H = s->in_h, W = s->in_w, Wo = d->out_w;
#pragma omp parallel for schedule(static) if ((size_t)d->col_rows * n > PARALLEL_MIN)
    for (int r = 0; r < d->col_rows; r++) {
        int j = r % kw, i = r / kw % kh, c = r / (kw * kh);
        const float *plane = x + (size_t)c * d->in_plane;
        int lo_j, hi_j;
        conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo_j, &hi_j);
        for (int p = p0, next; p < p0 + n; p = next) {
            int oh = p / Wo, ow0 = p % Wo;
            int ow1 = ow0 + (p0 + n - p) < Wo ? ow0 + (p0 + n - p) : Wo;
            next = p + (ow1 - ow0);
            float *out = col + (size_t)r * n + (p - p0); /* out[ow - ow0] */
            int ih = oh * s->stride_h - s->pad_h + i;
            int lo = lo_j > ow0 ? lo_j : ow0, hi = hi_j < ow1 ? hi_j : ow1;
            if (ih < 0 || ih >= H || hi < lo) lo = hi = ow1; /* the whole piece is padding */
            memset(out, 0, (size_t)(lo - ow0) * sizeof *out);
            if (hi > lo)
                gather_row(hi - lo, plane + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                           s->stride_w, out + (lo - ow0));
            memset(out + (hi - ow0), 0, (size_t)(ow1 - hi) * sizeof *out);
        }
    }
}

/* The adjoint of im2col_band: dx[C, H, W] += col2im(dcol[C*kh*kw, n]). Threads split the
 * channels, each of which owns its kh*kw rows of dcol and its dx plane, so every dx element
 * is summed by one thread in a fixed order. */
static void col2im_band_add(const Conv2dShape *s, const ConvDims *d, const float *dcol, int p0,
                            int n, float *dx) {
    int kh = s->kernel_h, kw = s->kernel_w, H = s->in_h, W = s->in_w, Wo = d->out_w;
#pragma omp parallel for schedule(static) if ((size_t)d->col_rows * n > PARALLEL_MIN)
    for (int c = 0; c < d->in_per_group; c++) {
        float *plane = dx + (size_t)c * d->in_plane;
        for (int r = c * kh * kw; r < (c + 1) * kh * kw; r++) {
            int j = r % kw, i = r / kw % kh;
            int lo_j, hi_j;
            conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo_j, &hi_j);
            for (int p = p0, next; p < p0 + n; p = next) {
                int oh = p / Wo, ow0 = p % Wo;
                int ow1 = ow0 + (p0 + n - p) < Wo ? ow0 + (p0 + n - p) : Wo;
                next = p + (ow1 - ow0);
                int ih = oh * s->stride_h - s->pad_h + i;
                int lo = lo_j > ow0 ? lo_j : ow0, hi = hi_j < ow1 ? hi_j : ow1;
                if (ih < 0 || ih >= H || hi <= lo) continue;
                const float *src = dcol + (size_t)r * n + (p - p0) + (lo - ow0);
                scatter_axpy_row(hi - lo, 1.0f, src,
                                 plane + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                 s->stride_w);
            }
        }
    }
}

/* y[c, t] += bias[c] for a band: y: [channels, n] with row stride ld. */
static void add_bias_band(int channels, int n, const float *bias, float *y, int ld) {
    for (int c = 0; c < channels; c++) {
        float *row = y + (size_t)c * ld;
        for (int t = 0; t < n; t++) row[t] += bias[c];
    }
}

/* db[c] += sum of dy[:, c, :, :], each channel summed in double in a fixed order.
 * dy: [B, Cout, pixels] -> db: [Cout] */
static void conv_bias_backward(int batch, int channels, int pixels, const float *dy, float *db) {
#pragma omp parallel for schedule(static) if ((size_t)batch * channels * pixels > PARALLEL_MIN)
    for (int c = 0; c < channels; c++) {
        double sum = 0.0;
        for (int b = 0; b < batch; b++) {
            const float *plane = dy + ((size_t)b * channels + c) * pixels;
            for (int p = 0; p < pixels; p++) sum += plane[p];
        }
        db[c] += (float)sum;
    }
}

/* x: [B, Cin, H, W], w: [Cout, K] -> y: [B, Cout, Ho, Wo], one GEMM per band per group:
 * y_band[Cout/g, n] = w_g[Cout/g, K] col[K, n]. */
static void conv_gemm_forward(const Conv2dShape *s, const ConvDims *d, const float *x,
                              const float *w, const float *b, float *y) {
    float *col = d->pointwise ? NULL : buffer_new((size_t)d->col_rows * d->band * sizeof *col);
    if (!d->pointwise && !col) {
        fill_nan(y, (size_t)s->batch * s->out_ch * d->pixels);
        return;
    }
    for (int bi = 0; bi < s->batch; bi++)
        for (int g = 0; g < s->groups; g++) {
            const float *x_g =
                x + ((size_t)bi * s->in_ch + (size_t)g * d->in_per_group) * d->in_plane;
            const float *w_g = w + (size_t)g * d->out_per_group * d->col_rows;
            float *y_g = y + ((size_t)bi * s->out_ch + (size_t)g * d->out_per_group) * d->pixels;
            for (int p0 = 0; p0 < d->pixels; p0 += d->band) {
                int n = d->pixels - p0 < d->band ? d->pixels - p0 : d->band;
                const float *col_band = d->pointwise ? x_g + p0 : col;
                int ld_col = d->pointwise ? d->pixels : n;
                if (!d->pointwise) im2col_band(s, d, x_g, p0, n, col);
                gemm(false, false, d->out_per_group, n, d->col_rows, 1.0f, w_g, d->col_rows,
                     col_band, ld_col, 0.0f, y_g + p0, d->pixels);
                if (b)
                    add_bias_band(d->out_per_group, n, b + (size_t)g * d->out_per_group, y_g + p0,
                                  d->pixels);
            }
        }
    free(col);
}

/* dy: [B, Cout, Ho, Wo] -> dw_g[Cout/g, K] += dy_band col^T and dx += col2im(w_g^T dy_band),
 * band after band in a fixed order. One scratch buffer serves first as x's columns (for dw),
 * then as their gradient (for dx); a pointwise conv reads x and accumulates into dx directly. */
static void conv_gemm_backward(const Conv2dShape *s, const ConvDims *d, const float *x,
                               const float *w, const float *dy, float *dx, float *dw) {
    float *col = d->pointwise ? NULL : buffer_new((size_t)d->col_rows * d->band * sizeof *col);
    if (!d->pointwise && !col) {
        fill_nan(dx, (size_t)s->batch * s->in_ch * d->in_plane);
        fill_nan(dw, (size_t)s->out_ch * d->col_rows);
        return;
    }
    for (int bi = 0; bi < s->batch; bi++)
        for (int g = 0; g < s->groups; g++) {
            size_t x_offset = ((size_t)bi * s->in_ch + (size_t)g * d->in_per_group) * d->in_plane;
            const float *w_g = w + (size_t)g * d->out_per_group * d->col_rows;
            const float *dy_g =
                dy + ((size_t)bi * s->out_ch + (size_t)g * d->out_per_group) * d->pixels;
            for (int p0 = 0; p0 < d->pixels; p0 += d->band) {
                int n = d->pixels - p0 < d->band ? d->pixels - p0 : d->band;
                if (dw) {
                    const float *col_band = d->pointwise ? x + x_offset + p0 : col;
                    int ld_col = d->pointwise ? d->pixels : n;
                    if (!d->pointwise) im2col_band(s, d, x + x_offset, p0, n, col);
                    gemm(false, true, d->out_per_group, d->col_rows, n, 1.0f, dy_g + p0, d->pixels,
                         col_band, ld_col, 1.0f, dw + (size_t)g * d->out_per_group * d->col_rows,
                         d->col_rows);
                }
                if (dx && d->pointwise) {
                    gemm(true, false, d->col_rows, n, d->out_per_group, 1.0f, w_g, d->col_rows,
                         dy_g + p0, d->pixels, 1.0f, dx + x_offset + p0, d->pixels);
                } else if (dx) {
                    gemm(true, false, d->col_rows, n, d->out_per_group, 1.0f, w_g, d->col_rows,
                         dy_g + p0, d->pixels, 0.0f, col, n);
                    col2im_band_add(s, d, col, p0, n, dx + x_offset);
                }
            }
        }
    free(col);
}

/* One channel: x: [H, W], w: [kh, kw] -> y: [Ho, Wo] = bias + sum over taps of w[i, j] times the
 * shifted (and strided) input rows. */
static void depthwise_plane_forward(const Conv2dShape *s, const ConvDims *d, const float *x,
                                    const float *w, float bias, float *y) {
    int W = s->in_w, Wo = d->out_w;
    for (int oh = 0; oh < d->out_h; oh++) {
        float *row = y + (size_t)oh * Wo;
        for (int ow = 0; ow < Wo; ow++) row[ow] = bias;
        for (int i = 0; i < s->kernel_h; i++) {
            int ih = oh * s->stride_h - s->pad_h + i;
            if (ih < 0 || ih >= s->in_h) continue;
            for (int j = 0; j < s->kernel_w; j++) {
                int lo, hi;
                conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo, &hi);
                if (hi > lo)
                    gather_axpy_row(hi - lo, w[i * s->kernel_w + j],
                                    x + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                    s->stride_w, row + lo);
            }
        }
    }
}

/* One channel: dx: [H, W] += the transpose of depthwise_plane_forward applied to dy: [Ho, Wo]. */
static void depthwise_plane_backward_dx(const Conv2dShape *s, const ConvDims *d, const float *w,
                                        const float *dy, float *dx) {
    int W = s->in_w, Wo = d->out_w;
    for (int oh = 0; oh < d->out_h; oh++)
        for (int i = 0; i < s->kernel_h; i++) {
            int ih = oh * s->stride_h - s->pad_h + i;
            if (ih < 0 || ih >= s->in_h) continue;
            for (int j = 0; j < s->kernel_w; j++) {
                int lo, hi;
                conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo, &hi);
                if (hi > lo)
                    scatter_axpy_row(hi - lo, w[i * s->kernel_w + j], dy + (size_t)oh * Wo + lo,
                                     dx + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                     s->stride_w);
            }
        }
}

/* One channel c: dw_c[kh, kw] += sum over the batch and output pixels of dy * x at each tap.
 * Every tap gathers its products in a row of Wo partial sums (acc: [kh*kw, Wo]), so the inner
 * loop is a plain vector multiply-add; the rows are summed in double at the end. */
static void depthwise_channel_dw(const Conv2dShape *s, const ConvDims *d, int c, const float *x,
                                 const float *dy, float *acc, float *dw_c) {
    int W = s->in_w, Wo = d->out_w, taps = s->kernel_h * s->kernel_w;
    memset(acc, 0, (size_t)taps * Wo * sizeof *acc);
    for (int b = 0; b < s->batch; b++) {
        const float *x_c = x + ((size_t)b * s->in_ch + c) * d->in_plane;
        const float *dy_c = dy + ((size_t)b * s->out_ch + c) * d->pixels;
        for (int oh = 0; oh < d->out_h; oh++)
            for (int i = 0; i < s->kernel_h; i++) {
                int ih = oh * s->stride_h - s->pad_h + i;
                if (ih < 0 || ih >= s->in_h) continue;
                for (int j = 0; j < s->kernel_w; j++) {
                    int lo, hi;
                    conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo, &hi);
                    if (hi > lo)
                        gather_mul_add_row(hi - lo, dy_c + (size_t)oh * Wo + lo,
                                           x_c + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                           s->stride_w,
                                           acc + (size_t)(i * s->kernel_w + j) * Wo + lo);
                }
            }
    }
    for (int tap = 0; tap < taps; tap++) {
        double sum = 0.0;
        for (int ow = 0; ow < Wo; ow++) sum += acc[(size_t)tap * Wo + ow];
        dw_c[tap] += (float)sum;
    }
}

/* x: [B, C, H, W], w: [C, 1, kh, kw] -> y: [B, C, Ho, Wo]; threads take whole planes. */
static void depthwise_forward(const Conv2dShape *s, const ConvDims *d, const float *x,
                              const float *w, const float *b, float *y) {
    int planes = s->batch * s->in_ch, taps = s->kernel_h * s->kernel_w;
#pragma omp parallel for schedule(static) if ((size_t)planes * d->pixels * taps > PARALLEL_MIN)
    for (int plane = 0; plane < planes; plane++) {
        int c = plane % s->in_ch;
        depthwise_plane_forward(s, d, x + (size_t)plane * d->in_plane, w + (size_t)c * taps,
                                b ? b[c] : 0.0f, y + (size_t)plane * d->pixels);
    }
}

/* dy: [B, C, Ho, Wo] -> dx += [B, C, H, W]; threads take whole planes. */
static void depthwise_backward_dx(const Conv2dShape *s, const ConvDims *d, const float *w,
                                  const float *dy, float *dx) {
    int planes = s->batch * s->in_ch, taps = s->kernel_h * s->kernel_w;
#pragma omp parallel for schedule(static) if ((size_t)planes * d->pixels * taps > PARALLEL_MIN)
    for (int plane = 0; plane < planes; plane++)
        depthwise_plane_backward_dx(s, d, w + (size_t)(plane % s->in_ch) * taps,
                                    dy + (size_t)plane * d->pixels,
                                    dx + (size_t)plane * d->in_plane);
}

/* dy: [B, C, Ho, Wo] -> dw += [C, 1, kh, kw]; threads take whole channels (all the batch), each
 * thread with its own partial-sum rows. */
static void depthwise_backward_dw(const Conv2dShape *s, const ConvDims *d, const float *x,
                                  const float *dy, float *dw) {
    int taps = s->kernel_h * s->kernel_w;
#pragma omp parallel if ((size_t)s->batch * s->in_ch * d->pixels * taps > PARALLEL_MIN)
    {
        float *acc = malloc((size_t)taps * d->out_w * sizeof *acc);
#pragma omp for schedule(static)
        for (int c = 0; c < s->in_ch; c++) {
            if (acc)
                depthwise_channel_dw(s, d, c, x, dy, acc, dw + (size_t)c * taps);
            else
                fill_nan(dw + (size_t)c * taps, (size_t)taps);
        }
        free(acc);
    }
}

/* --- Winograd F(4x4, 3x3) ---
 * A 3x3 convolution with stride 1 and padding 1 gives each 4x4 tile of outputs from the 6x6 tile
 * of input around it. Winograd's minimal filtering (Lavin and Gray, "Fast Algorithms for
 * Convolutional Neural Networks", 2016) computes it with 36 products per channel pair where the
 * direct sum takes 144:
 *     Y[k] = A^T ( sum over c of U[k, c] (.) V[c] ) A,
 *     U[k, c] = G w[k, c] G^T,   V[c] = B^T d[c] B
 * (. elementwise over the 6x6 points). For each of the 36 points the sum over c is a GEMM
 * [Cout, Cin] x [Cin, tiles], so the GEMM kernel does nearly all the work, on 4x fewer
 * multiply-adds. The kernels U are transformed and packed for the GEMM once per call; the tiles
 * go in blocks, each taken whole by one thread (winograd_block: the inputs' transforms written
 * straight into the GEMM's panels, the 36 products, the outputs' transforms), so no thread waits
 * for another before the end, and a block's V and M stay near its core. The backward to the
 * input is the same convolution of dy with the kernels turned 180 degrees and Cin, Cout swapped
 * (a stride-1 pad-1 3x3 conv is its own adjoint's shape). The results differ from the direct
 * sum by rounding only: the transforms scale values by up to 8 and cancel, so errors are a few
 * times larger (tests/test_conv.c states the bound).
 * Used where both channel counts reach WINOGRAD_MIN_CHANNELS: the FLUX.2 VAE's 3x3 convs (128-512
 * channels), never the embedded models' (16-64), whose results stay those of the direct sum. */
#define WINOGRAD_MIN_CHANNELS 128
#define WINOGRAD_POINTS       36  /* 6 x 6 */
#define WINOGRAD_BLOCK_TILES  64  /* tiles per block at most: a thread's V and M blocks take
                                     36 * 64 * (Cin + Cout) floats (9 MiB at 512 + 512
                                     channels), and each block's 36 products reuse every
                                     kernel over 64 tiles (16 multiply-adds per byte of U) */
#define WINOGRAD_MIN_BLOCK_TILES 16 /* where many threads share few tiles (4 multiply-adds per
                                       byte of U) */

static const float winograd_g[6][3] = {
    {1.0f / 4, 0, 0},
    {-1.0f / 6, -1.0f / 6, -1.0f / 6},
    {-1.0f / 6, 1.0f / 6, -1.0f / 6},
    {1.0f / 24, 1.0f / 12, 1.0f / 6},
    {1.0f / 24, -1.0f / 12, 1.0f / 6},
    {0, 0, 1},
};
/* B^T and A^T are spelled out in winograd_bt_1d and winograd_at_1d:
 *   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
 *   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1] */

bool conv2d_is_winograd(const Conv2dShape *s) {
    return s->kernel_h == 3 && s->kernel_w == 3 && s->stride_h == 1 && s->stride_w == 1 &&
           s->pad_h == 1 && s->pad_w == 1 && s->groups == 1 &&
           s->in_ch >= WINOGRAD_MIN_CHANNELS && s->out_ch >= WINOGRAD_MIN_CHANNELS;
}

/* The sizes of one Winograd convolution: out_ch planes of H x W from in_ch planes of H x W, in
 * tile_rows rows of tiles_w 4x4 tiles. The work goes in blocks of tiles, each a rectangle of
 * block_rows tile rows by block_cols tiles (whole rows when they fit WINOGRAD_BLOCK_TILES,
 * else one row cut in spans). */
typedef struct WinogradDims {
    int in_ch, out_ch, H, W;
    int tiles_w, tile_rows, block_rows, block_cols;
} WinogradDims;

/* w: [Cout, Cin, 3, 3] -> u: [36, Cin, Cout] (transposed, as gemm_pack_a's trans_a reads it),
 * U[k, c] = G w[k, c] G^T. adjoint: the kernels of the backward to the input, w[c, k] turned 180
 * degrees, from w: [Cin_this = the forward's Cout, Cout_this, 3, 3]. One input channel c at a
 * time, every 1-D transform a loop over the Cout kernels: taps [9][Cout], G w [6][3][Cout]. */
static void winograd_kernels(const WinogradDims *d, const float *w, bool adjoint, float *u) {
    int K = d->out_ch;
    float *scratch = malloc((size_t)(9 + 18) * K * team_size() * sizeof *scratch);
    if (!scratch) {
        fill_nan(u, (size_t)WINOGRAD_POINTS * d->in_ch * K);
        return;
    }
#pragma omp parallel for schedule(static) \
    if ((size_t)d->out_ch * d->in_ch * WINOGRAD_POINTS > PARALLEL_MIN)
    for (int c = 0; c < d->in_ch; c++) {
        float *tap = scratch + (size_t)27 * K * gemm_thread_index(), *gw = tap + 9 * (size_t)K;
        for (int t = 0; t < 9; t++) /* tap[t][k] = w[k, c] at t, or turned: w[c, k] at 8 - t */
            for (int k = 0; k < K; k++)
                tap[t * K + k] = adjoint ? w[((size_t)c * K + k) * 9 + 8 - t]
                                         : w[((size_t)k * d->in_ch + c) * 9 + t];
        for (int i = 0; i < 6; i++) /* G w: [6, 3] */
            for (int j = 0; j < 3; j++) {
                float *out = gw + (size_t)(i * 3 + j) * K;
                const float *t0 = tap + (size_t)j * K, *t1 = t0 + 3 * K, *t2 = t1 + 3 * K;
                for (int k = 0; k < K; k++)
                    out[k] = winograd_g[i][0] * t0[k] + winograd_g[i][1] * t1[k] +
                             winograd_g[i][2] * t2[k];
            }
        for (int i = 0; i < 6; i++) /* (G w) G^T: [6, 6] */
            for (int j = 0; j < 6; j++) {
                float *out = u + ((size_t)(i * 6 + j) * d->in_ch + c) * K;
                const float *g0 = gw + (size_t)i * 3 * K, *g1 = g0 + K, *g2 = g1 + K;
                for (int k = 0; k < K; k++)
                    out[k] = g0[k] * winograd_g[j][0] + g1[k] * winograd_g[j][1] +
                             g2[k] * winograd_g[j][2];
            }
    }
    free(scratch);
}

/* The 1-D transforms, each over len columns at once (the loops vectorise: every row its own
 * restrict pointer): six input rows d0..d5 -> o0..o5 = B^T d, or o0..o3 = A^T d, sharing the sums
 * common to the rows of B^T and A^T. */
static void winograd_bt_1d(int len, const float *restrict d0, const float *restrict d1,
                           const float *restrict d2, const float *restrict d3,
                           const float *restrict d4, const float *restrict d5, float *restrict o0,
                           float *restrict o1, float *restrict o2, float *restrict o3,
                           float *restrict o4, float *restrict o5) {
    for (int x = 0; x < len; x++) {
        float a = d4[x] - 4.0f * d2[x], b = d3[x] - 4.0f * d1[x]; /* rows 1, 2 */
        float c = d4[x] - d2[x], e = 2.0f * (d3[x] - d1[x]);        /* rows 3, 4 */
        o0[x] = 4.0f * d0[x] - 5.0f * d2[x] + d4[x];
        o1[x] = a + b;
        o2[x] = a - b;
        o3[x] = c + e;
        o4[x] = c - e;
        o5[x] = 4.0f * d1[x] - 5.0f * d3[x] + d5[x];
    }
}

static void winograd_at_1d(int len, const float *restrict d0, const float *restrict d1,
                           const float *restrict d2, const float *restrict d3,
                           const float *restrict d4, const float *restrict d5, float *restrict o0,
                           float *restrict o1, float *restrict o2, float *restrict o3) {
    for (int x = 0; x < len; x++) {
        float sum12 = d1[x] + d2[x], diff12 = d1[x] - d2[x];
        float sum34 = d3[x] + d4[x], diff34 = d3[x] - d4[x];
        o0[x] = d0[x] + sum12 + sum34;
        o1[x] = diff12 + 2.0f * diff34;
        o2[x] = sum12 + 4.0f * sum34;
        o3[x] = diff12 + 8.0f * diff34 + d5[x];
    }
}

/* The transforms run along spans of a tile row, so that their loops run over consecutive values
 * rather than inside one 6x6 tile: each 1-D transform first over the columns of the span, then
 * over its rows with the values split by phase (x mod 4), tile i's six inputs being
 * phase[0..3][i], phase[0..1][i + 1]. A thread's scratch: 7 rows of 4 block_cols + 4 and 24 of
 * block_cols + 1 floats. */
static size_t winograd_scratch_floats(const WinogradDims *d) {
    return 7 * ((size_t)4 * d->block_cols + 4) + 24 * ((size_t)d->block_cols + 1);
}

/* Input plane x: [H, W] of channel c, tiles tx0 .. tx0 + n - 1 of tile row ty -> (B^T d B)[p] of
 * tile tx0 + i, d the 6x6 input from one row and column before the tile's outputs (zero outside
 * the image), at v + p * v_stride + gemm_panel_offset(Cin, c, first + i): each point's V in the
 * panels gemm_packed reads, the span's tiles from column `first` of the block. */
static void winograd_input_span(const WinogradDims *d, const float *x, int c, int ty, int tx0,
                                int n, float *v, size_t v_stride, int first, float *scratch) {
    int width = 4 * n + 4, x0 = 4 * tx0 - 1; /* cols[i][k]: column x0 + k of the span */
    int lo = x0 < 0 ? -x0 : 0, hi = d->W - x0 < width ? d->W - x0 : width;
    float *zero = scratch, *cols = zero + width, *phase = cols + 6 * (size_t)width;
    const float *rows[6]; /* the six input rows from column x0 + lo, zeros outside the image */
    memset(zero, 0, (size_t)width * sizeof *zero);
    for (int r = 0; r < 6; r++) {
        int yy = 4 * ty - 1 + r;
        rows[r] = yy >= 0 && yy < d->H ? x + (size_t)yy * d->W + x0 + lo : zero;
    }
    float *out[6]; /* cols = B^T rows, column by column */
    for (int i = 0; i < 6; i++) out[i] = cols + (size_t)i * width + lo;
    winograd_bt_1d(hi - lo, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], out[0], out[1],
                   out[2], out[3], out[4], out[5]);
    for (int i = 0; i < 6; i++) { /* columns outside the image: B^T of zeros */
        float *col = cols + (size_t)i * width;
        for (int k = 0; k < lo; k++) col[k] = 0.0f;
        for (int k = hi; k < width; k++) col[k] = 0.0f;
    }
    size_t stride = (size_t)n + 1;
    for (int i = 0; i < 6; i++) { /* each row of cols, times B */
        const float *col = cols + (size_t)i * width;
        for (int t = 0; t <= n; t++)
            for (int q = 0; q < 4; q++) phase[q * stride + t] = col[4 * t + q];
        for (int t = 0, run; t < n; t += run) { /* a run of tiles inside one panel */
            int tile = first + t;
            run = n - t < GEMM_NR - tile % GEMM_NR ? n - t : GEMM_NR - tile % GEMM_NR;
            const float *p = phase + t;
            float *o = v + (size_t)i * 6 * v_stride + gemm_panel_offset(d->in_ch, c, tile);
            winograd_bt_1d(run, p, p + stride, p + 2 * stride, p + 3 * stride, p + 1,
                           p + stride + 1, o, o + v_stride, o + 2 * v_stride, o + 3 * v_stride,
                           o + 4 * v_stride, o + 5 * v_stride);
        }
    }
}

/* m[p * m_stride + i], the 36 products of tile tx0 + i of tile row ty (i < n) -> their 4x4
 * outputs A^T m A (+ bias) into plane y: [H, W] (their parts inside the image); accumulate:
 * added to y. */
static void winograd_output_span(const WinogradDims *d, const float *m, size_t m_stride, int ty,
                                 int tx0, int n, float bias, bool accumulate, float *y,
                                 float *scratch) {
    float *at_m = scratch, *out = at_m + 24 * (size_t)n; /* [4][6][n], [4][n] */
    size_t s6 = 6 * m_stride, n6 = 6 * (size_t)n;
    for (int j = 0; j < 6; j++) { /* A^T m, column by column */
        const float *in = m + (size_t)j * m_stride;
        float *o = at_m + (size_t)j * n;
        winograd_at_1d(n, in, in + s6, in + 2 * s6, in + 3 * s6, in + 4 * s6, in + 5 * s6, o,
                       o + n6, o + 2 * n6, o + 3 * n6);
    }
    int x0 = 4 * tx0, cols = d->W - x0 < 4 * n ? d->W - x0 : 4 * n;
    for (int i = 0; i < 4 && 4 * ty + i < d->H; i++) { /* each row, times A */
        const float *in = at_m + (size_t)i * 6 * n;
        winograd_at_1d(n, in, in + n, in + 2 * (size_t)n, in + 3 * (size_t)n, in + 4 * (size_t)n,
                       in + 5 * (size_t)n, out, out + n, out + 2 * (size_t)n, out + 3 * (size_t)n);
        float *row = y + (size_t)(4 * ty + i) * d->W + x0;
        int whole = cols / 4; /* tiles whose four columns all lie inside the image */
        if (accumulate)
            for (int t = 0; t < whole; t++)
                for (int q = 0; q < 4; q++) row[4 * t + q] += out[q * n + t] + bias;
        else
            for (int t = 0; t < whole; t++)
                for (int q = 0; q < 4; q++) row[4 * t + q] = out[q * n + t] + bias;
        for (int xx = 4 * whole; xx < cols; xx++) {
            float value = out[(xx % 4) * n + xx / 4] + bias;
            row[xx] = accumulate ? row[xx] + value : value;
        }
    }
}

/* One block of one image, by one thread: tile rows [ty0, ty0 + rows) by tiles [tx0, tx0 + cols)
 * (n = rows * cols tiles). x: [Cin, H, W] -> v: 36 points' [Cin, n] in panels, v_floats apart
 * (the inputs' transforms), the 36 products m: [36, Cout, n] = U v through the packed kernels u
 * (u_floats apart), the outputs' transforms into y: [Cout, H, W]. */
static void winograd_block(const WinogradDims *d, const float *u, size_t u_floats,
                           const float *x, int ty0, int rows, int tx0, int cols,
                           const float *bias, bool accumulate, float *y, float *v,
                           size_t v_floats, float *m, float *scratch) {
    size_t plane = (size_t)d->H * d->W;
    int n = rows * cols;
    for (int c = 0; c < d->in_ch; c++)
        for (int r = 0; r < rows; r++)
            winograd_input_span(d, x + c * plane, c, ty0 + r, tx0, cols, v, v_floats, r * cols,
                                scratch);
    for (int p = 0; p < WINOGRAD_POINTS; p++) /* the last panel's columns past n: zeros */
        for (int c = 0; c < d->in_ch; c++)
            for (int j = n; j < (n + GEMM_NR - 1) / GEMM_NR * GEMM_NR; j++)
                v[p * v_floats + gemm_panel_offset(d->in_ch, c, j)] = 0.0f;
    for (int p = 0; p < WINOGRAD_POINTS; p++)
        gemm_packed(d->out_ch, n, d->in_ch, u + p * u_floats, v + p * v_floats,
                    m + (size_t)p * d->out_ch * n, n);
    for (int k = 0; k < d->out_ch; k++)
        for (int r = 0; r < rows; r++)
            winograd_output_span(d, m + (size_t)k * n + (size_t)r * cols, (size_t)d->out_ch * n,
                                 ty0 + r, tx0, cols, bias ? bias[k] : 0.0f, accumulate,
                                 y + k * plane, scratch);
}

/* x: [B, Cin, H, W] -> y: [B, Cout, H, W] (= or, accumulate, +=) through the packed kernels u,
 * the blocks shared out among the threads, each with its own V, M and scratch. false when out
 * of memory. */
static bool winograd_run(const WinogradDims *d, int batch, const float *u, size_t u_floats,
                         const float *x, const float *bias, bool accumulate, float *y) {
    int block = d->block_rows * d->block_cols;
    size_t v_floats = gemm_panels_floats(d->in_ch, block);
    size_t m_floats = (size_t)WINOGRAD_POINTS * d->out_ch * block;
    size_t per_thread = WINOGRAD_POINTS * v_floats + m_floats + winograd_scratch_floats(d);
    int threads = team_size();
    float *work = buffer_new(per_thread * threads * sizeof *work);
    if (!work) return false;
    int row_blocks = (d->tile_rows + d->block_rows - 1) / d->block_rows;
    int col_blocks = (d->tiles_w + d->block_cols - 1) / d->block_cols;
    int per_image = row_blocks * col_blocks;
#pragma omp parallel for schedule(dynamic, 1) if (threads > 1)
    for (int i = 0; i < batch * per_image; i++) {
        int b = i / per_image, ty0 = i % per_image / col_blocks * d->block_rows;
        int tx0 = i % col_blocks * d->block_cols;
        int rows = d->tile_rows - ty0 < d->block_rows ? d->tile_rows - ty0 : d->block_rows;
        int cols = d->tiles_w - tx0 < d->block_cols ? d->tiles_w - tx0 : d->block_cols;
        float *v = work + per_thread * gemm_thread_index(), *m = v + WINOGRAD_POINTS * v_floats;
        winograd_block(d, u, u_floats, x + (size_t)b * d->in_ch * d->H * d->W, ty0, rows, tx0,
                       cols, bias, accumulate, y + (size_t)b * d->out_ch * d->H * d->W, v,
                       v_floats, m, m + m_floats);
    }
    free(work);
    return true;
}

/* The forward (adjoint false: x [B, Cin, H, W] -> y [B, Cout, H, W] = conv(x, w) + b) or the
 * backward to the input (adjoint: dy -> dx += conv^T(dy, w)) of a conv2d_is_winograd shape. */
static void winograd_conv(const Conv2dShape *s, bool adjoint, const float *x, const float *w,
                          const float *b, float *y) {
    WinogradDims d = {.in_ch = adjoint ? s->out_ch : s->in_ch,
                      .out_ch = adjoint ? s->in_ch : s->out_ch, .H = s->in_h, .W = s->in_w,
                      .tiles_w = (s->in_w + 3) / 4, .tile_rows = (s->in_h + 3) / 4};
    /* Blocks of WINOGRAD_BLOCK_TILES, fewer tiles where that would leave threads idle (at least
     * WINOGRAD_MIN_BLOCK_TILES); the results do not depend on the blocks. */
    int block = d.tiles_w * d.tile_rows / team_size();
    block = block > WINOGRAD_BLOCK_TILES       ? WINOGRAD_BLOCK_TILES
            : block < WINOGRAD_MIN_BLOCK_TILES ? WINOGRAD_MIN_BLOCK_TILES
                                               : block;
    d.block_cols = d.tiles_w < block ? d.tiles_w : block;
    d.block_rows = block / d.block_cols;
    if (d.block_rows > d.tile_rows) d.block_rows = d.tile_rows;
    size_t point_floats = gemm_packed_a_floats(d.out_ch, d.in_ch);
    float *u = buffer_new((size_t)WINOGRAD_POINTS * d.out_ch * d.in_ch * sizeof *u);
    float *packed = buffer_new(WINOGRAD_POINTS * point_floats * sizeof *packed);
    if (u && packed) {
        winograd_kernels(&d, w, adjoint, u);
#pragma omp parallel for schedule(dynamic, 1) if (team_size() > 1)
        for (int p = 0; p < WINOGRAD_POINTS; p++)
            gemm_pack_a(true, d.out_ch, d.in_ch, u + (size_t)p * d.out_ch * d.in_ch, d.out_ch,
                        packed + p * point_floats);
    }
    free(u);
    if (!u || !packed || !winograd_run(&d, s->batch, packed, point_floats, x, b, adjoint, y))
        fill_nan(y, (size_t)s->batch * d.out_ch * d.H * d.W);
    free(packed);
}

void conv2d_forward(const Conv2dShape *s, const float *x, const float *w, const float *b,
                    float *y) {
    if (conv_shape_empty(s)) return;
    ConvDims d = conv_dims(s, conv_forward_budget());
    if (conv_is_depthwise(s))
        depthwise_forward(s, &d, x, w, b, y);
    else if (conv2d_is_winograd(s))
        winograd_conv(s, false, x, w, b, y);
    else
        conv_gemm_forward(s, &d, x, w, b, y);
}

void conv2d_backward(const Conv2dShape *s, const float *x, const float *w, const float *dy,
                     float *dx, float *dw, float *db) {
    if (conv_shape_empty(s)) return;
    ConvDims d = conv_dims(s, CONV_COL_BUDGET);
    if (db) conv_bias_backward(s->batch, s->out_ch, d.pixels, dy, db);
    if (conv_is_depthwise(s)) {
        if (dx) depthwise_backward_dx(s, &d, w, dy, dx);
        if (dw) depthwise_backward_dw(s, &d, x, dy, dw);
    } else if (conv2d_is_winograd(s)) {
        if (dx) winograd_conv(s, true, dy, w, NULL, dx);
        if (dw) conv_gemm_backward(s, &d, x, w, dy, NULL, dw);
    } else if (dx || dw) {
        conv_gemm_backward(s, &d, x, w, dy, dx, dw);
    }
}

/* The element counts of a convolution's x, w and y ('x', 'w', 'y'). */
static size_t conv_reference_count(const Conv2dShape *s, char which) {
    if (which == 'x') return (size_t)s->batch * s->in_ch * s->in_h * s->in_w;
    if (which == 'w') return (size_t)s->out_ch * (s->in_ch / s->groups) * s->kernel_h * s->kernel_w;
    return (size_t)s->batch * s->out_ch * conv2d_out_h(s) * conv2d_out_w(s);
}

/* Calls visit(ctx, x index, w index, y index) for every multiply of the convolution: the one
 * place the reference spells out the index arithmetic, shared by its forward and backward. */
typedef void (*ConvTermFn)(void *ctx, size_t xi, size_t wi, size_t yi);

static void conv2d_reference_terms(const Conv2dShape *s, ConvTermFn visit, void *ctx) {
    int Ho = conv2d_out_h(s), Wo = conv2d_out_w(s);
    int cin_g = s->in_ch / s->groups, cout_g = s->out_ch / s->groups;
    for (int b = 0; b < s->batch; b++)
        for (int co = 0; co < s->out_ch; co++)
            for (int oh = 0; oh < Ho; oh++)
                for (int ow = 0; ow < Wo; ow++) {
                    size_t yi = (((size_t)b * s->out_ch + co) * Ho + oh) * Wo + ow;
                    for (int c = 0; c < cin_g; c++) {
                        int ci = co / cout_g * cin_g + c;
                        for (int i = 0; i < s->kernel_h; i++)
                            for (int j = 0; j < s->kernel_w; j++) {
                                int ih = oh * s->stride_h - s->pad_h + i;
                                int iw = ow * s->stride_w - s->pad_w + j;
                                if (ih < 0 || ih >= s->in_h || iw < 0 || iw >= s->in_w) continue;
                                size_t xi =
                                    (((size_t)b * s->in_ch + ci) * s->in_h + ih) * s->in_w + iw;
                                size_t wi =
                                    (((size_t)co * cin_g + c) * s->kernel_h + i) * s->kernel_w + j;
                                visit(ctx, xi, wi, yi);
                            }
                    }
                }
}

typedef struct ConvReference {
    const float *x, *w, *dy;
    double *y, *dx, *dw;
} ConvReference;

static void conv2d_forward_term(void *ctx, size_t xi, size_t wi, size_t yi) {
    ConvReference *r = ctx;
    r->y[yi] += (double)r->x[xi] * r->w[wi];
}

static void conv2d_backward_term(void *ctx, size_t xi, size_t wi, size_t yi) {
    ConvReference *r = ctx;
    r->dx[xi] += (double)r->w[wi] * r->dy[yi];
    r->dw[wi] += (double)r->x[xi] * r->dy[yi];
}

void conv2d_reference_forward(const Conv2dShape *s, const float *x, const float *w,
                              const float *b, float *y) {
    size_t ny = conv_reference_count(s, 'y'), plane = ny / ((size_t)s->batch * s->out_ch);
    ConvReference r = {.x = x, .w = w, .y = calloc(ny ? ny : 1, sizeof(double))};
    if (r.y) conv2d_reference_terms(s, conv2d_forward_term, &r);
    for (size_t i = 0; i < ny; i++)
        y[i] = r.y ? (float)(r.y[i] + (b ? b[i / plane % s->out_ch] : 0.0)) : NAN;
    free(r.y);
}

void conv2d_reference_backward(const Conv2dShape *s, const float *x, const float *w,
                               const float *dy, float *dx, float *dw, float *db) {
    size_t nx = conv_reference_count(s, 'x'), nw = conv_reference_count(s, 'w');
    size_t ny = conv_reference_count(s, 'y'), plane = ny / ((size_t)s->batch * s->out_ch);
    ConvReference r = {.x = x,
                       .w = w,
                       .dy = dy,
                       .dx = calloc(nx ? nx : 1, sizeof(double)),
                       .dw = calloc(nw ? nw : 1, sizeof(double))};
    double *sum_db = calloc((size_t)s->out_ch, sizeof(double));
    bool ok = r.dx && r.dw && sum_db;
    if (ok) conv2d_reference_terms(s, conv2d_backward_term, &r);
    if (ok)
        for (size_t i = 0; i < ny; i++) sum_db[i / plane % s->out_ch] += dy[i];
    if (dx)
        for (size_t i = 0; i < nx; i++) dx[i] += ok ? (float)r.dx[i] : NAN;
    if (dw)
        for (size_t i = 0; i < nw; i++) dw[i] += ok ? (float)r.dw[i] : NAN;
    if (db)
        for (int c = 0; c < s->out_ch; c++) db[c] += ok ? (float)sum_db[c] : NAN;
    free(r.dx);
    free(r.dw);
    free(sum_db);
}

/* === attention and rotary embedding === */

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
    float *walk, *walk2;      /* k and v, or q and dout, copied as rows (walk_rows) */
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
    for (size_t i = 0; i < COUNT(blocks); i++) *blocks[i] = base + i * block;
    w.s = base + 6 * block;
    w.ds = w.s + tile;
    return w;
}

/* One scratch per thread in a single 64-byte aligned allocation (free(*block)), or NULL. */
static float *attn_scratch_pool(int dp, int threads, void **block) {
    return scratch_new(attn_scratch_floats(dp) * sizeof(float) * (size_t)threads, block);
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

/* The rows of a walked block as the kernels read them: a zero-padded copy in scratch, [rows
 * padded to ATTN_PAD_ROWS][dp]. Always a copy, even of rows already in that form: read in place,
 * rows a multiple of 4 KiB apart (FLUX.2's [tokens, 24 heads x 128] layout puts them 12 KiB
 * apart) all fall in one set of the L1 cache and evict each other; copied, bench attention 1 24
 * 1536 128 ran its forward in 300 ms instead of 562 and its backward in 975 instead of 1529. */
static const float *walk_rows(float *scratch, int dp, const float *src, ptrdiff_t stride, int rows,
                              int cols) {
    load_rows(scratch, dp, round_up(rows, ATTN_PAD_ROWS), src, (size_t)stride, rows, cols);
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
        alpha[i] = exp_nonpositive(m[i] - shift[i]);       /* 0 on the first keys, where m = -inf */
        m[i] = m_new;
    }
    for (int j = 0; j < nk; j++) {
        float *row = st + j * ATTN_BLOCK;
        for (int i = 0; i < cols; i++) {
            row[i] = exp_nonpositive(row[i] - shift[i]);
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
        const float *k_rows = walk_rows(w->walk, dp, k + kv_off, kv_stride, nk, D);
        const float *v_rows = walk_rows(w->walk2, dp, v + kv_off, kv_stride, nk, D);
        tile_scores(k_rows, dp, w->own_t, w->s, round_up(nk, ATTN_PAD_ROWS), cols, D);
        softmax_fold_tile(w->s, nk, cols, j0, visible, scale, m, l, alpha);
        for (int i = 0; i < rows; i++)
            if (alpha[i] != 1.0f)
                for (int d = 0; d < dp; d++) w->acc[(size_t)i * dp + d] *= alpha[i];
        tile_gather(w->acc, w->s, v_rows, dp, rows, nk, dp);
    }
    float *lse_row = lse + ((size_t)b * s->heads + h) * s->q_len + i0;
    for (int i = 0; i < nq; i++) {
        float *o = out + q_off + i * q_stride;
        float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        for (int d = 0; d < D; d++) o[d] = w->acc[(size_t)i * dp + d] * inv;
        lse_row[i] = l[i] > 0.0f ? m[i] + logf(l[i]) : -INFINITY;
    }
}

/* out = softmax(scale q k^T) v and its log-sum-exp lse (tensor.h): one task per batch item, head
 * and block of queries, each an online softmax over tiles of keys (attention_forward_block). */
void attention_forward(const AttentionShape *s, float scale, const float *q, const float *k,
                       const float *v, float *out, float *lse) {
    int dp = round_up(s->head_dim, ATTN_PAD_COLS), q_blocks = (s->q_len + ATTN_BLOCK - 1) / ATTN_BLOCK;
    long tasks = (long)s->batch * s->heads * q_blocks;
    void *block;
    float *pool = attn_scratch_pool(dp, attn_threads(), &block);
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
    free(block);
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
            float e = exp_nonpositive(s_row[i] * scale - qs->lse[i]); /* unconditional, so it vectorises */
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
            float e = exp_nonpositive(s_row[c] * scale - qs->lse[i]);
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
        const float *k_rows = walk_rows(w->walk, dp, k + kv_off, kv_stride, nk, D);
        const float *v_rows = walk_rows(w->walk2, dp, v + kv_off, kv_stride, nk, D);
        tile_scores(k_rows, dp, w->own_t, w->s, nk_rows, cols, D);
        tile_scores(v_rows, dp, w->own2_t, w->ds, nk_rows, cols, D);
        softmax_grad_keys_by_queries(w->s, w->ds, nk_rows, cols, j0, &qs, scale);
        tile_gather(w->acc, w->ds, k_rows, dp, rows, nk, dp);
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
            const float *q_rows = walk_rows(w->walk, dp, q + q_off, q_stride, qs.n, D);
            const float *dout_rows = walk_rows(w->walk2, dp, dout + q_off, q_stride, qs.n, D);
            tile_scores(q_rows, dp, w->own_t, w->s, nq_rows, cols, D);
            tile_scores(dout_rows, dp, w->own2_t, w->ds, nq_rows, cols, D);
            softmax_grad_queries_by_keys(w->s, w->ds, nq_rows, cols, j0, &qs, scale);
            if (dv) tile_gather(w->acc2, w->s, dout_rows, dp, rows, qs.n, dp);
            if (dk) tile_gather(w->acc, w->ds, q_rows, dp, rows, qs.n, dp);
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
#pragma omp parallel for
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
    void *block;
    float *pool = attn_scratch_pool(dp, attn_threads(), &block);
    float *di = malloc(((size_t)s->batch * s->heads * s->q_len + 1) * sizeof *di);
    if (!pool || !di) { /* out of memory: NaN gradients rather than a silent wrong answer */
        fill_nan(dq, (size_t)s->batch * s->q_len * s->heads * s->head_dim);
        fill_nan(dk, (size_t)s->batch * s->kv_len * s->kv_heads * s->head_dim);
        fill_nan(dv, (size_t)s->batch * s->kv_len * s->kv_heads * s->head_dim);
        free(block);
        free(di);
        return;
    }
    attention_row_dots(s, out, dout, di);
#pragma omp parallel
    {
        AttnScratch w = attn_scratch_at(attn_thread_scratch(pool, dp), dp);
#pragma omp for schedule(dynamic)
        for (long t = 0; t < dq_tasks; t++)
            attention_dq_block(s, scale, q, k, v, lse, di, dout, dq, (int)(t / q_blocks / s->heads),
                               (int)(t / q_blocks % s->heads), (int)(t % q_blocks) * ATTN_BLOCK, &w);
#pragma omp for schedule(dynamic)
        for (long t = 0; t < dkdv_tasks; t++)
            attention_dkdv_block(s, scale, q, k, v, lse, di, dout, dk, dv,
                                 (int)(t / kv_blocks / s->kv_heads), (int)(t / kv_blocks % s->kv_heads),
                                 (int)(t % kv_blocks) * ATTN_BLOCK, &w);
    }
    free(block);
    free(di);
}

static bool attention_reference_visible(const AttentionShape *s, int b, int i, int j) {
    if (s->kv_valid && j >= s->kv_valid[b]) return false;
    return !s->causal || j <= i + (s->kv_len - s->q_len);
}

/* One query row at a time: the scores, their softmax, out = P V, then dQ, dK, dV from dout. */
/* The reference's scratch: one row of scores then probabilities [Nk], dq's row [D], and dk, dv
 * summed in double over every query [B, Nk, Hkv, D]. */
typedef struct AttentionRefScratch {
    double *p, *dq_row, *dk, *dv;
} AttentionRefScratch;

/* Query row i of head h in batch b: its output, lse and dq, and its share of dk and dv. */
static void attention_reference_row(const AttentionShape *s, float scale, const float *q,
                                    const float *k, const float *v, const float *dout,
                                    float *out, float *lse, float *dq, int b, int h, int i,
                                    const AttentionRefScratch *w) {
    int H = s->heads, Hkv = s->kv_heads, D = s->head_dim, Nq = s->q_len, Nk = s->kv_len;
    double *p = w->p;
    const float *qi = q + (((size_t)b * Nq + i) * H + h) * D;
    const float *doi = dout + (((size_t)b * Nq + i) * H + h) * D;
    float *oi = out + (((size_t)b * Nq + i) * H + h) * D;
    float *dqi = dq + (((size_t)b * Nq + i) * H + h) * D;
    size_t kv_row0 = ((size_t)b * Nk * Hkv + h / (H / Hkv)) * D, kv_step = (size_t)Hkv * D;
    double m = -INFINITY, sum = 0.0;
    for (int j = 0; j < Nk; j++) {
        double dot = 0.0;
        for (int d = 0; d < D; d++) dot += (double)qi[d] * k[kv_row0 + j * kv_step + d];
        p[j] = attention_reference_visible(s, b, i, j) ? scale * dot : -INFINITY;
        if (p[j] > m) m = p[j];
    }
    for (int d = 0; d < D; d++) oi[d] = dqi[d] = 0.0f;
    for (int d = 0; d < D; d++) w->dq_row[d] = 0.0;
    lse[((size_t)b * H + h) * Nq + i] = -INFINITY;
    if (m == -INFINITY) return; /* no visible key: zeros */
    for (int j = 0; j < Nk; j++) sum += p[j] = exp(p[j] - m);
    lse[((size_t)b * H + h) * Nq + i] = (float)(m + log(sum));
    double di = 0.0;
    for (int d = 0; d < D; d++) {
        double o = 0.0;
        for (int j = 0; j < Nk; j++) o += p[j] / sum * v[kv_row0 + j * kv_step + d];
        oi[d] = (float)o;
        di += o * doi[d];
    }
    for (int j = 0; j < Nk; j++) {
        const float *kj = k + kv_row0 + j * kv_step, *vj = v + kv_row0 + j * kv_step;
        double pj = p[j] / sum, dp = 0.0;
        for (int d = 0; d < D; d++) dp += (double)doi[d] * vj[d];
        double ds = pj * (dp - di) * scale;
        for (int d = 0; d < D; d++) {
            w->dq_row[d] += ds * kj[d];
            w->dk[kv_row0 + j * kv_step + d] += ds * qi[d];
            w->dv[kv_row0 + j * kv_step + d] += pj * doi[d];
        }
    }
    for (int d = 0; d < D; d++) dqi[d] = (float)w->dq_row[d];
}

void attention_reference(const AttentionShape *s, float scale, const float *q, const float *k,
                         const float *v, const float *dout, float *out, float *lse, float *dq,
                         float *dk, float *dv) {
    size_t nk_all = (size_t)s->batch * s->kv_len * s->kv_heads * s->head_dim;
    AttentionRefScratch w = {malloc((s->kv_len + 1) * sizeof *w.p),
                             malloc((s->head_dim + 1) * sizeof *w.dq_row),
                             calloc(nk_all + 1, sizeof *w.dk), calloc(nk_all + 1, sizeof *w.dv)};
    bool ok = w.p && w.dq_row && w.dk && w.dv;
    if (ok)
        for (int b = 0; b < s->batch; b++)
            for (int h = 0; h < s->heads; h++)
                for (int i = 0; i < s->q_len; i++)
                    attention_reference_row(s, scale, q, k, v, dout, out, lse, dq, b, h, i, &w);
    if (!ok) { /* out of memory: NaNs, never a plausible answer */
        size_t nq_all = (size_t)s->batch * s->q_len * s->heads * s->head_dim;
        for (size_t i = 0; i < nq_all; i++) out[i] = dq[i] = NAN;
        for (size_t i = 0; i < (size_t)s->batch * s->heads * s->q_len; i++) lse[i] = NAN;
    }
    for (size_t i = 0; i < nk_all; i++) {
        dk[i] = ok ? (float)w.dk[i] : NAN;
        dv[i] = ok ? (float)w.dv[i] : NAN;
    }
    free(w.p);
    free(w.dq_row);
    free(w.dk);
    free(w.dv);
}

/* Rotary embedding: each pair (x[a], x[b]) of a head turns by its position's angle i,
 *   y[a] = x[a] cos - x[b] sin,  y[b] = x[a] sin + x[b] cos,
 * the pairs being (2i, 2i+1) in FLUX's interleaved convention (diffusers apply_rotary_emb with
 * use_real_unbind_dim=-1) or (i, i + D/2) in Qwen's (transformers' x * cos + rotate_half(x) *
 * sin, rotate_half(x) = [-x[D/2:], x[:D/2]]). An odd last element is passed through. y may
 * alias x. */
static void rope_pair(RopePairs pairs, int head_dim, int i, int *a, int *b) {
    *a = pairs == ROPE_HALVES ? i : 2 * i;
    *b = pairs == ROPE_HALVES ? i + head_dim / 2 : 2 * i + 1;
}

void rope_forward(RopePairs pairs, int batch, int n, int heads, int head_dim,
                  const float *cos_table, const float *sin_table, const float *x, float *y) {
    int half = head_dim / 2;
#pragma omp parallel for
    for (long row = 0; row < (long)batch * n; row++) {
        const float *c = cos_table + (size_t)(row % n) * half, *sn = sin_table + (size_t)(row % n) * half;
        for (int h = 0; h < heads; h++) {
            const float *xr = x + ((size_t)row * heads + h) * head_dim;
            float *yr = y + ((size_t)row * heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                int a, b;
                rope_pair(pairs, head_dim, i, &a, &b);
                float x0 = xr[a], x1 = xr[b];
                yr[a] = x0 * c[i] - x1 * sn[i];
                yr[b] = x0 * sn[i] + x1 * c[i];
            }
            if (head_dim % 2) yr[head_dim - 1] = xr[head_dim - 1];
        }
    }
}

/* dx += R^T dy: the rotation by -theta. */
void rope_backward(RopePairs pairs, int batch, int n, int heads, int head_dim,
                   const float *cos_table, const float *sin_table, const float *dy, float *dx) {
    int half = head_dim / 2;
#pragma omp parallel for
    for (long row = 0; row < (long)batch * n; row++) {
        const float *c = cos_table + (size_t)(row % n) * half, *sn = sin_table + (size_t)(row % n) * half;
        for (int h = 0; h < heads; h++) {
            const float *dyr = dy + ((size_t)row * heads + h) * head_dim;
            float *dxr = dx + ((size_t)row * heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                int a, b;
                rope_pair(pairs, head_dim, i, &a, &b);
                float g0 = dyr[a], g1 = dyr[b];
                dxr[a] += g0 * c[i] + g1 * sn[i];
                dxr[b] += g1 * c[i] - g0 * sn[i];
            }
            if (head_dim % 2) dxr[head_dim - 1] += dyr[head_dim - 1];
        }
    }
}

/* === norms, activations, resampling, elementwise === */

/* OpenMP only where the work pays for waking the threads. Every such loop writes disjoint
 * outputs. */

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
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && C > OPS_COLUMN_BLOCK)
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

/* --- layernorm --- */

void layernorm_forward(int rows, int C, float eps, const float *x, const float *w, const float *b,
                       float *y, float *mean, float *rstd) {
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
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
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
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

/* --- groupnorm --- */

/* y[0 .. n) from one channel's x with its group's mean m and scale = rstd w[c], shift = b[c]. */
typedef void (*GroupNormRow)(int n, const float *x, float m, float scale, float shift, float *y);

/* The loop both GroupNorm forwards share: each group's statistics, then row() on each of its
 * channels. Group g of sample b is the contiguous block of channels [g * C/groups,
 * (g+1) * C/groups). */
static void groupnorm_rows(int B, int C, int HW, int groups, float eps, const float *x,
                           const float *w, const float *b, GroupNormRow row, float *y,
                           float *mean, float *rstd) {
    int group_ch = C / groups;
    size_t group_len = (size_t)group_ch * HW;
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && B * groups > 1)
    for (int bg = 0; bg < B * groups; bg++) {
        const float *xg = x + (size_t)bg * group_len;
        float *yg = y + (size_t)bg * group_len;
        float m, s;
        norm_stats(group_len, xg, eps, &m, &s);
        for (int k = 0; k < group_ch; k++) {
            int c = (bg % groups) * group_ch + k;
            float scale = s * (w ? w[c] : 1.0f), shift = b ? b[c] : 0.0f;
            row(HW, xg + (size_t)k * HW, m, scale, shift, yg + (size_t)k * HW);
        }
        mean[bg] = m;
        rstd[bg] = s;
    }
}

/* (x - m) first: folding m into the shift would cancel badly when rstd is large. */
static inline float groupnorm_value(float x, float m, float scale, float shift) {
    return (x - m) * scale + shift;
}

/* y = GroupNorm(x) along one channel's row (a GroupNormRow) */
static void groupnorm_row(int n, const float *x, float m, float scale, float shift, float *y) {
    for (int i = 0; i < n; i++) y[i] = groupnorm_value(x[i], m, scale, shift);
}

void groupnorm_forward(int B, int C, int HW, int groups, float eps, const float *x, const float *w,
                       const float *b, float *y, float *mean, float *rstd) {
    groupnorm_rows(B, C, HW, groups, eps, x, w, b, groupnorm_row, y, mean, rstd);
}

/* The layernorm formula over each group, with w per channel; dw, db per channel over (b, hw). */
void groupnorm_backward(int B, int C, int HW, int groups, const float *x, const float *w,
                        const float *mean, const float *rstd, const float *dy, float *dx,
                        float *dw, float *db) {
    int group_ch = C / groups;
    size_t group_len = (size_t)group_ch * HW;
    if (dx) {
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && B * groups > 1)
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
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        double s_dy, s_dy_xhat;
        int g = c / group_ch;
        channel_sums(B, C, HW, c, dw ? x : NULL, mean + g, rstd + g, groups, dy, &s_dy,
                     &s_dy_xhat);
        if (dw) dw[c] += (float)s_dy_xhat;
        if (db) db[c] += (float)s_dy;
    }
}

/* --- rmsnorm --- */

void rmsnorm_forward(int rows, int C, float eps, const float *x, const float *w, float *y,
                     float *rstd) {
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
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
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
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

/* --- batchnorm with running statistics --- */

void batchnorm_eval_forward(int B, int C, int HW, float eps, const float *mean, const float *var,
                            const float *w, const float *b, const float *x, float *y) {
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && B * C > 1)
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
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && B * C > 1)
        for (int bc = 0; bc < B * C; bc++) {
            int c = bc % C;
            float scale = (w ? w[c] : 1.0f) / sqrtf(var[c] + eps);
            const float *dyp = dy + (size_t)bc * HW;
            float *dxp = dx + (size_t)bc * HW;
            for (int i = 0; i < HW; i++) dxp[i] += dyp[i] * scale;
        }
    }
    if (!dw && !db) return;
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        float rstd = 1.0f / sqrtf(var[c] + eps);
        double s_dy, s_dy_xhat;
        channel_sums(B, C, HW, c, dw ? x : NULL, mean + c, &rstd, 0, dy, &s_dy, &s_dy_xhat);
        if (dw) dw[c] += (float)s_dy_xhat;
        if (db) db[c] += (float)s_dy;
    }
}

/* --- pointwise activations --- */

#define OPS_SQRT1_2 0.70710678118654752f      /* 1/sqrt(2) */
#define OPS_INV_SQRT_2PI 0.39894228040143268f /* 1/sqrt(2 pi) */
#define OPS_SQRT_2_PI 0.79788456080286536f    /* sqrt(2/pi) */
#define OPS_GELU_CUBIC 0.044715f

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
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) y[i] = gelu_tanh_scalar(x[i]);
    } else {
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) y[i] = gelu_erf_scalar(x[i]);
    }
}

void gelu_backward(size_t n, bool tanh_approx, const float *x, const float *dy, float *dx) {
    if (tanh_approx) {
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) dx[i] += dy[i] * gelu_tanh_grad(x[i]);
    } else {
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) dx[i] += dy[i] * gelu_erf_grad(x[i]);
    }
}

void silu_forward(size_t n, const float *x, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope;
        y[i] = x[i] * sigmoid_scalar(x[i], &slope);
    }
}

/* d/dx x s(x) = s + x s (1 - s) */
void silu_backward(size_t n, const float *x, const float *dy, float *dx) {
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope, s = sigmoid_scalar(x[i], &slope);
        dx[i] += dy[i] * (s + x[i] * slope);
    }
}

/* --- groupnorm + silu --- */

/* y = SiLU(u), u = GroupNorm(x), along one channel's row (a GroupNormRow) */
static void groupnorm_silu_row(int n, const float *x, float m, float scale, float shift,
                               float *y) {
    for (int i = 0; i < n; i++) {
        float slope, u = groupnorm_value(x[i], m, scale, shift);
        y[i] = u * sigmoid_scalar(u, &slope);
    }
}

/* SiLU(GroupNorm(x)) in one pass: nothing between the two is stored. */
void groupnorm_silu_forward(int B, int C, int HW, int groups, float eps, const float *x,
                            const float *w, const float *b, float *y, float *mean, float *rstd) {
    groupnorm_rows(B, C, HW, groups, eps, x, w, b, groupnorm_silu_row, y, mean, rstd);
}

/* Values per chunk of the SiLU backward: small enough for the stack, long enough to vectorise. */
#define SILU_GRAD_CHUNK 256

/* du[i] = dy[i] SiLU'(u_i), u_i = (x[i] - m) scale + shift, for n <= SILU_GRAD_CHUNK values:
 * elementwise, so that it vectorises. */
static void silu_grad_chunk(int n, const float *x, const float *dy, float m, float scale,
                            float shift, float *du) {
    for (int i = 0; i < n; i++) {
        float slope, u = groupnorm_value(x[i], m, scale, shift);
        float sig = sigmoid_scalar(u, &slope);
        du[i] = dy[i] * (sig + u * slope);
    }
}

/* Over one plane of HW values: the sums of du and of du * xhat (xhat = (x - m) s), in double,
 * in order. */
static void silu_grad_sums(int HW, const float *x, const float *dy, float m, float s, float scale,
                           float shift, double *sum_du, double *sum_du_xhat) {
    double s_du = 0.0, s_du_xhat = 0.0;
    float du[SILU_GRAD_CHUNK];
    for (int i0 = 0; i0 < HW; i0 += SILU_GRAD_CHUNK) {
        int n = HW - i0 < SILU_GRAD_CHUNK ? HW - i0 : SILU_GRAD_CHUNK;
        silu_grad_chunk(n, x + i0, dy + i0, m, scale, shift, du);
        for (int i = 0; i < n; i++) {
            s_du += du[i];
            s_du_xhat += du[i] * ((x[i0 + i] - m) * s);
        }
    }
    *sum_du = s_du;
    *sum_du_xhat = s_du_xhat;
}

/* dx[i] += s (du[i] wc - mean_g - xhat_i mean_g_xhat) over one plane of HW values. */
static void groupnorm_silu_dx(int HW, const float *x, const float *dy, float m, float s,
                              float wc, float shift, float mean_g, float mean_g_xhat, float *dx) {
    float du[SILU_GRAD_CHUNK];
    for (int i0 = 0; i0 < HW; i0 += SILU_GRAD_CHUNK) {
        int n = HW - i0 < SILU_GRAD_CHUNK ? HW - i0 : SILU_GRAD_CHUNK;
        silu_grad_chunk(n, x + i0, dy + i0, m, s * wc, shift, du);
        for (int i = 0; i < n; i++) {
            float g = du[i] * wc, xhat = (x[i0 + i] - m) * s;
            dx[i0 + i] += s * (g - mean_g - xhat * mean_g_xhat);
        }
    }
}

/* groupnorm_backward applied to du = dy * SiLU'(u), with u recomputed from x, the statistics,
 * w and b instead of read back: the memory of one tensor less in forward and in backward. The
 * per-plane sums dx needs are kept (when there is memory for them) for dw and db. */
void groupnorm_silu_backward(int B, int C, int HW, int groups, const float *x, const float *w,
                             const float *b, const float *mean, const float *rstd, const float *dy,
                             float *dx, float *dw, float *db) {
    int group_ch = C / groups;
    size_t group_len = (size_t)group_ch * HW;
    /* [B * C][2]: each plane's sums of du and du * xhat */
    double *sums = dx && (dw || db) ? malloc((size_t)B * C * 2 * sizeof *sums) : NULL;
    if (dx) {
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && B * groups > 1)
        for (int bg = 0; bg < B * groups; bg++) {
            int c0 = (bg % groups) * group_ch;
            const float *xg = x + (size_t)bg * group_len, *dyg = dy + (size_t)bg * group_len;
            float *dxg = dx + (size_t)bg * group_len;
            float m = mean[bg], s = rstd[bg];
            double sum_g = 0.0, sum_g_xhat = 0.0; /* g = du * w[c] */
            for (int k = 0; k < group_ch; k++) {
                float wc = w ? w[c0 + k] : 1.0f, shift = b ? b[c0 + k] : 0.0f;
                double s_du, s_du_xhat;
                silu_grad_sums(HW, xg + (size_t)k * HW, dyg + (size_t)k * HW, m, s, s * wc, shift,
                               &s_du, &s_du_xhat);
                if (sums) {
                    size_t plane = (size_t)bg * group_ch + (size_t)k; /* = bi * C + c0 + k */
                    sums[2 * plane] = s_du;
                    sums[2 * plane + 1] = s_du_xhat;
                }
                sum_g += wc * s_du;
                sum_g_xhat += wc * s_du_xhat;
            }
            float mean_g = (float)(sum_g / group_len);
            float mean_g_xhat = (float)(sum_g_xhat / group_len);
            for (int k = 0; k < group_ch; k++)
                groupnorm_silu_dx(HW, xg + (size_t)k * HW, dyg + (size_t)k * HW, m, s,
                                  w ? w[c0 + k] : 1.0f, b ? b[c0 + k] : 0.0f, mean_g, mean_g_xhat,
                                  dxg + (size_t)k * HW);
        }
    }
    if (!dw && !db) return;
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        int g = c / group_ch;
        float wc = w ? w[c] : 1.0f, shift = b ? b[c] : 0.0f;
        double s_du = 0.0, s_du_xhat = 0.0;
        for (int bi = 0; bi < B; bi++) {
            size_t plane = (size_t)bi * C + c;
            float m = mean[(size_t)bi * groups + g], s = rstd[(size_t)bi * groups + g];
            double a, a_xhat;
            if (sums) {
                a = sums[2 * plane];
                a_xhat = sums[2 * plane + 1];
            } else {
                silu_grad_sums(HW, x + plane * HW, dy + plane * HW, m, s, s * wc, shift, &a,
                               &a_xhat);
            }
            s_du += a;
            s_du_xhat += a_xhat;
        }
        if (dw) dw[c] += (float)s_du_xhat;
        if (db) db[c] += (float)s_du;
    }
    free(sums);
}

/* x < 0 ? 0 : x keeps a NaN a NaN, as torch.relu does. */
void relu_forward(size_t n, const float *x, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = x[i] < 0.0f ? 0.0f : x[i];
}

/* Gradient only where x > 0 (zero at x == 0), as torch's (y > 0) mask. */
void relu_backward(size_t n, const float *x, const float *dy, float *dx) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += x[i] > 0.0f ? dy[i] : 0.0f;
}

void sigmoid_forward(size_t n, const float *x, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope;
        y[i] = sigmoid_scalar(x[i], &slope);
    }
}

void sigmoid_backward(size_t n, const float *y, const float *dy, float *dx) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += dy[i] * y[i] * (1.0f - y[i]);
}

/* --- softmax --- */

/* Shifted by the row max so exp never overflows; a row holding a NaN comes out all NaN. */
void softmax_forward(int rows, int C, const float *x, float *y) {
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN_MATH && rows > 1)
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
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * C, *dyr = dy + (size_t)r * C;
        float *dxr = dx + (size_t)r * C;
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += dyr[c] * yr[c];
        float d = (float)dot;
        for (int c = 0; c < C; c++) dxr[c] += yr[c] * (dyr[c] - d);
    }
}

/* --- resampling --- */

void upsample_nearest2x_forward(int planes, int H, int W, const float *x, float *y) {
#pragma omp parallel for if ((size_t)planes * H * W >= PARALLEL_MIN / 4)
    for (size_t row = 0; row < (size_t)planes * H; row++) {
        const float *xr = x + row * W;
        float *y0 = y + row * 4 * W, *y1 = y0 + 2 * W; /* output rows 2i and 2i+1 */
        for (int j = 0; j < W; j++) y0[2 * j] = y0[2 * j + 1] = xr[j];
        memcpy(y1, y0, 2 * (size_t)W * sizeof *y1);
    }
}

/* Each input pixel gathers the 2x2 block it was copied to. */
void upsample_nearest2x_backward(int planes, int H, int W, const float *dy, float *dx) {
#pragma omp parallel for if ((size_t)planes * H * W >= PARALLEL_MIN / 4)
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
#pragma omp parallel for if ((size_t)planes * Ho * Wo >= PARALLEL_MIN / 4 && planes * chunks > 1)
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
#pragma omp parallel for if ((size_t)planes * Ho * Wo >= PARALLEL_MIN / 4 && planes > 1)
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

/* --- elementwise --- */

void add_forward(size_t n, const float *a, const float *b, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

void mul_forward(size_t n, const float *a, const float *b, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = a[i] * b[i];
}

/* y += a * b */
static void add_product(size_t n, const float *a, const float *b, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] += a[i] * b[i];
}

void mul_backward(size_t n, const float *a, const float *b, const float *dy, float *da, float *db) {
    if (da) add_product(n, dy, b, da);
    if (db) add_product(n, dy, a, db);
}

void scale_forward(size_t n, float s, const float *x, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = s * x[i];
}

void axpy(size_t n, float alpha, const float *x, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* --- transposes --- */

/* Tiles of x [rows, cols] per task: a tile's reads and writes each stay in TRANSPOSE_TILE runs
 * of cache lines. */
#define TRANSPOSE_TILE 32

/* y [cols, rows] (=, or += when accumulate) x [rows, cols] transposed, rows [i0, i1) x columns
 * [j0, j1) of x: in 8 x 8 blocks transposed in registers where the instruction set has them,
 * element by element for the rest. */
static void transpose_tile(int64_t rows, int64_t cols, const float *x, float *y, bool accumulate,
                           int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    int64_t i_blocks_end = i0, j_blocks_end = j0; /* rows and columns done in 8 x 8 blocks */
#if defined(GEMM_AVX512) || defined(GEMM_AVX2)
    j_blocks_end = j0 + (j1 - j0) / 8 * 8;
    for (; i_blocks_end + 8 <= i1; i_blocks_end += 8)
        for (int64_t j = j0; j < j_blocks_end; j += 8) {
            __m256 r[8];
            for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(x + (i_blocks_end + k) * cols + j);
            transpose8x8_registers(r);
            for (int k = 0; k < 8; k++) {
                float *dst = y + (j + k) * rows + i_blocks_end;
                _mm256_storeu_ps(dst, accumulate ? _mm256_add_ps(_mm256_loadu_ps(dst), r[k]) : r[k]);
            }
        }
#endif
    for (int64_t i = i0; i < i1; i++)
        for (int64_t j = i < i_blocks_end ? j_blocks_end : j0; j < j1; j++) {
            float *dst = y + j * rows + i;
            *dst = accumulate ? *dst + x[i * cols + j] : x[i * cols + j];
        }
}

void transpose_batched(int64_t batch, int64_t rows, int64_t cols, const float *x, float *y,
                       bool accumulate) {
    int64_t tiles_i = (rows + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE;
    int64_t tiles_j = (cols + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE;
    int64_t tasks = batch * tiles_i * tiles_j, per = rows * cols;
#pragma omp parallel for if ((size_t)(batch * per) >= PARALLEL_MIN)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t b = t / (tiles_i * tiles_j), i0 = t / tiles_j % tiles_i * TRANSPOSE_TILE;
        int64_t j0 = t % tiles_j * TRANSPOSE_TILE;
        transpose_tile(rows, cols, x + b * per, y + b * per, accumulate, i0,
                       i0 + TRANSPOSE_TILE < rows ? i0 + TRANSPOSE_TILE : rows, j0,
                       j0 + TRANSPOSE_TILE < cols ? j0 + TRANSPOSE_TILE : cols);
    }
}

/* Written so that a NaN passes through, as torch.clamp does. */
void clamp_forward(size_t n, float lo, float hi, const float *x, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
}

void clamp_backward(size_t n, float lo, float hi, const float *x, const float *dy, float *dx) {
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += x[i] >= lo && x[i] <= hi ? dy[i] : 0.0f;
}

void pow_forward(size_t n, float p, const float *x, float *y) {
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) y[i] = powf(x[i], p);
}

void pow_backward(size_t n, float p, const float *x, const float *dy, float *dx) {
    if (p == 0.0f) return;
#pragma omp parallel for if (n >= PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) dx[i] += dy[i] * p * powf(x[i], p - 1.0f);
}

/* --- broadcasts and reductions --- */

void add_rows_forward(int rows, int C, const float *x, const float *v, float *y) {
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) y[(size_t)r * C + c] = x[(size_t)r * C + c] + v[c];
}

void mul_rows_forward(int rows, int C, const float *x, const float *v, float *y) {
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) y[(size_t)r * C + c] = x[(size_t)r * C + c] * v[c];
}

void mul_rows_backward(int rows, int C, const float *x, const float *v, const float *dy, float *dx,
                       float *dv) {
    if (dx) {
#pragma omp parallel for if ((size_t)rows * C >= PARALLEL_MIN && rows > 1)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < C; c++) dx[(size_t)r * C + c] += dy[(size_t)r * C + c] * v[c];
    }
    column_grads(rows, C, x, NULL, NULL, dy, dv, NULL);
}

void sum_rows_add(int rows, int C, const float *x, float *out) {
    column_grads(rows, C, NULL, NULL, NULL, x, NULL, out);
}

void add_channels_forward(int B, int C, int HW, const float *x, const float *v, float *y) {
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && B * C > 1)
    for (int bc = 0; bc < B * C; bc++) {
        float vc = v[bc % C];
        for (int i = 0; i < HW; i++) y[(size_t)bc * HW + i] = x[(size_t)bc * HW + i] + vc;
    }
}

void sum_channels_add(int B, int C, int HW, const float *x, float *out) {
#pragma omp parallel for if ((size_t)B * C * HW >= PARALLEL_MIN && C > 1)
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
#pragma omp parallel for if (n >= PARALLEL_MIN)
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) {
        size_t lo, hi;
        reduce_chunk(n, k, &lo, &hi);
        part[k] = sum_f64(hi - lo, x + lo);
    }
    double s = 0.0;
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) s += part[k];
    return s;
}

/* A block at a time, with integer tests on the exponent bits (all ones: NaN or infinity) that
 * vectorise, and the exact index looked for only in the block that has one. */
size_t first_non_finite(size_t n, const float *x) {
    enum { BLOCK = 1024 };
    for (size_t lo = 0; lo < n; lo += BLOCK) {
        size_t hi = n - lo < BLOCK ? n : lo + BLOCK;
        uint32_t any = 0;
        for (size_t i = lo; i < hi; i++) {
            uint32_t bits;
            memcpy(&bits, &x[i], sizeof bits);
            any |= (bits & 0x7f800000u) == 0x7f800000u;
        }
        if (!any) continue;
        for (size_t i = lo; i < hi; i++)
            if (!isfinite(x[i])) return i;
    }
    return n;
}

float max_array(size_t n, const float *x) {
    float part[OPS_REDUCE_CHUNKS];
#pragma omp parallel for if (n >= PARALLEL_MIN)
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

/* === random numbers (PyTorch's CPU generator) === */

enum { MT_N = 624, MT_M = 397 };

void torch_generator_seed(TorchGenerator *g, uint64_t seed) {
    g->state[0] = (uint32_t)(seed & 0xffffffffu);
    for (uint32_t j = 1; j < MT_N; j++)
        g->state[j] = 1812433253u * (g->state[j - 1] ^ (g->state[j - 1] >> 30)) + j;
    g->next = MT_N;  // the first draw regenerates the whole state, as in torch
    g->has_cached_normal = false;
    g->cached_normal = 0.0;
}

// Replaces all 624 words at once; word k mixes k, k + 1 and k + 397 (mod 624).
static void mt19937_regenerate(uint32_t *state) {
    for (int k = 0; k < MT_N; k++) {
        uint32_t y = (state[k] & 0x80000000u) | (state[(k + 1) % MT_N] & 0x7fffffffu);
        state[k] = state[(k + MT_M) % MT_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
}

uint32_t torch_generator_random(TorchGenerator *g) {
    if (g->next >= MT_N) {
        mt19937_regenerate(g->state);
        g->next = 0;
    }
    uint32_t y = g->state[g->next++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

// torch's uniform_real_distribution<float>(0, 1): the low 24 bits of one draw, in [0, 1).
static float uniform_float(TorchGenerator *g) {
    return (float)(torch_generator_random(g) & 0xffffffu) * (1.0f / 16777216.0f);
}

// uniform_real_distribution<double>(0, 1): the low 53 bits of random64(), which puts the first
// of its two draws in the high word.
static double uniform_double(TorchGenerator *g) {
    uint64_t hi = torch_generator_random(g);
    uint64_t lo = torch_generator_random(g);
    uint64_t bits = ((hi << 32) | lo) & ((UINT64_C(1) << 53) - 1);
    return (double)bits * (1.0 / 9007199254740992.0);
}

// torch's normal_distribution<double> for tensors under 16 values: Box-Muller in double, which
// returns r cos(theta) and keeps r sin(theta) in the generator for the next scalar draw.
static double normal_double(TorchGenerator *g) {
    if (g->has_cached_normal) {
        g->has_cached_normal = false;
        return g->cached_normal;
    }
    const double pi = 3.14159265358979323846;
    double u1 = uniform_double(g);
    double u2 = uniform_double(g);
    double r = sqrt(-2.0 * log(1.0 - u2));
    double theta = 2.0 * pi * u1;
    g->cached_normal = r * sin(theta);
    g->has_cached_normal = true;
    return r * cos(theta);
}

/* torch's AVX2 kernel is written with separate multiplies and adds, but its compiler fused
 * some pairs into FMAs (GCC contracts a product whose only use is an add). The fmaf calls
 * below sit exactly where those fusions are: with any of them as a separate multiply and add,
 * about 1 value in 600 differs from torch in the last bit. Every other step rounds to float on
 * its own statement, so no compiler can fuse more. */

/* Natural log of x in (0, 1] as torch's avx_mathfun log256_ps computes it: Cephes' polynomial
 * on the mantissa plus the exponent times ln 2 in two parts. */
static float cephes_logf(float x) {
    uint32_t u = float_bits(x);
    float e = (float)((int32_t)(u >> 23) - 0x7f);
    e = e + 1.0f;
    x = bits_float((u & ~0x7f800000u) | float_bits(0.5f));  // mantissa in [0.5, 1)
    bool small = x < 0.707106781186547524f;
    float extra = small ? x : 0.0f;
    x = x - 1.0f;
    e = e - (small ? 1.0f : 0.0f);
    x = x + extra;
    float z = x * x;
    static const float p[9] = {7.0376836292E-2f,  -1.1514610310E-1f, 1.1676998740E-1f,
                               -1.2420140846E-1f, +1.4249322787E-1f, -1.6668057665E-1f,
                               +2.0000714765E-1f, -2.4999993993E-1f, +3.3333331174E-1f};
    float y = p[0];
    for (int k = 1; k < 9; k++) y = fmaf(y, x, p[k]);
    y = y * x;
    float e_low = e * -2.12194440e-4f;
    y = fmaf(y, z, e_low);
    y = fmaf(-z, 0.5f, y);
    float sum = x + y;
    return fmaf(e, 0.693359375f, sum);
}

/* sin and cos of x >= 0 as torch's avx_mathfun sincos256_ps: reduce by multiples of pi/4 in
 * three steps, evaluate both Cephes polynomials, pick and sign them by octant. */
static void cephes_sincosf(float x, float *s, float *c) {
    float y = x * 1.27323954473516f;  // 4 / pi
    int32_t j = (int32_t)y;
    j = (j + 1) & ~1;
    y = (float)j;
    uint32_t sign_sin = (uint32_t)(j & 4) << 29;
    bool sin_from_sin_poly = (j & 2) == 0;
    x = fmaf(y, -0.78515625f, x);
    x = fmaf(y, -2.4187564849853515625e-4f, x);
    x = fmaf(y, -3.77489497744594108e-8f, x);
    uint32_t sign_cos = (uint32_t)(~(j - 2) & 4) << 29;

    float z = x * x;
    float yc = 2.443315711809948E-005f;  // cos polynomial on [-pi/4, pi/4]
    yc = fmaf(yc, z, -1.388731625493765E-003f);
    yc = fmaf(yc, z, 4.166664568298827E-002f);
    yc = yc * z;
    float half_z = z * 0.5f;
    yc = fmaf(yc, z, -half_z);
    yc = yc + 1.0f;
    float ys = -1.9515295891E-4f;  // sin polynomial on [-pi/4, pi/4]
    ys = fmaf(ys, z, 8.3321608736E-3f);
    ys = fmaf(ys, z, -1.6666654611E-1f);
    ys = ys * z;
    ys = fmaf(ys, x, x);

    // The kernel blends with masks and adds the unused lane as +0.0, which turns -0 into +0.
    float sin_part_s = sin_from_sin_poly ? ys : 0.0f;
    float sin_part_c = sin_from_sin_poly ? 0.0f : yc;
    ys = ys - sin_part_s;
    yc = yc - sin_part_c;
    float sin_val = sin_part_c + sin_part_s;
    float cos_val = yc + ys;
    *s = bits_float(float_bits(sin_val) ^ sign_sin);
    *c = bits_float(float_bits(cos_val) ^ sign_cos);
}

// data[0..16): uniforms in [0, 1) -> normals. Pairs (j, j + 8) share one Box-Muller draw.
static void box_muller_16(float *data) {
    const float two_pi = (float)(2.0 * 3.14159265358979323846);
    for (int j = 0; j < 8; j++) {
        float u1 = 1.0f - data[j];  // (0, 1] for the log
        float u2 = data[j + 8];
        float log_u1 = cephes_logf(u1);
        float radius = sqrtf(-2.0f * log_u1);
        float theta = two_pi * u2;
        float s, c;
        cephes_sincosf(theta, &s, &c);
        // torch stores fma(n, std, mean) with std 1, mean 0: adding +0 turns -0 into +0.
        data[j] = radius * c + 0.0f;
        data[j + 8] = radius * s + 0.0f;
    }
}

/* torch's normal_fill for n >= 16: n uniforms, Box-Muller on whole blocks of 16; when n is not
 * a multiple of 16, 16 fresh uniforms replace the last 16 values and are transformed again. */
static void randn_blocks(TorchGenerator *g, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = uniform_float(g);
    for (size_t i = 0; i + 16 <= n; i += 16) box_muller_16(out + i);
    if (n % 16 != 0) {
        float *tail = out + n - 16;
        for (int i = 0; i < 16; i++) tail[i] = uniform_float(g);
        box_muller_16(tail);
    }
}

void torch_randn(TorchGenerator *g, float *out, size_t n) {
    if (n >= 16) {
        randn_blocks(g, out, n);
        return;
    }
    for (size_t i = 0; i < n; i++) out[i] = (float)normal_double(g);
}

int latent_noise_tokens(uint64_t seed, int channels, int grid_h, int grid_w, float *tokens,
                        Error *e) {
    size_t T = (size_t)grid_h * (size_t)grid_w, C = (size_t)channels;
    float *x = malloc(C * T * sizeof *x);  // x: [C, T] as torch draws it
    if (!x) return error_set(e, "latent noise: out of memory for %zu x %zu values", C, T);
    TorchGenerator g;
    torch_generator_seed(&g, seed);
    torch_randn(&g, x, C * T);
    for (size_t t = 0; t < T; t++)
        for (size_t c = 0; c < C; c++) tokens[t * C + c] = x[c * T + t];
    free(x);
    return 0;
}
