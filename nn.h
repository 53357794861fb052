/* nn.h - layers and models built from tensor.c kernels through autograd.c ops.
 *
 * Models read their architecture from config files and their weights from safetensors by the
 * real upstream tensor names. Parameters are f32 Tensors owned by the model; a forward pass wraps
 * them as constant leaves (var_new(t, w, false)) on the caller's tape, so gradients flow to the
 * inputs only. */
#ifndef DIAMOND_NN_H
#define DIAMOND_NN_H

#include "autograd.h"

/* ---- parameters and basic layers -------------------------------------------------------- */

/* Reads the F32/F16/BF16 tensor named by name_fmt (printf-style) from m as a new f32 Tensor
 * of exactly `shape`. A missing tensor or another shape is an error naming the tensor. */
int param_load(const StModel *m, Tensor **out, Error *e, int ndim, const int64_t *shape,
               const char *name_fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;
/* SHAPE(a, b, c) stands for the (ndim, shape) argument pair:
 *     param_load(m, &w, e, SHAPE(out, in), "blocks.%d.proj.weight", i) */
#define SHAPE(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}

/* y = x W^T + b. weight: [out, in], bias: [out] or NULL. Names: <prefix>.weight, <prefix>.bias */
typedef struct Linear {
    Tensor *weight, *bias;
} Linear;
int linear_load(Linear *l, const StModel *m, int in, int out, bool bias, const char *prefix,
                Error *e);
void linear_free(Linear *l);
/* x: [.., in] -> [.., out] */
Var *linear_apply(Tape *t, const Linear *l, Var *x);

/* weight: [out, in/groups, k, k], bias: [out] or NULL. Names: <prefix>.weight, <prefix>.bias */
typedef struct Conv2d {
    Tensor *weight, *bias;
    int stride, padding, groups;
} Conv2d;
int conv2d_load(Conv2d *c, const StModel *m, int in, int out, int kernel, int stride, int padding,
                int groups, bool bias, const char *prefix, Error *e);
void conv2d_free(Conv2d *c);
/* x: [B, in, H, W] -> [B, out, Ho, Wo] */
Var *conv2d_apply(Tape *t, const Conv2d *c, Var *x);

/* The affine part of a LayerNorm / GroupNorm / RMSNorm: weight [C] and optional bias [C].
 * Names: <prefix>.weight, <prefix>.bias */
typedef struct NormParams {
    Tensor *weight, *bias;
} NormParams;
int norm_load(NormParams *n, const StModel *m, int channels, bool bias, const char *prefix,
              Error *e);
void norm_free(NormParams *n);

/* A constant leaf over a parameter (NULL stays NULL, for optional biases). */
Var *param_var(Tape *t, Tensor *p);

/* ---- section: flux2 ---------------------------------------------------------------------------
 * FLUX.2's flow transformer (diffusers' Flux2Transformer2DModel; klein-4B and its kin), forward
 * only. The weights stay in the mapped safetensors files: each part of a block (its attention
 * inputs, each stream's output and feed-forward) is converted to f32 only while it runs, and the
 * token-wise layers run over chunks of tokens, so the memory a call needs is one part's weights
 * plus a few [tokens, dim] tensors, not the whole model in f32. */

/* RoPE axes: the pipeline's position ids are (T, H, W, L). */
#define FLUX2_AXES 4

/* transformer/config.json (absent patch_size = 1 and null out_channels = in_channels, as
 * upstream). dim = heads * head_dim; mlp_hidden = int(dim * mlp_ratio). */
typedef struct Flux2Config {
    int patch_size, in_channels, out_channels;
    int num_layers, num_single_layers;    /* double-stream, single-stream blocks */
    int heads, head_dim, dim, mlp_hidden;
    int joint_attention_dim;              /* the prompt embedding's width */
    int timestep_channels;                /* timestep_guidance_channels */
    int axes_dims[FLUX2_AXES];            /* axes_dims_rope; they sum to head_dim */
    double rope_theta, eps;
    bool guidance_embeds;
} Flux2Config;

typedef struct Flux2 Flux2;

/* Opens <dir>/config.json and the weights in dir (one file or an index over shards) and checks
 * that every tensor the config implies is there with its shape (an error names the first one that
 * is not), without converting any. */
int flux2_load(Flux2 **out, const char *dir, Error *e);
/* The model config_path describes, with st_model_random weights from seed instead of files (the
 * same tensor names and shapes flux2_load checks): for timings and memory without the files. */
int flux2_load_config_only(Flux2 **out, const char *config_path, uint64_t seed, Error *e);
void flux2_free(Flux2 *m);
const Flux2Config *flux2_config(const Flux2 *m);

/* The velocity at noise level sigma[b] (in [0, 1]; the model embeds sigma * 1000).
 * tokens: [B, h*w, in_channels], the packed latent tokens of an h x w grid in row-major order;
 * txt: [B, L, joint_attention_dim], the prompt embeddings; sigma: [B]; guidance: [B] or NULL
 * (used only when the config has guidance_embeds, as upstream) -> *velocity: [B, h*w,
 * patch_size^2 * out_channels], a new tensor the caller frees. Runs with grad off on short tapes
 * of its own; the model holds no state between calls. */
int flux2_forward(const Flux2 *m, const Tensor *tokens, int h, int w, const Tensor *txt,
                  const float *sigma, const float *guidance, Tensor **velocity, Error *e);

/* ---- end section: flux2 ---- */

#endif
