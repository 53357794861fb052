/* train/train.c - the trainers of train.h.
 *
 * Contents: training (AdamW, the loop); text+flow training; detector training; VAE training; the
 * VAE's training loss; the oracle's verdict. */
#include "train.h"

#include <ctype.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* === training === */

/* Updates wake the threads only past this many elements (each element is independent). */
#define ADAMW_PARALLEL_MIN ((int64_t)1 << 15)

/* One parameter's moments and step count. */
typedef struct AdamWSlot {
    Var *param;
    float *m, *v; /* [numel] each */
    int64_t step;
} AdamWSlot;

struct AdamW {
    AdamWOptions o;
    AdamWSlot *slots;
    int n;
};

int adamw_new(AdamW **out, Params *const *groups, int n_groups, const AdamWOptions *o, Error *e) {
    *out = NULL;
    AdamW *a = calloc(1, sizeof *a);
    int total = 0;
    for (int g = 0; g < n_groups; g++) total += params_count(groups[g]);
    if (!a || !(a->slots = calloc((size_t)(total ? total : 1), sizeof *a->slots))) {
        free(a);
        return error_set(e, "out of memory for the optimizer");
    }
    a->o = *o;
    for (int g = 0; g < n_groups; g++)
        for (int i = 0; i < params_count(groups[g]); i++) {
            if (params_is_buffer(groups[g], i)) continue;
            AdamWSlot *s = &a->slots[a->n++];
            s->param = params_var(groups[g], i);
            size_t n = (size_t)s->param->value->numel;
            s->m = calloc(n ? n : 1, sizeof *s->m);
            s->v = calloc(n ? n : 1, sizeof *s->v);
            if (!s->m || !s->v) {
                adamw_free(a);
                return error_set(e, "out of memory for the optimizer's moments");
            }
        }
    *out = a;
    return 0;
}

void adamw_free(AdamW *a) {
    if (!a) return;
    for (int i = 0; i < a->n; i++) {
        free(a->slots[i].m);
        free(a->slots[i].v);
    }
    free(a->slots);
    free(a);
}

/* torch's update, in its order of float operations:
 *     p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
 *     p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps) */
static void adamw_update(const AdamWOptions *o, AdamWSlot *s, float lr) {
    const Tensor *p = s->param->value;
    float *restrict w = p->data, *restrict m = s->m, *restrict v = s->v;
    const float *restrict g = s->param->grad->data;
    s->step++;
    /* no decay is a multiplication by 1, which changes no float */
    bool decay = p->ndim >= 2 && o->weight_decay != 0.0f;
    float keep = decay ? 1.0f - lr * o->weight_decay : 1.0f;
    float step_size = (float)(lr / (1.0 - pow(o->beta1, (double)s->step)));
    float root2 = (float)sqrt(1.0 - pow(o->beta2, (double)s->step));
    float b1 = o->beta1, b2 = o->beta2, eps = o->eps;
    int64_t n = p->numel;
    #pragma omp parallel for schedule(static) if (n > ADAMW_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        w[i] *= keep;
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        w[i] -= step_size * (m[i] / (sqrtf(v[i]) / root2 + eps));
    }
}

void adamw_step(AdamW *a, float lr) {
    for (int i = 0; i < a->n; i++)
        if (a->slots[i].param->grad) adamw_update(&a->o, &a->slots[i], lr);
}

void params_zero_grad(Params *const *groups, int n_groups) {
    for (int g = 0; g < n_groups; g++)
        for (int i = 0; i < params_count(groups[g]); i++) var_zero_grad(params_var(groups[g], i));
}

double params_clip_grad_norm(Params *const *groups, int n_groups, double max_norm) {
    double sum = 0.0;
    for (int g = 0; g < n_groups; g++)
        for (int i = 0; i < params_count(groups[g]); i++) {
            const Tensor *grad = params_var(groups[g], i)->grad;
            if (!grad) continue;
            for (int64_t k = 0; k < grad->numel; k++) sum += (double)grad->data[k] * grad->data[k];
        }
    double norm = sqrt(sum);
    if (!(norm > max_norm)) return norm;
    float scale = (float)(max_norm / (norm + 1e-6));
    for (int g = 0; g < n_groups; g++)
        for (int i = 0; i < params_count(groups[g]); i++) {
            Tensor *grad = params_var(groups[g], i)->grad;
            if (grad)
                for (int64_t k = 0; k < grad->numel; k++) grad->data[k] *= scale;
        }
    return norm;
}

double train_lr(const TrainOptions *o, int64_t step) {
    double peak = o->adamw.lr;
    if (step < o->warmup) return peak * (double)(step + 1) / (double)o->warmup;
    int64_t span = o->steps - o->warmup;
    double u = span > 1 ? (double)(step - o->warmup) / (double)(span - 1) : 0.0;
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + cos(M_PI * u)));
}

struct ParamAverage {
    float decay;
    int n;
    bool started;
    Var **param; /* [n] */
    float **avg; /* [n][numel] */
};

int param_average_new(ParamAverage **out, Params *const *groups, int n_groups, float decay,
                      Error *e) {
    *out = NULL;
    if (!(decay > 0.0f && decay < 1.0f))
        return error_set(e, "the parameters' average: decay %g is not in (0, 1)", decay);
    int total = 0;
    for (int g = 0; g < n_groups; g++) total += params_count(groups[g]);
    ParamAverage *a = calloc(1, sizeof *a);
    if (a) {
        a->decay = decay;
        a->param = calloc((size_t)(total ? total : 1), sizeof *a->param);
        a->avg = calloc((size_t)(total ? total : 1), sizeof *a->avg);
    }
    if (!a || !a->param || !a->avg) {
        param_average_free(a);
        return error_set(e, "out of memory for the parameters' average");
    }
    for (int g = 0; g < n_groups; g++)
        for (int i = 0; i < params_count(groups[g]); i++) {
            if (params_is_buffer(groups[g], i)) continue;
            Var *p = params_var(groups[g], i);
            a->param[a->n] = p;
            if (!(a->avg[a->n++] = malloc((size_t)(p->value->numel ? p->value->numel : 1) *
                                          sizeof(float)))) {
                param_average_free(a);
                return error_set(e, "out of memory for the parameters' average");
            }
        }
    *out = a;
    return 0;
}

