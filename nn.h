/* nn.h - layers and models built from tensor.c kernels through autograd.c ops.
 *
 * Models read their architecture from config files and their weights from safetensors by the
 * real upstream tensor names. They hold their weights in a Params (f32 leaves on a tape of the
 * model's own, used by every forward pass on the caller's tape; FLUX.2 only when loaded resident):
 * by default they need no gradient, so gradients flow to the inputs only; a trainer makes them
 * trainable. */
#ifndef DIAMOND_NN_H
#define DIAMOND_NN_H

#include "autograd.h"

/* === parameters and basic layers === */

/* A model's parameters: f32 leaves on one tape the model owns, each under its upstream name, so
 * that a forward pass uses them on any tape (gradients accumulate in their Var's grad when
 * trainable) and a trainer can enumerate, update and save them. Three kinds:
 *   parameters  named, read from a source, trained when the set is trainable;
 *   buffers     named, read from a source and saved, never trained (batch-norm statistics);
 *   constants   unnamed values derived while loading (folded layers, reciprocals), never saved.
 * The source (an StModel: the files, or a random model, io.h) must stay open while loading. */
typedef struct Params Params;

/* NULL when out of memory. */
Params *params_new(const StModel *source);
void params_free(Params *p);
/* The F32/F16/BF16 tensor named by name_fmt (printf-style) in the source, as a new f32 leaf of
 * exactly `shape`; NULL with an error naming the tensor when it is missing or has another shape. */
