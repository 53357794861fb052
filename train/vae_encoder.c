/* train/vae_encoder.c - the encoder half of diffusers' AutoencoderKLFlux2 (autoencoder_kl_flux2.py
 * with vae.py's Encoder), which only training needs: it turns the words world's images into the
 * latents the flow model learns, and trains with the decoder. Built from nn.c's VAE layers.
 *   names   encoder.conv_in, encoder.down_blocks.N.resnets.M.{norm1,conv1,norm2,conv2,
 *           conv_shortcut}, encoder.down_blocks.N.downsamplers.0.conv, encoder.mid_block
 *           (as the decoder's), encoder.conv_norm_out, encoder.conv_out, quant_conv, bn.*
 *   encode  conv_in; each down block: layers_per_block resnets, then (all but the last) a zero
 *           row and column at the bottom and right and a 3x3 conv of stride 2; mid block; GN,
 *           SiLU, conv_out to the mean and log-variance; quant_conv; the mean patchified,
 *           normalised by the batch norm and packed into tokens
 *
 * Contents: loading; the latent statistics; the encoder. */
#include "train.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* === loading === */

/* One diffusers VAE directory holds both halves: the encoder leaves the decoder's tensors. */
static const char *const vae_encoder_leaves[] = {"decoder.", "post_quant_conv.", NULL};

/* layers_per_block resnets, then (all but the last block) the downsampler: one zero row and
 * column padded at the bottom and right, then a 3x3 conv of stride 2 without padding. */
typedef struct VaeDownBlock {
    VaeResnet *resnets;
    Conv2d downsampler; /* weight NULL in the last block */
} VaeDownBlock;

struct VaeEncoder {
    VaeConfig config;
    Params *params;
    Var *bn_mean, *bn_var;      /* buffers, [latent_channels * patch_h * patch_w] */
    Var *bn_neg_mean, *bn_rstd; /* constants: -bn_mean, 1 / sqrt(bn_var + batch_norm_eps) */
    Conv2d conv_in;
    VaeDownBlock down_blocks[VAE_MAX_BLOCKS];
    VaeResnet mid_resnets[2];
    VaeAttention mid_attention; /* weights NULL when mid_block_add_attention is false */
    NormParams conv_norm_out;
    Conv2d conv_out;            /* to 2 * latent_channels: the mean, then the log-variance */
    Conv2d quant_conv;          /* 1x1, weight NULL when use_quant_conv is false */
};

/* The keys only the encoder reads; block_out_channels is the encoder's even when the decoder
 * has decoder_block_out_channels. */
static int vae_encoder_config_read(VaeConfig *c, const JsonValue *root, Error *e) {
    if (vae_config_read(c, root, e) ||
        json_get_int_in(root, "in_channels", 1, 1 << 16, &c->in_channels, e) ||
        json_get_bool(root, "use_quant_conv", &c->use_quant_conv, e))
        return -1;
    return vae_config_channels(root, "block_out_channels", "down_block_types",
                               "DownEncoderBlock2D", c->norm_num_groups, c->down_block_out_channels,
                               &c->n_down_blocks, e);
}

/* (x - bn_mean) / sqrt(bn_var + eps) as x + bn_neg_mean, times bn_rstd: recomputes both
 * constants from the buffers. */
static int vae_encoder_stats_derive(VaeEncoder *m, Error *e) {
    for (int64_t i = 0; i < m->bn_mean->value->numel; i++)
        m->bn_neg_mean->value->data[i] = -m->bn_mean->value->data[i];
    return vae_latent_std(&m->config, m->bn_var, true, m->bn_rstd->value, e);
}

static int vae_encoder_stats_load(VaeEncoder *m, Params *st, Error *e) {
    if (vae_latent_stats_load(&m->config, st, &m->bn_mean, &m->bn_var, e)) return -1;
    if (!(m->bn_neg_mean = params_constant(st, tensor_new(1, m->bn_mean->value->shape), e)) ||
        !(m->bn_rstd = params_constant(st, tensor_new(1, m->bn_var->value->shape), e)))
        return -1;
    return vae_encoder_stats_derive(m, e);
}