void param_average_free(ParamAverage *a) {
    if (!a) return;
    for (int i = 0; i < a->n; i++) free(a->avg[i]);
    free(a->avg);
    free(a->param);
    free(a);
}

void param_average_update(ParamAverage *a) {
    float keep = a->decay, mix = 1.0f - a->decay;
    for (int i = 0; i < a->n; i++) {
        const Tensor *p = a->param[i]->value;
        float *avg = a->avg[i];
        if (!a->started) {
            memcpy(avg, p->data, (size_t)p->numel * sizeof(float));
            continue;
        }
        for (int64_t k = 0; k < p->numel; k++) avg[k] = keep * avg[k] + mix * p->data[k];
    }
    a->started = true;
}

void param_average_store(const ParamAverage *a) {
    if (!a->started) return;
    for (int i = 0; i < a->n; i++)
        memcpy(a->param[i]->value->data, a->avg[i],
               (size_t)a->param[i]->value->numel * sizeof(float));
}

/* One step's loss, backward, clipping and update. */
static int train_step(const TrainTask *task, const TrainOptions *o, AdamW *a, int64_t step,
                      TrainStep *info, Error *e) {
    params_zero_grad(task->groups, task->n_groups);
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory for the training tape");
    Var *loss = task->loss(t, step, task->ctx, e);
    int rc = loss ? tape_check(t, e) : -1;
    if (rc == 0 && loss->value->numel != 1)
        rc = error_set(e, "training: the loss must be one number");
    if (rc == 0 && !isfinite(loss->value->data[0]))
        rc = error_set(e, "training: the loss is not finite at step %lld", (long long)step);
    if (rc == 0) rc = tape_backward(t, loss, e);
    if (rc == 0) {
        info->loss = loss->value->data[0];
        info->grad_norm = params_clip_grad_norm(task->groups, task->n_groups,
                                                o->clip > 0.0 ? o->clip : INFINITY);
        if (!isfinite(info->grad_norm))
            rc = error_set(e, "training: the gradient is not finite at step %lld",
                           (long long)step);
    }
    if (rc == 0) adamw_step(a, (float)info->lr);
    tape_free(t);
    return rc;
}

int train_run(const TrainTask *task, const TrainOptions *o, Error *e) {
    AdamW *a;
    if (o->steps < 1) return error_set(e, "training: steps must be >= 1");
    if (o->warmup < 0) return error_set(e, "training: warmup must be >= 0");
    ParamAverage *avg = NULL;
    if (adamw_new(&a, task->groups, task->n_groups, &o->adamw, e)) return -1;
    if (o->ema != 0.0f && param_average_new(&avg, task->groups, task->n_groups, o->ema, e)) {
        adamw_free(a);
        return -1;
    }
    for (int g = 0; g < task->n_groups; g++) params_set_trainable(task->groups[g], true);
    int rc = 0;
    for (int64_t step = 0; step < o->steps; step++) {
        if (rc) break;
        TrainStep info = {.step = step, .steps = o->steps, .lr = train_lr(o, step)};
        rc = train_step(task, o, a, step, &info, e);
        if (rc == 0 && avg) param_average_update(avg);
        if (rc == 0 && o->on_step) rc = o->on_step(&info, o->ctx, e);
    }
    if (rc == 0 && avg) param_average_store(avg);
    for (int g = 0; g < task->n_groups; g++) params_set_trainable(task->groups[g], false);
    param_average_free(avg);
    adamw_free(a);
    return rc;
}

/* === text+flow training ===
 * The transformer and the text encoder trained together on the rectified-flow objective, as
 * FLUX-style trainers do it: per sample a clean latent x0 (the VAE tokens of the prompt's image),
 * noise n ~ N(0, 1), a noise level sigma from a logit-normal, x_t = (1 - sigma) x0 + sigma n, and
 * the mean squared error between the model's velocity at (x_t, sigma, prompt) and the target
 * v = n - x0, so that x0 = x_t - sigma v as the sampler assumes. */

struct FlowTrainer {
    FlowTrainOptions o;
    Flux2 *flow;
    TextEncoder *text;
    int channels;                       /* in_channels */
    char (*prompts)[FLOW_PROMPT_MAX];   /* [batch] */
    const char **prompt_list;           /* [batch] pointers into prompts */
    float *x0, *noise;                  /* [batch, h w, channels] */
    float *sigma;                       /* [batch] */
};

/* One 64-bit value from (seed, step) for the step's generator. */
static uint64_t flow_mix(uint64_t seed, int64_t step) {
    return mix64(seed + 0x9E3779B97F4A7C15ull * (uint64_t)(step + 1));
}

void flow_noise(uint64_t seed, int64_t step, int batch, int64_t per_sample, double logit_mean,
                double logit_std, float *noise, float *sigma) {
    TorchGenerator g;
    torch_generator_seed(&g, flow_mix(seed, step));
    torch_randn(&g, noise, (size_t)batch * (size_t)per_sample);
    torch_randn(&g, sigma, (size_t)batch);
    for (int b = 0; b < batch; b++)
        sigma[b] = (float)(1.0 / (1.0 + exp(-(logit_mean + logit_std * sigma[b]))));
}

bool flow_drops_prompt(uint64_t seed, int64_t step, int b, double uncond) {
    uint64_t h = flow_mix(flow_mix(seed, step) ^ 0x5eed0d209ull, b);
    return (double)(h >> 11) * 0x1.0p-53 < uncond;
}

void flow_trainer_free(FlowTrainer *f) {
    if (!f) return;
    free(f->prompts);
    free(f->prompt_list);
    free(f->x0);
    free(f->noise);
    free(f->sigma);
    free(f);
}

