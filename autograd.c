/* autograd.c - the tape: records tensor.c ops, runs their backward in reverse.
 *
 * Every op is a forward wrapper (validate shapes, allocate the result, call the kernel, record a
 * node) next to its node's backward (call the backward kernel with the saved data).
 *
 * Contents: the tape and its memory accounting; Vars; recording; argument checks; backward;
 * checkpointing; then the ops, each forward beside its backward: matrix products, convolution,
 * attention and rotary embedding, normalisation, activations, resampling, elementwise,
 * structure. */
#include "autograd.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Loops here wake the threads only past this many floats (the kernels' threshold); each such
 * loop writes disjoint outputs. */
#define PARALLEL_MIN ((int64_t)1 << 15)

/* === the tape and its memory accounting === */

enum MemKind { MEM_VALUE, MEM_SAVED, MEM_GRAD, MEM_KINDS };

struct Tape {
    Tape *parent; /* a checkpoint's scratch tape reports its memory to the tape that made it */
    bool grad_enabled;
    bool failed;
    Error error;
    Var **vars;
    size_t n_vars, cap_vars;
    Node **nodes; /* in recording order */
    size_t n_nodes, cap_nodes;
    size_t live[MEM_KINDS];
    size_t peak;
    int64_t recorded;
};

typedef void (*BackwardFn)(Tape *t, Node *n);

/* The scalar settings of each kind of node. */
struct MatmulParams { int64_t M, N, K, batch; bool shared_b; };
/* A constant weight as it is stored (ag_linear_stored). */
struct StoredParams { const void *w; DType dtype; int64_t M, N, K; };
struct RopeParams { int batch, n, heads, head_dim; RopePairs pairs; };
struct NormParams { int64_t rows, C, HW; int groups; float eps; };
struct ResizeParams { int64_t planes, H, W, out_h, out_w; };
struct ScalarParams { float a, b; bool flag; };
struct WindowParams { int64_t outer, inner, offset; int dim; }; /* x viewed as [outer, D, inner] */

/* One recorded op. `in` holds the op's Var arguments in a fixed order per op (NULL for absent
 * optional ones); `saved` the extra tensors its backward needs; `p` its scalar settings. */
struct Node {
    BackwardFn backward;
    Var *out;
    Tensor *saved[2];
    int *kv_valid; /* attention's copy of the caller's valid key counts */
    union {
        struct MatmulParams mm;
        struct StoredParams stored;
        Conv2dShape conv;
        struct { AttentionShape shape; float scale; } attn;
        struct RopeParams rope;
        struct NormParams norm;
        struct ResizeParams resize;
        struct ScalarParams scalar;
        struct WindowParams window;
        int perm[TENSOR_MAX_DIMS];
        struct { CheckpointFn fn; void *ctx; } checkpoint;
    } p;
    int n_in;
    Var *in[];
};

static size_t tensor_bytes(const Tensor *x) { return (size_t)x->numel * sizeof(float); }

/* Adds or removes bytes of one kind on t and on every tape above it. */
static void account(Tape *t, enum MemKind kind, size_t bytes, bool add) {
    for (; t; t = t->parent) {
        t->live[kind] = add ? t->live[kind] + bytes : t->live[kind] - bytes;
        size_t total = t->live[MEM_VALUE] + t->live[MEM_SAVED] + t->live[MEM_GRAD];
        if (total > t->peak) t->peak = total;
    }
}

/* Records the first failure in t. */
static void fail_v(Tape *t, const char *fmt, va_list ap) {
    if (!t || t->failed) return;
    error_setv(&t->error, fmt, ap);
    t->failed = true;
}

