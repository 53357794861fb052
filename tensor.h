/* tensor.h - float32 tensors and the kernels every layer is built from.
 *
 * Kernels take raw row-major float pointers and explicit sizes, so each one reads like the
 * formula it computes and can be tested on its own. Backward kernels ACCUMULATE (+=) into
 * their gradient outputs; a NULL gradient pointer means "not needed" and is skipped.
 * Results never depend on the thread count: every reduction has a fixed order. */
#ifndef DIAMOND_TENSOR_H
#define DIAMOND_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io.h"

/* === tensors === */

#define TENSOR_MAX_DIMS 5

/* A float32 tensor, row-major and contiguous. A view shares another tensor's data and does not
 * own it; freeing a view never frees the data, and a view must not outlive its owner. */
typedef struct Tensor {
    float *data;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    int64_t numel;
    bool owns_data;
} Tensor;

/* Zero-filled tensor; NULL when the shape is invalid (ndim out of 1..5, a size < 0) or too big. */
Tensor *tensor_new(int ndim, const int64_t *shape);
/* A tensor over caller-owned data. */
Tensor *tensor_view(float *data, int ndim, const int64_t *shape);
/* A view of t with another shape of the same number of elements; NULL if the counts differ. */
Tensor *tensor_reshape(const Tensor *t, int ndim, const int64_t *shape);
Tensor *tensor_clone(const Tensor *t);
void tensor_free(Tensor *t);
bool tensor_same_shape(const Tensor *a, const Tensor *b);
/* "[2, 3, 4]" into buf, for error messages. */
const char *tensor_shape_str(const Tensor *t, char *buf, size_t len);

/* TENSOR_NEW(2, 3, 4) makes a zeroed [2, 3, 4] tensor. */
#define TENSOR_NEW(...) \
    tensor_new((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__})

/* === GEMM === */

/* C[M,N] = alpha * op(A) op(B) + beta * C, op(X) = X or X^T, leading dimensions in elements.
 * op(A) is [M,K] (A is [K,M] when trans_a), op(B) is [K,N] (B is [N,K] when trans_b).
 * beta == 0 overwrites C without reading it (NaNs in C do not leak). */
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A, int lda,
          const float *B, int ldb, float beta, float *C, int ldc);
/* The same product with B as stored: DTYPE_F32, DTYPE_BF16 or DTYPE_F16 elements (little-endian,
 * any alignment), widened to f32 while they are packed. The result is gemm's on the widened B,
 * bit for bit, with no f32 copy of B: a weight read where it lies in a mapped file. */
void gemm_stored(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A,
                 int lda, const void *B, DType b_dtype, int ldb, float beta, float *C, int ldc);
/* How the weight products of a forward are computed: in f32 (the default and the reference), or
 * from bf16 operands into f32 sums (gemm_stored_bf16). */
typedef enum Precision { PRECISION_F32, PRECISION_BF16 } Precision;
/* gemm_stored with both operands rounded to bf16 (to nearest even; bf16 elements as they are)
 * and the products of each bf16 pair, exact in f32, added to f32 sums: PyTorch's bf16 CPU matmul,
 * but with C kept in f32. Depths go in pairs, each pair's two products added at once, on the
 * CPU's bf16 dot-product instructions where gemm_bf16_native() (AVX512-BF16 vdpbf16ps, ARMv8.6
 * BFDOT); elsewhere a portable kernel adds the same products, slower than gemm. Instructions that
 * flush denormal bf16 values to 0 or round in another order make the results differ in the last
 * bits of the f32 sums (tests/test_gemm.c states the bound); they do not depend on the threads. */
void gemm_stored_bf16(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const void *B, DType b_dtype, int ldb, float beta,
                      float *C, int ldc);
/* true where this build runs gemm_stored_bf16 on bf16 dot-product instructions. */
bool gemm_bf16_native(void);
/* Both operands packed beforehand (Winograd's kernels, used for every block of tiles, and its
 * transformed inputs, written straight into panels): C [M, N] = op(A) B, gemm(trans_a, false, M,
 * N, K, 1, A, lda, B, ldb, 0, C, ldc) bit for bit, on the calling thread (the caller shares out
 * the work). op(A) [M, K] (A [K, M] when trans_a, row stride lda) is packed by gemm_pack_a into
 * gemm_packed_a_floats(M, K) floats; B [K, N] lies in panels of columns, element (k, j) at
 * gemm_panel_offset(K, k, j), gemm_panels_floats(K, N) floats in all (the last panel's columns
 * past N are read, never written to C: zero them). */
