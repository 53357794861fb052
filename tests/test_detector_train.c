/* test_detector_train.c - the trainable detector (segformer_open WEIGHTS_FRESH's head), its loss
 * and its training: d loss / d parameters against PyTorch (tools/ref_segformer.py) and by finite
 * differences, segformer_save read back by segformer_load as the same detector with every
 * upstream tensor, the max-pooled target, and 20 AdamW steps on the shipped tiny config; the flow
 * model's samples labelled by the oracle, and batches mixing them in. */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "../nn.h"
#include "../train/train.h"
#include "harness.h"

#define FIXTURE "tests/fixtures/tiny-detector-train"
#define GOLDEN "tests/golden/detector_train.safetensors"
#define SHIPPED "weights/detector"
#define POS_WEIGHT 3.0f

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The golden tensor `name` as a new Tensor of its stored shape, or NULL (a failure). */
static Tensor *golden_tensor(const SafeTensors *g, const char *name) {
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

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

static int param_index(const Params *p, const char *name) {
    for (int i = 0; i < params_count(p); i++)
        if (!strcmp(params_name(p, i), name)) return i;
    return -1;
}

/* A trainable detector (segformer_open WEIGHTS_FRESH) holding the fixture's weights: every
 * parameter and buffer overwritten by the fixture's tensor of the same name. */
static Segformer *fixture_detector(void) {
    Segformer *m = NULL;
    SafeTensors *st = NULL;
    Error e = {{0}};
    int rc = segformer_open(&m, FIXTURE, WEIGHTS_FRESH, 1, &e) ||
             st_open(&st, FIXTURE "/model.safetensors", &e);
    Params *p = rc ? NULL : segformer_params(m);
    for (int i = 0; p && rc == 0 && i < params_count(p); i++) {
        Tensor *v = params_var(p, i)->value;
        rc = st_read_f32(st, params_name(p, i), v->data, v->numel, &e);
    }
    CHECK(rc == 0, "the trainable detector with the fixture's weights: %s", e.msg);
    st_close(st);
    if (rc) {
        segformer_free(m);
        return NULL;
    }
    return m;
}

/* BCE of m's logits on image against target, on t. */
static Var *fixture_loss(Tape *t, const Segformer *m, Tensor *image, Tensor *target) {
    Var *logits = segformer_forward_logits(t, m, var_new(t, image, false));
    return detector_bce_loss(t, logits, var_new(t, target, false), POS_WEIGHT);
}

typedef struct FdContext {
    const Segformer *m;
    Tensor *image, *target;
} FdContext;

static double fd_loss(void *ctx) {
    FdContext *c = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *loss = fixture_loss(t, c->m, c->image, c->target);
    double value = loss ? loss->value->data[0] : NAN;
    tape_free(t);
    return value;
}

/* Loss and parameter gradients against PyTorch (float64), then finite differences on a few
 * parameters. Tolerances as test_segformer.c's: float32 against float64, gradients within 1e-4
 * relative plus 1e-5 of their largest value. */
static void check_against_torch(void) {
    SafeTensors *g = golden_open(GOLDEN);
    Segformer *m = fixture_detector();
    Tensor *image = g ? golden_tensor(g, "image") : NULL;
    Tensor *mask = g ? golden_tensor(g, "mask") : NULL;
    Tensor *target_want = g ? golden_tensor(g, "target") : NULL;
    Tensor *logits_want = g ? golden_tensor(g, "logits") : NULL;
    Tensor *loss_want = g ? golden_tensor(g, "loss") : NULL;
    if (!m || !image || !mask || !target_want || !logits_want || !loss_want) goto done;

    /* the max-pooled target from the exact mask */
    Tensor *target = tensor_new(target_want->ndim, target_want->shape);
    int64_t H = mask->shape[1], W = mask->shape[2], h = target->shape[2], w = target->shape[3];
    uint8_t *bytes = malloc((size_t)(H * W));
    Error e = {{0}};
    int rc = 0;
    for (int64_t b = 0; rc == 0 && b < mask->shape[0]; b++) {
        for (int64_t i = 0; i < H * W; i++) bytes[i] = mask->data[b * H * W + i] != 0.0f;
        rc = detector_target(bytes, (int)H, (int)W, (int)h, (int)w, target->data + b * h * w, &e);
    }
    free(bytes);
    CHECK(rc == 0, "detector_target: %s", e.msg);
    check_close("target = max_pool2d(mask, 4)", target->data, target_want->data,
                (size_t)target->numel, 0.0f, 0.0f);

    Params *p = segformer_params(m);
    params_set_trainable(p, true);
    Tape *t = tape_new();
    Var *logits = segformer_forward_logits(t, m, var_new(t, image, false));
    var_keep(logits);
    Var *loss = detector_bce_loss(t, logits, var_new(t, target, false), POS_WEIGHT);
    rc = tape_check(t, &e) || tape_backward(t, loss, &e);
    CHECK(rc == 0, "loss and backward: %s", e.msg);
    if (rc == 0) {
        check_close("logits", logits->value->data, logits_want->data, (size_t)logits_want->numel,
                    1e-4f, 1e-5f);
        check_close("loss", loss->value->data, loss_want->data, 1, 1e-5f, 0.0f);
    }
    static const char *const names[] = {
        "decode_head.linear_c.0.proj.weight", "decode_head.linear_c.3.proj.bias",
        "decode_head.classifier.weight", "decode_head.classifier.bias",
        "segformer.encoder.patch_embeddings.0.proj.weight",
        "segformer.encoder.block.1.0.attention.self.sr.weight",
        "segformer.encoder.block.3.1.mlp.dense2.weight", "segformer.encoder.layer_norm.2.weight"};
    FdContext ctx = {.m = m, .image = image, .target = target};
    for (size_t k = 0; rc == 0 && k < sizeof names / sizeof *names; k++) {
        char golden_name[160], label[200];
        snprintf(golden_name, sizeof golden_name, "grad.%s", names[k]);
        Tensor *want = golden_tensor(g, golden_name);
        int i = param_index(p, names[k]);
        Var *v = i >= 0 ? params_var(p, i) : NULL;
        CHECK(v && v->grad && want && v->grad->numel == want->numel,
              "d loss / d %s exists with the golden's size", names[k]);
        if (v && v->grad && want && v->grad->numel == want->numel) {
            snprintf(label, sizeof label, "d loss / d %s vs torch", names[k]);
            check_close(label, v->grad->data, want->data, (size_t)want->numel, 1e-4f,
                        1e-5f * max_abs(want->data, (size_t)want->numel));
            /* about 40 elements each. The ReLU kinks make central differences O(eps) off (see
             * test_segformer.c) and the float32 loss (about 1) is good to about 1e-7, which a
             * step of 2e-3 turns into 5e-5: 2% relative plus 3e-4, the gradients being ~1e-2 */
            snprintf(label, sizeof label, "d loss / d %s", names[k]);
            params_set_trainable(p, false);
            check_gradient(label, fd_loss, &ctx, v->value->data, v->grad->data,
                           (size_t)v->value->numel, (size_t)v->value->numel / 40 + 1, 1e-3f,
                           2e-2f, 3e-4f);
            params_set_trainable(p, true);
        }
        tensor_free(want);
    }
    tape_free(t);
    tensor_free(target);
done:
    segformer_free(m);
    tensor_free(image);
    tensor_free(mask);
    tensor_free(target_want);
    tensor_free(logits_want);
    tensor_free(loss_want);
    st_close(g);
}

/* mask_small and mask of m on image, new tensors. */
static int run_detector(const Segformer *m, Tensor *image, Tensor **small, Tensor **mask) {
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *s = NULL, *full = segformer_forward(t, m, var_new(t, image, false), &s);
    Error e = {{0}};
    int rc = tape_check(t, &e);
    *small = rc ? NULL : tensor_clone(s->value);
    *mask = rc ? NULL : tensor_clone(full->value);
    tape_free(t);
    return rc || !*small || !*mask ? -1 : 0;
}

/* Every name of the safetensors file at path, sorted, joined by newlines (malloc'd). */
static char *tensor_names(const char *path) {
    SafeTensors *st = NULL;
    Error e = {{0}};
    if (st_open(&st, path, &e)) {
        CHECK(0, "open %s: %s", path, e.msg);
        return NULL;
    }
    size_t n = st_count(st), len = 1;
    const char **names = malloc(n * sizeof *names);
    for (size_t i = 0; i < n; i++) {
        names[i] = st_at(st, i)->name;
        len += strlen(names[i]) + 1;
    }
    for (size_t i = 1; i < n; i++) /* insertion sort: a few hundred names */
        for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            const char *swap = names[j];
            names[j] = names[j - 1];
            names[j - 1] = swap;
        }
    char *joined = calloc(len, 1);
    for (size_t i = 0; i < n; i++) {
        strcat(joined, names[i]);
        strcat(joined, "\n");
    }
    free(names);
    st_close(st);
    return joined;
}

