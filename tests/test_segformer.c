/* test_segformer.c - the SegFormer artifact detector against the PyTorch reference
 * (tools/ref_segformer.py): masks and d mean(mask^2) / d image on the tiny fixture, f32 and bf16
 * weights, the preprocessing switches, finite differences, and the loader's errors. */
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include "../nn.h"
#include "harness.h"

#define FIXTURE "tests/fixtures/tiny-detector"
#define FIXTURE_BF16 "tests/fixtures/tiny-detector-bf16"
#define GOLDEN "tests/golden/segformer.safetensors"

/* f32 against the float64 reference: the masks within 1e-5 relative (values near 0.5); the
 * gradients within 1e-4 relative plus 1e-5 of their largest value, since an element near zero is
 * a sum of larger terms that cancel in float32. */
#define MASK_RTOL 1e-5f
#define MASK_ATOL 1e-6f
#define GRAD_RTOL 1e-4f
#define GRAD_SCALE_ATOL 1e-5f

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

/* The golden tensor <case_name>.<what> as a new Tensor of its stored shape, or NULL (a failure). */
static Tensor *golden_tensor(const SafeTensors *g, const char *case_name, const char *what) {
    char name[128];
    snprintf(name, sizeof name, "%s.%s", case_name, what);
    const StTensor *info = st_find(g, name);
    CHECK(info && info->ndim <= TENSOR_MAX_DIMS, "golden tensor %s", name);
    if (!info || info->ndim > TENSOR_MAX_DIMS) return NULL;
    Tensor *t = tensor_new(info->ndim, info->shape);
    Error e = {{0}};
    if (t && st_read_f32(g, name, t->data, t->numel, &e) == 0) return t;
    CHECK(0, "read %s: %s", name, e.msg);
    tensor_free(t);
    return NULL;
}

static void compare(const char *case_name, const char *what, const Tensor *got, const Tensor *want,
                    float rtol, float atol) {
    char label[160];
    snprintf(label, sizeof label, "%s %s", case_name, what);
    bool same = got && want && tensor_same_shape(got, want);
    CHECK(same, "%s: the shape matches the golden", label);
    if (same) check_close(label, got->data, want->data, (size_t)want->numel, rtol, atol);
}

/* Runs golden case `case_name` through m: mask_small, mask and d mean(mask^2) / d image. */
static void check_case(const Segformer *m, const SafeTensors *g, const char *case_name) {
    Tensor *image = golden_tensor(g, case_name, "image");
    Tensor *small_want = golden_tensor(g, case_name, "mask_small");
    Tensor *mask_want = golden_tensor(g, case_name, "mask");
    Tensor *grad_want = golden_tensor(g, case_name, "grad");
    if (image && small_want && mask_want && grad_want) {
        Tape *t = tape_new();
        Var *x = var_new(t, image, true), *small = NULL;
        Var *mask = segformer_forward(t, m, x, &small);
        if (mask) {
            var_keep(mask);
            var_keep(small);
        }
        Var *loss = ag_mean(t, ag_pow(t, mask, 2.0f));
        Error e = {{0}};
        CHECK(tape_check(t, &e) == 0 && tape_backward(t, loss, &e) == 0,
              "%s forward and backward: %s", case_name, e.msg);
        if (loss && x->grad) {
            compare(case_name, "mask_small", small->value, small_want, MASK_RTOL, MASK_ATOL);
            compare(case_name, "mask", mask->value, mask_want, MASK_RTOL, MASK_ATOL);
            float atol = GRAD_SCALE_ATOL * max_abs(grad_want->data, (size_t)grad_want->numel);
            compare(case_name, "d loss / d image", x->grad, grad_want, GRAD_RTOL, atol);
        }
        tape_free(t);
    }
    tensor_free(image);
    tensor_free(small_want);
    tensor_free(mask_want);
    tensor_free(grad_want);
}

/* -- scratch detector directories -- */

/* dir: a mkdtemp template. Each of config.json, preprocessor_config.json and model.safetensors is
 * the given text, or (NULL) a link to the fixture's; model is NULL when the caller writes it. */
