/* train/commands.c - the commands that make and show the embedded models: diamond world (a scene
 * of the words world, its corruption and what the oracle reads) and diamond train.
 *
 * Contents: world (diamond world); train (diamond train). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fcntl.h>
#include <unistd.h>

#include "../diamond.h"
#include "train.h"

/* === world: diamond world === */

static const char *world_usage =
    "usage: diamond world [--word WORD] [--seed S] [--corrupt [--type NAME]] -o OUT.png|.ppm\n"
    "       diamond world --list N [--seed S]\n"
    "\n"
    "A scene of the words world, and with --corrupt its corruption and mask beside it, enlarged\n"
    "4x; prints what the oracle reads in each. --list prints the words of a run of scenes\n"
    "instead: an evaluation set for eval and search-seeds.\n"
    "\n";

typedef struct WorldArgs {
    const char *word, *out, *type_name;
    uint64_t seed;
    bool corrupt;
    int type;
    int list; /* > 0: print this many words instead of a picture */
} WorldArgs;

static const Option world_options[] = {
    {.name = "--word", .value = "WORD", .kind = OPTION_TEXT, .offset = offsetof(WorldArgs, word),
     .help = "2-4 letters or digits (drawn from the seed when absent)"},
    {.name = "--seed", .value = "S", .kind = OPTION_PARSE,
     .offset = offsetof(WorldArgs, seed), .parse = option_seed,
     .fallback = "0", .help = "the scene's seed"},
    {.name = "--corrupt", .kind = OPTION_FLAG, .offset = offsetof(WorldArgs, corrupt),
     .help = "the scene's corruption and its mask beside it"},
    {.name = "--type", .value = "NAME", .kind = OPTION_TEXT,
     .offset = offsetof(WorldArgs, type_name),
     .help = "the corruption's type (drawn when absent)"},
    {.name = "-o", .value = "OUT", .kind = OPTION_TEXT, .offset = offsetof(WorldArgs, out),
     .help = "the picture (.png, .ppm)"},
    {.name = "--list", .value = "N", .kind = OPTION_INT, .offset = offsetof(WorldArgs, list),
     .min = 1, .max = 1000000,
     .help = "a `prompt` CSV of the words of the scenes of seeds S .. S+N-1 instead"},
};

static int world_parse_type(const char *name) {
    for (int t = 0; t < WORLD_CORRUPTION_COUNT; t++)
        if (!strcmp(name, world_corruption_name(t))) return t;
    return -1;
}

static int world_parse(int argc, char **argv, WorldArgs *a, Error *e) {
    *a = (WorldArgs){.type = WORLD_CORRUPT_ANY};
    OptionSet set = {world_options, COUNT(world_options), a, false};
    if (options_defaults(&set, 1, e) || options_parse(&set, 1, argc, argv, "world", e)) return -1;
    const char *type = a->type_name;
    WorldScene check;
    if (a->word && world_scene(0, a->word, &check, e)) return -1;
    if (a->list && (a->word || a->corrupt || a->out))
        return error_set(e, "--list takes only --seed");
    if (a->list) return 0;
    if (!a->out) return error_set(e, "-o OUT.png|.ppm is required");
    const char *dot = strrchr(a->out, '.');
    if (!dot || (strcmp(dot, ".png") && strcmp(dot, ".ppm")))
        return error_set(e, "-o '%s': the name must end in .png or .ppm", a->out);
    if (type && !a->corrupt) return error_set(e, "--type needs --corrupt");
    if (type && (a->type = world_parse_type(type)) < 0) {
        char names[256] = "";
        for (int t = 0; t < WORLD_CORRUPTION_COUNT; t++)
            snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", t ? ", " : "",
                     world_corruption_name(t));
        return error_set(e, "--type '%s' is not one of %s", type, names);
    }
    return 0;
}

/* Panel `index` of out (panels WORLD_W x WORLD_H with a 2 px gap, enlarged `zoom` times) from
 * rgb, or from a mask shown white on black when rgb is NULL. */