/* Records the first failure in t and returns NULL, so that an op can `return fail(...)`. */
static void *fail(Tape *t, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void *fail(Tape *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail_v(t, fmt, ap);
    va_end(ap);
    return NULL;
}

/* The same for a check that answers whether its arguments are good: records, returns false. */
static bool refuse(Tape *t, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static bool refuse(Tape *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail_v(t, fmt, ap);
    va_end(ap);
    return false;
}

/* A zeroed tensor counted as `kind` on t; NULL (and t failed) when it cannot be made. */
static Tensor *tape_tensor(Tape *t, enum MemKind kind, int ndim, const int64_t *shape) {
    Tensor *x = tensor_new(ndim, shape);
    if (!x) {
        Tensor header = {.ndim = ndim};
        memcpy(header.shape, shape, (size_t)ndim * sizeof *shape);
        char s[64];
        return fail(t, "cannot allocate a tensor %s (out of memory?)",
                    tensor_shape_str(&header, s, sizeof s));
    }
    account(t, kind, tensor_bytes(x), true);
    return x;
}

static void tape_tensor_free(Tape *t, enum MemKind kind, Tensor *x) {
    if (!x) return;
    if (x->owns_data) account(t, kind, tensor_bytes(x), false);
    tensor_free(x);
}

static Tape *tape_child(Tape *parent, bool grad_enabled) {
    Tape *t = calloc(1, sizeof *t);
    if (!t) return fail(parent, "out of memory (a tape)");
    t->parent = parent;
    t->grad_enabled = grad_enabled;
    return t;
}

Tape *tape_new(void) { return tape_child(NULL, true); }

static void node_free(Tape *t, Node *n) {
    for (int i = 0; i < 2; i++) tape_tensor_free(t, MEM_SAVED, n->saved[i]);
    if (n->kv_valid) account(t, MEM_SAVED, (size_t)n->p.attn.shape.batch * sizeof(int), false);
    free(n->kv_valid);
    if (n->out->producer == n) n->out->producer = NULL;
    free(n);
}

static void var_release_value(Var *v) {
    if (v->owns_value) tape_tensor_free(v->tape, MEM_VALUE, v->value);
    v->value = NULL;
    v->owns_value = false;
}

static void var_release_grad(Var *v) {
    tape_tensor_free(v->tape, MEM_GRAD, v->grad);
    v->grad = NULL;
}

void tape_free(Tape *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n_nodes; i++) node_free(t, t->nodes[i]);
    for (size_t i = 0; i < t->n_vars; i++) {
        var_release_value(t->vars[i]);
        var_release_grad(t->vars[i]);
        free(t->vars[i]);
    }
    free(t->nodes);
    free(t->vars);
    free(t);
}

void tape_set_grad(Tape *t, bool enabled) { t->grad_enabled = enabled; }
bool tape_grad_enabled(const Tape *t) { return t->grad_enabled; }

int tape_check(const Tape *t, Error *e) {
    if (!t) return error_set(e, "no tape (out of memory?)");
    return t->failed ? error_set(e, "%s", t->error.msg) : 0;
}

Var *tape_fail(Tape *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail_v(t, fmt, ap);
    va_end(ap);
    return NULL;
}

TapeStats tape_stats(const Tape *t) {
    return (TapeStats){
        .value_bytes = t->live[MEM_VALUE],
        .saved_bytes = t->live[MEM_SAVED],
        .grad_bytes = t->live[MEM_GRAD],
        .peak_bytes = t->peak,
        .pending_nodes = (int64_t)t->n_nodes,
        .recorded_nodes = t->recorded,
    };
}

/* Appends item to a growable array of pointers; false when out of memory. */
static bool push(void ***items, size_t *n, size_t *cap, void *item) {
    if (*n == *cap) {
        size_t grown = *cap ? 2 * *cap : 64;
        void **more = realloc(*items, grown * sizeof *more);
        if (!more) return false;
        *items = more;
        *cap = grown;
    }
    (*items)[(*n)++] = item;
    return true;
}

/* === Vars === */

/* A Var of t over value (owned or borrowed). When it cannot be made an owned value is freed. */
static Var *var_add(Tape *t, Tensor *value, bool owns, bool requires_grad, bool leaf) {
    Var *v = calloc(1, sizeof *v);
    if (!v || !push((void ***)&t->vars, &t->n_vars, &t->cap_vars, v)) {
        free(v);
        if (owns) tape_tensor_free(t, MEM_VALUE, value);
        return fail(t, "out of memory (a Var)");
    }
    *v = (Var){.value = value, .requires_grad = requires_grad, .tape = t, .leaf = leaf,
               .owns_value = owns};
    return v;
}

Var *var_new(Tape *t, Tensor *value, bool requires_grad) {
    if (!t || t->failed) return NULL;
    if (!value) return fail(t, "var_new: NULL tensor");
    return var_add(t, value, false, requires_grad, true);
}

Var *var_take(Tape *t, Tensor *value, bool requires_grad) {
    if (!t || t->failed) {
        tensor_free(value);
        return NULL;
    }
    if (!value) return fail(t, "var_take: NULL tensor (out of memory?)");
    if (value->owns_data) account(t, MEM_VALUE, tensor_bytes(value), true);
    return var_add(t, value, true, requires_grad, true);
}

void var_keep(Var *v) {
    for (; v; v = v->view_of) v->keep = true;
}

bool var_drop(Var *v) {
    if (!v || !v->value || v->dropped || v->leaf || v->keep || v->readers > 0 ||
        !v->owns_value || !v->value->owns_data)
        return false;
    /* the header stays: the shape still sizes the gradient that may come */
    account(v->tape, MEM_VALUE, tensor_bytes(v->value), false);
    free(v->value->data);
    v->value->data = NULL;
    v->value->owns_data = false;
    v->dropped = true;
    return true;
}

void var_zero_grad(Var *v) {
    if (v && v->grad) memset(v->grad->data, 0, tensor_bytes(v->grad));
}

/* The result of an op: a zeroed tensor of the given shape in a new Var of t. */
static Var *result(Tape *t, int ndim, const int64_t *shape) {
    Tensor *value = tape_tensor(t, MEM_VALUE, ndim, shape);
    return value ? var_add(t, value, true, false, false) : NULL;
}

static Var *result_like(Tape *t, const Var *x) {
    return result(t, x->value->ndim, x->value->shape);
}

static float *data(const Var *v) { return v ? v->value->data : NULL; }

/* Where a backward kernel accumulates v's gradient, or NULL when v needs none. */
static float *grad(const Var *v) { return v && v->grad ? v->grad->data : NULL; }

/* === recording === */

static bool wants_grad(const Tape *t, int n, Var *const *in) {
    if (!t->grad_enabled) return false;
    for (int i = 0; i < n; i++)
        if (in[i] && in[i]->requires_grad) return true;
    return false;
}

/* Bits of record_reading's `unread`: in[i] is bit i, the output UNREAD_OUT. */
#define UNREAD_OUT (1u << 31)

/* Records a node making y from in[0..n-1] when the tape records and some input requires grad;
 * *node is then the node to fill in, else NULL. Every input and the output whose bit is not in
 * `unread` counts the node as a reader of its value (var_drop). False (and t failed) only when
 * out of memory. */
static bool record_reading(Tape *t, Var *y, BackwardFn backward, int n, Var *const *in,
                           unsigned unread, Node **node) {
    *node = NULL;
    if (!wants_grad(t, n, in)) return true;
    Node *nd = calloc(1, sizeof *nd + (size_t)n * sizeof nd->in[0]);
    if (!nd || !push((void ***)&t->nodes, &t->n_nodes, &t->cap_nodes, nd)) {
        free(nd);
        fail(t, "out of memory (a node)");
        return false;
    }
    nd->backward = backward;
    nd->out = y;
    nd->n_in = n;
    memcpy(nd->in, in, (size_t)n * sizeof nd->in[0]);
    for (int i = 0; i < n; i++)
        if (in[i] && !(unread & (1u << i))) in[i]->readers++;
    if (!(unread & UNREAD_OUT)) y->readers++;
    y->producer = nd;
    y->requires_grad = true;
    t->recorded++;
    *node = nd;
    return true;
}

/* The same for a backward that may read every input's value and the output's. */
static bool record(Tape *t, Var *y, BackwardFn backward, int n, Var *const *in, Node **node) {
    return record_reading(t, y, backward, n, in, 0, node);
}

/* Keeps a saved tensor in node n, or frees it when nothing was recorded. */
static void save(Tape *t, Node *n, int slot, Tensor *x) {
    if (n)
        n->saved[slot] = x;
    else
        tape_tensor_free(t, MEM_SAVED, x);
}

/* === argument checks === */

static const char *shape_of(const Var *v, char *buf, size_t len) {
    return tensor_shape_str(v->value, buf, len);
}

/* True when op can run: t exists and has not failed, and each in[i] exists and has a value. */
static bool ready(Tape *t, const char *op, int n, Var *const *in) {
    if (!t || t->failed) return false;
    for (int i = 0; i < n; i++) {
        if (!in[i]) return refuse(t, "%s: argument %d is NULL", op, i + 1);
        if (!in[i]->value) {
            fail(t, "%s: argument %d was released by an earlier backward", op, i + 1);
            return false;
        }
        if (in[i]->dropped) {
            fail(t, "%s: argument %d was dropped (var_drop)", op, i + 1);
            return false;
        }
    }
    return true;
}

/* The same for an optional argument, which may be NULL. */
static bool ready_optional(Tape *t, const char *op, Var *v) { return !v || ready(t, op, 1, &v); }

/* An optional per-channel vector (weight, bias) must be [C]. */
static bool check_vector(Tape *t, const char *op, const char *name, const Var *v, int64_t C) {
    if (!v || (v->value->ndim == 1 && v->value->shape[0] == C)) return true;
    char s[64];
    return refuse(t, "%s: %s is %s, expected [%lld]", op, name, shape_of(v, s, sizeof s),
                (long long)C);
}

/* Arguments that are constants by definition (running statistics, rotary tables). */
static bool check_constant(Tape *t, const char *op, const char *name, const Var *v) {
    if (!v || !v->requires_grad) return true;
    return refuse(t, "%s: %s is a constant and cannot require grad", op, name);
}

/* Kernels take int sizes. */
static bool check_int(Tape *t, const char *op, int64_t n) {
    if (n <= INT_MAX) return true;
    return refuse(t, "%s: size %lld is too large for the kernels", op, (long long)n);
}

/* Product of shape[from..to-1]. */
static int64_t dims_product(const Tensor *x, int from, int to) {
    int64_t n = 1;
    for (int i = from; i < to; i++) n *= x->shape[i];
    return n;
}

/* === backward === */

/* A zeroed gradient for v, counted on v's tape (which may not be the one running backward). */
static bool grad_alloc(Var *v) {
    v->grad = tensor_new(v->value->ndim, v->value->shape);
    if (v->grad) account(v->tape, MEM_GRAD, tensor_bytes(v->grad), true);
    return v->grad != NULL;
}

/* Gives every input of n that requires grad a gradient to accumulate into. */
static bool ensure_input_grads(Tape *t, Node *n) {
    for (int i = 0; i < n->n_in; i++) {
        Var *v = n->in[i];
        if (v && v->requires_grad && !v->grad && !grad_alloc(v))
            return refuse(t, "backward: out of memory for a gradient");
    }
    return true;
}

/* After n's backward its output's gradient is complete and spent, and no node needs its value. */
static void consume(Tape *t, Node *n) {
    Var *out = n->out;
    node_free(t, n);
    if (out->keep) return;
    var_release_value(out);
    var_release_grad(out);
}

/* Runs t's nodes in reverse, consuming them, once the output's gradient is seeded. */
static int backward_nodes(Tape *t, Error *e) {
    for (size_t i = t->n_nodes; i-- > 0;) {
        Node *n = t->nodes[i];
        if (n->out->grad && !t->failed && ensure_input_grads(t, n)) n->backward(t, n);
        consume(t, n);
    }
    t->n_nodes = 0;
    return tape_check(t, e);
}

/* Seeds out's gradient with dout and runs t's nodes in reverse, consuming them. */
static int backward_run(Tape *t, Var *out, const Tensor *dout, Error *e) {
    if (!out->leaf && !out->producer && out->requires_grad)
        return error_set(e,
                         "backward: the graph of this output was consumed by an earlier backward");
    if (!out->requires_grad)
        return error_set(e, "backward: the output does not depend on anything that requires grad");
    if (!out->grad) {
        /* a copy, not 0 + dout: a -0.0 must stay -0.0 for checkpoints to be bitwise exact */
        if (!grad_alloc(out)) return error_set(e, "backward: out of memory for a gradient");
        memcpy(out->grad->data, dout->data, tensor_bytes(dout));
    } else {
        for (int64_t i = 0; i < dout->numel; i++) out->grad->data[i] += dout->data[i];
    }
    return backward_nodes(t, e);
}

/* Checks the state common to both entry points. */
static int backward_ready(Tape *t, Var *out, Error *e) {
    if (tape_check(t, e)) return -1;
    if (!out) return error_set(e, "backward: NULL output");
    if (!out->value)
        return error_set(e, "backward: the output was released by an earlier backward");
    if (out->dropped) return error_set(e, "backward: the output was dropped (var_drop)");
    return 0;
}

/* d loss / d every leaf that requires grad: loss's gradient seeded with 1, then backward_nodes,
 * the loop that runs the nodes in reverse. */
int tape_backward(Tape *t, Var *loss, Error *e) {
    if (backward_ready(t, loss, e)) return -1;
    if (loss->value->numel != 1) {
        char s[64];
        return error_set(e, "backward: the loss must be a scalar, got %s",
                         shape_of(loss, s, sizeof s));
    }
    var_keep(loss);
    float one = 1.0f;
    Tensor seed = *loss->value; /* the loss's shape over the value 1 */
    seed.data = &one;
    seed.owns_data = false;
    return backward_run(t, loss, &seed, e);
}

int tape_backward_from(Tape *t, Var *out, const Tensor *dout, Error *e) {
    if (backward_ready(t, out, e)) return -1;
    if (!dout || !tensor_same_shape(out->value, dout)) {
        char s[64], d[64];
        return error_set(e, "backward: the output is %s but its gradient is %s",
                         shape_of(out, s, sizeof s),
                         dout ? tensor_shape_str(dout, d, sizeof d) : "NULL");
    }
    var_keep(out);
    return backward_run(t, out, dout, e);
}

/* === checkpointing === */

/* fn's output as a new Var of t: its value is moved out of the scratch tape when it owns it,
 * copied otherwise (a view, an input, a Var of another tape). */
static Var *take_result(Tape *t, Tape *scratch, Var *out) {
    if (out->tape == scratch && out->owns_value && out->value->owns_data) {
        Tensor *value = out->value;
        out->value = NULL;
        out->owns_value = false;
        account(scratch, MEM_VALUE, tensor_bytes(value), false);
        account(t, MEM_VALUE, tensor_bytes(value), true);
        return var_add(t, value, true, false, false);
    }
    Var *y = result_like(t, out);
    if (y) memcpy(data(y), data(out), tensor_bytes(out->value));
    return y;
}

/* Runs fn on a scratch tape; NULL (and t failed) when fn fails. The scratch tape is left to the
 * caller to free. */
static Var *run_segment(Tape *t, Tape *scratch, CheckpointFn fn, void *ctx, Var **inputs) {
    Var *out = fn(scratch, inputs, ctx);
    if (scratch->failed) return fail(t, "checkpoint: %s", scratch->error.msg);
    if (!out || !out->value || out->dropped)
        return fail(t, "checkpoint: the function returned no value");
    return out;
}

/* Backpropagates dy, the gradient of a checkpoint's output y, from out, fn's recomputed output.
 * When out is a fresh result of the scratch tape, dy moves to it rather than being copied, so
 * the two never coexist (the values are the same, so gradients stay bitwise exact). */
static int checkpoint_seed_and_run(Tape *scratch, Var *out, Var *y, Error *e) {
    if (out->tape != scratch || out->grad || !out->producer)
        return backward_run(scratch, out, y->grad, e);
    size_t bytes = tensor_bytes(y->grad);
    account(y->tape, MEM_GRAD, bytes, false);
    account(scratch, MEM_GRAD, bytes, true);
    out->grad = y->grad;
    y->grad = NULL;
    return backward_nodes(scratch, e);
}

/* in: the segment's inputs; p.checkpoint: its function and context.
 * d(inputs) = the backward of fn, recomputed from the inputs on a scratch tape, seeded with dy */
static void checkpoint_backward(Tape *t, Node *n) {
    Var *y = n->out;
    /* Every consumer of y has run its backward, and the recomputation makes y's value again:
     * release the forward's copy first (as consume() would right after), so that nested
     * checkpoints do not hold each boundary twice. `shape` keeps only y's shape. */
    Tensor shape = *y->value;
    if (!y->keep) var_release_value(y);
    Tape *scratch = tape_child(t, true);
    if (!scratch) return;
    Var *out = run_segment(t, scratch, n->p.checkpoint.fn, n->p.checkpoint.ctx, n->in);
    char a[64], b[64];
    Error e = {{0}};
    if (out && !tensor_same_shape(out->value, &shape))
        fail(t, "checkpoint: the recomputation gave %s where the forward gave %s",
             shape_of(out, a, sizeof a), tensor_shape_str(&shape, b, sizeof b));
    else if (out && out->requires_grad && checkpoint_seed_and_run(scratch, out, y, &e) != 0)
        fail(t, "checkpoint: %s", e.msg);
    tape_free(scratch);
}

Var *ag_checkpoint(Tape *t, CheckpointFn fn, void *ctx, Var **inputs, int n_inputs) {
    if (!ready(t, "checkpoint", n_inputs, inputs)) return NULL;
    if (!fn || n_inputs < 1) return fail(t, "checkpoint: needs a function and at least one input");
    Tape *scratch = tape_child(t, false);
    if (!scratch) return NULL;
    Var *out = run_segment(t, scratch, fn, ctx, inputs);
    Var *y = out ? take_result(t, scratch, out) : NULL;
    tape_free(scratch);
    Node *n;
    /* the backward recomputes y rather than reading it */
    if (!y || !record_reading(t, y, checkpoint_backward, n_inputs, inputs, UNREAD_OUT, &n))
        return NULL;
    if (n) {
        n->p.checkpoint.fn = fn;
        n->p.checkpoint.ctx = ctx;
    }
    return y;
}

/* === matrix products === */

/* in: x, w, b. y = x w^T + b; mm: M rows, N outputs, K inputs.
 * dx = dy w;  dw = dy^T x;  db = sum over rows of dy */
static void linear_backward(Tape *t, Node *n) {
    (void)t;
    Var *x = n->in[0], *w = n->in[1], *b = n->in[2];
    int M = (int)n->p.mm.M, N = (int)n->p.mm.N, K = (int)n->p.mm.K;
    const float *dy = grad(n->out);
    if (grad(x)) gemm(false, false, M, K, N, 1.0f, dy, N, data(w), K, 1.0f, grad(x), K);
    if (grad(w)) gemm(true, false, N, K, M, 1.0f, dy, N, data(x), K, 1.0f, grad(w), K);
    if (grad(b)) sum_rows_add(M, N, dy, grad(b));
}

Var *ag_linear(Tape *t, Var *x, Var *w, Var *b) {
    const char *op = "linear";
    if (!ready(t, op, 2, (Var *[]){x, w}) || !ready_optional(t, op, b)) return NULL;
    const Tensor *xv = x->value, *wv = w->value;
    int64_t K = xv->shape[xv->ndim - 1];
    char s1[64], s2[64];
    if (wv->ndim != 2 || wv->shape[1] != K)
        return fail(t, "linear: x %s needs a weight [N, %lld], got %s", shape_of(x, s1, sizeof s1),
                    (long long)K, shape_of(w, s2, sizeof s2));
    int64_t N = wv->shape[0], M = dims_product(xv, 0, xv->ndim - 1);
    if (!check_vector(t, op, "bias", b, N) || !check_int(t, op, M) || !check_int(t, op, N) ||
        !check_int(t, op, K))
        return NULL;
    int64_t shape[TENSOR_MAX_DIMS];
    memcpy(shape, xv->shape, sizeof shape);
    shape[xv->ndim - 1] = N;
    Var *y = result(t, xv->ndim, shape);
    Node *n;
    if (!y || !record(t, y, linear_backward, 3, (Var *[]){x, w, b}, &n)) return NULL;
    gemm(false, true, (int)M, (int)N, (int)K, 1.0f, data(x), (int)K, data(w), (int)K, 0.0f, data(y),
         (int)N);
    if (b) add_rows_forward((int)M, (int)N, data(y), data(b), data(y));
    if (n) n->p.mm = (struct MatmulParams){.M = M, .N = N, .K = K};
    return y;
}

/* in: x. y = x w^T with w [N, K] constant, as stored.  dx = dy w */
static void linear_stored_backward(Tape *t, Node *n) {
    (void)t;
    struct StoredParams s = n->p.stored;
    if (grad(n->in[0]))
        gemm_stored(false, false, (int)s.M, (int)s.K, (int)s.N, 1.0f, grad(n->out), (int)s.N,
                    s.w, s.dtype, (int)s.K, 1.0f, grad(n->in[0]), (int)s.K);
}

Var *ag_linear_stored(Tape *t, Var *x, const void *w, DType dtype, int64_t N, int64_t K,
                      Precision precision) {
    const char *op = "linear_stored";
    if (!ready(t, op, 1, (Var *[]){x})) return NULL;
    const Tensor *xv = x->value;
    char s1[64];
    if (!w || (dtype != DTYPE_F32 && dtype != DTYPE_BF16 && dtype != DTYPE_F16) ||
        xv->shape[xv->ndim - 1] != K)
        return fail(t, "linear_stored: x %s needs a stored F32/BF16/F16 weight [N, %lld]",
                    shape_of(x, s1, sizeof s1), (long long)K);
    int64_t M = dims_product(xv, 0, xv->ndim - 1);
    if (!check_int(t, op, M) || !check_int(t, op, N) || !check_int(t, op, K)) return NULL;
    int64_t shape[TENSOR_MAX_DIMS];
    memcpy(shape, xv->shape, sizeof shape);
    shape[xv->ndim - 1] = N;
    Var *y = result(t, xv->ndim, shape);
    Node *n;
    if (!y || !record(t, y, linear_stored_backward, 1, (Var *[]){x}, &n)) return NULL;
    (precision == PRECISION_BF16 ? gemm_stored_bf16 : gemm_stored)(
        false, true, (int)M, (int)N, (int)K, 1.0f, data(x), (int)K, w, dtype, (int)K, 0.0f,
        data(y), (int)N);
    if (n) n->p.stored = (struct StoredParams){.w = w, .dtype = dtype, .M = M, .N = N, .K = K};
    return y;
}

/* in: a, b. Per batch item i: y_i = a_i b_i with b_0 for all when b is shared.
 * da_i = dy_i b_i^T;  db_i = a_i^T dy_i (summed over i when shared) */
static void matmul_backward(Tape *t, Node *n) {
    (void)t;
    Var *a = n->in[0], *b = n->in[1];
    struct MatmulParams mm = n->p.mm;
    int M = (int)mm.M, N = (int)mm.N, K = (int)mm.K;
    for (int64_t i = 0; i < mm.batch; i++) {
        const float *dy = grad(n->out) + i * mm.M * mm.N;
        int64_t a_off = i * mm.M * mm.K, b_off = mm.shared_b ? 0 : i * mm.K * mm.N;
        if (grad(a))
            gemm(false, true, M, K, N, 1.0f, dy, N, data(b) + b_off, N, 1.0f, grad(a) + a_off, K);
        if (grad(b))
            gemm(true, false, K, N, M, 1.0f, data(a) + a_off, K, dy, N, 1.0f, grad(b) + b_off, N);
    }
}

Var *ag_matmul(Tape *t, Var *a, Var *b) {
    const char *op = "matmul";
    if (!ready(t, op, 2, (Var *[]){a, b})) return NULL;
    const Tensor *av = a->value, *bv = b->value;
    char s1[64], s2[64];
    bool shared = bv->ndim == 2;
    bool ok = av->ndim >= 2 && bv->ndim >= 2 &&
              bv->shape[bv->ndim - 2] == av->shape[av->ndim - 1] &&
              (shared || bv->ndim == av->ndim);
    if (ok && !shared)
        for (int i = 0; i < av->ndim - 2; i++) ok = ok && av->shape[i] == bv->shape[i];
    if (!ok)
        return fail(t, "matmul: cannot multiply %s by %s (want [.., M, K] by [.., K, N] or [K, N])",
                    shape_of(a, s1, sizeof s1), shape_of(b, s2, sizeof s2));
    struct MatmulParams mm = {.M = av->shape[av->ndim - 2],
                              .K = av->shape[av->ndim - 1],
                              .N = bv->shape[bv->ndim - 1],
                              .batch = dims_product(av, 0, av->ndim - 2),
                              .shared_b = shared};
    if (!check_int(t, op, mm.M) || !check_int(t, op, mm.N) || !check_int(t, op, mm.K)) return NULL;
    int64_t shape[TENSOR_MAX_DIMS];
    memcpy(shape, av->shape, sizeof shape);
    shape[av->ndim - 1] = mm.N;
    Var *y = result(t, av->ndim, shape);
    Node *n;
    if (!y || !record(t, y, matmul_backward, 2, (Var *[]){a, b}, &n)) return NULL;
    for (int64_t i = 0; i < mm.batch; i++)
        gemm(false, false, (int)mm.M, (int)mm.N, (int)mm.K, 1.0f, data(a) + i * mm.M * mm.K,
             (int)mm.K, data(b) + (shared ? 0 : i * mm.K * mm.N), (int)mm.N, 0.0f,
             data(y) + i * mm.M * mm.N, (int)mm.N);
    if (n) n->p.mm = mm;
    return y;
}

/* === convolution === */

/* in: x, w, b. dx = the transposed convolution of dy with w;  dw = dy correlated with x's
 * patches (im2col);  db = sum of dy over batch and pixels */
static void conv2d_node_backward(Tape *t, Node *n) {
    if (n->in[0]->dropped && grad(n->in[1])) {
        fail(t, "conv2d: the weight wants a gradient, but the input was dropped when it did not");
        return;
    }
    conv2d_backward(&n->p.conv, data(n->in[0]), data(n->in[1]), grad(n->out), grad(n->in[0]),
                    grad(n->in[1]), grad(n->in[2]));
}

Var *ag_conv2d(Tape *t, Var *x, Var *w, Var *b, int stride, int padding, int groups) {
    const char *op = "conv2d";
    if (!ready(t, op, 2, (Var *[]){x, w}) || !ready_optional(t, op, b)) return NULL;
    const Tensor *xv = x->value, *wv = w->value;
    char s1[64], s2[64];
    shape_of(x, s1, sizeof s1);
    shape_of(w, s2, sizeof s2);
    if (xv->ndim != 4 || wv->ndim != 4)
        return fail(t, "conv2d: x %s and weight %s must be 4-D", s1, s2);
    if (stride < 1 || padding < 0 || groups < 1 || xv->shape[1] % groups || wv->shape[0] % groups ||
        wv->shape[1] * groups != xv->shape[1])
        return fail(t, "conv2d: x %s, weight %s, stride %d, padding %d, groups %d do not fit", s1,
                    s2, stride, padding, groups);
    if (xv->shape[2] + 2 * padding < wv->shape[2] || xv->shape[3] + 2 * padding < wv->shape[3])
        return fail(t, "conv2d: the kernel of %s is larger than the padded input %s", s2, s1);
    for (int i = 0; i < 4; i++)
        if (!check_int(t, op, xv->shape[i]) || !check_int(t, op, wv->shape[i])) return NULL;
    Conv2dShape s = {.batch = (int)xv->shape[0],
                     .in_ch = (int)xv->shape[1],
                     .in_h = (int)xv->shape[2],
                     .in_w = (int)xv->shape[3],
                     .out_ch = (int)wv->shape[0],
                     .kernel_h = (int)wv->shape[2],
                     .kernel_w = (int)wv->shape[3],
                     .stride_h = stride,
                     .stride_w = stride,
                     .pad_h = padding,
                     .pad_w = padding,
                     .groups = groups};
    if (!check_vector(t, op, "bias", b, s.out_ch)) return NULL;
    Var *y = result(t, 4, (int64_t[]){s.batch, s.out_ch, conv2d_out_h(&s), conv2d_out_w(&s)});
    /* dx reads only w, dw only x, db neither: x's value is needed when w wants a gradient */
    unsigned unread = UNREAD_OUT | 1u << 2 | (w->requires_grad ? 0u : 1u << 0);
    Node *n;
    if (!y || !record_reading(t, y, conv2d_node_backward, 3, (Var *[]){x, w, b}, unread, &n))
        return NULL;
    conv2d_forward(&s, data(x), data(w), data(b), data(y));
    if (n) n->p.conv = s;
    return y;
}

/* === attention and rotary embedding === */

/* in: q, k, v; saved: lse. With P = softmax(s q k^T) recomputed from lse and D = rowsum(dO * O):
 * dV = P^T dO;  dS = P * (dO V^T - D);  dQ = s dS K;  dK = s dS^T Q */
static void attention_node_backward(Tape *t, Node *n) {
    (void)t;
    attention_backward(&n->p.attn.shape, n->p.attn.scale, data(n->in[0]), data(n->in[1]),
                       data(n->in[2]), data(n->out), n->saved[0]->data, grad(n->out),
                       grad(n->in[0]), grad(n->in[1]), grad(n->in[2]));
}

/* The attention shape of q, k, v, or false (and t failed) when they do not fit together. */
static bool attention_shape(Tape *t, const Var *q, const Var *k, const Var *v, bool causal,
                            const int *kv_valid, AttentionShape *s) {
    const Tensor *qv = q->value, *kv = k->value;
    char s1[64], s2[64], s3[64];
    if (qv->ndim != 4 || !tensor_same_shape(kv, v->value) || kv->ndim != 4 ||
        kv->shape[0] != qv->shape[0] || kv->shape[3] != qv->shape[3] || kv->shape[2] < 1 ||
        qv->shape[2] % kv->shape[2])
        return refuse(t,
                    "attention: q %s, k %s, v %s must be [B, Nq, H, D], [B, Nk, Hkv, D] twice "
                    "with H a multiple of Hkv",
                    shape_of(q, s1, sizeof s1), shape_of(k, s2, sizeof s2),
                    shape_of(v, s3, sizeof s3));
    for (int i = 0; i < 4; i++)
        if (!check_int(t, "attention", qv->shape[i]) || !check_int(t, "attention", kv->shape[i]))
            return false;
    *s = (AttentionShape){.batch = (int)qv->shape[0], .heads = (int)qv->shape[2],
                          .kv_heads = (int)kv->shape[2], .q_len = (int)qv->shape[1],
                          .kv_len = (int)kv->shape[1], .head_dim = (int)qv->shape[3],
                          .causal = causal, .kv_valid = kv_valid};
    if (!kv_valid) return true;
    for (int b = 0; b < s->batch; b++)
        if (kv_valid[b] < 0 || kv_valid[b] > s->kv_len)
            return refuse(t, "attention: kv_valid[%d] = %d is outside 0..%d", b, kv_valid[b],
                        s->kv_len);
    return true;
}

/* Keeps a copy of the valid key counts in n, for its backward. */
static bool save_kv_valid(Tape *t, Node *n) {
    const int *src = n->p.attn.shape.kv_valid;
    if (!src) return true;
    size_t bytes = (size_t)n->p.attn.shape.batch * sizeof(int);
    n->kv_valid = malloc(bytes);
    if (!n->kv_valid) return refuse(t, "attention: out of memory");
    memcpy(n->kv_valid, src, bytes);
    account(t, MEM_SAVED, bytes, true);
    n->p.attn.shape.kv_valid = n->kv_valid;
    return true;
}

Var *ag_attention(Tape *t, Var *q, Var *k, Var *v, float scale, bool causal, const int *kv_valid) {
    AttentionShape s;
    if (!ready(t, "attention", 3, (Var *[]){q, k, v}) ||
        !attention_shape(t, q, k, v, causal, kv_valid, &s))
        return NULL;
    Var *y = result_like(t, q);
    Tensor *lse = y ? tape_tensor(t, MEM_SAVED, 3, (int64_t[]){s.batch, s.heads, s.q_len}) : NULL;
    Node *n;
    if (!lse || !record(t, y, attention_node_backward, 3, (Var *[]){q, k, v}, &n)) {
        tape_tensor_free(t, MEM_SAVED, lse);
        return NULL;
    }
    attention_forward(&s, scale, data(q), data(k), data(v), data(y), lse->data);
    if (n) {
        n->p.attn.shape = s;
        n->p.attn.scale = scale;
    }
    save(t, n, 0, lse);
    return n && !save_kv_valid(t, n) ? NULL : y;
}

/* in: x, cos, sin. dx = R^T dy: each pair rotated back by its angle */
static void rope_node_backward(Tape *t, Node *n) {
    (void)t;
    struct RopeParams r = n->p.rope;
    rope_backward(r.pairs, r.batch, r.n, r.heads, r.head_dim, data(n->in[1]), data(n->in[2]),
                  grad(n->out), grad(n->in[0]));
}

Var *ag_rope(Tape *t, Var *x, Var *cos, Var *sin, RopePairs pairs) {
    const char *op = "rope";
    if (!ready(t, op, 3, (Var *[]){x, cos, sin}) || !check_constant(t, op, "cos", cos) ||
        !check_constant(t, op, "sin", sin))
        return NULL;
    const Tensor *xv = x->value;
    char s1[64], s2[64], s3[64];
    Tensor table = {.ndim = 2}; /* the shape cos and sin must have: [N, D/2] */
    if (xv->ndim == 4) {
        table.shape[0] = xv->shape[1];
        table.shape[1] = xv->shape[3] / 2;
    }
    if (xv->ndim != 4 || xv->shape[3] % 2 || !tensor_same_shape(cos->value, &table) ||
        !tensor_same_shape(sin->value, &table))
        return fail(t, "rope: x %s must be [B, N, H, D] with D even, and cos %s, sin %s [N, D/2]",
                    shape_of(x, s1, sizeof s1), shape_of(cos, s2, sizeof s2),
                    shape_of(sin, s3, sizeof s3));
    for (int i = 0; i < 4; i++)
        if (!check_int(t, op, xv->shape[i])) return NULL;
    struct RopeParams r = {.batch = (int)xv->shape[0], .n = (int)xv->shape[1],
                           .heads = (int)xv->shape[2], .head_dim = (int)xv->shape[3],
                           .pairs = pairs};
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, rope_node_backward, 3, (Var *[]){x, cos, sin}, &n)) return NULL;
    rope_forward(pairs, r.batch, r.n, r.heads, r.head_dim, data(cos), data(sin), data(x), data(y));
    if (n) n->p.rope = r;
    return y;
}