static int vae_encoder_weights_load(VaeEncoder *m, Params *st, Error *e) {
    const VaeConfig *c = &m->config;
    int groups = c->norm_num_groups, n = c->n_down_blocks;
    int bottom = c->down_block_out_channels[0], top = c->down_block_out_channels[n - 1];
    int moments = 2 * c->latent_channels;
    char name[192];
    if (vae_encoder_stats_load(m, st, e) ||
        conv2d_load(&m->conv_in, st, c->in_channels, bottom, 3, 1, 1, 1, true, "encoder.conv_in",
                    e))
        return -1;
    /* the first resnet of each block changes channels */
    int in = bottom;
    for (int b = 0; b < n; b++) {
        int out = c->down_block_out_channels[b];
        VaeDownBlock *d = &m->down_blocks[b];
        /* one spare entry, so that layers_per_block 0 never asks calloc for 0 bytes */
        d->resnets = calloc((size_t)c->layers_per_block + 1, sizeof *d->resnets);
        if (!d->resnets) return error_set(e, "out of memory loading the VAE encoder");
        for (int r = 0; r < c->layers_per_block; r++) {
            snprintf(name, sizeof name, "encoder.down_blocks.%d.resnets.%d", b, r);
            if (vae_resnet_load(&d->resnets[r], st, r == 0 ? in : out, out, groups, name, e))
                return -1;
        }
        snprintf(name, sizeof name, "encoder.down_blocks.%d.downsamplers.0.conv", b);
        if (b < n - 1 && conv2d_load(&d->downsampler, st, out, out, 3, 2, 0, 1, true, name, e))
            return -1;
        in = out;
    }
    if (vae_resnet_load(&m->mid_resnets[0], st, top, top, groups, "encoder.mid_block.resnets.0",
                        e) ||
        (c->mid_block_add_attention &&
         vae_attention_load(&m->mid_attention, st, top, groups, "encoder.mid_block.attentions.0",
                            e)) ||
        vae_resnet_load(&m->mid_resnets[1], st, top, top, groups, "encoder.mid_block.resnets.1",
                        e) ||
        norm_load(&m->conv_norm_out, st, top, true, "encoder.conv_norm_out", e) ||
        conv2d_load(&m->conv_out, st, top, moments, 3, 1, 1, 1, true, "encoder.conv_out", e) ||
        (c->use_quant_conv &&
         conv2d_load(&m->quant_conv, st, moments, moments, 1, 1, 0, 1, true, "quant_conv", e)))
        return -1;
    return 0;
}

