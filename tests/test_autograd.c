/* test_autograd.c - the tape of autograd.c.
 *
 *   1. finite differences through composite graphs that use every op: the loss is
 *      sum(y * r) for a fixed random r, and every input's gradient is checked;
 *   2. leaf gradients accumulate over two backward passes;
 *   3. no-grad mode records and saves nothing and computes the same values;
 *   4. checkpointed segments give gradients bitwise equal to the plain graph, with less memory;
 *   5. backward frees what nodes saved, intermediate values and intermediate gradients;
 *      var_drop frees, before it, the values no backward reads;
 *   6. wrong shapes and misuse fail with a message, never a crash;
 *   7. PyTorch: two small composite models (together every op) against
 *      tests/golden/autograd.safetensors, written by tools/golden_autograd.py (float64 torch). */
#include "../autograd.h"
#include "harness.h"

#define GOLDEN_PATH "tests/golden/autograd.safetensors"

/* Finite differences of float32 graphs with step FD_EPS: O(eps^2) truncation plus the loss's
 * rounding (about 1e-7 of its terms) divided by 2 eps. */
#define FD_EPS 1e-2f
#define FD_RTOL 1e-2f
#define FD_ATOL 2e-3f
/* float32 against float64 PyTorch, through about twenty ops: relative to each tensor's largest
 * magnitude (GOLDEN_ATOL times it) plus GOLDEN_RTOL of each value. */
#define GOLDEN_RTOL 1e-5f
#define GOLDEN_ATOL 1e-5f

#define MAX_INPUTS 10

static unsigned long long seed = 42;

/* A tensor of the given shape filled with offset + scale * uniform[-1, 1). */
static Tensor *rand_tensor(int ndim, const int64_t *shape, float scale, float offset) {
    Tensor *x = tensor_new(ndim, shape);
    for (int64_t i = 0; x && i < x->numel; i++) x->data[i] = offset + scale * harness_rand(&seed);
    return x;
}
#define RAND(scale, ...)                                                                           \
    rand_tensor((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),                         \
                (int64_t[]){__VA_ARGS__}, scale, 0.0f)

/* Moves every value at least `margin` away from the kink at k (for relu and clamp). */
static void push_away(Tensor *x, float k, float margin) {
    for (int64_t i = 0; i < x->numel; i++)
        if (fabsf(x->data[i] - k) < margin) x->data[i] = x->data[i] < k ? k - margin : k + margin;
}

/* ---- 1. finite differences through composite graphs ---------------------------------------- */

/* A graph from its inputs to one output y; the loss is sum(y * r). */
typedef Var *(*GraphFn)(Tape *t, Var **in);

typedef struct GradCase {
    const char *name;
    GraphFn build;
    int n_in;
    Tensor *in[MAX_INPUTS];
    bool wants_grad[MAX_INPUTS]; /* false for constants (rotary tables, running statistics) */
    Tensor *r;
} GradCase;

/* The loss in double from a graph run with grad off. */
static double case_loss(void *ctx) {
    GradCase *c = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *in[MAX_INPUTS];
    for (int i = 0; i < c->n_in; i++) in[i] = var_new(t, c->in[i], false);
    Var *y = c->build(t, in);
    double loss = 0.0;
    for (int64_t i = 0; y && i < y->value->numel; i++)
        loss += (double)y->value->data[i] * c->r->data[i];
    tape_free(t);
    return loss;
}

static void check_case(GradCase *c) {
    Tape *t = tape_new();
    Var *in[MAX_INPUTS];
    for (int i = 0; i < c->n_in; i++) in[i] = var_new(t, c->in[i], c->wants_grad[i]);
    Var *y = c->build(t, in);
    Error e = {{0}};
    if (tape_check(t, &e)) {
        CHECK(0, "%s: forward failed: %s", c->name, e.msg);
        tape_free(t);
        return;
    }
    c->r = rand_tensor(y->value->ndim, y->value->shape, 1.0f, 0.0f);
    Var *loss = ag_sum(t, ag_mul(t, y, var_new(t, c->r, false)));
    if (!loss || tape_backward(t, loss, &e)) {
        CHECK(0, "%s: backward failed: %s", c->name, loss ? e.msg : "no loss");
        tape_free(t);
        return;
    }
    for (int i = 0; i < c->n_in; i++) {
        if (!c->wants_grad[i]) continue;
        char what[96];
        snprintf(what, sizeof what, "%s d/d input %d", c->name, i);
        size_t n = (size_t)c->in[i]->numel;
        if (!in[i]->grad) {
            CHECK(0, "%s: no gradient", what);
            continue;
        }
        check_gradient(what, case_loss, c, c->in[i]->data, in[i]->grad->data, n, n / 40 + 1, FD_EPS,
                       FD_RTOL, FD_ATOL);
    }
    tape_free(t);
}

static void free_case(GradCase *c) {
    for (int i = 0; i < c->n_in; i++) tensor_free(c->in[i]);
    tensor_free(c->r);
}

/* x [2, 3, 5] -> linear [7] -> layernorm -> gelu (tanh) -> + v -> * s -> rmsnorm -> gelu ->
 * softmax. in: x, w, b, ln_w, ln_b, v, s, rms_w */
static Var *graph_dense(Tape *t, Var **in) {
    Var *h = ag_linear(t, in[0], in[1], in[2]);
    h = ag_gelu(t, ag_layernorm(t, h, in[3], in[4], 1e-5f), true);
    h = ag_mul_rows(t, ag_add_rows(t, h, in[5]), in[6]);
    h = ag_gelu(t, ag_rmsnorm(t, h, in[7], 1e-6f), false);
    return ag_softmax(t, h);
}

/* Self-attention with grouped keys, rotary embedding and padding, then a projection and a
 * residual. in: x [2, 5, 8], wq [8, 8], wk, wv [4, 8], wo [8, 8], cos, sin [5, 2] */
static Var *graph_self_attention(Tape *t, Var **in) {
    int64_t q_shape[4] = {2, 5, 2, 4}, kv_shape[4] = {2, 5, 1, 4};
    Var *q = ag_reshape(t, ag_linear(t, in[0], in[1], NULL), 4, q_shape);
    Var *k = ag_reshape(t, ag_linear(t, in[0], in[2], NULL), 4, kv_shape);
    Var *v = ag_reshape(t, ag_linear(t, in[0], in[3], NULL), 4, kv_shape);
    q = ag_rope(t, q, in[5], in[6], ROPE_ADJACENT);
    k = ag_rope(t, k, in[5], in[6], ROPE_ADJACENT);
    Var *a = ag_attention(t, q, k, v, 0.5f, false, (const int[]){5, 3});
    a = ag_reshape(t, a, 3, (int64_t[]){2, 5, 8});
    return ag_add(t, ag_linear(t, a, in[4], NULL), in[0]);
}

/* Causal cross-attention, 3 queries over 5 keys. in: q [1, 3, 2, 6], k, v [1, 5, 2, 6] */
static Var *graph_cross_attention(Tape *t, Var **in) {
    return ag_attention(t, in[0], in[1], in[2], 0.4f, true, NULL);
}

/* x [2, 4, 7, 5] -> conv 3x3 stride 2 -> groupnorm -> silu -> depthwise conv -> batchnorm ->
 * upsample -> bilinear resize to 5x9 -> + b2 per channel -> * bn_w per channel -> sigmoid.
 * in: x, w1, b1, gn_w, gn_b, w2, b2, bn_mean, bn_var, bn_w (b2 and bn_w are used twice) */
