/* test_eval.c - DIAMOND's evaluation: the metrics (nn.c's metrics section) against
 * tools/golden_eval.py, which computes them with the official formulas of gmum/DIAMOND's
 * metrics.py in torch; `diamond eval` end to end on the tiny fixtures (files written, resume,
 * shards merged equal to one run, a quoted path with a comma, settings checked on resume) and
 * `diamond search-seeds` (one seed counter over the prompts, rows without a hit left out);
 * exit statuses on bad input. */
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../nn.h"
#include "../train/train.h"
#include "harness.h"

#define GOLDEN "tests/golden/eval.safetensors"
#define CASES 6

/* The metrics come as doubles from exact integer sums; the golden stores them as float32. */
#define METRIC_RTOL 1e-6f
#define METRIC_ATOL 1e-6f

/* [H, W, 3] 8-bit values stored as floats -> bytes. */
static uint8_t *golden_image(const SafeTensors *g, const char *name, size_t n) {
    float *f = golden_load(g, name, n);
    uint8_t *u = malloc(n);
    for (size_t i = 0; f && u && i < n; i++) u[i] = (uint8_t)f[i];
    free(f);
    if (!f) free(u);
    return f ? u : NULL;
}

/* One golden case through metrics_image; its metrics into m. */
static void test_metric_case(const SafeTensors *g, int k, ImageMetrics *m) {
    char name[64];
    snprintf(name, sizeof name, "case%d.size", k);
    float *size = golden_load(g, name, 4);
    if (!size) return;
    int H = (int)size[0], W = (int)size[1], h = (int)size[2], w = (int)size[3];
    size_t n = (size_t)H * W * 3, cells = (size_t)h * w;
    free(size);
#define LOAD(part, count) (snprintf(name, sizeof name, "case%d." part, k), golden_load(g, name, count))
    uint8_t *base = (snprintf(name, sizeof name, "case%d.baseline", k), golden_image(g, name, n));
    uint8_t *guided = (snprintf(name, sizeof name, "case%d.guided", k), golden_image(g, name, n));
    float *bmap = LOAD("bmap", cells), *gmap = LOAD("gmap", cells), *want = LOAD("metrics", 8);
#undef LOAD
    Error e = {{0}};
    if (base && guided && bmap && gmap && want) {
        int rc = metrics_image(base, guided, H, W, bmap, gmap, h, w, 0.5f, m, &e);
        CHECK(rc == 0, "metrics_image case %d: %s", k, e.msg);
        float got[8] = {m->baseline_artifact, m->guided_artifact, (float)m->baseline_pixel_ratio,
                        (float)m->guided_pixel_ratio, (float)m->mae, (float)m->mae_a,
                        (float)m->mae_na, (float)m->artifact_pixels};
        snprintf(name, sizeof name, "case %d (%dx%d image, %dx%d map) metrics", k, W, H, w, h);
        check_close(name, got, want, 8, METRIC_RTOL, METRIC_ATOL);
        CHECK(m->baseline_max == max_array(cells, bmap), "case %d: baseline max", k);
    }
    free(base);
    free(guided);
    free(bmap);
    free(gmap);
    free(want);
}

static void test_metrics(void) {
    SafeTensors *g = golden_open(GOLDEN);
    if (!g) return;
    ImageMetrics m[CASES] = {{0}};
    for (int k = 0; k < CASES; k++) test_metric_case(g, k, &m[k]);
    EvalSummary s;
    metrics_summarize(m, CASES, &s);
    float got[8] = {(float)s.n, (float)s.baseline_artifact_freq, (float)s.baseline_pixel_ratio,
                    (float)s.guided_artifact_freq, (float)s.guided_pixel_ratio, (float)s.mae,
                    (float)s.mae_a, (float)s.mae_na};
    float *want = golden_load(g, "summary", 8);
    if (want) check_close("summary over the cases (n, freq %, ratio %, MAEs)", got, want, 8,
                          METRIC_RTOL, METRIC_ATOL);
    free(want);
    CHECK(m[2].artifact_pixels == 0 && m[2].mae_a == 0.0 && m[2].mae_na == m[2].mae,
          "a clean baseline adds 0 to MAE(A), MAE(NA) = MAE");
    CHECK(m[3].mae_na == 0.0 && m[3].mae_a == m[3].mae, "an all-artifact baseline: MAE(A) = MAE");
    CHECK(m[4].mae == 0.0, "equal images: MAE 0");
    metrics_summarize(m, 0, &s);
    CHECK(s.n == 0 && s.mae == 0.0, "an empty summary is zeros");
    st_close(g);
}

