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
    "  diamond generate --model DIR --embeddings FILE -W W -H H --steps N -o OUT.png|.ppm\n"
    "                  [--detector DIR] [options]   sample an image with DIAMOND guidance\n"
    "                                   (diamond generate --help for every option)\n"
    "  diamond info FILE|DIR            validate safetensors file(s) and list their tensors\n"
    "  diamond bench gemm M N K [--threads T]\n"
    "  diamond bench conv B CIN H W COUT K STRIDE PAD [--groups G] [--threads T]\n"
    "  diamond bench attention B HEADS N HEAD_DIM [--threads T]\n"
    "  diamond bench model --model DIR --detector DIR -W W -H H [--config-only]\n"
    "                    [--text-len L] [--threads T]   seconds of one transformer forward, the\n"
    "                                     VAE decode and the detector, each with and without its\n"
    "                                     backward, and peak memory; --config-only reads only\n"
    "                                     the config files (random weights)\n"
    "  diamond bench step (the same options)   one unguided and one guided sampler step\n"
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

/* ---- benchmarks: the models ---- */

/* The command line of bench model and bench step. */
typedef struct BenchModelArgs {
    const char *model, *detector;
    int width, height, text_len, threads;
    bool config_only;
} BenchModelArgs;

/* The loaded models and their random inputs. */
typedef struct BenchModels {
    Flux2 *flow;
    VaeDecoder *vae;
    Segformer *detector;
    Tensor *tokens, *txt, *image; /* [1, h*w, C] latent tokens, [1, L, D] prompt, [1, 3, H, W] */
    int h, w;                     /* the latent token grid */
} BenchModels;

static void bench_models_free(BenchModels *m) {
    flux2_free(m->flow);
    vae_decoder_free(m->vae);
    segformer_free(m->detector);
    tensor_free(m->tokens);
    tensor_free(m->txt);
    tensor_free(m->image);
}

/* --model DIR --detector DIR -W W -H H [--config-only] [--text-len L] [--threads T] from
 * argv[3]; 0 on success, else the bad option in *bad. */
static int bench_model_parse(int argc, char **argv, BenchModelArgs *a, const char **bad) {
    *a = (BenchModelArgs){.text_len = 512, .threads = bench_threads_now()};
    for (int i = 3; i < argc; i++) {
        const char *opt = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true;
        *bad = opt;
        if (!strcmp(opt, "--config-only")) {
            a->config_only = true;
            continue;
        }
        if (!value) return -1;
        if (!strcmp(opt, "--model")) a->model = value;
        else if (!strcmp(opt, "--detector")) a->detector = value;
        else if (!strcmp(opt, "-W")) ok = !bench_parse_int(value, 1, IMAGE_MAX_SIDE, &a->width);
        else if (!strcmp(opt, "-H")) ok = !bench_parse_int(value, 1, IMAGE_MAX_SIDE, &a->height);
        else if (!strcmp(opt, "--text-len")) ok = !bench_parse_int(value, 1, 1 << 16, &a->text_len);
        else ok = !bench_threads_option(argc, argv, i, &a->threads);
        if (!ok) return -1;
        i++;
    }
    *bad = "--model, --detector, -W and -H";
    return a->model && a->detector && a->width && a->height ? 0 : -1;
}

/* Random values in [-1, 1) for t. */
static Tensor *bench_random(Tensor *t, unsigned long long *state) {
    if (t) bench_fill(t->data, (size_t)t->numel, state);
    return t;
}

/* The flow model and VAE of a diffusers directory and the detector, from their files or (config
 * only) from their config files with random weights; random inputs for a W x H image. Returns 2
 * for a size the VAE cannot make, 1 for other failures. */
static int bench_models_load(const BenchModelArgs *a, BenchModels *m, Error *e) {
    const uint64_t seed = 42;
    char path[4096];
    snprintf(path, sizeof path, a->config_only ? "%s/transformer/config.json" : "%s/transformer",
             a->model);
    if (a->config_only ? flux2_load_config_only(&m->flow, path, seed, e)
                       : flux2_load(&m->flow, path, e))
        return 1;
    snprintf(path, sizeof path, "%s/vae", a->model);
    if (a->config_only ? vae_decoder_load_config_only(&m->vae, path, seed, e)
                       : vae_decoder_load(&m->vae, path, e))
        return 1;
    if (a->config_only ? segformer_load_config_only(&m->detector, a->detector, seed, e)
                       : segformer_load(&m->detector, a->detector, e))
        return 1;
    const VaeConfig *vc = vae_decoder_config(m->vae);
    int up = 1 << (vc->n_blocks - 1), ph = vc->patch_h * up, pw = vc->patch_w * up;
    if (a->width % pw || a->height % ph) {
        error_set(e, "-W %d -H %d: the size must be a multiple of %dx%d pixels (one latent token)",
                  a->width, a->height, pw, ph);
        return 2;
    }
    m->h = a->height / ph;
    m->w = a->width / pw;
    const Flux2Config *fc = flux2_config(m->flow);
    unsigned long long state = 42;
    m->tokens = bench_random(TENSOR_NEW(1, (int64_t)m->h * m->w, fc->in_channels), &state);
    m->txt = bench_random(TENSOR_NEW(1, a->text_len, fc->joint_attention_dim), &state);
    m->image = bench_random(TENSOR_NEW(1, 3, a->height, a->width), &state);
    if (!m->tokens || !m->txt || !m->image) {
        error_set(e, "out of memory for the inputs");
        return 1;
    }
    return 0;
}

/* One part of a model benchmark: 0, or -1 with a message in e. */
typedef int (*BenchPart)(const BenchModels *m, Error *e);

