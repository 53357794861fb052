/* test_config_only.c - loading models from their config files alone, with random weights made at
 * the shapes the loaders ask for (st_model_random_any through params_load), for `bench model`. */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "../nn.h"
#include "harness.h"

/* st_model_random's values as documented: a matrix's uniform in +-1/sqrt(last dim) (spread over
 * that range, mean near 0), a vector's in 1 +- 0.1; the same on every read; rows read alone
 * (st_model_read_rows_f32, the embedding lookups) equal those rows of the whole. */
static void test_random_model_values(void) {
    enum { ROWS = 64, COLS = 100 };
    StTensorSpec specs[] = {{"w", 2, {ROWS, COLS}}, {"b", 1, {COLS}}};
    StModel *m = NULL;
    Error e = {{0}};
    CHECK(st_model_random(&m, specs, 2, 11, RANDOM_FOR_TIMING, &e) == 0, "random model: %s", e.msg);
    if (!m) return;
    static float w[ROWS * COLS], again[ROWS * COLS], rows[3 * COLS];
    float b[COLS];
    CHECK(st_model_read_f32(m, "w", w, ROWS * COLS, &e) == 0 &&
              st_model_read_f32(m, "w", again, ROWS * COLS, &e) == 0 &&
              st_model_read_f32(m, "b", b, COLS, &e) == 0, "read: %s", e.msg);
    double sum = 0.0, lo = 1.0, hi = -1.0;
    for (int i = 0; i < ROWS * COLS; i++) {
        sum += w[i];
        lo = fmin(lo, w[i]);
        hi = fmax(hi, w[i]);
    }
    float bound = 1.0f / sqrtf((float)COLS);
    CHECK(lo >= -bound && hi <= bound && hi - lo > 1.9 * bound && fabs(sum / (ROWS * COLS)) < 0.01 * bound,
          "a matrix: within +-%g, spread %g, mean %g", bound, hi - lo, sum / (ROWS * COLS));
    bool near_one = true;
    for (int i = 0; i < COLS; i++) near_one &= b[i] >= 0.9f && b[i] <= 1.1f && b[i] != 1.0f;
    CHECK(near_one, "a vector: 1 + 0.1 u");
    CHECK(!memcmp(w, again, sizeof w), "the same values on every read");
    CHECK(st_model_read_rows_f32(m, "w", 5, 3, rows, &e) == 0 &&
              !memcmp(rows, w + 5 * COLS, sizeof rows), "rows 5 .. 7 alone: %s", e.msg);
    CHECK(st_model_read_rows_f32(m, "w", ROWS - 2, 3, rows, &e) == -1 && strstr(e.msg, "range"),
          "rows past the end are refused: %s", e.msg);
    st_model_close(m);
}

/* Rows of a bf16 tensor in sharded files read alone equal those rows of the whole. */
static void test_rows_from_files(void) {
    StModel *m = NULL;
    Error e = {{0}};
    const char *name = "model.embed_tokens.weight"; /* [306, 24] bf16 */
    CHECK(st_model_open(&m, "tests/fixtures/tiny-klein/text_encoder", &e) == 0, "open: %s", e.msg);
    static float all[306 * 24], rows[2 * 24];
    if (m && st_model_read_f32(m, name, all, 306 * 24, &e) == 0)
        CHECK(st_model_read_rows_f32(m, name, 301, 2, rows, &e) == 0 &&
                  !memcmp(rows, all + 301 * 24, sizeof rows), "rows 301, 302 of the embedding: %s",
              e.msg);
    st_model_close(m);
}

/* RANDOM_FOR_TRAINING as documented, PyTorch's layer initialisation: a conv kernel [8, 3, 2, 2]
 * uniform in +-1/sqrt(3 * 2 * 2) (fan_in, not the last dim), biases and running means 0, other
 * vectors 1; rows read alone equal those rows of the whole. */
