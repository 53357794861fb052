/* test_text_encoder.c - diamond's character-level text encoder against
 * tools/golden_text_encoder.py (PyTorch, float64): the embeddings of three prompts (mixed case,
 * full length, empty), the gradient of sum(probe * out) for every weight, finite differences on a
 * few, and the tokenizer's errors. Fixture: tests/fixtures/tiny-text-encoder. Then
 * `diamond generate --prompt` on tests/fixtures/tiny-flux2 (whose text_encoder/ matches its
 * transformer): the same image as --embeddings with the encoder's output. */
#include <math.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../nn.h"
#include "harness.h"

#define FIXTURE "tests/fixtures/tiny-text-encoder"
#define BATCH 3

static const char *const PROMPTS[BATCH] = {"Hi", "a1B2c3", ""};

typedef struct ProbeLoss {
    const TextEncoder *m;
    const float *probe;
} ProbeLoss;

/* sum(probe * text_encode(PROMPTS)) with grad off */
static double probe_loss(void *ctx) {
    ProbeLoss *p = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *y = text_encode(t, p->m, PROMPTS, BATCH, NULL);
    double sum = 0.0;
    for (int64_t i = 0; y && i < y->value->numel; i++)
        sum += (double)y->value->data[i] * p->probe[i];
    tape_free(t);
    return sum;
}

static Var *find_param(const Params *p, const char *name) {
    for (int i = 0; i < params_count(p); i++)
        if (!strcmp(params_name(p, i), name)) return params_var(p, i);
    return NULL;
}

static void test_golden(const SafeTensors *st) {
    TextEncoder *m = NULL;
    Error e = {{0}};
    CHECK(text_encoder_open(&m, FIXTURE, WEIGHTS_FILES, 0, &e) == 0, "load %s: %s", FIXTURE, e.msg);
    if (!m) return;
    const TextEncoderConfig *c = text_encoder_config(m);
    CHECK(c->vocab_size == 36 && c->max_length == 6 && c->hidden_size == 16 &&
              c->num_layers == 2 && c->num_heads == 2 && c->intermediate_size == 32,
          "config: vocab %d, length %d, hidden %d", c->vocab_size, c->max_length,
          c->hidden_size);
    Params *params = text_encoder_params(m);
    params_set_trainable(params, true);
    size_t n = (size_t)BATCH * 6 * 16;
    float *want = golden_load(st, "out", n), *probe = golden_load(st, "probe", n);
    Tape *t = tape_new();
    Var *y = text_encode(t, m, PROMPTS, BATCH, &e);
    CHECK(y && y->value->ndim == 3 && y->value->shape[0] == BATCH && y->value->shape[1] == 6 &&
              y->value->shape[2] == 16,
          "text_encode -> [3, 6, 16]: %s", e.msg);
    if (y && want && probe) {
        check_close("embeddings of 'Hi', 'a1B2c3', ''", y->value->data, want, n, 1e-5f, 1e-5f);
        Tensor *r = tensor_new(3, y->value->shape);
        if (r) memcpy(r->data, probe, n * sizeof(float));
        Var *loss = ag_sum(t, ag_mul(t, y, var_take(t, r, false)));
        CHECK(tape_check(t, &e) == 0 && tape_backward(t, loss, &e) == 0, "backward: %s", e.msg);
        /* float32 against float64 through two layers */
        for (int i = 0; i < params_count(params); i++) {
            char key[160];
            snprintf(key, sizeof key, "grad.%s", params_name(params, i));
            Var *w = params_var(params, i);
            float *g = golden_load(st, key, (size_t)w->value->numel);
            if (g && w->grad)
                check_close(key, w->grad->data, g, (size_t)w->value->numel, 1e-4f, 1e-5f);
            CHECK(w->grad != NULL, "%s has a gradient", key);
            free(g);
        }
        ProbeLoss p = {m, probe};
        static const char *fd[] = {"token_embedding.weight", "position_embedding.weight",
                                   "layers.0.attn.to_k.weight", "layers.1.attn.to_v.bias",
                                   "layers.0.mlp.fc1.weight", "layers.1.norm2.weight",
                                   "final_norm.bias"};
        for (size_t i = 0; i < sizeof fd / sizeof *fd; i++) {
            Var *w = find_param(params, fd[i]);
            char what[160];
            snprintf(what, sizeof what, "FD d loss / d %s", fd[i]);
            if (w && w->grad)
                check_gradient(what, probe_loss, &p, w->value->data, w->grad->data,
                               (size_t)w->value->numel, (size_t)w->value->numel / 29 + 1, 1e-2f,
                               1e-2f, 1e-3f);
            else
                CHECK(0, "%s: no gradient", fd[i]);
        }
    }
    tape_free(t);
    free(want);
    free(probe);
    text_encoder_free(m);
}