/* One transformer forward, as one sampling step runs it (sigma 0.5). */
static int bench_transformer(const BenchModels *m, Error *e) {
    Tensor *v = NULL;
    int rc = flux2_forward(m->flow, m->tokens, m->h, m->w, m->txt, (float[]){0.5f},
                           (float[]){4.0f}, &v, e);
    tensor_free(v);
    return rc;
}

/* f(tokens or image) on a fresh tape, without gradients or with d mean(f) / d input. */
static int bench_pass(const BenchModels *m, bool vae, bool backward, Error *e) {
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory for the tape");
    tape_set_grad(t, backward);
    Var *x = var_new(t, vae ? m->tokens : m->image, backward);
    Var *y = vae ? vae_decode(t, m->vae, x, m->h, m->w) : segformer_forward(t, m->detector, x, NULL);
    Var *loss = ag_mean(t, y);
    int rc = tape_check(t, e);
    if (rc == 0 && backward) rc = tape_backward(t, loss, e);
    tape_free(t);
    return rc;
}

static int bench_vae_forward(const BenchModels *m, Error *e) {
    return bench_pass(m, true, false, e);
}

static int bench_vae_backward(const BenchModels *m, Error *e) {
    return bench_pass(m, true, true, e);
}

static int bench_detector_forward(const BenchModels *m, Error *e) {
    return bench_pass(m, false, false, e);
}

static int bench_detector_backward(const BenchModels *m, Error *e) {
    return bench_pass(m, false, true, e);
}

/* One sampler step from the random latent, as generate runs it: the transformer and the Euler
 * update, and with guide the decode of the clean estimate, the detector, their backward to the
 * latent and the shift (lambda 1, the FLUX.2 config's power-3 loss, no gate). */
static int bench_step(const BenchModels *m, bool guide, Error *e) {
    SamplerOptions o = {.steps = 1, .guide = guide, .guidance_scale = 4.0f,
                        .lambda = {.type = LAMBDA_CONSTANT, .value = 1.0},
                        .loss = {.type = ARTIFACT_LOSS_POWER, .gamma = 3.0}};
    Tensor *latent = tensor_clone(m->tokens);
    int rc = latent ? sampler_run(m->flow, m->vae, m->detector, &o, m->txt, latent, m->h, m->w,
                                  NULL, NULL, e)
                    : error_set(e, "out of memory for the latent");
    tensor_free(latent);
    return rc;
}

static int bench_step_plain(const BenchModels *m, Error *e) {
    return bench_step(m, false, e);
}

static int bench_step_guided(const BenchModels *m, Error *e) {
    return bench_step(m, true, e);
}

typedef struct BenchPartRun {
    BenchPart part;
    const BenchModels *m;
    int rc;
    Error e;
} BenchPartRun;

static void bench_part_run(void *ctx) {
    BenchPartRun *r = ctx;
    if (r->rc == 0) r->rc = r->part(r->m, &r->e);
}

static double bench_peak_rss_mib(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage); /* ru_maxrss is in KiB on Linux */
    return (double)usage.ru_maxrss / 1024.0;
}

/* The seconds of one call of part: that call alone when it takes half a second or more (the real
 * models take minutes), else the median of bench_time's repetitions after it. Prints a line. */
static int bench_part(const char *what, BenchPart part, const BenchModels *m, double *seconds,
                      Error *e) {
    BenchPartRun r = {part, m, 0, {{0}}};
    double t0 = now_seconds(), best;
    bench_part_run(&r);
    *seconds = now_seconds() - t0;
    if (r.rc == 0 && *seconds < 0.5) bench_time(bench_part_run, &r, &best, seconds);
    if (r.rc) {
        *e = r.e;
        return -1;
    }
    printf("  %-46s %9.3f s   (peak RSS so far %.0f MiB)\n", what, *seconds, bench_peak_rss_mib());
    fflush(stdout);
    return 0;
}

/* Parses, loads and prints the heading of bench model / bench step; 0 when ready, else the exit
 * status (the models may be partly loaded: free them). */
static int bench_models_open(int argc, char **argv, const char *name, BenchModels *m) {
    BenchModelArgs a;
    const char *bad;
    Error e = {{0}};
    if (bench_model_parse(argc, argv, &a, &bad)) {
        fprintf(stderr, "diamond: bench %s: bad or missing option %s\nusage: diamond bench %s "
                        "--model DIR --detector DIR -W W -H H [--config-only] [--text-len L] "
                        "[--threads T]\n", name, bad, name);
        return 2;
    }
    int rc = bench_models_load(&a, m, &e);
    if (rc) {
        fprintf(stderr, "diamond bench %s: %s\n", name, e.msg);
        return rc;
    }
    const Flux2Config *fc = flux2_config(m->flow);
    const SegformerConfig *sc = segformer_config(m->detector);
    printf("bench %s: %dx%d image, %dx%d latent tokens + %d text tokens, transformer dim %d with "
           "%d+%d blocks, detector input %dx%d, %s weights, %d threads\n", name, a.width, a.height,
           m->w, m->h, a.text_len, fc->dim, fc->num_layers, fc->num_single_layers,
           sc->do_resize ? sc->input_w : a.width, sc->do_resize ? sc->input_h : a.height,
           a.config_only ? "random (config only)" : "file", a.threads);
    printf("  models loaded                                                (peak RSS so far %.0f MiB)\n",
           bench_peak_rss_mib());
    return 0;
}

/* diamond bench model --model DIR --detector DIR -W W -H H [--config-only] [--text-len L]
 * [--threads T]: each model part of a guided step alone, batch 1, on random inputs: one
 * transformer forward, the VAE decode and the detector with and without their backward to the
 * input (the loss is the output's mean). With --config-only no weight file is read (the real
 * sizes' timings without their files). */
