/* test_vae_encoder.c - the FLUX.2 VAE encoder against tools/ref_vae.py (float64 torch, stored
 * f32): moments, packed tokens and d loss / d image; the reconstruction loss with d loss / d image
 * and d loss / d every parameter of both halves; finite differences; a missing encoder. Then VAE
 * training on world images: the loss falls, latent statistics, save and load back. */
#include <stdlib.h>
#include <unistd.h>

#include "../nn.h"
#include "../train/train.h"
#include "harness.h"

#define FIXTURE "tests/fixtures/tiny-flux2/vae"
#define GOLDEN "tests/golden/vae_encoder.safetensors"

/* As test_vae.c: ~20 f32 convolutions, group norms and a softmax against float64, so relative
 * errors of a few 1e-6; 1e-4 relative plus 1e-4 of the largest value. Parameter gradients sum
 * over every pixel and batch entry (up to ~10^4 terms), hence the same bound on their largest. */
#define RTOL 1e-4f
/* torch.optim.AdamW's betas and eps, weight decay 0.01, at learning rate `rate` */
#define ADAMW(rate) {.lr = (rate), .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.01f}

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    return m;
}

static void compare(const char *what, const float *got, const float *want, size_t n) {
    check_close(what, got, want, n, RTOL, RTOL * max_abs(want, n));
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

/* ---- the encoder alone ---- */

/* moments and tokens of a [2, 3, 16, 24] image, and d (sum(tokens * r) + sum(logvar * s)) /
 * d image, through vae_encode and vae_encode_moments on one tape. */
static void test_encoder_golden(const VaeEncoder *m, const SafeTensors *st) {
    const VaeConfig *c = vae_encoder_config(m);
    int L = c->latent_channels, packed = L * c->patch_h * c->patch_w;
    Tensor *image = golden_tensor(st, "enc.image", SHAPE(2, 3, 16, 24));
    Tensor *r = golden_tensor(st, "enc.r", SHAPE(2, 6, packed));
    Tensor *s = golden_tensor(st, "enc.s", SHAPE(2, L, 4, 6));
    Tensor *mean = golden_tensor(st, "enc.mean", SHAPE(2, L, 4, 6));
    Tensor *logvar = golden_tensor(st, "enc.logvar", SHAPE(2, L, 4, 6));
    Tensor *tokens = golden_tensor(st, "enc.tokens", SHAPE(2, 6, packed));
    Tensor *grad = golden_tensor(st, "enc.grad", SHAPE(2, 3, 16, 24));
    if (!image || !r || !s || !mean || !logvar || !tokens || !grad) goto done;
    Tape *t = tape_new();
    Var *x = var_new(t, image, true), *lv = NULL;
    Var *mu = vae_encode_moments(t, m, x, &lv);
    int h = 0, w = 0;
    Var *tok = vae_encode(t, m, x, &h, &w);
    var_keep(mu);
    var_keep(lv);
    var_keep(tok);
    Var *loss = ag_add(t, ag_sum(t, ag_mul(t, tok, var_new(t, r, false))),
                       ag_sum(t, ag_mul(t, lv, var_new(t, s, false))));
    Error e = {{0}};
    int rc = tape_check(t, &e) || tape_backward(t, loss, &e);
    CHECK(rc == 0, "encode + backward: %s", e.msg);
    if (rc == 0) {
        CHECK(h == 2 && w == 3, "a 16 x 24 image is a 2 x 3 token grid (got %d x %d)", h, w);
        compare("encoder mean [2, 4, 4, 6]", mu->value->data, mean->data, (size_t)mean->numel);
        compare("encoder logvar", lv->value->data, logvar->data, (size_t)logvar->numel);
        compare("packed tokens [2, 6, 16]", tok->value->data, tokens->data,
                (size_t)tokens->numel);
        compare("d loss / d image", x->grad->data, grad->data, (size_t)grad->numel);
    }
    tape_free(t);
done:
    tensor_free(image);
    tensor_free(r);
    tensor_free(s);
    tensor_free(mean);
    tensor_free(logvar);
    tensor_free(tokens);
    tensor_free(grad);
}

/* ---- the reconstruction loss through both halves ---- */

/* Every parameter of p (not buffers) has golden gradient "ae.grad.<name>": compare them all. */
static void compare_param_grads(const Params *p, const SafeTensors *st, const char *what) {
    int compared = 0, missing = 0;
    double worst = 0.0;
    for (int i = 0; i < params_count(p); i++) {
        if (params_is_buffer(p, i)) continue;
        Var *v = params_var(p, i);
        char key[256];
        snprintf(key, sizeof key, "ae.grad.%s", params_name(p, i));
        float *want = golden_load(st, key, (size_t)v->value->numel);
        if (!want || !v->grad) {
            missing++;
            free(want);
            continue;
        }
        size_t n = (size_t)v->value->numel;
        /* the floor is for to_k.bias, whose exact gradient is 0 (softmax ignores a constant
         * added to every key's score): f32 leaves ~1e-8 of cancelling terms there */
        float atol = RTOL * max_abs(want, n) + 1e-7f;
        int ok = 1;
        for (size_t k = 0; k < n; k++) {
            double diff = fabs((double)v->grad->data[k] - want[k]);
            if (!(diff <= atol + RTOL * fabs(want[k]))) ok = 0;
            if (diff > worst) worst = diff;
        }
        if (!ok) check_close(key, v->grad->data, want, n, RTOL, atol);
        compared += ok;
        free(want);
    }
    CHECK(missing == 0 && compared > 10,
          "%s: d loss / d parameter of %d tensors within rtol %g + %g * max + 1e-7 (max |diff|"
          " %.3g),"
          " %d without a gradient or golden", what, compared, RTOL, RTOL, worst, missing);
}

static void zero_grads(const Params *p) {
    for (int i = 0; i < params_count(p); i++) var_zero_grad(params_var(p, i));
}

/* mean((decode(encode(x)) - x)^2) for a [2, 3, 16, 8] image: the loss, d loss / d image and
 * d loss / d every parameter, with the decoder's checkpoints on and off (bit for bit equal). */
static void test_reconstruction_golden(VaeEncoder *enc, VaeDecoder *dec, const SafeTensors *st) {
    Tensor *image = golden_tensor(st, "ae.image", SHAPE(2, 3, 16, 8));
    Tensor *loss_want = golden_tensor(st, "ae.loss", SHAPE(1));
    Tensor *grad = golden_tensor(st, "ae.grad", SHAPE(2, 3, 16, 8));
    if (!image || !loss_want || !grad) goto done;
    Params *pe = vae_encoder_params(enc), *pd = vae_decoder_params(dec);
    params_set_trainable(pe, true);
    params_set_trainable(pd, true);
    Tensor *first = NULL;
    for (int checkpoint = 1; checkpoint >= 0; checkpoint--) {
        vae_decoder_set_checkpoint_levels(dec, checkpoint ? VAE_CHECKPOINT_LEVELS : 0);
        zero_grads(pe);
        zero_grads(pd);
        Tape *t = tape_new();
        Var *x = var_new(t, image, true);
        Var *loss = vae_reconstruction_loss(t, enc, dec, x, NULL);
        Error e = {{0}};
        int rc = tape_check(t, &e) || tape_backward(t, loss, &e);
        CHECK(rc == 0, "reconstruction loss + backward (checkpoint %d): %s", checkpoint, e.msg);
        if (rc == 0 && checkpoint) {
            compare("reconstruction loss", loss->value->data, loss_want->data, 1);
            compare("reconstruction d loss / d image", x->grad->data, grad->data,
                    (size_t)grad->numel);
            compare_param_grads(pe, st, "encoder");
            compare_param_grads(pd, st, "decoder");
            first = tensor_clone(params_var(pd, 3)->grad);
        } else if (rc == 0 && first) {
            const Tensor *again = params_var(pd, 3)->grad;
            CHECK(!memcmp(first->data, again->data, (size_t)first->numel * sizeof(float)),
                  "decoder parameter gradients are the same with and without checkpoints");
        }
        tape_free(t);
    }
    tensor_free(first);
    vae_decoder_set_checkpoint_levels(dec, VAE_CHECKPOINT_LEVELS);
    params_set_trainable(pe, false);
    params_set_trainable(pd, false);
done:
    tensor_free(image);
    tensor_free(loss_want);
    tensor_free(grad);
}

/* ---- finite differences ---- */

typedef struct FdCase {
    const VaeEncoder *enc;
    const VaeDecoder *dec;
    Tensor *image;
} FdCase;

static double fd_loss(void *ctx) {
    FdCase *c = ctx;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    Var *loss = vae_reconstruction_loss(t, c->enc, c->dec, var_new(t, c->image, false), NULL);
    double value = loss ? loss->value->data[0] : NAN;
    tape_free(t);
    return value;
}

static Var *param_named(const Params *p, const char *name) {
    for (int i = 0; i < params_count(p); i++)
        if (!strcmp(params_name(p, i), name)) return params_var(p, i);
    return NULL;
}

/* The analytic gradients of the reconstruction loss against central differences: the image
 * and a few parameters of each half (a conv, the stride-2 downsampler, a group norm, the
 * attention). */
static void test_finite_differences(VaeEncoder *enc, VaeDecoder *dec) {
    FdCase fd = {.enc = enc, .dec = dec, .image = TENSOR_NEW(1, 3, 8, 16)};
    unsigned long long seed = 11;
    for (int64_t i = 0; i < fd.image->numel; i++) fd.image->data[i] = harness_rand(&seed);
    Params *pe = vae_encoder_params(enc), *pd = vae_decoder_params(dec);
    params_set_trainable(pe, true);
    params_set_trainable(pd, true);
    zero_grads(pe);
    zero_grads(pd);
    Tape *t = tape_new();
    Var *x = var_new(t, fd.image, true);
    Error e = {{0}};
    int rc = tape_backward(t, vae_reconstruction_loss(t, enc, dec, x, NULL), &e);
    CHECK(rc == 0, "reconstruction loss for finite differences: %s", e.msg);
    /* Central differences over f32 passes with eps 1e-2 (smaller steps drown in the f32
     * rounding of the loss): measured, the worst point differs by 0.55% (post_quant_conv, where
     * the loss curves most), most by under 0.1%; the test allows 1% plus 1e-3 of the largest
     * gradient. A wrong formula (a missing term, a swapped pad side) is off by far more. */
    if (rc == 0) {
        size_t n = (size_t)x->grad->numel;
        check_gradient("d loss / d image", fd_loss, &fd, fd.image->data, x->grad->data, n, 7,
                       1e-2f, 1e-2f, 1e-3f * max_abs(x->grad->data, n));
    }
    const char *names[] = {
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.norm1.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "quant_conv.bias",
        "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "post_quant_conv.weight",
    };
    for (size_t k = 0; rc == 0 && k < sizeof names / sizeof *names; k++) {
        Var *v = param_named(pe, names[k]);
        if (!v) v = param_named(pd, names[k]);
        CHECK(v && v->grad, "parameter %s has a gradient", names[k]);
        if (!v || !v->grad) continue;
        size_t n = (size_t)v->value->numel;
        char what[160];
        snprintf(what, sizeof what, "d loss / d %s", names[k]);
        check_gradient(what, fd_loss, &fd, v->value->data, v->grad->data, n,
                       n > 40 ? n / 20 : 1, 1e-2f, 1e-2f, 1e-3f * max_abs(v->grad->data, n));
    }
    tape_free(t);
    params_set_trainable(pe, false);
    params_set_trainable(pd, false);
    tensor_free(fd.image);
}

/* ---- training ---- */

#define TRAIN_CONFIG "weights/vae"

/* The mean reconstruction loss over the training images of stream seed, batches 0 .. n-1 of a
 * trainer with that seed (no gradient). */
static double held_out_loss(VaeEncoder *enc, VaeDecoder *dec, const VaeTrainOptions *o,
                            uint64_t seed, int n) {
    VaeTrainOptions held = *o;
    held.seed = seed;
    TrainTask task;
    VaeTrainer *tr = NULL;
    Error e = {{0}};
    double total = 0.0;
    if (vae_train_task(&task, &tr, enc, dec, &held, &e)) return NAN;
    for (int b = 0; b < n; b++) {
        Tensor *images = NULL;
        Tape *t = tape_new();
        tape_set_grad(t, false);
        Var *loss = vae_batch(tr, b, &images, &e) == 0
                        ? vae_reconstruction_loss(t, enc, dec, var_take(t, images, false), NULL)
                        : NULL;
        total += loss ? loss->value->data[0] : NAN;
        tape_free(t);
    }
    vae_trainer_free(tr);
    return total / n;
}

/* Per packed channel, the mean and variance of vae_encode's tokens for the images of stream
 * seed: after vae_fit_latent_stats on those same images, 0 and var / (var + batch_norm_eps) (the
 * eps keeps a barely trained encoder's small variances below 1) up to f32 rounding. */
static void check_normalised(VaeEncoder *enc, VaeDecoder *dec, const VaeTrainOptions *o,
                             uint64_t seed, int n) {
    VaeTrainOptions same = *o;
    same.seed = seed;
    same.batch = n;
    TrainTask task;
    VaeTrainer *tr = NULL;
    Error e = {{0}};
    Tensor *images = NULL;
    Tape *t = tape_new();
    tape_set_grad(t, false);
    int h = 0, w = 0;
    Var *tokens = NULL;
    if (vae_train_task(&task, &tr, enc, dec, &same, &e) == 0 && vae_batch(tr, 0, &images, &e) == 0)
        tokens = vae_encode(t, enc, var_take(t, images, false), &h, &w);
    CHECK(tokens != NULL, "encode the statistics' images: %s", e.msg);
    if (tokens) {
        int64_t P = tokens->value->shape[2], rows = tokens->value->numel / P;
        const Var *bn_var = param_named(vae_encoder_params(enc), "bn.running_var");
        float eps = vae_encoder_config(enc)->batch_norm_eps;
        double worst_mean = 0.0, worst_var = 0.0;
        for (int64_t k = 0; k < P; k++) {
            double sum = 0.0, sum_sq = 0.0;
            for (int64_t r = 0; r < rows; r++) sum += tokens->value->data[r * P + k];
            double mean = sum / (double)rows;
            for (int64_t r = 0; r < rows; r++) {
                double d = tokens->value->data[r * P + k] - mean;
                sum_sq += d * d;
            }
            double var = sum_sq / (double)(rows - 1);
            worst_mean = fmax(worst_mean, fabs(mean));
            double v = bn_var->value->data[k];
            worst_var = fmax(worst_var, fabs(var - v / (v + eps)));
        }
        CHECK(worst_mean < 1e-4 && worst_var < 1e-4,
              "after vae_fit_latent_stats the tokens have mean 0 (worst %.2g) and variance"
              " var / (var + eps) (worst diff %.2g) per packed channel", worst_mean, worst_var);
    }
    tape_free(t);
    vae_trainer_free(tr);
}

/* What vae_save writes, vae_encoder_open and vae_decoder_open read back: the same loss. */
static void check_save_round_trip(VaeEncoder *enc, VaeDecoder *dec, const VaeTrainOptions *o) {
    char dir[] = "/tmp/diamond-test-vae-save-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp %s", dir);
    Error e = {{0}};
    VaeEncoder *enc2 = NULL;
    VaeDecoder *dec2 = NULL;
    int rc = vae_save(enc, dec, TRAIN_CONFIG, dir, &e) ||
             vae_encoder_open(&enc2, dir, WEIGHTS_FILES, 0, &e) ||
             vae_decoder_open(&dec2, dir, WEIGHTS_FILES, 0, &e);
    CHECK(rc == 0, "vae_save, then load both halves back: %s", e.msg);
    if (rc == 0) {
        double a = held_out_loss(enc, dec, o, 99, 1), b = held_out_loss(enc2, dec2, o, 99, 1);
        CHECK(a == b, "the saved VAE gives the same loss bit for bit (%.9g, %.9g)", a, b);
        const Params *p = vae_encoder_params(enc2);
        int buffers = 0;
        for (int i = 0; i < params_count(p); i++) buffers += params_is_buffer(p, i);
        CHECK(buffers == 2, "bn.running_mean and bn.running_var are read as buffers");
    }
    vae_encoder_free(enc2);
    vae_decoder_free(dec2);
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    unlink(path);
    rmdir(dir);
}

