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

/* Convolution as GEMM over bands of output pixels (torch.nn.functional.conv2d semantics: zero
 * padding, no dilation). For each image and group the output pixels p = oh*Wo + ow are taken in
 * bands of consecutive pixels; im2col_band copies the receptive fields of one band into
 * col: [K, n] with K = Cin/g*kh*kw, and one GEMM gives y_band[Cout/g, n] = w_g[Cout/g, K] col.
 *
 * Scratch bound: a band holds n = min(Ho*Wo, max(CONV_BAND_MIN_PIXELS, CONV_COL_BUDGET / K))
 * pixels, so col takes at most max(4 MiB, 512 * K bytes): 4 MiB for a 3x3 conv over 128 or 512
 * channels at any image size. Forward and backward each use one such buffer (backward reuses it
 * for x's columns and then for their gradient). A 1x1 stride-1 unpadded conv needs no col: its
 * col is x itself. Depthwise convs take a direct loop and Wo*kh*kw floats per thread. */
#define CONV_COL_BUDGET      (1 << 20) /* floats in one im2col band: 4 MiB */
#define CONV_BAND_MIN_PIXELS 128       /* thinner bands starve the GEMM */
#define CONV_PARALLEL_MIN    (1 << 15) /* floats moved before waking the threads pays */

/* Threads only split independent outputs (col rows, dx planes, channels), and only when the
 * loop touches more than CONV_PARALLEL_MIN floats; without OpenMP the directive vanishes instead
 * of warning. */
#ifdef _OPENMP
#define CONV_OMP(directive) _Pragma(#directive)
#else
#define CONV_OMP(directive)
#endif
#define CONV_PARALLEL_FOR(work) \
    CONV_OMP(omp parallel for schedule(static) if ((work) > CONV_PARALLEL_MIN))

/* Output length along one axis; 0 when the kernel does not fit the padded input. */
static int conv_out_len(int in, int kernel, int stride, int pad) {
    if (in < 0 || kernel < 1 || stride < 1 || pad < 0 || in + 2 * pad < kernel) return 0;
    return (in + 2 * pad - kernel) / stride + 1;
}

int conv2d_out_h(const Conv2dShape *s) {
    return conv_out_len(s->in_h, s->kernel_h, s->stride_h, s->pad_h);
}

int conv2d_out_w(const Conv2dShape *s) {
    return conv_out_len(s->in_w, s->kernel_w, s->stride_w, s->pad_w);
}

/* The sizes every conv kernel below works with, derived once from the shape. */
typedef struct ConvDims {
    int out_h, out_w, pixels; /* the output plane: Ho, Wo, Ho*Wo */
    int in_plane;             /* H*W */
    int in_per_group, out_per_group;
    int col_rows;   /* K = Cin/g*kh*kw: the GEMM's reduction length */
    int band;       /* output pixels per im2col band */
    bool pointwise; /* 1x1, stride 1, no padding: col is x itself */
} ConvDims;

static ConvDims conv_dims(const Conv2dShape *s) {
    ConvDims d;
    d.out_h = conv2d_out_h(s);
    d.out_w = conv2d_out_w(s);
    d.pixels = d.out_h * d.out_w;
    d.in_plane = s->in_h * s->in_w;
    d.in_per_group = s->in_ch / s->groups;
    d.out_per_group = s->out_ch / s->groups;
    d.col_rows = d.in_per_group * s->kernel_h * s->kernel_w;
    d.pointwise = s->kernel_h == 1 && s->kernel_w == 1 && s->stride_h == 1 && s->stride_w == 1 &&
                  s->pad_h == 0 && s->pad_w == 0;
    int band = CONV_COL_BUDGET / (d.col_rows > 0 ? d.col_rows : 1);
    if (band < CONV_BAND_MIN_PIXELS) band = CONV_BAND_MIN_PIXELS;
    d.band = d.pointwise || band > d.pixels ? d.pixels : band;
    return d;
}

