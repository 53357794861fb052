"""Tiny FLUX.2 transformer fixtures and golden data for tests/test_flux2.c, from PyTorch.

The model is a float64 re-implementation of diffusers' Flux2Transformer2DModel
(models/transformers/transformer_flux2.py, with Timesteps / TimestepEmbedding /
get_1d_rotary_pos_embed / apply_rotary_emb from embeddings.py and AdaLayerNormContinuous from
normalization.py), written from the upstream source with its parameter names and config keys.
The klein pipeline (pipelines/flux2/pipeline_flux2_klein.py) passes timestep = sigma (it divides
the scheduler's sigma * 1000 by 1000) and the model multiplies by 1000 again; image token (y, x)
has ids (0, y, x, 0), text token l has ids (0, 0, 0, l); guidance is None for klein.

Writes (deterministic: re-running gives identical bytes):
  tests/fixtures/tiny-flux2/transformer/           f32, sharded over 2 files with an index,
                                                   klein-like (guidance_embeds false)
  tests/fixtures/tiny-flux2-bf16/transformer/      the same weights in bf16 (one file)
  tests/fixtures/tiny-flux2-guidance/transformer/  f32, guidance_embeds true, one file
  tests/golden/flux2.safetensors:
    tokens1 [1, 15, 16], txt1 [1, 7, 24]            grid h=3, w=5, text length 7
    v1_a, v1_b                                      velocity at sigma 0.7, then 0.3
    tokens2 [2, 15, 16], txt2 [2, 7, 24], v2        sigmas (0.9, 0.2) in one batch
    v_bf16                                          bf16 fixture at sigma 0.7 (weights as rounded)
    v_bf16_products                                 tiny-flux2 at sigma 0.7 with every linear's
                                                    input and weight rounded to bf16 (through
                                                    f32) and summed exactly: --precision bf16
    v_guidance                                      guidance fixture at sigma 0.5, guidance 3.5
    schedule.<steps>_<seq>                          the klein sigmas (N values, then 0)
    tokens_big [1, 272, 16], v_big                  grid h=17, w=16 with txt1 at sigma 0.4: more
                                                    tokens than one of nn.c's chunks (256)
    grad.probe [2, 15, 16]                          r: the loss sum(r * v) of tokens2, txt2 at
                                                    sigmas (0.9, 0.2) ...
    grad.tokens, grad.txt, grad.<param name>        ... and its gradients (GRAD_PARAMS)
Run with /usr/bin/python3 (Debian's torch).
"""
import contextlib
import math
import os

import torch

import safetensors_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
F64 = torch.float64

CONFIG = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 4, 4, 4],
    "eps": 1e-06,
    "guidance_embeds": False,
    "in_channels": 16,
    "joint_attention_dim": 24,
    "mlp_ratio": 3.0,
    "num_attention_heads": 2,
    "num_layers": 2,
    "num_single_layers": 2,
    "out_channels": None,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}


# ---- weights ---------------------------------------------------------------------------------

def weight_shapes(cfg):
    """Every tensor name of the model with its shape, in upstream module order."""
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    hd = cfg["attention_head_dim"]
    mlp = int(dim * cfg["mlp_ratio"])
    out = cfg["patch_size"] ** 2 * (cfg["out_channels"] or cfg["in_channels"])
    tgc = cfg["timestep_guidance_channels"]
    shapes = {}
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if cfg["guidance_embeds"] else [])
    for e in embedders:
        shapes[f"time_guidance_embed.{e}.linear_1.weight"] = [dim, tgc]
        shapes[f"time_guidance_embed.{e}.linear_2.weight"] = [dim, dim]
    shapes["double_stream_modulation_img.linear.weight"] = [6 * dim, dim]
    shapes["double_stream_modulation_txt.linear.weight"] = [6 * dim, dim]
    shapes["single_stream_modulation.linear.weight"] = [3 * dim, dim]
    shapes["x_embedder.weight"] = [dim, cfg["in_channels"]]
    shapes["context_embedder.weight"] = [dim, cfg["joint_attention_dim"]]
    for i in range(cfg["num_layers"]):
        p = f"transformer_blocks.{i}."
        for n in ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                  "to_add_out"]:
            shapes[p + f"attn.{n}.weight"] = [dim, dim]
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"]:
            shapes[p + f"attn.{n}.weight"] = [hd]
        for ff in ["ff", "ff_context"]:
            shapes[p + f"{ff}.linear_in.weight"] = [2 * mlp, dim]
            shapes[p + f"{ff}.linear_out.weight"] = [dim, mlp]
    for i in range(cfg["num_single_layers"]):
        p = f"single_transformer_blocks.{i}.attn."
        shapes[p + "to_qkv_mlp_proj.weight"] = [3 * dim + 2 * mlp, dim]
        shapes[p + "to_out.weight"] = [dim, dim + mlp]
        shapes[p + "norm_q.weight"] = [hd]
        shapes[p + "norm_k.weight"] = [hd]
    shapes["norm_out.linear.weight"] = [2 * dim, dim]
    shapes["proj_out.weight"] = [out, dim]
    return shapes


