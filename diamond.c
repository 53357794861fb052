/* diamond.c - the command line: DIAMOND sampling, model inspection and benchmarks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "io.h"
#include "tensor.h"

static const char *usage_text =
    "diamond - training-free artifact removal for rectified-flow image models (DIAMOND)\n"
    "\n"
    "usage:\n"
    "  diamond info FILE|DIR            validate safetensors file(s) and list their tensors\n"
    "  diamond bench gemm M N K [--threads T]\n"
    "  diamond bench conv B CIN H W COUT K STRIDE PAD [--groups G] [--threads T]\n"
    "  diamond bench attention B HEADS N HEAD_DIM [--threads T]\n"
    "  diamond help                     this text\n"
    "\n"
    "exit status: 0 success, 1 runtime error (bad file, bad data), 2 bad command line\n";

/* Seconds on a monotonic clock. */
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- section: info (owned by the io work) ---- */

/* ---- end section: info ---- */

/* ---- section: bench (each kernel work adds its benchmark here) ---- */

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
    if (strcmp(argv[i], "--threads") || i + 1 >= argc || bench_parse_int(argv[i + 1], 1, 1024, threads))
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
        fprintf(stderr, "diamond: usage: diamond bench gemm M N K [--threads T] (sizes 1..65536)\n");
        return 2;
    }
    for (int i = 6; i < argc; i += 2)
        if (bench_threads_option(argc, argv, i, &threads)) {
            fprintf(stderr, "diamond: bench gemm: bad option '%s' (expected --threads T)\n", argv[i]);
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
    for (size_t i = 0; i < na + nb; i++) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        float v = (float)((state >> 40) & 0xFFFF) / 32768.0f - 1.0f;
        if (i < na) g.A[i] = v;
        else g.B[i - na] = v;
    }
    double best, median;
    bench_time(gemm_bench_run, &g, &best, &median);
    double flops = 2.0 * g.M * g.N * g.K;
    printf("gemm M=%d N=%d K=%d threads=%d best=%.3f ms median=%.3f ms GFLOPS=%.1f\n", g.M, g.N,
           g.K, threads, 1e3 * best, 1e3 * median, flops / best * 1e-9);
    free(g.A), free(g.B), free(g.C);
    return 0;
}

/* ---- end section: bench ---- */

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "bench")) {
        if (argc >= 3 && !strcmp(argv[2], "gemm")) return bench_gemm(argc, argv);
        fprintf(stderr, "diamond: unknown benchmark '%s' (see diamond --help)\n", argc >= 3 ? argv[2] : "");
        return 2;
    }
    fprintf(stderr, "diamond: unknown command '%s' (see diamond --help)\n", argv[1]);
    return 2;
}
