/* train/train.h - making the embedded models: AdamW and the training loop, and the trainers of
 * the text encoder + transformer, the detector and the VAE, all fed by the words world; and the
 * oracle's verdict on an evaluation's image pairs. Nothing on the reference path (sampling,
 * evaluation of a real model) needs this file. */
#ifndef DIAMOND_TRAIN_TRAIN_H
#define DIAMOND_TRAIN_TRAIN_H

#include "../nn.h"
#include "world.h"

/* How the embedded models are sampled, in the demo, the README's eval table and the detector's
 * labelled samples: 16 steps; no shift of the sigma schedule (FLUX.2's empirical mu, made for
 * thousands of tokens, leaves the last sigma near 0.3 at the embedded models' 32 tokens);
 * classifier-free guidance on the empty prompt. */
#define EMBEDDED_STEPS 16
#define EMBEDDED_MU 0.0
#define EMBEDDED_CFG 4.0f

/* === the VAE encoder (train/vae_encoder.c) ===
 * The encoder half of AutoencoderKLFlux2, with the FLUX.2 pipeline's latent packing behind it:
 * an image in [-1, 1] in, normalised transformer tokens out (what vae_decode takes). It reads the
 * same directory as the decoder (the encoder.*, quant_conv.* and bn.* tensors). No checkpoints:
 * it runs on the small images of training, where memory is no concern. */
typedef struct VaeEncoder VaeEncoder;

/* As vae_decoder_open. */
int vae_encoder_open(VaeEncoder **out, const char *dir, WeightSource source, uint64_t seed,
                     Error *e);
void vae_encoder_free(VaeEncoder *m);
const VaeConfig *vae_encoder_config(const VaeEncoder *m);
/* The pixels of the encoder's image one latent token covers (its down blocks, as
 * vae_decoder_token_size). */
void vae_encoder_token_size(const VaeEncoder *m, int *rows, int *cols);
/* Its weights: bn.running_mean and bn.running_var as buffers, the rest as parameters. */
Params *vae_encoder_params(const VaeEncoder *m);
/* image: [B, in_channels, H, W], H and W multiples of 2^(n_down_blocks-1) -> the mean of the
 * latent distribution (its mode), [B, latent_channels, H/2^(n-1), W/2^(n-1)]; *logvar (when not
 * NULL) gets its log-variance clamped to [-30, 20], as diffusers' DiagonalGaussianDistribution. */
Var *vae_encode_moments(Tape *t, const VaeEncoder *m, Var *image, Var **logvar);
/* image: [B, in_channels, H, W] -> tokens [B, h*w, latent_channels*patch_h*patch_w], the
 * pipeline's patchified, bn-normalised, packed latent (*h, *w: the token grid); vae_decode
 * inverts the packing. H and W must be multiples of patch * 2^(n_down_blocks-1). */
Var *vae_encode(Tape *t, const VaeEncoder *m, Var *image, int *h, int *w);
/* New latent statistics, [latent_channels*patch_h*patch_w] each, into bn.running_mean and
 * bn.running_var of both halves (either may be NULL), and into what they derive from them. */
int vae_set_latent_stats(VaeEncoder *enc, VaeDecoder *dec, const float *mean, const float *var,
                         Error *e);

/* latent [B, C, h*ph, w*pw] -> tokens [B, h*w, C*ph*pw], vae_decode's unpacking inverse before the
 * normalisation: pixel (y*ph + pi, x*pw + pj) of channel c is packed channel c*ph*pw + pi*pw + pj
 * of token (y, x). */
Var *vae_pack(Tape *t, const VaeConfig *c, Var *latent, int h, int w);

/* === training ===
 * Training the tiny models diamond ships: AdamW over the parameters of one or more Params,
 * gradient clipping, a warm-up + cosine learning rate, and a loop over a model's TrainTask. */

/* torch.optim.AdamW's settings (its defaults: 1e-3, 0.9, 0.999, 1e-8, 1e-2). */
typedef struct AdamWOptions {
    float lr, beta1, beta2, eps, weight_decay;
} AdamWOptions;

typedef struct AdamW AdamW;