def make_weights(cfg, gen):
    """Seeded random weights, rounded to float32, scaled so activations stay O(1)."""
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:  # RMSNorm scales around 1
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=F64)
        else:
            gain = 0.5 if "modulation" in name or "norm_out" in name else 1.0
            w = gain * torch.randn(shape, generator=gen, dtype=F64) / math.sqrt(shape[1])
        weights[name] = w.float().double()
    return weights


def bf16_rounded(weights):
    return {k: v.to(torch.bfloat16).double() for k, v in weights.items()}


# ---- the model -------------------------------------------------------------------------------

ROUND_TO_BF16 = False  # inside bf16_products()


@contextlib.contextmanager
def bf16_products():
    """linear() as diamond's PRECISION_BF16 computes it: the input (held in f32 there) and the
    weight rounded to bf16, the products summed exactly."""
    global ROUND_TO_BF16
    ROUND_TO_BF16 = True
    try:
        yield
    finally:
        ROUND_TO_BF16 = False


def linear(w, x):
    if ROUND_TO_BF16:
        x = x.float().bfloat16().double()
        w = w.float().bfloat16().double()
    return x @ w.T


def layernorm(x, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def timestep_proj(t, channels):
    """Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [cos | sin], max period 10000."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=F64) / half)
    arg = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if channels % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def rope_tables(ids, axes_dims, theta):
    """ids: [S, n_axes] -> cos, sin: [S, D/2], the axes' frequencies concatenated in order."""
    cos, sin = [], []
    for a, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=F64) / d)
        angle = ids[:, a, None] * freqs[None, :]
        cos.append(torch.cos(angle))
        sin.append(torch.sin(angle))
    return torch.cat(cos, -1), torch.cat(sin, -1)


