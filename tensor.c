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

/* OpenMP only where the work pays for waking the threads; without OpenMP the pragma vanishes
 * (a bare "#pragma omp" would warn under NO_OMP=1). Every such loop writes disjoint outputs. */
#ifdef _OPENMP
#define OPS_PRAGMA(text) _Pragma(#text)
#define OPS_PARALLEL_FOR_IF(cond) OPS_PRAGMA(omp parallel for if (cond))
#else
#define OPS_PARALLEL_FOR_IF(cond)
#endif

#define OPS_PARALLEL_MIN ((size_t)1 << 15)      /* elements of cheap arithmetic */
#define OPS_PARALLEL_MIN_MATH ((size_t)1 << 12) /* elements that each take an exp or erfc */
#define OPS_COLUMN_BLOCK 64                     /* columns one thread owns in a column sum */
#define OPS_REDUCE_CHUNKS 64                    /* fixed chunks of a whole-array reduction */

/* Sum of n floats in double: eight interleaved lanes (so it vectorises), then the lanes and the
 * tail in order. The order depends on n alone. */
static double sum_f64(size_t n, const float *x) {
    double lane[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) lane[k] += x[i + k];
    double s = 0.0;
    for (; i < n; i++) s += x[i];
    for (int k = 0; k < 8; k++) s += lane[k];
    return s;
}

/* Sum of (x - mean)^2 in double, in the same lane order as sum_f64. */
static double sum_sq_dev_f64(size_t n, const float *x, double mean) {
    double lane[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) {
            double d = x[i + k] - mean;
            lane[k] += d * d;
        }
    double s = 0.0;
    for (; i < n; i++) s += (x[i] - mean) * (x[i] - mean);
    for (int k = 0; k < 8; k++) s += lane[k];
    return s;
}

/* Mean and 1/sqrt(biased variance + eps) of n contiguous values, two passes in double. */
static void norm_stats(size_t n, const float *x, float eps, float *mean, float *rstd) {
    double m = sum_f64(n, x) / (double)n;
    double var = sum_sq_dev_f64(n, x, m) / (double)n;
    *mean = (float)m;
    *rstd = (float)(1.0 / sqrt(var + eps));
}

/* Column sums over rows for the gradients of per-column parameters. x, dy: [rows, C]:
 *   dw[c] += sum_r dy[r, c] * (x[r, c] - mean[r]) * rstd[r],   db[c] += sum_r dy[r, c]
 * mean and rstd may be NULL (0 and 1); dw or db NULL is skipped. Each thread owns a block of
 * columns and walks the rows in order, accumulating in double: the thread count cannot change
 * a bit. */
static void column_grads(int rows, int C, const float *x, const float *mean, const float *rstd,
                         const float *dy, float *dw, float *db) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && C > OPS_COLUMN_BLOCK)
    for (int c0 = 0; c0 < C; c0 += OPS_COLUMN_BLOCK) {
        int width = C - c0 < OPS_COLUMN_BLOCK ? C - c0 : OPS_COLUMN_BLOCK;
        double acc_w[OPS_COLUMN_BLOCK] = {0}, acc_b[OPS_COLUMN_BLOCK] = {0};
        for (int r = 0; r < rows; r++) {
            const float *dy_row = dy + (size_t)r * C + c0;
            if (dw) {
                const float *x_row = x + (size_t)r * C + c0;
                float m = mean ? mean[r] : 0.0f, s = rstd ? rstd[r] : 1.0f;
                for (int j = 0; j < width; j++) acc_w[j] += dy_row[j] * ((x_row[j] - m) * s);
            }
            if (db)
                for (int j = 0; j < width; j++) acc_b[j] += dy_row[j];
        }
        for (int j = 0; j < width; j++) {
            if (dw) dw[c0 + j] += (float)acc_w[j];
            if (db) db[c0 + j] += (float)acc_b[j];
        }
    }
}