static int bench_model(int argc, char **argv) {
    static const struct {
        const char *what;
        BenchPart part;
    } parts[] = {
        {"transformer forward (one step)", bench_transformer},
        {"VAE decode forward", bench_vae_forward},
        {"VAE decode forward+backward (to the latent)", bench_vae_backward},
        {"detector forward", bench_detector_forward},
        {"detector forward+backward (to the image)", bench_detector_backward},
    };
    BenchModels m = {0};
    Error e = {{0}};
    int rc = bench_models_open(argc, argv, "model", &m);
    double seconds;
    for (size_t i = 0; rc == 0 && i < sizeof parts / sizeof *parts; i++)
        if (bench_part(parts[i].what, parts[i].part, &m, &seconds, &e)) {
            fprintf(stderr, "diamond bench model: %s: %s\n", parts[i].what, e.msg);
            rc = 1;
        }
    if (rc == 0) printf("  peak RSS %.0f MiB\n", bench_peak_rss_mib());
    bench_models_free(&m);
    return rc;
}

/* diamond bench step (the same options): one unguided sampler step (transformer forward and the
 * Euler update) and one guided step (plus the VAE decode and detector forward and backward to the
 * latent, and the shift), batch 1, through sampler_run as generate runs them, and their ratio. */
static int bench_step_main(int argc, char **argv) {
    BenchModels m = {0};
    Error e = {{0}};
    int rc = bench_models_open(argc, argv, "step", &m);
    double plain = 0.0, guided = 0.0;
    if (rc == 0 && (bench_part("unguided step (transformer + Euler)", bench_step_plain, &m,
                               &plain, &e) ||
                    bench_part("guided step (+ VAE, detector, backward, shift)",
                               bench_step_guided, &m, &guided, &e))) {
        fprintf(stderr, "diamond bench step: %s\n", e.msg);
        rc = 1;
    }
    if (rc == 0)
        printf("  guided / unguided %.2fx\n  peak RSS %.0f MiB\n", guided / plain,
               bench_peak_rss_mib());
    bench_models_free(&m);
    return rc;
}

/* ---- sampler: diamond generate ---------------------------------------------------------- */

static const char *generate_usage =
    "usage: diamond generate --model DIR --embeddings FILE -W W -H H --steps N -o OUT.png|OUT.ppm\n"
    "                        [--detector DIR] --seed S[,S...] | --noise FILE [options]\n"
    "\n"
    "Samples FLUX.2 (transformer/ and vae/ of DIR, diffusers layout) with DIAMOND's artifact\n"
    "guidance: each step decodes the clean estimate, runs the detector (DIR in the transformers\n"
    "layout) on it and moves the latent by lambda along the normalised gradient of the loss.\n"
    "\n"
    "  --model DIR            the pipeline directory (DIR/transformer, DIR/vae)\n"
    "  --detector DIR         the artifact detector (SegFormer); needed unless --no-guide\n"
    "  --embeddings FILE      safetensors with prompt_embeds [L, D] (D = joint_attention_dim)\n"
    "  --prompt TEXT          not available: the text encoder is not implemented yet; encode the\n"
    "                         prompt elsewhere and pass --embeddings\n"
    "  --seed S[,S...]        one image per seed: the initial latent is PyTorch's CPU\n"
    "                         torch.randn((1, C, H/P, W/P)) after manual_seed(S), packed to\n"
    "                         tokens, as the FLUX.2 pipeline with a CPU generator\n"
    "  --noise FILE           instead, safetensors with noise [T, C] or [B, T, C]: the packed\n"
    "                         initial latent (T = (H/P) * (W/P) tokens, C = the transformer's\n"
    "                         in_channels); --seed then only names the outputs\n"
    "  --steps N              sampling steps (FLUX.2 klein: 4, FLUX.2 dev: 30)\n"
    "  -W W, -H H             image size, multiples of P = 2^(len(block_out_channels)-1) *\n"
    "                         patch_size of the VAE (16 for FLUX.2)\n"
    "  --guidance-scale G     distilled guidance for models with guidance_embeds (default 4.0,\n"
    "                         FLUX.2 dev); ignored by klein\n"
    "  --lambda-schedule S    TYPE[:key=value,...], default power (start 12, end 1, power 2):\n"
    "                           constant:value=0\n"
    "                           linear:start=12,end=1\n"
    "                           power:start=12,end=1,power=2\n"
    "                           cosine:start=12,end=1\n"
    "                           hard_then_exp:start=30,after=2,power=2\n"
    "                           exponential:start=30,end=1,power=5,warmup=5,cooldown=12\n"
    "                         (values shown are the official defaults; the FLUX.2 config's\n"
    "                         exponential guides no step when N <= 17). Where the official\n"
    "                         formulas divide by zero (N = 1, an exponential window of one step)\n"
    "                         that step gets the start value\n"
    "  --loss L               mse | power:gamma=G (default 2) | focal:gamma=G,alpha=A (defaults\n"
    "                         2, 1); default power:gamma=3 (the FLUX.2 config). focal is the\n"
    "                         official -alpha (1-m)^gamma log(1-m+1e-6), kept as it is: its\n"
    "                         weight is large where the mask is small, the reverse of the usual\n"
    "                         focal loss\n"
    "  --no-guide             plain sampling, no detector (the baseline)\n"
    "  --gate T               skip the detector backward and the shift for a sample whose\n"
    "                         detector max is below T at that step (default off, as official)\n"
    "  --threads T            OpenMP threads\n"
    "  -o OUT                 the image (.png or .ppm); a batch writes OUT-SEED.png per image\n"
    "  --compare FILE         also run the baseline from the same noise and prompt and write\n"
    "                         one row per image: baseline | guided | detector heat maps of\n"
    "                         both (0.6 jet + 0.4 image); prints the detector max of each\n"
    "  --save-steps DIR       DIR/step_III_x0.png (the decoded clean estimate of every step) and\n"
    "                         DIR/step_III_overlay.png (its detector heat map, where the detector\n"
    "                         ran); costs one more VAE decode per step. DIR must exist\n"
    "  --dump FILE            safetensors with step.I.{x_t,sigma,v,x0,mask,grad,lambda} for every\n"
    "                         step (mask and grad where computed; grad before normalisation),\n"
    "                         final.latent and final.image\n"
    "  --quiet                no progress on stderr\n"
    "\n"
    "exit status: 0 success, 1 runtime error (bad file, bad data), 2 bad command line\n";

