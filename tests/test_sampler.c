/* test_sampler.c - DIAMOND's sampling loop (nn.c's sampler section) against tools/ref_sampler.py,
 * a float64 torch run of the official algorithm on the tiny flow model, VAE and detector: every
 * step's x_t, sigma, v, x0, mask, raw gradient and lambda, the final latent and image, for every
 * lambda schedule and loss, guided and plain, batch 1 and 2, with a gate. Also the schedules'
 * values (degenerate N included) and option errors, the losses' gradients by finite
 * differences, the FLUX.2 sigmas, batch independence and the sampler's input checks; and
 * `diamond generate` end to end: its --dump, images and --compare strip against the same golden
 * runs, noise from --seed against PyTorch's, its exit statuses on bad input. */
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../nn.h"
#include "harness.h"

#define GOLDEN "tests/golden/sampler.safetensors"
#define FLUX2_GOLDEN "tests/golden/flux2.safetensors"
#define FLOW "tests/fixtures/tiny-flux2/transformer"
#define VAE "tests/fixtures/tiny-flux2/vae"
#define DETECTOR "tests/fixtures/tiny-detector"
#define GRID_H 2
#define GRID_W 3

/* The C run goes its own way from the same noise: each step's f32 rounding (about 1e-6 relative
 * in the flow model, VAE and detector) feeds the next. The shift moves the latent by lambda along
 * the normalised gradient, so an error in the gradient's direction moves x by lambda times that
 * error; with lambda <= 0.8 against latents of norm ~10 and at most 4 steps, the measured drift
 * stays near 1e-5 relative. Tensors are compared at 2e-4 relative to each element plus 2e-4 of
 * the tensor's largest value: a wrong formula (sign, missing normalisation, the wrong sigma or
 * mask, a whole-batch norm) moves values by 1e-2 or more. */
#define REL 2e-4f

/* name, batch, steps, guided, schedule, loss, gate, cfg scale (0: off): as CASES in
 * tools/ref_sampler.py */
typedef struct Case {
    const char *name;
    int batch, steps;
    bool guide;
    const char *schedule, *loss;
    float gate, cfg;
} Case;

static const Case cases[] = {
    {"base1", 1, 3, false, "constant", "mse", 0.0f, 0.0f},
    {"base2", 2, 3, false, "constant", "mse", 0.0f, 0.0f},
    {"constant", 1, 3, true, "constant:value=0.5", "mse", 0.0f, 0.0f},
    {"linear", 1, 3, true, "linear:start=0.8,end=0.2", "mse", 0.0f, 0.0f},
    {"power", 2, 3, true, "power:start=0.8,end=0.2,power=2", "mse", 0.0f, 0.0f},
    {"cosine", 1, 3, true, "cosine:start=0.8,end=0.2", "mse", 0.0f, 0.0f},
    {"hard_then_exp", 2, 4, true, "hard_then_exp:start=0.8,after=0.4,power=2", "mse", 0.0f, 0.0f},
    {"exponential", 1, 4, true, "exponential:start=0.8,end=0.2,power=3,warmup=1,cooldown=1",
     "mse", 0.0f, 0.0f},
    {"exponential_one", 1, 3, true, "exponential:start=0.6,end=0.2,power=2,warmup=1,cooldown=1",
     "mse", 0.0f, 0.0f},
    {"loss_power", 2, 3, true, "linear:start=0.8,end=0.2", "power:gamma=3", 0.0f, 0.0f},
    {"loss_focal", 2, 3, true, "linear:start=0.8,end=0.2", "focal:gamma=2,alpha=1", 0.0f, 0.0f},
    {"one_step", 1, 1, true, "linear:start=0.5,end=0.1", "mse", 0.0f, 0.0f},
    {"gate", 2, 3, true, "linear:start=0.8,end=0.2", "mse", 0.5f, 0.0f},
    {"cfg", 2, 3, true, "linear:start=0.8,end=0.2", "mse", 0.0f, 3.0f},
};

typedef struct Models {
    Flux2 *flow;
    VaeDecoder *vae;
    Segformer *detector;
} Models;

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    return m;
}

/* got against the golden tensor `name` (n values): REL relative plus REL of its largest value. */
static void compare(const SafeTensors *g, const char *name, const float *got, size_t n) {
    float *want = golden_load(g, name, n);
    if (!want) return;
    check_close(name, got, want, n, REL, REL * max_abs(want, n));
    free(want);
}

typedef struct StepCheck {
    const SafeTensors *golden;
    const char *name;
    int seen;
} StepCheck;

