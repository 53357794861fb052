/* nn.c - layers and models built from tensor.c kernels through autograd.c ops, and the DIAMOND
 * sampler that runs them.
 *
 * Contents, in reading order: parameters and basic layers; FLUX.2 transformer; the embedded
 * models' text encoder; Qwen3 text encoder; prompt encoder; VAE; SegFormer detector; the DIAMOND
 * sampler (sampler_step: one guided step); metrics. Each model's section opens with a map: the
 * upstream class, its tensor names, its inputs and outputs, its equations. */
#include "nn.h"

#include <ctype.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* === parameters and basic layers === */

typedef struct ParamEntry {
    char *name;
    Var *var;
    bool buffer;
} ParamEntry;

struct Params {
    Tape *tape; /* owns every leaf, its value and its gradient */
    const StModel *source; /* the files, or a random model */
    ParamEntry *entries;
    int n, cap;
};

Params *params_new(const StModel *source) {
    Params *p = calloc(1, sizeof *p);
    if (p && !(p->tape = tape_new())) {
        free(p);
        return NULL;
    }
    if (p) p->source = source;
    return p;
}

void params_free(Params *p) {
    if (!p) return;
    for (int i = 0; i < p->n; i++) free(p->entries[i].name);
    free(p->entries);
    tape_free(p->tape);
    free(p);
}

/* 0 when m holds tensor `name` with exactly `shape`; otherwise an error naming both shapes. */
static int params_check_shape(const StModel *m, const char *name, int ndim, const int64_t *shape,
                              Error *e) {
    const StTensor *info = st_model_find(m, name);
    if (!info) return error_set(e, "missing tensor '%s'", name);
    if (info->ndim == ndim && !memcmp(info->shape, shape, (size_t)ndim * sizeof *shape)) return 0;
    char want[128], got[128];
    Tensor wanted = {.ndim = ndim}, found = {.ndim = info->ndim};
    for (int i = 0; i < ndim && i < TENSOR_MAX_DIMS; i++) wanted.shape[i] = shape[i];
    for (int i = 0; i < info->ndim && i < TENSOR_MAX_DIMS; i++) found.shape[i] = info->shape[i];
    if (info->ndim > TENSOR_MAX_DIMS) found.ndim = TENSOR_MAX_DIMS;
    return error_set(e, "tensor '%s' has shape %s, the config implies %s", name,
                     tensor_shape_str(&found, got, sizeof got),
                     tensor_shape_str(&wanted, want, sizeof want));
}

/* The source's tensor `name` at exactly `shape` into dst (numel floats), converted to f32; for
 * a random model of any tensor, st_random_fill's values for that name and shape. */
static int params_fill(const StModel *m, const char *name, int ndim, const int64_t *shape,
                       float *dst, int64_t numel, Error *e) {
    uint64_t seed;
    RandomKind kind;
    if (st_model_random_any_source(m, &seed, &kind)) {
        st_random_fill(seed, kind, name, ndim, shape, dst);
        return 0;
    }
    if (params_check_shape(m, name, ndim, shape, e) || st_model_read_f32(m, name, dst, numel, e))
        return -1;
    size_t bad = first_non_finite((size_t)numel, dst);
    if (bad < (size_t)numel)
        return error_set(e, "tensor '%s' holds %s at value %zu: a model's weights must be finite",
                         name, isnan(dst[bad]) ? "NaN" : "an infinity", bad);
    return 0;
}

