/* nn.c - layers and models built from tensor.c kernels through autograd.c ops. */
#include "nn.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- parameters and basic layers -------------------------------------------------------- */

int param_load(const StModel *m, Tensor **out, Error *e, int ndim, const int64_t *shape,
               const char *name_fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, name_fmt);
    int len = vsnprintf(name, sizeof name, name_fmt, ap);
    va_end(ap);
    *out = NULL;
    if (len < 0 || (size_t)len >= sizeof name) return error_set(e, "tensor name too long: %s", name);
    const StTensor *info = st_model_find(m, name);
    if (!info) return error_set(e, "missing tensor '%s'", name);
    bool same = info->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = info->shape[i] == shape[i];
    if (!same) {
        char want[128], got[128];
        Tensor wanted = {.ndim = ndim}, found = {.ndim = info->ndim};
        for (int i = 0; i < ndim && i < TENSOR_MAX_DIMS; i++) wanted.shape[i] = shape[i];
        for (int i = 0; i < info->ndim && i < TENSOR_MAX_DIMS; i++) found.shape[i] = info->shape[i];
        if (info->ndim > TENSOR_MAX_DIMS) found.ndim = TENSOR_MAX_DIMS;
        return error_set(e, "tensor '%s' has shape %s, the config implies %s", name,
                         tensor_shape_str(&found, got, sizeof got),
                         tensor_shape_str(&wanted, want, sizeof want));
    }
    Tensor *t = tensor_new(ndim, shape);
    if (!t) return error_set(e, "out of memory loading tensor '%s'", name);
    if (st_model_read_f32(m, name, t->data, t->numel, e)) {
        tensor_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

Var *param_var(Tape *t, Tensor *p) {
    return p ? var_new(t, p, false) : NULL;
}

int linear_load(Linear *l, const StModel *m, int in, int out, bool bias, const char *prefix,
                Error *e) {
    *l = (Linear){0};
    if (param_load(m, &l->weight, e, SHAPE(out, in), "%s.weight", prefix) ||
        (bias && param_load(m, &l->bias, e, SHAPE(out), "%s.bias", prefix))) {
        linear_free(l);
        return -1;
    }
    return 0;
}

void linear_free(Linear *l) {
    tensor_free(l->weight);
    tensor_free(l->bias);
    *l = (Linear){0};
}

Var *linear_apply(Tape *t, const Linear *l, Var *x) {
    return ag_linear(t, x, param_var(t, l->weight), param_var(t, l->bias));
}

int conv2d_load(Conv2d *c, const StModel *m, int in, int out, int kernel, int stride, int padding,
                int groups, bool bias, const char *prefix, Error *e) {
    *c = (Conv2d){.stride = stride, .padding = padding, .groups = groups};
    if (groups < 1 || in % groups || out % groups)
        return error_set(e, "%s: %d -> %d channels do not split into %d groups", prefix, in, out,
                         groups);
    if (param_load(m, &c->weight, e, SHAPE(out, in / groups, kernel, kernel), "%s.weight", prefix) ||
        (bias && param_load(m, &c->bias, e, SHAPE(out), "%s.bias", prefix))) {
        conv2d_free(c);
        return -1;
    }
    return 0;
}

void conv2d_free(Conv2d *c) {
    tensor_free(c->weight);
    tensor_free(c->bias);
    c->weight = c->bias = NULL;
}

Var *conv2d_apply(Tape *t, const Conv2d *c, Var *x) {
    return ag_conv2d(t, x, param_var(t, c->weight), param_var(t, c->bias), c->stride, c->padding,
                     c->groups);
}

int norm_load(NormParams *n, const StModel *m, int channels, bool bias, const char *prefix,
              Error *e) {
    *n = (NormParams){0};
    if (param_load(m, &n->weight, e, SHAPE(channels), "%s.weight", prefix) ||
        (bias && param_load(m, &n->bias, e, SHAPE(channels), "%s.bias", prefix))) {
        norm_free(n);
        return -1;
    }
    return 0;
}

void norm_free(NormParams *n) {
    tensor_free(n->weight);
    tensor_free(n->bias);
    *n = (NormParams){0};
}

/* ---- section: flux2 ----------------------------------------------------------------------------
 * Written from diffusers' transformer_flux2.py. One call: the conditioning (timestep embedding and
 * the modulations every block shares) is computed once for the batch; then the input projections,
 * each double-stream block, each single-stream block and the output layers run in turn. Each runs
 * in parts (a block's attention inputs, then its outputs and feed-forwards) whose weights are
 * converted from the mapped files just before and freed just after, on short no-grad tapes, one
 * batch item and, for the token-wise layers, one chunk of tokens at a time. Hidden states live
 * between parts as plain tensors. Peak memory is one part's weights plus a few [tokens, dim]
 * tensors: for klein-4B about 0.38 GB of f32 weights and, at 4096 + 512 tokens, 0.5 GB of
 * activations. */


struct Flux2 {
    Flux2Config config;
    StModel *weights;
};

/* ---- config ---- */

/* A positive integer config value no larger than `max`. */
static int flux2_config_int(const JsonValue *root, const char *key, int64_t max, int *out,
                            Error *e) {
    int64_t v;
    if (json_get_int(root, key, &v, e)) return -1;
    if (v < 1 || v > max)
        return error_set(e, "%s: key '%s' is %lld, expected 1 .. %lld", root->source, key,
                         (long long)v, (long long)max);
    *out = (int)v;
    return 0;
}

/* The keys with upstream defaults: patch_size (1) and out_channels (null: in_channels). */
static int flux2_config_defaults(const JsonValue *root, Flux2Config *c, Error *e) {
    c->patch_size = 1;
    c->out_channels = c->in_channels;
    const JsonValue *out = json_get(root, "out_channels");
    return (json_get(root, "patch_size") &&
            flux2_config_int(root, "patch_size", 64, &c->patch_size, e)) ||
           (out && out->type != JSON_NULL &&
            flux2_config_int(root, "out_channels", 1 << 20, &c->out_channels, e));
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
    int status = flux2_config_int(root, "in_channels", big, &c->in_channels, e) ||
                 flux2_config_defaults(root, c, e) ||
                 flux2_config_int(root, "num_layers", 4096, &c->num_layers, e) ||
                 flux2_config_int(root, "num_single_layers", 4096, &c->num_single_layers, e) ||
                 flux2_config_int(root, "num_attention_heads", 4096, &c->heads, e) ||
                 flux2_config_int(root, "attention_head_dim", 4096, &c->head_dim, e) ||
                 flux2_config_int(root, "joint_attention_dim", big, &c->joint_attention_dim, e) ||
                 flux2_config_int(root, "timestep_guidance_channels", big, &c->timestep_channels,
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
            !(c->eps >= 0.0))
            status = error_set(e, "%s: inner dim %d, mlp_ratio %g, rope_theta %g or eps %g is out "
                               "of range", path, c->dim, mlp_ratio, c->rope_theta, c->eps);
        c->mlp_hidden = (int)hidden;
    }
    json_free(doc);
    return status;
}