/* Sums over batch and pixels of channel c, in double, in a fixed order. x, dy: [B, C, HW]:
 *   *sum_dy = sum dy,   *sum_dy_xhat = sum dy * (x - mean[b * stat_stride]) * rstd[b * stat_stride]
 * x == NULL skips the second sum. */
static void channel_sums(int B, int C, int HW, int c, const float *x, const float *mean,
                         const float *rstd, int stat_stride, const float *dy, double *sum_dy,
                         double *sum_dy_xhat) {
    double s_dy = 0.0, s_dy_xhat = 0.0;
    for (int b = 0; b < B; b++) {
        const float *dy_plane = dy + ((size_t)b * C + c) * HW;
        s_dy += sum_f64((size_t)HW, dy_plane);
        if (!x) continue;
        const float *x_plane = x + ((size_t)b * C + c) * HW;
        float m = mean[(size_t)b * stat_stride], s = rstd[(size_t)b * stat_stride];
        double lane[8] = {0};
        int i = 0;
        for (; i + 8 <= HW; i += 8)
            for (int k = 0; k < 8; k++) lane[k] += dy_plane[i + k] * ((x_plane[i + k] - m) * s);
        for (; i < HW; i++) s_dy_xhat += dy_plane[i] * ((x_plane[i] - m) * s);
        for (int k = 0; k < 8; k++) s_dy_xhat += lane[k];
    }
    *sum_dy = s_dy;
    *sum_dy_xhat = s_dy_xhat;
}

/* ---- layernorm ---- */

void layernorm_forward(int rows, int C, float eps, const float *x, const float *w, const float *b,
                       float *y, float *mean, float *rstd) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * C;
        float *yr = y + (size_t)r * C;
        float m, s;
        norm_stats((size_t)C, xr, eps, &m, &s);
        for (int c = 0; c < C; c++) {
            float xhat = (xr[c] - m) * s;
            yr[c] = xhat * (w ? w[c] : 1.0f) + (b ? b[c] : 0.0f);
        }
        mean[r] = m;
        rstd[r] = s;
    }
}

/* With g = dy * w and xhat = (x - mean) * rstd:
 * dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw = sum_rows dy * xhat, db = sum_rows dy. */
void layernorm_backward(int rows, int C, const float *x, const float *w, const float *mean,
                        const float *rstd, const float *dy, float *dx, float *dw, float *db) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * C, *dyr = dy + (size_t)r * C;
            float *dxr = dx + (size_t)r * C;
            float m = mean[r], s = rstd[r];
            double sum_g = 0.0, sum_g_xhat = 0.0;
            for (int c = 0; c < C; c++) {
                float g = dyr[c] * (w ? w[c] : 1.0f);
                sum_g += g;
                sum_g_xhat += g * ((xr[c] - m) * s);
            }
            float mean_g = (float)(sum_g / C), mean_g_xhat = (float)(sum_g_xhat / C);
            for (int c = 0; c < C; c++) {
                float g = dyr[c] * (w ? w[c] : 1.0f);
                float xhat = (xr[c] - m) * s;
                dxr[c] += s * (g - mean_g - xhat * mean_g_xhat);
            }
        }
    }
    column_grads(rows, C, x, mean, rstd, dy, dw, db);
}

/* ---- groupnorm ---- */

/* Group g of sample b is the contiguous block of channels [g * C/groups, (g+1) * C/groups). */
void groupnorm_forward(int B, int C, int HW, int groups, float eps, const float *x, const float *w,
                       const float *b, float *y, float *mean, float *rstd) {
    int group_ch = C / groups;
    size_t group_len = (size_t)group_ch * HW;
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * groups > 1)
    for (int bg = 0; bg < B * groups; bg++) {
        const float *xg = x + (size_t)bg * group_len;
        float *yg = y + (size_t)bg * group_len;
        float m, s;
        norm_stats(group_len, xg, eps, &m, &s);
        for (int k = 0; k < group_ch; k++) {
            int c = (bg % groups) * group_ch + k;
            /* (x - m) first: folding m into the shift would cancel badly when rstd is large */
            float scale = s * (w ? w[c] : 1.0f), shift = b ? b[c] : 0.0f;
            const float *xc = xg + (size_t)k * HW;
            float *yc = yg + (size_t)k * HW;
            for (int i = 0; i < HW; i++) yc[i] = (xc[i] - m) * scale + shift;
        }
        mean[bg] = m;
        rstd[bg] = s;
    }
}