/* The same as a new f32 tensor. */
static int params_read(const StModel *m, const char *name, int ndim, const int64_t *shape,
                       Tensor **out, Error *e) {
    if (!(*out = tensor_new(ndim, shape)))
        return error_set(e, "out of memory loading tensor '%s'", name);
    if (params_fill(m, name, ndim, shape, (*out)->data, (*out)->numel, e)) {
        tensor_free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

/* Reads the named tensor into a new entry. */
static Var *params_add(Params *p, bool buffer, Error *e, int ndim, const int64_t *shape,
                       const char *fmt, va_list ap) {
    char name[256];
    int len = vsnprintf(name, sizeof name, fmt, ap);
    if (len < 0 || (size_t)len >= sizeof name) {
        error_set(e, "tensor name too long: %s", name);
        return NULL;
    }
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 64;
        ParamEntry *grown = realloc(p->entries, (size_t)cap * sizeof *grown);
        if (!grown) {
            error_set(e, "out of memory loading tensor '%s'", name);
            return NULL;
        }
        p->entries = grown;
        p->cap = cap;
    }
    Tensor *value;
    if (params_read(p->source, name, ndim, shape, &value, e)) return NULL;
    char *copy = strdup(name);
    Var *v = copy ? var_take(p->tape, value, false) : (tensor_free(value), NULL);
    if (!v) {
        free(copy);
        error_set(e, "out of memory loading tensor '%s'", name);
        return NULL;
    }
    p->entries[p->n++] = (ParamEntry){copy, v, buffer};
    return v;
}

Var *params_load(Params *p, Error *e, int ndim, const int64_t *shape, const char *name_fmt, ...) {
    va_list ap;
    va_start(ap, name_fmt);
    Var *v = params_add(p, false, e, ndim, shape, name_fmt, ap);
    va_end(ap);
    return v;
}

Var *params_load_buffer(Params *p, Error *e, int ndim, const int64_t *shape,
                        const char *name_fmt, ...) {
    va_list ap;
    va_start(ap, name_fmt);
    Var *v = params_add(p, true, e, ndim, shape, name_fmt, ap);
    va_end(ap);
    return v;
}

Var *params_constant(Params *p, Tensor *value, Error *e) {
    Var *v = var_take(p->tape, value, false);
    if (!v) error_set(e, "out of memory");
    return v;
}

int params_count(const Params *p) { return p->n; }
const char *params_name(const Params *p, int i) { return p->entries[i].name; }
Var *params_var(const Params *p, int i) { return p->entries[i].var; }
bool params_is_buffer(const Params *p, int i) { return p->entries[i].buffer; }

void params_set_trainable(Params *p, bool trainable) {
    for (int i = 0; i < p->n; i++)
        if (!p->entries[i].buffer) p->entries[i].var->requires_grad = trainable;
}

static bool weights_from_files(WeightSource source) {
    return source == WEIGHTS_FILES || source == WEIGHTS_FILES_NON_STRICT;
}

/* How a source without files draws its weights. */
static RandomKind random_kind(WeightSource source) {
    return source == WEIGHTS_FRESH ? RANDOM_FOR_TRAINING : RANDOM_FOR_TIMING;
}

/* The files, random values or fresh weights (nn.h); *st stays open for the loading. */
int params_open(Params **p, StModel **st, const char *dir, WeightSource source, uint64_t seed,
                Error *e) {
    *p = NULL;
    *st = NULL;
    if (weights_from_files(source) ? st_model_open(st, dir, e)
                                   : st_model_random_any(st, seed, random_kind(source), e))
        return -1;
    *p = params_new(*st);
    return *p ? 0 : error_set(e, "out of memory");
}

/* true when name starts with one of the strings of the NULL-terminated list (NULL: none). */
static bool starts_with_any(const char *name, const char *const *prefixes) {
    if (!prefixes) return false;
    for (const char *const *prefix = prefixes; *prefix; prefix++)
        if (!strncmp(name, *prefix, strlen(*prefix))) return true;
    return false;
}

/* Strict loading (nn.h): a tensor of the files neither read nor left means a config for a smaller
 * network than its files hold, or another model's files. Random weights have no names to check. */
int weights_all_read(WeightSource source, const StModel *st,
                     bool (*reads)(const void *ctx, const char *name), const void *ctx,
                     const char *const *leave, const char *dir, Error *e) {
    if (source != WEIGHTS_FILES) return 0;
    size_t unread = 0, count = st_model_count(st);
    char list[192] = "";
    for (size_t i = 0; i < count; i++) {
        const char *name = st_model_at(st, i)->name;
        if (starts_with_any(name, leave) || reads(ctx, name)) continue;
        if (unread++ < 3) {
            size_t len = strlen(list);
            snprintf(list + len, sizeof list - len, "%s'%s'", len ? ", " : "", name);
        }
    }
    if (unread == 0) return 0;
    return error_set(e, "%s: %zu tensor%s in the files that the config does not use (%s%s): a "
                        "config for a smaller network, or another model's files",
                     dir, unread, unread > 1 ? "s" : "", list, unread > 3 ? ", ..." : "");
}

/* Whether p holds a weight named name (params_load read it). */
bool params_reads(const void *ctx, const char *name) {
    const Params *p = ctx;
    for (int i = 0; i < p->n; i++)
        if (!strcmp(p->entries[i].name, name)) return true;
    return false;
}

int linear_load(Linear *l, Params *p, int in, int out, bool bias, const char *prefix, Error *e) {
    *l = (Linear){0};
    if (!(l->weight = params_load(p, e, SHAPE(out, in), "%s.weight", prefix)) ||
        (bias && !(l->bias = params_load(p, e, SHAPE(out), "%s.bias", prefix))))
        return -1;
    return 0;
}

Var *linear_apply(Tape *t, const Linear *l, Var *x) {
    return ag_linear(t, x, l->weight, l->bias);
}

int conv2d_load(Conv2d *c, Params *p, int in, int out, int kernel, int stride, int padding,
                int groups, bool bias, const char *prefix, Error *e) {
    *c = (Conv2d){.stride = stride, .padding = padding, .groups = groups};
    if (groups < 1 || in % groups || out % groups)
        return error_set(e, "%s: %d -> %d channels do not split into %d groups", prefix, in, out,
                         groups);
    if (!(c->weight = params_load(p, e, SHAPE(out, in / groups, kernel, kernel), "%s.weight",
                                  prefix)) ||
        (bias && !(c->bias = params_load(p, e, SHAPE(out), "%s.bias", prefix))))
        return -1;
    return 0;
}

Var *conv2d_apply(Tape *t, const Conv2d *c, Var *x) {
    return ag_conv2d(t, x, c->weight, c->bias, c->stride, c->padding, c->groups);
}

int norm_load(NormParams *n, Params *p, int channels, bool bias, const char *prefix, Error *e) {
    *n = (NormParams){0};
    if (!(n->weight = params_load(p, e, SHAPE(channels), "%s.weight", prefix)) ||
        (bias && !(n->bias = params_load(p, e, SHAPE(channels), "%s.bias", prefix))))
        return -1;
    return 0;
}

/* === FLUX.2 transformer ===
 * diffusers' Flux2Transformer2DModel (transformer_flux2.py), written from that code.
 *   in/out  tokens [B, T, in_channels] (the packed latent, T = h w), prompt embeddings
 *           [B, L, joint_attention_dim], sigma [B] -> velocity [B, T, out_channels]
 *   names   x_embedder, context_embedder, time_guidance_embed.timestep_embedder.linear_1/2,
 *           double_stream_modulation_img/_txt.linear, single_stream_modulation.linear;
 *           transformer_blocks.N.attn.{to_q,to_k,to_v,to_out.0,norm_q,norm_k,add_q_proj,
 *           add_k_proj,add_v_proj,to_add_out,norm_added_q,norm_added_k}, .ff and .ff_context
 *           .{linear_in,linear_out}; single_transformer_blocks.N.attn.{to_qkv_mlp_proj,to_out,
 *           norm_q,norm_k}; norm_out.linear, proj_out (all .weight, no biases)
 *   blocks  modulate(x) = LN(x) (1 + scale) + shift; double: per stream q, k, v with per-head
 *           RMSNorm and RoPE, one attention over [text, image], x += gate o, x += gate
 *           SwiGLU(modulate(x)); single: [text, image] through one fused projection to q, k, v
 *           and the SwiGLU input, x += gate to_out([attention, SwiGLU]); out: proj_out of
 *           LN(x) (1 + scale) + shift over the image tokens
 * One call: the conditioning (timestep embedding and
 * the modulations every block shares) is computed once for the batch; then the input projections,
 * each double-stream block, each single-stream block and the output layers run in turn. Each runs
 * in parts (a block's attention inputs, then its outputs and feed-forwards) on short no-grad
 * tapes, one batch item and, for the token-wise layers, one chunk of tokens at a time; the weight
 * matrices are read where they lie in the mapped files (bf16 widened as the GEMM packs them).
 * Hidden states live between parts as plain tensors. Peak memory is a few [tokens, dim] tensors
 * (for klein-4B at 4096 + 512 tokens, 0.5 GB of activations) besides the mapped files. A resident
 * model (small ones, to train) instead holds every weight as a leaf of a
 * Params and runs the same layer functions as one graph over the batch (flux2_forward_graph). */

typedef struct Flux2Weights Flux2Weights;

/* Streaming (flux2_open from files or config-only): weights stay in the files and params is NULL.
 * Resident (WEIGHTS_FRESH, or flux2_make_resident): every weight is a leaf of params, reached
 * through resident. */
struct Flux2 {
    Flux2Config config;
    StModel *weights;
    Params *params;
    Flux2Weights *resident;
    Precision precision; /* of a streamed forward's weight products */
};

/* --- config --- */

/* The keys with upstream defaults: patch_size (1) and out_channels (null: in_channels). */
static int flux2_config_defaults(const JsonValue *root, Flux2Config *c, Error *e) {
    c->patch_size = 1;
    c->out_channels = c->in_channels;
    const JsonValue *out = json_get(root, "out_channels");
    return (json_get(root, "patch_size") &&
            json_get_int_in(root, "patch_size", 1, 64, &c->patch_size, e)) ||
           (out && out->type != JSON_NULL &&
            json_get_int_in(root, "out_channels", 1, 1 << 20, &c->out_channels, e));
}

static int flux2_config_rope(const JsonValue *root, Flux2Config *c, Error *e) {
    int64_t axes[FLUX2_AXES + 1];
    size_t count;
    if (json_get_int_array(root, "axes_dims_rope", axes, FLUX2_AXES + 1, &count, e)) return -1;
    int64_t sum = 0;
    for (size_t i = 0; i < count; i++) {
        if (axes[i] < 0 || axes[i] % 2 || axes[i] > c->head_dim)
            return error_set(e, "%s: axes_dims_rope[%zu] = %lld is not an even size within the "
                             "head", root->source, i, (long long)axes[i]);
        sum += axes[i];
        if (i < FLUX2_AXES) c->axes_dims[i] = (int)axes[i];
    }
    if (count != FLUX2_AXES || sum != c->head_dim)
        return error_set(e, "%s: axes_dims_rope needs %d even sizes summing to attention_head_dim "
                         "%d", root->source, FLUX2_AXES, c->head_dim);
    return 0;
}

/* path: a transformer/config.json */
static int flux2_config_read(Flux2Config *c, const char *path, Error *e) {
    JsonDoc *doc;
    if (json_parse_file(&doc, path, e)) return -1;
    const JsonValue *root = json_root(doc);
    const int64_t big = 1 << 20;
    double mlp_ratio = 0.0;
    int status = json_get_int_in(root, "in_channels", 1, big, &c->in_channels, e) ||
                 flux2_config_defaults(root, c, e) ||
                 json_get_int_in(root, "num_layers", 1, 4096, &c->num_layers, e) ||
                 json_get_int_in(root, "num_single_layers", 1, 4096, &c->num_single_layers, e) ||
                 json_get_int_in(root, "num_attention_heads", 1, 4096, &c->heads, e) ||
                 json_get_int_in(root, "attention_head_dim", 1, 4096, &c->head_dim, e) ||
                 json_get_int_in(root, "joint_attention_dim", 1, big, &c->joint_attention_dim, e) ||
                 json_get_int_in(root, "timestep_guidance_channels", 1, big, &c->timestep_channels,
                                  e) ||
                 json_get_float(root, "mlp_ratio", &mlp_ratio, e) ||
                 json_get_float(root, "rope_theta", &c->rope_theta, e) ||
                 json_get_float(root, "eps", &c->eps, e) ||
                 json_get_bool(root, "guidance_embeds", &c->guidance_embeds, e) ||
                 flux2_config_rope(root, c, e);
    if (!status) {
        c->dim = c->heads * c->head_dim;
        double hidden = c->dim * mlp_ratio; /* Python's int() truncates */
        if (c->dim > big || !(hidden >= 1.0 && hidden <= (double)big) || !(c->rope_theta > 0.0) ||
            !(c->eps >= 0.0 && c->eps < 1.0))
            status = error_set(e, "%s: inner dim %d, mlp_ratio %g, rope_theta %g or eps %g is out "
                               "of range", path, c->dim, mlp_ratio, c->rope_theta, c->eps);
        c->mlp_hidden = (int)hidden;
        c->mlp_ratio = mlp_ratio;
    }
    json_free(doc);
    return status;
}

/* --- weights: named once, held resident or read part by part ---
 * Each part of the model names its tensors in one load function (part_weight). The plain
 * forward holds them all as the Params of a resident model (PART_RESIDENT); the streamed
 * execution strategy below reads each part's just before it runs (PART_CONVERT: matrices where
 * they lie in the files, vectors converted); opening a model checks or lists them (PART_CHECK,
 * PART_LIST). */

/* What part_weight does with each tensor a part names. */
typedef enum PartMode {
    PART_CONVERT,  /* read it into an f32 leaf of the part's own tape */
    PART_CHECK,    /* verify its name and shape in the files, read nothing: flux2_open, qwen3 */
    PART_LIST,     /* add its name and shape to a list: config-only flux2_open, qwen3 */
    PART_RESIDENT, /* load it into the model's Params: flux2_make_resident */
} PartMode;

/* Names (owned) and shapes. */
typedef struct SpecList {
    StTensorSpec *specs;
    size_t count, capacity;
} SpecList;

/* Room for the converted weights of one part, reused by every part of a call: a buffer that is
 * written again rather than allocated again (fresh pages cost a page fault and a clear each;
 * for klein's text encoder that was 5% of its time). */
typedef struct WeightArena {
    float *data;
    int64_t capacity, used; /* floats */
} WeightArena;

/* The tensors of one part of the model (a block's attention inputs, the conditioning, ...),
 * converted to f32 leaves for as long as the part runs and freed together; or, in the other modes,
 * the names and shapes of those tensors, or the model's resident leaves, so that the load
 * functions below define them once. */
typedef struct WeightPart {
    const StModel *weights;
    PartMode mode;
    SpecList *list;  /* PART_LIST */
    Params *params;  /* PART_RESIDENT */
    Tape *tape;      /* PART_CONVERT: owns the converted leaves, made at the first one */
    WeightArena *arena; /* PART_CONVERT: where the values go (NULL: a new tensor each) */
    Precision precision; /* PART_CONVERT: how its matrices' products are computed */
} WeightPart;

static void weight_part_free(WeightPart *p) {
    tape_free(p->tape);
    p->tape = NULL;
    if (p->arena) p->arena->used = 0;
}

/* The tensor `name` of `shape` as a view into p's arena (a new tensor without one). */
static int part_convert(WeightPart *p, const char *name, int ndim, const int64_t *shape,
                        Tensor **out, Error *e) {
    if (!p->arena) return params_read(p->weights, name, ndim, shape, out, e);
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) numel *= shape[d];
    WeightArena *a = p->arena;
    int64_t rounded = (numel + 15) / 16 * 16; /* 64-byte aligned views */
    if (rounded > a->capacity - a->used)
        return error_set(e, "tensor '%s' does not fit the part's weight arena", name);
    if (!(*out = tensor_view(a->data + a->used, ndim, shape)))
        return error_set(e, "out of memory loading tensor '%s'", name);
    a->used += rounded;
    if (params_fill(p->weights, name, ndim, shape, (*out)->data, numel, e)) {
        tensor_free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

/* Whether the list names name. */
static bool spec_list_reads(const void *ctx, const char *name) {
    const SpecList *l = ctx;
    for (size_t i = 0; i < l->count; i++)
        if (!strcmp(l->specs[i].name, name)) return true;
    return false;
}

static void spec_list_free(SpecList *l) {
    for (size_t i = 0; i < l->count; i++) free((char *)l->specs[i].name);
    free(l->specs);
}

static int spec_list_add(SpecList *l, const char *name, int ndim, const int64_t *shape,
                          Error *e) {
    if (l->count == l->capacity) {
        size_t capacity = l->capacity ? 2 * l->capacity : 64;
        StTensorSpec *grown = realloc(l->specs, capacity * sizeof *grown);
        if (!grown) return error_set(e, "out of memory listing the tensors");
        l->specs = grown;
        l->capacity = capacity;
    }
    StTensorSpec *spec = &l->specs[l->count];
    *spec = (StTensorSpec){.name = strdup(name), .ndim = ndim};
    memcpy(spec->shape, shape, (size_t)ndim * sizeof *shape);
    if (!spec->name) return error_set(e, "out of memory listing the tensors");
    l->count++;
    return 0;
}

/* The tensor `name` with exactly `shape` as a leaf, owned by the part or the model's Params (NULL
 * when only checking or listing). */
static int part_weight_named(WeightPart *p, Var **out, Error *e, int ndim, const int64_t *shape,
                             const char *name) {
    *out = NULL;
    if (p->mode == PART_CHECK) return params_check_shape(p->weights, name, ndim, shape, e);
    if (p->mode == PART_LIST) return spec_list_add(p->list, name, ndim, shape, e);
    if (p->mode == PART_RESIDENT)
        return (*out = params_load(p->params, e, ndim, shape, "%s", name)) ? 0 : -1;
    Tensor *value;
    if ((!p->tape && !(p->tape = tape_new())) || part_convert(p, name, ndim, shape, &value, e))
        return p->tape ? -1 : error_set(e, "out of memory loading tensor '%s'", name);
    *out = var_take(p->tape, value, false);
    return *out ? 0 : error_set(e, "out of memory loading tensor '%s'", name);
}

/* name_fmt (printf-style) into name[256]. */
static int part_name(char *name, Error *e, const char *name_fmt, va_list ap) {
    int len = vsnprintf(name, 256, name_fmt, ap);
    if (len < 0 || len >= 256) return error_set(e, "tensor name too long: %s", name);
    return 0;
}

/* The tensor named by name_fmt with exactly `shape` as a leaf (part_weight_named). */
static int part_weight(WeightPart *p, Var **out, Error *e, int ndim, const int64_t *shape,
                       const char *name_fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;
static int part_weight(WeightPart *p, Var **out, Error *e, int ndim, const int64_t *shape,
                       const char *name_fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, name_fmt);
    int status = part_name(name, e, name_fmt, ap);
    va_end(ap);
    *out = NULL;
    return status ? -1 : part_weight_named(p, out, e, ndim, shape, name);
}

/* A weight matrix [rows, cols] as the model holds it: a resident model's leaf (trainable, run
 * through ag_linear); else where it lies in the mapped file (F32, F16 or BF16, never copied:
 * ag_linear_stored packs it into the GEMM's panels as it goes, bf16 and f16 widened exactly, so
 * the products are those of the converted matrix bit for bit, or in bf16 when the part's
 * precision says so); or, where the source has no bytes (config-only weights), converted to f32
 * in the part like any weight. */
typedef struct WeightMatrix {
    Var *leaf; /* a resident model's; NULL otherwise */
    const void *data;
    DType dtype;
    int64_t rows, cols;
    Precision precision; /* of the products with data */
} WeightMatrix;

/* The matrix named by name_fmt: checked or listed as part_weight does, else as stored. */
static int part_matrix(WeightPart *p, WeightMatrix *out, Error *e, int64_t rows, int64_t cols,
                       const char *name_fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;
static int part_matrix(WeightPart *p, WeightMatrix *out, Error *e, int64_t rows, int64_t cols,
                       const char *name_fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, name_fmt);
    int status = part_name(name, e, name_fmt, ap);
    va_end(ap);
    *out = (WeightMatrix){.rows = rows, .cols = cols};
    if (status) return -1;
    const StTensor *t = p->mode == PART_CONVERT ? st_model_find(p->weights, name) : NULL;
    if (!t || !t->data) { /* checked, listed, or without bytes: as any weight */
        Var *v;
        if (part_weight_named(p, &v, e, SHAPE(rows, cols), name)) return -1;
        *out = (WeightMatrix){.leaf = p->mode == PART_RESIDENT ? v : NULL,
                              .data = v ? v->value->data : NULL, .dtype = DTYPE_F32,
                              .rows = rows, .cols = cols, .precision = p->precision};
        return 0;
    }
    if (params_check_shape(p->weights, name, SHAPE(rows, cols), e)) return -1;
    if (t->dtype != DTYPE_F32 && t->dtype != DTYPE_F16 && t->dtype != DTYPE_BF16)
        return error_set(e, "tensor '%s' is %s; only F32, F16 and BF16 weights are read", name,
                         dtype_name(t->dtype));
    *out = (WeightMatrix){.data = t->data, .dtype = t->dtype, .rows = rows, .cols = cols,
                          .precision = p->precision};
    return 0;
}

/* x: [.., cols] -> x W^T: [.., rows] */
static Var *matrix_linear(Tape *t, Var *x, const WeightMatrix *w) {
    if (w->leaf) return ag_linear(t, x, w->leaf, NULL);
    return ag_linear_stored(t, x, w->data, w->dtype, w->rows, w->cols, w->precision);
}

/* A part of a streamed model's weights, its products in the model's precision. */
static WeightPart flux2_part(const Flux2 *m) {
    return (WeightPart){.weights = m->weights, .precision = m->precision};
}

/* The timestep (and guidance) embedding. */
typedef struct Flux2TimeEmbed {
    WeightMatrix time_1, time_2, guidance_1, guidance_2;
} Flux2TimeEmbed;

static int flux2_time_embed_load(Flux2TimeEmbed *w, WeightPart *p, const Flux2Config *c,
                                 Error *e) {
    const char *time = "time_guidance_embed.timestep_embedder";
    const char *guide = "time_guidance_embed.guidance_embedder";
    int d = c->dim;
    *w = (Flux2TimeEmbed){0};
    return part_matrix(p, &w->time_1, e, d, c->timestep_channels, "%s.linear_1.weight", time) ||
           part_matrix(p, &w->time_2, e, d, d, "%s.linear_2.weight", time) ||
           (c->guidance_embeds &&
            (part_matrix(p, &w->guidance_1, e, d, c->timestep_channels, "%s.linear_1.weight",
                         guide) ||
             part_matrix(p, &w->guidance_2, e, d, d, "%s.linear_2.weight", guide)));
}

/* The modulations every block shares, each made from the embedding by one linear layer. */
enum { FLUX2_MOD_IMG, FLUX2_MOD_TXT, FLUX2_MOD_SINGLE, FLUX2_MOD_OUT, FLUX2_MODS };

static const struct {
    const char *name;
    int chunks; /* of dim values: the shifts, scales and gates */
} flux2_modulations[FLUX2_MODS] = {
    [FLUX2_MOD_IMG] = {"double_stream_modulation_img.linear.weight", 6},
    [FLUX2_MOD_TXT] = {"double_stream_modulation_txt.linear.weight", 6},
    [FLUX2_MOD_SINGLE] = {"single_stream_modulation.linear.weight", 3},
    [FLUX2_MOD_OUT] = {"norm_out.linear.weight", 2},
};

static int flux2_modulation_load(WeightMatrix *w, WeightPart *p, const Flux2Config *c, int k,
                                 Error *e) {
    return part_matrix(p, w, e, flux2_modulations[k].chunks * c->dim, c->dim, "%s",
                       flux2_modulations[k].name);
}

typedef struct Flux2Embedders {
    WeightMatrix x_embedder, context_embedder;
} Flux2Embedders;

static int flux2_embedders_load(Flux2Embedders *w, WeightPart *p, const Flux2Config *c, Error *e) {
    *w = (Flux2Embedders){0};
    return part_matrix(p, &w->x_embedder, e, c->dim, c->in_channels, "x_embedder.weight") ||
           part_matrix(p, &w->context_embedder, e, c->dim, c->joint_attention_dim,
                       "context_embedder.weight");
}

static int flux2_output_load(WeightMatrix *proj_out, WeightPart *p, const Flux2Config *c,
                             Error *e) {
    int out = c->patch_size * c->patch_size * c->out_channels;
    return part_matrix(p, proj_out, e, out, c->dim, "proj_out.weight");
}

/* The two streams of a double block (the joint sequence puts the text first). */
enum { FLUX2_IMAGE, FLUX2_TEXT, FLUX2_STREAMS };

/* The names of a stream's weights under transformer_blocks.N: the image stream's are to_*,
 * norm_*, to_out.0 and ff; the text stream's add_*_proj, norm_added_*, to_add_out, ff_context. */
typedef struct Flux2StreamNames {
    const char *q, *k, *v, *norm_q, *norm_k, *out, *ff;
} Flux2StreamNames;

static const Flux2StreamNames flux2_stream_names[FLUX2_STREAMS] = {
    [FLUX2_IMAGE] = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.norm_q", "attn.norm_k",
                     "attn.to_out.0", "ff"},
    [FLUX2_TEXT] = {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.norm_added_q",
                    "attn.norm_added_k", "attn.to_add_out", "ff_context"},
};

/* A stream's weights before the joint attention: Q, K, V and the per-head norms of Q and K. */
typedef struct Flux2StreamIn {
    WeightMatrix q, k, v;
    Var *norm_q, *norm_k;
} Flux2StreamIn;

static int flux2_stream_in_load(Flux2StreamIn *w, WeightPart *p, const Flux2Config *c, int block,
                                int stream, Error *e) {
    const Flux2StreamNames *n = &flux2_stream_names[stream];
    const char *b = "transformer_blocks";
    int d = c->dim, hd = c->head_dim;
    *w = (Flux2StreamIn){0};
    return part_matrix(p, &w->q, e, d, d, "%s.%d.%s.weight", b, block, n->q) ||
           part_matrix(p, &w->k, e, d, d, "%s.%d.%s.weight", b, block, n->k) ||
           part_matrix(p, &w->v, e, d, d, "%s.%d.%s.weight", b, block, n->v) ||
           part_weight(p, &w->norm_q, e, SHAPE(hd), "%s.%d.%s.weight", b, block, n->norm_q) ||
           part_weight(p, &w->norm_k, e, SHAPE(hd), "%s.%d.%s.weight", b, block, n->norm_k);
}

/* A stream's weights after it: the attention output projection and the SwiGLU feed-forward. */
typedef struct Flux2StreamOut {
    WeightMatrix out, ff_in, ff_out;
} Flux2StreamOut;

static int flux2_stream_out_load(Flux2StreamOut *w, WeightPart *p, const Flux2Config *c, int block,
                                 int stream, Error *e) {
    const Flux2StreamNames *n = &flux2_stream_names[stream];
    const char *b = "transformer_blocks";
    int d = c->dim, mlp = c->mlp_hidden;
    *w = (Flux2StreamOut){0};
    return part_matrix(p, &w->out, e, d, d, "%s.%d.%s.weight", b, block, n->out) ||
           part_matrix(p, &w->ff_in, e, 2 * mlp, d, "%s.%d.%s.linear_in.weight", b, block,
                       n->ff) ||
           part_matrix(p, &w->ff_out, e, d, mlp, "%s.%d.%s.linear_out.weight", b, block, n->ff);
}

/* A single-stream block's weights before attention: the fused projection to Q, K, V and the
 * SwiGLU's gate and up, and the per-head norms of Q and K. */
typedef struct Flux2SingleIn {
    WeightMatrix to_qkv_mlp;
    Var *norm_q, *norm_k;
} Flux2SingleIn;

static int flux2_single_in_load(Flux2SingleIn *w, WeightPart *p, const Flux2Config *c, int i,
                                Error *e) {
    const char *b = "single_transformer_blocks";
    int d = c->dim, hd = c->head_dim, mlp = c->mlp_hidden;
    *w = (Flux2SingleIn){0};
    return part_matrix(p, &w->to_qkv_mlp, e, 3 * d + 2 * mlp, d,
                       "%s.%d.attn.to_qkv_mlp_proj.weight", b, i) ||
           part_weight(p, &w->norm_q, e, SHAPE(hd), "%s.%d.attn.norm_q.weight", b, i) ||
           part_weight(p, &w->norm_k, e, SHAPE(hd), "%s.%d.attn.norm_k.weight", b, i);
}

/* ... and after it: to_out over [attention output | SwiGLU output]. */
static int flux2_single_out_load(WeightMatrix *to_out, WeightPart *p, const Flux2Config *c,
                                 int i, Error *e) {
    return part_matrix(p, to_out, e, c->dim, c->dim + c->mlp_hidden,
                       "single_transformer_blocks.%d.attn.to_out.weight", i);
}

/* Every weight of the model, in the order flux2_walk_weights names them (the order a resident
 * model's Params holds and saves them in). */
struct Flux2Weights {
    Flux2TimeEmbed time;
    WeightMatrix mods[FLUX2_MODS];
    Flux2Embedders embedders;
    WeightMatrix proj_out;
    Flux2StreamIn *stream_in;   /* [num_layers][FLUX2_STREAMS] */
    Flux2StreamOut *stream_out; /* [num_layers][FLUX2_STREAMS] */
    Flux2SingleIn *single_in;   /* [num_single_layers] */
    WeightMatrix *single_out;   /* [num_single_layers] */
};

static void flux2_weights_free(Flux2Weights *w) {
    if (!w) return;
    free(w->stream_in);
    free(w->stream_out);
    free(w->single_in);
    free(w->single_out);
    free(w);
}

static Flux2Weights *flux2_weights_new(const Flux2Config *c) {
    Flux2Weights *w = calloc(1, sizeof *w);
    size_t doubles = (size_t)c->num_layers * FLUX2_STREAMS, singles = (size_t)c->num_single_layers;
    if (w) {
        w->stream_in = calloc(doubles, sizeof *w->stream_in);
        w->stream_out = calloc(doubles, sizeof *w->stream_out);
        w->single_in = calloc(singles, sizeof *w->single_in);
        w->single_out = calloc(singles, sizeof *w->single_out);
    }
    if (w && w->stream_in && w->stream_out && w->single_in && w->single_out) return w;
    flux2_weights_free(w);
    return NULL;
}

/* Every tensor the config implies, by name and shape, through p into w: checked or listed (the
 * Vars stay NULL) or loaded as the resident model's leaves. */
static int flux2_walk_weights(const Flux2Config *c, WeightPart *p, Flux2Weights *w, Error *e) {
    if (flux2_time_embed_load(&w->time, p, c, e)) return -1;
    for (int k = 0; k < FLUX2_MODS; k++)
        if (flux2_modulation_load(&w->mods[k], p, c, k, e)) return -1;
    if (flux2_embedders_load(&w->embedders, p, c, e) || flux2_output_load(&w->proj_out, p, c, e))
        return -1;
    for (int i = 0; i < c->num_layers; i++)
        for (int stream = 0; stream < FLUX2_STREAMS; stream++) {
            int k = i * FLUX2_STREAMS + stream;
            if (flux2_stream_in_load(&w->stream_in[k], p, c, i, stream, e) ||
                flux2_stream_out_load(&w->stream_out[k], p, c, i, stream, e))
                return -1;
        }
    for (int i = 0; i < c->num_single_layers; i++)
        if (flux2_single_in_load(&w->single_in[i], p, c, i, e) ||
            flux2_single_out_load(&w->single_out[i], p, c, i, e))
            return -1;
    return 0;
}

/* The same with the Vars thrown away: flux2_open's check and config-only's list of names. */
static int flux2_walk_names(const Flux2Config *c, WeightPart *p, Error *e) {
    Flux2Weights *w = flux2_weights_new(c);
    int status = w ? flux2_walk_weights(c, p, w, e) : error_set(e, "out of memory");
    flux2_weights_free(w);
    return status;
}

/* Puts "<what>: " before the message already in e. */
static int error_context(Error *e, const char *what) {
    if (!e) return -1;
    char msg[sizeof e->msg];
    memcpy(msg, e->msg, sizeof msg);
    return error_set(e, "%s: %s", what, msg);
}

/* Every tensor a streaming model reads, named and shaped through p (checked, or listed). */
typedef int (*WeightWalk)(const void *config, WeightPart *p, Error *e);

/* The weights a streaming model reads where they lie (*weights): the files in dir, each tensor
 * walk names checked there with its shape, and no tensor there that walk does not name or
 * that does not start with a prefix of leave (weights_all_read); or st_model_random's values
 * under the names and shapes walk lists (config-only). */
static int stored_weights_open(StModel **weights, const char *dir, WeightSource source,
                               uint64_t seed, WeightWalk walk, const void *config,
                               const char *const *leave, Error *e) {
    SpecList list = {0};
    WeightPart names = {.mode = PART_LIST, .list = &list};
    int status = walk(config, &names, e);
    if (!status && !weights_from_files(source))
        status = st_model_random(weights, list.specs, list.count, seed, random_kind(source), e);
    if (!status && weights_from_files(source)) status = st_model_open(weights, dir, e);
    if (!status && weights_from_files(source)) {
        WeightPart check = {.weights = *weights, .mode = PART_CHECK};
        if (walk(config, &check, e)) status = error_context(e, dir);
        else status = weights_all_read(source, *weights, spec_list_reads, &list, leave, dir, e);
    }
    spec_list_free(&list);
    return status ? -1 : 0;
}

static int flux2_walk(const void *config, WeightPart *p, Error *e) {
    return flux2_walk_names(config, p, e);
}

/* Every weight of m converted once from params into m->resident (f32 leaves). */
static int flux2_hold(Flux2 *m, Params *params, Error *e) {
    if (!(m->params = params) || !(m->resident = flux2_weights_new(&m->config)))
        return error_set(e, "out of memory for the transformer's weights");
    WeightPart part = {.mode = PART_RESIDENT, .params = m->params};
    return flux2_walk_weights(&m->config, &part, m->resident, e);
}

int flux2_open(Flux2 **out, const char *dir, WeightSource source, uint64_t seed, Error *e) {
    *out = NULL;
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, "config.json", e)) return -1;
    Flux2 *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading %s", dir);
    int status = flux2_config_read(&m->config, path, e) ||
                 (source == WEIGHTS_FRESH
                      ? st_model_random_any(&m->weights, seed, RANDOM_FOR_TRAINING, e) ||
                            flux2_hold(m, params_new(m->weights), e)
                      : stored_weights_open(&m->weights, dir, source, seed, flux2_walk,
                                            &m->config, NULL, e));
    if (status) {
        flux2_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

int flux2_make_resident(Flux2 *m, Error *e) {
    m->precision = PRECISION_F32; /* a resident model's only */
    return m->resident ? 0 : flux2_hold(m, params_new(m->weights), e);
}

void flux2_free(Flux2 *m) {
    if (!m) return;
    st_model_close(m->weights);
    flux2_weights_free(m->resident);
    params_free(m->params);
    free(m);
}

const Flux2Config *flux2_config(const Flux2 *m) { return &m->config; }

int flux2_set_precision(Flux2 *m, Precision precision, Error *e) {
    if (m->resident && precision != PRECISION_F32)
        return error_set(e, "flux2: a resident model computes in f32 only");
    m->precision = precision;
    return 0;
}

Params *flux2_params(const Flux2 *m) { return m->params; }

/* --- per-call tables --- */

/* What every block of one call shares. The modulations hold, per batch item, chunks of dim
 * values: mod_img and mod_txt (shift, scale, gate) for attention then for the feed-forward,
 * mod_single (shift, scale, gate), mod_out (scale, shift) for norm_out, in upstream's order. */
typedef struct Flux2Step {
    int batch, img_len, txt_len;
    Tensor *mod_img, *mod_txt;   /* [B, 6 dim] */
    Tensor *mod_single;          /* [B, 3 dim] */
    Tensor *mod_out;             /* [B, 2 dim] */
    Tensor *rope_cos, *rope_sin; /* [L + T, head_dim / 2], the text positions first */
} Flux2Step;

static void flux2_step_free(Flux2Step *s) {
    tensor_free(s->mod_img);
    tensor_free(s->mod_txt);
    tensor_free(s->mod_single);
    tensor_free(s->mod_out);
    tensor_free(s->rope_cos);
    tensor_free(s->rope_sin);
}

/* t: [B] -> [B, channels]: [cos | sin] of 1000 t * 10000^(-i / half), i < half, and a zero column
 * when channels is odd (Timesteps with flip_sin_to_cos, no frequency shift). Computed in double. */
static Tensor *flux2_timestep_proj(const float *t, int batch, int channels) {
    Tensor *y = TENSOR_NEW(batch, channels);
    if (!y) return NULL;
    int half = channels / 2;
    for (int b = 0; b < batch; b++)
        for (int i = 0; i < half; i++) {
            double angle = 1000.0 * t[b] * exp(-log(10000.0) * i / half);
            y->data[(int64_t)b * channels + i] = (float)cos(angle);
            y->data[(int64_t)b * channels + half + i] = (float)sin(angle);
        }
    return y;
}

/* cos, sin: [L + h w, head_dim / 2]. Text token l has ids (0, 0, 0, l), image token (y, x) has
 * (0, y, x, 0). The pairs of axis a follow those of the axes before it; pair j of axis a turns by
 * id[a] * theta^(-2j / axes_dims[a]) (get_1d_rotary_pos_embed, in double). */
static int flux2_rope_tables(const Flux2Config *c, int L, int h, int w, Flux2Step *s) {
    int64_t n = L + (int64_t)h * w, pairs = c->head_dim / 2;
    s->rope_cos = TENSOR_NEW(n, pairs);
    s->rope_sin = TENSOR_NEW(n, pairs);
    if (!s->rope_cos || !s->rope_sin) return -1;
    for (int64_t i = 0; i < n; i++) {
        int64_t img = i - L;
        double id[FLUX2_AXES] = {0.0, img < 0 ? 0.0 : (double)(img / w),
                                 img < 0 ? 0.0 : (double)(img % w), img < 0 ? (double)i : 0.0};
        int64_t pair = 0;
        for (int a = 0; a < FLUX2_AXES; a++)
            for (int j = 0; j < c->axes_dims[a] / 2; j++, pair++) {
                double angle = id[a] * pow(c->rope_theta, -2.0 * j / c->axes_dims[a]);
                s->rope_cos->data[i * pairs + pair] = (float)cos(angle);
                s->rope_sin->data[i * pairs + pair] = (float)sin(angle);
            }
    }
    return 0;
}

/* --- running parts on short tapes --- */

static Tape *nograd_tape(void) {
    Tape *t = tape_new();
    if (t) tape_set_grad(t, false);
    return t;
}

/* A copy of v's value that outlives the tape, or an error naming the part that failed. */
static int nograd_result(Tape *t, Var *v, Tensor **out, const char *part, Error *e) {
    *out = NULL;
    if (tape_check(t, e)) return error_context(e, part);
    *out = tensor_clone(v->value);
    return *out ? 0 : error_set(e, "%s: out of memory", part);
}

/* Frees the tensor in *slot and puts value there. */
static void tensor_replace(Tensor **slot, Tensor *value) {
    tensor_free(*slot);
    *slot = value;
}

/* A leaf over elements [start, start + n) of dim `dim` of x, without copying: [.., N, ..] ->
 * [.., n, ..]. The dims before `dim` must be 1, so that the elements are contiguous. */
static Var *flux2_view(Tape *t, const Tensor *x, int dim, int64_t start, int64_t n) {
    int64_t shape[TENSOR_MAX_DIMS], per = x->numel / x->shape[dim];
    memcpy(shape, x->shape, sizeof shape);
    shape[dim] = n;
    return var_take(t, tensor_view(x->data + start * per, x->ndim, shape), false);
}

/* proj: [B, channels] (taken) -> linear_2(silu(linear_1(proj))): [B, dim] (TimestepEmbedding) */
static Var *flux2_time_embed(Tape *t, Tensor *proj, const WeightMatrix *linear_1,
                             const WeightMatrix *linear_2) {
    Var *h = matrix_linear(t, var_take(t, proj, false), linear_1);
    return matrix_linear(t, ag_silu(t, h), linear_2);
}

/* sigma (and guidance): [B] -> silu(timestep embedding): [B, dim], what each modulation is made
 * from by one linear layer. */
static Var *flux2_time_act(Tape *t, const Flux2TimeEmbed *w, const Flux2Config *c,
                           const float *sigma, const float *guidance, int batch) {
    int C = c->timestep_channels;
    Var *temb = flux2_time_embed(t, flux2_timestep_proj(sigma, batch, C), &w->time_1,
                                 &w->time_2);
    if (guidance && c->guidance_embeds)
        temb = ag_add(t, temb, flux2_time_embed(t, flux2_timestep_proj(guidance, batch, C),
                                                &w->guidance_1, &w->guidance_2));
    return ag_silu(t, temb);
}

/* --- the layers of a block ---
 * One definition of the math for both paths: hidden states x: [B, N, dim] (the streaming path's
 * B is 1 and its N one chunk of tokens), modulations [B, n dim] of n chunks of dim values. */

/* The size of dim d of x (0 when an earlier op failed, which the tape has recorded). */
static int64_t var_size(const Var *x, int d) {
    return x && x->value ? x->value->shape[d] : 0;
}

/* Chunk k of a modulation [B, n dim] -> [B, dim] */
static Var *flux2_mod(Tape *t, Var *mod, int k, int dim) {
    return ag_slice(t, mod, 1, (int64_t)k * dim, dim);
}

/* x: [B, N, dim] -> LayerNorm without affine, then * (1 + scale) + shift; shift, scale: [B, dim] */
static Var *flux2_modulate(Tape *t, Var *x, Var *shift, Var *scale, double eps) {
    int64_t n = var_size(x, 1);
    Var *y = ag_layernorm(t, x, NULL, NULL, (float)eps);
    y = ag_mul(t, y, ag_repeat_rows(t, ag_affine(t, scale, 1.0f, 1.0f), n));
    return ag_add(t, y, ag_repeat_rows(t, shift, n));
}

/* x + gate * y, the gated residual; x, y: [B, N, dim], gate: [B, dim] */
static Var *flux2_gated(Tape *t, Var *x, Var *gate, Var *y) {
    return ag_add(t, x, ag_mul(t, y, ag_repeat_rows(t, gate, var_size(y, 1))));
}

/* x: [B, n, dim] -> [B, n, heads, head_dim], RMS-normalised per head when norm is not NULL */
static Var *flux2_heads(Tape *t, Var *x, Var *norm, const Flux2Config *c) {
    int64_t shape[4] = {var_size(x, 0), var_size(x, 1), c->heads, c->head_dim};
    Var *y = ag_reshape(t, x, 4, shape);
    return norm ? ag_rmsnorm(t, y, norm, (float)c->eps) : y;
}

/* x: [B, n, dim] -> x W^T split into heads (and normalised) */
static Var *flux2_project_heads(Tape *t, Var *x, const WeightMatrix *weight, Var *norm,
                               const Flux2Config *c) {
    return flux2_heads(t, matrix_linear(t, x, weight), norm, c);
}

/* x: [B, n, heads, head_dim], the tokens at positions pos .. pos + n - 1 of the joint sequence
 * -> RoPE applied */
static Var *flux2_rotate(Tape *t, Var *x, const Flux2Step *s, int64_t pos) {
    int64_t n = var_size(x, 1);
    return ag_rope(t, x, flux2_view(t, s->rope_cos, 0, pos, n),
                   flux2_view(t, s->rope_sin, 0, pos, n), ROPE_ADJACENT);
}

/* x: [B, N, 2 hidden] -> silu(x[.., :hidden]) * x[.., hidden:] */
static Var *flux2_swiglu(Tape *t, Var *x, int hidden) {
    return ag_mul(t, ag_silu(t, ag_slice(t, x, 2, 0, hidden)), ag_slice(t, x, 2, hidden, hidden));
}

/* x: [B, N, dim] -> linear_out(swiglu(linear_in(x))): [B, N, dim] */
static Var *flux2_feed_forward(Tape *t, Var *x, const WeightMatrix *linear_in,
                               const WeightMatrix *linear_out, const Flux2Config *c) {
    Var *h = matrix_linear(t, x, linear_in);
    return matrix_linear(t, flux2_swiglu(t, h, c->mlp_hidden), linear_out);
}

/* q, k, v: [B, N, heads, head_dim] -> the attention output [B, N, dim] */
static Var *flux2_attention(Tape *t, const Flux2Config *c, Var *q, Var *k, Var *v) {
    Var *o = ag_attention(t, q, k, v, (float)(1.0 / sqrt(c->head_dim)), false, NULL);
    return ag_reshape(t, o, 3, (int64_t[]){var_size(o, 0), var_size(o, 1), c->dim});
}

/* A double block's stream before the joint attention. x: [B, n, dim], tokens at positions pos ..
 * pos + n - 1 of the joint sequence; mod: [B, 6 dim] -> qkv: q, k, v [B, n, heads, head_dim], q
 * and k normalised and rotated. */
static void flux2_stream_in(Tape *t, const Flux2StreamIn *w, const Flux2Config *c,
                            const Flux2Step *s, Var *x, Var *mod, int64_t pos, Var **qkv) {
    Var *y = flux2_modulate(t, x, flux2_mod(t, mod, 0, c->dim), flux2_mod(t, mod, 1, c->dim),
                            c->eps);
    qkv[0] = flux2_rotate(t, flux2_project_heads(t, y, &w->q, w->norm_q, c), s, pos);
    qkv[1] = flux2_rotate(t, flux2_project_heads(t, y, &w->k, w->norm_k, c), s, pos);
    qkv[2] = flux2_project_heads(t, y, &w->v, NULL, c);
}

/* ... and after it. x: [B, n, dim], o: its rows of the attention output [B, n, dim] ->
 * x + gate * out(o), then + gate' * ff(modulate(..)) */
static Var *flux2_stream_out(Tape *t, const Flux2StreamOut *w, const Flux2Config *c, Var *x,
                             Var *o, Var *mod) {
    int d = c->dim;
    x = flux2_gated(t, x, flux2_mod(t, mod, 2, d), matrix_linear(t, o, &w->out));
    Var *y = flux2_modulate(t, x, flux2_mod(t, mod, 3, d), flux2_mod(t, mod, 4, d), c->eps);
    return flux2_gated(t, x, flux2_mod(t, mod, 5, d), flux2_feed_forward(t, y, &w->ff_in,
                                                                        &w->ff_out, c));
}

/* A single block before the attention. x: [B, n, dim] at positions pos .. pos + n - 1; mod:
 * [B, 3 dim] -> out: q, k, v [B, n, heads, head_dim] (q, k normalised and rotated) and the
 * SwiGLU output [B, n, mlp_hidden] */
static void flux2_single_in(Tape *t, const Flux2SingleIn *w, const Flux2Config *c,
                            const Flux2Step *s, Var *x, Var *mod, int64_t pos, Var **out) {
    int d = c->dim;
    Var *y = flux2_modulate(t, x, flux2_mod(t, mod, 0, d), flux2_mod(t, mod, 1, d), c->eps);
    /* [B, n, dim] -> [B, n, 3 dim + 2 mlp_hidden]: q, k, v, then the SwiGLU's gate and up */
    Var *proj = matrix_linear(t, y, &w->to_qkv_mlp);
    out[0] = flux2_rotate(t, flux2_heads(t, ag_slice(t, proj, 2, 0, d), w->norm_q, c), s, pos);
    out[1] = flux2_rotate(t, flux2_heads(t, ag_slice(t, proj, 2, d, d), w->norm_k, c), s, pos);
    out[2] = flux2_heads(t, ag_slice(t, proj, 2, 2 * d, d), NULL, c);
    out[3] = flux2_swiglu(t, ag_slice(t, proj, 2, 3 * d, 2 * c->mlp_hidden), c->mlp_hidden);
}

/* ... and after it. x: [B, n, dim], hidden: [B, n, dim + mlp_hidden] = [attention output |
 * SwiGLU output] -> x + gate * to_out(hidden) */
static Var *flux2_single_out(Tape *t, const WeightMatrix *to_out, const Flux2Config *c, Var *x,
                             Var *hidden, Var *mod) {
    return flux2_gated(t, x, flux2_mod(t, mod, 2, c->dim), matrix_linear(t, hidden, to_out));
}

/* img: [B, T, dim], mod: [B, 2 dim] (scale, shift) -> proj_out(norm_out(img)):
 * [B, T, patch_size^2 out_channels] */
static Var *flux2_final(Tape *t, const WeightMatrix *proj_out, const Flux2Config *c, Var *img,
                        Var *mod) {
    Var *y = flux2_modulate(t, img, flux2_mod(t, mod, 1, c->dim), flux2_mod(t, mod, 0, c->dim),
                            c->eps);
    return matrix_linear(t, y, proj_out);
}

/* --- the plain forward: the whole model as one graph ---
 * The forward as upstream writes it, over the batch at once, for a resident model: the layer
 * functions above, with every weight a leaf of the model's Params, so gradients reach the inputs
 * and (when trainable) every parameter. Memory is every intermediate of the batch: for small
 * models, and to compare activations with diffusers'. */

/* Double-stream block i: img: [B, T, dim], txt: [B, L, dim], both replaced. */
static void flux2_double_graph(Tape *t, const Flux2 *m, int i, const Flux2Step *s,
                               Var *const *mods, Var **img, Var **txt) {
    const Flux2Config *c = &m->config;
    const Flux2StreamIn *in = &m->resident->stream_in[i * FLUX2_STREAMS];
    const Flux2StreamOut *out = &m->resident->stream_out[i * FLUX2_STREAMS];
    Var *img_qkv[3], *txt_qkv[3], *joint[3];
    flux2_stream_in(t, &in[FLUX2_IMAGE], c, s, *img, mods[FLUX2_MOD_IMG], s->txt_len, img_qkv);
    flux2_stream_in(t, &in[FLUX2_TEXT], c, s, *txt, mods[FLUX2_MOD_TXT], 0, txt_qkv);
    for (int k = 0; k < 3; k++) joint[k] = ag_concat(t, (Var *[]){txt_qkv[k], img_qkv[k]}, 2, 1);
    Var *o = flux2_attention(t, c, joint[0], joint[1], joint[2]);
    *img = flux2_stream_out(t, &out[FLUX2_IMAGE], c, *img,
                            ag_slice(t, o, 1, s->txt_len, s->img_len), mods[FLUX2_MOD_IMG]);
    *txt = flux2_stream_out(t, &out[FLUX2_TEXT], c, *txt, ag_slice(t, o, 1, 0, s->txt_len),
                            mods[FLUX2_MOD_TXT]);
}

/* Single-stream block i: x: [B, L + T, dim] -> the same. */
static Var *flux2_single_graph(Tape *t, const Flux2 *m, int i, const Flux2Step *s, Var *mod,
                               Var *x) {
    const Flux2Config *c = &m->config;
    Var *in[4];
    flux2_single_in(t, &m->resident->single_in[i], c, s, x, mod, 0, in);
    Var *hidden = ag_concat(t, (Var *[]){flux2_attention(t, c, in[0], in[1], in[2]), in[3]}, 2, 2);
    return flux2_single_out(t, &m->resident->single_out[i], c, x, hidden, mod);
}

Var *flux2_forward_graph(Tape *t, const Flux2 *m, Var *tokens, int h, int w, Var *txt,
                         const float *sigma, const float *guidance) {
    const Flux2Config *c = &m->config;
    const Flux2Weights *wt = m->resident;
    Flux2Step s = {.batch = (int)var_size(tokens, 0), .img_len = h * w,
                   .txt_len = (int)var_size(txt, 1)};
    /* the tables become the tape's; when either is missing (out of memory, or a tape that has
     * failed already, which frees them) nothing reads them */
    flux2_rope_tables(c, s.txt_len, h, w, &s);
    Var *cos = var_take(t, s.rope_cos, false), *sin = var_take(t, s.rope_sin, false);
    if (!cos || !sin) return NULL;
    if (!wt)
        return tape_fail(t, "flux2: the model streams its weights from the files; a graph needs "
                            "them resident (flux2_make_resident)");
    Var *act = flux2_time_act(t, &wt->time, c, sigma, guidance, s.batch);
    Var *mods[FLUX2_MODS];
    for (int k = 0; k < FLUX2_MODS; k++) mods[k] = matrix_linear(t, act, &wt->mods[k]);
    Var *img = matrix_linear(t, tokens, &wt->embedders.x_embedder);
    Var *ctx = matrix_linear(t, txt, &wt->embedders.context_embedder);
    for (int i = 0; i < c->num_layers; i++) flux2_double_graph(t, m, i, &s, mods, &img, &ctx);
    Var *x = ag_concat(t, (Var *[]){ctx, img}, 2, 1);
    for (int i = 0; i < c->num_single_layers; i++)
        x = flux2_single_graph(t, m, i, &s, mods[FLUX2_MOD_SINGLE], x);
    return flux2_final(t, &wt->proj_out, c, ag_slice(t, x, 1, s.txt_len, s.img_len),
                       mods[FLUX2_MOD_OUT]);
}

/* flux2_forward of a resident model: the graph with grad off. */
static int flux2_forward_resident(const Flux2 *m, const Tensor *tokens, int h, int w,
                                  const Tensor *txt, const float *sigma, const float *guidance,
                                  Tensor **velocity, Error *e) {
    Tape *t = nograd_tape();
    if (!t) return error_set(e, "out of memory");
    Var *v = flux2_forward_graph(t, m, flux2_view(t, tokens, 0, 0, tokens->shape[0]), h, w,
                                 flux2_view(t, txt, 0, 0, txt->shape[0]), sigma, guidance);
    int status = nograd_result(t, v, velocity, "flux2", e);
    tape_free(t);
    return status;
}

/* --- execution strategy: the model streamed in pieces ---
 * What flux2_open's models run (flux2_forward): the plain forward's arithmetic, reordered for
 * memory. The weights stay in the mapped files: each part finds its matrices there just before
 * it runs (the GEMM packs them from bf16 as it goes: klein-4B's 7.7 GB are never widened to 15 GB
 * of f32, nor a part of them, which took a tenth of the forward's time), and
 * everything in a block but the attention works token by token, so it runs over chunks of
 * FLUX2_CHUNK_TOKENS tokens, each on a tape of its own freed as soon as the chunk's result is
 * copied out: the intermediates (a feed-forward's hidden layers alone are 12 dim floats per
 * token) then take memory for one chunk, not for the whole sequence. Between the pieces live
 * only the joint queries, keys and values, the attention output and the hidden states. A weight
 * product gives each output element by the same sums however many rows it covers, so the result
 * does not depend on the chunk size. Each chunk's products pack their weights again: 1024 tokens
 * (a 512x512 image's stream in one chunk) instead of 256 took a klein-4B forward at 512x512 from
 * 22.8 to 21.8 s with bf16 products and 39.2 to 38.1 s in f32 (best of 2, 2 threads, AVX-512)
 * for 357 MiB more at the peak. */
#define FLUX2_CHUNK_TOKENS 1024

/* Batch item b of a modulation [B, n dim] as a [1, n dim] leaf over its data. */
static Var *flux2_mod_row(Tape *t, const Tensor *mod, int b) {
    int64_t cols = mod->shape[1];
    return var_take(t, tensor_view(mod->data + b * cols, 2, (int64_t[]){1, cols}), false);
}

/* sigma (and guidance): [B] -> a timestep embedding; its modulations into s. */
static int flux2_conditioning(const Flux2 *m, const float *sigma, const float *guidance,
                              Flux2Step *s, Error *e) {
    const Flux2Config *c = &m->config;
    WeightPart part = flux2_part(m);
    Flux2TimeEmbed w = {0};
    Tape *t = nograd_tape();
    int status = !t ? error_set(e, "out of memory") : flux2_time_embed_load(&w, &part, c, e);
    Var *act = status ? NULL : flux2_time_act(t, &w, c, sigma, guidance, s->batch);
    weight_part_free(&part);
    Tensor **mods[FLUX2_MODS] = {&s->mod_img, &s->mod_txt, &s->mod_single, &s->mod_out};
    for (int k = 0; k < FLUX2_MODS; k++) {
        if (status) break;
        WeightMatrix weight;
        status = flux2_modulation_load(&weight, &part, c, k, e) ||
                 nograd_result(t, matrix_linear(t, act, &weight), mods[k], "flux2 conditioning",
                               e);
        weight_part_free(&part);
    }
    tape_free(t);
    return status;
}

/* tokens: [B, T, in_channels], txt: [B, L, joint_attention_dim] -> img[b]: [1, T, dim],
 * ctx[b]: [1, L, dim] */
static int flux2_embed(const Flux2 *m, const Tensor *tokens, const Tensor *txt,
                       const Flux2Step *s, Tensor **img, Tensor **ctx, Error *e) {
    WeightPart part = flux2_part(m);
    Flux2Embedders w;
    int status = flux2_embedders_load(&w, &part, &m->config, e);
    for (int b = 0; b < s->batch; b++) {
        if (status) break;
        Tape *t = nograd_tape();
        Var *x = matrix_linear(t, flux2_view(t, tokens, 0, b, 1), &w.x_embedder);
        Var *y = matrix_linear(t, flux2_view(t, txt, 0, b, 1), &w.context_embedder);
        status = nograd_result(t, x, &img[b], "flux2 x_embedder", e) ||
                 nograd_result(t, y, &ctx[b], "flux2 context_embedder", e);
        tape_free(t);
    }
    weight_part_free(&part);
    return status;
}

/* fn over tokens [start, start + n) on a fresh no-grad tape, for every chunk of [0, count). */
typedef int (*Flux2ChunkFn)(Tape *t, int64_t start, int64_t n, void *ctx, Error *e);

static int flux2_chunks(int64_t count, Flux2ChunkFn fn, void *ctx, Error *e) {
    int status = 0;
    for (int64_t start = 0; start < count; start += FLUX2_CHUNK_TOKENS) {
        if (status) break;
        int64_t n = count - start < FLUX2_CHUNK_TOKENS ? count - start : FLUX2_CHUNK_TOKENS;
        Tape *t = nograd_tape();
        status = t ? fn(t, start, n, ctx, e) : error_set(e, "out of memory");
        tape_free(t);
    }
    return status;
}

/* Copies v's value [1, n, ..] into tokens [start, start + n) of dst: [1, N, ..], from column col
 * of each token's row on. */
static int flux2_put(Tape *t, Var *v, Tensor *dst, int64_t start, int64_t col, Error *e) {
    if (tape_check(t, e)) return -1;
    const Tensor *src = v->value;
    int64_t n = src->shape[1], width = src->numel / n, row = dst->numel / dst->shape[1];
    for (int64_t i = 0; i < n; i++)
        memcpy(dst->data + (start + i) * row + col, src->data + i * width,
               (size_t)width * sizeof(float));
    return 0;
}

/* One batch item's joint attention: q and k normalised and rotated, v;
 * each [1, L + T, heads, head_dim] over [text, image]. */
typedef struct Flux2Joint {
    Tensor *q, *k, *v;
} Flux2Joint;

static int flux2_joint_alloc(Flux2Joint *a, const Flux2Step *s, const Flux2Config *c, Error *e) {
    int64_t n = s->txt_len + s->img_len;
    a->q = TENSOR_NEW(1, n, c->heads, c->head_dim);
    a->k = TENSOR_NEW(1, n, c->heads, c->head_dim);
    a->v = TENSOR_NEW(1, n, c->heads, c->head_dim);
    return a->q && a->k && a->v ? 0 : error_set(e, "out of memory");
}

static void flux2_joint_free(Flux2Joint *a) {
    tensor_free(a->q);
    tensor_free(a->k);
    tensor_free(a->v);
}

/* One attention over every token -> columns [0, dim) of dst: [1, L + T, ..] */
static int flux2_attend(const Flux2Joint *a, const Flux2Config *c, Tensor *dst, Error *e) {
    Tape *t = nograd_tape();
    if (!t) return error_set(e, "out of memory");
    Var *o = flux2_attention(t, c, var_new(t, a->q, false), var_new(t, a->k, false),
                             var_new(t, a->v, false));
    int status = flux2_put(t, o, dst, 0, 0, e);
    tape_free(t);
    return status;
}

/* One stream of one batch item in a double block. */
typedef struct Flux2StreamPass {
    const Flux2Config *c;
    const Flux2Step *s;
    int b;
    int64_t offset;          /* where the stream starts in the joint sequence */
    const Tensor *x;         /* its hidden states [1, n, dim] */
    const Tensor *mod;       /* its modulation [B, 6 dim] */
    const Flux2StreamIn *in; /* before the attention: into joint */
    const Flux2Joint *joint;
    const Flux2StreamOut *out; /* after it: from o into y */
    const Tensor *o;         /* the attention output [1, L + T, dim] */
    Tensor *y;               /* the new hidden states [1, n, dim] */
} Flux2StreamPass;

static Flux2StreamPass flux2_stream_pass(const Flux2 *m, const Flux2Step *s, int stream, int b,
                                         const Tensor *x) {
    return (Flux2StreamPass){.c = &m->config, .s = s, .b = b, .x = x,
                             .offset = stream == FLUX2_TEXT ? 0 : s->txt_len,
                             .mod = stream == FLUX2_TEXT ? s->mod_txt : s->mod_img};
}

/* Tokens [start, start + n) of a stream -> their rows of the joint q, k, v */
static int flux2_stream_qkv(Tape *t, int64_t start, int64_t n, void *ctx, Error *e) {
    const Flux2StreamPass *p = ctx;
    int64_t pos = p->offset + start;
    Var *qkv[3];
    flux2_stream_in(t, p->in, p->c, p->s, flux2_view(t, p->x, 1, start, n),
                    flux2_mod_row(t, p->mod, p->b), pos, qkv);
    return flux2_put(t, qkv[0], p->joint->q, pos, 0, e) ||
           flux2_put(t, qkv[1], p->joint->k, pos, 0, e) ||
           flux2_put(t, qkv[2], p->joint->v, pos, 0, e);
}

/* Tokens [start, start + n) of a stream: x + gate * out(o), then + gate' * ff(modulate(..)) */
static int flux2_stream_update(Tape *t, int64_t start, int64_t n, void *ctx, Error *e) {
    const Flux2StreamPass *p = ctx;
    Var *y = flux2_stream_out(t, p->out, p->c, flux2_view(t, p->x, 1, start, n),
                              flux2_view(t, p->o, 1, p->offset + start, n),
                              flux2_mod_row(t, p->mod, p->b));
    return flux2_put(t, y, p->y, start, 0, e);
}

/* Both streams' q, k, v, then the joint attention of each batch item into o[b]: [1, L + T, dim]. */
static int flux2_double_attention(const Flux2 *m, int i, const Flux2Step *s, Tensor **img,
                                  Tensor **txt, Tensor **o, Error *e) {
    const Flux2Config *c = &m->config;
    WeightPart part = flux2_part(m);
    Flux2StreamIn w[FLUX2_STREAMS];
    int status = flux2_stream_in_load(&w[FLUX2_IMAGE], &part, c, i, FLUX2_IMAGE, e) ||
                 flux2_stream_in_load(&w[FLUX2_TEXT], &part, c, i, FLUX2_TEXT, e);
    for (int b = 0; b < s->batch; b++) {
        if (status) break;
        Flux2Joint joint = {0};
        status = flux2_joint_alloc(&joint, s, c, e);
        for (int stream = 0; stream < FLUX2_STREAMS; stream++) {
            if (status) break;
            Flux2StreamPass p = flux2_stream_pass(m, s, stream, b,
                                                  stream == FLUX2_TEXT ? txt[b] : img[b]);
            p.in = &w[stream];
            p.joint = &joint;
            status = flux2_chunks(p.x->shape[1], flux2_stream_qkv, &p, e);
        }
        if (!status && !(o[b] = TENSOR_NEW(1, s->txt_len + s->img_len, c->dim)))
            status = error_set(e, "out of memory");
        if (!status) status = flux2_attend(&joint, c, o[b], e);
        flux2_joint_free(&joint);
    }
    weight_part_free(&part);
    return status;
}

/* One stream after the attention: x[b] replaced by its new hidden states. */
static int flux2_double_update(const Flux2 *m, int i, const Flux2Step *s, int stream, Tensor **x,
                               Tensor **o, Error *e) {
    WeightPart part = flux2_part(m);
    Flux2StreamOut w;
    int status = flux2_stream_out_load(&w, &part, &m->config, i, stream, e);
    for (int b = 0; b < s->batch; b++) {
        if (status) break;
        Flux2StreamPass p = flux2_stream_pass(m, s, stream, b, x[b]);
        p.out = &w;
        p.o = o[b];
        p.y = tensor_new(x[b]->ndim, x[b]->shape);
        status = !p.y ? error_set(e, "out of memory")
                      : flux2_chunks(x[b]->shape[1], flux2_stream_update, &p, e);
        if (status) tensor_free(p.y);
        else tensor_replace(&x[b], p.y);
    }
    weight_part_free(&part);
    return status;
}

/* Double-stream block i: img[b]: [1, T, dim], txt[b]: [1, L, dim], both replaced. The weights
 * are read in three parts (both streams' q, k, v; then each stream's output projection and
 * feed-forward). */
static int flux2_double_run(const Flux2 *m, int i, const Flux2Step *s, Tensor **img,
                            Tensor **txt, Error *e) {
    Tensor **o = calloc((size_t)s->batch, sizeof *o);
    int status = !o ? error_set(e, "out of memory")
                    : flux2_double_attention(m, i, s, img, txt, o, e) ||
                          flux2_double_update(m, i, s, FLUX2_IMAGE, img, o, e) ||
                          flux2_double_update(m, i, s, FLUX2_TEXT, txt, o, e);
    if (o)
        for (int b = 0; b < s->batch; b++) tensor_free(o[b]);
    free(o);
    if (!status) return 0;
    char name[64];
    snprintf(name, sizeof name, "flux2 transformer_blocks.%d", i);
    return error_context(e, name);
}

/* One batch item of a single-stream block. */
typedef struct Flux2SinglePass {
    const Flux2Config *c;
    const Flux2Step *s;
    int b;
    const Tensor *x;         /* the hidden states [1, L + T, dim] */
    const Flux2SingleIn *in; /* before the attention: into joint and hidden */
    const Flux2Joint *joint;
    Tensor *hidden;          /* [1, L + T, dim + mlp_hidden]: [attention output | SwiGLU output] */
    const WeightMatrix *to_out; /* after it: from hidden into y */
    Tensor *y;               /* the new hidden states [1, L + T, dim] */
} Flux2SinglePass;

/* Tokens [start, start + n) -> their rows of the joint q, k, v and their SwiGLU output */
static int flux2_single_qkv_mlp(Tape *t, int64_t start, int64_t n, void *ctx, Error *e) {
    const Flux2SinglePass *p = ctx;
    Var *out[4];
    flux2_single_in(t, p->in, p->c, p->s, flux2_view(t, p->x, 1, start, n),
                    flux2_mod_row(t, p->s->mod_single, p->b), start, out);
    return flux2_put(t, out[0], p->joint->q, start, 0, e) ||
           flux2_put(t, out[1], p->joint->k, start, 0, e) ||
           flux2_put(t, out[2], p->joint->v, start, 0, e) ||
           flux2_put(t, out[3], p->hidden, start, p->c->dim, e);
}

/* Tokens [start, start + n): x + gate * to_out(hidden) */
static int flux2_single_update(Tape *t, int64_t start, int64_t n, void *ctx, Error *e) {
    const Flux2SinglePass *p = ctx;
    Var *y = flux2_single_out(t, p->to_out, p->c, flux2_view(t, p->x, 1, start, n),
                              flux2_view(t, p->hidden, 1, start, n),
                              flux2_mod_row(t, p->s->mod_single, p->b));
    return flux2_put(t, y, p->y, start, 0, e);
}

/* The part before to_out for every batch item: hidden[b]: [1, L + T, dim + mlp_hidden]. */
static int flux2_single_attention(const Flux2 *m, int i, const Flux2Step *s, Tensor **seq,
                                  Tensor **hidden, Error *e) {
    const Flux2Config *c = &m->config;
    WeightPart part = flux2_part(m);
    Flux2SingleIn w;
    int status = flux2_single_in_load(&w, &part, c, i, e);
    for (int b = 0; b < s->batch; b++) {
        if (status) break;
        Flux2Joint joint = {0};
        Flux2SinglePass p = {.c = c, .s = s, .b = b, .x = seq[b], .in = &w, .joint = &joint};
        hidden[b] = p.hidden = TENSOR_NEW(1, seq[b]->shape[1], c->dim + c->mlp_hidden);
        status = !p.hidden ? error_set(e, "out of memory")
                           : flux2_joint_alloc(&joint, s, c, e) ||
                                 flux2_chunks(seq[b]->shape[1], flux2_single_qkv_mlp, &p, e) ||
                                 flux2_attend(&joint, c, p.hidden, e);
        flux2_joint_free(&joint);
    }
    weight_part_free(&part);
    return status;
}

/* Single-stream block i: seq[b]: [1, L + T, dim], replaced. The fused input projection and
 * to_out are read one after the other. */
static int flux2_single_run(const Flux2 *m, int i, const Flux2Step *s, Tensor **seq, Error *e) {
    WeightPart part = flux2_part(m);
    Tensor **hidden = calloc((size_t)s->batch, sizeof *hidden);
    WeightMatrix to_out = {0};
    int status = !hidden ? error_set(e, "out of memory")
                         : flux2_single_attention(m, i, s, seq, hidden, e) ||
                               flux2_single_out_load(&to_out, &part, &m->config, i, e);
    for (int b = 0; b < s->batch; b++) {
        if (status) break;
        Flux2SinglePass p = {.c = &m->config, .s = s, .b = b, .x = seq[b], .hidden = hidden[b],
                             .to_out = &to_out, .y = tensor_new(seq[b]->ndim, seq[b]->shape)};
        status = !p.y ? error_set(e, "out of memory")
                      : flux2_chunks(seq[b]->shape[1], flux2_single_update, &p, e);
        if (status) tensor_free(p.y);
        else tensor_replace(&seq[b], p.y);
    }
    weight_part_free(&part);
    if (hidden)
        for (int b = 0; b < s->batch; b++) tensor_free(hidden[b]);
    free(hidden);
    if (!status) return 0;
    char name[64];
    snprintf(name, sizeof name, "flux2 single_transformer_blocks.%d", i);
    return error_context(e, name);
}

/* txt[b]: [1, L, dim], img[b]: [1, T, dim] -> seq[b]: [1, L + T, dim], text first; frees both. */
static int flux2_join(const Flux2Step *s, int dim, Tensor **txt, Tensor **img, Tensor **seq,
                      Error *e) {
    for (int b = 0; b < s->batch; b++) {
        seq[b] = TENSOR_NEW(1, s->txt_len + s->img_len, dim);
        if (!seq[b]) return error_set(e, "flux2: out of memory joining the streams");
        memcpy(seq[b]->data, txt[b]->data, (size_t)txt[b]->numel * sizeof(float));
        memcpy(seq[b]->data + txt[b]->numel, img[b]->data, (size_t)img[b]->numel * sizeof(float));
        tensor_replace(&txt[b], NULL);
        tensor_replace(&img[b], NULL);
    }
    return 0;
}

/* seq[b]: [1, L + T, dim] -> the image tokens through norm_out and proj_out into v[b]:
 * [T, patch_size^2 out_channels] */
static int flux2_output(const Flux2 *m, const Flux2Step *s, Tensor **seq, Tensor *v, Error *e) {
    const Flux2Config *c = &m->config;
    WeightPart part = flux2_part(m);
    WeightMatrix proj_out;
    int status = flux2_output_load(&proj_out, &part, c, e);
    for (int b = 0; b < s->batch; b++) {
        if (status) break;
        Tape *t = nograd_tape();
        Var *img = ag_slice(t, var_new(t, seq[b], false), 1, s->txt_len, s->img_len);
        Var *y = flux2_final(t, &proj_out, c, img, flux2_mod_row(t, s->mod_out, b));
        status = tape_check(t, e) ? error_context(e, "flux2 output") : 0;
        if (!status) memcpy(v->data + b * (v->numel / s->batch), y->value->data,
                            (size_t)y->value->numel * sizeof(float));
        tape_free(t);
    }
    weight_part_free(&part);
    return status;
}

static int flux2_check_inputs(const Flux2Config *c, const Tensor *tokens, int h, int w,
                              const Tensor *txt, const float *sigma, Error *e) {
    char s1[64], s2[64];
    if (!tokens || !txt || !sigma) return error_set(e, "flux2: tokens, txt and sigma are required");
    if (h < 1 || w < 1 || tokens->ndim != 3 || tokens->shape[0] < 1 ||
        tokens->shape[1] != (int64_t)h * w || tokens->shape[2] != c->in_channels ||
        txt->ndim != 3 || txt->shape[0] != tokens->shape[0] || txt->shape[1] < 1 ||
        txt->shape[2] != c->joint_attention_dim || tokens->shape[0] > INT32_MAX ||
        txt->shape[1] > INT32_MAX - tokens->shape[1])
        return error_set(e, "flux2: tokens %s must be [B, %d x %d, %d] and txt %s [B, L, %d]",
                         tensor_shape_str(tokens, s1, sizeof s1), h, w, c->in_channels,
                         tensor_shape_str(txt, s2, sizeof s2), c->joint_attention_dim);
    return 0;
}

/* --- the forward: plain for a resident model, streamed otherwise --- */

int flux2_forward(const Flux2 *m, const Tensor *tokens, int h, int w, const Tensor *txt,
                  const float *sigma, const float *guidance, Tensor **velocity, Error *e) {
    const Flux2Config *c = &m->config;
    *velocity = NULL;
    if (flux2_check_inputs(c, tokens, h, w, txt, sigma, e)) return -1;
    if (m->resident)
        return flux2_forward_resident(m, tokens, h, w, txt, sigma, guidance, velocity, e);
    Flux2Step s = {.batch = (int)tokens->shape[0], .img_len = h * w,
                   .txt_len = (int)txt->shape[1]};
    Tensor **img = calloc((size_t)s.batch * 3, sizeof *img);
    Tensor **ctx = img + s.batch, **seq = ctx + s.batch;
    Tensor *v = TENSOR_NEW(s.batch, s.img_len, c->patch_size * c->patch_size * c->out_channels);
    int status = !img || !v || flux2_rope_tables(c, s.txt_len, h, w, &s)
                     ? error_set(e, "flux2: out of memory")
                     : flux2_conditioning(m, sigma, guidance, &s, e) ||
                           flux2_embed(m, tokens, txt, &s, img, ctx, e);
    for (int i = 0; i < c->num_layers; i++) {
        if (status) break;
        status = flux2_double_run(m, i, &s, img, ctx, e);
    }
    if (!status) status = flux2_join(&s, c->dim, ctx, img, seq, e);
    for (int i = 0; i < c->num_single_layers; i++) {
        if (status) break;
        status = flux2_single_run(m, i, &s, seq, e);
    }
    if (!status) status = flux2_output(m, &s, seq, v, e);
    if (img)
        for (int i = 0; i < 3 * s.batch; i++) tensor_free(img[i]);
    free(img);
    flux2_step_free(&s);
    if (status) tensor_free(v);
    else *velocity = v;
    return status;
}

/* The largest part a config-only streaming forward makes in f32 at once, in floats (file weights
 * are read in place): both streams' q, k, v;
 * one stream's output projection and feed-forward; the single block's fused input projection; or
 * its to_out. */
static double flux2_largest_part(const Flux2Config *c) {
    double D = c->dim, H = c->mlp_hidden;
    double parts[] = {6.0 * D * D, D * D + 3.0 * D * H, D * (3.0 * D + 2.0 * H), (D + H) * D};
    double largest = 0.0;
    for (size_t i = 0; i < COUNT(parts); i++)
        if (parts[i] > largest) largest = parts[i];
    return largest;
}

size_t flux2_forward_bytes(const Flux2 *m, int batch, int64_t img_tokens, int64_t txt_tokens) {
    const Flux2Config *c = &m->config;
    double N = (double)img_tokens + (double)txt_tokens, D = c->dim, H = c->mlp_hidden, floats;
    double io = (double)img_tokens * c->in_channels * 2.0 +
                (double)txt_tokens * c->joint_attention_dim;
    if (m->resident) {
        /* one tape holds every block's values: ~28 of the width and 8 of the feed-forward's */
        floats = batch * (io + N * (28.0 * D + 8.0 * H) * (c->num_layers + c->num_single_layers));
    } else {
        /* every item's hidden states and single-block [attention | SwiGLU] rows; one item's
         * joint q, k, v, attention output and new states; one chunk's intermediates; a part's
         * weights when they have no bytes to read in place */
        bool in_place = st_model_shard_count(m->weights) > 0; /* file weights, read in place */
        floats = batch * (io + N * (2.0 * D + H)) + N * 5.0 * D +
                 FLUX2_CHUNK_TOKENS * 4.0 * (3.0 * D + 2.0 * H) +
                 (in_place ? 0.0 : flux2_largest_part(c));
    }
    double bytes = sizeof(float) * floats;
    return bytes >= (double)SIZE_MAX ? SIZE_MAX : (size_t)bytes;
}

/* === the embedded models' text encoder ===
 * diamond's own prompt encoder for the tiny models: characters in, prompt embeddings
 * [B, max_length, hidden_size] out, fed to FLUX.2's context_embedder like real ones. Token and
 * position embeddings, pre-norm transformer layers (self-attention that ignores the padding keys,
 * a GELU MLP), a final LayerNorm. The lookup is a product of one-hot rows with the embedding
 * table, so that its gradient is the matmul's. */

typedef struct TextLayer {
    NormParams norm1, norm2;
    Linear to_q, to_k, to_v, to_out, fc1, fc2;
} TextLayer;

struct TextEncoder {
    TextEncoderConfig config;
    Params *params;
    Var *token_embedding;    /* [V + 1, D], row 0 the padding */
    Var *position_embedding; /* [L, D] */
    TextLayer *layers;
    NormParams final_norm;
};

/* vocab: distinct printable ASCII characters, none lower-case (prompts are upper-cased). */
static int text_vocab_check(const char *vocab, const char *path, Error *e) {
    size_t n = strlen(vocab);
    if (n < 1 || n > TEXT_ENCODER_MAX_VOCAB)
        return error_set(e, "%s: vocab has %zu characters, expected 1 .. %d", path, n,
                         TEXT_ENCODER_MAX_VOCAB);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)vocab[i];
        if (ch <= ' ' || ch > '~' || (ch >= 'a' && ch <= 'z') || strchr(vocab + i + 1, ch))
            return error_set(e, "%s: vocab character %zu ('%c') is repeated, lower-case or not "
                             "printable ASCII", path, i, ch > ' ' && ch <= '~' ? ch : '?');
    }
    return 0;
}