size_t gemm_packed_a_floats(int M, int K);
void gemm_pack_a(bool trans_a, int M, int K, const float *A, int lda, float *packed);
size_t gemm_panels_floats(int K, int N);
size_t gemm_panel_offset(int K, int k, int j);
void gemm_packed(int M, int N, int K, const float *packed_a, const float *panels_b, float *C,
                 int ldc);
/* The same product by the textbook triple loop: the readable reference the tests trust. */
void gemm_reference(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* === conv2d === */

typedef struct Conv2dShape {
    int batch, in_ch, in_h, in_w;
    int out_ch, kernel_h, kernel_w;
    int stride_h, stride_w, pad_h, pad_w;
    int groups; /* in_ch and out_ch are multiples of groups; groups == in_ch is depthwise */
} Conv2dShape;

int conv2d_out_h(const Conv2dShape *s);
int conv2d_out_w(const Conv2dShape *s);
/* x: [B, Cin, H, W], w: [Cout, Cin/groups, kh, kw], b: [Cout] or NULL -> y: [B, Cout, Ho, Wo] */
void conv2d_forward(const Conv2dShape *s, const float *x, const float *w, const float *b, float *y);
/* dy: [B, Cout, Ho, Wo] -> dx += [B, Cin, H, W], dw += [Cout, Cin/groups, kh, kw], db += [Cout] */
void conv2d_backward(const Conv2dShape *s, const float *x, const float *w, const float *dy,
                     float *dx, float *dw, float *db);
/* true when the forward and the backward to x take Winograd's F(4x4, 3x3) (3x3, stride 1, padding
 * 1, no groups, Cin and Cout >= 128: the FLUX.2 VAE's convs): 4x fewer multiply-adds, results
 * equal to the direct sum's up to a few times its rounding (tests/test_conv.c states the bound). */
bool conv2d_is_winograd(const Conv2dShape *s);
/* The same convolution as a direct loop over every multiply (torch.nn.functional.conv2d
 * spelled out), each output and gradient summed in double: the readable reference the tests
 * trust. y is overwritten; dx, dw, db accumulate (NULL: skipped). NaNs when out of memory. */
void conv2d_reference_forward(const Conv2dShape *s, const float *x, const float *w,
                              const float *b, float *y);
void conv2d_reference_backward(const Conv2dShape *s, const float *x, const float *w,
                               const float *dy, float *dx, float *dw, float *db);

/* === attention and rotary embedding === */

typedef struct AttentionShape {
    int batch;
    int heads;    /* query heads */
    int kv_heads; /* key/value heads; heads % kv_heads == 0 (grouped-query attention) */
    int q_len, kv_len, head_dim;
    bool causal;         /* query i sees keys j <= i + (kv_len - q_len) */
    const int *kv_valid; /* [batch] keys j >= kv_valid[b] are padding, or NULL for none */
} AttentionShape;

/* softmax(scale * Q K^T + mask) V, blocked with an online softmax: O(N*d) memory.
 * q: [B, Nq, H, D], k, v: [B, Nk, Hkv, D] -> out: [B, Nq, H, D], lse: [B, H, Nq] (the row
 * log-sum-exp, kept for backward). A row that sees no key gets out = 0 and lse = -inf.
 * Scratch is per thread, O(64 * D); if it cannot be allocated, out and lse are set to NaN. */
void attention_forward(const AttentionShape *s, float scale, const float *q, const float *k,
                       const float *v, float *out, float *lse);
/* Recomputes the probabilities block by block from q, k and lse. dq/dk/dv accumulate; rows
 * that see no key add nothing. Extra memory: the per-thread scratch and B*H*Nq floats. */
void attention_backward(const AttentionShape *s, float scale, const float *q, const float *k,
                        const float *v, const float *out, const float *lse, const float *dout,
                        float *dq, float *dk, float *dv);

/* The same attention by the textbook formulas, a full softmax row at a time, in double: out and
 * lse as attention_forward, and dq, dk, dv (overwritten, not accumulated) for dout. The
 * readable reference the tests trust; O(Nk) memory per row. NaNs when out of memory. */
void attention_reference(const AttentionShape *s, float scale, const float *q, const float *k,
                         const float *v, const float *dout, float *out, float *lse, float *dq,
                         float *dk, float *dv);

/* Which two elements of a head rotary embedding turns together: FLUX's adjacent pairs
 * (x[2i], x[2i+1]) (diffusers apply_rotary_emb, use_real_unbind_dim=-1) or Qwen's halves
 * (x[i], x[i + D/2]) (transformers' rotate_half). */
typedef enum RopePairs { ROPE_ADJACENT, ROPE_HALVES } RopePairs;

/* Rotary embedding: pair i of each head (a, b) rotated by the angle of pair i,
 * y[a] = x[a] cos - x[b] sin, y[b] = x[a] sin + x[b] cos.
 * x: [B, N, H, D], cos, sin: [N, D/2] -> y: [B, N, H, D]. Backward rotates back: dx += R^T dy.
 * y may alias x; an odd D passes its last element through. */
void rope_forward(RopePairs pairs, int batch, int n, int heads, int head_dim, const float *cos,
                  const float *sin, const float *x, float *y);
void rope_backward(RopePairs pairs, int batch, int n, int heads, int head_dim, const float *cos,
                   const float *sin, const float *dy, float *dx);

/* === norms, activations, resampling, elementwise === */

/* LayerNorm over the last dim. x: [rows, C] -> y: [rows, C]; mean, rstd: [rows] saved for
 * backward; w, b: [C] or NULL (no affine). */
void layernorm_forward(int rows, int C, float eps, const float *x, const float *w, const float *b,
                       float *y, float *mean, float *rstd);
void layernorm_backward(int rows, int C, const float *x, const float *w, const float *mean,
                        const float *rstd, const float *dy, float *dx, float *dw, float *db);

/* GroupNorm. x: [B, C, HW], C % groups == 0; mean, rstd: [B, groups]; w, b: [C] or NULL. */
void groupnorm_forward(int B, int C, int HW, int groups, float eps, const float *x, const float *w,
                       const float *b, float *y, float *mean, float *rstd);
void groupnorm_backward(int B, int C, int HW, int groups, const float *x, const float *w,
                        const float *mean, const float *rstd, const float *dy, float *dx,
                        float *dw, float *db);

/* RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * w. x: [rows, C]; rstd: [rows];
 * w: [C] or NULL (all ones). */
void rmsnorm_forward(int rows, int C, float eps, const float *x, const float *w, float *y,
                     float *rstd);
void rmsnorm_backward(int rows, int C, const float *x, const float *w, const float *rstd,
                      const float *dy, float *dx, float *dw);

/* BatchNorm with running statistics (eval mode). x: [B, C, HW]; mean, var: [C]; w, b: [C] or
 * NULL (no affine). */
void batchnorm_eval_forward(int B, int C, int HW, float eps, const float *mean, const float *var,
                            const float *w, const float *b, const float *x, float *y);
void batchnorm_eval_backward(int B, int C, int HW, float eps, const float *mean, const float *var,
                             const float *w, const float *x, const float *dy, float *dx,
                             float *dw, float *db);

/* Pointwise activations over n elements. */
void gelu_forward(size_t n, bool tanh_approx, const float *x, float *y);
void gelu_backward(size_t n, bool tanh_approx, const float *x, const float *dy, float *dx);
void silu_forward(size_t n, const float *x, float *y);
void silu_backward(size_t n, const float *x, const float *dy, float *dx);
/* SiLU(GroupNorm(x)) fused, shapes as groupnorm_forward: backward recomputes the normalised
 * value from x, the statistics, w and b (NULL: no affine), so neither it nor its gradient is
 * ever stored. */
void groupnorm_silu_forward(int B, int C, int HW, int groups, float eps, const float *x,
                            const float *w, const float *b, float *y, float *mean, float *rstd);
void groupnorm_silu_backward(int B, int C, int HW, int groups, const float *x, const float *w,
                             const float *b, const float *mean, const float *rstd, const float *dy,
                             float *dx, float *dw, float *db);
void relu_forward(size_t n, const float *x, float *y);
void relu_backward(size_t n, const float *x, const float *dy, float *dx);
void sigmoid_forward(size_t n, const float *x, float *y);
void sigmoid_backward(size_t n, const float *y, const float *dy, float *dx);

/* Softmax over the last dim. x: [rows, C] -> y: [rows, C]; backward needs only y. */
void softmax_forward(int rows, int C, const float *x, float *y);
void softmax_backward(int rows, int C, const float *y, const float *dy, float *dx);

/* Nearest-neighbour 2x upsampling. x: [planes, H, W] -> y: [planes, 2H, 2W] */
void upsample_nearest2x_forward(int planes, int H, int W, const float *x, float *y);
void upsample_nearest2x_backward(int planes, int H, int W, const float *dy, float *dx);

/* Bilinear resize with PyTorch's align_corners=False (and interpolate(size=...)) semantics.
 * x: [planes, H, W] -> y: [planes, Ho, Wo] */
void resize_bilinear_forward(int planes, int H, int W, int Ho, int Wo, const float *x, float *y);
void resize_bilinear_backward(int planes, int H, int W, int Ho, int Wo, const float *dy,
                              float *dx);

/* Elementwise over n values. Outputs may alias an input of the same size (in place). */
void add_forward(size_t n, const float *a, const float *b, float *y);   /* y = a + b */
void mul_forward(size_t n, const float *a, const float *b, float *y);   /* y = a * b */
void mul_backward(size_t n, const float *a, const float *b, const float *dy, float *da, float *db);
void scale_forward(size_t n, float s, const float *x, float *y);        /* y = s * x */
void axpy(size_t n, float alpha, const float *x, float *y);             /* y += alpha * x */
/* x: [batch, rows, cols] -> y: [batch, cols, rows], y[b][j][i] = x[b][i][j], or += when
 * accumulate; x and y do not overlap. */
void transpose_batched(int64_t batch, int64_t rows, int64_t cols, const float *x, float *y,
                       bool accumulate);
void clamp_forward(size_t n, float lo, float hi, const float *x, float *y);
/* The gradient passes where lo <= x <= hi, boundaries included (as torch.clamp). */
void clamp_backward(size_t n, float lo, float hi, const float *x, const float *dy, float *dx);
/* y = x^p for x >= 0. Backward adds dy * p * x^(p-1), nothing when p == 0 (as torch.pow). */
void pow_forward(size_t n, float p, const float *x, float *y);
void pow_backward(size_t n, float p, const float *x, const float *dy, float *dx);

/* A vector broadcast along rows. x: [rows, C], v: [C] -> y: [rows, C] */
void add_rows_forward(int rows, int C, const float *x, const float *v, float *y);   /* x + v */
void mul_rows_forward(int rows, int C, const float *x, const float *v, float *y);   /* x * v */
void mul_rows_backward(int rows, int C, const float *x, const float *v, const float *dy, float *dx,
                       float *dv);
/* out[c] += sum over r of x[r, c], rows in order, in double. */
void sum_rows_add(int rows, int C, const float *x, float *out);

/* A vector broadcast per channel. x: [B, C, HW], v: [C] -> y: [B, C, HW] (y = x + v[c]) */
void add_channels_forward(int B, int C, int HW, const float *x, const float *v, float *y);
/* out[c] += sum over b and hw of x[b, c, hw], in double. */
void sum_channels_add(int B, int C, int HW, const float *x, float *out);

/* Reductions whose result depends on n alone, never on the thread count. */
double sum_array(size_t n, const float *x);  /* 64 chunks summed in double, then in order */
float max_array(size_t n, const float *x);   /* NaN if any value is NaN; -inf when n == 0 */
/* The index of the first NaN or infinity of x[0 .. n), or n when every value is finite. */
size_t first_non_finite(size_t n, const float *x);

/* === random numbers (PyTorch's CPU generator) === */

/* torch.Generator('cpu'): mt19937 plus the cached second value of its scalar Box-Muller.
 * Seeding and drawing reproduce torch 1.13 bit for bit, so a seed gives the same initial
 * latent as the diffusers pipelines with a CPU generator. */
typedef struct TorchGenerator {
    uint32_t state[624];
    int next;                   /* index of the next word of state to temper and return */
    bool has_cached_normal;     /* the scalar path's spare r * sin(theta), as torch keeps it */
    double cached_normal;
} TorchGenerator;

/* manual_seed(seed): mt19937 is seeded with the low 32 bits of seed (as torch does). */
void torch_generator_seed(TorchGenerator *g, uint64_t seed);
/* The next raw 32-bit mt19937 draw (torch's random()). */
uint32_t torch_generator_random(TorchGenerator *g);
/* One torch.randn(n) call in float32 (n = numel of the whole tensor); successive calls continue
 * the stream exactly as successive torch.randn calls on the same generator. For n >= 16 this
 * follows torch's AVX2 kernel (its polynomial log/sincos), which x86 CPUs with AVX2 run; torch
 * on CPUs without AVX2 (or ATEN_CPU_CAPABILITY=default) uses libm and differs in the last bits. */
void torch_randn(TorchGenerator *g, float *out, size_t n);
/* The Flux2 pipeline's initial latent for seed: randn((1, C, grid_h, grid_w)) from a fresh CPU
 * generator, packed to tokens. -> tokens: [grid_h * grid_w, C]. Fails only when out of memory. */
int latent_noise_tokens(uint64_t seed, int channels, int grid_h, int grid_w, float *tokens,
                        Error *e);

#endif
