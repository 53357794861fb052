/* nn.c - layers and models built from tensor.c kernels through autograd.c ops. */
#include "nn.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

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

/* ---- section: vae (owned by the vae work) ------------------------------------------------ */

#include <math.h>
#include <string.h>

/* diffusers' Decoder fixes the GroupNorm eps of its resnets, mid-block attention and
 * conv_norm_out at 1e-6; it is not in config.json. Only the latent batch norm uses the
 * config's batch_norm_eps. */
#define VAE_NORM_EPS 1e-6f

/* Memory of a checkpointed decode with grad (f32, batch 1): every block boundary stays on the
 * tape until backward reaches it, plus one block's recomputed intermediates and gradients.
 * For the real config (block_out_channels 128, 256, 512, 512; 3 resnets per up block) at
 * 1024x1024 the boundaries are about 4.6 GB (mostly the 512x512 and 1024x1024 stages: up block
 * 2's resnets 3 x 256 MB and upsampler 1 GB, up block 3's resnets 3 x 512 MB), and the
 * largest block, an up block 3 resnet at 128 channels x 1024x1024, recomputes about seven
 * 512 MB tensors: a peak near 9-10 GB, against roughly 30 GB without checkpoints. The
 * attention adds O(N d): 512 channels x 128x128 tokens. */

static int vae_config_read(VaeConfig *c, const JsonValue *root, Error *e) {
    int64_t latent, out, layers, groups, blocks[VAE_MAX_BLOCKS], patch[2];
    size_t n_blocks = 0, n_patch = 0;
    double bn_eps;
    const char *act;
    if (json_get_int(root, "latent_channels", &latent, e) ||
        json_get_int(root, "out_channels", &out, e) ||
        json_get_int(root, "layers_per_block", &layers, e) ||
        json_get_int(root, "norm_num_groups", &groups, e) ||
        json_get_float(root, "batch_norm_eps", &bn_eps, e) ||
        json_get_string(root, "act_fn", &act, e) ||
        json_get_bool(root, "use_post_quant_conv", &c->use_post_quant_conv, e) ||
        json_get_bool(root, "mid_block_add_attention", &c->mid_block_add_attention, e) ||
        json_get_int_array(root, "patch_size", patch, 2, &n_patch, e))
        return -1;
    /* the decoder takes decoder_block_out_channels when it is set, else block_out_channels */
    const JsonValue *dec = json_get(root, "decoder_block_out_channels");
    const char *key = dec && dec->type != JSON_NULL ? "decoder_block_out_channels"
                                                    : "block_out_channels";
    if (json_get_int_array(root, key, blocks, VAE_MAX_BLOCKS, &n_blocks, e)) return -1;
    const char *src = root->source;
    if (strcmp(act, "silu") && strcmp(act, "swish"))
        return error_set(e, "%s: act_fn '%s' is not supported (only silu)", src, act);
    if (n_patch != 2 || patch[0] < 1 || patch[1] < 1 || patch[0] > 64 || patch[1] > 64)
        return error_set(e, "%s: patch_size must be two sizes in 1..64", src);
    if (latent < 1 || latent > 1 << 16 || out < 1 || out > 1 << 16 || layers < 0 || layers > 64 ||
        groups < 1 || n_blocks < 1 || !(bn_eps >= 0))
        return error_set(e, "%s: latent_channels, out_channels, layers_per_block, norm_num_groups,"
                            " batch_norm_eps or %s out of range", src, key);
    for (size_t i = 0; i < n_blocks; i++)
        if (blocks[i] < 1 || blocks[i] > 1 << 16 || blocks[i] % groups)
            return error_set(e, "%s: %s[%zu] = %lld is not a positive multiple of norm_num_groups"
                             " %lld", src, key, i, (long long)blocks[i], (long long)groups);
    const JsonValue *types = json_get(root, "up_block_types");
    if (!types) return error_set(e, "%s: key 'up_block_types' is missing", src);
    if (types->type != JSON_ARRAY || types->count != n_blocks)
        return error_set(e, "%s: up_block_types must list one type per entry of %s", src, key);
    for (size_t i = 0; i < n_blocks; i++)
        if (types->items[i].type != JSON_STRING ||
            strcmp(types->items[i].string, "UpDecoderBlock2D"))
            return error_set(e, "%s: up_block_types[%zu] is not \"UpDecoderBlock2D\"", src, i);
    *c = (VaeConfig){.latent_channels = (int)latent, .out_channels = (int)out,
                     .n_blocks = (int)n_blocks, .layers_per_block = (int)layers,
                     .norm_num_groups = (int)groups, .patch_h = (int)patch[0],
                     .patch_w = (int)patch[1], .batch_norm_eps = (float)bn_eps,
                     .use_post_quant_conv = c->use_post_quant_conv,
                     .mid_block_add_attention = c->mid_block_add_attention};
    for (size_t i = 0; i < n_blocks; i++) c->block_out_channels[i] = (int)blocks[i];
    return 0;
}