/* path: a text_encoder/config.json */
static int text_config_read(TextEncoderConfig *c, const char *path, Error *e) {
    JsonDoc *doc;
    if (json_parse_file(&doc, path, e)) return -1;
    const JsonValue *root = json_root(doc);
    const char *cls = NULL, *vocab = NULL;
    const int64_t big = 1 << 16;
    int status = json_get_string(root, "_class_name", &cls, e);
    if (!status && strcmp(cls, "DiamondCharEncoder"))
        status = error_set(e, "%s: _class_name is '%s', expected 'DiamondCharEncoder'", path, cls);
    status = status || json_get_string(root, "vocab", &vocab, e) ||
                 json_get_int_in(root, "max_length", 1, 4096, &c->max_length, e) ||
                 json_get_int_in(root, "hidden_size", 1, big, &c->hidden_size, e) ||
                 json_get_int_in(root, "num_layers", 1, 256, &c->num_layers, e) ||
                 json_get_int_in(root, "num_heads", 1, 256, &c->num_heads, e) ||
                 json_get_int_in(root, "intermediate_size", 1, big, &c->intermediate_size, e) ||
                 json_get_float(root, "layer_norm_eps", &c->layer_norm_eps, e);
    if (!status) status = text_vocab_check(vocab, path, e);
    if (!status && (c->hidden_size % c->num_heads ||
                    !(c->layer_norm_eps >= 0.0 && c->layer_norm_eps < 1.0)))
        status = error_set(e, "%s: hidden_size %d does not split into %d heads, or "
                           "layer_norm_eps %g is not in [0, 1)", path, c->hidden_size,
                           c->num_heads, c->layer_norm_eps);
    if (!status) {
        c->vocab_size = (int)strlen(vocab);
        memcpy(c->vocab, vocab, (size_t)c->vocab_size + 1);
    }
    json_free(doc);
    return status;
}