/* The layernorm formula over each group, with w per channel; dw, db per channel over (b, hw). */
void groupnorm_backward(int B, int C, int HW, int groups, const float *x, const float *w,
                        const float *mean, const float *rstd, const float *dy, float *dx,
                        float *dw, float *db) {
    int group_ch = C / groups;
    size_t group_len = (size_t)group_ch * HW;
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * groups > 1)
        for (int bg = 0; bg < B * groups; bg++) {
            int c0 = (bg % groups) * group_ch;
            const float *xg = x + (size_t)bg * group_len, *dyg = dy + (size_t)bg * group_len;
            float *dxg = dx + (size_t)bg * group_len;
            /* sum(g) and sum(g * xhat): per channel (seen as a [1, 1, HW] tensor), times w[c] */
            double sum_g = 0.0, sum_g_xhat = 0.0;
            for (int k = 0; k < group_ch; k++) {
                double s_dy, s_dy_xhat;
                channel_sums(1, 1, HW, 0, xg + (size_t)k * HW, &mean[bg], &rstd[bg], 0,
                             dyg + (size_t)k * HW, &s_dy, &s_dy_xhat);
                float wc = w ? w[c0 + k] : 1.0f;
                sum_g += wc * s_dy;
                sum_g_xhat += wc * s_dy_xhat;
            }
            float m = mean[bg], s = rstd[bg];
            float mean_g = (float)(sum_g / group_len);
            float mean_g_xhat = (float)(sum_g_xhat / group_len);
            for (int k = 0; k < group_ch; k++) {
                float wc = w ? w[c0 + k] : 1.0f;
                const float *xc = xg + (size_t)k * HW, *dyc = dyg + (size_t)k * HW;
                float *dxc = dxg + (size_t)k * HW;
                for (int i = 0; i < HW; i++) {
                    /* g rounded on its own (no fused multiply-subtract): a group of one value
                     * then gets g - mean(g) = 0 exactly, not a rounding error times rstd */
                    float g = dyc[i] * wc;
                    float xhat = (xc[i] - m) * s;
                    dxc[i] += s * (g - mean_g - xhat * mean_g_xhat);
                }
            }
        }
    }
    if (!dw && !db) return;
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        double s_dy, s_dy_xhat;
        int g = c / group_ch;
        channel_sums(B, C, HW, c, dw ? x : NULL, mean + g, rstd + g, groups, dy, &s_dy,
                     &s_dy_xhat);
        if (dw) dw[c] += (float)s_dy_xhat;
        if (db) db[c] += (float)s_dy;
    }
}

/* ---- rmsnorm ---- */

void rmsnorm_forward(int rows, int C, float eps, const float *x, const float *w, float *y,
                     float *rstd) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * C;
        float *yr = y + (size_t)r * C;
        float s = (float)(1.0 / sqrt(sum_sq_dev_f64((size_t)C, xr, 0.0) / C + eps));
        for (int c = 0; c < C; c++) yr[c] = xr[c] * s * (w ? w[c] : 1.0f);
        rstd[r] = s;
    }
}

