/* test_conv.c - conv2d_forward / conv2d_backward against a direct-loop reference, finite
 * differences, accumulation and thread-count independence, and PyTorch goldens. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../tensor.h"
#include "harness.h"

/* ---- sizes (the reference itself, conv2d_reference_*, is in tensor.c) ---------------------- */

static size_t x_count(const Conv2dShape *s) {
    return (size_t)s->batch * s->in_ch * s->in_h * s->in_w;
}
static size_t w_count(const Conv2dShape *s) {
    return (size_t)s->out_ch * (s->in_ch / s->groups) * s->kernel_h * s->kernel_w;
}
static size_t y_count(const Conv2dShape *s) {
    return (size_t)s->batch * s->out_ch * conv2d_out_h(s) * conv2d_out_w(s);
}

/* ---- test data ----------------------------------------------------------------------------- */

static float *random_array(size_t n, unsigned long long *state) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    for (size_t i = 0; i < n; i++) a[i] = harness_rand(state);
    return a;
}

static float *copy_array(const float *src, size_t n) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    memcpy(a, src, n * sizeof *a);
    return a;
}

static void describe(const Conv2dShape *s, char *buf, size_t len) {
    snprintf(buf, len, "B%d Cin%d %dx%d -> Cout%d k%dx%d s%d,%d p%d,%d g%d", s->batch, s->in_ch,
             s->in_h, s->in_w, s->out_ch, s->kernel_h, s->kernel_w, s->stride_h, s->stride_w,
             s->pad_h, s->pad_w, s->groups);
}

/* Float sums of n terms of size ~1 drift by about n float epsilons at worst; the reference sums
 * in double, so the absolute tolerance grows with the reduction length. */
static float sum_atol(int n) {
    return 1e-6f + 2e-7f * (float)n;
}

/* Winograd's transforms scale values by up to 8 before the products and cancel after them: on
 * these inputs its y and dx errors measured 1.1-1.9x sum_atol (0.3-1.3e-3 on values up to 108,
 * K = 1152-4608) where the direct sums stay well inside it; 4x leaves room without hiding a
 * wrong tap, transform or border (each moves values by 1e-1 or more). */
#define WINOGRAD_ATOL_SCALE 4.0f

/* The absolute tolerance of y (reduction length K) and of dx (dx_len) for shape s. */
static float y_atol(const Conv2dShape *s, int K) {
    return sum_atol(K) * (conv2d_is_winograd(s) ? WINOGRAD_ATOL_SCALE : 1.0f);
}