static void test_tokenize(void) {
    TextEncoder *m = NULL;
    Error e = {{0}};
    CHECK(text_encoder_open(&m, FIXTURE, WEIGHTS_FRESH, 3, &e) == 0, "init: %s", e.msg);
    if (!m) return;
    int ids[6], length = -1;
    CHECK(text_encoder_tokenize(m, "aZ09", ids, &length, &e) == 0 && length == 4 && ids[0] == 1 &&
              ids[1] == 26 && ids[2] == 27 && ids[3] == 36 && ids[4] == 0 && ids[5] == 0,
          "'aZ09' -> 1 26 27 36 0 0 (upper-cased, padded): %s", e.msg);
    CHECK(text_encoder_tokenize(m, "AB-C", ids, &length, &e) != 0 && strstr(e.msg, "'-'"),
          "an unknown character is named: %s", e.msg);
    CHECK(text_encoder_tokenize(m, "ABCDEFG", ids, &length, &e) != 0 && strstr(e.msg, "at most 6"),
          "a prompt longer than max_length is refused: %s", e.msg);
    CHECK(text_encoder_tokenize(m, "\xc3\x89\xc3\x89\xc3\x89\xc3\x89", ids, &length, &e) != 0 &&
              strstr(e.msg, "character '\xc3\x89' is not in"),
          "4 characters of 8 bytes are 4 characters; the one outside the vocabulary is named "
          "whole: %s", e.msg);
    CHECK(text_encoder_tokenize(m, "\xc3\x89\xc3\x89\xc3\x89\xc3\x89\xc3\x89\xc3\x89\xc3\x89",
                                ids, &length, &e) != 0 &&
              strstr(e.msg, "has 7 characters, the text encoder takes at most 6"),
          "characters are counted as characters: %s", e.msg);
    Tape *t = tape_new();
    CHECK(text_encode(t, m, (const char *[]){"OK", "no way"}, 2, &e) == NULL &&
              strstr(e.msg, "' '"),
          "text_encode passes the tokenizer's error on: %s", e.msg);
    tape_free(t);
    /* padding: a prompt's embeddings at its own positions do not depend on what follows in the
     * batch, and the encoder is deterministic */
    t = tape_new();
    tape_set_grad(t, false);
    Var *a = text_encode(t, m, (const char *[]){"AB", "XYZ"}, 2, &e);
    Var *b = text_encode(t, m, (const char *[]){"AB"}, 1, &e);
    CHECK(a && b && !memcmp(a->value->data, b->value->data, 6 * 16 * sizeof(float)),
          "batch items are independent: %s", e.msg);
    tape_free(t);
    text_encoder_free(m);
    TextEncoder *bad = NULL;
    const char *other = "tests/fixtures/tiny-flux2/transformer";
    CHECK(text_encoder_open(&bad, other, WEIGHTS_FILES, 0, &e) != 0 && !bad &&
              strstr(e.msg, "_class_name"),
          "another model's config is refused: %s", e.msg);
}

static void test_generate_prompt(const char *argv0) {
    char binary[1024], file[512], dir[] = "/tmp/test_text_encoder.XXXXXX", cmd[4096], path[600];
    int named = harness_binary(argv0, file, sizeof file, binary, sizeof binary);
    if (named != 0 || access(file, X_OK) != 0 || !mkdtemp(dir)) {
        CHECK(0, "%s is built and a temporary directory can be made", file);
        return;
    }
    TextEncoder *m = NULL;
    Error e = {{0}};
    const char *text_dir = "tests/fixtures/tiny-flux2/text_encoder";
    CHECK(text_encoder_open(&m, text_dir, WEIGHTS_FILES, 0, &e) == 0, "load: %s", e.msg);
    Tape *t = tape_new();
    Var *y = m ? text_encode(t, m, (const char *[]){"k9"}, 1, &e) : NULL;
    snprintf(path, sizeof path, "%s/emb.safetensors", dir);
    StWriteTensor emb = {"prompt_embeds", DTYPE_F32, 2, {6, 24}, y ? y->value->data : NULL};
    CHECK(y && st_write(path, &emb, 1, &e) == 0, "write the embeddings: %s", e.msg);
    const char *base = "%s generate --model tests/fixtures/tiny-flux2 --no-guide --seed 3 "
                       "--steps 2 -W 24 -H 16 --quiet -o %s/%s.ppm %s";
    snprintf(cmd, sizeof cmd, base, binary, dir, "prompt", "--prompt k9");
    CHECK(harness_run_quiet(cmd) == 0, "generate --prompt runs: %s", cmd);
    char arg[700];
    snprintf(arg, sizeof arg, "--embeddings %s", path);
    snprintf(cmd, sizeof cmd, base, binary, dir, "emb", arg);
    CHECK(harness_run_quiet(cmd) == 0, "generate --embeddings runs: %s", cmd);
    char a[600], b[600];
    snprintf(a, sizeof a, "%s/prompt.ppm", dir);
    snprintf(b, sizeof b, "%s/emb.ppm", dir);
    CHECK(harness_same_file(a, b), "--prompt k9 gives the image of --embeddings text_encode(k9)");
    snprintf(cmd, sizeof cmd, base, binary, dir, "bad", "--prompt k-9");
    CHECK(harness_run_quiet(cmd) == 1, "an unknown character in --prompt is a runtime error (exit 1)");
    snprintf(cmd, sizeof cmd, "%s generate --model tests/fixtures/tiny-flux2-bf16 --no-guide "
             "--seed 3 --steps 2 -W 24 -H 16 --quiet -o %s/x.ppm --prompt k9", binary, dir);
    CHECK(harness_run_quiet(cmd) == 1, "--prompt with a model without text_encoder/ fails (exit 1)");
    remove(a);
    remove(b);
    remove(path);
    rmdir(dir);
    tape_free(t);
    text_encoder_free(m);
}

int main(int argc, char **argv) {
    (void)argc;
    SafeTensors *st = golden_open("tests/golden/text_encoder.safetensors");
    if (st) {
        test_golden(st);
        st_close(st);
    }
    test_tokenize();
    test_generate_prompt(argv[0]);
    return harness_finish("test_text_encoder");
}