/* Every tensor the step made against the golden step, and presence matching presence. */
static int check_step(const SamplerStep *s, void *ctx, Error *e) {
    (void)e;
    StepCheck *c = ctx;
    char name[128];
#define STEP_NAME(part) \
    (snprintf(name, sizeof name, "%s.step.%d.%s", c->name, s->index, part), name)
    compare(c->golden, STEP_NAME("x_t"), s->x_t->data, (size_t)s->x_t->numel);
    compare(c->golden, STEP_NAME("sigma"), &s->sigma, 1);
    compare(c->golden, STEP_NAME("lambda"), &s->lambda, 1);
    compare(c->golden, STEP_NAME("v"), s->v->data, (size_t)s->v->numel);
    compare(c->golden, STEP_NAME("x0"), s->x0->data, (size_t)s->x0->numel);
    CHECK((st_find(c->golden, STEP_NAME("mask")) != NULL) == (s->mask != NULL),
          "%s: the detector ran in C %s in the reference", name, s->mask ? "but not" : "only");
    if (s->mask) compare(c->golden, name, s->mask->data, (size_t)s->mask->numel);
    CHECK((st_find(c->golden, STEP_NAME("grad")) != NULL) == (s->grad != NULL),
          "%s: a backward ran in C %s in the reference", name, s->grad ? "but not" : "only");
    if (s->grad) compare(c->golden, name, s->grad->data, (size_t)s->grad->numel);
#undef STEP_NAME
    c->seen++;
    return 0;
}

/* The golden prompt embeddings `name` ([L, D]) repeated `batch` times: [batch, L, D]. */
static Tensor *case_prompt(const SafeTensors *g, const char *name, int batch) {
    const StTensor *tt = st_find(g, name);
    if (!tt) return NULL;
    float *p = golden_load(g, name, (size_t)tt->numel);
    Tensor *txt = TENSOR_NEW(batch, tt->shape[0], tt->shape[1]);
    for (int b = 0; p && txt && b < batch; b++)
        memcpy(txt->data + b * tt->numel, p, (size_t)tt->numel * sizeof(float));
    if (!p) tensor_free(txt), txt = NULL;
    free(p);
    return txt;
}

/* The golden noise's first `batch` samples and the prompt repeated `batch` times. */
static int case_inputs(const SafeTensors *g, int batch, Tensor **noise, Tensor **txt) {
    const StTensor *tn = st_find(g, "noise");
    *noise = *txt = NULL;
    if (!tn) return -1;
    float *n = golden_load(g, "noise", (size_t)tn->numel);
    *noise = TENSOR_NEW(batch, tn->shape[1], tn->shape[2]);
    *txt = case_prompt(g, "txt", batch);
    int rc = n && *noise && *txt ? 0 : -1;
    if (rc == 0) memcpy((*noise)->data, n, (size_t)(*noise)->numel * sizeof(float));
    free(n);
    return rc;
}

static int case_options(const Case *c, SamplerOptions *o, Error *e) {
    *o = (SamplerOptions){.steps = c->steps, .guide = c->guide, .guidance_scale = 4.0f,
                          .gate = c->gate, .cfg_scale = c->cfg};
    return lambda_schedule_parse(&o->lambda, c->schedule, e) ||
           artifact_loss_parse(&o->loss, c->loss, e);
}

/* The image of a final latent, no gradient. */
static Tensor *decode_image(const VaeDecoder *vae, Tensor *latent) {
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *image = vae_decode(t, vae, var_new(t, latent, false), GRID_H, GRID_W);
    Tensor *out = image ? tensor_clone(image->value) : NULL;
    tape_free(t);
    return out;
}

static void test_case(const Models *m, const SafeTensors *g, const Case *c) {
    SamplerOptions o;
    Error e = {{0}};
    Tensor *noise, *txt, *negative = c->cfg > 0.0f ? case_prompt(g, "neg_txt", c->batch) : NULL;
    if (case_options(c, &o, &e) || case_inputs(g, c->batch, &noise, &txt) ||
        (c->cfg > 0.0f && !negative)) {
        CHECK(0, "%s: options or inputs: %s", c->name, e.msg);
        return;
    }
    StepCheck check = {g, c->name, 0};
    int rc = sampler_run(m->flow, m->vae, m->detector, &o, txt, negative, noise, GRID_H, GRID_W,
                         check_step, &check, &e);
    CHECK(rc == 0 && check.seen == c->steps, "%s: sampler ran %d of %d steps: %s", c->name,
          check.seen, c->steps, e.msg);
    char name[128];
    snprintf(name, sizeof name, "%s.final.latent", c->name);
    compare(g, name, noise->data, (size_t)noise->numel);
    Tensor *image = decode_image(m->vae, noise);
    snprintf(name, sizeof name, "%s.final.image", c->name);
    if (image) compare(g, name, image->data, (size_t)image->numel);
    tensor_free(image);
    tensor_free(noise);
    tensor_free(txt);
    tensor_free(negative);
}

/* Sample 0 of a batch of 2 ends where it ends alone: per-sample loss and gradient norm. */
static void test_batch_independence(const Models *m, const SafeTensors *g) {
    const Case *c = &cases[4]; /* "power", batch 2 */
    SamplerOptions o;
    Error e = {{0}};
    Tensor *noise, *txt;
    if (case_options(c, &o, &e) || case_inputs(g, 1, &noise, &txt)) {
        CHECK(0, "batch independence: inputs: %s", e.msg);
        return;
    }
    int rc = sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, noise, GRID_H, GRID_W, NULL,
                         NULL, &e);
    float *want = golden_load(g, "power.final.latent", 2 * (size_t)noise->numel);
    if (rc == 0 && want)
        check_close("power: sample 0 alone = sample 0 of the batch", noise->data, want,
                    (size_t)noise->numel, REL, REL * max_abs(want, (size_t)noise->numel));
    else
        CHECK(0, "batch independence run: %s", e.msg);
    free(want);
    tensor_free(noise);
    tensor_free(txt);
}