/* segformer_save then segformer_load: the same detector (the folded head against the unfolded
 * one: rounding only), and the same tensor names as PyTorch's state dict (the fixture's, written
 * from modeling_segformer.py's module tree). The mask_small tolerance: 1e-6 absolute. */
static void check_save_load(void) {
    Segformer *m = fixture_detector(), *back = NULL;
    char dir[] = "/tmp/diamond-detector-save-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "scratch directory");
    Error e = {{0}};
    int rc = m ? segformer_save(m, dir, &e) : -1;
    CHECK(rc == 0, "segformer_save: %s", e.msg);
    rc = rc || segformer_open(&back, dir, WEIGHTS_FILES, 0, &e);
    CHECK(rc == 0, "segformer_load of the saved directory: %s", e.msg);
    unsigned long long seed = 11;
    Tensor *image = TENSOR_NEW(2, 3, 40, 52);
    for (int64_t i = 0; i < image->numel; i++) image->data[i] = harness_rand(&seed);
    Tensor *small_a = NULL, *mask_a = NULL, *small_b = NULL, *mask_b = NULL;
    if (rc == 0 && run_detector(m, image, &small_a, &mask_a) == 0 &&
        run_detector(back, image, &small_b, &mask_b) == 0) {
        check_close("saved and loaded: mask_small", small_b->data, small_a->data,
                    (size_t)small_a->numel, 0.0f, 1e-6f);
        check_close("saved and loaded: mask", mask_b->data, mask_a->data, (size_t)mask_a->numel,
                    0.0f, 1e-6f);
        const SegformerConfig *a = segformer_config(m), *b = segformer_config(back);
        CHECK(a->stages == b->stages && a->decoder_hidden_size == b->decoder_hidden_size &&
                  a->input_h == b->input_h && a->input_w == b->input_w &&
                  a->gelu_tanh == b->gelu_tanh && a->mean[1] == b->mean[1] &&
                  a->std[2] == b->std[2] && a->num_labels == b->num_labels &&
                  !memcmp(a->hidden_sizes, b->hidden_sizes, sizeof a->hidden_sizes) &&
                  !memcmp(a->sr_ratios, b->sr_ratios, sizeof a->sr_ratios),
              "the saved config files give the same config");
    }
    char path[128];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    char *saved = rc == 0 ? tensor_names(path) : NULL;
    char *upstream = tensor_names(FIXTURE "/model.safetensors");
    CHECK(saved && upstream && !strcmp(saved, upstream),
          "the saved tensor names are PyTorch's state dict keys");
    if (back) {
        rc = segformer_save(back, dir, &e);
        CHECK(rc != 0 && strstr(e.msg, "folded"), "saving a loaded detector is refused: %s",
              e.msg);
    }
    free(saved);
    free(upstream);
    tensor_free(small_a);
    tensor_free(mask_a);
    tensor_free(small_b);
    tensor_free(mask_b);
    tensor_free(image);
    segformer_free(m);
    segformer_free(back);
    static const char *const files[] = {"config.json", "preprocessor_config.json",
                                        "model.safetensors"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

/* The mean loss of the first and of the last 5 steps. */
typedef struct TrainLog {
    double first_loss, last_loss;
} TrainLog;

static int log_step(const TrainStep *s, void *ctx, Error *e) {
    (void)e;
    TrainLog *log = ctx;
    if (s->step < 5) log->first_loss += s->loss / 5.0;
    if (s->step >= s->steps - 5) log->last_loss += s->loss / 5.0;
    if (getenv("TEST_VERBOSE")) printf("    step %lld loss %.5f\n", (long long)s->step, s->loss);
    return 0;
}

/* 20 AdamW steps of batch 32 on the shipped config, from scratch: the loss falls (the means of
 * the first and the last 5 steps, as each batch is new data). */
static void check_training(void) {
    Segformer *m = NULL;
    DetectorTrainer *d = NULL;
    TrainTask task;
    Error e = {{0}};
    DetectorTrainOptions o = {.batch = 32, .seed = 5, .pos_weight = 1.0f};
    int rc = segformer_open(&m, SHIPPED, WEIGHTS_FRESH, 3, &e) ||
             detector_train_task(&task, &d, m, &o, &e);
    CHECK(rc == 0, "the training task on " SHIPPED ": %s", e.msg);
    if (rc == 0) {
        TrainLog log = {0};
        AdamWOptions adamw = {.lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                              .weight_decay = 1e-2f};
        TrainOptions to = {.steps = 20, .adamw = adamw, .warmup = 2, .clip = 1.0,
                           .on_step = log_step, .ctx = &log};
        double start = now();
        rc = train_run(&task, &to, &e);
        double seconds = (now() - start) / 20.0;
        CHECK(rc == 0, "20 training steps: %s", e.msg);
        CHECK(log.last_loss < 0.7 * log.first_loss, "the loss falls: %.4f -> %.4f", log.first_loss,
              log.last_loss);
        printf("  detector training: %.3f s per step (batch 32), loss %.4f -> %.4f\n", seconds,
               log.first_loss, log.last_loss);
    }
    detector_trainer_free(d);
    segformer_free(m);
}

#define SAMPLE_PIXELS ((size_t)WORLD_H * WORLD_W)

/* detector_samples_make on fresh models of the shipped configs (their images are noise, which
 * is all this needs): it repeats, never draws an excluded word, and each mask is the oracle's
 * reading of its image. */
static void check_samples(void) {
    Flux2 *flow = NULL;
    TextEncoder *text = NULL;
    VaeDecoder *vae = NULL;
    Error e = {{0}};
    int rc = flux2_open(&flow, "weights/transformer", WEIGHTS_FRESH, 1, &e) ||
             text_encoder_open(&text, "weights/text_encoder", WEIGHTS_FRESH, 2, &e) ||
             vae_decoder_open(&vae, "weights/vae", WEIGHTS_FRESH, 3, &e);
    CHECK(rc == 0, "fresh models from the shipped configs: %s", e.msg);
    DetectorSamples a = {0}, b = {0}, c = {0};
    DetectorSampleOptions o = {.n = 6, .batch = 4, .seed = 9,
                               .sampler = {.steps = 2, .guidance_scale = 1.0f, .cfg_scale = 2.0f,
                                           .set_mu = true, .mu = 0.0}};
    if (rc == 0) rc = detector_samples_make(flow, text, vae, &o, &a, &e) ||
                      detector_samples_make(flow, text, vae, &o, &b, &e);
    CHECK(rc == 0 && a.n == 6, "6 samples, two batches: %s", e.msg);
    if (rc == 0) {
        CHECK(!memcmp(a.rgb, b.rgb, 6 * SAMPLE_PIXELS * 3) &&
                  !memcmp(a.mask, b.mask, 6 * SAMPLE_PIXELS) &&
                  !memcmp(a.words, b.words, sizeof *a.words * 6),
              "a second run repeats every image, mask and word");
        int flagged = 0, wrong = 0;
        for (int i = 0; i < 6; i++) {
            OracleResult r;
            uint8_t mask[SAMPLE_PIXELS];
            oracle_read(a.rgb + i * SAMPLE_PIXELS * 3, WORLD_W, WORLD_H, &r, &e);
            flagged += oracle_artifact_mask(&r, mask) > 0;
            wrong += memcmp(mask, a.mask + i * SAMPLE_PIXELS, SAMPLE_PIXELS) != 0;
        }
        CHECK(wrong == 0 && flagged == a.flagged,
              "masks are the oracle's (%d differ), %d flagged (counted %d)", wrong, a.flagged,
              flagged);
        const char *exclude[] = {a.words[0], a.words[3]};
        o.exclude = exclude;
        o.n_exclude = 2;
        rc = detector_samples_make(flow, text, vae, &o, &c, &e);
        int drawn = 0, same = 0;
        for (int i = 0; rc == 0 && i < 6; i++) {
            drawn += !strcmp(c.words[i], a.words[0]) || !strcmp(c.words[i], a.words[3]);
            same += !strcmp(c.words[i], a.words[i]);
        }
        CHECK(rc == 0 && drawn == 0 && same == 4,
              "excluded words are never drawn (%d drawn); the others stay (%d of 4): %s", drawn,
              same, e.msg);
    }
    detector_samples_free(&c);
    o.sampler.guide = true;
    CHECK(detector_samples_make(flow, text, vae, &o, &c, &e) != 0 && !c.rgb,
          "guided sampling refused, nothing allocated");
    detector_samples_free(&a);
    detector_samples_free(&b);
    flux2_free(flow);
    text_encoder_free(text);
    vae_decoder_free(vae);
}

/* With samples, a batch is the renders of a half-size batch without them, then samples from
 * before the held-out ones, with their masks. */
static void check_sample_batches(void) {
    enum { N = 10, HELD = 3 };
    DetectorSamples s = {.n = N, .rgb = malloc(N * SAMPLE_PIXELS * 3),
                         .mask = malloc(N * SAMPLE_PIXELS)};
    for (size_t i = 0; s.rgb && s.mask && i < N; i++) {
        memset(s.rgb + i * SAMPLE_PIXELS * 3, (int)(20 * i + 5), SAMPLE_PIXELS * 3);
        memset(s.mask + i * SAMPLE_PIXELS, 0, SAMPLE_PIXELS);
        s.mask[i * SAMPLE_PIXELS + i] = 1;
    }
    Segformer *m = NULL;
    DetectorTrainer *with = NULL, *without = NULL;
    TrainTask task;
    Error e = {{0}};
    DetectorTrainOptions o = {.batch = 8, .seed = 5, .pos_weight = 1.0f, .samples = &s,
                              .held_out = HELD};
    DetectorTrainOptions half = {.batch = 4, .seed = 5, .pos_weight = 1.0f};
    int rc = segformer_open(&m, SHIPPED, WEIGHTS_FRESH, 3, &e) ||
             detector_train_task(&task, &with, m, &o, &e) ||
             detector_train_task(&task, &without, m, &half, &e);
    CHECK(rc == 0, "tasks with and without samples: %s", e.msg);
    int renders_differ = 0, not_a_sample = 0, held_drawn = 0, seen[N] = {0};
    for (int64_t step = 0; rc == 0 && step < 40; step++) {
        Tensor *x, *mx, *y, *my;
        if (detector_batch(with, step, &x, &mx, &e) || detector_batch(without, step, &y, &my, &e)) {
            CHECK(0, "batches: %s", e.msg);
            break;
        }
        renders_differ += memcmp(x->data, y->data, (size_t)y->numel * sizeof(float)) != 0 ||
                          memcmp(mx->data, my->data, (size_t)my->numel * sizeof(float)) != 0;
        for (int b = 4; b < 8; b++) {
            const float *img = x->data + (size_t)b * 3 * SAMPLE_PIXELS;
            int k = (int)lroundf(((img[0] + 1.0f) * 127.5f - 5.0f) / 20.0f);
            bool ok = k >= 0 && k < N && fabsf(img[0] - ((20 * k + 5) / 127.5f - 1.0f)) < 1e-6f;
            for (size_t p = 0; ok && p < SAMPLE_PIXELS; p++)
                ok = mx->data[(size_t)b * SAMPLE_PIXELS + p] == (p == (size_t)k ? 1.0f : 0.0f);
            not_a_sample += !ok;
            if (ok) held_drawn += k >= N - HELD, seen[k]++;
        }
        tensor_free(x), tensor_free(mx), tensor_free(y), tensor_free(my);
    }
    int drawn = 0;
    for (int k = 0; k < N - HELD; k++) drawn += seen[k] > 0;
    CHECK(renders_differ == 0, "the first half is the half-size batch of renders (%d differ)",
          renders_differ);
    CHECK(not_a_sample == 0 && held_drawn == 0 && drawn == N - HELD,
          "the second half: samples with their masks (%d not), never held-out ones (%d), every "
          "other one drawn (%d of %d)", not_a_sample, held_drawn, drawn, N - HELD);
    o.held_out = N;
    DetectorTrainer *none = NULL;
    CHECK(detector_train_task(&task, &none, m, &o, &e) != 0 && !none,
          "all samples held out refused: %s", e.msg);
    detector_trainer_free(with);
    detector_trainer_free(without);
    segformer_free(m);
    free(s.rgb);
    free(s.mask);
}

int main(void) {
    check_against_torch();
    check_save_load();
    check_training();
    check_samples();
    check_sample_batches();
    return harness_finish("test_detector_train");
}
