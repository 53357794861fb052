/* test_vae.c - the FLUX.2 VAE decoder against tools/ref_vae.py (float64 torch, stored f32):
 * forward and d loss / d tokens on a tiny config, checkpointed and not, f32 and bf16 weights,
 * finite differences, and load errors that name what is wrong. */
#include <stdlib.h>
#include <unistd.h>

#include "../nn.h"
#include "harness.h"

#define FIXTURE "tests/fixtures/tiny-flux2/vae"
#define FIXTURE_BF16 "tests/fixtures/tiny-flux2-bf16/vae"
#define GOLDEN "tests/golden/vae.safetensors"

/* Tolerances against the float64 reference: the decoder chains ~20 convolutions, group norms
 * and a softmax in f32, so relative errors of a few 1e-6 are expected; 1e-4 relative plus an
 * absolute floor of 1e-4 of the largest value leaves room without hiding a wrong formula
 * (a wrong eps, channel order or missing residual moves values by 1e-2 or more). */
#define RTOL 1e-4f

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    return m;
}

/* One decode with loss = sum(image * r): the image and d loss / d tokens. */
typedef struct Decoded {
    Tensor *image, *grad;
} Decoded;

static Decoded decode_with_grad(const VaeDecoder *m, Tensor *tokens, Tensor *r, int h, int w) {
    Decoded d = {0};
    Tape *t = tape_new();
    Var *x = var_new(t, tokens, true);
    Var *image = vae_decode(t, m, x, h, w);
    var_keep(image);
    Var *loss = ag_sum(t, ag_mul(t, image, var_new(t, r, false)));
    Error e = {{0}};
    int rc = tape_check(t, &e) || tape_backward(t, loss, &e);
    CHECK(rc == 0, "decode + backward (h %d, w %d): %s", h, w, e.msg);
    if (rc == 0) {
        d.image = tensor_clone(image->value);
        d.grad = tensor_clone(x->grad);
    }
    tape_free(t);
    return d;
}

static void decoded_free(Decoded *d) {
    tensor_free(d->image);
    tensor_free(d->grad);
}

/* A golden tensor as a Tensor of the given shape. */
static Tensor *golden_tensor(const SafeTensors *st, const char *name, int ndim,
                             const int64_t *shape) {
    Tensor *t = tensor_new(ndim, shape);
    float *data = t ? golden_load(st, name, (size_t)t->numel) : NULL;
    if (!data) {
        tensor_free(t);
        return NULL;
    }
    memcpy(t->data, data, (size_t)t->numel * sizeof *data);
    free(data);
    return t;
}

/* Decodes golden case `name` (tokens [B, h*w, packed]) with m and compares image and gradient
 * with the golden `want`.image / `want`.grad. Also checks that no level of checkpoints changes
 * anything. */
static void test_golden_case(VaeDecoder *m, const SafeTensors *st, const char *name,
                             const char *want, int B, int h, int w) {
    const VaeConfig *c = vae_decoder_config(m);
    int packed = c->latent_channels * c->patch_h * c->patch_w;
    int up = 1 << (c->n_blocks - 1);
    int64_t H = (int64_t)h * c->patch_h * up, W = (int64_t)w * c->patch_w * up;
    char key[64];
    snprintf(key, sizeof key, "%s.tokens", name);
    Tensor *tokens = golden_tensor(st, key, SHAPE(B, (int64_t)h * w, packed));
    snprintf(key, sizeof key, "%s.r", name);
    Tensor *r = golden_tensor(st, key, SHAPE(B, c->out_channels, H, W));
    snprintf(key, sizeof key, "%s.image", want);
    Tensor *image = golden_tensor(st, key, SHAPE(B, c->out_channels, H, W));
    snprintf(key, sizeof key, "%s.grad", want);
    Tensor *grad = golden_tensor(st, key, SHAPE(B, (int64_t)h * w, packed));
    if (tokens && r && image && grad) {
        vae_decoder_set_checkpoint_levels(m, VAE_CHECKPOINT_LEVELS);
        Decoded got = decode_with_grad(m, tokens, r, h, w);
        char what[96];
        if (got.image) {
            snprintf(what, sizeof what, "%s: image [%d, %d, %lld, %lld]", want, B, c->out_channels,
                     (long long)H, (long long)W);
            check_close(what, got.image->data, image->data, (size_t)image->numel, RTOL,
                        RTOL * max_abs(image->data, (size_t)image->numel));
            snprintf(what, sizeof what, "%s: d loss / d tokens", want);
            check_close(what, got.grad->data, grad->data, (size_t)grad->numel, RTOL,
                        RTOL * max_abs(grad->data, (size_t)grad->numel));
            for (int levels = 0; levels < VAE_CHECKPOINT_LEVELS; levels++) {
                vae_decoder_set_checkpoint_levels(m, levels);
                Decoded other = decode_with_grad(m, tokens, r, h, w);
                CHECK(other.image &&
                          !memcmp(got.image->data, other.image->data, (size_t)image->numel * 4) &&
                          !memcmp(got.grad->data, other.grad->data, (size_t)grad->numel * 4),
                      "%s: %d and %d levels of checkpoints agree bit for bit", want, levels,
                      VAE_CHECKPOINT_LEVELS);
                decoded_free(&other);
            }
            vae_decoder_set_checkpoint_levels(m, VAE_CHECKPOINT_LEVELS);
        }
        decoded_free(&got);
    }
    tensor_free(tokens);
    tensor_free(r);
    tensor_free(image);
    tensor_free(grad);
}

