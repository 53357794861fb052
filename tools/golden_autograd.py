"""golden_autograd.py - a PyTorch reference for tests/test_autograd.c: two small composite models,
their losses, and the gradients of each loss with respect to the input and every parameter,
written to tests/golden/autograd.safetensors.

Run with Debian's python3 (torch 1.13): /usr/bin/python3 tools/golden_autograd.py

The first model (golden_model in tests/test_autograd.c):
    x [1, 12, 8] -> linear 16 -> layernorm -> gelu (erf)
      -> q, k, v = linear (no bias), 2 heads of 8, rotary embedding on q and k (adjacent pairs)
      -> softmax(q k^T / sqrt(8)) v -> linear + residual            [1, 12, 16]
      -> transpose to [1, 16, 12], view as an image [1, 16, 3, 4]
      -> conv 3x3 (padding 1) 8 -> groupnorm (4 groups, eps 1e-6) -> silu
      -> bilinear resize to 5x7 (align_corners=False) -> sigmoid -> loss = mean(y^3)
The second, shaped like an artifact detector's input path and loss (detector_model there):
    img [1, 3, 6, 5] -> (img + 1) / 2 clamped to [0, 1] -> per-channel normalisation
      -> conv 3x3 stride 2 (padding 1) 8 -> batchnorm (running statistics) -> relu
      -> nearest 2x upsampling -> depthwise conv 3x3 -> tokens [1, 36, 8]
      -> rmsnorm -> * scale + shift per channel -> matmul by [1, 8, 6]
      -> the halves of the last dim stacked along the tokens [1, 72, 3] -> softmax
      -> loss = mean(-(1 - p)^2 log p)
The third, FLUX.2's modulation with per-sample vectors (modulation_model there):
    x [2, 5, 6] -> layernorm (no affine, eps 1e-6) * (1 + scale[b]) + shift[b]
      -> x + gate[b] * that -> loss = mean(y^2)        scale, shift, gate: [2, 6]
Inputs and parameters are float32; everything is computed in float64 from those float32 values
and stored as float32. Names: the first model's parameters as below, "cos", "sin" (its rotary
tables, [12, 4]), "loss", "grad_<name>" for every parameter; the second model's the same with
the prefix "det.", its constants (normalisation, running statistics) without gradients; the
third's with the prefix "mod."."""
import math
import os

import torch
import torch.nn.functional as F

import safetensors_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden",
                   "autograd.safetensors")