/* mean((flow(x_t, sigma, text(prompts)) - (n - x0))^2) over batch `step` */
static Var *flow_loss(Tape *t, int64_t step, void *ctx, Error *e) {
    FlowTrainer *f = ctx;
    const FlowTrainOptions *o = &f->o;
    int64_t tokens = (int64_t)o->h * o->w, per = tokens * f->channels;
    if (o->data(step, o->batch, f->prompts, f->x0, o->data_ctx, e)) return NULL;
    for (int b = 0; b < o->batch; b++) {
        f->prompts[b][FLOW_PROMPT_MAX - 1] = '\0';
        if (flow_drops_prompt(o->seed, step, b, o->uncond)) f->prompts[b][0] = '\0';
    }
    flow_noise(o->seed, step, o->batch, per, o->logit_mean, o->logit_std, f->noise, f->sigma);
    Tensor *x_t = TENSOR_NEW(o->batch, tokens, f->channels);
    Tensor *minus_target = TENSOR_NEW(o->batch, tokens, f->channels);
    if (x_t && minus_target) {
        for (int64_t i = 0; i < x_t->numel; i++) {
            float s = f->sigma[i / per], x0 = f->x0[i], n = f->noise[i];
            x_t->data[i] = (1.0f - s) * x0 + s * n;
            minus_target->data[i] = x0 - n;
        }
    }
    Var *x = var_take(t, x_t, false), *minus = var_take(t, minus_target, false);
    Var *txt = text_encode(t, f->text, f->prompt_list, o->batch, e);
    if (!txt) return NULL;
    Var *v = flux2_forward_graph(t, f->flow, x, o->h, o->w, txt, f->sigma, NULL);
    Var *d = ag_add(t, v, minus);
    Var *loss = ag_mean(t, ag_mul(t, d, d));
    return tape_check(t, e) ? NULL : loss;
}

static int flow_trainer_check(const Flux2 *flow, const TextEncoder *text,
                              const FlowTrainOptions *o, Error *e) {
    const Flux2Config *c = flux2_config(flow);
    const TextEncoderConfig *tc = text_encoder_config(text);
    if (!flux2_params(flow))
        return error_set(e,
                         "text+flow training needs a resident transformer (flux2_make_resident)");
    if (tc->hidden_size != c->joint_attention_dim)
        return error_set(e, "the text encoder's hidden_size %d is not the transformer's "
                         "joint_attention_dim %d", tc->hidden_size, c->joint_attention_dim);
    if (o->batch < 1 || o->h < 1 || o->w < 1 || !o->data || !(o->logit_std >= 0.0) ||
        !(o->uncond >= 0.0 && o->uncond < 1.0))
        return error_set(e, "text+flow training: batch %d, grid %d x %d, logit_std %g, uncond %g "
                         "or the data source is invalid", o->batch, o->h, o->w, o->logit_std,
                         o->uncond);
    return 0;
}

int flow_train_task(TrainTask *task, FlowTrainer **out, Flux2 *flow, TextEncoder *text,
                    const FlowTrainOptions *o, Error *e) {
    *out = NULL;
    if (flow_trainer_check(flow, text, o, e)) return -1;
    FlowTrainer *f = calloc(1, sizeof *f);
    size_t B = (size_t)o->batch, n = B * (size_t)o->h * (size_t)o->w *
                                     (size_t)flux2_config(flow)->in_channels;
    if (f) {
        *f = (FlowTrainer){.o = *o, .flow = flow, .text = text,
                           .channels = flux2_config(flow)->in_channels,
                           .prompts = calloc(B, sizeof *f->prompts),
                           .prompt_list = calloc(B, sizeof *f->prompt_list),
                           .x0 = malloc(n * sizeof(float)), .noise = malloc(n * sizeof(float)),
                           .sigma = malloc(B * sizeof(float))};
    }
    if (!f || !f->prompts || !f->prompt_list || !f->x0 || !f->noise || !f->sigma) {
        flow_trainer_free(f);
        return error_set(e, "out of memory for text+flow training");
    }
    for (size_t b = 0; b < B; b++) f->prompt_list[b] = f->prompts[b];
    *task = (TrainTask){.groups = {flux2_params(flow), text_encoder_params(text)}, .n_groups = 2,
                        .loss = flow_loss, .ctx = f};
    *out = f;
    return 0;
}

int flow_world_batch(int64_t step, int batch, char (*prompts)[FLOW_PROMPT_MAX], float *x0,
                     void *ctx, Error *e) {
    const FlowWorld *world = ctx;
    Tensor *images = TENSOR_NEW(batch, 3, WORLD_H, WORLD_W);
    if (!images) return error_set(e, "out of memory for a batch of world images");
    int64_t plane = 3 * WORLD_H * WORLD_W;
    int rc = 0;
    for (int b = 0; b < batch; b++) {
        if (rc) break;
        uint64_t index =
            vae_image_index(world->seed, (uint64_t)step * (uint64_t)batch + (uint64_t)b);
        WorldScene scene;
        rc = world_scene(index, NULL, &scene, e) ||
             vae_world_image(index, 3, WORLD_H, WORLD_W, images->data + b * plane, NULL, e);
        if (rc == 0) snprintf(prompts[b], FLOW_PROMPT_MAX, "%s", scene.word);
    }
    Tape *t = rc == 0 ? tape_new() : NULL;
    if (rc == 0 && !t) rc = error_set(e, "out of memory");
    if (rc == 0) {
        int h = 0, w = 0;
        tape_set_grad(t, false);
        Var *tokens = vae_encode(t, world->vae, var_new(t, images, false), &h, &w);
        rc = tape_check(t, e);
        const Tensor *v = rc == 0 ? tokens->value : NULL;
        if (v && (v->shape[1] != (int64_t)world->h * world->w || v->shape[2] != world->channels))
            rc = error_set(e, "the VAE makes %dx%d tokens of %lld channels, the flow model takes "
                              "%dx%d of %d", h, w, (long long)v->shape[2], world->h, world->w,
                           world->channels);
        if (rc == 0) memcpy(x0, v->data, (size_t)v->numel * sizeof(float));
    }
    tape_free(t);
    tensor_free(images);
    return rc;
}

/* === detector training === */

static uint64_t detector_mix(uint64_t x) {
    return mix64(x + 0x9e3779b97f4a7c15ull);
}

/* The seed of example `index` of batch `step`. */
static uint64_t detector_seed(uint64_t seed, int64_t step, int index) {
    return detector_mix(detector_mix(detector_mix(seed) ^ (uint64_t)step) ^ (uint64_t)index);
}