/* Nothing to compute: an empty output, or a shape the kernels cannot take. */
static bool conv_shape_empty(const Conv2dShape *s) {
    return s->batch < 1 || s->groups < 1 || s->in_ch < s->groups || s->out_ch < s->groups ||
           s->in_ch % s->groups || s->out_ch % s->groups || conv2d_out_h(s) < 1 ||
           conv2d_out_w(s) < 1;
}

static bool conv_is_depthwise(const Conv2dShape *s) {
    return s->groups == s->in_ch && s->out_ch == s->in_ch;
}

/* The kernels have no status to return: when scratch memory runs out they poison their
 * outputs with NaN, so the failure cannot pass for a result. */
static void fill_nan(float *p, size_t n) {
    if (p)
        for (size_t i = 0; i < n; i++) p[i] = NAN;
}

/* Output positions o in [*lo, *hi) whose input position o*stride + offset lies in [0, in_len);
 * the others read zero padding. */
static void conv_valid_range(int out_len, int in_len, int stride, int offset, int *lo, int *hi) {
    int first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int end = in_len - offset <= 0 ? 0 : (in_len - 1 - offset) / stride + 1;
    *lo = first < out_len ? first : out_len;
    *hi = end < out_len ? end : out_len;
    if (*hi < *lo) *hi = *lo;
}

/* Row primitives of the im2col and depthwise loops. The stride-1 case is split out because it
 * is the common one and the compiler vectorises it; the strided loop is the same formula. */

/* dst[t] = src[t * stride] */
static void gather_row(int n, const float *restrict src, int stride, float *restrict dst) {
    if (stride == 1)
        memcpy(dst, src, (size_t)n * sizeof *dst);
    else
        for (int t = 0; t < n; t++) dst[t] = src[(size_t)t * stride];
}

/* dst[t * stride] += a * src[t] */
static void scatter_axpy_row(int n, float a, const float *restrict src, float *restrict dst,
                             int stride) {
    if (stride == 1)
        for (int t = 0; t < n; t++) dst[t] += a * src[t];
    else
        for (int t = 0; t < n; t++) dst[(size_t)t * stride] += a * src[t];
}

/* dst[t] += a * src[t * stride] */
static void gather_axpy_row(int n, float a, const float *restrict src, int stride,
                            float *restrict dst) {
    if (stride == 1)
        for (int t = 0; t < n; t++) dst[t] += a * src[t];
    else
        for (int t = 0; t < n; t++) dst[t] += a * src[(size_t)t * stride];
}

/* acc[t] += dy[t] * src[t * stride] */
static void gather_mul_add_row(int n, const float *restrict dy, const float *restrict src,
                               int stride, float *restrict acc) {
    if (stride == 1)
        for (int t = 0; t < n; t++) acc[t] += dy[t] * src[t];
    else
        for (int t = 0; t < n; t++) acc[t] += dy[t] * src[(size_t)t * stride];
}

/* x: [C, H, W] (one image, the channels of one group) -> col: [C*kh*kw, n] for the band of
 * output pixels p = oh*Wo + ow in [p0, p0 + n):
 * col[(c*kh + i)*kw + j][p - p0] = x[c, oh*sh - ph + i, ow*sw - pw + j], 0 in the padding.
 * A band may start and end mid-row, so each col row is filled one output-row piece at a time. */