/* With g = dy * w: dx = rstd * (g - x * rstd^2 * mean(g * x)), dw = sum_rows dy * x * rstd. */
void rmsnorm_backward(int rows, int C, const float *x, const float *w, const float *rstd,
                      const float *dy, float *dx, float *dw) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * C, *dyr = dy + (size_t)r * C;
            float *dxr = dx + (size_t)r * C;
            float s = rstd[r];
            double sum_gx = 0.0;
            for (int c = 0; c < C; c++) sum_gx += dyr[c] * (w ? w[c] : 1.0f) * xr[c];
            float k = (float)(sum_gx / C) * s * s;
            for (int c = 0; c < C; c++) dxr[c] += s * (dyr[c] * (w ? w[c] : 1.0f) - xr[c] * k);
        }
    }
    column_grads(rows, C, x, NULL, rstd, dy, dw, NULL);
}

/* ---- batchnorm with running statistics ---- */

void batchnorm_eval_forward(int B, int C, int HW, float eps, const float *mean, const float *var,
                            const float *w, const float *b, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * C > 1)
    for (int bc = 0; bc < B * C; bc++) {
        int c = bc % C;
        float scale = (w ? w[c] : 1.0f) / sqrtf(var[c] + eps), shift = b ? b[c] : 0.0f;
        const float *xp = x + (size_t)bc * HW;
        float *yp = y + (size_t)bc * HW;
        for (int i = 0; i < HW; i++) yp[i] = (xp[i] - mean[c]) * scale + shift;
    }
}

/* The statistics are constants: dx = dy * w * rstd, dw = sum dy * xhat, db = sum dy. */
void batchnorm_eval_backward(int B, int C, int HW, float eps, const float *mean, const float *var,
                             const float *w, const float *x, const float *dy, float *dx,
                             float *dw, float *db) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * C > 1)
        for (int bc = 0; bc < B * C; bc++) {
            int c = bc % C;
            float scale = (w ? w[c] : 1.0f) / sqrtf(var[c] + eps);
            const float *dyp = dy + (size_t)bc * HW;
            float *dxp = dx + (size_t)bc * HW;
            for (int i = 0; i < HW; i++) dxp[i] += dyp[i] * scale;
        }
    }
    if (!dw && !db) return;
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        float rstd = 1.0f / sqrtf(var[c] + eps);
        double s_dy, s_dy_xhat;
        channel_sums(B, C, HW, c, dw ? x : NULL, mean + c, &rstd, 0, dy, &s_dy, &s_dy_xhat);
        if (dw) dw[c] += (float)s_dy_xhat;
        if (db) db[c] += (float)s_dy;
    }
}

/* ---- pointwise activations ---- */

#define OPS_SQRT1_2 0.70710678118654752f      /* 1/sqrt(2) */
#define OPS_INV_SQRT_2PI 0.39894228040143268f /* 1/sqrt(2 pi) */
#define OPS_SQRT_2_PI 0.79788456080286536f    /* sqrt(2/pi) */
#define OPS_GELU_CUBIC 0.044715f

/* e^x for x <= 0, the only exponentials sigmoid, SiLU, GELU and softmax need (they never
 * overflow), to ~2 ulp in plain C that compilers vectorise, unlike a call to expf.
 * x = n ln2 + r with |r| <= ln2/2; e^r by its Taylor series to degree 7 (truncation < 1e-8);
 * 2^n goes straight into the exponent bits. Below -87.3 e^x is subnormal and flushes to 0,
 * positive x saturates at 1, NaN stays NaN (and never reaches the integer conversion). */
static inline float exp_nonpositive(float x) {
    float xc = x > -87.3f ? x : -87.3f;
    xc = xc < 0.0f ? xc : 0.0f;
    /* round to the nearest integer by adding and removing 1.5 * 2^23 */
    float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;
    /* ln2 = 0.693359375 - 2.12194440e-4: the first part has 9 bits, so n times it is exact */
    float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    float y = p * two_n;
    return x < -87.3f ? 0.0f : (x == x ? y : x);
}

/* erfc(z) for z >= 0 with a relative error below 1.2e-7 everywhere, tails included: the
 * Chebyshev fit of Press et al., Numerical Recipes (2nd ed.) 6.2, erfc = t exp(-z^2 + P(t)). */
