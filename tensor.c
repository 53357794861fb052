/* tensor.c - float32 tensors and the kernels: GEMM, conv, attention, norms, activations.
 * Every forward kernel sits next to its backward. */
#include "tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- tensors ---------------------------------------------------------------------------- */

/* Element count of a shape, or -1 when invalid or past what we allow (2^40 floats). */
static int64_t shape_numel(int ndim, const int64_t *shape) {
    if (ndim < 1 || ndim > TENSOR_MAX_DIMS) return -1;
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] > 0 && n > ((int64_t)1 << 40) / shape[i])) return -1;
        n *= shape[i];
    }
    return n;
}

static Tensor *tensor_header(int ndim, const int64_t *shape) {
    int64_t n = shape_numel(ndim, shape);
    if (n < 0) return NULL;
    Tensor *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->numel = n;
    return t;
}

Tensor *tensor_new(int ndim, const int64_t *shape) {
    Tensor *t = tensor_header(ndim, shape);
    if (!t) return NULL;
    t->data = calloc(t->numel > 0 ? (size_t)t->numel : 1, sizeof(float));
    if (!t->data) {
        free(t);
        return NULL;
    }
    t->owns_data = true;
    return t;
}

Tensor *tensor_view(float *data, int ndim, const int64_t *shape) {
    Tensor *t = tensor_header(ndim, shape);
    if (t) t->data = data;
    return t;
}

Tensor *tensor_reshape(const Tensor *t, int ndim, const int64_t *shape) {
    if (shape_numel(ndim, shape) != t->numel) return NULL;
    return tensor_view(t->data, ndim, shape);
}

Tensor *tensor_clone(const Tensor *t) {
    Tensor *c = tensor_new(t->ndim, t->shape);
    if (c) memcpy(c->data, t->data, (size_t)t->numel * sizeof(float));
    return c;
}

void tensor_free(Tensor *t) {
    if (!t) return;
    if (t->owns_data) free(t->data);
    free(t);
}

bool tensor_same_shape(const Tensor *a, const Tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

const char *tensor_shape_str(const Tensor *t, char *buf, size_t len) {
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < t->ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (used < len) snprintf(buf + used, len - used, "]");
    return buf;
}

/* ---- section: GEMM (owned by the gemm work) --------------------------------------------- */

void gemm_reference(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                float a = trans_a ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = trans_b ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += (double)a * b;
            }
            float prior = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
            C[(size_t)i * ldc + j] = alpha * (float)acc + prior;
        }
}

/* Placeholder until the blocked kernel lands: the reference product. */
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A, int lda,
          const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- end section: GEMM ---- */

/* ---- section: conv2d (owned by the conv work) ------------------------------------------- */

/* ---- end section: conv2d ---- */

/* ---- section: attention and rotary embedding (owned by the attention work) --------------- */

/* ---- end section: attention and rotary embedding ---- */

/* ---- section: norms, activations, resampling, elementwise (owned by the ops work) -------- */

/* ---- end section: norms, activations, resampling, elementwise ---- */