static int text_layer_load(TextLayer *l, Params *p, const TextEncoderConfig *c, int i,
                           Error *e) {
    int d = c->hidden_size, mlp = c->intermediate_size;
    char prefix[64], name[96];
#define TEXT_NAME(part) (snprintf(name, sizeof name, "%s." part, prefix), name)
    snprintf(prefix, sizeof prefix, "layers.%d", i);
    return norm_load(&l->norm1, p, d, true, TEXT_NAME("norm1"), e) ||
           linear_load(&l->to_q, p, d, d, true, TEXT_NAME("attn.to_q"), e) ||
           linear_load(&l->to_k, p, d, d, true, TEXT_NAME("attn.to_k"), e) ||
           linear_load(&l->to_v, p, d, d, true, TEXT_NAME("attn.to_v"), e) ||
           linear_load(&l->to_out, p, d, d, true, TEXT_NAME("attn.to_out"), e) ||
           norm_load(&l->norm2, p, d, true, TEXT_NAME("norm2"), e) ||
           linear_load(&l->fc1, p, d, mlp, true, TEXT_NAME("mlp.fc1"), e) ||
           linear_load(&l->fc2, p, mlp, d, true, TEXT_NAME("mlp.fc2"), e);
#undef TEXT_NAME
}

static int text_weights_load(TextEncoder *m, Error *e) {
    const TextEncoderConfig *c = &m->config;
    int d = c->hidden_size;
    if (!(m->token_embedding = params_load(m->params, e, SHAPE(c->vocab_size + 1, d),
                                           "token_embedding.weight")) ||
        !(m->position_embedding = params_load(m->params, e, SHAPE(c->max_length, d),
                                              "position_embedding.weight")))
        return -1;
    for (int i = 0; i < c->num_layers; i++)
        if (text_layer_load(&m->layers[i], m->params, c, i, e)) return -1;
    return norm_load(&m->final_norm, m->params, d, true, "final_norm", e);
}