/* A conv per line: B, Cin, H, W, Cout, kh, kw, sh, sw, ph, pw, groups. */
static const Conv2dShape shapes[] = {
    {1, 1, 5, 5, 1, 1, 1, 1, 1, 0, 0, 1},     /* pointwise, one channel */
    {2, 3, 7, 9, 5, 1, 1, 1, 1, 0, 0, 1},     /* pointwise, odd sizes */
    {2, 4, 5, 6, 6, 1, 1, 1, 1, 0, 0, 2},     /* pointwise, grouped */
    {1, 2, 9, 8, 3, 1, 1, 2, 1, 0, 1, 1},     /* 1x1 with stride and padding: im2col path */
    {1, 1, 4, 5, 2, 1, 1, 1, 1, 3, 2, 1},     /* padding wider than the kernel */
    {1, 3, 17, 33, 7, 3, 3, 1, 1, 1, 1, 1},   /* VAE-like 3x3 pad 1 */
    {2, 3, 8, 7, 1, 3, 3, 1, 1, 1, 1, 1},     /* one output channel */
    {1, 1, 3, 3, 1, 3, 3, 1, 1, 3, 3, 1},     /* outputs that see only padding */
    {2, 4, 9, 11, 6, 3, 3, 2, 2, 1, 1, 2},    /* grouped, stride 2, odd input */
    {1, 3, 33, 17, 8, 7, 7, 4, 4, 3, 3, 1},   /* SegFormer patch embed 7x7 s4 p3 */
    {1, 5, 16, 16, 5, 2, 2, 2, 2, 0, 0, 1},   /* sr conv k = s = 2 */
    {2, 8, 32, 32, 8, 4, 4, 4, 4, 0, 0, 1},   /* sr conv k = s = 4 */
    {1, 2, 10, 10, 3, 2, 2, 4, 4, 0, 0, 1},   /* stride past the kernel: gaps */
    {1, 3, 11, 14, 4, 3, 5, 1, 2, 0, 2, 1},   /* asymmetric kernel, stride and padding */
    {1, 3, 7, 8, 6, 3, 3, 1, 1, 2, 0, 3},     /* groups == Cin with 2 outputs each */
    {1, 6, 13, 15, 6, 3, 3, 1, 1, 1, 1, 6},   /* depthwise 3x3 */
    {2, 5, 14, 11, 5, 3, 3, 2, 2, 1, 1, 5},   /* depthwise stride 2 */
    {1, 4, 10, 12, 4, 7, 7, 1, 1, 3, 3, 4},   /* depthwise 7x7 */
    {1, 3, 9, 10, 3, 3, 3, 2, 1, 0, 2, 3},    /* depthwise, asymmetric stride and padding */
    {1, 2, 3, 4, 2, 3, 3, 2, 2, 3, 3, 2},     /* depthwise, mostly padding */
    {1, 1, 6, 5, 1, 3, 3, 1, 1, 1, 1, 1},     /* one channel: depthwise and dense at once */
    {2, 256, 20, 30, 3, 3, 3, 1, 1, 1, 1, 1}, /* K = 2304: bands of 455 pixels, mid-row */
    {1, 64, 61, 59, 5, 5, 5, 2, 2, 2, 2, 1},  /* K = 1600, stride 2: two bands */
    {1, 512, 12, 41, 4, 3, 3, 1, 1, 1, 1, 2}, /* grouped, K = 2304 per group: bands */
    {2, 128, 10, 7, 128, 3, 3, 1, 1, 1, 1, 1},  /* Winograd: partial tiles both ways */
    {1, 128, 5, 13, 160, 3, 3, 1, 1, 1, 1, 1},  /* Winograd, Cout != Cin */
    {1, 256, 33, 9, 128, 3, 3, 1, 1, 1, 1, 1},  /* Winograd, tiles in several GEMM rounds */
    {1, 512, 6, 5, 256, 3, 3, 1, 1, 1, 1, 1},   /* Winograd, 512 channels in */
    {1, 128, 1, 1, 128, 3, 3, 1, 1, 1, 1, 1},   /* Winograd, one pixel: a tile of padding */
    {1, 127, 6, 5, 128, 3, 3, 1, 1, 1, 1, 1},   /* just below the Winograd threshold */
};
#define SHAPE_COUNT (sizeof shapes / sizeof shapes[0])

/* ---- forward and backward against the reference -------------------------------------------- */