static void world_panel(Image *out, int index, int zoom, const uint8_t *rgb, const uint8_t *mask) {
    for (int y = 0; y < WORLD_H * zoom; y++)
        for (int x = 0; x < WORLD_W * zoom; x++) {
            int p = (y / zoom) * WORLD_W + x / zoom;
            uint8_t *dst =
                out->rgb +
                ((size_t)y * (size_t)out->width + (size_t)(index * (WORLD_W + 2) * zoom + x)) * 3;
            if (rgb)
                memcpy(dst, rgb + (size_t)p * 3, 3);
            else
                memset(dst, mask[p] ? 255 : 0, 3);
        }
}

static void world_print_reading(const char *what, const uint8_t *rgb, const char *word) {
    OracleResult r;
    Error e = {{0}};
    oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
    printf("%s: the oracle reads '%s' (%s)\n", what, r.text,
           oracle_reads_as(&r, word) ? "as the word"
           : r.all_legible           ? "legible, another word"
                                     : "illegible");
}

/* The `prompt` CSV of --list. */
static int world_list(const WorldArgs *a, Error *e) {
    printf("prompt\n");
    for (long i = 0; i < a->list; i++) {
        WorldScene s;
        if (world_scene(a->seed + (uint64_t)i, NULL, &s, e)) return -1;
        printf("%s\n", s.word);
    }
    return 0;
}

static int world_run(const WorldArgs *a, Error *e) {
    enum { ZOOM = 4 };
    if (a->list) return world_list(a, e);
    WorldScene s;
    uint8_t clean[WORLD_W * WORLD_H * 3], damaged[WORLD_W * WORLD_H * 3], mask[WORLD_W * WORLD_H];
    WorldDamage d;
    if (world_scene(a->seed, a->word, &s, e)) return -1;
    world_render(&s, clean);
    printf("word %s, scale %dx%d, text (%d, %d, %d) on (%d, %d, %d)\n", s.word, s.scale_x,
           s.scale_y, s.ink[0], s.ink[1], s.ink[2], s.background[0], s.background[1],
           s.background[2]);
    world_print_reading("render", clean, s.word);
    if (a->corrupt) {
        if (world_corrupt(a->seed, &s, a->type, damaged, mask, &d, e)) return -1;
        printf("corruption %s on glyph %d", world_corruption_name(d.type), d.glyph[0] + 1);
        if (d.count == 2) printf(" and %d", d.glyph[1] + 1);
        printf(": %d pixels changed\n", d.changed);
        world_print_reading("corrupted", damaged, s.word);
    }
    int panels = a->corrupt ? 3 : 1;
    Image out = {0};
    if (image_alloc(&out, (panels * (WORLD_W + 2) - 2) * ZOOM, WORLD_H * ZOOM, e)) return -1;
    memset(out.rgb, 128, (size_t)out.width * (size_t)out.height * 3);
    world_panel(&out, 0, ZOOM, clean, NULL);
    if (a->corrupt) {
        world_panel(&out, 1, ZOOM, damaged, NULL);
        world_panel(&out, 2, ZOOM, NULL, mask);
    }
    int rc = !strcmp(strrchr(a->out, '.'), ".png") ? png_write(a->out, &out, e)
                                                   : ppm_write(a->out, &out, e);
    if (rc == 0) fprintf(stderr, "wrote %s\n", a->out);
    image_free(&out);
    return rc;
}

int world_main(int argc, char **argv) {
    if (argc >= 1 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"))) {
        const OptionSet set = {world_options, COUNT(world_options), NULL, false};
        command_help(world_usage, &set, 1);
        return 0;
    }
    WorldArgs a;
    Error e = {{0}};
    if (world_parse(argc, argv, &a, &e)) {
        fprintf(stderr, "diamond world: %s\n%s", e.msg, world_usage);
        return 2;
    }
    if (world_run(&a, &e)) {
        fprintf(stderr, "diamond world: %s\n", e.msg);
        return 1;
    }
    return 0;
}

/* === train === */

