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
    CHECK(flux2_open(&m, dir, WEIGHTS_FILES, 0, &e) == 0, "load %s: %s", dir, e.msg);
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

/* Mean |a - b| over n values. */
static double mean_abs_diff(const float *a, const float *b, size_t n) {
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += fabs((double)a[i] - (double)b[i]);
    return n ? sum / (double)n : 0.0;
}

/* --precision bf16: the forward with bf16 products against the reference that rounds every
 * linear's input and weight to bf16 (v_bf16_products). Where the reference's float64 input and
 * our f32 one round to neighbouring bf16 values (about 1 in 2^16) an output moves by a bf16 step
 * of one product: within RTOL_BF16 / ATOL_BF16; on average it is as near as f32 is to its own
 * golden, and much nearer than the f32 forward is. A resident model refuses bf16. */
#define RTOL_BF16 1e-2f
#define ATOL_BF16 1e-3f
static void test_bf16_products(const SafeTensors *st) {
    Flux2 *m = load(FIXTURE);
    Tensor *tokens = golden_tensor(st, "tokens1", SHAPE(1, 15, 16));
    Tensor *txt = golden_tensor(st, "txt1", SHAPE(1, 7, 24));
    float *want = golden_load(st, "v_bf16_products", 15 * 16);
    Error e = {{0}};
    if (m && tokens && txt && want) {
        Tensor *f32 = check_forward(m, "f32 products, sigma 0.7", tokens, txt, (float[]){0.7f},
                                    NULL, st, "v1_a", RTOL, ATOL);
        CHECK(flux2_set_precision(m, PRECISION_BF16, &e) == 0, "bf16: %s", e.msg);
        Tensor *bf16 = check_forward(m, "bf16 products, sigma 0.7", tokens, txt, (float[]){0.7f},
                                     NULL, st, "v_bf16_products", RTOL_BF16, ATOL_BF16);
        if (f32 && bf16) {
            double ours = mean_abs_diff(bf16->data, want, 15 * 16);
            double f32_off = mean_abs_diff(f32->data, want, 15 * 16);
            CHECK(ours < 1e-5 && ours < f32_off / 100,
                  "bf16 products: mean |v - reference| %.3g, the f32 forward's %.3g", ours,
                  f32_off);
        }
        tensor_free(f32);
        tensor_free(bf16);
        Tensor *back = (flux2_set_precision(m, PRECISION_F32, &e),
                        check_forward(m, "f32 again", tokens, txt, (float[]){0.7f}, NULL, st,
                                      "v1_a", RTOL, ATOL));
        tensor_free(back);
        CHECK(flux2_make_resident(m, &e) == 0, "resident: %s", e.msg);
        CHECK(flux2_set_precision(m, PRECISION_BF16, &e) != 0 && strstr(e.msg, "resident"),
              "a resident model refuses bf16: %s", e.msg);
    }
    free(want);
    tensor_free(tokens);
    tensor_free(txt);
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

/* Makes a broken copy in a fresh directory, expects flux2_open to fail with a message holding
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
    int rc = flux2_open(&m, dir, WEIGHTS_FILES, 0, &e);
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

static void break_fewer_layers(const char *dir) {
    copy_fixture(dir, "config.json", "\"num_layers\": 2", "\"num_layers\": 1");
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

static void break_eps(const char *dir) {
    copy_fixture(dir, "config.json", "\"eps\": 1e-06", "\"eps\": 3");
}

static void break_axes(const char *dir) {
    copy_fixture(dir, "config.json", "\"attention_head_dim\": 16", "\"attention_head_dim\": 18");
}

static void test_errors(void) {
    expect_load_error("a tensor missing from the index is named", break_missing_tensor,
                      "single_transformer_blocks.0.attn.norm_k.weight", "missing");
    expect_load_error("a block the config asks for but the files lack is named", break_more_layers,
                      "transformer_blocks.2.attn.to_q.weight", NULL);
    expect_load_error("a config of fewer blocks than the files hold is refused (strict)",
                      break_fewer_layers, "tensors in the files that the config does not use",
                      "'transformer_blocks.1.");
    expect_load_error("a tensor whose shape the config contradicts is named with both shapes",
                      break_shape, "context_embedder.weight", "[32, 20]");
    expect_load_error("a shard the index lists but the directory lacks is named",
                      break_absent_shard, "00002-of-00002", NULL);
    expect_load_error("a missing config key is named", break_config_key, "num_single_layers",
                      NULL);
    expect_load_error("RoPE axes that do not fill the head are refused", break_axes,
                      "axes_dims_rope", NULL);
    expect_load_error("an eps that is no epsilon is refused", break_eps, "eps 3", "out of range");
}

/* flux2_open config-only: the tiny config with made-up weights loads and runs (on a grid of
 * more than one chunk of tokens), the same seed gives the same bits, another seed others. */
static void test_config_only(void) {
    Flux2 *m = NULL, *same = NULL, *other = NULL;
    Error e = {{0}};
    CHECK(flux2_open(&m, FIXTURE, WEIGHTS_CONFIG_ONLY, 1, &e) == 0 &&
              flux2_open(&same, FIXTURE, WEIGHTS_CONFIG_ONLY, 1, &e) == 0 &&
              flux2_open(&other, FIXTURE, WEIGHTS_CONFIG_ONLY, 2, &e) == 0,
          "config-only load: %s", e.msg);
    Flux2 *absent = NULL;
    CHECK(flux2_open(&absent, "tests/fixtures/absent", WEIGHTS_CONFIG_ONLY, 1, &e) != 0 &&
              !absent && strstr(e.msg, "absent/config.json"),
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

/* ---- the resident model and its graph ---- */

static Flux2 *load_resident(const char *dir) {
    Flux2 *m = NULL;
    Error e = {{0}};
    CHECK(flux2_open(&m, dir, WEIGHTS_FILES, 0, &e) == 0 && flux2_make_resident(m, &e) == 0,
          "resident load %s: %s", dir, e.msg);
    return m;
}

/* The graph path (flux2_forward of a resident model) gives the streaming path's velocity on each
 * fixture, batch 2 with two sigmas (and guidances): the same ops over the whole batch at once. */
static void test_graph_matches_streaming(const SafeTensors *st) {
    static const char *dirs[] = {FIXTURE, "tests/fixtures/tiny-flux2-bf16/transformer",
                                 "tests/fixtures/tiny-flux2-guidance/transformer"};
    Tensor *tokens = golden_tensor(st, "tokens2", SHAPE(2, 15, 16));
    Tensor *txt = golden_tensor(st, "txt2", SHAPE(2, 7, 24));
    for (int i = 0; i < 3 && tokens && txt; i++) {
        Flux2 *streaming = load(dirs[i]), *resident = load_resident(dirs[i]);
        Tensor *a = NULL, *b = NULL;
        Error e = {{0}};
        float sigma[2] = {0.9f, 0.2f}, guidance[2] = {3.5f, 2.0f};
        if (streaming && resident)
            CHECK(flux2_forward(streaming, tokens, GRID_H, GRID_W, txt, sigma, guidance, &a, &e) ==
                          0 &&
                      flux2_forward(resident, tokens, GRID_H, GRID_W, txt, sigma, guidance, &b,
                                    &e) == 0,
                  "%s: both paths run: %s", dirs[i], e.msg);
        CHECK(resident && flux2_params(resident) && streaming && !flux2_params(streaming),
              "%s: only the resident model has Params", dirs[i]);
        Tape *t = tape_new();
        Var *graph = streaming ? flux2_forward_graph(t, streaming, var_new(t, tokens, false),
                                                     GRID_H, GRID_W, var_new(t, txt, false), sigma,
                                                     guidance)
                               : NULL;
        CHECK(streaming && !graph && tape_check(t, &e) != 0 && strstr(e.msg, "resident"),
              "%s: a streaming model's graph fails its tape, saying why: %s", dirs[i], e.msg);
        tape_free(t);
        if (a && b) {
            char what[160];
            snprintf(what, sizeof what, "%s: graph path = streaming path", dirs[i]);
            check_close(what, b->data, a->data, (size_t)a->numel, 1e-5f, 1e-5f);
        }
        tensor_free(a);
        tensor_free(b);
        flux2_free(streaming);
        flux2_free(resident);
    }
    tensor_free(tokens);
    tensor_free(txt);
}

/* sum(probe * v) of the fixture at tokens2, txt2 (grad off), for finite differences. */
typedef struct ProbeLoss {
    const Flux2 *m;
    Tensor *tokens, *txt, *probe;
} ProbeLoss;

static const float PROBE_SIGMA[2] = {0.9f, 0.2f};

static double probe_loss(void *ctx) {
    ProbeLoss *p = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *v = flux2_forward_graph(t, p->m, var_new(t, p->tokens, false), GRID_H, GRID_W,
                                 var_new(t, p->txt, false), PROBE_SIGMA, NULL);
    double sum = 0.0;
    for (int64_t i = 0; v && i < v->value->numel; i++)
        sum += (double)v->value->data[i] * p->probe->data[i];
    tape_free(t);
    return sum;
}

static Var *find_param(const Params *p, const char *name) {
    for (int i = 0; i < params_count(p); i++)
        if (!strcmp(params_name(p, i), name)) return params_var(p, i);
    return NULL;
}

/* d sum(probe * v) / d (tokens, txt, weights of every kind) against PyTorch (float64), and
 * finite differences on the inputs and on a few weights. */
static void test_graph_gradients(const SafeTensors *st) {
    static const char *names[] = {
        "x_embedder.weight",
        "context_embedder.weight",
        "time_guidance_embed.timestep_embedder.linear_1.weight",
        "time_guidance_embed.timestep_embedder.linear_2.weight",
        "double_stream_modulation_img.linear.weight",
        "single_stream_modulation.linear.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn.norm_added_k.weight",
        "transformer_blocks.1.attn.to_add_out.weight",
        "transformer_blocks.0.ff.linear_in.weight",
        "transformer_blocks.1.ff_context.linear_out.weight",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
        "single_transformer_blocks.1.attn.to_out.weight",
        "single_transformer_blocks.1.attn.norm_q.weight",
        "norm_out.linear.weight",
        "proj_out.weight",
    };
    Flux2 *m = load_resident(FIXTURE);
    ProbeLoss p = {.m = m, .tokens = golden_tensor(st, "tokens2", SHAPE(2, 15, 16)),
                   .txt = golden_tensor(st, "txt2", SHAPE(2, 7, 24)),
                   .probe = golden_tensor(st, "grad.probe", SHAPE(2, 15, 16))};
    if (!m || !p.tokens || !p.txt || !p.probe) goto done;
    Params *params = flux2_params(m);
    params_set_trainable(params, true);
    Tape *t = tape_new();
    Var *tokens = var_new(t, p.tokens, true), *txt = var_new(t, p.txt, true);
    Var *v = flux2_forward_graph(t, m, tokens, GRID_H, GRID_W, txt, PROBE_SIGMA, NULL);
    Var *loss = ag_sum(t, ag_mul(t, v, var_new(t, p.probe, false)));
    Error e = {{0}};
    CHECK(tape_check(t, &e) == 0 && tape_backward(t, loss, &e) == 0, "graph backward: %s", e.msg);
    /* float32 against float64 through ~100 ops; the worst differences are ~7e-6 */
    const float rtol = 1e-3f, atol = 2e-5f;
    struct { const char *name; Var *var; } inputs[] = {{"tokens", tokens}, {"txt", txt}};
    for (int i = 0; i < 2; i++) {
        char key[64];
        snprintf(key, sizeof key, "grad.%s", inputs[i].name);
        Tensor *g = inputs[i].var->grad;
        float *want = g ? golden_load(st, key, (size_t)g->numel) : NULL;
        CHECK(g != NULL, "d loss / d %s exists", inputs[i].name);
        if (want) check_close(key, g->data, want, (size_t)g->numel, rtol, atol);
        free(want);
    }
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char key[160];
        snprintf(key, sizeof key, "grad.%s", names[i]);
        Var *w = find_param(params, names[i]);
        float *want = w && w->grad ? golden_load(st, key, (size_t)w->grad->numel) : NULL;
        CHECK(w && w->grad, "%s has a gradient", names[i]);
        if (want) check_close(key, w->grad->data, want, (size_t)w->grad->numel, rtol, atol);
        free(want);
    }
    /* Finite differences in float32: central steps of 1e-2 on a loss of O(10). */
    if (tokens->grad)
        check_gradient("FD d loss / d tokens", probe_loss, &p, p.tokens->data, tokens->grad->data,
                       (size_t)p.tokens->numel, 13, 1e-2f, 2e-2f, 2e-3f);
    if (txt->grad)
        check_gradient("FD d loss / d txt", probe_loss, &p, p.txt->data, txt->grad->data,
                       (size_t)p.txt->numel, 11, 1e-2f, 2e-2f, 2e-3f);
    static const char *fd_names[] = {
        "time_guidance_embed.timestep_embedder.linear_1.weight",
        "double_stream_modulation_txt.linear.weight",
        "transformer_blocks.1.attn.add_v_proj.weight",
        "transformer_blocks.0.attn.norm_k.weight",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
        "norm_out.linear.weight",
    };
    for (size_t i = 0; i < sizeof fd_names / sizeof *fd_names; i++) {
        Var *w = find_param(params, fd_names[i]);
        char what[160];
        snprintf(what, sizeof what, "FD d loss / d %s", fd_names[i]);
        CHECK(w && w->grad, "%s has a gradient", fd_names[i]);
        if (w && w->grad)
            check_gradient(what, probe_loss, &p, w->value->data, w->grad->data,
                           (size_t)w->value->numel, (size_t)w->value->numel / 23 + 1, 1e-2f,
                           2e-2f, 2e-3f);
    }
    tape_free(t);
done:
    tensor_free(p.tokens);
    tensor_free(p.txt);
    tensor_free(p.probe);
    flux2_free(m);
}

/* flux2_open WEIGHTS_FRESH: fresh weights by name (matrices uniform in +-1/sqrt(fan_in), RMSNorm
 * scales 1), the same for the same seed, and a forward that runs. */
static void test_init(void) {
    Flux2 *a = NULL, *b = NULL;
    Error e = {{0}};
    CHECK(flux2_open(&a, FIXTURE, WEIGHTS_FRESH, 7, &e) == 0 &&
              flux2_open(&b, FIXTURE, WEIGHTS_FRESH, 7, &e) == 0,
          "flux2_open fresh: %s", e.msg);
    if (!a || !b) goto done;
    Params *pa = flux2_params(a), *pb = flux2_params(b);
    bool same = params_count(pa) == params_count(pb) && params_count(pa) > 0, bounded = true;
    for (int i = 0; same && i < params_count(pa); i++) {
        const Tensor *x = params_var(pa, i)->value, *y = params_var(pb, i)->value;
        same = !memcmp(x->data, y->data, (size_t)x->numel * sizeof(float));
        float bound = x->ndim == 2 ? 1.0f / sqrtf((float)x->shape[1]) : 1.0f;
        for (int64_t k = 0; k < x->numel; k++)
            bounded &= x->ndim == 2 ? fabsf(x->data[k]) <= bound : x->data[k] == 1.0f;
    }
    CHECK(same, "the same seed gives the same fresh weights");
    CHECK(bounded, "fresh matrices within +-1/sqrt(fan_in), norm scales 1");
    Var *w = find_param(pa, "transformer_blocks.1.ff.linear_out.weight");
    CHECK(w && w->value->shape[0] == 32 && w->value->shape[1] == 96,
          "fresh weights carry the upstream names and shapes");
done:
    flux2_free(a);
    flux2_free(b);
}

/* For a resident model flux2_forward_bytes bounds the peak of the graph on a no-grad tape from
 * above, by less than 2x (the streaming path's bound is measured against peak RSS at klein-4B's
 * size: see the README). */
static void test_memory_estimate(void) {
    static const int sizes[][4] = {{1, 3, 5, 7}, {2, 3, 5, 7}, {1, 16, 16, 7}, {1, 8, 32, 64}};
    Flux2 *m = load_resident(FIXTURE);
    const Flux2Config *c = m ? flux2_config(m) : NULL;
    if (!c) return;
    for (size_t i = 0; i < COUNT(sizes); i++) {
        int batch = sizes[i][0], h = sizes[i][1], w = sizes[i][2], L = sizes[i][3];
        Tensor *tokens = TENSOR_NEW(batch, h * w, c->in_channels);
        Tensor *txt = TENSOR_NEW(batch, L, c->joint_attention_dim);
        for (int64_t j = 0; j < tokens->numel; j++) tokens->data[j] = sinf(0.37f * (float)j);
        for (int64_t j = 0; j < txt->numel; j++) txt->data[j] = cosf(0.21f * (float)j);
        Tape *t = tape_new();
        tape_set_grad(t, false);
        const float sigma[2] = {0.7f, 0.3f};
        Var *v = flux2_forward_graph(t, m, var_new(t, tokens, false), h, w, var_new(t, txt, false),
                                     sigma, NULL);
        size_t peak = tape_stats(t).peak_bytes;
        size_t estimate = flux2_forward_bytes(m, batch, (int64_t)h * w, L);
        CHECK(v && peak <= estimate && estimate < 2 * peak,
              "%d x %dx%d tokens, %d text: the estimate %zu bytes bounds the graph's peak %zu "
              "within 2x", batch, h, w, L, estimate, peak);
        tape_free(t);
        tensor_free(tokens);
        tensor_free(txt);
    }
    flux2_free(m);
}

int main(void) {
    SafeTensors *st = golden_open("tests/golden/flux2.safetensors");
    if (st) {
        test_golden(st);
        test_graph_matches_streaming(st);
        test_graph_gradients(st);
        test_bf16_products(st);
        st_close(st);
    }
    test_init();
    test_errors();
    test_config_only();
    test_memory_estimate();
    return harness_finish("test_flux2");
}