static void test_random_for_training(void) {
    enum { OUT = 8, FAN_IN = 3 * 2 * 2 };
    StTensorSpec specs[] = {{"conv.weight", 4, {OUT, 3, 2, 2}}, {"conv.bias", 1, {OUT}},
                            {"bn.running_mean", 1, {OUT}}, {"norm.weight", 1, {OUT}}};
    StModel *m = NULL;
    Error e = {{0}};
    CHECK(st_model_random(&m, specs, 4, 5, RANDOM_FOR_TRAINING, &e) == 0, "random model: %s",
          e.msg);
    if (!m) return;
    float w[OUT * FAN_IN], rows[2 * FAN_IN], bias[OUT], mean[OUT], norm[OUT];
    CHECK(st_model_read_f32(m, "conv.weight", w, OUT * FAN_IN, &e) == 0 &&
              st_model_read_f32(m, "conv.bias", bias, OUT, &e) == 0 &&
              st_model_read_f32(m, "bn.running_mean", mean, OUT, &e) == 0 &&
              st_model_read_f32(m, "norm.weight", norm, OUT, &e) == 0,
          "read: %s", e.msg);
    double lo = 1.0, hi = -1.0;
    for (int i = 0; i < OUT * FAN_IN; i++) {
        lo = fmin(lo, w[i]);
        hi = fmax(hi, w[i]);
    }
    double bound = 1.0 / sqrt((double)FAN_IN);
    CHECK(lo >= -bound && hi <= bound && hi - lo > 1.6 * bound,
          "a kernel: within +-1/sqrt(fan_in) = %g, spread %g", bound, hi - lo);
    bool zeros = true, ones = true;
    for (int i = 0; i < OUT; i++) {
        zeros &= bias[i] == 0.0f && mean[i] == 0.0f;
        ones &= norm[i] == 1.0f;
    }
    CHECK(zeros && ones, "biases and running means 0, norm weights 1");
    CHECK(st_model_read_rows_f32(m, "conv.weight", 3, 2, rows, &e) == 0 &&
              !memcmp(rows, w + 3 * FAN_IN, sizeof rows), "rows 3 .. 4 alone: %s", e.msg);
    st_model_close(m);
}

/* params_load on st_model_random_any: any name at the shape asked for, the same bits each time. */
static void test_params_load_any(void) {
    StModel *m = NULL;
    Error e = {{0}};
    uint64_t seed = 0;
    RandomKind kind = RANDOM_FOR_TRAINING;
    CHECK(st_model_random_any(&m, 3, RANDOM_FOR_TIMING, &e) == 0 &&
              st_model_random_any_source(m, &seed, &kind) && seed == 3 &&
              kind == RANDOM_FOR_TIMING,
          "random-any model: %s", e.msg);
    if (!m) return;
    CHECK(!st_model_find(m, "a.weight") && st_model_count(m) == 0, "it lists no tensors");
    Params *p = params_new(m);
    Var *a = NULL, *b = NULL, *v = NULL;
    CHECK(p && (a = params_load(p, &e, SHAPE(4, 3, 3), "block.%d.weight", 2)) &&
              (b = params_load(p, &e, SHAPE(4, 3, 3), "block.2.weight")) &&
              (v = params_load(p, &e, SHAPE(4), "block.2.bias")),
          "params_load makes any tensor: %s", e.msg);
    if (a && b && v) {
        float want[36];
        st_random_fill(3, RANDOM_FOR_TIMING, "block.2.weight", 3, (int64_t[]){4, 3, 3}, want);
        const Tensor *ta = a->value, *tv = v->value;
        CHECK(ta->ndim == 3 && ta->shape[0] == 4 && ta->shape[2] == 3, "at the shape asked for");
        CHECK(!memcmp(ta->data, b->value->data, sizeof want) && !memcmp(ta->data, want, sizeof want),
              "the same name gives the same bits, st_random_fill's");
        bool scaled = true, positive = true;
        for (int i = 0; i < 36; i++) scaled &= fabsf(ta->data[i]) <= 1.0f / sqrtf(3.0f);
        for (int i = 0; i < 4; i++) positive &= tv->data[i] >= 0.9f && tv->data[i] <= 1.1f;
        CHECK(scaled && positive, "uniform / sqrt(last dim) for matrices, 1 + 0.1 u for vectors");
    }
    params_free(p);
    st_model_close(m);
}

