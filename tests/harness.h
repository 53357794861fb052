/* harness.h - the one tiny test harness every tests/test_*.c shares.
 *
 * A test binary calls CHECK / check_close as often as it likes, then returns harness_finish():
 * it prints "<binary>: N passed, M failed" and a non-zero status when anything failed.
 * Golden data comes from safetensors files written by the PyTorch scripts in tools/. */
#ifndef DIAMOND_HARNESS_H
#define DIAMOND_HARNESS_H

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../io.h"

static struct {
    int passed, failed;
} harness;

static void harness_report(int ok, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void harness_report(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (ok) {
        harness.passed++;
        if (getenv("TEST_VERBOSE")) {
            printf("  ok    ");
            vprintf(fmt, ap);
            printf("\n");
        }
    } else {
        harness.failed++;
        printf("  FAIL  ");
        vprintf(fmt, ap);
        printf("\n");
    }
    va_end(ap);
}

#define CHECK(cond, ...) harness_report((cond) ? 1 : 0, __VA_ARGS__)

/* Passes when every |got - want| <= atol + rtol * |want| and nothing is NaN; reports the worst
 * element either way so a failure says by how much. */
static inline int check_close(const char *what, const float *got, const float *want, size_t n, float rtol,
                       float atol) {
    size_t worst = 0, bad = 0;
    double worst_excess = -1.0, max_abs = 0.0;
    for (size_t i = 0; i < n; i++) {
        double diff = fabs((double)got[i] - (double)want[i]);
        double allowed = atol + rtol * fabs((double)want[i]);
        if (isnan(got[i]) != isnan(want[i]) || diff > allowed) bad++;
        if (diff > max_abs) max_abs = diff;
        if (diff - allowed > worst_excess || isnan(got[i])) {
            worst_excess = isnan(got[i]) ? INFINITY : diff - allowed;
            worst = i;
        }
    }
    int ok = bad == 0 && n > 0;
    harness_report(ok, "%s: %zu values, %zu out of tolerance (rtol %g, atol %g), max |diff| %.3g",
                   what, n, bad, rtol, atol, max_abs);
    if (!ok && n > 0)
        printf("        worst at [%zu]: got %.9g want %.9g\n", worst, got[worst], want[worst]);
    return ok;
}

/* The F32/F16/BF16 tensor `name` of st as a malloc'd float array of exactly n values, or NULL
 * (reported as a failure) when it is missing or has another size. */
static inline float *golden_load(const SafeTensors *st, const char *name, size_t n) {
    float *dst = malloc((n ? n : 1) * sizeof *dst);
    Error e = {{0}};
    if (!dst || st_read_f32(st, name, dst, (int64_t)n, &e) != 0) {
        harness_report(0, "golden %s: %s", name, e.msg);
        free(dst);
        return NULL;
    }
    return dst;
}

/* Opens a golden file, or reports a failure and returns NULL. */
static inline SafeTensors *golden_open(const char *path) {
    SafeTensors *st = NULL;
    Error e = {{0}};
    if (st_open(&st, path, &e) != 0) {
        harness_report(0, "cannot open golden file: %s", e.msg);
        return NULL;
    }
    return st;
}

/* Finite-difference check of an analytic gradient. loss(ctx) evaluates a scalar at the current
 * contents of x; grad holds d loss / d x. Central differences (step eps) on every `stride`-th
 * element, in double, must match within atol + rtol * |numeric|. x is restored. */
typedef double (*HarnessLossFn)(void *ctx);

static inline int check_gradient(const char *what, HarnessLossFn loss, void *ctx, float *x,
                          const float *grad, size_t n, size_t stride, float eps, float rtol,
                          float atol) {
    size_t checked = 0, bad = 0, worst = 0;
    double worst_excess = -INFINITY, worst_num = 0.0;
    for (size_t i = 0; i < n; i += stride ? stride : 1) {
        float keep = x[i];
        x[i] = keep + eps;
        double up = loss(ctx);
        x[i] = keep - eps;
        double down = loss(ctx);
        x[i] = keep;
        /* the step actually taken, after float rounding of keep +- eps */
        double h = (double)(keep + eps) - (double)(keep - eps);
        double numeric = (up - down) / h;
        double excess = fabs(numeric - grad[i]) - (atol + rtol * fabs(numeric));
        if (!(excess <= 0.0)) bad++;
        if (!(excess <= worst_excess)) {
            worst_excess = excess;
            worst = i;
            worst_num = numeric;
        }
        checked++;
    }
    int ok = bad == 0 && checked > 0;
    harness_report(ok, "%s: finite differences at %zu points, %zu out of tolerance (rtol %g, atol %g)",
                   what, checked, bad, rtol, atol);
    if (!ok && checked > 0)
        printf("        worst at [%zu]: analytic %.9g numeric %.9g\n", worst, grad[worst], worst_num);
    return ok;
}

/* A deterministic pseudo-random float in [-1, 1) for inputs the tests make themselves. */
static inline float harness_rand(unsigned long long *state) {
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*state >> 40) & 0xFFFFFF) / (float)0x800000 - 1.0f;
}

