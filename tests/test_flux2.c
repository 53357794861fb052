/* test_flux2.c - the FLUX.2 transformer against tools/ref_flux2.py (PyTorch, float64).
 *
 * Fixtures: tests/fixtures/tiny-flux2/transformer (f32, sharded, klein-like: no guidance
 * embedder), tiny-flux2-bf16 (the same weights in bf16), tiny-flux2-guidance (with a guidance
 * embedder). A 3 x 5 token grid (and a 17 x 16 one), 7 text tokens. Broken copies for the error
 * cases are made in a fresh mkdtemp directory, removed at the end. */
#include <math.h>
#include <stdlib.h>
#include <unistd.h>

#include "../nn.h"
#include "harness.h"

#define FIXTURE "tests/fixtures/tiny-flux2/transformer"
#define GRID_H 3
#define GRID_W 5
/* f32 against a float64 reference: the error is float32 rounding through ~50 ops. */
#define RTOL 1e-4f
#define ATOL 1e-4f

/* The golden tensor `name` of `numel` values as a Tensor of `shape`. */
static Tensor *golden_tensor(const SafeTensors *st, const char *name, int ndim,
                             const int64_t *shape) {
    Tensor *t = tensor_new(ndim, shape);
    float *data = t ? golden_load(st, name, (size_t)t->numel) : NULL;
    if (!data) {
        tensor_free(t);
        return NULL;
    }
    memcpy(t->data, data, (size_t)t->numel * sizeof(float));
    free(data);
    return t;
}

static Flux2 *load(const char *dir) {
    Flux2 *m = NULL;
    Error e = {{0}};
    CHECK(flux2_load(&m, dir, &e) == 0, "load %s: %s", dir, e.msg);
    return m;
}

/* Runs the model and compares with the golden velocity `want`; returns the velocity. */
static Tensor *check_forward(const Flux2 *m, const char *what, const Tensor *tokens,
                             const Tensor *txt, const float *sigma, const float *guidance,
                             const SafeTensors *st, const char *want, float rtol, float atol) {
    Tensor *v = NULL;
    Error e = {{0}};
    CHECK(flux2_forward(m, tokens, GRID_H, GRID_W, txt, sigma, guidance, &v, &e) == 0,
          "%s: forward: %s", what, e.msg);
    float *ref = v ? golden_load(st, want, (size_t)v->numel) : NULL;
    if (ref) check_close(what, v->data, ref, (size_t)v->numel, rtol, atol);
    free(ref);
    return v;
}

static void test_golden(const SafeTensors *st) {
    Flux2 *m = load(FIXTURE);
    Tensor *tokens1 = golden_tensor(st, "tokens1", SHAPE(1, 15, 16));
    Tensor *txt1 = golden_tensor(st, "txt1", SHAPE(1, 7, 24));
    Tensor *tokens2 = golden_tensor(st, "tokens2", SHAPE(2, 15, 16));
    Tensor *txt2 = golden_tensor(st, "txt2", SHAPE(2, 7, 24));
    if (m && tokens1 && txt1 && tokens2 && txt2) {
        const Flux2Config *c = flux2_config(m);
        CHECK(c->dim == 32 && c->mlp_hidden == 96 && c->out_channels == 16 && c->patch_size == 1 &&
                  !c->guidance_embeds && c->axes_dims[3] == 4 && c->rope_theta == 2000.0,
              "config: dim %d, mlp %d, out %d (null -> in_channels), patch %d", c->dim,
              c->mlp_hidden, c->out_channels, c->patch_size);
        Tensor *a = check_forward(m, "batch 1, sigma 0.7", tokens1, txt1, (float[]){0.7f}, NULL,
                                  st, "v1_a", RTOL, ATOL);
        Tensor *b = check_forward(m, "batch 1, then sigma 0.3", tokens1, txt1, (float[]){0.3f},
                                  NULL, st, "v1_b", RTOL, ATOL);
        Tensor *again = check_forward(m, "batch 1, sigma 0.7 again", tokens1, txt1,
                                      (float[]){0.7f}, NULL, st, "v1_a", RTOL, ATOL);
        CHECK(a && again && memcmp(a->data, again->data, (size_t)a->numel * sizeof(float)) == 0,
              "a repeated call gives identical bits: no state carried between calls");
        Tensor *two = check_forward(m, "batch 2, sigmas 0.9 and 0.2", tokens2, txt2,
                                    (float[]){0.9f, 0.2f}, NULL, st, "v2", RTOL, ATOL);
        tensor_free(a);
        tensor_free(b);
        tensor_free(again);
        tensor_free(two);
    }
    tensor_free(tokens2);
    tensor_free(txt2);

    /* 17 x 16 image tokens: more than one of nn.c's chunks of tokens, and a chunk boundary inside
     * each stream and inside the joint sequence. */
    Tensor *big = golden_tensor(st, "tokens_big", SHAPE(1, 17 * 16, 16)), *v = NULL;
    Error e = {{0}};
    if (m && big && txt1) {
        CHECK(flux2_forward(m, big, 17, 16, txt1, (float[]){0.4f}, NULL, &v, &e) == 0,
              "17 x 16 grid: forward: %s", e.msg);
        float *ref = v ? golden_load(st, "v_big", (size_t)v->numel) : NULL;
        if (ref) check_close("17 x 16 grid, sigma 0.4", v->data, ref, (size_t)v->numel, RTOL, ATOL);
        free(ref);
    }
    tensor_free(v);
    tensor_free(big);

    /* The same weights rounded to bf16: the golden is computed from the rounded weights, so the
     * f32 tolerance holds. */
    Flux2 *bf16 = load("tests/fixtures/tiny-flux2-bf16/transformer");
    if (bf16 && tokens1 && txt1)
        tensor_free(check_forward(bf16, "bf16 weights, sigma 0.7", tokens1, txt1, (float[]){0.7f},
                                  NULL, st, "v_bf16", RTOL, ATOL));
    Flux2 *guided = load("tests/fixtures/tiny-flux2-guidance/transformer");
    if (guided && tokens1 && txt1)
        tensor_free(check_forward(guided, "guidance embedder, sigma 0.5, guidance 3.5", tokens1,
                                  txt1, (float[]){0.5f}, (float[]){3.5f}, st, "v_guidance", RTOL,
                                  ATOL));
    flux2_free(guided);
    flux2_free(bf16);

    if (m && tokens1 && txt1) {
        Tensor *v = NULL;
        Error e = {{0}};
        CHECK(flux2_forward(m, tokens1, GRID_W, GRID_W, txt1, (float[]){0.5f}, NULL, &v, &e) != 0 &&
                  v == NULL && strstr(e.msg, "tokens"),
              "a token count that is not h * w is refused: %s", e.msg);
        CHECK(flux2_forward(m, txt1, GRID_H, GRID_W, txt1, (float[]){0.5f}, NULL, &v, &e) != 0 &&
                  v == NULL,
              "tokens of the wrong width are refused: %s", e.msg);
    }
    tensor_free(tokens1);
    tensor_free(txt1);
    flux2_free(m);
}

