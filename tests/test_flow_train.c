/* test_flow_train.c - text+flow training: the shipped tiny configs (weights/transformer,
 * weights/text_encoder) with fresh weights, the rectified-flow loss recomputed by hand from
 * flow_noise, 20 AdamW steps over both models (the loss falls), runs that repeat exactly, and a
 * save / load round trip. The data is a stand-in until the world and the VAE encoder are wired
 * in: four words, each with a fixed pseudo-random latent x0. */
#include <math.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "../nn.h"
#include "../train/train.h"
#include "harness.h"

#define FLOW_DIR "weights/transformer"
#define TEXT_DIR "weights/text_encoder"
#define GRID_H 4
#define GRID_W 2

static const char *const WORDS[] = {"AB", "K9", "ZOO", "Q7X1"};

typedef struct Data {
    int64_t per_sample; /* h w in_channels */
} Data;

/* Sample b of batch `step` is word (step + b) % 4; its x0 is st_uniform_fill of the word. */
static int word_batch(int64_t step, int batch, char (*prompts)[FLOW_PROMPT_MAX], float *x0,
                      void *ctx, Error *e) {
    (void)e;
    const Data *d = ctx;
    for (int b = 0; b < batch; b++) {
        const char *word = WORDS[(step + b) % 4];
        snprintf(prompts[b], FLOW_PROMPT_MAX, "%s", word);
        st_uniform_fill(99, word, d->per_sample, x0 + b * d->per_sample);
    }
    return 0;
}

typedef struct Run {
    Flux2 *flow;
    TextEncoder *text;
    Data data;
    FlowTrainOptions o;
} Run;

static int load(Run *r, int batch, uint64_t seed) {
    Error e = {{0}};
    *r = (Run){0};
    int rc = flux2_open(&r->flow, FLOW_DIR, WEIGHTS_FRESH, seed, &e) ||
             text_encoder_open(&r->text, TEXT_DIR, WEIGHTS_FRESH, seed + 1, &e);
    CHECK(rc == 0, "fresh models from the shipped configs: %s", e.msg);
    if (rc) return -1;
    r->data.per_sample = (int64_t)GRID_H * GRID_W * flux2_config(r->flow)->in_channels;
    r->o = (FlowTrainOptions){.batch = batch, .h = GRID_H, .w = GRID_W, .seed = 5,
                              .logit_mean = 0.0, .logit_std = 1.0, .data = word_batch,
                              .data_ctx = &r->data};
    return 0;
}

static void unload(Run *r) {
    flux2_free(r->flow);
    text_encoder_free(r->text);
}

/* The loss of step 3 equals mean((v - (n - x0))^2) recomputed from flow_noise, the word data and
 * flux2_forward of the prompt embeddings, the prompts flow_drops_prompt drops made empty. */