/* ---- weights, converted part by part ---- */

#define FLUX2_MAX_PART_TENSORS 16

/* What flux2_weight does with each tensor a part names. */
typedef enum Flux2PartMode {
    FLUX2_CONVERT, /* read it into an f32 tensor the part owns */
    FLUX2_CHECK,   /* verify its name and shape in the files, read nothing: flux2_load */
    FLUX2_LIST,    /* add its name and shape to a list: flux2_load_config_only */
} Flux2PartMode;

/* Names (owned) and shapes. */
typedef struct Flux2SpecList {
    StTensorSpec *specs;
    size_t count, capacity;
} Flux2SpecList;

/* The tensors of one part of the model (a block's attention inputs, the conditioning, ...),
 * converted to f32 for as long as the part runs and freed together; or, in the other modes, the
 * names and shapes of those tensors, so that the load functions below define them once. */
typedef struct Flux2Part {
    const StModel *weights;
    Flux2PartMode mode;
    Flux2SpecList *list; /* FLUX2_LIST */
    int count;
    Tensor *tensors[FLUX2_MAX_PART_TENSORS];
} Flux2Part;

static void flux2_part_free(Flux2Part *p) {
    for (int i = 0; i < p->count; i++) tensor_free(p->tensors[i]);
    p->count = 0;
}

static int flux2_check_tensor(const StModel *m, const char *name, int ndim, const int64_t *shape,
                              Error *e) {
    const StTensor *info = st_model_find(m, name);
    if (!info) return error_set(e, "missing tensor '%s'", name);
    bool same = info->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = info->shape[i] == shape[i];
    if (same) return 0;
    Tensor want = {.ndim = ndim}, got = {.ndim = info->ndim < TENSOR_MAX_DIMS ? info->ndim
                                                                                : TENSOR_MAX_DIMS};
    memcpy(want.shape, shape, (size_t)ndim * sizeof *shape);
    for (int i = 0; i < got.ndim; i++) got.shape[i] = info->shape[i];
    char w[128], g[128];
    return error_set(e, "tensor '%s' has shape %s, the config implies %s", name,
                     tensor_shape_str(&got, g, sizeof g), tensor_shape_str(&want, w, sizeof w));
}

static void flux2_spec_list_free(Flux2SpecList *l) {
    for (size_t i = 0; i < l->count; i++) free((char *)l->specs[i].name);
    free(l->specs);
}

