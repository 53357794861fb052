/* test_gemm.c - the blocked gemm() against the reference triple loop, against PyTorch, and
 * against itself at other thread counts (bit for bit); the same for gemm_stored_bf16. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../tensor.h"
#include "harness.h"

/* Stands in for the columns of C between N and ldc, which gemm must never touch. */
#define GAP_SENTINEL 12345.0f

typedef struct GemmCase {
    int M, N, K;
    bool trans_a, trans_b;
    float alpha, beta;
    int pad; /* extra elements per row: leading dimension = row length + pad */
} GemmCase;

/* A product's operands and output, stored the way gemm reads them. */
typedef struct GemmData {
    int lda, ldb, ldc;
    float *A, *B, *C;
} GemmData;

static float *random_matrix(int rows, int ld, unsigned long long *state) {
    float *x = malloc((size_t)rows * ld * sizeof *x + 1);
    for (size_t i = 0; i < (size_t)rows * ld; i++) x[i] = harness_rand(state);
    return x;
}

/* C gets random values where beta reads them, NaN where beta == 0 promises not to, and the
 * sentinel in the gap past column N. */
static GemmData gemm_data_new(const GemmCase *c, unsigned long long seed) {
    GemmData d;
    unsigned long long state = seed;
    int a_rows = c->trans_a ? c->K : c->M, a_cols = c->trans_a ? c->M : c->K;
    int b_rows = c->trans_b ? c->N : c->K, b_cols = c->trans_b ? c->K : c->N;
    d.lda = a_cols + c->pad, d.ldb = b_cols + c->pad, d.ldc = c->N + c->pad;
    d.A = random_matrix(a_rows, d.lda, &state);
    d.B = random_matrix(b_rows, d.ldb, &state);
    d.C = random_matrix(c->M, d.ldc, &state);
    for (int i = 0; i < c->M; i++)
        for (int j = 0; j < d.ldc; j++)
            if (j >= c->N) d.C[(size_t)i * d.ldc + j] = GAP_SENTINEL;
            else if (c->beta == 0.0f) d.C[(size_t)i * d.ldc + j] = NAN;
    return d;
}

static void gemm_data_free(GemmData *d) {
    free(d->A), free(d->B), free(d->C);
}

static void run_gemm(const GemmCase *c, GemmData *d) {
    gemm(c->trans_a, c->trans_b, c->M, c->N, c->K, c->alpha, d->A, d->lda, d->B, d->ldb, c->beta,
         d->C, d->ldc);
}

/* C's first N columns packed densely, for check_close. */
static float *dense_c(const GemmCase *c, const GemmData *d) {
    float *x = malloc((size_t)c->M * c->N * sizeof *x + 1);
    for (int i = 0; i < c->M; i++)
        memcpy(x + (size_t)i * c->N, d->C + (size_t)i * d->ldc, (size_t)c->N * sizeof *x);
    return x;
}

static bool gap_untouched(const GemmCase *c, const GemmData *d) {
    for (int i = 0; i < c->M; i++)
        for (int j = c->N; j < d->ldc; j++)
            if (d->C[(size_t)i * d->ldc + j] != GAP_SENTINEL) return false;
    return true;
}

/* A float32 sum of K products of values in [-1, 1) drifts from the float64 reference by about
 * eps * sqrt(K) * |partial sums|; we see up to 1e-6 * sqrt(K) and allow four times that. */
static float gemm_atol(int K) {
    return 4e-6f * sqrtf((float)(K > 1 ? K : 1));
}

