/* test_ops.c - norms, activations, resampling and elementwise kernels of tensor.c.
 *
 * Three kinds of check:
 *   1. finite differences: every backward against central differences of its forward, with the
 *      loss sum(y * r) for a fixed random r (so r is the upstream gradient);
 *   2. PyTorch: outputs and gradients against tests/golden/ops.safetensors, written by
 *      tools/golden_ops.py (float64 torch unless noted). Every backward runs twice into zeroed
 *      gradients and is halved before the comparison, which also checks that it accumulates;
 *   3. thread-count independence: the reductions give the same bits on 1 and 2 threads. */
#include "../tensor.h"
#include "harness.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define GOLDEN_PATH "tests/golden/ops.safetensors"

/* Against float64 PyTorch: float32 rounding of O(1) values, plus cancellation in sums. */
#define GOLDEN_RTOL 1e-5f
#define GOLDEN_ATOL 1e-6f
/* Against float32 PyTorch (resize): the output to a few ulps; the input gradient is a float32
 * sum of up to ~100 terms of either sign, added in another order than torch's. */
#define RESIZE_RTOL 1e-6f
#define RESIZE_ATOL 1e-6f
#define RESIZE_GRAD_RTOL 1e-5f
#define RESIZE_GRAD_ATOL 2e-5f
/* Finite differences of a float32 forward with step FD_EPS: O(eps^2) truncation plus the loss's
 * own rounding divided by 2 eps. */
#define FD_EPS 1e-2f
#define FD_RTOL 1e-2f
#define FD_ATOL 1e-3f

static float *rand_array(size_t n, float scale, float offset, unsigned long long *seed) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    for (size_t i = 0; i < n; i++) a[i] = offset + scale * harness_rand(seed);
    return a;
}

static float *zeros(size_t n) {
    return calloc(n ? n : 1, sizeof(float));
}

static void halve(size_t n, float *a) {
    if (!a) return;
    for (size_t i = 0; i < n; i++) a[i] *= 0.5f;
}

/* ---- finite differences ---------------------------------------------------------------- */

/* One problem: forward() fills out[n_out] from the buffers in `in`; the loss is sum(out * r). */
typedef struct Problem Problem;
struct Problem {
    void (*forward)(Problem *p);
    int d[6];         /* sizes, as each op names them */
    float k[2];       /* scalars: eps, exponent, bounds */
    float step;       /* finite-difference step; 0 means FD_EPS */
    float *in[3];     /* x, w, b (or a, b) */
    float *saved[2];  /* statistics the forward saves */
    float *out, *r;
    size_t n_out;
};

static double problem_loss(void *ctx) {
    Problem *p = ctx;
    p->forward(p);
    double s = 0.0;
    for (size_t i = 0; i < p->n_out; i++) s += (double)p->out[i] * p->r[i];
    return s;
}

/* Checks grad against finite differences of input x (n values) of p, at most ~100 points. */
static void fd_check(const char *what, Problem *p, float *x, const float *grad, size_t n) {
    size_t stride = n > 100 ? n / 100 : 1;
    float step = p->step > 0.0f ? p->step : FD_EPS;
    check_gradient(what, problem_loss, p, x, grad, n, stride, step, FD_RTOL, FD_ATOL);
}

/* Sets up p->out and p->r for n_out outputs. */
static void problem_outputs(Problem *p, size_t n_out, unsigned long long *seed) {
    p->n_out = n_out;
    p->out = zeros(n_out);
    p->r = rand_array(n_out, 1.0f, 0.0f, seed);
}

static void problem_free(Problem *p) {
    for (int i = 0; i < 3; i++) free(p->in[i]);
    for (int i = 0; i < 2; i++) free(p->saved[i]);
    free(p->out);
    free(p->r);
}

static void layernorm_problem(Problem *p) {
    layernorm_forward(p->d[0], p->d[1], p->k[0], p->in[0], p->in[1], p->in[2], p->out,
                      p->saved[0], p->saved[1]);
}

static void fd_layernorm(int rows, int C, bool affine) {
    unsigned long long seed = 11 + (unsigned)C;
    Problem p = {.forward = layernorm_problem, .d = {rows, C}, .k = {1e-5f}};
    size_t n = (size_t)rows * C;
    p.in[0] = rand_array(n, 2.0f, 0.3f, &seed);
    if (affine) {
        p.in[1] = rand_array((size_t)C, 1.0f, 0.5f, &seed);
        p.in[2] = rand_array((size_t)C, 1.0f, 0.0f, &seed);
    }
    p.saved[0] = zeros((size_t)rows);
    p.saved[1] = zeros((size_t)rows);
    problem_outputs(&p, n, &seed);
    float *dx = zeros(n), *dw = zeros((size_t)C), *db = zeros((size_t)C);
    p.forward(&p);
    layernorm_backward(rows, C, p.in[0], p.in[1], p.saved[0], p.saved[1], p.r, dx,
                       affine ? dw : NULL, affine ? db : NULL);
    char what[96];
    snprintf(what, sizeof what, "layernorm [%d, %d]%s dx", rows, C, affine ? " affine" : "");
    fd_check(what, &p, p.in[0], dx, n);
    if (affine) {
        snprintf(what, sizeof what, "layernorm [%d, %d] dw", rows, C);
        fd_check(what, &p, p.in[1], dw, (size_t)C);
        snprintf(what, sizeof what, "layernorm [%d, %d] db", rows, C);
        fd_check(what, &p, p.in[2], db, (size_t)C);
    }
    free(dx), free(dw), free(db);
    problem_free(&p);
}

static void groupnorm_problem(Problem *p) {
    groupnorm_forward(p->d[0], p->d[1], p->d[2], p->d[3], p->k[0], p->in[0], p->in[1], p->in[2],
                      p->out, p->saved[0], p->saved[1]);
}