/* Moments for every parameter (not buffers) of groups[0 .. n_groups-1]. */
int adamw_new(AdamW **out, Params *const *groups, int n_groups, const AdamWOptions *o, Error *e);
void adamw_free(AdamW *a);
/* One torch.optim.AdamW step at learning rate lr for every parameter that has a gradient. As in
 * torch with zero_grad(set_to_none=False), a parameter the loss once reached keeps a (zeroed)
 * gradient and is updated on every later step; one never reached is left alone. The weight
 * decay applies to tensors of two or more dims only (matrices, kernels, embeddings), as the usual
 * parameter groups do; biases and norm weights get none. */
void adamw_step(AdamW *a, float lr);

/* An exponential moving average of every parameter (not buffers) of groups, as
 * torch.optim.swa_utils.AveragedModel with avg_fn(avg, p) = decay avg + (1 - decay) p: the first
 * update copies the parameters, each later one mixes them in. Diffusion trainers sample from such
 * an average: it smooths out the last steps' noise. */
typedef struct ParamAverage ParamAverage;
int param_average_new(ParamAverage **out, Params *const *groups, int n_groups, float decay,
                      Error *e);
void param_average_free(ParamAverage *a);
void param_average_update(ParamAverage *a);
/* The average into the parameters themselves (nothing when no update happened). */
void param_average_store(const ParamAverage *a);

void params_zero_grad(Params *const *groups, int n_groups);
/* torch.nn.utils.clip_grad_norm_: the 2-norm of every parameter gradient together; when above
 * max_norm, every gradient is scaled by max_norm / (norm + 1e-6). Returns the norm before. */
double params_clip_grad_norm(Params *const *groups, int n_groups, double max_norm);

#define TRAIN_MAX_GROUPS 4

/* What a trainer trains: its parameter groups, and the loss of batch `step` built on t; the batch
 * must depend only on the step and the task's own seed, so runs repeat exactly. */
typedef struct TrainTask {
    Params *groups[TRAIN_MAX_GROUPS];
    int n_groups;
    Var *(*loss)(Tape *t, int64_t step, void *ctx, Error *e);
    void *ctx;
} TrainTask;

/* What one step did, for progress and logs. */
typedef struct TrainStep {
    int64_t step, steps;
    double loss, grad_norm, lr;
} TrainStep;

typedef struct TrainOptions {
    int64_t steps;
    AdamWOptions adamw;   /* adamw.lr is the peak learning rate */
    int64_t warmup;       /* linear warm-up over this many steps, then cosine decay to lr / 10 */
    double clip;          /* the largest gradient norm; 0: no clipping */
    float ema;            /* > 0: the parameters end as their moving average (ParamAverage) of
                             this decay over the steps, e.g. 0.999; 0: as the last step left them */
    /* sees every step (may be NULL); returns 0 to go on, -1 (with e set) to stop */
    int (*on_step)(const TrainStep *s, void *ctx, Error *e);
    void *ctx;
} TrainOptions;

/* The learning rate of step (0-based) under o's schedule. */
double train_lr(const TrainOptions *o, int64_t step);
/* o->steps steps of: zero the gradients, the loss on a fresh tape, backward, clip, AdamW. A
 * loss that is not finite stops the run with an error naming the step. */
int train_run(const TrainTask *task, const TrainOptions *o, Error *e);

/* === text+flow training ===
 * The transformer (resident) and the text encoder trained together on the rectified-flow loss:
 * x_t = (1 - sigma) x0 + sigma n, target v = n - x0 (x0 = x_t - sigma v, as the sampler steps),
 * MSE(flux2(x_t, sigma, text_encode(prompt)), v); sigma = sigmoid(mean + std N(0, 1)), the
 * logit-normal of SD3 / FLUX trainers (mean 0, std 1). */

#define FLOW_PROMPT_MAX 64

/* The data of batch `step`: batch prompts (NUL-terminated) and their clean latent tokens
 * x0: [batch, h*w, in_channels] (the VAE encoder's packed tokens of each prompt's image). Must
 * depend only on step and the source's own state fixed in advance, so that runs repeat. */
typedef int (*FlowBatchFn)(int64_t step, int batch, char (*prompts)[FLOW_PROMPT_MAX], float *x0,
                           void *ctx, Error *e);