#define GENERATE_MAX_BATCH 64

typedef struct GenerateArgs {
    const char *model, *detector, *embeddings, *noise, *out, *dump, *compare, *save_steps;
    uint64_t seeds[GENERATE_MAX_BATCH];
    int n_seeds, steps, width, height;
    SamplerOptions opt;
    bool quiet;
} GenerateArgs;

/* "S" or "S,S,..." of whole numbers in 0..2^63. */
static int generate_parse_seeds(const char *s, GenerateArgs *a) {
    a->n_seeds = 0;
    while (*s) {
        char *end;
        errno = 0;
        if (*s == '-' || *s == '+' || a->n_seeds == GENERATE_MAX_BATCH) return -1;
        unsigned long long v = strtoull(s, &end, 10);
        if (end == s || errno || (*end && *end != ',')) return -1;
        a->seeds[a->n_seeds++] = v;
        s = *end ? end + 1 : end;
    }
    return a->n_seeds > 0 ? 0 : -1;
}

static int generate_parse_float(const char *s, float lo, float hi, float *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= lo && v <= hi)) return -1;
    *out = (float)v;
    return 0;
}

/* The field of a for an option that names a file or directory, or NULL. */
static const char **generate_path_field(GenerateArgs *a, const char *opt) {
    const struct {
        const char *name;
        const char **field;
    } paths[] = {{"--model", &a->model}, {"--detector", &a->detector},
                 {"--embeddings", &a->embeddings}, {"--noise", &a->noise}, {"-o", &a->out},
                 {"--dump", &a->dump}, {"--compare", &a->compare},
                 {"--save-steps", &a->save_steps}};
    for (size_t k = 0; k < sizeof paths / sizeof *paths; k++)
        if (!strcmp(opt, paths[k].name)) return paths[k].field;
    return NULL;
}

/* An option of generate_takes_value with its value at argv[i]; 0, or -1 with the message in e. */
static int generate_value_option(int argc, char **argv, int i, GenerateArgs *a, Error *e) {
    const char *opt = argv[i - 1], *val = argv[i];
    int threads;
    if (!strcmp(opt, "--seed")) {
        if (generate_parse_seeds(val, a))
            return error_set(e, "--seed: expected S or S,S,... (at most %d whole numbers), got "
                                "'%s'", GENERATE_MAX_BATCH, val);
    } else if (!strcmp(opt, "--steps")) {
        if (bench_parse_int(val, 1, 10000, &a->steps))
            return error_set(e, "--steps: expected 1..10000, got '%s'", val);
    } else if (!strcmp(opt, "-W") || !strcmp(opt, "-H")) {
        if (bench_parse_int(val, 1, IMAGE_MAX_SIDE, opt[1] == 'W' ? &a->width : &a->height))
            return error_set(e, "%s: expected a size in 1..%d, got '%s'", opt, IMAGE_MAX_SIDE, val);
    } else if (!strcmp(opt, "--guidance-scale")) {
        if (generate_parse_float(val, -1e6f, 1e6f, &a->opt.guidance_scale))
            return error_set(e, "--guidance-scale: expected a number, got '%s'", val);
    } else if (!strcmp(opt, "--gate")) {
        if (generate_parse_float(val, 0.0f, 1.0f, &a->opt.gate))
            return error_set(e, "--gate: expected a threshold in [0, 1], got '%s'", val);
    } else if (!strcmp(opt, "--threads")) {
        if (bench_threads_option(argc, argv, i - 1, &threads))
            return error_set(e, "--threads: expected 1..1024, got '%s'", val);
    } else if (!strcmp(opt, "--lambda-schedule")) {
        return lambda_schedule_parse(&a->opt.lambda, val, e);
    } else { /* --loss */
        return artifact_loss_parse(&a->opt.loss, val, e);
    }
    return 0;
}

static bool generate_takes_value(const char *opt) {
    static const char *const names[] = {"--seed", "--steps", "-W", "-H", "--guidance-scale",
                                        "--gate", "--threads", "--lambda-schedule", "--loss"};
    for (size_t k = 0; k < sizeof names / sizeof *names; k++)
        if (!strcmp(opt, names[k])) return true;
    return false;
}

/* One option at argv[*i], moving *i past its value when it takes one. */
static int generate_option(int argc, char **argv, int *i, GenerateArgs *a, Error *e) {
    const char *opt = argv[*i];
    const char **path = generate_path_field(a, opt);
    if (!strcmp(opt, "--prompt"))
        return error_set(e, "--prompt: the text encoder is not implemented yet; encode the prompt "
                            "elsewhere and pass --embeddings FILE (prompt_embeds [L, D])");
    if (!strcmp(opt, "--no-guide")) a->opt.guide = false;
    else if (!strcmp(opt, "--quiet")) a->quiet = true;
    else if (!path && !generate_takes_value(opt)) return error_set(e, "unknown option '%s'", opt);
    else if (*i + 1 >= argc) return error_set(e, "%s needs a value", opt);
    else if (path) *path = argv[++*i];
    else return generate_value_option(argc, argv, ++*i, a, e);
    return 0;
}

