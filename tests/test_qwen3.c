/* test_qwen3.c - FLUX.2 [klein]'s prompt encoder:
 *   - Qwen3 against tools/ref_qwen3.py (PyTorch, float64, written from transformers'
 *     modeling_qwen3.py and diffusers' Flux2KleinPipeline) on tests/fixtures/tiny-klein: a random
 *     28-layer Qwen3 (hidden 24 != 4 heads x head_dim 8, 2 key/value heads) in bf16 over two
 *     shards with an index; the stacked hidden states 9, 18, 27 of a full row and a padded one;
 *   - configs diamond does not implement, refused with the key named;
 *   - the prompt pipeline: chat template, right padding with the pad token, truncation. */
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../nn.h"
#include "harness.h"

#define KLEIN "tests/fixtures/tiny-klein"

/* An I64 tensor of st as int32 values; NULL (reported) when missing or of another size. */
static int32_t *golden_ids(const SafeTensors *st, const char *name, size_t n) {
    const StTensor *t = st_find(st, name);
    int32_t *out = t && t->dtype == DTYPE_I64 && (size_t)t->numel == n ? malloc(n * sizeof *out)
                                                                       : NULL;
    for (size_t i = 0; out && i < n; i++) {
        int64_t v;
        memcpy(&v, (const char *)t->data + 8 * i, sizeof v);
        out[i] = (int32_t)v;
    }
    CHECK(out != NULL, "golden %s: I64 [%zu]", name, n);
    return out;
}

static void test_golden(void) {
    enum { B = 2, L = 16, WIDTH = 72 };
    SafeTensors *st = golden_open("tests/golden/qwen3.safetensors");
    Qwen3 *m = NULL;
    Error e = {{0}};
    CHECK(qwen3_open(&m, KLEIN "/text_encoder", WEIGHTS_FILES, 0, &e) == 0, "open: %s", e.msg);
    if (!st || !m) {
        st_close(st);
        qwen3_free(m);
        return;
    }
    const Qwen3Config *c = qwen3_config(m);
    CHECK(c->hidden_size == 24 && c->heads == 4 && c->kv_heads == 2 && c->head_dim == 8 &&
              c->num_layers == 28 && c->vocab_size == 306,
          "config: hidden %d heads %d/%d head_dim %d layers %d vocab %d", c->hidden_size, c->heads,
          c->kv_heads, c->head_dim, c->num_layers, c->vocab_size);
    int32_t *ids = golden_ids(st, "input_ids", B * L), *mask = golden_ids(st, "attention_mask", B * L);
    float *want = golden_load(st, "prompt_embeds", (size_t)B * L * WIDTH);
    if (ids && mask && want) {
        int lengths[B] = {0};
        for (int b = 0; b < B; b++)
            for (int i = 0; i < L; i++) lengths[b] += mask[b * L + i];
        CHECK(lengths[0] == L && lengths[1] < L, "golden rows: %d and %d real tokens", lengths[0],
              lengths[1]);
        Tensor *got = NULL;
        CHECK(qwen3_prompt_embeds(m, ids, lengths, B, L, &got, &e) == 0, "forward: %s", e.msg);
        /* values up to ~20 after 27 layers; f32 against the float64 reference */
        if (got) check_close("qwen3 prompt_embeds (hidden states 9, 18, 27)", got->data, want,
                             (size_t)B * L * WIDTH, 1e-4f, 1e-4f);
        /* bf16 products: bf16's rounding (2^-9 of a value) through 27 layers; the mean error
         * within 1% of the mean value, the largest within 2% of the largest value, and far
         * more than f32's; then f32 again */
        qwen3_set_precision(m, PRECISION_BF16);
        Tensor *bf16 = NULL;
        CHECK(qwen3_prompt_embeds(m, ids, lengths, B, L, &bf16, &e) == 0, "bf16: %s", e.msg);
        if (got && bf16) {
            double f32_off = 0.0, bf16_off = 0.0, mean_off = 0.0, mean = 0.0, largest = 0.0;
            size_t n = (size_t)B * L * WIDTH;
            for (size_t i = 0; i < n; i++) {
                f32_off = fmax(f32_off, fabs((double)got->data[i] - want[i]));
                bf16_off = fmax(bf16_off, fabs((double)bf16->data[i] - want[i]));
                mean_off += fabs((double)bf16->data[i] - want[i]) / (double)n;
                mean += fabs((double)want[i]) / (double)n;
                largest = fmax(largest, fabs((double)want[i]));
            }
            CHECK(mean_off < 0.01 * mean && bf16_off < 0.02 * largest && bf16_off > 10 * f32_off,
                  "qwen3 bf16 products: mean |diff| %.3g (mean |value| %.3g), max %.3g (largest "
                  "value %.3g, f32's max |diff| %.3g)", mean_off, mean, bf16_off, largest,
                  f32_off);
        }
        tensor_free(got);
        tensor_free(bf16);
        qwen3_set_precision(m, PRECISION_F32);
        int bad[B] = {0, L};
        CHECK(qwen3_prompt_embeds(m, ids, bad, B, L, &got, &e) == -1 && strstr(e.msg, "real tokens"),
              "a row without tokens is refused: %s", e.msg);
        int32_t keep = ids[3];
        ids[3] = 306;
        CHECK(qwen3_prompt_embeds(m, ids, lengths, B, L, &got, &e) == -1 && strstr(e.msg, "306"),
              "an id outside the vocabulary is refused: %s", e.msg);
        ids[3] = keep;
    }
    free(ids);
    free(mask);
    free(want);
    qwen3_free(m);
    st_close(st);
}