def apply_rope(x, cos, sin):
    """x: [B, S, H, D], rotation of adjacent pairs (x[2i], x[2i+1]) by the angle of pair i."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def attention(q, k, v):
    """q, k, v: [B, S, H, D] -> [B, S, H*D]"""
    scale = 1.0 / math.sqrt(q.shape[-1])
    probs = torch.softmax(scale * torch.einsum("bihd,bjhd->bhij", q, k), dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out.flatten(2)


def swiglu(x):
    half = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :half]) * x[..., half:]


def modulate(x, shift, scale):
    return (1 + scale[:, None, :]) * x + shift[:, None, :]


def chunks(mod, n):
    return torch.chunk(mod, n, dim=-1)


def double_block(W, p, cfg, img, txt, mod_img, mod_txt, cos, sin):
    eps, hd = cfg["eps"], cfg["attention_head_dim"]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks(mod_img, 6)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = chunks(mod_txt, 6)
    n_img = modulate(layernorm(img, eps), shift_msa, scale_msa)
    n_txt = modulate(layernorm(txt, eps), c_shift_msa, c_scale_msa)

    def heads(x, name):
        return linear(W[p + f"attn.{name}.weight"], x).unflatten(-1, (-1, hd))

    q = rmsnorm(heads(n_img, "to_q"), W[p + "attn.norm_q.weight"], eps)
    k = rmsnorm(heads(n_img, "to_k"), W[p + "attn.norm_k.weight"], eps)
    v = heads(n_img, "to_v")
    cq = rmsnorm(heads(n_txt, "add_q_proj"), W[p + "attn.norm_added_q.weight"], eps)
    ck = rmsnorm(heads(n_txt, "add_k_proj"), W[p + "attn.norm_added_k.weight"], eps)
    cv = heads(n_txt, "add_v_proj")
    q = apply_rope(torch.cat([cq, q], 1), cos, sin)
    k = apply_rope(torch.cat([ck, k], 1), cos, sin)
    out = attention(q, k, torch.cat([cv, v], 1))
    L = txt.shape[1]
    txt_attn = linear(W[p + "attn.to_add_out.weight"], out[:, :L])
    img_attn = linear(W[p + "attn.to_out.0.weight"], out[:, L:])

    img = img + gate_msa[:, None] * img_attn
    ff = linear(W[p + "ff.linear_out.weight"],
                swiglu(linear(W[p + "ff.linear_in.weight"],
                              modulate(layernorm(img, eps), shift_mlp, scale_mlp))))
    img = img + gate_mlp[:, None] * ff
    txt = txt + c_gate_msa[:, None] * txt_attn
    ff = linear(W[p + "ff_context.linear_out.weight"],
                swiglu(linear(W[p + "ff_context.linear_in.weight"],
                              modulate(layernorm(txt, eps), c_shift_mlp, c_scale_mlp))))
    txt = txt + c_gate_mlp[:, None] * ff
    return img, txt


def single_block(W, p, cfg, x, mod, cos, sin):
    eps, hd = cfg["eps"], cfg["attention_head_dim"]
    dim = cfg["num_attention_heads"] * hd
    shift, scale, gate = chunks(mod, 3)
    proj = linear(W[p + "attn.to_qkv_mlp_proj.weight"], modulate(layernorm(x, eps), shift, scale))
    q, k, v = [c.unflatten(-1, (-1, hd)) for c in torch.split(proj[..., :3 * dim], dim, dim=-1)]
    q = apply_rope(rmsnorm(q, W[p + "attn.norm_q.weight"], eps), cos, sin)
    k = apply_rope(rmsnorm(k, W[p + "attn.norm_k.weight"], eps), cos, sin)
    hidden = torch.cat([attention(q, k, v), swiglu(proj[..., 3 * dim:])], dim=-1)
    return x + gate[:, None] * linear(W[p + "attn.to_out.weight"], hidden)


def time_embed(W, name, t, cfg):
    proj = timestep_proj(t * 1000.0, cfg["timestep_guidance_channels"])
    h = torch.nn.functional.silu(linear(W[f"time_guidance_embed.{name}.linear_1.weight"], proj))
    return linear(W[f"time_guidance_embed.{name}.linear_2.weight"], h)


def forward(W, cfg, tokens, h, w, txt, sigma, guidance=None):
    """tokens: [B, h*w, in], txt: [B, L, joint_attention_dim], sigma: [B] -> [B, h*w, out]"""
    temb = time_embed(W, "timestep_embedder", sigma, cfg)
    if guidance is not None and cfg["guidance_embeds"]:
        temb = temb + time_embed(W, "guidance_embedder", guidance, cfg)
    silu_t = torch.nn.functional.silu(temb)
    mod_img = linear(W["double_stream_modulation_img.linear.weight"], silu_t)
    mod_txt = linear(W["double_stream_modulation_txt.linear.weight"], silu_t)
    mod_single = linear(W["single_stream_modulation.linear.weight"], silu_t)

    img = linear(W["x_embedder.weight"], tokens)
    ctx = linear(W["context_embedder.weight"], txt)
    L = txt.shape[1]
    txt_ids = torch.tensor([[0, 0, 0, l] for l in range(L)], dtype=F64)
    img_ids = torch.tensor([[0, y, x, 0] for y in range(h) for x in range(w)], dtype=F64)
    cos, sin = rope_tables(torch.cat([txt_ids, img_ids]), cfg["axes_dims_rope"], cfg["rope_theta"])

    for i in range(cfg["num_layers"]):
        img, ctx = double_block(W, f"transformer_blocks.{i}.", cfg, img, ctx, mod_img, mod_txt,
                                cos, sin)
    x = torch.cat([ctx, img], dim=1)
    for i in range(cfg["num_single_layers"]):
        x = single_block(W, f"single_transformer_blocks.{i}.", cfg, x, mod_single, cos, sin)
    x = x[:, L:]
    scale, shift = torch.chunk(linear(W["norm_out.linear.weight"], silu_t), 2, dim=-1)
    x = layernorm(x, cfg["eps"]) * (1 + scale[:, None]) + shift[:, None]
    return linear(W["proj_out.weight"], x)


# ---- the sampler's schedule -------------------------------------------------------------------

def empirical_mu(seq, steps):
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if seq > 4300:
        return a2 * seq + b2
    m200 = a2 * seq + b2
    m10 = a1 * seq + b1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return a * steps + b


def klein_sigmas(steps, seq):
    """linspace(1, 1/N, N) shifted by exp(mu) / (exp(mu) + (1/s - 1)), then a final 0, as the
    FlowMatchEulerDiscreteScheduler with use_dynamic_shifting (exponential time shift)."""
    mu = empirical_mu(seq, steps)
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=F64)
    s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return torch.cat([s, torch.zeros(1, dtype=F64)])


# ---- files -------------------------------------------------------------------------------------

def write_config(directory, cfg):
    safetensors_file.write_json(os.path.join(directory, "config.json"), cfg, sort_keys=True)


def write_sharded(directory, weights, shards=2):
    names = list(weights)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per:(s + 1) * per]
        safetensors_file.write(os.path.join(directory, file), [(n, weights[n]) for n in part])
        for n in part:
            weight_map[n] = file
            total += weights[n].numel() * 4
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    safetensors_file.write_json(
        os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json"), index)


def write_single(directory, weights, dtype):
    safetensors_file.write(os.path.join(directory, "diffusion_pytorch_model.safetensors"), weights,
                           dtype)


# A few weights of each kind whose d loss / d weight the C test compares.
GRAD_PARAMS = [
    "x_embedder.weight",
    "context_embedder.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight",
    "double_stream_modulation_img.linear.weight",
    "single_stream_modulation.linear.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "transformer_blocks.0.attn.norm_added_k.weight",
    "transformer_blocks.1.attn.to_add_out.weight",
    "transformer_blocks.0.ff.linear_in.weight",
    "transformer_blocks.1.ff_context.linear_out.weight",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
    "single_transformer_blocks.1.attn.to_out.weight",
    "single_transformer_blocks.1.attn.norm_q.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
]


def gradients(weights, cfg, tokens, h, w, txt, sigma, probe):
    """d sum(probe * v) / d (tokens, txt, every weight), in float64."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    tokens = tokens.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    (probe * forward(leaves, cfg, tokens, h, w, txt, sigma)).sum().backward()
    out = [("grad.tokens", tokens.grad), ("grad.txt", txt.grad)]
    return out + [("grad." + k, leaves[k].grad) for k in GRAD_PARAMS]


