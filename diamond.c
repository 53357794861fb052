/* diamond.c - the command line: DIAMOND sampling, model inspection and benchmarks. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sys/resource.h>
#include <sys/stat.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "io.h"
#include "nn.h"
#include "tensor.h"

static const char *usage_text =
    "diamond - training-free artifact removal for rectified-flow image models (DIAMOND)\n"
    "\n"
    "usage:\n"
    "  diamond info FILE|DIR            validate safetensors file(s) and list their tensors\n"
    "  diamond bench gemm M N K [--threads T]\n"
    "  diamond bench conv B CIN H W COUT K STRIDE PAD [--groups G] [--threads T]\n"
    "  diamond bench attention B HEADS N HEAD_DIM [--threads T]\n"
    "  diamond bench flux2 (--config FILE | --model DIR) -W PIXELS -H PIXELS [--text-len L]\n"
    "                    [--threads T]    one FLUX.2 transformer forward: random weights from a\n"
    "                                     config.json, or a transformer directory's weights\n"
    "  diamond help                     this text\n"
    "\n"
    "exit status: 0 success, 1 runtime error (bad file, bad data), 2 bad command line\n";

/* Seconds on a monotonic clock. */
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- info ------------------------------------------------------------------------------- */

typedef struct InfoTotals {
    size_t files, tensors;
    unsigned long long bytes;
} InfoTotals;

/* A validated file's tensors, one line each: dtype, shape, name. */
static void info_list(const SafeTensors *st, InfoTotals *totals) {
    unsigned long long bytes = 0;
    for (size_t i = 0; i < st_count(st); i++) bytes += st_at(st, i)->nbytes;
    printf("%s: %zu tensors, %llu bytes\n", st_path(st), st_count(st), bytes);
    for (size_t i = 0; i < st_count(st); i++) {
        const StTensor *t = st_at(st, i);
        char shape[192];
        size_t n = (size_t)snprintf(shape, sizeof shape, "[");
        for (int d = 0; d < t->ndim && n < sizeof shape; d++)
            n += (size_t)snprintf(shape + n, sizeof shape - n, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        if (n < sizeof shape) snprintf(shape + n, sizeof shape - n, "]");
        printf("  %-4s %-22s %s\n", dtype_name(t->dtype), shape, t->name);
    }
    totals->files++;
    totals->tensors += st_count(st);
    totals->bytes += bytes;
}

static int info_file(const char *path, InfoTotals *totals, Error *e) {
    SafeTensors *st;
    if (st_open(&st, path, e)) return -1;
    info_list(st, totals);
    st_close(st);
    return 0;
}

/* An index must find every tensor it lists in its shard; list_shards also lists the shards
 * (when the index was named on its own rather than met in a directory walk). */
static int info_index(const char *path, bool list_shards, InfoTotals *totals, Error *e) {
    StModel *m;
    if (st_model_open(&m, path, e)) return -1;
    for (size_t i = 0; list_shards && i < st_model_shard_count(m); i++) info_list(st_model_shard(m, i), totals);
    printf("%s: index of %zu tensors in %zu shards, all present\n", path, st_model_count(m), st_model_shard_count(m));
    st_model_close(m);
    return 0;
}

static int info_config(const char *path, Error *e) {
    JsonDoc *doc;
    if (json_parse_file(&doc, path, e)) return -1;
    const JsonValue *root = json_root(doc);
    int rc = root->type == JSON_OBJECT ? 0 : error_set(e, "%s: not a JSON object", path);
    if (rc == 0) printf("%s: JSON object with %zu keys\n", path, root->count);
    json_free(doc);
    return rc;
}

/* Every .safetensors file, index and config.json of dir; at the top level also each
 * subdirectory, as a diffusers pipeline keeps one model per subdirectory. */
static int info_dir(const char *dir, bool top, InfoTotals *totals, Error *e) {
    char **names;
    size_t count;
    if (dir_list(dir, &names, &count, e)) return -1;
    int rc = 0;
    for (size_t i = 0; i < count && rc == 0; i++) {
        char path[4096];
        struct stat sb;
        if (names[i][0] == '.') continue;
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, names[i]) >= sizeof path) {
            rc = error_set(e, "%s/%s: path too long", dir, names[i]);
        } else if (stat(path, &sb) != 0) {
            continue;
        } else if (S_ISDIR(sb.st_mode)) {
            if (top) rc = info_dir(path, false, totals, e);
        } else if (strlen(names[i]) > 12 && !strcmp(names[i] + strlen(names[i]) - 12, ".safetensors")) {
            rc = info_file(path, totals, e);
        } else if (strlen(names[i]) > 23 && !strcmp(names[i] + strlen(names[i]) - 23, ".safetensors.index.json")) {
            rc = info_index(path, false, totals, e);
        } else if (!strcmp(names[i], "config.json")) {
            rc = info_config(path, e);
        }
    }
    dir_list_free(names, count);
    return rc;
}