/* === normalisation === */

/* x: [.., C] as [rows, C], or false (and t failed) when x has no last dim to normalise. */
static bool rows_of(Tape *t, const char *op, const Var *x, struct NormParams *p) {
    const Tensor *xv = x->value;
    p->C = xv->shape[xv->ndim - 1];
    p->rows = dims_product(xv, 0, xv->ndim - 1);
    return check_int(t, op, p->rows) && check_int(t, op, p->C);
}

/* x: [B, C, ..] as [B, C, HW], or false (and t failed) when x has fewer than two dims. */
static bool channels_of(Tape *t, const char *op, const Var *x, struct NormParams *p) {
    const Tensor *xv = x->value;
    char s[64];
    if (xv->ndim < 2)
        return refuse(t, "%s: x %s must be [B, C, ..]", op, shape_of(x, s, sizeof s));
    p->rows = xv->shape[0];
    p->C = xv->shape[1];
    p->HW = dims_product(xv, 2, xv->ndim);
    return check_int(t, op, p->rows) && check_int(t, op, p->C) && check_int(t, op, p->HW);
}

/* in: x, w, b; saved: mean, rstd [rows]. With x^ = (x - mean) rstd and g = dy w:
 * dx = rstd (g - mean(g) - x^ mean(g x^));  dw = sum dy x^;  db = sum dy */