static Var *graph_conv(Tape *t, Var **in) {
    Var *h = ag_conv2d(t, in[0], in[1], in[2], 2, 1, 1);
    h = ag_silu(t, ag_groupnorm(t, h, 3, in[3], in[4], 1e-5f));
    h = ag_conv2d(t, h, in[5], in[6], 1, 1, 6);
    h = ag_batchnorm_eval(t, h, in[7], in[8], in[9], NULL, 1e-5f);
    h = ag_resize_bilinear(t, ag_upsample_nearest2x(t, h), 5, 9);
    h = ag_mul_channels(t, ag_add_channels(t, h, in[6]), in[9]);
    return ag_sigmoid(t, h);
}

/* x [2, 6, 3, 5] -> SiLU(GroupNorm(x)) in 3 groups, fused. in: x, w, b [6] */
static Var *graph_groupnorm_silu(Tape *t, Var **in) {
    return ag_groupnorm_silu(t, in[0], 3, in[1], in[2], 1e-5f);
}

/* relu, clamp, pow, scale, affine, log, mul (with both operands the same Var), add.
 * in: a, b (away from the kinks), c (positive) [3, 17] */
static Var *graph_pointwise(Tape *t, Var **in) {
    Var *relu = ag_relu(t, in[0]);
    Var *clamped = ag_affine(t, ag_clamp(t, in[1], -0.5f, 0.5f), -2.0f, 1.0f);
    Var *power = ag_scale(t, ag_pow(t, in[2], 2.5f), 0.7f);
    Var *square = ag_mul(t, in[2], ag_log(t, ag_mul(t, in[2], in[2])));
    return ag_add(t, ag_add(t, ag_mul(t, relu, clamped), power), square);
}

/* reshape, permute (4-D and 5-D), transpose, slice, concat, matmul (shared and batched), sum,
 * mean. in: x [2, 3, 4, 5], w [3, 4] */
static Var *graph_structure(Tape *t, Var **in) {
    Var *p = ag_permute(t, in[0], (const int[]){2, 0, 3, 1}); /* [4, 2, 5, 3] */
    Var *back = ag_slice(t, p, 2, 2, 3), *front = ag_slice(t, p, 2, 0, 2);
    Var *rolled = ag_concat(t, (Var *[]){back, front}, 2, 2); /* [4, 2, 5, 3] */
    Var *m = ag_matmul(t, ag_reshape(t, rolled, 3, (int64_t[]){8, 5, 3}), in[1]); /* [8, 5, 4] */
    Var *mt = ag_transpose(t, m, 1, 2);                                            /* [8, 4, 5] */
    Var *mm = ag_matmul(t, mt, ag_reshape(t, p, 3, (int64_t[]){8, 5, 3}));         /* [8, 4, 3] */
    Var *five = ag_reshape(t, in[0], 5, (int64_t[]){2, 3, 2, 2, 5});
    five = ag_permute(t, five, (const int[]){4, 2, 0, 3, 1}); /* [5, 2, 2, 2, 3] */
    Var *parts[] = {
        ag_reshape(t, mm, 1, (int64_t[]){96}),
        ag_reshape(t, ag_slice(t, p, 0, 1, 2), 1, (int64_t[]){60}),
        ag_reshape(t, five, 1, (int64_t[]){120}),
        ag_sum(t, in[0]),
        ag_mean(t, p),
    };
    return ag_concat(t, parts, 5, 0);
}

/* FLUX.2's modulation, per-sample vectors on every token: x [2, 5, 6] -> layernorm (no affine)
 * * (1 + scale[b]) + shift[b] -> x + gate[b] * that -> mean(y^2).
 * in: x, scale, shift, gate [2, 6] */
static Var *graph_modulation(Tape *t, Var **in) {
    Var *y = ag_layernorm(t, in[0], NULL, NULL, 1e-6f);
    y = ag_mul(t, y, ag_repeat_rows(t, ag_affine(t, in[1], 1.0f, 1.0f), 5));
    y = ag_add(t, y, ag_repeat_rows(t, in[2], 5));
    y = ag_add(t, in[0], ag_mul(t, y, ag_repeat_rows(t, in[3], 5)));
    return ag_mean(t, ag_pow(t, y, 2.0f));
}

static void test_finite_differences(void) {
    GradCase dense = {"dense",
                      graph_dense,
                      8,
                      {RAND(1, 2, 3, 5), RAND(0.5f, 7, 5), RAND(0.5f, 7), RAND(0.5f, 7),
                       RAND(0.5f, 7), RAND(0.5f, 7), RAND(1, 7), RAND(1, 7)},
                      {true, true, true, true, true, true, true, true},
                      NULL};
    GradCase self = {"self-attention", graph_self_attention, 7,
                     {RAND(1, 2, 5, 8), RAND(0.5f, 8, 8), RAND(0.5f, 4, 8), RAND(0.5f, 4, 8),
                      RAND(0.5f, 8, 8), RAND(1, 5, 2), RAND(1, 5, 2)},
                     {true, true, true, true, true, false, false}, NULL};
    GradCase cross = {"cross-attention", graph_cross_attention, 3,
                      {RAND(1, 1, 3, 2, 6), RAND(1, 1, 5, 2, 6), RAND(1, 1, 5, 2, 6)},
                      {true, true, true}, NULL};
    GradCase conv = {"conv", graph_conv, 10,
                     {RAND(1, 2, 4, 7, 5), RAND(0.3f, 6, 4, 3, 3), RAND(0.3f, 6), RAND(0.5f, 6),
                      RAND(0.5f, 6), RAND(0.5f, 6, 1, 3, 3), RAND(0.5f, 6), RAND(0.5f, 6),
                      rand_tensor(1, (int64_t[]){6}, 0.4f, 1.0f), RAND(1, 6)},
                     {true, true, true, true, true, true, true, false, false, true}, NULL};
    GradCase pointwise = {
        "pointwise",
        graph_pointwise,
        3,
        {RAND(1, 3, 17), RAND(1, 3, 17), rand_tensor(2, (int64_t[]){3, 17}, 0.5f, 1.0f)},
        {true, true, true},
        NULL};
    push_away(pointwise.in[0], 0.0f, 0.05f);
    push_away(pointwise.in[1], -0.5f, 0.05f);
    push_away(pointwise.in[1], 0.5f, 0.05f);
    GradCase structure = {"structure", graph_structure, 2, {RAND(1, 2, 3, 4, 5), RAND(1, 3, 4)},
                          {true, true}, NULL};
    GradCase gn_silu = {"groupnorm_silu", graph_groupnorm_silu, 3,
                        {RAND(1, 2, 6, 3, 5), RAND(0.5f, 6), RAND(0.5f, 6)}, {true, true, true},
                        NULL};
    GradCase modulation = {"modulation", graph_modulation, 4,
                           {RAND(1, 2, 5, 6), RAND(0.3f, 2, 6), RAND(0.3f, 2, 6), RAND(0.5f, 2, 6)},
                           {true, true, true, true}, NULL};
    GradCase *cases[] = {&dense, &self, &cross, &conv, &pointwise, &structure, &gn_silu,
                         &modulation};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        check_case(cases[i]);
        free_case(cases[i]);
    }
}

