"""golden_ops.py - PyTorch references for the norms, activations, resampling and elementwise
kernels of tensor.c, written to tests/golden/ops.safetensors for tests/test_ops.c.

Run with Debian's python3 (torch 1.13): /usr/bin/python3 tools/golden_ops.py

Inputs are float32. Outputs and gradients (for a random upstream gradient `dy`) are computed by
torch autograd in float64 from those same float32 inputs and stored as float32, except for the
bilinear resize, which is computed in float32 because its sampling positions follow torch's own
float arithmetic (a float64 run would place the samples slightly differently).
Names are "<case>.<tensor>"; the shapes of the cases are listed in the loops below and again in
tests/test_ops.c."""
import os

import torch
import torch.nn.functional as F

import safetensors_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden",
                   "ops.safetensors")

gen = torch.Generator().manual_seed(1234)
tensors = {}


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).contiguous()


def rand(*shape, lo=0.0, hi=1.0):
    return (torch.rand(*shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo).contiguous()


def put(name, t):
    tensors[name] = t.detach().to(torch.float32).contiguous()


def run(name, fn, inputs, params=(), dtype=torch.float64):
    """Stores inputs, y = fn(*inputs, *params), a random dy, and the gradient of every input and
    parameter under sum(y * dy). inputs / params are (name, float32 tensor or None) pairs."""
    leaves = []
    args = []
    for tname, t in list(inputs) + list(params):
        if t is None:
            args.append(None)
            continue
        put(f"{name}.{tname}", t)
        leaf = t.to(dtype).requires_grad_(True)
        leaves.append((tname, leaf))
        args.append(leaf)
    y = fn(*args)
    dy = randn(*y.shape)
    put(f"{name}.dy", dy)
    put(f"{name}.y", y)
    (y * dy.to(dtype)).sum().backward()
    for tname, leaf in leaves:
        put(f"{name}.d{tname}", leaf.grad)
    return y


def norm_stats(name, x, dims, eps):
    """mean and 1/sqrt(biased var + eps) over `dims` in float64, as the kernels save them."""
    xd = x.double()
    put(f"{name}.mean", xd.mean(dim=dims))
    put(f"{name}.rstd", 1.0 / torch.sqrt(xd.var(dim=dims, unbiased=False) + eps))


# ---- layernorm: (rows, C, affine, eps) ----
for i, (rows, C, affine, eps) in enumerate([(1, 1, True, 1e-5), (1, 17, True, 1e-5),
                                             (5, 33, False, 1e-6), (7, 3, True, 1e-5),
                                             (48, 64, True, 1e-6), (4, 128, False, 1e-6)]):
    name = f"layernorm{i}"
    x = randn(rows, C, scale=2.0) + 0.5
    w, b = (randn(C), randn(C)) if affine else (None, None)
    run(name, lambda x, w, b: F.layer_norm(x, (C,), w, b, eps),
        [("x", x)], [("w", w), ("b", b)])
    norm_stats(name, x, (1,), eps)

# ---- groupnorm: (B, C, HW, groups, affine, eps) ----
for i, (B, C, HW, G, affine, eps) in enumerate([(2, 6, 7, 3, True, 1e-5), (1, 4, 9, 1, True, 1e-6),
                                                 (2, 5, 3, 5, False, 1e-6), (1, 64, 33, 32, True, 1e-6),
                                                 (3, 3, 1, 3, True, 1e-5), (2, 34, 17, 2, False, 1e-5)]):
    name = f"groupnorm{i}"
    x = randn(B, C, HW, scale=1.5) - 0.3
    w, b = (randn(C), randn(C)) if affine else (None, None)
    run(name, lambda x, w, b: F.group_norm(x, G, w, b, eps), [("x", x)], [("w", w), ("b", b)])
    norm_stats(name, x.reshape(B, G, -1), (2,), eps)

# ---- rmsnorm: (rows, C, eps), y = x / sqrt(mean(x^2) + eps) * w ----
for i, (rows, C, eps) in enumerate([(1, 1, 1e-6), (3, 17, 1e-6), (6, 128, 1e-5), (2, 33, 1e-6)]):
    name = f"rmsnorm{i}"
    x, w = randn(rows, C), randn(C)
    run(name, lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w,
        [("x", x)], [("w", w)])
    put(f"{name}.rstd", torch.rsqrt(x.double().pow(2).mean(-1) + eps))

# ---- batchnorm in eval mode: (B, C, HW, eps) ----
for i, (B, C, HW, eps) in enumerate([(2, 3, 7, 1e-5), (1, 17, 5, 1e-4), (3, 1, 33, 1e-5)]):
    name = f"batchnorm{i}"
    x, w, b = randn(B, C, HW), randn(C), randn(C)
    mean, var = randn(C, scale=0.5), rand(C, lo=0.2, hi=2.0)
    put(f"{name}.mean", mean)
    put(f"{name}.var", var)
    run(name, lambda x, w, b: F.batch_norm(x, mean.double(), var.double(), w, b, False, 0.0, eps),
        [("x", x)], [("w", w), ("b", b)])

# ---- pointwise activations over values from small to large |x| ----
act_x = torch.cat([randn(600, scale=3.0), torch.linspace(-30, 30, 121),
                   torch.tensor([-100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0])])
run("gelu_erf", lambda x: F.gelu(x), [("x", act_x)])
run("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), [("x", act_x)])
run("silu", F.silu, [("x", act_x)])
run("relu", F.relu, [("x", act_x)])
run("sigmoid", torch.sigmoid, [("x", act_x)])

# ---- softmax over the last dim: (rows, C, scale of x) ----
for i, (rows, C, scale) in enumerate([(1, 1, 1.0), (3, 17, 1.0), (4, 33, 30.0), (9, 64, 3.0),
                                      (2, 5, 200.0)]):
    run(f"softmax{i}", lambda x: torch.softmax(x, dim=-1), [("x", randn(rows, C, scale=scale))])

# ---- nearest 2x upsampling: (planes, H, W) ----
for i, (P, H, W) in enumerate([(3, 5, 7), (1, 1, 1), (2, 16, 3)]):
    run(f"upsample{i}", lambda x: F.interpolate(x, scale_factor=2, mode="nearest").squeeze(0),
        [("x", randn(1, P, H, W))])

# ---- bilinear resize, align_corners=False, size=(Ho, Wo), in float32: (planes, H, W, Ho, Wo) ----
for i, (P, H, W, Ho, Wo) in enumerate([(2, 7, 5, 16, 9), (2, 16, 16, 5, 7), (3, 1, 1, 3, 3),
                                        (1, 32, 32, 128, 128), (1, 100, 75, 37, 129),
                                        (2, 5, 7, 5, 13), (1, 3, 1, 1, 4), (1, 512, 3, 128, 3),
                                        (2, 3, 5, 4, 300)]):
    run(f"resize{i}",
        lambda x: F.interpolate(x, size=(Ho, Wo), mode="bilinear", align_corners=False).squeeze(0),
        [("x", randn(1, P, H, W))], dtype=torch.float32)

# ---- elementwise, broadcasts, reductions ----
n = 1001
run("mul", lambda a, b: a * b, [("a", randn(n)), ("b", randn(n))])
# clamp: values straddling [lo, hi] = [-0.5, 0.75], including both bounds exactly
clamp_x = torch.cat([randn(200), torch.tensor([-0.5, 0.75, -0.5, 0.75])])
run("clamp", lambda x: torch.clamp(x, -0.5, 0.75), [("x", clamp_x)])
for i, p in enumerate([2.0, 3.0, 0.5, 1.0]):
    run(f"pow{i}", lambda x: x.pow(p), [("x", rand(257, lo=0.05, hi=2.0))])
for i, (rows, C) in enumerate([(1, 17), (33, 3), (300, 130)]):
    run(f"mul_rows{i}", lambda x, v: x * v, [("x", randn(rows, C))], [("v", randn(C))])
    x = randn(rows, C)
    put(f"sum_rows{i}.x", x)
    put(f"sum_rows{i}.y", x.double().sum(0))
for i, (B, C, HW) in enumerate([(2, 3, 7), (1, 17, 1), (3, 5, 33)]):
    run(f"add_channels{i}", lambda x, v: x + v[:, None], [("x", randn(B, C, HW))],
        [("v", randn(C))])
    x = randn(B, C, HW)
    put(f"sum_channels{i}.x", x)
    put(f"sum_channels{i}.y", x.double().sum((0, 2)))
for i, count in enumerate([1, 17, 40009]):
    x = randn(count, scale=10.0) + 1.0
    put(f"reduce{i}.x", x)
    put(f"reduce{i}.sum", x.double().sum().reshape(1))
    put(f"reduce{i}.max", x.max().reshape(1))

safetensors_file.write(OUT, tensors)
print(f"wrote {len(tensors)} tensors, {os.path.getsize(OUT)} bytes to {os.path.normpath(OUT)}")