int detector_example(uint64_t seed, bool corrupt, uint8_t *rgb, uint8_t *mask, Error *e) {
    WorldScene scene;
    if (world_scene(seed, NULL, &scene, e)) return -1;
    if (corrupt)
        return world_corrupt(detector_mix(seed), &scene, WORLD_CORRUPT_ANY, rgb, mask, NULL, e);
    world_render(&scene, rgb);
    memset(mask, 0, (size_t)WORLD_H * WORLD_W);
    return 0;
}

/* true when the mask [., W] has a nonzero pixel in rows [y0, y1), columns [x0, x1). */
static bool mask_any(const uint8_t *mask, int W, int y0, int y1, int x0, int x1) {
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++)
            if (mask[(size_t)y * W + x]) return true;
    return false;
}

int detector_target(const uint8_t *mask, int H, int W, int h, int w, float *target, Error *e) {
    if (h < 1 || w < 1 || H % h || W % w)
        return error_set(e, "detector target: a %dx%d mask does not pool to a %dx%d map", W, H, w,
                         h);
    int ch = H / h, cw = W / w;
    for (int i = 0; i < h; i++)
        for (int j = 0; j < w; j++) {
            bool any = mask_any(mask, W, i * ch, (i + 1) * ch, j * cw, (j + 1) * cw);
            target[(size_t)i * w + j] = any ? 1.0f : 0.0f;
        }
    return 0;
}

/* log sigmoid(x), held at log(FLT_MIN) where the sigmoid underflows. */
static Var *detector_log_sigmoid(Tape *t, Var *x) {
    return ag_log(t, ag_clamp(t, ag_sigmoid(t, x), FLT_MIN, 1.0f));
}

Var *detector_bce_loss(Tape *t, Var *logits, Var *target, float pos_weight) {
    if (!target) return NULL;
    Tensor *pos = tensor_new(target->value->ndim, target->value->shape);
    Tensor *neg = tensor_new(target->value->ndim, target->value->shape);
    if (pos && neg) {
        for (int64_t i = 0; i < pos->numel; i++) {
            pos->data[i] = pos_weight * target->value->data[i];
            neg->data[i] = 1.0f - target->value->data[i];
        }
    }
    Var *terms = ag_add(t, ag_mul(t, detector_log_sigmoid(t, logits), var_take(t, pos, false)),
                        ag_mul(t, detector_log_sigmoid(t, ag_scale(t, logits, -1.0f)),
                               var_take(t, neg, false)));
    return ag_scale(t, ag_mean(t, terms), -1.0f);
}

struct DetectorTrainer {
    Segformer *model;
    DetectorTrainOptions options;
};

#define DETECTOR_PIXELS ((size_t)WORLD_H * WORLD_W)

/* rgb: [H, W, 3] -> x: [3, H, W] in [-1, 1], as the sampler's images */
static void detector_image(const uint8_t *rgb, float *x) {
    for (int c = 0; c < 3; c++)
        for (size_t p = 0; p < DETECTOR_PIXELS; p++)
            x[c * DETECTOR_PIXELS + p] = (float)rgb[p * 3 + c] / 127.5f - 1.0f;
}

/* rgb [H, W, 3] and mask [H, W] (0 / 1) -> image [3, H, W] in [-1, 1] and mask_f [H, W] */
static void detector_put(const uint8_t *rgb, const uint8_t *mask, float *image, float *mask_f) {
    detector_image(rgb, image);
    for (size_t p = 0; p < DETECTOR_PIXELS; p++) mask_f[p] = mask[p];
}

/* Examples 0 .. n-1 of batch `step`, those from index n_clean on corrupted, each of the scene of
 * the clean example n_clean before it (so the batch shows what the corruption changed) ->
 * images [n, 3, H, W], masks [n, H, W] (as floats 0 / 1). */
static int detector_examples(uint64_t seed, int64_t step, int n, int n_clean, float *images,
                             float *masks, Error *e) {
    uint8_t rgb[DETECTOR_PIXELS * 3], mask[DETECTOR_PIXELS];
    for (int b = 0; b < n; b++) {
        int scene = b >= n_clean && n_clean > 0 ? (b - n_clean) % n_clean : b;
        if (detector_example(detector_seed(seed, step, scene), b >= n_clean, rgb, mask, e))
            return -1;
        detector_put(rgb, mask, images + (size_t)b * 3 * DETECTOR_PIXELS,
                     masks + (size_t)b * DETECTOR_PIXELS);
    }
    return 0;
}

/* Batch `step`'s sample b: one of the samples before the held-out ones, drawn uniformly. */
static int detector_sample_index(const DetectorTrainOptions *o, int64_t step, int b) {
    uint64_t pool = (uint64_t)(o->samples->n - o->held_out);
    return (int)(detector_seed(detector_mix(o->seed), step, b) % pool);
}

int detector_batch(const DetectorTrainer *d, int64_t step, Tensor **images, Tensor **masks,
                   Error *e) {
    const DetectorTrainOptions *o = &d->options;
    int n = o->batch, renders = o->samples ? n - n / 2 : n;
    *images = TENSOR_NEW(n, 3, WORLD_H, WORLD_W);
    *masks = TENSOR_NEW(n, WORLD_H, WORLD_W);
    int rc = *images && *masks ? 0 : error_set(e, "out of memory for a batch");
    if (rc == 0)
        rc = detector_examples(o->seed, step, renders, renders - renders / 2, (*images)->data,
                               (*masks)->data, e);
    for (int b = renders; b < n; b++) {
        if (rc) break;
        size_t k = (size_t)detector_sample_index(o, step, b);
        detector_put(o->samples->rgb + k * DETECTOR_PIXELS * 3,
                     o->samples->mask + k * DETECTOR_PIXELS,
                     (*images)->data + (size_t)b * 3 * DETECTOR_PIXELS,
                     (*masks)->data + (size_t)b * DETECTOR_PIXELS);
    }
    if (rc) {
        tensor_free(*images);
        tensor_free(*masks);
        *images = *masks = NULL;
    }
    return rc;
}