/* ---- broken copies of the fixture ---- */

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}

static void write_text(const char *dir, const char *name, const char *text) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    Error e = {{0}};
    CHECK(write_file_atomic(path, text, strlen(text), &e) == 0, "write %s: %s", path, e.msg);
}

/* Copies the fixture file `name` into dir; text files with `from` replaced by `to` (once), or
 * with the line holding `from` dropped when to is NULL. */
static void copy_fixture(const char *dir, const char *name, const char *from, const char *to) {
    char path[1024];
    snprintf(path, sizeof path, FIXTURE "/%s", name);
    char *text = read_text(path);
    CHECK(text != NULL, "read %s", path);
    if (!text) return;
    char *at = from ? strstr(text, from) : NULL;
    CHECK(!from || at, "%s holds %s", path, from ? from : "");
    if (at && to) {
        size_t head = (size_t)(at - text), tail = strlen(at + strlen(from));
        char *out = malloc(head + strlen(to) + tail + 1);
        memcpy(out, text, head);
        strcpy(out + head, to);
        strcat(out, at + strlen(from));
        free(text);
        text = out;
    } else if (at) {
        char *line = at, *next = strchr(at, '\n');
        while (line > text && line[-1] != '\n') line--;
        next = next ? next + 1 : at + strlen(at);
        memmove(line, next, strlen(next) + 1);
    }
    write_text(dir, name, text);
    free(text);
}

/* The binary shards are copied as they are. */
static void copy_shard(const char *dir, int shard) {
    char name[128], path[1024];
    snprintf(name, sizeof name, "diffusion_pytorch_model-%05d-of-00002.safetensors", shard);
    snprintf(path, sizeof path, FIXTURE "/%s", name);
    FILE *f = fopen(path, "rb");
    char *bytes = malloc(1 << 20);
    size_t n = f && bytes ? fread(bytes, 1, 1 << 20, f) : 0;
    if (f) fclose(f);
    CHECK(n > 0 && n < (1 << 20), "read %s", path);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    Error e = {{0}};
    CHECK(write_file_atomic(path, bytes, n, &e) == 0, "write %s: %s", path, e.msg);
    free(bytes);
}

static void remove_dir(const char *dir) {
    char **names;
    size_t count;
    Error e = {{0}};
    if (dir_list(dir, &names, &count, &e)) return;
    for (size_t i = 0; i < count; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
    dir_list_free(names, count);
    rmdir(dir);
}

/* Makes a broken copy in a fresh directory, expects flux2_load to fail with a message holding
 * `says` (and `also` when not NULL). */
typedef void (*BreakFn)(const char *dir);

static void expect_load_error(const char *what, BreakFn make, const char *says, const char *also) {
    char dir[] = "/tmp/diamond-test-flux2-XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp for %s", what);
        return;
    }
    make(dir);
    Flux2 *m = NULL;
    Error e = {{0}};
    int rc = flux2_load(&m, dir, &e);
    CHECK(rc != 0 && m == NULL && strstr(e.msg, says) && (!also || strstr(e.msg, also)),
          "%s: %s", what, e.msg);
    flux2_free(m);
    remove_dir(dir);
}