static const char *train_usage =
    "usage: diamond train vae|vae-decoder|text+flow|detector --config DIR --out DIR [options]\n"
    "\n"
    "Trains one of the embedded models from scratch, from seeded weights and seeded batches of\n"
    "the procedural words world (so a run repeats exactly), with AdamW, gradient clipping and a\n"
    "linear warm-up then cosine learning rate. --config DIR holds the model's config files\n"
    "(weights/vae, weights/detector; for text+flow the pipeline root with transformer/ and\n"
    "text_encoder/); --out DIR gets the same layout with the trained weights (written at the\n"
    "end, atomically). vae-decoder trains the decoder of the trained VAE in --vae alone (its\n"
    "encoder, so its latent space, is kept). `make -j2 weights` runs the whole recipe.\n"
    "\n"
    "\n";

/* Directory arguments stay below this, so <dir>/<model>/<file> fits the path buffers. */
#define TRAIN_MAX_PATH 4000

typedef struct TrainArgs {
    const char *what, *config, *out, *vae, *init, *log, *flow, *exclude;
    int steps, warmup; /* -1: the model's */
    int batch, threads, samples;
    float lr, latent_noise, ema;
    double clip, uncond;
    uint64_t seed;
    bool quiet;
} TrainArgs;

#define TRAIN_FIELD(f) offsetof(TrainArgs, f)

static const Option train_options[] = {
    {.name = "--config", .value = "DIR", .kind = OPTION_TEXT, .offset = TRAIN_FIELD(config),
     .help = "the config files"},
    {.name = "--out", .value = "DIR", .kind = OPTION_TEXT, .offset = TRAIN_FIELD(out),
     .help = "the trained model's directory"},
    {.name = "--steps", .value = "N", .kind = OPTION_INT, .offset = TRAIN_FIELD(steps),
     .min = 1, .max = 1 << 30,
     .help = "optimizer steps (default: the model's)"},
    {.name = "--batch", .value = "B", .kind = OPTION_INT, .offset = TRAIN_FIELD(batch),
     .min = 1, .max = 4096,
     .help = "images per step (default: the model's)"},
    {.name = "--lr", .value = "LR", .kind = OPTION_FLOAT, .offset = TRAIN_FIELD(lr),
     .min = 1e-12, .max = 1e6,
     .help = "peak learning rate (default: the model's)"},
    {.name = "--warmup", .value = "N", .kind = OPTION_INT, .offset = TRAIN_FIELD(warmup),
     .max = 1 << 30,
     .help = "warm-up steps (default: the model's)"},
    {.name = "--clip", .value = "C", .kind = OPTION_DOUBLE, .offset = TRAIN_FIELD(clip), .max = 1e6,
     .fallback = "1", .help = "the largest gradient norm (0: off)"},
    {.name = "--ema", .value = "D", .kind = OPTION_FLOAT, .offset = TRAIN_FIELD(ema),
     .max = 0.999999, .fallback = "0",
     .help = "save the moving average of the weights over the steps, decay D\n"
             "(e.g. 0.999; 0: the last step's weights)"},
    {.name = "--seed", .value = "S", .kind = OPTION_PARSE, .offset = TRAIN_FIELD(seed),
     .parse = option_seed, .fallback = "0",
     .help = "weights and batches"},
    {.name = "--vae", .value = "DIR", .kind = OPTION_TEXT, .offset = TRAIN_FIELD(vae),
     .help = "text+flow, vae-decoder: the trained VAE (whose latents the flow model\n"
             "learns; whose decoder vae-decoder trains on)"},
    {.name = "--init", .value = "DIR", .kind = OPTION_TEXT, .offset = TRAIN_FIELD(init),
     .help = "text+flow: start from the trained models in DIR instead of fresh\n"
             "weights (a second stage; give it another --seed for other batches)"},
    {.name = "--uncond", .value = "P", .kind = OPTION_DOUBLE, .offset = TRAIN_FIELD(uncond),
     .max = 0.999999, .fallback = "0",
     .help = "text+flow: train a share P of the samples on the empty prompt, so\n"
             "the model also predicts the unconditional velocity that\n"
             "classifier-free guidance (--cfg) needs (e.g. 0.1)"},
    {.name = "--flow", .value = "DIR", .kind = OPTION_TEXT, .offset = TRAIN_FIELD(flow),
     .help = "detector: also train on the images of the trained pipeline in DIR\n"
             "(transformer/, text_encoder/, vae/), sampled as the demo samples,\n"
             "labelled by the oracle (its illegible glyphs' boxes are the\n"
             "artifacts): half of every batch, a tenth of them held out"},
    {.name = "--samples", .value = "N", .kind = OPTION_INT, .offset = TRAIN_FIELD(samples),
     .min = 1, .max = 100000,
     .help = "detector --flow: how many images (default 2000)"},
    {.name = "--exclude", .value = "CSV", .kind = OPTION_TEXT, .offset = TRAIN_FIELD(exclude),
     .help = "detector --flow: never sample a prompt of this CSV's `prompt`\n"
             "column (the evaluation's)"},
    {.name = "--latent-noise", .value = "S", .kind = OPTION_FLOAT,
     .offset = TRAIN_FIELD(latent_noise), .max = 1e6, .fallback = "0",
     .help = "vae-decoder: add Gaussian noise of std S to the normalised latent\n"
             "tokens before decoding (a decoder for the flow model's inexact\n"
             "latents)"},
    {.name = "--log", .value = "FILE", .kind = OPTION_TEXT, .offset = TRAIN_FIELD(log),
     .help = "CSV step,loss,grad_norm,lr,seconds (written as it goes)"},
    {.name = "--threads", .value = "T", .kind = OPTION_PARSE, .offset = TRAIN_FIELD(threads),
     .parse = option_threads,
     .help = "OpenMP threads"},
    {.name = "--quiet", .kind = OPTION_FLAG, .offset = TRAIN_FIELD(quiet),
     .help = "no progress on stderr"},
};