int text_encoder_open(TextEncoder **out, const char *dir, WeightSource source, uint64_t seed,
                      Error *e) {
    *out = NULL;
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, "config.json", e)) return -1;
    TextEncoder *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading %s", dir);
    StModel *st = NULL;
    int status = text_config_read(&m->config, path, e);
    if (!status && !(m->layers = calloc((size_t)m->config.num_layers, sizeof *m->layers)))
        status = error_set(e, "out of memory loading %s", dir);
    if (!status) status = params_open(&m->params, &st, dir, source, seed, e);
    if (!status && text_weights_load(m, e)) status = error_context(e, dir);
    if (!status) status = weights_all_read(source, st, params_reads, m->params, NULL, dir, e);
    st_model_close(st);
    if (status) {
        text_encoder_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

void text_encoder_free(TextEncoder *m) {
    if (!m) return;
    params_free(m->params);
    free(m->layers);
    free(m);
}

const TextEncoderConfig *text_encoder_config(const TextEncoder *m) { return &m->config; }

Params *text_encoder_params(const TextEncoder *m) { return m->params; }

/* The index + 1 of prompt's character at s in the vocabulary (upper-cased), or an error naming
 * the whole character: a multi-byte one is never in the vocabulary (printable ASCII). */
static int text_vocab_id(const TextEncoderConfig *c, const char *prompt, const char *s, int *id,
                         Error *e) {
    int ch = toupper((unsigned char)*s);
    const char *at = ch < 0x80 ? strchr(c->vocab, ch) : NULL;
    if (at) {
        *id = (int)(at - c->vocab) + 1;
        return 0;
    }
    size_t k = utf8_sequence_length((const unsigned char *)s, strlen(s));
    return error_set(e, "prompt '%s': character '%.*s' is not in the text encoder's vocabulary "
                     "\"%s\"", prompt, k ? (int)k : 1, k ? s : "?", c->vocab);
}

int text_encoder_tokenize(const TextEncoder *m, const char *prompt, int *ids, int *length,
                          Error *e) {
    const TextEncoderConfig *c = &m->config;
    size_t n = strlen(prompt), chars = utf8_count(prompt);
    if (chars > (size_t)c->max_length)
        return error_set(e, "prompt '%s' has %zu characters, the text encoder takes at most %d",
                         prompt, chars, c->max_length);
    for (int i = 0; i < c->max_length; i++) ids[i] = 0;
    for (size_t i = 0; i < n; i++) /* every character is ASCII from here on: n <= max_length */
        if (text_vocab_id(c, prompt, prompt + i, &ids[i], e)) return -1;
    *length = (int)n;
    return 0;
}

/* The prompts as one-hot rows: [B, L, V + 1]; valid[b] gets prompt b's length (at least 1, so
 * that an empty prompt's rows attend to its first padding position rather than to nothing). */
static Tensor *text_one_hot(const TextEncoder *m, const char *const *prompts, int batch,
                            int *valid, Error *e) {
    const TextEncoderConfig *c = &m->config;
    int L = c->max_length, V = c->vocab_size + 1;
    Tensor *x = TENSOR_NEW(batch, L, V);
    int *ids = malloc((size_t)L * sizeof *ids);
    int status = !x || !ids ? error_set(e, "out of memory encoding prompts") : 0;
    for (int b = 0; b < batch; b++) {
        if (status) break;
        status = text_encoder_tokenize(m, prompts[b], ids, &valid[b], e);
        if (status) break;
        for (int i = 0; i < L; i++) x->data[((int64_t)b * L + i) * V + ids[i]] = 1.0f;
        if (valid[b] < 1) valid[b] = 1;
    }
    free(ids);
    if (!status) return x;
    tensor_free(x);
    return NULL;
}

/* x: [B, L, D] -> x + attn(norm1(x)), then + mlp(norm2(..)); keys j >= valid[b] ignored */
static Var *text_layer_apply(Tape *t, const TextLayer *l, const TextEncoderConfig *c, Var *x,
                             int batch, const int *valid) {
    int L = c->max_length, d = c->hidden_size, hd = d / c->num_heads;
    float eps = (float)c->layer_norm_eps;
    int64_t heads[4] = {batch, L, c->num_heads, hd};
    Var *h = ag_layernorm(t, x, l->norm1.weight, l->norm1.bias, eps);
    Var *q = ag_reshape(t, linear_apply(t, &l->to_q, h), 4, heads);
    Var *k = ag_reshape(t, linear_apply(t, &l->to_k, h), 4, heads);
    Var *v = ag_reshape(t, linear_apply(t, &l->to_v, h), 4, heads);
    Var *o = ag_attention(t, q, k, v, (float)(1.0 / sqrt(hd)), false, valid);
    x = ag_add(t, x, linear_apply(t, &l->to_out, ag_reshape(t, o, 3, (int64_t[]){batch, L, d})));
    h = ag_layernorm(t, x, l->norm2.weight, l->norm2.bias, eps);
    return ag_add(t, x, linear_apply(t, &l->fc2, ag_gelu(t, linear_apply(t, &l->fc1, h), false)));
}

/* prompts[0 .. batch) -> [B, max_length, hidden_size] (nn.h): one-hot characters times the token
 * embedding, plus the positions', then the layers and the final LayerNorm. */
Var *text_encode(Tape *t, const TextEncoder *m, const char *const *prompts, int batch, Error *e) {
    const TextEncoderConfig *c = &m->config;
    int L = c->max_length, d = c->hidden_size;
    if (batch < 1) {
        error_set(e, "text_encode: batch %d, expected at least 1", batch);
        return NULL;
    }
    int *valid = malloc((size_t)batch * sizeof *valid);
    Tensor *one_hot = valid ? text_one_hot(m, prompts, batch, valid, e) : NULL;
    if (!one_hot) {
        if (!valid) error_set(e, "out of memory encoding prompts");
        free(valid);
        return NULL;
    }
    /* [B, L, V + 1] [V + 1, D] -> [B, L, D], plus the position rows: [B, L D] + [L D] */
    Var *x = ag_matmul(t, var_take(t, one_hot, false), m->token_embedding);
    Var *pos = ag_reshape(t, m->position_embedding, 1, (int64_t[]){(int64_t)L * d});
    x = ag_add_rows(t, ag_reshape(t, x, 2, (int64_t[]){batch, (int64_t)L * d}), pos);
    x = ag_reshape(t, x, 3, (int64_t[]){batch, L, d});
    for (int i = 0; i < c->num_layers; i++)
        x = text_layer_apply(t, &m->layers[i], c, x, batch, valid);
    free(valid); /* ag_attention copies it */
    Var *y = ag_layernorm(t, x, m->final_norm.weight, m->final_norm.bias,
                          (float)c->layer_norm_eps);
    if (tape_check(t, e)) return NULL;
    return y;
}

/* === Qwen3 text encoder ===
 * FLUX.2 [klein]'s prompt encoder: transformers' Qwen3Model (modeling_qwen3.py) as diffusers'
 * Flux2KleinPipeline runs it (_get_qwen3_prompt_embeds), written from that code.
 *   names   model.embed_tokens.weight [V, hidden]; under model.layers.N: input_layernorm,
 *           post_attention_layernorm [hidden]; self_attn.q_proj [H*D, hidden], k_proj and v_proj
 *           [Hkv*D, hidden], o_proj [hidden, H*D], q_norm and k_norm [D]; mlp.gate_proj and
 *           up_proj [I, hidden], down_proj [hidden, I]. model.norm and lm_head are never used.
 *   layer   h = x + o(attention(rope(q_norm(q(n1))), rope(k_norm(k(n1))), v(n1))), n1 = rms1(x)
 *           out = h + down(silu(gate(n2)) * up(n2)), n2 = rms2(h)
 *           RMSNorm w * x / sqrt(mean(x^2) + eps); q_norm, k_norm per head over D; RoPE on the
 *           halves (rotate_half) at positions 0 .. L-1, padding included; grouped-query
 *           attention, scale 1/sqrt(D), query i sees key j when j <= i and j is a real token.
 *   output  hidden_states[k] is layer k-1's output (hidden_states[0] the embeddings); the
 *           pipeline stacks k = 9, 18, 27 per token: [B, L, 3 hidden], for every position,
 *           padding included. Only the first 27 layers run.
 * Execution: the weights stay in the mapped files. The projections read their matrices where
 * they lie (ag_linear_stored: bf16 widened to f32 while the GEMM packs it, never copied), the
 * norms' weights are converted per part, so memory is a few [B, L, I] activations (klein-4B at
 * 512 tokens: 120 MiB beyond the mapped pages; converting each part's matrices to f32 instead
 * took 405 MiB and ~3 s more of 23). Config-only weights, which have no bytes, are converted
 * into one reused arena. */

/* The hidden states the pipeline stacks (Flux2KleinPipeline's hidden_states_layers). */
static const int QWEN3_KLEIN_LAYERS[3] = {9, 18, QWEN3_KLEIN_LAST_LAYER};

struct Qwen3 {
    Qwen3Config config;
    StModel *weights;
    Precision precision; /* of the weight products */
};

/* --- config --- */

/* The keys of Qwen3Config that ask for what this Qwen3 does not implement, at their off values. */
static const KeyDefault QWEN3_UNIMPLEMENTED[] = {
    {"attention_bias", "false|null"},
    {"use_sliding_window", "false|null"},
    {"rope_scaling", "null"},
    {"hidden_act", "\"silu\""},
};

/* Every entry of layer_types (newer configs' per-layer attention kinds) is full attention. */
static int qwen3_config_layer_types(const JsonValue *root, Error *e) {
    const JsonValue *types = json_get(root, "layer_types");
    if (!types) return 0;
    if (types->type != JSON_ARRAY)
        return error_set(e, "%s: layer_types is not an array", root->source);
    for (size_t i = 0; i < types->count; i++)
        if (types->items[i].type != JSON_STRING ||
            strcmp(types->items[i].string, "full_attention"))
            return error_set(e, "%s: layer_types[%zu] is not \"full_attention\", the only kind "
                             "diamond implements", root->source, i);
    return 0;
}

/* num_key_value_heads (default: num_attention_heads) and head_dim (default hidden / heads). */
static int qwen3_config_heads(const JsonValue *root, Qwen3Config *c, Error *e) {
    c->kv_heads = c->heads;
    c->head_dim = c->hidden_size / c->heads;
    if ((json_get(root, "num_key_value_heads") &&
         json_get_int_in(root, "num_key_value_heads", 1, 4096, &c->kv_heads, e)) ||
        (json_get(root, "head_dim") && json_get_int_in(root, "head_dim", 1, 4096, &c->head_dim, e)))
        return -1;
    if (c->heads % c->kv_heads || c->head_dim < 2 || c->head_dim % 2)
        return error_set(e, "%s: %d heads over %d key/value heads, head_dim %d: the heads must "
                         "divide evenly and head_dim be even", root->source, c->heads,
                         c->kv_heads, c->head_dim);
    return 0;
}

/* path: a text_encoder/config.json of a Qwen3 model */
static int qwen3_config_read(Qwen3Config *c, const char *path, Error *e) {
    JsonDoc *doc;
    if (json_parse_file(&doc, path, e)) return -1;
    const JsonValue *root = json_root(doc);
    const JsonValue *type = json_get(root, "model_type");
    const int64_t big = 1 << 20;
    int status = 0;
    if (!type || type->type != JSON_STRING || strcmp(type->string, "qwen3"))
        status = error_set(e, "%s: model_type is not \"qwen3\"", path);
    else
        status = json_require_defaults(root, QWEN3_UNIMPLEMENTED, COUNT(QWEN3_UNIMPLEMENTED), e) ||
                 qwen3_config_layer_types(root, e) ||
                 json_get_int_in(root, "vocab_size", 1, 1 << 24, &c->vocab_size, e) ||
                 json_get_int_in(root, "hidden_size", 1, big, &c->hidden_size, e) ||
                 json_get_int_in(root, "num_hidden_layers", 1, 4096, &c->num_layers, e) ||
                 json_get_int_in(root, "num_attention_heads", 1, 4096, &c->heads, e) ||
                 json_get_int_in(root, "intermediate_size", 1, big, &c->intermediate_size, e) ||
                 json_get_float(root, "rms_norm_eps", &c->rms_norm_eps, e) ||
                 json_get_float(root, "rope_theta", &c->rope_theta, e) ||
                 qwen3_config_heads(root, c, e);
    if (!status && !(c->rms_norm_eps >= 0.0 && c->rms_norm_eps < 1.0 && c->rope_theta > 0.0))
        status = error_set(e, "%s: rms_norm_eps %g or rope_theta %g is out of range", path,
                           c->rms_norm_eps, c->rope_theta);
    if (!status && c->num_layers < QWEN3_KLEIN_LAYERS[2])
        status = error_set(e, "%s: num_hidden_layers %d, but the pipeline reads hidden state %d",
                           path, c->num_layers, QWEN3_KLEIN_LAYERS[2]);
    json_free(doc);
    return status;
}

/* --- weights --- */

typedef struct Qwen3Attention {
    Var *norm, *q_norm, *k_norm;
    WeightMatrix q, k, v, o;
} Qwen3Attention;

typedef struct Qwen3Mlp {
    Var *norm;
    WeightMatrix gate, up, down;
} Qwen3Mlp;

static int qwen3_attention_load(Qwen3Attention *w, WeightPart *p, const Qwen3Config *c, int i,
                                Error *e) {
    const char *l = "model.layers";
    int d = c->hidden_size, q = c->heads * c->head_dim, kv = c->kv_heads * c->head_dim;
    *w = (Qwen3Attention){0};
    return part_weight(p, &w->norm, e, SHAPE(d), "%s.%d.input_layernorm.weight", l, i) ||
           part_matrix(p, &w->q, e, q, d, "%s.%d.self_attn.q_proj.weight", l, i) ||
           part_matrix(p, &w->k, e, kv, d, "%s.%d.self_attn.k_proj.weight", l, i) ||
           part_matrix(p, &w->v, e, kv, d, "%s.%d.self_attn.v_proj.weight", l, i) ||
           part_matrix(p, &w->o, e, d, q, "%s.%d.self_attn.o_proj.weight", l, i) ||
           part_weight(p, &w->q_norm, e, SHAPE(c->head_dim), "%s.%d.self_attn.q_norm.weight", l,
                       i) ||
           part_weight(p, &w->k_norm, e, SHAPE(c->head_dim), "%s.%d.self_attn.k_norm.weight", l,
                       i);
}

static int qwen3_mlp_load(Qwen3Mlp *w, WeightPart *p, const Qwen3Config *c, int i, Error *e) {
    const char *l = "model.layers";
    int d = c->hidden_size, m = c->intermediate_size;
    *w = (Qwen3Mlp){0};
    return part_weight(p, &w->norm, e, SHAPE(d), "%s.%d.post_attention_layernorm.weight", l, i) ||
           part_matrix(p, &w->gate, e, m, d, "%s.%d.mlp.gate_proj.weight", l, i) ||
           part_matrix(p, &w->up, e, m, d, "%s.%d.mlp.up_proj.weight", l, i) ||
           part_matrix(p, &w->down, e, d, m, "%s.%d.mlp.down_proj.weight", l, i);
}

#define QWEN3_EMBEDDING "model.embed_tokens.weight"

/* Every tensor the pipeline uses (the embedding, layers 0 .. 26), checked in or listed for p. */
static int qwen3_walk_names(const Qwen3Config *c, WeightPart *p, Error *e) {
    Var *embedding;
    if (part_weight(p, &embedding, e, SHAPE(c->vocab_size, c->hidden_size), QWEN3_EMBEDDING))
        return -1;
    for (int i = 0; i < QWEN3_KLEIN_LAYERS[2]; i++) {
        Qwen3Attention a;
        Qwen3Mlp m;
        if (qwen3_attention_load(&a, p, c, i, e) || qwen3_mlp_load(&m, p, c, i, e)) return -1;
    }
    return 0;
}

static int qwen3_walk(const void *config, WeightPart *p, Error *e) {
    return qwen3_walk_names(config, p, e);
}

/* The weights every call reads (stored_weights_open). An encoding leaves, by design, the final
 * norm, the LM head and the layers after the last hidden state it takes. */
static int qwen3_weights(Qwen3 *m, const char *dir, WeightSource source, uint64_t seed, Error *e) {
    int first = QWEN3_KLEIN_LAYERS[2], left = m->config.num_layers - first;
    char (*layers)[32] = malloc((size_t)(left > 0 ? left : 1) * sizeof *layers);
    const char **leave = malloc((size_t)(left > 0 ? left + 3 : 3) * sizeof *leave);
    if (!layers || !leave) {
        free(layers);
        free(leave);
        return error_set(e, "out of memory");
    }
    int n = 0;
    leave[n++] = "model.norm.";
    leave[n++] = "lm_head.";
    for (int i = 0; i < left; i++) {
        snprintf(layers[i], sizeof layers[i], "model.layers.%d.", first + i);
        leave[n++] = layers[i];
    }
    leave[n] = NULL;
    int status = stored_weights_open(&m->weights, dir, source, seed, qwen3_walk, &m->config,
                                     leave, e);
    free(layers);
    free(leave);
    return status;
}

int qwen3_open(Qwen3 **out, const char *dir, WeightSource source, uint64_t seed, Error *e) {
    *out = NULL;
    if (source == WEIGHTS_FRESH) return error_set(e, "%s: Qwen3 is not trained here", dir);
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, "config.json", e)) return -1;
    Qwen3 *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading %s", dir);
    if (qwen3_config_read(&m->config, path, e) || qwen3_weights(m, dir, source, seed, e)) {
        qwen3_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

void qwen3_free(Qwen3 *m) {
    if (!m) return;
    st_model_close(m->weights);
    free(m);
}

const Qwen3Config *qwen3_config(const Qwen3 *m) { return &m->config; }

void qwen3_set_precision(Qwen3 *m, Precision precision) { m->precision = precision; }

/* --- the forward --- */

/* cos, sin: [L, D/2] at positions 0 .. L-1: pair i turns by l * theta^(-2i / D) (in double). */
static int qwen3_rope_tables(const Qwen3Config *c, int L, Tensor **cos_out, Tensor **sin_out) {
    int half = c->head_dim / 2;
    Tensor *cs = TENSOR_NEW(L, half), *sn = TENSOR_NEW(L, half);
    *cos_out = cs;
    *sin_out = sn;
    if (!cs || !sn) return -1;
    for (int l = 0; l < L; l++)
        for (int i = 0; i < half; i++) {
            double angle = l * pow(c->rope_theta, -2.0 * i / c->head_dim);
            cs->data[(int64_t)l * half + i] = (float)cos(angle);
            sn->data[(int64_t)l * half + i] = (float)sin(angle);
        }
    return 0;
}

/* What every layer of one call shares. */
typedef struct Qwen3Call {
    Tensor *cos, *sin;  /* [L, D/2] */
    const int *lengths; /* [B]: real tokens per row; the rest is padding */
    WeightArena *arena; /* one part's converted weights at a time */
} Qwen3Call;

/* x: [B, L, n D] -> [B, L, n, D], each head RMS-normalised by norm and rotated */
static Var *qwen3_heads(Tape *t, Var *x, int n, Var *norm, const Qwen3Config *c,
                        const Qwen3Call *call) {
    int64_t shape[4] = {var_size(x, 0), var_size(x, 1), n, c->head_dim};
    Var *y = ag_reshape(t, x, 4, shape);
    if (!norm) return y;
    y = ag_rmsnorm(t, y, norm, (float)c->rms_norm_eps);
    return ag_rope(t, y, var_new(t, call->cos, false), var_new(t, call->sin, false), ROPE_HALVES);
}

/* x: [B, L, hidden] -> x + o(attention(..)) */
static Var *qwen3_attention(Tape *t, const Qwen3Attention *w, const Qwen3Config *c,
                            const Qwen3Call *call, Var *x) {
    Var *h = ag_rmsnorm(t, x, w->norm, (float)c->rms_norm_eps);
    Var *q = qwen3_heads(t, matrix_linear(t, h, &w->q), c->heads, w->q_norm, c, call);
    Var *k = qwen3_heads(t, matrix_linear(t, h, &w->k), c->kv_heads, w->k_norm, c, call);
    Var *v = qwen3_heads(t, matrix_linear(t, h, &w->v), c->kv_heads, NULL, c, call);
    Var *o = ag_attention(t, q, k, v, (float)(1.0 / sqrt(c->head_dim)), true, call->lengths);
    int64_t shape[3] = {var_size(o, 0), var_size(o, 1), (int64_t)c->heads * c->head_dim};
    return ag_add(t, x, matrix_linear(t, ag_reshape(t, o, 3, shape), &w->o));
}

/* x: [B, L, hidden] -> x + down(silu(gate(n)) * up(n)), n = rms(x) */
static Var *qwen3_mlp(Tape *t, const Qwen3Mlp *w, const Qwen3Config *c, Var *x) {
    Var *h = ag_rmsnorm(t, x, w->norm, (float)c->rms_norm_eps);
    Var *gated = ag_mul(t, ag_silu(t, matrix_linear(t, h, &w->gate)), matrix_linear(t, h, &w->up));
    return ag_add(t, x, matrix_linear(t, gated, &w->down));
}

/* Layer i on the hidden states *x: [B, L, hidden] (replaced), its two parts' weights converted
 * one part at a time into the call's arena. */
static int qwen3_layer(const Qwen3 *m, const Qwen3Call *call, int i, Tensor **x, Error *e) {
    for (int half = 0; half < 2; half++) {
        WeightPart part = {.weights = m->weights, .arena = call->arena,
                           .precision = m->precision};
        Qwen3Attention a;
        Qwen3Mlp mlp;
        Tape *t = nograd_tape();
        int status = !t ? error_set(e, "out of memory")
                   : half == 0 ? qwen3_attention_load(&a, &part, &m->config, i, e)
                               : qwen3_mlp_load(&mlp, &part, &m->config, i, e);
        Tensor *y = NULL;
        if (!status) {
            Var *in = var_new(t, *x, false);
            Var *out = half == 0 ? qwen3_attention(t, &a, &m->config, call, in)
                                 : qwen3_mlp(t, &mlp, &m->config, in);
            status = nograd_result(t, out, &y, half == 0 ? "qwen3 attention" : "qwen3 mlp", e);
        }
        weight_part_free(&part);
        tape_free(t);
        if (status) return -1;
        tensor_replace(x, y);
    }
    return 0;
}

/* Floats the larger of a layer's two parts takes in an arena (each tensor rounded up to 16):
 * the norms' weights, and the matrices too when the source has no bytes to read them from
 * (config-only weights; part_matrix). */
static int64_t qwen3_arena_floats(const Qwen3 *m) {
    const Qwen3Config *c = &m->config;
    const StTensor *embedding = st_model_find(m->weights, QWEN3_EMBEDDING);
    int64_t matrices = embedding && embedding->data ? 0 : 1;
    int64_t d = c->hidden_size, q = (int64_t)c->heads * c->head_dim;
    int64_t kv = (int64_t)c->kv_heads * c->head_dim, up = 16 * 8;
    int64_t attention = d + matrices * (2 * q * d + 2 * kv * d) + 2 * c->head_dim + up;
    int64_t mlp = d + matrices * 3 * d * c->intermediate_size + up;
    return attention > mlp ? attention : mlp;
}

/* ids: [B, L] -> the embedding rows [B, L, hidden] */
static int qwen3_embed(const Qwen3 *m, const int32_t *ids, int batch, int L, Tensor **out,
                       Error *e) {
    const Qwen3Config *c = &m->config;
    if (!(*out = TENSOR_NEW(batch, L, c->hidden_size)))
        return error_set(e, "out of memory for the prompt's embeddings");
    for (int64_t i = 0; i < (int64_t)batch * L; i++) {
        if (ids[i] < 0 || ids[i] >= c->vocab_size)
            return error_set(e, "token id %d is outside the text encoder's vocabulary (%d)",
                             ids[i], c->vocab_size);
        if (st_model_read_rows_f32(m->weights, QWEN3_EMBEDDING, ids[i], 1,
                                   (*out)->data + i * c->hidden_size, e))
            return -1;
    }
    return 0;
}

/* hidden states x: [B, L, hidden] into slot k of out: [B, L, 3 hidden] */
static void qwen3_stack(const Tensor *x, int k, Tensor *out) {
    int64_t rows = x->shape[0] * x->shape[1], hidden = x->shape[2];
    for (int64_t r = 0; r < rows; r++)
        memcpy(out->data + (r * 3 + k) * hidden, x->data + r * hidden, (size_t)hidden * sizeof(float));
}

/* ids [batch, L] -> [batch, L, 3 hidden] (nn.h): the layers up to the last hidden state the
 * pipeline reads, hidden states 9, 18 and 27 stacked per token. */
int qwen3_prompt_embeds(const Qwen3 *m, const int32_t *ids, const int *lengths, int batch, int L,
                        Tensor **out, Error *e) {
    const Qwen3Config *c = &m->config;
    *out = NULL;
    for (int b = 0; b < batch; b++)
        if (lengths[b] < 1 || lengths[b] > L)
            return error_set(e, "prompt %d has %d real tokens of %d: expected 1 .. %d", b,
                             lengths[b], L, L);
    WeightArena arena = {.capacity = qwen3_arena_floats(m)};
    Qwen3Call call = {.lengths = lengths, .arena = &arena};
    Tensor *x = NULL, *stacked = TENSOR_NEW(batch, L, 3 * (int64_t)c->hidden_size);
    arena.data = malloc((size_t)arena.capacity * sizeof *arena.data);
    int status = !stacked || !arena.data || qwen3_rope_tables(c, L, &call.cos, &call.sin)
                     ? error_set(e, "out of memory for the prompt encoder")
                     : qwen3_embed(m, ids, batch, L, &x, e);
    for (int i = 0, k = 0; k < 3; i++) {
        if (status) break;
        status = qwen3_layer(m, &call, i, &x, e);
        if (!status && i + 1 == QWEN3_KLEIN_LAYERS[k]) qwen3_stack(x, k++, stacked);
    }
    tensor_free(x);
    tensor_free(call.cos);
    tensor_free(call.sin);
    free(arena.data);
    if (status) {
        tensor_free(stacked);
        return -1;
    }
    *out = stacked;
    return 0;
}

/* === prompt encoder ===
 * What turns prompts into the transformer's prompt embeddings, chosen by the model directory:
 *   <dir>/tokenizer/ and <dir>/text_encoder/ (Qwen3): FLUX.2 [klein]'s pipeline
 *     (Flux2KleinPipeline._get_qwen3_prompt_embeds): the chat template with enable_thinking off,
 *     the tokenizer with padding="max_length", truncation=True, max_length (512), right
 *     padding with the pad token; then Qwen3's hidden states 9, 18, 27 stacked per token;
 *   <dir>/text_encoder/ alone: diamond's character encoder (the embedded models). */

/* The text Qwen3's chat template makes of one user message with add_generation_prompt=True and
 * enable_thinking=False: the prompt goes between these two. */
#define KLEIN_TEMPLATE_BEFORE "<|im_start|>user\n"
#define KLEIN_TEMPLATE_AFTER "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

struct PromptEncoder {
    int max_length, width;
    Tokenizer *tokenizer; /* klein */
    Qwen3 *qwen3;
    TextEncoder *chars;   /* the embedded models */
};

void prompt_encoder_free(PromptEncoder *p) {
    if (!p) return;
    tokenizer_free(p->tokenizer);
    qwen3_free(p->qwen3);
    text_encoder_free(p->chars);
    free(p);
}

/* <model>/tokenizer and <model>/text_encoder: the tokenizer's ids must fit Qwen3's table. */
static int prompt_encoder_open_klein(PromptEncoder *p, const char *model, WeightSource source,
                                     uint64_t seed, Error *e) {
    char tok[PATH_BYTES], text[PATH_BYTES];
    if (path_join(tok, sizeof tok, model, "tokenizer", e) ||
        path_join(text, sizeof text, model, "text_encoder", e) ||
        tokenizer_load(&p->tokenizer, tok, e) || qwen3_open(&p->qwen3, text, source, seed, e))
        return -1;
    const Qwen3Config *c = qwen3_config(p->qwen3);
    if (tokenizer_vocab_size(p->tokenizer) > c->vocab_size)
        return error_set(e, "%s: the tokenizer's ids go up to %d, the text encoder's vocab_size is "
                         "%d", model, tokenizer_vocab_size(p->tokenizer) - 1, c->vocab_size);
    p->width = 3 * c->hidden_size;
    if (!p->max_length) p->max_length = KLEIN_MAX_LENGTH;
    return 0;
}

static int prompt_encoder_open_chars(PromptEncoder *p, const char *model, WeightSource source,
                                     uint64_t seed, Error *e) {
    char dir[PATH_BYTES];
    if (path_join(dir, sizeof dir, model, "text_encoder", e) ||
        text_encoder_open(&p->chars, dir, source, seed, e))
        return -1;
    const TextEncoderConfig *c = text_encoder_config(p->chars);
    if (p->max_length && p->max_length != c->max_length)
        return error_set(e, "%s: diamond's character encoder has a fixed length of %d tokens, "
                         "not %d", dir, c->max_length, p->max_length);
    p->max_length = c->max_length;
    p->width = c->hidden_size;
    return 0;
}

int prompt_encoder_open(PromptEncoder **out, const char *model, WeightSource source,
                        uint64_t seed, int max_length, Error *e) {
    *out = NULL;
    char tokenizer[PATH_BYTES];
    struct stat sb;
    if (path_join(tokenizer, sizeof tokenizer, model, "tokenizer", e)) return -1;
    PromptEncoder *p = calloc(1, sizeof *p);
    if (!p) return error_set(e, "out of memory loading %s", model);
    p->max_length = max_length;
    int status = stat(tokenizer, &sb) == 0 && S_ISDIR(sb.st_mode)
                     ? prompt_encoder_open_klein(p, model, source, seed, e)
                     : prompt_encoder_open_chars(p, model, source, seed, e);
    if (status) {
        prompt_encoder_free(p);
        return -1;
    }
    *out = p;
    return 0;
}

void prompt_encoder_set_precision(PromptEncoder *p, Precision precision) {
    if (p->qwen3) qwen3_set_precision(p->qwen3, precision);
}

int prompt_encoder_width(const PromptEncoder *p) { return p->width; }

int prompt_encoder_max_length(const PromptEncoder *p) { return p->max_length; }

/* prompt -> ids[0 .. max_length) as the klein pipeline tokenizes it, *length real tokens (the
 * rest padding) and *total the tokens before truncation. */
static int klein_tokenize(const PromptEncoder *p, const char *prompt, int32_t *ids, int *length,
                          size_t *total, Error *e) {
    size_t n = strlen(prompt);
    size_t before = strlen(KLEIN_TEMPLATE_BEFORE), after = strlen(KLEIN_TEMPLATE_AFTER);
    char *text = n < SIZE_MAX - before - after ? malloc(before + n + after + 1) : NULL;
    if (!text) return error_set(e, "out of memory for a prompt of %zu bytes", n);
    snprintf(text, before + n + after + 1, "%s%s%s", KLEIN_TEMPLATE_BEFORE, prompt,
             KLEIN_TEMPLATE_AFTER);
    TokenIds tokens = {0};
    int status = tokenizer_encode(p->tokenizer, text, before + n + after, &tokens, e);
    free(text);
    if (status) {
        token_ids_free(&tokens);
        return -1;
    }
    size_t kept = tokens.count < (size_t)p->max_length ? tokens.count : (size_t)p->max_length;
    for (int i = 0; i < p->max_length; i++)
        ids[i] = (size_t)i < kept ? tokens.ids[i] : tokenizer_pad_id(p->tokenizer);
    *length = (int)kept;
    *total = tokens.count;
    token_ids_free(&tokens);
    return 0;
}

/* The prompts' ids [n, max_length] and lengths [n] (the characters of the character encoder). */
static int prompt_tokenize(const PromptEncoder *p, const char *const *prompts, int n,
                           PromptTokens *tok, Error *e) {
    size_t L = (size_t)p->max_length;
    tok->ids = malloc((size_t)n * L * sizeof *tok->ids);
    tok->lengths = malloc((size_t)n * sizeof *tok->lengths);
    tok->totals = malloc((size_t)n * sizeof *tok->totals);
    int *chars = p->chars ? malloc(L * sizeof *chars) : NULL;
    if (!tok->ids || !tok->lengths || !tok->totals || (p->chars && !chars)) {
        free(chars);
        return error_set(e, "out of memory tokenizing %d prompts", n);
    }
    int status = 0;
    for (int b = 0; b < n; b++) {
        if (status) break;
        int32_t *ids = tok->ids + (size_t)b * L;
        if (p->tokenizer) {
            status = klein_tokenize(p, prompts[b], ids, &tok->lengths[b], &tok->totals[b], e);
            continue;
        }
        status = text_encoder_tokenize(p->chars, prompts[b], chars, &tok->lengths[b], e);
        if (status) break;
        for (size_t i = 0; i < L; i++) ids[i] = chars[i];
        tok->totals[b] = (size_t)tok->lengths[b];
    }
    free(chars);
    return status;
}

void prompt_tokens_free(PromptTokens *tok) {
    free(tok->ids);
    free(tok->lengths);
    free(tok->totals);
    *tok = (PromptTokens){0};
}

/* Prompt b alone -> rows [L, width] of out [n, L, width]. */
static int prompt_encode_one(const PromptEncoder *p, const char *prompt, const PromptTokens *tok,
                             int b, Tensor *out, Error *e) {
    Tape *t = p->chars ? nograd_tape() : NULL;
    Tensor *y = NULL;
    Var *v = t ? text_encode(t, p->chars, &prompt, 1, e) : NULL;
    int status = p->qwen3 ? qwen3_prompt_embeds(p->qwen3, tok->ids + (size_t)b * p->max_length,
                                                &tok->lengths[b], 1, p->max_length, &y, e)
                 : !t     ? error_set(e, "out of memory for the text encoder")
                 : v      ? nograd_result(t, v, &y, "text encoder", e)
                          : -1;
    if (!status) memcpy(out->data + (int64_t)b * y->numel, y->data, (size_t)y->numel * sizeof(float));
    tensor_free(y);
    tape_free(t);
    return status;
}

int prompt_encode(const PromptEncoder *p, const char *const *prompts, int n, Tensor **embeds,
                  PromptTokens *tokens, Error *e) {
    PromptTokens own = {0}, *tok = tokens ? tokens : &own;
    *tok = (PromptTokens){0};
    *embeds = NULL;
    if (n < 1) return error_set(e, "no prompt to encode");
    int status = prompt_tokenize(p, prompts, n, tok, e);
    if (!status && !(*embeds = TENSOR_NEW(n, p->max_length, p->width)))
        status = error_set(e, "out of memory for the prompt embeddings");
    for (int b = 0; b < n; b++) {
        if (status) break;
        status = prompt_encode_one(p, prompts[b], tok, b, *embeds, e);
    }
    if (status) {
        tensor_free(*embeds);
        *embeds = NULL;
    }
    if (!tokens || status) prompt_tokens_free(tok);
    return status;
}

/* === VAE ===
 * The decoder of diffusers' AutoencoderKLFlux2 (autoencoder_kl_flux2.py with vae.py's Decoder),
 * with the FLUX.2 pipeline's latent unpacking; the encoder, which only training needs, is
 * train/vae_encoder.c, built from the layers here.
 *   in/out  tokens [B, h w, latent_channels patch_h patch_w] -> image [B, 3, H, W] in about
 *           [-1, 1], H = h patch_h 2^(up blocks - 1)
 *   names   bn.running_mean, bn.running_var; post_quant_conv; decoder.conv_in,
 *           decoder.mid_block.resnets.{0,1}, decoder.mid_block.attentions.0.{group_norm,to_q,
 *           to_k,to_v,to_out.0}, decoder.up_blocks.N.resnets.M.{norm1,conv1,norm2,conv2,
 *           conv_shortcut}, decoder.up_blocks.N.upsamplers.0.conv, decoder.conv_norm_out,
 *           decoder.conv_out
 *   decode  tokens * sqrt(running_var + eps) + running_mean, unpatchified; post_quant_conv,
 *           conv_in; mid block: resnet, one-head attention over all pixels, resnet; each up
 *           block: layers_per_block + 1 resnets (x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), a 1x1
 *           shortcut when channels change), then nearest 2x and a 3x3 conv except after the
 *           last; GN, SiLU, conv_out
 * The decode runs as one graph of ag_* ops, with checkpoints nested as deep as the memory
 * budget needs (vae_decoder_checkpoint_for; below). */

/* diffusers' Decoder fixes the GroupNorm eps of its resnets, mid-block attention and
 * conv_norm_out at 1e-6; it is not in config.json. Only the latent batch norm uses the
 * config's batch_norm_eps. */
#define VAE_NORM_EPS 1e-6f

/* Execution strategy: checkpoints (f32, batch 1), nested three deep (see vae_plan): stages,
 * which end where the resolution is 4x smaller than after the next upsampler; layers (a resnet,
 * with the upsampler before it or the head after it joined in); units (one conv path each). Only
 * stage outputs stay across the whole decode; in backward one stage's layer outputs, one layer's
 * unit outputs and one unit's recomputation add to them. Measured with tools/vae_peak.c on the
 * real config, the tape's peak with all three levels scales with the pixels: 365 MB at 256x256,
 * 1459 MB at 512x512 (about 5.8 GB at 1024x1024); with none, 1311 MB at 256x256 (about 21 GB at
 * 1024x1024). The price is time: each unit runs forward up to four times, so vae_decoder_
 * checkpoint_for nests only as deep as the memory budget needs. The attention is O(N d): no
 * N x N matrix. */

typedef struct VaeUpBlock {
    VaeResnet *resnets;  /* layers_per_block + 1 */
    Conv2d upsampler;    /* nearest 2x then this 3x3 conv; weight NULL in the last block */
} VaeUpBlock;

/* The checkpoint plan, made at load (see vae_layer_apply and vae_stage_apply): a layer is an
 * optional upsampler, then a resnet or the attention, then optionally the output head. */
typedef struct VaeLayer {
    const VaeDecoder *model;
    const Conv2d *upsampler;
    const VaeResnet *resnet;
    const VaeAttention *attention;
    bool head;
} VaeLayer;

typedef struct VaeStage {
    VaeLayer *layers;
    int n_layers;
} VaeStage;

struct VaeDecoder {
    VaeConfig config;
    Params *params;
    Var *bn_mean, *bn_var; /* buffers, [latent_channels * patch_h * patch_w] */
    Var *bn_std;           /* a constant, sqrt(bn_var + batch_norm_eps) */
    Conv2d post_quant_conv;   /* 1x1, weight NULL when use_post_quant_conv is false */
    Conv2d conv_in;
    VaeResnet mid_resnets[2];
    VaeAttention mid_attention; /* weights NULL when mid_block_add_attention is false */
    VaeUpBlock up_blocks[VAE_MAX_BLOCKS];
    NormParams conv_norm_out;
    Conv2d conv_out;
    VaeLayer *layers; /* every layer of the decoder in order, split into stages */
    VaeStage stages[VAE_MAX_BLOCKS];
    int checkpoint_levels; /* see vae_decoder_set_checkpoint_levels */
};

/* The channel list `key` (at most VAE_MAX_BLOCKS entries, each a positive multiple of groups)
 * into blocks and *n, with one `type` per entry in the list `types_key`. */
int vae_config_channels(const JsonValue *root, const char *key, const char *types_key,
                        const char *type, int64_t groups, int *blocks, int *n_blocks, Error *e) {
    int64_t values[VAE_MAX_BLOCKS];
    size_t n = 0;
    if (json_get_int_array(root, key, values, VAE_MAX_BLOCKS, &n, e)) return -1;
    const char *src = root->source;
    if (n < 1) return error_set(e, "%s: %s is empty", src, key);
    for (size_t i = 0; i < n; i++) {
        if (values[i] < 1 || values[i] > 1 << 16 || values[i] % groups)
            return error_set(e, "%s: %s[%zu] = %lld is not a positive multiple of norm_num_groups"
                             " %lld", src, key, i, (long long)values[i], (long long)groups);
        blocks[i] = (int)values[i];
    }
    *n_blocks = (int)n;
    const JsonValue *types = json_get(root, types_key);
    if (!types) return error_set(e, "%s: key '%s' is missing", src, types_key);
    if (types->type != JSON_ARRAY || types->count != n)
        return error_set(e, "%s: %s must list one type per entry of %s", src, types_key, key);
    for (size_t i = 0; i < n; i++)
        if (types->items[i].type != JSON_STRING || strcmp(types->items[i].string, type))
            return error_set(e, "%s: %s[%zu] is not \"%s\"", src, types_key, i, type);
    return 0;
}

/* The decoder's up blocks: decoder_block_out_channels when set, else block_out_channels. */
static int vae_config_blocks(const JsonValue *root, VaeConfig *c, int64_t groups, Error *e) {
    const JsonValue *dec = json_get(root, "decoder_block_out_channels");
    const char *key = dec && dec->type != JSON_NULL ? "decoder_block_out_channels"
                                                    : "block_out_channels";
    return vae_config_channels(root, key, "up_block_types", "UpDecoderBlock2D", groups,
                               c->block_out_channels, &c->n_blocks, e);
}

/* Every key FLUX.2's vae/config.json carries is required: a missing one is an error naming it,
 * never a guessed default. */
int vae_config_read(VaeConfig *c, const JsonValue *root, Error *e) {
    int64_t patch[2];
    size_t n_patch = 0;
    double bn_eps;
    const char *act, *src = root->source;
    if (json_get_int_in(root, "latent_channels", 1, 1 << 16, &c->latent_channels, e) ||
        json_get_int_in(root, "out_channels", 1, 1 << 16, &c->out_channels, e) ||
        json_get_int_in(root, "layers_per_block", 0, 64, &c->layers_per_block, e) ||
        json_get_int_in(root, "norm_num_groups", 1, 1 << 16, &c->norm_num_groups, e) ||
        json_get_float(root, "batch_norm_eps", &bn_eps, e) ||
        json_get_string(root, "act_fn", &act, e) ||
        json_get_bool(root, "use_post_quant_conv", &c->use_post_quant_conv, e) ||
        json_get_bool(root, "mid_block_add_attention", &c->mid_block_add_attention, e) ||
        json_get_int_array(root, "patch_size", patch, 2, &n_patch, e))
        return -1;
    if (strcmp(act, "silu") && strcmp(act, "swish"))
        return error_set(e, "%s: act_fn '%s' is not supported (only silu)", src, act);
    if (n_patch != 2 || patch[0] < 1 || patch[1] < 1 || patch[0] > 64 || patch[1] > 64)
        return error_set(e, "%s: patch_size must be two sizes in 1..64", src);
    if (!(bn_eps >= 0.0 && bn_eps < 1.0))
        return error_set(e, "%s: batch_norm_eps %g is out of range", src, bn_eps);
    c->patch_h = (int)patch[0];
    c->patch_w = (int)patch[1];
    c->batch_norm_eps = (float)bn_eps;
    return vae_config_blocks(root, c, c->norm_num_groups, e);
}

/* "<prefix>.<part>" in the caller's name buffer */
#define VAE_NAME(part) (snprintf(name, sizeof name, "%s.%s", prefix, part), name)

int vae_resnet_load(VaeResnet *r, Params *st, int in, int out, int groups, const char *prefix,
                    Error *e) {
    char name[192];
    r->groups = groups;
    if (norm_load(&r->norm1, st, in, true, VAE_NAME("norm1"), e) ||
        conv2d_load(&r->conv1, st, in, out, 3, 1, 1, 1, true, VAE_NAME("conv1"), e) ||
        norm_load(&r->norm2, st, out, true, VAE_NAME("norm2"), e) ||
        conv2d_load(&r->conv2, st, out, out, 3, 1, 1, 1, true, VAE_NAME("conv2"), e) ||
        (in != out &&
         conv2d_load(&r->conv_shortcut, st, in, out, 1, 1, 0, 1, true, VAE_NAME("conv_shortcut"),
                     e)))
        return -1;
    return 0;
}

int vae_attention_load(VaeAttention *a, Params *st, int channels, int groups, const char *prefix,
                       Error *e) {
    char name[192];
    a->groups = groups;
    if (norm_load(&a->group_norm, st, channels, true, VAE_NAME("group_norm"), e) ||
        linear_load(&a->to_q, st, channels, channels, true, VAE_NAME("to_q"), e) ||
        linear_load(&a->to_k, st, channels, channels, true, VAE_NAME("to_k"), e) ||
        linear_load(&a->to_v, st, channels, channels, true, VAE_NAME("to_v"), e) ||
        linear_load(&a->to_out, st, channels, channels, true, VAE_NAME("to_out.0"), e))
        return -1;
    return 0;
}
#undef VAE_NAME

/* bn.running_mean and bn.running_var over the packed channels: buffers of either half. */
int vae_latent_stats_load(const VaeConfig *c, Params *st, Var **mean, Var **var, Error *e) {
    int packed = c->latent_channels * c->patch_h * c->patch_w;
    if (!(*mean = params_load_buffer(st, e, SHAPE(packed), "bn.running_mean")) ||
        !(*var = params_load_buffer(st, e, SHAPE(packed), "bn.running_var")))
        return -1;
    return 0;
}

/* std[i] = sqrt(var[i] + batch_norm_eps), or its reciprocal, into the [packed] tensor std. */
int vae_latent_std(const VaeConfig *c, const Var *var, bool reciprocal, Tensor *std, Error *e) {
    for (int64_t i = 0; i < std->numel; i++) {
        float v = var->value->data[i];
        if (!(v >= 0.0f))
            return error_set(e, "tensor 'bn.running_var' has a negative or NaN entry at %lld",
                             (long long)i);
        float s = sqrtf(v + c->batch_norm_eps);
        std->data[i] = reciprocal ? 1.0f / s : s;
    }
    return 0;
}

/* The statistics, with sqrt(bn.running_var + batch_norm_eps) as a constant. */
static int vae_decoder_stats_load(VaeDecoder *m, Params *st, Error *e) {
    if (vae_latent_stats_load(&m->config, st, &m->bn_mean, &m->bn_var, e)) return -1;
    Tensor *std = tensor_new(1, m->bn_var->value->shape);
    if (!std) return error_set(e, "out of memory loading the VAE");
    if (vae_latent_std(&m->config, m->bn_var, false, std, e)) {
        tensor_free(std);
        return -1;
    }
    return (m->bn_std = params_constant(st, std, e)) ? 0 : -1;
}

static int vae_weights_load(VaeDecoder *m, Params *st, Error *e) {
    const VaeConfig *c = &m->config;
    int groups = c->norm_num_groups, top = c->block_out_channels[c->n_blocks - 1];
    char name[192];
    if (vae_decoder_stats_load(m, st, e) ||
        (c->use_post_quant_conv &&
         conv2d_load(&m->post_quant_conv, st, c->latent_channels, c->latent_channels, 1, 1, 0, 1,
                     true, "post_quant_conv", e)) ||
        conv2d_load(&m->conv_in, st, c->latent_channels, top, 3, 1, 1, 1, true, "decoder.conv_in",
                    e) ||
        vae_resnet_load(&m->mid_resnets[0], st, top, top, groups, "decoder.mid_block.resnets.0",
                        e) ||
        vae_resnet_load(&m->mid_resnets[1], st, top, top, groups, "decoder.mid_block.resnets.1",
                        e) ||
        (c->mid_block_add_attention &&
         vae_attention_load(&m->mid_attention, st, top, groups, "decoder.mid_block.attentions.0",
                            e)))
        return -1;
    /* up blocks walk block_out_channels backwards; the first resnet of each changes channels */
    int in = top;
    for (int b = 0; b < c->n_blocks; b++) {
        int out = c->block_out_channels[c->n_blocks - 1 - b];
        VaeUpBlock *u = &m->up_blocks[b];
        u->resnets = calloc((size_t)c->layers_per_block + 1, sizeof *u->resnets);
        if (!u->resnets) return error_set(e, "out of memory loading the VAE decoder");
        for (int r = 0; r <= c->layers_per_block; r++) {
            snprintf(name, sizeof name, "decoder.up_blocks.%d.resnets.%d", b, r);
            if (vae_resnet_load(&u->resnets[r], st, r == 0 ? in : out, out, groups, name, e))
                return -1;
        }
        snprintf(name, sizeof name, "decoder.up_blocks.%d.upsamplers.0.conv", b);
        bool upsample = b < c->n_blocks - 1;
        if (upsample && conv2d_load(&u->upsampler, st, out, out, 3, 1, 1, 1, true, name, e))
            return -1;
        in = out;
    }
    int bottom = c->block_out_channels[0];
    return norm_load(&m->conv_norm_out, st, bottom, true, "decoder.conv_norm_out", e) ||
                   conv2d_load(&m->conv_out, st, bottom, c->out_channels, 3, 1, 1, 1, true,
                               "decoder.conv_out", e)
               ? -1
               : 0;
}

/* Stage 0 is the mid block and up block 0's resnets; stage b > 0 starts with up block b-1's
 * upsampler (joined to the first resnet of up block b) and holds up block b's resnets; the
 * head joins the last layer. Every stage ends at a resolution before an upsampler, where the
 * tensors are 4x smaller than just after it. */
static int vae_plan(VaeDecoder *m, Error *e) {
    const VaeConfig *c = &m->config;
    int per_block = c->layers_per_block + 1;
    m->layers = calloc((size_t)(3 + c->n_blocks * per_block), sizeof *m->layers);
    if (!m->layers) return error_set(e, "out of memory loading the VAE decoder");
    VaeLayer *l = m->layers;
    for (int b = 0; b < c->n_blocks; b++) {
        m->stages[b].layers = l;
        if (b == 0) {
            *l++ = (VaeLayer){.model = m, .resnet = &m->mid_resnets[0]};
            if (c->mid_block_add_attention)
                *l++ = (VaeLayer){.model = m, .attention = &m->mid_attention};
            *l++ = (VaeLayer){.model = m, .resnet = &m->mid_resnets[1]};
        }
        for (int r = 0; r < per_block; r++)
            *l++ = (VaeLayer){.model = m,
                              .upsampler = b > 0 && r == 0 ? &m->up_blocks[b - 1].upsampler : NULL,
                              .resnet = &m->up_blocks[b].resnets[r]};
        m->stages[b].n_layers = (int)(l - m->stages[b].layers);
    }
    l[-1].head = true;
    return 0;
}

/* One diffusers VAE directory holds both halves: each leaves the other's tensors (bn.* both
 * read; the encoder is train/vae_encoder.c's). */
static const char *const vae_decoder_leaves[] = {"encoder.", "quant_conv.", NULL};

/* vae_decoder_load and its kin: the weights from source (files, config-only values or fresh). */
int vae_decoder_open(VaeDecoder **out, const char *dir, WeightSource source, uint64_t seed,
                            Error *e) {
    *out = NULL;
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, "config.json", e)) return -1;
    VaeDecoder *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading the VAE decoder");
    m->checkpoint_levels = VAE_CHECKPOINT_LEVELS;
    JsonDoc *doc = NULL;
    StModel *st = NULL;
    int rc = json_parse_file(&doc, path, e) || vae_config_read(&m->config, json_root(doc), e) ||
             params_open(&m->params, &st, dir, source, seed, e) ||
             vae_weights_load(m, m->params, e) || vae_plan(m, e) ||
             weights_all_read(source, st, params_reads, m->params, vae_decoder_leaves, dir, e);
    json_free(doc);
    st_model_close(st);
    if (rc) {
        vae_decoder_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

void vae_decoder_free(VaeDecoder *m) {
    if (!m) return;
    for (int b = 0; b < VAE_MAX_BLOCKS; b++) free(m->up_blocks[b].resnets);
    free(m->layers);
    params_free(m->params);
    free(m);
}

Params *vae_decoder_params(const VaeDecoder *m) {
    return m->params;
}

const VaeConfig *vae_decoder_config(const VaeDecoder *m) {
    return &m->config;
}

void vae_decoder_token_size(const VaeDecoder *m, int *rows, int *cols) {
    const VaeConfig *c = vae_decoder_config(m);
    *rows = c->patch_h << (c->n_blocks - 1);
    *cols = c->patch_w << (c->n_blocks - 1);
}

void vae_decoder_set_checkpoint_levels(VaeDecoder *m, int levels) {
    m->checkpoint_levels = levels < 0 ? 0 : levels > VAE_CHECKPOINT_LEVELS ? VAE_CHECKPOINT_LEVELS
                                                                           : levels;
}

/* Floats of one resnet output of stage s (its pixels x its channels) and, for s > 0, of the
 * upsampled input its first layer makes from the stage before (those pixels x the channels
 * before): the sizes every estimate below is counted in. */
static void vae_stage_floats(const VaeConfig *c, int s, int height, int width, double *resnet,
                             double *upsampled) {
    int shrink = c->n_blocks - 1 - s; /* stage s runs at 1 / 2^shrink of the image's side */
    double pixels = (double)(height >> shrink) * (double)(width >> shrink);
    *resnet = pixels * c->block_out_channels[shrink];
    *upsampled = s > 0 ? pixels * c->block_out_channels[shrink + 1] : 0.0;
}

size_t vae_default_memory(size_t available) {
    return available ? (size_t)(VAE_MEMORY_SHARE * (double)available) : VAE_MEMORY_UNKNOWN;
}

size_t vae_decode_bytes(const VaeDecoder *m, int levels, int batch, int height, int width) {
    const VaeConfig *c = &m->config;
    double all = 0.0, held = 0.0, deepest = 0.0; /* floats */
    for (int s = 0; s < c->n_blocks; s++) {
        double resnet, upsampled;
        vae_stage_floats(c, s, height, width, &resnet, &upsampled);
        int resnets = c->layers_per_block + 1 + (s == 0 ? 2 : 0); /* the mid block's two */
        double stage = resnets * resnet, layer = resnet > upsampled ? resnet : upsampled;
        all += stage;
        held += resnet; /* the stage's output */
        /* what one stage adds while its backward runs: all of it plain (levels 1), its layer
         * outputs and one layer plain (2), or one layer's unit outputs and one unit (3) */
        double inner = levels == 1 ? VAE_PLAIN_TENSORS_PER_RESNET * stage
                       : levels == 2 ? stage + VAE_PLAIN_TENSORS_PER_RESNET * layer
                                     : stage + VAE_UNIT_TENSORS_PER_LAYER * layer;
        if (inner > deepest) deepest = inner;
    }
    double floats = levels <= 0 ? VAE_PLAIN_TENSORS_PER_RESNET * all : 2.0 * held + deepest;
    double bytes = sizeof(float) * (double)batch * floats;
    size_t estimate = bytes >= (double)SIZE_MAX ? SIZE_MAX : (size_t)bytes;
    if (levels <= 0) return estimate;
    /* a level more never holds more: where a bound above is looser than the one before, that one */
    size_t fewer = vae_decode_bytes(m, levels - 1, batch, height, width);
    return estimate < fewer ? estimate : fewer;
}

int vae_decoder_checkpoint_for(VaeDecoder *m, int batch, int height, int width,
                               size_t max_bytes) {
    int levels = 0;
    while (levels < VAE_CHECKPOINT_LEVELS &&
           vae_decode_bytes(m, levels, batch, height, width) > max_bytes)
        levels++;
    m->checkpoint_levels = levels;
    return levels;
}

/* x: [B, C, H, W] -> SiLU(GroupNorm(x)) */
Var *vae_norm_silu(Tape *t, const NormParams *n, int groups, Var *x) {
    return ag_groupnorm_silu(t, x, groups, n->weight, n->bias, VAE_NORM_EPS);
}

/* x: [B, C, H, W] -> conv(SiLU(GroupNorm(x))), the normalised tensor dropped as soon as the
 * convolution has read it: when the weights want no gradient no backward reads it either. */
static Var *vae_norm_silu_conv(Tape *t, const NormParams *n, int groups, const Conv2d *conv,
                               Var *x) {
    Var *h = vae_norm_silu(t, n, groups, x);
    Var *y = conv2d_apply(t, conv, h);
    var_drop(h);
    return y;
}

/* A resnet's output from its input x: skip + h, where skip is x or its shortcut convolution.
 * An addition's backward reads neither operand, so h and a shortcut are dropped; x is the
 * caller's. */
static Var *vae_residual(Tape *t, Var *x, Var *skip, Var *h) {
    Var *y = ag_add(t, skip, h);
    if (skip != x) var_drop(skip);
    var_drop(h);
    return y;
}

/* The nesting depth of each kind of block: stages 1, layers 2, units 3. */
enum { VAE_STAGE = 1, VAE_LAYER = 2, VAE_UNIT = 3 };

/* One block at nesting `level`, through ag_checkpoint when the model checkpoints that deep, or
 * when the tape records nothing (grad off): a checkpoint then costs nothing (no backward will
 * recompute it) and frees the block's intermediates as soon as it ends, so a decode without
 * gradients holds a few tensors at a time, not every one it made. The functions only read ctx,
 * so handing them the const weights through CheckpointFn's void * is safe. */
static Var *vae_block(Tape *t, const VaeDecoder *m, int level, CheckpointFn fn, const void *ctx,
                      Var **in, int n_in) {
    if (level <= m->checkpoint_levels || !tape_grad_enabled(t))
        return ag_checkpoint(t, fn, (void *)ctx, in, n_in);
    for (int i = 0; i < n_in; i++)
        if (!in[i]) return NULL;
    return fn(t, in, (void *)ctx);
}

/* The innermost checkpoints, "units": one conv path each (conv1 or conv2 after SiLU(GroupNorm),
 * the shortcut, the upsampler, the head), so a unit's recomputation holds at most its input's
 * gradient, one normalised tensor, the conv output and their gradients. */

/* x: [B, in, H, W] -> h = conv1(SiLU(norm1(x))): [B, out, H, W] */
static Var *vae_resnet_in_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeResnet *r = ctx;
    return vae_norm_silu_conv(t, &r->norm1, r->groups, &r->conv1, inputs[0]);
}