static int flux2_spec_add(Flux2SpecList *l, const char *name, int ndim, const int64_t *shape,
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

/* The tensor named by name_fmt with exactly `shape`, owned by the part (NULL when only checking
 * or listing). */
static int flux2_weight(Flux2Part *p, Tensor **out, Error *e, int ndim, const int64_t *shape,
                        const char *name_fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;
static int flux2_weight(Flux2Part *p, Tensor **out, Error *e, int ndim, const int64_t *shape,
                        const char *name_fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, name_fmt);
    int len = vsnprintf(name, sizeof name, name_fmt, ap);
    va_end(ap);
    *out = NULL;
    if (len < 0 || (size_t)len >= sizeof name)
        return error_set(e, "tensor name too long: %s", name);
    *out = NULL;
    if (p->mode == FLUX2_CHECK) return flux2_check_tensor(p->weights, name, ndim, shape, e);
    if (p->mode == FLUX2_LIST) return flux2_spec_add(p->list, name, ndim, shape, e);
    if (p->count == FLUX2_MAX_PART_TENSORS)
        return error_set(e, "more than %d tensors in one part of the model", p->count);
    if (param_load(p->weights, out, e, ndim, shape, "%s", name)) return -1;
    p->tensors[p->count++] = *out;
    return 0;
}

/* The timestep (and guidance) embedding. */
typedef struct Flux2TimeEmbed {
    Tensor *time_1, *time_2, *guidance_1, *guidance_2;
} Flux2TimeEmbed;

static int flux2_time_embed_load(Flux2TimeEmbed *w, Flux2Part *p, const Flux2Config *c,
                                 Error *e) {
    const char *time = "time_guidance_embed.timestep_embedder";
    const char *guide = "time_guidance_embed.guidance_embedder";
    int d = c->dim;
    *w = (Flux2TimeEmbed){0};
    return flux2_weight(p, &w->time_1, e, SHAPE(d, c->timestep_channels), "%s.linear_1.weight",
                        time) ||
           flux2_weight(p, &w->time_2, e, SHAPE(d, d), "%s.linear_2.weight", time) ||
           (c->guidance_embeds &&
            (flux2_weight(p, &w->guidance_1, e, SHAPE(d, c->timestep_channels),
                          "%s.linear_1.weight", guide) ||
             flux2_weight(p, &w->guidance_2, e, SHAPE(d, d), "%s.linear_2.weight", guide)));
}

/* The modulations every block shares, each made from the embedding by one linear layer; their
 * weights are converted one at a time (for klein-4B the two double-stream ones are 0.23 GB
 * each in f32). */
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

static int flux2_modulation_load(Tensor **w, Flux2Part *p, const Flux2Config *c, int k,
                                 Error *e) {
    return flux2_weight(p, w, e, SHAPE(flux2_modulations[k].chunks * c->dim, c->dim), "%s",
                        flux2_modulations[k].name);
}

typedef struct Flux2Embedders {
    Tensor *x_embedder, *context_embedder;
} Flux2Embedders;

static int flux2_embedders_load(Flux2Embedders *w, Flux2Part *p, const Flux2Config *c, Error *e) {
    *w = (Flux2Embedders){0};
    return flux2_weight(p, &w->x_embedder, e, SHAPE(c->dim, c->in_channels), "x_embedder.weight") ||
           flux2_weight(p, &w->context_embedder, e, SHAPE(c->dim, c->joint_attention_dim),
                        "context_embedder.weight");
}

static int flux2_output_load(Tensor **proj_out, Flux2Part *p, const Flux2Config *c, Error *e) {
    int out = c->patch_size * c->patch_size * c->out_channels;
    return flux2_weight(p, proj_out, e, SHAPE(out, c->dim), "proj_out.weight");
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
    Tensor *q, *k, *v, *norm_q, *norm_k;
} Flux2StreamIn;

static int flux2_stream_in_load(Flux2StreamIn *w, Flux2Part *p, const Flux2Config *c, int block,
                                int stream, Error *e) {
    const Flux2StreamNames *n = &flux2_stream_names[stream];
    const char *b = "transformer_blocks";
    int d = c->dim, hd = c->head_dim;
    *w = (Flux2StreamIn){0};
    return flux2_weight(p, &w->q, e, SHAPE(d, d), "%s.%d.%s.weight", b, block, n->q) ||
           flux2_weight(p, &w->k, e, SHAPE(d, d), "%s.%d.%s.weight", b, block, n->k) ||
           flux2_weight(p, &w->v, e, SHAPE(d, d), "%s.%d.%s.weight", b, block, n->v) ||
           flux2_weight(p, &w->norm_q, e, SHAPE(hd), "%s.%d.%s.weight", b, block, n->norm_q) ||
           flux2_weight(p, &w->norm_k, e, SHAPE(hd), "%s.%d.%s.weight", b, block, n->norm_k);
}

/* A stream's weights after it: the attention output projection and the SwiGLU feed-forward. */
typedef struct Flux2StreamOut {
    Tensor *out, *ff_in, *ff_out;
} Flux2StreamOut;

static int flux2_stream_out_load(Flux2StreamOut *w, Flux2Part *p, const Flux2Config *c, int block,
                                 int stream, Error *e) {
    const Flux2StreamNames *n = &flux2_stream_names[stream];
    const char *b = "transformer_blocks";
    int d = c->dim, mlp = c->mlp_hidden;
    *w = (Flux2StreamOut){0};
    return flux2_weight(p, &w->out, e, SHAPE(d, d), "%s.%d.%s.weight", b, block, n->out) ||
           flux2_weight(p, &w->ff_in, e, SHAPE(2 * mlp, d), "%s.%d.%s.linear_in.weight", b,
                        block, n->ff) ||
           flux2_weight(p, &w->ff_out, e, SHAPE(d, mlp), "%s.%d.%s.linear_out.weight", b, block,
                        n->ff);
}

/* A single-stream block's weights before attention: the fused projection to Q, K, V and the
 * SwiGLU's gate and up, and the per-head norms of Q and K. */
typedef struct Flux2SingleIn {
    Tensor *to_qkv_mlp, *norm_q, *norm_k;
} Flux2SingleIn;

static int flux2_single_in_load(Flux2SingleIn *w, Flux2Part *p, const Flux2Config *c, int i,
                                Error *e) {
    const char *b = "single_transformer_blocks";
    int d = c->dim, hd = c->head_dim, mlp = c->mlp_hidden;
    *w = (Flux2SingleIn){0};
    return flux2_weight(p, &w->to_qkv_mlp, e, SHAPE(3 * d + 2 * mlp, d),
                        "%s.%d.attn.to_qkv_mlp_proj.weight", b, i) ||
           flux2_weight(p, &w->norm_q, e, SHAPE(hd), "%s.%d.attn.norm_q.weight", b, i) ||
           flux2_weight(p, &w->norm_k, e, SHAPE(hd), "%s.%d.attn.norm_k.weight", b, i);
}

/* ... and after it: to_out over [attention output | SwiGLU output]. */
static int flux2_single_out_load(Tensor **to_out, Flux2Part *p, const Flux2Config *c, int i,
                                 Error *e) {
    return flux2_weight(p, to_out, e, SHAPE(c->dim, c->dim + c->mlp_hidden),
                        "single_transformer_blocks.%d.attn.to_out.weight", i);
}

/* Every tensor the config implies, by name and shape, through a part that converts nothing
 * (mode FLUX2_CHECK or FLUX2_LIST). */
static int flux2_walk_weights(const Flux2Config *c, Flux2Part *p, Error *e) {
    Flux2TimeEmbed time;
    Flux2Embedders emb;
    Tensor *tensor;
    if (flux2_time_embed_load(&time, p, c, e)) return -1;
    for (int k = 0; k < FLUX2_MODS; k++)
        if (flux2_modulation_load(&tensor, p, c, k, e)) return -1;
    if (flux2_embedders_load(&emb, p, c, e) || flux2_output_load(&tensor, p, c, e)) return -1;
    for (int i = 0; i < c->num_layers; i++)
        for (int stream = 0; stream < FLUX2_STREAMS; stream++) {
            Flux2StreamIn in;
            Flux2StreamOut out;
            if (flux2_stream_in_load(&in, p, c, i, stream, e) ||
                flux2_stream_out_load(&out, p, c, i, stream, e))
                return -1;
        }
    for (int i = 0; i < c->num_single_layers; i++) {
        Flux2SingleIn in;
        if (flux2_single_in_load(&in, p, c, i, e) || flux2_single_out_load(&tensor, p, c, i, e))
            return -1;
    }
    return 0;
}

/* Puts "<what>: " before the message already in e. */
static int flux2_error_context(Error *e, const char *what) {
    if (!e) return -1;
    char msg[sizeof e->msg];
    memcpy(msg, e->msg, sizeof msg);
    return error_set(e, "%s: %s", what, msg);
}

int flux2_load(Flux2 **out, const char *dir, Error *e) {
    *out = NULL;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
        return error_set(e, "path too long: %s", dir);
    Flux2 *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading %s", dir);
    /* config and safetensors errors name their file; a weight's name needs the directory */
    int status = flux2_config_read(&m->config, path, e) || st_model_open(&m->weights, dir, e);
    if (!status) {
        Flux2Part check = {.weights = m->weights, .mode = FLUX2_CHECK};
        status = flux2_walk_weights(&m->config, &check, e) && flux2_error_context(e, dir);
    }
    if (status) {
        flux2_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

int flux2_load_config_only(Flux2 **out, const char *config_path, uint64_t seed, Error *e) {
    *out = NULL;
    Flux2 *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading %s", config_path);
    Flux2SpecList list = {0};
    Flux2Part names = {.mode = FLUX2_LIST, .list = &list};
    int status = flux2_config_read(&m->config, config_path, e) ||
                 flux2_walk_weights(&m->config, &names, e) ||
                 st_model_random(&m->weights, list.specs, list.count, seed, e);
    flux2_spec_list_free(&list);
    if (status) {
        flux2_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

void flux2_free(Flux2 *m) {
    if (!m) return;
    st_model_close(m->weights);
    free(m);
}

const Flux2Config *flux2_config(const Flux2 *m) { return &m->config; }

/* ---- per-call tables ---- */

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

/* ---- running parts on short tapes ---- */

static Tape *flux2_tape(void) {
    Tape *t = tape_new();
    if (t) tape_set_grad(t, false);
    return t;
}

/* A copy of v's value that outlives the tape, or an error naming the part that failed. */
static int flux2_result(Tape *t, Var *v, Tensor **out, const char *part, Error *e) {
    *out = NULL;
    if (tape_check(t, e)) return flux2_error_context(e, part);
    *out = tensor_clone(v->value);
    return *out ? 0 : error_set(e, "%s: out of memory", part);
}

/* Frees the tensor in *slot and puts value there. */
static void flux2_replace(Tensor **slot, Tensor *value) {
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

/* Chunk k of batch item b of a modulation [B, n dim] as a [dim] leaf over its data. */
static Var *flux2_mod(Tape *t, const Tensor *mod, int b, int k, int dim) {
    float *chunk = mod->data + b * mod->shape[1] + (int64_t)k * dim;
    return var_take(t, tensor_view(chunk, 1, (int64_t[]){dim}), false);
}

/* proj: [B, channels] (taken) -> linear_2(silu(linear_1(proj))): [B, dim] (TimestepEmbedding) */
static Var *flux2_time_embed(Tape *t, Tensor *proj, Tensor *linear_1, Tensor *linear_2) {
    Var *h = ag_linear(t, var_take(t, proj, false), param_var(t, linear_1), NULL);
    return ag_linear(t, ag_silu(t, h), param_var(t, linear_2), NULL);
}

/* sigma (and guidance): [B] -> a timestep embedding; its modulations into s. */
static int flux2_conditioning(const Flux2 *m, const float *sigma, const float *guidance,
                              Flux2Step *s, Error *e) {
    const Flux2Config *c = &m->config;
    Flux2Part part = {.weights = m->weights};
    Flux2TimeEmbed w;
    Tape *t = flux2_tape();
    int status = !t ? error_set(e, "out of memory") : flux2_time_embed_load(&w, &part, c, e);
    Var *act = NULL;
    if (!status) {
        int B = s->batch, C = c->timestep_channels;
        Var *temb = flux2_time_embed(t, flux2_timestep_proj(sigma, B, C), w.time_1, w.time_2);
        if (guidance && c->guidance_embeds)
            temb = ag_add(t, temb, flux2_time_embed(t, flux2_timestep_proj(guidance, B, C),
                                                    w.guidance_1, w.guidance_2));
        act = ag_silu(t, temb);
    }
    flux2_part_free(&part);
    Tensor **mods[FLUX2_MODS] = {&s->mod_img, &s->mod_txt, &s->mod_single, &s->mod_out};
    for (int k = 0; !status && k < FLUX2_MODS; k++) {
        Tensor *weight;
        status = flux2_modulation_load(&weight, &part, c, k, e) ||
                 flux2_result(t, ag_linear(t, act, param_var(t, weight), NULL), mods[k],
                              "flux2 conditioning", e);
        flux2_part_free(&part);
    }
    tape_free(t);
    return status;
}

/* tokens: [B, T, in_channels], txt: [B, L, joint_attention_dim] -> img[b]: [1, T, dim],
 * ctx[b]: [1, L, dim] */
static int flux2_embed(const Flux2 *m, const Tensor *tokens, const Tensor *txt,
                       const Flux2Step *s, Tensor **img, Tensor **ctx, Error *e) {
    Flux2Part part = {.weights = m->weights};
    Flux2Embedders w;
    int status = flux2_embedders_load(&w, &part, &m->config, e);
    for (int b = 0; !status && b < s->batch; b++) {
        Tape *t = flux2_tape();
        Var *x = ag_linear(t, flux2_view(t, tokens, 0, b, 1), param_var(t, w.x_embedder), NULL);
        Var *y = ag_linear(t, flux2_view(t, txt, 0, b, 1), param_var(t, w.context_embedder), NULL);
        status = flux2_result(t, x, &img[b], "flux2 x_embedder", e) ||
                 flux2_result(t, y, &ctx[b], "flux2 context_embedder", e);
        tape_free(t);
    }
    flux2_part_free(&part);
    return status;
}

/* ---- the layers of a block ---- */

/* x: [1, N, dim] -> LayerNorm without affine, then * (1 + scale) + shift */
static Var *flux2_modulate(Tape *t, Var *x, Var *shift, Var *scale, double eps) {
    Var *n = ag_layernorm(t, x, NULL, NULL, (float)eps);
    return ag_add_rows(t, ag_mul_rows(t, n, ag_affine(t, scale, 1.0f, 1.0f)), shift);
}

/* x + gate * y, the gated residual; x, y: [1, N, dim], gate: [dim] */
static Var *flux2_gated(Tape *t, Var *x, Var *gate, Var *y) {
    return ag_add(t, x, ag_mul_rows(t, y, gate));
}

/* x: [1, n, dim] -> [1, n, heads, head_dim], RMS-normalised per head when norm is not NULL */
static Var *flux2_heads(Tape *t, Var *x, Tensor *norm, int64_t n, const Flux2Config *c) {
    Var *y = ag_reshape(t, x, 4, (int64_t[]){1, n, c->heads, c->head_dim});
    return norm ? ag_rmsnorm(t, y, param_var(t, norm), (float)c->eps) : y;
}

/* x: [1, n, dim] -> x W^T split into heads (and normalised) */
static Var *flux2_project_heads(Tape *t, Var *x, Tensor *weight, Tensor *norm, int64_t n,
                                const Flux2Config *c) {
    return flux2_heads(t, ag_linear(t, x, param_var(t, weight), NULL), norm, n, c);
}

/* x: [1, n, heads, head_dim], the tokens at positions pos .. pos + n - 1 of the joint sequence
 * -> RoPE applied */
static Var *flux2_rotate(Tape *t, Var *x, const Flux2Step *s, int64_t pos, int64_t n) {
    return ag_rope(t, x, flux2_view(t, s->rope_cos, 0, pos, n),
                   flux2_view(t, s->rope_sin, 0, pos, n));
}

/* x: [1, N, 2 hidden] -> silu(x[.., :hidden]) * x[.., hidden:] */
static Var *flux2_swiglu(Tape *t, Var *x, int hidden) {
    return ag_mul(t, ag_silu(t, ag_slice(t, x, 2, 0, hidden)), ag_slice(t, x, 2, hidden, hidden));
}

/* x: [1, N, dim] -> linear_out(swiglu(linear_in(x))): [1, N, dim] */
static Var *flux2_feed_forward(Tape *t, Var *x, Tensor *linear_in, Tensor *linear_out,
                               const Flux2Config *c) {
    Var *h = ag_linear(t, x, param_var(t, linear_in), NULL);
    return ag_linear(t, flux2_swiglu(t, h, c->mlp_hidden), param_var(t, linear_out), NULL);
}

/* ---- a block in pieces ----
 * Everything in a block but the attention works token by token, so it runs over chunks of
 * FLUX2_CHUNK_TOKENS tokens, each on a tape of its own freed as soon as the chunk's result is
 * copied out: the intermediates (a feed-forward's hidden layers alone are 12 dim floats per
 * token) then take memory for one chunk, not for the whole sequence. Between the pieces live only the
 * joint queries, keys and values, the attention output and the hidden states. A weight product
 * gives each output element by the same sums however many rows it covers, so the result does not
 * depend on the chunk size. */
#define FLUX2_CHUNK_TOKENS 256

/* fn over tokens [start, start + n) on a fresh no-grad tape, for every chunk of [0, count). */
typedef int (*Flux2ChunkFn)(Tape *t, int64_t start, int64_t n, void *ctx, Error *e);

static int flux2_chunks(int64_t count, Flux2ChunkFn fn, void *ctx, Error *e) {
    int status = 0;
    for (int64_t start = 0; !status && start < count; start += FLUX2_CHUNK_TOKENS) {
        int64_t n = count - start < FLUX2_CHUNK_TOKENS ? count - start : FLUX2_CHUNK_TOKENS;
        Tape *t = flux2_tape();
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
    Tape *t = flux2_tape();
    if (!t) return error_set(e, "out of memory");
    Var *o = ag_attention(t, var_new(t, a->q, false), var_new(t, a->k, false),
                          var_new(t, a->v, false), (float)(1.0 / sqrt(c->head_dim)), false, NULL);
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
    const Flux2Config *c = p->c;
    const Flux2StreamIn *w = p->in;
    int64_t pos = p->offset + start;
    Var *shift = flux2_mod(t, p->mod, p->b, 0, c->dim);
    Var *scale = flux2_mod(t, p->mod, p->b, 1, c->dim);
    Var *x = flux2_modulate(t, flux2_view(t, p->x, 1, start, n), shift, scale, c->eps);
    Var *q = flux2_rotate(t, flux2_project_heads(t, x, w->q, w->norm_q, n, c), p->s, pos, n);
    Var *k = flux2_rotate(t, flux2_project_heads(t, x, w->k, w->norm_k, n, c), p->s, pos, n);
    Var *v = flux2_project_heads(t, x, w->v, NULL, n, c);
    return flux2_put(t, q, p->joint->q, pos, 0, e) || flux2_put(t, k, p->joint->k, pos, 0, e) ||
           flux2_put(t, v, p->joint->v, pos, 0, e);
}

/* Tokens [start, start + n) of a stream: x + gate * out(o), then + gate' * ff(modulate(..)) */
static int flux2_stream_update(Tape *t, int64_t start, int64_t n, void *ctx, Error *e) {
    const Flux2StreamPass *p = ctx;
    const Flux2Config *c = p->c;
    Var *gate = flux2_mod(t, p->mod, p->b, 2, c->dim);
    Var *ff_shift = flux2_mod(t, p->mod, p->b, 3, c->dim);
    Var *ff_scale = flux2_mod(t, p->mod, p->b, 4, c->dim);
    Var *ff_gate = flux2_mod(t, p->mod, p->b, 5, c->dim);
    Var *o = flux2_view(t, p->o, 1, p->offset + start, n);
    Var *x = flux2_gated(t, flux2_view(t, p->x, 1, start, n), gate,
                         ag_linear(t, o, param_var(t, p->out->out), NULL));
    Var *ff = flux2_feed_forward(t, flux2_modulate(t, x, ff_shift, ff_scale, c->eps),
                                 p->out->ff_in, p->out->ff_out, c);
    return flux2_put(t, flux2_gated(t, x, ff_gate, ff), p->y, start, 0, e);
}

/* Both streams' q, k, v, then the joint attention of each batch item into o[b]: [1, L + T, dim]. */
static int flux2_double_attention(const Flux2 *m, int i, const Flux2Step *s, Tensor **img,
                                  Tensor **txt, Tensor **o, Error *e) {
    const Flux2Config *c = &m->config;
    Flux2Part part = {.weights = m->weights};
    Flux2StreamIn w[FLUX2_STREAMS];
    int status = flux2_stream_in_load(&w[FLUX2_IMAGE], &part, c, i, FLUX2_IMAGE, e) ||
                 flux2_stream_in_load(&w[FLUX2_TEXT], &part, c, i, FLUX2_TEXT, e);
    for (int b = 0; !status && b < s->batch; b++) {
        Flux2Joint joint = {0};
        status = flux2_joint_alloc(&joint, s, c, e);
        for (int stream = 0; !status && stream < FLUX2_STREAMS; stream++) {
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
    flux2_part_free(&part);
    return status;
}

/* One stream after the attention: x[b] replaced by its new hidden states. */
static int flux2_double_update(const Flux2 *m, int i, const Flux2Step *s, int stream, Tensor **x,
                               Tensor **o, Error *e) {
    Flux2Part part = {.weights = m->weights};
    Flux2StreamOut w;
    int status = flux2_stream_out_load(&w, &part, &m->config, i, stream, e);
    for (int b = 0; !status && b < s->batch; b++) {
        Flux2StreamPass p = flux2_stream_pass(m, s, stream, b, x[b]);
        p.out = &w;
        p.o = o[b];
        p.y = tensor_new(x[b]->ndim, x[b]->shape);
        status = !p.y ? error_set(e, "out of memory")
                      : flux2_chunks(x[b]->shape[1], flux2_stream_update, &p, e);
        if (status) tensor_free(p.y);
        else flux2_replace(&x[b], p.y);
    }
    flux2_part_free(&part);
    return status;
}

/* Double-stream block i: img[b]: [1, T, dim], txt[b]: [1, L, dim], both replaced. The weights
 * are converted in three parts (both streams' q, k, v; then each stream's output projection and
 * feed-forward), so at most one stream's feed-forward is in f32 at a time. */
static int flux2_double_run(const Flux2 *m, int i, const Flux2Step *s, Tensor **img,
                            Tensor **txt, Error *e) {
    Tensor **o = calloc((size_t)s->batch, sizeof *o);
    int status = !o ? error_set(e, "out of memory")
                    : flux2_double_attention(m, i, s, img, txt, o, e) ||
                          flux2_double_update(m, i, s, FLUX2_IMAGE, img, o, e) ||
                          flux2_double_update(m, i, s, FLUX2_TEXT, txt, o, e);
    for (int b = 0; o && b < s->batch; b++) tensor_free(o[b]);
    free(o);
    if (!status) return 0;
    char name[64];
    snprintf(name, sizeof name, "flux2 transformer_blocks.%d", i);
    return flux2_error_context(e, name);
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
    Tensor *to_out;          /* after it: from hidden into y */
    Tensor *y;               /* the new hidden states [1, L + T, dim] */
} Flux2SinglePass;

/* Tokens [start, start + n) -> their rows of the joint q, k, v and their SwiGLU output */
static int flux2_single_qkv_mlp(Tape *t, int64_t start, int64_t n, void *ctx, Error *e) {
    const Flux2SinglePass *p = ctx;
    const Flux2Config *c = p->c;
    int d = c->dim;
    Var *shift = flux2_mod(t, p->s->mod_single, p->b, 0, d);
    Var *scale = flux2_mod(t, p->s->mod_single, p->b, 1, d);
    Var *x = flux2_modulate(t, flux2_view(t, p->x, 1, start, n), shift, scale, c->eps);
    /* [1, n, dim] -> [1, n, 3 dim + 2 mlp_hidden]: q, k, v, then the SwiGLU's gate and up */
    Var *proj = ag_linear(t, x, param_var(t, p->in->to_qkv_mlp), NULL);
    Var *q = flux2_heads(t, ag_slice(t, proj, 2, 0, d), p->in->norm_q, n, c);
    Var *k = flux2_heads(t, ag_slice(t, proj, 2, d, d), p->in->norm_k, n, c);
    Var *v = flux2_heads(t, ag_slice(t, proj, 2, 2 * d, d), NULL, n, c);
    Var *mlp = flux2_swiglu(t, ag_slice(t, proj, 2, 3 * d, 2 * c->mlp_hidden), c->mlp_hidden);
    return flux2_put(t, flux2_rotate(t, q, p->s, start, n), p->joint->q, start, 0, e) ||
           flux2_put(t, flux2_rotate(t, k, p->s, start, n), p->joint->k, start, 0, e) ||
           flux2_put(t, v, p->joint->v, start, 0, e) || flux2_put(t, mlp, p->hidden, start, d, e);
}

/* Tokens [start, start + n): x + gate * to_out(hidden) */
static int flux2_single_update(Tape *t, int64_t start, int64_t n, void *ctx, Error *e) {
    const Flux2SinglePass *p = ctx;
    Var *out = ag_linear(t, flux2_view(t, p->hidden, 1, start, n),
                         param_var(t, p->to_out), NULL);
    Var *gate = flux2_mod(t, p->s->mod_single, p->b, 2, p->c->dim);
    return flux2_put(t, flux2_gated(t, flux2_view(t, p->x, 1, start, n), gate, out), p->y, start,
                     0, e);
}

/* The part before to_out for every batch item: hidden[b]: [1, L + T, dim + mlp_hidden]. */
static int flux2_single_attention(const Flux2 *m, int i, const Flux2Step *s, Tensor **seq,
                                  Tensor **hidden, Error *e) {
    const Flux2Config *c = &m->config;
    Flux2Part part = {.weights = m->weights};
    Flux2SingleIn w;
    int status = flux2_single_in_load(&w, &part, c, i, e);
    for (int b = 0; !status && b < s->batch; b++) {
        Flux2Joint joint = {0};
        Flux2SinglePass p = {.c = c, .s = s, .b = b, .x = seq[b], .in = &w, .joint = &joint};
        hidden[b] = p.hidden = TENSOR_NEW(1, seq[b]->shape[1], c->dim + c->mlp_hidden);
        status = !p.hidden ? error_set(e, "out of memory")
                           : flux2_joint_alloc(&joint, s, c, e) ||
                                 flux2_chunks(seq[b]->shape[1], flux2_single_qkv_mlp, &p, e) ||
                                 flux2_attend(&joint, c, p.hidden, e);
        flux2_joint_free(&joint);
    }
    flux2_part_free(&part);
    return status;
}

/* Single-stream block i: seq[b]: [1, L + T, dim], replaced. The fused input projection and
 * to_out are converted one after the other. */
static int flux2_single_run(const Flux2 *m, int i, const Flux2Step *s, Tensor **seq, Error *e) {
    Flux2Part part = {.weights = m->weights};
    Tensor **hidden = calloc((size_t)s->batch, sizeof *hidden), *to_out = NULL;
    int status = !hidden ? error_set(e, "out of memory")
                         : flux2_single_attention(m, i, s, seq, hidden, e) ||
                               flux2_single_out_load(&to_out, &part, &m->config, i, e);
    for (int b = 0; !status && b < s->batch; b++) {
        Flux2SinglePass p = {.c = &m->config, .s = s, .b = b, .x = seq[b], .hidden = hidden[b],
                             .to_out = to_out, .y = tensor_new(seq[b]->ndim, seq[b]->shape)};
        status = !p.y ? error_set(e, "out of memory")
                      : flux2_chunks(seq[b]->shape[1], flux2_single_update, &p, e);
        if (status) tensor_free(p.y);
        else flux2_replace(&seq[b], p.y);
    }
    flux2_part_free(&part);
    for (int b = 0; hidden && b < s->batch; b++) tensor_free(hidden[b]);
    free(hidden);
    if (!status) return 0;
    char name[64];
    snprintf(name, sizeof name, "flux2 single_transformer_blocks.%d", i);
    return flux2_error_context(e, name);
}

/* txt[b]: [1, L, dim], img[b]: [1, T, dim] -> seq[b]: [1, L + T, dim], text first; frees both. */
static int flux2_join(const Flux2Step *s, int dim, Tensor **txt, Tensor **img, Tensor **seq,
                      Error *e) {
    for (int b = 0; b < s->batch; b++) {
        seq[b] = TENSOR_NEW(1, s->txt_len + s->img_len, dim);
        if (!seq[b]) return error_set(e, "flux2: out of memory joining the streams");
        memcpy(seq[b]->data, txt[b]->data, (size_t)txt[b]->numel * sizeof(float));
        memcpy(seq[b]->data + txt[b]->numel, img[b]->data, (size_t)img[b]->numel * sizeof(float));
        flux2_replace(&txt[b], NULL);
        flux2_replace(&img[b], NULL);
    }
    return 0;
}

/* seq[b]: [1, L + T, dim] -> the image tokens through norm_out and proj_out into v[b]:
 * [T, patch_size^2 out_channels] */
static int flux2_output(const Flux2 *m, const Flux2Step *s, Tensor **seq, Tensor *v, Error *e) {
    const Flux2Config *c = &m->config;
    Flux2Part part = {.weights = m->weights};
    Tensor *proj_out;
    int status = flux2_output_load(&proj_out, &part, c, e);
    for (int b = 0; !status && b < s->batch; b++) {
        Tape *t = flux2_tape();
        Var *img = ag_slice(t, var_new(t, seq[b], false), 1, s->txt_len, s->img_len);
        Var *n = flux2_modulate(t, img, flux2_mod(t, s->mod_out, b, 1, c->dim),
                                flux2_mod(t, s->mod_out, b, 0, c->dim), c->eps);
        Var *y = ag_linear(t, n, param_var(t, proj_out), NULL);
        status = tape_check(t, e) ? flux2_error_context(e, "flux2 output") : 0;
        if (!status) memcpy(v->data + b * (v->numel / s->batch), y->value->data,
                            (size_t)y->value->numel * sizeof(float));
        tape_free(t);
    }
    flux2_part_free(&part);
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

int flux2_forward(const Flux2 *m, const Tensor *tokens, int h, int w, const Tensor *txt,
                  const float *sigma, const float *guidance, Tensor **velocity, Error *e) {
    const Flux2Config *c = &m->config;
    *velocity = NULL;
    if (flux2_check_inputs(c, tokens, h, w, txt, sigma, e)) return -1;
    Flux2Step s = {.batch = (int)tokens->shape[0], .img_len = h * w,
                   .txt_len = (int)txt->shape[1]};
    Tensor **img = calloc((size_t)s.batch * 3, sizeof *img);
    Tensor **ctx = img + s.batch, **seq = ctx + s.batch;
    Tensor *v = TENSOR_NEW(s.batch, s.img_len, c->patch_size * c->patch_size * c->out_channels);
    int status = !img || !v || flux2_rope_tables(c, s.txt_len, h, w, &s)
                     ? error_set(e, "flux2: out of memory")
                     : flux2_conditioning(m, sigma, guidance, &s, e) ||
                           flux2_embed(m, tokens, txt, &s, img, ctx, e);
    for (int i = 0; !status && i < c->num_layers; i++)
        status = flux2_double_run(m, i, &s, img, ctx, e);
    if (!status) status = flux2_join(&s, c->dim, ctx, img, seq, e);
    for (int i = 0; !status && i < c->num_single_layers; i++)
        status = flux2_single_run(m, i, &s, seq, e);
    if (!status) status = flux2_output(m, &s, seq, v, e);
    for (int i = 0; img && i < 3 * s.batch; i++) tensor_free(img[i]);
    free(img);
    flux2_step_free(&s);
    if (status) tensor_free(v);
    else *velocity = v;
    return status;
}

/* ---- end section: flux2 ---- */
