/* test_attention.c - blocked attention and RoPE against a naive double-precision reference,
 * finite differences, PyTorch golden data, accumulation, thread-count independence.
 *
 * Memory: attention_forward/backward allocate only per-thread scratch of
 * O(block * head_dim) floats (see ATTN_BLOCK in tensor.c), and backward B*H*Nq floats of row
 * dots; nothing proportional to Nq * Nk. Only the naive reference here keeps a row of Nk
 * scores. */
#include <stdint.h>

#include "../tensor.h"
#include "harness.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- shapes and buffers ---- */

typedef struct Case {
    const char *name;
    int batch, heads, kv_heads, q_len, kv_len, head_dim;
    bool causal;
    const int *kv_valid;
    float q_gain; /* larger queries give sharper softmax rows */
    float tol;    /* multiplies the reference tolerances: float32 scores round to ~1e-7 of |logit|,
                   * so huge logits (hundreds) earn a wider atol */
} Case;

typedef struct Buffers {
    size_t nq, nk, nlse; /* element counts of q-shaped, k-shaped and lse arrays */
    float *q, *k, *v, *dout, *out, *lse, *dq, *dk, *dv;
} Buffers;

static AttentionShape case_shape(const Case *c) {
    return (AttentionShape){.batch = c->batch, .heads = c->heads, .kv_heads = c->kv_heads,
                            .q_len = c->q_len, .kv_len = c->kv_len, .head_dim = c->head_dim,
                            .causal = c->causal, .kv_valid = c->kv_valid};
}

static float case_scale(const Case *c) { return 1.0f / sqrtf((float)c->head_dim); }

static void fill(float *x, size_t n, float gain, unsigned long long *rng) {
    for (size_t i = 0; i < n; i++) x[i] = gain * harness_rand(rng);
}

static Buffers buffers_new(const Case *c, unsigned long long seed) {
    Buffers b;
    b.nq = (size_t)c->batch * c->q_len * c->heads * c->head_dim;
    b.nk = (size_t)c->batch * c->kv_len * c->kv_heads * c->head_dim;
    b.nlse = (size_t)c->batch * c->heads * c->q_len;
    float **q_like[] = {&b.q, &b.dout, &b.out, &b.dq}, **k_like[] = {&b.k, &b.v, &b.dk, &b.dv};
    for (int i = 0; i < 4; i++) *q_like[i] = calloc(b.nq + 1, sizeof(float));
    for (int i = 0; i < 4; i++) *k_like[i] = calloc(b.nk + 1, sizeof(float));
    b.lse = calloc(b.nlse + 1, sizeof(float));
    unsigned long long rng = seed;
    fill(b.q, b.nq, c->q_gain, &rng);
    fill(b.k, b.nk, 1.0f, &rng);
    fill(b.v, b.nk, 1.0f, &rng);
    fill(b.dout, b.nq, 1.0f, &rng);
    return b;
}