/* h: [B, out, H, W] -> conv2(SiLU(norm2(h))) */
static Var *vae_resnet_mid_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeResnet *r = ctx;
    return vae_norm_silu_conv(t, &r->norm2, r->groups, &r->conv2, inputs[0]);
}

/* x: [B, in, H, W] -> conv_shortcut(x): [B, out, H, W] */
static Var *vae_shortcut_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeResnet *r = ctx;
    return conv2d_apply(t, &r->conv_shortcut, inputs[0]);
}

/* x: [B, C, H, W] -> x + to_out(attention(group_norm(x))), one head of C dims over the H*W
 * pixels as tokens (the blocked attention keeps it O(H*W*C) in memory). */
Var *vae_attention_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeAttention *a = ctx;
    Var *x = inputs[0];
    int64_t B = x->value->shape[0], C = x->value->shape[1];
    int64_t N = x->value->shape[2] * x->value->shape[3];
    Var *n = ag_groupnorm(t, x, a->groups, a->group_norm.weight, a->group_norm.bias,
                          VAE_NORM_EPS);
    Var *seq = ag_transpose(t, ag_reshape(t, n, 3, (int64_t[]){B, C, N}), 1, 2); /* [B, N, C] */
    const int64_t heads[4] = {B, N, 1, C};
    Var *q = ag_reshape(t, linear_apply(t, &a->to_q, seq), 4, heads);
    Var *k = ag_reshape(t, linear_apply(t, &a->to_k, seq), 4, heads);
    Var *v = ag_reshape(t, linear_apply(t, &a->to_v, seq), 4, heads);
    Var *o = ag_attention(t, q, k, v, (float)(1.0 / sqrt((double)C)), false, NULL);
    o = linear_apply(t, &a->to_out, ag_reshape(t, o, 3, (int64_t[]){B, N, C}));
    o = ag_reshape(t, ag_transpose(t, o, 1, 2), 4, x->value->shape); /* [B, C, H, W] */
    return ag_add(t, o, x);
}

/* x: [B, C, H, W] -> [B, in, H, W] -> the resnet's output, without checkpoints */
Var *vae_resnet_forward(Tape *t, const VaeResnet *r, Var *x) {
    Var *h = vae_resnet_in_apply(t, &x, (void *)r);
    Var *skip = r->conv_shortcut.weight ? conv2d_apply(t, &r->conv_shortcut, x) : x;
    return vae_residual(t, x, skip, vae_resnet_mid_apply(t, &h, (void *)r));
}

int vae_decoder_set_latent_stats(VaeDecoder *m, const float *mean, const float *var, Error *e) {
    memcpy(m->bn_mean->value->data, mean, (size_t)m->bn_mean->value->numel * sizeof *mean);
    memcpy(m->bn_var->value->data, var, (size_t)m->bn_var->value->numel * sizeof *var);
    return vae_latent_std(&m->config, m->bn_var, false, m->bn_std->value, e);
}


/* x: [B, C, H, W] -> [B, C, 2H, 2W]: nearest 2x, then the 3x3 conv */
static Var *vae_upsample_apply(Tape *t, Var **inputs, void *ctx) {
    const Conv2d *conv = ctx;
    Var *up = ag_upsample_nearest2x(t, inputs[0]);
    Var *y = conv2d_apply(t, conv, up);
    var_drop(up);
    return y;
}

/* x: [B, block_out_channels[0], H, W] -> image [B, out_channels, H, W] */
static Var *vae_head_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeDecoder *m = ctx;
    return vae_norm_silu_conv(t, &m->conv_norm_out, m->config.norm_num_groups, &m->conv_out,
                              inputs[0]);
}

/* The middle checkpoints, "layers": an optional upsampler, then a resnet or the attention,
 * then optionally the head. The upsampler joins the resnet after it, and the head the resnet
 * before it, so that neither a 2x-upsampled tensor nor the last full-resolution resnet output
 * is a boundary held across the stage. x: [B, C, H, W] -> [B, C', H', W'] */
static Var *vae_layer_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeLayer *l = ctx;
    const VaeDecoder *m = l->model;
    Var *x = inputs[0];
    if (l->upsampler) x = vae_block(t, m, VAE_UNIT, vae_upsample_apply, l->upsampler, &x, 1);
    if (l->attention) x = vae_block(t, m, VAE_UNIT, vae_attention_apply, l->attention, &x, 1);
    if (l->resnet) {
        const VaeResnet *r = l->resnet;
        Var *h = vae_block(t, m, VAE_UNIT, vae_resnet_in_apply, r, &x, 1);
        Var *skip = r->conv_shortcut.weight
                        ? vae_block(t, m, VAE_UNIT, vae_shortcut_apply, r, &x, 1)
                        : x;
        x = vae_residual(t, x, skip, vae_block(t, m, VAE_UNIT, vae_resnet_mid_apply, r, &h, 1));
    }
    if (l->head) x = vae_block(t, m, VAE_UNIT, vae_head_apply, m, &x, 1);
    return x;
}

/* The outer checkpoints, "stages": the layers between two upsamplers, at one resolution. Only
 * stage outputs are held across the whole decode; during backward one stage's layer outputs
 * and one layer's unit outputs add to them. */
static Var *vae_stage_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeStage *s = ctx;
    Var *x = inputs[0];
    for (int i = 0; i < s->n_layers; i++)
        x = vae_block(t, s->layers[i].model, VAE_LAYER, vae_layer_apply, &s->layers[i], &x, 1);
    return x;
}

/* tokens: [B, h*w, C*ph*pw] -> latent [B, C, h*ph, w*pw]: the FLUX.2 pipeline's
 * de-normalisation with the VAE batch norm's running statistics, then unpatchify: packed
 * channel c*ph*pw + pi*pw + pj of token (y, x) is pixel (y*ph + pi, x*pw + pj) of channel c.
 * Tensors stop at 5 dims, so the 6-dim permute of upstream is done in two steps. */
static Var *vae_unpack(Tape *t, const VaeDecoder *m, Var *tokens, int h, int w) {
    const VaeConfig *c = &m->config;
    int64_t C = c->latent_channels, ph = c->patch_h, pw = c->patch_w;
    /* ag_mul_rows also checks the packed channel count */
    Var *x = ag_add_rows(t, ag_mul_rows(t, tokens, m->bn_std), m->bn_mean);
    if (!x) return NULL;
    int64_t B = x->value->shape[0]; /* the reshape below checks h*w against the token count */
    x = ag_reshape(t, x, 5, (int64_t[]){B * h, w, C, ph, pw});
    x = ag_permute(t, x, (int[]){0, 2, 3, 1, 4}); /* [B*h, C, ph, w, pw] */
    x = ag_reshape(t, x, 4, (int64_t[]){B, h, C, ph * w * pw});
    x = ag_permute(t, x, (int[]){0, 2, 1, 3}); /* [B, C, h, ph*w*pw] */
    return ag_reshape(t, x, 4, (int64_t[]){B, C, h * ph, w * pw});
}

/* The decoder as diffusers writes it, from conv_in's output: the mid block, the up blocks, the
 * head. Without checkpoints vae_decode runs this; the stages run the same ops in the same order.
 * x: [B, C, h, w] -> [B, out_channels, H, W] */
static Var *vae_decode_blocks(Tape *t, const VaeDecoder *m, Var *x) {
    const VaeConfig *c = &m->config;
    x = vae_resnet_forward(t, &m->mid_resnets[0], x);
    if (c->mid_block_add_attention && x) x = vae_attention_apply(t, &x, (void *)&m->mid_attention);
    x = vae_resnet_forward(t, &m->mid_resnets[1], x);
    for (int b = 0; b < c->n_blocks; b++) {
        const VaeUpBlock *u = &m->up_blocks[b];
        for (int r = 0; r <= c->layers_per_block; r++) x = vae_resnet_forward(t, &u->resnets[r], x);
        if (u->upsampler.weight) x = vae_upsample_apply(t, &x, (void *)&u->upsampler);
    }
    return vae_head_apply(t, &x, (void *)m);
}

/* tokens [B, h*w, packed] -> image [B, out_channels, H, W] (nn.h): unpack, post_quant_conv,
 * conv_in, then vae_decode_blocks; or, with checkpoints or with grad off, the same ops as
 * stages run through them: one stage per up block, the first also holding the mid block, the
 * last the head (vae_plan). */
Var *vae_decode(Tape *t, const VaeDecoder *m, Var *tokens, int h, int w) {
    const VaeConfig *c = &m->config;
    Var *x = vae_unpack(t, m, tokens, h, w);
    if (c->use_post_quant_conv) x = conv2d_apply(t, &m->post_quant_conv, x);
    x = conv2d_apply(t, &m->conv_in, x);
    if (m->checkpoint_levels == 0 && tape_grad_enabled(t)) return vae_decode_blocks(t, m, x);
    for (int s = 0; s < c->n_blocks; s++)
        x = vae_block(t, m, VAE_STAGE, vae_stage_apply, &m->stages[s], &x, 1);
    return x;
}

/* === SegFormer detector ===
 * transformers' SegformerForSemanticSegmentation (modeling_segformer.py) behind DIAMOND's
 * preprocessing; the interface and the upstream rules are in nn.h.
 *   in/out  image [B, 3, H, W] in [-1, 1] -> artifact map [B, num_labels, H, W] in [0, 1] (and
 *           the map at 1/4 of the detector's input, which the metrics read)
 *   names   segformer.encoder.patch_embeddings.i.{proj,layer_norm},
 *           segformer.encoder.block.i.j.{layer_norm_1,attention.self.{query,key,value,sr,
 *           layer_norm},attention.output.dense,layer_norm_2,mlp.{dense1,dwconv.dwconv,dense2}},
 *           segformer.encoder.layer_norm.i; decode_head.linear_c.i.proj, linear_fuse,
 *           batch_norm, classifier
 *   forward (x + 1) / 2 clamped, resized bilinearly, normalised; per stage an overlapping patch
 *           embedding (strided conv, LN), layers x += attention(LN x) with keys and values from
 *           an sr x sr strided conv, x += dense2(GELU(dwconv3x3(dense1(LN x)))), a final LN;
 *           head: each stage projected to D and resized to stage 0's size, summed (the folded
 *           linear_fuse and batch norm), ReLU, classifier; sigmoid; resized to H x W
 */

/* A bound on every size in config.json, so products of them stay far inside int. */
#define SEGFORMER_MAX_SIZE 65536

/* One Mix Transformer layer, with the hyper-parameters it needs to run alone under ag_checkpoint.
 */
typedef struct SegformerLayer {
    int heads, sr_ratio;
    bool gelu_tanh;
    NormParams norm1, norm2;
    Linear query, key, value, out;
    Conv2d sr; /* sequence reduction, with sr_norm, only when sr_ratio > 1 */
    NormParams sr_norm;
    Linear dense1, dense2;
    Conv2d dwconv;
} SegformerLayer;

typedef struct SegformerStage {
    Conv2d patch_embed;
    NormParams patch_norm;
    SegformerLayer *layers;
    int n_layers;
    NormParams norm;
    Linear head_proj; /* C -> D: this stage's path through the head up to the ReLU. Loaded, it
                       * is folded (segformer_head_fold) and stage 0's bias holds every constant;
                       * made fresh, it is the stage's linear_c, trainable (segformer_head_init) */
} SegformerStage;

/* The decode head as upstream holds it, kept beside the folded projections to compare
 * activations with transformers': each stage's linear_c, linear_fuse (a 1x1 conv over the stages
 * concatenated last stage first) and the batch norm with its running statistics. */
typedef struct SegformerHeadParts {
    Params *params;     /* the head's own tensors */
    Linear linear_c[SEGFORMER_MAX_STAGES];
    Conv2d fuse;        /* linear_fuse: [D, n D, 1, 1], no bias */
    NormParams bn;      /* gamma, beta */
    Var *mean, *var;    /* running statistics */
} SegformerHeadParts;

struct Segformer {
    SegformerConfig config;
    Params *params;
    SegformerStage stages[SEGFORMER_MAX_STAGES];
    Var *pixel_shift, *pixel_scale; /* [3]: -mean and 1 / std */
    Conv2d classifier;
    bool head_is_linear_c; /* head_proj are linear_c under an identity fuse and batch norm */
    SegformerHeadParts head; /* params NULL for a fresh (trainable) head */
    bool unfolded;           /* the forward runs head, not the folded projections */
    bool layers_on_tape;     /* the encoder layers run straight on the tape, not checkpointed */
};

/* --- config --- */

/* The per-stage integer array `key` of config.json: one positive entry per stage. */
static int segformer_stage_ints(const JsonValue *root, const char *key, int stages, int *out,
                                Error *e) {
    int64_t v[SEGFORMER_MAX_STAGES];
    size_t n;
    if (json_get_int_array(root, key, v, SEGFORMER_MAX_STAGES, &n, e)) return -1;
    if ((int)n != stages)
        return error_set(e, "%s: key '%s' has %zu entries, num_encoder_blocks is %d", root->source,
                         key, n, stages);
    for (int i = 0; i < stages; i++) {
        if (v[i] < 1 || v[i] > SEGFORMER_MAX_SIZE)
            return error_set(e, "%s: key '%s' entry %d is %lld, expected 1..%d", root->source, key,
                             i, (long long)v[i], SEGFORMER_MAX_SIZE);
        out[i] = (int)v[i];
    }
    return 0;
}

/* num_labels, or the size of id2label, which is what transformers writes instead. */
static int segformer_num_labels(const JsonValue *root, int *out, Error *e) {
    if (json_get(root, "num_labels"))
        return json_get_int_in(root, "num_labels", 1, SEGFORMER_MAX_SIZE, out, e);
    const JsonValue *labels = json_get(root, "id2label");
    if (!labels || labels->type != JSON_OBJECT || labels->count < 1)
        return error_set(e, "%s: neither 'num_labels' nor a non-empty 'id2label' is given",
                         root->source);
    *out = (int)labels->count;
    return 0;
}

static int segformer_activation(const JsonValue *root, bool *tanh_approx, Error *e) {
    const char *act;
    if (json_get_string(root, "hidden_act", &act, e)) return -1;
    *tanh_approx = strcmp(act, "gelu_new") == 0 || strcmp(act, "gelu_pytorch_tanh") == 0;
    if (!*tanh_approx && strcmp(act, "gelu") != 0)
        return error_set(e, "%s: hidden_act '%s' is not one of gelu, gelu_new, gelu_pytorch_tanh",
                         root->source, act);
    return 0;
}

/* SegformerConfig's keys that would change the network, at the values transformers' semantic
 * segmentation model takes (it requires reshape_last_stage). */
static const KeyDefault SEGFORMER_UNIMPLEMENTED[] = {
    {"reshape_last_stage", "true"},
};

/* layer_norm_eps: transformers' SegFormer builds every LayerNorm with PyTorch's default 1e-5 and
 * never reads the key, nor does diamond; a value that could not be an epsilon is still refused. */
static int segformer_layer_norm_eps(const JsonValue *root, Error *e) {
    double eps = 0.0;
    if (!json_get(root, "layer_norm_eps")) return 0;
    if (json_get_float(root, "layer_norm_eps", &eps, e)) return -1;
    if (!(eps >= 0.0 && eps < 1.0))
        return error_set(e, "%s: key 'layer_norm_eps' is %g, expected a number in [0, 1)",
                         root->source, eps);
    return 0;
}