/* The command line into a, with defaults; 0, or -1 with the message in e (a usage error). */
static int generate_parse(int argc, char **argv, GenerateArgs *a, Error *e) {
    *a = (GenerateArgs){.opt = {.guide = true, .guidance_scale = 4.0f}};
    if (lambda_schedule_parse(&a->opt.lambda, "power", e) ||
        artifact_loss_parse(&a->opt.loss, "power:gamma=3", e))
        return -1;
    for (int i = 0; i < argc; i++)
        if (generate_option(argc, argv, &i, a, e)) return -1;
    const char *missing = !a->model ? "--model DIR" : !a->embeddings ? "--embeddings FILE"
                        : !a->out ? "-o OUT" : !a->steps ? "--steps N" : !a->width ? "-W W"
                        : !a->height ? "-H H" : !a->detector && a->opt.guide ? "--detector DIR"
                        : !a->noise && !a->n_seeds ? "--seed S (or --noise FILE)" : NULL;
    if (missing) return error_set(e, "missing %s (see diamond generate --help)", missing);
    const char *images[2] = {a->out, a->compare};
    for (int k = 0; k < 2; k++) {
        const char *dot = images[k] ? strrchr(images[k], '.') : ".png";
        if (!dot || (strcmp(dot, ".png") && strcmp(dot, ".ppm")))
            return error_set(e, "%s %s: the name must end in .png or .ppm", k ? "--compare" : "-o",
                             images[k]);
    }
    if (a->compare && !a->opt.guide)
        return error_set(e, "--compare needs guidance (it runs the baseline itself): drop "
                            "--no-guide");
    a->opt.steps = a->steps;
    return 0;
}

/* The loaded models and inputs of one run. */
typedef struct GenerateRun {
    Flux2 *flow;
    VaeDecoder *vae;
    Segformer *detector;
    Tensor *txt, *latent; /* [B, L, D], [B, T, C] */
    int grid_h, grid_w;
} GenerateRun;

static void generate_run_free(GenerateRun *r) {
    flux2_free(r->flow);
    vae_decoder_free(r->vae);
    segformer_free(r->detector);
    tensor_free(r->txt);
    tensor_free(r->latent);
}

/* The F32/F16/BF16 tensor `name` of path, [rows, cols] or [B, rows, cols] (rows < 0: any
 * count, shown as L), as a new [B, rows, cols] tensor (B = 1 for the 2-dim form). */
static int generate_read(const char *path, const char *name, int64_t rows, int64_t cols,
                         Tensor **out, Error *e) {
    SafeTensors *st;
    *out = NULL;
    if (st_open(&st, path, e)) return -1;
    const StTensor *t = st_find(st, name);
    char dims[32] = "L";
    if (rows >= 0) snprintf(dims, sizeof dims, "%lld", (long long)rows);
    int rc = 0;
    if (!t) rc = error_set(e, "%s: no tensor '%s'", path, name);
    else if ((t->ndim != 2 && t->ndim != 3) || (rows >= 0 && t->shape[t->ndim - 2] != rows) ||
             t->shape[t->ndim - 1] != cols || t->numel == 0)
        rc = error_set(e, "%s: '%s' must be [%s, %lld] (or with a batch dim in front)", path,
                       name, dims, (long long)cols);
    if (rc == 0) {
        int64_t B = t->ndim == 3 ? t->shape[0] : 1;
        *out = TENSOR_NEW(B, t->shape[t->ndim - 2], cols);
        rc = *out ? st_read_f32(st, name, (*out)->data, (*out)->numel, e)
                  : error_set(e, "%s: out of memory for '%s'", path, name);
    }
    if (rc) tensor_free(*out), *out = NULL;
    st_close(st);
    return rc;
}

/* prompt_embeds [L, D] (or [1, L, D]) repeated over the batch. */
static int generate_embeddings(const GenerateArgs *a, GenerateRun *r, int batch, Error *e) {
    Tensor *one;
    int D = flux2_config(r->flow)->joint_attention_dim;
    if (generate_read(a->embeddings, "prompt_embeds", -1, D, &one, e)) return -1;
    int rc = 0;
    if (one->shape[0] != 1)
        rc = error_set(e, "%s: prompt_embeds must hold one prompt, [L, %d]", a->embeddings, D);
    else if (!(r->txt = TENSOR_NEW(batch, one->shape[1], D)))
        rc = error_set(e, "out of memory for the embeddings");
    for (int b = 0; rc == 0 && b < batch; b++)
        memcpy(r->txt->data + b * one->numel, one->data, (size_t)one->numel * sizeof(float));
    tensor_free(one);
    return rc;
}

/* One PyTorch-identical initial latent per seed: [n_seeds, T, C]. */
static int generate_seed_noise(const GenerateArgs *a, GenerateRun *r, Error *e) {
    int C = flux2_config(r->flow)->in_channels;
    int64_t T = (int64_t)r->grid_h * r->grid_w;
    if (!(r->latent = TENSOR_NEW(a->n_seeds, T, C)))
        return error_set(e, "out of memory for the initial latent");
    for (int b = 0; b < a->n_seeds; b++)
        if (latent_noise_tokens(a->seeds[b], C, r->grid_h, r->grid_w, r->latent->data + b * T * C,
                                e))
            return -1;
    return 0;
}