static void test_loss_by_hand(double uncond) {
    Run r;
    if (load(&r, 3, 11)) return;
    r.o.uncond = uncond;
    TrainTask task;
    FlowTrainer *f = NULL;
    Error e = {{0}};
    CHECK(flow_train_task(&task, &f, r.flow, r.text, &r.o, &e) == 0, "task: %s", e.msg);
    Tape *t = tape_new();
    Var *loss = f ? task.loss(t, 3, task.ctx, &e) : NULL;
    CHECK(loss != NULL, "loss of step 3: %s", e.msg);
    int64_t per = r.data.per_sample, n = 3 * per;
    float *x0 = malloc((size_t)n * sizeof *x0), *noise = malloc((size_t)n * sizeof *noise);
    float sigma[3];
    char prompts[3][FLOW_PROMPT_MAX];
    word_batch(3, 3, prompts, x0, &r.data, &e);
    int dropped = 0;
    for (int b = 0; b < 3; b++)
        if (flow_drops_prompt(5, 3, b, uncond)) prompts[b][0] = '\0', dropped++;
    CHECK(uncond == 0.0 ? dropped == 0 : dropped > 0 && dropped < 3,
          "uncond %g: %d of the 3 prompts dropped (the test wants none, or some but not all)",
          uncond, dropped);
    flow_noise(5, 3, 3, per, 0.0, 1.0, noise, sigma);
    Tensor *x_t = TENSOR_NEW(3, GRID_H * GRID_W, flux2_config(r.flow)->in_channels), *v = NULL;
    for (int64_t i = 0; i < n; i++)
        x_t->data[i] = (1.0f - sigma[i / per]) * x0[i] + sigma[i / per] * noise[i];
    Tape *u = tape_new();
    tape_set_grad(u, false);
    Var *txt = text_encode(u, r.text, (const char *[]){prompts[0], prompts[1], prompts[2]}, 3, &e);
    CHECK(txt && flux2_forward(r.flow, x_t, GRID_H, GRID_W, txt->value, sigma, NULL, &v, &e) == 0,
          "forward by hand: %s", e.msg);
    if (loss && v) {
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double d = v->data[i] - (noise[i] - x0[i]);
            sum += d * d;
        }
        float want = (float)(sum / (double)n);
        check_close(uncond == 0.0 ? "flow loss = mean((v - (n - x0))^2)"
                                  : "flow loss with dropped prompts = mean((v - (n - x0))^2)",
                    loss->value->data, &want, 1, 1e-5f, 0.0f);
        CHECK(sigma[0] > 0.0f && sigma[0] < 1.0f && sigma[0] != sigma[1],
              "sigmas are drawn per sample in (0, 1): %g %g %g", sigma[0], sigma[1], sigma[2]);
    }
    tensor_free(v);
    tensor_free(x_t);
    tape_free(u);
    tape_free(t);
    free(x0);
    free(noise);
    flow_trainer_free(f);
    unload(&r);
}

/* flow_drops_prompt: never at 0, at about the asked rate, the same draw for the same inputs, and
 * other draws for another seed. */
static void test_drops_prompt(void) {
    int never = 0, quarter = 0, again = 0, other = 0;
    for (int64_t step = 0; step < 1000; step++)
        for (int b = 0; b < 4; b++) {
            never += flow_drops_prompt(7, step, b, 0.0);
            bool d = flow_drops_prompt(7, step, b, 0.25);
            quarter += d;
            again += d == flow_drops_prompt(7, step, b, 0.25);
            other += d != flow_drops_prompt(8, step, b, 0.25);
        }
    CHECK(never == 0, "uncond 0 drops no prompt (%d of 4000)", never);
    CHECK(quarter > 920 && quarter < 1080, "uncond 0.25 drops about a quarter: %d of 4000",
          quarter);
    CHECK(again == 4000, "the draw repeats (%d of 4000)", again);
    CHECK(other > 1000, "another seed draws otherwise (%d of 4000 differ)", other);
}

typedef struct Losses {
    double loss[64];
    int n;
} Losses;

static int record_loss(const TrainStep *s, void *ctx, Error *e) {
    (void)e;
    Losses *l = ctx;
    if (l->n < 64) l->loss[l->n++] = s->loss;
    return 0;
}

static double mean_of(const double *x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += x[i];
    return s / n;
}

/* 20 AdamW steps over both models; returns the run's losses. */
static Losses train(int batch, int64_t steps, double *seconds) {
    Losses l = {.n = 0};
    Run r;
    if (load(&r, batch, 1)) return l;
    TrainTask task;
    FlowTrainer *f = NULL;
    Error e = {{0}};
    TrainOptions o = {.steps = steps,
                      .adamw = {.lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                                .weight_decay = 0.01f},
                      .warmup = 2, .clip = 1.0, .on_step = record_loss, .ctx = &l};
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    CHECK(flow_train_task(&task, &f, r.flow, r.text, &r.o, &e) == 0 &&
              train_run(&task, &o, &e) == 0,
          "train %lld steps at batch %d: %s", (long long)steps, batch, e.msg);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (seconds) *seconds = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    flow_trainer_free(f);
    unload(&r);
    return l;
}