static void test_against_reference(const Conv2dShape *s, unsigned long long *rng) {
    char name[128], what[192];
    describe(s, name, sizeof name);
    size_t nx = x_count(s), nw = w_count(s), ny = y_count(s);
    int K = s->in_ch / s->groups * s->kernel_h * s->kernel_w;
    int dx_len = s->out_ch / s->groups * s->kernel_h * s->kernel_w;
    int pixels_total = s->batch * conv2d_out_h(s) * conv2d_out_w(s);
    float *x = random_array(nx, rng), *w = random_array(nw, rng), *b = random_array(s->out_ch, rng);
    float *dy = random_array(ny, rng);
    float *y = malloc(ny * sizeof *y), *y_want = malloc(ny * sizeof *y_want);

    /* forward overwrites y: NaN already there must not leak */
    for (size_t i = 0; i < ny; i++) y[i] = NAN;
    conv2d_forward(s, x, w, b, y);
    conv2d_reference_forward(s, x, w, b, y_want);
    snprintf(what, sizeof what, "forward %s", name);
    check_close(what, y, y_want, ny, 1e-5f, y_atol(s, K));

    conv2d_forward(s, x, w, NULL, y);
    conv2d_reference_forward(s, x, w, NULL, y_want);
    snprintf(what, sizeof what, "forward without bias %s", name);
    check_close(what, y, y_want, ny, 1e-5f, y_atol(s, K));

    /* backward adds to whatever the gradient buffers hold */
    float *dx = random_array(nx, rng), *dw = random_array(nw, rng),
          *db = random_array(s->out_ch, rng);
    float *dx_want = copy_array(dx, nx), *dw_want = copy_array(dw, nw);
    float *db_want = copy_array(db, s->out_ch);
    conv2d_backward(s, x, w, dy, dx, dw, db);
    conv2d_reference_backward(s, x, w, dy, dx_want, dw_want, db_want);
    snprintf(what, sizeof what, "backward dx += %s", name);
    check_close(what, dx, dx_want, nx, 1e-5f, y_atol(s, dx_len));
    snprintf(what, sizeof what, "backward dw += %s", name);
    check_close(what, dw, dw_want, nw, 1e-5f, sum_atol(pixels_total));
    snprintf(what, sizeof what, "backward db += %s", name);
    check_close(what, db, db_want, s->out_ch, 1e-5f, sum_atol(pixels_total));

    free(x), free(w), free(b), free(dy), free(y), free(y_want);
    free(dx), free(dw), free(db), free(dx_want), free(dw_want), free(db_want);
}

/* Each gradient alone (the others NULL) equals its share of the full backward. */
static void test_null_gradients(const Conv2dShape *s, unsigned long long *rng) {
    char name[128], what[192];
    describe(s, name, sizeof name);
    size_t nx = x_count(s), nw = w_count(s), ny = y_count(s);
    float *x = random_array(nx, rng), *w = random_array(nw, rng), *dy = random_array(ny, rng);
    float *dx = calloc(nx, sizeof *dx), *dw = calloc(nw, sizeof *dw),
          *db = calloc(s->out_ch, sizeof *db);
    float *dx1 = calloc(nx, sizeof *dx1), *dw1 = calloc(nw, sizeof *dw1),
          *db1 = calloc(s->out_ch, sizeof *db1);
    conv2d_backward(s, x, w, dy, dx, dw, db);
    conv2d_backward(s, x, w, dy, dx1, NULL, NULL);
    conv2d_backward(s, x, w, dy, NULL, dw1, NULL);
    conv2d_backward(s, x, w, dy, NULL, NULL, db1);
    conv2d_backward(s, x, w, dy, NULL, NULL, NULL);
    snprintf(what, sizeof what, "backward with only dx, only dw, only db matches %s", name);
    CHECK(!memcmp(dx, dx1, nx * sizeof *dx) && !memcmp(dw, dw1, nw * sizeof *dw) &&
              !memcmp(db, db1, s->out_ch * sizeof *db),
          "%s", what);
    free(x), free(w), free(dy), free(dx), free(dw), free(db), free(dx1), free(dw1), free(db1);
}

/* ---- finite differences of loss = sum(y * r) ----------------------------------------------- */

typedef struct LossCtx {
    const Conv2dShape *s;
    const float *x, *w, *b, *r;
    float *y;
} LossCtx;

static double conv_loss(void *ctx) {
    LossCtx *c = ctx;
    conv2d_forward(c->s, c->x, c->w, c->b, c->y);
    double loss = 0.0;
    for (size_t i = 0, n = y_count(c->s); i < n; i++) loss += (double)c->y[i] * c->r[i];
    return loss;
}

/* The conv is linear in each of x, w, b, so central differences are exact up to the float
 * rounding of y, for any step; with eps 1e-2 that rounding is below 1e-4 of the gradient. The
 * wide (Winograd) conv's values are larger and rounded more coarsely (~3e-4): its step is 1. */