static const char *const SHARDS[] = {"model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors",
                                     "model.safetensors.index.json"};

/* dir/name -> tiny-klein's text_encoder/name (or remove it: target NULL) */
static void shard_link(const char *dir, const char *name, bool make) {
    char link[256], target[PATH_MAX];
    snprintf(link, sizeof link, "%s/%s", dir, name);
    remove(link);
    if (make && realpath(KLEIN "/text_encoder", target)) {
        strncat(target, "/", sizeof target - strlen(target) - 1);
        strncat(target, name, sizeof target - strlen(target) - 1);
        CHECK(symlink(target, link) == 0, "link %s", link);
    }
}

/* tiny-klein's text encoder with `from` replaced by `to` in its config: the error. */
static void test_config_refused(const char *from, const char *to, const char *message) {
    char *text = NULL, dir[64], path[128];
    size_t len;
    Error e = {{0}};
    snprintf(dir, sizeof dir, "/tmp/diamond-test-qwen3-%d", (int)getpid());
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc = file_read_all(KLEIN "/text_encoder/config.json", &text, &len, &e);
    char *at = rc == 0 ? strstr(text, from) : NULL;
    char *edited = at ? malloc(len + strlen(to) + 1) : NULL;
    if (edited) {
        snprintf(edited, len + strlen(to) + 1, "%.*s%s%s", (int)(at - text), text, to,
                 at + strlen(from));
        mkdir(dir, 0755);
        rc = write_file_atomic(path, edited, strlen(edited), &e);
        for (size_t i = 0; i < sizeof SHARDS / sizeof *SHARDS; i++) shard_link(dir, SHARDS[i], true);
    }
    Qwen3 *m = NULL;
    rc = edited && rc == 0 ? qwen3_open(&m, dir, WEIGHTS_FILES, 0, &e) : 0;
    CHECK(rc == -1 && !m && strstr(e.msg, message), "'%s' refused: want '%s', got '%s'", to,
          message, e.msg);
    qwen3_free(m);
    free(text);
    free(edited);
    remove(path);
    for (size_t i = 0; i < sizeof SHARDS / sizeof *SHARDS; i++) shard_link(dir, SHARDS[i], false);
    rmdir(dir);
}