/* The tiny VAE's config with random weights: it decodes, the same seed gives the same image and
 * another seed another, and its config is vae_decoder_load's. */
static void test_vae_config_only(void) {
    const char *dir = "tests/fixtures/tiny-flux2/vae";
    VaeDecoder *m[3] = {NULL, NULL, NULL}, *real = NULL;
    Error e = {{0}};
    CHECK(vae_decoder_open(&m[0], dir, WEIGHTS_CONFIG_ONLY, 1, &e) == 0 &&
              vae_decoder_open(&m[1], dir, WEIGHTS_CONFIG_ONLY, 1, &e) == 0 &&
              vae_decoder_open(&m[2], dir, WEIGHTS_CONFIG_ONLY, 2, &e) == 0 &&
              vae_decoder_open(&real, dir, WEIGHTS_FILES, 0, &e) == 0,
          "VAE config-only load: %s", e.msg);
    VaeDecoder *absent = NULL;
    CHECK(vae_decoder_open(&absent, "tests/fixtures/absent", WEIGHTS_CONFIG_ONLY, 1, &e) != 0 &&
              !absent && strstr(e.msg, "absent/config.json"),
          "a missing VAE config is named: %s", e.msg);
    if (m[0] && m[1] && m[2] && real) {
        CHECK(!memcmp(vae_decoder_config(m[0]), vae_decoder_config(real), sizeof(VaeConfig)),
              "the config is the loaded model's");
        const VaeConfig *c = vae_decoder_config(m[0]);
        int h = 3, w = 2, packed = c->latent_channels * c->patch_h * c->patch_w;
        Tensor *tokens = TENSOR_NEW(1, h * w, packed), *image[3] = {NULL, NULL, NULL};
        unsigned long long state = 9;
        for (int64_t i = 0; tokens && i < tokens->numel; i++) tokens->data[i] = harness_rand(&state);
        for (int k = 0; k < 3 && tokens; k++) {
            Tape *t = tape_new();
            tape_set_grad(t, false);
            Var *y = vae_decode(t, m[k], var_new(t, tokens, false), h, w);
            CHECK(tape_check(t, &e) == 0, "config-only decode %d: %s", k, e.msg);
            image[k] = y ? tensor_clone(y->value) : NULL;
            tape_free(t);
        }
        if (image[0] && image[1] && image[2]) {
            size_t bytes = (size_t)image[0]->numel * sizeof(float);
            bool finite = true;
            for (int64_t i = 0; i < image[0]->numel; i++) finite &= fabsf(image[0]->data[i]) < 1e3f;
            CHECK(finite, "the random decoder's image is finite and O(1)");
            CHECK(!memcmp(image[0]->data, image[1]->data, bytes), "the same seed, the same image");
            CHECK(memcmp(image[0]->data, image[2]->data, bytes), "another seed, another image");
        }
        for (int k = 0; k < 3; k++) tensor_free(image[k]);
        tensor_free(tokens);
    }
    for (int k = 0; k < 3; k++) vae_decoder_free(m[k]);
    vae_decoder_free(real);
}