/* Both halves with fresh weights (seeds 1 and 2) in the shipped config. */
static int fresh_vae(VaeEncoder **enc, VaeDecoder **dec, Error *e) {
    return vae_encoder_open(enc, TRAIN_CONFIG, WEIGHTS_FRESH, 1, e) ||
           vae_decoder_open(dec, TRAIN_CONFIG, WEIGHTS_FRESH, 2, e);
}

/* 20 AdamW steps on world images from fresh weights in the shipped config: the loss on
 * held-out world images falls; then the latent statistics and the saved directory. */
static void test_training(void) {
    VaeEncoder *enc = NULL;
    VaeDecoder *dec = NULL;
    Error e = {{0}};
    int rc = fresh_vae(&enc, &dec, &e);
    CHECK(rc == 0, "fresh VAE from %s: %s", TRAIN_CONFIG, e.msg);
    const VaeTrainOptions o = {.batch = 4, .height = 32, .width = 64, .seed = 5,
                               .image = vae_world_image};
    TrainTask task;
    VaeTrainer *tr = NULL;
    if (rc == 0) rc = vae_train_task(&task, &tr, enc, dec, &o, &e);
    CHECK(rc == 0, "vae_train_task: %s", e.msg);
    if (rc) goto done;
    double before = held_out_loss(enc, dec, &o, 1000, 2);
    const TrainOptions to = {.steps = 20, .adamw = ADAMW(5e-3f),
                             .warmup = 2, .clip = 1.0};
    rc = train_run(&task, &to, &e);
    CHECK(rc == 0, "20 training steps: %s", e.msg);
    double after = held_out_loss(enc, dec, &o, 1000, 2);
    /* measured: 0.577 -> 0.431; a gradient with a wrong sign or none leaves it where it was */
    CHECK(after < 0.85 * before, "held-out reconstruction loss falls by 15%%: %.4f -> %.4f",
          before, after);
    CHECK(vae_fit_latent_stats(tr, 77, 12, &e) == 0, "vae_fit_latent_stats: %s", e.msg);
    check_normalised(enc, dec, &o, 77, 12);
    check_save_round_trip(enc, dec, &o);
done:
    vae_trainer_free(tr);
    vae_encoder_free(enc);
    vae_decoder_free(dec);
}

