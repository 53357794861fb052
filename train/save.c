/* train/save.c - the trained models written as the upstream libraries write them: a diffusers
 * directory for the transformer and the VAE, a transformers directory for the detector, and
 * diamond's own for the character text encoder; each read back by its X_open.
 *
 * Contents: entries; the transformer and the text encoder; the detector; the VAE. */
#include "train.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* === entries === */

StWriteTensor st_entry_f32(const char *name, const Tensor *t) {
    StWriteTensor w = {.name = name, .dtype = DTYPE_F32, .ndim = t->ndim, .data = t->data};
    for (int d = 0; d < t->ndim; d++) w.shape[d] = t->shape[d];
    return w;
}

int params_save(const Params *p, const char *path, Error *e) {
    int n = params_count(p);
    StWriteTensor *items = calloc((size_t)(n ? n : 1), sizeof *items);
    if (!items) return error_set(e, "out of memory saving %s", path);
    for (int i = 0; i < n; i++) items[i] = st_entry_f32(params_name(p, i), params_var(p, i)->value);
    int rc = st_write(path, items, (size_t)n, e);
    free(items);
    return rc;
}

/* === the transformer and the text encoder === */

/* v in the fewest significant digits that read back as the same double ("1e-06", "3", "0.5"). */
static void json_number(char *buf, size_t size, double v) {
    for (int digits = 1; digits <= 17; digits++) {
        snprintf(buf, size, "%.*g", digits, v);
        if (strtod(buf, NULL) == v) return;
    }
}

/* The config as diffusers writes it (keys sorted), so that flux2_config_read reads it back. */
static int flux2_config_write(const Flux2Config *c, const char *path, Error *e) {
    char eps[32], ratio[32], theta[32], text[2048];
    json_number(eps, sizeof eps, c->eps);
    json_number(ratio, sizeof ratio, c->mlp_ratio);
    json_number(theta, sizeof theta, c->rope_theta);
    int n = snprintf(text, sizeof text,
                     "{\n  \"_class_name\": \"Flux2Transformer2DModel\",\n"
                     "  \"attention_head_dim\": %d,\n"
                     "  \"axes_dims_rope\": [\n    %d,\n    %d,\n    %d,\n    %d\n  ],\n"
                     "  \"eps\": %s,\n  \"guidance_embeds\": %s,\n  \"in_channels\": %d,\n"
                     "  \"joint_attention_dim\": %d,\n  \"mlp_ratio\": %s,\n"
                     "  \"num_attention_heads\": %d,\n  \"num_layers\": %d,\n"
                     "  \"num_single_layers\": %d,\n  \"out_channels\": %d,\n"
                     "  \"patch_size\": %d,\n  \"rope_theta\": %s,\n"
                     "  \"timestep_guidance_channels\": %d\n}\n",
                     c->head_dim, c->axes_dims[0], c->axes_dims[1], c->axes_dims[2],
                     c->axes_dims[3], eps, c->guidance_embeds ? "true" : "false", c->in_channels,
                     c->joint_attention_dim, ratio, c->heads, c->num_layers,
                     c->num_single_layers, c->out_channels, c->patch_size, theta,
                     c->timestep_channels);
    return write_file_atomic(path, text, (size_t)n, e);
}

int flux2_save(const Flux2 *m, const char *dir, Error *e) {
    char path[PATH_BYTES];
    if (!flux2_params(m))
        return error_set(e, "flux2_save %s: only a resident model (flux2_make_resident) is saved",
                         dir);
    return dir_make(dir, e) || path_join(path, sizeof path, dir, "config.json", e) ||
           flux2_config_write(flux2_config(m), path, e) ||
           path_join(path, sizeof path, dir, "diffusion_pytorch_model.safetensors", e) ||
           params_save(flux2_params(m), path, e);
}