static void im2col_band(const Conv2dShape *s, const ConvDims *d, const float *x, int p0, int n,
                        float *col) {
    int kh = s->kernel_h, kw = s->kernel_w, H = s->in_h, W = s->in_w, Wo = d->out_w;
    CONV_PARALLEL_FOR((size_t)d->col_rows * n)
    for (int r = 0; r < d->col_rows; r++) {
        int j = r % kw, i = r / kw % kh, c = r / (kw * kh);
        const float *plane = x + (size_t)c * d->in_plane;
        int lo_j, hi_j;
        conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo_j, &hi_j);
        for (int p = p0, next; p < p0 + n; p = next) {
            int oh = p / Wo, ow0 = p % Wo;
            int ow1 = ow0 + (p0 + n - p) < Wo ? ow0 + (p0 + n - p) : Wo;
            next = p + (ow1 - ow0);
            float *out = col + (size_t)r * n + (p - p0); /* out[ow - ow0] */
            int ih = oh * s->stride_h - s->pad_h + i;
            int lo = lo_j > ow0 ? lo_j : ow0, hi = hi_j < ow1 ? hi_j : ow1;
            if (ih < 0 || ih >= H || hi < lo) lo = hi = ow1; /* the whole piece is padding */
            memset(out, 0, (size_t)(lo - ow0) * sizeof *out);
            if (hi > lo)
                gather_row(hi - lo, plane + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                           s->stride_w, out + (lo - ow0));
            memset(out + (hi - ow0), 0, (size_t)(ow1 - hi) * sizeof *out);
        }
    }
}

/* The adjoint of im2col_band: dx[C, H, W] += col2im(dcol[C*kh*kw, n]). Threads split the
 * channels, each of which owns its kh*kw rows of dcol and its dx plane, so every dx element
 * is summed by one thread in a fixed order. */
static void col2im_band_add(const Conv2dShape *s, const ConvDims *d, const float *dcol, int p0,
                            int n, float *dx) {
    int kh = s->kernel_h, kw = s->kernel_w, H = s->in_h, W = s->in_w, Wo = d->out_w;
    CONV_PARALLEL_FOR((size_t)d->col_rows * n)
    for (int c = 0; c < d->in_per_group; c++) {
        float *plane = dx + (size_t)c * d->in_plane;
        for (int r = c * kh * kw; r < (c + 1) * kh * kw; r++) {
            int j = r % kw, i = r / kw % kh;
            int lo_j, hi_j;
            conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo_j, &hi_j);
            for (int p = p0, next; p < p0 + n; p = next) {
                int oh = p / Wo, ow0 = p % Wo;
                int ow1 = ow0 + (p0 + n - p) < Wo ? ow0 + (p0 + n - p) : Wo;
                next = p + (ow1 - ow0);
                int ih = oh * s->stride_h - s->pad_h + i;
                int lo = lo_j > ow0 ? lo_j : ow0, hi = hi_j < ow1 ? hi_j : ow1;
                if (ih < 0 || ih >= H || hi <= lo) continue;
                const float *src = dcol + (size_t)r * n + (p - p0) + (lo - ow0);
                scatter_axpy_row(hi - lo, 1.0f, src,
                                 plane + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                 s->stride_w);
            }
        }
    }
}

/* y[c, t] += bias[c] for a band: y: [channels, n] with row stride ld. */
static void add_bias_band(int channels, int n, const float *bias, float *y, int ld) {
    for (int c = 0; c < channels; c++) {
        float *row = y + (size_t)c * ld;
        for (int t = 0; t < n; t++) row[t] += bias[c];
    }
}

/* db[c] += sum of dy[:, c, :, :], each channel summed in double in a fixed order.
 * dy: [B, Cout, pixels] -> db: [Cout] */
static void conv_bias_backward(int batch, int channels, int pixels, const float *dy, float *db) {
    CONV_PARALLEL_FOR((size_t)batch * channels * pixels)
    for (int c = 0; c < channels; c++) {
        double sum = 0.0;
        for (int b = 0; b < batch; b++) {
            const float *plane = dy + ((size_t)b * channels + c) * pixels;
            for (int p = 0; p < pixels; p++) sum += plane[p];
        }
        db[c] += (float)sum;
    }
}

/* x: [B, Cin, H, W], w: [Cout, K] -> y: [B, Cout, Ho, Wo], one GEMM per band per group:
 * y_band[Cout/g, n] = w_g[Cout/g, K] col[K, n]. */