def rope(x, cos, sin):
    """Rotates the adjacent pairs (x[2i], x[2i+1]) of x [B, N, H, D] by cos, sin [N, D/2]."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def attention(q, k, v, scale):
    """q, k, v: [B, N, H, D] -> [B, N, H, D]"""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    return (p @ v).transpose(1, 2)


def model(p, cos, sin):
    h = F.gelu(F.layer_norm(F.linear(p["x"], p["w1"], p["b1"]), (16,), p["ln_w"], p["ln_b"], 1e-5))
    heads = (1, 12, 2, 8)
    q = rope(F.linear(h, p["wq"]).reshape(heads), cos, sin)
    k = rope(F.linear(h, p["wk"]).reshape(heads), cos, sin)
    v = F.linear(h, p["wv"]).reshape(heads)
    a = attention(q, k, v, 1.0 / math.sqrt(8.0)).reshape(1, 12, 16)
    h = F.linear(a, p["wo"], p["bo"]) + h
    img = h.transpose(1, 2).reshape(1, 16, 3, 4)
    c = F.silu(F.group_norm(F.conv2d(img, p["conv_w"], p["conv_b"], padding=1), 4, p["gn_w"], p["gn_b"], 1e-6))
    s = torch.sigmoid(F.interpolate(c, size=(5, 7), mode="bilinear", align_corners=False))
    return (s ** 3).mean()


def detector_model(p, c):
    x = torch.clamp(p["img"] * 0.5 + 0.5, 0.0, 1.0)
    x = x * c["inv_std"][None, :, None, None] + c["offset"][None, :, None, None]
    x = F.conv2d(x, p["conv_w"], p["conv_b"], stride=2, padding=1)
    x = F.relu(F.batch_norm(x, c["bn_mean"], c["bn_var"], p["bn_w"], p["bn_b"], training=False, eps=1e-5))
    x = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), p["dw_w"], p["dw_b"], padding=1, groups=8)
    t = x.permute(0, 2, 3, 1).reshape(1, 36, 8)
    t = t * torch.rsqrt((t * t).mean(-1, keepdim=True) + 1e-6) * p["rms_w"]
    t = (t * p["scale"] + p["shift"]) @ p["mm"]
    prob = torch.softmax(torch.cat([t[..., 3:], t[..., :3]], dim=1), dim=-1)
    return (-(1.0 - prob) ** 2 * torch.log(prob)).mean()


def modulation_model(p):
    y = F.layer_norm(p["x"], (6,), eps=1e-6)
    y = y * (1.0 + p["scale"][:, None, :]) + p["shift"][:, None, :]
    return ((p["x"] + p["gate"][:, None, :] * y) ** 2).mean()


def modulation_case(randn):
    params = {"x": randn(2, 5, 6), "scale": randn(2, 6, scale=0.3), "shift": randn(2, 6, scale=0.3),
              "gate": randn(2, 6, scale=0.5)}
    leaves = {name: t.double().requires_grad_(True) for name, t in params.items()}
    loss = modulation_model(leaves)
    loss.backward()
    out = {"mod." + name: t for name, t in params.items()}
    out["mod.loss"] = loss.detach().reshape(1)
    for name, leaf in leaves.items():
        out["mod.grad_" + name] = leaf.grad
    return out


def detector_case(randn):
    params = {
        "img": randn(1, 3, 6, 5, scale=0.7),
        "conv_w": randn(8, 3, 3, 3, scale=0.3), "conv_b": randn(8, scale=0.1),
        "bn_w": randn(8, scale=0.1, offset=1.0), "bn_b": randn(8, scale=0.2),
        "dw_w": randn(8, 1, 3, 3, scale=0.4), "dw_b": randn(8, scale=0.1),
        "rms_w": randn(8, scale=0.1, offset=1.0), "scale": randn(8, scale=0.2, offset=1.0),
        "shift": randn(8, scale=0.2), "mm": randn(1, 8, 6, scale=0.5),
    }
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    consts = {"inv_std": 1.0 / std, "offset": -mean / std,
              "bn_mean": randn(8, scale=0.2), "bn_var": randn(8, scale=0.2, offset=1.0).abs()}
    leaves = {name: t.double().requires_grad_(True) for name, t in params.items()}
    loss = detector_model(leaves, {name: t.double() for name, t in consts.items()})
    loss.backward()
    out = {"det." + name: t for name, t in list(params.items()) + list(consts.items())}
    out["det.loss"] = loss.detach().reshape(1)
    for name, leaf in leaves.items():
        out["det.grad_" + name] = leaf.grad
    return out


def main():
    gen = torch.Generator().manual_seed(2024)

    def randn(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale + offset

    params = {
        "x": randn(1, 12, 8),
        "w1": randn(16, 8, scale=0.35), "b1": randn(16, scale=0.1),
        "ln_w": randn(16, scale=0.1, offset=1.0), "ln_b": randn(16, scale=0.1),
        "wq": randn(16, 16, scale=0.25), "wk": randn(16, 16, scale=0.25), "wv": randn(16, 16, scale=0.25),
        "wo": randn(16, 16, scale=0.25), "bo": randn(16, scale=0.1),
        "conv_w": randn(8, 16, 3, 3, scale=0.08), "conv_b": randn(8, scale=0.1),
        "gn_w": randn(8, scale=0.1, offset=1.0), "gn_b": randn(8, scale=0.1),
    }
    # rotary angles of positions 0..11 at the usual frequencies 10000^(-2i/8)
    pos = torch.arange(12, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2.0 / 8.0)
    cos, sin = torch.cos(pos * freq).float(), torch.sin(pos * freq).float()

    leaves = {name: t.double().requires_grad_(True) for name, t in params.items()}
    loss = model(leaves, cos.double(), sin.double())
    loss.backward()

    out = dict(params)
    out["cos"], out["sin"] = cos, sin
    out["loss"] = loss.detach().reshape(1)
    for name, leaf in leaves.items():
        out["grad_" + name] = leaf.grad
    det = detector_case(randn)
    out.update(det)
    out.update(modulation_case(randn))
    safetensors_file.write(OUT, out)
    print(f"wrote {OUT}: losses {loss.item():.9g}, {det['det.loss'].item():.9g}")


if __name__ == "__main__":
    main()