/* One model's trainer: its defaults, and how to make its task and save what it trained. */
typedef struct Trainer {
    const char *name;
    int64_t steps, warmup;
    int batch;
    float lr;
    int (*open)(const TrainArgs *a, TrainTask *task, void **state, Error *e);
    int (*save)(void *state, const TrainArgs *a, Error *e);
    void (*close)(void *state);
} Trainer;

/* Held-out examples for the accuracy a trainer reports: no training batch uses this seed. */
#define TRAIN_HELD_OUT_SEED 987654321u

/* detector: segformer_open WEIGHTS_FRESH from the config files, detector_train_task,
 * segformer_save; with
 * --flow, first the flow model's own images labelled by the oracle. */
typedef struct DetectorRun {
    Segformer *model;
    DetectorTrainer *trainer;
    DetectorSamples samples;
    int held_out; /* the last samples, never trained on: a tenth */
} DetectorRun;

/* The labelled samples' seed (their words and noise), apart from every other stream. */
#define TRAIN_SAMPLE_SEED 314159265u

static void train_detector_close(void *state) {
    DetectorRun *d = state;
    detector_trainer_free(d->trainer);
    segformer_free(d->model);
    detector_samples_free(&d->samples);
    free(d);
}

static int train_samples_progress(int done, int n, void *ctx) {
    (void)ctx;
    fprintf(stderr, "\rdetector: flow model samples %d/%d%s", done, n, done == n ? "\n" : "");
    return 0;
}

/* The prompts of a CSV's `prompt` column (new strings into *words, *n of them), or none. */
static int train_exclude_words(const char *path, char ***words, int *n, Error *e) {
    EvalCsv c = {0};
    *words = NULL;
    *n = 0;
    if (!path) return 0;
    if (eval_csv_read(path, false, &c, e)) return -1;
    int rc = c.prompts ? 0 : error_set(e, "%s: --exclude needs a `prompt` column", path);
    if (rc == 0 && !(*words = calloc(c.n, sizeof **words))) rc = error_set(e, "out of memory");
    for (size_t i = 0; i < c.n; i++) {
        if (rc) break;
        (*words)[i] = c.rows[i].input;
        c.rows[i].input = NULL;
        (*n)++;
    }
    eval_csv_free(&c);
    return rc;
}

/* --samples images from the pipeline in --flow (transformer/, text_encoder/, vae/), sampled as
 * the demo and eval sample the embedded models, words of --exclude never drawn. */