static bool scratch_make(char *dir, const char *config, const char *preprocessor, bool link_model) {
    if (!mkdtemp(dir)) return false;
    const char *files[3] = {"config.json", "preprocessor_config.json", "model.safetensors"};
    const char *texts[3] = {config, preprocessor, NULL};
    bool ok = true;
    for (int i = 0; i < 3; i++) {
        char path[PATH_MAX], target[PATH_MAX], fixture[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        snprintf(fixture, sizeof fixture, "%s/%s", FIXTURE, files[i]);
        if (texts[i]) {
            Error e = {{0}};
            ok = ok && write_file_atomic(path, texts[i], strlen(texts[i]), &e) == 0;
        } else if (i < 2 || link_model) {
            ok = ok && realpath(fixture, target) && symlink(target, path) == 0;
        }
    }
    CHECK(ok, "make the scratch detector %s", dir);
    return ok;
}

static void scratch_remove(const char *dir) {
    const char *files[3] = {"config.json", "preprocessor_config.json", "model.safetensors"};
    for (int i = 0; i < 3; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *text = calloc(1 << 16, 1);
    size_t n = text ? fread(text, 1, (1 << 16) - 1, f) : 0;
    fclose(f);
    if (text) text[n] = '\0';
    return text;
}

/* The "plain" case: do_resize and do_normalize off, so the network sees the 36x44 image itself. */
static void check_plain(const SafeTensors *g) {
    char dir[] = "/tmp/diamond-segformer-XXXXXX";
    const char *pre = "{\"do_resize\": false, \"do_normalize\": false}";
    if (!scratch_make(dir, NULL, pre, true)) return;
    Segformer *m = NULL;
    Error e = {{0}};
    CHECK(segformer_open(&m, dir, WEIGHTS_FILES, 0, &e) == 0,
          "load without resize and normalisation: %s", e.msg);
    if (m) {
        const SegformerConfig *c = segformer_config(m);
        CHECK(!c->do_resize && !c->do_normalize, "the switches are read");
        check_case(m, g, "plain");
    }
    segformer_free(m);
    scratch_remove(dir);
}

/* -- finite differences -- */

typedef struct FdContext {
    const Segformer *m;
    Tensor *image;
    const float *r; /* the loss is sum(mask * r) */
} FdContext;

static double fd_loss(void *ctx) {
    FdContext *c = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *mask = segformer_forward(t, c->m, var_new(t, c->image, false), NULL);
    double sum = NAN;
    if (mask) {
        sum = 0.0;
        for (int64_t i = 0; i < mask->value->numel; i++)
            sum += (double)mask->value->data[i] * c->r[i];
    }
    tape_free(t);
    return sum;
}

/* d sum(mask * r) / d image on a 10x12 image (upsampled to 64x48 inside), every element. The
 * decode head's ReLUs put thousands of kinks downstream of each pixel; the share that a step
 * crosses grows with the step, so the central difference is off by O(eps), not O(eps^2): about
 * 1.5% at worst for eps 1e-3 (3% at 3e-3). The golden comparisons above are the tight check. */
static void check_finite_differences(const Segformer *m) {
    unsigned long long seed = 7;
    Tensor *image = TENSOR_NEW(1, 3, 10, 12), *r = TENSOR_NEW(1, 1, 10, 12);
    for (int64_t i = 0; i < image->numel; i++) image->data[i] = 0.9f * harness_rand(&seed);
    for (int64_t i = 0; i < r->numel; i++) r->data[i] = harness_rand(&seed);
    Tape *t = tape_new();
    Var *x = var_new(t, image, true);
    Var *mask = segformer_forward(t, m, x, NULL);
    Var *loss = ag_sum(t, ag_mul(t, mask, var_new(t, r, false)));
    Error e = {{0}};
    CHECK(tape_check(t, &e) == 0 && tape_backward(t, loss, &e) == 0, "finite-difference setup: %s",
          e.msg);
    if (x->grad) {
        FdContext ctx = {.m = m, .image = image, .r = r->data};
        check_gradient("d sum(mask r) / d image", fd_loss, &ctx, image->data, x->grad->data,
                       (size_t)image->numel, 1, 1e-3f, 2e-2f, 1e-3f);
    }
    tape_free(t);
    tensor_free(image);
    tensor_free(r);
}

/* -- errors -- */

/* Writes <dir>/model.safetensors: the fixture's tensors without `drop`, and with `reshape` stored
 * flat (same bytes, another shape). */
static bool write_altered_model(const char *dir, const char *drop, const char *reshape) {
    SafeTensors *st = NULL;
    Error e = {{0}};
    if (st_open(&st, FIXTURE "/model.safetensors", &e)) return false;
    size_t n = st_count(st), kept = 0;
    StWriteTensor *out = calloc(n, sizeof *out);
    for (size_t i = 0; out && i < n; i++) {
        const StTensor *s = st_at(st, i);
        if (drop && strcmp(s->name, drop) == 0) continue;
        StWriteTensor w = {.name = s->name, .dtype = s->dtype, .ndim = s->ndim, .data = s->data};
        memcpy(w.shape, s->shape, sizeof w.shape);
        if (reshape && strcmp(s->name, reshape) == 0) {
            w.ndim = 1;
            w.shape[0] = s->numel;
        }
        out[kept++] = w;
    }
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    bool ok = out && st_write(path, out, kept, &e) == 0;
    free(out);
    st_close(st);
    return ok;
}

/* Loading dir must fail with a message holding every one of want[0..n). */
static void expect_load_error(const char *dir, const char *what, const char *const *want, int n) {
    Segformer *m = NULL;
    Error e = {{0}};
    int rc = segformer_open(&m, dir, WEIGHTS_FILES, 0, &e);
    bool named = rc != 0 && m == NULL;
    for (int i = 0; named && i < n; i++) named = strstr(e.msg, want[i]) != NULL;
    CHECK(named, "%s is refused with a message naming it: %s", what, e.msg);
    segformer_free(m);
}

static void check_tensor_errors(void) {
    const char *missing = "segformer.encoder.block.1.0.attention.self.sr.weight";
    const char *misshaped = "segformer.encoder.block.2.1.mlp.dwconv.dwconv.weight";
    char dir[] = "/tmp/diamond-segformer-XXXXXX";
    if (scratch_make(dir, NULL, NULL, false)) {
        CHECK(write_altered_model(dir, missing, NULL), "write a model without %s", missing);
        expect_load_error(dir, "a missing tensor", (const char *[]){missing, "missing"}, 2);
        CHECK(write_altered_model(dir, NULL, misshaped), "write a model with %s flat", misshaped);
        expect_load_error(dir, "a mis-shaped tensor",
                          (const char *[]){misshaped, "[864]", "[96, 1, 3, 3]"}, 3);
        const char *head = "decode_head.linear_c.2.proj.bias";
        CHECK(write_altered_model(dir, head, NULL), "write a model without %s", head);
        expect_load_error(dir, "a missing head tensor", (const char *[]){head, "missing"}, 2);
        const char *fuse = "decode_head.linear_fuse.weight";
        CHECK(write_altered_model(dir, NULL, fuse), "write a model with %s flat", fuse);
        expect_load_error(dir, "a mis-shaped head tensor",
                          (const char *[]){fuse, "[1024]", "[16, 64, 1, 1]"}, 3);
        scratch_remove(dir);
    }
}

/* The fixture's config.json with `from` replaced by `to` (the first occurrence). */
static char *edited_config(const char *from, const char *to) {
    char *text = read_text(FIXTURE "/config.json");
    char *at = text ? strstr(text, from) : NULL;
    CHECK(at != NULL, "config.json holds %s", from);
    if (!at) {
        free(text);
        return NULL;
    }
    char *out = calloc(strlen(text) + strlen(to) + 1, 1);
    if (out) {
        memcpy(out, text, (size_t)(at - text));
        strcat(out, to);
        strcat(out, at + strlen(from));
    }
    free(text);
    return out;
}

static void check_config_errors(void) {
    static const struct {
        const char *what, *from, *to, *want[2];
    } config_cases[] = {
        {"heads that do not divide the hidden size",
         "\"num_attention_heads\": [\n    1,\n    2,\n    3",
         "\"num_attention_heads\": [\n    1,\n    2,\n    5",
         {"config.json", "heads"}},
        {"a per-stage list of the wrong length",
         "\"sr_ratios\": [\n    8,",
         "\"sr_ratios\": [\n",
         {"config.json", "sr_ratios"}},
        {"an unsupported activation", "\"gelu\"", "\"swish\"", {"config.json", "swish"}},
        {"the last stage left unreshaped", "\"reshape_last_stage\": true",
         "\"reshape_last_stage\": false",
         {"config.json", "key 'reshape_last_stage' is false; diamond implements only true"}},
        {"a layer_norm_eps that is no epsilon", "\"layer_norm_eps\": 1e-06",
         "\"layer_norm_eps\": -3", {"config.json", "layer_norm_eps' is -3"}},
    };
    static const struct {
        const char *what, *text, *want[2];
    } pre_cases[] = {
        {"a zero std",
         "{\"size\": {\"height\": 64, \"width\": 48}, \"image_mean\": [0, 0, 0], "
         "\"image_std\": [1, 0, 1]}",
         {"preprocessor_config.json", "image_std"}},
        {"a mean past float's range (every input would become an infinity)",
         "{\"size\": 64, \"image_mean\": [1e308, 0, 0], \"image_std\": [1, 1, 1]}",
         {"preprocessor_config.json", "image_mean' entry 0 must be a number in [-1000, 1000]"}},
        {"a negative std",
         "{\"size\": 64, \"image_mean\": [0, 0, 0], \"image_std\": [1, -0.5, 1]}",
         {"preprocessor_config.json", "image_std' entry 1"}},
        {"a mean of two numbers",
         "{\"size\": 64, \"image_mean\": [0, 0], \"image_std\": [1, 1, 1]}",
         {"preprocessor_config.json", "image_mean"}},
        {"a missing size",
         "{\"image_mean\": [0, 0, 0], \"image_std\": [1, 1, 1]}",
         {"preprocessor_config.json", "size"}},
        {"a resize other than bilinear",
         "{\"size\": 64, \"resample\": 3, \"do_normalize\": false}",
         {"preprocessor_config.json", "key 'resample' is 3; diamond implements only 2"}},
        {"another rescale factor",
         "{\"size\": 64, \"rescale_factor\": 1, \"do_normalize\": false}",
         {"preprocessor_config.json", "key 'rescale_factor' is 1; diamond implements only"}},
        {"pixels left unscaled",
         "{\"size\": 64, \"do_rescale\": false, \"do_normalize\": false}",
         {"preprocessor_config.json", "key 'do_rescale' is false"}},
        {"a size of zero",
         "{\"size\": {\"height\": 0, \"width\": 48}, \"do_normalize\": false}",
         {"preprocessor_config.json", "height"}},
    };
    for (size_t i = 0; i < sizeof config_cases / sizeof config_cases[0]; i++) {
        char *config = edited_config(config_cases[i].from, config_cases[i].to);
        char dir[] = "/tmp/diamond-segformer-XXXXXX";
        if (config && scratch_make(dir, config, NULL, true)) {
            expect_load_error(dir, config_cases[i].what, config_cases[i].want, 2);
            scratch_remove(dir);
        }
        free(config);
    }
    for (size_t i = 0; i < sizeof pre_cases / sizeof pre_cases[0]; i++) {
        char dir[] = "/tmp/diamond-segformer-XXXXXX";
        if (scratch_make(dir, NULL, pre_cases[i].text, true)) {
            expect_load_error(dir, pre_cases[i].what, pre_cases[i].want, 2);
            scratch_remove(dir);
        }
    }
}

/* A wrong image is an error on the tape, not a crash. */
static void check_bad_image(const Segformer *m) {
    Tape *t = tape_new();
    Tensor *gray = TENSOR_NEW(1, 1, 16, 16);
    Var *mask = segformer_forward(t, m, var_new(t, gray, true), NULL);
    Error e = {{0}};
    CHECK(mask == NULL && tape_check(t, &e) != 0, "a 1-channel image is refused: %s", e.msg);
    tape_free(t);
    tensor_free(gray);
}

/* segformer_forward_bytes bounds the tape's measured peak over a forward and a backward to the
 * image from above, by less than 2x, at sizes below, at and above the network's input. */
static void check_memory_estimate(const Segformer *m) {
    static const int sizes[][3] = {{1, 32, 32}, {1, 64, 48}, {2, 64, 48}, {1, 256, 128},
                                   {1, 512, 512}};
    for (size_t i = 0; i < COUNT(sizes); i++) {
        int batch = sizes[i][0], height = sizes[i][1], width = sizes[i][2];
        Tensor *image = TENSOR_NEW(batch, 3, height, width);
        CHECK(image != NULL, "an image of %d x %dx%d", batch, width, height);
        if (!image) continue;
        for (int64_t j = 0; j < image->numel; j++) image->data[j] = sinf(0.37f * (float)j);
        Tape *t = tape_new();
        Error e = {{0}};
        Var *mask = segformer_forward(t, m, var_new(t, image, true), NULL);
        int rc = tape_check(t, &e) || tape_backward(t, ag_sum(t, mask), &e);
        size_t peak = tape_stats(t).peak_bytes;
        size_t estimate = segformer_forward_bytes(m, batch, height, width);
        CHECK(rc == 0 && peak <= estimate && estimate < 2 * peak,
              "%d x %dx%d: the estimate %zu bytes bounds the measured peak %zu within 2x (%s)",
              batch, width, height, estimate, peak, e.msg);
        tape_free(t);
        tensor_free(image);
    }
}

/* The mask and the gradient to the image of one forward and backward; the tape's peak bytes. */
static size_t mask_and_grad(const Segformer *m, const Tensor *image, Tensor **mask,
                            Tensor **grad) {
    Tape *t = tape_new();
    Error e = {{0}};
    Var *x = var_take(t, tensor_clone(image), true);
    Var *y = segformer_forward(t, m, x, NULL);
    if (y) var_keep(y);
    int rc = tape_check(t, &e) || tape_backward(t, ag_sum(t, y), &e);
    CHECK(rc == 0, "forward and backward: %s", e.msg);
    *mask = rc == 0 ? tensor_clone(y->value) : NULL;
    *grad = rc == 0 ? tensor_clone(x->grad) : NULL;
    size_t peak = tape_stats(t).peak_bytes;
    tape_free(t);
    return peak;
}

/* The encoder layers straight on the tape give the checkpointed run's mask and gradient bit for
 * bit, and a larger peak (what the checkpoints save). */
static void check_layer_checkpoints(Segformer *m) {
    Tensor *image = TENSOR_NEW(1, 3, 64, 48);
    if (!image) return;
    for (int64_t j = 0; j < image->numel; j++) image->data[j] = sinf(0.23f * (float)j);
    Tensor *mask = NULL, *grad = NULL, *mask_plain = NULL, *grad_plain = NULL;
    size_t peak = mask_and_grad(m, image, &mask, &grad);
    segformer_set_layer_checkpoints(m, false);
    size_t peak_plain = mask_and_grad(m, image, &mask_plain, &grad_plain);
    segformer_set_layer_checkpoints(m, true);
    CHECK(mask && grad && mask_plain && grad_plain &&
              !memcmp(mask->data, mask_plain->data, (size_t)mask->numel * sizeof(float)) &&
              !memcmp(grad->data, grad_plain->data, (size_t)grad->numel * sizeof(float)),
          "layers on the tape: the same mask and gradient bit for bit");
    CHECK(peak_plain > peak, "layers on the tape: peak %zu bytes, checkpointed %zu", peak_plain,
          peak);
    tensor_free(mask);
    tensor_free(grad);
    tensor_free(mask_plain);
    tensor_free(grad_plain);
    tensor_free(image);
}

int main(void) {
    SafeTensors *g = golden_open(GOLDEN);
    Segformer *m = NULL, *m16 = NULL;
    Error e = {{0}};
    CHECK(segformer_open(&m, FIXTURE, WEIGHTS_FILES, 0, &e) == 0, "load %s: %s", FIXTURE, e.msg);
    CHECK(segformer_open(&m16, FIXTURE_BF16, WEIGHTS_FILES, 0, &e) == 0, "load %s: %s",
          FIXTURE_BF16, e.msg);
    if (m) {
        const SegformerConfig *c = segformer_config(m);
        CHECK(c->stages == 4 && c->depths[3] == 2 && c->input_h == 64 && c->input_w == 48 &&
                  c->num_labels == 1 && !c->gelu_tanh,
              "the config is read");
    }
    if (g && m) {
        check_case(m, g, "resize");
        check_case(m, g, "native");
        check_plain(g);
    }
    if (g && m16) check_case(m16, g, "native_bf16");
    if (g && m) { /* the head as upstream writes it: the same goldens, forward and backward */
        CHECK(segformer_set_head_unfolded(m, true, &e) == 0, "unfold the head: %s", e.msg);
        check_case(m, g, "resize");
        check_case(m, g, "native");
        segformer_set_head_unfolded(m, false, &e);
    }
    if (g && m) { /* the layers as upstream's autograd runs them: the same goldens */
        segformer_set_layer_checkpoints(m, false);
        check_case(m, g, "resize");
        check_case(m, g, "native");
        segformer_set_layer_checkpoints(m, true);
    }
    if (m) {
        check_finite_differences(m);
        check_bad_image(m);
        check_memory_estimate(m);
        check_layer_checkpoints(m);
    }
    check_tensor_errors();
    check_config_errors();
    segformer_free(m);
    segformer_free(m16);
    st_close(g);
    return harness_finish("test_segformer");
}