static void check_case(const GemmCase *c) {
    char what[160];
    snprintf(what, sizeof what, "gemm %s%s M=%d N=%d K=%d alpha=%g beta=%g pad=%d",
             c->trans_a ? "T" : "N", c->trans_b ? "T" : "N", c->M, c->N, c->K, c->alpha, c->beta,
             c->pad);
    GemmData got = gemm_data_new(c, 1000u + (unsigned)(c->M * 31 + c->N * 7 + c->K));
    GemmData want = gemm_data_new(c, 1000u + (unsigned)(c->M * 31 + c->N * 7 + c->K));
    run_gemm(c, &got);
    gemm_reference(c->trans_a, c->trans_b, c->M, c->N, c->K, c->alpha, want.A, want.lda, want.B,
                   want.ldb, c->beta, want.C, want.ldc);
    float *g = dense_c(c, &got), *w = dense_c(c, &want);
    check_close(what, g, w, (size_t)c->M * c->N, 1e-5f, gemm_atol(c->K) * fabsf(c->alpha));
    CHECK(gap_untouched(c, &got), "%s: C outside its N columns untouched", what);
    free(g), free(w);
    gemm_data_free(&got), gemm_data_free(&want);
}

static void test_against_reference(void) {
    /* Tiny, odd, vector-shaped and K = 1 products; one micro-tile and depth block (384) exactly
     * and one past; wider than a column block (480); a long K (521 depth blocks); and, last,
     * an A block over the 32M-float cap (GEMM_A_BLOCK_FLOATS), so the rows split into two
     * blocks whose panels are packed in turn into the same scratch. */
    const int sizes[][3] = {
        {1, 1, 1},     {7, 13, 17},   {33, 65, 129},   {1, 70, 45},    {50, 1, 45},
        {40, 37, 1},   {12, 32, 384}, {13, 33, 385},   {5, 1000, 3},   {1000, 5, 3},
        {300, 500, 700}, {3000, 17, 800}, {13, 3, 200000}, {2800, 3, 12000},
    };
    const float scales[][2] = {{1.0f, 0.0f}, {0.5f, 1.0f}, {-1.5f, 0.25f}};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (int t = 0; t < 4; t++) {
            GemmCase c = {sizes[s][0], sizes[s][1], sizes[s][2], t & 1, t >> 1, 1.0f, 0.0f, 0};
            /* big products once per transpose pair; every scale and padding on the rest */
            int n_scales = c.M * c.N * c.K > 1000000 ? 1 : 3;
            for (int v = 0; v < n_scales; v++) {
                c.alpha = scales[v][0], c.beta = scales[v][1], c.pad = v * 3;
                check_case(&c);
            }
        }
}

/* Nothing to add (K == 0 or alpha == 0): C = beta * C, and beta == 0 clears NaNs. */
static void test_degenerate(void) {
    GemmCase cases[] = {
        {5, 7, 0, false, false, 1.0f, 0.0f, 2}, {5, 7, 0, false, true, 1.0f, 0.5f, 2},
        {5, 7, 9, true, false, 0.0f, 0.0f, 1},  {5, 7, 9, false, false, 0.0f, 2.0f, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) check_case(&cases[i]);
}

/* The same product at 1, 2, 3 and 16 threads must agree bit for bit: the thread count changes
 * how the work is split (column blocks, row chunks) but never the order of any K-sum. */
static void test_thread_independence(void) {
#ifdef _OPENMP
    const GemmCase cases[] = {
        {300, 500, 700, false, false, 1.0f, 0.0f, 0}, {257, 20, 800, true, true, 0.7f, 0.3f, 1},
        {1024, 96, 100, false, true, 1.0f, 1.0f, 0}, {37, 1500, 390, true, false, -1.0f, 0.0f, 5},
        {3000, 40, 800, false, false, 1.0f, 0.5f, 0}, {2800, 5, 12000, false, true, 1.0f, 0.0f, 0},
    };
    const int thread_counts[] = {2, 3, 16};
    int keep = omp_get_max_threads();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const GemmCase *c = &cases[i];
        GemmData one = gemm_data_new(c, 77 + i);
        omp_set_num_threads(1);
        run_gemm(c, &one);
        for (size_t t = 0; t < sizeof thread_counts / sizeof thread_counts[0]; t++) {
            int threads = thread_counts[t];
            GemmData many = gemm_data_new(c, 77 + i);
            omp_set_num_threads(threads);
            run_gemm(c, &many);
            bool same = !memcmp(one.C, many.C, (size_t)c->M * one.ldc * sizeof(float));
            CHECK(same, "gemm M=%d N=%d K=%d: 1 and %d threads agree bit for bit", c->M, c->N, c->K,
                  threads);
            gemm_data_free(&many);
        }
        gemm_data_free(&one);
    }
    omp_set_num_threads(keep);
#else
    printf("  note: built without OpenMP, thread-count independence not exercised\n");
#endif
}