static void fd_groupnorm(int B, int C, int HW, int groups, bool affine) {
    unsigned long long seed = 23 + (unsigned)(C * groups);
    Problem p = {.forward = groupnorm_problem, .d = {B, C, HW, groups}, .k = {1e-5f}};
    size_t n = (size_t)B * C * HW;
    /* a group of a few values can have a spread not far above FD_EPS: step well inside it */
    if ((size_t)C / groups * HW < 8) p.step = 1e-3f;
    p.in[0] = rand_array(n, 1.5f, -0.2f, &seed);
    if (affine) {
        p.in[1] = rand_array((size_t)C, 1.0f, 0.5f, &seed);
        p.in[2] = rand_array((size_t)C, 1.0f, 0.0f, &seed);
    }
    p.saved[0] = zeros((size_t)B * groups);
    p.saved[1] = zeros((size_t)B * groups);
    problem_outputs(&p, n, &seed);
    float *dx = zeros(n), *dw = zeros((size_t)C), *db = zeros((size_t)C);
    p.forward(&p);
    groupnorm_backward(B, C, HW, groups, p.in[0], p.in[1], p.saved[0], p.saved[1], p.r, dx,
                       affine ? dw : NULL, affine ? db : NULL);
    char what[96];
    snprintf(what, sizeof what, "groupnorm [%d, %d, %d] groups %d%s dx", B, C, HW, groups,
             affine ? " affine" : "");
    fd_check(what, &p, p.in[0], dx, n);
    if (affine) {
        snprintf(what, sizeof what, "groupnorm [%d, %d, %d] groups %d dw", B, C, HW, groups);
        fd_check(what, &p, p.in[1], dw, (size_t)C);
        snprintf(what, sizeof what, "groupnorm [%d, %d, %d] groups %d db", B, C, HW, groups);
        fd_check(what, &p, p.in[2], db, (size_t)C);
    }
    free(dx), free(dw), free(db);
    problem_free(&p);
}

static void groupnorm_silu_problem(Problem *p) {
    groupnorm_silu_forward(p->d[0], p->d[1], p->d[2], p->d[3], p->k[0], p->in[0], p->in[1],
                           p->in[2], p->out, p->saved[0], p->saved[1]);
}

/* The fused SiLU(GroupNorm(x)): the same sizes as fd_groupnorm's */
static void fd_groupnorm_silu(int B, int C, int HW, int groups, bool affine) {
    unsigned long long seed = 29 + (unsigned)(C * groups);
    Problem p = {.forward = groupnorm_silu_problem, .d = {B, C, HW, groups}, .k = {1e-5f}};
    size_t n = (size_t)B * C * HW;
    if ((size_t)C / groups * HW < 8) p.step = 1e-3f;
    p.in[0] = rand_array(n, 1.5f, -0.2f, &seed);
    if (affine) {
        p.in[1] = rand_array((size_t)C, 1.0f, 0.5f, &seed);
        p.in[2] = rand_array((size_t)C, 1.0f, 0.0f, &seed);
    }
    p.saved[0] = zeros((size_t)B * groups);
    p.saved[1] = zeros((size_t)B * groups);
    problem_outputs(&p, n, &seed);
    float *dx = zeros(n), *dw = zeros((size_t)C), *db = zeros((size_t)C);
    p.forward(&p);
    groupnorm_silu_backward(B, C, HW, groups, p.in[0], p.in[1], p.in[2], p.saved[0], p.saved[1],
                            p.r, dx, affine ? dw : NULL, affine ? db : NULL);
    char what[96];
    snprintf(what, sizeof what, "groupnorm_silu [%d, %d, %d] groups %d%s dx", B, C, HW, groups,
             affine ? " affine" : "");
    fd_check(what, &p, p.in[0], dx, n);
    if (affine) {
        snprintf(what, sizeof what, "groupnorm_silu [%d, %d, %d] groups %d dw", B, C, HW, groups);
        fd_check(what, &p, p.in[1], dw, (size_t)C);
        snprintf(what, sizeof what, "groupnorm_silu [%d, %d, %d] groups %d db", B, C, HW, groups);
        fd_check(what, &p, p.in[2], db, (size_t)C);
    }
    free(dx), free(dw), free(db);
    problem_free(&p);
}

static void rmsnorm_problem(Problem *p) {
    rmsnorm_forward(p->d[0], p->d[1], p->k[0], p->in[0], p->in[1], p->out, p->saved[0]);
}

static void fd_rmsnorm(int rows, int C) {
    unsigned long long seed = 31 + (unsigned)C;
    Problem p = {.forward = rmsnorm_problem, .d = {rows, C}, .k = {1e-6f}};
    size_t n = (size_t)rows * C;
    p.in[0] = rand_array(n, 1.0f, 0.1f, &seed);
    p.in[1] = rand_array((size_t)C, 1.0f, 0.5f, &seed);
    p.saved[0] = zeros((size_t)rows);
    problem_outputs(&p, n, &seed);
    float *dx = zeros(n), *dw = zeros((size_t)C);
    p.forward(&p);
    rmsnorm_backward(rows, C, p.in[0], p.in[1], p.saved[0], p.r, dx, dw);
    char what[96];
    snprintf(what, sizeof what, "rmsnorm [%d, %d] dx", rows, C);
    fd_check(what, &p, p.in[0], dx, n);
    snprintf(what, sizeof what, "rmsnorm [%d, %d] dw", rows, C);
    fd_check(what, &p, p.in[1], dw, (size_t)C);
    free(dx), free(dw);
    problem_free(&p);
}

/* saved[0], saved[1] hold the running mean and var: constants, not checked. */
static void batchnorm_problem(Problem *p) {
    batchnorm_eval_forward(p->d[0], p->d[1], p->d[2], p->k[0], p->saved[0], p->saved[1],
                           p->in[1], p->in[2], p->in[0], p->out);
}

static void fd_batchnorm(int B, int C, int HW) {
    unsigned long long seed = 41 + (unsigned)C;
    Problem p = {.forward = batchnorm_problem, .d = {B, C, HW}, .k = {1e-5f}};
    size_t n = (size_t)B * C * HW;
    p.in[0] = rand_array(n, 1.0f, 0.0f, &seed);
    p.in[1] = rand_array((size_t)C, 1.0f, 0.5f, &seed);
    p.in[2] = rand_array((size_t)C, 1.0f, 0.0f, &seed);
    p.saved[0] = rand_array((size_t)C, 0.5f, 0.0f, &seed);
    p.saved[1] = rand_array((size_t)C, 0.5f, 1.0f, &seed);
    problem_outputs(&p, n, &seed);
    float *dx = zeros(n), *dw = zeros((size_t)C), *db = zeros((size_t)C);
    batchnorm_eval_backward(B, C, HW, p.k[0], p.saved[0], p.saved[1], p.in[1], p.in[0], p.r, dx,
                            dw, db);
    fd_check("batchnorm_eval dx", &p, p.in[0], dx, n);
    fd_check("batchnorm_eval dw", &p, p.in[1], dw, (size_t)C);
    fd_check("batchnorm_eval db", &p, p.in[2], db, (size_t)C);
    free(dx), free(dw), free(db);
    problem_free(&p);
}

typedef enum Activation { ACT_GELU_ERF, ACT_GELU_TANH, ACT_SILU, ACT_RELU, ACT_SIGMOID } Activation;
static const char *const activation_names[] = {"gelu_erf", "gelu_tanh", "silu", "relu", "sigmoid"};