static void buffers_free(Buffers *b) {
    float *all[] = {b->q, b->k, b->v, b->dout, b->out, b->lse, b->dq, b->dk, b->dv};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

/* lse may hold -inf (rows that see no key): the -inf pattern must match exactly, the finite
 * values within tolerance. */
static void check_lse(const char *what, const float *got, const float *want, size_t n, float rtol,
                      float atol) {
    float *g = malloc((n + 1) * sizeof *g), *w = malloc((n + 1) * sizeof *w);
    size_t pattern_mismatch = 0;
    for (size_t i = 0; i < n; i++) {
        bool g_inf = isinf(got[i]) && got[i] < 0, w_inf = isinf(want[i]) && want[i] < 0;
        pattern_mismatch += g_inf != w_inf;
        g[i] = g_inf ? 0.0f : got[i];
        w[i] = w_inf ? 0.0f : want[i];
    }
    CHECK(pattern_mismatch == 0, "%s: -inf rows match (%zu mismatches)", what, pattern_mismatch);
    check_close(what, g, w, n, rtol, atol);
    free(g);
    free(w);
}

/* ---- forward and backward against the reference ---- */

static void test_against_reference(const Case *c) {
    AttentionShape s = case_shape(c);
    float scale = case_scale(c);
    Buffers b = buffers_new(c, 1234 + (unsigned long long)c->q_len * 7 + c->head_dim);
    float *out = malloc((b.nq + 1) * sizeof *out), *lse = malloc((b.nlse + 1) * sizeof *lse);
    float *dq = malloc((b.nq + 1) * sizeof *dq), *dk = malloc((b.nk + 1) * sizeof *dk),
          *dv = malloc((b.nk + 1) * sizeof *dv);
    attention_reference(&s, scale, b.q, b.k, b.v, b.dout, out, lse, dq, dk, dv);
    attention_forward(&s, scale, b.q, b.k, b.v, b.out, b.lse);
    attention_backward(&s, scale, b.q, b.k, b.v, b.out, b.lse, b.dout, b.dq, b.dk, b.dv);
    char what[160];
    /* float32 sums of <= 200 terms of size <= ~1 against double: a few 1e-7 absolute */
    float tol = c->tol > 0.0f ? c->tol : 1.0f;
    snprintf(what, sizeof what, "%s out", c->name);
    check_close(what, b.out, out, b.nq, 1e-5f, 2e-6f * tol);
    snprintf(what, sizeof what, "%s lse", c->name);
    check_lse(what, b.lse, lse, b.nlse, 1e-5f, 2e-6f * tol);
    const char *names[] = {"dq", "dk", "dv"};
    const float *got[] = {b.dq, b.dk, b.dv}, *want[] = {dq, dk, dv};
    size_t counts[] = {b.nq, b.nk, b.nk};
    for (int i = 0; i < 3; i++) {
        snprintf(what, sizeof what, "%s %s", c->name, names[i]);
        check_close(what, got[i], want[i], counts[i], 1e-4f, 1e-5f * tol);
    }
    free(out);
    free(lse);
    free(dq);
    free(dk);
    free(dv);
    buffers_free(&b);
}

static void test_reference_shapes(void) {
    static const int one_padded[] = {0, 45}, mixed_valid[] = {100, 67}, short_valid[] = {3, 17};
    const Case cases[] = {
        {"single", 1, 1, 1, 1, 1, 4, false, NULL, 1.0f, 1.0f},
        {"n3 d8", 1, 2, 2, 3, 3, 8, false, NULL, 1.0f, 1.0f},
        {"n17 d32 batch2", 2, 2, 2, 17, 17, 32, false, NULL, 1.0f, 1.0f},
        {"n65 d64", 1, 1, 1, 65, 65, 64, false, NULL, 1.0f, 1.0f},
        {"n130 d128", 1, 2, 2, 130, 130, 128, false, NULL, 1.0f, 1.0f},
        {"n130 d128 sharp", 1, 1, 1, 130, 130, 128, false, NULL, 8.0f, 1.0f},
        {"n200 d16 huge logits", 1, 2, 2, 200, 200, 16, true, NULL, 60.0f, 10.0f},
        {"cross 65x17 d12", 1, 2, 2, 65, 17, 12, false, NULL, 1.0f, 1.0f},
        {"cross 3x130 d5", 2, 1, 1, 3, 130, 5, false, short_valid, 1.0f, 1.0f},
        {"gqa 4/2 70x33", 2, 4, 2, 70, 33, 32, false, NULL, 1.0f, 1.0f},
        {"mqa 4/1 causal", 1, 4, 1, 40, 40, 64, true, NULL, 2.0f, 1.0f},
        {"causal q<k", 1, 2, 2, 20, 70, 32, true, NULL, 1.0f, 1.0f},
        {"causal q>k (empty rows)", 1, 1, 1, 70, 20, 8, true, NULL, 1.0f, 1.0f},
        {"causal n200", 1, 1, 1, 200, 200, 32, true, NULL, 1.0f, 1.0f},
        {"padded, one batch row empty", 2, 2, 2, 30, 70, 32, false, one_padded, 1.0f, 1.0f},
        {"padded causal gqa d12", 2, 4, 2, 100, 100, 12, true, mixed_valid, 1.0f, 1.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) test_against_reference(&cases[i]);
}

/* ---- finite differences of the backward ---- */

typedef struct LossCtx {
    AttentionShape s;
    float scale;
    Buffers *b;
    const float *weights; /* loss = sum(out * weights); weights is also dout */
} LossCtx;

static double attention_loss(void *ctx) {
    LossCtx *l = ctx;
    attention_forward(&l->s, l->scale, l->b->q, l->b->k, l->b->v, l->b->out, l->b->lse);
    double loss = 0.0;
    for (size_t i = 0; i < l->b->nq; i++) loss += (double)l->b->out[i] * l->weights[i];
    return loss;
}

static void test_finite_differences(const Case *c) {
    Buffers b = buffers_new(c, 99);
    LossCtx l = {case_shape(c), case_scale(c), &b, b.dout};
    attention_forward(&l.s, l.scale, b.q, b.k, b.v, b.out, b.lse);
    attention_backward(&l.s, l.scale, b.q, b.k, b.v, b.out, b.lse, b.dout, b.dq, b.dk, b.dv);
    char what[160];
    /* float32 forward, eps 1e-2: truncation ~eps^2 and loss rounding ~1e-7 |loss| / eps; the
     * worst seen is ~1e-5, so rtol 1e-3 + atol 1e-4 leaves a margin of about ten */
    snprintf(what, sizeof what, "%s dq", c->name);
    check_gradient(what, attention_loss, &l, b.q, b.dq, b.nq, 1, 1e-2f, 1e-3f, 1e-4f);
    snprintf(what, sizeof what, "%s dk", c->name);
    check_gradient(what, attention_loss, &l, b.k, b.dk, b.nk, 1, 1e-2f, 1e-3f, 1e-4f);
    snprintf(what, sizeof what, "%s dv", c->name);
    check_gradient(what, attention_loss, &l, b.v, b.dv, b.nk, 1, 1e-2f, 1e-3f, 1e-4f);
    buffers_free(&b);
}

static void test_gradients(void) {
    static const int valid[] = {5, 2};
    const Case cases[] = {
        {"fd plain", 1, 1, 1, 5, 7, 4, false, NULL, 1.0f, 1.0f},
        {"fd causal gqa", 1, 4, 2, 6, 6, 8, true, NULL, 1.0f, 1.0f},
        {"fd causal q>k padded", 2, 2, 1, 7, 5, 3, true, valid, 1.0f, 1.0f},
        {"fd two blocks", 1, 1, 1, 70, 66, 4, true, NULL, 1.0f, 1.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) test_finite_differences(&cases[i]);
}

/* ---- accumulation and NULL gradients ---- */

static void test_accumulation(void) {
    static const int valid[] = {50, 20};
    const Case c = {"accumulate", 2, 4, 2, 37, 50, 16, true, valid, 1.0f, 1.0f};
    AttentionShape s = case_shape(&c);
    float scale = case_scale(&c);
    Buffers b = buffers_new(&c, 7);
    attention_forward(&s, scale, b.q, b.k, b.v, b.out, b.lse);
    attention_backward(&s, scale, b.q, b.k, b.v, b.out, b.lse, b.dout, b.dq, b.dk, b.dv);

    float *prior[3], *sum[3];
    const float *fresh[] = {b.dq, b.dk, b.dv};
    size_t counts[] = {b.nq, b.nk, b.nk};
    unsigned long long rng = 5;
    for (int i = 0; i < 3; i++) {
        prior[i] = malloc((counts[i] + 1) * sizeof(float));
        sum[i] = malloc((counts[i] + 1) * sizeof(float));
        fill(prior[i], counts[i], 1.0f, &rng);
        for (size_t j = 0; j < counts[i]; j++) sum[i][j] = prior[i][j] + fresh[i][j];
    }
    attention_backward(&s, scale, b.q, b.k, b.v, b.out, b.lse, b.dout, prior[0], prior[1], prior[2]);
    check_close("dq accumulates", prior[0], sum[0], b.nq, 0.0f, 0.0f);
    check_close("dk accumulates", prior[1], sum[1], b.nk, 0.0f, 0.0f);
    check_close("dv accumulates", prior[2], sum[2], b.nk, 0.0f, 0.0f);

    /* each gradient alone, the others NULL, equals the one from the full call */
    for (int i = 0; i < 3; i++) {
        memset(prior[i], 0, counts[i] * sizeof(float));
        attention_backward(&s, scale, b.q, b.k, b.v, b.out, b.lse, b.dout, i == 0 ? prior[0] : NULL,
                           i == 1 ? prior[1] : NULL, i == 2 ? prior[2] : NULL);
        const char *names[] = {"dq alone", "dk alone", "dv alone"};
        check_close(names[i], prior[i], fresh[i], counts[i], 0.0f, 0.0f);
    }
    for (int i = 0; i < 3; i++) {
        free(prior[i]);
        free(sum[i]);
    }
    buffers_free(&b);
}

/* ---- the thread count never changes a bit ---- */

static void test_thread_independence(void) {
#ifdef _OPENMP
    static const int valid[] = {150, 99};
    const Case c = {"threads", 2, 4, 2, 150, 150, 32, true, valid, 1.0f, 1.0f};
    AttentionShape s = case_shape(&c);
    float scale = case_scale(&c);
    Buffers runs[3];
    int threads[] = {1, 2, 3}, saved = omp_get_max_threads();
    for (int r = 0; r < 3; r++) {
        runs[r] = buffers_new(&c, 11);
        omp_set_num_threads(threads[r]);
        attention_forward(&s, scale, runs[r].q, runs[r].k, runs[r].v, runs[r].out, runs[r].lse);
        attention_backward(&s, scale, runs[r].q, runs[r].k, runs[r].v, runs[r].out, runs[r].lse,
                           runs[r].dout, runs[r].dq, runs[r].dk, runs[r].dv);
    }
    omp_set_num_threads(saved);
    for (int r = 1; r < 3; r++) {
        Buffers *a = &runs[0], *b = &runs[r];
        bool same = !memcmp(a->out, b->out, a->nq * sizeof(float)) &&
                    !memcmp(a->lse, b->lse, a->nlse * sizeof(float)) &&
                    !memcmp(a->dq, b->dq, a->nq * sizeof(float)) &&
                    !memcmp(a->dk, b->dk, a->nk * sizeof(float)) &&
                    !memcmp(a->dv, b->dv, a->nk * sizeof(float));
        CHECK(same, "1 and %d threads give bitwise identical out, lse, dq, dk, dv", threads[r]);
    }
    for (int r = 0; r < 3; r++) buffers_free(&runs[r]);
#endif
}

/* ---- rows that see no key ---- */

static void test_empty_rows_finite(void) {
    static const int valid[] = {0};
    const Case c = {"all padded", 1, 2, 1, 9, 12, 8, false, valid, 1.0f, 1.0f};
    AttentionShape s = case_shape(&c);
    Buffers b = buffers_new(&c, 3);
    attention_forward(&s, 1.0f, b.q, b.k, b.v, b.out, b.lse);
    attention_backward(&s, 1.0f, b.q, b.k, b.v, b.out, b.lse, b.dout, b.dq, b.dk, b.dv);
    bool zero = true, neg_inf = true;
    for (size_t i = 0; i < b.nq; i++) zero &= b.out[i] == 0.0f && b.dq[i] == 0.0f;
    for (size_t i = 0; i < b.nk; i++) zero &= b.dk[i] == 0.0f && b.dv[i] == 0.0f;
    for (size_t i = 0; i < b.nlse; i++) neg_inf &= isinf(b.lse[i]) && b.lse[i] < 0;
    CHECK(zero, "no visible key: out and all gradients are exactly 0 (no NaN)");
    CHECK(neg_inf, "no visible key: lse is -inf");
    buffers_free(&b);
}

/* ---- RoPE ---- */

typedef struct RopeCtx {
    RopePairs pairs;
    int batch, n, heads, dim;
    const float *cos, *sin, *weights;
    float *x, *y;
} RopeCtx;

static double rope_loss(void *ctx) {
    RopeCtx *r = ctx;
    rope_forward(r->pairs, r->batch, r->n, r->heads, r->dim, r->cos, r->sin, r->x, r->y);
    double loss = 0.0;
    for (size_t i = 0; i < (size_t)r->batch * r->n * r->heads * r->dim; i++) loss += (double)r->y[i] * r->weights[i];
    return loss;
}

static void test_rope(RopePairs pairs, int dim) {
    int batch = 2, n = 5, heads = 3, half = dim / 2;
    size_t count = (size_t)batch * n * heads * dim;
    float *cos_t = malloc(n * half * sizeof(float) + 4), *sin_t = malloc(n * half * sizeof(float) + 4);
    float *x = malloc(count * sizeof(float)), *y = malloc(count * sizeof(float)),
          *w = malloc(count * sizeof(float)), *dx = calloc(count, sizeof(float)),
          *back = calloc(count, sizeof(float)), *want = malloc(count * sizeof(float));
    for (int t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            double angle = t * pow(10000.0, -2.0 * i / dim);
            cos_t[t * half + i] = (float)cos(angle);
            sin_t[t * half + i] = (float)sin(angle);
        }
    unsigned long long rng = 21;
    fill(x, count, 1.0f, &rng);
    fill(w, count, 1.0f, &rng);

    /* the definition, pair by pair: (x_a + i x_b) e^{i theta}, (a, b) = (2i, 2i+1) or (i,
     * i + D/2); an odd last element passes */
    for (size_t row = 0; row < (size_t)batch * n * heads; row++) {
        const float *xr = x + row * dim;
        float *wr = want + row * dim;
        int t = (int)(row / heads % n);
        for (int i = 0; i < half; i++) {
            double c = cos_t[t * half + i], s = sin_t[t * half + i];
            int a = pairs == ROPE_HALVES ? i : 2 * i, b = pairs == ROPE_HALVES ? i + half : 2 * i + 1;
            wr[a] = (float)(xr[a] * c - xr[b] * s);
            wr[b] = (float)(xr[a] * s + xr[b] * c);
        }
        if (dim % 2) wr[dim - 1] = xr[dim - 1];
    }
    char what[96];
    const char *kind = pairs == ROPE_HALVES ? "halves" : "adjacent";
    rope_forward(pairs, batch, n, heads, dim, cos_t, sin_t, x, y);
    snprintf(what, sizeof what, "rope %s d%d forward", kind, dim);
    check_close(what, y, want, count, 1e-6f, 1e-6f);

    /* rotating back recovers x: backward is R^T, and R^T R = I */
    memset(back, 0, count * sizeof(float));
    rope_backward(pairs, batch, n, heads, dim, cos_t, sin_t, y, back);
    snprintf(what, sizeof what, "rope %s d%d backward inverts forward", kind, dim);
    check_close(what, back, x, count, 1e-6f, 1e-6f);

    memcpy(back, x, count * sizeof(float));
    rope_forward(pairs, batch, n, heads, dim, cos_t, sin_t, back, back);
    snprintf(what, sizeof what, "rope %s d%d in place equals out of place", kind, dim);
    check_close(what, back, y, count, 0.0f, 0.0f);

    rope_backward(pairs, batch, n, heads, dim, cos_t, sin_t, w, dx);
    RopeCtx ctx = {pairs, batch, n, heads, dim, cos_t, sin_t, w, x, y};
    snprintf(what, sizeof what, "rope %s d%d dx", kind, dim);
    check_gradient(what, rope_loss, &ctx, x, dx, count, 1, 1e-2f, 1e-3f, 1e-4f);

    float *float_arrays[] = {cos_t, sin_t, x, y, w, dx, back, want};
    for (size_t i = 0; i < sizeof float_arrays / sizeof *float_arrays; i++) free(float_arrays[i]);
}

/* ---- PyTorch golden data (tools/golden_attention.py) ---- */

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

static float *load(const SafeTensors *st, const char *prefix, const char *key, size_t n) {
    char name[128];
    snprintf(name, sizeof name, "%s.%s", prefix, key);
    return golden_load(st, name, n);
}

static void test_golden_attention(const SafeTensors *st, const char *name) {
    float *config = load(st, name, "config", 8);
    if (!config) return;
    int B = (int)config[0], kv_valid[8];
    Case c = {name, B, (int)config[1], (int)config[2], (int)config[3], (int)config[4],
              (int)config[5], config[6] != 0.0f, kv_valid, 1.0f, 1.0f};
    float scale = config[7], *valid = B <= 8 ? load(st, name, "kv_valid", (size_t)B) : NULL;
    CHECK(valid != NULL, "%s: kv_valid for %d batch rows", name, B);
    free(config);
    if (!valid) return;
    for (int i = 0; i < B; i++) kv_valid[i] = (int)valid[i];
    free(valid);

    AttentionShape s = case_shape(&c);
    Buffers b = buffers_new(&c, 1);
    float *in[] = {b.q, b.k, b.v, b.dout};
    const char *in_names[] = {"q", "k", "v", "dout"};
    size_t in_counts[] = {b.nq, b.nk, b.nk, b.nq};
    const char *want_names[] = {"out", "dq", "dk", "dv"};
    const float *got[] = {b.out, b.dq, b.dk, b.dv};
    size_t want_counts[] = {b.nq, b.nq, b.nk, b.nk};
    bool loaded = true;
    for (int i = 0; i < 4; i++) {
        float *t = load(st, name, in_names[i], in_counts[i]);
        if (t) memcpy(in[i], t, in_counts[i] * sizeof(float));
        loaded &= t != NULL;
        free(t);
    }
    if (loaded) {
        attention_forward(&s, scale, b.q, b.k, b.v, b.out, b.lse);
        attention_backward(&s, scale, b.q, b.k, b.v, b.out, b.lse, b.dout, b.dq, b.dk, b.dv);
        char what[160];
        float *lse = load(st, name, "lse", b.nlse);
        snprintf(what, sizeof what, "golden %s lse", name);
        if (lse) check_lse(what, b.lse, lse, b.nlse, 1e-5f, 1e-5f);
        free(lse);
        for (int i = 0; i < 4; i++) {
            float *want = load(st, name, want_names[i], want_counts[i]);
            snprintf(what, sizeof what, "golden %s %s", name, want_names[i]);
            /* rtol 1e-5, and atol 1e-5 of the tensor's largest value: a small entry that is a
             * sum of cancelling terms carries the rounding of its largest terms (self_sharp's
             * dk entries of ~0.02 are sums of terms near 10) */
            if (want)
                check_close(what, got[i], want, want_counts[i], 1e-5f,
                            1e-5f * fmaxf(1.0f, max_abs(want, want_counts[i])));
            free(want);
        }
    }
    buffers_free(&b);
}

/* name: "rope" (FLUX's adjacent pairs) or "rope_halves" (Qwen's) */
static void test_golden_rope(const SafeTensors *st, const char *name, RopePairs pairs) {
    float *config = load(st, name, "config", 4);
    if (!config) return;
    int batch = (int)config[0], n = (int)config[1], heads = (int)config[2], dim = (int)config[3];
    free(config);
    size_t count = (size_t)batch * n * heads * dim, table = (size_t)n * (dim / 2);
    float *x = load(st, name, "x", count), *cos_t = load(st, name, "cos", table),
          *sin_t = load(st, name, "sin", table), *dy = load(st, name, "dy", count),
          *y_want = load(st, name, "y", count), *dx_want = load(st, name, "dx", count);
    if (x && cos_t && sin_t && dy && y_want && dx_want) {
        float *y = malloc(count * sizeof *y), *dx = calloc(count, sizeof *dx);
        char what[64];
        rope_forward(pairs, batch, n, heads, dim, cos_t, sin_t, x, y);
        rope_backward(pairs, batch, n, heads, dim, cos_t, sin_t, dy, dx);
        snprintf(what, sizeof what, "golden %s y", name);
        check_close(what, y, y_want, count, 1e-5f, 1e-6f);
        snprintf(what, sizeof what, "golden %s dx", name);
        check_close(what, dx, dx_want, count, 1e-5f, 1e-6f);
        free(y);
        free(dx);
    }
    float *all[] = {x, cos_t, sin_t, dy, y_want, dx_want};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

static void test_golden(void) {
    SafeTensors *st = golden_open("tests/golden/attention.safetensors");
    if (!st) return;
    const char *cases[] = {"gqa_causal_padded", "cross_reduced", "mqa_causal_long_kv", "self_sharp",
                           "empty_rows"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) test_golden_attention(st, cases[i]);
    test_golden_rope(st, "rope", ROPE_ADJACENT);
    test_golden_rope(st, "rope_halves", ROPE_HALVES);
    st_close(st);
}

int main(void) {
    test_reference_shapes();
    test_gradients();
    test_accumulation();
    test_thread_independence();
    test_empty_rows_finite();
    test_rope(ROPE_ADJACENT, 16);
    test_rope(ROPE_ADJACENT, 7);
    test_rope(ROPE_HALVES, 16);
    test_rope(ROPE_HALVES, 7);
    test_golden();
    return harness_finish("test_attention");
}