static void test_configs(void) {
    test_config_refused("\"attention_bias\": false", "\"attention_bias\": true", "attention_bias");
    test_config_refused("\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"yarn\"}",
                        "rope_scaling");
    test_config_refused("\"use_sliding_window\": false", "\"use_sliding_window\": true",
                        "use_sliding_window");
    test_config_refused("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", "hidden_act");
    test_config_refused("\"model_type\": \"qwen3\"", "\"model_type\": \"llama\"", "model_type");
    test_config_refused("\"model_type\": \"qwen3\"",
                        "\"model_type\": \"qwen3\", \"layer_types\": [\"full_attention\", "
                        "\"sliding_attention\"]",
                        "layer_types[1] is not \"full_attention\"");
    test_config_refused("\"model_type\": \"qwen3\"",
                        "\"model_type\": \"qwen3\", \"layer_types\": \"full_attention\"",
                        "layer_types is not an array");
    test_config_refused("\"num_hidden_layers\": 28", "\"num_hidden_layers\": 20",
                        "num_hidden_layers 20");
    test_config_refused("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", "divide");
    test_config_refused("\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": 2", "rms_norm_eps 2");
    /* a shape the files do not have: the tensor and both shapes are named */
    test_config_refused("\"intermediate_size\": 40", "\"intermediate_size\": 48",
                        "'model.layers.0.mlp.gate_proj.weight' has shape [40, 24], the config "
                        "implies [48, 24]");
}

/* The pipeline on tiny-klein (its own byte-level BPE tokenizer, pad <|endoftext|> = 301). */
static void test_pipeline(void) {
    PromptEncoder *p = NULL;
    Error e = {{0}};
    CHECK(prompt_encoder_open(&p, KLEIN, WEIGHTS_FILES, 0, 24, &e) == 0, "open: %s", e.msg);
    if (!p) return;
    CHECK(prompt_encoder_width(p) == 72 && prompt_encoder_max_length(p) == 24, "width %d, L %d",
          prompt_encoder_width(p), prompt_encoder_max_length(p));
    const char *prompts[3] = {"the fox", "", "a very long prompt that does not fit in the few "
                                             "tokens this test allows at all"};
    Tensor *embeds = NULL;
    PromptTokens tok = {0};
    CHECK(prompt_encode(p, prompts, 3, &embeds, &tok, &e) == 0, "encode: %s", e.msg);
    if (embeds) {
        CHECK(embeds->ndim == 3 && embeds->shape[0] == 3 && embeds->shape[1] == 24 &&
                  embeds->shape[2] == 72, "embeddings [3, 24, 72]");
        /* "<|im_start|>user\n" = 302 + "user" + "\n" ...; the empty prompt's template alone */
        CHECK(tok.ids[0] == 302 && tok.ids[24] == 302, "rows start with <|im_start|> (302): %d %d",
              tok.ids[0], tok.ids[24]);
        int padded = 0;
        for (int i = tok.lengths[0]; i < 24; i++) padded += tok.ids[i] == 301;
        CHECK(tok.lengths[0] < 24 && padded == 24 - tok.lengths[0],
              "right padding with <|endoftext|>: %d real, %d pad", tok.lengths[0], padded);
        CHECK(tok.lengths[1] > 0 && tok.lengths[1] < tok.lengths[0], "empty prompt: %d tokens",
              tok.lengths[1]);
        CHECK(tok.lengths[2] == 24 && tok.totals[2] > 24, "truncated: %d of %zu tokens",
              tok.lengths[2], tok.totals[2]);
        Qwen3 *m = NULL;
        Tensor *direct = NULL;
        int rc = qwen3_open(&m, KLEIN "/text_encoder", WEIGHTS_FILES, 0, &e) ||
                 qwen3_prompt_embeds(m, tok.ids, tok.lengths, 3, 24, &direct, &e);
        CHECK(rc == 0 && !memcmp(direct->data, embeds->data, (size_t)embeds->numel * 4),
              "the pipeline's embeddings are Qwen3's of its ids %s", e.msg);
        tensor_free(direct);
        qwen3_free(m);
    }
    tensor_free(embeds);
    prompt_tokens_free(&tok);
    const char *bad[1] = {"caf\xc3"};
    CHECK(prompt_encode(p, bad, 1, &embeds, NULL, &e) == -1 && strstr(e.msg, "UTF-8"),
          "invalid UTF-8 refused: %s", e.msg);
    prompt_encoder_free(p);
}

/* The same weights as one f32 model.safetensors (no index) give the same embeddings bit for bit:
 * bf16 widens to f32 exactly, and the layout does not matter. */
static void test_f32_single_file(void) {
    char dir[] = "/tmp/test_qwen3_f32.XXXXXX", path[256], *config = NULL;
    StModel *bf16 = NULL;
    Error e = {{0}};
    size_t len;
    if (!mkdtemp(dir) || st_model_open(&bf16, KLEIN "/text_encoder", &e) ||
        file_read_all(KLEIN "/text_encoder/config.json", &config, &len, &e)) {
        CHECK(0, "the f32 copy's inputs: %s", e.msg);
        st_model_close(bf16);
        return;
    }
    size_t n = st_model_count(bf16);
    StWriteTensor *out = calloc(n, sizeof *out);
    float **values = calloc(n, sizeof *values);
    int rc = out && values ? 0 : -1;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const StTensor *s = st_model_at(bf16, i);
        out[i] = (StWriteTensor){.name = s->name, .dtype = DTYPE_F32, .ndim = s->ndim};
        memcpy(out[i].shape, s->shape, sizeof s->shape);
        rc = !(values[i] = malloc((size_t)s->numel * sizeof(float))) ||
             st_model_read_f32(bf16, s->name, values[i], s->numel, &e);
        out[i].data = values[i];
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (rc == 0) rc = st_write(path, out, n, &e);
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (rc == 0) rc = write_file_atomic(path, config, len, &e);
    Qwen3 *a = NULL, *b = NULL;
    Tensor *ya = NULL, *yb = NULL;
    int32_t ids[12] = {302, 10, 20, 30, 40, 50, 60, 70, 303, 301, 301, 301};
    int length = 9;
    if (rc == 0)
        rc = qwen3_open(&a, KLEIN "/text_encoder", WEIGHTS_FILES, 0, &e) ||
             qwen3_open(&b, dir, WEIGHTS_FILES, 0, &e) ||
             qwen3_prompt_embeds(a, ids, &length, 1, 12, &ya, &e) ||
             qwen3_prompt_embeds(b, ids, &length, 1, 12, &yb, &e);
    CHECK(rc == 0 && !memcmp(ya->data, yb->data, (size_t)ya->numel * sizeof(float)),
          "bf16 shards and one f32 file give the same embeddings %s", e.msg);
    tensor_free(ya);
    tensor_free(yb);
    qwen3_free(a);
    qwen3_free(b);
    for (size_t i = 0; values && i < n; i++) free(values[i]);
    free(values);
    free(out);
    free(config);
    st_model_close(bf16);
    remove(path);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    remove(path);
    rmdir(dir);
}

/* cmd's exit status with its stderr in log (its stdout discarded). */
static int run_logged(const char *cmd, const char *log) {
    char line[8192];
    snprintf(line, sizeof line, "%s >/dev/null 2>%s", cmd, log);
    int status = system(line);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Whether generate (2 steps, 32x32, with `flags`) draws the same image from --prompt as from
 * --embeddings dir/name.safetensors; a command that fails is a CHECK failure and false. */
static bool prompt_matches_embeddings(const char *binary, const char *dir, const char *prompt,
                                      const char *name, const char *flags) {
    const char *base = "%s generate --model " KLEIN " --no-guide --seed 3 --steps 2 -W 32 -H 32 "
                       "--quiet -o %s/%s_%s.ppm %s%s";
    char cmd[4096], arg[700], a[600], b[600];
    snprintf(arg, sizeof arg, "--prompt %s", prompt);
    snprintf(cmd, sizeof cmd, base, binary, dir, name, "prompt", arg, flags);
    bool ok = harness_run_quiet(cmd) == 0;
    CHECK(ok, "generate --prompt runs: %s", cmd);
    snprintf(arg, sizeof arg, "--embeddings %s/%s.safetensors", dir, name);
    snprintf(cmd, sizeof cmd, base, binary, dir, name, "emb", arg, flags);
    ok = ok && harness_run_quiet(cmd) == 0;
    CHECK(ok, "generate --embeddings runs: %s", cmd);
    snprintf(a, sizeof a, "%s/%s_prompt.ppm", dir, name);
    snprintf(b, sizeof b, "%s/%s_emb.ppm", dir, name);
    return ok && harness_same_file(a, b);
}

/* The CLI on tiny-klein: encode writes what generate --embeddings reads, and generate --prompt
 * makes the same image; truncation is said, bad input is exit 1. */
static void test_cli(const char *argv0) {
    char binary[1024], file[512], dir[] = "/tmp/test_qwen3.XXXXXX", cmd[4096], a[600];
    if (harness_binary(argv0, file, sizeof file, binary, sizeof binary) || access(file, X_OK) ||
        !mkdtemp(dir)) {
        CHECK(0, "%s is built and a temporary directory can be made", file);
        return;
    }
    const char *prompt = "\"a fox reading a newspaper\"";
    snprintf(cmd, sizeof cmd, "%s encode --model " KLEIN " --prompt %s -o %s/e.safetensors",
             binary, prompt, dir);
    CHECK(harness_run_quiet(cmd) == 0, "encode runs: %s", cmd);
    snprintf(a, sizeof a, "%s/e.safetensors", dir);
    SafeTensors *st = NULL;
    Error e = {{0}};
    if (st_open(&st, a, &e) == 0) {
        const StTensor *emb = st_find(st, "prompt_embeds"), *ids = st_find(st, "input_ids"),
                       *mask = st_find(st, "attention_mask");
        CHECK(emb && emb->dtype == DTYPE_F32 && emb->ndim == 3 && emb->shape[1] == 512 &&
                  emb->shape[2] == 72 && ids && ids->dtype == DTYPE_I64 && ids->shape[1] == 512 &&
                  mask && mask->dtype == DTYPE_I64 && mask->shape[1] == 512,
              "encode writes prompt_embeds F32 [1, 512, 72], input_ids and attention_mask I64 "
              "[1, 512]");
        int64_t ones = 0, v = 0, pad = 0;
        for (int i = 0; mask && ids && i < 512; i++) {
            memcpy(&v, (const char *)mask->data + 8 * i, 8);
            ones += v;
            memcpy(&v, (const char *)ids->data + 8 * i, 8);
            pad += v == 301;
        }
        CHECK(ones > 10 && ones < 512 && pad == 512 - ones, "mask %lld ones, %lld pad ids",
              (long long)ones, (long long)pad);
        st_close(st);
    } else {
        CHECK(0, "open %s: %s", a, e.msg);
    }
    CHECK(prompt_matches_embeddings(binary, dir, prompt, "e", ""),
          "generate --prompt gives the image of --embeddings from encode");
    snprintf(cmd, sizeof cmd, "%s generate --model " KLEIN " --no-guide --seed 3 --steps 2 -W 32 "
             "-H 32 --quiet -o %s/neg.ppm --prompt fox --cfg 2 --negative-prompt x", binary, dir);
    CHECK(harness_run_quiet(cmd) == 0, "generate --cfg with a negative prompt runs");

    /* encode --precision bf16 makes what generate --prompt --precision bf16 encodes (f32 on
     * both sides where the CPU has no bf16 dot products) */
    snprintf(cmd, sizeof cmd, "%s encode --model " KLEIN " --prompt %s --precision bf16 -o "
             "%s/e16.safetensors", binary, prompt, dir);
    CHECK(harness_run_quiet(cmd) == 0, "encode --precision bf16 runs: %s", cmd);
    CHECK(prompt_matches_embeddings(binary, dir, prompt, "e16", " --precision bf16"),
          "encode --precision bf16 gives generate's bf16 prompt encoding");
    snprintf(cmd, sizeof cmd, "%s encode --model " KLEIN " --prompt fox --precision f16 -o "
             "%s/bad.safetensors", binary, dir);
    CHECK(harness_run_quiet(cmd) == 2, "encode --precision f16 is a bad command line (exit 2)");

    snprintf(cmd, sizeof cmd, "%s encode --model " KLEIN " --prompt %s --max-length 8 -o "
             "%s/t.safetensors", binary, prompt, dir);
    char *log = NULL;
    size_t len;
    snprintf(a, sizeof a, "%s/log", dir);
    CHECK(run_logged(cmd, a) == 0 && file_read_all(a, &log, &len, &e) == 0 &&
              strstr(log, "truncated to 8"),
          "a prompt over --max-length is truncated and says so: %s", log ? log : "");
    free(log);
    snprintf(cmd, sizeof cmd, "%s encode --model " KLEIN " --prompt '' -o %s/z.safetensors",
             binary, dir);
    CHECK(harness_run_quiet(cmd) == 0, "an empty prompt is encoded");
    snprintf(cmd, sizeof cmd, "%s encode --model " KLEIN " --prompt $(printf 'caf\\303') -o "
             "%s/u.safetensors", binary, dir);
    CHECK(harness_run_quiet(cmd) == 1, "invalid UTF-8 is exit 1");
    snprintf(cmd, sizeof cmd, "%s encode --model tests/fixtures/tiny-flux2-bf16 --prompt x -o "
             "%s/u.safetensors", binary, dir);
    CHECK(harness_run_quiet(cmd) == 1, "a model without a text encoder is exit 1");
    snprintf(cmd, sizeof cmd, "%s encode --model " KLEIN " -o %s/u.safetensors", binary, dir);
    CHECK(harness_run_quiet(cmd) == 2, "encode without --prompt is exit 2");
    /* the transformer of tiny-flux2 (joint_attention_dim 24) with tiny-klein's encoder (72) */
    const char *const parts[4][2] = {{"transformer", "tests/fixtures/tiny-flux2/transformer"},
                                     {"vae", KLEIN "/vae"}, {"text_encoder", KLEIN "/text_encoder"},
                                     {"tokenizer", KLEIN "/tokenizer"}};
    char mix[600];
    snprintf(mix, sizeof mix, "%s/mix", dir);
    CHECK(harness_link_parts(mix, parts, 4) == 0, "the mixed model directory %s", mix);
    snprintf(cmd, sizeof cmd, "%s generate --model %s --no-guide --seed 3 --steps 2 -W 32 -H 32 "
             "--quiet -o %s/m.ppm --prompt fox", binary, mix, dir);
    log = NULL;
    CHECK(run_logged(cmd, a) == 1 && file_read_all(a, &log, &len, &e) == 0 &&
              strstr(log, "width 72") && strstr(log, "joint_attention_dim is 24"),
          "mismatched dims are named: %s", log ? log : "");
    free(log);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(strncmp(dir, "/tmp/test_qwen3.", 16) == 0 && system(cmd) == 0, "remove %s", dir);
}

int main(int argc, char **argv) {
    (void)argc;
    test_golden();
    test_configs();
    test_pipeline();
    test_f32_single_file();
    test_cli(argv[0]);
    return harness_finish("test_qwen3");
}