/* ---- finite differences ---- */

typedef struct FdCase {
    const VaeDecoder *m;
    Tensor *tokens, *r;
    int h, w;
} FdCase;

static double fd_loss(void *ctx) {
    FdCase *c = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *image = vae_decode(t, c->m, var_new(t, c->tokens, false), c->h, c->w);
    double loss = NAN;
    if (image) {
        loss = 0.0;
        for (int64_t i = 0; i < image->value->numel; i++)
            loss += (double)image->value->data[i] * c->r->data[i];
    }
    tape_free(t);
    return loss;
}

/* ---- checkpoint policy ---- */

/* The tape's peak over a decode with grad, with `levels` of checkpoints, of a batch of
 * height x width images. */
static size_t decode_peak(VaeDecoder *m, int levels, int batch, int height, int width) {
    const VaeConfig *c = vae_decoder_config(m);
    int rows, cols;
    vae_decoder_token_size(m, &rows, &cols);
    int h = height / rows, w = width / cols;
    Tensor *tokens = TENSOR_NEW(batch, (int64_t)h * w, c->latent_channels * c->patch_h * c->patch_w);
    for (int64_t i = 0; tokens && i < tokens->numel; i++) tokens->data[i] = sinf(0.37f * (float)i);
    vae_decoder_set_checkpoint_levels(m, levels);
    Tape *t = tape_new();
    Var *x = var_new(t, tokens, true);
    Var *loss = ag_sum(t, vae_decode(t, m, x, h, w));
    Error e = {{0}};
    int rc = tape_check(t, &e) || tape_backward(t, loss, &e);
    CHECK(rc == 0, "decode + backward %dx%d, %d levels of checkpoints: %s", width, height,
          levels, e.msg);
    size_t peak = tape_stats(t).peak_bytes;
    tape_free(t);
    tensor_free(tokens);
    vae_decoder_set_checkpoint_levels(m, VAE_CHECKPOINT_LEVELS);
    return peak;
}

/* vae_decode_bytes bounds the measured peak of a decode with each level of checkpoints from
 * above, by less than 2x, at several sizes and batches of two configs; vae_decoder_checkpoint_for
 * picks the fewest levels whose estimate fits its budget. */