/* The tiny detector's config files with random weights: the same checks. */
static void test_segformer_config_only(void) {
    const char *dir = "tests/fixtures/tiny-detector";
    Segformer *m[3] = {NULL, NULL, NULL}, *real = NULL;
    Error e = {{0}};
    CHECK(segformer_open(&m[0], dir, WEIGHTS_CONFIG_ONLY, 1, &e) == 0 &&
              segformer_open(&m[1], dir, WEIGHTS_CONFIG_ONLY, 1, &e) == 0 &&
              segformer_open(&m[2], dir, WEIGHTS_CONFIG_ONLY, 2, &e) == 0 &&
              segformer_open(&real, dir, WEIGHTS_FILES, 0, &e) == 0,
          "detector config-only load: %s", e.msg);
    Segformer *absent = NULL;
    CHECK(segformer_open(&absent, "tests/fixtures/absent", WEIGHTS_CONFIG_ONLY, 1, &e) != 0 &&
              !absent && strstr(e.msg, "absent/config.json"),
          "a missing detector config is named: %s", e.msg);
    if (!(m[0] && m[1] && m[2] && real)) goto done;
    CHECK(!memcmp(segformer_config(m[0]), segformer_config(real), sizeof(SegformerConfig)),
          "the config is the loaded model's");
    Tensor *image = TENSOR_NEW(1, 3, 20, 28), *mask[3] = {NULL, NULL, NULL};
    unsigned long long state = 4;
    for (int64_t i = 0; image && i < image->numel; i++) image->data[i] = harness_rand(&state);
    for (int k = 0; k < 3 && image; k++) {
        Tape *t = tape_new();
        tape_set_grad(t, false);
        Var *y = segformer_forward(t, m[k], var_new(t, image, false), NULL);
        CHECK(tape_check(t, &e) == 0, "config-only detector %d: %s", k, e.msg);
        mask[k] = y ? tensor_clone(y->value) : NULL;
        tape_free(t);
    }
    if (mask[0] && mask[1] && mask[2]) {
        size_t bytes = (size_t)mask[0]->numel * sizeof(float);
        bool in_range = true;
        for (int64_t i = 0; i < mask[0]->numel; i++)
            in_range &= mask[0]->data[i] >= 0.0f && mask[0]->data[i] <= 1.0f;
        CHECK(in_range, "the random detector's mask is in [0, 1]");
        CHECK(!memcmp(mask[0]->data, mask[1]->data, bytes), "the same seed, the same mask");
        CHECK(memcmp(mask[0]->data, mask[2]->data, bytes), "another seed, another mask");
    }
    for (int k = 0; k < 3; k++) tensor_free(mask[k]);
    tensor_free(image);
done:
    for (int k = 0; k < 3; k++) segformer_free(m[k]);
    segformer_free(real);
}

/* The real sizes' config fixtures (FLUX.2's VAE, MiT-b5) load config-only; they are not run
 * here (minutes on two cores: `diamond bench model --config-only` times them). */
static void test_real_configs(void) {
    VaeDecoder *vae = NULL;
    Segformer *det = NULL;
    Error e = {{0}};
    CHECK(vae_decoder_open(&vae, "tests/fixtures/klein-4b-config/vae", WEIGHTS_CONFIG_ONLY, 1,
                           &e) == 0,
          "FLUX.2 VAE config-only: %s", e.msg);
    if (vae) {
        const VaeConfig *c = vae_decoder_config(vae);
        CHECK(c->latent_channels == 32 && c->n_blocks == 4 && c->block_out_channels[0] == 128 &&
                  c->block_out_channels[3] == 512 && c->layers_per_block == 2 &&
                  c->norm_num_groups == 32 && c->patch_h == 2 && c->patch_w == 2,
              "the FLUX.2 VAE config");
    }
    CHECK(segformer_open(&det, "tests/fixtures/mit-b5-config", WEIGHTS_CONFIG_ONLY, 1, &e) == 0,
          "MiT-b5 config-only: %s", e.msg);
    if (det) {
        const SegformerConfig *c = segformer_config(det);
        CHECK(c->stages == 4 && c->depths[2] == 40 && c->hidden_sizes[3] == 512 &&
                  c->decoder_hidden_size == 768 && c->num_labels == 1 && c->input_h == 512 &&
                  c->input_w == 512 && !c->gelu_tanh,
              "the MiT-b5 config");
    }
    vae_decoder_free(vae);
    segformer_free(det);
}

int main(void) {
    test_random_model_values();
    test_random_for_training();
    test_rows_from_files();
    test_params_load_any();
    test_vae_config_only();
    test_segformer_config_only();
    test_real_configs();
    return harness_finish("test_config_only");
}