/* The golden products of tools/golden_gemm.py (torch.matmul in float64). */
static void test_against_pytorch(void) {
    SafeTensors *st = golden_open("tests/golden/gemm.safetensors");
    if (!st) return;
    for (int i = 0;; i++) {
        char name[64];
        snprintf(name, sizeof name, "case%d.params", i);
        if (!st_find(st, name)) break;
        float *p = golden_load(st, name, 7);
        if (!p) break;
        GemmCase c = {(int)p[0], (int)p[1], (int)p[2], p[3] != 0.0f, p[4] != 0.0f, p[5], p[6], 0};
        size_t na = (size_t)c.M * c.K, nb = (size_t)c.K * c.N, nc = (size_t)c.M * c.N;
        snprintf(name, sizeof name, "case%d.a", i);
        float *A = golden_load(st, name, na);
        snprintf(name, sizeof name, "case%d.b", i);
        float *B = golden_load(st, name, nb);
        snprintf(name, sizeof name, "case%d.c", i);
        float *C = golden_load(st, name, nc);
        snprintf(name, sizeof name, "case%d.out", i);
        float *want = golden_load(st, name, nc);
        snprintf(name, sizeof name, "case%d.bf16", i);
        float *want_bf16 = golden_load(st, name, nc);
        /* PyTorch's own bf16 product, where it sums in f32 (tools/golden_gemm.py) */
        snprintf(name, sizeof name, "case%d.torch_bf16", i);
        float *torch_bf16 = st_find(st, name) ? golden_load(st, name, nc) : NULL;
        float *C_bf16 = malloc(nc * sizeof *C_bf16 + 1), *product = malloc(nc * sizeof *product + 1);
        if (A && B && C && want && want_bf16 && C_bf16 && product) {
            int lda = c.trans_a ? c.M : c.K, ldb = c.trans_b ? c.K : c.N;
            memcpy(C_bf16, C, nc * sizeof *C);
            gemm(c.trans_a, c.trans_b, c.M, c.N, c.K, c.alpha, A, lda, B, ldb, c.beta, C, c.N);
            snprintf(name, sizeof name, "gemm vs torch.matmul case %d (%dx%dx%d %s%s)", i, c.M, c.N,
                     c.K, c.trans_a ? "T" : "N", c.trans_b ? "T" : "N");
            check_close(name, C, want, nc, 1e-5f, gemm_atol(c.K) * fabsf(c.alpha));
            gemm_stored_bf16(c.trans_a, c.trans_b, c.M, c.N, c.K, c.alpha, A, lda, B, DTYPE_F32,
                             ldb, c.beta, C_bf16, c.N);
            snprintf(name, sizeof name, "gemm_stored_bf16 vs the bf16 product in f64, case %d",
                     i);
            check_close(name, C_bf16, want_bf16, nc, 1e-5f, gemm_atol(c.K) * fabsf(c.alpha));
            /* PyTorch rounds its f32 sums to bf16: ours rounded the same way may differ where
             * the two sums (in other orders) straddle a rounding step: by one step, plus what
             * f32 sums may differ by where the value is small. */
            gemm_stored_bf16(c.trans_a, c.trans_b, c.M, c.N, c.K, 1.0f, A, lda, B, DTYPE_F32,
                             ldb, 0.0f, product, c.N);
            size_t equal = 0, beyond = 0;
            for (size_t k = 0; torch_bf16 && k < nc; k++) {
                float ours = bf16_to_f32(f32_to_bf16(product[k]));
                float step = fmaxf(fabsf(ours), fabsf(torch_bf16[k])) * 0x1p-7f;
                equal += ours == torch_bf16[k];
                beyond += !(fabsf(ours - torch_bf16[k]) <= step + gemm_atol(c.K));
            }
            if (torch_bf16)
                CHECK(beyond == 0 && equal >= nc * 9 / 10,
                      "gemm_stored_bf16 rounded to bf16 vs torch.matmul in bf16, case %d: %zu of "
                      "%zu equal, %zu further apart", i, equal, nc, beyond);
        }
        free(p), free(A), free(B), free(C), free(want), free(want_bf16), free(torch_bf16);
        free(C_bf16), free(product);
    }
    st_close(st);
}