static void activation_forward(Activation a, size_t n, const float *x, float *y) {
    switch (a) {
    case ACT_GELU_ERF: gelu_forward(n, false, x, y); break;
    case ACT_GELU_TANH: gelu_forward(n, true, x, y); break;
    case ACT_SILU: silu_forward(n, x, y); break;
    case ACT_RELU: relu_forward(n, x, y); break;
    case ACT_SIGMOID: sigmoid_forward(n, x, y); break;
    }
}

/* y is the forward's output (sigmoid's backward reads it instead of x). */
static void activation_backward(Activation a, size_t n, const float *x, const float *y,
                                const float *dy, float *dx) {
    switch (a) {
    case ACT_GELU_ERF: gelu_backward(n, false, x, dy, dx); break;
    case ACT_GELU_TANH: gelu_backward(n, true, x, dy, dx); break;
    case ACT_SILU: silu_backward(n, x, dy, dx); break;
    case ACT_RELU: relu_backward(n, x, dy, dx); break;
    case ACT_SIGMOID: sigmoid_backward(n, y, dy, dx); break;
    }
}

static void activation_problem(Problem *p) {
    activation_forward((Activation)p->d[0], p->n_out, p->in[0], p->out);
}

static void fd_activation(Activation a) {
    unsigned long long seed = 53 + (unsigned)a;
    size_t n = 203;
    Problem p = {.forward = activation_problem, .d = {(int)a}};
    p.in[0] = rand_array(n, 5.0f, 0.0f, &seed);
    /* keep relu's kink out of reach of the finite-difference step */
    for (size_t i = 0; i < n; i++)
        if (fabsf(p.in[0][i]) < 2 * FD_EPS) p.in[0][i] += 4 * FD_EPS;
    problem_outputs(&p, n, &seed);
    float *dx = zeros(n);
    p.forward(&p);
    activation_backward(a, n, p.in[0], p.out, p.r, dx);
    char what[64];
    snprintf(what, sizeof what, "%s dx", activation_names[a]);
    fd_check(what, &p, p.in[0], dx, n);
    free(dx);
    problem_free(&p);
}

static void softmax_problem(Problem *p) {
    softmax_forward(p->d[0], p->d[1], p->in[0], p->out);
}

static void fd_softmax(int rows, int C) {
    unsigned long long seed = 61 + (unsigned)C;
    Problem p = {.forward = softmax_problem, .d = {rows, C}};
    size_t n = (size_t)rows * C;
    p.in[0] = rand_array(n, 3.0f, 0.0f, &seed);
    problem_outputs(&p, n, &seed);
    float *dx = zeros(n);
    p.forward(&p);
    softmax_backward(rows, C, p.out, p.r, dx);
    char what[64];
    snprintf(what, sizeof what, "softmax [%d, %d] dx", rows, C);
    fd_check(what, &p, p.in[0], dx, n);
    free(dx);
    problem_free(&p);
}

static void upsample_problem(Problem *p) {
    upsample_nearest2x_forward(p->d[0], p->d[1], p->d[2], p->in[0], p->out);
}

static void resize_problem(Problem *p) {
    resize_bilinear_forward(p->d[0], p->d[1], p->d[2], p->d[3], p->d[4], p->in[0], p->out);
}

static void fd_resize(bool nearest, int planes, int H, int W, int Ho, int Wo) {
    unsigned long long seed = 71 + (unsigned)(Ho * Wo);
    Problem p = {.forward = nearest ? upsample_problem : resize_problem,
                 .d = {planes, H, W, Ho, Wo}};
    size_t n = (size_t)planes * H * W, n_out = (size_t)planes * Ho * Wo;
    p.in[0] = rand_array(n, 1.0f, 0.0f, &seed);
    problem_outputs(&p, n_out, &seed);
    float *dx = zeros(n);
    if (nearest)
        upsample_nearest2x_backward(planes, H, W, p.r, dx);
    else
        resize_bilinear_backward(planes, H, W, Ho, Wo, p.r, dx);
    char what[96];
    snprintf(what, sizeof what, "%s [%d, %d, %d] -> [%d, %d] dx", nearest ? "upsample_nearest2x" :
             "resize_bilinear", planes, H, W, Ho, Wo);
    fd_check(what, &p, p.in[0], dx, n);
    free(dx);
    problem_free(&p);
}

static void mul_problem(Problem *p) {
    mul_forward(p->n_out, p->in[0], p->in[1], p->out);
}

static void mul_rows_problem(Problem *p) {
    mul_rows_forward(p->d[0], p->d[1], p->in[0], p->in[1], p->out);
}

static void clamp_problem(Problem *p) {
    clamp_forward(p->n_out, p->k[0], p->k[1], p->in[0], p->out);
}

static void pow_problem(Problem *p) {
    pow_forward(p->n_out, p->k[0], p->in[0], p->out);
}

static void fd_elementwise(void) {
    unsigned long long seed = 83;
    size_t n = 37;
    Problem mul = {.forward = mul_problem};
    mul.in[0] = rand_array(n, 1.0f, 0.0f, &seed);
    mul.in[1] = rand_array(n, 1.0f, 0.0f, &seed);
    problem_outputs(&mul, n, &seed);
    float *da = zeros(n), *db = zeros(n);
    mul_backward(n, mul.in[0], mul.in[1], mul.r, da, db);
    fd_check("mul da", &mul, mul.in[0], da, n);
    fd_check("mul db", &mul, mul.in[1], db, n);
    free(da), free(db);
    problem_free(&mul);

    int rows = 5, C = 17;
    Problem mr = {.forward = mul_rows_problem, .d = {rows, C}};
    mr.in[0] = rand_array((size_t)rows * C, 1.0f, 0.0f, &seed);
    mr.in[1] = rand_array((size_t)C, 1.0f, 0.0f, &seed);
    problem_outputs(&mr, (size_t)rows * C, &seed);
    float *dx = zeros((size_t)rows * C), *dv = zeros((size_t)C);
    mul_rows_backward(rows, C, mr.in[0], mr.in[1], mr.r, dx, dv);
    fd_check("mul_rows dx", &mr, mr.in[0], dx, (size_t)rows * C);
    fd_check("mul_rows dv", &mr, mr.in[1], dv, (size_t)C);
    free(dx), free(dv);
    problem_free(&mr);

    Problem cl = {.forward = clamp_problem, .k = {-0.5f, 0.75f}};
    cl.in[0] = rand_array(n, 1.5f, 0.0f, &seed);
    for (size_t i = 0; i < n; i++) /* away from the bounds, where the derivative jumps */
        if (fabsf(cl.in[0][i] - cl.k[0]) < 2 * FD_EPS || fabsf(cl.in[0][i] - cl.k[1]) < 2 * FD_EPS)
            cl.in[0][i] += 4 * FD_EPS;
    problem_outputs(&cl, n, &seed);
    float *dcl = zeros(n);
    clamp_backward(n, cl.k[0], cl.k[1], cl.in[0], cl.r, dcl);
    fd_check("clamp dx", &cl, cl.in[0], dcl, n);
    free(dcl);
    problem_free(&cl);

    const float exponents[] = {2.0f, 3.0f, 0.5f, 1.7f};
    for (int e = 0; e < 4; e++) {
        Problem pw = {.forward = pow_problem, .k = {exponents[e]}};
        pw.in[0] = rand_array(n, 0.9f, 1.1f, &seed); /* in [0.2, 2] */
        problem_outputs(&pw, n, &seed);
        float *dpw = zeros(n);
        pow_backward(n, pw.k[0], pw.in[0], pw.r, dpw);
        char what[64];
        snprintf(what, sizeof what, "pow %g dx", exponents[e]);
        fd_check(what, &pw, pw.in[0], dpw, n);
        free(dpw);
        problem_free(&pw);
    }
}