static void test_checkpoint_policy(VaeDecoder *tiny) {
    VaeDecoder *embedded = NULL;
    Error e = {{0}};
    CHECK(vae_decoder_open(&embedded, "weights/vae", WEIGHTS_FILES, 0, &e) == 0,
          "load weights/vae: %s", e.msg);
    const struct {
        VaeDecoder *m;
        const char *name;
        int batch, height, width;
    } cases[] = {{tiny, "tiny", 1, 32, 32},         {tiny, "tiny", 2, 32, 64},
                 {embedded, "embedded", 1, 32, 64}, {embedded, "embedded", 1, 64, 64},
                 {embedded, "embedded", 3, 32, 64}};
    for (size_t i = 0; embedded && i < sizeof cases / sizeof *cases; i++)
        for (int levels = 0; levels <= VAE_CHECKPOINT_LEVELS; levels++) {
            size_t peak = decode_peak(cases[i].m, levels, cases[i].batch, cases[i].height,
                                      cases[i].width);
            size_t estimate = vae_decode_bytes(cases[i].m, levels, cases[i].batch,
                                               cases[i].height, cases[i].width);
            CHECK(peak > 0 && peak <= estimate && estimate < 2 * peak,
                  "%s VAE, %d x %dx%d, %d levels of checkpoints: the estimate %zu bytes bounds "
                  "the measured peak %zu within 2x", cases[i].name, cases[i].batch,
                  cases[i].width, cases[i].height, levels, estimate, peak);
        }
    if (embedded) {
        CHECK(vae_decode_bytes(embedded, 0, 4, 64, 64) ==
                  4 * vae_decode_bytes(embedded, 0, 1, 64, 64),
              "the estimate grows with the batch");
        CHECK(vae_decoder_checkpoint_for(embedded, 1, 32, 64, VAE_MEMORY_UNKNOWN) == 0,
              "a 64x32 decode runs without checkpoints");
        /* at 1024x1024 the embedded VAE's estimates: none above a 1 GiB budget, and never more
         * with a level more */
        size_t need[VAE_CHECKPOINT_LEVELS + 1];
        for (int levels = 0; levels <= VAE_CHECKPOINT_LEVELS; levels++)
            need[levels] = vae_decode_bytes(embedded, levels, 1, 1024, 1024);
        CHECK(need[0] > VAE_MEMORY_UNKNOWN && need[0] > need[1] && need[1] >= need[2] &&
                  need[2] > need[3],
              "at 1024x1024 the plain decode's estimate (%zu bytes) exceeds 1 GiB "
              "and no level needs more than the one before: %zu, %zu, %zu", need[0], need[1],
              need[2], need[3]);
        for (int levels = 0; levels <= VAE_CHECKPOINT_LEVELS; levels++) {
            int got = vae_decoder_checkpoint_for(embedded, 1, 1024, 1024, need[levels]);
            int less = vae_decoder_checkpoint_for(embedded, 1, 1024, 1024, need[levels] - 1);
            CHECK(got <= levels && vae_decode_bytes(embedded, got, 1, 1024, 1024) == need[levels] &&
                      (levels == VAE_CHECKPOINT_LEVELS || less > got),
                  "a budget of %d levels' estimate gets the fewest levels that fit (%d), one "
                  "byte less more (%d)", levels, got, less);
        }
        CHECK(vae_decoder_checkpoint_for(embedded, 1, 1024, 1024, 1) == VAE_CHECKPOINT_LEVELS,
              "a budget nothing fits gets every level");
        CHECK(vae_decode_bytes(embedded, 0, 1, 1 << 30, 1 << 30) == SIZE_MAX,
              "an absurd size saturates the estimate");
    }
    vae_decoder_free(embedded);
}

static void test_finite_differences(const VaeDecoder *m) {
    const VaeConfig *c = vae_decoder_config(m);
    int h = 1, w = 2, packed = c->latent_channels * c->patch_h * c->patch_w;
    int up = 1 << (c->n_blocks - 1);
    FdCase fd = {.m = m, .h = h, .w = w,
                 .tokens = TENSOR_NEW(1, h * w, packed),
                 .r = TENSOR_NEW(1, c->out_channels, h * c->patch_h * up, w * c->patch_w * up)};
    unsigned long long seed = 7;
    for (int64_t i = 0; i < fd.tokens->numel; i++) fd.tokens->data[i] = harness_rand(&seed);
    for (int64_t i = 0; i < fd.r->numel; i++) fd.r->data[i] = harness_rand(&seed);
    Decoded d = decode_with_grad(m, fd.tokens, fd.r, h, w);
    /* Central differences over f32 forward passes: the loss sums ~400 O(1) terms, so its
     * rounding noise (~1e-5) over 2 eps = 2e-2 gives ~1e-3 absolute in the slope; the curvature
     * error is O(eps^2) (smaller eps made it worse: noise dominates). Measured: within
     * rtol 1e-3 + atol 1e-4 * max|grad|; the test allows twice that. */
    if (d.grad)
        check_gradient("d loss / d tokens (1 x 2 grid)", fd_loss, &fd, fd.tokens->data,
                       d.grad->data, (size_t)fd.tokens->numel, 1, 1e-2f, 2e-3f,
                       2e-4f * max_abs(d.grad->data, (size_t)d.grad->numel));
    decoded_free(&d);
    tensor_free(fd.tokens);
    tensor_free(fd.r);
}