/* The oracle's verdicts on a clean render (reads as its word) and on a corrupted one (an
 * illegible glyph), and their percentages over the items the oracle read. */
static void test_oracle_metrics(void) {
    static const char *const words[] = {"AB", "K9", "ZERO", "Q7X"};
    ImageMetrics m[5] = {{0}};
    Error e = {{0}};
    uint8_t clean[WORLD_H * WORLD_W * 3], broken[WORLD_H * WORLD_W * 3], mask[WORLD_H * WORLD_W];
    int broken_read = 0;
    for (int k = 0; k < 4; k++) {
        WorldScene scene;
        int rc = world_scene(40 + (uint64_t)k, words[k], &scene, &e);
        if (rc == 0) {
            world_render(&scene, clean);
            rc = world_corrupt(70 + (uint64_t)k, &scene, WORLD_REMOVE_STROKE, broken, mask, NULL,
                               &e) ||
                 metrics_oracle(clean, broken, WORLD_H, WORLD_W, words[k], &m[k], &e);
        }
        CHECK(rc == 0 && m[k].oracle, "oracle on '%s': %s", words[k], e.msg);
        CHECK(m[k].baseline_legible && m[k].baseline_reads, "a clean '%s' reads as itself",
              words[k]);
        int len = (int)strlen(words[k]);
        CHECK(m[k].glyphs[0].n == len && m[k].glyphs[0].legible == len &&
                  m[k].glyphs[0].right == len,
              "a clean '%s': %d glyphs, all legible and right (%d, %d, %d)", words[k], len,
              m[k].glyphs[0].n, m[k].glyphs[0].legible, m[k].glyphs[0].right);
        const GlyphCounts *g = &m[k].glyphs[1];
        CHECK(g->right <= g->legible && g->legible <= g->n && (g->n == 0 || g->n == len) &&
                  (g->n == 0 || !m[k].guided_legible == (g->legible < g->n)),
              "a corrupted '%s': counted only at the prompt's glyph count, an illegible glyph "
              "exactly when the image has one (%d, %d, %d)", words[k], g->n, g->legible, g->right);
        broken_read += m[k].guided_reads;
    }
    CHECK(broken_read < 4, "corrupted renders do not all read as their word (%d of 4 do)",
          broken_read);
    EvalSummary s;
    metrics_summarize(m, 5, &s); /* m[4]: an item the oracle did not read */
    double want_acc = 100.0 * broken_read / 4.0, want_freq = 0.0;
    for (int k = 0; k < 4; k++) want_freq += 25.0 * !m[k].guided_legible;
    CHECK(s.n == 5 && s.oracle_n == 4 && s.baseline_oracle_artifact_freq == 0.0 &&
              s.baseline_oracle_read_acc == 100.0 && s.guided_oracle_read_acc == want_acc &&
              s.guided_oracle_artifact_freq == want_freq,
          "oracle percentages over the 4 items it read: %g %g %g %g", s.baseline_oracle_read_acc,
          s.guided_oracle_read_acc, s.baseline_oracle_artifact_freq, s.guided_oracle_artifact_freq);
    int64_t glyphs = 0, legible = 0, right = 0, images = 0;
    for (int k = 0; k < 4; k++) {
        images += m[k].glyphs[1].n > 0;
        glyphs += m[k].glyphs[1].n;
        legible += m[k].glyphs[1].legible;
        right += m[k].glyphs[1].right;
    }
    CHECK(s.glyph_images[0] == 4 && s.glyph_n[0] == 11 && s.glyph_legible[0] == 100.0 &&
              s.glyph_right[0] == 100.0 && s.glyph_images[1] == images &&
              s.glyph_n[1] == glyphs &&
              (glyphs == 0 || (s.glyph_legible[1] == 100.0 * (double)legible / (double)glyphs &&
                               s.glyph_right[1] == 100.0 * (double)right / (double)glyphs)),
          "per-glyph percentages over the glyphs of matching images: %lld %lld %g %g",
          (long long)s.glyph_images[1], (long long)s.glyph_n[1], s.glyph_legible[1],
          s.glyph_right[1]);
    CHECK(metrics_oracle(clean, broken, WORLD_H - 1, WORLD_W, "AB", &m[4], &e) != 0,
          "the oracle refuses another image size: %s", e.msg);
}