/* decoder_only: the decoder's weights move, the encoder's (the latent space) do not. */
static void test_decoder_only(void) {
    VaeEncoder *enc = NULL;
    VaeDecoder *dec = NULL;
    Error e = {{0}};
    TrainTask task;
    VaeTrainer *tr = NULL;
    const VaeTrainOptions o = {.batch = 2, .height = 32, .width = 64, .seed = 9,
                               .image = vae_world_image, .decoder_only = true};
    int rc = fresh_vae(&enc, &dec, &e) || vae_train_task(&task, &tr, enc, dec, &o, &e);
    CHECK(rc == 0 && task.n_groups == 1 && task.groups[0] == vae_decoder_params(dec),
          "a decoder-only task trains the decoder's parameters alone: %s", e.msg);
    Params *pe = enc ? vae_encoder_params(enc) : NULL, *pd = dec ? vae_decoder_params(dec) : NULL;
    int ie = 0, id = 0; /* the first parameter (not a buffer) of each */
    while (pe && ie < params_count(pe) && params_is_buffer(pe, ie)) ie++;
    while (pd && id < params_count(pd) && params_is_buffer(pd, id)) id++;
    Tensor *enc_before = rc == 0 ? tensor_clone(params_var(pe, ie)->value) : NULL;
    Tensor *dec_before = rc == 0 ? tensor_clone(params_var(pd, id)->value) : NULL;
    const TrainOptions to = {.steps = 2, .adamw = ADAMW(5e-3f)};
    if (rc == 0 && enc_before && dec_before) {
        rc = train_run(&task, &to, &e);
        size_t ne = (size_t)enc_before->numel, nd = (size_t)dec_before->numel;
        CHECK(rc == 0 && !memcmp(enc_before->data, params_var(pe, ie)->value->data, ne * 4) &&
                  memcmp(dec_before->data, params_var(pd, id)->value->data, nd * 4) != 0,
              "after 2 steps the encoder is unchanged and the decoder is not: %s", e.msg);
    }
    tensor_free(enc_before);
    tensor_free(dec_before);
    vae_trainer_free(tr);
    vae_encoder_free(enc);
    vae_decoder_free(dec);
}