typedef struct InspectCount {
    int steps_with_mask, steps_with_grad;
} InspectCount;

static int count_inspected(const SamplerStep *s, void *ctx, Error *e) {
    (void)e;
    InspectCount *c = ctx;
    c->steps_with_mask += s->mask != NULL;
    c->steps_with_grad += s->grad != NULL;
    return 0;
}

/* inspect_every_step (what --dump sets) reports mask and grad on the lambda = 0 warm-up and
 * cool-down steps of "exponential" too, and the run ends on the same latent bit for bit. */
static void test_inspect_every_step(const Models *m, const SafeTensors *g) {
    const Case *c = &cases[7]; /* "exponential", warmup 1: lambda_0 = 0 */
    SamplerOptions o;
    Error e = {{0}};
    Tensor *plain = NULL, *inspected = NULL, *txt = NULL;
    InspectCount counts[2] = {{0, 0}, {0, 0}};
    int rc = case_options(c, &o, &e) || case_inputs(g, 1, &plain, &txt) ? -1 : 0;
    if (rc == 0) rc = (inspected = tensor_clone(plain)) ? 0 : -1;
    CHECK(rc == 0 && lambda_schedule_at(&o.lambda, 0, c->steps) == 0.0,
          "inspect: inputs, and lambda_0 = 0: %s", e.msg);
    if (rc == 0)
        rc = sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, plain, GRID_H, GRID_W,
                         count_inspected, &counts[0], &e);
    o.inspect_every_step = true;
    if (rc == 0)
        rc = sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, inspected, GRID_H, GRID_W,
                         count_inspected, &counts[1], &e);
    CHECK(rc == 0, "inspect runs: %s", e.msg);
    int guided_steps = 0;
    for (int i = 0; i < c->steps; i++)
        guided_steps += lambda_schedule_at(&o.lambda, i, c->steps) != 0.0;
    if (rc == 0) {
        CHECK(counts[0].steps_with_mask == guided_steps && counts[0].steps_with_grad == guided_steps,
              "inspect off: mask and grad only on the %d steps with lambda != 0 (%d, %d)",
              guided_steps, counts[0].steps_with_mask, counts[0].steps_with_grad);
        CHECK(counts[1].steps_with_mask == c->steps && counts[1].steps_with_grad == c->steps,
              "inspect on: mask and grad on every step (%d, %d of %d)",
              counts[1].steps_with_mask, counts[1].steps_with_grad, c->steps);
        CHECK(memcmp(plain->data, inspected->data, (size_t)plain->numel * sizeof(float)) == 0,
              "inspect on: the same final latent bit for bit");
    }
    tensor_free(plain);
    tensor_free(inspected);
    tensor_free(txt);
}

/* lambda_i of the bare defaults and of explicit specs at N = 1, 2, 3, 5, 30. */
static void test_schedules(const SafeTensors *g) {
    static const char *specs[] = {"constant", "linear", "power", "cosine", "hard_then_exp",
                                  "exponential", "power:start=25,end=1,power=2",
                                  "exponential:start=2,end=1,power=2,warmup=1,cooldown=1",
                                  "exponential:warmup=0,cooldown=0"};
    static const int steps[] = {1, 2, 3, 5, 30};
    for (size_t s = 0; s < sizeof specs / sizeof *specs; s++) {
        LambdaSchedule sched;
        Error e = {{0}};
        if (lambda_schedule_parse(&sched, specs[s], &e)) {
            CHECK(0, "parse '%s': %s", specs[s], e.msg);
            continue;
        }
        for (size_t k = 0; k < sizeof steps / sizeof *steps; k++) {
            float got[30];
            char name[128];
            for (int i = 0; i < steps[k]; i++)
                got[i] = (float)lambda_schedule_at(&sched, i, steps[k]);
            snprintf(name, sizeof name, "sched.%s.%d", specs[s], steps[k]);
            float *want = golden_load(g, name, (size_t)steps[k]);
            if (want) check_close(name, got, want, (size_t)steps[k], 1e-6f, 1e-6f);
            free(want);
        }
    }
}