/* ---- the commands ---- */

typedef struct Cli {
    char binary[1024], dir[64], cmd[8192];
} Cli;

/* The command's exit status, its output into dir/log. */
static int run(Cli *c, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static int run(Cli *c, const char *fmt, ...) {
    char args[6000];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(c->cmd, sizeof c->cmd, "%s %s >%s/log 2>&1", c->binary, args, c->dir);
    int status = system(c->cmd);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* The whole file, NUL-terminated, or NULL. */
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *copy = malloc(n + 1);
    if (copy) memcpy(copy, buf, n + 1);
    return copy;
}

static bool same_file_text(const char *a, const char *b) {
    char *x = slurp(a), *y = slurp(b);
    bool same = x && y && !strcmp(x, y);
    free(x);
    free(y);
    return same;
}

/* Whether dir/log holds text. */
static bool log_has(const Cli *c, const char *text) {
    char path[128];
    snprintf(path, sizeof path, "%s/log", c->dir);
    char *log = slurp(path);
    bool has = log && strstr(log, text);
    free(log);
    return has;
}

/* prompt_embeds [5, 24] (the tiny flow model's joint_attention_dim), random. */
static int write_embeddings(const char *path, unsigned long long seed) {
    float x[5 * 24];
    for (int i = 0; i < 5 * 24; i++) x[i] = harness_rand(&seed);
    StWriteTensor t = {"prompt_embeds", DTYPE_F32, 2, {5, 24}, x};
    Error e = {{0}};
    return st_write(path, &t, 1, &e);
}

static int write_text(const char *path, const char *text) {
    Error e = {{0}};
    return write_file_atomic(path, text, strlen(text), &e);
}

/* one thread: the tiny models gain nothing from more, and spinning OpenMP threads on a busy
 * machine cost seconds */
#define MODELS_LOUD "--model tests/fixtures/tiny-flux2 --detector tests/fixtures/tiny-detector " \
                    "--steps 2 -W 24 -H 16 --threads 1"
#define MODELS MODELS_LOUD " --quiet"
#define GUIDE "--lambda-schedule linear:start=0.8,end=0.2 --loss mse"

static ino_t inode(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 ? sb.st_ino : 0;
}

/* A row whose embeddings hold a NaN fails alone: its item file says why, it is not scored, the
 * others are, the --json says how many failed, and eval exits 1 once the report is out. */
static void test_eval_failed_row(Cli *c) {
    const char *d = c->dir;
    char path[256];
    snprintf(path, sizeof path, "%s/nan.safetensors", d);
    float x[5 * 24] = {0};
    x[3] = NAN;
    StWriteTensor nan_t = {"prompt_embeds", DTYPE_F32, 2, {5, 24}, x};
    Error e = {{0}};
    snprintf(path, sizeof path, "%s/nan.safetensors", d);
    int rc = st_write(path, &nan_t, 1, &e);
    snprintf(path, sizeof path, "%s/mixed.csv", d);
    rc = rc || write_text(path, "embeddings,seed\nnan.safetensors,1\na.safetensors,2\n");
    CHECK(rc == 0, "write the mixed set: %s", e.msg);
    rc = run(c, "eval %s %s --csv %s/mixed.csv --out %s/mixed --json %s/mixed.json", MODELS, GUIDE,
             d, d, d);
    CHECK(rc == 1 && log_has(c, "1 of 2 rows failed"), "a failed row makes eval exit 1: %d", rc);
    snprintf(path, sizeof path, "%s/mixed/item_000000.json", d);
    char *item = slurp(path);
    CHECK(item && strstr(item, "\"failed\": ") && strstr(item, "NaN") && !strstr(item, "\"mae\""),
          "the failed row's item file says why and holds no figures");
    free(item);
    snprintf(path, sizeof path, "%s/mixed/item_000001.json", d);
    item = slurp(path);
    CHECK(item && strstr(item, "\"mae\"") && !strstr(item, "failed"), "the other row is scored");
    free(item);
    JsonDoc *doc = NULL;
    int64_t n = -1, failed = -1;
    snprintf(path, sizeof path, "%s/mixed.json", d);
    rc = json_parse_file(&doc, path, &e) || json_get_int(json_root(doc), "n", &n, &e) ||
         json_get_int(json_root(doc), "failed", &failed, &e);
    CHECK(rc == 0 && n == 1 && failed == 1, "--json: n 1 scored, failed 1 (%lld, %lld) %s",
          (long long)n, (long long)failed, e.msg);
    json_free(doc);
    rc = run(c, "eval --merge --out %s/mixed", d);
    CHECK(rc == 1 && log_has(c, "1 of 2 rows failed"), "--merge counts the failed row: %d", rc);
    /* rows that cannot fit --memory fail before sampling, each with the estimate and the flag */
    rc = run(c, "eval %s %s --csv %s/mixed.csv --out %s/small --memory 1", MODELS, GUIDE, d, d);
    snprintf(path, sizeof path, "%s/small/item_000001.json", d);
    item = slurp(path);
    CHECK(rc == 1 && log_has(c, "2 of 2 rows failed") && item &&
              strstr(item, "more than the 1 MiB it may take") && strstr(item, "--memory MB"),
          "a run past --memory fails its rows, saying why: %d %s", rc, item ? item : "");
    free(item);
}

/* Unsharded run, resume, shards and merge, settings check. */
static void test_eval_run(Cli *c) {
    char path[256], path2[256];
    const char *d = c->dir;
    int rc = run(c, "eval %s %s --csv %s/set.csv --out %s/all --json %s/all.json", MODELS, GUIDE,
                 d, d, d);
    CHECK(rc == 0, "eval runs (status %d): %s", rc, c->cmd);
    static const char *files[] = {"item_000000.json", "item_000000_baseline.png",
                                  "item_000000_guided.png", "item_000001.json",
                                  "item_000001_baseline.png", "item_000001_guided.png"};
    for (int k = 0; k < 6; k++) {
        snprintf(path, sizeof path, "%s/all/%s", d, files[k]);
        CHECK(access(path, R_OK) == 0, "eval wrote %s", files[k]);
    }
    JsonDoc *doc = NULL;
    Error e = {{0}};
    int64_t n = 0;
    double mae = -1.0;
    snprintf(path, sizeof path, "%s/all.json", d);
    rc = json_parse_file(&doc, path, &e) || json_get_int(json_root(doc), "n", &n, &e) ||
         json_get_float(json_root(doc), "mae", &mae, &e) ||
         !json_get(json_root(doc), "baseline") || !json_get(json_root(doc), "guided");
    CHECK(rc == 0 && n == 2 && mae > 0.0 && mae <= 255.0, "--json holds n = 2 and an MAE in "
          "(0, 255]: %s", e.msg);
    json_free(doc);
    snprintf(path, sizeof path, "%s/all/item_000001.json", d);
    char *item = slurp(path);
    CHECK(item && strstr(item, "\"embeddings\": \"b,c.safetensors\"") && strstr(item, "\"seed\": 7,"),
          "the quoted path with a comma and its seed are in row 1's item");
    free(item);

    ino_t before = inode(path);
    rc = run(c, "eval %s %s --csv %s/set.csv --out %s/all --json %s/again.json", MODELS, GUIDE,
             d, d, d);
    snprintf(path2, sizeof path2, "%s/again.json", d);
    snprintf(path, sizeof path, "%s/all.json", d);
    CHECK(rc == 0 && same_file_text(path, path2), "a second run resumes to the same figures");
    snprintf(path, sizeof path, "%s/all/item_000001.json", d);
    CHECK(before != 0 && inode(path) == before, "resume leaves finished items alone");

    rc = run(c, "eval %s %s --csv %s/set.csv --out %s/shards --shard 1/2", MODELS, GUIDE, d, d) ||
         run(c, "eval %s %s --csv %s/set.csv --out %s/shards --shard 0/2", MODELS, GUIDE, d, d);
    CHECK(rc == 0, "shards 1/2 and 0/2 run");
    snprintf(path, sizeof path, "%s/shards/item_000001.json", d);
    snprintf(path2, sizeof path2, "%s/all/item_000001.json", d);
    CHECK(same_file_text(path, path2), "a shard's item equals the unsharded run's");
    rc = run(c, "eval --merge --out %s/shards --json %s/merged.json", d, d);
    snprintf(path, sizeof path, "%s/all.json", d);
    snprintf(path2, sizeof path2, "%s/merged.json", d);
    CHECK(rc == 0 && same_file_text(path, path2), "--merge of the shards equals the unsharded "
          "--json");
    /* the README's recipe for one machine: the shards as parallel processes (xargs -P here,
     * GNU parallel there), then --merge */
    char recipe[8192];
    snprintf(recipe, sizeof recipe, "seq 0 1 | xargs -P 2 -I{} %s eval %s %s --csv %s/set.csv "
             "--out %s/parallel --shard {}/2 >%s/log 2>&1", c->binary, MODELS, GUIDE, d, d, d);
    rc = system(recipe);
    CHECK(rc == 0 && run(c, "eval --merge --out %s/parallel --json %s/parallel.json", d, d) == 0,
          "the shards run as parallel processes into one --out, then merge: %s", recipe);
    snprintf(path2, sizeof path2, "%s/parallel.json", d);
    CHECK(same_file_text(path, path2), "parallel shards merged equal the unsharded --json");
    rc = run(c, "eval %s --csv %s/set.csv --out %s/all", MODELS, d, d);
    CHECK(rc == 1 && log_has(c, "other settings"), "resume with other settings fails (1): %d", rc);
    /* one shard alone: its merge names the row it lacks, here the last */
    rc = run(c, "eval %s %s --csv %s/set.csv --out %s/half --shard 0/2", MODELS, GUIDE, d, d);
    CHECK(rc == 0, "shard 0/2 alone runs");
    rc = run(c, "eval --merge --out %s/half", d);
    CHECK(rc == 0 && log_has(c, "1 of 2 rows have no item file (rows 1)"),
          "--merge names a missing last row (status %d)", rc);
    rc = run(c, "eval %s %s --csv %s/set.csv --out %s/none --shard 2/3", MODELS, GUIDE, d, d);
    CHECK(rc == 2 && log_has(c, "nothing to run"), "an empty shard exits 2, no figures: %d", rc);
    snprintf(path, sizeof path, "%s/none", d);
    CHECK(access(path, F_OK) != 0, "an empty shard makes no --out");
    test_eval_failed_row(c);
}

/* Exit statuses on bad input. */
static void test_eval_errors(Cli *c) {
    const char *d = c->dir;
    static const struct {
        const char *csv_text, *extra;
        int status;
        const char *says;
    } bad[] = {
        {NULL, "--csv /nonexistent.csv", 1, "cannot open"},
        {"emb,seed\na.safetensors,1\n", "", 1, "header"},
        {"prompt,seed\na cat,1\n", "", 1, "character ' '"},
        {"embeddings,seed\na.safetensors,-1\n", "", 1, "seed"},
        {"embeddings,seed\n\"a.safetensors,1\n", "", 1, "unterminated"},
        {"embeddings,seed\na.safetensors\n", "", 1, "fields"},
        {"embeddings,seed\nmissing.safetensors,1\n", "", 1, "missing.safetensors"},
        {"embeddings,seed\n", "", 1, "no data rows"},
        {"embeddings,seed\na.safetensors,1\n", "--shard 2/2", 2, "--shard"},
        {"embeddings,seed\na.safetensors,1\n", "--shard 1", 2, "--shard"},
        {"embeddings,seed\na.safetensors,1\n", "--shard x/2", 2, "--shard"},
        {"embeddings,seed\na.safetensors,1\n", "--prompt cat", 2, "CSV's"},
        {"embeddings,seed\na.safetensors,1\n", "--seed 3", 2, "unknown option"},
        {"embeddings,seed\na.safetensors,1\n", "-W 20", 2, "multiple"},
        {"embeddings,seed\na.safetensors,1\n", "--negative-prompt x", 2, "--cfg"},
        {"embeddings,seed\na.safetensors,1\n", "--cfg 0.5", 2, "--cfg"},
        {"embeddings,seed\na.safetensors,1\n", "--cfg 2", 1, "needs prompts"},
    };
    char path[256];
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(path, sizeof path, "%s/bad.csv", d);
        if (bad[i].csv_text) write_text(path, bad[i].csv_text);
        /* a fresh --out each: a row that fails leaves an item file saying so */
        int rc = run(c, "eval %s --out %s/err%zu --csv %s/bad.csv %s", MODELS, d, i, d,
                     bad[i].extra);
        CHECK(rc == bad[i].status && log_has(c, bad[i].says), "eval on bad input %zu (%s) exits "
              "%d naming '%s': got %d", i, bad[i].extra, bad[i].status, bad[i].says, rc);
    }
    /* a NUL byte inside a prompt would end it early, silently */
    snprintf(path, sizeof path, "%s/bad.csv", d);
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite("prompt,seed\nab\0cd,1\n", 1, 20, f);
        fclose(f);
    }
    int rc = run(c, "eval %s --out %s/err --csv %s/bad.csv", MODELS, d, d);
    CHECK(rc == 1 && log_has(c, "bad.csv:2: a NUL byte"), "a NUL byte in a CSV exits 1 naming its "
          "line: got %d", rc);
    rc = run(c, "search-seeds %s --csv %s/set.csv --out %s/late.csv --start 9223372036854775000",
             MODELS, d, d);
    CHECK(rc != 0 && log_has(c, "could pass 2^63-1"),
          "search-seeds refuses seeds eval could not read (status %d)", rc);
    CHECK(run(c, "eval --out %s/err --steps 2", d) == 2, "eval without --csv exits 2");
    CHECK(run(c, "eval --merge --out %s/err --csv x.csv", d) == 2, "--merge with --csv exits 2");
    snprintf(path, sizeof path, "%s/empty", d);
    mkdir(path, 0777);
    CHECK(run(c, "eval --merge --out %s/empty", d) == 1 && log_has(c, "no item"),
          "--merge of an empty directory exits 1");
    CHECK(run(c, "search-seeds %s --csv %s/set.csv", MODELS, d) == 2,
          "search-seeds without --out exits 2");
}