static void finite_difference_tests(void) {
    fd_layernorm(3, 17, true);
    fd_layernorm(1, 1, true);
    fd_layernorm(4, 33, false);
    fd_groupnorm(2, 6, 5, 3, true);
    fd_groupnorm(1, 4, 7, 1, true);
    fd_groupnorm(2, 5, 3, 5, true);
    fd_groupnorm(2, 6, 4, 2, false);
    fd_groupnorm_silu(2, 6, 5, 3, true);
    fd_groupnorm_silu(1, 4, 7, 1, true);
    fd_groupnorm_silu(2, 5, 3, 5, true);
    fd_groupnorm_silu(2, 6, 4, 2, false);
    fd_rmsnorm(3, 17);
    fd_rmsnorm(1, 1);
    fd_batchnorm(2, 3, 7);
    for (int a = ACT_GELU_ERF; a <= ACT_SIGMOID; a++) fd_activation((Activation)a);
    fd_softmax(3, 17);
    fd_softmax(1, 1);
    fd_resize(true, 2, 3, 5, 6, 10);
    fd_resize(false, 2, 7, 5, 16, 9);
    fd_resize(false, 1, 16, 16, 5, 7);
    fd_resize(false, 2, 1, 1, 3, 3);
    fd_elementwise();
}

/* ---- PyTorch goldens --------------------------------------------------------------------- */

/* golden "<name>.<tensor>" as n floats (NULL, reported, when absent or of another size). */
static float *golden(const SafeTensors *st, const char *name, const char *tensor, size_t n) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", name, tensor);
    return golden_load(st, key, n);
}

/* Compares got with golden "<name>.<tensor>". */
static void compare(const SafeTensors *st, const char *name, const char *tensor, const float *got,
                    size_t n, float rtol, float atol) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", name, tensor);
    float *want = golden_load(st, key, n);
    if (want) check_close(key, got, want, n, rtol, atol);
    free(want);
}