/* The diamond binary of the build a test was built in (<build>/tests/test_x -> <build>/diamond;
 * build/diamond when argv0 says nothing): its file into path, and the command that runs it into
 * command, behind $TEST_RUNNER when that is set (an emulator for a cross build: `make
 * test-arm64`). Returns 0, or -1 when either does not fit. */
static inline int harness_binary(const char *argv0, char *path, size_t path_size, char *command,
                                 size_t command_size) {
    const char *slash = strstr(argv0, "/tests/"), *runner = getenv("TEST_RUNNER");
    int n = snprintf(path, path_size, "%.*s/diamond", slash ? (int)(slash - argv0) : 5,
                     slash ? argv0 : "build");
    int m = snprintf(command, command_size, "%s%s%s", runner ? runner : "", runner ? " " : "",
                     path);
    return n < 0 || (size_t)n >= path_size || m < 0 || (size_t)m >= command_size ? -1 : 0;
}

static inline int harness_finish(const char *name) {
    printf("%s: %d passed, %d failed\n", name, harness.passed, harness.failed);
    fflush(stdout); /* before a sanitizer's exit-time report, which ends the process at once */
    return harness.failed ? 1 : 0;
}

/* Runs cmd through the shell with its output discarded: its exit status, or -1 when it did not
 * exit normally. */
static inline int harness_run_quiet(const char *cmd) {
    char line[8192];
    snprintf(line, sizeof line, "%s >/dev/null 2>&1", cmd);
    int status = system(line);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Runs cmd through the shell with its stdout and stderr into said (at most size - 1 bytes kept,
 * NUL-terminated): its exit status, or -1 when it did not exit normally. */
static inline int harness_run_said(const char *cmd, char *said, size_t size) {
    char line[8192];
    snprintf(line, sizeof line, "%s 2>&1", cmd);
    FILE *f = popen(line, "r");
    size_t n = 0;
    said[0] = '\0';
    if (!f) return -1;
    for (int c; (c = fgetc(f)) != EOF;)
        if (n + 1 < size) said[n++] = (char)c;
    said[n] = '\0';
    int status = pclose(f);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Whether files a and b both open and hold the same bytes. */
static inline bool harness_same_file(const char *a, const char *b) {
    FILE *f = fopen(a, "rb"), *g = fopen(b, "rb");
    bool same = f && g;
    for (int x = 0, y = 0; same && (x != EOF || y != EOF);) {
        x = fgetc(f);
        y = fgetc(g);
        same = x == y;
    }
    if (f) fclose(f);
    if (g) fclose(g);
    return same;
}

/* A model directory made of fixture parts: dir/<parts[i][0]> a symbolic link to the real path
 * of parts[i][1], for i < n (dir is made). 0, or -1 when a link cannot be made. */
static inline int harness_link_parts(const char *dir, const char *const (*parts)[2], int n) {
    char target[PATH_MAX], link[PATH_MAX + 256];
    mkdir(dir, 0755);
    for (int i = 0; i < n; i++) {
        snprintf(link, sizeof link, "%s/%s", dir, parts[i][0]);
        if (!realpath(parts[i][1], target) || symlink(target, link) != 0) return -1;
    }
    return 0;
}

#endif