static void test_training(void) {
    double seconds = 0.0;
    Losses a = train(4, 20, &seconds), b = train(4, 20, NULL);
    CHECK(a.n == 20 && b.n == 20, "20 steps ran (%d, %d)", a.n, b.n);
    if (a.n < 20 || b.n < 20) return;
    double first = mean_of(a.loss, 5), last = mean_of(a.loss + 15, 5);
    CHECK(last < 0.8 * first, "the flow loss falls over 20 steps: mean of the first 5 %.4f, of the "
          "last 5 %.4f", first, last);
    CHECK(!memcmp(a.loss, b.loss, sizeof a.loss), "a second run repeats every loss exactly");
    printf("text+flow training, batch 4, %d x %d tokens: %.3f s per step\n", GRID_H, GRID_W,
           seconds / 20);
}

/* Saved and loaded back (flux2_open streams, text_encoder_open), the models give the same
 * velocity as before. */
static void test_save(void) {
    Run r;
    if (load(&r, 1, 21)) return;
    char dir[] = "/tmp/diamond-test-flow-XXXXXX", flow_dir[256], text_dir[256];
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(flow_dir, sizeof flow_dir, "%s/transformer", dir);
    snprintf(text_dir, sizeof text_dir, "%s/text_encoder", dir);
    Error e = {{0}};
    CHECK(flux2_save(r.flow, flow_dir, &e) == 0 && text_encoder_save(r.text, text_dir, &e) == 0,
          "save: %s", e.msg);
    Flux2 *flow = NULL;
    TextEncoder *text = NULL;
    CHECK(flux2_open(&flow, flow_dir, WEIGHTS_FILES, 0, &e) == 0 &&
              text_encoder_open(&text, text_dir, WEIGHTS_FILES, 0, &e) == 0,
          "load what was saved: %s", e.msg);
    if (flow && text) {
        const Flux2Config *a = flux2_config(r.flow), *b = flux2_config(flow);
        CHECK(a->dim == b->dim && a->mlp_hidden == b->mlp_hidden && a->eps == b->eps &&
                  a->rope_theta == b->rope_theta && a->axes_dims[2] == b->axes_dims[2] &&
                  a->joint_attention_dim == b->joint_attention_dim,
              "the saved transformer config reads back the same");
        Tape *t = tape_new();
        tape_set_grad(t, false);
        Var *x = text_encode(t, r.text, (const char *[]){"HI5"}, 1, &e);
        Var *y = text_encode(t, text, (const char *[]){"HI5"}, 1, &e);
        CHECK(x && y && !memcmp(x->value->data, y->value->data,
                                (size_t)x->value->numel * sizeof(float)),
              "the loaded text encoder gives the same embeddings: %s", e.msg);
        Tensor *tokens = TENSOR_NEW(1, GRID_H * GRID_W, flux2_config(flow)->in_channels);
        Tensor *v1 = NULL, *v2 = NULL;
        unsigned long long state = 3;
        for (int64_t i = 0; i < tokens->numel; i++) tokens->data[i] = harness_rand(&state);
        if (x)
            CHECK(flux2_forward(r.flow, tokens, GRID_H, GRID_W, x->value, (float[]){0.4f}, NULL,
                                &v1, &e) == 0 &&
                      flux2_forward(flow, tokens, GRID_H, GRID_W, x->value, (float[]){0.4f}, NULL,
                                    &v2, &e) == 0,
                  "both forwards: %s", e.msg);
        if (v1 && v2)
            check_close("saved transformer (streaming) = the trained one (resident)", v2->data,
                        v1->data, (size_t)v1->numel, 1e-6f, 1e-6f);
        tensor_free(v1);
        tensor_free(v2);
        tensor_free(tokens);
        tape_free(t);
    }
    flux2_free(flow);
    text_encoder_free(text);
    const char *files[] = {"transformer/config.json",
                           "transformer/diffusion_pytorch_model.safetensors",
                           "text_encoder/config.json", "text_encoder/model.safetensors",
                           "transformer", "text_encoder", ""};
    for (int i = 0; i < 7; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (i < 4) unlink(path);
        else rmdir(path);
    }
    unload(&r);
}