typedef struct FlowTrainOptions {
    int batch;
    int h, w;                      /* the latent token grid */
    uint64_t seed;                 /* of the noise and the sigmas */
    double logit_mean, logit_std;  /* sigma's logit-normal */
    double uncond;                 /* the share of samples whose prompt is dropped (made empty),
                                      so the model also learns the unconditional velocity that
                                      classifier-free guidance needs; drawn from (seed, step, b) */
    FlowBatchFn data;
    void *data_ctx;
} FlowTrainOptions;

typedef struct FlowTrainer FlowTrainer;

/* A TrainTask over both models' parameters whose loss is the rectified-flow MSE
 * of batch `step`. flow must be resident and text's hidden_size its joint_attention_dim. *out
 * holds the batch buffers; free it after training. */
int flow_train_task(TrainTask *task, FlowTrainer **out, Flux2 *flow, TextEncoder *text,
                    const FlowTrainOptions *o, Error *e);
void flow_trainer_free(FlowTrainer *f);
/* Step `step`'s noise n: [batch, per_sample] (torch.randn from a generator seeded by a hash of
 * seed and step) and then sigma: [batch], as the loss draws them. */
void flow_noise(uint64_t seed, int64_t step, int batch, int64_t per_sample, double logit_mean,
                double logit_std, float *noise, float *sigma);
/* Whether sample b of batch `step` trains with the empty prompt: a hash of (seed, step, b) below
 * uncond of its range. */
bool flow_drops_prompt(uint64_t seed, int64_t step, int b, double uncond);

/* The words world as a FlowBatchFn: sample b of batch `step` is the world scene
 * vae_image_index(seed, step * batch + b) (a drawn word), its word the prompt and its image's VAE
 * tokens the clean latent x0 (the encoder run without gradients). */
typedef struct FlowWorld {
    const VaeEncoder *vae;
    uint64_t seed;
    int h, w, channels; /* the token grid and width x0 holds: the VAE's must match */
} FlowWorld;
int flow_world_batch(int64_t step, int batch, char (*prompts)[FLOW_PROMPT_MAX], float *x0,
                     void *ctx, Error *e);

/* === detector training ===
 * Training the detector (opened WEIGHTS_FRESH) as DiffDoctor trained theirs: a per-pixel
 * target at the map's resolution and binary cross-entropy on the logits. A batch holds clean
 * renders (all-zero target), then as many corrupted ones, each made from (seed, step, index)
 * alone. The target of a map cell is 1 when any pixel it covers is corrupted
 * (max-pooling the exact pixel mask): the detector's decision is "map max >= 0.5", and a thin
 * broken stroke covers a few pixels of a cell, so an average-pooled target would teach the map to
 * stay below 0.5 over most artifacts. */

/* An example of the words world from seed alone: a random scene, rendered clean or damaged by
 * world_corrupt. rgb: [WORLD_H, WORLD_W, 3], mask: [WORLD_H, WORLD_W], 1 on every corrupted
 * pixel (and its edge, see world_corrupt), all 0 when !corrupt. */
int detector_example(uint64_t seed, bool corrupt, uint8_t *rgb, uint8_t *mask, Error *e);
/* mask: [H, W] -> target: [h, w], 1 where any pixel of the cell is masked; H, W must be
 * multiples of h, w. */
int detector_target(const uint8_t *mask, int H, int W, int h, int w, float *target, Error *e);
/* The mean over cells of torch's BCEWithLogitsLoss with pos_weight: pos_weight y softplus(-z) +
 * (1 - y) softplus(z), as -(pos_weight y log sigmoid(z) + (1 - y) log sigmoid(-z)); where a
 * sigmoid underflows (|z| > 87) the log is held at log(FLT_MIN), as torch's BCELoss clamps it.
 * logits, target (constant): [B, L, h, w] -> [1] */
Var *detector_bce_loss(Tape *t, Var *logits, Var *target, float pos_weight);

/* The flow model's own images labelled by the oracle, as DiffDoctor labelled real generations
 * by hand: detector data that shows what the flow model gets wrong. */
typedef struct DetectorSamples {
    int n;
    char (*words)[WORLD_WORD_MAX + 1]; /* [n] the prompts */
    uint8_t *rgb;                      /* [n, WORLD_H, WORLD_W, 3] */
    uint8_t *mask;                     /* [n, WORLD_H, WORLD_W] oracle_artifact_mask */
    int flagged;                       /* images with an illegible glyph */
} DetectorSamples;