/* The config with the vocab as a JSON string (its characters are printable ASCII). */
static int text_config_write(const TextEncoderConfig *c, const char *path, Error *e) {
    char vocab[2 * TEXT_ENCODER_MAX_VOCAB + 1], eps[32], text[1024];
    size_t k = 0;
    for (int i = 0; i < c->vocab_size; i++) {
        if (c->vocab[i] == '"' || c->vocab[i] == '\\') vocab[k++] = '\\';
        vocab[k++] = c->vocab[i];
    }
    vocab[k] = '\0';
    json_number(eps, sizeof eps, c->layer_norm_eps);
    int n = snprintf(text, sizeof text,
                     "{\n  \"_class_name\": \"DiamondCharEncoder\",\n  \"vocab\": \"%s\",\n"
                     "  \"max_length\": %d,\n  \"hidden_size\": %d,\n  \"num_layers\": %d,\n"
                     "  \"num_heads\": %d,\n  \"intermediate_size\": %d,\n"
                     "  \"layer_norm_eps\": %s\n}\n",
                     vocab, c->max_length, c->hidden_size, c->num_layers, c->num_heads,
                     c->intermediate_size, eps);
    return write_file_atomic(path, text, (size_t)n, e);
}

int text_encoder_save(const TextEncoder *m, const char *dir, Error *e) {
    char path[PATH_BYTES];
    return dir_make(dir, e) || path_join(path, sizeof path, dir, "config.json", e) ||
           text_config_write(text_encoder_config(m), path, e) ||
           path_join(path, sizeof path, dir, "model.safetensors", e) ||
           params_save(text_encoder_params(m), path, e);
}

/* === the detector === */

/* A growing text for the config files; `failed` once out of memory. */
typedef struct SegformerText {
    char *data;
    size_t len, cap;
    bool failed;
} SegformerText;