/* Forward values of the structural ops, which no kernel test covers. */
static void test_structure_values(void) {
    Tape *t = tape_new();
    Tensor *xt = RAND(1, 2, 3, 4);
    Var *x = var_new(t, xt, false);
    Var *p = ag_permute(t, x, (const int[]){2, 0, 1}); /* [4, 2, 3] */
    int bad = 0;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            for (int k = 0; k < 4; k++)
                bad += p->value->data[(k * 2 + i) * 3 + j] != xt->data[(i * 3 + j) * 4 + k];
    CHECK(bad == 0, "permute [2, 3, 4] by (2, 0, 1) moves every element where it belongs");
    Var *parts[] = {ag_slice(t, x, 1, 0, 1), ag_slice(t, x, 1, 1, 2)};
    Var *joined = ag_concat(t, parts, 2, 1);
    CHECK(joined && memcmp(joined->value->data, xt->data, sizeof(float) * 24) == 0,
          "concat of the slices along dim 1 gives the tensor back");
    Var *r = ag_reshape(t, x, 2, (int64_t[]){6, 4});
    CHECK(r && r->value->data == xt->data, "reshape is a view: no copy");
    tape_free(t);
    tensor_free(xt);
}

/* ---- 2. accumulation ------------------------------------------------------------------------- */

/* loss = mean(silu(x w^T + b)^2) */
static Var *small_loss(Tape *t, Var *x, Var *w, Var *b) {
    return ag_mean(t, ag_pow(t, ag_silu(t, ag_linear(t, x, w, b)), 2.0f));
}

static void test_accumulation(void) {
    Tensor *xt = RAND(1, 4, 6), *wt = RAND(0.5f, 3, 6), *bt = RAND(0.5f, 3);
    Tape *once = tape_new(), *twice = tape_new();
    Error e = {{0}};
    Var *w1 = var_new(once, wt, true), *b1 = var_new(once, bt, true);
    int rc = tape_backward(once, small_loss(once, var_new(once, xt, false), w1, b1), &e);
    Var *w2 = var_new(twice, wt, true), *b2 = var_new(twice, bt, true);
    for (int pass = 0; pass < 2; pass++)
        rc |= tape_backward(twice, small_loss(twice, var_new(twice, xt, false), w2, b2), &e);
    CHECK(rc == 0, "two backward passes on one tape run: %s", e.msg);
    int bad = 0;
    for (int i = 0; rc == 0 && i < 18; i++) bad += w2->grad->data[i] != 2.0f * w1->grad->data[i];
    for (int i = 0; rc == 0 && i < 3; i++) bad += b2->grad->data[i] != 2.0f * b1->grad->data[i];
    CHECK(rc == 0 && bad == 0,
          "weight and bias gradients after two passes are exactly twice one pass");
    var_zero_grad(w2);
    rc = tape_backward(twice, small_loss(twice, var_new(twice, xt, false), w2, b2), &e);
    CHECK(rc == 0 && memcmp(w2->grad->data, w1->grad->data, 18 * sizeof(float)) == 0,
          "after var_zero_grad a pass starts afresh");
    tape_free(once);
    tape_free(twice);
    tensor_free(xt);
    tensor_free(wt);
    tensor_free(bt);
}

/* ---- 3. no-grad mode ---------------------------------------------------------------------- */

static void test_no_grad(void) {
    Tensor *xt = RAND(1, 4, 6), *wt = RAND(0.5f, 3, 6), *bt = RAND(0.5f, 3);
    Tape *rec = tape_new(), *off = tape_new(), *consts = tape_new();
    tape_set_grad(off, false);
    Var *y_rec =
        small_loss(rec, var_new(rec, xt, true), var_new(rec, wt, true), var_new(rec, bt, true));
    Var *y_off =
        small_loss(off, var_new(off, xt, true), var_new(off, wt, true), var_new(off, bt, true));
    Var *y_const = small_loss(consts, var_new(consts, xt, false), var_new(consts, wt, false),
                              var_new(consts, bt, false));
    TapeStats s_rec = tape_stats(rec), s_off = tape_stats(off), s_const = tape_stats(consts);
    CHECK(s_rec.recorded_nodes == 4, "grad on: 4 nodes recorded (got %lld)",
          (long long)s_rec.recorded_nodes);
    CHECK(s_off.recorded_nodes == 0 && s_off.saved_bytes == 0 && !y_off->requires_grad,
          "grad off: nothing recorded or saved");
    CHECK(s_const.recorded_nodes == 0 && s_const.saved_bytes == 0,
          "grad on but no input requires grad: nothing recorded");
    CHECK(y_rec->value->data[0] == y_off->value->data[0] &&
              y_rec->value->data[0] == y_const->value->data[0],
          "the same loss with and without recording");
    Error e = {{0}};
    CHECK(tape_backward(off, y_off, &e) != 0 && strstr(e.msg, "requires grad"),
          "backward of an unrecorded loss fails: %s", e.msg);
    tape_free(rec);
    tape_free(off);
    tape_free(consts);
    tensor_free(xt);
    tensor_free(wt);
    tensor_free(bt);
}

/* ---- 4. checkpointing --------------------------------------------------------------------- */

typedef struct Block {
    Var *w1, *b1, *w2;
} Block;

/* x [rows, C] -> linear -> silu -> * x -> layernorm -> linear: x is used twice inside. */
static Var *block(Tape *t, Var **in, void *ctx) {
    Block *p = ctx;
    Var *h = ag_silu(t, ag_linear(t, in[0], p->w1, p->b1));
    h = ag_layernorm(t, ag_mul(t, h, in[0]), NULL, NULL, 1e-5f);
    return ag_linear(t, h, p->w2, NULL);
}

/* The same block run as a checkpoint inside a checkpoint. */
static Var *nested_block(Tape *t, Var **in, void *ctx) {
    Var *inner = ag_checkpoint(t, block, ctx, in, 1);
    return ag_add(t, inner, ag_scale(t, in[0], 0.5f));
}

enum Mode { PLAIN, CHECKPOINT, NESTED };

/* x -> scale -> four residual blocks sharing one set of weights -> mean(sigmoid(h)^2). */
static Var *block_model(Tape *t, Var *x, Block *p, enum Mode mode) {
    Var *h = ag_scale(t, x, 1.5f);
    for (int i = 0; i < 4; i++) {
        Var *in[] = {h};
        Var *out = mode == PLAIN        ? block(t, in, p)
                   : mode == CHECKPOINT ? ag_checkpoint(t, block, p, in, 1)
                                        : ag_checkpoint(t, nested_block, p, in, 1);
        if (mode == NESTED) out = ag_add(t, ag_scale(t, h, -0.5f), out);
        h = ag_add(t, h, out);
    }
    return ag_mean(t, ag_pow(t, ag_sigmoid(t, h), 2.0f));
}

typedef struct BlockRun {
    float loss;
    Tensor *dx, *dw1, *db1, *dw2;
    size_t peak;
} BlockRun;

static BlockRun run_blocks(Tensor *xt, Tensor *w1, Tensor *b1, Tensor *w2, enum Mode mode) {
    Tape *t = tape_new();
    Block p = {var_new(t, w1, true), var_new(t, b1, true), var_new(t, w2, true)};
    Var *x = var_new(t, xt, true);
    Var *loss = block_model(t, x, &p, mode);
    Error e = {{0}};
    BlockRun r = {0};
    if (!loss || tape_backward(t, loss, &e)) {
        CHECK(0, "block model (mode %d): %s", (int)mode, e.msg);
    } else {
        r = (BlockRun){.loss = loss->value->data[0], .dx = tensor_clone(x->grad),
                       .dw1 = tensor_clone(p.w1->grad), .db1 = tensor_clone(p.b1->grad),
                       .dw2 = tensor_clone(p.w2->grad), .peak = tape_stats(t).peak_bytes};
    }
    tape_free(t);
    return r;
}