static void golden_layernorm(const SafeTensors *st) {
    static const struct { int rows, C; bool affine; float eps; } cases[] = {
        {1, 1, true, 1e-5f}, {1, 17, true, 1e-5f}, {5, 33, false, 1e-6f},
        {7, 3, true, 1e-5f}, {48, 64, true, 1e-6f}, {4, 128, false, 1e-6f}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rows = cases[i].rows, C = cases[i].C;
        size_t n = (size_t)rows * C;
        char name[32];
        snprintf(name, sizeof name, "layernorm%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n);
        float *w = cases[i].affine ? golden(st, name, "w", (size_t)C) : NULL;
        float *b = cases[i].affine ? golden(st, name, "b", (size_t)C) : NULL;
        float *y = zeros(n), *mean = zeros((size_t)rows), *rstd = zeros((size_t)rows);
        float *dx = zeros(n), *dw = w ? zeros((size_t)C) : NULL, *db = b ? zeros((size_t)C) : NULL;
        if (x && dy && (w || !cases[i].affine) && (b || !cases[i].affine)) {
            layernorm_forward(rows, C, cases[i].eps, x, w, b, y, mean, rstd);
            for (int k = 0; k < 2; k++) layernorm_backward(rows, C, x, w, mean, rstd, dy, dx, dw, db);
            halve(n, dx), halve((size_t)C, dw), halve((size_t)C, db);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "mean", mean, (size_t)rows, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "rstd", rstd, (size_t)rows, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
            if (dw) compare(st, name, "dw", dw, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
            if (db) compare(st, name, "db", db, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(w), free(b), free(y), free(mean), free(rstd);
        free(dx), free(dw), free(db);
    }
}

static void golden_groupnorm(const SafeTensors *st) {
    static const struct { int B, C, HW, groups; bool affine; float eps; } cases[] = {
        {2, 6, 7, 3, true, 1e-5f}, {1, 4, 9, 1, true, 1e-6f}, {2, 5, 3, 5, false, 1e-6f},
        {1, 64, 33, 32, true, 1e-6f}, {3, 3, 1, 3, true, 1e-5f}, {2, 34, 17, 2, false, 1e-5f}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int B = cases[i].B, C = cases[i].C, HW = cases[i].HW, G = cases[i].groups;
        size_t n = (size_t)B * C * HW, n_stats = (size_t)B * G;
        char name[32];
        snprintf(name, sizeof name, "groupnorm%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n);
        float *w = cases[i].affine ? golden(st, name, "w", (size_t)C) : NULL;
        float *b = cases[i].affine ? golden(st, name, "b", (size_t)C) : NULL;
        float *y = zeros(n), *mean = zeros(n_stats), *rstd = zeros(n_stats);
        float *dx = zeros(n), *dw = w ? zeros((size_t)C) : NULL, *db = b ? zeros((size_t)C) : NULL;
        if (x && dy && (w || !cases[i].affine) && (b || !cases[i].affine)) {
            groupnorm_forward(B, C, HW, G, cases[i].eps, x, w, b, y, mean, rstd);
            for (int k = 0; k < 2; k++)
                groupnorm_backward(B, C, HW, G, x, w, mean, rstd, dy, dx, dw, db);
            halve(n, dx), halve((size_t)C, dw), halve((size_t)C, db);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "mean", mean, n_stats, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "rstd", rstd, n_stats, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
            if (dw) compare(st, name, "dw", dw, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
            if (db) compare(st, name, "db", db, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(w), free(b), free(y), free(mean), free(rstd);
        free(dx), free(dw), free(db);
    }
}

/* The same cases as golden_groupnorm, through the fused SiLU(GroupNorm(x)) */
static void golden_groupnorm_silu(const SafeTensors *st) {
    static const struct { int B, C, HW, groups; bool affine; float eps; } cases[] = {
        {2, 6, 7, 3, true, 1e-5f}, {1, 4, 9, 1, true, 1e-6f}, {2, 5, 3, 5, false, 1e-6f},
        {1, 64, 33, 32, true, 1e-6f}, {3, 3, 1, 3, true, 1e-5f}, {2, 34, 17, 2, false, 1e-5f}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int B = cases[i].B, C = cases[i].C, HW = cases[i].HW, G = cases[i].groups;
        size_t n = (size_t)B * C * HW, n_stats = (size_t)B * G;
        char name[32];
        snprintf(name, sizeof name, "groupnorm_silu%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n);
        float *w = cases[i].affine ? golden(st, name, "w", (size_t)C) : NULL;
        float *b = cases[i].affine ? golden(st, name, "b", (size_t)C) : NULL;
        float *y = zeros(n), *mean = zeros(n_stats), *rstd = zeros(n_stats);
        float *dx = zeros(n), *dw = w ? zeros((size_t)C) : NULL, *db = b ? zeros((size_t)C) : NULL;
        if (x && dy && (w || !cases[i].affine) && (b || !cases[i].affine)) {
            groupnorm_silu_forward(B, C, HW, G, cases[i].eps, x, w, b, y, mean, rstd);
            for (int k = 0; k < 2; k++)
                groupnorm_silu_backward(B, C, HW, G, x, w, b, mean, rstd, dy, dx, dw, db);
            halve(n, dx), halve((size_t)C, dw), halve((size_t)C, db);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
            if (dw) compare(st, name, "dw", dw, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
            if (db) compare(st, name, "db", db, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(w), free(b), free(y), free(mean), free(rstd);
        free(dx), free(dw), free(db);
    }
}

static void golden_rmsnorm(const SafeTensors *st) {
    static const struct { int rows, C; float eps; } cases[] = {
        {1, 1, 1e-6f}, {3, 17, 1e-6f}, {6, 128, 1e-5f}, {2, 33, 1e-6f}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rows = cases[i].rows, C = cases[i].C;
        size_t n = (size_t)rows * C;
        char name[32];
        snprintf(name, sizeof name, "rmsnorm%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n);
        float *w = golden(st, name, "w", (size_t)C);
        float *y = zeros(n), *rstd = zeros((size_t)rows), *dx = zeros(n), *dw = zeros((size_t)C);
        if (x && dy && w) {
            rmsnorm_forward(rows, C, cases[i].eps, x, w, y, rstd);
            for (int k = 0; k < 2; k++) rmsnorm_backward(rows, C, x, w, rstd, dy, dx, dw);
            halve(n, dx), halve((size_t)C, dw);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "rstd", rstd, (size_t)rows, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dw", dw, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(w), free(y), free(rstd), free(dx), free(dw);
    }
}

static void golden_batchnorm(const SafeTensors *st) {
    static const struct { int B, C, HW; float eps; } cases[] = {
        {2, 3, 7, 1e-5f}, {1, 17, 5, 1e-4f}, {3, 1, 33, 1e-5f}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int B = cases[i].B, C = cases[i].C, HW = cases[i].HW;
        size_t n = (size_t)B * C * HW;
        char name[32];
        snprintf(name, sizeof name, "batchnorm%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n);
        float *w = golden(st, name, "w", (size_t)C), *b = golden(st, name, "b", (size_t)C);
        float *mean = golden(st, name, "mean", (size_t)C), *var = golden(st, name, "var", (size_t)C);
        float *y = zeros(n), *dx = zeros(n), *dw = zeros((size_t)C), *db = zeros((size_t)C);
        if (x && dy && w && b && mean && var) {
            batchnorm_eval_forward(B, C, HW, cases[i].eps, mean, var, w, b, x, y);
            for (int k = 0; k < 2; k++)
                batchnorm_eval_backward(B, C, HW, cases[i].eps, mean, var, w, x, dy, dx, dw, db);
            halve(n, dx), halve((size_t)C, dw), halve((size_t)C, db);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dw", dw, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "db", db, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(w), free(b), free(mean), free(var);
        free(y), free(dx), free(dw), free(db);
    }
}

static void golden_activations(const SafeTensors *st) {
    size_t n = 730; /* 600 random, 121 from -30 to 30, 9 extremes */
    for (int a = ACT_GELU_ERF; a <= ACT_SIGMOID; a++) {
        const char *name = activation_names[a];
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n);
        float *y = zeros(n), *dx = zeros(n);
        if (x && dy) {
            activation_forward((Activation)a, n, x, y);
            for (int k = 0; k < 2; k++) activation_backward((Activation)a, n, x, y, dy, dx);
            halve(n, dx);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(y), free(dx);
    }
}

static void golden_softmax(const SafeTensors *st) {
    static const struct { int rows, C; } cases[] = {{1, 1}, {3, 17}, {4, 33}, {9, 64}, {2, 5}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rows = cases[i].rows, C = cases[i].C;
        size_t n = (size_t)rows * C;
        char name[32];
        snprintf(name, sizeof name, "softmax%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n);
        float *y = zeros(n), *dx = zeros(n);
        if (x && dy) {
            softmax_forward(rows, C, x, y);
            for (int k = 0; k < 2; k++) softmax_backward(rows, C, y, dy, dx);
            halve(n, dx);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(y), free(dx);
    }
}

static void golden_resampling(const SafeTensors *st) {
    static const struct { int planes, H, W; } nearest[] = {{3, 5, 7}, {1, 1, 1}, {2, 16, 3}};
    for (size_t i = 0; i < sizeof nearest / sizeof nearest[0]; i++) {
        int P = nearest[i].planes, H = nearest[i].H, W = nearest[i].W;
        size_t n = (size_t)P * H * W, n_out = 4 * n;
        char name[32];
        snprintf(name, sizeof name, "upsample%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n_out);
        float *y = zeros(n_out), *dx = zeros(n);
        if (x && dy) {
            upsample_nearest2x_forward(P, H, W, x, y);
            for (int k = 0; k < 2; k++) upsample_nearest2x_backward(P, H, W, dy, dx);
            halve(n, dx);
            compare(st, name, "y", y, n_out, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(dy), free(y), free(dx);
    }
    static const struct { int planes, H, W, Ho, Wo; } resize[] = {
        {2, 7, 5, 16, 9}, {2, 16, 16, 5, 7}, {3, 1, 1, 3, 3}, {1, 32, 32, 128, 128},
        {1, 100, 75, 37, 129}, {2, 5, 7, 5, 13}, {1, 3, 1, 1, 4}, {1, 512, 3, 128, 3},
        {2, 3, 5, 4, 300}};
    for (size_t i = 0; i < sizeof resize / sizeof resize[0]; i++) {
        int P = resize[i].planes, H = resize[i].H, W = resize[i].W;
        int Ho = resize[i].Ho, Wo = resize[i].Wo;
        size_t n = (size_t)P * H * W, n_out = (size_t)P * Ho * Wo;
        char name[32];
        snprintf(name, sizeof name, "resize%zu", i);
        float *x = golden(st, name, "x", n), *dy = golden(st, name, "dy", n_out);
        float *y = zeros(n_out), *dx = zeros(n);
        if (x && dy) {
            resize_bilinear_forward(P, H, W, Ho, Wo, x, y);
            for (int k = 0; k < 2; k++) resize_bilinear_backward(P, H, W, Ho, Wo, dy, dx);
            halve(n, dx);
            compare(st, name, "y", y, n_out, RESIZE_RTOL, RESIZE_ATOL);
            compare(st, name, "dx", dx, n, RESIZE_GRAD_RTOL, RESIZE_GRAD_ATOL);
        }
        free(x), free(dy), free(y), free(dx);
    }
}

static void golden_pointwise(const SafeTensors *st) {
    size_t n = 1001;
    float *a = golden(st, "mul", "a", n), *b = golden(st, "mul", "b", n);
    float *dy = golden(st, "mul", "dy", n);
    float *y = zeros(n), *da = zeros(n), *db = zeros(n);
    if (a && b && dy) {
        mul_forward(n, a, b, y);
        for (int k = 0; k < 2; k++) mul_backward(n, a, b, dy, da, db);
        halve(n, da), halve(n, db);
        compare(st, "mul", "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
        compare(st, "mul", "da", da, n, GOLDEN_RTOL, GOLDEN_ATOL);
        compare(st, "mul", "db", db, n, GOLDEN_RTOL, GOLDEN_ATOL);
    }
    free(a), free(b), free(dy), free(y), free(da), free(db);

    n = 204;
    float *x = golden(st, "clamp", "x", n);
    dy = golden(st, "clamp", "dy", n);
    float *cy = zeros(n), *dx = zeros(n);
    if (x && dy) {
        clamp_forward(n, -0.5f, 0.75f, x, cy);
        for (int k = 0; k < 2; k++) clamp_backward(n, -0.5f, 0.75f, x, dy, dx);
        halve(n, dx);
        compare(st, "clamp", "y", cy, n, 0.0f, 0.0f);
        compare(st, "clamp", "dx", dx, n, 0.0f, 0.0f);
    }
    free(x), free(dy), free(cy), free(dx);

    const float exponents[] = {2.0f, 3.0f, 0.5f, 1.0f};
    n = 257;
    for (int e = 0; e < 4; e++) {
        char name[32];
        snprintf(name, sizeof name, "pow%d", e);
        float *px = golden(st, name, "x", n), *pdy = golden(st, name, "dy", n);
        float *py = zeros(n), *pdx = zeros(n);
        if (px && pdy) {
            pow_forward(n, exponents[e], px, py);
            for (int k = 0; k < 2; k++) pow_backward(n, exponents[e], px, pdy, pdx);
            halve(n, pdx);
            compare(st, name, "y", py, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", pdx, n, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(px), free(pdy), free(py), free(pdx);
    }
}

static void golden_broadcasts(const SafeTensors *st) {
    static const struct { int rows, C; } row_cases[] = {{1, 17}, {33, 3}, {300, 130}};
    for (size_t i = 0; i < sizeof row_cases / sizeof row_cases[0]; i++) {
        int rows = row_cases[i].rows, C = row_cases[i].C;
        size_t n = (size_t)rows * C;
        char name[32];
        snprintf(name, sizeof name, "mul_rows%zu", i);
        float *x = golden(st, name, "x", n), *v = golden(st, name, "v", (size_t)C);
        float *dy = golden(st, name, "dy", n);
        float *y = zeros(n), *dx = zeros(n), *dv = zeros((size_t)C);
        if (x && v && dy) {
            mul_rows_forward(rows, C, x, v, y);
            for (int k = 0; k < 2; k++) mul_rows_backward(rows, C, x, v, dy, dx, dv);
            halve(n, dx), halve((size_t)C, dv);
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dx", dx, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dv", dv, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(v), free(dy), free(y), free(dx), free(dv);

        snprintf(name, sizeof name, "sum_rows%zu", i);
        x = golden(st, name, "x", n);
        float *sum = zeros((size_t)C);
        if (x) {
            for (int k = 0; k < 2; k++) sum_rows_add(rows, C, x, sum);
            halve((size_t)C, sum);
            compare(st, name, "y", sum, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(sum);
    }
    static const struct { int B, C, HW; } ch_cases[] = {{2, 3, 7}, {1, 17, 1}, {3, 5, 33}};
    for (size_t i = 0; i < sizeof ch_cases / sizeof ch_cases[0]; i++) {
        int B = ch_cases[i].B, C = ch_cases[i].C, HW = ch_cases[i].HW;
        size_t n = (size_t)B * C * HW;
        char name[32];
        snprintf(name, sizeof name, "add_channels%zu", i);
        float *x = golden(st, name, "x", n), *v = golden(st, name, "v", (size_t)C);
        float *dy = golden(st, name, "dy", n);
        float *y = zeros(n), *dv = zeros((size_t)C);
        if (x && v && dy) {
            add_channels_forward(B, C, HW, x, v, y);
            sum_channels_add(B, C, HW, dy, dv); /* the gradient of v */
            compare(st, name, "y", y, n, GOLDEN_RTOL, GOLDEN_ATOL);
            compare(st, name, "dv", dv, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(v), free(dy), free(y), free(dv);

        snprintf(name, sizeof name, "sum_channels%zu", i);
        x = golden(st, name, "x", n);
        float *sum = zeros((size_t)C);
        if (x) {
            for (int k = 0; k < 2; k++) sum_channels_add(B, C, HW, x, sum);
            halve((size_t)C, sum);
            compare(st, name, "y", sum, (size_t)C, GOLDEN_RTOL, GOLDEN_ATOL);
        }
        free(x), free(sum);
    }
    const size_t counts[] = {1, 17, 40009};
    for (int i = 0; i < 3; i++) {
        char name[32];
        snprintf(name, sizeof name, "reduce%d", i);
        float *x = golden(st, name, "x", counts[i]);
        if (x) {
            float sum = (float)sum_array(counts[i], x), max = max_array(counts[i], x);
            compare(st, name, "sum", &sum, 1, 1e-6f, 0.0f);
            compare(st, name, "max", &max, 1, 0.0f, 0.0f);
        }
        free(x);
    }
}

static void golden_tests(void) {
    SafeTensors *st = golden_open(GOLDEN_PATH);
    if (!st) return;
    golden_layernorm(st);
    golden_groupnorm(st);
    golden_groupnorm_silu(st);
    golden_rmsnorm(st);
    golden_batchnorm(st);
    golden_activations(st);
    golden_softmax(st);
    golden_resampling(st);
    golden_pointwise(st);
    golden_broadcasts(st);
    st_close(st);
}

/* ---- the activations' own exp/erfc against double libm, densely ---------------------------- */

/* The activations use their own vectorisable exp and erfc; the 730 golden points could miss a
 * bad corner, so sweep [-60, 60] in steps of 1/512 against double-precision formulas. */
#define SWEEP_RTOL 2e-5f /* worst seen: 1.6e-5, gelu's far tail (values ~1e-30) */
#define SWEEP_ATOL 5e-7f /* near the zeros of the derivatives, where relative error means little */

static double sweep_reference(int k, double x) {
    const double c = 0.79788456080286536; /* sqrt(2/pi) */
    double s = 1.0 / (1.0 + exp(-x));
    double u = c * (x + 0.044715 * x * x * x), su = 1.0 / (1.0 + exp(-2.0 * u));
    double du = 2.0 * c * (1.0 + 3.0 * 0.044715 * x * x);
    switch (k) {
    case 0: return s;
    case 1: return x * s;
    case 2: return 0.5 * x * erfc(-x / sqrt(2.0));
    case 3: return x * su; /* 0.5 x (1 + tanh u) without its cancellation */
    case 4: return s + x * s * (1.0 - s);
    case 5: return 0.5 * erfc(-x / sqrt(2.0)) + x * exp(-0.5 * x * x) / sqrt(2.0 * M_PI);
    default: return su + x * su * (1.0 - su) * du;
    }
}

static void activation_sweep_tests(void) {
    static const char *const names[] = {"sigmoid sweep", "silu sweep", "gelu_erf sweep",
                                        "gelu_tanh sweep", "silu' sweep", "gelu_erf' sweep",
                                        "gelu_tanh' sweep"};
    size_t n = 120 * 512 + 1;
    float *x = zeros(n), *ones = zeros(n), *got = zeros(n), *want = zeros(n);
    for (size_t i = 0; i < n; i++) x[i] = -60.0f + (float)i / 512.0f, ones[i] = 1.0f;
    for (int k = 0; k < 7; k++) {
        memset(got, 0, n * sizeof *got);
        switch (k) {
        case 0: sigmoid_forward(n, x, got); break;
        case 1: silu_forward(n, x, got); break;
        case 2: gelu_forward(n, false, x, got); break;
        case 3: gelu_forward(n, true, x, got); break;
        case 4: silu_backward(n, x, ones, got); break;
        case 5: gelu_backward(n, false, x, ones, got); break;
        default: gelu_backward(n, true, x, ones, got); break;
        }
        for (size_t i = 0; i < n; i++) want[i] = (float)sweep_reference(k, x[i]);
        check_close(names[k], got, want, n, SWEEP_RTOL, SWEEP_ATOL);
    }
    free(x), free(ones), free(got), free(want);
}

/* ---- edge cases and the linear kernels without a backward -------------------------------- */

static void edge_case_tests(void) {
    float nan_in[5] = {1.0f, -2.0f, NAN, 3.0f, -INFINITY}, out[5];
    CHECK(isnan(max_array(5, nan_in)), "max_array is NaN when a value is NaN");
    CHECK(max_array(2, nan_in) == 1.0f, "max_array of [1, -2] is 1");
    CHECK(max_array(0, nan_in) == -INFINITY, "max_array of nothing is -inf");
    CHECK(sum_array(0, nan_in) == 0.0, "sum_array of nothing is 0");
    relu_forward(5, nan_in, out);
    CHECK(isnan(out[2]) && out[1] == 0.0f && out[4] == 0.0f, "relu keeps NaN, zeroes negatives");
    clamp_forward(5, -1.0f, 1.0f, nan_in, out);
    CHECK(isnan(out[2]) && out[3] == 1.0f && out[4] == -1.0f, "clamp keeps NaN, clamps infinities");

    float zero = 0.0f, one = 1.0f, d = 0.0f;
    relu_backward(1, &zero, &one, &d);
    CHECK(d == 0.0f, "relu gradient at 0 is 0 (as torch)");

    float big[4] = {-1000.0f, -100.0f, 100.0f, 1000.0f}, s[4];
    sigmoid_forward(4, big, s);
    CHECK(s[0] == 0.0f && s[1] >= 0.0f && s[1] < 1e-40f && s[2] == 1.0f && s[3] == 1.0f,
          "sigmoid of +-100, +-1000 is finite and in [0, 1]");
    silu_forward(4, big, s);
    CHECK(s[0] == 0.0f && s[3] == 1000.0f && !isnan(s[1]), "silu of +-1000 is finite");

    float row[3] = {1000.0f, 1000.0f, -INFINITY}, sm[3];
    softmax_forward(1, 3, row, sm);
    CHECK(sm[0] == 0.5f && sm[1] == 0.5f && sm[2] == 0.0f, "softmax of [1000, 1000, -inf]");

    /* the elementwise kernels without a backward, against their definitions; in place too.
     * A compiler may fuse a multiply-add on either side: compare to 1 ulp or so, not bits. */
    unsigned long long seed = 97;
    size_t n = 50001; /* past the threading threshold, not a multiple of any vector width */
    float *a = rand_array(n, 1.0f, 0.0f, &seed), *b = rand_array(n, 1.0f, 0.0f, &seed);
    float *y = zeros(n), *want = zeros(n);
    add_forward(n, a, b, y);
    for (size_t i = 0; i < n; i++) want[i] = a[i] + b[i];
    check_close("add_forward", y, want, n, 0.0f, 0.0f);
    scale_forward(n, 3.0f, y, y);
    for (size_t i = 0; i < n; i++) want[i] *= 3.0f;
    check_close("scale_forward in place", y, want, n, 0.0f, 0.0f);
    axpy(n, -3.0f, b, y);
    for (size_t i = 0; i < n; i++) want[i] = 3.0f * a[i];
    check_close("axpy", y, want, n, 1e-6f, 1e-6f);

    int rows = 7, C = 33;
    add_rows_forward(rows, C, a, b, y);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) want[r * C + c] = a[r * C + c] + b[c];
    check_close("add_rows_forward [7, 33]", y, want, (size_t)rows * C, 0.0f, 0.0f);
    free(a), free(b), free(y), free(want);

    /* NULL gradients are skipped, and skipping one does not change another */
    int R = 4, K = 17;
    float *x = rand_array((size_t)R * K, 1.0f, 0.0f, &seed), *w = rand_array((size_t)K, 1.0f, 1.0f, &seed);
    float *dy = rand_array((size_t)R * K, 1.0f, 0.0f, &seed);
    float *ln = zeros((size_t)R * K), mean[4], rstd[4];
    float *dw_all = zeros((size_t)K), *dw_only = zeros((size_t)K), *dx = zeros((size_t)R * K);
    layernorm_forward(R, K, 1e-5f, x, w, NULL, ln, mean, rstd);
    layernorm_backward(R, K, x, w, mean, rstd, dy, dx, dw_all, NULL);
    layernorm_backward(R, K, x, w, mean, rstd, dy, NULL, dw_only, NULL);
    CHECK(memcmp(dw_all, dw_only, (size_t)K * sizeof(float)) == 0,
          "layernorm_backward with dx NULL gives the same dw");
    free(x), free(w), free(dy), free(ln), free(dw_all), free(dw_only), free(dx);

    /* NULL affine parameters mean w = 1, b = 0 */
    float v[6] = {0.5f, -1.0f, 2.0f, 0.25f, -3.0f, 1.5f}, ones[3] = {1, 1, 1}, nil[3] = {0, 0, 0};
    float with[6], without[6], r[2], stat_mean[3] = {0.1f, -0.2f, 0.3f}, stat_var[3] = {1, 2, 0.5f};
    rmsnorm_forward(2, 3, 1e-6f, v, ones, with, r);
    rmsnorm_forward(2, 3, 1e-6f, v, NULL, without, r);
    CHECK(memcmp(with, without, sizeof with) == 0, "rmsnorm with w NULL equals w = 1");
    batchnorm_eval_forward(2, 3, 1, 1e-5f, stat_mean, stat_var, ones, nil, v, with);
    batchnorm_eval_forward(2, 3, 1, 1e-5f, stat_mean, stat_var, NULL, NULL, v, without);
    CHECK(memcmp(with, without, sizeof with) == 0, "batchnorm_eval with w, b NULL equals 1, 0");
}

/* ---- thread-count independence --------------------------------------------------------- */

#ifdef _OPENMP
/* Every output of the reductions on `threads` threads, written into out (in this order). */
static void reductions_on(int threads, const float *x, const float *dy, float *out) {
    omp_set_num_threads(threads);
    const int B = 2, C = 96, HW = 4099, groups = 32, rows = B * HW;
    size_t n = (size_t)B * C * HW;
    double sum = sum_array(n, x);
    memcpy(out, &sum, sizeof sum);
    out[2] = max_array(n, x);
    float *o = out + 3;
    sum_rows_add(rows, C, x, o), o += C;
    sum_channels_add(B, C, HW, x, o), o += C;
    float *y = zeros(n), *mean = zeros((size_t)rows), *rstd = zeros((size_t)rows);
    layernorm_forward(rows, C, 1e-5f, x, dy, NULL, y, mean, rstd);
    layernorm_backward(rows, C, x, dy, mean, rstd, dy, NULL, o, o + C), o += 2 * C;
    groupnorm_forward(B, C, HW, groups, 1e-5f, x, dy, NULL, y, mean, rstd);
    memcpy(o, mean, (size_t)B * groups * sizeof(float)), o += B * groups;
    groupnorm_backward(B, C, HW, groups, x, dy, mean, rstd, dy, o + 2 * C, o, o + C);
    o += 2 * C + n;
    resize_bilinear_backward(B * C, 37, 41, 12, 300, dy, o); /* past one chunk of columns */
    free(y), free(mean), free(rstd);
}

static void thread_count_tests(void) {
    unsigned long long seed = 101;
    const size_t n = (size_t)2 * 96 * 4099;
    float *x = rand_array(n, 3.0f, 1.0f, &seed), *dy = rand_array(n, 1.0f, 0.0f, &seed);
    /* outputs: the sum (a double in 2 floats), the max, 2 column sums, layernorm dw and db,
     * 64 group means, groupnorm dw, db and dx, resize dx (B * C planes of 37 x 41) */
    size_t n_out = 3 + 6 * 96 + 64 + n + (size_t)2 * 96 * 37 * 41;
    float *one = zeros(n_out), *two = zeros(n_out);
    reductions_on(1, x, dy, one);
    reductions_on(2, x, dy, two);
    omp_set_num_threads(omp_get_num_procs());
    CHECK(memcmp(one, two, n_out * sizeof(float)) == 0,
          "reductions give the same bits on 1 and 2 threads (%zu values)", n_out);
    free(x), free(dy), free(one), free(two);
}
#endif

/* transpose_batched against its definition, bit for bit (a copy, or one addition): shapes with
 * whole 8 x 8 blocks, edges of every width, more than one tile, and past the threading threshold. */
static void transpose_tests(void) {
    const int64_t shapes[][3] = {{1, 1, 1}, {1, 8, 8}, {3, 19, 37}, {2, 33, 8}, {2, 64, 1000}};
    unsigned long long seed = 7;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t B = shapes[s][0], R = shapes[s][1], C = shapes[s][2];
        size_t n = (size_t)(B * R * C);
        float *x = rand_array(n, 1.0f, 0.0f, &seed), *y0 = rand_array(n, 1.0f, 0.0f, &seed);
        float *y = zeros(n), *want = zeros(n);
        for (int accumulate = 0; accumulate < 2; accumulate++) {
            memcpy(y, y0, n * sizeof *y);
            transpose_batched(B, R, C, x, y, accumulate);
            for (int64_t b = 0; b < B; b++)
                for (int64_t i = 0; i < R; i++)
                    for (int64_t j = 0; j < C; j++) {
                        size_t at = (size_t)((b * C + j) * R + i);
                        float v = x[(b * R + i) * C + j];
                        want[at] = accumulate ? y0[at] + v : v;
                    }
            char what[96];
            snprintf(what, sizeof what, "transpose_batched [%lld, %lld, %lld]%s", (long long)B,
                     (long long)R, (long long)C, accumulate ? " accumulate" : "");
            check_close(what, y, want, n, 0.0f, 0.0f);
        }
        free(x), free(y0), free(y), free(want);
    }
}

int main(void) {
    transpose_tests();
    finite_difference_tests();
    golden_tests();
    activation_sweep_tests();
    edge_case_tests();
#ifdef _OPENMP
    thread_count_tests();
#endif
    return harness_finish("test_ops");
}