static inline float erfc_nonnegative(float z) {
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    return t * exp_nonpositive(p - z * z);
}

/* sigmoid(x), and its slope s (1 - s) in *slope, both from e = e^-|x|: any x is safe, and
 * neither cancels (1 - s computed as a difference would be 0 long before s (1 - s) is). */
static inline float sigmoid_scalar(float x, float *slope) {
    float e = exp_nonpositive(-fabsf(x));
    float s_abs = 1.0f / (1.0f + e); /* sigmoid(|x|) */
    float s_neg = e * s_abs; /* sigmoid(-|x|), computed before the select so that it vectorises */
    *slope = s_neg * s_abs;
    return x >= 0.0f ? s_abs : s_neg;
}

/* The normal CDF Phi(x) = erfc(-x / sqrt 2) / 2, from the tail beyond |x| so that it keeps
 * its relative accuracy for negative x (1 + erf(x / sqrt 2) would cancel there). */
static inline float normal_cdf(float x) {
    float tail = 0.5f * erfc_nonnegative(fabsf(x) * OPS_SQRT1_2);
    float upper = 1.0f - tail;
    return x <= 0.0f ? tail : upper;
}

/* GELU x Phi(x) and its derivative Phi(x) + x phi(x). */
static inline float gelu_erf_scalar(float x) {
    return x * normal_cdf(x);
}

static inline float gelu_erf_grad(float x) {
    return normal_cdf(x) + x * OPS_INV_SQRT_2PI * exp_nonpositive(-0.5f * x * x);
}

/* torch's approximate="tanh": 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed
 * as x sigmoid(2u), the same function without the cancellation of 1 + tanh(u) for u << 0. */
static inline float gelu_tanh_scalar(float x) {
    float slope;
    return x * sigmoid_scalar(2.0f * OPS_SQRT_2_PI * (x + OPS_GELU_CUBIC * x * x * x), &slope);
}

static inline float gelu_tanh_grad(float x) {
    float slope, s = sigmoid_scalar(2.0f * OPS_SQRT_2_PI * (x + OPS_GELU_CUBIC * x * x * x), &slope);
    float du = 2.0f * OPS_SQRT_2_PI * (1.0f + 3.0f * OPS_GELU_CUBIC * x * x);
    return s + x * slope * du;
}

/* One loop per form: a branch inside the loop would keep it from vectorising. */
void gelu_forward(size_t n, bool tanh_approx, const float *x, float *y) {
    if (tanh_approx) {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) y[i] = gelu_tanh_scalar(x[i]);
    } else {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) y[i] = gelu_erf_scalar(x[i]);
    }
}

void gelu_backward(size_t n, bool tanh_approx, const float *x, const float *dy, float *dx) {
    if (tanh_approx) {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) dx[i] += dy[i] * gelu_tanh_grad(x[i]);
    } else {
        OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
        for (size_t i = 0; i < n; i++) dx[i] += dy[i] * gelu_erf_grad(x[i]);
    }
}

void silu_forward(size_t n, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope;
        y[i] = x[i] * sigmoid_scalar(x[i], &slope);
    }
}

/* d/dx x s(x) = s + x s (1 - s) */
void silu_backward(size_t n, const float *x, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope, s = sigmoid_scalar(x[i], &slope);
        dx[i] += dy[i] * (s + x[i] * slope);
    }
}

/* x < 0 ? 0 : x keeps a NaN a NaN, as torch.relu does. */
void relu_forward(size_t n, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = x[i] < 0.0f ? 0.0f : x[i];
}

/* Gradient only where x > 0 (zero at x == 0), as torch's (y > 0) mask. */
void relu_backward(size_t n, const float *x, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += x[i] > 0.0f ? dy[i] : 0.0f;
}

void sigmoid_forward(size_t n, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) {
        float slope;
        y[i] = sigmoid_scalar(x[i], &slope);
    }
}