static void conv_gemm_forward(const Conv2dShape *s, const ConvDims *d, const float *x,
                              const float *w, const float *b, float *y) {
    float *col = d->pointwise ? NULL : malloc((size_t)d->col_rows * d->band * sizeof *col);
    if (!d->pointwise && !col) {
        fill_nan(y, (size_t)s->batch * s->out_ch * d->pixels);
        return;
    }
    for (int bi = 0; bi < s->batch; bi++)
        for (int g = 0; g < s->groups; g++) {
            const float *x_g =
                x + ((size_t)bi * s->in_ch + (size_t)g * d->in_per_group) * d->in_plane;
            const float *w_g = w + (size_t)g * d->out_per_group * d->col_rows;
            float *y_g = y + ((size_t)bi * s->out_ch + (size_t)g * d->out_per_group) * d->pixels;
            for (int p0 = 0; p0 < d->pixels; p0 += d->band) {
                int n = d->pixels - p0 < d->band ? d->pixels - p0 : d->band;
                const float *col_band = d->pointwise ? x_g + p0 : col;
                int ld_col = d->pointwise ? d->pixels : n;
                if (!d->pointwise) im2col_band(s, d, x_g, p0, n, col);
                gemm(false, false, d->out_per_group, n, d->col_rows, 1.0f, w_g, d->col_rows,
                     col_band, ld_col, 0.0f, y_g + p0, d->pixels);
                if (b)
                    add_bias_band(d->out_per_group, n, b + (size_t)g * d->out_per_group, y_g + p0,
                                  d->pixels);
            }
        }
    free(col);
}

/* dy: [B, Cout, Ho, Wo] -> dw_g[Cout/g, K] += dy_band col^T and dx += col2im(w_g^T dy_band),
 * band after band in a fixed order. One scratch buffer serves first as x's columns (for dw),
 * then as their gradient (for dx); a pointwise conv reads x and accumulates into dx directly. */
static void conv_gemm_backward(const Conv2dShape *s, const ConvDims *d, const float *x,
                               const float *w, const float *dy, float *dx, float *dw) {
    float *col = d->pointwise ? NULL : malloc((size_t)d->col_rows * d->band * sizeof *col);
    if (!d->pointwise && !col) {
        fill_nan(dx, (size_t)s->batch * s->in_ch * d->in_plane);
        fill_nan(dw, (size_t)s->out_ch * d->col_rows);
        return;
    }
    for (int bi = 0; bi < s->batch; bi++)
        for (int g = 0; g < s->groups; g++) {
            size_t x_offset = ((size_t)bi * s->in_ch + (size_t)g * d->in_per_group) * d->in_plane;
            const float *w_g = w + (size_t)g * d->out_per_group * d->col_rows;
            const float *dy_g =
                dy + ((size_t)bi * s->out_ch + (size_t)g * d->out_per_group) * d->pixels;
            for (int p0 = 0; p0 < d->pixels; p0 += d->band) {
                int n = d->pixels - p0 < d->band ? d->pixels - p0 : d->band;
                if (dw) {
                    const float *col_band = d->pointwise ? x + x_offset + p0 : col;
                    int ld_col = d->pointwise ? d->pixels : n;
                    if (!d->pointwise) im2col_band(s, d, x + x_offset, p0, n, col);
                    gemm(false, true, d->out_per_group, d->col_rows, n, 1.0f, dy_g + p0, d->pixels,
                         col_band, ld_col, 1.0f, dw + (size_t)g * d->out_per_group * d->col_rows,
                         d->col_rows);
                }
                if (dx && d->pointwise) {
                    gemm(true, false, d->col_rows, n, d->out_per_group, 1.0f, w_g, d->col_rows,
                         dy_g + p0, d->pixels, 1.0f, dx + x_offset + p0, d->pixels);
                } else if (dx) {
                    gemm(true, false, d->col_rows, n, d->out_per_group, 1.0f, w_g, d->col_rows,
                         dy_g + p0, d->pixels, 0.0f, col, n);
                    col2im_band_add(s, d, col, p0, n, dx + x_offset);
                }
            }
        }
    free(col);
}