static void layernorm_node_backward(Tape *t, Node *n) {
    (void)t;
    layernorm_backward((int)n->p.norm.rows, (int)n->p.norm.C, data(n->in[0]), data(n->in[1]),
                       n->saved[0]->data, n->saved[1]->data, grad(n->out), grad(n->in[0]),
                       grad(n->in[1]), grad(n->in[2]));
}

Var *ag_layernorm(Tape *t, Var *x, Var *w, Var *b, float eps) {
    const char *op = "layernorm";
    struct NormParams p = {.eps = eps};
    if (!ready(t, op, 1, &x) || !ready_optional(t, op, w) || !ready_optional(t, op, b) ||
        !rows_of(t, op, x, &p) || !check_vector(t, op, "weight", w, p.C) ||
        !check_vector(t, op, "bias", b, p.C))
        return NULL;
    Var *y = result_like(t, x);
    Tensor *mean = y ? tape_tensor(t, MEM_SAVED, 1, &p.rows) : NULL;
    Tensor *rstd = mean ? tape_tensor(t, MEM_SAVED, 1, &p.rows) : NULL;
    Node *n = NULL;
    if (rstd && record(t, y, layernorm_node_backward, 3, (Var *[]){x, w, b}, &n)) {
        layernorm_forward((int)p.rows, (int)p.C, eps, data(x), data(w), data(b), data(y),
                          mean->data, rstd->data);
        if (n) n->p.norm = p;
    }
    save(t, n, 0, mean);
    save(t, n, 1, rstd);
    return t->failed ? NULL : y;
}