static void test_finite_differences(const Conv2dShape *s, unsigned long long *rng) {
    char name[128], what[192];
    describe(s, name, sizeof name);
    size_t nx = x_count(s), nw = w_count(s), ny = y_count(s);
    float *x = random_array(nx, rng), *w = random_array(nw, rng), *b = random_array(s->out_ch, rng);
    float *r = random_array(ny, rng), *y = malloc(ny * sizeof *y);
    float *dx = calloc(nx, sizeof *dx), *dw = calloc(nw, sizeof *dw),
          *db = calloc(s->out_ch, sizeof *db);
    conv2d_backward(s, x, w, r, dx, dw, db);
    LossCtx ctx = {s, x, w, b, r, y};
    bool wide = nx + nw > 20000;
    size_t x_stride = wide ? 37 : 1, w_stride = wide ? 1009 : 1; /* a sample of the wide conv's */
    float eps = wide ? 1.0f : 1e-2f;
    snprintf(what, sizeof what, "d/dx %s", name);
    check_gradient(what, conv_loss, &ctx, x, dx, nx, x_stride, eps, 1e-3f, 1e-3f);
    snprintf(what, sizeof what, "d/dw %s", name);
    check_gradient(what, conv_loss, &ctx, w, dw, nw, w_stride, eps, 1e-3f, 1e-3f);
    snprintf(what, sizeof what, "d/db %s", name);
    check_gradient(what, conv_loss, &ctx, b, db, s->out_ch, 1, eps, 1e-3f, 1e-3f);
    free(x), free(w), free(b), free(r), free(y), free(dx), free(dw), free(db);
}

static const Conv2dShape gradient_shapes[] = {
    {2, 3, 6, 7, 4, 3, 3, 1, 1, 1, 1, 1},   /* 3x3 pad 1 */
    {1, 2, 13, 11, 3, 7, 7, 4, 4, 3, 3, 1}, /* patch embed 7x7 s4 p3 */
    {1, 4, 8, 8, 4, 2, 2, 2, 2, 0, 0, 1},   /* sr conv k = s = 2 */
    {2, 4, 7, 9, 6, 3, 5, 2, 1, 1, 2, 2},   /* grouped, asymmetric */
    {2, 3, 5, 6, 5, 1, 1, 1, 1, 0, 0, 1},   /* pointwise */
    {2, 5, 9, 7, 5, 3, 3, 2, 2, 1, 1, 5},   /* depthwise stride 2, odd input */
    {1, 128, 5, 6, 128, 3, 3, 1, 1, 1, 1, 1}, /* Winograd (a sample of values differenced) */
};

/* ---- thread-count independence --------------------------------------------------------------- */

/* Forward and backward with `threads` threads; out receives y, dx, dw, db one after another
 * (the gradients start at zero). */
static void run_with_threads(int threads, const Conv2dShape *s, const float *x, const float *w,
                             const float *b, const float *dy, float *out) {
#ifdef _OPENMP
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    float *y = out, *dx = y + y_count(s), *dw = dx + x_count(s), *db = dw + w_count(s);
    memset(dx, 0, (x_count(s) + w_count(s) + (size_t)s->out_ch) * sizeof *dx);
    conv2d_forward(s, x, w, b, y);
    conv2d_backward(s, x, w, dy, dx, dw, db);
}

/* Big enough that every parallel loop (and the GEMM) really splits. */
static const Conv2dShape thread_shapes[] = {
    {2, 256, 20, 30, 3, 3, 3, 1, 1, 1, 1, 1},  /* banded */
    {1, 512, 12, 41, 4, 3, 3, 1, 1, 1, 1, 2},  /* banded, grouped */
    {2, 16, 33, 31, 16, 3, 3, 1, 1, 1, 1, 16}, /* depthwise */
    {2, 17, 29, 30, 17, 3, 3, 2, 2, 1, 1, 17}, /* depthwise, stride 2 */
    {1, 64, 32, 32, 48, 1, 1, 1, 1, 0, 0, 1},  /* pointwise */
    {2, 128, 37, 30, 128, 3, 3, 1, 1, 1, 1, 1}, /* Winograd: several GEMM rounds per image */
};

/* 2, 3 (an uneven split) and 8 threads (the forward's wider band: fewer, larger bands in the
 * banded shapes) give bitwise what 1 thread gives. */