/* A no-grad decode (how sampling runs) gives the same image as one that records, bit for bit,
 * and even where the model takes no checkpoints holds less: its blocks' intermediates are
 * freed as each block ends (a recording decode drops only those no backward reads). */
static void test_no_grad_matches(VaeDecoder *m, const SafeTensors *st) {
    const VaeConfig *c = vae_decoder_config(m);
    int packed = c->latent_channels * c->patch_h * c->patch_w;
    Tensor *tokens = golden_tensor(st, "b.tokens", SHAPE(1, 3, packed));
    Tensor *want = golden_tensor(st, "b.image", SHAPE(1, c->out_channels, 24, 8));
    if (!tokens || !want) goto done;
    vae_decoder_set_checkpoint_levels(m, 0);
    Tape *t = tape_new(), *rec = tape_new();
    tape_set_grad(t, false);
    Var *image = vae_decode(t, m, var_new(t, tokens, false), 3, 1);
    Var *recorded = vae_decode(rec, m, var_new(rec, tokens, true), 3, 1);
    CHECK(image && tape_stats(t).recorded_nodes == 0, "a no-grad decode records nothing");
    if (image && recorded) {
        check_close("no-grad decode", image->value->data, want->data, (size_t)want->numel, RTOL,
                    RTOL * max_abs(want->data, (size_t)want->numel));
        CHECK(!memcmp(image->value->data, recorded->value->data,
                      (size_t)want->numel * sizeof(float)),
              "the no-grad decode gives the recording decode's image bit for bit");
        size_t free_peak = tape_stats(t).peak_bytes, kept = tape_stats(rec).peak_bytes;
        CHECK(3 * free_peak < 2 * kept,
              "without checkpoints, the no-grad decode's peak (%zu bytes) under two thirds of "
              "the recording forward's (%zu)", free_peak, kept);
    }
    tape_free(t);
    tape_free(rec);
    vae_decoder_set_checkpoint_levels(m, VAE_CHECKPOINT_LEVELS);
done:
    tensor_free(tokens);
    tensor_free(want);
}

/* Tokens that do not match the grid or the packed channels fail the tape with a message. */
static void test_bad_tokens(const VaeDecoder *m) {
    const VaeConfig *c = vae_decoder_config(m);
    int packed = c->latent_channels * c->patch_h * c->patch_w;
    const int64_t shapes[2][3] = {{1, 5, packed}, {1, 6, packed + 1}};
    for (int i = 0; i < 2; i++) {
        Tensor *tokens = tensor_new(3, shapes[i]);
        Tape *t = tape_new();
        Var *image = vae_decode(t, m, var_new(t, tokens, true), 2, 3);
        Error e = {{0}};
        CHECK(image == NULL && tape_check(t, &e) != 0 && e.msg[0],
              "tokens [1, %lld, %lld] for a 2 x 3 grid fail the tape: %s",
              (long long)shapes[i][1], (long long)shapes[i][2], e.msg);
        tape_free(t);
        tensor_free(tokens);
    }
}

/* ---- load errors ---- */

static int read_text(const char *path, char **out) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    char *buf = malloc(1 << 16);
    size_t n = buf ? fread(buf, 1, (1 << 16) - 1, f) : 0;
    fclose(f);
    if (!buf) return -1;
    buf[n] = 0;
    *out = buf;
    return 0;
}

/* Replaces the first `from` in buf (capacity cap) by `to`. */
static void replace_text(char *buf, size_t cap, const char *from, const char *to) {
    char *at = strstr(buf, from);
    if (!at) return;
    size_t n_from = strlen(from), n_to = strlen(to), tail = strlen(at + n_from);
    if ((size_t)(at - buf) + n_to + tail + 1 > cap) return;
    memmove(at + n_to, at + n_from, tail + 1);
    memcpy(at, to, n_to);
}

/* How a copy of the f32 fixture differs from it: config.json text edits (from[i] -> to[i]),
 * a tensor left out, a tensor stored flat as [numel], a tensor whose last value is NaN. */
typedef struct FixtureEdit {
    const char *from[2], *to[2];
    const char *drop, *flatten, *poison;
} FixtureEdit;