/* The gradients of loss = sum(R * op(A) op(B)) are themselves products, so gemm with the other
 * transpose flags must give what finite differences of gemm give:
 *   d op(A) = R op(B)^T  and  d op(B) = op(A)^T R. */
typedef struct GemmLoss {
    GemmCase c;
    GemmData d;
    const float *R; /* [M, N] */
    float *out;     /* [M, N] */
} GemmLoss;

static double gemm_loss(void *ctx) {
    GemmLoss *l = ctx;
    gemm(l->c.trans_a, l->c.trans_b, l->c.M, l->c.N, l->c.K, 1.0f, l->d.A, l->d.lda, l->d.B,
         l->d.ldb, 0.0f, l->out, l->c.N);
    double sum = 0.0;
    for (size_t i = 0; i < (size_t)l->c.M * l->c.N; i++) sum += (double)l->R[i] * l->out[i];
    return sum;
}

static void test_gradients(void) {
    const int M = 5, N = 7, K = 9;
    for (int t = 0; t < 4; t++) {
        GemmLoss l = {{M, N, K, t & 1, t >> 1, 1.0f, 0.0f, 0}, {0}, NULL, NULL};
        l.d = gemm_data_new(&l.c, 500 + t);
        unsigned long long state = 900 + t;
        float *R = random_matrix(M, N, &state);
        float *dA = malloc(sizeof(float) * M * K), *dB = malloc(sizeof(float) * K * N);
        l.R = R, l.out = malloc(sizeof(float) * M * N);
        bool ta = l.c.trans_a, tb = l.c.trans_b;
        /* A stored [M, K]: dA = R op(B)^T; stored [K, M]: dA = op(B) R^T. */
        if (!ta) gemm(false, !tb, M, K, N, 1.0f, R, N, l.d.B, l.d.ldb, 0.0f, dA, K);
        else gemm(tb, true, K, M, N, 1.0f, l.d.B, l.d.ldb, R, N, 0.0f, dA, M);
        /* B stored [K, N]: dB = op(A)^T R; stored [N, K]: dB = R^T op(A). */
        if (!tb) gemm(!ta, false, K, N, M, 1.0f, l.d.A, l.d.lda, R, N, 0.0f, dB, N);
        else gemm(true, ta, N, K, M, 1.0f, R, N, l.d.A, l.d.lda, 0.0f, dB, K);
        char what[64];
        snprintf(what, sizeof what, "gemm %s%s d/dA", ta ? "T" : "N", tb ? "T" : "N");
        check_gradient(what, gemm_loss, &l, l.d.A, dA, (size_t)M * K, 1, 1e-2f, 1e-3f, 1e-3f);
        snprintf(what, sizeof what, "gemm %s%s d/dB", ta ? "T" : "N", tb ? "T" : "N");
        check_gradient(what, gemm_loss, &l, l.d.B, dB, (size_t)K * N, 1, 1e-2f, 1e-3f, 1e-3f);
        free(R), free(dA), free(dB), free(l.out);
        gemm_data_free(&l.d);
    }
}