static int train_detector_samples(const TrainArgs *a, DetectorSamples *out, Error *e) {
    Flux2 *flow = NULL;
    TextEncoder *text = NULL;
    VaeDecoder *vae = NULL;
    char **exclude = NULL, dir[3][PATH_BYTES];
    int n_exclude = 0;
    DetectorSampleOptions o = {.n = a->samples, .batch = 32, .seed = TRAIN_SAMPLE_SEED,
                               .sampler = {.steps = EMBEDDED_STEPS, .guidance_scale = 1.0f,
                                           .cfg_scale = EMBEDDED_CFG, .set_mu = true,
                                           .mu = EMBEDDED_MU},
                               .on_batch = a->quiet ? NULL : train_samples_progress};
    int rc = train_exclude_words(a->exclude, &exclude, &n_exclude, e) ||
                     path_join(dir[0], sizeof dir[0], a->flow, "transformer", e) ||
                     path_join(dir[1], sizeof dir[1], a->flow, "text_encoder", e) ||
                     path_join(dir[2], sizeof dir[2], a->flow, "vae", e) ||
                     flux2_open(&flow, dir[0], WEIGHTS_FILES, 0, e) ||
                     flux2_make_resident(flow, e) ||
                     text_encoder_open(&text, dir[1], WEIGHTS_FILES, 0, e) ||
                     vae_decoder_open(&vae, dir[2], WEIGHTS_FILES, 0, e)
                 ? -1
                 : 0;
    o.exclude = (const char *const *)exclude;
    o.n_exclude = n_exclude;
    if (rc == 0) rc = detector_samples_make(flow, text, vae, &o, out, e);
    if (rc == 0 && !a->quiet)
        fprintf(stderr, "detector: the oracle flags %d of the %d samples\n", out->flagged,
                out->n);
    for (int i = 0; i < n_exclude; i++) free(exclude[i]);
    free(exclude);
    flux2_free(flow);
    text_encoder_free(text);
    vae_decoder_free(vae);
    return rc;
}

static int train_detector_open(const TrainArgs *a, TrainTask *task, void **state, Error *e) {
    DetectorRun *d = calloc(1, sizeof *d);
    if (!d) return error_set(e, "out of memory");
    *state = d;
    DetectorTrainOptions o = {.batch = a->batch, .seed = a->seed, .pos_weight = 2.0f};
    if (a->flow) {
        if (train_detector_samples(a, &d->samples, e)) return -1;
        o.samples = &d->samples;
        o.held_out = d->held_out = d->samples.n / 10;
    }
    return segformer_open(&d->model, a->config, WEIGHTS_FRESH, a->seed, e) ||
                   detector_train_task(task, &d->trainer, d->model, &o, e)
               ? -1
               : 0;
}

/* Saves, then measures the decisions on held-out examples (a seed training never draws, and the
 * samples training left out). */
static int train_detector_save(void *state, const TrainArgs *a, Error *e) {
    DetectorRun *d = state;
    DetectorAccuracy acc, sampled = {0};
    int held_out = d->held_out;
    if (segformer_save(d->model, a->out, e) ||
        detector_accuracy(d->model, TRAIN_HELD_OUT_SEED, 400, &acc, e) ||
        (held_out && detector_sample_accuracy(d->model, &d->samples, d->samples.n - held_out,
                                              held_out, &sampled, e)))
        return -1;
    if (a->quiet) return 0;
    fprintf(stderr, "detector on %d held-out clean / corrupted renders: %.1f%% passed, "
                    "%.1f%% flagged\n", acc.clean, 100.0 * acc.clean_passed,
            100.0 * acc.corrupt_flagged);
    if (held_out)
        fprintf(stderr, "detector on %d held-out flow model samples: of the %d the oracle reads "
                        "%.1f%% passed, of the %d it flags %.1f%% flagged\n", held_out,
                sampled.clean, 100.0 * sampled.clean_passed, held_out - sampled.clean,
                100.0 * sampled.corrupt_flagged);
    return 0;
}

/* vae: both halves fresh from the config, vae_train_task on world images; then the latent
 * statistics on held-out images and vae_save. */