void sigmoid_backward(size_t n, const float *y, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += dy[i] * y[i] * (1.0f - y[i]);
}

/* ---- softmax ---- */

/* Shifted by the row max so exp never overflows; a row holding a NaN comes out all NaN. */
void softmax_forward(int rows, int C, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN_MATH && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * C;
        float *yr = y + (size_t)r * C;
        float max = -INFINITY;
        for (int c = 0; c < C; c++) max = xr[c] > max ? xr[c] : max;
        for (int c = 0; c < C; c++) yr[c] = exp_nonpositive(xr[c] - max);
        float inv = (float)(1.0 / sum_f64((size_t)C, yr));
        for (int c = 0; c < C; c++) yr[c] *= inv;
    }
}

/* dx = y * (dy - sum(dy * y)) per row. */
void softmax_backward(int rows, int C, const float *y, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * C, *dyr = dy + (size_t)r * C;
        float *dxr = dx + (size_t)r * C;
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += dyr[c] * yr[c];
        float d = (float)dot;
        for (int c = 0; c < C; c++) dxr[c] += yr[c] * (dyr[c] - d);
    }
}

/* ---- resampling ---- */

void upsample_nearest2x_forward(int planes, int H, int W, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)planes * H * W >= OPS_PARALLEL_MIN / 4)
    for (size_t row = 0; row < (size_t)planes * H; row++) {
        const float *xr = x + row * W;
        float *y0 = y + row * 4 * W, *y1 = y0 + 2 * W; /* output rows 2i and 2i+1 */
        for (int j = 0; j < W; j++) y0[2 * j] = y0[2 * j + 1] = xr[j];
        memcpy(y1, y0, 2 * (size_t)W * sizeof *y1);
    }
}

/* Each input pixel gathers the 2x2 block it was copied to. */
void upsample_nearest2x_backward(int planes, int H, int W, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF((size_t)planes * H * W >= OPS_PARALLEL_MIN / 4)
    for (size_t row = 0; row < (size_t)planes * H; row++) {
        const float *d0 = dy + row * 4 * W, *d1 = d0 + 2 * W;
        float *dxr = dx + row * W;
        for (int j = 0; j < W; j++)
            dxr[j] += (d0[2 * j] + d0[2 * j + 1]) + (d1[2 * j] + d1[2 * j + 1]);
    }
}

/* The two source samples and their weights for output index dst of one axis. */
typedef struct LinearTap {
    int i0, i1;
    float w0, w1;
} LinearTap;

/* As torch's CPU kernel computes it for interpolate(size=..., align_corners=False): the scale
 * in float (in / out), the source position (dst + 0.5) * scale - 0.5 in double, clamped at 0,
 * truncated to the left sample; the right one is clamped to the last. Equal sizes copy. */
static LinearTap linear_tap(int dst, int in, int out) {
    LinearTap t = {dst, dst, 1.0f, 0.0f};
    if (in == out) return t;
    float scale = (float)in / (float)out;
    double src = (double)scale * (dst + 0.5) - 0.5;
    if (src < 0.0) src = 0.0;
    t.i0 = (int)src;
    t.i1 = t.i0 < in - 1 ? t.i0 + 1 : t.i0;
    t.w1 = (float)(src - t.i0);
    t.w0 = 1.0f - t.w1;
    return t;
}

#define OPS_TAP_CHUNK 256 /* output columns whose taps are computed once and reused by every row */

