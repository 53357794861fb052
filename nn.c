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

/* ---- section: segformer ---------------------------------------------------------------------- */

/* Every LayerNorm and the batch norm: PyTorch's default, as upstream passes none. */
#define SEGFORMER_NORM_EPS 1e-5f
/* A bound on every size in config.json, so products of them stay far inside int. */
#define SEGFORMER_MAX_SIZE 65536

/* One Mix Transformer layer, with the hyper-parameters it needs to run alone under ag_checkpoint. */
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
    Linear linear_c; /* the decode head's projection of this stage */
} SegformerStage;

struct Segformer {
    SegformerConfig config;
    SegformerStage stages[SEGFORMER_MAX_STAGES];
    Tensor *pixel_shift, *pixel_scale; /* [3]: -mean and 1 / std */
    Conv2d linear_fuse, classifier;
    NormParams batch_norm;
    Tensor *running_mean, *running_var;
};

/* -- config -- */

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

/* A positive integer of config.json at most SEGFORMER_MAX_SIZE. */
static int segformer_size(const JsonValue *root, const char *key, int max, int *out, Error *e) {
    int64_t v;
    if (json_get_int(root, key, &v, e)) return -1;
    if (v < 1 || v > max)
        return error_set(e, "%s: key '%s' is %lld, expected 1..%d", root->source, key,
                         (long long)v, max);
    *out = (int)v;
    return 0;
}

/* num_labels, or the size of id2label, which is what transformers writes instead. */
static int segformer_num_labels(const JsonValue *root, int *out, Error *e) {
    if (json_get(root, "num_labels")) return segformer_size(root, "num_labels", SEGFORMER_MAX_SIZE, out, e);
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
        return error_set(e, "%s: hidden_act '%s' is not supported (gelu, gelu_new, "
                         "gelu_pytorch_tanh)", root->source, act);
    return 0;
}