static const char *INDEX = "diffusion_pytorch_model.safetensors.index.json";

static void break_missing_tensor(const char *dir) {
    copy_fixture(dir, "config.json", NULL, NULL);
    copy_fixture(dir, INDEX, "\"single_transformer_blocks.0.attn.norm_k.weight\"", NULL);
    copy_shard(dir, 1);
    copy_shard(dir, 2);
}

static void break_more_layers(const char *dir) {
    copy_fixture(dir, "config.json", "\"num_layers\": 2", "\"num_layers\": 3");
    copy_fixture(dir, INDEX, NULL, NULL);
    copy_shard(dir, 1);
    copy_shard(dir, 2);
}

static void break_shape(const char *dir) {
    copy_fixture(dir, "config.json", "\"joint_attention_dim\": 24", "\"joint_attention_dim\": 20");
    copy_fixture(dir, INDEX, NULL, NULL);
    copy_shard(dir, 1);
    copy_shard(dir, 2);
}

static void break_absent_shard(const char *dir) {
    copy_fixture(dir, "config.json", NULL, NULL);
    copy_fixture(dir, INDEX, NULL, NULL);
    copy_shard(dir, 1);
}

static void break_config_key(const char *dir) {
    copy_fixture(dir, "config.json", "\"num_single_layers\": 2,", NULL);
    copy_fixture(dir, INDEX, NULL, NULL);
    copy_shard(dir, 1);
    copy_shard(dir, 2);
}

static void break_axes(const char *dir) {
    copy_fixture(dir, "config.json", "\"attention_head_dim\": 16", "\"attention_head_dim\": 18");
}

static void test_errors(void) {
    expect_load_error("a tensor missing from the index is named", break_missing_tensor,
                      "single_transformer_blocks.0.attn.norm_k.weight", "missing");
    expect_load_error("a block the config asks for but the files lack is named", break_more_layers,
                      "transformer_blocks.2.attn.to_q.weight", NULL);
    expect_load_error("a tensor whose shape the config contradicts is named with both shapes",
                      break_shape, "context_embedder.weight", "[32, 20]");
    expect_load_error("a shard the index lists but the directory lacks is named",
                      break_absent_shard, "00002-of-00002", NULL);
    expect_load_error("a missing config key is named", break_config_key, "num_single_layers",
                      NULL);
    expect_load_error("RoPE axes that do not fill the head are refused", break_axes,
                      "axes_dims_rope", NULL);
}

/* flux2_load_config_only: the tiny config with made-up weights loads and runs (on a grid of
 * more than one chunk of tokens), the same seed gives the same bits, another seed others. */
static void test_config_only(void) {
    Flux2 *m = NULL, *same = NULL, *other = NULL;
    Error e = {{0}};
    CHECK(flux2_load_config_only(&m, FIXTURE "/config.json", 1, &e) == 0 &&
              flux2_load_config_only(&same, FIXTURE "/config.json", 1, &e) == 0 &&
              flux2_load_config_only(&other, FIXTURE "/config.json", 2, &e) == 0,
          "config-only load: %s", e.msg);
    Flux2 *absent = NULL;
    CHECK(flux2_load_config_only(&absent, "tests/fixtures/absent.json", 1, &e) != 0 && !absent &&
              strstr(e.msg, "absent.json"),
          "a missing config is named: %s", e.msg);
    int h = 17, w = 16;
    Tensor *tokens = TENSOR_NEW(1, h * w, 16), *txt = TENSOR_NEW(1, 7, 24);
    unsigned long long state = 5;
    for (int64_t i = 0; tokens && i < tokens->numel; i++) tokens->data[i] = harness_rand(&state);
    for (int64_t i = 0; txt && i < txt->numel; i++) txt->data[i] = harness_rand(&state);
    Tensor *v[3] = {NULL, NULL, NULL};
    Flux2 *models[3] = {m, same, other};
    for (int k = 0; k < 3 && m && same && other; k++)
        CHECK(flux2_forward(models[k], tokens, h, w, txt, (float[]){0.6f}, NULL, &v[k], &e) == 0,
              "config-only forward %d: %s", k, e.msg);
    if (v[0] && v[1] && v[2]) {
        bool finite = true;
        for (int64_t i = 0; i < v[0]->numel; i++) finite &= fabsf(v[0]->data[i]) < 1e3f;
        size_t bytes = (size_t)v[0]->numel * sizeof(float);
        CHECK(finite, "config-only velocity is finite and O(1): %g", v[0]->data[0]);
        CHECK(!memcmp(v[0]->data, v[1]->data, bytes), "the same seed gives the same velocity");
        CHECK(memcmp(v[0]->data, v[2]->data, bytes), "another seed gives another velocity");
    }
    for (int k = 0; k < 3; k++) {
        tensor_free(v[k]);
        flux2_free(models[k]);
    }
    tensor_free(tokens);
    tensor_free(txt);
}

int main(void) {
    SafeTensors *st = golden_open("tests/golden/flux2.safetensors");
    if (st) {
        test_golden(st);
        st_close(st);
    }
    test_errors();
    test_config_only();
    return harness_finish("test_flux2");
}