def main():
    gen = torch.Generator().manual_seed(2026)
    weights = make_weights(CONFIG, gen)
    guided_cfg = dict(CONFIG, guidance_embeds=True, num_layers=1, num_single_layers=1)
    guided_weights = make_weights(guided_cfg, gen)

    fixtures = os.path.join(ROOT, "tests", "fixtures")
    d = os.path.join(fixtures, "tiny-flux2", "transformer")
    write_config(d, CONFIG)
    write_sharded(d, weights)
    d = os.path.join(fixtures, "tiny-flux2-bf16", "transformer")
    write_config(d, CONFIG)
    write_single(d, weights, "BF16")
    d = os.path.join(fixtures, "tiny-flux2-guidance", "transformer")
    write_config(d, guided_cfg)
    write_single(d, guided_weights, "F32")

    h, w, L = 3, 5, 7
    cin, jd = CONFIG["in_channels"], CONFIG["joint_attention_dim"]

    def inputs(B):
        return (torch.randn(B, h * w, cin, generator=gen, dtype=F64).float().double(),
                torch.randn(B, L, jd, generator=gen, dtype=F64).float().double())

    def sig(*v):
        return torch.tensor(v, dtype=F64).float().double()

    tokens1, txt1 = inputs(1)
    tokens2, txt2 = inputs(2)
    golden = [
        ("tokens1", tokens1), ("txt1", txt1),
        ("v1_a", forward(weights, CONFIG, tokens1, h, w, txt1, sig(0.7))),
        ("v1_b", forward(weights, CONFIG, tokens1, h, w, txt1, sig(0.3))),
        ("tokens2", tokens2), ("txt2", txt2),
        ("v2", forward(weights, CONFIG, tokens2, h, w, txt2, sig(0.9, 0.2))),
        ("v_bf16", forward(bf16_rounded(weights), CONFIG, tokens1, h, w, txt1, sig(0.7))),
        ("v_guidance", forward(guided_weights, guided_cfg, tokens1, h, w, txt1, sig(0.5),
                               guidance=sig(3.5))),
    ]
    with bf16_products():
        golden.append(("v_bf16_products", forward(weights, CONFIG, tokens1, h, w, txt1, sig(0.7))))
    for steps, seq in [(4, 4096), (4, 1024), (50, 4096), (4, 8192), (1, 15)]:
        golden.append((f"schedule.{steps}_{seq}", klein_sigmas(steps, seq)))
    hb, wb = 17, 16
    tokens_big = torch.randn(1, hb * wb, cin, generator=gen, dtype=F64).float().double()
    golden += [("tokens_big", tokens_big),
               ("v_big", forward(weights, CONFIG, tokens_big, hb, wb, txt1, sig(0.4)))]
    probe = torch.randn(2, h * w, cin, generator=gen, dtype=F64).float().double()
    golden += [("grad.probe", probe)]
    golden += gradients(weights, CONFIG, tokens2, h, w, txt2, sig(0.9, 0.2), probe)
    safetensors_file.write(os.path.join(ROOT, "tests", "golden", "flux2.safetensors"), golden)


if __name__ == "__main__":
    main()