/* On the embedded world the oracle reads both images: its verdicts and glyph counts go into the
 * item files and come back out of them in --merge's figures, the same to the last digit. */
static void test_oracle_items(Cli *c) {
    const char *d = c->dir;
    char path[256];
    snprintf(path, sizeof path, "%s/world.csv", d);
    write_text(path, "prompt,seed\nHE4,900000001\nJRN,900000004\n");
    int rc = run(c, "eval --model weights --detector weights/detector --threads 1 --quiet "
                 "--csv %s/world.csv --out %s/world --json %s/world.json", d, d, d);
    snprintf(path, sizeof path, "%s/world/item_000000.json", d);
    char *item = slurp(path);
    CHECK(rc == 0 && item && strstr(item, "\"oracle\"") && strstr(item, "\"baseline_glyphs\": [") &&
              strstr(item, "\"guided_glyphs\": ["),
          "eval on the embedded world records the oracle's glyphs (%d)", rc);
    free(item);
    rc = run(c, "eval --merge --out %s/world --json %s/merged.json", d, d);
    char first[256], merged[256];
    snprintf(first, sizeof first, "%s/world.json", d);
    snprintf(merged, sizeof merged, "%s/merged.json", d);
    char *text = slurp(first);
    CHECK(rc == 0 && same_file_text(first, merged) && text && strstr(text, "\"glyph_right\""),
          "--merge reads the glyph counts back: the same --json (%d)", rc);
    free(text);
}