/* Every bad spec is refused with a message naming what is wrong. */
static void test_spec_errors(void) {
    static const struct {
        bool schedule;
        const char *spec, *needle;
    } bad[] = {
        {true, "linearish", "unknown type"},      {true, "", "unknown type"},
        {true, "power:gain=2", "unknown key 'gain'"}, {true, "power:start=", "start"},
        {true, "power:start=abc", "start"},       {true, "power:start=1x", "start"},
        {true, "linear:power=2", "unknown key 'power'"}, {true, "power:start", "key=value"},
        {true, "exponential:warmup=1.5", "warmup"}, {true, "exponential:cooldown=-1", "cooldown"},
        {true, "power:power=-1", "power"},        {true, "cosine:end=inf", "end"},
        {true, "constant:value=nan", "value"},
        {false, "l1", "unknown type"},            {false, "mse:gamma=2", "unknown key 'gamma'"},
        {false, "power:gamma=0", "gamma"},        {false, "focal:alpha=-1", "alpha"},
        {false, "focal:beta=1", "unknown key 'beta'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        Error e = {{0}};
        LambdaSchedule s;
        ArtifactLoss l;
        int rc = bad[i].schedule ? lambda_schedule_parse(&s, bad[i].spec, &e)
                                 : artifact_loss_parse(&l, bad[i].spec, &e);
        CHECK(rc != 0 && strstr(e.msg, bad[i].needle), "'%s' refused naming '%s': %s",
              bad[i].spec, bad[i].needle, e.msg);
    }
    LambdaSchedule s;
    ArtifactLoss l;
    Error e = {{0}};
    CHECK(lambda_schedule_parse(&s, "exponential:start=3,warmup=2", &e) == 0 && s.start == 3.0 &&
              s.end == 1.0 && s.power == 5.0 && s.warmup == 2 && s.cooldown == 12,
          "exponential keys override only what they name: %s", e.msg);
    CHECK(artifact_loss_parse(&l, "focal:gamma=3", &e) == 0 && l.gamma == 3.0 && l.alpha == 1.0,
          "focal defaults alpha 1: %s", e.msg);
}

typedef struct LossCtx {
    const ArtifactLoss *loss;
    Tensor *mask;
} LossCtx;

static double loss_value(void *ctx) {
    LossCtx *c = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *l = artifact_loss_apply(t, c->loss, var_new(t, c->mask, false));
    double v = l ? l->value->data[0] : NAN;
    tape_free(t);
    return v;
}

/* d loss / d mask by finite differences, for each loss, on a [2, 1, 5, 7] mask inside (0, 1),
 * and the forward value of mse against a direct sum. */
static void test_losses(void) {
    static const char *specs[] = {"mse", "power:gamma=3", "power:gamma=1.5", "focal",
                                  "focal:gamma=0.5,alpha=2"};
    Tensor *mask = TENSOR_NEW(2, 1, 5, 7);
    unsigned long long seed = 7;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < mask->numel; i++) {
        mask->data[i] = 0.5f + 0.4f * harness_rand(&seed);
        sum_sq += (double)mask->data[i] * mask->data[i];
    }
    for (size_t s = 0; s < sizeof specs / sizeof *specs; s++) {
        ArtifactLoss loss;
        Error e = {{0}};
        artifact_loss_parse(&loss, specs[s], &e);
        Tape *t = tape_new();
        Var *m = var_new(t, mask, true);
        Var *l = artifact_loss_apply(t, &loss, m);
        if (tape_check(t, &e) || tape_backward(t, l, &e)) {
            CHECK(0, "loss %s: %s", specs[s], e.msg);
        } else {
            if (s == 0)
                CHECK(fabs(l->value->data[0] - sum_sq / 35.0) < 1e-5, "mse = sum of sample means");
            LossCtx ctx = {&loss, mask};
            char what[64];
            snprintf(what, sizeof what, "loss %s gradient", specs[s]);
            check_gradient(what, loss_value, &ctx, mask->data, m->grad->data,
                           (size_t)mask->numel, 1, 1e-3f, 1e-2f, 1e-4f);
        }
        tape_free(t);
    }
    tensor_free(mask);
}

/* The sigmas against tools/ref_flux2.py's schedule.<steps>_<seq> (float64, stored f32). */
static void test_sigmas(void) {
    static const int runs[][2] = {{4, 4096}, {4, 1024}, {50, 4096}, {4, 8192}, {1, 15}};
    SafeTensors *g = golden_open(FLUX2_GOLDEN);
    if (!g) return;
    for (size_t r = 0; r < sizeof runs / sizeof *runs; r++) {
        float got[51];
        char name[64];
        flux2_sigmas(runs[r][0], runs[r][1], got);
        snprintf(name, sizeof name, "schedule.%d_%d", runs[r][0], runs[r][1]);
        float *want = golden_load(g, name, (size_t)runs[r][0] + 1);
        if (want) check_close(name, got, want, (size_t)runs[r][0] + 1, 1e-6f, 0.0f);
        free(want);
        float shifted[51];
        flux2_sigmas_shifted(runs[r][0], flux2_empirical_mu(runs[r][1], runs[r][0]), shifted);
        CHECK(!memcmp(got, shifted, ((size_t)runs[r][0] + 1) * sizeof(float)),
              "%s: flux2_sigmas is flux2_sigmas_shifted at the empirical mu", name);
    }
    /* mu = 0: exp(0) = 1 shifts nothing, the schedule is numpy's linspace(1, 1/N, N), then 0 */
    float plain[9], want[9] = {1.0f, 0.875f, 0.75f, 0.625f, 0.5f, 0.375f, 0.25f, 0.125f, 0.0f};
    flux2_sigmas_shifted(8, 0.0, plain);
    check_close("mu 0: linspace(1, 1/8, 8)", plain, want, 9, 1e-7f, 0.0f);
    st_close(g);
}