/* masks: [B, H, W] -> target: [B, 1, h, w] */
static Tensor *detector_targets(const Tensor *masks, int64_t h, int64_t w, Error *e) {
    int64_t B = masks->shape[0], H = masks->shape[1], W = masks->shape[2];
    Tensor *target = TENSOR_NEW(B, 1, h, w);
    uint8_t *mask = malloc((size_t)(H * W));
    int rc = target && mask ? 0 : error_set(e, "out of memory for the targets");
    for (int64_t b = 0; b < B; b++) {
        if (rc) break;
        for (int64_t p = 0; p < H * W; p++) mask[p] = masks->data[b * H * W + p] != 0.0f;
        rc = detector_target(mask, (int)H, (int)W, (int)h, (int)w, target->data + b * h * w, e);
    }
    free(mask);
    if (rc) {
        tensor_free(target);
        return NULL;
    }
    return target;
}

/* TrainTask.loss: BCE of the logits of batch `step` against its pooled masks. */
static Var *detector_train_loss(Tape *t, int64_t step, void *ctx, Error *e) {
    const DetectorTrainer *d = ctx;
    Tensor *images, *masks;
    if (detector_batch(d, step, &images, &masks, e)) return NULL;
    Var *logits = segformer_forward_logits(t, d->model, var_take(t, images, false));
    Tensor *target = NULL;
    if (tape_check(t, e) == 0)
        target = detector_targets(masks, logits->value->shape[2], logits->value->shape[3], e);
    tensor_free(masks);
    if (!target) return NULL;
    return detector_bce_loss(t, logits, var_take(t, target, false), d->options.pos_weight);
}

int detector_train_task(TrainTask *task, DetectorTrainer **out, Segformer *m,
                        const DetectorTrainOptions *o, Error *e) {
    *out = NULL;
    const SegformerConfig *c = segformer_config(m);
    if (!segformer_head_is_trainable(m))
        return error_set(e, "detector training: the detector must be opened WEIGHTS_FRESH");
    if (c->num_labels != 1)
        return error_set(e, "detector training: needs num_labels 1, the detector has %d",
                         c->num_labels);
    if (o->batch < 1 || !(o->pos_weight > 0.0f))
        return error_set(e, "detector training: batch must be >= 1 and pos_weight > 0");
    if (o->samples && (o->held_out < 0 || o->held_out >= o->samples->n))
        return error_set(e, "detector training: %d samples, %d held out: none left to train on",
                         o->samples->n, o->held_out);
    DetectorTrainer *d = malloc(sizeof *d);
    if (!d) return error_set(e, "out of memory");
    *d = (DetectorTrainer){.model = m, .options = *o};
    *task = (TrainTask){.groups = {segformer_params(m)}, .n_groups = 1, .loss = detector_train_loss,
                        .ctx = d};
    *out = d;
    return 0;
}

void detector_trainer_free(DetectorTrainer *d) { free(d); }

/* The detector's decision on each of images [n, 3, H, W] (taken): logit max >= 0, i.e. sigmoid
 * >= 0.5. */
static int detector_decide(const Segformer *m, Tensor *images, int n, int *flagged, Error *e) {
    Tape *t = tape_new();
    if (!t) {
        tensor_free(images);
        return error_set(e, "out of memory");
    }
    tape_set_grad(t, false);
    Var *logits = segformer_forward_logits(t, m, var_take(t, images, false));
    int rc = tape_check(t, e);
    for (int b = 0; b < n; b++) {
        if (rc) break;
        int64_t per = logits->value->numel / n;
        float top = -INFINITY;
        for (int64_t i = 0; i < per; i++) top = fmaxf(top, logits->value->data[b * per + i]);
        flagged[b] = top >= 0.0f;
    }
    tape_free(t);
    return rc;
}

/* Flags of n examples (the first `clean` of them clean). */
static int detector_flags(const Segformer *m, uint64_t seed, int64_t chunk, int n, int clean,
                          int *flagged, Error *e) {
    Tensor *images = TENSOR_NEW(n, 3, WORLD_H, WORLD_W), *masks = TENSOR_NEW(n, WORLD_H, WORLD_W);
    int rc = images && masks ? 0 : error_set(e, "out of memory");
    if (rc == 0) rc = detector_examples(seed, chunk, n, clean, images->data, masks->data, e);
    tensor_free(masks);
    if (rc) {
        tensor_free(images);
        return -1;
    }
    return detector_decide(m, images, n, flagged, e);
}

enum { DETECTOR_CHUNK = 16 };

int detector_accuracy(const Segformer *m, uint64_t seed, int n, DetectorAccuracy *out,
                      Error *e) {
    *out = (DetectorAccuracy){.n = 2 * n, .clean = n};
    int passed = 0, caught = 0;
    for (int64_t chunk = 0; chunk * DETECTOR_CHUNK < n; chunk++) {
        int64_t left = n - chunk * DETECTOR_CHUNK;
        int k = (int)(left < DETECTOR_CHUNK ? left : DETECTOR_CHUNK), flagged[2 * DETECTOR_CHUNK];
        if (detector_flags(m, seed, chunk, 2 * k, k, flagged, e)) return -1;
        for (int b = 0; b < k; b++) {
            passed += !flagged[b];
            caught += flagged[k + b];
        }
    }
    out->clean_passed = n ? (double)passed / n : 0.0;
    out->corrupt_flagged = n ? (double)caught / n : 0.0;
    return 0;
}