static void vae_resnet_free(VaeResnet *r) {
    norm_free(&r->norm1);
    norm_free(&r->norm2);
    conv2d_free(&r->conv1);
    conv2d_free(&r->conv2);
    conv2d_free(&r->conv_shortcut);
}

/* "<prefix>.<part>" in the caller's name buffer */
#define VAE_NAME(part) (snprintf(name, sizeof name, "%s.%s", prefix, part), name)

static int vae_resnet_load(VaeResnet *r, const StModel *st, int in, int out, int groups,
                           const char *prefix, Error *e) {
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

static void vae_attention_free(VaeAttention *a) {
    norm_free(&a->group_norm);
    linear_free(&a->to_q);
    linear_free(&a->to_k);
    linear_free(&a->to_v);
    linear_free(&a->to_out);
}

static int vae_attention_load(VaeAttention *a, const StModel *st, int channels, int groups,
                              const char *prefix, Error *e) {
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

/* bn.running_mean and sqrt(bn.running_var + batch_norm_eps) over the packed channels. */
static int vae_latent_stats_load(VaeDecoder *m, const StModel *st, Error *e) {
    int packed = m->config.latent_channels * m->config.patch_h * m->config.patch_w;
    if (param_load(st, &m->bn_mean, e, SHAPE(packed), "bn.running_mean") ||
        param_load(st, &m->bn_std, e, SHAPE(packed), "bn.running_var"))
        return -1;
    for (int i = 0; i < packed; i++) {
        if (!(m->bn_std->data[i] >= 0.0f))
            return error_set(e, "tensor 'bn.running_var' has a negative or NaN entry at %d", i);
        m->bn_std->data[i] = sqrtf(m->bn_std->data[i] + m->config.batch_norm_eps);
    }
    return 0;
}

static int vae_weights_load(VaeDecoder *m, const StModel *st, Error *e) {
    const VaeConfig *c = &m->config;
    int groups = c->norm_num_groups, top = c->block_out_channels[c->n_blocks - 1];
    char name[192];
    if (vae_latent_stats_load(m, st, e) ||
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
        if (b < c->n_blocks - 1 && conv2d_load(&u->upsampler, st, out, out, 3, 1, 1, 1, true, name, e))
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

int vae_decoder_load(VaeDecoder **out, const char *dir, Error *e) {
    *out = NULL;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
        return error_set(e, "VAE directory name too long: %s", dir);
    VaeDecoder *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading the VAE decoder");
    m->checkpoint = true;
    JsonDoc *doc = NULL;
    StModel *st = NULL;
    int rc = json_parse_file(&doc, path, e) || vae_config_read(&m->config, json_root(doc), e) ||
             st_model_open(&st, dir, e) || vae_weights_load(m, st, e);
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
    tensor_free(m->bn_mean);
    tensor_free(m->bn_std);
    conv2d_free(&m->post_quant_conv);
    conv2d_free(&m->conv_in);
    vae_resnet_free(&m->mid_resnets[0]);
    vae_resnet_free(&m->mid_resnets[1]);
    vae_attention_free(&m->mid_attention);
    for (int b = 0; b < VAE_MAX_BLOCKS; b++) {
        VaeUpBlock *u = &m->up_blocks[b];
        for (int r = 0; u->resnets && r <= m->config.layers_per_block; r++)
            vae_resnet_free(&u->resnets[r]);
        free(u->resnets);
        conv2d_free(&u->upsampler);
    }
    norm_free(&m->conv_norm_out);
    conv2d_free(&m->conv_out);
    free(m);
}

/* x: [B, C, H, W] -> SiLU(GroupNorm(x)) */
static Var *vae_norm_silu(Tape *t, const NormParams *n, int groups, Var *x) {
    return ag_silu(t, ag_groupnorm(t, x, groups, param_var(t, n->weight), param_var(t, n->bias),
                                   VAE_NORM_EPS));
}

/* The blocks below are CheckpointFns over one input; ctx points at their weights.
 * x: [B, in, H, W] -> [B, out, H, W] */
static Var *vae_resnet_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeResnet *r = ctx;
    Var *x = inputs[0];
    Var *h = conv2d_apply(t, &r->conv1, vae_norm_silu(t, &r->norm1, r->groups, x));
    h = conv2d_apply(t, &r->conv2, vae_norm_silu(t, &r->norm2, r->groups, h));
    Var *skip = r->conv_shortcut.weight ? conv2d_apply(t, &r->conv_shortcut, x) : x;
    return ag_add(t, skip, h);
}

/* x: [B, C, H, W] -> x + to_out(attention(group_norm(x))), one head of C dims over the H*W
 * pixels as tokens (the blocked attention keeps it O(H*W*C) in memory). */
static Var *vae_attention_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeAttention *a = ctx;
    Var *x = inputs[0];
    int64_t B = x->value->shape[0], C = x->value->shape[1];
    int64_t N = x->value->shape[2] * x->value->shape[3];
    Var *n = ag_groupnorm(t, x, a->groups, param_var(t, a->group_norm.weight),
                          param_var(t, a->group_norm.bias), VAE_NORM_EPS);
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

/* x: [B, C, H, W] -> [B, C, 2H, 2W]: nearest 2x, then the 3x3 conv */
static Var *vae_upsample_apply(Tape *t, Var **inputs, void *ctx) {
    const Conv2d *conv = ctx;
    return conv2d_apply(t, conv, ag_upsample_nearest2x(t, inputs[0]));
}

/* x: [B, block_out_channels[0], H, W] -> image [B, out_channels, H, W] */
static Var *vae_head_apply(Tape *t, Var **inputs, void *ctx) {
    const VaeDecoder *m = ctx;
    return conv2d_apply(t, &m->conv_out, vae_norm_silu(t, &m->conv_norm_out,
                                                       m->config.norm_num_groups, inputs[0]));
}

/* One block, through ag_checkpoint when the model asks for it. The functions only read ctx,
 * so handing them the const weights through CheckpointFn's void * is safe. */
static Var *vae_block(Tape *t, const VaeDecoder *m, CheckpointFn fn, const void *ctx, Var *x) {
    if (m->checkpoint) return ag_checkpoint(t, fn, (void *)ctx, &x, 1);
    return x ? fn(t, &x, (void *)ctx) : NULL;
}

/* tokens: [B, h*w, C*ph*pw] -> latent [B, C, h*ph, w*pw]: the FLUX.2 pipeline's
 * de-normalisation with the VAE batch norm's running statistics, then unpatchify: packed
 * channel c*ph*pw + pi*pw + pj of token (y, x) is pixel (y*ph + pi, x*pw + pj) of channel c.
 * Tensors stop at 5 dims, so the 6-dim permute of upstream is done in two steps. */
static Var *vae_unpack(Tape *t, const VaeDecoder *m, Var *tokens, int h, int w) {
    const VaeConfig *c = &m->config;
    int64_t C = c->latent_channels, ph = c->patch_h, pw = c->patch_w;
    Var *x = ag_add_rows(t, ag_mul_rows(t, tokens, param_var(t, m->bn_std)),
                         param_var(t, m->bn_mean)); /* also checks the packed channel count */
    if (!x) return NULL;
    int64_t B = x->value->shape[0]; /* the reshape below checks h*w against the token count */
    x = ag_reshape(t, x, 5, (int64_t[]){B * h, w, C, ph, pw});
    x = ag_permute(t, x, (int[]){0, 2, 3, 1, 4}); /* [B*h, C, ph, w, pw] */
    x = ag_reshape(t, x, 4, (int64_t[]){B, h, C, ph * w * pw});
    x = ag_permute(t, x, (int[]){0, 2, 1, 3}); /* [B, C, h, ph*w*pw] */
    return ag_reshape(t, x, 4, (int64_t[]){B, C, h * ph, w * pw});
}

Var *vae_decode(Tape *t, const VaeDecoder *m, Var *tokens, int h, int w) {
    const VaeConfig *c = &m->config;
    Var *x = vae_unpack(t, m, tokens, h, w);
    if (c->use_post_quant_conv) x = conv2d_apply(t, &m->post_quant_conv, x);
    x = conv2d_apply(t, &m->conv_in, x);
    x = vae_block(t, m, vae_resnet_apply, &m->mid_resnets[0], x);
    if (c->mid_block_add_attention) x = vae_block(t, m, vae_attention_apply, &m->mid_attention, x);
    x = vae_block(t, m, vae_resnet_apply, &m->mid_resnets[1], x);
    for (int b = 0; b < c->n_blocks; b++) {
        const VaeUpBlock *u = &m->up_blocks[b];
        for (int r = 0; r <= c->layers_per_block; r++)
            x = vae_block(t, m, vae_resnet_apply, &u->resnets[r], x);
        if (u->upsampler.weight) x = vae_block(t, m, vae_upsample_apply, &u->upsampler, x);
    }
    return vae_block(t, m, vae_head_apply, m, x);
}

/* ---- end section: vae ---- */