/* in: x, w, b; saved: mean, rstd [B, groups]. LayerNorm's formulas with the means over each
 * group's channels and pixels: dx = rstd (g - mean(g) - x^ mean(g x^)), g = dy w[c] */
static void groupnorm_node_backward(Tape *t, Node *n) {
    (void)t;
    struct NormParams p = n->p.norm;
    groupnorm_backward((int)p.rows, (int)p.C, (int)p.HW, p.groups, data(n->in[0]), data(n->in[1]),
                       n->saved[0]->data, n->saved[1]->data, grad(n->out), grad(n->in[0]),
                       grad(n->in[1]), grad(n->in[2]));
}

Var *ag_groupnorm(Tape *t, Var *x, int groups, Var *w, Var *b, float eps) {
    const char *op = "groupnorm";
    struct NormParams p = {.groups = groups, .eps = eps};
    if (!ready(t, op, 1, &x) || !ready_optional(t, op, w) || !ready_optional(t, op, b) ||
        !channels_of(t, op, x, &p) || !check_vector(t, op, "weight", w, p.C) ||
        !check_vector(t, op, "bias", b, p.C))
        return NULL;
    if (groups < 1 || p.C % groups)
        return fail(t, "groupnorm: %lld channels do not split into %d groups", (long long)p.C,
                    groups);
    Var *y = result_like(t, x);
    int64_t stats = p.rows * groups;
    Tensor *mean = y ? tape_tensor(t, MEM_SAVED, 1, &stats) : NULL;
    Tensor *rstd = mean ? tape_tensor(t, MEM_SAVED, 1, &stats) : NULL;
    Node *n = NULL;
    if (rstd && record(t, y, groupnorm_node_backward, 3, (Var *[]){x, w, b}, &n)) {
        groupnorm_forward((int)p.rows, (int)p.C, (int)p.HW, groups, eps, data(x), data(w), data(b),
                          data(y), mean->data, rstd->data);
        if (n) n->p.norm = p;
    }
    save(t, n, 0, mean);
    save(t, n, 1, rstd);
    return t->failed ? NULL : y;
}

/* in: x, w, b; saved: mean, rstd [B, groups]. u = groupnorm(x): du = dy silu'(u), then
 * groupnorm's backward of du (u recomputed from x, never stored) */
static void groupnorm_silu_node_backward(Tape *t, Node *n) {
    (void)t;
    struct NormParams p = n->p.norm;
    groupnorm_silu_backward((int)p.rows, (int)p.C, (int)p.HW, p.groups, data(n->in[0]),
                            data(n->in[1]), data(n->in[2]), n->saved[0]->data, n->saved[1]->data,
                            grad(n->out), grad(n->in[0]), grad(n->in[1]), grad(n->in[2]));
}

Var *ag_groupnorm_silu(Tape *t, Var *x, int groups, Var *w, Var *b, float eps) {
    const char *op = "groupnorm_silu";
    struct NormParams p = {.groups = groups, .eps = eps};
    if (!ready(t, op, 1, &x) || !ready_optional(t, op, w) || !ready_optional(t, op, b) ||
        !channels_of(t, op, x, &p) || !check_vector(t, op, "weight", w, p.C) ||
        !check_vector(t, op, "bias", b, p.C))
        return NULL;
    if (groups < 1 || p.C % groups)
        return fail(t, "groupnorm_silu: %lld channels do not split into %d groups",
                    (long long)p.C, groups);
    Var *y = result_like(t, x);
    int64_t stats = p.rows * groups;
    Tensor *mean = y ? tape_tensor(t, MEM_SAVED, 1, &stats) : NULL;
    Tensor *rstd = mean ? tape_tensor(t, MEM_SAVED, 1, &stats) : NULL;
    Node *n = NULL;
    if (rstd && record_reading(t, y, groupnorm_silu_node_backward, 3, (Var *[]){x, w, b},
                               UNREAD_OUT, &n)) {
        groupnorm_silu_forward((int)p.rows, (int)p.C, (int)p.HW, groups, eps, data(x), data(w),
                               data(b), data(y), mean->data, rstd->data);
        if (n) n->p.norm = p;
    }
    save(t, n, 0, mean);
    save(t, n, 1, rstd);
    return t->failed ? NULL : y;
}

/* in: x, w; saved: rstd [rows]. With g = dy w: dx = rstd (g - x rstd^2 mean(g x));
 * dw = sum dy x rstd */
static void rmsnorm_node_backward(Tape *t, Node *n) {
    (void)t;
    rmsnorm_backward((int)n->p.norm.rows, (int)n->p.norm.C, data(n->in[0]), data(n->in[1]),
                     n->saved[0]->data, grad(n->out), grad(n->in[0]), grad(n->in[1]));
}

Var *ag_rmsnorm(Tape *t, Var *x, Var *w, float eps) {
    const char *op = "rmsnorm";
    struct NormParams p = {.eps = eps};
    if (!ready(t, op, 1, &x) || !ready_optional(t, op, w) || !rows_of(t, op, x, &p) ||
        !check_vector(t, op, "weight", w, p.C))
        return NULL;
    Var *y = result_like(t, x);
    Tensor *rstd = y ? tape_tensor(t, MEM_SAVED, 1, &p.rows) : NULL;
    Node *n = NULL;
    if (rstd && record(t, y, rmsnorm_node_backward, 2, (Var *[]){x, w}, &n)) {
        rmsnorm_forward((int)p.rows, (int)p.C, eps, data(x), data(w), data(y), rstd->data);
        if (n) n->p.norm = p;
    }
    save(t, n, 0, rstd);
    return t->failed ? NULL : y;
}

/* in: x, mean, var, w, b. Running statistics are constants: dx = dy w / sqrt(var + eps);
 * dw = sum dy x^;  db = sum dy */
static void batchnorm_node_backward(Tape *t, Node *n) {
    (void)t;
    struct NormParams p = n->p.norm;
    batchnorm_eval_backward((int)p.rows, (int)p.C, (int)p.HW, p.eps, data(n->in[1]), data(n->in[2]),
                            data(n->in[3]), data(n->in[0]), grad(n->out), grad(n->in[0]),
                            grad(n->in[3]), grad(n->in[4]));
}

Var *ag_batchnorm_eval(Tape *t, Var *x, Var *mean, Var *var, Var *w, Var *b, float eps) {
    const char *op = "batchnorm_eval";
    struct NormParams p = {.eps = eps};
    if (!ready(t, op, 3, (Var *[]){x, mean, var}) || !ready_optional(t, op, w) ||
        !ready_optional(t, op, b) || !channels_of(t, op, x, &p) ||
        !check_vector(t, op, "running mean", mean, p.C) ||
        !check_vector(t, op, "running var", var, p.C) || !check_vector(t, op, "weight", w, p.C) ||
        !check_vector(t, op, "bias", b, p.C) || !check_constant(t, op, "running mean", mean) ||
        !check_constant(t, op, "running var", var))
        return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, batchnorm_node_backward, 5, (Var *[]){x, mean, var, w, b}, &n))
        return NULL;
    batchnorm_eval_forward((int)p.rows, (int)p.C, (int)p.HW, eps, data(mean), data(var), data(w),
                           data(b), data(x), data(y));
    if (n) n->p.norm = p;
    return y;
}

/* === activations === */

/* The forward of a pointwise activation: y = f(x). */
typedef void (*PointwiseFn)(size_t n, const float *x, float *y);

static Var *pointwise(Tape *t, const char *op, Var *x, PointwiseFn forward, BackwardFn backward) {
    if (!ready(t, op, 1, &x)) return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, backward, 1, &x, &n)) return NULL;
    forward((size_t)x->value->numel, data(x), data(y));
    return y;
}

static size_t numel_of(const Var *v) { return (size_t)v->value->numel; }

/* in: x; p.scalar.flag: the tanh approximation. dx = dy gelu'(x) */
static void gelu_node_backward(Tape *t, Node *n) {
    (void)t;
    gelu_backward(numel_of(n->out), n->p.scalar.flag, data(n->in[0]), grad(n->out), grad(n->in[0]));
}

Var *ag_gelu(Tape *t, Var *x, bool tanh_approx) {
    if (!ready(t, "gelu", 1, &x)) return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, gelu_node_backward, 1, &x, &n)) return NULL;
    gelu_forward(numel_of(x), tanh_approx, data(x), data(y));
    if (n) n->p.scalar.flag = tanh_approx;
    return y;
}

/* dx = dy sigma(x) (1 + x (1 - sigma(x))) */
static void silu_node_backward(Tape *t, Node *n) {
    (void)t;
    silu_backward(numel_of(n->out), data(n->in[0]), grad(n->out), grad(n->in[0]));
}

Var *ag_silu(Tape *t, Var *x) { return pointwise(t, "silu", x, silu_forward, silu_node_backward); }

/* dx = dy where x > 0 */
static void relu_node_backward(Tape *t, Node *n) {
    (void)t;
    relu_backward(numel_of(n->out), data(n->in[0]), grad(n->out), grad(n->in[0]));
}

Var *ag_relu(Tape *t, Var *x) { return pointwise(t, "relu", x, relu_forward, relu_node_backward); }

/* sigmoid's backward needs only its output: dx = dy y (1 - y) */
static void sigmoid_node_backward(Tape *t, Node *n) {
    (void)t;
    sigmoid_backward(numel_of(n->out), data(n->out), grad(n->out), grad(n->in[0]));
}

Var *ag_sigmoid(Tape *t, Var *x) {
    return pointwise(t, "sigmoid", x, sigmoid_forward, sigmoid_node_backward);
}