/* A `prompt,seed` CSV goes through <model>/text_encoder: eval writes the prompt into the item
 * and resumes on it; search-seeds writes `prompt,seed`. */
static void test_prompts(Cli *c) {
    const char *d = c->dir;
    char path[256];
    snprintf(path, sizeof path, "%s/prompts.csv", d);
    write_text(path, "prompt,seed\nCAT,3\nk9,5\n");
    int rc = run(c, "eval %s %s --csv %s/prompts.csv --out %s/prompts --json %s/prompts.json",
                 MODELS, GUIDE, d, d, d);
    snprintf(path, sizeof path, "%s/prompts/item_000001.json", d);
    char *item = slurp(path);
    CHECK(rc == 0 && item && strstr(item, "\"prompt\": \"k9\"") && !strstr(item, "\"oracle\""),
          "eval over prompts (%d): the item names its prompt; no oracle off the world's size", rc);
    free(item);
    ino_t before = inode(path);
    rc = run(c, "eval %s %s --csv %s/prompts.csv --out %s/prompts", MODELS, GUIDE, d, d);
    CHECK(rc == 0 && inode(path) == before, "eval over prompts resumes");
    snprintf(path, sizeof path, "%s/prompts.csv", d);
    rc = run(c, "search-seeds %s --csv %s --out %s/found.csv --max-tries 2 --threshold 0", MODELS,
             path, d);
    snprintf(path, sizeof path, "%s/found.csv", d);
    char *found = slurp(path);
    CHECK(rc == 0 && found && !strcmp(found, "prompt,seed\nCAT,4444\nk9,4445\n"),
          "search-seeds over prompts keeps the first seed at threshold 0: %s", found ? found : "");
    free(found);
}