static int segformer_model_config(SegformerConfig *c, const JsonValue *root, Error *e) {
    int channels = 3;
    if (json_require_defaults(root, SEGFORMER_UNIMPLEMENTED, COUNT(SEGFORMER_UNIMPLEMENTED), e) ||
        segformer_layer_norm_eps(root, e) ||
        json_get_int_in(root, "num_encoder_blocks", 1, SEGFORMER_MAX_STAGES, &c->stages, e) ||
        (json_get(root, "num_channels") &&
         json_get_int_in(root, "num_channels", 1, SEGFORMER_MAX_SIZE, &channels, e)) ||
        segformer_stage_ints(root, "hidden_sizes", c->stages, c->hidden_sizes, e) ||
        segformer_stage_ints(root, "depths", c->stages, c->depths, e) ||
        segformer_stage_ints(root, "num_attention_heads", c->stages, c->heads, e) ||
        segformer_stage_ints(root, "sr_ratios", c->stages, c->sr_ratios, e) ||
        segformer_stage_ints(root, "patch_sizes", c->stages, c->patch_sizes, e) ||
        segformer_stage_ints(root, "strides", c->stages, c->strides, e) ||
        segformer_stage_ints(root, "mlp_ratios", c->stages, c->mlp_ratios, e) ||
        json_get_int_in(root, "decoder_hidden_size", 1, SEGFORMER_MAX_SIZE, &c->decoder_hidden_size,
                       e) ||
        segformer_num_labels(root, &c->num_labels, e) ||
        segformer_activation(root, &c->gelu_tanh, e))
        return -1;
    if (channels != 3)
        return error_set(e, "%s: num_channels is %d, the detector takes RGB images", root->source,
                         channels);
    for (int i = 0; i < c->stages; i++)
        if (c->hidden_sizes[i] % c->heads[i])
            return error_set(e, "%s: hidden size %d of stage %d is not a multiple of its %d heads",
                             root->source, c->hidden_sizes[i], i, c->heads[i]);
    return 0;
}

/* An optional boolean, true when absent (the image processor's defaults). */
static int segformer_flag(const JsonValue *root, const char *key, bool *out, Error *e) {
    *out = true;
    return json_get(root, key) ? json_get_bool(root, key, out, e) : 0;
}

/* image_mean or image_std: three numbers in [-1000, 1000], std's in [1e-6, 1000] (statistics of
 * pixels in [0, 1]; beyond that a value is a mistake, and past float's range it would turn every
 * input into infinities). */
static int segformer_rgb(const JsonValue *root, const char *key, bool is_std, float *out,
                         Error *e) {
    const JsonValue *v = json_get(root, key);
    double lo = is_std ? 1e-6 : -1e3, hi = 1e3;
    if (!v || v->type != JSON_ARRAY || v->count != 3)
        return error_set(e, "%s: key '%s' must be an array of 3 numbers", root->source, key);
    for (int i = 0; i < 3; i++) {
        const JsonValue *item = &v->items[i];
        if (item->type != JSON_NUMBER || !(item->number >= lo && item->number <= hi))
            return error_set(e, "%s: key '%s' entry %d must be a number in [%g, %g]",
                             root->source, key, i, lo, hi);
        out[i] = (float)item->number;
    }
    return 0;
}

/* size: {"height": h, "width": w}, or one number for a square (older feature extractors). */
static int segformer_input_size(SegformerConfig *c, const JsonValue *root, Error *e) {
    const JsonValue *size = json_get(root, "size");
    if (size && size->type == JSON_NUMBER) {
        if (json_get_int_in(root, "size", 1, IMAGE_MAX_SIDE, &c->input_h, e)) return -1;
        c->input_w = c->input_h;
        return 0;
    }
    if (!size || size->type != JSON_OBJECT)
        return error_set(e, "%s: key 'size' must be {\"height\": h, \"width\": w} or a number",
                         root->source);
    if (json_get_int_in(size, "height", 1, IMAGE_MAX_SIDE, &c->input_h, e) ||
        json_get_int_in(size, "width", 1, IMAGE_MAX_SIDE, &c->input_w, e))
        return -1;
    return 0;
}

/* SegformerImageProcessor's keys that diamond does not read, at the values it implements: pixels
 * scaled from 0..255 to [0, 1], and the bilinear resize of DIAMOND's official code (PIL's
 * resample 2). */
static const KeyDefault SEGFORMER_PREPROCESSOR_UNIMPLEMENTED[] = {
    {"do_rescale", "true"},
    {"rescale_factor", "0.00392156862745098"},
    {"resample", "2"},
};

static int segformer_preprocessor_config(SegformerConfig *c, const JsonValue *root, Error *e) {
    if (json_require_defaults(root, SEGFORMER_PREPROCESSOR_UNIMPLEMENTED,
                              COUNT(SEGFORMER_PREPROCESSOR_UNIMPLEMENTED), e) ||
        segformer_flag(root, "do_resize", &c->do_resize, e) ||
        segformer_flag(root, "do_normalize", &c->do_normalize, e) ||
        (c->do_resize && segformer_input_size(c, root, e)) ||
        (c->do_normalize && (segformer_rgb(root, "image_mean", false, c->mean, e) ||
                             segformer_rgb(root, "image_std", true, c->std, e))))
        return -1;
    return 0;
}

/* Parses <dir>/<file> and hands its root object to parse. */
static int segformer_json(SegformerConfig *c, const char *dir, const char *file,
                          int (*parse)(SegformerConfig *, const JsonValue *, Error *), Error *e) {
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, file, e)) return -1;
    JsonDoc *doc;
    if (json_parse_file(&doc, path, e)) return -1;
    const JsonValue *root = json_root(doc);
    int rc = root->type == JSON_OBJECT ? parse(c, root, e)
                                       : error_set(e, "%s: expected a JSON object", path);
    json_free(doc);
    return rc;
}

int segformer_config_load(SegformerConfig *c, const char *dir, Error *e) {
    *c = (SegformerConfig){0};
    if (segformer_json(c, dir, "config.json", segformer_model_config, e) ||
        segformer_json(c, dir, "preprocessor_config.json", segformer_preprocessor_config, e))
        return -1;
    return 0;
}

/* --- weights --- */