/* Inputs the sampler must refuse before any work. */
static void test_sampler_errors(const Models *m) {
    SamplerOptions o = {.steps = 2, .guide = true, .guidance_scale = 1.0f};
    Error e = {{0}};
    lambda_schedule_parse(&o.lambda, "constant:value=1", &e);
    artifact_loss_parse(&o.loss, "mse", &e);
    Tensor *x = TENSOR_NEW(1, 6, 16), *txt = TENSOR_NEW(1, 5, 24), *wrong = TENSOR_NEW(1, 5, 16);
    CHECK(sampler_run(m->flow, m->vae, NULL, &o, txt, NULL, x, GRID_H, GRID_W, NULL, NULL, &e) !=
              0 && strstr(e.msg, "detector"), "guidance without a detector: %s", e.msg);
    CHECK(sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, wrong, GRID_H, GRID_W, NULL,
                      NULL, &e) != 0 && strstr(e.msg, "latent"), "a latent of another size: %s",
          e.msg);
    CHECK(sampler_run(m->flow, m->vae, m->detector, &o, wrong, NULL, x, GRID_H, GRID_W, NULL, NULL,
                      &e) != 0 && strstr(e.msg, "embeddings"), "embeddings of another width: %s",
          e.msg);
    o.cfg_scale = 2.0f;
    CHECK(sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, x, GRID_H, GRID_W, NULL, NULL,
                      &e) != 0 && strstr(e.msg, "negative"), "cfg without a negative: %s", e.msg);
    CHECK(sampler_run(m->flow, m->vae, m->detector, &o, txt, wrong, x, GRID_H, GRID_W, NULL, NULL,
                      &e) != 0 && strstr(e.msg, "negative"), "cfg, a negative of another width: %s",
          e.msg);
    o.cfg_scale = 0.0f;
    txt->data[7] = NAN; /* one NaN in the prompt runs into every velocity: named, not an image */
    CHECK(sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, x, GRID_H, GRID_W, NULL, NULL,
                      &e) != 0 && strstr(e.msg, "step 1 of 2: the velocity v holds NaN"),
          "a NaN in the prompt stops the first step: %s", e.msg);
    txt->data[7] = 0.0f;
    x->data[3] = INFINITY;
    CHECK(sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, x, GRID_H, GRID_W, NULL, NULL,
                      &e) != 0 && strstr(e.msg, "step 1 of 2:") && strstr(e.msg, "holds"),
          "an infinity in the latent stops the first step: %s", e.msg);
    x->data[3] = 0.0f;
    o.steps = 0;
    CHECK(sampler_run(m->flow, m->vae, m->detector, &o, txt, NULL, x, GRID_H, GRID_W, NULL, NULL,
                      &e) != 0 && strstr(e.msg, "steps"), "zero steps: %s", e.msg);
    tensor_free(x);
    tensor_free(txt);
    tensor_free(wrong);
}

/* Runs a shell command quietly; its exit status (-1 when it did not exit). */
static int run_quiet(const char *cmd) {
    char line[8192];
    snprintf(line, sizeof line, "%s >/dev/null 2>&1", cmd);
    int status = system(line);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* The golden noise and prompt as the files `diamond generate` reads. */
static int write_cli_inputs(const SafeTensors *g, const char *dir) {
    float *noise = golden_load(g, "noise", 2 * 6 * 16), *txt = golden_load(g, "txt", 5 * 24);
    char path[512];
    Error e = {{0}};
    int rc = noise && txt ? 0 : -1;
    snprintf(path, sizeof path, "%s/noise.safetensors", dir);
    StWriteTensor n = {"noise", DTYPE_F32, 3, {2, 6, 16}, noise};
    if (rc == 0) rc = st_write(path, &n, 1, &e);
    snprintf(path, sizeof path, "%s/emb.safetensors", dir);
    StWriteTensor p = {"prompt_embeds", DTYPE_F32, 2, {5, 24}, txt};
    if (rc == 0) rc = st_write(path, &p, 1, &e);
    CHECK(rc == 0, "write the command's input files: %s", e.msg);
    free(noise);
    free(txt);
    return rc;
}

/* dir/name.safetensors holding tensor `tensor` [rows, cols] of zeros with one NaN at value 5. */
static int write_input(const char *dir, const char *name, const char *tensor, int64_t rows,
                       int64_t cols, bool nan) {
    char path[512];
    Error e = {{0}};
    float *v = calloc((size_t)(rows * cols), sizeof *v);
    if (!v) return -1;
    if (nan) v[5] = NAN;
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, name);
    StWriteTensor w = {tensor, DTYPE_F32, 2, {rows, cols}, v};
    int rc = st_write(path, &w, 1, &e);
    free(v);
    return rc;
}