/* FLUX.2 [klein]'s prompt encoder (tiny-klein: tokenizer/ + Qwen3 text_encoder/): eval keeps
 * each distinct prompt's embeddings in --out once, and a resumed run reads them instead of
 * encoding: it succeeds with the encoder gone. */
static void test_klein_prompts(Cli *c) {
    const char *d = c->dir;
    const char *const parts[4][2] = {{"transformer", "tests/fixtures/tiny-klein/transformer"},
                                     {"vae", "tests/fixtures/tiny-klein/vae"},
                                     {"text_encoder", "tests/fixtures/tiny-klein/text_encoder"},
                                     {"tokenizer", "tests/fixtures/tiny-klein/tokenizer"}};
    char path[256], link[512];
    snprintf(path, sizeof path, "%s/klein", d);
    CHECK(harness_link_parts(path, parts, 4) == 0, "the klein directory %s", path);
    snprintf(path, sizeof path, "%s/klein.csv", d);
    write_text(path, "prompt,seed\na fox,3\na fox,5\n");
    const char *args = "--model %s/klein --detector tests/fixtures/tiny-detector --steps 2 -W 24 "
                       "-H 16 --threads 1 --quiet " GUIDE " --csv %s/klein.csv --out %s/klein-out";
    char cmd[1024];
    snprintf(cmd, sizeof cmd, args, d, d, d);
    int rc = run(c, "eval %s", cmd);
    char **names = NULL;
    size_t count = 0, cached = 0;
    Error e = {{0}};
    snprintf(path, sizeof path, "%s/klein-out", d);
    if (dir_list(path, &names, &count, &e) == 0)
        for (size_t i = 0; i < count; i++) cached += strncmp(names[i], "prompt-", 7) == 0;
    dir_list_free(names, count);
    CHECK(rc == 0 && cached == 1, "eval over klein prompts (%d): one cached prompt file (%zu)", rc,
          cached);
    for (int i = 2; i < 4; i++) {
        snprintf(link, sizeof link, "%s/klein/%s", d, parts[i][0]);
        remove(link);
    }
    snprintf(path, sizeof path, "%s/klein-out/item_000001.json", d);
    remove(path);
    rc = run(c, "eval %s", cmd);
    CHECK(rc == 0 && inode(path) != 0, "a resumed eval reads the cached prompt, not the encoder "
          "(%d)", rc);
}