/* diamond info FILE|DIR: validates and lists; 0 when everything is valid, 1 otherwise. */
static int info_main(int argc, char **argv) {
    if (argc != 1) {
        fputs("usage: diamond info FILE|DIR\n", stderr);
        return 2;
    }
    const char *path = argv[0];
    InfoTotals totals = {0};
    Error e = {{0}};
    struct stat sb;
    size_t len = strlen(path);
    int rc;
    if (stat(path, &sb) != 0) rc = error_set(&e, "%s: cannot open: %s", path, strerror(errno));
    else if (S_ISDIR(sb.st_mode)) rc = info_dir(path, true, &totals, &e);
    else if (len >= 5 && !strcmp(path + len - 5, ".json")) rc = info_index(path, true, &totals, &e);
    else rc = info_file(path, &totals, &e);
    if (rc == 0 && totals.files == 0) rc = error_set(&e, "%s: no .safetensors files", path);
    if (rc != 0) {
        fflush(stdout);
        fprintf(stderr, "diamond info: %s\n", e.msg);
        return 1;
    }
    printf("total: %zu files, %zu tensors, %llu bytes (%.1f MiB)\n", totals.files, totals.tensors, totals.bytes,
           (double)totals.bytes / (1024.0 * 1024.0));
    return 0;
}

/* ---- benchmarks ------------------------------------------------------------------------- */

