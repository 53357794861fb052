/* test_train.c - the training section: AdamW and gradient clipping against torch.optim.AdamW and
 * torch.nn.utils.clip_grad_norm_ (tools/golden_train.py), the learning-rate schedule, params_save
 * round trips, and train_run on a small least-squares fit (the loss falls, runs repeat bit for
 * bit, a NaN loss stops the run). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../nn.h"
#include "../train/train.h"
#include "harness.h"

#define GOLDEN "tests/golden/train.safetensors"

/* loss = sum(x * g): d loss / dx = g exactly. */
static Var *dot_loss(Tape *t, Var *x, const Tensor *g) {
    return ag_sum(t, ag_mul(t, x, var_new(t, (Tensor *)g, false)));
}

static Tensor *golden_tensor(const SafeTensors *g, const char *name, int ndim,
                             const int64_t *shape) {
    Tensor *t = tensor_new(ndim, shape);
    float *data = t ? golden_load(g, name, (size_t)t->numel) : NULL;
    if (data) memcpy(t->data, data, (size_t)t->numel * sizeof(float));
    free(data);
    if (!data) tensor_free(t);
    return data ? t : NULL;
}

/* Four AdamW steps with clipping at 1.0, as the golden file's torch run. */
static void test_adamw_against_torch(void) {
    SafeTensors *g = golden_open(GOLDEN);
    StModel *src = NULL;
    Error e = {{0}};
    if (!g || st_model_open(&src, GOLDEN, &e)) {
        CHECK(0, "open %s: %s", GOLDEN, e.msg);
        st_close(g);
        return;
    }
    Params *p = params_new(src);
    Var *w = p ? params_load(p, &e, SHAPE(3, 5), "w0") : NULL;
    Var *b = p ? params_load(p, &e, SHAPE(5), "b0") : NULL;
    AdamW *opt = NULL;
    AdamWOptions o = {.lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f,
                      .weight_decay = 0.1f};
    ParamAverage *avg = NULL;
    CHECK(w && b && adamw_new(&opt, &p, 1, &o, &e) == 0 &&
              param_average_new(&avg, &p, 1, 0.9f, &e) == 0,
          "params, optimizer and average: %s", e.msg);
    params_set_trainable(p, true);
    for (int step = 0; opt && step < 4; step++) {
        char name[32];
        snprintf(name, sizeof name, "g%d.w", step);
        Tensor *gw = golden_tensor(g, name, SHAPE(3, 5));
        snprintf(name, sizeof name, "g%d.b", step);
        Tensor *gb = golden_tensor(g, name, SHAPE(5));
        if (!gw || !gb) {
            CHECK(0, "golden gradients of step %d", step);
            tensor_free(gw);
            tensor_free(gb);
            break;
        }
        params_zero_grad(&p, 1);
        Tape *t = tape_new();
        Var *loss = ag_add(t, dot_loss(t, w, gw), dot_loss(t, b, gb));
        CHECK(loss && tape_backward(t, loss, &e) == 0, "backward %d: %s", step, e.msg);
        tape_free(t);
        float norm = (float)params_clip_grad_norm(&p, 1, 1.0);
        adamw_step(opt, o.lr);
        snprintf(name, sizeof name, "norm%d", step + 1);
        float *want_norm = golden_load(g, name, 1);
        if (want_norm) check_close(name, &norm, want_norm, 1, 1e-6f, 0.0f);
        free(want_norm);
        snprintf(name, sizeof name, "w%d", step + 1);
        float *want_w = golden_load(g, name, 15);
        if (want_w) check_close(name, w->value->data, want_w, 15, 1e-6f, 1e-7f);
        snprintf(name, sizeof name, "b%d", step + 1);
        float *want_b = golden_load(g, name, 5);
        if (want_b) check_close(name, b->value->data, want_b, 5, 1e-6f, 1e-7f);
        free(want_w);
        free(want_b);
        if (avg) param_average_update(avg);
        snprintf(name, sizeof name, "ema%d.w", step + 1);
        float *want_avg_w = golden_load(g, name, 15);
        snprintf(name, sizeof name, "ema%d.b", step + 1);
        float *want_avg_b = golden_load(g, name, 5);
        if (avg && want_avg_w && want_avg_b) {
            /* the average is only visible through store: keep the weights, store, compare */
            float keep_w[15], keep_b[5];
            memcpy(keep_w, w->value->data, sizeof keep_w);
            memcpy(keep_b, b->value->data, sizeof keep_b);
            param_average_store(avg);
            check_close(name, w->value->data, want_avg_w, 15, 1e-6f, 1e-7f);
            check_close(name, b->value->data, want_avg_b, 5, 1e-6f, 1e-7f);
            memcpy(w->value->data, keep_w, sizeof keep_w);
            memcpy(b->value->data, keep_b, sizeof keep_b);
        }
        free(want_avg_w);
        free(want_avg_b);
        tensor_free(gw);
        tensor_free(gb);
    }
    CHECK(param_average_new(&(ParamAverage *){NULL}, &p, 1, 1.0f, &e) != 0 &&
              strstr(e.msg, "decay"),
          "a decay of 1 is refused: %s", e.msg);
    param_average_free(avg);
    adamw_free(opt);
    params_free(p);
    st_model_close(src);
    st_close(g);
}