int detector_sample_accuracy(const Segformer *m, const DetectorSamples *s, int first, int count,
                             DetectorAccuracy *out, Error *e) {
    *out = (DetectorAccuracy){.n = count};
    if (first < 0 || count < 0 || first > s->n - count)
        return error_set(e, "detector accuracy: samples %d .. %d of %d", first, first + count,
                         s->n);
    int clean = 0, passed = 0, caught = 0;
    for (int at = first; at < first + count; at += DETECTOR_CHUNK) {
        int k = first + count - at < DETECTOR_CHUNK ? first + count - at : DETECTOR_CHUNK;
        int flagged[DETECTOR_CHUNK];
        Tensor *images = TENSOR_NEW(k, 3, WORLD_H, WORLD_W);
        if (!images) return error_set(e, "out of memory");
        for (int b = 0; b < k; b++)
            detector_image(s->rgb + (size_t)(at + b) * DETECTOR_PIXELS * 3,
                           images->data + (size_t)b * 3 * DETECTOR_PIXELS);
        if (detector_decide(m, images, k, flagged, e)) return -1;
        for (int b = 0; b < k; b++) {
            const uint8_t *mask = s->mask + (size_t)(at + b) * DETECTOR_PIXELS;
            bool artifact = memchr(mask, 1, DETECTOR_PIXELS) != NULL;
            clean += !artifact;
            passed += !artifact && !flagged[b];
            caught += artifact && flagged[b];
        }
    }
    out->clean = clean;
    out->clean_passed = clean ? (double)passed / clean : 0.0;
    out->corrupt_flagged = count - clean ? (double)caught / (count - clean) : 0.0;
    return 0;
}

/* --- the flow model's samples, labelled by the oracle --- */

void detector_samples_free(DetectorSamples *s) {
    free(s->words);
    free(s->rgb);
    free(s->mask);
    *s = (DetectorSamples){0};
}

static bool detector_excluded(const DetectorSampleOptions *o, const char *word) {
    for (int k = 0; k < o->n_exclude; k++) {
        const char *x = o->exclude[k];
        size_t i = 0;
        while (x[i] && word[i] && toupper((unsigned char)x[i]) == toupper((unsigned char)word[i]))
            i++;
        if (!x[i] && !word[i]) return true;
    }
    return false;
}

/* Sample i's word: the first scene drawn from (seed, i, attempt) whose word is not excluded. */
static int detector_sample_word(const DetectorSampleOptions *o, int i, char *word, Error *e) {
    for (int attempt = 0; attempt < 1000; attempt++) {
        WorldScene scene;
        if (world_scene(detector_seed(o->seed, i, attempt), NULL, &scene, e)) return -1;
        if (!detector_excluded(o, scene.word)) {
            memcpy(word, scene.word, sizeof scene.word);
            return 0;
        }
    }
    return error_set(e, "detector samples: 1000 words drawn for sample %d, all excluded", i);
}

/* Samples first .. first+count-1: words, noise, the sampler, the decoder, the oracle. */
static int detector_samples_batch(const Flux2 *flow, const TextEncoder *text,
                                  const VaeDecoder *vae, const DetectorSampleOptions *o, int h,
                                  int w, int first, int count, DetectorSamples *s, Error *e) {
    int64_t per = (int64_t)h * w * flux2_config(flow)->in_channels;
    const char **prompts = malloc(2 * (size_t)count * sizeof *prompts);
    Tensor *latent = TENSOR_NEW(count, (int64_t)h * w, flux2_config(flow)->in_channels);
    Tape *t = tape_new();
    int rc = prompts && latent && t ? 0 : error_set(e, "out of memory for the samples");
    for (int b = 0; b < count; b++) {
        if (rc) break;
        rc = detector_sample_word(o, first + b, s->words[first + b], e);
        prompts[b] = s->words[first + b];
        prompts[count + b] = "";
        TorchGenerator g;
        torch_generator_seed(&g, detector_seed(detector_mix(o->seed), first + b, -1));
        torch_randn(&g, latent->data + b * per, (size_t)per);
    }
    if (rc == 0) tape_set_grad(t, false);
    Var *txt = rc == 0 ? text_encode(t, text, prompts, count, e) : NULL;
    Var *neg = txt && o->sampler.cfg_scale > 1.0f ? text_encode(t, text, prompts + count, count, e)
                                                  : NULL;
    if (rc == 0 && (!txt || (o->sampler.cfg_scale > 1.0f && !neg))) rc = -1;
    if (rc == 0)
        rc = sampler_run(flow, vae, NULL, &o->sampler, txt->value, neg ? neg->value : NULL, latent,
                         h, w, NULL, NULL, e);
    Var *image = rc == 0 ? vae_decode(t, vae, var_new(t, latent, false), h, w) : NULL;
    if (rc == 0) rc = tape_check(t, e);
    if (rc == 0 && (image->value->shape[2] != WORLD_H || image->value->shape[3] != WORLD_W))
        rc = error_set(e, "detector samples: the VAE makes %lldx%lld images, the world is %dx%d",
                       (long long)image->value->shape[3], (long long)image->value->shape[2],
                       WORLD_W, WORLD_H);
    for (int b = 0; b < count; b++) {
        if (rc) break;
        size_t i = (size_t)(first + b);
        OracleResult r;
        image_from_signed(image->value->data + (size_t)b * 3 * DETECTOR_PIXELS, WORLD_W, WORLD_H,
                          s->rgb + i * DETECTOR_PIXELS * 3);
        rc = oracle_read(s->rgb + i * DETECTOR_PIXELS * 3, WORLD_W, WORLD_H, &r, e);
        if (rc == 0) s->flagged += oracle_artifact_mask(&r, s->mask + i * DETECTOR_PIXELS) > 0;
    }
    tape_free(t);
    tensor_free(latent);
    free(prompts);
    return rc;
}

int detector_samples_make(const Flux2 *flow, const TextEncoder *text, const VaeDecoder *vae,
                          const DetectorSampleOptions *o, DetectorSamples *out, Error *e) {
    *out = (DetectorSamples){0};
    int rows, cols;
    vae_decoder_token_size(vae, &rows, &cols);
    int h = WORLD_H / rows, w = WORLD_W / cols;
    if (o->n < 1 || o->batch < 1 || o->sampler.guide || h < 1 || w < 1)
        return error_set(e, "detector samples: n %d, batch %d, guided sampling or a VAE too "
                            "coarse for the world", o->n, o->batch);
    *out = (DetectorSamples){.n = o->n, .words = calloc((size_t)o->n, sizeof *out->words),
                             .rgb = malloc((size_t)o->n * DETECTOR_PIXELS * 3),
                             .mask = malloc((size_t)o->n * DETECTOR_PIXELS)};
    int rc = out->words && out->rgb && out->mask ? 0 : error_set(e, "out of memory for samples");
    for (int first = 0; first < o->n; first += o->batch) {
        if (rc) break;
        int count = o->n - first < o->batch ? o->n - first : o->batch;
        rc = detector_samples_batch(flow, text, vae, o, h, w, first, count, out, e);
        if (rc == 0 && o->on_batch && o->on_batch(first + count, o->n, o->ctx))
            rc = error_set(e, "detector samples: stopped");
    }
    if (rc) detector_samples_free(out);
    return rc;
}