static bool same_bits(const Tensor *a, const Tensor *b) {
    return a && b && tensor_same_shape(a, b) && memcmp(a->data, b->data, (size_t)a->numel * 4) == 0;
}

static void free_run(BlockRun *r) {
    tensor_free(r->dx);
    tensor_free(r->dw1);
    tensor_free(r->db1);
    tensor_free(r->dw2);
}

static void test_checkpoint(void) {
    Tensor *xt = RAND(1, 150, 40), *w1 = RAND(0.2f, 40, 40), *b1 = RAND(0.3f, 40),
           *w2 = RAND(0.2f, 40, 40);
    BlockRun plain = run_blocks(xt, w1, b1, w2, PLAIN);
    BlockRun ckpt = run_blocks(xt, w1, b1, w2, CHECKPOINT);
    BlockRun nested = run_blocks(xt, w1, b1, w2, NESTED);
    CHECK(plain.loss == ckpt.loss, "checkpoint: the same loss (%.9g, %.9g)", plain.loss, ckpt.loss);
    CHECK(same_bits(plain.dx, ckpt.dx) && same_bits(plain.dw1, ckpt.dw1) &&
              same_bits(plain.db1, ckpt.db1) && same_bits(plain.dw2, ckpt.dw2),
          "checkpoint: input and parameter gradients bitwise equal to the plain graph");
    CHECK(ckpt.peak < plain.peak, "checkpoint: peak memory %zu bytes below the plain graph's %zu",
          ckpt.peak, plain.peak);
    /* the nested model computes h + block(h) through another graph: equal up to rounding */
    float diff = 0.0f;
    for (int64_t i = 0; nested.dx && plain.dx && i < plain.dx->numel; i++)
        diff = fmaxf(diff, fabsf(nested.dx->data[i] - plain.dx->data[i]));
    CHECK(nested.dx && diff < 1e-5f,
          "nested checkpoints: input gradient within %g of the plain graph's", diff);
    free_run(&plain);
    free_run(&ckpt);
    free_run(&nested);

    /* with grad off a checkpoint only bounds memory: nothing recorded, the scratch tape is gone */
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Block p = {var_new(t, w1, true), var_new(t, b1, true), var_new(t, w2, true)};
    Var *x = var_new(t, xt, true);
    Var *y = ag_checkpoint(t, block, &p, &x, 1);
    TapeStats s = tape_stats(t);
    CHECK(y && s.recorded_nodes == 0 && s.value_bytes == (size_t)y->value->numel * 4,
          "checkpoint with grad off: nothing recorded, only the output kept (%zu bytes)",
          s.value_bytes);
    tape_free(t);

    /* backward releases a checkpoint's output before recomputing it, unless it is kept */
    t = tape_new();
    p = (Block){var_new(t, w1, false), var_new(t, b1, false), var_new(t, w2, false)};
    x = var_new(t, xt, true);
    y = ag_checkpoint(t, block, &p, &x, 1);
    var_keep(y);
    Tensor *before = y ? tensor_clone(y->value) : NULL;
    Error e = {{0}};
    int rc = y ? tape_backward(t, ag_mean(t, ag_pow(t, y, 2.0f)), &e) : -1;
    CHECK(rc == 0 && y->value && same_bits(before, y->value),
          "checkpoint: a kept output stays readable and unchanged after backward %s", e.msg);
    tensor_free(before);
    tape_free(t);
    tensor_free(xt);
    tensor_free(w1);
    tensor_free(b1);
    tensor_free(w2);
}

/* The fused op gives ag_silu(ag_groupnorm(..)) bit for bit forward, and its gradients to
 * rounding (its backward sums in another order). */
static void test_groupnorm_silu_matches(void) {
    Tensor *xt = RAND(1, 2, 8, 5, 7), *wt = RAND(0.5f, 8), *bt = RAND(0.5f, 8);
    Tensor *y[2] = {0}, *dx[2] = {0}, *dw[2] = {0};
    for (int fused = 0; fused < 2; fused++) {
        Tape *t = tape_new();
        Var *x = var_new(t, xt, true), *w = var_new(t, wt, true), *b = var_new(t, bt, false);
        Var *h = fused ? ag_groupnorm_silu(t, x, 4, w, b, 1e-6f)
                       : ag_silu(t, ag_groupnorm(t, x, 4, w, b, 1e-6f));
        if (h) y[fused] = tensor_clone(h->value);
        Error e = {{0}};
        if (!h || tape_backward(t, ag_mean(t, ag_pow(t, h, 2.0f)), &e)) {
            CHECK(0, "groupnorm_silu (fused %d): %s", fused, e.msg);
        } else {
            dx[fused] = tensor_clone(x->grad);
            dw[fused] = tensor_clone(w->grad);
        }
        tape_free(t);
    }
    CHECK(same_bits(y[0], y[1]), "groupnorm_silu: the same bits as silu(groupnorm)");
    float diff = 0.0f;
    for (int64_t i = 0; dx[0] && dx[1] && i < dx[0]->numel; i++)
        diff = fmaxf(diff, fabsf(dx[0]->data[i] - dx[1]->data[i]));
    for (int64_t i = 0; dw[0] && dw[1] && i < dw[0]->numel; i++)
        diff = fmaxf(diff, fabsf(dw[0]->data[i] - dw[1]->data[i]));
    CHECK(dx[0] && dx[1] && dw[0] && dw[1] && diff < 1e-6f,
          "groupnorm_silu: gradients within %g of silu(groupnorm)'s", diff);
    for (int i = 0; i < 2; i++) {
        tensor_free(y[i]);
        tensor_free(dx[i]);
        tensor_free(dw[i]);
    }
    tensor_free(xt);
    tensor_free(wt);
    tensor_free(bt);
}

/* ---- 5. memory released by backward ------------------------------------------------------ */

