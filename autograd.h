/* autograd.h - reverse-mode automatic differentiation on a tape of tensor.c kernels.
 *
 * A Tape records every op whose inputs need a gradient, with what its backward needs, and is
 * also the arena of the values it makes: tape_free releases every Var, value, gradient and node
 * made through it. tape_backward runs the recorded nodes in reverse and consumes them: each
 * node's saved data, and the value and gradient of each intermediate it produced, are freed as
 * soon as the node's backward has run, so memory falls while backward proceeds. Afterwards only
 * leaves (with their gradients), the loss and values made without recording remain readable.
 *
 * Errors: an op that fails (wrong shape, out of memory, a NULL or released input) returns NULL
 * and records a message in the tape; every later op on that tape returns NULL at once, so a
 * caller can chain ops and check once with tape_check. A failed tape stays failed: free it.
 *
 * One guided step, say:
 *     Tape *t = tape_new();
 *     Var *x = var_new(t, latent, true);              wants d loss / d latent
 *     Var *img = vae_decode(t, vae, x);               ag_* ops, ag_checkpoint per block
 *     Var *loss = ag_mean(t, ag_pow(t, detector(t, det, img), 2.0f));
 *     if (tape_check(t, e) || tape_backward(t, loss, e)) ...;
 *     read x->grad, then tape_free(t).
 * Parameters are leaves over the model's tensors (requires_grad false when only the input's
 * gradient is wanted: their backward work is then skipped). A Var may be used on another tape
 * than its own (parameter Vars on a long-lived tape, graphs on per-step tapes) as long as it
 * outlives them; its gradient accumulates across them. Values made with grad off stay until
 * tape_free: run long no-grad passes block by block through ag_checkpoint, or on short tapes.
 * An intermediate that no backward reads can go before backward: var_drop. */
#ifndef DIAMOND_AUTOGRAD_H
#define DIAMOND_AUTOGRAD_H

#include "tensor.h"

typedef struct Tape Tape;
typedef struct Node Node;

/* A value in a graph. `grad` is d loss / d value: allocated and zeroed when the first gradient
 * reaches it, accumulated (+=) afterwards, NULL until then. Read value and grad; the other
 * fields belong to the tape. */
typedef struct Var {
    Tensor *value;      /* NULL once tape_backward has released an intermediate */
    Tensor *grad;
    bool requires_grad; /* a leaf asked for it, or the Var was made by a recorded op */
    Tape *tape;         /* the tape that owns this Var (it may be used on other tapes) */
    Node *producer;     /* the recorded node that made it, until backward consumes that node */
    struct Var *view_of; /* the Var whose data `value` shares (reshape), else NULL */
    bool leaf;          /* made by var_new / var_take, not by an op */
    bool owns_value;
    bool keep;          /* backward must not release the value */
    bool dropped;       /* var_drop freed the value's data; its shape stays */
    int readers;        /* recorded backwards (and views) that read the value: var_drop waits */
} Var;

/* Memory a tape holds, in bytes, its checkpoint sub-tapes included while they live. */
typedef struct TapeStats {
    size_t value_bytes; /* values the tape owns: op results and var_take leaves */
    size_t saved_bytes; /* extra data nodes keep for backward (norm statistics, lse, ...) */
    size_t grad_bytes;  /* gradients */
    size_t peak_bytes;  /* the largest value + saved + grad total seen so far */
    int64_t pending_nodes;  /* recorded, not yet consumed by a backward */
    int64_t recorded_nodes; /* recorded over the tape's life */
} TapeStats;

Tape *tape_new(void);
void tape_free(Tape *t);
/* With grad off, ops compute and return their result but record and save nothing. On by default. */
void tape_set_grad(Tape *t, bool enabled);
bool tape_grad_enabled(const Tape *t);
/* 0 when every op so far succeeded; otherwise -1 with the first failure's message in e. */
int tape_check(const Tape *t, Error *e);
/* Fails t as a failing op does (unless it has failed already), for a graph that cannot be built;
 * returns NULL, the failed op's result. */