/* Writes dir/config.json and dir/diffusion_pytorch_model.safetensors: the fixture, edited. */
static int write_fixture_copy(const char *dir, const FixtureEdit *edit) {
    char path[512], *config = NULL;
    if (read_text(FIXTURE "/config.json", &config)) return -1;
    for (int i = 0; i < 2 && edit->from[i]; i++)
        replace_text(config, 1 << 16, edit->from[i], edit->to[i]);
    snprintf(path, sizeof path, "%s/config.json", dir);
    Error e = {{0}};
    int rc = write_file_atomic(path, config, strlen(config), &e);
    free(config);
    SafeTensors *st = NULL;
    if (rc || st_open(&st, FIXTURE "/diffusion_pytorch_model.safetensors", &e)) return -1;
    size_t n = 0, count = st_count(st);
    StWriteTensor *ts = calloc(count, sizeof *ts);
    float *poisoned = NULL;
    for (size_t i = 0; ts && i < count; i++) {
        const StTensor *s = st_at(st, i);
        if (edit->drop && !strcmp(s->name, edit->drop)) continue;
        ts[n] = (StWriteTensor){.name = s->name, .dtype = s->dtype, .ndim = s->ndim,
                                .data = s->data};
        memcpy(ts[n].shape, s->shape, sizeof ts[n].shape);
        if (edit->flatten && !strcmp(s->name, edit->flatten)) ts[n] = (StWriteTensor){
            .name = s->name, .dtype = s->dtype, .ndim = 1, .shape = {s->numel}, .data = s->data};
        if (edit->poison && !strcmp(s->name, edit->poison) && s->dtype == DTYPE_F32 &&
            (poisoned = malloc((size_t)s->numel * sizeof *poisoned))) {
            memcpy(poisoned, s->data, (size_t)s->numel * sizeof *poisoned);
            poisoned[s->numel - 1] = NAN;
            ts[n].data = poisoned;
        }
        n++;
    }
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    rc = ts ? st_write(path, ts, n, &e) : -1;
    free(ts);
    free(poisoned);
    st_close(st);
    return rc;
}

static void remove_fixture_copy(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    unlink(path);
}

static void expect_load_error(const char *dir, FixtureEdit edit, const char *want,
                              const char *what) {
    if (write_fixture_copy(dir, &edit)) {
        CHECK(0, "%s: could not write the edited fixture", what);
        return;
    }
    VaeDecoder *m = NULL;
    Error e = {{0}};
    int rc = vae_decoder_open(&m, dir, WEIGHTS_FILES, 0, &e);
    CHECK(rc != 0 && m == NULL && strstr(e.msg, want), "%s: %s", what, e.msg);
    vae_decoder_free(m);
}

/* use_post_quant_conv and mid_block_add_attention false on files that hold those weights: an
 * error naming them (strict loading); non-strict, the weights they leave are ignored, against
 * golden case "c". */
static void test_config_switches(const char *dir, const SafeTensors *st) {
    FixtureEdit edit = {.from = {"\"use_post_quant_conv\": true",
                                 "\"mid_block_add_attention\": true"},
                        .to = {"\"use_post_quant_conv\": false",
                               "\"mid_block_add_attention\": false"}};
    VaeDecoder *m = NULL;
    Error e = {{0}};
    int rc = write_fixture_copy(dir, &edit);
    CHECK(rc == 0 && vae_decoder_open(&m, dir, WEIGHTS_FILES, 0, &e) != 0 && !m &&
              strstr(e.msg, "12 tensors in the files that the config does not use") &&
              strstr(e.msg, "'post_quant_conv.weight'"),
          "strict: tensors the config leaves unused are named: %s", e.msg);
    rc = rc || vae_decoder_open(&m, dir, WEIGHTS_FILES_NON_STRICT, 0, &e);
    CHECK(rc == 0, "load with the config switches off, non-strict: %s", e.msg);
    if (m) test_golden_case(m, st, "c", "c", 1, 2, 2);
    vae_decoder_free(m);
}

