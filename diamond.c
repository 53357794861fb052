/* diamond.c - the command line: DIAMOND sampling, model inspection and benchmarks.
 *
 * Contents: info; benchmarks; options (the one table every command declares its options in);
 * prompts (diamond encode); sampler (diamond generate, --compare and its comparison sheets);
 * eval (diamond eval, diamond search-seeds, --merge); demo (./diamond alone); main. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "diamond.h"
#include "io.h"
#include "nn.h"
#include "tensor.h"
#include "train/train.h"

/* The usage: the commands, then (from the benchmarks' table, bench_usage) the benchmarks, then
 * usage_tail. */
static const char *usage_text =
    "diamond - training-free artifact removal for rectified-flow image models (DIAMOND)\n"
    "\n"
    "usage:\n"
    "  diamond [demo] [--weights DIR] [-o diamond-demo.png]\n"
    "                                   DIAMOND on the embedded models, in seconds\n"
    "  diamond generate --model DIR --prompt TEXT|--embeddings FILE -W W -H H --steps N\n"
    "                  -o OUT.png|.ppm [--detector DIR] [options]\n"
    "                                   sample an image with DIAMOND guidance\n"
    "                                   (diamond generate --help for every option)\n"
    "  diamond encode --model DIR --prompt TEXT -o FILE.safetensors [--max-length N]\n"
    "                                   a prompt's embeddings, input_ids and attention_mask as\n"
    "                                   the pipeline makes them (FLUX.2 [klein]: Qwen3)\n"
    "  diamond eval --model DIR --detector DIR --csv FILE --out DIR [options]\n"
    "                                   baseline vs guided over a prompt,seed CSV: images,\n"
    "                                   the paper's metrics (resumable, --shard I/N, --merge)\n"
    "  diamond search-seeds --model DIR --detector DIR --csv IN --out OUT.csv [options]\n"
    "                                   the official seed search for an evaluation set\n"
    "                                   (diamond eval --help, diamond search-seeds --help)\n"
    "  diamond world [--word WORD] [--seed S] [--corrupt [--type NAME]] -o OUT.png\n"
    "                                   a scene of the words world, its corruption and mask\n"
    "  diamond train vae|vae-decoder|text+flow|detector --config DIR --out DIR [options]\n"
    "                                   train an embedded model (`make weights` trains all)\n"
    "  diamond info FILE|DIR            validate safetensors file(s) and list their tensors\n"
    "  diamond info IMAGE.png           the generation parameters generate wrote into it\n";
static const char *usage_tail =
    "  diamond help                     this text\n"
    "  diamond --version                the version\n"
    "\n"
    "exit status: 0 success, 1 runtime error (bad file, bad data), 2 bad command line\n";

/* A macro's value as text, for an option's fallback: TEXT_OF(KLEIN_MAX_LENGTH) is "512". */
#define TEXT_OF_TOKENS(x) #x
#define TEXT_OF(x) TEXT_OF_TOKENS(x)

/* The iTXt key of the generation parameters in generate's PNGs (stable-diffusion tools' key). */
#define GENERATE_PNG_KEY "parameters"

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* text's lines ('\n' between them), each after the first on a new line indented by `indent`
 * spaces; no newline after the last: help texts in aligned columns. */
static void text_lines(FILE *f, const char *text, int indent) {
    for (const char *line = text; *line;) {
        const char *end = strchr(line, '\n');
        int len = end ? (int)(end - line) : (int)strlen(line);
        fprintf(f, "%.*s", len, line);
        line += len + (end != NULL);
        if (*line) fprintf(f, "\n%*s", indent, "");
    }
}

/* === info === */

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
    size_t shards = st_model_shard_count(m);
    if (list_shards) {
        for (size_t i = 0; i < shards; i++) info_list(st_model_shard(m, i), totals);
    }
    printf("%s: index of %zu tensors in %zu shards, all present\n", path, st_model_count(m),
           shards);
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

/* A tokenizer directory's tokenizer.json (with tokenizer_config.json), loaded as generate would. */
static int info_tokenizer(const char *dir, Error *e) {
    Tokenizer *t;
    if (tokenizer_load(&t, dir, e)) return -1;
    printf("%s/tokenizer.json: byte-level BPE, ids 0 .. %d, pad id %d\n", dir,
           tokenizer_vocab_size(t) - 1, tokenizer_pad_id(t));
    tokenizer_free(t);
    return 0;
}

/* Every .safetensors file, index, config.json and tokenizer.json of dir; at the top level also each
 * subdirectory, as a diffusers pipeline keeps one model per subdirectory. */
static int info_dir(const char *dir, bool top, InfoTotals *totals, Error *e) {
    char **names;
    size_t count;
    if (dir_list(dir, &names, &count, e)) return -1;
    int rc = 0;
    for (size_t i = 0; i < count; i++) {
        if (rc) break;
        char path[PATH_BYTES];
        struct stat sb;
        if (names[i][0] == '.') continue;
        if (path_join(path, sizeof path, dir, names[i], e)) {
            rc = -1;
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
        } else if (!strcmp(names[i], "tokenizer.json")) {
            rc = info_tokenizer(dir, e);
        }
    }
    dir_list_free(names, count);
    return rc;
}

/* diamond info FILE|DIR: validates and lists; 0 when everything is valid, 1 otherwise. */
/* The generation parameters a PNG made by diamond generate carries, on stdout. */
static int info_png(const char *path) {
    char *text = NULL;
    Error e = {{0}};
    if (png_read_text(path, GENERATE_PNG_KEY, &text, &e)) {
        fprintf(stderr, "diamond info: %s\n", e.msg);
        return 1;
    }
    if (!text) {
        printf("%s: a PNG without diamond's parameters (no '%s' text chunk)\n", path,
               GENERATE_PNG_KEY);
        return 0;
    }
    printf("%s:\n", path);
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) /* no terminal escapes */
        putchar(*c == '\n' || *c == '\t' || *c >= 0x20 ? *c : '?');
    putchar('\n');
    free(text);
    return 0;
}