Var *tape_fail(Tape *t, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
TapeStats tape_stats(const Tape *t);

/* A leaf over a tensor the caller keeps owning (model parameters, inputs); it must outlive the
 * tape's use of it. */
Var *var_new(Tape *t, Tensor *value, bool requires_grad);
/* A leaf that takes ownership of value (freed with the tape, or at once when this fails;
 * value == NULL fails as out of memory, so var_take(t, TENSOR_NEW(...), false) is safe). */
Var *var_take(Tape *t, Tensor *value, bool requires_grad);
/* Keeps v's value readable after tape_backward (the loss is always kept). */
void var_keep(Var *v);
/* Frees v's value at once when no recorded backward reads it and no view shares it (a
 * convolution's input when only the gradient to that input is wanted, an addition's operands):
 * the caller's promise that no op will take v again, as `del v` in Python; so only for a Var
 * the caller made (never a checkpoint function's input, which its caller may still use).
 * Gradients still flow through v; an op given v afterwards fails. Otherwise (a leaf, a kept
 * value, a reader recorded) nothing changes and backward releases the value as usual. True
 * when freed. */
bool var_drop(Var *v);
/* Sets v's gradient to zero, when it has one, so the next backward starts afresh. */
void var_zero_grad(Var *v);

/* Seeds d loss = 1 at a scalar loss (numel 1) and runs every recorded node in reverse,
 * accumulating into the gradient of every Var that requires grad. Consumes the graph: more ops
 * may be recorded afterwards and backpropagated by another call; leaf gradients keep adding up. */
int tape_backward(Tape *t, Var *loss, Error *e);
/* The same from any output: its gradient is seeded with dout (same shape): a vector-Jacobian
 * product. */
int tape_backward_from(Tape *t, Var *out, const Tensor *dout, Error *e);

/* === checkpointing ===
 * ag_checkpoint runs fn(t', inputs, ctx) on a scratch tape t' with grad off and keeps only the
 * output: fn's intermediates are freed at once. When the tape records and some input requires
 * grad, its backward re-runs fn with grad on, on another scratch tape, backpropagates the
 * incoming gradient through it into the inputs (and into any other Var fn uses, such as
 * parameters reached through ctx), then frees that tape. Gradients are bitwise identical to
 * running fn directly. fn must compute the same values every time, ctx must stay valid until
 * backward, and every Var that may need a gradient must be in inputs (a node is recorded only
 * when one of them requires grad). With grad off it is a way to bound the memory of a block. */
typedef Var *(*CheckpointFn)(Tape *t, Var **inputs, void *ctx);
Var *ag_checkpoint(Tape *t, CheckpointFn fn, void *ctx, Var **inputs, int n_inputs);

/* === ops ===
 * Each returns a new Var owned by t, or NULL on failure (see tape_check). Optional Var
 * arguments (biases, affine weights) may be NULL. Arguments that are marked constant get no
 * gradient; passing one that requires grad is an error. */

/* x: [.., K], w: [N, K], b: [N] -> y: [.., N] = x w^T + b */
Var *ag_linear(Tape *t, Var *x, Var *w, Var *b);
/* x: [.., K], w: a constant [N, K] weight as stored (F32, BF16 or F16 elements: a tensor where it
 * lies in a mapped file, gemm_stored; it must outlive the tape's backward) -> y: [.., N] = x w^T.
 * No f32 copy of w is made; gradients reach x only. PRECISION_BF16 computes y from x and w
 * rounded to bf16 into f32 sums (gemm_stored_bf16); the gradient to x is f32's either way. */
Var *ag_linear_stored(Tape *t, Var *x, const void *w, DType dtype, int64_t N, int64_t K,
                      Precision precision);
/* a: [.., M, K], b: [.., K, N] (the same leading dims) or [K, N] (shared) -> y: [.., M, N] */
Var *ag_matmul(Tape *t, Var *a, Var *b);
/* x: [B, Cin, H, W], w: [Cout, Cin/groups, k, k'], b: [Cout] -> y: [B, Cout, Ho, Wo]; the same
 * stride and zero padding on both axes. */
Var *ag_conv2d(Tape *t, Var *x, Var *w, Var *b, int stride, int padding, int groups);
/* softmax(scale q k^T) v. q: [B, Nq, H, D], k, v: [B, Nk, Hkv, D] -> y: [B, Nq, H, D];
 * kv_valid: [B] valid key counts (copied) or NULL. */
Var *ag_attention(Tape *t, Var *q, Var *k, Var *v, float scale, bool causal, const int *kv_valid);
/* x: [B, N, H, D], cos, sin (constant): [N, D/2] -> y: [B, N, H, D]; pairs as rope_forward */
Var *ag_rope(Tape *t, Var *x, Var *cos, Var *sin, RopePairs pairs);

/* x: [.., C], w, b: [C] -> y: [.., C], normalised over the last dim */
Var *ag_layernorm(Tape *t, Var *x, Var *w, Var *b, float eps);
/* x: [B, C, ..], w, b: [C] -> y: [B, C, ..], normalised over each group of C/groups channels */
Var *ag_groupnorm(Tape *t, Var *x, int groups, Var *w, Var *b, float eps);
/* SiLU(ag_groupnorm(x, ...)) as one op: keeps only x and the statistics for backward, not the
 * normalised tensor (nor its gradient), so decoders that pair the two hold one tensor less. */
Var *ag_groupnorm_silu(Tape *t, Var *x, int groups, Var *w, Var *b, float eps);
/* x: [.., C], w: [C] -> y: [.., C] */
Var *ag_rmsnorm(Tape *t, Var *x, Var *w, float eps);
/* x: [B, C, ..]; mean, var (constant), w, b: [C] -> y: [B, C, ..] with running statistics */
Var *ag_batchnorm_eval(Tape *t, Var *x, Var *mean, Var *var, Var *w, Var *b, float eps);

Var *ag_gelu(Tape *t, Var *x, bool tanh_approx);
Var *ag_silu(Tape *t, Var *x);
Var *ag_relu(Tape *t, Var *x);
Var *ag_sigmoid(Tape *t, Var *x);
/* softmax over the last dim */
Var *ag_softmax(Tape *t, Var *x);
/* x: [.., H, W] -> y: [.., 2H, 2W] */
Var *ag_upsample_nearest2x(Tape *t, Var *x);
/* x: [.., H, W] -> y: [.., out_h, out_w], PyTorch's bilinear with align_corners=False */
Var *ag_resize_bilinear(Tape *t, Var *x, int out_h, int out_w);

/* a, b: the same shape -> a + b, a * b */
Var *ag_add(Tape *t, Var *a, Var *b);
Var *ag_mul(Tape *t, Var *a, Var *b);
/* alpha x; alpha x + beta; the natural log (for losses such as the focal one) */
Var *ag_scale(Tape *t, Var *x, float alpha);
Var *ag_affine(Tape *t, Var *x, float alpha, float beta);
Var *ag_log(Tape *t, Var *x);
/* x: [.., C], v: [C] -> x + v, x * v on every row */
Var *ag_add_rows(Tape *t, Var *x, Var *v);
Var *ag_mul_rows(Tape *t, Var *x, Var *v);
/* x: [B, C, ..], v: [C] -> x + v[c], x * v[c] on every channel plane */
Var *ag_add_channels(Tape *t, Var *x, Var *v);
Var *ag_mul_channels(Tape *t, Var *x, Var *v);
/* v: [B, C] -> [B, rows, C], v's row b on each of the rows of sample b (a broadcast, for
 * per-sample vectors such as FLUX.2's modulations) */
Var *ag_repeat_rows(Tape *t, Var *v, int64_t rows);
/* -> [1]: the sum, the mean of every element */
Var *ag_sum(Tape *t, Var *x);
Var *ag_mean(Tape *t, Var *x);
/* min(max(x, lo), hi); the gradient passes where lo <= x <= hi */
Var *ag_clamp(Tape *t, Var *x, float lo, float hi);
/* x^p elementwise */
Var *ag_pow(Tape *t, Var *x, float p);

/* --- structure --- */

/* The same data with another shape of the same size: a view, no copy. */
Var *ag_reshape(Tape *t, Var *x, int ndim, const int64_t *shape);
/* y.shape[i] = x.shape[perm[i]], copied contiguous; perm has x's ndim entries. */
Var *ag_permute(Tape *t, Var *x, const int *perm);
/* swaps dims d0 and d1 */
Var *ag_transpose(Tape *t, Var *x, int d0, int d1);
/* elements start .. start+len-1 of dim `dim` */
Var *ag_slice(Tape *t, Var *x, int dim, int64_t start, int64_t len);
/* xs[0..n-1] joined along dim; every other dim must agree */
Var *ag_concat(Tape *t, Var **xs, int n, int dim);

#endif