Var *params_load(Params *p, Error *e, int ndim, const int64_t *shape, const char *name_fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;
/* The same for a buffer. */
Var *params_load_buffer(Params *p, Error *e, int ndim, const int64_t *shape,
                        const char *name_fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;
/* A constant leaf that takes ownership of value (NULL when value is NULL or out of memory). */
Var *params_constant(Params *p, Tensor *value, Error *e);

/* The named entries, parameters and buffers, in loading order. */
int params_count(const Params *p);
const char *params_name(const Params *p, int i);
Var *params_var(const Params *p, int i);
bool params_is_buffer(const Params *p, int i);
/* Parameters (not buffers, not constants) require grad from now on, or no longer. */
void params_set_trainable(Params *p, bool trainable);

/* Where a model loader takes its weights from. */
typedef enum WeightSource {
    WEIGHTS_FILES,       /* the safetensors files in the model's directory: every tensor there
                            must be one the config uses (strict loading) */
    WEIGHTS_FILES_NON_STRICT, /* the same, tensors the config does not use allowed (--non-strict) */
    WEIGHTS_CONFIG_ONLY, /* random weights RANDOM_FOR_TIMING: timings and memory without files */
    WEIGHTS_FRESH,       /* random weights RANDOM_FOR_TRAINING: a model to train from scratch */
} WeightSource;

/* The weights of the tensors loaders ask params_load for: the safetensors in dir, or a random
 * model of any tensor drawn from seed as the source says (st_model_random_any). *st stays
 * open for the loading; the caller closes it. */
int params_open(Params **p, StModel **st, const char *dir, WeightSource source, uint64_t seed,
                Error *e);
/* Strict loading, as PyTorch's load_state_dict(strict=True): every tensor of st is one the
 * model reads (reads(ctx, name); params_reads for a Params) or one it knowingly leaves (a name
 * starting with a prefix of leave, NULL-terminated); else an error naming dir and the first
 * few. Only for WEIGHTS_FILES. */
int weights_all_read(WeightSource source, const StModel *st,
                     bool (*reads)(const void *ctx, const char *name), const void *ctx,
                     const char *const *leave, const char *dir, Error *e);
/* Whether the Params ctx holds a weight named name (params_load read it). */
bool params_reads(const void *ctx, const char *name);

/* SHAPE(a, b, c) stands for the (ndim, shape) argument pair:
 *     params_load(p, e, SHAPE(out, in), "blocks.%d.proj.weight", i) */
#define SHAPE(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}

/* y = x W^T + b. weight: [out, in], bias: [out] or NULL. Names: <prefix>.weight, <prefix>.bias.
 * The layers below hold leaves of a Params, which frees them. */
typedef struct Linear {
    Var *weight, *bias;
} Linear;
int linear_load(Linear *l, Params *p, int in, int out, bool bias, const char *prefix, Error *e);
/* x: [.., in] -> [.., out] */
Var *linear_apply(Tape *t, const Linear *l, Var *x);

/* weight: [out, in/groups, k, k], bias: [out] or NULL. Names: <prefix>.weight, <prefix>.bias */
typedef struct Conv2d {
    Var *weight, *bias;
    int stride, padding, groups;
} Conv2d;
int conv2d_load(Conv2d *c, Params *p, int in, int out, int kernel, int stride, int padding,
                int groups, bool bias, const char *prefix, Error *e);
/* x: [B, in, H, W] -> [B, out, Ho, Wo] */
Var *conv2d_apply(Tape *t, const Conv2d *c, Var *x);

/* The affine part of a LayerNorm / GroupNorm / RMSNorm: weight [C] and optional bias [C].
 * Names: <prefix>.weight, <prefix>.bias */
typedef struct NormParams {
    Var *weight, *bias;
} NormParams;
int norm_load(NormParams *n, Params *p, int channels, bool bias, const char *prefix, Error *e);

/* === FLUX.2 transformer ===
 * FLUX.2's flow transformer (diffusers' Flux2Transformer2DModel; klein-4B and its kin). Loaded
 * by flux2_open (streaming, forward only), the weights stay in the mapped safetensors files: each
 * part of a block (its attention inputs, each stream's output and feed-forward) reads its
 * matrices there as it runs (the GEMM widens bf16 while packing), and the token-wise layers run
 * over chunks of tokens, so the memory a call needs is a few [tokens, dim] tensors besides the
 * mapped files, never the model in f32.
 * Made resident (flux2_make_resident, or opened WEIGHTS_FRESH; for small models), every weight is
 * an f32 leaf of a Params and the forward is one graph that can be trained. */

/* RoPE axes: the pipeline's position ids are (T, H, W, L). */
#define FLUX2_AXES 4

/* The most text tokens a prompt's embeddings may have: the klein pipeline makes 512, and the
 * attention's time grows with the square of the sequence. */
#define FLUX2_MAX_TEXT_TOKENS 4096

/* transformer/config.json (absent patch_size = 1 and null out_channels = in_channels, as
 * upstream). dim = heads * head_dim; mlp_hidden = int(dim * mlp_ratio). */
typedef struct Flux2Config {
    int patch_size, in_channels, out_channels;
    int num_layers, num_single_layers;    /* double-stream, single-stream blocks */
    int heads, head_dim, dim, mlp_hidden;
    double mlp_ratio;                     /* as the file gives it (mlp_hidden derives from it) */
    int joint_attention_dim;              /* the prompt embedding's width */
    int timestep_channels;                /* timestep_guidance_channels */
    int axes_dims[FLUX2_AXES];            /* axes_dims_rope; they sum to head_dim */
    double rope_theta, eps;
    bool guidance_embeds;
} Flux2Config;

typedef struct Flux2 Flux2;

/* Opens <dir>/config.json and the weights source names: the files in dir (one file or an index
 * over shards; every tensor the config implies is checked there with its shape, an error names the
 * first that is not, and none is converted: the forward's GEMMs read the matrices where they lie),
 * st_random_fill values from seed (WEIGHTS_CONFIG_ONLY: timings and memory without the files), or
 * fresh weights from seed (WEIGHTS_FRESH: a model to train, resident). */
int flux2_open(Flux2 **out, const char *dir, WeightSource source, uint64_t seed, Error *e);
/* An execution strategy for small models (training, flux2_forward_graph): every weight converted
 * once into a Params of f32 leaves, held in memory. The forward's results do not change (in
 * f32: the precision goes back to PRECISION_F32). */
int flux2_make_resident(Flux2 *m, Error *e);
void flux2_free(Flux2 *m);
const Flux2Config *flux2_config(const Flux2 *m);
/* How a streamed model's forward computes its weight products: PRECISION_F32 (as opened, the
 * reference) or PRECISION_BF16 (ag_linear_stored's: activations and weights rounded to bf16,
 * f32 sums; fast where gemm_bf16_native()). The attention, norms and the rest stay f32. A
 * resident model computes in f32 only: asking it for bf16 is an error. */
int flux2_set_precision(Flux2 *m, Precision precision, Error *e);
/* A resident model's weights (all parameters), by their upstream names; NULL when streaming. */
Params *flux2_params(const Flux2 *m);

/* The velocity at noise level sigma[b] (in [0, 1]; the model embeds sigma * 1000).
 * tokens: [B, h*w, in_channels], the packed latent tokens of an h x w grid in row-major order;
 * txt: [B, L, joint_attention_dim], the prompt embeddings; sigma: [B]; guidance: [B] or NULL
 * (used only when the config has guidance_embeds, as upstream) -> *velocity: [B, h*w,
 * patch_size^2 * out_channels], a new tensor the caller frees. Runs with grad off on short tapes
 * of its own; the model holds no state between calls. */
int flux2_forward(const Flux2 *m, const Tensor *tokens, int h, int w, const Tensor *txt,
                  const float *sigma, const float *guidance, Tensor **velocity, Error *e);

/* The same forward as ag_* ops on t, for a resident model, over the whole batch at once:
 * tokens: [B, h*w, in_channels], txt: [B, L, joint_attention_dim] -> [B, h*w, patch_size^2 *
 * out_channels]. Gradients flow to tokens, txt and (when trainable) every parameter. sigma (and
 * guidance) as flux2_forward. With a streaming model the tape fails. */
Var *flux2_forward_graph(Tape *t, const Flux2 *m, Var *tokens, int h, int w, Var *txt,
                         const float *sigma, const float *guidance);

/* An upper bound on the memory, in bytes, that flux2_forward takes beyond the mapped weights for a
 * batch over img_tokens image and txt_tokens text tokens: for a streaming model the hidden states,
 * one block's joint attention and, for config-only weights (which have no bytes to read in
 * place), the largest part made in f32 (measured against peak RSS at klein-4B's size in the
 * README); for a resident one the whole graph's values. */
size_t flux2_forward_bytes(const Flux2 *m, int batch, int64_t img_tokens, int64_t txt_tokens);

/* === the embedded models' text encoder ===
 * diamond's own character-level prompt encoder for the tiny models: the prompt upper-cased, each
 * vocab character one token (ids 1 .. V, 0 the padding up to max_length), token plus position
 * embeddings, num_layers pre-norm transformer layers (self-attention over the prompt's own
 * tokens, a GELU MLP), a final LayerNorm -> [B, max_length, hidden_size] prompt embeddings for
 * FLUX.2's context_embedder (hidden_size = the transformer's joint_attention_dim).
 * <dir>/config.json: {"_class_name": "DiamondCharEncoder", "vocab": "AB..", "max_length",
 * "hidden_size", "num_layers", "num_heads", "intermediate_size", "layer_norm_eps"};
 * <dir>/model.safetensors: token_embedding.weight [V + 1, D], position_embedding.weight [L, D],
 * layers.N.{norm1, attn.to_q, attn.to_k, attn.to_v, attn.to_out, norm2, mlp.fc1, mlp.fc2}.
 * {weight, bias}, final_norm.{weight, bias}. */

#define TEXT_ENCODER_MAX_VOCAB 128

typedef struct TextEncoderConfig {
    char vocab[TEXT_ENCODER_MAX_VOCAB + 1]; /* character i has id i + 1 */
    int vocab_size;                         /* V */
    int max_length, hidden_size, num_layers, num_heads, intermediate_size;
    double layer_norm_eps;
} TextEncoderConfig;

typedef struct TextEncoder TextEncoder;

/* Config and weights from dir (the safetensors files, st_random_fill values or fresh weights
 * from seed, as WeightSource says); an error names the file, key or tensor. */
int text_encoder_open(TextEncoder **out, const char *dir, WeightSource source, uint64_t seed,
                      Error *e);
void text_encoder_free(TextEncoder *m);
const TextEncoderConfig *text_encoder_config(const TextEncoder *m);
/* Every weight as a parameter. */
Params *text_encoder_params(const TextEncoder *m);

/* prompt -> ids[0 .. max_length) (0 after the prompt), *length = its characters. An unknown
 * character or a prompt longer than max_length is an error naming it. */
int text_encoder_tokenize(const TextEncoder *m, const char *prompt, int *ids, int *length,
                          Error *e);
/* prompts[0 .. batch) -> [B, max_length, hidden_size]. NULL with e filled when a prompt does not
 * tokenize or an op fails. Gradients reach the weights when they are trainable. */
Var *text_encode(Tape *t, const TextEncoder *m, const char *const *prompts, int batch, Error *e);

/* === Qwen3 text encoder ===
 * FLUX.2 [klein]'s prompt encoder, transformers' Qwen3Model as Flux2KleinPipeline runs it: token
 * ids through the first 27 decoder layers; the outputs of layers 9, 18 and 27 stacked per token
 * are the prompt embeddings [B, L, 3 hidden_size] (= the transformer's joint_attention_dim).
 * Weights stay in the mapped (bf16/f16/f32, sharded) files: the projections read their
 * matrices there (ag_linear_stored), never converting them to an f32 copy. */

/* text_encoder/config.json (upstream keys; num_key_value_heads defaults to num_attention_heads,
 * head_dim to hidden_size / num_attention_heads). attention_bias, use_sliding_window,
 * rope_scaling or a hidden_act other than silu is an error naming the key. */
typedef struct Qwen3Config {
    int vocab_size, hidden_size, num_layers, heads, kv_heads, head_dim, intermediate_size;
    double rms_norm_eps, rope_theta;
} Qwen3Config;

typedef struct Qwen3 Qwen3;

/* The last hidden state the klein pipeline reads (it stacks 9, 18 and 27): the layers run. */
#define QWEN3_KLEIN_LAST_LAYER 27

/* <dir>/config.json and the weights in dir (WEIGHTS_FILES: one file or an index over shards,
 * every tensor the pipeline uses checked by name and shape, none converted) or st_model_random
 * weights from seed (WEIGHTS_CONFIG_ONLY: timings and memory without the files). */
int qwen3_open(Qwen3 **out, const char *dir, WeightSource source, uint64_t seed, Error *e);
void qwen3_free(Qwen3 *m);
const Qwen3Config *qwen3_config(const Qwen3 *m);
/* The precision of the projections' products, as flux2_set_precision's (PRECISION_F32 as
 * opened). */
void qwen3_set_precision(Qwen3 *m, Precision precision);
/* ids: [B, L] token ids, row b's first lengths[b] real and the rest padding -> *out: [B, L,
 * 3 hidden_size] = hidden states 9, 18, 27 concatenated per token, for every position (padding
 * included), as the pipeline hands them to the transformer. A new tensor the caller frees. */
int qwen3_prompt_embeds(const Qwen3 *m, const int32_t *ids, const int *lengths, int batch, int L,
                        Tensor **out, Error *e);

/* === prompt encoder ===
 * Prompts -> the transformer's prompt embeddings, by the model directory's layout:
 *   <dir>/tokenizer/ + <dir>/text_encoder/ (Qwen3): FLUX.2 [klein]'s pipeline (the chat template
 *     with enable_thinking=False, padding to max_length, default 512, with the pad token,
 *     truncation, Qwen3's hidden states 9, 18, 27 per token): [B, max_length, 3 hidden_size];
 *   <dir>/text_encoder/ alone: diamond's character encoder: [B, its max_length, hidden_size]. */

#define KLEIN_MAX_LENGTH 512

typedef struct PromptEncoder PromptEncoder;

/* The token ids of a batch of prompts, as the pipeline feeds them to the encoder. */
typedef struct PromptTokens {
    int32_t *ids;  /* [B, max_length]: the prompt's tokens, then padding */
    int *lengths;  /* [B]: real tokens (the attention mask's ones) */
    size_t *totals; /* [B]: tokens before truncation (> max_length: the prompt was cut) */
} PromptTokens;

/* Opens <model>'s prompt encoder, its weights from the files or (WEIGHTS_CONFIG_ONLY) random
 * from seed. max_length 0: the default (512 for klein; the character encoder's is fixed). */
int prompt_encoder_open(PromptEncoder **out, const char *model, WeightSource source,
                        uint64_t seed, int max_length, Error *e);
void prompt_encoder_free(PromptEncoder *p);
/* The precision of a Qwen3 encoder's products (qwen3_set_precision); diamond's character encoder
 * (the embedded models: a resident model, tiny) computes in f32 whatever is asked. */
void prompt_encoder_set_precision(PromptEncoder *p, Precision precision);
/* The embeddings' last dim (what the transformer's joint_attention_dim must be), and L. */
int prompt_encoder_width(const PromptEncoder *p);
int prompt_encoder_max_length(const PromptEncoder *p);
/* prompts[0 .. n) -> *embeds: [n, max_length, width] (a new tensor), each prompt encoded on its
 * own (its embeddings never depend on the others of the call); tokens (or NULL) gets
 * their ids, lengths and untruncated counts, freed with prompt_tokens_free. A prompt that is not
 * UTF-8 (or, for the character encoder, has a character outside its vocabulary) is an error. */
int prompt_encode(const PromptEncoder *p, const char *const *prompts, int n, Tensor **embeds,
                  PromptTokens *tokens, Error *e);
void prompt_tokens_free(PromptTokens *tok);

/* === VAE === */

/* The decoder half of diffusers' AutoencoderKLFlux2, with the FLUX.2 pipeline's latent
 * unpacking in front: packed transformer tokens in, an image in about [-1, 1] out. */

#define VAE_MAX_BLOCKS 8

/* From vae/config.json (the upstream keys). */
typedef struct VaeConfig {
    int latent_channels;     /* 32 for FLUX.2 */
    int out_channels;        /* 3 */
    int n_blocks;            /* entries of block_out_channels (and up_block_types) */
    int block_out_channels[VAE_MAX_BLOCKS]; /* decoder_block_out_channels when set */
    int layers_per_block;    /* each up block has layers_per_block + 1 resnets */
    int norm_num_groups;
    int patch_h, patch_w;    /* patch_size: tokens carry latent_channels * patch_h * patch_w */
    float batch_norm_eps;
    bool use_post_quant_conv, mid_block_add_attention;
    /* The encoder's keys, read only by the encoder's loaders (a decoder needs none of them). */
    int in_channels;         /* 3 */
    int n_down_blocks;       /* entries of block_out_channels (and down_block_types) */
    int down_block_out_channels[VAE_MAX_BLOCKS]; /* block_out_channels */
    bool use_quant_conv;
} VaeConfig;

/* The loaded decoder: config, f32 weights, and whether blocks are checkpointed. */
typedef struct VaeDecoder VaeDecoder;

/* Reads <dir>/config.json and the weights source names: <dir>/diffusion_pytorch_model.safetensors
 * (or any layout st_model_open accepts in dir; F32/F16/BF16, converted to f32), st_random_fill
 * values from seed at the shapes the config implies (WEIGHTS_CONFIG_ONLY: timings and memory
 * without the files), or fresh weights from seed (WEIGHTS_FRESH, RANDOM_FOR_TRAINING: to train). */
int vae_decoder_open(VaeDecoder **out, const char *dir, WeightSource source, uint64_t seed,
                     Error *e);
void vae_decoder_free(VaeDecoder *m);
/* tokens: [B, h*w, latent_channels*patch_h*patch_w], row-major over the (h, w) token grid ->
 * image: [B, out_channels, h*patch_h*2^(n_blocks-1), w*patch_w*2^(n_blocks-1)].
 * d loss / d tokens flows back through it (and to the weights when they are trainable). On a
 * tape with grad off each block's intermediates are freed as it ends: the tape keeps the image,
 * not every tensor the decode made. */
Var *vae_decode(Tape *t, const VaeDecoder *m, Var *tokens, int h, int w);
const VaeConfig *vae_decoder_config(const VaeDecoder *m);
/* The pixels one latent token becomes in the decoder's image: patch_h * 2^(n_blocks - 1) rows
 * by patch_w * 2^(n_blocks - 1) columns. */
void vae_decoder_token_size(const VaeDecoder *m, int *rows, int *cols);
/* Its weights: bn.running_mean and bn.running_var as buffers, the rest as parameters. */
Params *vae_decoder_params(const VaeDecoder *m);
/* Nested ag_checkpoints (see nn.c): stages (levels 1), then also layers (2), then also units
 * (3, the default on load): backward holds stage outputs plus one stage's intermediates (1), its
 * layer outputs and one layer's intermediates (2), or one layer's unit outputs and one unit's
 * intermediates (3), and runs each unit's forward 2, 3 or 4 times. 0 keeps every intermediate.
 * The gradients are the same bit for bit at every level. */
#define VAE_CHECKPOINT_LEVELS 3
void vae_decoder_set_checkpoint_levels(VaeDecoder *m, int levels);
/* An upper estimate of the memory a decode with grad of `batch` images of height x width holds
 * with `levels` of checkpoints, in f32 tensors the size of each stage's resnet output: without
 * checkpoints VAE_PLAIN_TENSORS_PER_RESNET per resnet (values, saved inputs, gradients, the
 * upsamplers' and attention's share); with them two per stage output held, plus the stage whose
 * backward adds the most: all its resnets plain (1), one per resnet and one layer plain (2), one
 * per resnet and VAE_UNIT_TENSORS_PER_LAYER for a layer (3); never more than the level before.
 * tests/test_vae.c checks that each bounds the measured tape peak within 2x; for the real config
 * at 256x256 the peaks are 577, 397, 301 and 301 MiB, the estimates 890, 596, 532, 404 (a
 * resnet holds its input and its first conv's output for backward, the normalised tensors and
 * the sums' operands being dropped: var_drop). */
#define VAE_PLAIN_TENSORS_PER_RESNET 5
#define VAE_UNIT_TENSORS_PER_LAYER 3
size_t vae_decode_bytes(const VaeDecoder *m, int levels, int batch, int height, int width);
/* The fewest levels whose estimate fits max_bytes (VAE_CHECKPOINT_LEVELS when none does), set
 * in m and returned: the fewer, the faster the backward (none: about half the time of all
 * three). The default budget (generate's --vae-memory) is vae_default_memory(). */
/* VAE_MEMORY_SHARE of `available` (memory_available(): the rest is for the transformer's parts,
 * the detector and the system), or VAE_MEMORY_UNKNOWN when available is 0 (unknown). On a 24 GB
 * machine with ~20 GB available a 512x512 decode then runs without checkpoints (its estimate is
 * 3560 MiB) and a 1024x1024 one with one level (9536 MiB); with 3 GB available a 512x512 decode
 * takes three levels (1616 MiB). */
#define VAE_MEMORY_SHARE 0.5
#define VAE_MEMORY_UNKNOWN ((size_t)1 << 30)
size_t vae_default_memory(size_t available);
int vae_decoder_checkpoint_for(VaeDecoder *m, int batch, int height, int width,
                               size_t max_bytes);

/* The VAE's layers, which train/vae_encoder.c's encoder builds on as the decoder does. */

/* norm1, SiLU, conv1 (3x3), norm2, SiLU, conv2 (3x3), plus the input (through the 1x1
 * conv_shortcut when the channel count changes). */
typedef struct VaeResnet {
    NormParams norm1, norm2;
    Conv2d conv1, conv2, conv_shortcut; /* conv_shortcut.weight NULL when in == out */
    int groups;
} VaeResnet;

/* One head over all channels, with a residual: x + to_out(attention(group_norm(x))). */
typedef struct VaeAttention {
    NormParams group_norm;
    Linear to_q, to_k, to_v, to_out;
    int groups;
} VaeAttention;

/* The keys both halves read from vae/config.json (a missing one is an error naming it). */
int vae_config_read(VaeConfig *c, const JsonValue *root, Error *e);
/* The channel list `key` (at most VAE_MAX_BLOCKS entries, each a positive multiple of groups)
 * into blocks and *n_blocks, with one `type` per entry in the list `types_key`. */
int vae_config_channels(const JsonValue *root, const char *key, const char *types_key,
                        const char *type, int64_t groups, int *blocks, int *n_blocks, Error *e);
/* <prefix>.{norm1,conv1,norm2,conv2,conv_shortcut}, in -> out channels. */
int vae_resnet_load(VaeResnet *r, Params *st, int in, int out, int groups, const char *prefix,
                    Error *e);
/* x: [B, in, H, W] -> [B, out, H, W], without checkpoints. */
Var *vae_resnet_forward(Tape *t, const VaeResnet *r, Var *x);
/* <prefix>.{group_norm,to_q,to_k,to_v,to_out.0}. */
int vae_attention_load(VaeAttention *a, Params *st, int channels, int groups, const char *prefix,
                       Error *e);
/* inputs[0]: [B, C, H, W] -> x + to_out(attention(group_norm(x))); ctx: the VaeAttention (a
 * CheckpointFn). */
Var *vae_attention_apply(Tape *t, Var **inputs, void *ctx);
/* x: [B, C, H, W] -> SiLU(GroupNorm(x)), the decoder's eps. */
Var *vae_norm_silu(Tape *t, const NormParams *n, int groups, Var *x);
/* bn.running_mean and bn.running_var over the packed channels: buffers of either half. */
int vae_latent_stats_load(const VaeConfig *c, Params *st, Var **mean, Var **var, Error *e);
/* std[i] = sqrt(var[i] + batch_norm_eps), or its reciprocal, into the [packed] tensor std. */
int vae_latent_std(const VaeConfig *c, const Var *var, bool reciprocal, Tensor *std, Error *e);
/* New latent statistics, [latent_channels*patch_h*patch_w] each, into the decoder's
 * bn.running_mean and bn.running_var and what it derives from them. */
int vae_decoder_set_latent_stats(VaeDecoder *m, const float *mean, const float *var, Error *e);

/* === SegFormer detector ===
 * The artifact detector: transformers' SegformerForSemanticSegmentation (a Mix Transformer
 * encoder of any size and the all-MLP decode head) behind DIAMOND's preprocessing, all as ag_* ops
 * so d loss / d image flows through every step. Upstream modeling_segformer.py is the spec:
 * dropout and drop-path are the identity (eval), every LayerNorm uses PyTorch's default eps 1e-5
 * (upstream ignores config.layer_norm_eps), the batch norm uses its running statistics. The
 * decode head's linear part (linear_c, linear_fuse, batch norm) is folded into one projection per
 * stage when loading: the same function up to rounding, without the 4D-channel concat. A detector
 * to train (segformer_open WEIGHTS_FRESH) has those projections as its linear_c parameters. */

#define SEGFORMER_MAX_STAGES 8

/* config.json (hidden_act "gelu" is the erf form; "gelu_new" / "gelu_pytorch_tanh" the tanh one)
 * and preprocessor_config.json (size {height, width} or one number, image_mean, image_std,
 * do_resize and do_normalize, both true when absent). */
typedef struct SegformerConfig {
    int stages;
    int hidden_sizes[SEGFORMER_MAX_STAGES], depths[SEGFORMER_MAX_STAGES];
    int heads[SEGFORMER_MAX_STAGES], sr_ratios[SEGFORMER_MAX_STAGES];
    int patch_sizes[SEGFORMER_MAX_STAGES], strides[SEGFORMER_MAX_STAGES];
    int mlp_ratios[SEGFORMER_MAX_STAGES];
    int decoder_hidden_size, num_labels;
    bool gelu_tanh;
    bool do_resize, do_normalize;
    int input_h, input_w; /* the network's input size when do_resize */
    float mean[3], std[3];
} SegformerConfig;

/* Every LayerNorm and the batch norm: PyTorch's default, as upstream passes none. */
#define SEGFORMER_NORM_EPS 1e-5f

typedef struct Segformer Segformer;

/* Reads <dir>/config.json and <dir>/preprocessor_config.json; an error names the file and key. */
int segformer_config_load(SegformerConfig *c, const char *dir, Error *e);
/* The detector dir's two config files describe, with the weights source names: a transformers
 * directory's files (one .safetensors file or an index; f32, f16 or bf16; a missing or mis-shaped
 * tensor is an error naming it), st_random_fill values from seed at the shapes the config implies
 * (WEIGHTS_CONFIG_ONLY: timings and memory without the files), or fresh weights from seed
 * (WEIGHTS_FRESH, RANDOM_FOR_TRAINING), to train: its decode head is not folded but each stage's
 * decode_head.linear_c.{i}.proj (weight and bias) as a parameter, with linear_fuse [I .. I] and the
 * batch norm the identity, which every folded head is equal to (the same function class as the
 * upstream head with its batch norm frozen). */
int segformer_open(Segformer **out, const char *dir, WeightSource source, uint64_t seed,
                   Error *e);
void segformer_free(Segformer *m);
const SegformerConfig *segformer_config(const Segformer *m);
/* Its encoder's weights and the classifier as parameters, and the decode head's linear_c when
 * opened WEIGHTS_FRESH; a loaded decode head (folded), and the preprocessing, as constants. */
Params *segformer_params(const Segformer *m);
/* true when the decode head is linear_c as segformer_open WEIGHTS_FRESH makes it (trainable,
 * savable), false when it was folded on loading. */
bool segformer_head_is_trainable(const Segformer *m);
/* An execution strategy: by default the decode head runs folded (linear_c, linear_fuse and the
 * batch norm as one projection per stage, summed: fewer operations, the same function up to
 * rounding); unfolded, it runs as upstream writes it (linear_c, the concatenation, linear_fuse,
 * the batch norm), to compare its activations with transformers'. A fresh head cannot unfold. */
int segformer_set_head_unfolded(Segformer *m, bool unfolded, Error *e);
/* An execution strategy: by default each encoder layer runs under ag_checkpoint, keeping only its
 * input for the backward and recomputing the rest there (MiT-b5 at 512x512, forward + backward,
 * one thread: a tape peak of 686 MiB against 2872 MiB, 13.8 s against 14.8 s); without, the
 * layers run straight on the tape as upstream's autograd does, to compare activations and
 * gradients with it. The results are the same bit for bit. */
void segformer_set_layer_checkpoints(Segformer *m, bool checkpoint);

/* image: [B, 3, H, W] in [-1, 1] -> mask: [B, L, H, W] in [0, 1] (L = num_labels), the sigmoid
 * map at 1/4 of the network's input resized bilinearly to the image. *mask_small (when not NULL)
 * gets that map, [B, L, h/4, w/4]: backward releases it unless the caller calls var_keep on it.
 * Each encoder layer runs under ag_checkpoint unless segformer_set_layer_checkpoints says not. */
Var *segformer_forward(Tape *t, const Segformer *m, Var *image, Var **mask_small);
/* The same network's logits before the sigmoid, for training losses.
 * image: [B, 3, H, W] in [-1, 1] -> logits: [B, L, h/4, w/4] (h, w: the network's input) */
Var *segformer_forward_logits(Tape *t, const Segformer *m, Var *image);

/* An upper bound on the tape's peak, in bytes, over segformer_forward and a backward to a batch
 * of height x width images, as one guided step runs them (tests/test_segformer.c checks it within
 * 2x of the measured peak), with the layer checkpoints (the default). */
#define SEGFORMER_LAYER_TENSORS 4
#define SEGFORMER_STAGE_TENSORS 5
#define SEGFORMER_IMAGE_TENSORS 4
size_t segformer_forward_bytes(const Segformer *m, int batch, int height, int width);

/* === the DIAMOND sampler ===
 * DIAMOND's guided sampling (arXiv 2602.00883, as gmum/DIAMOND's FLUX.2 loop does it). Per step:
 * the flow model's velocity v (no gradient), the clean estimate x0 = x_t - sigma v, the detector's
 * mask on vae_decode(x0), an artifact loss L on it, g = dL/dx0 (= dL/dx_t with v held constant),
 * and the Euler step pushed against g:
 *     x_next = x_t + (sigma_next - sigma) v - lambda_i g / (||g|| + 1e-6)
 * The norm is taken per sample (the official code, batch 1 only, takes it over the batch). */

typedef enum LambdaType {
    LAMBDA_CONSTANT, LAMBDA_LINEAR, LAMBDA_POWER, LAMBDA_COSINE, LAMBDA_HARD_THEN_EXP,
    LAMBDA_EXPONENTIAL,
} LambdaType;

/* The guidance strength lambda_i of step i of N, with the official formulas (see
 * lambda_schedule_at). Each type reads only its own fields. */
typedef struct LambdaSchedule {
    LambdaType type;
    double value;             /* constant */
    double start, end, power; /* linear, cosine (no power), power, exponential, hard_then_exp */
    double after;             /* hard_then_exp */
    int warmup, cooldown;     /* exponential */
} LambdaSchedule;

/* "TYPE" or "TYPE:key=value,..." (e.g. "power:start=25,end=1,power=2"); keys left out take the
 * official config's values: constant value=0; linear, cosine start=12,end=1; power start=12,
 * end=1,power=2; hard_then_exp start=30,after=2,power=2; exponential start=30,end=1,power=5,
 * warmup=5,cooldown=12. An unknown type or key or a bad number is an error naming it. */
int lambda_schedule_parse(LambdaSchedule *s, const char *spec, Error *e);
/* lambda_i for 0 <= i < steps. Where the official formulas divide by zero (u = i / (N - 1) at
 * N = 1; exponential's u = (i - warmup) / (N - warmup - cooldown - 1) with one step left in the
 * window) u is 0: the only step gets the start value. */
double lambda_schedule_at(const LambdaSchedule *s, int i, int steps);

typedef enum ArtifactLossType { ARTIFACT_LOSS_MSE, ARTIFACT_LOSS_POWER, ARTIFACT_LOSS_FOCAL }
    ArtifactLossType;

/* On the mask m clamped to [0, 1]: mse m^2; power m^gamma; focal
 * -alpha (1 - m)^gamma log(1 - m + 1e-6), the official weight kept as it is (it is large where
 * m is small, the opposite of the usual focal term). */
typedef struct ArtifactLoss {
    ArtifactLossType type;
    double gamma, alpha;
} ArtifactLoss;

/* "mse", "power[:gamma=G]" (default 2), "focal[:gamma=G,alpha=A]" (defaults 2 and 1). */
int artifact_loss_parse(ArtifactLoss *l, const char *spec, Error *e);
/* mask: [B, ..] -> [1]: the sum over samples of each sample's mean over its pixels, so that a
 * sample's gradient does not depend on the others in the batch (for B = 1, the official mean). */
Var *artifact_loss_apply(Tape *t, const ArtifactLoss *l, Var *mask);

/* FLUX.2's "empirical mu" for image_seq_len latent tokens and N steps. */
double flux2_empirical_mu(int image_seq_len, int steps);
/* sigmas[0 .. steps]: linspace(1, 1/N, N) shifted by exp(mu) / (exp(mu) + (1/s - 1)), computed
 * in double and rounded to float (as the scheduler stores them), then sigmas[steps] = 0. */
void flux2_sigmas_shifted(int steps, double mu, float *sigmas);
/* The same with FLUX.2's empirical mu for image_seq_len tokens (the pipeline's schedule). */
void flux2_sigmas(int steps, int image_seq_len, float *sigmas);

typedef struct SamplerOptions {
    int steps;
    bool guide;            /* false: plain Euler sampling, the detector never runs */
    LambdaSchedule lambda;
    ArtifactLoss loss;
    float guidance_scale;  /* distilled guidance for models with guidance_embeds, else unused */
    float cfg_scale;       /* > 1: classifier-free guidance, as FLUX.2 klein base pipelines
                              apply their guidance_scale: v = v_neg + cfg_scale (v - v_neg),
                              v_neg the velocity on the negative prompt (two transformer passes
                              a step); <= 1: off (distilled models) */
    float gate;            /* > 0: a sample whose detector max (the map at 1/4 of the detector's
                              input) is below gate gets no shift at that step; 0: off (official) */
    bool set_mu;           /* the schedule's shift is mu below, not FLUX.2's empirical mu for
                              the token count (made for thousands of tokens: at a few dozen it
                              leaves the last sigma near 0.3 and little room for guidance) */
    double mu;
    bool inspect_every_step; /* also run the detector and its backward where they would be
                                skipped (lambda_i = 0, or a baseline run given a detector), so
                                every step reports mask and grad; the latent moves exactly as
                                without it */
} SamplerOptions;

/* What one step computed, handed to the caller before the latent moves on. */
typedef struct SamplerStep {
    int index, steps;
    float sigma, sigma_next, lambda;
    const Tensor *x_t, *v, *x0; /* [B, T, C]; v after classifier-free guidance */
    const Tensor *mask;         /* [B, labels, H, W] the detector's mask; NULL when it did not
                                   run (no guidance, or lambda_i = 0 as upstream skips it,
                                   unless inspect_every_step) */
    const Tensor *grad;         /* [B, T, C] raw dL/dx0, zero for gated samples; NULL when no
                                   backward ran */
    const bool *shifted;        /* [B] whether the sample was moved along its gradient */
} SamplerStep;

/* Returns 0 to go on, or -1 with a message in e to stop the sampler. */
typedef int (*SamplerStepFn)(const SamplerStep *step, void *ctx, Error *e);

/* Runs o->steps steps on latent ([B, h*w, C] packed tokens: the initial noise in, the final
 * latent out) with txt [B, L, joint_attention_dim] and, when o->cfg_scale > 1, the negative
 * prompt's negative [B, L', joint_attention_dim] (else unused, may be NULL). detector may be
 * NULL when !o->guide (and is then used only by inspect_every_step). on_step (may be NULL) sees
 * every step. */
int sampler_run(const Flux2 *flow, const VaeDecoder *vae, const Segformer *detector,
                const SamplerOptions *o, const Tensor *txt, const Tensor *negative,
                Tensor *latent, int h, int w, SamplerStepFn on_step, void *ctx, Error *e);

/* === metrics ===
 * DIAMOND's evaluation metrics as gmum/DIAMOND's src/tasks/metrics.py computes them, from the
 * saved 8-bit images ([H, W, 3], the baseline and the guided run from the same noise) and the
 * detector's sigmoid maps at 1/4 of its input ([h, w], one label). Sums over pixels are exact
 * (integers); the means are in double, where the official code uses float32. */

/* The oracle's glyphs of one image, when it found as many as the prompt has symbols (else all 0):
 * how many, how many it read as some symbol, how many as the prompt's symbol at that place. */
typedef struct GlyphCounts {
    int n, legible, right;
} GlyphCounts;

/* One image pair's metrics. Fractions here; metrics_summarize makes percentages. */
typedef struct ImageMetrics {
    float baseline_max, guided_max;                  /* the maps' maxima */
    bool baseline_artifact, guided_artifact;         /* map max >= threshold */
    double baseline_pixel_ratio, guided_pixel_ratio; /* share of map values >= threshold */
    double mae;                  /* mean |guided - baseline| over pixels and channels, 0..255 */
    double mae_a, mae_na;        /* the same inside / outside the baseline's artifact mask; a
                                    region with no pixels gives 0 (official clamp_min(1)) */
    int64_t artifact_pixels;     /* pixels inside the baseline's mask */
    /* The oracle's reading of both images (metrics_oracle; the embedded words world only) */
    bool oracle;                           /* it ran */
    bool baseline_legible, guided_legible; /* every glyph a legible symbol: no oracle artifact */
    bool baseline_reads, guided_reads;     /* legible and reading as the prompt */
    GlyphCounts glyphs[2];                 /* baseline, guided */
} ImageMetrics;

/* The baseline's artifact mask: map [h, w] resized bilinearly (align_corners=False) to
 * [H, W], 1 where >= threshold, else 0. -> mask: [H, W] */
int metrics_artifact_mask(const float *map, int h, int w, int H, int W, float threshold,
                          uint8_t *mask, Error *e);

/* The metrics of one pair. baseline, guided: [H, W, 3]; baseline_map, guided_map: [h, w]. */
int metrics_image(const uint8_t *baseline, const uint8_t *guided, int H, int W,
                  const float *baseline_map, const float *guided_map, int h, int w,
                  float threshold, ImageMetrics *out, Error *e);

/* The paper's table over n images: every figure is the plain mean over images (an image with
 * no artifact pixels adds 0 to mae_a), frequencies and ratios in percent; the oracle's figures
 * over the oracle_n images it read. */
typedef struct EvalSummary {
    int64_t n;
    double baseline_artifact_freq, baseline_pixel_ratio; /* % */
    double guided_artifact_freq, guided_pixel_ratio;     /* % */
    double mae, mae_a, mae_na;                           /* 0..255 */
    int64_t oracle_n;
    double baseline_oracle_artifact_freq, guided_oracle_artifact_freq; /* % with an illegible glyph */
    double baseline_oracle_read_acc, guided_oracle_read_acc;           /* % reading as the prompt */
    /* per glyph, baseline and guided, over the images whose glyph count is the prompt's: how
     * many images and glyphs, % of those glyphs legible as some symbol, % as the prompt's */
    int64_t glyph_images[2], glyph_n[2];
    double glyph_legible[2], glyph_right[2];
} EvalSummary;

/* Sums in the order given, so equal lists give equal summaries bit for bit. */
void metrics_summarize(const ImageMetrics *items, size_t n, EvalSummary *out);

#endif