static void test_load_errors(const char *dir) {
    const char *shortcut = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight";
    expect_load_error(dir, (FixtureEdit){.drop = shortcut}, shortcut, "a missing tensor is named");
    expect_load_error(dir, (FixtureEdit){.flatten = "decoder.mid_block.attentions.0.to_q.weight"},
                      "'decoder.mid_block.attentions.0.to_q.weight' has shape [576]",
                      "a mis-shaped tensor is named");
    expect_load_error(dir, (FixtureEdit){.drop = "bn.running_var"}, "'bn.running_var'",
                      "the latent batch norm statistics are required");
    expect_load_error(dir, (FixtureEdit){.poison = "decoder.conv_in.weight"},
                      "'decoder.conv_in.weight' holds NaN", "a NaN weight is named on loading");
    expect_load_error(dir, (FixtureEdit){.from = {"\"layers_per_block\""}, .to = {"\"layers\""}},
                      "'layers_per_block' is missing", "a config key that is missing is named");
    expect_load_error(dir, (FixtureEdit){.from = {"\"patch_size\""}, .to = {"\"patch\""}},
                      "'patch_size' is missing", "patch_size is required");
    expect_load_error(dir, (FixtureEdit){.from = {"\"norm_num_groups\": 4"},
                                         .to = {"\"norm_num_groups\": 5"}},
                      "not a positive multiple of norm_num_groups",
                      "channels that do not split into the groups are refused");
    remove_fixture_copy(dir);
    VaeDecoder *m = NULL;
    Error e = {{0}};
    CHECK(vae_decoder_open(&m, dir, WEIGHTS_FILES, 0, &e) != 0 && strstr(e.msg, "config.json"),
          "an empty directory names config.json: %s", e.msg);
}

/* The default budget follows the memory available: FLUX.2's VAE decodes 512x512 without
 * checkpoints with 20 GiB available (a 24 GB machine), with all three levels with 3 GiB. */
static void test_default_budget(void) {
    const size_t gib = (size_t)1 << 30;
    CHECK(vae_default_memory(0) == VAE_MEMORY_UNKNOWN, "unknown memory: the 1 GiB budget");
    CHECK(vae_default_memory(20 * gib) == 10 * gib, "half of what is available");
#ifdef __linux__
    CHECK(memory_available() > 0, "MemAvailable is read (%zu bytes)", memory_available());
#endif
    VaeDecoder *real = NULL;
    Error e = {{0}};
    CHECK(vae_decoder_open(&real, "tests/fixtures/klein-4b-config/vae", WEIGHTS_CONFIG_ONLY, 1,
                           &e) == 0,
          "FLUX.2's VAE from its config: %s", e.msg);
    if (!real) return;
    int roomy = vae_decoder_checkpoint_for(real, 1, 512, 512, vae_default_memory(20 * gib));
    int small = vae_decoder_checkpoint_for(real, 1, 512, 512, vae_default_memory(3 * gib));
    CHECK(roomy == 0 && small == VAE_CHECKPOINT_LEVELS, "512x512: %d levels with 20 GiB "
          "available, %d with 3 GiB", roomy, small);
    vae_decoder_free(real);
}

int main(void) {
    SafeTensors *st = golden_open(GOLDEN);
    VaeDecoder *m = NULL, *m16 = NULL;
    Error e = {{0}};
    CHECK(vae_decoder_open(&m, FIXTURE, WEIGHTS_FILES, 0, &e) == 0, "load %s: %s", FIXTURE, e.msg);
    CHECK(vae_decoder_open(&m16, FIXTURE_BF16, WEIGHTS_FILES, 0, &e) == 0, "load %s: %s",
          FIXTURE_BF16, e.msg);
    if (m && st) {
        test_golden_case(m, st, "a", "a", 2, 2, 3);
        test_golden_case(m, st, "b", "b", 1, 3, 1);
        test_no_grad_matches(m, st);
        test_bad_tokens(m);
        test_finite_differences(m);
        test_checkpoint_policy(m);
    }
    /* bf16 weights widen exactly to f32, and the reference ran on those same widened values,
     * so the bf16 model has its own golden at the f32 tolerance. */
    if (m16 && st) test_golden_case(m16, st, "a", "bf16", 2, 2, 3);
    test_default_budget();
    char dir[] = "/tmp/diamond-test-vae-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp %s", dir);
    if (st) test_config_switches(dir, st);
    test_load_errors(dir);
    remove_fixture_copy(dir);
    rmdir(dir);
    vae_decoder_free(m);
    vae_decoder_free(m16);
    if (st) st_close(st);
    return harness_finish("test_vae");
}