/* How the samples are made: n words drawn from seed (world_scene's) skipping those in exclude,
 * each sampled from its own seeded noise as the sampler's options say (o->guide must be false),
 * batch images at a time. */
typedef struct DetectorSampleOptions {
    int n, batch;
    uint64_t seed;
    SamplerOptions sampler;
    const char *const *exclude; /* prompts never drawn (an evaluation's), case-insensitive */
    int n_exclude;
    /* called after each batch with the images done (may be NULL); nonzero stops */
    int (*on_batch)(int done, int n, void *ctx);
    void *ctx;
} DetectorSampleOptions;

/* Runs the flow model (text: its prompt encoder; vae: its decoder) as o says and labels every
 * image by the oracle, into *out (free with detector_samples_free). */
int detector_samples_make(const Flux2 *flow, const TextEncoder *text, const VaeDecoder *vae,
                          const DetectorSampleOptions *o, DetectorSamples *out, Error *e);
void detector_samples_free(DetectorSamples *s);

typedef struct DetectorTrainOptions {
    int batch;        /* images per step: half of them the flow model's samples when there are
                         samples, the rest half clean and half corrupted renders */
    uint64_t seed;    /* the data's seed */
    float pos_weight; /* BCE weight of the target's positive cells (1: plain BCE) */
    const DetectorSamples *samples; /* NULL, or labelled samples to mix in (must outlive the
                                       task); the last held_out of them are never drawn */
    int held_out;
} DetectorTrainOptions;

typedef struct DetectorTrainer DetectorTrainer;

/* A TrainTask over m's parameters (m must outlive it): the loss of step s on batch s. The map
 * (1/4 of the detector's input) must divide the world's WORLD_H x WORLD_W images. */
int detector_train_task(TrainTask *task, DetectorTrainer **out, Segformer *m,
                        const DetectorTrainOptions *o, Error *e);
void detector_trainer_free(DetectorTrainer *d);
/* Batch `step`: images [B, 3, WORLD_H, WORLD_W] in [-1, 1] and the masks [B, WORLD_H, WORLD_W]
 * (0 or 1), new tensors. */
int detector_batch(const DetectorTrainer *d, int64_t step, Tensor **images, Tensor **masks,
                   Error *e);

/* The detector's decisions (map max >= 0.5) on n clean and n corrupted examples from seed (keep
 * it apart from the training seeds): the share of clean ones passed and of corrupted ones
 * flagged. */
typedef struct DetectorAccuracy {
    int n, clean; /* examples, and the clean ones among them */
    double clean_passed, corrupt_flagged;
} DetectorAccuracy;
int detector_accuracy(const Segformer *m, uint64_t seed, int n, DetectorAccuracy *out,
                      Error *e);
/* The same on samples first .. first+count-1 of s: of those the oracle passed, the share the
 * detector passed; of those it flagged, the share flagged (clean_passed, corrupt_flagged). */
int detector_sample_accuracy(const Segformer *m, const DetectorSamples *s, int first, int count,
                             DetectorAccuracy *out, Error *e);

/* === VAE training ===
 * Training the tiny VAE: both halves together on the reconstruction loss, then the latent
 * batch-norm statistics measured on the trained encoder, then one diffusers directory. */

/* Image number `index` of a stream as [channels, height, width] floats in [-1, 1] (the world's
 * renders, rgb / 127.5 - 1): it must depend only on index and ctx. */
typedef int (*VaeImageFn)(uint64_t index, int channels, int height, int width, float *chw,
                          void *ctx, Error *e);

/* A VaeImageFn: the words world's scene `index` (world_scene with a drawn word), rendered,
 * [3, WORLD_H, WORLD_W]; ctx is unused. */
int vae_world_image(uint64_t index, int channels, int height, int width, float *chw, void *ctx,
                    Error *e);