static void test_learning_rate(void) {
    TrainOptions o = {.steps = 110, .adamw = {.lr = 1e-3f}, .warmup = 10};
    CHECK(fabs(train_lr(&o, 0) - 1e-4) < 1e-9 && fabs(train_lr(&o, 9) - 1e-3) < 1e-9,
          "linear warm-up to the peak: %g, %g", train_lr(&o, 0), train_lr(&o, 9));
    CHECK(fabs(train_lr(&o, 10) - 1e-3) < 1e-9 && fabs(train_lr(&o, 109) - 1e-4) < 1e-9,
          "cosine from the peak to a tenth: %g, %g", train_lr(&o, 10), train_lr(&o, 109));
    bool falling = true;
    for (int64_t s = 11; s < 110; s++) falling &= train_lr(&o, s) < train_lr(&o, s - 1);
    CHECK(falling, "the cosine part falls at every step");
    TrainOptions one = {.steps = 1, .adamw = {.lr = 2e-3f}};
    CHECK(fabs(train_lr(&one, 0) - 2e-3) < 1e-9, "one step, no warm-up: the peak, %g",
          train_lr(&one, 0));
}

/* A least-squares fit y = x W^T + b to a fixed random linear map, batches from the step. */
typedef struct Fit {
    Linear layer;
    float target[4 * 3], target_bias[4];
    bool poison; /* a NaN loss at step 3 */
} Fit;

static Var *fit_loss(Tape *t, int64_t step, void *ctx, Error *e) {
    (void)e;
    Fit *f = ctx;
    unsigned long long seed = 1000 + (unsigned long long)step;
    Tensor *x = TENSOR_NEW(8, 3), *y = TENSOR_NEW(8, 4);
    if (!x || !y) {
        tensor_free(x);
        tensor_free(y);
        return NULL;
    }
    for (int64_t i = 0; i < x->numel; i++) x->data[i] = harness_rand(&seed);
    for (int r = 0; r < 8; r++)
        for (int o = 0; o < 4; o++) {
            float acc = f->target_bias[o];
            for (int k = 0; k < 3; k++) acc += x->data[r * 3 + k] * f->target[o * 3 + k];
            y->data[r * 4 + o] = f->poison && step == 3 ? NAN : acc;
        }
    Var *diff = ag_add(t, linear_apply(t, &f->layer, var_take(t, x, false)),
                       ag_scale(t, var_take(t, y, false), -1.0f));
    return ag_mean(t, ag_mul(t, diff, diff));
}

typedef struct LossLog {
    double first, last;
    int64_t seen;
} LossLog;

static int log_loss(const TrainStep *s, void *ctx, Error *e) {
    (void)e;
    LossLog *l = ctx;
    if (s->step == 0) l->first = s->loss;
    l->last = s->loss;
    l->seen++;
    return 0;
}