static void segformer_text_add(SegformerText *b, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void segformer_text_add(SegformerText *b, const char *fmt, ...) {
    va_list ap, again;
    va_start(ap, fmt);
    va_copy(again, ap);
    int n = b->failed ? -1 : vsnprintf(NULL, 0, fmt, ap);
    if (n < 0) {
        b->failed = true;
    } else if (b->len + (size_t)n + 1 > b->cap) {
        size_t cap = 2 * (b->len + (size_t)n + 1);
        char *grown = realloc(b->data, cap);
        b->failed = !grown;
        if (grown) {
            b->data = grown;
            b->cap = cap;
        }
    }
    if (!b->failed) b->len += (size_t)vsnprintf(b->data + b->len, b->cap - b->len, fmt, again);
    va_end(again);
    va_end(ap);
}

/* `"key": [v0, v1, ..],` */
static void segformer_text_ints(SegformerText *b, const char *key, const int *v, int n) {
    segformer_text_add(b, "  \"%s\": [", key);
    for (int i = 0; i < n; i++) segformer_text_add(b, "%s%d", i ? ", " : "", v[i]);
    segformer_text_add(b, "],\n");
}

static int segformer_text_write(SegformerText *b, const char *dir, const char *file, Error *e) {
    char path[PATH_BYTES];
    int rc;
    if (b->failed)
        rc = error_set(e, "out of memory writing %s/%s", dir, file);
    else if (path_join(path, sizeof path, dir, file, e))
        rc = -1;
    else
        rc = write_file_atomic(path, b->data, b->len, e);
    free(b->data);
    *b = (SegformerText){0};
    return rc;
}

/* config.json as transformers writes a SegformerConfig (the keys it reads, and num_labels with
 * the id2label it implies). */
static int segformer_save_config(const SegformerConfig *c, const char *dir, Error *e) {
    SegformerText b = {0};
    segformer_text_add(&b, "{\n  \"architectures\": [\"SegformerForSemanticSegmentation\"],\n"
                           "  \"model_type\": \"segformer\",\n  \"num_channels\": 3,\n"
                           "  \"num_encoder_blocks\": %d,\n", c->stages);
    segformer_text_ints(&b, "hidden_sizes", c->hidden_sizes, c->stages);
    segformer_text_ints(&b, "depths", c->depths, c->stages);
    segformer_text_ints(&b, "num_attention_heads", c->heads, c->stages);
    segformer_text_ints(&b, "sr_ratios", c->sr_ratios, c->stages);
    segformer_text_ints(&b, "patch_sizes", c->patch_sizes, c->stages);
    segformer_text_ints(&b, "strides", c->strides, c->stages);
    segformer_text_ints(&b, "mlp_ratios", c->mlp_ratios, c->stages);
    segformer_text_add(&b, "  \"decoder_hidden_size\": %d,\n  \"hidden_act\": \"%s\",\n"
                           "  \"hidden_dropout_prob\": 0.0,\n"
                           "  \"attention_probs_dropout_prob\": 0.0,\n"
                           "  \"classifier_dropout_prob\": 0.1,\n  \"drop_path_rate\": 0.1,\n"
                           "  \"initializer_range\": 0.02,\n  \"layer_norm_eps\": 1e-06,\n"
                           "  \"reshape_last_stage\": true,\n"
                           "  \"semantic_loss_ignore_index\": 255,\n  \"num_labels\": %d,\n"
                           "  \"id2label\": {",
                       c->decoder_hidden_size, c->gelu_tanh ? "gelu_new" : "gelu", c->num_labels);
    for (int i = 0; i < c->num_labels; i++)
        segformer_text_add(&b, "%s\"%d\": \"LABEL_%d\"", i ? ", " : "", i, i);
    segformer_text_add(&b, "},\n  \"label2id\": {");
    for (int i = 0; i < c->num_labels; i++)
        segformer_text_add(&b, "%s\"LABEL_%d\": %d", i ? ", " : "", i, i);
    segformer_text_add(&b, "}\n}\n");
    return segformer_text_write(&b, dir, "config.json", e);
}

/* preprocessor_config.json as SegformerImageProcessor writes it. */
static int segformer_save_preprocessor(const SegformerConfig *c, const char *dir, Error *e) {
    SegformerText b = {0};
    segformer_text_add(&b, "{\n  \"image_processor_type\": \"SegformerImageProcessor\",\n"
                           "  \"do_resize\": %s,\n", c->do_resize ? "true" : "false");
    if (c->do_resize)
        segformer_text_add(&b, "  \"size\": {\"height\": %d, \"width\": %d},\n",
                           c->input_h, c->input_w);
    segformer_text_add(&b, "  \"resample\": 2,\n  \"do_rescale\": true,\n"
                           "  \"rescale_factor\": 0.00392156862745098,\n"
                           "  \"do_reduce_labels\": false,\n  \"do_normalize\": %s",
                       c->do_normalize ? "true" : "false");
    if (c->do_normalize)
        segformer_text_add(&b, ",\n  \"image_mean\": [%.9g, %.9g, %.9g],\n"
                               "  \"image_std\": [%.9g, %.9g, %.9g]",
                           c->mean[0], c->mean[1], c->mean[2], c->std[0], c->std[1], c->std[2]);
    segformer_text_add(&b, "\n}\n");
    return segformer_text_write(&b, dir, "preprocessor_config.json", e);
}

/* The tensors segformer_head_init leaves out, as the identity: linear_fuse [I .. I] and a batch
 * norm whose scale gamma / sqrt(var + eps) is exactly 1 in float (gamma = sqrt(1 + eps), var 1:
 * the loader computes the same sqrtf and divides it by itself). */
typedef struct SegformerIdentityHead {
    Tensor *fuse, *gamma, *beta, *mean, *var;
    int64_t batches; /* num_batches_tracked */
} SegformerIdentityHead;

static void segformer_identity_head_free(SegformerIdentityHead *h) {
    tensor_free(h->fuse);
    tensor_free(h->gamma);
    tensor_free(h->beta);
    tensor_free(h->mean);
    tensor_free(h->var);
}

static int segformer_identity_head(const SegformerConfig *c, SegformerIdentityHead *h, Error *e) {
    int64_t D = c->decoder_hidden_size, n = c->stages;
    *h = (SegformerIdentityHead){.fuse = TENSOR_NEW(D, n * D, 1, 1), .gamma = TENSOR_NEW(D),
                                 .beta = TENSOR_NEW(D), .mean = TENSOR_NEW(D),
                                 .var = TENSOR_NEW(D)};
    if (!h->fuse || !h->gamma || !h->beta || !h->mean || !h->var) {
        segformer_identity_head_free(h);
        return error_set(e, "out of memory saving the detector");
    }
    for (int64_t o = 0; o < D; o++) {
        for (int64_t k = 0; k < n; k++) h->fuse->data[o * n * D + k * D + o] = 1.0f;
        h->gamma->data[o] = sqrtf(1.0f + SEGFORMER_NORM_EPS);
        h->var->data[o] = 1.0f;
    }
    return 0;
}

static int segformer_save_weights(const Segformer *m, const char *dir, Error *e) {
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, "model.safetensors", e)) return -1;
    SegformerIdentityHead h;
    if (segformer_identity_head(segformer_config(m), &h, e)) return -1;
    const Params *params = segformer_params(m);
    int n = params_count(params);
    StWriteTensor *list = malloc((size_t)(n + 6) * sizeof *list);
    if (!list) {
        segformer_identity_head_free(&h);
        return error_set(e, "out of memory saving the detector");
    }
    for (int i = 0; i < n; i++)
        list[i] = st_entry_f32(params_name(params, i), params_var(params, i)->value);
    list[n] = st_entry_f32("decode_head.linear_fuse.weight", h.fuse);
    list[n + 1] = st_entry_f32("decode_head.batch_norm.weight", h.gamma);
    list[n + 2] = st_entry_f32("decode_head.batch_norm.bias", h.beta);
    list[n + 3] = st_entry_f32("decode_head.batch_norm.running_mean", h.mean);
    list[n + 4] = st_entry_f32("decode_head.batch_norm.running_var", h.var);
    list[n + 5] = (StWriteTensor){.name = "decode_head.batch_norm.num_batches_tracked",
                                  .dtype = DTYPE_I64, .ndim = 0, .data = &h.batches};
    int rc = st_write(path, list, (size_t)n + 6, e);
    free(list);
    segformer_identity_head_free(&h);
    return rc;
}