/* === VAE training ===
 */

/* Reconstruction only, no KL term: everything diamond does with the latent uses the mode (the
 * mean), never a sample, so the log-variance half is never read; the mean's scale, which a KL
 * term would keep near 1, is set afterwards by the batch-norm statistics (vae_fit_latent_stats),
 * which the flow model sees through. Mean squared error rather than L1: smooth at 0, and at these
 * sizes the decoded strokes come out sharp enough (see the report's measurements). */

/* The shipped config (weights/vae/config.json: block_out_channels 16, 32, 64, 8 groups, latent
 * channels 8, one resnet per down block) was picked by speed: one batch-16 step on 64 x 32 images,
 * one thread of a shared 2-core Xeon, took 0.62 s of CPU, against 1.1 s for 32, 64, 64 and 1.6 s
 * for 32, 64, 128. Its profile: GEMM 42%, im2col/col2im 13%, the fused GroupNorm + SiLU 20%. */

struct VaeTrainer {
    VaeEncoder *enc;
    VaeDecoder *dec;
    VaeTrainOptions o;
};

uint64_t vae_image_index(uint64_t seed, uint64_t k) {
    return mix64(seed * 0x9E3779B97F4A7C15ull + k + 0x632BE59BD9B4E019ull);
}

int vae_world_image(uint64_t index, int channels, int height, int width, float *chw, void *ctx,
                    Error *e) {
    (void)ctx;
    if (channels != 3 || height != WORLD_H || width != WORLD_W)
        return error_set(e, "the world's images are 3 x %d x %d, not %d x %d x %d", WORLD_H,
                         WORLD_W, channels, height, width);
    WorldScene scene;
    uint8_t rgb[WORLD_H * WORLD_W * 3];
    if (world_scene(index, NULL, &scene, e)) return -1;
    world_render(&scene, rgb);
    /* [H, W, 3] bytes -> [3, H, W] in [-1, 1]: the inverse of the sampler's ((x + 1) / 2) * 255 */
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < WORLD_H * WORLD_W; i++)
            chw[c * WORLD_H * WORLD_W + i] = (float)rgb[i * 3 + c] / 127.5f - 1.0f;
    return 0;
}

/* Images vae_image_index(seed, first + i) for i < n: [n, channels, height, width]. */
static int vae_images(const VaeTrainer *tr, uint64_t seed, uint64_t first, int n, Tensor **out,
                      Error *e) {
    const VaeTrainOptions *o = &tr->o;
    int C = vae_encoder_config(tr->enc)->in_channels;
    Tensor *images = TENSOR_NEW(n, C, o->height, o->width);
    if (!images) return error_set(e, "out of memory for a batch of %d images", n);
    size_t each = (size_t)C * o->height * o->width;
    for (int i = 0; i < n; i++)
        if (o->image(vae_image_index(seed, first + (uint64_t)i), C, o->height, o->width,
                     images->data + i * each, o->image_ctx, e)) {
            tensor_free(images);
            return -1;
        }
    *out = images;
    return 0;
}

int vae_batch(const VaeTrainer *tr, int64_t step, Tensor **images, Error *e) {
    return vae_images(tr, tr->o.seed, (uint64_t)step * (uint64_t)tr->o.batch, tr->o.batch, images,
                      e);
}

/* Batch `step`'s latent noise: [batch, tokens, channels], latent_noise * N(0, 1) from a
 * generator seeded by (seed, step) through vae_image_index's mix; NULL when latent_noise is 0. */
static int vae_latent_noise(const VaeTrainer *tr, int64_t step, Tensor **out, Error *e) {
    const VaeConfig *c = vae_encoder_config(tr->enc);
    int rows, cols;
    vae_encoder_token_size(tr->enc, &rows, &cols);
    int64_t tokens = (int64_t)(tr->o.height / rows) * (tr->o.width / cols);
    *out = NULL;
    if (tr->o.latent_noise == 0.0f) return 0;
    Tensor *n = TENSOR_NEW(tr->o.batch, tokens, c->latent_channels * c->patch_h * c->patch_w);
    if (!n) return error_set(e, "out of memory for the latent noise");
    TorchGenerator g;
    torch_generator_seed(&g, vae_image_index(~tr->o.seed, (uint64_t)step));
    torch_randn(&g, n->data, (size_t)n->numel);
    for (int64_t i = 0; i < n->numel; i++) n->data[i] *= tr->o.latent_noise;
    *out = n;
    return 0;
}

static Var *vae_train_loss(Tape *t, int64_t step, void *ctx, Error *e) {
    const VaeTrainer *tr = ctx;
    Tensor *images, *noise;
    if (vae_latent_noise(tr, step, &noise, e)) return NULL;
    if (vae_batch(tr, step, &images, e)) {
        tensor_free(noise);
        return NULL;
    }
    Var *loss = vae_reconstruction_loss(t, tr->enc, tr->dec, var_take(t, images, false),
                                        noise ? var_take(t, noise, false) : NULL);
    return tape_check(t, e) ? NULL : loss;
}

int vae_train_task(TrainTask *task, VaeTrainer **out, VaeEncoder *enc, VaeDecoder *dec,
                   const VaeTrainOptions *o, Error *e) {
    *out = NULL;
    const VaeConfig *c = vae_encoder_config(enc);
    int rows, cols;
    vae_encoder_token_size(enc, &rows, &cols);
    if (o->batch < 1 || !o->image)
        return error_set(e, "VAE training: needs a batch of at least 1 and an image source");
    if (o->height < 1 || o->width < 1 || o->height % rows || o->width % cols)
        return error_set(e, "VAE training: images of %d x %d, expected positive multiples of "
                            "%d x %d", o->width, o->height, cols, rows);
    if (c->in_channels != vae_decoder_config(dec)->out_channels)
        return error_set(e, "VAE training: the encoder takes %d channels, the decoder makes %d",
                         c->in_channels, vae_decoder_config(dec)->out_channels);
    VaeTrainer *tr = calloc(1, sizeof *tr);
    if (!tr) return error_set(e, "out of memory");
    *tr = (VaeTrainer){.enc = enc, .dec = dec, .o = *o};
    vae_decoder_set_checkpoint_levels(dec, 0);
    Params *enc_p = vae_encoder_params(enc), *dec_p = vae_decoder_params(dec);
    *task = (TrainTask){.groups = {o->decoder_only ? dec_p : enc_p, dec_p},
                        .n_groups = o->decoder_only ? 1 : 2, .loss = vae_train_loss, .ctx = tr};
    *out = tr;
    return 0;
}