/* Output columns [j0, j0 + width) of one plane. x: [H, W] -> y: [Ho, Wo] */
static void resize_plane_columns(int H, int W, int Ho, int Wo, int j0, int width, const float *x,
                                 float *y) {
    LinearTap tw[OPS_TAP_CHUNK];
    for (int j = 0; j < width; j++) tw[j] = linear_tap(j0 + j, W, Wo);
    for (int i = 0; i < Ho; i++) {
        LinearTap th = linear_tap(i, H, Ho);
        const float *x0 = x + (size_t)th.i0 * W, *x1 = x + (size_t)th.i1 * W;
        float *yr = y + (size_t)i * Wo + j0;
        for (int j = 0; j < width; j++) {
            float top = x0[tw[j].i0] * tw[j].w0 + x0[tw[j].i1] * tw[j].w1;
            float bottom = x1[tw[j].i0] * tw[j].w0 + x1[tw[j].i1] * tw[j].w1;
            yr[j] = top * th.w0 + bottom * th.w1;
        }
    }
}

void resize_bilinear_forward(int planes, int H, int W, int Ho, int Wo, const float *x, float *y) {
    int chunks = (Wo + OPS_TAP_CHUNK - 1) / OPS_TAP_CHUNK;
    OPS_PARALLEL_FOR_IF((size_t)planes * Ho * Wo >= OPS_PARALLEL_MIN / 4 && planes * chunks > 1)
    for (int task = 0; task < planes * chunks; task++) {
        int p = task / chunks, j0 = task % chunks * OPS_TAP_CHUNK;
        int width = Wo - j0 < OPS_TAP_CHUNK ? Wo - j0 : OPS_TAP_CHUNK;
        resize_plane_columns(H, W, Ho, Wo, j0, width, x + (size_t)p * H * W,
                             y + (size_t)p * Ho * Wo);
    }
}

/* Scatters each output gradient to its four sources. Sources are shared between neighbouring
 * outputs, so threads split planes only, and each plane is walked in one fixed order (column
 * chunk, then row, then column). */
void resize_bilinear_backward(int planes, int H, int W, int Ho, int Wo, const float *dy,
                              float *dx) {
    OPS_PARALLEL_FOR_IF((size_t)planes * Ho * Wo >= OPS_PARALLEL_MIN / 4 && planes > 1)
    for (int p = 0; p < planes; p++) {
        float *dxp = dx + (size_t)p * H * W;
        for (int j0 = 0; j0 < Wo; j0 += OPS_TAP_CHUNK) {
            int width = Wo - j0 < OPS_TAP_CHUNK ? Wo - j0 : OPS_TAP_CHUNK;
            LinearTap tw[OPS_TAP_CHUNK];
            for (int j = 0; j < width; j++) tw[j] = linear_tap(j0 + j, W, Wo);
            for (int i = 0; i < Ho; i++) {
                LinearTap th = linear_tap(i, H, Ho);
                const float *dyr = dy + ((size_t)p * Ho + i) * Wo + j0;
                float *dx0 = dxp + (size_t)th.i0 * W, *dx1 = dxp + (size_t)th.i1 * W;
                for (int j = 0; j < width; j++) {
                    float g = dyr[j];
                    dx0[tw[j].i0] += th.w0 * tw[j].w0 * g;
                    dx0[tw[j].i1] += th.w0 * tw[j].w1 * g;
                    dx1[tw[j].i0] += th.w1 * tw[j].w0 * g;
                    dx1[tw[j].i1] += th.w1 * tw[j].w1 * g;
                }
            }
        }
    }
}

/* ---- elementwise ---- */

void add_forward(size_t n, const float *a, const float *b, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

void mul_forward(size_t n, const float *a, const float *b, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = a[i] * b[i];
}

/* y += a * b */
static void add_product(size_t n, const float *a, const float *b, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] += a[i] * b[i];
}

void mul_backward(size_t n, const float *a, const float *b, const float *dy, float *da, float *db) {
    if (da) add_product(n, dy, b, da);
    if (db) add_product(n, dy, a, db);
}

void scale_forward(size_t n, float s, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = s * x[i];
}

void axpy(size_t n, float alpha, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* Written so that a NaN passes through, as torch.clamp does. */
void clamp_forward(size_t n, float lo, float hi, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) y[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
}

void clamp_backward(size_t n, float lo, float hi, const float *x, const float *dy, float *dx) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) dx[i] += x[i] >= lo && x[i] <= hi ? dy[i] : 0.0f;
}