typedef struct VaeRun {
    VaeEncoder *encoder;
    VaeDecoder *decoder;
    VaeTrainer *trainer;
} VaeRun;

static void train_vae_close(void *state) {
    VaeRun *v = state;
    vae_trainer_free(v->trainer);
    vae_encoder_free(v->encoder);
    vae_decoder_free(v->decoder);
    free(v);
}

/* Both halves fresh from the config (vae), or the trained VAE of --vae with its decoder alone
 * to train, on images of another stream than its first training's (vae-decoder). */
static int train_vae_setup(const TrainArgs *a, TrainTask *task, void **state, bool decoder_only,
                           Error *e) {
    VaeRun *v = calloc(1, sizeof *v);
    if (!v) return error_set(e, "out of memory");
    *state = v;
    VaeTrainOptions o = {.batch = a->batch, .height = WORLD_H, .width = WORLD_W,
                         .seed = a->seed + decoder_only, .image = vae_world_image,
                         .decoder_only = decoder_only, .latent_noise = a->latent_noise};
    int rc = decoder_only ? vae_encoder_open(&v->encoder, a->vae, WEIGHTS_FILES, 0, e) ||
                                vae_decoder_open(&v->decoder, a->vae, WEIGHTS_FILES, 0, e)
                          : vae_encoder_open(&v->encoder, a->config, WEIGHTS_FRESH, a->seed, e) ||
                                vae_decoder_open(&v->decoder, a->config, WEIGHTS_FRESH, a->seed, e);
    return rc || vae_train_task(task, &v->trainer, v->encoder, v->decoder, &o, e) ? -1 : 0;
}

static int train_vae_open(const TrainArgs *a, TrainTask *task, void **state, Error *e) {
    return train_vae_setup(a, task, state, false, e);
}

static int train_vae_save(void *state, const TrainArgs *a, Error *e) {
    VaeRun *v = state;
    return vae_fit_latent_stats(v->trainer, TRAIN_HELD_OUT_SEED, 1024, e) ||
                   vae_save(v->encoder, v->decoder, a->config, a->out, e)
               ? -1
               : 0;
}

/* vae-decoder: the decoder of a trained VAE; its encoder and latent statistics are kept, so a
 * flow model trained on its latents stays valid. */
static int train_vae_decoder_open(const TrainArgs *a, TrainTask *task, void **state, Error *e) {
    return train_vae_setup(a, task, state, true, e);
}

static int train_vae_decoder_save(void *state, const TrainArgs *a, Error *e) {
    VaeRun *v = state;
    return vae_save(v->encoder, v->decoder, a->config, a->out, e);
}

/* text+flow: transformer and text encoder fresh from <config>/transformer and
 * <config>/text_encoder, trained on the latents of the trained VAE in --vae. */
typedef struct FlowRun {
    VaeEncoder *vae;
    Flux2 *flow;
    TextEncoder *text;
    FlowTrainer *trainer;
    FlowWorld world;
} FlowRun;

static void train_flow_close(void *state) {
    FlowRun *f = state;
    flow_trainer_free(f->trainer);
    flux2_free(f->flow);
    text_encoder_free(f->text);
    vae_encoder_free(f->vae);
    free(f);
}

static int train_flow_open(const TrainArgs *a, TrainTask *task, void **state, Error *e) {
    FlowRun *f = calloc(1, sizeof *f);
    char dir[2][PATH_BYTES];
    if (!f) return error_set(e, "out of memory");
    *state = f;
    const char *from = a->init ? a->init : a->config;
    if (path_join(dir[0], sizeof dir[0], from, "transformer", e) ||
        path_join(dir[1], sizeof dir[1], from, "text_encoder", e) ||
        vae_encoder_open(&f->vae, a->vae, WEIGHTS_FILES, 0, e) ||
        (a->init ? flux2_open(&f->flow, dir[0], WEIGHTS_FILES, 0, e) ||
                       flux2_make_resident(f->flow, e) ||
                       text_encoder_open(&f->text, dir[1], WEIGHTS_FILES, 0, e)
                 : flux2_open(&f->flow, dir[0], WEIGHTS_FRESH, a->seed, e) ||
                       text_encoder_open(&f->text, dir[1], WEIGHTS_FRESH, a->seed, e)))
        return -1;
    int rows, cols;
    vae_encoder_token_size(f->vae, &rows, &cols);
    f->world = (FlowWorld){.vae = f->vae, .seed = a->seed, .h = WORLD_H / rows,
                           .w = WORLD_W / cols, .channels = flux2_config(f->flow)->in_channels};
    FlowTrainOptions o = {.batch = a->batch, .h = f->world.h, .w = f->world.w, .seed = a->seed,
                          .logit_mean = 0.0, .logit_std = 1.0, .uncond = a->uncond,
                          .data = flow_world_batch,
                          .data_ctx = &f->world};
    return flow_train_task(task, &f->trainer, f->flow, f->text, &o, e);
}