void vae_trainer_free(VaeTrainer *tr) {
    free(tr);
}

/* Running per-channel moments of the packed latents: count, mean and the sum of squared
 * deviations (m2), merged batch by batch (Chan et al.), in double. */
typedef struct VaeMoments {
    int64_t count;
    double *mean, *m2; /* [P] each */
} VaeMoments;

/* x: [rows, P] merged into m: the batch's own mean and m2 in two passes, then combined. */
static void vae_moments_add(VaeMoments *m, const float *x, int64_t rows, int P) {
    for (int k = 0; k < P; k++) {
        double mean = 0.0, m2 = 0.0;
        for (int64_t r = 0; r < rows; r++) mean += x[r * P + k];
        mean /= (double)rows;
        for (int64_t r = 0; r < rows; r++) {
            double d = x[r * P + k] - mean;
            m2 += d * d;
        }
        double n = (double)m->count, total = n + (double)rows, delta = mean - m->mean[k];
        m->mean[k] += delta * (double)rows / total;
        m->m2[k] += m2 + delta * delta * n * (double)rows / total;
    }
    m->count += rows;
}

/* The packed latents [n, h*w, P] of images (before the bn normalisation) into m. */
static int vae_latent_moments(const VaeTrainer *tr, Tensor *images, VaeMoments *m, Error *e) {
    const VaeConfig *c = vae_encoder_config(tr->enc);
    Tape *t = tape_new();
    if (!t) return error_set(e, "out of memory");
    tape_set_grad(t, false);
    Var *latent = vae_encode_moments(t, tr->enc, var_new(t, images, false), NULL);
    Var *packed = latent ? vae_pack(t, c, latent, (int)(latent->value->shape[2] / c->patch_h),
                                    (int)(latent->value->shape[3] / c->patch_w))
                         : NULL;
    int rc = tape_check(t, e);
    if (rc == 0) {
        int64_t P = packed->value->shape[2];
        vae_moments_add(m, packed->value->data, packed->value->numel / P, (int)P);
    }
    tape_free(t);
    return rc;
}

int vae_fit_latent_stats(VaeTrainer *tr, uint64_t seed, int n_images, Error *e) {
    const VaeConfig *c = vae_encoder_config(tr->enc);
    int P = c->latent_channels * c->patch_h * c->patch_w;
    if (n_images < 1) return error_set(e, "latent statistics need at least one image");
    VaeMoments m = {.mean = calloc((size_t)P, sizeof(double)),
                    .m2 = calloc((size_t)P, sizeof(double))};
    float *stats = calloc((size_t)2 * P, sizeof *stats); /* mean, then variance */
    int rc = m.mean && m.m2 && stats ? 0 : error_set(e, "out of memory");
    for (int first = 0; first < n_images; first += tr->o.batch) {
        if (rc) break;
        int n = n_images - first < tr->o.batch ? n_images - first : tr->o.batch;
        Tensor *images = NULL;
        rc = vae_images(tr, seed, (uint64_t)first, n, &images, e) ||
             vae_latent_moments(tr, images, &m, e);
        tensor_free(images);
    }
    if (rc == 0 && m.count < 2) rc = error_set(e, "latent statistics need two latent pixels");
    if (rc == 0) {
        for (int k = 0; k < P; k++) {
            stats[k] = (float)m.mean[k];
            stats[P + k] = (float)(m.m2[k] / (double)(m.count - 1));
        }
        rc = vae_set_latent_stats(tr->enc, tr->dec, stats, stats + P, e);
    }
    free(m.mean);
    free(m.m2);
    free(stats);
    return rc;
}

/* === the VAE's training loss === */

Var *vae_reconstruction_loss(Tape *t, const VaeEncoder *enc, const VaeDecoder *dec, Var *image,
                             Var *noise) {
    int h, w;
    Var *tokens = vae_encode(t, enc, image, &h, &w);
    if (!tokens) return NULL;
    if (noise) tokens = ag_add(t, tokens, noise);
    Var *error = ag_add(t, vae_decode(t, dec, tokens, h, w), ag_scale(t, image, -1.0f));
    return ag_mean(t, ag_mul(t, error, error));
}

/* === the oracle's verdict === */

/* The glyphs of r, when there are as many as prompt has symbols. */
static GlyphCounts oracle_glyph_counts(const OracleResult *r, const char *prompt) {
    GlyphCounts c = {0};
    if (r->count != (int)strlen(prompt)) return c;
    c.n = r->count;
    for (int i = 0; i < r->count; i++) {
        c.legible += r->glyph[i].legible;
        c.right += r->glyph[i].legible &&
                   toupper((unsigned char)r->glyph[i].symbol) == toupper((unsigned char)prompt[i]);
    }
    return c;
}

int metrics_oracle(const uint8_t *baseline, const uint8_t *guided, int H, int W,
                   const char *prompt, ImageMetrics *out, Error *e) {
    OracleResult read[2];
    if (oracle_read(baseline, W, H, &read[0], e) || oracle_read(guided, W, H, &read[1], e))
        return -1;
    for (int k = 0; k < 2; k++) out->glyphs[k] = oracle_glyph_counts(&read[k], prompt);
    out->oracle = true;
    out->baseline_legible = read[0].all_legible;
    out->guided_legible = read[1].all_legible;
    out->baseline_reads = oracle_reads_as(&read[0], prompt);
    out->guided_reads = oracle_reads_as(&read[1], prompt);
    return 0;
}