/* B as gemm_stored reads it: f32 as it is, bf16 or f16 as little-endian bytes at an odd
 * address. d->B becomes the values the product sees (rounded to bf16 or f16). */
typedef struct StoredB {
    unsigned char *bytes;
    const void *data;
} StoredB;

static StoredB stored_b_new(const GemmCase *c, GemmData *d, DType type) {
    size_t count = (size_t)(c->trans_b ? c->N : c->K) * d->ldb;
    StoredB b = {malloc(2 * count + 1), d->B};
    if (type == DTYPE_F32) return b;
    unsigned char *b16 = b.bytes + 1;
    for (size_t k = 0; k < count; k++) {
        uint16_t h = type == DTYPE_BF16 ? f32_to_bf16(d->B[k]) : f32_to_f16(d->B[k]);
        d->B[k] = type == DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
        b16[2 * k] = (unsigned char)(h & 0xFF);
        b16[2 * k + 1] = (unsigned char)(h >> 8);
    }
    b.data = b16;
    return b;
}

/* gemm_stored with B as bf16 or f16 (one byte off any alignment) gives gemm's result on the
 * widened B bit for bit, both layouts of B, edge panels included; the reference loop over the
 * stored B agrees within the usual tolerance. */
static void test_stored_b(void) {
    const GemmCase cases[] = {
        {37, 45, 70, false, true, 1.0f, 0.0f, 3}, {20, 33, 19, false, false, 0.5f, 1.0f, 0},
        {300, 520, 260, true, true, 1.0f, 0.0f, 1}, {64, 96, 1030, false, true, 1.0f, 0.5f, 0},
    };
    const DType types[] = {DTYPE_BF16, DTYPE_F16};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (int ty = 0; ty < 2; ty++) {
            const GemmCase *c = &cases[i];
            GemmData d = gemm_data_new(c, 99 + i);
            StoredB b = stored_b_new(c, &d, types[ty]); /* d.B: the values B holds */
            size_t c_bytes = (size_t)c->M * d.ldc * sizeof(float);
            float *c_stored = malloc(c_bytes), *c_ref = malloc(c_bytes);
            memcpy(c_stored, d.C, c_bytes);
            memcpy(c_ref, d.C, c_bytes);
            gemm(c->trans_a, c->trans_b, c->M, c->N, c->K, c->alpha, d.A, d.lda, d.B, d.ldb,
                 c->beta, d.C, d.ldc);
            gemm_stored(c->trans_a, c->trans_b, c->M, c->N, c->K, c->alpha, d.A, d.lda, b.data,
                        types[ty], d.ldb, c->beta, c_stored, d.ldc);
            gemm_reference(c->trans_a, c->trans_b, c->M, c->N, c->K, c->alpha, d.A, d.lda, d.B,
                           d.ldb, c->beta, c_ref, d.ldc);
            CHECK(!memcmp(d.C, c_stored, c_bytes), "gemm_stored %s M=%d N=%d K=%d%s: gemm's "
                  "result on the widened B, bit for bit", dtype_name(types[ty]), c->M, c->N, c->K,
                  c->trans_b ? " trans_b" : "");
            float worst = 0.0f;
            for (int r = 0; r < c->M; r++)
                for (int j = 0; j < c->N; j++) {
                    size_t k = (size_t)r * d.ldc + j;
                    float diff = fabsf(c_stored[k] - c_ref[k]) / (1.0f + fabsf(c_ref[k]));
                    worst = diff > worst ? diff : worst;
                }
            CHECK(worst < 1e-4f, "gemm_stored %s M=%d N=%d K=%d near the reference (%g)",
                  dtype_name(types[ty]), c->M, c->N, c->K, worst);
            free(c_stored);
            free(c_ref);
            free(b.bytes);
            gemm_data_free(&d);
        }
}