/* Models, image grid and inputs; returns 2 for sizes the model cannot make, 1 for other
 * failures, 0 when ready. */
static int generate_load(const GenerateArgs *a, GenerateRun *r, Error *e) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/transformer", a->model);
    if (flux2_load(&r->flow, dir, e)) return 1;
    snprintf(dir, sizeof dir, "%s/vae", a->model);
    if (vae_decoder_load(&r->vae, dir, e)) return 1;
    const VaeConfig *vc = vae_decoder_config(r->vae);
    int up = 1 << (vc->n_blocks - 1), ph = vc->patch_h * up, pw = vc->patch_w * up;
    if (a->width % pw || a->height % ph) {
        error_set(e, "-W %d -H %d: the size must be a multiple of %dx%d pixels (one latent token)",
                  a->width, a->height, pw, ph);
        return 2;
    }
    r->grid_h = a->height / ph;
    r->grid_w = a->width / pw;
    if (a->opt.guide && segformer_load(&r->detector, a->detector, e)) return 1;
    if (a->noise ? generate_read(a->noise, "noise", (int64_t)r->grid_h * r->grid_w,
                                 flux2_config(r->flow)->in_channels, &r->latent, e)
                 : generate_seed_noise(a, r, e))
        return 1;
    int batch = (int)r->latent->shape[0];
    if (a->n_seeds && a->n_seeds != batch) {
        error_set(e, "%d seeds for a noise batch of %d", a->n_seeds, batch);
        return 2;
    }
    return generate_embeddings(a, r, batch, e) ? 1 : 0;
}

/* Every step's tensors for --dump, copied as they come. */
typedef struct GenerateDump {
    StWriteTensor *items;
    size_t n, cap;
} GenerateDump;

static void generate_dump_free(GenerateDump *d) {
    for (size_t i = 0; i < d->n; i++) {
        free((char *)d->items[i].name);
        free((void *)d->items[i].data);
    }
    free(d->items);
}

static int generate_dump_add(GenerateDump *d, const char *name, const float *data, int ndim,
                             const int64_t *shape, Error *e) {
    size_t n = 1;
    for (int k = 0; k < ndim; k++) n *= (size_t)shape[k];
    if (d->n == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 64;
        StWriteTensor *items = realloc(d->items, cap * sizeof *items);
        if (!items) return error_set(e, "out of memory for the dump");
        d->items = items;
        d->cap = cap;
    }
    StWriteTensor *t = &d->items[d->n];
    *t = (StWriteTensor){.name = strdup(name), .dtype = DTYPE_F32, .ndim = ndim};
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    float *copy = malloc(n * sizeof *copy);
    t->data = copy;
    d->n++;
    if (!t->name || !copy) return error_set(e, "out of memory for the dump");
    memcpy(copy, data, n * sizeof *copy);
    return 0;
}

static int generate_dump_tensor(GenerateDump *d, int step, const char *part, const Tensor *t,
                                Error *e) {
    char name[64];
    snprintf(name, sizeof name, "step.%d.%s", step, part);
    return generate_dump_add(d, name, t->data, t->ndim, t->shape, e);
}

/* A latent's image, no gradient: [B, 3, H, W] in about [-1, 1]. */
static int generate_decode(const GenerateRun *r, Tensor *latent, Tensor **image, Error *e) {
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory for the decoder");
    tape_set_grad(t, false);
    Var *img = vae_decode(t, r->vae, var_new(t, latent, false), r->grid_h, r->grid_w);
    int rc = tape_check(t, e);
    if (rc == 0 && !(*image = tensor_clone(img->value))) rc = error_set(e, "out of memory");
    tape_free(t);
    return rc;
}

/* Sample b of image [B, 3, H, W] as 8-bit RGB the official way: ((x + 1) / 2) clipped to
 * [0, 1], times 255, truncated (NaN becomes 0). */
static void generate_to_rgb(const Tensor *image, int64_t b, Image *out) {
    int64_t H = image->shape[2], W = image->shape[3], plane = H * W;
    const float *x = image->data + b * 3 * plane;
    for (int64_t p = 0; p < plane; p++)
        for (int c = 0; c < 3; c++) {
            float v = (x[c * plane + p] + 1.0f) / 2.0f;
            v = v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f;
            out->rgb[p * 3 + c] = (uint8_t)(v * 255.0f);
        }
}

/* path for one image, else path with "-SEED" (or "-INDEX") before the extension. */
static void generate_out_name(const GenerateArgs *a, const char *path, int64_t b, int64_t batch,
                              char *name, size_t len) {
    const char *dot = strrchr(path, '.');
    unsigned long long tag = a->n_seeds ? (unsigned long long)a->seeds[b] : (unsigned long long)b;
    if (batch == 1) snprintf(name, len, "%s", path);
    else snprintf(name, len, "%.*s-%llu%s", (int)(dot - path), path, tag, dot);
}

static int generate_write_images(const GenerateArgs *a, const Tensor *image, Error *e) {
    Image img = {0};
    if (image_alloc(&img, (int)image->shape[3], (int)image->shape[2], e)) return -1;
    int rc = 0;
    bool png = !strcmp(strrchr(a->out, '.'), ".png");
    for (int64_t b = 0; rc == 0 && b < image->shape[0]; b++) {
        char name[4096];
        generate_out_name(a, a->out, b, image->shape[0], name, sizeof name);
        generate_to_rgb(image, b, &img);
        rc = png ? png_write(name, &img, e) : ppm_write(name, &img, e);
        if (rc == 0 && !a->quiet) fprintf(stderr, "wrote %s\n", name);
    }
    image_free(&img);
    return rc;
}