/* softmax's backward needs only its output; p.norm: rows, C. dx = y (dy - sum(dy y)) per row */
static void softmax_node_backward(Tape *t, Node *n) {
    (void)t;
    softmax_backward((int)n->p.norm.rows, (int)n->p.norm.C, data(n->out), grad(n->out),
                     grad(n->in[0]));
}

Var *ag_softmax(Tape *t, Var *x) {
    struct NormParams p = {0};
    if (!ready(t, "softmax", 1, &x) || !rows_of(t, "softmax", x, &p)) return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, softmax_node_backward, 1, &x, &n)) return NULL;
    softmax_forward((int)p.rows, (int)p.C, data(x), data(y));
    if (n) n->p.norm = p;
    return y;
}

/* === resampling === */

/* x: [.., H, W] as [planes, H, W], or false (and t failed). */
static bool planes_of(Tape *t, const char *op, const Var *x, struct ResizeParams *r) {
    const Tensor *xv = x->value;
    char s[64];
    if (xv->ndim < 2)
        return refuse(t, "%s: x %s must be [.., H, W]", op, shape_of(x, s, sizeof s));
    r->planes = dims_product(xv, 0, xv->ndim - 2);
    r->H = xv->shape[xv->ndim - 2];
    r->W = xv->shape[xv->ndim - 1];
    return check_int(t, op, r->planes) && check_int(t, op, r->H) && check_int(t, op, r->W) &&
           check_int(t, op, r->out_h) && check_int(t, op, r->out_w);
}

/* x's shape with the last two dims replaced by out_h, out_w. */
static Var *resized_result(Tape *t, const Var *x, int64_t out_h, int64_t out_w) {
    int64_t shape[TENSOR_MAX_DIMS];
    int nd = x->value->ndim;
    memcpy(shape, x->value->shape, sizeof shape);
    shape[nd - 2] = out_h;
    shape[nd - 1] = out_w;
    return result(t, nd, shape);
}

/* dx[i, j] = the sum of dy over the 2x2 pixels (i, j) became */
static void upsample_node_backward(Tape *t, Node *n) {
    (void)t;
    struct ResizeParams r = n->p.resize;
    upsample_nearest2x_backward((int)r.planes, (int)r.H, (int)r.W, grad(n->out), grad(n->in[0]));
}

Var *ag_upsample_nearest2x(Tape *t, Var *x) {
    struct ResizeParams r = {0};
    if (!ready(t, "upsample_nearest2x", 1, &x) || !planes_of(t, "upsample_nearest2x", x, &r))
        return NULL;
    r.out_h = 2 * r.H;
    r.out_w = 2 * r.W;
    if (!check_int(t, "upsample_nearest2x", r.out_h) ||
        !check_int(t, "upsample_nearest2x", r.out_w))
        return NULL;
    Var *y = resized_result(t, x, r.out_h, r.out_w);
    Node *n;
    if (!y || !record_reading(t, y, upsample_node_backward, 1, &x, 1u << 0 | UNREAD_OUT, &n))
        return NULL;
    upsample_nearest2x_forward((int)r.planes, (int)r.H, (int)r.W, data(x), data(y));
    if (n) n->p.resize = r;
    return y;
}

/* dx = each dy spread back onto its four source pixels with the interpolation weights */
static void resize_node_backward(Tape *t, Node *n) {
    (void)t;
    struct ResizeParams r = n->p.resize;
    resize_bilinear_backward((int)r.planes, (int)r.H, (int)r.W, (int)r.out_h, (int)r.out_w,
                             grad(n->out), grad(n->in[0]));
}

Var *ag_resize_bilinear(Tape *t, Var *x, int out_h, int out_w) {
    struct ResizeParams r = {.out_h = out_h, .out_w = out_w};
    if (!ready(t, "resize_bilinear", 1, &x) || !planes_of(t, "resize_bilinear", x, &r)) return NULL;
    if (out_h < 1 || out_w < 1 || r.H < 1 || r.W < 1)
        return fail(t, "resize_bilinear: cannot resize %lldx%lld to %dx%d", (long long)r.H,
                    (long long)r.W, out_h, out_w);
    Var *y = resized_result(t, x, out_h, out_w);
    Node *n;
    if (!y || !record(t, y, resize_node_backward, 1, &x, &n)) return NULL;
    resize_bilinear_forward((int)r.planes, (int)r.H, (int)r.W, out_h, out_w, data(x), data(y));
    if (n) n->p.resize = r;
    return y;
}

/* === elementwise === */

static bool check_same_shape(Tape *t, const char *op, const Var *a, const Var *b) {
    if (tensor_same_shape(a->value, b->value)) return true;
    char s1[64], s2[64];
    return refuse(t, "%s: shapes %s and %s differ", op, shape_of(a, s1, sizeof s1),
                shape_of(b, s2, sizeof s2));
}

/* in: a, b. da = dy;  db = dy */
static void add_backward(Tape *t, Node *n) {
    (void)t;
    for (int i = 0; i < 2; i++)
        if (grad(n->in[i])) axpy(numel_of(n->out), 1.0f, grad(n->out), grad(n->in[i]));
}

Var *ag_add(Tape *t, Var *a, Var *b) {
    if (!ready(t, "add", 2, (Var *[]){a, b}) || !check_same_shape(t, "add", a, b)) return NULL;
    Var *y = result_like(t, a);
    Node *n;
    unsigned unread = 1u << 0 | 1u << 1 | UNREAD_OUT; /* dy passes through unchanged */
    if (!y || !record_reading(t, y, add_backward, 2, (Var *[]){a, b}, unread, &n)) return NULL;
    add_forward(numel_of(a), data(a), data(b), data(y));
    return y;
}

/* in: a, b. da = dy b;  db = dy a */
static void mul_node_backward(Tape *t, Node *n) {
    (void)t;
    Var *a = n->in[0], *b = n->in[1];
    mul_backward(numel_of(n->out), data(a), data(b), grad(n->out), grad(a), grad(b));
}

Var *ag_mul(Tape *t, Var *a, Var *b) {
    if (!ready(t, "mul", 2, (Var *[]){a, b}) || !check_same_shape(t, "mul", a, b)) return NULL;
    Var *y = result_like(t, a);
    Node *n;
    if (!y || !record(t, y, mul_node_backward, 2, (Var *[]){a, b}, &n)) return NULL;
    mul_forward(numel_of(a), data(a), data(b), data(y));
    return y;
}

/* in: x; p.scalar.a: alpha. dx = alpha dy */
static void scale_backward(Tape *t, Node *n) {
    (void)t;
    axpy(numel_of(n->out), n->p.scalar.a, grad(n->out), grad(n->in[0]));
}

Var *ag_scale(Tape *t, Var *x, float alpha) {
    if (!ready(t, "scale", 1, &x)) return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, scale_backward, 1, &x, &n)) return NULL;
    scale_forward(numel_of(x), alpha, data(x), data(y));
    if (n) n->p.scalar.a = alpha;
    return y;
}

/* in: x; p.scalar.a: alpha. y = alpha x + beta: dx = alpha dy */
static void affine_backward(Tape *t, Node *n) {
    (void)t;
    axpy(numel_of(n->out), n->p.scalar.a, grad(n->out), grad(n->in[0]));
}

/* No kernel adds a constant: the loop is here. */
Var *ag_affine(Tape *t, Var *x, float alpha, float beta) {
    if (!ready(t, "affine", 1, &x)) return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, affine_backward, 1, &x, &n)) return NULL;
    const float *xd = data(x);
    float *yd = data(y);
    int64_t count = x->value->numel;
#pragma omp parallel for if (count >= PARALLEL_MIN)
    for (int64_t i = 0; i < count; i++) yd[i] = alpha * xd[i] + beta;
    if (n) n->p.scalar.a = alpha;
    return y;
}

/* in: x. d log(x) = dx / x; no kernel has it, so both loops are here. */
static void log_backward(Tape *t, Node *n) {
    (void)t;
    const float *x = data(n->in[0]), *dy = grad(n->out);
    float *dx = grad(n->in[0]);
    int64_t count = n->out->value->numel;
#pragma omp parallel for if (count >= PARALLEL_MIN)
    for (int64_t i = 0; i < count; i++) dx[i] += dy[i] / x[i];
}

Var *ag_log(Tape *t, Var *x) {
    if (!ready(t, "log", 1, &x)) return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, log_backward, 1, &x, &n)) return NULL;
    const float *xd = data(x);
    float *yd = data(y);
    int64_t count = x->value->numel;
#pragma omp parallel for if (count >= PARALLEL_MIN)
    for (int64_t i = 0; i < count; i++) yd[i] = logf(xd[i]);
    return y;
}

/* Checks v is [C] for x: [.., C] (rows) or x: [B, C, ..] (channels) and fills p. */
static bool broadcast_of(Tape *t, const char *op, const Var *x, const Var *v, bool channels,
                         struct NormParams *p) {
    if (!(channels ? channels_of(t, op, x, p) : rows_of(t, op, x, p))) return false;
    if (v->value->ndim == 1 && v->value->shape[0] == p->C) return true;
    char s1[64], s2[64];
    return refuse(t, "%s: x %s needs a vector [%lld], got %s", op, shape_of(x, s1, sizeof s1),
                (long long)p->C, shape_of(v, s2, sizeof s2));
}

/* in: x, v. dx = dy;  dv = sum over rows of dy */
static void add_rows_backward(Tape *t, Node *n) {
    (void)t;
    if (grad(n->in[0])) axpy(numel_of(n->out), 1.0f, grad(n->out), grad(n->in[0]));
    if (grad(n->in[1]))
        sum_rows_add((int)n->p.norm.rows, (int)n->p.norm.C, grad(n->out), grad(n->in[1]));
}

Var *ag_add_rows(Tape *t, Var *x, Var *v) {
    struct NormParams p = {0};
    if (!ready(t, "add_rows", 2, (Var *[]){x, v}) || !broadcast_of(t, "add_rows", x, v, false, &p))
        return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, add_rows_backward, 2, (Var *[]){x, v}, &n)) return NULL;
    add_rows_forward((int)p.rows, (int)p.C, data(x), data(v), data(y));
    if (n) n->p.norm = p;
    return y;
}