static int train_flow_save(void *state, const TrainArgs *a, Error *e) {
    FlowRun *f = state;
    char dir[2][PATH_BYTES];
    return path_join(dir[0], sizeof dir[0], a->out, "transformer", e) ||
                   path_join(dir[1], sizeof dir[1], a->out, "text_encoder", e) ||
                   flux2_save(f->flow, dir[0], e) || text_encoder_save(f->text, dir[1], e)
               ? -1
               : 0;
}

static const Trainer trainers[] = {
    {.name = "vae", .steps = 2500, .warmup = 100, .batch = 8, .lr = 2e-3f,
     .open = train_vae_open, .save = train_vae_save, .close = train_vae_close},
    {.name = "vae-decoder", .steps = 3000, .warmup = 100, .batch = 8, .lr = 1e-3f,
     .open = train_vae_decoder_open, .save = train_vae_decoder_save, .close = train_vae_close},
    {.name = "text+flow", .steps = 12000, .warmup = 300, .batch = 16, .lr = 1e-3f,
     .open = train_flow_open, .save = train_flow_save, .close = train_flow_close},
    {.name = "detector", .steps = 5000, .warmup = 250, .batch = 32, .lr = 5e-3f,
     .open = train_detector_open, .save = train_detector_save, .close = train_detector_close},
};

static const Trainer *train_find(const char *name) {
    for (size_t i = 0; i < COUNT(trainers); i++)
        if (!strcmp(trainers[i].name, name)) return &trainers[i];
    return NULL;
}

static int train_parse(int argc, char **argv, TrainArgs *a, Error *e) {
    *a = (TrainArgs){.steps = -1, .warmup = -1, .batch = -1, .lr = -1.0f};
    if (argc < 1 || !train_find(argv[0]))
        return error_set(e, "train: say what to train: vae, vae-decoder, text+flow or detector");
    a->what = argv[0];
    OptionSet set = {train_options, COUNT(train_options), a, false};
    if (options_defaults(&set, 1, e) || options_parse(&set, 1, argc - 1, argv + 1, "train", e))
        return -1;
    if (!a->config || !a->out) return error_set(e, "train: --config DIR and --out DIR are needed");
    bool on_a_vae = !strcmp(a->what, "text+flow") || !strcmp(a->what, "vae-decoder");
    if (on_a_vae && !a->vae)
        return error_set(e, "%s trains on a trained VAE: give --vae DIR", a->what);
    if (!on_a_vae && a->vae) return error_set(e, "--vae is for text+flow and vae-decoder");
    if (a->init && strcmp(a->what, "text+flow")) return error_set(e, "--init is for text+flow");
    if (a->latent_noise > 0.0f && strcmp(a->what, "vae-decoder"))
        return error_set(e, "--latent-noise is for vae-decoder");
    if (a->uncond > 0.0 && strcmp(a->what, "text+flow"))
        return error_set(e, "--uncond is for text+flow");
    if ((a->flow || a->exclude || a->samples) && strcmp(a->what, "detector"))
        return error_set(e, "--flow, --samples and --exclude are for detector");
    if ((a->exclude || a->samples) && !a->flow)
        return error_set(e, "--samples and --exclude need --flow DIR");
    if (a->flow && !a->samples) a->samples = 2000;
    if (a->flow && a->samples < 10)
        return error_set(e, "--samples: at least 10 (a tenth is held out)");
    const char *paths[] = {a->config, a->out, a->vae, a->init, a->flow};
    for (size_t i = 0; i < COUNT(paths); i++)
        if (paths[i] && strlen(paths[i]) > TRAIN_MAX_PATH)
            return error_set(e, "path too long: %.40s...", paths[i]);
    return 0;
}