/* The detector max of each of the first `tries` seeds from 100 for one prompt, read from the
 * log of a search that keeps nothing (threshold 1). */
static int probe_maxima(Cli *c, float *maxima, int tries) {
    int rc = run(c, "search-seeds %s --csv %s/one.csv --out %s/probe.csv --start 100 "
                 "--max-tries %d --threshold 1", MODELS_LOUD, c->dir, c->dir, tries);
    char path[128];
    snprintf(path, sizeof path, "%s/log", c->dir);
    char *log = slurp(path);
    int found = 0;
    for (const char *p = log; rc == 0 && p && (p = strstr(p, "seed ")); p++) {
        unsigned long long seed;
        float max;
        if (sscanf(p, "seed %llu: detector max %f", &seed, &max) == 2 && seed >= 100 &&
            seed < 100 + (unsigned)tries)
            maxima[seed - 100] = max, found++;
    }
    free(log);
    return found == tries ? 0 : -1;
}

/* Two rows with the same embeddings, so a seed's max is the same for both: the kept seeds
 * follow from the probe's maxima with one counter that goes on from row to row. */
static void test_search(Cli *c) {
    const char *d = c->dir;
    char path[256], want[256], csv[128];
    float m[6];
    snprintf(path, sizeof path, "%s/one.csv", d);
    write_text(path, "embeddings\na.safetensors\n");
    snprintf(path, sizeof path, "%s/two.csv", d);
    write_text(path, "prompt,embeddings\n\"a cat, sitting\",a.safetensors\ndog,a.safetensors\n");
    if (probe_maxima(c, m, 6)) {
        CHECK(0, "search-seeds prints every seed's detector max: %s", c->cmd);
        return;
    }
    /* a threshold halfway between the first seed's max and the next larger one */
    float t = 2.0f;
    for (int k = 1; k < 6; k++)
        if (m[k] > m[0] + 1e-3f && m[k] < t) t = m[k];
    t = t > 1.0f ? 1.0f : 0.5f * (m[0] + t);
    uint64_t next = 100, kept[2];
    bool hit[2];
    int n = snprintf(want, sizeof want, "embeddings,seed\n");
    for (int row = 0; row < 2; row++) {
        hit[row] = false;
        for (int k = 0; k < 3 && !hit[row]; k++) kept[row] = next++, hit[row] = m[kept[row] - 100] >= t;
        if (hit[row]) n += snprintf(want + n, sizeof want - (size_t)n, "a.safetensors,%llu\n",
                                    (unsigned long long)kept[row]);
    }
    int rc = run(c, "search-seeds %s --csv %s/two.csv --out %s/seeds.csv --start 100 "
                 "--max-tries 3 --threshold %.6f", MODELS, d, d, t);
    snprintf(csv, sizeof csv, "%s/seeds.csv", d);
    char *got = slurp(csv);
    CHECK(rc == 0 && got && !strcmp(got, want), "search-seeds at threshold %.4f (maxima %.4f "
          "%.4f %.4f %.4f %.4f %.4f) writes\n%s        got\n%s", t, m[0], m[1], m[2], m[3], m[4],
          m[5], want, got ? got : "(nothing)");
    CHECK(!hit[0] || !hit[1] || kept[1] > kept[0], "the counter is not reset between prompts");
    free(got);
    rc = run(c, "search-seeds %s --csv %s/two.csv --out %s/seeds.csv --max-tries 2 --threshold 1",
             MODELS, d, d);
    got = slurp(csv);
    CHECK(rc == 0 && got && !strcmp(got, "embeddings,seed\n") && log_has(c, "4446..4447"),
          "rows without a hit are left out and named on stderr with their seeds");
    free(got);
}

