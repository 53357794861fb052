#!/usr/bin/python3
"""Writes tests/golden/conv.safetensors: PyTorch's conv2d forward and backward on a handful of
configurations, for tests/test_conv.c.

For each configuration NAME it stores NAME.shape (the 12 numbers of a Conv2dShape: batch, in_ch,
in_h, in_w, out_ch, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, groups), the inputs
NAME.x, NAME.w, NAME.b (absent when the conv has no bias), a random upstream gradient NAME.dy,
and the results NAME.y, NAME.dx, NAME.dw, NAME.db (db absent without bias). The inputs are drawn
in float32; everything is computed in float64 and stored as float32.

Run with Debian's python (it has torch): /usr/bin/python3 tools/golden_conv.py
"""
import os

import torch

import safetensors_file

# name: (batch, in_ch, in_h, in_w, out_ch, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
#        groups, bias)
CONFIGS = {
    "vae_3x3": (1, 32, 12, 10, 8, 3, 3, 1, 1, 1, 1, 1, True),
    "patch_embed_7x7_s4": (1, 3, 29, 31, 16, 7, 7, 4, 4, 3, 3, 1, True),
    "sr_k2_s2": (2, 8, 16, 14, 8, 2, 2, 2, 2, 0, 0, 1, True),
    "sr_k4_s4": (1, 8, 20, 22, 8, 4, 4, 4, 4, 0, 0, 1, True),
    "sr_k8_s8": (1, 4, 32, 24, 4, 8, 8, 8, 8, 0, 0, 1, True),
    "depthwise_3x3": (2, 12, 15, 13, 12, 3, 3, 1, 1, 1, 1, 12, True),
    "depthwise_3x3_s2": (1, 7, 11, 9, 7, 3, 3, 2, 2, 1, 1, 7, True),
    "pointwise_nobias": (2, 10, 7, 9, 6, 1, 1, 1, 1, 0, 0, 1, False),
    "grouped_s2": (1, 8, 11, 10, 6, 3, 3, 2, 2, 1, 1, 2, True),
    "asymmetric": (1, 3, 9, 12, 5, 3, 5, 2, 1, 1, 2, 1, True),
    "banded_5x5": (1, 64, 28, 25, 4, 5, 5, 1, 1, 2, 2, 1, True),  # K = 1600: two im2col bands
    "winograd_3x3": (1, 128, 9, 6, 128, 3, 3, 1, 1, 1, 1, 1, True),  # the C side's Winograd path
}


def conv_case(cfg, gen):
    b, cin, h, w, cout, kh, kw, sh, sw, ph, pw, groups, bias = cfg
    x = torch.rand(b, cin, h, w, generator=gen) * 2 - 1
    wt = torch.rand(cout, cin // groups, kh, kw, generator=gen) * 2 - 1
    bs = torch.rand(cout, generator=gen) * 2 - 1 if bias else None
    x64 = x.double().requires_grad_()
    w64 = wt.double().requires_grad_()
    b64 = bs.double().requires_grad_() if bias else None
    y = torch.nn.functional.conv2d(x64, w64, b64, stride=(sh, sw), padding=(ph, pw), groups=groups)
    dy = torch.rand(y.shape, generator=gen) * 2 - 1
    y.backward(dy.double())
    out = {
        "shape": torch.tensor(cfg[:12], dtype=torch.float32),
        "x": x, "w": wt, "dy": dy, "y": y.detach(), "dx": x64.grad, "dw": w64.grad,
    }
    if bias:
        out["b"] = bs
        out["db"] = b64.grad
    return out


def main():
    gen = torch.Generator().manual_seed(20240601)
    tensors = {}
    for name, cfg in CONFIGS.items():
        for key, t in conv_case(cfg, gen).items():
            tensors[f"{name}.{key}"] = t
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "golden", "conv.safetensors")
    safetensors_file.write(path, tensors)
    print(f"wrote {path}: {len(CONFIGS)} configurations, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