/* One channel: x: [H, W], w: [kh, kw] -> y: [Ho, Wo] = bias + sum over taps of w[i, j] times the
 * shifted (and strided) input rows. */
static void depthwise_plane_forward(const Conv2dShape *s, const ConvDims *d, const float *x,
                                    const float *w, float bias, float *y) {
    int W = s->in_w, Wo = d->out_w;
    for (int oh = 0; oh < d->out_h; oh++) {
        float *row = y + (size_t)oh * Wo;
        for (int ow = 0; ow < Wo; ow++) row[ow] = bias;
        for (int i = 0; i < s->kernel_h; i++) {
            int ih = oh * s->stride_h - s->pad_h + i;
            if (ih < 0 || ih >= s->in_h) continue;
            for (int j = 0; j < s->kernel_w; j++) {
                int lo, hi;
                conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo, &hi);
                if (hi > lo)
                    gather_axpy_row(hi - lo, w[i * s->kernel_w + j],
                                    x + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                    s->stride_w, row + lo);
            }
        }
    }
}

/* One channel: dx: [H, W] += the transpose of depthwise_plane_forward applied to dy: [Ho, Wo]. */
static void depthwise_plane_backward_dx(const Conv2dShape *s, const ConvDims *d, const float *w,
                                        const float *dy, float *dx) {
    int W = s->in_w, Wo = d->out_w;
    for (int oh = 0; oh < d->out_h; oh++)
        for (int i = 0; i < s->kernel_h; i++) {
            int ih = oh * s->stride_h - s->pad_h + i;
            if (ih < 0 || ih >= s->in_h) continue;
            for (int j = 0; j < s->kernel_w; j++) {
                int lo, hi;
                conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo, &hi);
                if (hi > lo)
                    scatter_axpy_row(hi - lo, w[i * s->kernel_w + j], dy + (size_t)oh * Wo + lo,
                                     dx + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                     s->stride_w);
            }
        }
}

/* One channel c: dw_c[kh, kw] += sum over the batch and output pixels of dy * x at each tap.
 * Every tap gathers its products in a row of Wo partial sums (acc: [kh*kw, Wo]), so the inner
 * loop is a plain vector multiply-add; the rows are summed in double at the end. */
static void depthwise_channel_dw(const Conv2dShape *s, const ConvDims *d, int c, const float *x,
                                 const float *dy, float *acc, float *dw_c) {
    int W = s->in_w, Wo = d->out_w, taps = s->kernel_h * s->kernel_w;
    memset(acc, 0, (size_t)taps * Wo * sizeof *acc);
    for (int b = 0; b < s->batch; b++) {
        const float *x_c = x + ((size_t)b * s->in_ch + c) * d->in_plane;
        const float *dy_c = dy + ((size_t)b * s->out_ch + c) * d->pixels;
        for (int oh = 0; oh < d->out_h; oh++)
            for (int i = 0; i < s->kernel_h; i++) {
                int ih = oh * s->stride_h - s->pad_h + i;
                if (ih < 0 || ih >= s->in_h) continue;
                for (int j = 0; j < s->kernel_w; j++) {
                    int lo, hi;
                    conv_valid_range(Wo, W, s->stride_w, j - s->pad_w, &lo, &hi);
                    if (hi > lo)
                        gather_mul_add_row(hi - lo, dy_c + (size_t)oh * Wo + lo,
                                           x_c + (size_t)ih * W + lo * s->stride_w + j - s->pad_w,
                                           s->stride_w,
                                           acc + (size_t)(i * s->kernel_w + j) * Wo + lo);
                }
            }
    }
    for (int tap = 0; tap < taps; tap++) {
        double sum = 0.0;
        for (int ow = 0; ow < Wo; ow++) sum += acc[(size_t)tap * Wo + ow];
        dw_c[tap] += (float)sum;
    }
}