int segformer_save(const Segformer *m, const char *dir, Error *e) {
    if (!segformer_head_is_trainable(m))
        return error_set(e, "saving the detector to %s: its decode head was folded when loaded; "
                            "only a detector opened WEIGHTS_FRESH can be saved", dir);
    if (dir_make(dir, e) || segformer_save_config(segformer_config(m), dir, e) ||
        segformer_save_preprocessor(segformer_config(m), dir, e) ||
        segformer_save_weights(m, dir, e))
        return -1;
    return 0;
}

/* === the VAE === */

/* true when one of items[0 .. n-1] is called name. */
static bool items_hold(const StWriteTensor *items, size_t n, const char *name) {
    for (size_t j = 0; j < n; j++)
        if (!strcmp(items[j].name, name)) return true;
    return false;
}

/* The entries of p as F32 tensors appended to items[*n], skipping names already there. */
static void vae_save_entries(const Params *p, StWriteTensor *items, size_t *n) {
    for (int i = 0; i < params_count(p); i++) {
        const char *name = params_name(p, i);
        if (!items_hold(items, *n, name))
            items[(*n)++] = st_entry_f32(name, params_var(p, i)->value);
    }
}

int vae_save(const VaeEncoder *enc, const VaeDecoder *dec, const char *config_dir,
             const char *out_dir, Error *e) {
    char path[PATH_BYTES];
    char *config = NULL;
    size_t len = 0;
    if (path_join(path, sizeof path, config_dir, "config.json", e)) return -1;
    if (file_read_all(path, &config, &len, e)) return -1;
    int rc = dir_make(out_dir, e) || path_join(path, sizeof path, out_dir, "config.json", e) ||
                     write_file_atomic(path, config, len, e)
                 ? -1
                 : 0;
    free(config);
    const Params *pe = vae_encoder_params(enc), *pd = vae_decoder_params(dec);
    StWriteTensor *items = calloc((size_t)(params_count(pe) + params_count(pd)), sizeof *items);
    if (rc == 0 && !items) rc = error_set(e, "out of memory saving the VAE");
    if (rc == 0) {
        size_t n = 0;
        vae_save_entries(pe, items, &n);
        vae_save_entries(pd, items, &n);
        rc = path_join(path, sizeof path, out_dir, "diffusion_pytorch_model.safetensors", e) ||
                     st_write(path, items, n, e)
                 ? -1
                 : 0;
    }
    free(items);
    return rc;
}