int vae_encoder_open(VaeEncoder **out, const char *dir, WeightSource source, uint64_t seed,
                     Error *e) {
    *out = NULL;
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, "config.json", e)) return -1;
    VaeEncoder *m = calloc(1, sizeof *m);
    if (!m) return error_set(e, "out of memory loading the VAE encoder");
    JsonDoc *doc = NULL;
    StModel *st = NULL;
    int rc = json_parse_file(&doc, path, e) ||
             vae_encoder_config_read(&m->config, json_root(doc), e) ||
             params_open(&m->params, &st, dir, source, seed, e) ||
             vae_encoder_weights_load(m, m->params, e) ||
             weights_all_read(source, st, params_reads, m->params, vae_encoder_leaves, dir, e);
    json_free(doc);
    st_model_close(st);
    if (rc) {
        vae_encoder_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

void vae_encoder_free(VaeEncoder *m) {
    if (!m) return;
    for (int b = 0; b < VAE_MAX_BLOCKS; b++) free(m->down_blocks[b].resnets);
    params_free(m->params);
    free(m);
}

const VaeConfig *vae_encoder_config(const VaeEncoder *m) {
    return &m->config;
}

void vae_encoder_token_size(const VaeEncoder *m, int *rows, int *cols) {
    const VaeConfig *c = vae_encoder_config(m);
    *rows = c->patch_h << (c->n_down_blocks - 1);
    *cols = c->patch_w << (c->n_down_blocks - 1);
}

Params *vae_encoder_params(const VaeEncoder *m) {
    return m->params;
}

/* === the latent statistics === */

/* The encoder's statistics and then the decoder's. */
int vae_set_latent_stats(VaeEncoder *enc, VaeDecoder *dec, const float *mean, const float *var,
                         Error *e) {
    if (enc) {
        memcpy(enc->bn_mean->value->data, mean, (size_t)enc->bn_mean->value->numel * sizeof *mean);
        memcpy(enc->bn_var->value->data, var, (size_t)enc->bn_var->value->numel * sizeof *var);
        if (vae_encoder_stats_derive(enc, e)) return -1;
    }
    return dec ? vae_decoder_set_latent_stats(dec, mean, var, e) : 0;
}

/* === the encoder === */

/* x: [B, C, H, W] -> [B, C, H+1, W+1], zeros in the new last row and column: upstream's
 * F.pad(x, (0, 1, 0, 1)) before its stride-2 conv without padding. */
static Var *vae_pad_bottom_right(Tape *t, Var *x) {
    if (!x) return NULL;
    const int64_t *s = x->value->shape;
    Var *column = var_take(t, TENSOR_NEW(s[0], s[1], s[2], 1), false);
    Var *wide = ag_concat(t, (Var *[]){x, column}, 2, 3);
    Var *row = var_take(t, TENSOR_NEW(s[0], s[1], 1, s[3] + 1), false);
    return ag_concat(t, (Var *[]){wide, row}, 2, 2);
}

Var *vae_encode_moments(Tape *t, const VaeEncoder *m, Var *image, Var **logvar) {
    const VaeConfig *c = &m->config;
    if (logvar) *logvar = NULL;
    Var *x = conv2d_apply(t, &m->conv_in, image);
    for (int b = 0; b < c->n_down_blocks; b++) {
        const VaeDownBlock *d = &m->down_blocks[b];
        for (int r = 0; r < c->layers_per_block; r++) x = vae_resnet_forward(t, &d->resnets[r], x);
        if (d->downsampler.weight) x = conv2d_apply(t, &d->downsampler, vae_pad_bottom_right(t, x));
    }
    x = vae_resnet_forward(t, &m->mid_resnets[0], x);
    if (c->mid_block_add_attention && x) x = vae_attention_apply(t, &x, (void *)&m->mid_attention);
    x = vae_resnet_forward(t, &m->mid_resnets[1], x);
    x = conv2d_apply(t, &m->conv_out, vae_norm_silu(t, &m->conv_norm_out, c->norm_num_groups, x));
    if (c->use_quant_conv) x = conv2d_apply(t, &m->quant_conv, x);
    if (logvar)
        *logvar = ag_clamp(t, ag_slice(t, x, 1, c->latent_channels, c->latent_channels), -30.0f,
                           20.0f);
    return ag_slice(t, x, 1, 0, c->latent_channels);
}

Var *vae_pack(Tape *t, const VaeConfig *c, Var *latent, int h, int w) {
    int64_t C = c->latent_channels, ph = c->patch_h, pw = c->patch_w;
    int64_t B = latent->value->shape[0];
    Var *x = ag_reshape(t, latent, 4, (int64_t[]){B, C, h, ph * w * pw});
    x = ag_permute(t, x, (int[]){0, 2, 1, 3}); /* [B, h, C, ph*w*pw] */
    x = ag_reshape(t, x, 5, (int64_t[]){B * h, C, ph, w, pw});
    x = ag_permute(t, x, (int[]){0, 3, 1, 2, 4}); /* [B*h, w, C, ph, pw] */
    return ag_reshape(t, x, 3, (int64_t[]){B, (int64_t)h * w, C * ph * pw});
}

Var *vae_encode(Tape *t, const VaeEncoder *m, Var *image, int *h, int *w) {
    const VaeConfig *c = &m->config;
    Var *latent = vae_encode_moments(t, m, image, NULL);
    if (!latent) return NULL;
    *h = (int)(latent->value->shape[2] / c->patch_h);
    *w = (int)(latent->value->shape[3] / c->patch_w);
    Var *tokens = vae_pack(t, c, latent, *h, *w);
    return ag_mul_rows(t, ag_add_rows(t, tokens, m->bn_neg_mean), m->bn_rstd);
}