/* Parses a whole decimal argument in [lo, hi]; 0 on success. */
static int bench_parse_int(const char *s, int lo, int hi, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

/* Applies `--threads T` when it is the option at argv[i]; returns 0 when handled. */
static int bench_threads_option(int argc, char **argv, int i, int *threads) {
    if (strcmp(argv[i], "--threads") || i + 1 >= argc ||
        bench_parse_int(argv[i + 1], 1, 1024, threads))
        return -1;
#ifdef _OPENMP
    omp_set_num_threads(*threads);
#else
    fprintf(stderr, "note: built without OpenMP, --threads %d ignored (1 thread)\n", *threads);
    *threads = 1;
#endif
    return 0;
}

static int bench_threads_now(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Times `run` repeatedly after one warm-up: about half a second in all, 3 to 50 repetitions.
 * Fills best and median in seconds. */
static void bench_time(void (*run)(void *), void *ctx, double *best, double *median) {
    double t0 = now_seconds();
    run(ctx);
    double warm = now_seconds() - t0;
    int reps = warm > 0.5 / 3 ? 3 : warm * 50 < 0.5 ? 50 : (int)(0.5 / warm);
    double times[50];
    for (int r = 0; r < reps; r++) {
        t0 = now_seconds();
        run(ctx);
        times[r] = now_seconds() - t0;
    }
    qsort(times, (size_t)reps, sizeof times[0], compare_doubles);
    *best = times[0];
    *median = times[reps / 2];
}

/* Fills x with deterministic pseudo-random values in [-1, 1). */
static void bench_fill(float *x, size_t n, unsigned long long *state) {
    for (size_t i = 0; i < n; i++) {
        *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = (float)((*state >> 40) & 0xFFFF) / 32768.0f - 1.0f;
    }
}

typedef struct AttentionBench {
    AttentionShape shape;
    float scale;
    float *q, *k, *v, *out, *lse, *dout, *dq, *dk, *dv;
} AttentionBench;

static void attention_bench_forward(void *ctx) {
    AttentionBench *a = ctx;
    attention_forward(&a->shape, a->scale, a->q, a->k, a->v, a->out, a->lse);
}

static void attention_bench_backward(void *ctx) {
    AttentionBench *a = ctx;
    attention_backward(&a->shape, a->scale, a->q, a->k, a->v, a->out, a->lse, a->dout, a->dq, a->dk,
                       a->dv);
}

/* diamond bench attention B HEADS N HEAD_DIM [--threads T]: self-attention, q_len = kv_len = N,
 * no mask. Forward flops 4 B H N^2 D (two products); backward 10 B H N^2 D (five, one of them
 * the recomputed scores; the dq and dk/dv passes each recompute scores and dP, counted once). */
static int bench_attention(int argc, char **argv) {
    AttentionBench a = {0};
    int B, H, N, D, threads = bench_threads_now();
    if (argc < 7 || bench_parse_int(argv[3], 1, 1 << 16, &B) || bench_parse_int(argv[4], 1, 1 << 12, &H) ||
        bench_parse_int(argv[5], 1, 1 << 20, &N) || bench_parse_int(argv[6], 1, 1 << 12, &D)) {
        fprintf(stderr, "diamond: usage: diamond bench attention B HEADS N HEAD_DIM [--threads T]\n");
        return 2;
    }
    for (int i = 7; i < argc; i += 2)
        if (bench_threads_option(argc, argv, i, &threads)) {
            fprintf(stderr, "diamond: bench attention: bad option '%s' (expected --threads T)\n", argv[i]);
            return 2;
        }
    a.shape = (AttentionShape){B, H, H, N, N, D, false, NULL};
    a.scale = 1.0f / sqrtf((float)D);
    size_t n = (size_t)B * N * H * D;
    float **arrays[] = {&a.q, &a.k, &a.v, &a.out, &a.dout, &a.dq, &a.dk, &a.dv};
    bool ok = (a.lse = malloc((size_t)B * H * N * sizeof(float))) != NULL;
    for (size_t i = 0; i < sizeof arrays / sizeof *arrays; i++) ok &= (*arrays[i] = calloc(n, sizeof(float))) != NULL;
    if (ok) {
        unsigned long long state = 42;
        float *inputs[] = {a.q, a.k, a.v, a.dout};
        for (int t = 0; t < 4; t++) bench_fill(inputs[t], n, &state);
        double fwd_best, fwd_median, bwd_best, bwd_median;
        bench_time(attention_bench_forward, &a, &fwd_best, &fwd_median);
        bench_time(attention_bench_backward, &a, &bwd_best, &bwd_median);
        double flops = 4.0 * B * H * (double)N * N * D;
        printf("attention B=%d H=%d N=%d D=%d threads=%d backward best=%.3f ms median=%.3f ms "
               "(%.1f GFLOP/s at 10 B H N^2 D flops)\n",
               B, H, N, D, threads, 1e3 * bwd_best, 1e3 * bwd_median, 2.5 * flops / bwd_best * 1e-9);
        printf("attention B=%d H=%d N=%d D=%d threads=%d forward best=%.3f ms median=%.3f ms GFLOPS=%.1f\n",
               B, H, N, D, threads, 1e3 * fwd_best, 1e3 * fwd_median, flops / fwd_best * 1e-9);
    } else {
        fprintf(stderr, "diamond: bench attention: out of memory for B=%d H=%d N=%d D=%d\n", B, H, N, D);
    }
    free(a.lse);
    for (size_t i = 0; i < sizeof arrays / sizeof *arrays; i++) free(*arrays[i]);
    return ok ? 0 : 1;
}

typedef struct ConvBench {
    Conv2dShape shape;
    float *x, *w, *b, *y, *dy, *dx, *dw, *db;
} ConvBench;

static void conv_bench_forward(void *ctx) {
    ConvBench *c = ctx;
    conv2d_forward(&c->shape, c->x, c->w, c->b, c->y);
}

static void conv_bench_forward_backward(void *ctx) {
    ConvBench *c = ctx;
    conv2d_forward(&c->shape, c->x, c->w, c->b, c->y);
    conv2d_backward(&c->shape, c->x, c->w, c->dy, c->dx, c->dw, c->db);
}

/* diamond bench conv B CIN H W COUT K STRIDE PAD [--groups G] [--threads T]: a square kernel
 * over random data. Forward flops 2 B Cout Ho Wo (Cin/G) K^2; the backward does twice that. */
static int bench_conv(int argc, char **argv) {
    static const char *names[] = {"B", "CIN", "H", "W", "COUT", "K", "STRIDE", "PAD"};
    int v[8], groups = 1, threads = bench_threads_now();
    if (argc < 11) {
        fprintf(stderr, "diamond: usage: diamond bench conv B CIN H W COUT K STRIDE PAD "
                        "[--groups G] [--threads T]\n");
        return 2;
    }
    for (int i = 0; i < 8; i++)
        if (bench_parse_int(argv[3 + i], i == 7 ? 0 : 1, 1 << 16, &v[i])) {
            fprintf(stderr, "diamond: bench conv: %s must be an integer in %d..65536, got '%s'\n",
                    names[i], i == 7 ? 0 : 1, argv[3 + i]);
            return 2;
        }
    for (int i = 11; i < argc; i += 2) {
        bool is_groups = !strcmp(argv[i], "--groups") && i + 1 < argc;
        if (is_groups ? bench_parse_int(argv[i + 1], 1, 1 << 16, &groups)
                      : bench_threads_option(argc, argv, i, &threads)) {
            fprintf(stderr, "diamond: bench conv: bad option '%s' (expected --groups G or "
                            "--threads T)\n", argv[i]);
            return 2;
        }
    }
    ConvBench c = {.shape = {v[0], v[1], v[2], v[3], v[4], v[5], v[5], v[6], v[6], v[7], v[7], groups}};
    const Conv2dShape *s = &c.shape;
    int Ho = conv2d_out_h(s), Wo = conv2d_out_w(s);
    if (s->in_ch % groups || s->out_ch % groups || Ho < 1 || Wo < 1) {
        fprintf(stderr, "diamond: bench conv: CIN and COUT must be multiples of G and the kernel "
                        "must fit the padded input\n");
        return 2;
    }
    size_t nx = (size_t)s->batch * s->in_ch * s->in_h * s->in_w;
    size_t ny = (size_t)s->batch * s->out_ch * Ho * Wo;
    size_t nw = (size_t)s->out_ch * (s->in_ch / groups) * s->kernel_h * s->kernel_w;
    float **arrays[] = {&c.x, &c.dx, &c.y, &c.dy, &c.w, &c.dw, &c.b, &c.db};
    size_t counts[] = {nx, nx, ny, ny, nw, nw, (size_t)s->out_ch, (size_t)s->out_ch};
    bool ok = true;
    for (int i = 0; i < 8; i++) ok &= (*arrays[i] = calloc(counts[i], sizeof(float))) != NULL;
    if (ok) {
        unsigned long long state = 42;
        bench_fill(c.x, nx, &state);
        bench_fill(c.w, nw, &state);
        bench_fill(c.b, (size_t)s->out_ch, &state);
        bench_fill(c.dy, ny, &state);
        double fwd_best, fwd_median, both_best, both_median;
        bench_time(conv_bench_forward, &c, &fwd_best, &fwd_median);
        bench_time(conv_bench_forward_backward, &c, &both_best, &both_median);
        double flops = 2.0 * ny * (s->in_ch / groups) * s->kernel_h * s->kernel_w;
        printf("conv B=%d Cin=%d %dx%d -> Cout=%d %dx%d k=%d stride=%d pad=%d groups=%d "
               "threads=%d forward+backward best=%.3f ms median=%.3f ms (%.1f GFLOP/s at 3x "
               "the forward's flops)\n", s->batch, s->in_ch, s->in_h, s->in_w, s->out_ch, Ho, Wo,
               s->kernel_h, s->stride_h, s->pad_h, groups, threads, 1e3 * both_best,
               1e3 * both_median, 3.0 * flops / both_best * 1e-9);
        printf("conv B=%d Cin=%d %dx%d -> Cout=%d %dx%d k=%d stride=%d pad=%d groups=%d "
               "threads=%d forward best=%.3f ms median=%.3f ms GFLOPS=%.1f\n", s->batch,
               s->in_ch, s->in_h, s->in_w, s->out_ch, Ho, Wo, s->kernel_h, s->stride_h, s->pad_h,
               groups, threads, 1e3 * fwd_best, 1e3 * fwd_median, flops / fwd_best * 1e-9);
    } else {
        fprintf(stderr, "diamond: bench conv: out of memory for the tensors\n");
    }
    for (int i = 0; i < 8; i++) free(*arrays[i]);
    return ok ? 0 : 1;
}

typedef struct GemmBench {
    int M, N, K;
    float *A, *B, *C;
} GemmBench;

static void gemm_bench_run(void *ctx) {
    GemmBench *g = ctx;
    gemm(false, false, g->M, g->N, g->K, 1.0f, g->A, g->K, g->B, g->N, 0.0f, g->C, g->N);
}

/* diamond bench gemm M N K [--threads T]: C[M,N] = A[M,K] B[K,N], row-major, no transposes. */
static int bench_gemm(int argc, char **argv) {
    GemmBench g;
    int threads = bench_threads_now();
    if (argc < 6 || bench_parse_int(argv[3], 1, 1 << 16, &g.M) ||
        bench_parse_int(argv[4], 1, 1 << 16, &g.N) || bench_parse_int(argv[5], 1, 1 << 16, &g.K)) {
        fprintf(stderr, "diamond: usage: diamond bench gemm M N K [--threads T], sizes 1..65536\n");
        return 2;
    }
    for (int i = 6; i < argc; i += 2)
        if (bench_threads_option(argc, argv, i, &threads)) {
            fprintf(stderr, "diamond: bench gemm: bad option '%s' (expected --threads T)\n",
                    argv[i]);
            return 2;
        }
    size_t na = (size_t)g.M * g.K, nb = (size_t)g.K * g.N, nc = (size_t)g.M * g.N;
    g.A = malloc(na * sizeof(float));
    g.B = malloc(nb * sizeof(float));
    g.C = malloc(nc * sizeof(float));
    if (!g.A || !g.B || !g.C) {
        fprintf(stderr, "diamond: bench gemm: out of memory for %dx%dx%d\n", g.M, g.N, g.K);
        free(g.A), free(g.B), free(g.C);
        return 1;
    }
    unsigned long long state = 42;
    bench_fill(g.A, na, &state);
    bench_fill(g.B, nb, &state);
    double best, median;
    bench_time(gemm_bench_run, &g, &best, &median);
    double flops = 2.0 * g.M * g.N * g.K;
    printf("gemm M=%d N=%d K=%d threads=%d best=%.3f ms median=%.3f ms GFLOPS=%.1f\n", g.M, g.N,
           g.K, threads, 1e3 * best, 1e3 * median, flops / best * 1e-9);
    free(g.A), free(g.B), free(g.C);
    return 0;
}

/* diamond bench flux2 (--config FILE | --model DIR) -W PIXELS -H PIXELS [--text-len L]
 * [--threads T]: one FLUX.2 transformer forward (batch 1, sigma 0.5) on random latent tokens and
 * prompt embeddings, with random weights made on the fly from a transformer/config.json (no files
 * read: the timing of the real model without its 8 GB) or with a transformer directory's weights.
 * A W x H image has (H/16) x (W/16) latent tokens: the VAE's 8x downsampling, then 2x2 packing.
 * Prints the seconds of the forward and the process's peak resident memory. */
static int bench_flux2(int argc, char **argv) {
    const char *config = NULL, *dir = NULL;
    int width = 0, height = 0, text_len = 512, threads = bench_threads_now();
    for (int i = 3; i < argc; i += 2) {
        const char *opt = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = value != NULL;
        if (ok && !strcmp(opt, "--config")) config = value;
        else if (ok && !strcmp(opt, "--model")) dir = value;
        else if (ok && !strcmp(opt, "-W")) ok = !bench_parse_int(value, 16, IMAGE_MAX_SIDE, &width);
        else if (ok && !strcmp(opt, "-H")) ok = !bench_parse_int(value, 16, IMAGE_MAX_SIDE, &height);
        else if (ok && !strcmp(opt, "--text-len")) ok = !bench_parse_int(value, 1, 1 << 16, &text_len);
        else ok = !bench_threads_option(argc, argv, i, &threads);
        if (!ok) {
            fprintf(stderr, "diamond: bench flux2: bad option '%s'\n", opt);
            return 2;
        }
    }
    if (!config == !dir || width % 16 || height % 16 || !width || !height) {
        fprintf(stderr, "diamond: usage: diamond bench flux2 (--config FILE | --model DIR) -W PIXELS "
                        "-H PIXELS [--text-len L] [--threads T], sizes multiples of 16\n");
        return 2;
    }
    Flux2 *m = NULL;
    Error e = {{0}};
    if (config ? flux2_load_config_only(&m, config, 42, &e) : flux2_load(&m, dir, &e)) {
        fprintf(stderr, "diamond bench flux2: %s\n", e.msg);
        return 1;
    }
    const Flux2Config *c = flux2_config(m);
    int h = height / 16, w = width / 16;
    Tensor *tokens = TENSOR_NEW(1, (int64_t)h * w, c->in_channels);
    Tensor *txt = TENSOR_NEW(1, text_len, c->joint_attention_dim);
    Tensor *v = NULL;
    int rc = !tokens || !txt;
    if (rc) snprintf(e.msg, sizeof e.msg, "out of memory for the inputs");
    else {
        unsigned long long state = 42;
        bench_fill(tokens->data, (size_t)tokens->numel, &state);
        bench_fill(txt->data, (size_t)txt->numel, &state);
        double t0 = now_seconds();
        rc = flux2_forward(m, tokens, h, w, txt, (float[]){0.5f}, NULL, &v, &e);
        double seconds = now_seconds() - t0;
        struct rusage usage;
        getrusage(RUSAGE_SELF, &usage); /* ru_maxrss is in KiB on Linux */
        if (!rc)
            printf("flux2 %dx%d (%d image + %d text tokens) dim=%d blocks=%d+%d weights=%s "
                   "threads=%d forward=%.2f s peak RSS=%.0f MiB\n", width, height, h * w, text_len,
                   c->dim, c->num_layers, c->num_single_layers, config ? "random" : "files",
                   threads, seconds, (double)usage.ru_maxrss / 1024.0);
    }
    if (rc) fprintf(stderr, "diamond bench flux2: %s\n", e.msg);
    tensor_free(v);
    tensor_free(tokens);
    tensor_free(txt);
    flux2_free(m);
    return rc ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "info")) return info_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench")) {
        if (argc >= 3 && !strcmp(argv[2], "gemm")) return bench_gemm(argc, argv);
        if (argc >= 3 && !strcmp(argv[2], "conv")) return bench_conv(argc, argv);
        if (argc >= 3 && !strcmp(argv[2], "attention")) return bench_attention(argc, argv);
        if (argc >= 3 && !strcmp(argv[2], "flux2")) return bench_flux2(argc, argv);
        fprintf(stderr, "diamond: unknown benchmark '%s' (see diamond --help)\n",
                argc >= 3 ? argv[2] : "");
        return 2;
    }
    fprintf(stderr, "diamond: unknown command '%s' (see diamond --help)\n", argv[1]);
    return 2;
}