typedef struct VaeTrainOptions {
    int batch;           /* images per step */
    int height, width;   /* multiples of patch * 2^(blocks-1) */
    uint64_t seed;       /* batch `step` holds images vae_image_index(seed, step * batch + i) */
    VaeImageFn image;
    void *image_ctx;
    bool decoder_only;   /* train the decoder alone: the encoder, and so the latent space a flow
                            model has learned, stays as it is (a finer decoder afterwards) */
    float latent_noise;  /* the std of Gaussian noise added to the (normalised) tokens before
                            decoding, so that the decoder also draws clean images from the
                            inexact latents a flow model samples; 0: none */
} VaeTrainOptions;

typedef struct VaeTrainer VaeTrainer;

/* A TrainTask over both halves' parameters (enc, dec and o->image_ctx must outlive it): the loss
 * of step s is vae_reconstruction_loss on batch s. Turns dec's checkpoints off: at training sizes
 * memory is small and a checkpointed backward is several times slower. */
int vae_train_task(TrainTask *task, VaeTrainer **out, VaeEncoder *enc, VaeDecoder *dec,
                   const VaeTrainOptions *o, Error *e);
void vae_trainer_free(VaeTrainer *tr);
/* The image number of draw k from seed (a 64-bit mix, so seeds give unrelated streams). */
uint64_t vae_image_index(uint64_t seed, uint64_t k);
/* Batch `step`: images [batch, channels, height, width], a new tensor. */
int vae_batch(const VaeTrainer *tr, int64_t step, Tensor **images, Error *e);
/* Measures bn.running_mean / bn.running_var (the unbiased variance, what BatchNorm's running
 * estimate tends to) of the packed latents of n_images images of stream seed (keep it apart from
 * the training seed) and sets them in both halves with vae_set_latent_stats, so the flow model
 * sees latents of mean 0 and variance 1 per packed channel. */
int vae_fit_latent_stats(VaeTrainer *tr, uint64_t seed, int n_images, Error *e);

/* === the VAE's training loss === */

/* image: [B, in_channels, H, W] -> [1], the training loss mean((decode(encode(image) + noise) -
 * image)^2) (H and W as vae_encode wants them; out_channels must equal in_channels); noise: NULL
 * or [B, tokens, packed channels] like encode's tokens, added to them. */
Var *vae_reconstruction_loss(Tape *t, const VaeEncoder *enc, const VaeDecoder *dec, Var *image,
                             Var *noise);

/* === saving the trained models (train/save.c) === */

/* t as an F32 entry of a safetensors file to write (pointing at t's data). */
StWriteTensor st_entry_f32(const char *name, const Tensor *t);
/* Every named entry (parameters and buffers) as F32 into one safetensors file, atomically. */
int params_save(const Params *p, const char *path, Error *e);

/* A resident model into dir (made when absent): config.json and
 * diffusion_pytorch_model.safetensors (f32, upstream names), which flux2_open reads back. */
int flux2_save(const Flux2 *m, const char *dir, Error *e);

/* Into dir (made when absent): config.json and model.safetensors, which text_encoder_open reads. */
int text_encoder_save(const TextEncoder *m, const char *dir, Error *e);

/* Writes a detector opened WEIGHTS_FRESH as a transformers directory that segformer_open reads
 * back as the same detector: <dir>/config.json (SegformerForSemanticSegmentation),
 * <dir>/preprocessor_config.json and <dir>/model.safetensors with every upstream tensor (the
 * identity linear_fuse and batch norm included). dir is created when missing; files are replaced
 * atomically. A loaded (folded) detector is an error. */
int segformer_save(const Segformer *m, const char *dir, Error *e);

/* Writes out_dir/config.json (a copy of config_dir's) and out_dir/diffusion_pytorch_model.
 * safetensors with every tensor of both halves (bn.* once) under the diffusers names, F32:
 * vae_decoder_open and vae_encoder_open read it back. */
int vae_save(const VaeEncoder *enc, const VaeDecoder *dec, const char *config_dir,
             const char *out_dir, Error *e);

/* === the oracle's verdict === */

/* The oracle's verdict on a pair of WORLD_W x WORLD_H images made for prompt, into out's oracle
 * fields: an independent check that guidance fixes glyphs rather than fooling the detector. */
int metrics_oracle(const uint8_t *baseline, const uint8_t *guided, int H, int W,
                   const char *prompt, ImageMetrics *out, Error *e);

#endif