/* The loss of batch 0 of a decoder-only task with latent_noise `noise` (NAN on failure). */
static double noisy_loss(VaeEncoder *enc, VaeDecoder *dec, float noise) {
    Error e = {{0}};
    TrainTask task;
    VaeTrainer *tr = NULL;
    const VaeTrainOptions o = {.batch = 2, .height = 32, .width = 64, .seed = 9,
                               .image = vae_world_image, .decoder_only = true,
                               .latent_noise = noise};
    double loss = NAN;
    Tape *t = tape_new();
    if (t && vae_train_task(&task, &tr, enc, dec, &o, &e) == 0) {
        Var *l = task.loss(t, 0, task.ctx, &e);
        if (l) loss = l->value->data[0];
    }
    CHECK(!isnan(loss), "loss with latent noise %g: %s", noise, e.msg);
    tape_free(t);
    vae_trainer_free(tr);
    return loss;
}

/* latent_noise: the tokens get noise before decoding (another loss), the same on every run. */
static void test_latent_noise(void) {
    VaeEncoder *enc = NULL;
    VaeDecoder *dec = NULL;
    Error e = {{0}};
    int rc = fresh_vae(&enc, &dec, &e);
    CHECK(rc == 0, "fresh VAE: %s", e.msg);
    if (rc == 0) {
        double clean = noisy_loss(enc, dec, 0.0f), noisy = noisy_loss(enc, dec, 0.5f),
               again = noisy_loss(enc, dec, 0.5f);
        printf("  decoder-only loss: clean latents %.6f, noise 0.5 %.6f\n", clean, noisy);
        CHECK(noisy != clean && noisy == again,
              "noise changes the loss (%.9g vs %.9g) and repeats (%.9g)", noisy, clean, again);
    }
    vae_encoder_free(enc);
    vae_decoder_free(dec);
}