static int info_main(int argc, char **argv) {
    static const char usage[] =
        "usage: diamond info FILE|DIR|IMAGE.png\n"
        "  a safetensors file, a model directory or an index: every tensor validated and listed\n"
        "  a PNG: the generation parameters generate wrote into it\n"
        "\nexit status: 0 success, 1 runtime error (bad file, bad data), 2 bad command line\n";
    if (asks_for_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    if (argc != 1) {
        fputs(usage, stderr);
        return 2;
    }
    const char *path = argv[0];
    size_t n = strlen(path);
    if (n >= 4 && !strcmp(path + n - 4, ".png")) return info_png(path);
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

/* === benchmarks === */

/* A benchmark's command line was wrong: the message and its usage on stderr; returns 2. */
static int bench_usage_error(const char *name, const char *message);

/* Parses a whole decimal argument in [lo, hi]; 0 on success. */
static int parse_int(const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

/* MB: a whole number of megabytes (MiB) in 1 .. MEGABYTES_MAX, into bytes. */
#define MEGABYTES_MAX (1 << 22)
static int parse_megabytes(const char *s, size_t *bytes) {
    int mb;
    if (parse_int(s, 1, MEGABYTES_MAX, &mb)) return -1;
    *bytes = (size_t)mb << 20;
    return 0;
}

/* OPTION_PARSE for --vae-memory MB and --memory MB into a size_t of bytes. */
static int option_megabytes(const char *value, void *field, Error *e) {
    if (parse_megabytes(value, field))
        return error_set(e, "expected megabytes in 1..%d, got '%s'", MEGABYTES_MAX, value);
    return 0;
}

/* OPTION_PARSE for --precision f32|bf16 into a Precision. */
static int option_precision(const char *value, void *field, Error *e) {
    if (!strcmp(value, "f32"))
        *(Precision *)field = PRECISION_F32;
    else if (!strcmp(value, "bf16"))
        *(Precision *)field = PRECISION_BF16;
    else
        return error_set(e, "expected f32 or bf16, got '%s'", value);
    return 0;
}

/* The time of one product in f32 over its time in bf16 (gemm_stored against gemm_stored_bf16,
 * best of 5 calls each after one), on a weight-shaped product: x [96, 768] times a bf16 weight
 * [512, 768]; 0 when out of memory. About 10 ms. Not every CPU with bf16 dot products runs them
 * faster: an Emerald Rapids whose VM hides AMX issues one vdpbf16ps (32 multiply-adds) every 2
 * cycles, where its f32 FMAs do 64 (0.75 against 0.19 ns per instruction, measured). */
static double bf16_speedup(void) {
    enum { M = 96, N = 512, K = 768, CALLS = 6 };
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N);
    uint16_t *w = malloc(sizeof(uint16_t) * N * K);
    double best[2] = {1e30, 1e30};
    for (int i = 0; x && w && i < M * K; i++) x[i] = (float)(i % 7) * 0.25f;
    for (int i = 0; x && w && i < N * K; i++) w[i] = f32_to_bf16((float)(i % 5) * 0.5f);
    for (int p = 0; x && y && w && p < 2; p++)
        for (int c = 0; c < CALLS; c++) {
            double t0 = now_seconds();
            (p ? gemm_stored_bf16 : gemm_stored)(false, true, M, N, K, 1.0f, x, K, w, DTYPE_BF16,
                                                 K, 0.0f, y, N);
            double t = now_seconds() - t0;
            if (c > 0 && t < best[p]) best[p] = t;
        }
    bool ok = x && y && w;
    free(x);
    free(y);
    free(w);
    return ok ? best[0] / best[1] : 0.0;
}

/* The precision a command runs in: bf16 only where this build has bf16 dot products (else a
 * note on stderr, and f32). Where they run slower than f32 here, bf16 as asked, with a note. */
static Precision precision_to_run(Precision asked, const char *command) {
    if (asked != PRECISION_BF16) return asked;
    if (!gemm_bf16_native()) {
        fprintf(stderr, "diamond %s: --precision bf16: this CPU (or build) has no bf16 "
                "dot-product instructions (x86 AVX512-BF16, ARMv8.6 BF16); computing in f32\n",
                command);
        return PRECISION_F32;
    }
    double speedup = bf16_speedup();
    if (speedup > 0.0 && speedup < 0.9)
        fprintf(stderr, "diamond %s: note: this CPU's bf16 dot products run %.2fx as fast as its "
                "f32 products (measured); --precision f32 is faster here, and exact\n", command,
                speedup);
    return asked;
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

/* Sorts times[0 .. n) and gives their least and their median (the upper one of an even n). */
static void times_best_median(double *times, int n, double *best, double *median) {
    qsort(times, (size_t)n, sizeof times[0], compare_doubles);
    *best = times[0];
    *median = times[n / 2];
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
    times_best_median(times, reps, best, median);
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

/* The options after a kernel benchmark's sizes. */
typedef struct KernelBenchArgs {
    bool trans_a, trans_b; /* gemm */
    Precision precision;   /* gemm */
    int groups;            /* conv */
    int threads;
} KernelBenchArgs;

static const Option gemm_bench_options[] = {
    {.name = "--trans-a", .kind = OPTION_FLAG, .offset = offsetof(KernelBenchArgs, trans_a),
     .help = "A as [K, M]"},
    {.name = "--trans-b", .kind = OPTION_FLAG, .offset = offsetof(KernelBenchArgs, trans_b),
     .help = "B as [N, K]"},
    {.name = "--precision", .value = "P", .kind = OPTION_PARSE,
     .offset = offsetof(KernelBenchArgs, precision), .parse = option_precision,
     .fallback = "f32",
     .help = "f32, or bf16: gemm_stored_bf16 with B stored as bf16 (as weights\n"
             "are), on the portable kernel where the CPU has no bf16"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE,
     .offset = offsetof(KernelBenchArgs, threads), .parse = option_threads,
     .help = "OpenMP threads"},
};
static const Option conv_bench_options[] = {
    {.name = "--groups", .value = "G", .kind = OPTION_INT,
     .offset = offsetof(KernelBenchArgs, groups), .min = 1, .max = 1 << 16, .fallback = "1",
     .help = "groups"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE,
     .offset = offsetof(KernelBenchArgs, threads), .parse = option_threads,
     .help = "OpenMP threads"},
};
static const Option attention_bench_options[] = {
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE,
     .offset = offsetof(KernelBenchArgs, threads), .parse = option_threads,
     .help = "OpenMP threads"},
};

/* argv[first ..] against a kernel benchmark's options into a (threads: the current count unless
 * given); 0, or 2 with the message on stderr. */
static int kernel_bench_options(const char *name, const Option *options, size_t count, int argc,
                                char **argv, int first, KernelBenchArgs *a) {
    *a = (KernelBenchArgs){.threads = bench_threads_now()};
    OptionSet set = {options, count, a, false};
    Error e = {{0}};
    if (options_defaults(&set, 1, &e) == 0 &&
        options_parse(&set, 1, argc - first, argv + first, NULL, &e) == 0)
        return 0;
    return bench_usage_error(name, e.msg);
}

/* diamond bench attention B HEADS N HEAD_DIM [--threads T]: self-attention, q_len = kv_len = N,
 * no mask. Forward flops 4 B H N^2 D (two products); backward 10 B H N^2 D (five, one of them
 * the recomputed scores; the dq and dk/dv passes each recompute scores and dP, counted once). */
static int bench_attention(int argc, char **argv) {
    AttentionBench a = {0};
    KernelBenchArgs k;
    int B, H, N, D;
    if (argc < 7 || parse_int(argv[3], 1, 1 << 16, &B) || parse_int(argv[4], 1, 1 << 12, &H) ||
        parse_int(argv[5], 1, 1 << 20, &N) || parse_int(argv[6], 1, 1 << 12, &D)) {
        return bench_usage_error("attention", "B HEADS N HEAD_DIM are whole numbers, B 1..65536, "
                                 "HEADS and HEAD_DIM 1..4096, N 1..2^20");
    }
    if (kernel_bench_options("attention", attention_bench_options,
                             COUNT(attention_bench_options), argc, argv, 7, &k))
        return 2;
    int threads = k.threads;
    a.shape = (AttentionShape){.batch = B, .heads = H, .kv_heads = H, .q_len = N, .kv_len = N,
                               .head_dim = D};
    a.scale = 1.0f / sqrtf((float)D);
    size_t n = (size_t)B * N * H * D;
    float **arrays[] = {&a.q, &a.k, &a.v, &a.out, &a.dout, &a.dq, &a.dk, &a.dv};
    bool ok = (a.lse = malloc((size_t)B * H * N * sizeof(float))) != NULL;
    for (size_t i = 0; i < COUNT(arrays); i++)
        ok &= (*arrays[i] = calloc(n, sizeof(float))) != NULL;
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
    for (size_t i = 0; i < COUNT(arrays); i++) free(*arrays[i]);
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
    int v[8];
    KernelBenchArgs k;
    if (argc < 11) return bench_usage_error("conv", "8 sizes are needed");
    for (int i = 0; i < 8; i++)
        if (parse_int(argv[3 + i], i == 7 ? 0 : 1, 1 << 16, &v[i])) {
            fprintf(stderr, "diamond: bench conv: %s must be an integer in %d..65536, got '%s'\n",
                    names[i], i == 7 ? 0 : 1, argv[3 + i]);
            return 2;
        }
    if (kernel_bench_options("conv", conv_bench_options, COUNT(conv_bench_options), argc, argv,
                             11, &k))
        return 2;
    int groups = k.groups, threads = k.threads;
    ConvBench c = {.shape = {.batch = v[0], .in_ch = v[1], .in_h = v[2], .in_w = v[3],
                             .out_ch = v[4], .kernel_h = v[5], .kernel_w = v[5], .stride_h = v[6],
                             .stride_w = v[6], .pad_h = v[7], .pad_w = v[7], .groups = groups}};
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
    bool trans_a, trans_b;
    float *A, *B, *C;
    uint16_t *B_bf16; /* B as bf16 for --precision bf16, else NULL */
} GemmBench;

static void gemm_bench_run(void *ctx) {
    GemmBench *g = ctx;
    int lda = g->trans_a ? g->M : g->K, ldb = g->trans_b ? g->K : g->N;
    if (g->B_bf16)
        gemm_stored_bf16(g->trans_a, g->trans_b, g->M, g->N, g->K, 1.0f, g->A, lda, g->B_bf16,
                         DTYPE_BF16, ldb, 0.0f, g->C, g->N);
    else
        gemm(g->trans_a, g->trans_b, g->M, g->N, g->K, 1.0f, g->A, lda, g->B, ldb, 0.0f, g->C,
             g->N);
}

/* diamond bench gemm M N K [--trans-a] [--trans-b] [--precision P] [--threads T]: C[M,N] =
 * op(A) op(B), row-major; --trans-a stores A as [K,M], --trans-b B as [N,K] (a linear layer's
 * weight); --precision bf16 times gemm_stored_bf16 with B stored as bf16. */
static int bench_gemm(int argc, char **argv) {
    GemmBench g = {0};
    KernelBenchArgs k;
    if (argc < 6 || parse_int(argv[3], 1, 1 << 16, &g.M) ||
        parse_int(argv[4], 1, 1 << 16, &g.N) || parse_int(argv[5], 1, 1 << 16, &g.K)) {
        return bench_usage_error("gemm", "M N K are whole numbers in 1..65536");
    }
    if (kernel_bench_options("gemm", gemm_bench_options, COUNT(gemm_bench_options), argc, argv, 6,
                             &k))
        return 2;
    g.trans_a = k.trans_a;
    g.trans_b = k.trans_b;
    int threads = k.threads;
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
    if (k.precision == PRECISION_BF16) {
        if (!(g.B_bf16 = malloc(nb * sizeof *g.B_bf16))) {
            fprintf(stderr, "diamond: bench gemm: out of memory for %dx%dx%d\n", g.M, g.N, g.K);
            free(g.A), free(g.B), free(g.C);
            return 1;
        }
        for (size_t i = 0; i < nb; i++) g.B_bf16[i] = f32_to_bf16(g.B[i]);
    }
    double best, median;
    bench_time(gemm_bench_run, &g, &best, &median);
    double flops = 2.0 * g.M * g.N * g.K;
    const char *precision = k.precision == PRECISION_F32 ? ""
                            : gemm_bf16_native()         ? " bf16"
                                                         : " bf16 (portable kernel)";
    printf("gemm M=%d N=%d K=%d%s%s%s threads=%d best=%.3f ms median=%.3f ms GFLOPS=%.1f\n",
           g.M, g.N, g.K, g.trans_a ? " trans_a" : "", g.trans_b ? " trans_b" : "", precision,
           threads, 1e3 * best, 1e3 * median, flops / best * 1e-9);
    free(g.A), free(g.B), free(g.C), free(g.B_bf16);
    return 0;
}

/* --- benchmarks: the models --- */

/* The command line of bench model and bench step. */
typedef struct BenchModelArgs {
    const char *model, *detector;
    int width, height, text_len, threads;
    int runs; /* calls of each part that take half a second or more */
    size_t vae_memory; /* as generate's --vae-memory */
    bool config_only;
    const char *only; /* bench model: "transformer", "vae" or "detector" alone; NULL: all */
    Precision precision; /* the transformer's products (precision_to_run) */
    int steps;           /* bench precision */
    bool guide;          /* bench precision */
} BenchModelArgs;

/* The loaded models and their random inputs. */
typedef struct BenchModels {
    Flux2 *flow;
    VaeDecoder *vae;
    Segformer *detector;
    Tensor *tokens, *txt, *image; /* [1, h*w, C] latent tokens, [1, L, D] prompt, [1, 3, H, W] */
    int h, w;                     /* the latent token grid */
    int vae_checkpoint_levels;    /* as generate decides it (vae_decoder_checkpoint_for) */
    int runs;                     /* --runs */
} BenchModels;

static void bench_models_free(BenchModels *m) {
    flux2_free(m->flow);
    vae_decoder_free(m->vae);
    segformer_free(m->detector);
    tensor_free(m->tokens);
    tensor_free(m->txt);
    tensor_free(m->image);
}

#define BENCH_FIELD(f) offsetof(BenchModelArgs, f)

static const Option bench_model_options[] = {
    {.name = "--model", .value = "DIR", .kind = OPTION_TEXT, .offset = BENCH_FIELD(model),
     .help = "the pipeline directory"},
    {.name = "--detector", .value = "DIR", .kind = OPTION_TEXT, .offset = BENCH_FIELD(detector),
     .help = "the detector"},
    {.name = "-W", .value = "W", .kind = OPTION_INT, .offset = BENCH_FIELD(width), .min = 1,
     .max = IMAGE_MAX_SIDE,
     .help = "image width"},
    {.name = "-H", .value = "H", .kind = OPTION_INT, .offset = BENCH_FIELD(height), .min = 1,
     .max = IMAGE_MAX_SIDE,
     .help = "image height"},
    {.name = "--config-only", .kind = OPTION_FLAG, .offset = BENCH_FIELD(config_only),
     .help = "random weights from the config files alone"},
    {.name = "--text-len", .value = "L", .kind = OPTION_INT, .offset = BENCH_FIELD(text_len),
     .min = 1, .max = 1 << 16, .fallback = TEXT_OF(KLEIN_MAX_LENGTH),
     .help = "prompt tokens"},
    {.name = "--vae-memory", .value = "MB", .kind = OPTION_PARSE,
     .offset = BENCH_FIELD(vae_memory), .parse = option_megabytes,
     .help = "as generate's"},
    {.name = "--only", .value = "PART", .kind = OPTION_TEXT, .offset = BENCH_FIELD(only),
     .help = "bench model: transformer, vae or detector alone"},
    {.name = "--precision", .value = "P", .kind = OPTION_PARSE, .offset = BENCH_FIELD(precision),
     .parse = option_precision, .fallback = "f32",
     .help = "the transformer's weight products, as generate's"},
    {.name = "--steps", .value = "N", .kind = OPTION_INT, .offset = BENCH_FIELD(steps), .min = 1,
     .max = 1000, .fallback = "4",
     .help = "bench precision: sampling steps"},
    {.name = "--guide", .kind = OPTION_FLAG, .offset = BENCH_FIELD(guide),
     .help = "bench precision: guided sampling (lambda 1, the power-3 loss)"},
    {.name = "--runs", .value = "N", .kind = OPTION_INT, .offset = BENCH_FIELD(runs), .min = 1,
     .max = 100, .fallback = "1",
     .help = "calls of each part (the best and the median are printed): on a\n"
             "shared machine one run can be far off"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE, .offset = BENCH_FIELD(threads),
     .parse = option_threads,
     .help = "OpenMP threads"},
};

/* bench model's or bench step's options (argv[3] on) into a; 0, or -1 with the message in e. */
static int bench_model_parse(int argc, char **argv, BenchModelArgs *a, Error *e) {
    *a = (BenchModelArgs){.threads = bench_threads_now(),
                          .vae_memory = vae_default_memory(memory_available())};
    OptionSet set = {bench_model_options, COUNT(bench_model_options), a, false};
    if (options_defaults(&set, 1, e) || options_parse(&set, 1, argc - 3, argv + 3, NULL, e))
        return -1;
    if (a->only && strcmp(a->only, "transformer") && strcmp(a->only, "vae") &&
        strcmp(a->only, "detector"))
        return error_set(e, "--only: expected transformer, vae or detector, got '%s'", a->only);
    if (!a->model || !a->detector || !a->width || !a->height)
        return error_set(e, "--model, --detector, -W and -H are needed");
    a->precision = precision_to_run(a->precision, "bench");
    return 0;
}

/* Random values in [-1, 1) for t. */
static Tensor *bench_random(Tensor *t, unsigned long long *state) {
    if (t) bench_fill(t->data, (size_t)t->numel, state);
    return t;
}

/* <model>/transformer and <model>/vae from source, and the latent grid of a width x height image
 * (grid_h x grid_w tokens). Returns 2 for a size the VAE cannot make, 1 for other failures. */
static int flow_models_open(const char *model, WeightSource source, uint64_t seed, int width,
                            int height, Flux2 **flow, VaeDecoder **vae, int *grid_h, int *grid_w,
                            Error *e) {
    char dir[PATH_BYTES];
    if (path_join(dir, sizeof dir, model, "transformer", e) ||
        flux2_open(flow, dir, source, seed, e) || path_join(dir, sizeof dir, model, "vae", e) ||
        vae_decoder_open(vae, dir, source, seed, e))
        return 1;
    int ph, pw;
    vae_decoder_token_size(*vae, &ph, &pw);
    if (width % pw || height % ph) {
        error_set(e, "-W %d -H %d: the size must be a multiple of %dx%d pixels (one latent token)",
                  width, height, pw, ph);
        return 2;
    }
    *grid_h = height / ph;
    *grid_w = width / pw;
    return 0;
}

/* A latent [B, grid_h * grid_w, C]'s image, no gradient: [B, 3, H, W] in about [-1, 1]. */
static int decode_latent(const VaeDecoder *vae, int grid_h, int grid_w, Tensor *latent,
                         Tensor **image, Error *e) {
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory for the decoder");
    tape_set_grad(t, false);
    Var *img = vae_decode(t, vae, var_new(t, latent, false), grid_h, grid_w);
    int rc = tape_check(t, e);
    if (rc == 0 && !(*image = tensor_clone(img->value))) rc = error_set(e, "out of memory");
    tape_free(t);
    return rc;
}

/* The flow model and VAE of a diffusers directory and the detector, from their files or (config
 * only) from their config files with random weights; random inputs for a W x H image. Returns 2
 * for a size the VAE cannot make, 1 for other failures. */
static int bench_models_load(const BenchModelArgs *a, BenchModels *m, Error *e) {
    const uint64_t seed = 42; /* the random weights' (config-only) */
    WeightSource source = a->config_only ? WEIGHTS_CONFIG_ONLY : WEIGHTS_FILES;
    int rc = flow_models_open(a->model, source, seed, a->width, a->height, &m->flow, &m->vae,
                              &m->h, &m->w, e);
    if (rc) return rc;
    if (flux2_set_precision(m->flow, a->precision, e) ||
        segformer_open(&m->detector, a->detector, source, seed, e))
        return 1;
    m->runs = a->runs;
    m->vae_checkpoint_levels =
        vae_decoder_checkpoint_for(m->vae, 1, a->height, a->width, a->vae_memory);
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
    int rc = latent ? sampler_run(m->flow, m->vae, m->detector, &o, m->txt, NULL, latent, m->h,
                                  m->w, NULL, NULL, e)
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

/* The seconds of part: a call that takes half a second or more (the real models take minutes)
 * is made m->runs times, and *seconds is the median of them; a shorter one is timed by
 * bench_time's repetitions after it. Prints a line, with the best and the count of several runs. */
static int bench_part(const char *what, BenchPart part, const BenchModels *m, double *seconds,
                      Error *e) {
    BenchPartRun r = {part, m, 0, {{0}}};
    double times[100], best;
    int runs = 0;
    do {
        double t0 = now_seconds();
        bench_part_run(&r);
        times[runs++] = now_seconds() - t0;
    } while (r.rc == 0 && times[0] >= 0.5 && runs < m->runs);
    times_best_median(times, runs, &best, seconds);
    if (r.rc == 0 && best < 0.5) bench_time(bench_part_run, &r, &best, seconds);
    if (r.rc) {
        *e = r.e;
        return -1;
    }
    printf("  %-46s %9.3f s   (peak RSS so far %.0f MiB)", what, *seconds, bench_peak_rss_mib());
    if (runs > 1) printf("   median of %d runs, best %.3f s", runs, best);
    printf("\n");
    fflush(stdout);
    return 0;
}

/* Parses, loads and prints the heading of bench model / bench step; 0 when ready, else the exit
 * status (the models may be partly loaded: free them). */
static int bench_models_open(int argc, char **argv, const char *name, BenchModels *m,
                             BenchModelArgs *args) {
    BenchModelArgs a;
    Error e = {{0}};
    if (bench_model_parse(argc, argv, &a, &e)) return bench_usage_error(name, e.msg);
    *args = a;
    int rc = bench_models_load(&a, m, &e);
    if (rc) {
        fprintf(stderr, "diamond bench %s: %s\n", name, e.msg);
        return rc;
    }
    const Flux2Config *fc = flux2_config(m->flow);
    const SegformerConfig *sc = segformer_config(m->detector);
    printf("bench %s: %dx%d image, %dx%d latent tokens + %d text tokens, transformer dim %d with "
           "%d+%d blocks (%s products), detector input %dx%d, VAE checkpoint levels %d (budget "
           "%zu MiB), %s weights, threads %d\n", name, a.width, a.height, m->w, m->h, a.text_len,
           fc->dim, fc->num_layers, fc->num_single_layers,
           a.precision == PRECISION_BF16 ? "bf16" : "f32",
           sc->do_resize ? sc->input_w : a.width, sc->do_resize ? sc->input_h : a.height,
           m->vae_checkpoint_levels, a.vae_memory >> 20,
           a.config_only ? "random (config only)" : "file", a.threads);
    printf("  models loaded                                                (peak RSS so far %.0f MiB)\n",
           bench_peak_rss_mib());
    return 0;
}

/* diamond bench model --model DIR --detector DIR -W W -H H [--config-only] [--text-len L]
 * [--vae-memory MB] [--threads T]: each model part of a guided step alone, batch 1, on random
 * inputs: one transformer forward, the VAE decode and the detector with and without their
 * backward to the input (the loss is the output's mean). With --config-only no weight file is read (the real
 * sizes' timings without their files). */
static int bench_model(int argc, char **argv) {
    static const struct {
        const char *model, *what;
        BenchPart part;
    } parts[] = {
        {"transformer", "transformer forward (one step)", bench_transformer},
        {"vae", "VAE decode forward", bench_vae_forward},
        {"vae", "VAE decode forward+backward (to the latent)", bench_vae_backward},
        {"detector", "detector forward", bench_detector_forward},
        {"detector", "detector forward+backward (to the image)", bench_detector_backward},
    };
    BenchModels m = {0};
    BenchModelArgs a = {0};
    Error e = {{0}};
    int rc = bench_models_open(argc, argv, "model", &m, &a);
    double seconds;
    for (size_t i = 0; i < COUNT(parts); i++) {
        if (rc) break;
        if (a.only && strcmp(a.only, parts[i].model)) continue;
        if (bench_part(parts[i].what, parts[i].part, &m, &seconds, &e)) {
            fprintf(stderr, "diamond bench model: %s: %s\n", parts[i].what, e.msg);
            rc = 1;
        }
    }
    if (rc == 0) printf("  peak RSS %.0f MiB\n", bench_peak_rss_mib());
    bench_models_free(&m);
    return rc;
}

/* A /proc/self/status value in KiB ("RssFile:", "RssAnon:"); -1 where there is none (not Linux). */
static long bench_status_kib(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    long kib = -1;
    size_t n = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, n)) kib = strtol(line + n, NULL, 10);
    fclose(f);
    return kib;
}

/* diamond bench text --model DIR [--config-only] [--tokens N] [--real R] [--threads T]: one
 * encoding of N tokens (default 512, the pipeline's length) by DIR's Qwen3 (DIR/text_encoder or
 * DIR itself), R of them real (default 20, a typical prompt) and the rest padding, as the klein
 * pipeline runs it; and peak memory, with what lies beyond the mapped weight files. */
typedef struct BenchTextArgs {
    const char *model;
    bool config_only;
    int tokens, real, threads;
    Precision precision;
} BenchTextArgs;

static const Option bench_text_options[] = {
    {.name = "--model", .value = "DIR", .kind = OPTION_TEXT,
     .offset = offsetof(BenchTextArgs, model),
     .help = "DIR/text_encoder or DIR"},
    {.name = "--config-only", .kind = OPTION_FLAG, .offset = offsetof(BenchTextArgs, config_only),
     .help = "random weights from the config alone"},
    {.name = "--tokens", .value = "N", .kind = OPTION_INT,
     .offset = offsetof(BenchTextArgs, tokens), .min = 1, .max = 1 << 16,
     .fallback = TEXT_OF(KLEIN_MAX_LENGTH),
     .help = "tokens encoded (the pipeline's length)"},
    {.name = "--real", .value = "R", .kind = OPTION_INT,
     .offset = offsetof(BenchTextArgs, real), .min = 1, .max = 1 << 16, .fallback = "20",
     .help = "of them real, the rest padding"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE,
     .offset = offsetof(BenchTextArgs, threads), .parse = option_threads,
     .help = "OpenMP threads"},
    {.name = "--precision", .value = "P", .kind = OPTION_PARSE,
     .offset = offsetof(BenchTextArgs, precision), .parse = option_precision,
     .fallback = "f32",
     .help = "the projections' products, as generate's"},
};

static int bench_text(int argc, char **argv) {
    BenchTextArgs a = {0};
    OptionSet set = {bench_text_options, COUNT(bench_text_options), &a, false};
    Error parse_error = {{0}};
    int bad = options_defaults(&set, 1, &parse_error) ||
              options_parse(&set, 1, argc - 3, argv + 3, NULL, &parse_error);
    if (bad || !a.model || a.real > a.tokens)
        return bench_usage_error("text", bad ? parse_error.msg : "--model DIR is needed, and R <= N");
    const char *model = a.model;
    bool config_only = a.config_only;
    int tokens = a.tokens, real = a.real;
    char dir[PATH_BYTES];
    struct stat sb;
    Error e = {{0}};
    if (path_join(dir, sizeof dir, model, "text_encoder", &e)) {
        fprintf(stderr, "diamond bench text: %s\n", e.msg);
        return 2;
    }
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) snprintf(dir, sizeof dir, "%s", model);
    Qwen3 *m = NULL;
    int32_t *ids = malloc((size_t)tokens * sizeof *ids);
    Tensor *out = NULL;
    double t0 = now_seconds(), opened = 0.0, encoded = 0.0;
    int rc = !ids ? error_set(&e, "out of memory")
                  : qwen3_open(&m, dir, config_only ? WEIGHTS_CONFIG_ONLY : WEIGHTS_FILES, 0, &e);
    if (rc == 0) {
        const Qwen3Config *c = qwen3_config(m);
        Precision precision = precision_to_run(a.precision, "bench text");
        qwen3_set_precision(m, precision);
        for (int i = 0; i < tokens; i++) /* spread over the vocabulary; padding the last id */
            ids[i] = i < real ? (int32_t)((1000003LL * (i + 1)) % c->vocab_size) : c->vocab_size - 1;
        printf("bench text: %s%s, hidden %d, %d layers of %d run, %d tokens (%d real), %s "
               "products, %d threads\n", dir, config_only ? " (config only: random weights)" : "",
               c->hidden_size, QWEN3_KLEIN_LAST_LAYER, c->num_layers, tokens, real,
               precision == PRECISION_BF16 ? "bf16" : "f32", bench_threads_now());
        opened = now_seconds() - t0;
        t0 = now_seconds();
        rc = qwen3_prompt_embeds(m, ids, &real, 1, tokens, &out, &e);
        encoded = now_seconds() - t0;
    }
    if (rc == 0) {
        long file = bench_status_kib("RssFile:");
        printf("  open (config, index, checks)  %8.3f s\n  encode                        %8.3f s\n"
               "  peak RSS %.0f MiB", opened, encoded, bench_peak_rss_mib());
        if (file >= 0)
            printf(", of which about %.0f MiB beyond the mapped weights (peak minus the file pages "
                   "resident now, %.0f MiB)", bench_peak_rss_mib() - file / 1024.0, file / 1024.0);
        printf("\n");
    } else {
        fprintf(stderr, "diamond bench text: %s\n", e.msg);
    }
    tensor_free(out);
    free(ids);
    qwen3_free(m);
    return rc ? 1 : 0;
}

/* diamond bench step (the same options): one unguided sampler step (transformer forward and the
 * Euler update) and one guided step (plus the VAE decode and detector forward and backward to the
 * latent, and the shift), batch 1, through sampler_run as generate runs them, and their ratio. */
static int bench_step_main(int argc, char **argv) {
    BenchModels m = {0};
    Error e = {{0}};
    BenchModelArgs a;
    int rc = bench_models_open(argc, argv, "step", &m, &a);
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

/* --- bench precision --- */

/* The velocities of the f32 run, kept step by step; the bf16 run's compared with them. */
typedef struct DriftSteps {
    Tensor **f32_v; /* [steps] */
    bool compare;   /* false: keep (the f32 run), true: compare (the bf16 run) */
} DriftSteps;

/* max and mean |a - b| over n values, and mean |b| (the scale). */
typedef struct Drift {
    double max, mean, scale;
} Drift;

static Drift drift_of(const float *a, const float *b, size_t n) {
    Drift d = {0};
    for (size_t i = 0; i < n; i++) {
        double diff = fabs((double)a[i] - (double)b[i]);
        d.max = diff > d.max ? diff : d.max;
        d.mean += diff;
        d.scale += fabs((double)b[i]);
    }
    d.mean /= n ? (double)n : 1.0;
    d.scale /= n ? (double)n : 1.0;
    return d;
}

static int drift_step(const SamplerStep *s, void *ctx, Error *e) {
    DriftSteps *d = ctx;
    if (!d->compare)
        return (d->f32_v[s->index] = tensor_clone(s->v)) ? 0 : error_set(e, "out of memory");
    Drift v = drift_of(s->v->data, d->f32_v[s->index]->data, (size_t)s->v->numel);
    printf("  step %d/%d sigma %.4f: v bf16 - f32: max %.3g, mean %.3g (mean |v| %.3g: %.3f%%)\n",
           s->index + 1, s->steps, s->sigma, v.max, v.mean, v.scale, 100.0 * v.mean / v.scale);
    return 0;
}

/* One sampling run of m from noise in precision; *latent the final latent, *seconds its time. */
static int drift_run(BenchModels *m, const SamplerOptions *o, const Tensor *noise,
                     Precision precision, DriftSteps *d, Tensor **latent, double *seconds,
                     Error *e) {
    double t0 = now_seconds();
    int rc = flux2_set_precision(m->flow, precision, e);
    if (rc == 0 && !(*latent = tensor_clone(noise))) rc = error_set(e, "out of memory");
    if (rc == 0)
        rc = sampler_run(m->flow, m->vae, m->detector, o, m->txt, NULL, *latent, m->h, m->w,
                         drift_step, d, e);
    *seconds = now_seconds() - t0;
    return rc;
}

/* diamond bench precision (bench model's options, --steps N, --guide): the drift of bf16 products
 * from f32. Two sampling runs (batch 1) from the same noise (PyTorch's randn after
 * manual_seed(0)) and the same random prompt embeddings, the first in f32 and the second in bf16;
 * each step's velocity compared, then the final latents and their decoded images, also as 8-bit
 * pixels. On a CPU without bf16 dot products the bf16 run takes the portable kernel: the same
 * drift, slower. */
static int bench_precision(int argc, char **argv) {
    BenchModels m = {0};
    BenchModelArgs a;
    Error e = {{0}};
    int rc = bench_models_open(argc, argv, "precision", &m, &a);
    if (rc) {
        bench_models_free(&m);
        return rc;
    }
    SamplerOptions o = {.steps = a.steps, .guide = a.guide, .guidance_scale = 4.0f,
                        .lambda = {.type = LAMBDA_CONSTANT, .value = 1.0},
                        .loss = {.type = ARTIFACT_LOSS_POWER, .gamma = 3.0}};
    const Flux2Config *fc = flux2_config(m.flow);
    Tensor *noise = TENSOR_NEW(1, (int64_t)m.h * m.w, fc->in_channels);
    Tensor *latent[2] = {NULL, NULL}, *image[2] = {NULL, NULL};
    DriftSteps d = {calloc((size_t)a.steps, sizeof *d.f32_v), false};
    double seconds[2] = {0.0, 0.0};
    printf("  %d %s steps, bf16 products on %s\n", a.steps, a.guide ? "guided" : "unguided",
           gemm_bf16_native() ? "the CPU's bf16 instructions" : "the portable kernel (slow)");
    rc = !noise || !d.f32_v ? error_set(&e, "out of memory")
                            : latent_noise_tokens(0, fc->in_channels, m.h, m.w, noise->data, &e);
    for (int k = 0; k < 2 && rc == 0; k++) {
        d.compare = k == 1;
        rc = drift_run(&m, &o, noise, k ? PRECISION_BF16 : PRECISION_F32, &d, &latent[k],
                       &seconds[k], &e) ||
             decode_latent(m.vae, m.h, m.w, latent[k], &image[k], &e);
    }
    if (rc == 0) {
        Drift z = drift_of(latent[1]->data, latent[0]->data, (size_t)latent[0]->numel);
        Drift x = drift_of(image[1]->data, image[0]->data, (size_t)image[0]->numel);
        int H = (int)image[0]->shape[2], W = (int)image[0]->shape[3];
        uint8_t *rgb[2] = {malloc((size_t)3 * H * W), malloc((size_t)3 * H * W)};
        rc = rgb[0] && rgb[1] ? 0 : error_set(&e, "out of memory");
        Drift p = {0};
        for (int k = 0; k < 2 && rc == 0; k++) image_from_signed(image[k]->data, W, H, rgb[k]);
        for (size_t i = 0; rc == 0 && i < (size_t)3 * H * W; i++) {
            double diff = abs((int)rgb[1][i] - (int)rgb[0][i]);
            p.max = diff > p.max ? diff : p.max;
            p.mean += diff / (3.0 * H * W);
        }
        if (rc == 0)
            printf("  final latent bf16 - f32: max %.3g, mean %.3g (mean |latent| %.3g)\n"
                   "  image (in [-1, 1]) bf16 - f32: max %.3g, mean %.3g\n"
                   "  8-bit pixels bf16 - f32: max %.0f, mean %.3f levels\n"
                   "  run seconds: f32 %.2f, bf16 %.2f (%.2fx)\n", z.max, z.mean, z.scale,
                   x.max, x.mean, p.max, p.mean, seconds[0], seconds[1], seconds[0] / seconds[1]);
        free(rgb[0]), free(rgb[1]);
    }
    if (rc) fprintf(stderr, "diamond bench precision: %s\n", e.msg);
    for (int k = 0; k < a.steps && d.f32_v; k++) tensor_free(d.f32_v[k]);
    free(d.f32_v);
    for (int k = 0; k < 2; k++) tensor_free(latent[k]), tensor_free(image[k]);
    tensor_free(noise);
    bench_models_free(&m);
    return rc ? 1 : 0;
}

bool asks_for_help(int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return true;
    return false;
}

/* --- the benchmarks' table --- */

typedef struct Benchmark {
    const char *name;
    const char *args; /* what follows `diamond bench NAME` */
    const char *what; /* what it measures, lines joined by '\n' */
    const Option *options;
    size_t n_options;
    int (*run)(int argc, char **argv); /* argv[0] is diamond, argv[1] bench, argv[2] NAME */
} Benchmark;

static const Benchmark benchmarks[] = {
    {.name = "gemm", .args = "M N K [--trans-a] [--trans-b] [--precision P] [--threads T]",
     .what = "GFLOP/s of C = op(A) op(B), sizes 1..65536", .options = gemm_bench_options,
     .n_options = COUNT(gemm_bench_options), .run = bench_gemm},
    {.name = "conv", .args = "B CIN H W COUT K STRIDE PAD [--groups G] [--threads T]",
     .what = "a KxK convolution forward and backward", .options = conv_bench_options,
     .n_options = COUNT(conv_bench_options), .run = bench_conv},
    {.name = "attention", .args = "B HEADS N HEAD_DIM [--threads T]",
     .what = "self-attention over N tokens, forward and backward",
     .options = attention_bench_options, .n_options = COUNT(attention_bench_options),
     .run = bench_attention},
    {.name = "model", .args = "--model DIR --detector DIR -W W -H H [--runs N] [options]",
     .what = "seconds of one transformer forward, the VAE decode and the\n"
             "detector, each with and without its backward; peak memory",
     .options = bench_model_options, .n_options = COUNT(bench_model_options),
     .run = bench_model},
    {.name = "step", .args = "--model DIR --detector DIR -W W -H H [options]",
     .what = "one unguided and one guided sampler step, and their ratio",
     .options = bench_model_options, .n_options = COUNT(bench_model_options),
     .run = bench_step_main},
    {.name = "precision",
     .args = "--model DIR --detector DIR -W W -H H [--steps N] [--guide] [options]",
     .what = "the drift of --precision bf16 from f32: per step (v), in the final\n"
             "latent and image; both runs' seconds",
     .options = bench_model_options, .n_options = COUNT(bench_model_options),
     .run = bench_precision},
    {.name = "text",
     .args = "--model DIR [--config-only] [--tokens N] [--real R] [--precision P] [--threads T]",
     .what = "one N-token encoding by DIR's Qwen3 (DIR/text_encoder or DIR),\n"
             "R real tokens; peak memory beyond the mapped weights",
     .options = bench_text_options, .n_options = COUNT(bench_text_options), .run = bench_text},
};

static const Benchmark *benchmark_find(const char *name) {
    for (size_t i = 0; i < COUNT(benchmarks); i++)
        if (!strcmp(benchmarks[i].name, name)) return &benchmarks[i];
    return NULL;
}

/* One benchmark's lines of the usage: the command, then what it measures, indented. */
static void bench_usage_lines(FILE *f, const Benchmark *b) {
    fprintf(f, "  diamond bench %s %s\n%37s", b->name, b->args, "");
    text_lines(f, b->what, 37);
    fputc('\n', f);
}

static int bench_usage_error(const char *name, const char *message) {
    fprintf(stderr, "diamond: bench %s: %s\nusage:\n", name, message);
    const Benchmark *b = benchmark_find(name);
    if (b) bench_usage_lines(stderr, b);
    fprintf(stderr, "(diamond bench %s --help for its options)\n", name);
    return 2;
}

/* diamond bench [NAME] --help: every benchmark's usage, or NAME's with its options. */
static void bench_help(const Benchmark *b) {
    fputs("usage:\n", stdout);
    for (size_t i = 0; i < COUNT(benchmarks); i++)
        if (!b || b == &benchmarks[i]) bench_usage_lines(stdout, &benchmarks[i]);
    if (b) {
        OptionSet set = {b->options, b->n_options, NULL, false};
        fputs("\n", stdout);
        options_help(stdout, &set, 1);
    }
    fputs("\nexit status: 0 success, 1 runtime error, 2 bad command line\n", stdout);
}

/* diamond bench NAME ...: argv[0] is diamond. */
static int bench_main(int argc, char **argv) {
    const Benchmark *b = argc >= 3 ? benchmark_find(argv[2]) : NULL;
    if (asks_for_help(argc - 2, argv + 2)) {
        bench_help(b);
        return 0;
    }
    if (b) return b->run(argc, argv);
    fprintf(stderr, "diamond: unknown benchmark '%s' (see diamond bench --help)\n",
            argc >= 3 ? argv[2] : "");
    return 2;
}

/* === options === */

/* The option named name in the sets, or NULL; *set gets its set. */
static const Option *option_find(OptionSet *sets, int n_sets, const char *name, OptionSet **set) {
    for (int s = 0; s < n_sets; s++)
        for (size_t i = 0; i < sets[s].count; i++)
            if (!strcmp(sets[s].options[i].name, name)) {
                *set = &sets[s];
                return &sets[s].options[i];
            }
    return NULL;
}

/* One option's value (NULL for a flag) into its field. */
static int option_set(const Option *o, void *args, const char *value, Error *e) {
    void *field = (char *)args + o->offset;
    char *end;
    double number;
    switch (o->kind) {
    case OPTION_FLAG:
        *(bool *)field = true;
        return 0;
    case OPTION_TEXT:
        *(const char **)field = value;
        return 0;
    case OPTION_INT:
        if (parse_int(value, (int)o->min, (int)o->max, field))
            return error_set(e, "%s: expected a whole number in %.0f..%.0f, got '%s'", o->name,
                             o->min, o->max, value);
        return 0;
    case OPTION_FLOAT:
    case OPTION_DOUBLE:
        number = strtod(value, &end);
        if (end == value || *end || !(number >= o->min && number <= o->max))
            return error_set(e, "%s: expected a number in [%g, %g], got '%s'", o->name, o->min,
                             o->max, value);
        if (o->kind == OPTION_FLOAT) *(float *)field = (float)number;
        else *(double *)field = number;
        return 0;
    case OPTION_PARSE:
        if (o->parse(value, field, e) == 0) return 0;
        if (e && strncmp(e->msg, o->name, strlen(o->name))) { /* say which option */
            char msg[sizeof e->msg];
            memcpy(msg, e->msg, sizeof msg);
            error_set(e, "%s: %s", o->name, msg);
        }
        return -1;
    }
    return error_set(e, "%s: an option of no kind", o->name);
}

int options_parse(OptionSet *sets, int n_sets, int argc, char **argv, const char *command,
                  Error *e) {
    for (int i = 0; i < argc; i++) {
        OptionSet *set;
        const Option *o = option_find(sets, n_sets, argv[i], &set);
        if (!o && command)
            return error_set(e, "unknown option '%s' (see diamond %s --help)", argv[i], command);
        if (!o) return error_set(e, "unknown option '%s' (see diamond help)", argv[i]);
        if (o->value && i + 1 >= argc) return error_set(e, "%s needs a value %s", o->name, o->value);
        if (option_set(o, set->args, o->value ? argv[++i] : NULL, e)) return -1;
        set->used = true;
    }
    return 0;
}

int options_defaults(OptionSet *sets, int n_sets, Error *e) {
    for (int s = 0; s < n_sets; s++)
        for (size_t i = 0; i < sets[s].count; i++) {
            const Option *o = &sets[s].options[i];
            if (o->fallback && option_set(o, sets[s].args, o->fallback, e)) return -1;
        }
    return 0;
}

/* One option's entry of the help. */
static void option_help(FILE *f, const Option *o) {
    char head[64];
    snprintf(head, sizeof head, "%s%s%s", o->name, o->value ? " " : "", o->value ? o->value : "");
    fprintf(f, "  %-22s", head);
    if (strlen(head) > 22) fprintf(f, "\n%24s", "");
    fputc(' ', f);
    text_lines(f, o->help, 25);
    if (o->fallback) fprintf(f, " (default %s)", o->fallback);
    fputc('\n', f);
}

void options_help(FILE *f, const OptionSet *sets, int n_sets) {
    for (int s = 0; s < n_sets; s++)
        for (size_t i = 0; i < sets[s].count; i++)
            if (sets[s].options[i].help) option_help(f, &sets[s].options[i]);
}

void command_help(const char *usage, const OptionSet *sets, int n_sets) {
    fputs(usage, stdout);
    options_help(stdout, sets, n_sets);
    fputs("\nexit status: 0 success, 1 runtime error (bad file, bad data), 2 bad command line\n",
          stdout);
}

/* --- a model's own defaults --- */

/* The options a model directory's sampling.json may set. */
static const char *const MODEL_DEFAULT_OPTIONS[] = {
    "-W", "-H", "--steps", "--mu", "--cfg", "--guidance-scale", "--lambda-schedule", "--loss",
    "--gate"};

/* The value argv gives the option `name` (the last one), read with the sets' tables so that no
 * option's value is taken for an option; NULL when absent (or past an unknown option, which the
 * parse proper reports). */
static const char *option_value_of(OptionSet *sets, int n_sets, int argc, char **argv,
                                   const char *name) {
    const char *value = NULL;
    for (int i = 0; i < argc; i++) {
        OptionSet *set;
        const Option *o = option_find(sets, n_sets, argv[i], &set);
        if (!o) break;
        if (o->value && i + 1 < argc && !strcmp(o->name, name)) value = argv[i + 1];
        i += o->value != NULL;
    }
    return value;
}

static bool model_may_set(const char *option) {
    for (size_t i = 0; i < COUNT(MODEL_DEFAULT_OPTIONS); i++)
        if (!strcmp(option, MODEL_DEFAULT_OPTIONS[i])) return true;
    return false;
}

/* A member of sampling.json as the option and value strings of a command line; numbers as JSON
 * wrote them (whole ones as such), into number. */
static int model_default_arg(const JsonMember *m, char *number, size_t size, const char **value,
                             Error *e) {
    const JsonValue *v = &m->value;
    if (!model_may_set(m->key))
        return error_set(e, "%s: '%s' is not one of the options a model may set (-W, -H, "
                         "--steps, --mu, --cfg, --guidance-scale, --lambda-schedule, --loss, "
                         "--gate)", v->source, m->key);
    if (v->type == JSON_STRING) *value = v->string;
    else if (v->type == JSON_NUMBER && v->is_integer)
        snprintf(number, size, "%lld", (long long)v->integer), *value = number;
    else if (v->type == JSON_NUMBER) snprintf(number, size, "%.17g", v->number), *value = number;
    else return error_set(e, "%s: '%s' must be a string or a number", v->source, m->key);
    return 0;
}

int model_defaults_read(const char *model, OptionSet *sets, int n_sets, const char *command,
                        Error *e) {
    char path[PATH_BYTES], numbers[COUNT(MODEL_DEFAULT_OPTIONS)][32];
    char *args[2 * COUNT(MODEL_DEFAULT_OPTIONS)];
    if (path_join(path, sizeof path, model, MODEL_DEFAULTS_FILE, e)) return -1;
    if (access(path, F_OK) != 0) return 0;
    JsonDoc *doc;
    if (json_parse_file(&doc, path, e)) return -1;
    const JsonValue *root = json_root(doc);
    int argc = 0, rc = root->type == JSON_OBJECT ? 0 : error_set(e, "%s: not a JSON object", path);
    for (size_t i = 0; i < root->count; i++) {
        if (rc) break;
        const char *value = NULL; /* the parser refuses repeated keys: at most one of each */
        rc = model_default_arg(&root->members[i], numbers[argc / 2], sizeof numbers[0], &value, e);
        if (rc == 0) {
            args[argc++] = (char *)root->members[i].key;
            args[argc++] = (char *)value;
        }
    }
    if (rc == 0 && options_parse(sets, n_sets, argc, args, command, e)) {
        char why[sizeof e->msg];
        snprintf(why, sizeof why, "%s", e->msg);
        rc = error_set(e, "%s: %s", path, why);
    }
    json_free(doc);
    return rc;
}

int model_defaults(OptionSet *sets, int n_sets, int argc, char **argv, const char *command,
                   Error *e) {
    const char *model = option_value_of(sets, n_sets, argc, argv, "--model");
    return model ? model_defaults_read(model, sets, n_sets, command, e) : 0;
}

int option_seed(const char *value, void *field, Error *e) {
    if (parse_seed(value, field))
        return error_set(e, "expected a seed, a whole number in 0..2^63-1, got '%s'", value);
    return 0;
}

int option_threads(const char *value, void *field, Error *e) {
    int *threads = field;
    if (parse_int(value, 1, 1024, threads))
        return error_set(e, "--threads: expected a whole number in 1..1024, got '%s'", value);
#ifdef _OPENMP
    omp_set_num_threads(*threads);
#else
    fprintf(stderr, "note: built without OpenMP, --threads %d ignored (1 thread)\n", *threads);
    *threads = 1;
#endif
    return 0;
}

/* === prompts: diamond encode, and the prompts of generate and eval === */

/* prompts[0 .. n) through <model>'s prompt encoder (tokenizer/ + text_encoder/ for klein, or
 * diamond's character encoder) -> *embeds [n, L, D], tok (or NULL) their tokens. D must be the
 * transformer's joint_attention_dim (joint_dim; 0: not checked). A truncated prompt is said on
 * stderr. The encoder is loaded for this call alone: its memory is gone before sampling. */
static int encode_prompts(const char *model, WeightSource source, Precision precision,
                          const char *const *prompts, int n, int max_length, int joint_dim,
                          Tensor **embeds, PromptTokens *tok, Error *e) {
    PromptEncoder *p = NULL;
    PromptTokens own = {0}, *t = tok ? tok : &own;
    *embeds = NULL;
    if (prompt_encoder_open(&p, model, source, 0, max_length, e)) return -1;
    prompt_encoder_set_precision(p, precision);
    int rc = 0;
    if (joint_dim && prompt_encoder_width(p) != joint_dim)
        rc = error_set(e, "%s: the prompt encoder makes embeddings of width %d (3 x hidden_size "
                       "for Qwen3), the transformer's joint_attention_dim is %d", model,
                       prompt_encoder_width(p), joint_dim);
    if (rc == 0) rc = prompt_encode(p, prompts, n, embeds, t, e);
    if (rc == 0)
        for (int b = 0; b < n; b++)
            if (t->totals[b] > (size_t)prompt_encoder_max_length(p))
                fprintf(stderr, "note: prompt %d has %zu tokens; truncated to %d, as the "
                        "pipeline does\n", b, t->totals[b], prompt_encoder_max_length(p));
    if (!tok) prompt_tokens_free(&own);
    prompt_encoder_free(p);
    return rc;
}

/* Prompt b of embeds [n, L, D] with its tokens as diffusers' encode_prompt gives them:
 * prompt_embeds F32 [1, L, D], input_ids and attention_mask I64 [1, L]; and with prompt (not
 * NULL) its UTF-8 bytes as U8 "prompt" [bytes], which names what a cache file holds. */
static int write_prompt_embeds(const char *path, const Tensor *embeds, const PromptTokens *tok,
                               int b, const char *prompt, Error *e) {
    int64_t L = embeds->shape[1], D = embeds->shape[2];
    int64_t *ids = malloc((size_t)L * sizeof *ids), *mask = malloc((size_t)L * sizeof *mask);
    int rc = ids && mask ? 0 : error_set(e, "out of memory");
    for (int64_t i = 0; i < L; i++) {
        if (rc) break;
        ids[i] = tok->ids[b * L + i];
        mask[i] = i < tok->lengths[b];
    }
    StWriteTensor out[4] = {
        {.name = "prompt_embeds", .dtype = DTYPE_F32, .ndim = 3, .shape = {1, L, D},
         .data = embeds->data + b * L * D},
        {.name = "input_ids", .dtype = DTYPE_I64, .ndim = 2, .shape = {1, L}, .data = ids},
        {.name = "attention_mask", .dtype = DTYPE_I64, .ndim = 2, .shape = {1, L}, .data = mask},
        {.name = "prompt", .dtype = DTYPE_U8, .ndim = 1,
         .shape = {prompt ? (int64_t)strlen(prompt) : 0}, .data = prompt},
    };
    if (rc == 0) rc = st_write(path, out, prompt ? 4 : 3, e);
    free(ids);
    free(mask);
    return rc;
}

static const char *encode_usage =
    "usage: diamond encode --model DIR --prompt TEXT -o FILE.safetensors [--max-length N]\n"
    "                      [--precision P] [--threads T]\n"
    "\n"
    "The prompt through DIR's prompt encoder, as the pipeline encodes it: for FLUX.2 [klein]\n"
    "(DIR/tokenizer and DIR/text_encoder, Qwen3) the chat template, padding to --max-length\n"
    "(default 512) and Qwen3's hidden states 9, 18, 27 per token; for the embedded models\n"
    "diamond's character encoder. FILE gets prompt_embeds F32 [1, L, D], input_ids and\n"
    "attention_mask I64 [1, L]: what diffusers' encode_prompt makes, to cache, to hand to\n"
    "generate --embeddings, or to compare with another build. A prompt longer than L tokens is\n"
    "truncated (said on stderr), an empty one is encoded as it is.\n"
    "\n";

typedef struct EncodeArgs {
    const char *model, *prompt, *out;
    int max_length, threads;
    Precision precision; /* Qwen3's products (precision_to_run) */
} EncodeArgs;

static const Option encode_options[] = {
    {.name = "--model", .value = "DIR", .kind = OPTION_TEXT, .offset = offsetof(EncodeArgs, model),
     .help = "the pipeline directory (DIR/tokenizer and DIR/text_encoder for klein)"},
    {.name = "--prompt", .value = "TEXT", .kind = OPTION_TEXT,
     .offset = offsetof(EncodeArgs, prompt),
     .help = "the prompt"},
    {.name = "-o", .value = "FILE", .kind = OPTION_TEXT, .offset = offsetof(EncodeArgs, out),
     .help = "the safetensors file to write"},
    {.name = "--max-length", .value = "N", .kind = OPTION_INT,
     .offset = offsetof(EncodeArgs, max_length), .min = 1, .max = 1 << 16,
     .help = "tokens after the template (default 512, the pipeline's)"},
    {.name = "--precision", .value = "P", .kind = OPTION_PARSE,
     .offset = offsetof(EncodeArgs, precision), .parse = option_precision, .fallback = "f32",
     .help = "Qwen3's weight products, as generate's: f32, or bf16 (bf16\n"
             "operands, f32 sums) where the CPU has bf16 dot products"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE,
     .offset = offsetof(EncodeArgs, threads), .parse = option_threads,
     .help = "OpenMP threads"},
};

static int encode_parse(int argc, char **argv, EncodeArgs *a, Error *e) {
    *a = (EncodeArgs){0};
    OptionSet set = {encode_options, COUNT(encode_options), a, false};
    if (options_parse(&set, 1, argc, argv, "encode", e)) return -1;
    const char *missing = !a->model ? "--model DIR" : !a->prompt ? "--prompt TEXT"
                        : !a->out ? "-o FILE.safetensors" : NULL;
    if (missing) return error_set(e, "missing %s (see diamond encode --help)", missing);
    a->precision = precision_to_run(a->precision, "encode");
    return 0;
}

/* diamond encode ...: 0 on success, 2 for a bad command line, 1 for anything else. */
static int encode_main(int argc, char **argv) {
    if (asks_for_help(argc, argv)) {
        const OptionSet set = {encode_options, COUNT(encode_options), NULL, false};
        command_help(encode_usage, &set, 1);
        return 0;
    }
    EncodeArgs a;
    Error e = {{0}};
    if (encode_parse(argc, argv, &a, &e)) {
        fprintf(stderr, "diamond encode: %s\n", e.msg);
        return 2;
    }
    Tensor *embeds = NULL;
    PromptTokens tok = {0};
    double t0 = now_seconds();
    int rc = encode_prompts(a.model, WEIGHTS_FILES, a.precision, &a.prompt, 1, a.max_length, 0,
                            &embeds, &tok, &e) ||
             write_prompt_embeds(a.out, embeds, &tok, 0, NULL, &e);
    if (rc) fprintf(stderr, "diamond encode: %s\n", e.msg);
    else
        fprintf(stderr, "%s: prompt_embeds [1, %lld, %lld], %d real tokens (%.1f s)\n", a.out,
                (long long)embeds->shape[1], (long long)embeds->shape[2], tok.lengths[0],
                now_seconds() - t0);
    tensor_free(embeds);
    prompt_tokens_free(&tok);
    return rc ? 1 : 0;
}

/* === sampler: diamond generate === */

static const char *generate_usage =
    "usage: diamond generate --model DIR --embeddings FILE|--prompt TEXT -W W -H H --steps N\n"
    "                        -o OUT.png|OUT.ppm [--detector DIR] [--seed S[,S...] | --noise FILE]\n"
    "                        [options]\n"
    "\n"
    "Samples FLUX.2 (transformer/ and vae/ of DIR, diffusers layout) with DIAMOND's artifact\n"
    "guidance: each step decodes the clean estimate, runs the detector (DIR in the transformers\n"
    "layout) on it and moves the latent by lambda along the normalised gradient of the loss.\n"
    "\n";

#define GENERATE_MAX_BATCH 64

typedef struct GenerateArgs {
    const char *model, *detector, *embeddings, *noise, *out, *dump, *compare, *save_steps;
    const char *prompt, *negative; /* negative: the negative prompt of opt.cfg_scale > 1 */
    uint64_t seeds[GENERATE_MAX_BATCH];
    int n_seeds, steps, width, height;
    size_t memory;     /* --memory: what a run may take, in bytes (0: unknown, not checked) */
    size_t vae_memory; /* the VAE decode's memory budget (vae_decoder_checkpoint_for); 0: a
                        * share of memory (vae_default_memory) */
    SamplerOptions opt;
    Precision precision; /* the transformer's and text encoder's products (precision_to_run) */
    bool quiet;
    bool non_strict; /* --non-strict: tensors the configs do not use are allowed in the files */
    int threads;     /* --threads, once given (OpenMP's count is set as it is read) */
} GenerateArgs;

/* Where the models' weights come from: their files, strictly unless --non-strict. */
static WeightSource generate_source(const GenerateArgs *a) {
    return a->non_strict ? WEIGHTS_FILES_NON_STRICT : WEIGHTS_FILES;
}

/* "S" or "S,S,..." of whole numbers in 0..2^63 - 1 (eval's and search-seeds' range: a JSON
 * integer). */
static int generate_parse_seeds(const char *s, GenerateArgs *a) {
    a->n_seeds = 0;
    for (;;) {
        char seed[32];
        size_t len = strcspn(s, ",");
        if (a->n_seeds == GENERATE_MAX_BATCH || len >= sizeof seed) return -1;
        memcpy(seed, s, len);
        seed[len] = '\0';
        if (parse_seed(seed, &a->seeds[a->n_seeds++])) return -1; /* "" too: "1,," or "1," */
        if (!s[len]) return 0;
        s += len + 1;
    }
}

/* OPTION_PARSE readers of generate's options with more to them than a number. */

static int option_seeds(const char *value, void *field, Error *e) {
    if (generate_parse_seeds(value, field))
        return error_set(e, "--seed: expected S or S,S,... (at most %d whole numbers in "
                            "0..2^63-1), got '%s'", GENERATE_MAX_BATCH, value);
    return 0;
}

static int option_no_guide(const char *value, void *field, Error *e) {
    (void)value, (void)e;
    ((SamplerOptions *)field)->guide = false;
    return 0;
}

static int option_mu(const char *value, void *field, Error *e) {
    SamplerOptions *o = field;
    char *end;
    double mu = strtod(value, &end);
    if (end == value || *end || !(mu >= -10.0 && mu <= 10.0))
        return error_set(e, "--mu: expected a number in [-10, 10], got '%s'", value);
    o->set_mu = true;
    o->mu = mu;
    return 0;
}

static int option_lambda(const char *value, void *field, Error *e) {
    return lambda_schedule_parse(field, value, e);
}

static int option_loss(const char *value, void *field, Error *e) {
    return artifact_loss_parse(field, value, e);
}

#define GENERATE_FIELD(f) offsetof(GenerateArgs, f)

/* What a run samples from and writes: generate's own options. */
static const Option generate_options[] = {
    {.name = "--embeddings", .value = "FILE", .kind = OPTION_TEXT,
     .offset = GENERATE_FIELD(embeddings),
     .help = "safetensors with prompt_embeds [L, D] (D = joint_attention_dim)"},
    {.name = "--prompt", .value = "TEXT", .kind = OPTION_TEXT, .offset = GENERATE_FIELD(prompt),
     .help = "instead, the prompt through DIR's prompt encoder: FLUX.2 [klein]'s\n"
             "(DIR/tokenizer + DIR/text_encoder, Qwen3; as diamond encode), or\n"
             "diamond's character encoder (the embedded models)"},
    {.name = "--seed", .value = "S[,S...]", .kind = OPTION_PARSE, .parse = option_seeds,
     .help = "one image per seed: the initial latent is PyTorch's CPU\n"
             "torch.randn((1, C, H/P, W/P)) after manual_seed(S), packed to\n"
             "tokens, as the FLUX.2 pipeline with a CPU generator; S in\n"
             "0..2^63-1, drawn at random (and printed) when neither --seed nor\n"
             "--noise is given"},
    {.name = "--noise", .value = "FILE", .kind = OPTION_TEXT, .offset = GENERATE_FIELD(noise),
     .help = "instead, safetensors with noise [T, C] or [B, T, C]: the packed\n"
             "initial latent (T = (H/P) * (W/P) tokens, C = the transformer's\n"
             "in_channels); --seed then only names the outputs"},
    {.name = "--no-guide", .kind = OPTION_PARSE, .offset = GENERATE_FIELD(opt),
     .parse = option_no_guide,
     .help = "plain sampling, no detector (the baseline)"},
    {.name = "-o", .value = "OUT", .kind = OPTION_TEXT, .offset = GENERATE_FIELD(out),
     .help = "the image (.png or .ppm); a batch writes OUT-SEED.png per image.\n"
             "A PNG carries the run's parameters (prompt, seed, models, size,\n"
             "steps, schedule, loss) in a 'parameters' text chunk: diamond info\n"
             "OUT.png shows them"},
    {.name = "--compare", .value = "FILE", .kind = OPTION_TEXT, .offset = GENERATE_FIELD(compare),
     .help = "also run the baseline from the same noise and prompt and write\n"
             "one row per image: baseline | guided | detector heat maps of\n"
             "both (0.6 jet + 0.4 image); prints the detector max of each"},
    {.name = "--save-steps", .value = "DIR", .kind = OPTION_TEXT,
     .offset = GENERATE_FIELD(save_steps),
     .help = "DIR/step_III_x0.png (the decoded clean estimate of every step) and\n"
             "DIR/step_III_overlay.png (its detector heat map, where the detector\n"
             "ran); costs one more VAE decode per step; DIR is created"},
    {.name = "--dump", .value = "FILE", .kind = OPTION_TEXT, .offset = GENERATE_FIELD(dump),
     .help = "safetensors with step.I.{x_t,sigma,v,x0,mask,grad,lambda} for every\n"
             "step, final.latent and final.image; grad is before normalisation;\n"
             "a guided run also runs the detector on steps with lambda 0 for it\n"
             "(the image is the same); --no-guide runs have no mask or grad"},
};

/* How the models are loaded and sampled: generate's, eval's and search-seeds' options. */
static const Option sampling_options[] = {
    {.name = "--model", .value = "DIR", .kind = OPTION_TEXT, .offset = GENERATE_FIELD(model),
     .help = "the pipeline directory (DIR/transformer, DIR/vae)"},
    {.name = "--detector", .value = "DIR", .kind = OPTION_TEXT, .offset = GENERATE_FIELD(detector),
     .help = "the artifact detector (SegFormer); needed unless --no-guide"},
    {.name = "--steps", .value = "N", .kind = OPTION_INT, .offset = GENERATE_FIELD(steps),
     .min = 1, .max = 10000,
     .help = "sampling steps (FLUX.2 klein: 4, FLUX.2 dev: 30)"},
    {.name = "-W", .value = "W", .kind = OPTION_INT, .offset = GENERATE_FIELD(width),
     .min = 1, .max = IMAGE_MAX_SIDE,
     .help = "image width, a multiple of P = 2^(len(block_out_channels)-1) *\n"
             "patch_size of the VAE (16 for FLUX.2)"},
    {.name = "-H", .value = "H", .kind = OPTION_INT, .offset = GENERATE_FIELD(height),
     .min = 1, .max = IMAGE_MAX_SIDE,
     .help = "image height, a multiple of P"},
    {.name = "--guidance-scale", .value = "G", .kind = OPTION_FLOAT,
     .offset = GENERATE_FIELD(opt.guidance_scale), .min = -1e6, .max = 1e6, .fallback = "4",
     .help = "distilled guidance for models with guidance_embeds (FLUX.2 dev);\n"
             "ignored by klein"},
    {.name = "--cfg", .value = "S", .kind = OPTION_FLOAT,
     .offset = GENERATE_FIELD(opt.cfg_scale), .min = 1, .max = 100, .fallback = "1",
     .help = "classifier-free guidance, as FLUX.2 klein base pipelines apply\n"
             "their guidance_scale (e.g. 4): each step also runs the\n"
             "transformer on the negative prompt, v = v_neg + S (v - v_neg);\n"
             "1: off (distilled models); needs --prompt"},
    {.name = "--negative-prompt", .value = "TEXT", .kind = OPTION_TEXT,
     .offset = GENERATE_FIELD(negative),
     .help = "the negative prompt of --cfg (default: empty)"},
    {.name = "--lambda-schedule", .value = "S", .kind = OPTION_PARSE,
     .offset = GENERATE_FIELD(opt.lambda), .parse = option_lambda, .fallback = "power",
     .help = "TYPE[:key=value,...], one of:\n"
             "  constant:value=0\n"
             "  linear:start=12,end=1\n"
             "  power:start=12,end=1,power=2\n"
             "  cosine:start=12,end=1\n"
             "  hard_then_exp:start=30,after=2,power=2\n"
             "  exponential:start=30,end=1,power=5,warmup=5,cooldown=12\n"
             "(values shown are the official defaults; the FLUX.2 config's\n"
             "exponential guides no step when N <= 17). Where the official\n"
             "formulas divide by zero (N = 1, an exponential window of one step)\n"
             "that step gets the start value"},
    {.name = "--loss", .value = "L", .kind = OPTION_PARSE, .offset = GENERATE_FIELD(opt.loss),
     .parse = option_loss, .fallback = "power:gamma=3",
     .help = "mse | power:gamma=G (G 2 when not given) | focal:gamma=G,alpha=A\n"
             "(2 and 1 when not given); the default is the FLUX.2 config's.\n"
             "focal is the official -alpha (1-m)^gamma log(1-m+1e-6), kept as\n"
             "it is: its weight is large where the mask is small, the reverse\n"
             "of the usual focal loss"},
    {.name = "--gate", .value = "T", .kind = OPTION_FLOAT, .offset = GENERATE_FIELD(opt.gate),
     .max = 1,
     .help = "skip the detector backward and the shift for a sample whose\n"
             "detector max is below T at that step (default off, as official)"},
    {.name = "--mu", .value = "M", .kind = OPTION_PARSE, .offset = GENERATE_FIELD(opt),
     .parse = option_mu,
     .help = "shift the sigma schedule by exp(M) instead of FLUX.2's empirical\n"
             "mu for the token count (made for thousands of tokens; the\n"
             "embedded models use 0: no shift)"},
    {.name = "--memory", .value = "MB", .kind = OPTION_PARSE, .offset = GENERATE_FIELD(memory),
     .parse = option_megabytes,
     .help = "the memory the run may take (default: the memory available,\n"
             "Linux's MemAvailable, macOS's physical memory). A run whose\n"
             "estimate (printed at the start) is larger is refused before it\n"
             "samples; the transformer's memory-mapped weights are counted apart"},
    {.name = "--vae-memory", .value = "MB", .kind = OPTION_PARSE,
     .offset = GENERATE_FIELD(vae_memory), .parse = option_megabytes,
     .help = "the memory the VAE decode's backward may hold (default: half\n"
             "of --memory; 1024 when that is unknown): it\n"
             "nests its checkpoints (0-3 levels) only as deep as that needs,\n"
             "and each level less is faster (none: about twice as fast as 3).\n"
             "A FLUX.2 decode of 256x256 needs none from 1780, 512x512 from\n"
             "7120, 1024x1024 from 28480"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE,
     .offset = GENERATE_FIELD(threads), .parse = option_threads,
     .help = "OpenMP threads"},
    {.name = "--precision", .value = "P", .kind = OPTION_PARSE,
     .offset = GENERATE_FIELD(precision), .parse = option_precision, .fallback = "f32",
     .help = "the weight products of the transformer and the Qwen3 text encoder:\n"
             "f32, or bf16 (bf16 operands, f32 sums, on AVX512-BF16 or ARMv8.6\n"
             "BF16: about twice as fast, v within ~1% of f32's; where the CPU\n"
             "has neither, a note and f32). The rest stays f32"},
    {.name = "--non-strict", .kind = OPTION_FLAG, .offset = GENERATE_FIELD(non_strict),
     .help = "load model files that hold tensors the configs do not use (by\n"
             "default an error naming them, as PyTorch's strict loading)"},
    {.name = "--quiet", .kind = OPTION_FLAG, .offset = GENERATE_FIELD(quiet),
     .help = "no progress on stderr"},
};

/* Every sampling option at its default: the table's fallbacks, guided, all the memory
 * available. */
static int generate_defaults(GenerateArgs *a, Error *e) {
    *a = (GenerateArgs){.memory = memory_available(), .opt = {.guide = true}};
    OptionSet set = {sampling_options, COUNT(sampling_options), a, false};
    return options_defaults(&set, 1, e);
}

/* path for one image, else path with "-SEED" (or "-INDEX") before the extension (path has
 * one); an error when that does not fit in len. */
static int generate_out_name(const GenerateArgs *a, const char *path, int64_t b, int64_t batch,
                             char *name, size_t len, Error *e) {
    const char *dot = strrchr(path, '.');
    unsigned long long tag = a->n_seeds ? (unsigned long long)a->seeds[b] : (unsigned long long)b;
    int n = batch == 1 ? snprintf(name, len, "%s", path)
                       : snprintf(name, len, "%.*s-%llu%s", (int)(dot - path), path, tag, dot);
    if (n < 0 || (size_t)n >= len) return error_set(e, "output path too long: %s", path);
    return 0;
}

/* A seed for a run given neither --seed nor --noise: 63 bits from the system's entropy (the
 * clock and process id where /dev/urandom cannot be read), in --seed's range. */
static uint64_t generate_random_seed(void) {
    uint64_t seed = 0;
    FILE *f = fopen("/dev/urandom", "rb");
    if (!f || fread(&seed, sizeof seed, 1, f) != 1)
        seed = (uint64_t)time(NULL) * 6364136223846793005u ^ (uint64_t)getpid();
    if (f) fclose(f);
    return seed & (uint64_t)INT64_MAX;
}

/* names[0 .. n) (given by the options opts[0 .. n)) are n different files. */
static int outputs_distinct(const char *const *opts, char (*names)[PATH_BYTES], int n, Error *e) {
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (paths_same(names[i], names[j]))
                return error_set(e, "%s %s and %s %s are the same file: one would overwrite the "
                                    "other", opts[i], names[i], opts[j], names[j]);
    return 0;
}

/* -o (each image's name, OUT-SEED.ext for several seeds), --compare, --dump and --save-steps name
 * different files: one would overwrite another. */
static int generate_check_outputs(const GenerateArgs *a, Error *e) {
    int images = a->n_seeds > 1 ? a->n_seeds : 1, n = 0, rc = 0;
    const char *opts[GENERATE_MAX_BATCH + 3];
    char (*names)[PATH_BYTES] = malloc((GENERATE_MAX_BATCH + 3) * sizeof *names);
    if (!names) return error_set(e, "out of memory");
    for (int b = 0; b < images; b++) {
        if (rc) break;
        opts[n] = "-o";
        rc = generate_out_name(a, a->out, b, images, names[n++], PATH_BYTES, e);
    }
    const char *others[3][2] = {{"--compare", a->compare}, {"--dump", a->dump},
                                {"--save-steps", a->save_steps}};
    for (int k = 0; k < 3; k++)
        if (others[k][1]) {
            opts[n] = others[k][0];
            snprintf(names[n++], PATH_BYTES, "%s", others[k][1]);
        }
    if (rc == 0) rc = outputs_distinct(opts, names, n, e);
    free(names);
    return rc;
}

/* --negative-prompt only with classifier-free guidance on. */
static int generate_check_negative(const GenerateArgs *a, Error *e) {
    if (a->negative && !(a->opt.cfg_scale > 1.0f))
        return error_set(e, "--negative-prompt is for --cfg S with S > 1");
    return 0;
}

/* The command line into a, after the defaults and the model's own (model_defaults); 0, or with
 * the message in e -1 for a usage error, 1 for a bad sampling.json. */
static int generate_parse(int argc, char **argv, GenerateArgs *a, Error *e) {
    if (generate_defaults(a, e)) return -1;
    OptionSet sets[] = {{generate_options, COUNT(generate_options), a, false},
                        {sampling_options, COUNT(sampling_options), a, false}};
    if (model_defaults(sets, 2, argc, argv, "generate", e)) return 1;
    if (options_parse(sets, 2, argc, argv, "generate", e)) return -1;
    if (a->embeddings && a->prompt)
        return error_set(e, "--embeddings and --prompt: give one of them");
    if (a->opt.cfg_scale > 1.0f && a->embeddings)
        return error_set(e, "--cfg runs the negative prompt through DIR/text_encoder: it needs "
                            "--prompt, not --embeddings");
    if (generate_check_negative(a, e)) return -1;
    const char *missing = !a->model ? "--model DIR"
                        : !a->embeddings && !a->prompt ? "--embeddings FILE (or --prompt TEXT)"
                        : !a->out ? "-o OUT" : !a->steps ? "--steps N" : !a->width ? "-W W"
                        : !a->height ? "-H H" : !a->detector && a->opt.guide ? "--detector DIR"
                        : NULL;
    if (missing) return error_set(e, "missing %s (see diamond generate --help)", missing);
    if (!a->noise && !a->n_seeds) {
        a->seeds[a->n_seeds++] = generate_random_seed();
        if (!a->quiet)
            fprintf(stderr, "diamond generate: --seed %llu (drawn at random; the image records "
                            "it)\n", (unsigned long long)a->seeds[0]);
    }
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
    if (generate_check_outputs(a, e)) return -1;
    a->opt.steps = a->steps;
    a->precision = precision_to_run(a->precision, "generate");
    return 0;
}

/* The loaded models and inputs of one run. */
typedef struct GenerateRun {
    Flux2 *flow;
    VaeDecoder *vae;
    Segformer *detector;
    Tensor *txt, *latent; /* [B, L, D], [B, T, C] */
    char *txt_prompt;     /* the prompt txt (and negative) hold, when eval encoded one */
    Tensor *negative;     /* [B, L, D] the negative prompt's, with classifier-free guidance */
    int grid_h, grid_w;
    int vae_levels;       /* the VAE decode's checkpoint levels (vae_decoder_checkpoint_for) */
} GenerateRun;

static void generate_run_free(GenerateRun *r) {
    free(r->txt_prompt);
    flux2_free(r->flow);
    vae_decoder_free(r->vae);
    segformer_free(r->detector);
    tensor_free(r->txt);
    tensor_free(r->negative);
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
    else if (rows < 0 && t->shape[t->ndim - 2] > FLUX2_MAX_TEXT_TOKENS)
        rc = error_set(e, "%s: '%s' has %lld tokens, at most %d are taken (the klein pipeline "
                       "makes 512)", path, name, (long long)t->shape[t->ndim - 2],
                       FLUX2_MAX_TEXT_TOKENS);
    if (rc == 0) {
        int64_t B = t->ndim == 3 ? t->shape[0] : 1;
        *out = TENSOR_NEW(B, t->shape[t->ndim - 2], cols);
        rc = *out ? st_read_f32(st, name, (*out)->data, (*out)->numel, e)
                  : error_set(e, "%s: out of memory for '%s'", path, name);
    }
    size_t bad = rc == 0 ? first_non_finite((size_t)(*out)->numel, (*out)->data) : 0;
    if (rc == 0 && bad < (size_t)(*out)->numel)
        rc = error_set(e, "%s: '%s' holds %s at value %zu", path, name,
                       isnan((*out)->data[bad]) ? "NaN" : "an infinity", bad);
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
    if (rc == 0)
        for (int b = 0; b < batch; b++)
            memcpy(r->txt->data + b * one->numel, one->data, (size_t)one->numel * sizeof(float));
    tensor_free(one);
    return rc;
}

/* Row b of x [n, L, D] repeated batch times: *out [batch, L, D]. */
static int repeat_row(const Tensor *x, int b, int batch, Tensor **out, Error *e) {
    int64_t row = x->shape[1] * x->shape[2];
    if (!(*out = TENSOR_NEW(batch, x->shape[1], x->shape[2])))
        return error_set(e, "out of memory for the prompt embeddings");
    for (int i = 0; i < batch; i++)
        memcpy((*out)->data + i * row, x->data + b * row, (size_t)row * sizeof(float));
    return 0;
}

/* The prompt (and with --cfg the negative prompt) through <model>'s prompt encoder, each
 * repeated over the batch. */
static int generate_prompt(const GenerateArgs *a, GenerateRun *r, int batch, Error *e) {
    bool cfg = a->opt.cfg_scale > 1.0f;
    const char *prompts[2] = {a->prompt, a->negative ? a->negative : ""};
    Tensor *embeds = NULL;
    int rc = encode_prompts(a->model, generate_source(a), a->precision, prompts, cfg ? 2 : 1, 0,
                            flux2_config(r->flow)->joint_attention_dim, &embeds, NULL, e) ||
             repeat_row(embeds, 0, batch, &r->txt, e) ||
             (cfg && repeat_row(embeds, 1, batch, &r->negative, e));
    tensor_free(embeds);
    return rc ? -1 : 0;
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

/* The flow model, the VAE, the image grid and (when guiding) the detector; returns 2 for sizes
 * the model cannot make, 1 for other failures, 0 when ready. */
static int generate_load_models(const GenerateArgs *a, GenerateRun *r, Error *e) {
    int rc = flow_models_open(a->model, generate_source(a), 0, a->width, a->height, &r->flow,
                              &r->vae, &r->grid_h, &r->grid_w, e);
    if (rc) return rc;
    if (flux2_set_precision(r->flow, a->precision, e)) return 1;
    size_t budget = a->vae_memory ? a->vae_memory : vae_default_memory(a->memory);
    r->vae_levels = vae_decoder_checkpoint_for(r->vae, a->n_seeds > 1 ? a->n_seeds : 1, a->height,
                                               a->width, budget);
    if (!a->quiet && a->opt.guide)
        fprintf(stderr, "VAE decode: %d checkpoint levels for a budget of %zu MiB (--vae-memory)\n",
                r->vae_levels, budget >> 20);
    return a->opt.guide && segformer_open(&r->detector, a->detector, generate_source(a), 0, e)
               ? 1
               : 0;
}

/* The bytes of a Params' values (0 for NULL). */
static double params_bytes(const Params *p) {
    double bytes = 0.0;
    if (p)
        for (int i = 0; i < params_count(p); i++)
            bytes += (double)params_var(p, i)->value->numel * sizeof(float);
    return bytes;
}

/* What a run takes beyond the transformer's memory-mapped weights, in bytes: the resident
 * weights and the run's tensors throughout, and the larger of a transformer forward and a guided
 * step's decode and detector passes (the final decode, without grad, holds less than the guided
 * one: tests/test_vae.c). */
typedef struct RunMemory {
    double weights, tensors, flow, decode, detector, total;
} RunMemory;

static RunMemory generate_memory(const GenerateRun *r, int batch, int64_t txt_len) {
    const Flux2Config *c = flux2_config(r->flow);
    int ph, pw;
    vae_decoder_token_size(r->vae, &ph, &pw);
    int height = r->grid_h * ph, width = r->grid_w * pw;
    double tokens = (double)r->grid_h * r->grid_w, pixels = (double)height * width;
    RunMemory m = {
        .weights = params_bytes(flux2_params(r->flow)) + params_bytes(vae_decoder_params(r->vae)) +
                   (r->detector ? params_bytes(segformer_params(r->detector)) : 0.0),
        /* the latent, noise, velocity, clean estimate, gradient and the baseline's; the prompt's
         * and the negative prompt's embeddings; the images and maps */
        .tensors = sizeof(float) * batch *
                   (8.0 * tokens * c->in_channels + 2.0 * txt_len * c->joint_attention_dim +
                    8.0 * pixels),
        .flow = (double)flux2_forward_bytes(r->flow, batch, r->grid_h * (int64_t)r->grid_w,
                                            txt_len),
        .decode = (double)vae_decode_bytes(r->vae, r->vae_levels, batch, height, width),
        /* the artifact loss adds a few maps at the image's size */
        .detector = r->detector
                        ? (double)segformer_forward_bytes(r->detector, batch, height, width) +
                              sizeof(float) * 4.0 * batch * pixels
                        : 0.0,
    };
    double step = m.decode + m.detector;
    m.total = m.weights + m.tensors + (m.flow > step ? m.flow : step);
    return m;
}

/* The estimate of a run over r's inputs, said at the start (say) and refused when it passes
 * --memory. */
static int generate_check_memory(const GenerateArgs *a, const GenerateRun *r, bool say, Error *e) {
    RunMemory m = generate_memory(r, (int)r->latent->shape[0], r->txt->shape[1]);
    const double MiB = 1024.0 * 1024.0;
    char parts[160];
    snprintf(parts, sizeof parts, "weights %.0f, tensors %.0f, transformer %.0f, VAE decode %.0f, "
             "detector %.0f", m.weights / MiB, m.tensors / MiB, m.flow / MiB, m.decode / MiB,
             m.detector / MiB);
    if (a->memory && m.total > (double)a->memory)
        return error_set(e, "this run needs about %.0f MiB (%s), more than the %zu MiB it may "
                         "take: make the image or the batch smaller, or raise --memory MB to run "
                         "it anyway", m.total / MiB, parts, a->memory >> 20);
    if (say && !a->quiet)
        fprintf(stderr, "memory: about %.0f MiB (%s) of %zu MiB (--memory)\n", m.total / MiB,
                parts, a->memory >> 20);
    return 0;
}

/* Models, image grid and inputs; returns 2 for sizes the model cannot make or runs that cannot
 * fit --memory, 1 for other failures, 0 when ready. */
static int generate_load(const GenerateArgs *a, GenerateRun *r, Error *e) {
    int rc = generate_load_models(a, r, e);
    if (rc) return rc;
    if (a->noise ? generate_read(a->noise, "noise", (int64_t)r->grid_h * r->grid_w,
                                 flux2_config(r->flow)->in_channels, &r->latent, e)
                 : generate_seed_noise(a, r, e))
        return 1;
    int batch = (int)r->latent->shape[0];
    if (a->n_seeds && a->n_seeds != batch) {
        error_set(e, "%d seeds for a noise batch of %d", a->n_seeds, batch);
        return 2;
    }
    if (a->prompt ? generate_prompt(a, r, batch, e) : generate_embeddings(a, r, batch, e))
        return 1;
    return generate_check_memory(a, r, true, e) ? 2 : 0;
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

/* A latent's image (decode_latent). */
static int generate_decode(const GenerateRun *r, Tensor *latent, Tensor **image, Error *e) {
    return decode_latent(r->vae, r->grid_h, r->grid_w, latent, image, e);
}

/* Sample b of image [B, 3, H, W] as 8-bit RGB the official way (image_from_signed; NaN becomes
 * 0). */
static void generate_to_rgb(const Tensor *image, int64_t b, Image *out) {
    int64_t plane = image->shape[2] * image->shape[3];
    image_from_signed(image->data + b * 3 * plane, (int)image->shape[3], (int)image->shape[2],
                      out->rgb);
}

/* The sampling settings an item was made with, compared on resume and merge (paths are left
 * out: shards may run on machines that keep the models elsewhere). */
static void generate_settings(const GenerateArgs *g, char *out, size_t len) {
    static const char *const lambdas[] = {"constant", "linear", "power", "cosine",
                                          "hard_then_exp", "exponential"};
    static const char *const losses[] = {"mse", "power", "focal"};
    const LambdaSchedule *l = &g->opt.lambda;
    snprintf(out, len, "steps=%d size=%dx%d guidance_scale=%.9g gate=%.9g lambda=%s:value=%.17g,"
             "start=%.17g,end=%.17g,power=%.17g,after=%.17g,warmup=%d,cooldown=%d "
             "loss=%s:gamma=%.17g,alpha=%.17g", g->steps, g->width, g->height,
             g->opt.guidance_scale, g->opt.gate, lambdas[l->type], l->value, l->start, l->end,
             l->power, l->after, l->warmup, l->cooldown, losses[g->opt.loss.type],
             g->opt.loss.gamma, g->opt.loss.alpha);
    if (g->opt.set_mu) snprintf(out + strlen(out), len - strlen(out), " mu=%.17g", g->opt.mu);
    if (g->precision == PRECISION_BF16) snprintf(out + strlen(out), len - strlen(out),
                                                  " precision=bf16");
    if (g->opt.cfg_scale > 1.0f)
        snprintf(out + strlen(out), len - strlen(out), " cfg=%.9g negative=\"%s\"",
                 g->opt.cfg_scale, g->negative ? g->negative : "");
}

/* The parameters image b of a run carries in its PNG (GENERATE_PNG_KEY), as `diamond info`
 * shows them: its prompt, seed, models and every sampling setting. A new string, or NULL. */
static char *generate_parameters(const GenerateArgs *a, int64_t b) {
    char settings[1024], *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    generate_settings(a, settings, sizeof settings);
    if (a->prompt) fprintf(f, "prompt: %s\n", a->prompt);
    else fprintf(f, "embeddings: %s\n", a->embeddings);
    if (a->noise) fprintf(f, "noise: %s, image %lld\n", a->noise, (long long)b);
    else fprintf(f, "seed: %llu\n", (unsigned long long)a->seeds[b]);
    fprintf(f, "model: %s\ndetector: %s\nguided: %s\nsettings: %s\nsoftware: %s\n", a->model,
            a->detector ? a->detector : "none", a->opt.guide ? "yes" : "no (--no-guide)",
            settings, DIAMOND_VERSION);
    if (fclose(f)) {
        free(text);
        return NULL;
    }
    return text;
}

static int generate_write_images(const GenerateArgs *a, const Tensor *image, Error *e) {
    Image img = {0};
    if (image_alloc(&img, (int)image->shape[3], (int)image->shape[2], e)) return -1;
    int rc = 0;
    bool png = !strcmp(strrchr(a->out, '.'), ".png");
    for (int64_t b = 0; b < image->shape[0]; b++) {
        if (rc) break;
        char name[PATH_BYTES];
        if ((rc = generate_out_name(a, a->out, b, image->shape[0], name, sizeof name, e))) break;
        generate_to_rgb(image, b, &img);
        char *parameters = png ? generate_parameters(a, b) : NULL;
        if (png && !parameters) rc = error_set(e, "out of memory");
        else if (png) rc = png_write_text(name, &img, GENERATE_PNG_KEY, parameters, e);
        else rc = ppm_write(name, &img, e);
        free(parameters);
        if (rc == 0 && !a->quiet) fprintf(stderr, "wrote %s\n", name);
    }
    image_free(&img);
    return rc;
}

/* --- sampler: --compare --- */

/* The detector on images [B, 3, H, W], no gradient: its full-size mask [B, L, H, W] and its map
 * at 1/4 of its input [B, L, h, w] (each when not NULL), and each sample's max over that map
 * (the artifact-frequency statistic). */
static int generate_detect(const GenerateRun *r, Tensor *image, Tensor **mask, Tensor **small_map,
                           float *maxima, Error *e) {
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory for the detector");
    tape_set_grad(t, false);
    Var *small = NULL, *m = segformer_forward(t, r->detector, var_new(t, image, false), &small);
    int rc = tape_check(t, e);
    if (rc == 0 && mask && !(*mask = tensor_clone(m->value))) rc = error_set(e, "out of memory");
    if (rc == 0 && small_map && !(*small_map = tensor_clone(small->value)))
        rc = error_set(e, "out of memory");
    for (int64_t b = 0; b < image->shape[0]; b++) {
        if (rc) break;
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

/* --- comparison sheets ---
 * The demo picture and generate --compare: a title row (BASELINE, DIAMOND, BASELINE MAP, DIAMOND
 * MAP), then for each image a caption and four panels, the baseline and the guided image and each
 * under its detector map. An image smaller than SHEET_PANEL pixels on its longer side is enlarged
 * by a whole factor (sheet_zoom). Pixels: SHEET_GAP around and between the panels, SHEET_TITLE
 * for the title row, SHEET_CAPTION above each row's panels; row i's panel k is at
 * (SHEET_GAP + k (pw + SHEET_GAP), SHEET_TITLE + i (SHEET_CAPTION + ph + SHEET_GAP) +
 * SHEET_CAPTION). */
#define SHEET_PANEL 256
#define SHEET_GAP 8
#define SHEET_TITLE 30
#define SHEET_CAPTION 22
#define SHEET_TEXT_SCALE 2

typedef struct SheetRow {
    char caption[96];
    const Image *images[2]; /* baseline, guided */
    const float *maps[2];   /* each the detector's map [map_h, map_w] at 1/4 of its input */
    int map_h, map_w;
} SheetRow;

static int sheet_zoom(int width, int height) {
    int side = width > height ? width : height;
    return side >= SHEET_PANEL ? 1 : SHEET_PANEL / side;
}

/* The rows of c in the words world's 5 x 7 font, with '.', '-', '>' and ':' added for the
 * captions; -1 for a character it lacks (a space). */
static int sheet_glyph_rows(char c, uint8_t rows[WORLD_FONT_H]) {
    static const struct {
        char c;
        uint8_t rows[WORLD_FONT_H];
    } marks[] = {{'.', {0, 0, 0, 0, 0, 0x0C, 0x0C}},
                 {'-', {0, 0, 0, 0x1F, 0, 0, 0}},
                 {'>', {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}},
                 {':', {0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0}}};
    for (size_t i = 0; i < COUNT(marks); i++)
        if (marks[i].c == c) {
            memcpy(rows, marks[i].rows, WORLD_FONT_H);
            return 0;
        }
    return world_glyph_rows(c, rows);
}

/* text in cells of SHEET_TEXT_SCALE pixels, colour rgb, from (x, y); characters outside the font
 * leave a gap. */
static void sheet_text(Image *img, int x, int y, const char *text, const uint8_t *rgb) {
    const int scale = SHEET_TEXT_SCALE;
    for (; *text; text++, x += (WORLD_FONT_W + 1) * scale) {
        uint8_t rows[WORLD_FONT_H];
        if (sheet_glyph_rows(*text, rows) < 0) continue;
        for (int r = 0; r < WORLD_FONT_H * scale; r++)
            for (int c = 0; c < WORLD_FONT_W * scale; c++) {
                int px = x + c, py = y + r;
                bool ink = rows[r / scale] >> (WORLD_FONT_W - 1 - c / scale) & 1;
                if (ink && px >= 0 && py >= 0 && px < img->width && py < img->height)
                    memcpy(&img->rgb[((size_t)py * img->width + px) * 3], rgb, 3);
            }
    }
}

/* src enlarged zoom times at (x0, y0), as itself or (map) under its heat map: the map resized
 * bilinearly to the image, as the metrics do, then enlarged with it. */
static int sheet_panel(Image *dst, int x0, int y0, const Image *src, const float *map, int map_h,
                       int map_w, int zoom, Error *e) {
    Image big = {0};
    float *heat = NULL, *heat_big = NULL;
    int W = src->width * zoom, H = src->height * zoom;
    int rc = image_alloc(&big, W, H, e);
    if (rc == 0 && map) {
        heat = malloc((size_t)src->width * src->height * sizeof *heat);
        heat_big = malloc((size_t)W * H * sizeof *heat_big);
        if (!heat || !heat_big) rc = error_set(e, "out of memory");
    }
    if (rc == 0 && map)
        resize_bilinear_forward(1, map_h, map_w, src->height, src->width, map, heat);
    if (rc == 0)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                size_t from = (size_t)(y / zoom) * src->width + x / zoom;
                memcpy(&big.rgb[((size_t)y * W + x) * 3], &src->rgb[from * 3], 3);
                if (heat) heat_big[(size_t)y * W + x] = heat[from];
            }
    if (rc == 0) generate_panel(dst, x0, y0, &big, heat_big);
    image_free(&big);
    free(heat);
    free(heat_big);
    return rc;
}

/* The sheet of rows[0 .. n) (their images all of one size) into path (.png or .ppm). */
static int sheet_write(const char *path, const SheetRow *rows, int n, Error *e) {
    static const uint8_t white[3] = {255, 255, 255}, grey[3] = {170, 170, 170};
    static const char *const titles[4] = {"BASELINE", "DIAMOND", "BASELINE MAP", "DIAMOND MAP"};
    int zoom = sheet_zoom(rows[0].images[0]->width, rows[0].images[0]->height);
    int pw = rows[0].images[0]->width * zoom, ph = rows[0].images[0]->height * zoom;
    Image out = {0};
    if (image_alloc(&out, 4 * pw + 5 * SHEET_GAP,
                    SHEET_TITLE + n * (SHEET_CAPTION + ph + SHEET_GAP), e))
        return -1;
    memset(out.rgb, 24, (size_t)out.width * out.height * 3);
    for (int k = 0; k < 4; k++)
        sheet_text(&out, SHEET_GAP + k * (pw + SHEET_GAP), 8, titles[k], white);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (rc) break;
        int y = SHEET_TITLE + i * (SHEET_CAPTION + ph + SHEET_GAP);
        sheet_text(&out, SHEET_GAP, y + 4, rows[i].caption, grey);
        for (int k = 0; k < 4; k++) {
            rc = sheet_panel(&out, SHEET_GAP + k * (pw + SHEET_GAP), y + SHEET_CAPTION,
                             rows[i].images[k % 2], k < 2 ? NULL : rows[i].maps[k % 2],
                             rows[i].map_h, rows[i].map_w, zoom, e);
            if (rc) break;
        }
    }
    if (rc == 0)
        rc = !strcmp(strrchr(path, '.'), ".png") ? png_write(path, &out, e)
                                                 : ppm_write(path, &out, e);
    image_free(&out);
    return rc ? -1 : 0;
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
    for (int64_t b = 0; b < image->shape[0]; b++) {
        if (rc) break;
        char file[64], base[PATH_BYTES], name[PATH_BYTES];
        generate_to_rgb(image, b, &img);
        snprintf(file, sizeof file, "step_%03d_x0.png", s->index);
        rc = path_join(base, sizeof base, a->save_steps, file, e) ||
             generate_out_name(a, base, b, image->shape[0], name, sizeof name, e) ||
             png_write(name, &img, e);
        if (rc || !s->mask) continue;
        generate_panel(&heat, 0, 0, &img, s->mask->data + b * s->mask->numel / s->mask->shape[0]);
        snprintf(file, sizeof file, "step_%03d_overlay.png", s->index);
        rc = path_join(base, sizeof base, a->save_steps, file, e) ||
             generate_out_name(a, base, b, image->shape[0], name, sizeof name, e) ||
             png_write(name, &heat, e);
    }
    image_free(&img);
    image_free(&heat);
    tensor_free(image);
    return rc ? -1 : 0;
}

/* step i/N, seconds per step and the time left on stderr: a bar redrawn in place on a terminal,
 * a line per step elsewhere (a log). */
static void generate_progress(const GenerateProgress *p, const SamplerStep *s) {
    int done = s->index + 1, width = 24, filled = width * done / s->steps;
    double per = (now_seconds() - p->start) / done, left = per * (s->steps - done);
    if (!isatty(STDERR_FILENO)) {
        fprintf(stderr, "step %d/%d  sigma %.4f  lambda %g  %.2f s/step  ETA %.0f s\n", done,
                s->steps, s->sigma, s->lambda, per, left);
        return;
    }
    char bar[32];
    for (int i = 0; i < width; i++) bar[i] = i < filled ? '#' : '.';
    bar[width] = '\0';
    fprintf(stderr, "\rstep %d/%d [%s] %.2f s/step  ETA %.0f s\033[K%s", done, s->steps, bar, per,
            left, done == s->steps ? "\n" : "");
}

/* Progress (generate_progress), and the step's tensors into the dump. */
static int generate_on_step(const SamplerStep *s, void *ctx, Error *e) {
    GenerateProgress *p = ctx;
    if (!p->quiet) generate_progress(p, s);
    if (p->args->save_steps && (dir_make(p->args->save_steps, e) || generate_save_step(p, s, e)))
        return -1;
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

/* --compare's sheet: per image b of the batch, baseline[b] and guided[b] with their maps
 * maps[0], maps[1] ([B, 1, h, w]), captioned with its seed and both detector maxima. */
static int generate_compare_sheet(const GenerateArgs *a, const Tensor *baseline,
                                  const Tensor *guided, Tensor *const maps[2],
                                  const float *maxima, Error *e) {
    int64_t B = baseline->shape[0], h = maps[0]->shape[2], w = maps[0]->shape[3];
    Image *images = calloc(2 * (size_t)B, sizeof *images);
    SheetRow *rows = calloc((size_t)B, sizeof *rows);
    int rc = images && rows ? 0 : error_set(e, "out of memory");
    for (int64_t b = 0; b < B; b++) {
        if (rc) break;
        SheetRow *row = &rows[b];
        const Tensor *both[2] = {baseline, guided};
        for (int k = 0; k < 2; k++) {
            if (rc) break;
            rc = image_alloc(&images[2 * b + k], (int)both[k]->shape[3], (int)both[k]->shape[2],
                             e);
            if (rc == 0) generate_to_rgb(both[k], b, &images[2 * b + k]);
            row->images[k] = &images[2 * b + k];
            row->maps[k] = maps[k]->data + b * h * w;
        }
        row->map_h = (int)h;
        row->map_w = (int)w;
        int n = a->n_seeds ? snprintf(row->caption, sizeof row->caption, "SEED %llu  ",
                                      (unsigned long long)a->seeds[b])
                           : snprintf(row->caption, sizeof row->caption, "IMAGE %lld  ",
                                      (long long)b);
        snprintf(row->caption + n, sizeof row->caption - (size_t)n, "DETECTOR MAX %.2f -> %.2f",
                 maxima[b], maxima[B + b]);
    }
    if (rc == 0) rc = sheet_write(a->compare, rows, (int)B, e);
    if (images)
        for (int64_t i = 0; i < 2 * B; i++) image_free(&images[i]);
    free(images);
    free(rows);
    return rc ? -1 : 0;
}

/* The baseline from the same initial latent and prompt, then the sheet of baseline | guided |
 * heat maps into --compare; the detector max of both on stdout. */
static int generate_compare(const GenerateArgs *a, GenerateRun *r, Tensor *initial,
                            Tensor *guided, Error *e) {
    SamplerOptions plain = a->opt;
    plain.guide = false;
    GenerateArgs plain_args = *a;
    plain_args.save_steps = NULL; /* the steps saved are the guided run's */
    GenerateProgress progress = {.args = &plain_args, .run = r, .quiet = a->quiet,
                                 .start = now_seconds()};
    if (!a->quiet) fprintf(stderr, "baseline:\n");
    int64_t B = initial->shape[0];
    Tensor *baseline = NULL, *maps[2] = {NULL, NULL};
    float *maxima = calloc(2 * (size_t)B, sizeof *maxima);
    int rc = maxima ? 0 : error_set(e, "out of memory");
    if (rc == 0)
        rc = sampler_run(r->flow, r->vae, NULL, &plain, r->txt, r->negative, initial, r->grid_h,
                         r->grid_w, generate_on_step, &progress, e) ||
             generate_decode(r, initial, &baseline, e) ||
             generate_detect(r, baseline, NULL, &maps[0], maxima, e) ||
             generate_detect(r, guided, NULL, &maps[1], maxima + B, e) ||
             generate_compare_sheet(a, baseline, guided, maps, maxima, e);
    if (rc == 0)
        for (int64_t b = 0; b < B; b++)
            printf("image %lld: detector max %.4f (baseline) -> %.4f (guided)\n", (long long)b,
                   maxima[b], maxima[B + b]);
    if (rc == 0 && !a->quiet) fprintf(stderr, "wrote %s\n", a->compare);
    tensor_free(baseline);
    tensor_free(maps[0]);
    tensor_free(maps[1]);
    free(maxima);
    return rc ? -1 : 0;
}

/* Sampling, the image files, the comparison and the dump. */
static int generate_sample(const GenerateArgs *a, GenerateRun *r, Error *e) {
    GenerateDump dump = {0};
    GenerateProgress progress = {.args = a, .run = r, .dump = a->dump ? &dump : NULL,
                                 .quiet = a->quiet, .start = now_seconds()};
    Tensor *image = NULL, *initial = a->compare ? tensor_clone(r->latent) : NULL;
    if (a->compare && !initial) return error_set(e, "out of memory for the baseline latent");
    SamplerOptions opt = a->opt;
    opt.inspect_every_step = a->dump != NULL;
    int rc = sampler_run(r->flow, r->vae, r->detector, &opt, r->txt, r->negative, r->latent,
                         r->grid_h, r->grid_w, generate_on_step, &progress, e) ||
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
    if (asks_for_help(argc, argv)) {
        const OptionSet sets[] = {{generate_options, COUNT(generate_options), NULL, false},
                                  {sampling_options, COUNT(sampling_options), NULL, false}};
        command_help(generate_usage, sets, 2);
        return 0;
    }
    GenerateArgs a;
    GenerateRun r = {0};
    Error e = {{0}};
    int parsed = generate_parse(argc, argv, &a, &e);
    if (parsed) {
        fprintf(stderr, "diamond generate: %s\n", e.msg);
        return parsed < 0 ? 2 : 1; /* 1: the model's sampling.json is bad */
    }
    int rc = generate_load(&a, &r, &e);
    if (rc == 0 && generate_sample(&a, &r, &e)) rc = 1;
    if (rc) fprintf(stderr, "diamond generate: %s\n", e.msg);
    generate_run_free(&r);
    return rc;
}

/* === eval: diamond eval, diamond search-seeds === */

static const char *eval_usage =
    "usage: diamond eval --model DIR --detector DIR --csv FILE --out DIR --steps N -W W -H H\n"
    "                    [sampling options] [--json FILE] [--shard I/N] [--quiet]\n"
    "       diamond eval --merge --out DIR [--json FILE]\n"
    "\n"
    "eval runs each row of a `prompt,seed` or `embeddings,seed` CSV twice from the same noise\n"
    "(seed as generate --seed): plain (the baseline) and guided. Into --out go item_NNNNNN_baseline.png,\n"
    "item_NNNNNN_guided.png and item_NNNNNN.json (NNNNNN = the row's index, counting data rows\n"
    "from 0; each file written atomically, the JSON last). A row whose JSON is there already is\n"
    "not run again (resume) once its row, embeddings, seed and sampling settings match. The\n"
    "official metrics (gmum/DIAMOND metrics.py) come from the 8-bit images and the detector's\n"
    "map at 1/4 of its input, threshold 0.5: artifact frequency (% of images whose map max is at\n"
    "least 0.5), artifact pixel ratio (% of map values, averaged over images), MAE vs the\n"
    "baseline on the 0..255 scale, and MAE(A) / MAE(NA) inside / outside the baseline's mask\n"
    "(its map resized to the image, >= 0.5); an image without artifact pixels adds 0 to MAE(A).\n"
    "Each figure is the mean over images. A row that stops with an error (a NaN in its\n"
    "embeddings, say) gets an item file with \"failed\": its reason and no figures; it is not\n"
    "scored, the others run on, the table and --json (\"failed\") count it, eval exits 1, and\n"
    "a resumed run tries it again.\n"
    "\n";

static const char *search_usage =
    "usage: diamond search-seeds --model DIR --detector DIR --csv IN --out OUT.csv --steps N\n"
    "                    -W W -H H [--start 4444] [--max-tries 1000] [--threshold 0.5]\n"
    "                    [sampling options] [--quiet]\n"
    "\n"
    "search-seeds is the official data set search: one seed counter, never reset, from --start;\n"
    "for each row of IN (a `prompt` or `embeddings` column) it tries consecutive seeds, at most\n"
    "--max-tries, and keeps the first whose plain image has a detector max (over the mask\n"
    "resized to the image, as upstream's max_confidence) >= --threshold. OUT gets `prompt,seed`\n"
    "or `embeddings,seed` (rewritten atomically after each row; paths as in IN when OUT is in\n"
    "IN's directory, else absolute); rows with no hit are reported on stderr and left out.\n"
    "\n";

#define EVAL_THRESHOLD 0.5

/* The options of eval and search-seeds. The model and sampling options are generate's. */
typedef struct EvalArgs {
    GenerateArgs gen;
    const char *csv, *out, *json;
    int shard, shards;
    bool merge, search, sampling; /* sampling: a model or sampling option was given */
    uint64_t start;
    int max_tries;
    float threshold;
} EvalArgs;

/* --- eval: options --- */

/* "I/N" with 0 <= I < N. */
static int eval_parse_shard(const char *s, int *shard, int *shards) {
    char *slash = strchr(s, '/');
    char part[32];
    if (!slash || (size_t)(slash - s) >= sizeof part) return -1;
    snprintf(part, sizeof part, "%.*s", (int)(slash - s), s);
    if (parse_int(part, 0, 1 << 20, shard) || parse_int(slash + 1, 1, 1 << 20, shards))
        return -1;
    return *shard < *shards ? 0 : -1;
}

static int option_shard(const char *value, void *field, Error *e) {
    EvalArgs *a = field;
    if (eval_parse_shard(value, &a->shard, &a->shards))
        return error_set(e, "--shard: expected I/N with 0 <= I < N, got '%s'", value);
    return 0;
}

/* --prompt and --embeddings, which the CSV gives instead (left out of the help). */
static int option_from_csv(const char *value, void *field, Error *e) {
    (void)field;
    return error_set(e, "--prompt or --embeddings '%s': the prompts come from the CSV's `prompt` "
                        "or `embeddings` column", value);
}

#define EVAL_FIELD(f) offsetof(EvalArgs, f)
#define EVAL_CSV_HELP                                                                              \
    "header `prompt,seed` (prompts through DIR's prompt encoder, as\n"                             \
    "generate --prompt; eval keeps each distinct prompt's embeddings\n"                            \
    "in --out as prompt-HASH.safetensors and reads them on resume) or\n"                           \
    "`embeddings,seed` (paths relative to the CSV's directory; with both\n"                        \
    "columns the embeddings are used); other columns are ignored, quoted\n"                        \
    "fields may hold commas"

static const Option eval_options[] = {
    {.name = "--csv", .value = "FILE", .kind = OPTION_TEXT, .offset = EVAL_FIELD(csv),
     .help = EVAL_CSV_HELP},
    {.name = "--out", .value = "DIR", .kind = OPTION_TEXT, .offset = EVAL_FIELD(out),
     .help = "the results directory (made when absent)"},
    {.name = "--json", .value = "FILE", .kind = OPTION_TEXT, .offset = EVAL_FIELD(json),
     .help = "the overall figures: {\"n\", \"failed\", \"baseline\": {\"artifact_freq\",\n"
             "\"pixel_ratio\"}, \"guided\": {...}, \"mae\", \"mae_a\", \"mae_na\"}; for\n"
             "prompts in the embedded words world (64x32 images) also the oracle's\n"
             "\"oracle_artifact_freq\" (% with an illegible glyph) and\n"
             "\"oracle_read_acc\" (% reading as the prompt) in baseline and guided"},
    {.name = "--shard", .value = "I/N", .kind = OPTION_PARSE, .parse = option_shard,
     .help = "only rows whose index % N == I (several processes or machines); a\n"
             "shard without rows is an error"},
    {.name = "--merge", .kind = OPTION_FLAG, .offset = EVAL_FIELD(merge),
     .help = "the table and --json over every item_*.json in --out, by row index;\n"
             "rows without an item (holes, or past the last up to the CSV's row\n"
             "count the items record) are named in a warning"},
    {.name = "--quiet", .kind = OPTION_FLAG, .offset = EVAL_FIELD(gen.quiet),
     .help = "no progress on stderr"},
    {.name = "--prompt", .value = "TEXT", .kind = OPTION_PARSE, .parse = option_from_csv},
    {.name = "--embeddings", .value = "FILE", .kind = OPTION_PARSE, .parse = option_from_csv},
};

static const Option search_options[] = {
    {.name = "--csv", .value = "IN", .kind = OPTION_TEXT, .offset = EVAL_FIELD(csv),
     .help = "a `prompt` or `embeddings` column (as eval's --csv; seeds ignored)"},
    {.name = "--out", .value = "OUT.csv", .kind = OPTION_TEXT, .offset = EVAL_FIELD(out),
     .help = "the rows with the seed found for each"},
    {.name = "--start", .value = "S", .kind = OPTION_PARSE, .offset = EVAL_FIELD(start),
     .parse = option_seed, .fallback = "4444",
     .help = "the first seed tried, as official"},
    {.name = "--max-tries", .value = "N", .kind = OPTION_INT, .offset = EVAL_FIELD(max_tries),
     .min = 1, .max = 1 << 30, .fallback = "1000",
     .help = "seeds tried per row at most"},
    {.name = "--threshold", .value = "T", .kind = OPTION_FLOAT,
     .offset = EVAL_FIELD(threshold), .max = 1, .fallback = TEXT_OF(EVAL_THRESHOLD),
     .help = "the detector max a plain image must reach"},
    {.name = "--quiet", .kind = OPTION_FLAG, .offset = EVAL_FIELD(gen.quiet),
     .help = "no progress on stderr"},
    {.name = "--prompt", .value = "TEXT", .kind = OPTION_PARSE, .parse = option_from_csv},
    {.name = "--embeddings", .value = "FILE", .kind = OPTION_PARSE, .parse = option_from_csv},
};

/* The option sets of eval (search false) or search-seeds over a (NULL: for the help). */
static void eval_option_sets(bool search, EvalArgs *a, OptionSet sets[2]) {
    sets[0] = search ? (OptionSet){search_options, COUNT(search_options), a, false}
                     : (OptionSet){eval_options, COUNT(eval_options), a, false};
    sets[1] = (OptionSet){sampling_options, COUNT(sampling_options), a ? &a->gen : NULL, false};
}

/* --help of eval or search-seeds. */
static void eval_help(bool search) {
    OptionSet sets[2];
    eval_option_sets(search, NULL, sets);
    command_help(search ? search_usage : eval_usage, sets, 2);
}

/* The command line of eval or search-seeds into a, after the model's own defaults; 0, or -1 for
 * a usage error, 1 for a bad sampling.json, the message in e. */
static int eval_parse(int argc, char **argv, bool search, EvalArgs *a, Error *e) {
    *a = (EvalArgs){.search = search, .shards = 1, .threshold = EVAL_THRESHOLD};
    OptionSet sets[2];
    eval_option_sets(search, a, sets);
    if (generate_defaults(&a->gen, e) || options_defaults(sets, 1, e)) return -1;
    const char *command = search ? "search-seeds" : "eval";
    if (model_defaults(sets, 2, argc, argv, command, e)) return 1;
    if (options_parse(sets, 2, argc, argv, command, e)) return -1;
    a->sampling = sets[1].used;
    const GenerateArgs *g = &a->gen;
    if (a->merge) {
        if (a->sampling || a->csv || a->shards > 1)
            return error_set(e, "--merge takes only --out DIR and --json FILE");
        return a->out ? 0 : error_set(e, "missing --out DIR");
    }
    const char *missing = !a->csv ? "--csv FILE" : !a->out ? "--out" : !g->model ? "--model DIR"
                        : !g->detector ? "--detector DIR" : !g->steps ? "--steps N"
                        : !g->width ? "-W W" : !g->height ? "-H H" : NULL;
    if (missing) return error_set(e, "missing %s (see diamond %s --help)", missing,
                                  search ? "search-seeds" : "eval");
    if (generate_check_negative(g, e)) return -1;
    a->gen.opt.steps = g->steps;
    a->gen.precision = precision_to_run(g->precision, command);
    return 0;
}

/* --- eval: item files --- */

/* One evaluated row as its item file holds it. */
typedef struct EvalItem {
    int64_t row;
    int64_t rows; /* the CSV's data rows when it was written (0: an item file without them) */
    uint64_t seed;
    ImageMetrics m;
    bool failed; /* the row stopped with an error (its reason in the item file): not scored */
} EvalItem;

/* s as a JSON string. */
static void eval_json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
}

/* Text made by write(f, ctx) on a memory stream, written atomically to path. */
static int eval_write_text(const char *path, void (*write)(FILE *, const void *),
                           const void *ctx, Error *e) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return error_set(e, "%s: out of memory", path);
    write(f, ctx);
    int rc = fclose(f) ? error_set(e, "%s: out of memory", path)
                       : write_file_atomic(path, text, len, e);
    free(text);
    return rc;
}

typedef struct EvalItemFile {
    const EvalItem *item;
    const EvalRow *row;
    bool prompt; /* the row's input is a prompt, not an embeddings path */
    const char *settings;
    const char *failure; /* a failed item's reason, else NULL */
} EvalItemFile;

static void eval_item_write(FILE *f, const void *ctx) {
    const EvalItemFile *x = ctx;
    const ImageMetrics *m = &x->item->m;
    long long row = (long long)x->item->row;
    fprintf(f, "{\"row\": %lld, \"rows\": %lld, \"%s\": ", row, (long long)x->item->rows,
            x->prompt ? "prompt" : "embeddings");
    eval_json_string(f, x->row->input);
    fprintf(f, ", \"seed\": %llu, \"settings\": ", (unsigned long long)x->item->seed);
    eval_json_string(f, x->settings);
    if (x->failure) {
        fprintf(f, ",\n \"failed\": ");
        eval_json_string(f, x->failure);
        fprintf(f, "}\n");
        return;
    }
    fprintf(f, ",\n \"baseline\": {\"image\": \"item_%06lld_baseline.png\", \"max\": %.9g, "
               "\"artifact\": %s, \"pixel_ratio\": %.17g},\n", row, m->baseline_max,
            m->baseline_artifact ? "true" : "false", m->baseline_pixel_ratio);
    fprintf(f, " \"guided\": {\"image\": \"item_%06lld_guided.png\", \"max\": %.9g, "
               "\"artifact\": %s, \"pixel_ratio\": %.17g},\n", row, m->guided_max,
            m->guided_artifact ? "true" : "false", m->guided_pixel_ratio);
    fprintf(f, " \"mae\": %.17g, \"mae_a\": %.17g, \"mae_na\": %.17g, \"artifact_pixels\": %lld",
            m->mae, m->mae_a, m->mae_na, (long long)m->artifact_pixels);
    if (m->oracle)
        fprintf(f, ",\n \"oracle\": {\"baseline_legible\": %s, \"baseline_reads\": %s, "
                   "\"guided_legible\": %s, \"guided_reads\": %s,\n  \"baseline_glyphs\": "
                   "[%d, %d, %d], \"guided_glyphs\": [%d, %d, %d]}",
                m->baseline_legible ? "true" : "false", m->baseline_reads ? "true" : "false",
                m->guided_legible ? "true" : "false", m->guided_reads ? "true" : "false",
                m->glyphs[0].n, m->glyphs[0].legible, m->glyphs[0].right, m->glyphs[1].n,
                m->glyphs[1].legible, m->glyphs[1].right);
    fprintf(f, "}\n");
}

/* "<side>_glyphs": [n, legible, right] of an item file's oracle object o. */
static int eval_item_glyphs(const JsonValue *o, const char *key, GlyphCounts *g, Error *e) {
    int64_t v[3];
    size_t n = 0;
    if (json_get_int_array(o, key, v, 3, &n, e)) return -1;
    if (n != 3 || v[0] < 0 || v[0] > ORACLE_MAX_GLYPHS || v[1] < 0 || v[1] > v[0] || v[2] < 0 ||
        v[2] > v[1])
        return error_set(e, "%s: key '%s' is not [glyphs, legible, right] with right <= legible "
                         "<= glyphs <= %d", o->source, key, ORACLE_MAX_GLYPHS);
    *g = (GlyphCounts){(int)v[0], (int)v[1], (int)v[2]};
    return 0;
}

/* The oracle's verdicts of an item file, when it has them. */
static int eval_item_oracle(const JsonValue *root, ImageMetrics *m, Error *e) {
    const JsonValue *o = json_get(root, "oracle");
    m->oracle = false;
    if (!o) return 0;
    if (o->type != JSON_OBJECT) return error_set(e, "%s: key 'oracle' is not an object", root->source);
    m->oracle = true;
    return json_get_bool(o, "baseline_legible", &m->baseline_legible, e) ||
                   json_get_bool(o, "baseline_reads", &m->baseline_reads, e) ||
                   json_get_bool(o, "guided_legible", &m->guided_legible, e) ||
                   json_get_bool(o, "guided_reads", &m->guided_reads, e) ||
                   eval_item_glyphs(o, "baseline_glyphs", &m->glyphs[0], e) ||
                   eval_item_glyphs(o, "guided_glyphs", &m->glyphs[1], e)
               ? -1
               : 0;
}

/* One run's figures ("baseline" or "guided") of an item file. */
static int eval_item_side(const JsonValue *root, const char *side, float *max, bool *artifact,
                          double *ratio, Error *e) {
    const JsonValue *o = json_get(root, side);
    double v;
    if (!o || o->type != JSON_OBJECT)
        return error_set(e, "%s: key '%s' is missing or not an object", root->source, side);
    if (json_get_float(o, "max", &v, e) || json_get_bool(o, "artifact", artifact, e) ||
        json_get_float(o, "pixel_ratio", ratio, e))
        return -1;
    *max = (float)v;
    return 0;
}

/* An item file into it; *input (its prompt or embeddings) and *settings point into *doc
 * (json_free it). */
/* The figures of a scored item file r into m. */
static int eval_item_metrics(const JsonValue *r, ImageMetrics *m, Error *e) {
    int64_t pixels;
    if (eval_item_side(r, "baseline", &m->baseline_max, &m->baseline_artifact,
                       &m->baseline_pixel_ratio, e) ||
        eval_item_side(r, "guided", &m->guided_max, &m->guided_artifact, &m->guided_pixel_ratio,
                       e) ||
        json_get_float(r, "mae", &m->mae, e) || json_get_float(r, "mae_a", &m->mae_a, e) ||
        json_get_float(r, "mae_na", &m->mae_na, e) ||
        json_get_int(r, "artifact_pixels", &pixels, e) || eval_item_oracle(r, m, e))
        return -1;
    m->artifact_pixels = pixels;
    return 0;
}

/* An item file into it (a failed one has no figures); *input and *settings point into *doc. */
static int eval_item_read(const char *path, EvalItem *it, const char **input,
                          const char **settings, JsonDoc **doc, Error *e) {
    int64_t row, seed, rows = 0;
    if (json_parse_file(doc, path, e)) return -1;
    const JsonValue *r = json_root(*doc);
    *it = (EvalItem){.failed = json_get(r, "failed") != NULL};
    if (json_get_int(r, "row", &row, e) || json_get_int(r, "seed", &seed, e) ||
        json_get_string(r, json_get(r, "prompt") ? "prompt" : "embeddings", input, e) ||
        json_get_string(r, "settings", settings, e) ||
        (json_get(r, "rows") && json_get_int(r, "rows", &rows, e)) ||
        (!it->failed && eval_item_metrics(r, &it->m, e)))
        return -1;
    if (row < 0 || seed < 0 || rows < 0) return error_set(e, "%s: negative row or seed", path);
    it->row = row;
    it->rows = rows;
    it->seed = (uint64_t)seed;
    return 0;
}

/* OUT/item_ROW{suffix}; suffix is one of the short constants below. */
static int eval_item_path(const EvalArgs *a, int64_t row, const char *suffix, char *path,
                          size_t len, Error *e) {
    char file[64];
    snprintf(file, sizeof file, "item_%06lld%s", (long long)row, suffix);
    return path_join(path, len, a->out, file, e);
}

/* 1 when row has no item file yet; 0 when it has one for the same row, input, seed and
 * settings (read into it); -1 for another item or a broken file. */
static int eval_item_done(const EvalArgs *a, const EvalRow *row, const char *settings,
                          EvalItem *it, Error *e) {
    char path[PATH_BYTES];
    if (eval_item_path(a, row->index, ".json", path, sizeof path, e)) return -1;
    if (access(path, F_OK) != 0) return 1;
    JsonDoc *doc = NULL;
    const char *input, *set;
    int rc = eval_item_read(path, it, &input, &set, &doc, e);
    if (rc == 0 && (it->row != row->index || it->seed != row->seed || strcmp(input, row->input)))
        rc = error_set(e, "%s: made for row %lld (%s, seed %llu), but row %lld is %s, seed %llu: "
                          "use another --out", path, (long long)it->row, input,
                       (unsigned long long)it->seed, (long long)row->index, row->input,
                       (unsigned long long)row->seed);
    else if (rc == 0 && strcmp(set, settings))
        rc = error_set(e, "%s: made with other settings (%s; now %s): use another --out", path,
                       set, settings);
    json_free(doc);
    return rc == 0 && it->failed ? 1 : rc; /* a failed row runs again */
}

/* --- eval: running the rows --- */

/* <dir>/prompt-<FNV-1a of the prompt>.safetensors: where eval keeps a prompt's embeddings. */
static int eval_prompt_path(const char *dir, const char *prompt, char *path, size_t size,
                            Error *e) {
    uint64_t h = 14695981039346656037u;
    for (const char *s = prompt; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211u;
    char name[64];
    snprintf(name, sizeof name, "prompt-%016llx.safetensors", (unsigned long long)h);
    return path_join(path, size, dir, name, e);
}

/* Whether the safetensors file at path holds U8 "prompt" equal to prompt. */
static bool eval_prompt_cached(const char *path, const char *prompt) {
    SafeTensors *st;
    if (access(path, F_OK) != 0 || st_open(&st, path, NULL)) return false;
    const StTensor *t = st_find(st, "prompt");
    bool same = t && t->dtype == DTYPE_U8 && t->ndim == 1 && (size_t)t->numel == strlen(prompt) &&
                !memcmp(t->data, prompt, (size_t)t->numel);
    st_close(st);
    return same;
}

/* prompt's embeddings [1, L, D] into *out: read from cache_dir when it holds them, else encoded
 * by a->gen.model's prompt encoder (and, with cache_dir, kept there for a resumed run). */
static int eval_prompt_embeds(const EvalArgs *a, const char *cache_dir, const char *prompt,
                              int joint_dim, Tensor **out, Error *e) {
    char path[PATH_BYTES];
    if (cache_dir && eval_prompt_path(cache_dir, prompt, path, sizeof path, e)) return -1;
    if (cache_dir && eval_prompt_cached(path, prompt))
        return generate_read(path, "prompt_embeds", -1, joint_dim, out, e);
    PromptTokens tok = {0};
    int rc = encode_prompts(a->gen.model, generate_source(&a->gen), a->gen.precision, &prompt, 1,
                            0, joint_dim, out, &tok, e) ||
             (cache_dir && write_prompt_embeds(path, *out, &tok, 0, prompt, e));
    prompt_tokens_free(&tok);
    return rc ? -1 : 0;
}

/* r->latent, r->txt (and with --cfg r->negative) for one row at seed: the seed's noise and the
 * row's prompt embeddings (eval_prompt_embeds; kept from the row before when it had the same
 * prompt, as search-seeds' tries of one row have) or prompt_embeds file, batch 1. */
static int eval_row_inputs(const EvalArgs *a, GenerateRun *r, const EvalRow *row, uint64_t seed,
                           const char *cache_dir, Error *e) {
    GenerateArgs g = a->gen;
    g.embeddings = row->path;
    g.seeds[0] = seed;
    g.n_seeds = 1;
    bool cfg = g.opt.cfg_scale > 1.0f;
    if (row->path && cfg)
        return error_set(e, "%s: --cfg needs prompts (the negative one goes through the text "
                            "encoder), not embeddings", row->path);
    tensor_free(r->latent);
    r->latent = NULL;
    bool same = !row->path && r->txt_prompt && !strcmp(r->txt_prompt, row->input);
    if (generate_seed_noise(&g, r, e)) return -1;
    if (same) return 0;
    tensor_free(r->txt);
    tensor_free(r->negative);
    free(r->txt_prompt);
    r->txt = r->negative = NULL;
    r->txt_prompt = NULL;
    if (row->path)
        return generate_embeddings(&g, r, 1, e) || generate_check_memory(&g, r, false, e);
    const char *negative = g.negative ? g.negative : "";
    int D = flux2_config(r->flow)->joint_attention_dim;
    if (eval_prompt_embeds(a, cache_dir, row->input, D, &r->txt, e) ||
        (cfg && eval_prompt_embeds(a, cache_dir, negative, D, &r->negative, e)))
        return -1;
    r->txt_prompt = strdup(row->input);
    if (!r->txt_prompt) return error_set(e, "out of memory");
    return generate_check_memory(&g, r, false, e);
}

/* The final latent's 8-bit image, as the PNG will hold it. */
static int eval_image(const GenerateRun *r, Tensor *latent, Image *img, Error *e) {
    Tensor *image = NULL;
    int rc = generate_decode(r, latent, &image, e) ||
             image_alloc(img, (int)image->shape[3], (int)image->shape[2], e);
    if (rc == 0) generate_to_rgb(image, 0, img);
    tensor_free(image);
    return rc ? -1 : 0;
}

/* The detector's map at 1/4 of its input ([1, 1, h, w]) for an 8-bit image, read back as
 * upstream's metrics read the PNG (value / 255, here as 2 value / 255 - 1 in [-1, 1]). */
static int eval_detect(const GenerateRun *r, const Image *img, Tensor **map, Error *e) {
    int64_t plane = (int64_t)img->width * img->height;
    Tensor *x = TENSOR_NEW(1, 3, img->height, img->width);
    float max;
    if (!x) return error_set(e, "out of memory");
    for (int64_t p = 0; p < plane; p++)
        for (int c = 0; c < 3; c++) x->data[c * plane + p] = 2.0f * img->rgb[3 * p + c] / 255.0f - 1.0f;
    int rc = generate_detect(r, x, NULL, map, &max, e);
    tensor_free(x);
    if (rc == 0 && (*map)->shape[1] != 1)
        rc = error_set(e, "the detector has %lld labels; the metrics need 1",
                       (long long)(*map)->shape[1]);
    return rc;
}

/* One evaluated pair: the baseline and guided 8-bit images, the detector's maps at 1/4 of its
 * input ([1, 1, h, w]) and the metrics. */
typedef struct EvalPair {
    Image img[2];     /* baseline, guided */
    Tensor *maps[2];
    ImageMetrics m;
} EvalPair;

static void eval_pair_free(EvalPair *p) {
    for (int k = 0; k < 2; k++) image_free(&p->img[k]), tensor_free(p->maps[k]);
    *p = (EvalPair){0};
}

/* Baseline and guided run of row with seed; the oracle too for world-sized prompt rows. */
static int eval_pair(const EvalArgs *a, GenerateRun *r, const EvalRow *row, uint64_t seed,
                     EvalPair *p, Error *e) {
    SamplerOptions plain = a->gen.opt;
    plain.guide = false;
    Tensor *baseline = NULL;
    *p = (EvalPair){0};
    int rc = eval_row_inputs(a, r, row, seed, a->out, e) || !(baseline = tensor_clone(r->latent)) ||
             sampler_run(r->flow, r->vae, NULL, &plain, r->txt, r->negative, baseline, r->grid_h,
                         r->grid_w, NULL, NULL, e) ||
             sampler_run(r->flow, r->vae, r->detector, &a->gen.opt, r->txt, r->negative, r->latent,
                         r->grid_h, r->grid_w, NULL, NULL, e) ||
             eval_image(r, baseline, &p->img[0], e) || eval_image(r, r->latent, &p->img[1], e) ||
             eval_detect(r, &p->img[0], &p->maps[0], e) ||
             eval_detect(r, &p->img[1], &p->maps[1], e);
    if (rc && !e->msg[0]) error_set(e, "out of memory");
    if (rc == 0)
        rc = metrics_image(p->img[0].rgb, p->img[1].rgb, p->img[0].height, p->img[0].width,
                           p->maps[0]->data, p->maps[1]->data, (int)p->maps[0]->shape[2],
                           (int)p->maps[0]->shape[3], EVAL_THRESHOLD, &p->m, e);
    bool world = p->img[0].width == WORLD_W && p->img[0].height == WORLD_H;
    if (rc == 0 && !row->path && world)
        rc = metrics_oracle(p->img[0].rgb, p->img[1].rgb, WORLD_H, WORLD_W, row->input, &p->m, e);
    tensor_free(baseline);
    if (rc) eval_pair_free(p);
    return rc ? -1 : 0;
}

/* One row: its pair, both PNGs, then the item file; the metrics into it. */
static int eval_row(const EvalArgs *a, GenerateRun *r, const EvalRow *row, int64_t rows,
                    const char *settings, EvalItem *it, Error *e) {
    EvalPair p;
    char path[2][PATH_BYTES];
    *it = (EvalItem){.row = row->index, .rows = rows, .seed = row->seed};
    if (eval_item_path(a, row->index, "_baseline.png", path[0], sizeof path[0], e) ||
        eval_item_path(a, row->index, "_guided.png", path[1], sizeof path[1], e) ||
        eval_pair(a, r, row, row->seed, &p, e))
        return -1;
    it->m = p.m;
    int rc = png_write(path[0], &p.img[0], e) || png_write(path[1], &p.img[1], e);
    if (rc == 0) {
        EvalItemFile file = {.item = it, .row = row, .prompt = !row->path, .settings = settings};
        rc = eval_item_path(a, row->index, ".json", path[0], sizeof path[0], e) ||
             eval_write_text(path[0], eval_item_write, &file, e);
    }
    eval_pair_free(&p);
    return rc ? -1 : 0;
}

/* A row that stopped with the error in e: its item file says so (and why), with no figures,
 * and the run goes on. 0, or -1 when even that file cannot be written. */
static int eval_row_failed(const EvalArgs *a, const EvalRow *row, int64_t rows,
                           const char *settings, EvalItem *it, Error *e) {
    char path[PATH_BYTES], reason[sizeof e->msg];
    snprintf(reason, sizeof reason, "%s", e->msg);
    *it = (EvalItem){.row = row->index, .rows = rows, .seed = row->seed, .failed = true};
    EvalItemFile file = {.item = it, .row = row, .prompt = !row->path, .settings = settings,
                         .failure = reason};
    fprintf(stderr, "diamond eval: row %lld seed %llu failed: %s\n", (long long)row->index,
            (unsigned long long)row->seed, reason); /* an error, said even with --quiet */
    return eval_item_path(a, row->index, ".json", path, sizeof path, e) ||
                   eval_write_text(path, eval_item_write, &file, e)
               ? -1
               : 0;
}

/* --- eval: the table --- */

/* One run's figures in the --json file. */
static void eval_summary_side(FILE *f, const EvalSummary *s, bool guided) {
    fprintf(f, "{\"artifact_freq\": %.17g, \"pixel_ratio\": %.17g",
            guided ? s->guided_artifact_freq : s->baseline_artifact_freq,
            guided ? s->guided_pixel_ratio : s->baseline_pixel_ratio);
    int k = guided;
    if (s->oracle_n)
        fprintf(f, ", \"oracle_artifact_freq\": %.17g, \"oracle_read_acc\": %.17g,\n  "
                   "\"glyph_images\": %lld, \"glyphs\": %lld, \"glyph_legible\": %.17g, "
                   "\"glyph_right\": %.17g",
                guided ? s->guided_oracle_artifact_freq : s->baseline_oracle_artifact_freq,
                guided ? s->guided_oracle_read_acc : s->baseline_oracle_read_acc,
                (long long)s->glyph_images[k], (long long)s->glyph_n[k], s->glyph_legible[k],
                s->glyph_right[k]);
    fprintf(f, "}");
}

/* The --json file's figures: the summary of the scored items, and how many failed. */
typedef struct EvalReport {
    EvalSummary s;
    int64_t failed;
} EvalReport;

static void eval_summary_write(FILE *f, const void *ctx) {
    const EvalReport *report = ctx;
    const EvalSummary *s = &report->s;
    fprintf(f, "{\"n\": %lld, \"failed\": %lld,\n \"baseline\": ", (long long)s->n,
            (long long)report->failed);
    eval_summary_side(f, s, false);
    fprintf(f, ",\n \"guided\": ");
    eval_summary_side(f, s, true);
    fprintf(f, ",\n \"mae\": %.17g, \"mae_a\": %.17g, \"mae_na\": %.17g", s->mae, s->mae_a,
            s->mae_na);
    if (s->oracle_n) fprintf(f, ", \"oracle_n\": %lld", (long long)s->oracle_n);
    fprintf(f, "}\n");
}

/* Per image and overall on stdout, --json when asked; failed items are counted, not scored (an
 * error once the report is out). items are in row order. */
static int eval_report(const EvalArgs *a, const EvalItem *items, size_t n, Error *e) {
    ImageMetrics *m = malloc((n ? n : 1) * sizeof *m);
    if (!m) return error_set(e, "out of memory");
    EvalReport report = {0};
    size_t scored = 0;
    printf("%6s %20s %9s %9s %10s %10s %8s %8s %8s\n", "row", "seed", "max base", "max guid",
           "ratio% b", "ratio% g", "MAE", "MAE(A)", "MAE(NA)");
    for (size_t i = 0; i < n; i++) {
        const ImageMetrics *x = &items[i].m;
        if (items[i].failed) {
            printf("%6lld %20llu failed (the reason is in its item file)\n",
                   (long long)items[i].row, (unsigned long long)items[i].seed);
            report.failed++;
            continue;
        }
        m[scored++] = *x;
        printf("%6lld %20llu %9.4f %9.4f %10.4f %10.4f %8.3f %8.3f %8.3f\n",
               (long long)items[i].row, (unsigned long long)items[i].seed, x->baseline_max,
               x->guided_max, 100.0 * x->baseline_pixel_ratio, 100.0 * x->guided_pixel_ratio,
               x->mae, x->mae_a, x->mae_na);
    }
    EvalSummary *s = &report.s;
    metrics_summarize(m, scored, s);
    free(m);
    printf("\noverall, %lld images        baseline     guided\n", (long long)s->n);
    printf("artifact frequency %%   %10.2f %10.2f\n", s->baseline_artifact_freq,
           s->guided_artifact_freq);
    printf("artifact pixel ratio %% %10.4f %10.4f\n", s->baseline_pixel_ratio,
           s->guided_pixel_ratio);
    printf("MAE                               %10.3f\n", s->mae);
    printf("MAE(A)                            %10.3f\n", s->mae_a);
    printf("MAE(NA)                           %10.3f\n", s->mae_na);
    if (s->oracle_n) {
        printf("oracle, %lld images\n", (long long)s->oracle_n);
        printf("artifact frequency %%   %10.2f %10.2f\n", s->baseline_oracle_artifact_freq,
               s->guided_oracle_artifact_freq);
        printf("read accuracy %%        %10.2f %10.2f\n", s->baseline_oracle_read_acc,
               s->guided_oracle_read_acc);
        printf("per glyph, over images with the prompt's glyph count (%lld and %lld images, "
               "%lld and %lld glyphs)\n", (long long)s->glyph_images[0],
               (long long)s->glyph_images[1], (long long)s->glyph_n[0], (long long)s->glyph_n[1]);
        printf("legible %%              %10.2f %10.2f\n", s->glyph_legible[0], s->glyph_legible[1]);
        printf("the prompt's symbol %%  %10.2f %10.2f\n", s->glyph_right[0], s->glyph_right[1]);
    }
    if (report.failed) printf("failed rows: %lld, not scored\n", (long long)report.failed);
    if (a->json && eval_write_text(a->json, eval_summary_write, &report, e)) return -1;
    if (report.failed)
        return error_set(e, "%lld of %zu rows failed, not scored (their item files say why; a "
                            "run resumed in the same --out tries them again)",
                         (long long)report.failed, n);
    return 0;
}

/* Every row of this shard, run or (already done) read back, then the report. */
static int eval_run(const EvalArgs *a, const EvalCsv *csv, Error *e) {
    GenerateRun r = {0};
    char settings[1024];
    generate_settings(&a->gen, settings, sizeof settings);
    size_t n = 0, mine = 0;
    for (size_t i = 0; i < csv->n; i++) mine += (int64_t)i % a->shards == a->shard;
    if (mine == 0) { /* a command-line mistake: no figures to make up, no --out to make */
        error_set(e, "--shard %d/%d: none of the %zu rows of %s has an index %% %d == %d: "
                     "nothing to run", a->shard, a->shards, csv->n, a->csv, a->shards, a->shard);
        return 2;
    }
    EvalItem *items = malloc(csv->n * sizeof *items);
    int rc = items ? dir_make(a->out, e) : error_set(e, "out of memory");
    for (size_t i = 0; i < csv->n; i++) {
        if (rc) break;
        const EvalRow *row = &csv->rows[i];
        if (row->index % a->shards != a->shard) continue;
        int todo = eval_item_done(a, row, settings, &items[n], e);
        double t0 = now_seconds();
        if (todo == 1 && !r.flow && (rc = generate_load_models(&a->gen, &r, e))) break;
        if (todo == 1 && eval_row(a, &r, row, (int64_t)csv->n, settings, &items[n], e) &&
            eval_row_failed(a, row, (int64_t)csv->n, settings, &items[n], e))
            todo = -1;
        if (todo < 0) {
            rc = 1;
        } else if (!a->gen.quiet && !items[n].failed) {
            char took[32] = "done before";
            if (todo) snprintf(took, sizeof took, "%.1f s", now_seconds() - t0);
            fprintf(stderr, "[%zu/%zu] row %lld seed %llu: detector max %.4f -> %.4f, MAE %.3f "
                    "(%s)\n", n + 1, mine, (long long)row->index, (unsigned long long)row->seed,
                    items[n].m.baseline_max, items[n].m.guided_max, items[n].m.mae, took);
        }
        n++;
    }
    if (rc == 0) rc = eval_report(a, items, n, e);
    free(items);
    generate_run_free(&r);
    return rc == 2 ? 2 : rc ? 1 : 0; /* 2: a size the model cannot make */
}

/* --- eval: --merge --- */

static int eval_item_compare(const void *x, const void *y) {
    int64_t a = ((const EvalItem *)x)->row, b = ((const EvalItem *)y)->row;
    return (a > b) - (a < b);
}

/* True for "item_<digits>.json". */
static bool eval_is_item_name(const char *name) {
    size_t n = strlen(name);
    if (n <= 10 || strncmp(name, "item_", 5) || strcmp(name + n - 5, ".json")) return false;
    for (size_t k = 5; k < n - 5; k++)
        if (name[k] < '0' || name[k] > '9') return false;
    return true;
}

/* Warns on stderr, naming the first few, of the rows without an item among n sorted ones: holes,
 * and rows past the last item up to the CSV's row count the items recorded. */
static void eval_merge_missing(const EvalItem *items, size_t n) {
    int64_t rows = items[n - 1].row + 1, shown = 0, missing = 0;
    for (size_t i = 0; i < n; i++)
        if (items[i].rows > rows) rows = items[i].rows;
    char list[256] = "";
    size_t len = 0, at = 0;
    for (int64_t row = 0; row < rows; row++) {
        if (at < n && items[at].row == row) {
            at++;
            continue;
        }
        missing++;
        if (shown++ < 8 && len < sizeof list)
            len += (size_t)snprintf(list + len, sizeof list - len, "%s%lld", shown > 1 ? ", " : "",
                                    (long long)row);
    }
    if (missing > 0)
        fprintf(stderr, "diamond eval --merge: warning: %lld of %lld rows have no item file (rows "
                        "%s%s): the figures cover %zu rows\n", (long long)missing, (long long)rows,
                list, missing > 8 ? ", ..." : "", n);
}

/* Every item file of --out, in row order: all made with the same settings, no row twice. */
static int eval_merge(const EvalArgs *a, Error *e) {
    char **names, first[1024] = "", path[PATH_BYTES];
    size_t count, n = 0;
    if (dir_list(a->out, &names, &count, e)) return 1;
    EvalItem *items = malloc((count ? count : 1) * sizeof *items);
    int rc = items ? 0 : error_set(e, "out of memory");
    for (size_t i = 0; i < count; i++) {
        if (rc) break;
        if (!eval_is_item_name(names[i])) continue;
        JsonDoc *doc = NULL;
        const char *emb, *settings;
        rc = path_join(path, sizeof path, a->out, names[i], e) ||
                     eval_item_read(path, &items[n], &emb, &settings, &doc, e)
                 ? -1
                 : 0;
        if (rc == 0 && n == 0) snprintf(first, sizeof first, "%s", settings);
        else if (rc == 0 && strcmp(first, settings))
            rc = error_set(e, "%s: made with other settings than the first item (%s; first %s)",
                           path, settings, first);
        n += rc == 0;
        json_free(doc);
    }
    dir_list_free(names, count);
    if (rc == 0 && n == 0) rc = error_set(e, "%s: no item_*.json files", a->out);
    if (rc == 0) qsort(items, n, sizeof *items, eval_item_compare);
    for (size_t i = 1; i < n; i++) {
        if (rc) break;
        if (items[i].row == items[i - 1].row)
            rc = error_set(e, "%s: two item files for row %lld", a->out, (long long)items[i].row);
    }
    if (rc == 0) eval_merge_missing(items, n);
    if (rc == 0) rc = eval_report(a, items, n, e);
    free(items);
    return rc ? 1 : 0;
}

/* diamond eval ...: 0 on success, 2 for a bad command line, 1 for anything else. */
static int eval_main(int argc, char **argv) {
    if (asks_for_help(argc, argv)) {
        eval_help(false);
        return 0;
    }
    EvalArgs a;
    Error e = {{0}};
    EvalCsv csv = {0};
    int rc = eval_parse(argc, argv, false, &a, &e);
    rc = rc < 0 ? 2 : rc; /* 1: the model's sampling.json is bad */
    if (rc == 0 && a.merge) rc = eval_merge(&a, &e);
    else if (rc == 0) rc = eval_csv_read(a.csv, true, &csv, &e) ? 1 : eval_run(&a, &csv, &e);
    if (rc) fprintf(stderr, "diamond eval: %s\n", e.msg);
    eval_csv_free(&csv);
    return rc;
}

/* --- search-seeds --- */

/* The detector max of the plain image of one seed (upstream's max_confidence: the max of the
 * mask resized to the image, on the float image). */
static int search_try(const EvalArgs *a, GenerateRun *r, const EvalRow *row, uint64_t seed,
                      float *max, Error *e) {
    SamplerOptions plain = a->gen.opt;
    plain.guide = false;
    Tensor *image = NULL, *mask = NULL;
    float small_max;
    int rc = eval_row_inputs(a, r, row, seed, NULL, e) ||
             sampler_run(r->flow, r->vae, NULL, &plain, r->txt, r->negative, r->latent, r->grid_h,
                         r->grid_w, NULL, NULL, e) ||
             generate_decode(r, r->latent, &image, e) ||
             generate_detect(r, image, &mask, NULL, &small_max, e);
    if (rc == 0) *max = max_array((size_t)mask->numel, mask->data);
    tensor_free(image);
    tensor_free(mask);
    return rc ? -1 : 0;
}

/* A CSV field, quoted when it holds a comma, quote or line break. */
static void search_csv_field(FILE *f, const char *s) {
    if (!strpbrk(s, ",\"\r\n")) {
        fputs(s, f);
        return;
    }
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

typedef struct SearchHits {
    const EvalArgs *args;
    const EvalCsv *csv;
    const uint64_t *seeds;
    const bool *found;
    size_t done;
} SearchHits;

/* The row's input for OUT: a prompt as it is; an embeddings path as written in IN when both are
 * in one directory, else absolute. */
static void search_out_input(FILE *f, const SearchHits *h, const EvalRow *row) {
    if (!row->path) {
        search_csv_field(f, row->input);
        return;
    }
    const char *in = h->args->csv, *out = h->args->out;
    const char *a = strrchr(in, '/'), *b = strrchr(out, '/');
    size_t la = a ? (size_t)(a - in) : 0, lb = b ? (size_t)(b - out) : 0;
    bool same_dir = la == lb && !strncmp(in, out, la);
    char *real = row->input[0] == '/' || same_dir ? NULL : realpath(row->path, NULL);
    search_csv_field(f, real ? real : row->input[0] == '/' || same_dir ? row->input : row->path);
    free(real);
}

static void search_write(FILE *f, const void *ctx) {
    const SearchHits *h = ctx;
    fputs(h->csv->prompts ? "prompt,seed\n" : "embeddings,seed\n", f);
    for (size_t i = 0; i < h->done; i++) {
        if (!h->found[i]) continue;
        search_out_input(f, h, &h->csv->rows[i]);
        fprintf(f, ",%llu\n", (unsigned long long)h->seeds[i]);
    }
}

/* One seed counter over all rows, never reset; OUT rewritten after each row. */
static int search_run(const EvalArgs *a, const EvalCsv *csv, Error *e) {
    GenerateRun r = {0};
    uint64_t *seeds = calloc(csv->n, sizeof *seeds), next = a->start;
    bool *found = calloc(csv->n, sizeof *found);
    SearchHits hits = {.args = a, .csv = csv, .seeds = seeds, .found = found};
    uint64_t tries = (uint64_t)csv->n * (uint64_t)a->max_tries; /* the seeds it may use */
    int rc = a->start > (uint64_t)INT64_MAX - (tries - 1) /* past eval's seeds, 0..2^63-1 */
                 ? error_set(e, "--start %llu: %zu rows x %d tries could pass 2^63-1, the largest "
                                "seed eval reads", (unsigned long long)a->start, csv->n,
                             a->max_tries)
             : seeds && found ? generate_load_models(&a->gen, &r, e)
                              : error_set(e, "out of memory");
    size_t misses = 0;
    for (size_t i = 0; i < csv->n; i++) {
        if (rc) break;
        const EvalRow *row = &csv->rows[i];
        float max = 0.0f;
        uint64_t first = next;
        for (int t = 0; t < a->max_tries && !found[i]; t++) {
            if (rc) break;
            seeds[i] = next++;
            rc = search_try(a, &r, row, seeds[i], &max, e) ? 1 : 0;
            found[i] = rc == 0 && max >= a->threshold;
            if (rc == 0 && !a->gen.quiet)
                fprintf(stderr, "row %zu seed %llu: detector max %.4f%s\n", i,
                        (unsigned long long)seeds[i], max, found[i] ? " (kept)" : "");
        }
        if (rc == 0 && !found[i]) {
            misses++;
            fprintf(stderr, "diamond search-seeds: row %zu (%s): no detector max >= %g in seeds "
                            "%llu..%llu; left out\n", i, row->input, a->threshold,
                    (unsigned long long)first, (unsigned long long)(next - 1));
        }
        hits.done = i + 1;
        if (rc == 0 && eval_write_text(a->out, search_write, &hits, e)) rc = 1;
    }
    if (rc == 0 && !a->gen.quiet)
        fprintf(stderr, "wrote %s: %zu of %zu rows with a seed\n", a->out, csv->n - misses, csv->n);
    free(seeds);
    free(found);
    generate_run_free(&r);
    return rc == 2 ? 2 : rc ? 1 : 0; /* 2: a size the model cannot make */
}

/* diamond search-seeds ...: 0 on success, 2 for a bad command line, 1 for anything else. */
static int search_main(int argc, char **argv) {
    if (asks_for_help(argc, argv)) {
        eval_help(true);
        return 0;
    }
    EvalArgs a;
    Error e = {{0}};
    EvalCsv csv = {0};
    int rc = eval_parse(argc, argv, true, &a, &e);
    rc = rc < 0 ? 2 : rc; /* 1: the model's sampling.json is bad */
    if (rc == 0) rc = eval_csv_read(a.csv, false, &csv, &e) ? 1 : search_run(&a, &csv, &e);
    if (rc) fprintf(stderr, "diamond search-seeds: %s\n", e.msg);
    eval_csv_free(&csv);
    return rc;
}

/* === demo === */

static const char *demo_usage =
    "usage: diamond [demo] [--weights DIR] [-o FILE] [--pairs N] [--threads T] [--quiet]\n"
    "\n"
    "DIAMOND on the embedded models (weights/: a tiny FLUX.2 transformer, VAE and text encoder\n"
    "and a tiny SegFormer detector, all trained by diamond itself in the procedural words world).\n"
    "It draws words, searches noise seeds whose plain (baseline) image the detector flags, runs\n"
    "each such pair again with guidance, and writes one row per pair: baseline | DIAMOND | the\n"
    "detector's heat map of each, 4x enlarged; stdout gets the detector's maximum, what the\n"
    "independent oracle reads, and the MAE of each pair.\n"
    "\n";

/* Words come from world scenes of these seeds (never a training scene: training draws its
 * scenes from hashes of the step); noise seeds count up from DEMO_NOISE_SEED. */
#define DEMO_WORD_SEED 900000000u
#define DEMO_NOISE_SEED 900000000u
#define DEMO_WORDS 24
#define DEMO_TRIES 6
#define DEMO_MAX_PAIRS 16

typedef struct DemoArgs {
    const char *weights, *out;
    int pairs, threads;
    bool quiet;
    char beside[PATH_BYTES]; /* weights/ beside the binary, when that is where they are */
} DemoArgs;

static const Option demo_options[] = {
    {.name = "--weights", .value = "DIR", .kind = OPTION_TEXT,
     .offset = offsetof(DemoArgs, weights),
     .help = "the embedded models (default: weights, else weights/ beside the binary)"},
    {.name = "-o", .value = "FILE", .kind = OPTION_TEXT, .offset = offsetof(DemoArgs, out),
     .fallback = "diamond-demo.png", .help = "the picture (.png or .ppm)"},
    {.name = "--pairs", .value = "N", .kind = OPTION_INT, .offset = offsetof(DemoArgs, pairs),
     .min = 1, .max = DEMO_MAX_PAIRS, .fallback = "8",
     .help = "pairs to show, at most 16"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE,
     .offset = offsetof(DemoArgs, threads), .parse = option_threads,
     .help = "OpenMP threads"},
    {.name = "--quiet", .kind = OPTION_FLAG, .offset = offsetof(DemoArgs, quiet),
     .help = "no progress on stderr"},
};

static int demo_parse(int argc, char **argv, DemoArgs *a, const char *argv0, Error *e) {
    *a = (DemoArgs){0};
    OptionSet set = {demo_options, COUNT(demo_options), a, false};
    if (options_defaults(&set, 1, e) || options_parse(&set, 1, argc, argv, "demo", e)) return -1;
    const char *dot = strrchr(a->out, '.');
    if (!dot || (strcmp(dot, ".png") && strcmp(dot, ".ppm")))
        return error_set(e, "-o %s: the picture must be .png or .ppm", a->out);
    if (a->weights) return 0;
    a->weights = "weights";
    const char *slash = strrchr(argv0, '/');
    if (access("weights/transformer/config.json", R_OK) == 0 || !slash) return 0;
    int n = snprintf(a->beside, sizeof a->beside, "%.*s/weights", (int)(slash - argv0), argv0);
    if (n < 0 || (size_t)n >= sizeof a->beside)
        return error_set(e, "the binary's directory is too long a path: %.*s", (int)(slash - argv0),
                         argv0);
    a->weights = a->beside;
    return 0;
}

/* eval's settings for the embedded models: their own (weights/sampling.json), as eval takes
 * them. */
static int demo_eval_args(const DemoArgs *d, EvalArgs *a, char *detector, size_t len, Error *e) {
    *a = (EvalArgs){.threshold = EVAL_THRESHOLD};
    GenerateArgs *g = &a->gen;
    OptionSet sets[2];
    eval_option_sets(false, a, sets);
    if (path_join(detector, len, d->weights, "detector", e) || generate_defaults(g, e) ||
        options_defaults(sets, 1, e) || model_defaults_read(d->weights, sets, 2, "demo", e))
        return -1;
    if (g->width != WORLD_W || g->height != WORLD_H || !g->steps)
        return error_set(e, "%s/%s: missing, or without -W %d, -H %d and --steps", d->weights,
                         MODEL_DEFAULTS_FILE, WORLD_W, WORLD_H);
    g->model = d->weights;
    g->detector = detector;
    g->opt.steps = g->steps;
    g->quiet = true;
    return 0;
}

/* One shown pair. */
typedef struct DemoPair {
    char word[WORLD_WORD_MAX + 1];
    uint64_t seed;
    EvalPair p;
} DemoPair;

/* Words and seeds until `want` pairs whose baseline the detector flags (or the words run out). */
static int demo_search(const DemoArgs *d, const EvalArgs *a, GenerateRun *r, DemoPair *pairs,
                       int *found, Error *e) {
    uint64_t next = DEMO_NOISE_SEED;
    *found = 0;
    for (int k = 0; k < DEMO_WORDS && *found < d->pairs; k++) {
        WorldScene scene;
        if (world_scene(DEMO_WORD_SEED + (uint64_t)k, NULL, &scene, e)) return -1;
        EvalRow row = {.input = scene.word};
        for (int t = 0; t < DEMO_TRIES; t++) {
            float max;
            uint64_t seed = next++;
            if (search_try(a, r, &row, seed, &max, e)) return -1;
            if (!d->quiet)
                fprintf(stderr, "%-4s seed %llu: detector max %.3f%s\n", scene.word,
                        (unsigned long long)seed, max, max >= a->threshold ? " (kept)" : "");
            if (max < a->threshold) continue;
            DemoPair *p = &pairs[(*found)++];
            snprintf(p->word, sizeof p->word, "%s", scene.word);
            p->seed = seed;
            if (eval_pair(a, r, &row, seed, &p->p, e)) return -1;
            break;
        }
    }
    return 0;
}

/* The picture: per pair a caption (word and seed) over baseline | DIAMOND | both heat maps. */
static int demo_picture(const DemoArgs *d, const DemoPair *pairs, int n, Error *e) {
    SheetRow rows[DEMO_MAX_PAIRS];
    for (int i = 0; i < n; i++) {
        const EvalPair *p = &pairs[i].p;
        rows[i] = (SheetRow){.images = {&p->img[0], &p->img[1]},
                             .maps = {p->maps[0]->data, p->maps[1]->data},
                             .map_h = (int)p->maps[0]->shape[2],
                             .map_w = (int)p->maps[0]->shape[3]};
        snprintf(rows[i].caption, sizeof rows[i].caption, "%.*s  SEED %llu", WORLD_WORD_MAX,
                 pairs[i].word, (unsigned long long)pairs[i].seed);
    }
    return sheet_write(d->out, rows, n, e);
}

/* Per pair and overall on stdout. */
static void demo_report(const DemoPair *pairs, int n, double seconds) {
    ImageMetrics m[DEMO_MAX_PAIRS];
    printf("%-5s %10s %17s %17s %8s\n", "word", "seed", "detector max", "oracle reads",
           "MAE");
    for (int i = 0; i < n; i++) {
        const ImageMetrics *x = &pairs[i].p.m;
        m[i] = *x;
        printf("%-5s %10llu %7.3f -> %6.3f %7s -> %6s %8.2f\n", pairs[i].word,
               (unsigned long long)pairs[i].seed, x->baseline_max, x->guided_max,
               x->baseline_reads ? "yes" : "no", x->guided_reads ? "yes" : "no", x->mae);
    }
    EvalSummary s;
    metrics_summarize(m, (size_t)n, &s);
    printf("\n%d pairs, %.1f s      baseline   DIAMOND\n", n, seconds);
    printf("detector artifact frequency %% %8.1f %9.1f\n", s.baseline_artifact_freq,
           s.guided_artifact_freq);
    printf("oracle artifact frequency %%   %8.1f %9.1f\n", s.baseline_oracle_artifact_freq,
           s.guided_oracle_artifact_freq);
    printf("oracle read accuracy %%        %8.1f %9.1f\n", s.baseline_oracle_read_acc,
           s.guided_oracle_read_acc);
    printf("glyphs legible %%              %8.1f %9.1f\n", s.glyph_legible[0], s.glyph_legible[1]);
    printf("glyphs as the prompt's %%      %8.1f %9.1f\n", s.glyph_right[0], s.glyph_right[1]);
    printf("  (of %lld and %lld glyphs in images with the prompt's glyph count)\n",
           (long long)s.glyph_n[0], (long long)s.glyph_n[1]);
    printf("MAE vs baseline (0..255)              %9.2f\n", s.mae);
}

static int demo_run(const DemoArgs *d, Error *e) {
    double start = now_seconds();
    EvalArgs a;
    GenerateRun r = {0};
    DemoPair pairs[DEMO_MAX_PAIRS] = {0};
    char detector[PATH_BYTES];
    int found = 0;
    int rc = 0;
    if (demo_eval_args(d, &a, detector, sizeof detector, e) ||
        generate_load_models(&a.gen, &r, e)) {
        char why[sizeof e->msg];
        snprintf(why, sizeof why, "%s", e->msg);
        rc = error_set(e, "%s (the embedded models: `make weights` trains them, --weights DIR "
                          "points elsewhere)", why);
    }
    if (rc == 0) rc = demo_search(d, &a, &r, pairs, &found, e);
    if (rc == 0 && found == 0)
        rc = error_set(e, "no word of the %d tried had a seed the detector flags", DEMO_WORDS);
    if (rc == 0) rc = demo_picture(d, pairs, found, e);
    if (rc == 0) {
        demo_report(pairs, found, now_seconds() - start);
        if (!d->quiet) fprintf(stderr, "wrote %s\n", d->out);
    }
    for (int i = 0; i < found; i++) eval_pair_free(&pairs[i].p);
    generate_run_free(&r);
    return rc ? -1 : 0;
}

/* diamond [demo] ...: 0 on success, 2 for a bad command line, 1 for anything else. */
static int demo_main(int argc, char **argv, const char *argv0) {
    if (asks_for_help(argc, argv)) {
        const OptionSet set = {demo_options, COUNT(demo_options), NULL, false};
        command_help(demo_usage, &set, 1);
        return 0;
    }
    DemoArgs d;
    Error e = {{0}};
    if (demo_parse(argc, argv, &d, argv0, &e)) {
        fprintf(stderr, "diamond demo: %s\n", e.msg);
        return 2;
    }
    if (demo_run(&d, &e)) {
        fprintf(stderr, "diamond demo: %s\n", e.msg);
        return 1;
    }
    return 0;
}

/* glibc gives blocks of 128 KiB and more back to the system when they are freed (mmap, or a
 * trimmed heap top), so every chunk of a model's forward faults in and clears its fresh pages
 * again: 7% of a klein-4B forward went to page faults. Served from the heap and kept there, the
 * freed blocks are reused (up to glibc's 32 MiB ceiling on the mmap threshold). */
static void keep_freed_memory(void) {
#ifdef __GLIBC__
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, -1);
#endif
}

int main(int argc, char **argv) {
    keep_freed_memory();
    if (argc < 2) return demo_main(0, argv + 1, argv[0]);
    if (!strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage_text, stdout);
        for (size_t i = 0; i < COUNT(benchmarks); i++) bench_usage_lines(stdout, &benchmarks[i]);
        fputs(usage_tail, stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        puts(DIAMOND_VERSION);
        return 0;
    }
    if (!strcmp(argv[1], "demo")) return demo_main(argc - 2, argv + 2, argv[0]);
    /* `diamond --weights DIR -o FILE ...`: the demo's options without the word demo */
    if (argv[1][0] == '-') return demo_main(argc - 1, argv + 1, argv[0]);
    if (!strcmp(argv[1], "train")) return train_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "world")) return world_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "info")) return info_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "generate")) return generate_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "encode")) return encode_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "eval")) return eval_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "search-seeds")) return search_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench")) return bench_main(argc, argv);
    fprintf(stderr, "diamond: unknown command '%s' (see diamond --help)\n", argv[1]);
    return 2;
}