void pow_forward(size_t n, float p, const float *x, float *y) {
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) y[i] = powf(x[i], p);
}

void pow_backward(size_t n, float p, const float *x, const float *dy, float *dx) {
    if (p == 0.0f) return;
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN_MATH)
    for (size_t i = 0; i < n; i++) dx[i] += dy[i] * p * powf(x[i], p - 1.0f);
}

/* ---- broadcasts and reductions ---- */

void add_rows_forward(int rows, int C, const float *x, const float *v, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) y[(size_t)r * C + c] = x[(size_t)r * C + c] + v[c];
}

void mul_rows_forward(int rows, int C, const float *x, const float *v, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) y[(size_t)r * C + c] = x[(size_t)r * C + c] * v[c];
}

void mul_rows_backward(int rows, int C, const float *x, const float *v, const float *dy, float *dx,
                       float *dv) {
    if (dx) {
        OPS_PARALLEL_FOR_IF((size_t)rows * C >= OPS_PARALLEL_MIN && rows > 1)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < C; c++) dx[(size_t)r * C + c] += dy[(size_t)r * C + c] * v[c];
    }
    column_grads(rows, C, x, NULL, NULL, dy, dv, NULL);
}

void sum_rows_add(int rows, int C, const float *x, float *out) {
    column_grads(rows, C, NULL, NULL, NULL, x, NULL, out);
}

void add_channels_forward(int B, int C, int HW, const float *x, const float *v, float *y) {
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && B * C > 1)
    for (int bc = 0; bc < B * C; bc++) {
        float vc = v[bc % C];
        for (int i = 0; i < HW; i++) y[(size_t)bc * HW + i] = x[(size_t)bc * HW + i] + vc;
    }
}

void sum_channels_add(int B, int C, int HW, const float *x, float *out) {
    OPS_PARALLEL_FOR_IF((size_t)B * C * HW >= OPS_PARALLEL_MIN && C > 1)
    for (int c = 0; c < C; c++) {
        double s_x, unused;
        channel_sums(B, C, HW, c, NULL, NULL, NULL, 0, x, &s_x, &unused);
        out[c] += (float)s_x;
    }
}

/* The bounds of chunk k when n values are cut into OPS_REDUCE_CHUNKS fixed pieces. */
static void reduce_chunk(size_t n, int k, size_t *lo, size_t *hi) {
    size_t len = (n + OPS_REDUCE_CHUNKS - 1) / OPS_REDUCE_CHUNKS;
    *lo = (size_t)k * len < n ? (size_t)k * len : n;
    *hi = *lo + len < n ? *lo + len : n;
}

double sum_array(size_t n, const float *x) {
    double part[OPS_REDUCE_CHUNKS];
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) {
        size_t lo, hi;
        reduce_chunk(n, k, &lo, &hi);
        part[k] = sum_f64(hi - lo, x + lo);
    }
    double s = 0.0;
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) s += part[k];
    return s;
}

float max_array(size_t n, const float *x) {
    float part[OPS_REDUCE_CHUNKS];
    OPS_PARALLEL_FOR_IF(n >= OPS_PARALLEL_MIN)
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) {
        size_t lo, hi;
        reduce_chunk(n, k, &lo, &hi);
        float max = -INFINITY;
        bool any_nan = false;
        for (size_t i = lo; i < hi; i++) {
            any_nan |= isnan(x[i]);
            max = x[i] > max ? x[i] : max;
        }
        part[k] = any_nan ? NAN : max;
    }
    float max = -INFINITY;
    for (int k = 0; k < OPS_REDUCE_CHUNKS; k++) {
        if (isnan(part[k])) return NAN;
        max = part[k] > max ? part[k] : max;
    }
    return max;
}

/* ---- end section: norms, activations, resampling, elementwise ---- */