/* ---- sampler: --compare ---- */

/* The detector on images [B, 3, H, W], no gradient: its full-size mask [B, L, H, W] and each
 * sample's max over the map at 1/4 of its input (the artifact-frequency statistic). */
static int generate_detect(const GenerateRun *r, Tensor *image, Tensor **mask, float *maxima,
                           Error *e) {
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory for the detector");
    tape_set_grad(t, false);
    Var *small = NULL, *m = segformer_forward(t, r->detector, var_new(t, image, false), &small);
    int rc = tape_check(t, e);
    if (rc == 0 && !(*mask = tensor_clone(m->value))) rc = error_set(e, "out of memory");
    for (int64_t b = 0; rc == 0 && b < image->shape[0]; b++) {
        size_t per = (size_t)(small->value->numel / image->shape[0]);
        maxima[b] = max_array(per, small->value->data + b * per);
    }
    tape_free(t);
    return rc;
}

/* A jet colour map channel: centre 3 red, 2 green, 1 blue; v in [0, 1] -> [0, 1]. */
static float jet(float v, float centre) {
    float x = 1.5f - fabsf(4.0f * v - centre);
    return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f;
}

/* src drawn into dst at (x0, y0), as itself or (heat) as the official overlay of its mask
 * ([src.height, src.width] in [0, 1]): 0.6 jet(mask) + 0.4 image. */
static void generate_panel(Image *dst, int x0, int y0, const Image *src, const float *heat) {
    for (int y = 0; y < src->height; y++)
        for (int x = 0; x < src->width; x++) {
            const uint8_t *from = &src->rgb[((size_t)y * src->width + x) * 3];
            uint8_t *to = &dst->rgb[((size_t)(y0 + y) * dst->width + x0 + x) * 3];
            for (int c = 0; c < 3; c++)
                to[c] = heat ? (uint8_t)(0.6f * 255.0f * jet(heat[(size_t)y * src->width + x],
                                                             3.0f - c) + 0.4f * from[c])
                             : from[c];
        }
}

/* Row b of the comparison, 4 panels of W x H: the baseline and guided images, then each with
 * its mask as a heat map. */
static void generate_compare_row(Image *out, int64_t b, const Image panels[2],
                                 Tensor *const masks[2]) {
    int W = panels[0].width, H = panels[0].height;
    for (int k = 0; k < 2; k++) {
        const float *m = masks[k]->data + b * masks[k]->numel / masks[k]->shape[0];
        generate_panel(out, k * W, (int)b * H, &panels[k], NULL);
        generate_panel(out, (2 + k) * W, (int)b * H, &panels[k], m);
    }
}

typedef struct GenerateProgress {
    const GenerateArgs *args;
    const GenerateRun *run;
    GenerateDump *dump; /* NULL without --dump */
    bool quiet;
    double start;
} GenerateProgress;

/* --save-steps: DIR/step_III_x0.png, the decoded clean estimate, and where the detector ran
 * DIR/step_III_overlay.png, its mask over it (one more VAE decode per step). */
static int generate_save_step(const GenerateProgress *p, const SamplerStep *s, Error *e) {
    const GenerateArgs *a = p->args;
    Tensor *image = NULL;
    Image img = {0}, heat = {0};
    /* the decode only reads x0 (grad off), so the const is only set aside for var_new */
    int rc = generate_decode(p->run, (Tensor *)s->x0, &image, e) ||
             image_alloc(&img, (int)image->shape[3], (int)image->shape[2], e) ||
             image_alloc(&heat, img.width, img.height, e);
    for (int64_t b = 0; rc == 0 && b < image->shape[0]; b++) {
        char base[4096], name[4200];
        generate_to_rgb(image, b, &img);
        snprintf(base, sizeof base, "%s/step_%03d_x0.png", a->save_steps, s->index);
        generate_out_name(a, base, b, image->shape[0], name, sizeof name);
        rc = png_write(name, &img, e);
        if (rc || !s->mask) continue;
        generate_panel(&heat, 0, 0, &img, s->mask->data + b * s->mask->numel / s->mask->shape[0]);
        snprintf(base, sizeof base, "%s/step_%03d_overlay.png", a->save_steps, s->index);
        generate_out_name(a, base, b, image->shape[0], name, sizeof name);
        rc = png_write(name, &heat, e);
    }
    image_free(&img);
    image_free(&heat);
    tensor_free(image);
    return rc ? -1 : 0;
}

/* step i/N, seconds per step and the time left, on stderr; the step's tensors into the dump. */
static int generate_on_step(const SamplerStep *s, void *ctx, Error *e) {
    GenerateProgress *p = ctx;
    if (!p->quiet) {
        double per = (now_seconds() - p->start) / (s->index + 1);
        fprintf(stderr, "step %d/%d  sigma %.4f  lambda %g  %.2f s/step  ETA %.0f s\n",
                s->index + 1, s->steps, s->sigma, s->lambda, per, per * (s->steps - s->index - 1));
    }
    if (p->args->save_steps && generate_save_step(p, s, e)) return -1;
    GenerateDump *d = p->dump;
    if (!d) return 0;
    const int64_t one = 1;
    char name[64];
    snprintf(name, sizeof name, "step.%d.sigma", s->index);
    if (generate_dump_add(d, name, &s->sigma, 1, &one, e)) return -1;
    snprintf(name, sizeof name, "step.%d.lambda", s->index);
    if (generate_dump_add(d, name, &s->lambda, 1, &one, e) ||
        generate_dump_tensor(d, s->index, "x_t", s->x_t, e) ||
        generate_dump_tensor(d, s->index, "v", s->v, e) ||
        generate_dump_tensor(d, s->index, "x0", s->x0, e) ||
        (s->mask && generate_dump_tensor(d, s->index, "mask", s->mask, e)) ||
        (s->grad && generate_dump_tensor(d, s->index, "grad", s->grad, e)))
        return -1;
    return 0;
}