static void test_thread_independence(const Conv2dShape *s, unsigned long long *rng) {
    char name[128];
    describe(s, name, sizeof name);
    size_t nx = x_count(s), nw = w_count(s), ny = y_count(s), nb = (size_t)s->out_ch;
    size_t n_out = ny + nx + nw + nb;
    float *x = random_array(nx, rng), *w = random_array(nw, rng), *b = random_array(nb, rng);
    float *dy = random_array(ny, rng);
    float *one = malloc(n_out * sizeof *one), *more = malloc(n_out * sizeof *more);
    run_with_threads(1, s, x, w, b, dy, one);
    const int thread_counts[] = {2, 3, 8};
    for (size_t t = 0; t < sizeof thread_counts / sizeof *thread_counts; t++) {
        int threads = thread_counts[t];
        run_with_threads(threads, s, x, w, b, dy, more);
        CHECK(!memcmp(one, more, n_out * sizeof *one),
              "1 and %d threads give bitwise the same y, dx, dw, db: %s", threads, name);
    }
#ifdef _OPENMP
    omp_set_num_threads(omp_get_num_procs());
#endif
    free(x), free(w), free(b), free(dy), free(one), free(more);
}

/* ---- PyTorch goldens (tools/golden_conv.py, computed in float64) ---------------------------- */

static const char *golden_cases[] = {
    "vae_3x3",    "patch_embed_7x7_s4", "sr_k2_s2",         "sr_k4_s4",
    "sr_k8_s8",   "depthwise_3x3",      "depthwise_3x3_s2", "pointwise_nobias",
    "grouped_s2", "asymmetric",         "banded_5x5",       "winograd_3x3",
};

/* NAME.key of the golden file as floats, or NULL (reported) when absent or of another size. */
static float *golden_tensor(const SafeTensors *st, const char *name, const char *key, size_t n) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", name, key);
    return golden_load(st, full, n);
}

static void test_golden_case(const SafeTensors *st, const char *name) {
    char what[160];
    float *dims = golden_tensor(st, name, "shape", 12);
    if (!dims) return;
    Conv2dShape s = {.batch = (int)dims[0], .in_ch = (int)dims[1], .in_h = (int)dims[2],
                     .in_w = (int)dims[3], .out_ch = (int)dims[4], .kernel_h = (int)dims[5],
                     .kernel_w = (int)dims[6], .stride_h = (int)dims[7], .stride_w = (int)dims[8],
                     .pad_h = (int)dims[9], .pad_w = (int)dims[10], .groups = (int)dims[11]};
    free(dims);
    char bias_name[128];
    snprintf(bias_name, sizeof bias_name, "%s.b", name);
    bool bias = st_find(st, bias_name) != NULL;
    size_t nx = x_count(&s), nw = w_count(&s), ny = y_count(&s), nb = (size_t)s.out_ch;
    float *x = golden_tensor(st, name, "x", nx), *w = golden_tensor(st, name, "w", nw);
    float *dy = golden_tensor(st, name, "dy", ny), *y_want = golden_tensor(st, name, "y", ny);
    float *dx_want = golden_tensor(st, name, "dx", nx),
          *dw_want = golden_tensor(st, name, "dw", nw);
    float *b = bias ? golden_tensor(st, name, "b", nb) : NULL;
    float *db_want = bias ? golden_tensor(st, name, "db", nb) : NULL;
    float *y = malloc(ny * sizeof *y), *dx = calloc(nx, sizeof *dx), *dw = calloc(nw, sizeof *dw);
    float *db = calloc(nb, sizeof *db);
    if (x && w && dy && y_want && dx_want && dw_want && (!bias || (b && db_want))) {
        int pixels_total = s.batch * conv2d_out_h(&s) * conv2d_out_w(&s);
        conv2d_forward(&s, x, w, b, y);
        conv2d_backward(&s, x, w, dy, dx, dw, bias ? db : NULL);
        snprintf(what, sizeof what, "golden %s y", name);
        check_close(what, y, y_want, ny, 1e-5f,
                    y_atol(&s, s.in_ch / s.groups * s.kernel_h * s.kernel_w));
        snprintf(what, sizeof what, "golden %s dx", name);
        check_close(what, dx, dx_want, nx, 1e-5f,
                    y_atol(&s, s.out_ch / s.groups * s.kernel_h * s.kernel_w));
        snprintf(what, sizeof what, "golden %s dw", name);
        check_close(what, dw, dw_want, nw, 1e-5f, sum_atol(pixels_total));
        if (bias) {
            snprintf(what, sizeof what, "golden %s db", name);
            check_close(what, db, db_want, nb, 1e-5f, sum_atol(pixels_total));
        }
    }
    free(x), free(w), free(dy), free(y_want), free(dx_want), free(dw_want), free(b), free(db_want);
    free(y), free(dx), free(dw), free(db);
}