static void test_errors(void) {
    Flux2 *streaming = NULL, *flow = NULL;
    TextEncoder *text = NULL;
    Error e = {{0}};
    const char *flow_dir = "tests/fixtures/tiny-flux2/transformer";
    CHECK(flux2_open(&streaming, flow_dir, WEIGHTS_FILES, 0, &e) == 0 &&
              flux2_open(&flow, flow_dir, WEIGHTS_FRESH, 1, &e) == 0 &&
              text_encoder_open(&text, TEXT_DIR, WEIGHTS_FRESH, 1, &e) == 0,
          "load: %s", e.msg);
    TrainTask task;
    FlowTrainer *f = NULL;
    FlowTrainOptions o = {.batch = 1, .h = 3, .w = 5, .logit_std = 1.0, .data = word_batch};
    if (streaming && flow && text) {
        CHECK(flow_train_task(&task, &f, streaming, text, &o, &e) != 0 && !f &&
                  strstr(e.msg, "resident"),
              "a streaming transformer is refused: %s", e.msg);
        CHECK(flow_train_task(&task, &f, flow, text, &o, &e) != 0 && !f &&
                  strstr(e.msg, "joint_attention_dim 24"),
              "a text encoder of another width is refused: %s", e.msg);
        CHECK(flux2_save(streaming, "/tmp/diamond-never", &e) != 0 && strstr(e.msg, "resident"),
              "a streaming model is not saved: %s", e.msg);
    }
    flux2_free(streaming);
    flux2_free(flow);
    text_encoder_free(text);
}

/* flow_world_batch: sample b's prompt is its scene's word and its x0 the VAE tokens of that
 * scene's image; a flow grid the VAE does not make is refused. */
static void test_world_batch(void) {
    VaeEncoder *vae = NULL;
    Error e = {{0}};
    if (vae_encoder_open(&vae, "tests/fixtures/tiny-flux2/vae", WEIGHTS_FILES, 0, &e)) {
        CHECK(0, "load the tiny VAE encoder: %s", e.msg);
        return;
    }
    const VaeConfig *c = vae_encoder_config(vae);
    int up = 1 << (c->n_down_blocks - 1), h = WORLD_H / (c->patch_h * up);
    int w = WORLD_W / (c->patch_w * up), C = c->latent_channels * c->patch_h * c->patch_w;
    FlowWorld world = {vae, 11, h, w, C};
    char prompts[3][FLOW_PROMPT_MAX];
    float *x0 = malloc((size_t)3 * h * w * C * sizeof *x0);
    Tensor *image = TENSOR_NEW(1, 3, WORLD_H, WORLD_W);
    int rc = x0 && image ? flow_world_batch(2, 3, prompts, x0, &world, &e) : -1;
    CHECK(rc == 0, "a batch of 3 from the world: %s", e.msg);
    for (int b = 0; rc == 0 && b < 3; b++) {
        uint64_t index = vae_image_index(11, 2 * 3 + (uint64_t)b);
        WorldScene scene;
        world_scene(index, NULL, &scene, &e);
        CHECK(!strcmp(prompts[b], scene.word), "sample %d's prompt '%s' is its scene's word '%s'",
              b, prompts[b], scene.word);
        vae_world_image(index, 3, WORLD_H, WORLD_W, image->data, NULL, &e);
        Tape *t = tape_new();
        tape_set_grad(t, false);
        int gh, gw;
        Var *tokens = vae_encode(t, vae, var_new(t, image, false), &gh, &gw);
        if (tokens)
            check_close("sample's x0: the VAE tokens of its image", x0 + (size_t)b * h * w * C,
                        tokens->value->data, (size_t)h * w * C, 0.0f, 0.0f);
        tape_free(t);
    }
    world.channels = C + 1;
    CHECK(flow_world_batch(0, 1, prompts, x0, &world, &e) != 0 && strstr(e.msg, "tokens"),
          "a flow model of another width is refused: %s", e.msg);
    free(x0);
    tensor_free(image);
    vae_encoder_free(vae);
}

int main(void) {
    test_world_batch();
    test_loss_by_hand(0.0);
    test_loss_by_hand(0.5);
    test_drops_prompt();
    test_training();
    test_save();
    test_errors();
    return harness_finish("test_flow_train");
}