static void run_bf16(const GemmCase *c, GemmData *d, const StoredB *b, DType type) {
    gemm_stored_bf16(c->trans_a, c->trans_b, c->M, c->N, c->K, c->alpha, d->A, d->lda, b->data,
                     type, d->ldb, c->beta, d->C, d->ldc);
}

/* x rounded to bf16 in place, as gemm_stored_bf16 rounds its operands. */
static float *round_bf16(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
    return x;
}

/* gemm_stored_bf16 with B f32, bf16 or f16 against the reference loop on the operands rounded
 * to bf16, within f32 accumulation's bound: the four layouts, K odd (a half-empty last pair) and
 * K = 1, K over a depth block of pairs (768), lanes and depths past the 8 x 16 blocks the packer
 * converts at once, A over one row block (3000 x 1501 pairs); a NaN in A reaches its row of C;
 * and the result at 1 thread is the result at 2, 3 and 16 bit for bit. */
static void test_bf16(void) {
    const GemmCase cases[] = {
        {1, 1, 1, false, false, 1.0f, 0.0f, 0},    {7, 13, 17, false, true, 1.0f, 0.0f, 0},
        {37, 45, 70, false, true, 1.0f, 0.0f, 3},  {20, 33, 19, false, false, 0.5f, 1.0f, 0},
        {300, 520, 260, true, true, 1.0f, 0.0f, 1}, {64, 96, 1601, false, true, 1.0f, 0.5f, 0},
        {129, 70, 800, true, false, -1.0f, 0.25f, 2}, {3000, 17, 3001, false, true, 1.0f, 0.0f, 0},
    };
    const DType types[] = {DTYPE_F32, DTYPE_BF16, DTYPE_F16};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (size_t ty = 0; ty < sizeof types / sizeof *types; ty++) {
            const GemmCase *c = &cases[i];
            char what[160];
            snprintf(what, sizeof what, "gemm_stored_bf16 B %s %s%s M=%d N=%d K=%d alpha=%g "
                     "beta=%g pad=%d", dtype_name(types[ty]), c->trans_a ? "T" : "N",
                     c->trans_b ? "T" : "N", c->M, c->N, c->K, c->alpha, c->beta, c->pad);
            GemmData d = gemm_data_new(c, 700 + i), want = gemm_data_new(c, 700 + i);
            StoredB b = stored_b_new(c, &d, types[ty]);
            run_bf16(c, &d, &b, types[ty]);
            size_t a_count = (size_t)(c->trans_a ? c->K : c->M) * want.lda;
            round_bf16(want.A, a_count);
            round_bf16(memcpy(want.B, d.B, (size_t)(c->trans_b ? c->N : c->K) * d.ldb * 4),
                       (size_t)(c->trans_b ? c->N : c->K) * d.ldb);
            gemm_reference(c->trans_a, c->trans_b, c->M, c->N, c->K, c->alpha, want.A, want.lda,
                           want.B, want.ldb, c->beta, want.C, want.ldc);
            float *g = dense_c(c, &d), *w = dense_c(c, &want);
            check_close(what, g, w, (size_t)c->M * c->N, 1e-5f, gemm_atol(c->K) * fabsf(c->alpha));
            CHECK(gap_untouched(c, &d), "%s: C outside its N columns untouched", what);
            free(g), free(w);
            free(b.bytes);
            gemm_data_free(&d), gemm_data_free(&want);
        }

    const GemmCase *nan_case = &cases[2];
    GemmData d = gemm_data_new(nan_case, 9);
    StoredB b = stored_b_new(nan_case, &d, DTYPE_BF16);
    d.A[3] = NAN; /* row 0, depth 3 */
    run_bf16(nan_case, &d, &b, DTYPE_BF16);
    bool row0_nan = true, row1_finite = true;
    for (int j = 0; j < nan_case->N; j++) {
        row0_nan = row0_nan && isnan(d.C[j]);
        row1_finite = row1_finite && isfinite(d.C[d.ldc + j]);
    }
    CHECK(row0_nan && row1_finite, "gemm_stored_bf16: a NaN in A's row 0 makes C's row 0 NaN, "
          "row 1 stays finite");
    free(b.bytes);
    gemm_data_free(&d);

#ifdef _OPENMP
    const int thread_counts[] = {2, 3, 16};
    int keep = omp_get_max_threads();
    for (size_t i = 4; i < sizeof cases / sizeof *cases; i++) {
        const GemmCase *c = &cases[i];
        GemmData one = gemm_data_new(c, 800 + i);
        StoredB b1 = stored_b_new(c, &one, DTYPE_BF16);
        omp_set_num_threads(1);
        run_bf16(c, &one, &b1, DTYPE_BF16);
        for (size_t t = 0; t < sizeof thread_counts / sizeof *thread_counts; t++) {
            GemmData many = gemm_data_new(c, 800 + i);
            StoredB bn = stored_b_new(c, &many, DTYPE_BF16);
            omp_set_num_threads(thread_counts[t]);
            run_bf16(c, &many, &bn, DTYPE_BF16);
            CHECK(!memcmp(one.C, many.C, (size_t)c->M * one.ldc * sizeof(float)),
                  "gemm_stored_bf16 M=%d N=%d K=%d: 1 and %d threads agree bit for bit", c->M,
                  c->N, c->K, thread_counts[t]);
            free(bn.bytes);
            gemm_data_free(&many);
        }
        free(b1.bytes);
        gemm_data_free(&one);
    }
    omp_set_num_threads(keep);
#endif
    printf("  bf16 products on %s\n", gemm_bf16_native() ? "the CPU's bf16 dot-product "
           "instructions" : "the portable kernel (no bf16 dot products in this build)");
}

