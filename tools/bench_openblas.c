/* bench_openblas.c - times our gemm() and OpenBLAS's cblas_sgemm side by side in one process, on
 * the same inputs, in alternating rounds, so that a noisy machine slows both alike. Not part of
 * the build (OpenBLAS is never a dependency); after `make`:
 *   cc -O2 -fopenmp -I. tools/bench_openblas.c build/libdiamond.a -lopenblas -lm \
 *      -o /tmp/bench_openblas
 *   OPENBLAS_CORETYPE=SkylakeX /tmp/bench_openblas 1024 1024 1024 2     # M N K threads
 * Each round: a pause (so that neither library's idle threads still spin on the other's cores),
 * one untimed call, then 5 timed calls of one library, and the same for the other. Prints the
 * best and the median call of each over all rounds, and ours / OpenBLAS in GFLOP/s. */
#include "tensor.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ROUNDS 8
#define CALLS 5

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void pause_seconds(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct Product {
    int M, N, K;
    const float *A, *B;
    float *C;
} Product;

static void run_ours(const Product *p) {
    gemm(false, false, p->M, p->N, p->K, 1.0f, p->A, p->K, p->B, p->N, 0.0f, p->C, p->N);
}

static void run_openblas(const Product *p) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, p->M, p->N, p->K, 1.0f, p->A, p->K,
                p->B, p->N, 0.0f, p->C, p->N);
}

/* One round of one library: times[0 .. CALLS) after an untimed call. */
static void round_of(void (*run)(const Product *), const Product *p, double *times) {
    pause_seconds(0.3);
    run(p);
    for (int c = 0; c < CALLS; c++) {
        double t0 = now_seconds();
        run(p);
        times[c] = now_seconds() - t0;
    }
}

static void report(const char *name, double *times, double flops) {
    qsort(times, ROUNDS * CALLS, sizeof times[0], compare_doubles);
    printf("%-9s best %8.3f ms (%6.1f GFLOP/s)  median %8.3f ms (%6.1f GFLOP/s)\n", name,
           1e3 * times[0], flops / times[0] * 1e-9, 1e3 * times[ROUNDS * CALLS / 2],
           flops / times[ROUNDS * CALLS / 2] * 1e-9);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: bench_openblas M N K THREADS\n");
        return 2;
    }
    Product p = {atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), NULL, NULL, NULL};
    int threads = atoi(argv[4]);
    if (p.M < 1 || p.N < 1 || p.K < 1 || threads < 1) {
        fprintf(stderr, "bench_openblas: sizes and threads must be positive\n");
        return 2;
    }
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    size_t na = (size_t)p.M * p.K, nb = (size_t)p.K * p.N;
    float *A = malloc(na * sizeof *A), *B = malloc(nb * sizeof *B);
    p.C = malloc((size_t)p.M * p.N * sizeof *p.C);
    if (!A || !B || !p.C) return 1;
    unsigned long long state = 42;
    for (size_t i = 0; i < na + nb; i++) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        float v = (float)((state >> 40) & 0xFFFF) / 32768.0f - 1.0f;
        if (i < na) A[i] = v;
        else B[i - na] = v;
    }
    p.A = A, p.B = B;
    static double ours[ROUNDS * CALLS], theirs[ROUNDS * CALLS];
    for (int r = 0; r < ROUNDS; r++) {
        /* Who goes first alternates too. */
        if (r % 2 == 0) round_of(run_ours, &p, ours + r * CALLS);
        round_of(run_openblas, &p, theirs + r * CALLS);
        if (r % 2 == 1) round_of(run_ours, &p, ours + r * CALLS);
    }
    double flops = 2.0 * p.M * p.N * p.K;
    printf("M=%d N=%d K=%d threads=%d, %d rounds of %d calls each, OpenBLAS core %s\n", p.M, p.N,
           p.K, threads, ROUNDS, CALLS, openblas_get_corename());
    report("diamond", ours, flops);
    report("openblas", theirs, flops);
    printf("diamond / openblas: best %.1f%%  median %.1f%%\n", 100.0 * theirs[0] / ours[0],
           100.0 * theirs[ROUNDS * CALLS / 2] / ours[ROUNDS * CALLS / 2]);
    free(A), free(B), free(p.C);
    return 0;
}