/* in: x, v. dx = dy v;  dv = sum over rows of dy x */
static void mul_rows_node_backward(Tape *t, Node *n) {
    (void)t;
    mul_rows_backward((int)n->p.norm.rows, (int)n->p.norm.C, data(n->in[0]), data(n->in[1]),
                      grad(n->out), grad(n->in[0]), grad(n->in[1]));
}

Var *ag_mul_rows(Tape *t, Var *x, Var *v) {
    struct NormParams p = {0};
    if (!ready(t, "mul_rows", 2, (Var *[]){x, v}) || !broadcast_of(t, "mul_rows", x, v, false, &p))
        return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, mul_rows_node_backward, 2, (Var *[]){x, v}, &n)) return NULL;
    mul_rows_forward((int)p.rows, (int)p.C, data(x), data(v), data(y));
    if (n) n->p.norm = p;
    return y;
}

/* in: x, v; p.norm: rows = B, C, HW. dx = dy;  dv[c] = sum of dy over channel c's planes */
static void add_channels_backward(Tape *t, Node *n) {
    (void)t;
    struct NormParams p = n->p.norm;
    if (grad(n->in[0])) axpy(numel_of(n->out), 1.0f, grad(n->out), grad(n->in[0]));
    if (grad(n->in[1]))
        sum_channels_add((int)p.rows, (int)p.C, (int)p.HW, grad(n->out), grad(n->in[1]));
}

Var *ag_add_channels(Tape *t, Var *x, Var *v) {
    struct NormParams p = {0};
    if (!ready(t, "add_channels", 2, (Var *[]){x, v}) ||
        !broadcast_of(t, "add_channels", x, v, true, &p))
        return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, add_channels_backward, 2, (Var *[]){x, v}, &n)) return NULL;
    add_channels_forward((int)p.rows, (int)p.C, (int)p.HW, data(x), data(v), data(y));
    if (n) n->p.norm = p;
    return y;
}

/* in: x, v; p.norm: rows = B, C, HW. dx = dy v[c];  dv[c] = sum of dy x over channel c's
 * planes. No kernel has this shape: each plane is scaled, and dv[c] sums in a fixed order. */
static void mul_channels_backward(Tape *t, Node *n) {
    (void)t;
    struct NormParams p = n->p.norm;
    const float *x = data(n->in[0]), *v = data(n->in[1]), *dy = grad(n->out);
    float *dx = grad(n->in[0]), *dv = grad(n->in[1]);
    if (dx) {
        for (int64_t plane = 0; plane < p.rows * p.C; plane++)
            axpy((size_t)p.HW, v[plane % p.C], dy + plane * p.HW, dx + plane * p.HW);
    }
    if (!dv) return;
#pragma omp parallel for if (p.rows * p.C * p.HW >= PARALLEL_MIN)
    for (int64_t c = 0; c < p.C; c++) {
        double acc = 0.0;
        for (int64_t b = 0; b < p.rows; b++)
            for (int64_t i = 0; i < p.HW; i++) {
                int64_t at = (b * p.C + c) * p.HW + i;
                acc += (double)dy[at] * x[at];
            }
        dv[c] += (float)acc;
    }
}

Var *ag_mul_channels(Tape *t, Var *x, Var *v) {
    struct NormParams p = {0};
    if (!ready(t, "mul_channels", 2, (Var *[]){x, v}) ||
        !broadcast_of(t, "mul_channels", x, v, true, &p))
        return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, mul_channels_backward, 2, (Var *[]){x, v}, &n)) return NULL;
    for (int64_t plane = 0; plane < p.rows * p.C; plane++)
        scale_forward((size_t)p.HW, data(v)[plane % p.C], data(x) + plane * p.HW,
                      data(y) + plane * p.HW);
    if (n) n->p.norm = p;
    return y;
}

/* in: x; p.scalar.a: d y / d x for every element (1 for the sum, 1/n for the mean).
 * dx = a dy, the same for every element */
static void reduce_backward(Tape *t, Node *n) {
    (void)t;
    float g = grad(n->out)[0] * n->p.scalar.a, *dx = grad(n->in[0]);
    size_t count = numel_of(n->in[0]);
#pragma omp parallel for if ((int64_t)count >= PARALLEL_MIN)
    for (size_t i = 0; i < count; i++) dx[i] += g;
}

static Var *reduce(Tape *t, const char *op, Var *x, bool mean) {
    if (!ready(t, op, 1, &x)) return NULL;
    size_t count = numel_of(x);
    if (mean && count == 0) return fail(t, "mean: x has no elements");
    Var *y = result(t, 1, (int64_t[]){1});
    Node *n;
    if (!y || !record(t, y, reduce_backward, 1, &x, &n)) return NULL;
    double sum = sum_array(count, data(x));
    data(y)[0] = (float)(mean ? sum / (double)count : sum);
    if (n) n->p.scalar.a = mean ? 1.0f / (float)count : 1.0f;
    return y;
}

Var *ag_sum(Tape *t, Var *x) { return reduce(t, "sum", x, false); }
Var *ag_mean(Tape *t, Var *x) { return reduce(t, "mean", x, true); }

/* in: x; p.scalar: lo, hi. dx = dy where lo <= x <= hi, else 0 */
static void clamp_node_backward(Tape *t, Node *n) {
    (void)t;
    clamp_backward(numel_of(n->out), n->p.scalar.a, n->p.scalar.b, data(n->in[0]), grad(n->out),
                   grad(n->in[0]));
}

Var *ag_clamp(Tape *t, Var *x, float lo, float hi) {
    if (!ready(t, "clamp", 1, &x)) return NULL;
    if (!(lo <= hi)) return fail(t, "clamp: lo %g is above hi %g", lo, hi);
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, clamp_node_backward, 1, &x, &n)) return NULL;
    clamp_forward(numel_of(x), lo, hi, data(x), data(y));
    if (n) n->p.scalar = (struct ScalarParams){.a = lo, .b = hi};
    return y;
}

/* in: x; p.scalar.a: the exponent p. dx = dy p x^(p-1) */
static void pow_node_backward(Tape *t, Node *n) {
    (void)t;
    pow_backward(numel_of(n->out), n->p.scalar.a, data(n->in[0]), grad(n->out), grad(n->in[0]));
}

Var *ag_pow(Tape *t, Var *x, float p) {
    if (!ready(t, "pow", 1, &x)) return NULL;
    Var *y = result_like(t, x);
    Node *n;
    if (!y || !record(t, y, pow_node_backward, 1, &x, &n)) return NULL;
    pow_forward(numel_of(x), p, data(x), data(y));
    if (n) n->p.scalar.a = p;
    return y;
}

/* === structure === */

/* in: v [B, C]; p.mm: M = rows, N = C, batch = B; saved[0]: M ones.
 * dv[b] = sum over the n rows of dy[b], as the product 1^T dy[b] (the GEMM's summation order,
 * in which the embedded models were trained) */
static void repeat_rows_backward(Tape *t, Node *n) {
    (void)t;
    struct MatmulParams mm = n->p.mm;
    const float *ones = n->saved[0]->data;
    for (int64_t b = 0; b < mm.batch; b++)
        gemm(true, false, 1, (int)mm.N, (int)mm.M, 1.0f, ones, 1, grad(n->out) + b * mm.M * mm.N,
             (int)mm.N, 1.0f, grad(n->in[0]) + b * mm.N, (int)mm.N);
}

Var *ag_repeat_rows(Tape *t, Var *v, int64_t rows) {
    const char *op = "repeat_rows";
    if (!ready(t, op, 1, &v)) return NULL;
    char s[64];
    if (v->value->ndim != 2 || rows < 1)
        return fail(t, "repeat_rows: %s on %lld rows (want [B, C] on at least 1)",
                    shape_of(v, s, sizeof s), (long long)rows);
    struct MatmulParams mm = {.M = rows, .N = v->value->shape[1], .batch = v->value->shape[0]};
    if (!check_int(t, op, mm.M) || !check_int(t, op, mm.N)) return NULL;
    Var *y = result(t, 3, (int64_t[]){mm.batch, rows, mm.N});
    Node *n;
    if (!y || !record(t, y, repeat_rows_backward, 1, &v, &n)) return NULL;
    for (int64_t b = 0; b < mm.batch; b++)
        for (int64_t r = 0; r < rows; r++)
            memcpy(data(y) + (b * rows + r) * mm.N, data(v) + b * mm.N,
                   (size_t)mm.N * sizeof(float));
    if (!n) return y; /* no backward: no ones */
    Tensor *ones = tape_tensor(t, MEM_SAVED, 1, (int64_t[]){rows});
    if (!ones) return NULL; /* the tape has failed, so no backward runs this node */
    for (int64_t r = 0; r < rows; r++) ones->data[r] = 1.0f;
    n->p.mm = mm;
    save(t, n, 0, ones);
    return y;
}

/* in: x. y shares x's data; its gradient goes back to x's unchanged. */
static void reshape_backward(Tape *t, Node *n) {
    (void)t;
    axpy(numel_of(n->out), 1.0f, grad(n->out), grad(n->in[0]));
}

Var *ag_reshape(Tape *t, Var *x, int ndim, const int64_t *shape) {
    if (!ready(t, "reshape", 1, &x)) return NULL;
    Tensor *view = shape ? tensor_reshape(x->value, ndim, shape) : NULL;
    if (!view) {
        char s[64];
        Tensor want = {.ndim = ndim > 0 && ndim <= TENSOR_MAX_DIMS && shape ? ndim : 0};
        if (want.ndim) memcpy(want.shape, shape, (size_t)ndim * sizeof *shape);
        char w[64];
        return fail(t, "reshape: cannot view %s as %s", shape_of(x, s, sizeof s),
                    want.ndim ? tensor_shape_str(&want, w, sizeof w) : "an invalid shape");
    }
    Var *y = var_add(t, view, true, false, false);
    Node *n;
    if (!y || !record(t, y, reshape_backward, 1, &x, &n)) return NULL;
    y->view_of = x;
    x->readers++; /* the view reads x's data for as long as it lives */
    /* backward would release x's data under an unrecorded view that still uses it */
    if (!n && x->producer) var_keep(x);
    return y;
}

