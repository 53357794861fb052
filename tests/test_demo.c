/* test_demo.c - `diamond demo` (and `diamond` alone) end to end: on the tiny random fixtures laid
 * out as an embedded weights directory it finds flagged pairs, writes the picture at its size and
 * prints the table; bad options exit 2; a missing weights directory exits 1 saying how to make
 * one; the shipped weights in weights/ run the real demo (their absence fails). Also `diamond
 * train`'s usage errors. */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../io.h"
#include "../train/world.h"
#include "harness.h"

typedef struct Cli {
    char binary[1024], dir[64], cmd[4096], log[128];
} Cli;

/* The command's exit status (-1 when it does not fit c->cmd); stdout and stderr into c->log. */
static int run(Cli *c, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static int run(Cli *c, const char *fmt, ...) {
    char args[3072];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    int n = snprintf(c->cmd, sizeof c->cmd, "%s %s > %s 2>&1", c->binary, args, c->log);
    if (n < 0 || (size_t)n >= sizeof c->cmd) return -1;
    int rc = system(c->cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static bool log_has(const Cli *c, const char *needle) {
    FILE *f = fopen(c->log, "r");
    char buf[8192] = {0};
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = 0;
    return strstr(buf, needle) != NULL;
}

/* The fixtures as weights/ lays out its models, with weights/'s own sampling defaults. */
static int fixture_weights(const Cli *c, char *dir, size_t len) {
    static const char *const links[][2] = {
        {"transformer", "tiny-flux2/transformer"}, {"vae", "tiny-flux2/vae"},
        {"text_encoder", "tiny-flux2/text_encoder"}, {"detector", "tiny-detector"},
        {"sampling.json", "../../weights/sampling.json"}};
    char cwd[1024], from[1600], to[1600];
    if (!getcwd(cwd, sizeof cwd)) return -1;
    snprintf(dir, len, "%s/weights", c->dir);
    if (mkdir(dir, 0755)) return -1;
    for (size_t k = 0; k < COUNT(links); k++) {
        snprintf(from, sizeof from, "%s/tests/fixtures/%s", cwd, links[k][1]);
        snprintf(to, sizeof to, "%s/%s", dir, links[k][0]);
        if (symlink(from, to)) return -1;
    }
    return 0;
}

/* weights/sampling.json: generate and eval take the embedded models' settings from it, a flag
 * overrides one, and a file that sets what a model may not, or a bad value, is an error (exit 1)
 * naming the file. */
static void test_model_defaults(Cli *c) {
    static const char *const flags = "--steps 4 -W 64 -H 32 --mu 0 --cfg 3 "
                                     "--lambda-schedule linear:start=16,end=2 --loss mse";
    char a[256], b[256], dir[256], path[300];
    snprintf(a, sizeof a, "%s/own.png", c->dir);
    snprintf(b, sizeof b, "%s/flags.png", c->dir);
    const char *base = "generate --model weights --detector weights/detector --prompt CAT --seed 3 "
                       "--threads 1 --quiet";
    int rc = run(c, "%s -o %s", base, a);
    CHECK(rc == 0 && run(c, "%s %s -o %s", base, flags, b) == 0 && harness_same_file(a, b),
          "generate with weights/ and no tuning flags is generate with the README's flags (%d)",
          rc);
    CHECK(run(c, "%s --steps 2 -o %s", base, b) == 0 && !harness_same_file(a, b) &&
              run(c, "info %s", b) == 0 && log_has(c, "steps=2 size=64x32"),
          "a flag overrides the model's default");
    snprintf(dir, sizeof dir, "%s/bad-model", c->dir);
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/sampling.json", dir);
    static const struct {
        const char *text, *says;
    } bad[] = {{"{\"-o\": \"x.png\"}", "'-o' is not one of the options a model may set"},
               {"{\"--steps\": 0}", "sampling.json: --steps: expected a whole number"},
               {"{\"--loss\": true}", "'--loss' must be a string or a number"},
               {"[1]", "not a JSON object"}};
    for (size_t i = 0; i < COUNT(bad); i++) {
        Error e = {{0}};
        write_file_atomic(path, bad[i].text, strlen(bad[i].text), &e);
        rc = run(c, "generate --model %s --prompt x -o %s --no-guide", dir, a);
        CHECK(rc == 1 && log_has(c, bad[i].says), "sampling.json %s: exit 1 saying '%s' (%d)",
              bad[i].text, bad[i].says, rc);
    }
    remove(path);
    rmdir(dir);
    remove(a);
    remove(b);
}

static void test_fixture_demo(Cli *c) {
    char weights[256], out[256];
    if (fixture_weights(c, weights, sizeof weights)) {
        CHECK(0, "lay out the fixtures in %s", c->dir);
        return;
    }
    snprintf(out, sizeof out, "%s/demo.ppm", c->dir);
    int rc = run(c, "demo --weights %s -o %s --pairs 2 --threads 1", weights, out);
    CHECK(rc == 0 && log_has(c, "2 pairs") && log_has(c, "detector artifact frequency %") &&
              log_has(c, "oracle read accuracy"),
          "the demo runs on the fixtures and prints its table (%d): %s", rc, c->cmd);
    Image img = {0};
    Error e = {{0}};
    CHECK(ppm_read(&img, out, &e) == 0 && img.width == 4 * 4 * WORLD_W + 5 * 8 &&
              img.height == 30 + 2 * (22 + 4 * WORLD_H + 8),
          "the picture has two rows of four 4x panels: %dx%d %s", img.width, img.height, e.msg);
    image_free(&img);
    CHECK(run(c, "--weights %s -o %s --pairs 1 --threads 1", weights, out) == 0 &&
              log_has(c, "1 pairs"),
          "the demo's options without the word demo run the demo: %s", c->cmd);
    CHECK(run(c, "--bogus 1") == 2 && log_has(c, "diamond demo: unknown option '--bogus'"),
          "an unknown option without a command is the demo's usage error");
    CHECK(run(c, "demo --weights %s --pairs 0", weights) == 2, "--pairs 0 exits 2");
    CHECK(run(c, "demo --weights %s -o x.jpg", weights) == 2 && log_has(c, ".png or .ppm"),
          "an unknown picture type exits 2");
    CHECK(run(c, "demo --bogus 1") == 2, "an unknown option exits 2");
    CHECK(run(c, "demo --weights %s/none -o %s", c->dir, out) == 1 && log_has(c, "make weights"),
          "missing weights exit 1 and say how to make them");
    CHECK(run(c, "demo --help") == 0 && log_has(c, "usage: diamond [demo]"), "demo --help");
}

/* `diamond train`'s command line: what it refuses exits 2 before anything is read or trained. */
/* Every command and benchmark answers --help on stdout with exit 0. */
static void test_help(Cli *c) {
    static const char *const commands[] = {
        "", "demo", "generate", "encode", "eval", "search-seeds", "world", "train", "train vae",
        "info", "bench", "bench gemm", "bench conv", "bench attention", "bench model",
        "bench step", "bench text", "bench precision"};
    for (size_t i = 0; i < COUNT(commands); i++)
        CHECK(run(c, "%s --help", commands[i]) == 0 && log_has(c, "usage"),
              "diamond %s --help exits 0 with its usage", commands[i]);
    /* the defaults come from the option tables, printed beside each option */
    CHECK(run(c, "generate --help") == 0 && log_has(c, "(default power:gamma=3)") &&
              log_has(c, "(default power)") && log_has(c, "(default 4)"),
          "generate --help prints the loss, schedule and guidance defaults from the table");
    CHECK(run(c, "search-seeds --help") == 0 && log_has(c, "(default 4444)") &&
              log_has(c, "(default 1000)") && log_has(c, "(default 0.5)"),
          "search-seeds --help prints --start, --max-tries and --threshold defaults");
    CHECK(run(c, "train --help") == 0 && log_has(c, "(default 1)"),
          "train --help prints --clip's default");
}

static void test_train_usage(Cli *c) {
    CHECK(run(c, "train bogus --config x --out y") == 2 && log_has(c, "say what to train"),
          "an unknown model exits 2");
    CHECK(run(c, "train vae --config x --out y --ema 1") == 2 && log_has(c, "--ema"),
          "--ema 1 exits 2 (a decay must be below 1)");
    CHECK(run(c, "train vae --config x --out y --latent-noise 0.1") == 2 &&
              log_has(c, "--latent-noise is for vae-decoder"),
          "--latent-noise outside vae-decoder exits 2");
    CHECK(run(c, "train vae --config x --out y --uncond 0.1") == 2 &&
              log_has(c, "--uncond is for text+flow"),
          "--uncond outside text+flow exits 2");
    CHECK(run(c, "train text+flow --config x --out y --vae z --uncond 1") == 2 &&
              log_has(c, "--uncond"), "--uncond 1 exits 2 (a share below 1)");
    CHECK(run(c, "train vae --config x --out y --flow z") == 2 &&
              log_has(c, "are for detector"), "--flow outside detector exits 2");
    CHECK(run(c, "train detector --config x --out y --samples 100") == 2 &&
              log_has(c, "need --flow"), "--samples without --flow exits 2");
    CHECK(run(c, "train detector --config x --out y --flow z --samples 5") == 2 &&
              log_has(c, "at least 10"), "--samples 5 exits 2");
    CHECK(run(c, "train text+flow --config x --out y") == 2 && log_has(c, "give --vae"),
          "text+flow without --vae exits 2");
    CHECK(run(c, "train --help") == 0 && log_has(c, "--latent-noise S") && log_has(c, "--ema D") &&
              log_has(c, "--uncond P") && log_has(c, "--flow DIR") && log_has(c, "--exclude CSV"),
          "train --help lists --ema, --latent-noise, --uncond, --flow and --exclude");
}

/* bench gemm's transposes: op(A) and op(B) as named on its line; an unknown option exits 2. */
static void test_bench_gemm_options(Cli *c) {
    CHECK(run(c, "bench gemm 7 5 3 --trans-a --trans-b --threads 1") == 0 &&
              log_has(c, "M=7 N=5 K=3 trans_a trans_b threads=1") && log_has(c, "GFLOPS="),
          "bench gemm --trans-a --trans-b runs and says so");
    CHECK(run(c, "bench gemm 7 5 3 --threads 1 --trans-b") == 0 &&
              log_has(c, "K=3 trans_b threads=1"), "bench gemm takes its options in any order");
    CHECK(run(c, "bench gemm 7 5 3 --trans-c") == 2 && log_has(c, "unknown option '--trans-c'") &&
              log_has(c, "diamond bench gemm M N K"),
          "bench gemm --trans-c exits 2 with its usage");
    CHECK(run(c, "bench conv --help") == 0 && log_has(c, "--groups G") &&
              log_has(c, "(default 1)") && !log_has(c, "bench gemm"),
          "bench conv --help: its usage and its options from its table, no other benchmark");
    CHECK(run(c, "bench frobnicate") == 2 && log_has(c, "unknown benchmark"),
          "an unknown benchmark exits 2");
    CHECK(run(c, "bench model --model tests/fixtures/tiny-flux2 --detector "
                 "tests/fixtures/tiny-detector -W 32 -H 32 --threads 1 --runs 0") == 2 &&
              log_has(c, "--runs"),
          "bench model --runs 0 exits 2, naming --runs");
    CHECK(run(c, "bench model --model tests/fixtures/tiny-flux2 --detector "
                 "tests/fixtures/tiny-detector -W 32 -H 32 --threads 1 --runs 3") == 0 &&
              log_has(c, "transformer forward"),
          "bench model --runs 3 runs");
    CHECK(run(c, "bench gemm 7 5 3 --trans-b --precision bf16 --threads 1") == 0 &&
              log_has(c, "K=3 trans_b bf16") && log_has(c, "GFLOPS="),
          "bench gemm --precision bf16 runs and says so");
    CHECK(run(c, "bench gemm 7 5 3 --precision f64") == 2 && log_has(c, "expected f32 or bf16"),
          "bench gemm --precision f64 exits 2");
    CHECK(run(c, "bench precision --model tests/fixtures/tiny-flux2 --detector "
                 "tests/fixtures/tiny-detector -W 32 -H 32 --text-len 7 --steps 2 --guide "
                 "--threads 1") == 0 &&
              log_has(c, "2 guided steps") && log_has(c, "step 2/2 sigma") &&
              log_has(c, "8-bit pixels bf16 - f32") && log_has(c, "run seconds: f32"),
          "bench precision runs both precisions, step by step, and compares the images");
}

/* The shipped models (committed in weights/; `make weights` trains them again): a checkout
 * without them is a failure, not a skipped test. */
static void test_embedded_demo(Cli *c) {
    bool shipped = access("weights/transformer/diffusion_pytorch_model.safetensors", R_OK) == 0;
    CHECK(shipped, "the trained weights are in weights/ (committed; `make weights` remakes them)");
    if (!shipped) return;
    char out[256];
    snprintf(out, sizeof out, "%s/embedded.png", c->dir);
    int rc = run(c, "demo -o %s --pairs 1 --quiet", out);
    CHECK(rc == 0 && access(out, R_OK) == 0 && log_has(c, "1 pairs"),
          "the embedded demo runs and writes its picture (%d)", rc);
}

int main(int argc, char **argv) {
    (void)argc;
    Cli c;
    char file[512];
    int named = harness_binary(argv[0], file, sizeof file, c.binary, sizeof c.binary);
    snprintf(c.dir, sizeof c.dir, "/tmp/test_demo.XXXXXX");
    if (named != 0 || access(file, X_OK) != 0 || !mkdtemp(c.dir)) {
        CHECK(0, "%s is built and a temporary directory can be made", file);
        return harness_finish("test_demo");
    }
    snprintf(c.log, sizeof c.log, "%s/log", c.dir);
    test_fixture_demo(&c);
    test_train_usage(&c);
    test_help(&c);
    test_bench_gemm_options(&c);
    test_embedded_demo(&c);
    test_model_defaults(&c);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", c.dir);
    if (system(cmd) != 0) printf("could not remove %s\n", c.dir);
    return harness_finish("test_demo");
}