/* printf into buf (always large enough for the upstream names), for the *_load prefixes. */
static const char *segformer_name(char *buf, size_t len, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static const char *segformer_name(char *buf, size_t len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
    return buf;
}

static int segformer_layer_load(SegformerLayer *l, Params *m, const SegformerConfig *c,
                                int i, int j, Error *e) {
    int C = c->hidden_sizes[i], inner = C * c->mlp_ratios[i], r = c->sr_ratios[i];
    *l = (SegformerLayer){.heads = c->heads[i], .sr_ratio = r, .gelu_tanh = c->gelu_tanh};
    char p[128], n[160];
    segformer_name(p, sizeof p, "segformer.encoder.block.%d.%d", i, j);
#define NAME(suffix) segformer_name(n, sizeof n, "%s." suffix, p)
    int rc = norm_load(&l->norm1, m, C, true, NAME("layer_norm_1"), e) ||
             linear_load(&l->query, m, C, C, true, NAME("attention.self.query"), e) ||
             linear_load(&l->key, m, C, C, true, NAME("attention.self.key"), e) ||
             linear_load(&l->value, m, C, C, true, NAME("attention.self.value"), e) ||
             (r > 1 &&
              (conv2d_load(&l->sr, m, C, C, r, r, 0, 1, true, NAME("attention.self.sr"), e) ||
               norm_load(&l->sr_norm, m, C, true, NAME("attention.self.layer_norm"), e))) ||
             linear_load(&l->out, m, C, C, true, NAME("attention.output.dense"), e) ||
             norm_load(&l->norm2, m, C, true, NAME("layer_norm_2"), e) ||
             linear_load(&l->dense1, m, C, inner, true, NAME("mlp.dense1"), e) ||
             conv2d_load(&l->dwconv, m, inner, inner, 3, 1, 1, inner, true,
                         NAME("mlp.dwconv.dwconv"), e) ||
             linear_load(&l->dense2, m, inner, C, true, NAME("mlp.dense2"), e);
#undef NAME
    return rc ? -1 : 0;
}

static int segformer_stage_load(SegformerStage *s, Params *m, const SegformerConfig *c,
                                int i, Error *e) {
    int C = c->hidden_sizes[i], in = i == 0 ? 3 : c->hidden_sizes[i - 1], k = c->patch_sizes[i];
    char n[128];
    if (conv2d_load(&s->patch_embed, m, in, C, k, c->strides[i], k / 2, 1, true,
                    segformer_name(n, sizeof n, "segformer.encoder.patch_embeddings.%d.proj", i),
                    e) ||
        norm_load(
            &s->patch_norm, m, C, true,
            segformer_name(n, sizeof n, "segformer.encoder.patch_embeddings.%d.layer_norm", i),
            e) ||
        norm_load(&s->norm, m, C, true,
                  segformer_name(n, sizeof n, "segformer.encoder.layer_norm.%d", i), e))
        return -1;
    s->layers = calloc((size_t)c->depths[i], sizeof *s->layers);
    if (!s->layers) return error_set(e, "out of memory loading stage %d of the detector", i);
    s->n_layers = c->depths[i];
    for (int j = 0; j < s->n_layers; j++)
        if (segformer_layer_load(&s->layers[j], m, c, i, j, e)) return -1;
    return 0;
}

/* An execution strategy (segformer_set_head_unfolded switches it off, to run the head as
 * upstream writes it; MiT-b5 at 512x512, forward + backward to the image, 2 threads: 10.7 s and
 * a tape peak of 686 MiB folded, 13.4 s and 974 MiB unfolded).
 * The decode head up to its ReLU is linear, so it is folded into one projection per stage:
 *     BN(fuse(concat_i(up(P_i x_i + b_i))))
 *         = sum_i up(S W_i P_i x_i) + S (sum_i W_i b_i - mean) + beta
 * with P_i, b_i the stage's linear_c, W_i its [D, D] block of linear_fuse (the concat puts the
 * last stage first), S = diag(gamma / sqrt(var + eps)) and mean, beta the batch norm's. It holds
 * because a 1x1 conv mixes channels while bilinear resizing mixes positions with weights summing
 * to 1 (constants pass through). The 4D -> D conv at 1/4 of the input, the head's largest cost in
 * time and memory, becomes a C_i -> D 1x1 conv at each stage's own resolution. */
/* stages[i].head_proj weight = S W_i P_i, with W_i stage i's columns of linear_fuse (the stages
 * come last first), P_i its linear_c and S the batch norm's scale; bias_sum += W_i b_i. */
static int segformer_fold_stage(Segformer *s, int i, const float *scale, double *bias_sum,
                                Error *e) {
    const SegformerConfig *c = &s->config;
    const SegformerHeadParts *h = &s->head;
    int D = c->decoder_hidden_size, C = c->hidden_sizes[i], n = c->stages;
    const float *W = h->fuse.weight->value->data + (size_t)(n - 1 - i) * D;
    const float *P = h->linear_c[i].weight->value->data, *b = h->linear_c[i].bias->value->data;
    Tensor *proj = TENSOR_NEW(D, C);
    if (!proj) return error_set(e, "out of memory folding the decode head");
    gemm(false, false, D, C, D, 1.0f, W, n * D, P, C, 0.0f, proj->data, C);
    for (int o = 0; o < D; o++) {
        for (int k = 0; k < C; k++) proj->data[(size_t)o * C + k] *= scale[o];
        for (int k = 0; k < D; k++) bias_sum[o] += (double)W[(size_t)o * n * D + k] * b[k];
    }
    s->stages[i].head_proj = (Linear){0};
    return (s->stages[i].head_proj.weight = params_constant(s->params, proj, e)) ? 0 : -1;
}

/* The head's upstream tensors into s->head (names and shapes checked). */
static int segformer_head_parts_load(Segformer *s, Error *e) {
    const SegformerConfig *c = &s->config;
    SegformerHeadParts *h = &s->head;
    int D = c->decoder_hidden_size;
    for (int i = 0; i < c->stages; i++) {
        char name[64];
        snprintf(name, sizeof name, "decode_head.linear_c.%d.proj", i);
        if (linear_load(&h->linear_c[i], h->params, c->hidden_sizes[i], D, true, name, e))
            return -1;
    }
    if (conv2d_load(&h->fuse, h->params, c->stages * D, D, 1, 1, 0, 1, false,
                    "decode_head.linear_fuse", e) ||
        norm_load(&h->bn, h->params, D, true, "decode_head.batch_norm", e) ||
        !(h->mean = params_load_buffer(h->params, e, SHAPE(D),
                                       "decode_head.batch_norm.running_mean")) ||
        !(h->var = params_load_buffer(h->params, e, SHAPE(D),
                                      "decode_head.batch_norm.running_var")))
        return -1;
    return 0;
}

/* The folded projections from s->head: linear_c, linear_fuse and the batch norm as one linear
 * map per stage and one bias (on stage 0's), summed where upstream concatenates. */
static int segformer_head_fold(Segformer *s, Error *e) {
    const SegformerConfig *c = &s->config;
    const SegformerHeadParts *h = &s->head;
    int D = c->decoder_hidden_size;
    float *scale = malloc((size_t)D * sizeof *scale);
    double *bias_sum = calloc((size_t)D, sizeof *bias_sum);
    Tensor *bias = TENSOR_NEW(D);
    int rc = scale && bias_sum && bias ? 0 : error_set(e, "out of memory folding the decode head");
    if (rc == 0) {
        for (int o = 0; o < D; o++)
            scale[o] = h->bn.weight->value->data[o] /
                       sqrtf(h->var->value->data[o] + SEGFORMER_NORM_EPS);
    }
    for (int i = 0; i < c->stages; i++) {
        if (rc) break;
        rc = segformer_fold_stage(s, i, scale, bias_sum, e);
    }
    if (rc == 0) {
        for (int o = 0; o < D; o++)
            bias->data[o] = (float)(h->bn.bias->value->data[o] +
                                    scale[o] * (bias_sum[o] - h->mean->value->data[o]));
        rc = (s->stages[0].head_proj.bias = params_constant(s->params, bias, e)) ? 0 : -1;
    } else {
        tensor_free(bias);
    }
    free(scale);
    free(bias_sum);
    return rc;
}

/* A fresh head to train: each stage's linear_c as its projection, the fuse and the batch norm
 * left out as the identity (segformer_save writes them so). Every set of folded projections is
 * such a head, so training these is training the upstream head with its batch norm frozen. */
static int segformer_head_init(Segformer *s, Error *e) {
    const SegformerConfig *c = &s->config;
    for (int i = 0; i < c->stages; i++) {
        char name[64];
        snprintf(name, sizeof name, "decode_head.linear_c.%d.proj", i);
        if (linear_load(&s->stages[i].head_proj, s->params, c->hidden_sizes[i],
                        c->decoder_hidden_size, true, name, e))
            return -1;
    }
    s->head_is_linear_c = true;
    return 0;
}

static int segformer_head_fold_load(Segformer *s, const StModel *m, Error *e) {
    if (!(s->head.params = params_new(m))) return error_set(e, "out of memory");
    return segformer_head_parts_load(s, e) || segformer_head_fold(s, e) ? -1 : 0;
}

static int segformer_head_load(Segformer *s, const StModel *m, WeightSource source, Error *e) {
    if ((source == WEIGHTS_FRESH ? segformer_head_init(s, e)
                                 : segformer_head_fold_load(s, m, e)) ||
        conv2d_load(&s->classifier, s->params, s->config.decoder_hidden_size,
                    s->config.num_labels, 1, 1, 0, 1, true, "decode_head.classifier", e))
        return -1;
    return 0;
}

/* (x - mean) / std as (x + shift) * scale, per channel. */
static int segformer_pixel_load(Segformer *s, Error *e) {
    Tensor *shift = TENSOR_NEW(3), *scale = TENSOR_NEW(3);
    if (shift && scale) {
        for (int c = 0; c < 3; c++) {
            shift->data[c] = -s->config.mean[c];
            scale->data[c] = 1.0f / s->config.std[c];
        }
    }
    s->pixel_shift = params_constant(s->params, shift, e);
    s->pixel_scale = params_constant(s->params, scale, e);
    return s->pixel_shift && s->pixel_scale ? 0 : -1;
}

void segformer_free(Segformer *m) {
    if (!m) return;
    for (int i = 0; i < SEGFORMER_MAX_STAGES; i++) free(m->stages[i].layers);
    params_free(m->head.params);
    params_free(m->params);
    free(m);
}

int segformer_set_head_unfolded(Segformer *m, bool unfolded, Error *e) {
    if (unfolded && !m->head.params)
        return error_set(e, "segformer: a fresh head has no upstream parts to unfold");
    m->unfolded = unfolded;
    return 0;
}

void segformer_set_layer_checkpoints(Segformer *m, bool checkpoint) {
    m->layers_on_tape = !checkpoint;
}

bool segformer_head_is_trainable(const Segformer *m) { return m->head_is_linear_c; }

Params *segformer_params(const Segformer *m) {
    return m->params;
}

/* The detector dir's config describes, with its weights from source. */
int segformer_open(Segformer **out, const char *dir, WeightSource source, uint64_t seed,
                          Error *e) {
    *out = NULL;
    Segformer *s = calloc(1, sizeof *s);
    if (!s) return error_set(e, "out of memory loading the detector %s", dir);
    StModel *m = NULL;
    int rc = segformer_config_load(&s->config, dir, e) ||
             params_open(&s->params, &m, dir, source, seed, e) || segformer_pixel_load(s, e);
    for (int i = 0; i < s->config.stages; i++) {
        if (rc) break;
        rc = segformer_stage_load(&s->stages[i], s->params, &s->config, i, e);
    }
    if (!rc) rc = segformer_head_load(s, m, source, e);
    /* the folding read the decode head's linear parts (their shapes checked there) */
    static const char *const folded[] = {"decode_head.linear_c.", "decode_head.linear_fuse.",
                                         "decode_head.batch_norm.", NULL};
    if (!rc) rc = weights_all_read(source, m, params_reads, s->params, folded, dir, e);
    st_model_close(m);
    if (rc) {
        segformer_free(s);
        return -1;
    }
    *out = s;
    return 0;
}

const SegformerConfig *segformer_config(const Segformer *m) { return &m->config; }

/* --- forward --- */

/* x: [B, C, h, w] -> [B, h, w, C]: the token sequence in row-major order, channels last */
static Var *segformer_tokens(Tape *t, Var *x) { return ag_permute(t, x, (int[]){0, 2, 3, 1}); }
/* x: [B, h, w, C] -> [B, C, h, w] */
static Var *segformer_image(Tape *t, Var *x) { return ag_permute(t, x, (int[]){0, 3, 1, 2}); }

static Var *segformer_layernorm(Tape *t, const NormParams *n, Var *x) {
    return ag_layernorm(t, x, n->weight, n->bias, SEGFORMER_NORM_EPS);
}

/* x: [.., h, w] -> [.., out_h, out_w]; to the same size it is the identity, as in PyTorch. */
static Var *segformer_resize(Tape *t, Var *x, int64_t out_h, int64_t out_w) {
    const Tensor *v = x ? x->value : NULL;
    if (v && v->ndim >= 2 && v->shape[v->ndim - 2] == out_h && v->shape[v->ndim - 1] == out_w)
        return x;
    return ag_resize_bilinear(t, x, (int)out_h, (int)out_w);
}

/* Efficient self-attention: keys and values come from the tokens reduced by an sr x sr conv.
 * x: [B, h, w, C] -> [B, h, w, C] */
static Var *segformer_attention(Tape *t, const SegformerLayer *l, Var *x) {
    if (!x) return NULL;
    int64_t B = x->value->shape[0], h = x->value->shape[1], w = x->value->shape[2];
    int64_t C = x->value->shape[3], D = C / l->heads;
    Var *q = ag_reshape(t, linear_apply(t, &l->query, x), 4, (int64_t[]){B, h * w, l->heads, D});
    Var *kv = x;
    if (l->sr_ratio > 1)
        kv = segformer_layernorm(
            t, &l->sr_norm, segformer_tokens(t, conv2d_apply(t, &l->sr, segformer_image(t, x))));
    if (!kv) return NULL;
    int64_t n_kv = kv->value->shape[1] * kv->value->shape[2];
    Var *k = ag_reshape(t, linear_apply(t, &l->key, kv), 4, (int64_t[]){B, n_kv, l->heads, D});
    Var *v = ag_reshape(t, linear_apply(t, &l->value, kv), 4, (int64_t[]){B, n_kv, l->heads, D});
    Var *y = ag_attention(t, q, k, v, 1.0f / sqrtf((float)D), false, NULL);
    return linear_apply(t, &l->out, ag_reshape(t, y, 4, (int64_t[]){B, h, w, C}));
}

/* Mix-FFN: dense1, 3x3 depthwise conv over the token image, GELU, dense2.
 * x: [B, h, w, C] -> [B, h, w, C] */
static Var *segformer_mix_ffn(Tape *t, const SegformerLayer *l, Var *x) {
    Var *y = conv2d_apply(t, &l->dwconv, segformer_image(t, linear_apply(t, &l->dense1, x)));
    return linear_apply(t, &l->dense2, segformer_tokens(t, ag_gelu(t, y, l->gelu_tanh)));
}

/* One layer, pre-norm: x + attn(LN1 x), then + MixFFN(LN2 .). A CheckpointFn: ctx is the layer.
 * inputs[0]: [B, h, w, C] -> [B, h, w, C] */
static Var *segformer_layer(Tape *t, Var **inputs, void *ctx) {
    const SegformerLayer *l = ctx;
    Var *x = inputs[0];
    x = ag_add(t, x, segformer_attention(t, l, segformer_layernorm(t, &l->norm1, x)));
    return ag_add(t, x, segformer_mix_ffn(t, l, segformer_layernorm(t, &l->norm2, x)));
}

/* Overlapping patch embedding, the layers (each under ag_checkpoint, recomputed in backward,
 * unless m runs them on the tape), the stage norm.
 * x: [B, Cin, H, W] -> [B, h, w, C] */
static Var *segformer_stage(Tape *t, const Segformer *m, int stage, Var *x) {
    const SegformerStage *s = &m->stages[stage];
    x = segformer_layernorm(t, &s->patch_norm,
                            segformer_tokens(t, conv2d_apply(t, &s->patch_embed, x)));
    for (int j = 0; j < s->n_layers; j++) {
        if (m->layers_on_tape) x = segformer_layer(t, &x, &s->layers[j]);
        else x = ag_checkpoint(t, segformer_layer, &s->layers[j], &x, 1);
    }
    return segformer_layernorm(t, &s->norm, x);
}

/* The all-MLP head as upstream runs it: each stage's linear_c, resized to stage 0's size, the
 * stages concatenated last first, linear_fuse, the batch norm, ReLU, classifier.
 * tokens[i]: [B, h_i, w_i, C_i] -> logits: [B, L, h_0, w_0] */
static Var *segformer_head_unfolded(Tape *t, const Segformer *m, Var **tokens) {
    const SegformerHeadParts *h = &m->head;
    int n = m->config.stages;
    int64_t rows = tokens[0]->value->shape[1], cols = tokens[0]->value->shape[2];
    Var *stages[SEGFORMER_MAX_STAGES];
    for (int i = 0; i < n; i++)
        stages[n - 1 - i] = segformer_resize(
            t, segformer_image(t, linear_apply(t, &h->linear_c[i], tokens[i])), rows, cols);
    Var *x = conv2d_apply(t, &h->fuse, ag_concat(t, stages, n, 1));
    x = ag_batchnorm_eval(t, x, h->mean, h->var, h->bn.weight, h->bn.bias, SEGFORMER_NORM_EPS);
    return conv2d_apply(t, &m->classifier, ag_relu(t, x));
}

/* The all-MLP head as folded (segformer_head_fold) or fresh (segformer_head_init): each stage
 * projected to D channels and resized to stage 0's size, summed, ReLU, classifier.
 * tokens[i]: [B, h_i, w_i, C_i] -> logits: [B, L, h_0, w_0] */
static Var *segformer_head(Tape *t, const Segformer *m, Var **tokens) {
    if (!tokens[0]) return NULL;
    if (m->unfolded) return segformer_head_unfolded(t, m, tokens);
    int64_t h = tokens[0]->value->shape[1], w = tokens[0]->value->shape[2];
    Var *sum = NULL;
    for (int i = 0; i < m->config.stages; i++) {
        Var *y = segformer_image(t, linear_apply(t, &m->stages[i].head_proj, tokens[i]));
        y = segformer_resize(t, y, h, w);
        sum = sum ? ag_add(t, sum, y) : y;
    }
    return conv2d_apply(t, &m->classifier, ag_relu(t, sum));
}

/* DIAMOND's preprocessing: [-1, 1] -> [0, 1] (clamped), resized, normalised per channel.
 * image: [B, 3, H, W] -> [B, 3, h, w] */
static Var *segformer_preprocess(Tape *t, const Segformer *m, Var *image) {
    const SegformerConfig *c = &m->config;
    Var *x = ag_clamp(t, ag_affine(t, image, 0.5f, 0.5f), 0.0f, 1.0f);
    if (c->do_resize) x = segformer_resize(t, x, c->input_h, c->input_w);
    if (c->do_normalize)
        x = ag_mul_channels(t, ag_add_channels(t, x, m->pixel_shift), m->pixel_scale);
    return x;
}

Var *segformer_forward_logits(Tape *t, const Segformer *m, Var *image) {
    Var *x = segformer_preprocess(t, m, image);
    Var *tokens[SEGFORMER_MAX_STAGES] = {0}; /* each stage's output; as an image the next's input */
    for (int i = 0; i < m->config.stages; i++)
        x = segformer_image(t, tokens[i] = segformer_stage(t, m, i, x));
    return segformer_head(t, m, tokens);
}

/* image [B, 3, H, W] in [-1, 1] -> the artifact map [B, labels, H, W] (nn.h): the sigmoid of the
 * logits at 1/4 of the detector's input, resized to the image. */
Var *segformer_forward(Tape *t, const Segformer *m, Var *image, Var **mask_small) {
    if (mask_small) *mask_small = NULL;
    Var *small = ag_sigmoid(t, segformer_forward_logits(t, m, image));
    /* the patch embedding's conv has accepted image, so it is [B, 3, H, W] from here on */
    if (!small) return NULL;
    if (mask_small) *mask_small = small;
    return segformer_resize(t, small, image->value->shape[2], image->value->shape[3]);
}

/* The tape's peak, in floats, over stage i's part of a forward and backward with grad: the saved
 * input of each layer and the stage's own tensors (patch embedding, norms, permutes), and into
 * *layer the largest layer that backward recomputes: ~4 tensors of its width and 4 of the
 * Mix-FFN's, with their gradients. rows, cols: the stage's input size, replaced by its output
 * size. Measured against the peak of MiT-b5 at 512x512: 1.04x. */
static double segformer_stage_floats(const SegformerConfig *c, int i, int64_t *rows,
                                     int64_t *cols, double *layer) {
    int64_t k = c->patch_sizes[i], s = c->strides[i];
    *rows = (*rows + 2 * (k / 2) - k) / s + 1;
    *cols = (*cols + 2 * (k / 2) - k) / s + 1;
    double n = (double)*rows * (double)*cols, C = c->hidden_sizes[i];
    double one = 2.0 * n * C * (SEGFORMER_LAYER_TENSORS + 4.0 * c->mlp_ratios[i]);
    if (one > *layer) *layer = one;
    return (c->depths[i] + SEGFORMER_STAGE_TENSORS) * n * C;
}

size_t segformer_forward_bytes(const Segformer *m, int batch, int height, int width) {
    const SegformerConfig *c = &m->config;
    int64_t rows = c->do_resize ? c->input_h : height, cols = c->do_resize ? c->input_w : width;
    double input = SEGFORMER_IMAGE_TENSORS * 3.0 * ((double)height * width + (double)rows * cols);
    double stages = 0.0, layer = 0.0, head = 0.0, n0 = 0.0;
    for (int i = 0; i < c->stages; i++) {
        stages += segformer_stage_floats(c, i, &rows, &cols, &layer);
        if (i == 0) n0 = (double)rows * (double)cols;
        /* its projection to D and that as an image, then resized to stage 0's size */
        head += 2.0 * (double)rows * cols * c->decoder_hidden_size + n0 * c->decoder_hidden_size;
    }
    /* the sum, ReLU, logits and sigmoid at stage 0's size; the mask resized to the image's */
    head += n0 * (2.0 * c->decoder_hidden_size + 2.0 * c->num_labels) +
            (double)c->num_labels * height * width;
    double bytes = sizeof(float) * (double)batch * (input + stages + layer + head);
    return bytes >= (double)SIZE_MAX ? SIZE_MAX : (size_t)bytes;
}

/* === the DIAMOND sampler ===
 * DIAMOND (arXiv 2602.00883) on FLUX.2's flow-matching Euler sampler, as the official code runs
 * it. Step i at noise level sigma_i (sampler_step), each sample b of the batch on its own:
 *   v       = transformer(x_t, sigma_i, prompt)         with --cfg: v_neg + s (v - v_neg)
 *   x0      = x_t - sigma_i v                           the clean estimate
 *   m       = detector(vae_decode(x0))                  the artifact map
 *   g       = dL(m) / dx0                               L: the artifact loss (power, mse, focal)
 *   x_{t+1} = x_t + (sigma_{i+1} - sigma_i) v - lambda_i g / (||g|| + 1e-6)
 * lambda_i comes from the schedule; a step with lambda_i = 0 runs no detector (unless asked to
 * look), and --gate T skips the shift of a sample whose map stays below T. Below: lambda_i and
 * L, the sigmas, the parts of a step, sampler_step and sampler_run; the parsing of the
 * schedule and loss specs comes last. */

/* g / (||g|| + eps), as the official guidance.grad_norm_eps */
#define SAMPLER_GRAD_NORM_EPS 1e-6
/* the focal loss's log(1 - m + eps) */
#define SAMPLER_FOCAL_EPS 1e-6f

/* i / (N - 1), and 0 when N = 1 (where the official code divides by zero). */
static double lambda_progress(int i, int span) {
    return span > 1 ? (double)i / (double)(span - 1) : 0.0;
}

double lambda_schedule_at(const LambdaSchedule *s, int i, int steps) {
    double u = lambda_progress(i, steps);
    switch (s->type) {
    case LAMBDA_CONSTANT: return s->value;
    case LAMBDA_LINEAR: return s->start * (1.0 - u) + s->end * u;
    case LAMBDA_POWER: return s->end + (s->start - s->end) * pow(1.0 - u, s->power);
    case LAMBDA_COSINE: return s->end + (s->start - s->end) * 0.5 * (1.0 + cos(M_PI * u));
    case LAMBDA_HARD_THEN_EXP: {
        if (i == 0) return s->start;
        double t = (double)(i - 1) / (double)(steps - 2 > 1 ? steps - 2 : 1);
        return s->after * pow(1.0 - t, s->power);
    }
    case LAMBDA_EXPONENTIAL: {
        if (i < s->warmup || i >= steps - s->cooldown) return 0.0;
        u = lambda_progress(i - s->warmup, steps - s->warmup - s->cooldown);
        return s->end + (s->start - s->end) * pow(1.0 - u, s->power);
    }
    }
    return 0.0;
}

/* mask: [B, ..] -> [1]: B times the mean over everything, that is the sum of per-sample means
 * (every sample has the same pixel count). */
Var *artifact_loss_apply(Tape *t, const ArtifactLoss *l, Var *mask) {
    if (!mask) return NULL; /* the op that failed has recorded why in t */
    float batch = (float)mask->value->shape[0];
    Var *m = ag_clamp(t, mask, 0.0f, 1.0f), *per_pixel;
    switch (l->type) {
    case ARTIFACT_LOSS_MSE: per_pixel = ag_pow(t, m, 2.0f); break;
    case ARTIFACT_LOSS_POWER: per_pixel = ag_pow(t, m, (float)l->gamma); break;
    default: {
        Var *one_minus = ag_affine(t, m, -1.0f, 1.0f);
        Var *log_term = ag_log(t, ag_affine(t, one_minus, 1.0f, SAMPLER_FOCAL_EPS));
        per_pixel = ag_scale(t, ag_mul(t, ag_pow(t, one_minus, (float)l->gamma), log_term),
                             (float)-l->alpha);
    }
    }
    return ag_scale(t, ag_mean(t, per_pixel), batch);
}

double flux2_empirical_mu(int image_seq_len, int steps) {
    const double a1 = 8.73809524e-05, b1 = 1.89833333, a2 = 0.00016927, b2 = 0.45666666;
    double seq = image_seq_len;
    if (image_seq_len > 4300) return a2 * seq + b2;
    double m200 = a2 * seq + b2, m10 = a1 * seq + b1;
    double a = (m200 - m10) / 190.0, b = m200 - 200.0 * a;
    return a * steps + b;
}

void flux2_sigmas(int steps, int image_seq_len, float *sigmas) {
    flux2_sigmas_shifted(steps, flux2_empirical_mu(image_seq_len, steps), sigmas);
}

void flux2_sigmas_shifted(int steps, double mu, float *sigmas) {
    double shift = exp(mu);
    double delta = steps > 1 ? (1.0 / steps - 1.0) / (steps - 1) : 0.0;
    for (int i = 0; i < steps; i++) {
        double s = i == steps - 1 ? 1.0 / steps : 1.0 + i * delta; /* numpy's linspace */
        sigmas[i] = (float)(shift / (shift + (1.0 / s - 1.0)));
    }
    sigmas[steps] = 0.0f;
}

/* Everything a run's steps share. */
typedef struct SamplerRun {
    const Flux2 *flow;
    const VaeDecoder *vae;
    const Segformer *detector;
    const SamplerOptions *o;
    const Tensor *txt, *negative;
    int h, w;
    float *sigmas;            /* [steps + 1] */
    float *sigma_b, *guide_b; /* [B] the step's sigma and the guidance scale per sample */
    bool *shifted;            /* [B] */
    SamplerStepFn on_step;
    void *ctx;
} SamplerRun;

/* The detector pass on the clean estimate: mask = detector(vae_decode(x0)), and unless every
 * sample is gated, g = dL/dx0. x0: [B, T, C] -> *mask: [B, L, H, W], *grad: [B, T, C] or NULL
 * (no backward ran); r->shifted[b] says whether sample b passed the gate. */
static int sampler_guidance(const SamplerRun *r, Tensor *x0, Tensor **mask, Tensor **grad,
                            Error *e) {
    *mask = *grad = NULL;
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory for the guidance tape");
    Var *x = var_new(t, x0, true), *small = NULL;
    Var *m = segformer_forward(t, r->detector, vae_decode(t, r->vae, x, r->h, r->w), &small);
    Var *loss = artifact_loss_apply(t, &r->o->loss, m);
    int rc = tape_check(t, e);
    if (rc == 0 && !(*mask = tensor_clone(m->value))) rc = error_set(e, "out of memory");
    int64_t B = x0->shape[0];
    bool any = false;
    for (int64_t b = 0; b < B; b++) {
        if (rc) break;
        size_t per = (size_t)(small->value->numel / B);
        float gate = r->o->gate;
        r->shifted[b] = !(gate > 0.0f) || max_array(per, small->value->data + b * per) >= gate;
        any |= r->shifted[b];
    }
    if (rc == 0 && any) {
        rc = tape_backward(t, loss, e);
        if (rc == 0 && !(*grad = x->grad ? tensor_clone(x->grad) : TENSOR_NEW(B, x0->shape[1],
                                                                               x0->shape[2])))
            rc = error_set(e, "out of memory");
        for (int64_t b = 0; b < B; b++) {
            if (rc) break;
            size_t per = (size_t)(x0->numel / B);
            if (!r->shifted[b]) memset((*grad)->data + b * per, 0, per * sizeof(float));
        }
    }
    tape_free(t);
    return rc;
}

/* x += dt v, then for each shifted sample x -= lambda g / (||g|| + eps). */
static void sampler_update(Tensor *x, const Tensor *v, float dt, float lambda, const Tensor *grad,
                           const bool *shifted) {
    axpy((size_t)x->numel, dt, v->data, x->data);
    if (!grad) return;
    int64_t B = x->shape[0];
    size_t per = (size_t)(x->numel / B);
    for (int64_t b = 0; b < B; b++) {
        if (!shifted[b]) continue;
        const float *g = grad->data + b * per;
        double norm = 0.0;
        for (size_t k = 0; k < per; k++) norm += (double)g[k] * g[k];
        float scale = (float)(-(double)lambda / (sqrt(norm) + SAMPLER_GRAD_NORM_EPS));
        axpy(per, scale, g, x->data + b * per);
    }
}

/* x0 = x_t - sigma v, as a new tensor. */
static Tensor *sampler_clean_estimate(const Tensor *x, const Tensor *v, float sigma) {
    Tensor *x0 = tensor_clone(x);
    if (x0) axpy((size_t)x0->numel, -sigma, v->data, x0->data);
    return x0;
}

static int sampler_check(const Flux2 *flow, const VaeDecoder *vae, const Segformer *detector,
                         const SamplerOptions *o, const Tensor *txt, const Tensor *negative,
                         const Tensor *latent, int h, int w, Error *e) {
    const Flux2Config *fc = flux2_config(flow);
    const VaeConfig *vc = vae_decoder_config(vae);
    int packed = vc->latent_channels * vc->patch_h * vc->patch_w;
    if (o->steps < 1) return error_set(e, "sampler: steps must be at least 1");
    if (o->guide && !detector) return error_set(e, "sampler: guidance needs a detector");
    if (latent->ndim != 3 || latent->shape[1] != (int64_t)h * w ||
        latent->shape[2] != fc->in_channels)
        return error_set(e, "sampler: latent must be [B, %d, %d] for a %dx%d token grid",
                         h * w, fc->in_channels, h, w);
    if (fc->in_channels != packed ||
        fc->patch_size * fc->patch_size * fc->out_channels != fc->in_channels)
        return error_set(e, "sampler: the flow model's %d channels do not match the VAE's %d "
                            "packed latent channels", fc->in_channels, packed);
    if (txt->ndim != 3 || txt->shape[0] != latent->shape[0] ||
        txt->shape[2] != fc->joint_attention_dim)
        return error_set(e, "sampler: prompt embeddings must be [%lld, L, %d]",
                         (long long)latent->shape[0], fc->joint_attention_dim);
    if (o->cfg_scale > 1.0f &&
        (!negative || negative->ndim != 3 || negative->shape[0] != latent->shape[0] ||
         negative->shape[2] != fc->joint_attention_dim))
        return error_set(e, "sampler: classifier-free guidance needs negative prompt embeddings "
                            "[%lld, L, %d]", (long long)latent->shape[0],
                         fc->joint_attention_dim);
    return 0;
}

/* The velocity at the step's sigma on the prompt, and with classifier-free guidance moved away
 * from the one on the negative prompt: v = v_neg + s (v - v_neg). -> *v: [B, T, C] */
static int sampler_velocity(const SamplerRun *r, const Tensor *latent, Tensor **v, Error *e) {
    if (flux2_forward(r->flow, latent, r->h, r->w, r->txt, r->sigma_b, r->guide_b, v, e))
        return -1;
    float s = r->o->cfg_scale;
    if (!(s > 1.0f)) return 0;
    Tensor *v_neg = NULL;
    if (flux2_forward(r->flow, latent, r->h, r->w, r->negative, r->sigma_b, r->guide_b, &v_neg,
                      e)) {
        tensor_free(*v);
        *v = NULL;
        return -1;
    }
    for (int64_t i = 0; i < v_neg->numel; i++)
        (*v)->data[i] = v_neg->data[i] + s * ((*v)->data[i] - v_neg->data[i]);
    tensor_free(v_neg);
    return 0;
}

/* 0 when every value of x (NULL: none) is finite, else an error naming the step and the quantity:
 * a non-finite value would otherwise run on into an all-black image, silently. */
static int sampler_finite(const Tensor *x, const char *what, int i, int steps, Error *e) {
    size_t bad = x ? first_non_finite((size_t)x->numel, x->data) : 0;
    if (!x || bad == (size_t)x->numel) return 0;
    return error_set(e, "step %d of %d: the %s holds %s at value %zu (a weight, the prompt "
                        "embeddings or the noise is not finite, or a value overflowed)",
                     i + 1, steps, what, isnan(x->data[bad]) ? "NaN" : "an infinity", bad);
}

/* One step i, the update at the top of this section:
 *   x_{t+1} = x_t + (sigma_{i+1} - sigma_i) v - lambda_i g / (||g|| + 1e-6),  g = dL(m) / dx0
 * in order: v, x0, the guidance when lambda_i != 0 (the detector also runs, without shifting,
 * when the caller inspects every step), the caller's look (on_step), the update. */
static int sampler_step(const SamplerRun *r, Tensor *latent, int i, Error *e) {
    const SamplerOptions *o = r->o;
    int64_t B = latent->shape[0];
    for (int64_t b = 0; b < B; b++) r->sigma_b[b] = r->sigmas[i], r->guide_b[b] = o->guidance_scale;
    float lambda = o->guide ? (float)lambda_schedule_at(&o->lambda, i, o->steps) : 0.0f;
    bool detect = lambda != 0.0f || (o->inspect_every_step && r->detector);
    Tensor *v = NULL, *x0 = NULL, *mask = NULL, *grad = NULL;
    memset(r->shifted, 0, (size_t)B * sizeof *r->shifted);
    int rc = sampler_velocity(r, latent, &v, e);
    if (rc == 0) rc = sampler_finite(v, "velocity v", i, o->steps, e);
    if (rc == 0 && !(x0 = sampler_clean_estimate(latent, v, r->sigmas[i])))
        rc = error_set(e, "out of memory");
    if (rc == 0) rc = sampler_finite(x0, "clean estimate x0", i, o->steps, e);
    if (rc == 0 && detect) rc = sampler_guidance(r, x0, &mask, &grad, e);
    if (rc == 0) rc = sampler_finite(mask, "detector mask", i, o->steps, e);
    if (rc == 0) rc = sampler_finite(grad, "gradient of the artifact loss", i, o->steps, e);
    if (lambda == 0.0f)
        for (int64_t b = 0; b < B; b++) r->shifted[b] = false;
    SamplerStep step = {.index = i, .steps = o->steps, .sigma = r->sigmas[i],
                        .sigma_next = r->sigmas[i + 1], .lambda = lambda, .x_t = latent, .v = v,
                        .x0 = x0, .mask = mask, .grad = grad, .shifted = r->shifted};
    if (rc == 0 && r->on_step) rc = r->on_step(&step, r->ctx, e);
    if (rc == 0)
        sampler_update(latent, v, r->sigmas[i + 1] - r->sigmas[i], lambda, grad, r->shifted);
    tensor_free(v);
    tensor_free(x0);
    tensor_free(mask);
    tensor_free(grad);
    return rc;
}

int sampler_run(const Flux2 *flow, const VaeDecoder *vae, const Segformer *detector,
                const SamplerOptions *o, const Tensor *txt, const Tensor *negative,
                Tensor *latent, int h, int w, SamplerStepFn on_step, void *ctx, Error *e) {
    if (sampler_check(flow, vae, detector, o, txt, negative, latent, h, w, e)) return -1;
    size_t B = (size_t)latent->shape[0];
    SamplerRun r = {.flow = flow, .vae = vae, .detector = detector, .o = o, .txt = txt,
                    .negative = negative, .h = h, .w = w, .on_step = on_step, .ctx = ctx};
    r.sigmas = malloc(((size_t)o->steps + 1 + 2 * B) * sizeof *r.sigmas);
    r.shifted = calloc(B, sizeof *r.shifted);
    int rc = r.sigmas && r.shifted ? 0 : error_set(e, "out of memory");
    if (rc == 0) {
        r.sigma_b = r.sigmas + o->steps + 1;
        r.guide_b = r.sigma_b + B;
        if (o->set_mu) flux2_sigmas_shifted(o->steps, o->mu, r.sigmas);
        else flux2_sigmas(o->steps, h * w, r.sigmas);
    }
    for (int i = 0; i < o->steps; i++) {
        if (rc) break;
        rc = sampler_step(&r, latent, i, e);
    }
    free(r.sigmas);
    free(r.shifted);
    return rc;
}

/* --- parsing the schedule and loss specs --- */

int lambda_schedule_parse(LambdaSchedule *s, const char *spec, Error *e) {
    static const char *const names[] = {"constant", "linear", "power", "cosine", "hard_then_exp",
                                        "exponential"};
    int type = spec_type(spec, names, 6);
    if (type < 0)
        return error_set(e, "--lambda-schedule: unknown type in '%s' (expected constant, linear, "
                            "power, cosine, hard_then_exp or exponential)", spec);
    LambdaSchedule v = {.type = (LambdaType)type, .start = 12.0, .end = 1.0, .power = 2.0};
    if (v.type == LAMBDA_HARD_THEN_EXP) v.start = 30.0, v.after = 2.0;
    if (v.type == LAMBDA_EXPONENTIAL) v.start = 30.0, v.power = 5.0;
    bool exponential = v.type == LAMBDA_EXPONENTIAL;
    double warmup = exponential ? 5 : 0, cooldown = exponential ? 12 : 0;
    const double big = 1e30;
    const SpecKey value = {.name = "value", .value = &v.value, .lo = -big, .hi = big};
    const SpecKey start = {.name = "start", .value = &v.start, .lo = -big, .hi = big};
    const SpecKey end = {.name = "end", .value = &v.end, .lo = -big, .hi = big};
    const SpecKey power = {.name = "power", .value = &v.power, .lo = 0.0, .hi = 1e6};
    const SpecKey after = {.name = "after", .value = &v.after, .lo = -big, .hi = big};
    const SpecKey steps_warmup = {.name = "warmup", .value = &warmup, .lo = 0, .hi = 1 << 20,
                                  .integer = true};
    const SpecKey steps_cooldown = {.name = "cooldown", .value = &cooldown, .lo = 0,
                                    .hi = 1 << 20, .integer = true};
    const SpecKey keys[6][5] = {
        {value},
        {start, end},
        {start, end, power},
        {start, end},
        {start, after, power},
        {start, end, power, steps_warmup, steps_cooldown},
    };
    static const int n_keys[6] = {1, 2, 3, 2, 3, 5};
    char what[64];
    snprintf(what, sizeof what, "--lambda-schedule %s", names[type]);
    if (spec_parse_keys(what, spec_keys_after_colon(spec), keys[type], n_keys[type], e))
        return -1;
    v.warmup = (int)warmup;
    v.cooldown = (int)cooldown;
    *s = v;
    return 0;
}

int artifact_loss_parse(ArtifactLoss *l, const char *spec, Error *e) {
    static const char *const names[] = {"mse", "power", "focal"};
    int type = spec_type(spec, names, 3);
    if (type < 0)
        return error_set(e, "--loss: unknown type in '%s' (expected mse, power or focal)", spec);
    ArtifactLoss v = {.type = (ArtifactLossType)type, .gamma = 2.0, .alpha = 1.0};
    /* power needs gamma > 0 for a gradient at m = 0; a negative alpha would flip the push */
    const SpecKey power_gamma = {.name = "gamma", .value = &v.gamma, .lo = 1e-6, .hi = 1e6};
    const SpecKey focal_gamma = {.name = "gamma", .value = &v.gamma, .lo = 0.0, .hi = 1e6};
    const SpecKey focal_alpha = {.name = "alpha", .value = &v.alpha, .lo = 1e-30, .hi = 1e30};
    const SpecKey keys[3][2] = {{{0}}, {power_gamma}, {focal_gamma, focal_alpha}};
    static const int n_keys[3] = {0, 1, 2};
    char what[32];
    snprintf(what, sizeof what, "--loss %s", names[type]);
    if (spec_parse_keys(what, spec_keys_after_colon(spec), keys[type], n_keys[type], e)) return -1;
    *l = v;
    return 0;
}

/* === metrics === */

int metrics_artifact_mask(const float *map, int h, int w, int H, int W, float threshold,
                          uint8_t *mask, Error *e) {
    float *up = malloc((size_t)H * W * sizeof *up);
    if (!up) return error_set(e, "out of memory for a %dx%d artifact mask", W, H);
    resize_bilinear_forward(1, h, w, H, W, map, up);
    for (size_t p = 0; p < (size_t)H * W; p++) mask[p] = up[p] >= threshold;
    free(up);
    return 0;
}

/* The share of the n map values at or above threshold. */
static double metrics_pixel_ratio(const float *map, size_t n, float threshold) {
    size_t hits = 0;
    for (size_t i = 0; i < n; i++) hits += map[i] >= threshold;
    return (double)hits / (double)n;
}

/* The absolute differences of [H, W, 3] images summed over all values and over the values of
 * masked pixels (integers: exact, in any order). A region's mean is its sum over its values,
 * with at least one value as the official clamp_min(1.0) does. */
static void metrics_mae(const uint8_t *baseline, const uint8_t *guided, const uint8_t *mask,
                        size_t pixels, ImageMetrics *out) {
    int64_t all = 0, inside = 0, masked = 0;
    for (size_t p = 0; p < pixels; p++) {
        int64_t d = 0;
        for (int c = 0; c < 3; c++) d += abs((int)guided[3 * p + c] - (int)baseline[3 * p + c]);
        all += d;
        if (mask[p]) inside += d, masked++;
    }
    int64_t values = 3 * (int64_t)pixels, in_values = 3 * masked, out_values = values - in_values;
    out->artifact_pixels = masked;
    out->mae = (double)all / (double)values;
    out->mae_a = (double)inside / (double)(in_values > 0 ? in_values : 1);
    out->mae_na = (double)(all - inside) / (double)(out_values > 0 ? out_values : 1);
}

int metrics_image(const uint8_t *baseline, const uint8_t *guided, int H, int W,
                  const float *baseline_map, const float *guided_map, int h, int w,
                  float threshold, ImageMetrics *out, Error *e) {
    size_t cells = (size_t)h * w, pixels = (size_t)H * W;
    if (h < 1 || w < 1 || H < 1 || W < 1)
        return error_set(e, "metrics: empty image %dx%d or map %dx%d", W, H, w, h);
    uint8_t *mask = malloc(pixels);
    if (!mask) return error_set(e, "out of memory for a %dx%d artifact mask", W, H);
    int rc = metrics_artifact_mask(baseline_map, h, w, H, W, threshold, mask, e);
    if (rc == 0) {
        out->baseline_max = max_array(cells, baseline_map);
        out->guided_max = max_array(cells, guided_map);
        out->baseline_artifact = out->baseline_max >= threshold;
        out->guided_artifact = out->guided_max >= threshold;
        out->baseline_pixel_ratio = metrics_pixel_ratio(baseline_map, cells, threshold);
        out->guided_pixel_ratio = metrics_pixel_ratio(guided_map, cells, threshold);
        metrics_mae(baseline, guided, mask, pixels, out);
    }
    free(mask);
    return rc;
}

/* The oracle's percentages over the items it read. */
static void metrics_summarize_oracle(const ImageMetrics *items, size_t n, EvalSummary *out) {
    for (size_t i = 0; i < n; i++) {
        const ImageMetrics *m = &items[i];
        if (!m->oracle) continue;
        out->oracle_n++;
        out->baseline_oracle_artifact_freq += !m->baseline_legible;
        out->guided_oracle_artifact_freq += !m->guided_legible;
        out->baseline_oracle_read_acc += m->baseline_reads;
        out->guided_oracle_read_acc += m->guided_reads;
    }
    if (out->oracle_n == 0) return;
    double percent = 100.0 / (double)out->oracle_n;
    out->baseline_oracle_artifact_freq *= percent;
    out->guided_oracle_artifact_freq *= percent;
    out->baseline_oracle_read_acc *= percent;
    out->guided_oracle_read_acc *= percent;
}

/* The oracle's per-glyph percentages, each side over its images whose glyph count matched. */
static void metrics_summarize_glyphs(const ImageMetrics *items, size_t n, EvalSummary *out) {
    for (int k = 0; k < 2; k++) {
        int64_t legible = 0, right = 0;
        for (size_t i = 0; i < n; i++) {
            const GlyphCounts *g = &items[i].glyphs[k];
            if (!items[i].oracle || g->n == 0) continue;
            out->glyph_images[k]++;
            out->glyph_n[k] += g->n;
            legible += g->legible;
            right += g->right;
        }
        if (out->glyph_n[k] == 0) continue;
        out->glyph_legible[k] = 100.0 * (double)legible / (double)out->glyph_n[k];
        out->glyph_right[k] = 100.0 * (double)right / (double)out->glyph_n[k];
    }
}

void metrics_summarize(const ImageMetrics *items, size_t n, EvalSummary *out) {
    *out = (EvalSummary){.n = (int64_t)n};
    for (size_t i = 0; i < n; i++) {
        const ImageMetrics *m = &items[i];
        out->baseline_artifact_freq += m->baseline_artifact;
        out->guided_artifact_freq += m->guided_artifact;
        out->baseline_pixel_ratio += m->baseline_pixel_ratio;
        out->guided_pixel_ratio += m->guided_pixel_ratio;
        out->mae += m->mae;
        out->mae_a += m->mae_a;
        out->mae_na += m->mae_na;
    }
    metrics_summarize_oracle(items, n, out);
    metrics_summarize_glyphs(items, n, out);
    if (n == 0) return;
    double percent = 100.0 / (double)n, mean = 1.0 / (double)n;
    out->baseline_artifact_freq *= percent;
    out->guided_artifact_freq *= percent;
    out->baseline_pixel_ratio *= percent;
    out->guided_pixel_ratio *= percent;
    out->mae *= mean;
    out->mae_a *= mean;
    out->mae_na *= mean;
}