/* The trainer's defaults where the command line left a setting out. */
static void train_defaults(TrainArgs *a, const Trainer *t) {
    if (a->steps < 0) a->steps = t->steps;
    if (a->warmup < 0) a->warmup = t->warmup < a->steps ? t->warmup : a->steps / 10;
    if (a->batch < 0) a->batch = t->batch;
    if (a->lr < 0.0f) a->lr = t->lr;
}

typedef struct TrainProgress {
    const TrainArgs *a;
    FILE *log;
    double start, last_print;
} TrainProgress;

/* A CSV line per step; on stderr about once a second the step, loss, speed and time left. */
static int train_on_step(const TrainStep *s, void *ctx, Error *e) {
    TrainProgress *p = ctx;
    double now = now_seconds(), elapsed = now - p->start;
    if (p->log &&
        fprintf(p->log, "%lld,%.9g,%.9g,%.9g,%.3f\n", (long long)s->step, s->loss, s->grad_norm,
                s->lr, elapsed) < 0)
        return error_set(e, "%s: %s", p->a->log, strerror(errno));
    bool last = s->step + 1 == s->steps;
    if (!p->a->quiet && (now - p->last_print >= 1.0 || last)) {
        double per = elapsed / (double)(s->step + 1);
        fprintf(stderr,
                "\r%s: step %lld/%lld  loss %.5f  |g| %.3f  lr %.2e  %.3f s/step  ETA %.0f s   %s",
                p->a->what, (long long)s->step + 1, (long long)s->steps, s->loss, s->grad_norm,
                s->lr, per, per * (double)(s->steps - s->step - 1), last ? "\n" : "");
        p->last_print = now;
    }
    return 0;
}

static int train_run_command(const TrainArgs *a, const Trainer *t, Error *e) {
    TrainTask task = {0};
    void *state = NULL;
    TrainProgress progress = {a, NULL, now_seconds(), 0.0};
    if (a->log && !(progress.log = fopen(a->log, "w")))
        return error_set(e, "%s: %s", a->log, strerror(errno));
    if (progress.log) fprintf(progress.log, "step,loss,grad_norm,lr,seconds\n");
    AdamWOptions adamw = {.lr = a->lr, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                          .weight_decay = 0.01f};
    TrainOptions o = {.steps = a->steps, .adamw = adamw,
                      .warmup = a->warmup, .clip = a->clip, .ema = a->ema, .on_step = train_on_step,
                      .ctx = &progress};
    int rc = dir_make(a->out, e) || t->open(a, &task, &state, e) || train_run(&task, &o, e) ||
             t->save(state, a, e);
    if (state) t->close(state);
    if (progress.log && fclose(progress.log) && rc == 0)
        rc = error_set(e, "%s: %s", a->log, strerror(errno));
    if (rc == 0 && !a->quiet)
        fprintf(stderr, "%s: %lld steps in %.1f s, written to %s\n", a->what, (long long)a->steps,
                now_seconds() - progress.start, a->out);
    return rc ? -1 : 0;
}

int train_main(int argc, char **argv) {
    if (asks_for_help(argc, argv)) {
        const OptionSet set = {train_options, COUNT(train_options), NULL, false};
        command_help(train_usage, &set, 1);
        return 0;
    }
    TrainArgs a;
    Error e = {{0}};
    if (train_parse(argc, argv, &a, &e)) {
        fprintf(stderr, "diamond train: %s\n", e.msg);
        return 2;
    }
    train_defaults(&a, train_find(a.what));
    if (train_run_command(&a, train_find(a.what), &e)) {
        fprintf(stderr, "diamond train %s: %s\n", a.what, e.msg);
        return 1;
    }
    return 0;
}