/* An encoder needs its own tensors: a decoder-only directory is refused with the first missing
 * one named. */
static void test_encoder_missing(void) {
    VaeEncoder *m = NULL;
    Error e = {{0}};
    CHECK(vae_encoder_open(&m, "tests/fixtures/tiny-flux2-bf16/vae", WEIGHTS_FILES, 0, &e) != 0 &&
              !m && strstr(e.msg, "encoder.conv_in.weight"),
          "a decoder-only directory names the missing encoder tensor: %s", e.msg);
}

int main(void) {
    SafeTensors *st = golden_open(GOLDEN);
    VaeEncoder *enc = NULL;
    VaeDecoder *dec = NULL;
    Error e = {{0}};
    CHECK(vae_encoder_open(&enc, FIXTURE, WEIGHTS_FILES, 0, &e) == 0, "load the encoder of %s: %s",
          FIXTURE, e.msg);
    CHECK(vae_decoder_open(&dec, FIXTURE, WEIGHTS_FILES, 0, &e) == 0, "load the decoder of %s: %s",
          FIXTURE, e.msg);
    if (enc && dec && st) {
        test_encoder_golden(enc, st);
        test_reconstruction_golden(enc, dec, st);
        test_finite_differences(enc, dec);
    }
    test_encoder_missing();
    test_training();
    test_decoder_only();
    test_latent_noise();
    vae_encoder_free(enc);
    vae_decoder_free(dec);
    if (st) st_close(st);
    return harness_finish("test_vae_encoder");
}
