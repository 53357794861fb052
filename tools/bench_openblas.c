/* bench_openblas.c - times OpenBLAS's cblas_sgemm the way `diamond bench gemm` times gemm(), for a
 * side-by-side comparison. Not part of the build:
 *   cc -O2 tools/bench_openblas.c -lopenblas -o /tmp/bench_openblas
 *   OPENBLAS_NUM_THREADS=2 /tmp/bench_openblas 1024 1024 1024
 * Same inputs, one warm-up, about half a second of repetitions (3 to 50); best and median. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void run(int M, int N, int K, const float *A, const float *B, float *C) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: bench_openblas M N K (threads from OPENBLAS_NUM_THREADS)\n");
        return 2;
    }
    int M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]);
    if (M < 1 || N < 1 || K < 1) {
        fprintf(stderr, "bench_openblas: sizes must be positive\n");
        return 2;
    }
    size_t na = (size_t)M * K, nb = (size_t)K * N;
    float *A = malloc(na * sizeof *A), *B = malloc(nb * sizeof *B);
    float *C = malloc((size_t)M * N * sizeof *C);
    if (!A || !B || !C) return 1;
    unsigned long long state = 42;
    for (size_t i = 0; i < na + nb; i++) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        float v = (float)((state >> 40) & 0xFFFF) / 32768.0f - 1.0f;
        if (i < na) A[i] = v;
        else B[i - na] = v;
    }
    double t0 = now_seconds();
    run(M, N, K, A, B, C);
    double warm = now_seconds() - t0;
    int reps = warm > 0.5 / 3 ? 3 : warm * 50 < 0.5 ? 50 : (int)(0.5 / warm);
    double times[50];
    for (int r = 0; r < reps; r++) {
        t0 = now_seconds();
        run(M, N, K, A, B, C);
        times[r] = now_seconds() - t0;
    }
    qsort(times, (size_t)reps, sizeof times[0], compare_doubles);
    double flops = 2.0 * M * N * K;
    printf("openblas(%s) M=%d N=%d K=%d threads=%d best=%.3f ms median=%.3f ms GFLOPS=%.1f\n",
           openblas_get_corename(), M, N, K, openblas_get_num_threads(), 1e3 * times[0],
           1e3 * times[reps / 2], flops / times[0] * 1e-9);
    free(A), free(B), free(C);
    return 0;
}