/* The model of a fit run: fresh weights from seed 7, trained `steps` steps. */
static int fit_run(Fit *f, Params **p, int64_t steps, LossLog *log, Error *e) {
    unsigned long long seed = 99;
    for (int i = 0; i < 12; i++) f->target[i] = harness_rand(&seed);
    for (int i = 0; i < 4; i++) f->target_bias[i] = harness_rand(&seed);
    StModel *fresh = NULL;
    int loaded = params_open(p, &fresh, NULL, WEIGHTS_FRESH, 7, e) == 0 &&
                 linear_load(&f->layer, *p, 3, 4, true, "proj", e) == 0;
    st_model_close(fresh);
    if (!loaded) return -1;
    TrainTask task = {.groups = {*p}, .n_groups = 1, .loss = fit_loss, .ctx = f};
    TrainOptions o = {.steps = steps, .adamw = {.lr = 0.05f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f}, .warmup = 2,
                      .clip = 1.0, .on_step = log_loss, .ctx = log};
    return train_run(&task, &o, e);
}

static void test_train_run(void) {
    Fit a = {0}, b = {0};
    Params *pa = NULL, *pb = NULL;
    LossLog la = {0}, lb = {0};
    Error e = {{0}};
    CHECK(fit_run(&a, &pa, 60, &la, &e) == 0 && la.seen == 60, "train 60 steps: %s", e.msg);
    CHECK(la.last < 0.05 * la.first, "the loss falls: %g -> %g", la.first, la.last);
    CHECK(pa && !params_var(pa, 0)->requires_grad, "parameters are frozen again after the run");
    CHECK(fit_run(&b, &pb, 60, &lb, &e) == 0 && lb.last == la.last && pa && pb &&
              !memcmp(params_var(pa, 0)->value->data, params_var(pb, 0)->value->data,
                      12 * sizeof(float)),
          "a second run repeats the first bit for bit: %s", e.msg);
    params_free(pa);
    params_free(pb);
    Fit c = {.poison = true};
    Params *pc = NULL;
    LossLog lc = {0};
    CHECK(fit_run(&c, &pc, 10, &lc, &e) != 0 && strstr(e.msg, "not finite at step 3") &&
              lc.seen == 3,
          "a NaN loss stops the run naming the step: %s", e.msg);
    params_free(pc);
}

/* params_save writes every named entry; a Params over the file reads the same values back. */
static void test_save_round_trip(void) {
    char dir[] = "/tmp/diamond-test-train-XXXXXX", path[256];
    if (!mkdtemp(dir)) return;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    Error e = {{0}};
    Params *p = NULL;
    StModel *fresh = NULL;
    Linear l = {0};
    Var *mean = NULL;
    CHECK(params_open(&p, &fresh, NULL, WEIGHTS_FRESH, 3, &e) == 0 &&
              linear_load(&l, p, 5, 2, true, "layer", &e) == 0 &&
              (mean = params_load_buffer(p, &e, SHAPE(2), "bn.running_mean")) != NULL,
          "fresh params: %s", e.msg);
    st_model_close(fresh);
    if (l.weight) {
        bool bounded = true;
        for (int i = 0; i < 10; i++) bounded &= fabsf(l.weight->value->data[i]) <= 1 / sqrtf(5);
        CHECK(bounded && l.bias->value->data[0] == 0.0f && mean->value->data[1] == 0.0f,
              "fresh init: weights within 1/sqrt(fan_in), biases and running means 0");
    }
    CHECK(p && params_save(p, path, &e) == 0, "params_save: %s", e.msg);
    StModel *m = NULL;
    CHECK(st_model_open(&m, path, &e) == 0 && st_model_count(m) == 3, "reopen: %s", e.msg);
    if (m && l.weight) {
        Params *q = params_new(m);
        Linear k = {0};
        CHECK(q && linear_load(&k, q, 5, 2, true, "layer", &e) == 0 &&
                  !memcmp(k.weight->value->data, l.weight->value->data, 10 * sizeof(float)),
              "the saved weights load back bit for bit: %s", e.msg);
        params_free(q);
    }
    st_model_close(m);
    params_free(p);
    unlink(path);
    rmdir(dir);
}

int main(void) {
    test_adamw_against_torch();
    test_learning_rate();
    test_train_run();
    test_save_round_trip();
    return harness_finish("test_train");
}