static void test_backward_frees(void) {
    Tape *t = tape_new();
    Tensor *wt = RAND(0.5f, 8, 8);
    Var *x = var_take(t, RAND(1, 2, 8, 3, 3), true); /* owned by the tape */
    Var *w = var_new(t, wt, true);                  /* borrowed */
    Var *h = ag_groupnorm(t, x, 4, NULL, NULL, 1e-5f);
    h = ag_reshape(t, ag_permute(t, h, (const int[]){0, 2, 3, 1}), 4, (int64_t[]){2, 9, 2, 4});
    h = ag_attention(t, h, h, h, 0.5f, false, (const int[]){9, 4});
    h = ag_layernorm(t, ag_linear(t, ag_reshape(t, h, 3, (int64_t[]){2, 9, 8}), w, NULL), NULL,
                     NULL, 1e-5f);
    Var *loss = ag_mean(t, ag_pow(t, h, 2.0f));
    TapeStats before = tape_stats(t);
    Error e = {{0}};
    int rc = tape_backward(t, loss, &e);
    TapeStats after = tape_stats(t);
    CHECK(rc == 0, "backward runs: %s", e.msg);
    CHECK(before.saved_bytes > 0 && before.pending_nodes > 0,
          "before backward: %zu bytes saved, %lld nodes", before.saved_bytes,
          (long long)before.pending_nodes);
    CHECK(after.saved_bytes == 0 && after.pending_nodes == 0,
          "after backward: nothing saved, no nodes");
    size_t leaf_bytes = 144 * 4, loss_bytes = 4;
    CHECK(after.value_bytes == leaf_bytes + loss_bytes,
          "after backward only the owned leaf and the loss hold values (%zu bytes)",
          after.value_bytes);
    CHECK(after.grad_bytes == leaf_bytes + 64 * 4 + loss_bytes,
          "after backward only leaf gradients and the loss's remain (%zu bytes)", after.grad_bytes);
    CHECK(loss->value && h->value == NULL, "the loss stays readable, intermediates are released");
    CHECK(after.peak_bytes >= before.value_bytes + before.saved_bytes,
          "the peak covers the forward");
    Var *again = ag_relu(t, h);
    CHECK(again == NULL && tape_check(t, &e) != 0 && strstr(e.msg, "released"),
          "using a released intermediate fails: %s", e.msg);
    tape_free(t);
    tensor_free(wt);

    t = tape_new();
    Tensor *xt = RAND(1, 3, 4);
    Var *kept = ag_silu(t, var_new(t, xt, true));
    var_keep(kept);
    rc = tape_backward(t, ag_sum(t, kept), &e);
    CHECK(rc == 0 && kept->value != NULL,
          "var_keep keeps an intermediate's value through backward");
    rc = tape_backward(t, ag_sum(t, kept), &e);
    CHECK(rc == 0 && tape_stats(t).pending_nodes == 0, "a kept value can start another graph");
    tape_free(t);

    /* a loss that is a view keeps the data it views */
    t = tape_new();
    Var *sum = ag_sum(t, ag_silu(t, var_new(t, xt, true)));
    float want = sum->value->data[0];
    Var *view = ag_reshape(t, sum, 2, (int64_t[]){1, 1});
    rc = tape_backward(t, view, &e);
    CHECK(rc == 0 && view->value && view->value->data == sum->value->data &&
              view->value->data[0] == want,
          "a loss that views another Var stays readable after backward");
    tape_free(t);
    tensor_free(xt);
}

/* ---- 6. errors ---------------------------------------------------------------------------- */

/* Runs op on a fresh tape over the given inputs; it must fail with a message naming `word`. */
typedef Var *(*OpFn)(Tape *t, Var **in);

static void expect_failure(const char *what, OpFn op, int n, Tensor **in, const bool *requires_grad,
                           const char *word) {
    Tape *t = tape_new();
    Var *vars[MAX_INPUTS];
    for (int i = 0; i < n; i++) vars[i] = var_new(t, in[i], requires_grad && requires_grad[i]);
    Var *y = op(t, vars);
    Error e = {{0}};
    int rc = tape_check(t, &e);
    CHECK(y == NULL && rc != 0 && strstr(e.msg, word), "%s fails: \"%s\"", what, e.msg);
    tape_free(t);
}

static Var *op_linear(Tape *t, Var **in) { return ag_linear(t, in[0], in[1], NULL); }
static Var *op_linear_bias(Tape *t, Var **in) { return ag_linear(t, in[0], in[1], in[2]); }
static Var *op_matmul(Tape *t, Var **in) { return ag_matmul(t, in[0], in[1]); }
static Var *op_conv(Tape *t, Var **in) { return ag_conv2d(t, in[0], in[1], NULL, 1, 1, 1); }
static Var *op_conv_groups(Tape *t, Var **in) { return ag_conv2d(t, in[0], in[1], NULL, 1, 1, 3); }
static Var *op_attention(Tape *t, Var **in) {
    return ag_attention(t, in[0], in[1], in[1], 1.0f, false, NULL);
}
static Var *op_attention_valid(Tape *t, Var **in) {
    return ag_attention(t, in[0], in[0], in[0], 1.0f, false, (const int[]){7});
}
static Var *op_rope(Tape *t, Var **in) { return ag_rope(t, in[0], in[1], in[1], ROPE_ADJACENT); }
static Var *op_layernorm(Tape *t, Var **in) { return ag_layernorm(t, in[0], in[1], NULL, 1e-5f); }
static Var *op_groupnorm(Tape *t, Var **in) { return ag_groupnorm(t, in[0], 3, NULL, NULL, 1e-5f); }
static Var *op_groupnorm_silu(Tape *t, Var **in) {
    return ag_groupnorm_silu(t, in[0], 3, NULL, NULL, 1e-5f);
}
static Var *op_batchnorm(Tape *t, Var **in) {
    return ag_batchnorm_eval(t, in[0], in[1], in[1], NULL, NULL, 1e-5f);
}
static Var *op_add(Tape *t, Var **in) { return ag_add(t, in[0], in[1]); }
static Var *op_add_rows(Tape *t, Var **in) { return ag_add_rows(t, in[0], in[1]); }
static Var *op_repeat_rows(Tape *t, Var **in) { return ag_repeat_rows(t, in[0], 4); }
static Var *op_mul_channels(Tape *t, Var **in) { return ag_mul_channels(t, in[0], in[1]); }
static Var *op_resize(Tape *t, Var **in) { return ag_resize_bilinear(t, in[0], 0, 4); }
static Var *op_upsample(Tape *t, Var **in) { return ag_upsample_nearest2x(t, in[0]); }
static Var *op_clamp(Tape *t, Var **in) { return ag_clamp(t, in[0], 1.0f, -1.0f); }
static Var *op_reshape(Tape *t, Var **in) { return ag_reshape(t, in[0], 2, (int64_t[]){5, 5}); }
static Var *op_permute(Tape *t, Var **in) { return ag_permute(t, in[0], (const int[]){0, 0}); }
static Var *op_transpose(Tape *t, Var **in) { return ag_transpose(t, in[0], 0, 2); }
static Var *op_slice(Tape *t, Var **in) { return ag_slice(t, in[0], 1, 3, 2); }
static Var *op_concat(Tape *t, Var **in) { return ag_concat(t, in, 2, 0); }
static Var *op_null(Tape *t, Var **in) { return ag_silu(t, ag_add(t, in[0], NULL)); }
static Var *failing_block(Tape *t, Var **in, void *ctx) {
    (void)ctx;
    return ag_matmul(t, in[0], in[0]);
}
static Var *op_checkpoint(Tape *t, Var **in) {
    return ag_checkpoint(t, failing_block, NULL, in, 1);
}