/* Every file the commands left in dir, then dir. */
static void remove_tree(const char *dir) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (strncmp(dir, "/tmp/test_eval.", 15) == 0 && system(cmd) != 0) printf("could not remove %s\n", dir);
}

static void test_cli(const char *argv0) {
    Cli c;
    char file[512];
    int named = harness_binary(argv0, file, sizeof file, c.binary, sizeof c.binary);
    snprintf(c.dir, sizeof c.dir, "/tmp/test_eval.XXXXXX");
    if (named != 0 || access(file, X_OK) != 0 || !mkdtemp(c.dir)) {
        CHECK(0, "%s is built and a temporary directory can be made", file);
        return;
    }
    char path[256];
    int rc = 0;
    static const char *dirs[] = {"all", "shards", "err", "prompts"};
    for (int k = 0; k < 4; k++) {
        snprintf(path, sizeof path, "%s/%s", c.dir, dirs[k]);
        rc |= mkdir(path, 0755);
    }
    snprintf(path, sizeof path, "%s/a.safetensors", c.dir);
    rc |= write_embeddings(path, 1);
    snprintf(path, sizeof path, "%s/b,c.safetensors", c.dir);
    rc |= write_embeddings(path, 2);
    snprintf(path, sizeof path, "%s/set.csv", c.dir);
    rc |= write_text(path, "embeddings,seed\r\na.safetensors,4444\r\n\r\n\"b,c.safetensors\",7\r\n");
    CHECK(rc == 0, "write the test's inputs into %s", c.dir);
    if (rc == 0) {
        test_eval_run(&c);
        test_eval_errors(&c);
        test_search(&c);
        test_prompts(&c);
        test_oracle_items(&c);
        test_klein_prompts(&c);
    }
    remove_tree(c.dir);
}

int main(int argc, char **argv) {
    (void)argc;
    test_metrics();
    test_oracle_metrics();
    test_cli(argv[0]);
    return harness_finish("test_eval");
}