/* Where row r of y starts in x. */
static int64_t permute_row_start(int ndim, const int64_t *y_shape, const int64_t *step,
                                 int64_t r) {
    int64_t at = 0;
    for (int d = ndim - 2; d >= 0; d--) {
        at += r % y_shape[d] * step[d];
        r /= y_shape[d];
    }
    return at;
}

/* Whether perm keeps dims [0, a), then puts [c, ndim) before [a, c) for some a < c < ndim: x
 * seen as [batch, p, q] becomes y [batch, q, p] (SegFormer's [B, C, H, W] <-> [B, H, W, C]).
 * Sets the three sizes. */
static bool permute_is_transpose(int ndim, const int64_t *x_shape, const int *perm,
                                 int64_t *batch, int64_t *p, int64_t *q) {
    int a = 0;
    while (a < ndim && perm[a] == a) a++;
    if (a == ndim) return false; /* the identity */
    int c = perm[a];
    for (int k = 0; a + k < ndim; k++) {
        int expected = k < ndim - c ? c + k : a + k - (ndim - c);
        if (perm[a + k] != expected) return false;
    }
    *batch = *p = *q = 1;
    for (int d = 0; d < ndim; d++) *(d < a ? batch : d < c ? p : q) *= x_shape[d];
    return true;
}

/* y = permute(x): y[i] = x[at], or x[at] += y[i] when scatter (backward); each y element matches
 * one x element, so no two writes meet. A permutation that is a batched transpose (SegFormer's
 * [B, C, H W] <-> [B, H W, C]) goes to transpose_batched's 8 x 8 register blocks (walked a row
 * at a time it had been 27% of a MiT-b5 forward + backward; against 16 x 16 tiles of it, that
 * pass went 4.3 -> 3.5 s at 512 x 512). Any other is walked a row of y (its last dim) at a time:
 * the models' other permutations keep the last dim, so each row is a run of x. */
static void permute_walk(int ndim, const int64_t *x_shape, const int *perm, float *x, float *y,
                         bool scatter) {
    int64_t batch, p, q;
    if (permute_is_transpose(ndim, x_shape, perm, &batch, &p, &q)) {
        if (scatter) transpose_batched(batch, q, p, y, x, true);
        else transpose_batched(batch, p, q, x, y, false);
        return;
    }
    int64_t x_stride[TENSOR_MAX_DIMS], y_shape[TENSOR_MAX_DIMS], step[TENSOR_MAX_DIMS];
    x_stride[ndim - 1] = 1;
    for (int d = ndim - 2; d >= 0; d--) x_stride[d] = x_stride[d + 1] * x_shape[d + 1];
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        y_shape[d] = x_shape[perm[d]];
        step[d] = x_stride[perm[d]];
        numel *= y_shape[d];
    }
    if (numel == 0) return;
    int64_t inner = y_shape[ndim - 1], rows = numel / inner, last = step[ndim - 1];
#pragma omp parallel for if (numel >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int64_t at = permute_row_start(ndim, y_shape, step, r);
        float *yr = y + r * inner;
        if (scatter)
            for (int64_t i = 0; i < inner; i++) x[at + i * last] += yr[i];
        else
            for (int64_t i = 0; i < inner; i++) yr[i] = x[at + i * last];
    }
}

/* in: x; p.perm. dx = dy permuted back (the inverse permutation) */
static void permute_backward(Tape *t, Node *n) {
    (void)t;
    const Tensor *xv = n->in[0]->value;
    permute_walk(xv->ndim, xv->shape, n->p.perm, grad(n->in[0]), grad(n->out), true);
}

Var *ag_permute(Tape *t, Var *x, const int *perm) {
    if (!ready(t, "permute", 1, &x)) return NULL;
    const Tensor *xv = x->value;
    bool seen[TENSOR_MAX_DIMS] = {false}, ok = perm != NULL;
    for (int d = 0; d < xv->ndim; d++) {
        if (!ok) break;
        ok = perm[d] >= 0 && perm[d] < xv->ndim && !seen[perm[d]];
        if (ok) seen[perm[d]] = true;
    }
    char s[64];
    if (!ok)
        return fail(t, "permute: not a permutation of the %d dims of %s", xv->ndim,
                    shape_of(x, s, sizeof s));
    int64_t shape[TENSOR_MAX_DIMS];
    for (int d = 0; d < xv->ndim; d++) shape[d] = xv->shape[perm[d]];
    Var *y = result(t, xv->ndim, shape);
    Node *n;
    if (!y || !record(t, y, permute_backward, 1, &x, &n)) return NULL;
    permute_walk(xv->ndim, xv->shape, perm, data(x), data(y), false);
    if (n) memcpy(n->p.perm, perm, (size_t)xv->ndim * sizeof *perm);
    return y;
}

Var *ag_transpose(Tape *t, Var *x, int d0, int d1) {
    if (!ready(t, "transpose", 1, &x)) return NULL;
    int nd = x->value->ndim, perm[TENSOR_MAX_DIMS];
    if (d0 < 0 || d0 >= nd || d1 < 0 || d1 >= nd)
        return fail(t, "transpose: dims %d and %d of a %d-dim tensor", d0, d1, nd);
    for (int d = 0; d < nd; d++) perm[d] = d == d0 ? d1 : d == d1 ? d0 : d;
    return ag_permute(t, x, perm);
}

/* With src: [outer, src_rows, inner] and dst: [outer, dst_rows, inner], copies rows
 * src_at .. src_at+rows-1 of src to rows dst_at.. of dst, or adds them when accumulate. */
static void copy_window(int64_t outer, int64_t inner, int64_t rows, const float *src,
                        int64_t src_rows, int64_t src_at, float *dst, int64_t dst_rows,
                        int64_t dst_at, bool accumulate) {
#pragma omp parallel for if (outer > 1 && outer * rows * inner >= PARALLEL_MIN)
    for (int64_t o = 0; o < outer; o++) {
        const float *s = src + (o * src_rows + src_at) * inner;
        float *d = dst + (o * dst_rows + dst_at) * inner;
        if (accumulate)
            for (int64_t i = 0; i < rows * inner; i++) d[i] += s[i];
        else
            memcpy(d, s, (size_t)(rows * inner) * sizeof *d);
    }
}

/* x as [outer, D, inner] around dim. */
static struct WindowParams window_of(const Tensor *x, int dim, int64_t offset) {
    return (struct WindowParams){.outer = dims_product(x, 0, dim),
                                 .inner = dims_product(x, dim + 1, x->ndim), .offset = offset,
                                 .dim = dim};
}

/* in: x; p.window.offset: the first row taken. dx[offset .. offset + len) += dy, 0 elsewhere */
static void slice_backward(Tape *t, Node *n) {
    (void)t;
    struct WindowParams w = n->p.window;
    int64_t len = n->out->value->shape[w.dim], D = n->in[0]->value->shape[w.dim];
    copy_window(w.outer, w.inner, len, grad(n->out), len, 0, grad(n->in[0]), D, w.offset, true);
}

Var *ag_slice(Tape *t, Var *x, int dim, int64_t start, int64_t len) {
    if (!ready(t, "slice", 1, &x)) return NULL;
    const Tensor *xv = x->value;
    char s[64];
    if (dim < 0 || dim >= xv->ndim || start < 0 || len < 0 || start > xv->shape[dim] - len)
        return fail(t, "slice: rows %lld..%lld of dim %d are outside %s", (long long)start,
                    (long long)(start + len - 1), dim, shape_of(x, s, sizeof s));
    int64_t shape[TENSOR_MAX_DIMS];
    memcpy(shape, xv->shape, sizeof shape);
    shape[dim] = len;
    Var *y = result(t, xv->ndim, shape);
    Node *n;
    if (!y || !record(t, y, slice_backward, 1, &x, &n)) return NULL;
    struct WindowParams w = window_of(xv, dim, start);
    copy_window(w.outer, w.inner, len, data(x), xv->shape[dim], start, data(y), len, 0, false);
    if (n) n->p.window = w;
    return y;
}

/* in: the parts, in order. Each part's dx is its own slice of dy */
static void concat_backward(Tape *t, Node *n) {
    (void)t;
    struct WindowParams w = n->p.window;
    int64_t total = n->out->value->shape[w.dim], at = 0;
    for (int i = 0; i < n->n_in; i++) {
        int64_t rows = n->in[i]->value->shape[w.dim];
        if (grad(n->in[i]))
            copy_window(w.outer, w.inner, rows, grad(n->out), total, at, grad(n->in[i]), rows, 0,
                        true);
        at += rows;
    }
}

/* True when part may be joined to first along dim. */
static bool concat_fits(const Tensor *first, const Tensor *part, int dim) {
    if (part->ndim != first->ndim) return false;
    for (int d = 0; d < first->ndim; d++)
        if (d != dim && part->shape[d] != first->shape[d]) return false;
    return true;
}

Var *ag_concat(Tape *t, Var **xs, int n_parts, int dim) {
    if (!t || t->failed) return NULL;
    if (!xs || n_parts < 1) return fail(t, "concat: no inputs");
    if (!ready(t, "concat", n_parts, xs)) return NULL;
    const Tensor *first = xs[0]->value;
    if (dim < 0 || dim >= first->ndim)
        return fail(t, "concat: dim %d of a %d-dim tensor", dim, first->ndim);
    int64_t shape[TENSOR_MAX_DIMS];
    memcpy(shape, first->shape, sizeof shape);
    shape[dim] = 0;
    for (int i = 0; i < n_parts; i++) {
        char s1[64], s2[64];
        if (!concat_fits(first, xs[i]->value, dim))
            return fail(t, "concat: part %d is %s, part 1 is %s, along dim %d", i + 1,
                        shape_of(xs[i], s1, sizeof s1), shape_of(xs[0], s2, sizeof s2), dim);
        shape[dim] += xs[i]->value->shape[dim];
    }
    Var *y = result(t, first->ndim, shape);
    Node *n;
    if (!y || !record(t, y, concat_backward, n_parts, xs, &n)) return NULL;
    struct WindowParams w = window_of(first, dim, 0);
    int64_t at = 0;
    for (int i = 0; i < n_parts; i++) {
        int64_t rows = xs[i]->value->shape[dim];
        copy_window(w.outer, w.inner, rows, data(xs[i]), rows, 0, data(y), shape[dim], at, false);
        at += rows;
    }
    if (n) n->p.window = w;
    return y;
}