/* The baseline from the same initial latent and prompt, then baseline | guided | heat maps, one
 * row per image, into --compare; the detector max of both on stdout. */
static int generate_compare(const GenerateArgs *a, GenerateRun *r, Tensor *initial,
                            Tensor *guided, Error *e) {
    SamplerOptions plain = a->opt;
    plain.guide = false;
    GenerateArgs plain_args = *a;
    plain_args.save_steps = NULL; /* the steps saved are the guided run's */
    GenerateProgress progress = {&plain_args, r, NULL, a->quiet, now_seconds()};
    if (!a->quiet) fprintf(stderr, "baseline:\n");
    int64_t B = initial->shape[0], H = guided->shape[2], W = guided->shape[3];
    Tensor *baseline = NULL, *masks[2] = {NULL, NULL};
    float *maxima = calloc(2 * (size_t)B, sizeof *maxima);
    Image out = {0}, panels[2] = {{0}, {0}};
    int rc = maxima ? 0 : error_set(e, "out of memory");
    if (rc == 0)
        rc = sampler_run(r->flow, r->vae, NULL, &plain, r->txt, initial, r->grid_h, r->grid_w,
                         generate_on_step, &progress, e) ||
             generate_decode(r, initial, &baseline, e) ||
             generate_detect(r, baseline, &masks[0], maxima, e) ||
             generate_detect(r, guided, &masks[1], maxima + B, e) ||
             image_alloc(&out, (int)(4 * W), (int)(B * H), e) ||
             image_alloc(&panels[0], (int)W, (int)H, e) ||
             image_alloc(&panels[1], (int)W, (int)H, e);
    for (int64_t b = 0; rc == 0 && b < B; b++) {
        generate_to_rgb(baseline, b, &panels[0]);
        generate_to_rgb(guided, b, &panels[1]);
        generate_compare_row(&out, b, panels, masks);
        printf("image %lld: detector max %.4f (baseline) -> %.4f (guided)\n",
                (long long)b, maxima[b], maxima[B + b]);
    }
    if (rc == 0)
        rc = !strcmp(strrchr(a->compare, '.'), ".png") ? png_write(a->compare, &out, e)
                                                       : ppm_write(a->compare, &out, e);
    if (rc == 0 && !a->quiet) fprintf(stderr, "wrote %s\n", a->compare);
    image_free(&out);
    image_free(&panels[0]);
    image_free(&panels[1]);
    tensor_free(baseline);
    tensor_free(masks[0]);
    tensor_free(masks[1]);
    free(maxima);
    return rc ? -1 : 0;
}

/* Sampling, the image files, the comparison and the dump. */
static int generate_sample(const GenerateArgs *a, GenerateRun *r, Error *e) {
    GenerateDump dump = {0};
    GenerateProgress progress = {a, r, a->dump ? &dump : NULL, a->quiet, now_seconds()};
    Tensor *image = NULL, *initial = a->compare ? tensor_clone(r->latent) : NULL;
    if (a->compare && !initial) return error_set(e, "out of memory for the baseline latent");
    int rc = sampler_run(r->flow, r->vae, r->detector, &a->opt, r->txt, r->latent, r->grid_h,
                         r->grid_w, generate_on_step, &progress, e) ||
             generate_decode(r, r->latent, &image, e) || generate_write_images(a, image, e) ||
             (a->compare && generate_compare(a, r, initial, image, e));
    tensor_free(initial);
    if (rc == 0 && a->dump)
        rc = generate_dump_add(&dump, "final.latent", r->latent->data, r->latent->ndim,
                               r->latent->shape, e) ||
             generate_dump_add(&dump, "final.image", image->data, image->ndim, image->shape, e) ||
             st_write(a->dump, dump.items, dump.n, e);
    tensor_free(image);
    generate_dump_free(&dump);
    return rc ? -1 : 0;
}

/* diamond generate ...: 0 on success, 2 for a bad command line, 1 for anything else. */
static int generate_main(int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(generate_usage, stdout);
            return 0;
        }
    GenerateArgs a;
    GenerateRun r = {0};
    Error e = {{0}};
    if (generate_parse(argc, argv, &a, &e)) {
        fprintf(stderr, "diamond generate: %s\n", e.msg);
        return 2;
    }
    int rc = generate_load(&a, &r, &e);
    if (rc == 0 && generate_sample(&a, &r, &e)) rc = 1;
    if (rc) fprintf(stderr, "diamond generate: %s\n", e.msg);
    generate_run_free(&r);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "info")) return info_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "generate")) return generate_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench")) {
        if (argc >= 3 && !strcmp(argv[2], "gemm")) return bench_gemm(argc, argv);
        if (argc >= 3 && !strcmp(argv[2], "conv")) return bench_conv(argc, argv);
        if (argc >= 3 && !strcmp(argv[2], "attention")) return bench_attention(argc, argv);
        if (argc >= 3 && !strcmp(argv[2], "model")) return bench_model(argc, argv);
        if (argc >= 3 && !strcmp(argv[2], "step")) return bench_step_main(argc, argv);
        fprintf(stderr, "diamond: unknown benchmark '%s' (see diamond --help)\n",
                argc >= 3 ? argv[2] : "");
        return 2;
    }
    fprintf(stderr, "diamond: unknown command '%s' (see diamond --help)\n", argv[1]);
    return 2;
}