/* Every dumped tensor against the golden "power" run, with its shape, and all 23 present. */
static void check_cli_dump(const SafeTensors *g, const char *path) {
    SafeTensors *d = golden_open(path);
    if (!d) return;
    CHECK(st_count(d) == 3 * 7 + 2, "dump holds 3 steps x 7 tensors + 2 finals: %zu", st_count(d));
    for (size_t i = 0; i < st_count(d); i++) {
        const StTensor *t = st_at(d, i);
        char name[128];
        snprintf(name, sizeof name, "power.%s", t->name);
        const StTensor *want = st_find(g, name);
        CHECK(want && want->ndim == t->ndim &&
                  !memcmp(want->shape, t->shape, (size_t)t->ndim * sizeof *t->shape),
              "dump %s has the golden's shape", t->name);
        float *got = golden_load(d, t->name, (size_t)t->numel);
        if (got && want) {
            snprintf(name, sizeof name, "generate --dump %s", t->name);
            float *w = golden_load(g, want->name, (size_t)want->numel);
            size_t n = (size_t)t->numel;
            if (w) check_close(name, got, w, n, REL, REL * max_abs(w, n));
            free(w);
        }
        free(got);
    }
    st_close(d);
}

/* The largest difference between the 24x16 panel of img at (x0, y0), enlarged zoom times (every
 * pixel of each zoom x zoom block), and sample b of a golden image [2, 3, 16, 24] converted as
 * upstream: ((x + 1) / 2) clipped, times 255, truncated. */
static int panel_diff(const Image *img, int x0, int y0, int zoom, const float *want, int b) {
    int worst = 0;
    for (int y = 0; y < 16 * zoom; y++)
        for (int x = 0; x < 24 * zoom; x++)
            for (int c = 0; c < 3; c++) {
                float v = (want[((b * 3 + c) * 16 + y / zoom) * 24 + x / zoom] + 1.0f) / 2.0f;
                int expect = (int)((v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v) * 255.0f);
                int got = img->rgb[((size_t)(y0 + y) * img->width + x0 + x) * 3 + c];
                worst = abs(got - expect) > worst ? abs(got - expect) : worst;
            }
    return worst;
}

/* The --compare sheet of two 24x16 images: enlarged 10 times (to 240 x 160, the most whole
 * times under 256 pixels), panels 8 pixels apart, a 30-pixel title row, a 22-pixel caption over
 * each row (diamond.c's SHEET_* layout). */
enum { SHEET_ZOOM = 10, SHEET_PW = 240, SHEET_PH = 160 };
static int sheet_x(int k) { return 8 + k * (SHEET_PW + 8); }
static int sheet_y(int row) { return 30 + row * (22 + SHEET_PH + 8) + 22; }

/* The PPMs of both samples against the golden final image, and the --compare strip: its
 * baseline panels against the golden plain run from the same noise, its guided panels against
 * the guided golden image. +-1 allows a value within rounding of an integer boundary to
 * truncate the other way. */
static void check_cli_images(const SafeTensors *g, const char *dir) {
    float *guided = golden_load(g, "power.final.image", 2 * 3 * 16 * 24);
    float *plain = golden_load(g, "base2.final.image", 2 * 3 * 16 * 24);
    char path[600];
    for (int b = 0; guided && plain && b < 3; b++) {
        Image img = {0};
        Error e = {{0}};
        if (b < 2) snprintf(path, sizeof path, "%s/out-%d.ppm", dir, 11 + b);
        else snprintf(path, sizeof path, "%s/cmp.ppm", dir);
        int w = b < 2 ? 24 : sheet_x(4), h = b < 2 ? 16 : sheet_y(2) - 22;
        if (ppm_read(&img, path, &e) || img.width != w || img.height != h) {
            CHECK(0, "read %s as a %dx%d image: %s", path, w, h, e.msg);
        } else if (b < 2) {
            int worst = panel_diff(&img, 0, 0, 1, guided, b);
            CHECK(worst <= 1, "%s: pixels within 1 of the golden image's, worst %d", path, worst);
        } else {
            for (int k = 0; k < 2; k++) {
                int base = panel_diff(&img, sheet_x(0), sheet_y(k), SHEET_ZOOM, plain, k);
                int steered = panel_diff(&img, sheet_x(1), sheet_y(k), SHEET_ZOOM, guided, k);
                CHECK(base <= 1 && steered <= 1, "--compare row %d: baseline and guided panels "
                      "within 1 of the golden runs, worst %d and %d", k, base, steered);
            }
        }
        image_free(&img);
        remove(path);
    }
    free(guided);
    free(plain);
}

/* The initial latents of --seed 42,7 are PyTorch's, bit for bit (step.0.x_t of the dump). */
static void check_cli_seed_noise(const SafeTensors *g, const char *dump) {
    SafeTensors *d = golden_open(dump);
    float *got = d ? golden_load(d, "step.0.x_t", 2 * 6 * 16) : NULL;
    float *want42 = golden_load(g, "seed.42.noise", 6 * 16);
    float *want7 = golden_load(g, "seed.7.noise", 6 * 16);
    if (got && want42 && want7) {
        check_close("--seed 42 initial latent", got, want42, 6 * 16, 0.0f, 0.0f);
        check_close("--seed 7 initial latent", got + 6 * 16, want7, 6 * 16, 0.0f, 0.0f);
    }
    free(got);
    free(want42);
    free(want7);
    st_close(d);
}

