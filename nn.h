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

#endif
