#!/usr/bin/python3
"""Reference for the FLUX.2 VAE decoder (nn.c's vae section): a float64 torch re-implementation
of diffusers' AutoencoderKLFlux2 decoder path (autoencoder_kl_flux2.py, autoencoders/vae.py
Decoder, UNetMidBlock2D, UpDecoderBlock2D, ResnetBlock2D, Upsample2D, AttnProcessor2_0) and of
the FLUX.2 pipeline's latent unpacking (pipeline_flux2_klein.py: _unpack_latents_with_ids, the
bn de-normalisation, _unpatchify_latents), written from the upstream source.

The encoder half (vae.py Encoder, DownEncoderBlock2D, Downsample2D with padding 0, the
mid block, double_z, quant_conv, DiagonalGaussianDistribution's mean and clamped logvar) and
the pipeline's packing of an encoded image (pipeline_flux2_klein.py: _encode_vae_image's
argmax latents, _patchify_latents, the bn normalisation, _pack_latents) likewise.

Writes, deterministically:
  tests/fixtures/tiny-flux2/vae/       config.json + diffusion_pytorch_model.safetensors (F32):
                                       decoder and (from a generator of their own, so the
                                       decoder's tensors and goldens do not move) encoder weights
  tests/fixtures/tiny-flux2-bf16/vae/  the decoder weights rounded to BF16
  tests/golden/vae.safetensors         tokens, r, image and d sum(image * r) / d tokens
  tests/golden/vae_encoder.safetensors the encoder's moments and tokens and d loss / d image for
                                       a weighted sum of them; the reconstruction loss
                                       mean((decode(encode(x)) - x)^2), d loss / d image and
                                       d loss / d every encoder and decoder parameter

Run with /usr/bin/python3 (Debian's torch). No pip packages: safetensors is written by hand.

`ref_vae.py --real-random DIR` instead writes the real FLUX.2 VAE config (upstream values) with
random BF16 decoder weights into DIR (about 100 MB), for tools/vae_peak.c's memory measurement.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import safetensors_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NORM_EPS = 1e-6  # diffusers' Decoder fixes every GroupNorm eps at 1e-6

CONFIG = {
    "_class_name": "AutoencoderKLFlux2",
    "act_fn": "silu",
    "batch_norm_eps": 0.0001,
    "batch_norm_momentum": 0.1,
    "block_out_channels": [8, 16, 24],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "mid_block_add_attention": True,
    "norm_num_groups": 4,
    "out_channels": 3,
    "patch_size": [2, 2],
    "sample_size": 32,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
}

# The FLUX.2 [klein] / [dev] vae/config.json values.
REAL_CONFIG = dict(CONFIG, block_out_channels=[128, 256, 512, 512],
                   down_block_types=["DownEncoderBlock2D"] * 4,
                   up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=32,
                   layers_per_block=2, norm_num_groups=32, sample_size=1024)


def write_fixture(directory, weights, dtype, config=CONFIG):
    safetensors_file.write_json(os.path.join(directory, "config.json"), config, sort_keys=True)
    safetensors_file.write(os.path.join(directory, "diffusion_pytorch_model.safetensors"), weights,
                           dtype)


# ---- random weights with the real names; scaled so activations stay O(1) ----

def make_weights(config, gen):
    w = {}

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale

    def conv(name, cin, cout, k, gain=1.0):
        w[name + ".weight"] = randn(cout, cin, k, k, scale=gain * (cin * k * k) ** -0.5)
        w[name + ".bias"] = randn(cout, scale=0.1 * gain)

    def norm(name, c):
        w[name + ".weight"] = 1.0 + randn(c, scale=0.2)
        w[name + ".bias"] = randn(c, scale=0.2)

    def linear(name, cin, cout):
        w[name + ".weight"] = randn(cout, cin, scale=cin ** -0.5)
        w[name + ".bias"] = randn(cout, scale=0.1)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".conv_shortcut", cin, cout, 1)

    lc = config["latent_channels"]
    packed = lc * config["patch_size"][0] * config["patch_size"][1]
    blocks = config["block_out_channels"]
    top = blocks[-1]
    w["bn.running_mean"] = randn(packed, scale=0.3)
    # Variances down to 1e-3 make the eps values visible: batch_norm_eps 1e-4 in the latent
    # statistics, and (through a quiet conv_in) the GroupNorm eps 1e-6 of the mid block: using
    # one eps for the other moves the result by percents, far outside the test's tolerance.
    u = torch.rand(packed, generator=gen, dtype=torch.float64)
    w["bn.running_var"] = torch.exp(np.log(1e-3) + u * np.log(2e3)).float()
    conv("post_quant_conv", lc, lc, 1)
    conv("decoder.conv_in", lc, top, 3, gain=0.03)
    resnet("decoder.mid_block.resnets.0", top, top)
    prefix = "decoder.mid_block.attentions.0"
    norm(prefix + ".group_norm", top)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        linear(prefix + "." + proj, top, top)
    resnet("decoder.mid_block.resnets.1", top, top)
    cin = top
    for b, cout in enumerate(reversed(blocks)):
        for r in range(config["layers_per_block"] + 1):
            resnet("decoder.up_blocks.%d.resnets.%d" % (b, r), cin if r == 0 else cout, cout)
        if b < len(blocks) - 1:
            conv("decoder.up_blocks.%d.upsamplers.0.conv" % b, cout, cout, 3)
        cin = cout
    norm("decoder.conv_norm_out", blocks[0])
    conv("decoder.conv_out", blocks[0], config["out_channels"], 3)
    return w


def make_encoder_weights(config, gen):
    """The encoder's tensors (and quant_conv), scaled like make_weights'."""
    w = {}

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale

    def conv(name, cin, cout, k):
        w[name + ".weight"] = randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5)
        w[name + ".bias"] = randn(cout, scale=0.1)

    def norm(name, c):
        w[name + ".weight"] = 1.0 + randn(c, scale=0.2)
        w[name + ".bias"] = randn(c, scale=0.2)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".conv_shortcut", cin, cout, 1)

    blocks = config["block_out_channels"]
    top, moments = blocks[-1], 2 * config["latent_channels"]
    conv("encoder.conv_in", config["in_channels"], blocks[0], 3)
    cin = blocks[0]
    for b, cout in enumerate(blocks):
        for r in range(config["layers_per_block"]):
            resnet("encoder.down_blocks.%d.resnets.%d" % (b, r), cin if r == 0 else cout, cout)
        if b < len(blocks) - 1:
            conv("encoder.down_blocks.%d.downsamplers.0.conv" % b, cout, cout, 3)
        cin = cout
    resnet("encoder.mid_block.resnets.0", top, top)
    prefix = "encoder.mid_block.attentions.0"
    norm(prefix + ".group_norm", top)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        w[prefix + "." + proj + ".weight"] = randn(top, top, scale=top ** -0.5)
        w[prefix + "." + proj + ".bias"] = randn(top, scale=0.1)
    resnet("encoder.mid_block.resnets.1", top, top)
    norm("encoder.conv_norm_out", top)
    conv("encoder.conv_out", top, moments, 3)
    conv("quant_conv", moments, moments, 1)
    return w


# ---- the model, float64 ----

def group_norm_silu(x, p, name, groups):
    return F.silu(F.group_norm(x, groups, p[name + ".weight"], p[name + ".bias"], NORM_EPS))


def conv(x, p, name, padding):
    return F.conv2d(x, p[name + ".weight"], p[name + ".bias"], padding=padding)


def resnet(x, p, name, groups):
    h = conv(group_norm_silu(x, p, name + ".norm1", groups), p, name + ".conv1", 1)
    h = conv(group_norm_silu(h, p, name + ".norm2", groups), p, name + ".conv2", 1)
    if name + ".conv_shortcut.weight" in p:
        x = conv(x, p, name + ".conv_shortcut", 0)
    return x + h


def attention(x, p, name, groups):
    """Attention(heads = 1, dim_head = C, residual_connection, group_norm) on a 4-D input."""
    B, C, H, W = x.shape
    h = F.group_norm(x, groups, p[name + ".group_norm.weight"], p[name + ".group_norm.bias"],
                     NORM_EPS)
    h = h.view(B, C, H * W).transpose(1, 2)
    q, k, v = (F.linear(h, p[name + "." + n + ".weight"], p[name + "." + n + ".bias"])
               for n in ("to_q", "to_k", "to_v"))
    o = torch.softmax(q @ k.transpose(1, 2) / C ** 0.5, dim=-1) @ v
    o = F.linear(o, p[name + ".to_out.0.weight"], p[name + ".to_out.0.bias"])
    return o.transpose(-1, -2).reshape(B, C, H, W) + x


def unpack_latents(tokens, p, config, h, w):
    """The pipeline between the transformer and vae.decode."""
    B, T, ch = tokens.shape
    x = tokens.view(B, h, w, ch).permute(0, 3, 1, 2)  # row-major token grid -> [B, ch, h, w]
    std = torch.sqrt(p["bn.running_var"].view(1, -1, 1, 1) + config["batch_norm_eps"])
    x = x * std + p["bn.running_mean"].view(1, -1, 1, 1)
    ph, pw = config["patch_size"]
    x = x.reshape(B, ch // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(B, ch // (ph * pw), h * ph, w * pw)


def decode(tokens, p, config, h, w):
    g = config["norm_num_groups"]
    x = unpack_latents(tokens, p, config, h, w)
    if config["use_post_quant_conv"]:
        x = conv(x, p, "post_quant_conv", 0)
    x = conv(x, p, "decoder.conv_in", 1)
    x = resnet(x, p, "decoder.mid_block.resnets.0", g)
    if config["mid_block_add_attention"]:
        x = attention(x, p, "decoder.mid_block.attentions.0", g)
    x = resnet(x, p, "decoder.mid_block.resnets.1", g)
    n_blocks = len(config["block_out_channels"])
    for b in range(n_blocks):
        for r in range(config["layers_per_block"] + 1):
            x = resnet(x, p, "decoder.up_blocks.%d.resnets.%d" % (b, r), g)
        if b < n_blocks - 1:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = conv(x, p, "decoder.up_blocks.%d.upsamplers.0.conv" % b, 1)
    x = group_norm_silu(x, p, "decoder.conv_norm_out", g)
    return conv(x, p, "decoder.conv_out", 1)


def encode_moments(image, p, config):
    """Encoder + quant_conv -> (mean, logvar) of DiagonalGaussianDistribution."""
    g, lc = config["norm_num_groups"], config["latent_channels"]
    x = conv(image, p, "encoder.conv_in", 1)
    n_blocks = len(config["block_out_channels"])
    for b in range(n_blocks):
        for r in range(config["layers_per_block"]):
            x = resnet(x, p, "encoder.down_blocks.%d.resnets.%d" % (b, r), g)
        if b < n_blocks - 1:  # Downsample2D(padding=0): pad right and bottom, stride-2 conv
            x = F.conv2d(F.pad(x, (0, 1, 0, 1)),
                         p["encoder.down_blocks.%d.downsamplers.0.conv.weight" % b],
                         p["encoder.down_blocks.%d.downsamplers.0.conv.bias" % b], stride=2)
    x = resnet(x, p, "encoder.mid_block.resnets.0", g)
    if config["mid_block_add_attention"]:
        x = attention(x, p, "encoder.mid_block.attentions.0", g)
    x = resnet(x, p, "encoder.mid_block.resnets.1", g)
    x = conv(group_norm_silu(x, p, "encoder.conv_norm_out", g), p, "encoder.conv_out", 1)
    if config["use_quant_conv"]:
        x = conv(x, p, "quant_conv", 0)
    mean, logvar = torch.chunk(x, 2, dim=1)
    assert mean.shape[1] == lc
    return mean, torch.clamp(logvar, -30.0, 20.0)


def pack_latents(mean, p, config):
    """The pipeline after vae.encode: patchify, bn-normalise, pack -> ([B, h*w, ch], h, w)."""
    B, C, H, W = mean.shape
    ph, pw = config["patch_size"]
    x = mean.view(B, C, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 2, 4)
    x = x.reshape(B, C * ph * pw, H // ph, W // pw)
    std = torch.sqrt(p["bn.running_var"].view(1, -1, 1, 1) + config["batch_norm_eps"])
    x = (x - p["bn.running_mean"].view(1, -1, 1, 1)) / std
    return x.reshape(B, C * ph * pw, -1).permute(0, 2, 1), H // ph, W // pw


def encoder_goldens(weights, gen, config=CONFIG):
    """Inputs from gen; outputs and gradients in float64, stored f32."""
    p = {k: v.double().requires_grad_(not k.startswith("bn.")) for k, v in weights.items()}
    golden = {}
    # encoder alone: moments, tokens, d (sum(tokens * r) + sum(logvar * s)) / d image
    image = torch.rand(2, config["in_channels"], 16, 24, generator=gen) * 2 - 1
    x = image.double().requires_grad_(True)
    mean, logvar = encode_moments(x, p, config)
    tokens, h, w = pack_latents(mean, p, config)
    r = torch.randn(tokens.shape, generator=gen)
    s = torch.randn(logvar.shape, generator=gen)
    ((tokens * r.double()).sum() + (logvar * s.double()).sum()).backward()
    golden.update({"enc.image": image, "enc.r": r, "enc.s": s, "enc.mean": mean.detach(),
                   "enc.logvar": logvar.detach(), "enc.tokens": tokens.detach(),
                   "enc.grad": x.grad})
    # the training loss through both halves, with every parameter's gradient
    for v in p.values():
        v.grad = None
    image = torch.rand(2, config["in_channels"], 16, 8, generator=gen) * 2 - 1
    x = image.double().requires_grad_(True)
    tokens, h, w = pack_latents(encode_moments(x, p, config)[0], p, config)
    loss = ((decode(tokens, p, config, h, w) - x) ** 2).mean()
    loss.backward()
    golden.update({"ae.image": image, "ae.loss": loss.detach().view(1), "ae.grad": x.grad})
    golden.update({"ae.grad." + k: v.grad for k, v in p.items() if v.grad is not None})
    return {k: v.float() for k, v in golden.items()}


def run_case(weights, tokens, r, h, w, config=CONFIG):
    """image and d sum(image * r) / d tokens, in float64."""
    p = {k: v.double() for k, v in weights.items()}
    x = tokens.double().requires_grad_(True)
    image = decode(x, p, config, h, w)
    (image * r.double()).sum().backward()
    return image.detach().float(), x.grad.float()


def main():
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(20261126)
    weights = make_weights(CONFIG, gen)
    weights_bf16 = {k: v.to(torch.bfloat16).float() for k, v in weights.items()}
    enc_gen = torch.Generator().manual_seed(20261127)
    encoder_weights = make_encoder_weights(CONFIG, enc_gen)
    write_fixture(os.path.join(ROOT, "tests/fixtures/tiny-flux2/vae"),
                  dict(weights, **encoder_weights), "F32")
    write_fixture(os.path.join(ROOT, "tests/fixtures/tiny-flux2-bf16/vae"), weights, "BF16")
    safetensors_file.write(os.path.join(ROOT, "tests/golden/vae_encoder.safetensors"),
                           encoder_goldens(dict(weights, **encoder_weights), enc_gen))

    packed = CONFIG["latent_channels"] * CONFIG["patch_size"][0] * CONFIG["patch_size"][1]
    up = CONFIG["patch_size"][0] * 2 ** (len(CONFIG["block_out_channels"]) - 1)
    golden = {}
    # (name, batch, token rows h, token columns w, config): non-square grids, batch 2 and 1;
    # "c" runs the same weights with the config switches off (the test edits config.json)
    variant = dict(CONFIG, use_post_quant_conv=False, mid_block_add_attention=False)
    for name, B, h, w, config in (("a", 2, 2, 3, CONFIG), ("b", 1, 3, 1, CONFIG),
                                  ("c", 1, 2, 2, variant)):
        tokens = torch.randn(B, h * w, packed, generator=gen, dtype=torch.float32)
        r = torch.randn(B, CONFIG["out_channels"], h * up, w * up, generator=gen,
                        dtype=torch.float32)
        image, grad = run_case(weights, tokens, r, h, w, config)
        golden.update({name + ".tokens": tokens, name + ".r": r, name + ".image": image,
                       name + ".grad": grad})
        if name == "a":
            image, grad = run_case(weights_bf16, tokens, r, h, w)
            golden.update({"bf16.image": image, "bf16.grad": grad})
    safetensors_file.write(os.path.join(ROOT, "tests/golden/vae.safetensors"), golden)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--real-random":
        write_fixture(sys.argv[2], make_weights(REAL_CONFIG, torch.Generator().manual_seed(1)),
                      "BF16", REAL_CONFIG)
    else:
        main()