/* gemm_packed, A packed by gemm_pack_a (either layout of A) and B laid out in panels by
 * gemm_panel_offset (zeros past N), gives gemm's result bit for bit (edge panels, K over a depth
 * block, a single column) and leaves the columns past N alone. */
static void test_packed(void) {
    const GemmCase cases[] = {
        {7, 33, 5, false, false, 1.0f, 0.0f, 2},     {128, 64, 500, true, false, 1.0f, 0.0f, 0},
        {13, 1, 384, false, false, 1.0f, 0.0f, 1},   {200, 300, 129, true, false, 1.0f, 0.0f, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const GemmCase *c = &cases[i];
        GemmData d = gemm_data_new(c, 500 + i), e = gemm_data_new(c, 500 + i);
        float *packed = malloc(gemm_packed_a_floats(c->M, c->K) * sizeof *packed);
        float *panels = calloc(gemm_panels_floats(c->K, c->N), sizeof *panels);
        for (int k = 0; k < c->K; k++)
            for (int j = 0; j < c->N; j++)
                panels[gemm_panel_offset(c->K, k, j)] = e.B[(size_t)k * e.ldb + j];
        run_gemm(c, &d);
        gemm_pack_a(c->trans_a, c->M, c->K, e.A, e.lda, packed);
        gemm_packed(c->M, c->N, c->K, packed, panels, e.C, e.ldc);
        CHECK(!memcmp(d.C, e.C, (size_t)c->M * d.ldc * sizeof(float)),
              "gemm_packed%s M=%d N=%d K=%d: gemm's result bit for bit, the gap untouched",
              c->trans_a ? " trans_a" : "", c->M, c->N, c->K);
        free(packed), free(panels);
        gemm_data_free(&d), gemm_data_free(&e);
    }
}

int main(void) {
    test_against_reference();
    test_packed();
    test_degenerate();
    test_thread_independence();
    test_stored_b();
    test_bf16();
    test_gradients();
    test_against_pytorch();
    return harness_finish("test_gemm");
}