static int segformer_model_config(SegformerConfig *c, const JsonValue *root, Error *e) {
    int channels = 3;
    if (segformer_size(root, "num_encoder_blocks", SEGFORMER_MAX_STAGES, &c->stages, e) ||
        (json_get(root, "num_channels") &&
         segformer_size(root, "num_channels", SEGFORMER_MAX_SIZE, &channels, e)) ||
        segformer_stage_ints(root, "hidden_sizes", c->stages, c->hidden_sizes, e) ||
        segformer_stage_ints(root, "depths", c->stages, c->depths, e) ||
        segformer_stage_ints(root, "num_attention_heads", c->stages, c->heads, e) ||
        segformer_stage_ints(root, "sr_ratios", c->stages, c->sr_ratios, e) ||
        segformer_stage_ints(root, "patch_sizes", c->stages, c->patch_sizes, e) ||
        segformer_stage_ints(root, "strides", c->stages, c->strides, e) ||
        segformer_stage_ints(root, "mlp_ratios", c->stages, c->mlp_ratios, e) ||
        segformer_size(root, "decoder_hidden_size", SEGFORMER_MAX_SIZE, &c->decoder_hidden_size,
                       e) ||
        segformer_num_labels(root, &c->num_labels, e) || segformer_activation(root, &c->gelu_tanh, e))
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

/* image_mean or image_std: three finite numbers (std also nonzero). */
static int segformer_rgb(const JsonValue *root, const char *key, bool nonzero, float *out,
                         Error *e) {
    const JsonValue *v = json_get(root, key);
    if (!v || v->type != JSON_ARRAY || v->count != 3)
        return error_set(e, "%s: key '%s' must be an array of 3 numbers", root->source, key);
    for (int i = 0; i < 3; i++) {
        const JsonValue *item = &v->items[i];
        if (item->type != JSON_NUMBER || !isfinite(item->number) ||
            (nonzero && item->number == 0.0))
            return error_set(e, "%s: key '%s' entry %d must be a finite%s number", root->source,
                             key, i, nonzero ? ", nonzero" : "");
        out[i] = (float)item->number;
    }
    return 0;
}

/* size: {"height": h, "width": w}, or one number for a square (older feature extractors). */
static int segformer_input_size(SegformerConfig *c, const JsonValue *root, Error *e) {
    const JsonValue *size = json_get(root, "size");
    if (size && size->type == JSON_NUMBER) {
        if (segformer_size(root, "size", IMAGE_MAX_SIDE, &c->input_h, e)) return -1;
        c->input_w = c->input_h;
        return 0;
    }
    if (!size || size->type != JSON_OBJECT)
        return error_set(e, "%s: key 'size' must be {\"height\": h, \"width\": w} or a number",
                         root->source);
    return segformer_size(size, "height", IMAGE_MAX_SIDE, &c->input_h, e) ||
                   segformer_size(size, "width", IMAGE_MAX_SIDE, &c->input_w, e)
               ? -1
               : 0;
}

static int segformer_preprocessor_config(SegformerConfig *c, const JsonValue *root, Error *e) {
    if (segformer_flag(root, "do_resize", &c->do_resize, e) ||
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
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s", dir, file) >= (int)sizeof path)
        return error_set(e, "path too long: %s/%s", dir, file);
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
    return segformer_json(c, dir, "config.json", segformer_model_config, e) ||
                   segformer_json(c, dir, "preprocessor_config.json",
                                  segformer_preprocessor_config, e)
               ? -1
               : 0;
}

/* -- weights -- */

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

static int segformer_layer_load(SegformerLayer *l, const StModel *m, const SegformerConfig *c,
                                int i, int j, Error *e) {
    int C = c->hidden_sizes[i], inner = C * c->mlp_ratios[i], r = c->sr_ratios[i];
    *l = (SegformerLayer){.heads = c->heads[i], .sr_ratio = r, .gelu_tanh = c->gelu_tanh};
    char p[128], n[160];
    segformer_name(p, sizeof p, "segformer.encoder.block.%d.%d", i, j);
#define NAME(suffix) segformer_name(n, sizeof n, "%s." suffix, p)
    return norm_load(&l->norm1, m, C, true, NAME("layer_norm_1"), e) ||
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
                   linear_load(&l->dense2, m, inner, C, true, NAME("mlp.dense2"), e)
               ? -1
               : 0;
#undef NAME
}

static int segformer_stage_load(SegformerStage *s, const StModel *m, const SegformerConfig *c,
                                int i, Error *e) {
    int C = c->hidden_sizes[i], in = i == 0 ? 3 : c->hidden_sizes[i - 1], k = c->patch_sizes[i];
    char n[128];
    if (conv2d_load(&s->patch_embed, m, in, C, k, c->strides[i], k / 2, 1, true,
                    segformer_name(n, sizeof n, "segformer.encoder.patch_embeddings.%d.proj", i),
                    e) ||
        norm_load(&s->patch_norm, m, C, true,
                  segformer_name(n, sizeof n, "segformer.encoder.patch_embeddings.%d.layer_norm", i),
                  e) ||
        norm_load(&s->norm, m, C, true, segformer_name(n, sizeof n, "segformer.encoder.layer_norm.%d", i),
                  e) ||
        linear_load(&s->linear_c, m, C, c->decoder_hidden_size, true,
                    segformer_name(n, sizeof n, "decode_head.linear_c.%d.proj", i), e))
        return -1;
    s->layers = calloc((size_t)c->depths[i], sizeof *s->layers);
    if (!s->layers) return error_set(e, "out of memory loading stage %d of the detector", i);
    s->n_layers = c->depths[i];
    for (int j = 0; j < s->n_layers; j++)
        if (segformer_layer_load(&s->layers[j], m, c, i, j, e)) return -1;
    return 0;
}

static int segformer_head_load(Segformer *s, const StModel *m, Error *e) {
    const SegformerConfig *c = &s->config;
    int D = c->decoder_hidden_size;
    return conv2d_load(&s->linear_fuse, m, D * c->stages, D, 1, 1, 0, 1, false,
                       "decode_head.linear_fuse", e) ||
                   norm_load(&s->batch_norm, m, D, true, "decode_head.batch_norm", e) ||
                   param_load(m, &s->running_mean, e, SHAPE(D),
                              "decode_head.batch_norm.running_mean") ||
                   param_load(m, &s->running_var, e, SHAPE(D), "decode_head.batch_norm.running_var") ||
                   conv2d_load(&s->classifier, m, D, c->num_labels, 1, 1, 0, 1, true,
                               "decode_head.classifier", e)
               ? -1
               : 0;
}

/* (x - mean) / std as (x + shift) * scale, per channel. */
static int segformer_pixel_load(Segformer *s, Error *e) {
    s->pixel_shift = TENSOR_NEW(3);
    s->pixel_scale = TENSOR_NEW(3);
    if (!s->pixel_shift || !s->pixel_scale) return error_set(e, "out of memory");
    for (int c = 0; c < 3; c++) {
        s->pixel_shift->data[c] = -s->config.mean[c];
        s->pixel_scale->data[c] = 1.0f / s->config.std[c];
    }
    return 0;
}

static void segformer_layer_free(SegformerLayer *l) {
    norm_free(&l->norm1);
    norm_free(&l->norm2);
    norm_free(&l->sr_norm);
    linear_free(&l->query);
    linear_free(&l->key);
    linear_free(&l->value);
    linear_free(&l->out);
    linear_free(&l->dense1);
    linear_free(&l->dense2);
    conv2d_free(&l->sr);
    conv2d_free(&l->dwconv);
}

void segformer_free(Segformer *m) {
    if (!m) return;
    for (int i = 0; i < SEGFORMER_MAX_STAGES; i++) {
        SegformerStage *s = &m->stages[i];
        conv2d_free(&s->patch_embed);
        norm_free(&s->patch_norm);
        for (int j = 0; j < s->n_layers; j++) segformer_layer_free(&s->layers[j]);
        free(s->layers);
        norm_free(&s->norm);
        linear_free(&s->linear_c);
    }
    tensor_free(m->pixel_shift);
    tensor_free(m->pixel_scale);
    conv2d_free(&m->linear_fuse);
    conv2d_free(&m->classifier);
    norm_free(&m->batch_norm);
    tensor_free(m->running_mean);
    tensor_free(m->running_var);
    free(m);
}

int segformer_load(Segformer **out, const char *dir, Error *e) {
    *out = NULL;
    Segformer *s = calloc(1, sizeof *s);
    if (!s) return error_set(e, "out of memory loading the detector %s", dir);
    StModel *m = NULL;
    int rc = segformer_config_load(&s->config, dir, e) || st_model_open(&m, dir, e) ||
                     segformer_pixel_load(s, e)
                 ? -1
                 : 0;
    for (int i = 0; rc == 0 && i < s->config.stages; i++)
        rc = segformer_stage_load(&s->stages[i], m, &s->config, i, e);
    if (rc == 0) rc = segformer_head_load(s, m, e);
    st_model_close(m);
    if (rc) {
        segformer_free(s);
        return -1;
    }
    *out = s;
    return 0;
}

const SegformerConfig *segformer_config(const Segformer *m) { return &m->config; }

/* -- forward -- */

/* x: [B, C, h, w] -> [B, h, w, C]: the token sequence in row-major order, channels last */
static Var *segformer_tokens(Tape *t, Var *x) { return ag_permute(t, x, (int[]){0, 2, 3, 1}); }
/* x: [B, h, w, C] -> [B, C, h, w] */
static Var *segformer_image(Tape *t, Var *x) { return ag_permute(t, x, (int[]){0, 3, 1, 2}); }

static Var *segformer_layernorm(Tape *t, const NormParams *n, Var *x) {
    return ag_layernorm(t, x, param_var(t, n->weight), param_var(t, n->bias), SEGFORMER_NORM_EPS);
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
        kv = segformer_layernorm(t, &l->sr_norm,
                                 segformer_tokens(t, conv2d_apply(t, &l->sr, segformer_image(t, x))));
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

/* Overlapping patch embedding, the layers (each recomputed in backward), the stage norm.
 * x: [B, Cin, H, W] -> [B, h, w, C] */
static Var *segformer_stage(Tape *t, const SegformerStage *s, Var *x) {
    x = segformer_layernorm(t, &s->patch_norm, segformer_tokens(t, conv2d_apply(t, &s->patch_embed, x)));
    for (int j = 0; j < s->n_layers; j++)
        x = ag_checkpoint(t, segformer_layer, &s->layers[j], &x, 1);
    return segformer_layernorm(t, &s->norm, x);
}

/* The all-MLP head: every stage projected to D channels and resized to stage 0's size, joined
 * last stage first, fused by a 1x1 conv, batch norm, ReLU, classifier.
 * states[i]: [B, h_i, w_i, C_i] -> logits: [B, L, h_0, w_0] */
static Var *segformer_head(Tape *t, const Segformer *m, Var **states) {
    int n = m->config.stages;
    if (!states[0]) return NULL;
    int64_t h = states[0]->value->shape[1], w = states[0]->value->shape[2];
    Var *parts[SEGFORMER_MAX_STAGES];
    for (int i = 0; i < n; i++)
        parts[n - 1 - i] = segformer_resize(
            t, segformer_image(t, linear_apply(t, &m->stages[i].linear_c, states[i])), h, w);
    Var *y = conv2d_apply(t, &m->linear_fuse, ag_concat(t, parts, n, 1));
    y = ag_batchnorm_eval(t, y, param_var(t, m->running_mean), param_var(t, m->running_var),
                          param_var(t, m->batch_norm.weight), param_var(t, m->batch_norm.bias),
                          SEGFORMER_NORM_EPS);
    return conv2d_apply(t, &m->classifier, ag_relu(t, y));
}

/* DIAMOND's preprocessing: [-1, 1] -> [0, 1] (clamped), resized, normalised per channel.
 * image: [B, 3, H, W] -> [B, 3, h, w] */
static Var *segformer_preprocess(Tape *t, const Segformer *m, Var *image) {
    const SegformerConfig *c = &m->config;
    Var *x = ag_clamp(t, ag_affine(t, image, 0.5f, 0.5f), 0.0f, 1.0f);
    if (c->do_resize) x = segformer_resize(t, x, c->input_h, c->input_w);
    if (c->do_normalize)
        x = ag_mul_channels(t, ag_add_channels(t, x, param_var(t, m->pixel_shift)),
                            param_var(t, m->pixel_scale));
    return x;
}

Var *segformer_forward(Tape *t, const Segformer *m, Var *image, Var **mask_small) {
    if (mask_small) *mask_small = NULL;
    Var *x = segformer_preprocess(t, m, image);
    Var *states[SEGFORMER_MAX_STAGES] = {0};
    for (int i = 0; i < m->config.stages; i++) {
        states[i] = segformer_stage(t, &m->stages[i], x);
        if (i + 1 < m->config.stages) x = segformer_image(t, states[i]);
    }
    Var *small = ag_sigmoid(t, segformer_head(t, m, states));
    /* the patch embedding's conv has accepted image, so it is [B, 3, H, W] from here on */
    if (!small) return NULL;
    if (mask_small) *mask_small = small;
    return segformer_resize(t, small, image->value->shape[2], image->value->shape[3]);
}

/* ---- end section: segformer ---- */