/* `diamond generate` (next to this test's build directory) on the "power" case. */
static void test_cli(const SafeTensors *g, const char *argv0) {
    char binary[1024], file[512], dir[] = "/tmp/test_sampler.XXXXXX", cmd[4096], path[600];
    int named = harness_binary(argv0, file, sizeof file, binary, sizeof binary);
    if (named != 0 || access(file, X_OK) != 0 || !mkdtemp(dir)) {
        CHECK(0, "%s is built and a temporary directory can be made", file);
        return;
    }
    if (write_cli_inputs(g, dir) == 0) {
        const char *base = "%s generate --model tests/fixtures/tiny-flux2 --detector "
                           "tests/fixtures/tiny-detector --embeddings %s/emb.safetensors --noise "
                           "%s/noise.safetensors --steps 3 -W 24 -H 16 --lambda-schedule "
                           "power:start=0.8,end=0.2,power=2 --loss mse -o %s/out.ppm --quiet";
        int n = snprintf(cmd, sizeof cmd, base, binary, dir, dir, dir);
        snprintf(cmd + n, sizeof cmd - (size_t)n,
                 " --seed 11,12 --dump %s/dump.safetensors --compare %s/cmp.ppm", dir, dir);
        CHECK(run_quiet(cmd) == 0, "diamond generate runs: %s", cmd);
        snprintf(path, sizeof path, "%s/dump.safetensors", dir);
        check_cli_dump(g, path);
        check_cli_images(g, dir);
        snprintf(cmd, sizeof cmd, "%s generate --model tests/fixtures/tiny-flux2 --no-guide "
                 "--embeddings %s/emb.safetensors --seed 42,7 --steps 1 -W 24 -H 16 -o "
                 "%s/out.ppm --dump %s/dump.safetensors --save-steps %s --quiet", binary, dir,
                 dir, dir, dir);
        CHECK(run_quiet(cmd) == 0, "diamond generate from seeds runs: %s", cmd);
        static const char *saved[] = {"step_000_x0-42.png", "step_000_x0-7.png",
                                      "step_000_overlay-42.png"};
        for (int k = 0; k < 3; k++) {
            snprintf(path, sizeof path, "%s/%s", dir, saved[k]);
            CHECK((access(path, R_OK) == 0) == (k < 2), "--save-steps %s %s", saved[k],
                  k < 2 ? "written" : "not written (no detector ran)");
            remove(path);
        }
        snprintf(path, sizeof path, "%s/dump.safetensors", dir);
        check_cli_seed_noise(g, path);
        for (int b = 0; b < 2; b++) {
            snprintf(path, sizeof path, "%s/out-%d.ppm", dir, b ? 7 : 42);
            remove(path);
        }
        static const struct {
            const char *extra;
            int status;
        } bad[] = {{" -W 20", 2}, {" --loss focal:beta=1", 2}, {" --prompt cat", 2},
                   {" --seed 1,2,3", 2}, {" --steps", 2}, {" --no-guide --compare x.png", 2},
                   {" --compare x.jpg", 2}, {" --detector /nonexistent", 1},
                   {" --embeddings /nonexistent.safetensors", 1}, {" --mu 11", 2},
                   {" --mu x", 2}, {" --cfg 3", 2}, {" --cfg 0.5", 2},
                   {" --negative-prompt x", 2}, {" --vae-memory 0", 2}, {" --memory 0", 2},
                   {" --memory x", 2},
                   {" --vae-memory 1.5", 2}, {" --seed 1,", 2}, {" --precision f16", 2},
                   {" --seed 9223372036854775808", 2}, {" --dump %s/out.ppm", 2},
                   {" --compare %s/./out.ppm", 2}};
        /* a NaN in the prompt or the noise file: exit 1 naming the file, no image */
        CHECK(write_input(dir, "nan-emb", "prompt_embeds", 5, 24, true) == 0 &&
                  write_input(dir, "nan-noise", "noise", 6, 16, true) == 0 &&
                  write_input(dir, "long-emb", "prompt_embeds", FLUX2_MAX_TEXT_TOKENS + 1, 24,
                              false) == 0,
              "write the NaN and over-long inputs");
        snprintf(path, sizeof path, "%s/out.ppm", dir);
        remove(path);
        const char *nan_inputs[] = {" --embeddings %s/nan-emb.safetensors",
                                    " --noise %s/nan-noise.safetensors"};
        for (int k = 0; k < 2; k++) {
            n = snprintf(cmd, sizeof cmd, base, binary, dir, dir, dir);
            snprintf(cmd + n, sizeof cmd - (size_t)n, nan_inputs[k], dir);
            CHECK(run_quiet(cmd) == 1 && access(path, F_OK) != 0,
                  "generate ...%s exits 1 and writes no image", nan_inputs[k]);
        }
        /* what cannot fit: refused before sampling with the estimate and the flag, no image */
        static const struct {
            const char *extra, *says;
            int status;
        } refused[] = {
            {" -W 4096 -H 4096 --memory 4096", "raise --memory MB to run it anyway", 2},
            {" --memory 1 --vae-memory 1", "more than the 1 MiB it may take", 2},
            {" --embeddings %s/long-emb.safetensors", "has 4097 tokens, at most 4096", 1},
        };
        for (size_t i = 0; i < COUNT(refused); i++) {
            n = snprintf(cmd, sizeof cmd, "%s generate --model tests/fixtures/tiny-flux2 "
                         "--detector tests/fixtures/tiny-detector --embeddings "
                         "%s/emb.safetensors --seed 1 --steps 1 -W 24 -H 16 -o %s/out.ppm --quiet",
                         binary, dir, dir);
            snprintf(cmd + n, sizeof cmd - (size_t)n, refused[i].extra, dir);
            char said[2048];
            int status = harness_run_said(cmd, said, sizeof said);
            CHECK(status == refused[i].status && strstr(said, refused[i].says) &&
                      access(path, F_OK) != 0,
                  "generate ...%s exits %d saying '%s': got %d, '%s'", refused[i].extra,
                  refused[i].status, refused[i].says, status, said);
        }
        for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
            n = snprintf(cmd, sizeof cmd, base, binary, dir, dir, dir);
            if (strstr(bad[i].extra, "%s")) /* an output in the test's directory */
                snprintf(cmd + n, sizeof cmd - (size_t)n, bad[i].extra, dir);
            else
                snprintf(cmd + n, sizeof cmd - (size_t)n, "%s", bad[i].extra);
            int status = run_quiet(cmd);
            CHECK(status == bad[i].status, "generate ...%s exits %d: got %d", bad[i].extra,
                  bad[i].status, status);
        }
    }
    /* neither --seed nor --noise: a seed drawn at random, which the PNG records with the rest */
    snprintf(cmd, sizeof cmd, "%s generate --model tests/fixtures/tiny-flux2 --detector "
             "tests/fixtures/tiny-detector --embeddings %s/emb.safetensors --steps 1 -W 24 -H 16 "
             "-o %s/drawn.png --quiet", binary, dir, dir);
    snprintf(path, sizeof path, "%s/drawn.png", dir);
    char *said = NULL;
    Error e = {{0}};
    CHECK(run_quiet(cmd) == 0 && png_read_text(path, "parameters", &said, &e) == 0 && said &&
              strstr(said, "seed: ") && strstr(said, "embeddings: ") &&
              strstr(said, "steps=1 size=24x16") && strstr(said, "guided: yes"),
          "generate without --seed draws one and records it: %s", said ? said : e.msg);
    free(said);
    remove(path);
    /* --precision bf16: recorded in the PNG where this build has bf16 dot products; elsewhere a
     * note on stderr, and the run in f32 */
    snprintf(cmd, sizeof cmd, "%s generate --model tests/fixtures/tiny-flux2 --detector "
             "tests/fixtures/tiny-detector --embeddings %s/emb.safetensors --seed 1 --steps 2 "
             "-W 24 -H 16 -o %s/bf16.png --quiet --precision bf16", binary, dir, dir);
    snprintf(path, sizeof path, "%s/bf16.png", dir);
    char note[2048];
    said = NULL;
    bool native = gemm_bf16_native();
    CHECK(harness_run_said(cmd, note, sizeof note) == 0 &&
              png_read_text(path, "parameters", &said, &e) == 0 && said &&
              (strstr(said, "precision=bf16") != NULL) == native &&
              (strstr(note, "computing in f32") != NULL) == !native,
          "generate --precision bf16 %s: %s %s", native ? "records it" : "says it runs in f32",
          said ? said : e.msg, note);
    free(said);
    remove(path);
    snprintf(cmd, sizeof cmd, "%s --version", binary);
    CHECK(run_quiet(cmd) == 0, "diamond --version exits 0");
    const char *files[] = {"dump.safetensors", "noise.safetensors", "emb.safetensors", "out.ppm",
                           "nan-emb.safetensors", "nan-noise.safetensors", "long-emb.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        remove(path);
    }
    rmdir(dir);
}

int main(int argc, char **argv) {
    (void)argc;
    test_spec_errors();
    test_losses();
    test_sigmas();
    SafeTensors *g = golden_open(GOLDEN);
    Models m = {0};
    Error e = {{0}};
    int rc = flux2_open(&m.flow, FLOW, WEIGHTS_FILES, 0, &e) ||
             vae_decoder_open(&m.vae, VAE, WEIGHTS_FILES, 0, &e) ||
             segformer_open(&m.detector, DETECTOR, WEIGHTS_FILES, 0, &e);
    CHECK(rc == 0, "load the tiny fixtures: %s", e.msg);
    if (g && rc == 0) {
        test_schedules(g);
        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) test_case(&m, g, &cases[c]);
        test_batch_independence(&m, g);
        test_inspect_every_step(&m, g);
        test_sampler_errors(&m);
        test_cli(g, argv[0]);
    }
    flux2_free(m.flow);
    vae_decoder_free(m.vae);
    segformer_free(m.detector);
    st_close(g);
    return harness_finish("test_sampler");
}