static void test_errors(void) {
    Tensor *m23 = RAND(1, 2, 3), *m34 = RAND(1, 3, 4), *m43 = RAND(1, 4, 3), *v3 = RAND(1, 3),
           *v4 = RAND(1, 4), *img = RAND(1, 1, 4, 5, 5), *w3 = RAND(1, 2, 3, 3, 3),
           *q = RAND(1, 1, 3, 2, 4), *k = RAND(1, 1, 3, 3, 4), *odd = RAND(1, 1, 3, 2, 5),
           *table = RAND(1, 3, 2), *table3 = RAND(1, 2, 3, 3);
    expect_failure("linear of [2, 3] with a [3, 4] weight", op_linear, 2,
                   (Tensor *[]){m23, m34}, NULL, "linear");
    expect_failure("linear with a [3] bias for 4 outputs", op_linear_bias, 3,
                   (Tensor *[]){m23, m43, v3}, NULL, "bias");
    expect_failure("matmul [2, 3] by [4, 3]", op_matmul, 2, (Tensor *[]){m23, m43}, NULL, "matmul");
    expect_failure("conv2d with 3 weight channels on 4", op_conv, 2, (Tensor *[]){img, w3}, NULL,
                   "conv2d");
    expect_failure("conv2d with 4 channels in 3 groups", op_conv_groups, 2, (Tensor *[]){img, w3},
                   NULL, "groups");
    expect_failure("attention with 3 key heads for 2 query heads", op_attention, 2,
                   (Tensor *[]){q, k}, NULL, "attention");
    expect_failure("attention with kv_valid past the keys", op_attention_valid, 1, (Tensor *[]){q},
                   NULL, "kv_valid");
    expect_failure("rope with an odd head dim", op_rope, 2, (Tensor *[]){odd, table}, NULL, "rope");
    expect_failure("rope with a table that requires grad", op_rope, 2, (Tensor *[]){q, table},
                   (const bool[]){false, true}, "constant");
    expect_failure("layernorm with a [4] weight over 3", op_layernorm, 2, (Tensor *[]){m23, v4},
                   NULL, "weight");
    expect_failure("groupnorm of 4 channels in 3 groups", op_groupnorm, 1, (Tensor *[]){img}, NULL,
                   "groups");
    expect_failure("groupnorm_silu of 4 channels in 3 groups", op_groupnorm_silu, 1,
                   (Tensor *[]){img}, NULL, "groups");
    expect_failure("batchnorm with running stats that require grad", op_batchnorm, 2,
                   (Tensor *[]){img, v4}, (const bool[]){false, true}, "constant");
    expect_failure("add of [2, 3] and [3, 4]", op_add, 2, (Tensor *[]){m23, m34}, NULL, "differ");
    expect_failure("add_rows of a [4] vector to [2, 3]", op_add_rows, 2, (Tensor *[]){m23, v4},
                   NULL, "add_rows");
    expect_failure("repeat_rows of a [2, 3, 3] tensor", op_repeat_rows, 1, (Tensor *[]){table3},
                   NULL, "repeat_rows");
    expect_failure("mul_channels of a [3] vector on 4 channels", op_mul_channels, 2,
                   (Tensor *[]){img, v3}, NULL, "mul_channels");
    expect_failure("resize to 0 rows", op_resize, 1, (Tensor *[]){img}, NULL, "resize");
    expect_failure("upsample of a vector", op_upsample, 1, (Tensor *[]){v3}, NULL, "upsample");
    expect_failure("clamp with lo above hi", op_clamp, 1, (Tensor *[]){v3}, NULL, "clamp");
    expect_failure("reshape of 6 elements to [5, 5]", op_reshape, 1, (Tensor *[]){m23}, NULL,
                   "reshape");
    expect_failure("permute with a repeated dim", op_permute, 1, (Tensor *[]){m23}, NULL,
                   "permute");
    expect_failure("transpose of a missing dim", op_transpose, 1, (Tensor *[]){m23}, NULL,
                   "transpose");
    expect_failure("slice past the end", op_slice, 1, (Tensor *[]){m23}, NULL, "slice");
    expect_failure("concat of [2, 3] and [3, 4] along dim 0", op_concat, 2, (Tensor *[]){m23, m34},
                   NULL, "concat");
    expect_failure("a NULL argument, and the op after it", op_null, 1, (Tensor *[]){m23}, NULL,
                   "add");
    expect_failure("a checkpoint whose function fails", op_checkpoint, 1, (Tensor *[]){m23}, NULL,
                   "checkpoint: matmul");

    /* backward misuse */
    Tape *t = tape_new();
    Error e = {{0}};
    Var *x = var_new(t, m23, true);
    Var *y = ag_silu(t, x);
    CHECK(tape_backward(t, y, &e) != 0 && strstr(e.msg, "scalar"),
          "backward of a [2, 3] loss fails: %s", e.msg);
    CHECK(tape_backward_from(t, y, v3, &e) != 0 && strstr(e.msg, "gradient"),
          "backward_from with a gradient of another shape fails: %s", e.msg);
    Var *loss = ag_sum(t, y);
    CHECK(tape_backward(t, loss, &e) == 0, "backward runs");
    CHECK(tape_backward(t, loss, &e) != 0 && strstr(e.msg, "consumed"),
          "a second backward of the same graph fails: %s", e.msg);
    Var *after = ag_silu(t, x);
    CHECK(after != NULL && tape_check(t, &e) == 0, "a backward error does not poison the tape");
    tape_free(t);

    /* a failed tape stays failed */
    t = tape_new();
    x = var_new(t, m23, false);
    CHECK(ag_add(t, x, var_new(t, m34, false)) == NULL, "a failing op returns NULL");
    CHECK(ag_silu(t, x) == NULL && var_new(t, m23, false) == NULL,
          "every later op on that tape returns NULL");
    tape_free(t);

    Tensor *all[] = {m23, m34, m43, v3, v4, img, w3, q, k, odd, table, table3};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tensor_free(all[i]);
}

/* ---- 7. PyTorch ---------------------------------------------------------------------------- */

/* A model of tools/golden_autograd.py over its parameters p and constants c, in the order of the
 * name lists below. */
typedef Var *(*GoldenModel)(Tape *t, Var **p, Var **c);

typedef struct GoldenCase {
    const char *prefix; /* of every tensor name in the file */
    const char *const *params;
    int n_params;
    const char *const *consts;
    int n_consts;
    GoldenModel model;
} GoldenCase;

#define MAX_GOLDEN 16

static const char *const attention_params[] = {"x",      "w1",     "b1",   "ln_w", "ln_b",
                                               "wq",     "wk",     "wv",   "wo",   "bo",
                                               "conv_w", "conv_b", "gn_w", "gn_b"};
static const char *const attention_consts[] = {"cos", "sin"};

/* x [1, 12, 8] -> linear 16 -> layernorm -> gelu -> attention (2 heads of 8, rope on q and k)
 * -> linear + residual -> image [1, 16, 3, 4] -> conv 3x3 -> groupnorm (4) -> silu ->
 * bilinear to 5x7 -> sigmoid -> mean(y^3) */
static Var *golden_model(Tape *t, Var **p, Var **c) {
    Var *h = ag_gelu(t, ag_layernorm(t, ag_linear(t, p[0], p[1], p[2]), p[3], p[4], 1e-5f), false);
    int64_t heads[4] = {1, 12, 2, 8};
    Var *q = ag_rope(t, ag_reshape(t, ag_linear(t, h, p[5], NULL), 4, heads), c[0], c[1], ROPE_ADJACENT);
    Var *k = ag_rope(t, ag_reshape(t, ag_linear(t, h, p[6], NULL), 4, heads), c[0], c[1], ROPE_ADJACENT);
    Var *v = ag_reshape(t, ag_linear(t, h, p[7], NULL), 4, heads);
    Var *a = ag_reshape(t, ag_attention(t, q, k, v, 1.0f / sqrtf(8.0f), false, NULL), 3,
                        (int64_t[]){1, 12, 16});
    h = ag_add(t, ag_linear(t, a, p[8], p[9]), h);
    Var *img = ag_reshape(t, ag_transpose(t, h, 1, 2), 4, (int64_t[]){1, 16, 3, 4});
    Var *conv = ag_silu(
        t, ag_groupnorm(t, ag_conv2d(t, img, p[10], p[11], 1, 1, 1), 4, p[12], p[13], 1e-6f));
    Var *s = ag_sigmoid(t, ag_resize_bilinear(t, conv, 5, 7));
    return ag_mean(t, ag_pow(t, s, 3.0f));
}

