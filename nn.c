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
