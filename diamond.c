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

#include <errno.h>
#include <sys/stat.h> /* stat(), to tell files from directories */

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

/* ---- end section: info ---- */

/* ---- section: bench (each kernel work adds its benchmark here) ---- */

/* ---- end section: bench ---- */

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    (void)now_seconds;
    if (!strcmp(argv[1], "info")) return info_main(argc - 2, argv + 2);
    fprintf(stderr, "diamond: unknown command '%s' (see diamond --help)\n", argv[1]);
    return 2;
}