/* x: [B, C, H, W], w: [C, 1, kh, kw] -> y: [B, C, Ho, Wo]; threads take whole planes. */
static void depthwise_forward(const Conv2dShape *s, const ConvDims *d, const float *x,
                              const float *w, const float *b, float *y) {
    int planes = s->batch * s->in_ch, taps = s->kernel_h * s->kernel_w;
    CONV_PARALLEL_FOR((size_t)planes * d->pixels * taps)
    for (int plane = 0; plane < planes; plane++) {
        int c = plane % s->in_ch;
        depthwise_plane_forward(s, d, x + (size_t)plane * d->in_plane, w + (size_t)c * taps,
                                b ? b[c] : 0.0f, y + (size_t)plane * d->pixels);
    }
}

/* dy: [B, C, Ho, Wo] -> dx += [B, C, H, W]; threads take whole planes. */
static void depthwise_backward_dx(const Conv2dShape *s, const ConvDims *d, const float *w,
                                  const float *dy, float *dx) {
    int planes = s->batch * s->in_ch, taps = s->kernel_h * s->kernel_w;
    CONV_PARALLEL_FOR((size_t)planes * d->pixels * taps)
    for (int plane = 0; plane < planes; plane++)
        depthwise_plane_backward_dx(s, d, w + (size_t)(plane % s->in_ch) * taps,
                                    dy + (size_t)plane * d->pixels,
                                    dx + (size_t)plane * d->in_plane);
}

/* dy: [B, C, Ho, Wo] -> dw += [C, 1, kh, kw]; threads take whole channels (all the batch), each
 * thread with its own partial-sum rows. */
static void depthwise_backward_dw(const Conv2dShape *s, const ConvDims *d, const float *x,
                                  const float *dy, float *dw) {
    int taps = s->kernel_h * s->kernel_w;
    CONV_OMP(omp parallel if ((size_t)s->batch * s->in_ch * d->pixels * taps >
                              CONV_PARALLEL_MIN))
    {
        float *acc = malloc((size_t)taps * d->out_w * sizeof *acc);
        CONV_OMP(omp for schedule(static))
        for (int c = 0; c < s->in_ch; c++) {
            if (acc)
                depthwise_channel_dw(s, d, c, x, dy, acc, dw + (size_t)c * taps);
            else
                fill_nan(dw + (size_t)c * taps, (size_t)taps);
        }
        free(acc);
    }
}

void conv2d_forward(const Conv2dShape *s, const float *x, const float *w, const float *b,
                    float *y) {
    if (conv_shape_empty(s)) return;
    ConvDims d = conv_dims(s);
    if (conv_is_depthwise(s))
        depthwise_forward(s, &d, x, w, b, y);
    else
        conv_gemm_forward(s, &d, x, w, b, y);
}

void conv2d_backward(const Conv2dShape *s, const float *x, const float *w, const float *dy,
                     float *dx, float *dw, float *db) {
    if (conv_shape_empty(s)) return;
    ConvDims d = conv_dims(s);
    if (db) conv_bias_backward(s->batch, s->out_ch, d.pixels, dy, db);
    if (conv_is_depthwise(s)) {
        if (dx) depthwise_backward_dx(s, &d, w, dy, dx);
        if (dw) depthwise_backward_dw(s, &d, x, dy, dw);
    } else if (dx || dw) {
        conv_gemm_backward(s, &d, x, w, dy, dx, dw);
    }
}

/* ---- end section: conv2d ---- */

/* ---- section: attention and rotary embedding (owned by the attention work) --------------- */

/* ---- end section: attention and rotary embedding ---- */

/* ---- section: norms, activations, resampling, elementwise (owned by the ops work) -------- */

/* ---- end section: norms, activations, resampling, elementwise ---- */