static void test_golden(void) {
    SafeTensors *st = golden_open("tests/golden/conv.safetensors");
    if (!st) return;
    for (size_t i = 0; i < sizeof golden_cases / sizeof golden_cases[0]; i++)
        test_golden_case(st, golden_cases[i]);
    st_close(st);
}

/* ---- shapes and sizes -------------------------------------------------------------------------
 */

/* The VAE's 3x3 convs take Winograd, the embedded models' and every other shape the direct sum. */
static void test_winograd_choice(void) {
    CHECK(conv2d_is_winograd(&(Conv2dShape){1, 512, 64, 64, 512, 3, 3, 1, 1, 1, 1, 1}) &&
              conv2d_is_winograd(&(Conv2dShape){1, 256, 512, 512, 128, 3, 3, 1, 1, 1, 1, 1}),
          "the FLUX.2 VAE's 3x3 convs take Winograd");
    CHECK(!conv2d_is_winograd(&(Conv2dShape){1, 64, 32, 16, 64, 3, 3, 1, 1, 1, 1, 1}) &&
              !conv2d_is_winograd(&(Conv2dShape){1, 128, 8, 8, 128, 3, 3, 2, 2, 1, 1, 1}) &&
              !conv2d_is_winograd(&(Conv2dShape){1, 128, 8, 8, 128, 3, 3, 1, 1, 0, 0, 1}) &&
              !conv2d_is_winograd(&(Conv2dShape){1, 128, 8, 8, 128, 3, 3, 1, 1, 1, 1, 2}) &&
              !conv2d_is_winograd(&(Conv2dShape){1, 128, 8, 8, 128, 1, 1, 1, 1, 0, 0, 1}),
          "narrow, strided, unpadded, grouped and 1x1 convs take the direct sum");
}

static void test_output_sizes(void) {
    Conv2dShape s = {1, 1, 7, 6, 1, 3, 2, 2, 4, 1, 0, 1};
    CHECK(conv2d_out_h(&s) == 4 && conv2d_out_w(&s) == 2,
          "out size (7+2-3)/2+1 = 4, (6-2)/4+1 = 2");
    Conv2dShape tiny = {1, 1, 1, 1, 1, 3, 3, 1, 1, 0, 0, 1};
    CHECK(conv2d_out_h(&tiny) == 0 && conv2d_out_w(&tiny) == 0,
          "kernel larger than the padded input gives an empty output");
    float y = 1.0f;
    conv2d_forward(&tiny, &y, &y, NULL, &y);
    CHECK(y == 1.0f, "an empty output writes nothing");
}

int main(void) {
    unsigned long long rng = 12345;
    test_output_sizes();
    test_winograd_choice();
    for (size_t i = 0; i < SHAPE_COUNT; i++) test_against_reference(&shapes[i], &rng);
    for (size_t i = 0; i < sizeof gradient_shapes / sizeof gradient_shapes[0]; i++) {
        test_finite_differences(&gradient_shapes[i], &rng);
        test_null_gradients(&gradient_shapes[i], &rng);
    }
    for (size_t i = 0; i < sizeof thread_shapes / sizeof thread_shapes[0]; i++)
        test_thread_independence(&thread_shapes[i], &rng);
    test_golden();
    return harness_finish("test_conv");
}