static const char *const detector_params[] = {"img", "conv_w", "conv_b", "bn_w", "bn_b", "dw_w",
                                              "dw_b", "rms_w", "scale", "shift", "mm"};
static const char *const detector_consts[] = {"inv_std", "offset", "bn_mean", "bn_var"};

/* img [1, 3, 6, 5] -> (img + 1) / 2 in [0, 1] -> * inv_std + offset per channel -> conv 3x3
 * stride 2 -> batchnorm -> relu -> upsample -> depthwise conv -> tokens [1, 36, 8] -> rmsnorm ->
 * * scale + shift -> matmul [1, 8, 6] -> halves stacked [1, 72, 3] -> softmax p ->
 * mean(-(1 - p)^2 log p) */
static Var *detector_model(Tape *t, Var **p, Var **c) {
    Var *x = ag_clamp(t, ag_affine(t, p[0], 0.5f, 0.5f), 0.0f, 1.0f);
    x = ag_add_channels(t, ag_mul_channels(t, x, c[0]), c[1]);
    x = ag_conv2d(t, x, p[1], p[2], 2, 1, 1);
    x = ag_relu(t, ag_batchnorm_eval(t, x, c[2], c[3], p[3], p[4], 1e-5f));
    x = ag_conv2d(t, ag_upsample_nearest2x(t, x), p[5], p[6], 1, 1, 8);
    Var *tokens =
        ag_reshape(t, ag_permute(t, x, (const int[]){0, 2, 3, 1}), 3, (int64_t[]){1, 36, 8});
    tokens = ag_add_rows(t, ag_mul_rows(t, ag_rmsnorm(t, tokens, p[7], 1e-6f), p[8]), p[9]);
    tokens = ag_matmul(t, tokens, p[10]);
    Var *halves[] = {ag_slice(t, tokens, 2, 3, 3), ag_slice(t, tokens, 2, 0, 3)};
    Var *prob = ag_softmax(t, ag_concat(t, halves, 2, 1));
    Var *focal = ag_mul(t, ag_pow(t, ag_affine(t, prob, -1.0f, 1.0f), 2.0f), ag_log(t, prob));
    return ag_mean(t, ag_scale(t, focal, -1.0f));
}

static const char *const modulation_params[] = {"x", "scale", "shift", "gate"};

/* graph_modulation over the golden's x, scale, shift, gate. */
static Var *modulation_model(Tape *t, Var **p, Var **c) {
    (void)c;
    return graph_modulation(t, p);
}

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

/* The tensor prefix+name of st as a new Tensor, or NULL (reported). */
static Tensor *golden_tensor(const SafeTensors *st, const char *prefix, const char *name) {
    char full[96];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    const StTensor *info = st_find(st, full);
    if (!info || info->ndim < 1 || info->ndim > TENSOR_MAX_DIMS) {
        CHECK(0, "golden: %s missing or not 1..5-D", full);
        return NULL;
    }
    float *values = golden_load(st, full, (size_t)info->numel);
    Tensor *x = values ? tensor_new(info->ndim, info->shape) : NULL;
    if (x) memcpy(x->data, values, (size_t)info->numel * sizeof(float));
    free(values);
    return x;
}

/* Runs one model on a tape and compares its loss and every parameter's gradient. */
static void check_golden_case(const SafeTensors *st, const GoldenCase *g) {
    Tape *t = tape_new();
    Tensor *owned[2 * MAX_GOLDEN] = {0};
    Var *p[MAX_GOLDEN], *c[MAX_GOLDEN];
    bool loaded = true;
    for (int i = 0; i < g->n_params + g->n_consts; i++) {
        bool param = i < g->n_params;
        owned[i] = golden_tensor(st, g->prefix, param ? g->params[i] : g->consts[i - g->n_params]);
        loaded = loaded && owned[i];
        if (param)
            p[i] = var_new(t, owned[i], true);
        else
            c[i - g->n_params] = var_new(t, owned[i], false);
    }
    Var *loss = loaded ? g->model(t, p, c) : NULL;
    Error e = {{0}};
    if (loaded && (!loss || tape_backward(t, loss, &e)))
        CHECK(0, "golden %smodel: %s", g->prefix, e.msg);
    for (int i = 0; loaded && loss && loss->grad && i <= g->n_params; i++) {
        char name[96];
        snprintf(name, sizeof name, i ? "%sgrad_%s" : "%sloss", g->prefix,
                 i ? g->params[i - 1] : "");
        const float *got = i ? p[i - 1]->grad->data : loss->value->data;
        size_t n = i ? (size_t)p[i - 1]->value->numel : 1;
        float *want = golden_load(st, name, n);
        if (want) check_close(name, got, want, n, GOLDEN_RTOL, GOLDEN_ATOL * max_abs(want, n));
        free(want);
    }
    tape_free(t);
    for (int i = 0; i < g->n_params + g->n_consts; i++) tensor_free(owned[i]);
}

static void test_golden(void) {
    SafeTensors *st = golden_open(GOLDEN_PATH);
    if (!st) return;
    GoldenCase cases[] = {
        {"", attention_params, 14, attention_consts, 2, golden_model},
        {"det.", detector_params, 11, detector_consts, 4, detector_model},
        {"mod.", modulation_params, 4, NULL, 0, modulation_model},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) check_golden_case(st, &cases[i]);
    st_close(st);
}

/* ag_linear_stored on a bf16 weight as stored: the value and the gradient to x of ag_linear on
 * the widened weight, bit for bit (ag_linear's backward is checked by finite differences above);
 * with PRECISION_BF16 the value is gemm_stored_bf16's and the gradient the same f32 one; a weight
 * of the wrong width is refused. */
static void test_linear_stored(void) {
    enum { B = 3, L = 5, K = 37, N = 11 };
    unsigned long long state = 5;
    uint16_t w16[N * K];
    Tensor *w = TENSOR_NEW(N, K), *x = TENSOR_NEW(B, L, K), *probe = TENSOR_NEW(B, L, N);
    for (int i = 0; i < N * K; i++) {
        w16[i] = f32_to_bf16(harness_rand(&state));
        w->data[i] = bf16_to_f32(w16[i]);
    }
    for (int64_t i = 0; i < x->numel; i++) x->data[i] = harness_rand(&state);
    for (int64_t i = 0; i < probe->numel; i++) probe->data[i] = harness_rand(&state);
    Tensor *grads[3] = {NULL}, *values[3] = {NULL};
    for (int k = 0; k < 3; k++) {
        Tape *t = tape_new();
        Var *xv = var_new(t, x, true), *wv = var_new(t, w, false);
        Precision precision = k == 1 ? PRECISION_F32 : PRECISION_BF16;
        Var *y = k == 0 ? ag_linear(t, xv, wv, NULL)
                        : ag_linear_stored(t, xv, w16, DTYPE_BF16, N, K, precision);
        Var *loss = ag_sum(t, ag_mul(t, y, var_new(t, probe, false)));
        Error e = {{0}};
        values[k] = y ? tensor_clone(y->value) : NULL; /* backward releases it */
        CHECK(tape_check(t, &e) == 0 && tape_backward(t, loss, &e) == 0, "linear %d: %s", k, e.msg);
        grads[k] = xv->grad ? tensor_clone(xv->grad) : NULL;
        var_zero_grad(xv);
        tape_free(t);
    }
    CHECK(values[0] && values[1] && !memcmp(values[0]->data, values[1]->data, B * L * N * 4),
          "ag_linear_stored (bf16) = ag_linear (widened), bit for bit");
    CHECK(grads[0] && grads[1] && !memcmp(grads[0]->data, grads[1]->data, B * L * K * 4),
          "and so is its gradient to x");
    float want[B * L * N];
    gemm_stored_bf16(false, true, B * L, N, K, 1.0f, x->data, K, w16, DTYPE_BF16, K, 0.0f, want,
                     N);
    CHECK(values[2] && !memcmp(values[2]->data, want, sizeof want) &&
              memcmp(values[2]->data, values[1]->data, sizeof want),
          "ag_linear_stored in bf16 = gemm_stored_bf16, bit for bit (not the f32 value)");
    CHECK(grads[0] && grads[2] && !memcmp(grads[0]->data, grads[2]->data, B * L * K * 4),
          "and its gradient to x is f32's");
    Tape *t = tape_new();
    Error e = {{0}};
    ag_linear_stored(t, var_new(t, x, false), w16, DTYPE_BF16, N, K + 1, PRECISION_F32);
    CHECK(tape_check(t, &e) == -1 && strstr(e.msg, "linear_stored"), "a wrong width: %s", e.msg);
    tape_free(t);
    for (int k = 0; k < 3; k++) tensor_free(values[k]), tensor_free(grads[k]);
    tensor_free(w), tensor_free(x), tensor_free(probe);
}

/* values dropped before backward */

/* The VAE's pattern: h = SiLU(GroupNorm(x)) feeds a convolution whose weight wants no gradient
 * and nothing else reads h; c reads on (a product), d feeds only an addition. Returns the input
 * gradient, and the values held before backward in *held. */
static Tensor *drop_graph(Tensor *xt, Tensor *wt, bool drop, size_t *held, bool *dropped) {
    Tape *t = tape_new();
    Var *x = var_new(t, xt, true), *w = var_new(t, wt, false);
    Var *h = ag_groupnorm_silu(t, x, 2, NULL, NULL, 1e-5f);
    Var *c = ag_conv2d(t, h, w, NULL, 1, 1, 1);
    Var *m = ag_mul(t, c, c);
    Var *d = ag_conv2d(t, m, w, NULL, 1, 1, 1);
    Var *s = ag_add(t, d, c);
    if (drop) {
        /* h and d are freed; c (read by the product's backward) and m (the product's output,
         * which its backward may read) stay */
        dropped[0] = var_drop(h);
        dropped[1] = var_drop(c);
        dropped[2] = var_drop(m);
        dropped[3] = var_drop(d);
    }
    Var *loss = ag_mean(t, ag_pow(t, s, 2.0f));
    *held = tape_stats(t).value_bytes;
    Error e = {{0}};
    Tensor *dx = NULL;
    if (!loss || tape_backward(t, loss, &e))
        CHECK(0, "drop graph (drop %d): %s", drop, e.msg);
    else
        dx = tensor_clone(x->grad);
    tape_free(t);
    return dx;
}

static void test_drop(void) {
    Tensor *xt = RAND(1, 1, 4, 6, 5), *wt = RAND(0.3f, 4, 4, 3, 3);
    size_t held_plain, held_drop;
    bool dropped[4] = {0};
    Tensor *plain = drop_graph(xt, wt, false, &held_plain, dropped);
    Tensor *with = drop_graph(xt, wt, true, &held_drop, dropped);
    CHECK(dropped[0] && !dropped[1] && !dropped[2] && dropped[3],
          "var_drop frees what no backward reads, keeps what one does (%d %d %d %d)", dropped[0],
          dropped[1], dropped[2], dropped[3]);
    CHECK(held_plain - held_drop == 2 * 120 * sizeof(float),
          "var_drop: two [1, 4, 6, 5] values fewer held before backward (%zu -> %zu bytes)",
          held_plain, held_drop);
    CHECK(plain && with && same_bits(plain, with),
          "var_drop: the input gradient bitwise as without drops");
    tensor_free(plain);
    tensor_free(with);

    /* what must stay: leaves, kept values, viewed values, a conv input whose weight wants a
     * gradient; and a dropped Var cannot be used again */
    Tape *t = tape_new();
    Var *x = var_new(t, xt, true), *w = var_new(t, wt, true);
    Var *h = ag_groupnorm_silu(t, x, 2, NULL, NULL, 1e-5f);
    Var *c = ag_conv2d(t, h, w, NULL, 1, 1, 1);
    Var *kept = ag_silu(t, c);
    var_keep(kept);
    Var *viewed = ag_scale(t, c, 2.0f);
    Var *view = ag_reshape(t, viewed, 2, (int64_t[]){4, 30});
    CHECK(view && !var_drop(x) && !var_drop(h) && !var_drop(kept) && !var_drop(viewed),
          "var_drop keeps leaves, dW's input, kept and viewed values");
    Var *u = ag_upsample_nearest2x(t, kept);
    Var *y = ag_conv2d(t, u, var_new(t, wt, false), NULL, 1, 1, 1);
    bool first = y && var_drop(u), second = var_drop(u);
    CHECK(first && !second && u->value && !u->value->data,
          "var_drop frees an upsampled conv input, once, and keeps its shape");
    Error e = {{0}};
    CHECK(tape_backward_from(t, u, u->value, &e) != 0 && strstr(e.msg, "dropped"),
          "a backward from a dropped Var fails: %s", e.msg);
    CHECK(ag_relu(t, u) == NULL && tape_check(t, &e) != 0 && strstr(e.msg, "dropped"),
          "an op on a dropped Var fails: %s", e.msg);
    tape_free(t);

    /* a weight that wants a gradient only after its input was dropped fails, not crashes */
    t = tape_new();
    Var *w2 = var_new(t, wt, false);
    Var *up = ag_upsample_nearest2x(t, var_new(t, xt, true));
    Var *yd = ag_conv2d(t, up, w2, NULL, 1, 1, 1);
    bool freed = var_drop(up);
    w2->requires_grad = true;
    CHECK(freed && tape_backward(t, ag_sum(t, yd), &e) != 0 && strstr(e.msg, "dropped"),
          "dW after its input was dropped fails: %s", e.msg);
    tape_free(t);

    /* with grad off nothing is recorded, so nothing reads: a decode can drop as it goes */
    t = tape_new();
    tape_set_grad(t, false);
    x = var_new(t, xt, true);
    h = ag_groupnorm_silu(t, x, 2, NULL, NULL, 1e-5f);
    c = ag_conv2d(t, h, var_new(t, wt, true), NULL, 1, 1, 1);
    CHECK(c && var_drop(h) && tape_stats(t).value_bytes == 120 * sizeof(float),
          "grad off: a dropped intermediate leaves only the result (%zu bytes)",
          tape_stats(t).value_bytes);
    tape_free(t);
    tensor_free(xt);
    tensor_free(wt);
}


int main(void) {
    test_finite_differences();
    test_groupnorm_silu_matches();
    test_linear_stored();
    test_structure_values();
    test_accumulation();
    test_no_grad();
    test_checkpoint();
    test_backward_frees();
    test_drop();
    test_errors();
    test_golden();
    return harness_finish("test_autograd");
}
