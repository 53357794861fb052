#!/usr/bin/python3
"""Writes the tiny SegFormer artifact detector fixture and golden file for tests/test_segformer.c.

The reference is a torch re-implementation of transformers' SegformerForSemanticSegmentation
(src/transformers/models/segformer/modeling_segformer.py) with the upstream parameter names, in
eval mode (dropout and drop-path are the identity), wrapped in DIAMOND's detector pipeline:

    image [B, 3, H, W] in [-1, 1] -> (x + 1) / 2 -> clamp [0, 1] -> bilinear resize to the
    preprocessor size (align_corners=False) -> (x - mean) / std -> logits [B, 1, h/4, w/4]
    -> sigmoid = mask_small -> bilinear resize to H x W = mask

Writes
  tests/fixtures/tiny-detector/       config.json, preprocessor_config.json, model.safetensors (f32)
  tests/fixtures/tiny-detector-bf16/  the same with the weights rounded to bf16
  tests/golden/segformer.safetensors  per case NAME: NAME.image, NAME.logits, NAME.mask_small,
                                      NAME.mask, NAME.grad = d mean(mask^2) / d image
Cases: "resize" (batch 2, 48x80 -> 64x48), "native" (an image at the preprocessor size),
"native_bf16" (the same image through the bf16 weights), "plain" (do_resize and do_normalize off:
the network sees a 36x44 image, so every stage has odd sizes). Weights are drawn in float32,
everything is computed in float64 and stored as float32. It also checks tools/convert_diffdoctor.py
on a torch.save'd state dict of this model: the converted tensors must equal the fixture's bytes.

It also writes the trainable detector's reference (segformer_init's head: each stage's
linear_c, with linear_fuse = [I .. I] and an identity batch norm: gamma = sqrt(1 + eps) in
float32, running_var 1, so gamma / sqrt(var + eps) is exactly 1 in float32):
  tests/fixtures/tiny-detector-train/ the fixture's encoder, a random linear_c and classifier, the
                                      identity fuse and batch norm; every upstream tensor name
  tests/golden/detector_train.safetensors
      image [2, 3, 64, 48], mask [2, 64, 48] (exact pixel mask: image 0 clean, image 1 two
      rectangles), target [2, 1, 16, 12] = max_pool2d(mask, 4), logits, loss =
      BCEWithLogitsLoss(pos_weight=POS_WEIGHT) (mean), and grad.<name> = d loss / d <name> for
      the parameters in TRAIN_GRADS.

Run with Debian's python (it has torch): /usr/bin/python3 tools/ref_segformer.py
"""
import math
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_diffdoctor  # noqa: E402
import safetensors_file  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-detector")
FIXTURE_BF16 = os.path.join(ROOT, "tests", "fixtures", "tiny-detector-bf16")
GOLDEN = os.path.join(ROOT, "tests", "golden", "segformer.safetensors")
TRAIN_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-detector-train")
TRAIN_GOLDEN = os.path.join(ROOT, "tests", "golden", "detector_train.safetensors")
POS_WEIGHT = 3.0
TRAIN_GRADS = ["decode_head.linear_c.0.proj.weight", "decode_head.linear_c.3.proj.bias",
               "decode_head.classifier.weight", "decode_head.classifier.bias",
               "segformer.encoder.patch_embeddings.0.proj.weight",
               "segformer.encoder.block.1.0.attention.self.sr.weight",
               "segformer.encoder.block.3.1.mlp.dense2.weight",
               "segformer.encoder.layer_norm.2.weight"]

# nvidia/mit-b5's layout, shrunk; the preprocessor as DIAMOND's but with a small, non-square size.
CONFIG = dict(convert_diffdoctor.MIT_B5, hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 2, 2],
              num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=16)
PREPROCESSOR = dict(convert_diffdoctor.DIFFDOCTOR_PREPROCESSOR, size={"height": 64, "width": 48})


# ---- the model, after modeling_segformer.py (eval mode) ----------------------------------------

class OverlapPatchEmbeddings(nn.Module):
    def __init__(self, patch_size, stride, in_ch, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, patch_size, stride, patch_size // 2)
        self.layer_norm = nn.LayerNorm(hidden)  # upstream passes no eps: 1e-5

    def forward(self, x):
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.layer_norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    def __init__(self, hidden, heads, sr_ratio):
        super().__init__()
        self.heads, self.head_dim, self.sr_ratio = heads, hidden // heads, sr_ratio
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden, hidden, sr_ratio, sr_ratio)
            self.layer_norm = nn.LayerNorm(hidden)

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x, h, w):
        q = self.split(self.query(x))
        if self.sr_ratio > 1:
            b, n, c = x.shape
            x = self.sr(x.permute(0, 2, 1).reshape(b, c, h, w))
            x = self.layer_norm(x.reshape(b, c, -1).permute(0, 2, 1))
        k, v = self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        y = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return y.view(y.shape[0], y.shape[1], -1)


class SelfOutput(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)


class Attention(nn.Module):
    def __init__(self, hidden, heads, sr_ratio):
        super().__init__()
        self.self = EfficientSelfAttention(hidden, heads, sr_ratio)
        self.output = SelfOutput(hidden)

    def forward(self, x, h, w):
        return self.output.dense(self.self(x, h, w))


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).view(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.dense1 = nn.Linear(hidden, inner)
        self.dwconv = DWConv(inner)
        self.dense2 = nn.Linear(inner, hidden)

    def forward(self, x, h, w):
        return self.dense2(F.gelu(self.dwconv(self.dense1(x), h, w)))


class Layer(nn.Module):
    def __init__(self, hidden, heads, sr_ratio, mlp_ratio):
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(hidden)
        self.attention = Attention(hidden, heads, sr_ratio)
        self.layer_norm_2 = nn.LayerNorm(hidden)
        self.mlp = MixFFN(hidden, int(hidden * mlp_ratio))

    def forward(self, x, h, w):
        x = x + self.attention(self.layer_norm_1(x), h, w)
        return x + self.mlp(self.layer_norm_2(x), h, w)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        n = c["num_encoder_blocks"]
        hs = c["hidden_sizes"]
        self.patch_embeddings = nn.ModuleList(
            OverlapPatchEmbeddings(c["patch_sizes"][i], c["strides"][i],
                                   c["num_channels"] if i == 0 else hs[i - 1], hs[i])
            for i in range(n))
        self.block = nn.ModuleList(
            nn.ModuleList(Layer(hs[i], c["num_attention_heads"][i], c["sr_ratios"][i],
                                c["mlp_ratios"][i]) for _ in range(c["depths"][i]))
            for i in range(n))
        self.layer_norm = nn.ModuleList(nn.LayerNorm(hs[i]) for i in range(n))

    def forward(self, x):
        states = []
        for embed, layers, norm in zip(self.patch_embeddings, self.block, self.layer_norm):
            x, h, w = embed(x)
            for layer in layers:
                x = layer(x, h, w)
            x = norm(x)
            x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            states.append(x)
        return states


class SegformerModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.encoder = Encoder(c)


class MLP(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)


class DecodeHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, n = c["decoder_hidden_size"], c["num_encoder_blocks"]
        self.linear_c = nn.ModuleList(MLP(hs, d) for hs in c["hidden_sizes"])
        self.linear_fuse = nn.Conv2d(d * n, d, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(d)
        self.classifier = nn.Conv2d(d, c["num_labels"], 1)

    def forward(self, states):
        size = states[0].shape[2:]
        ups = []
        for x, mlp in zip(states, self.linear_c):
            b, _, h, w = x.shape
            y = mlp.proj(x.flatten(2).transpose(1, 2)).permute(0, 2, 1).reshape(b, -1, h, w)
            ups.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        y = self.linear_fuse(torch.cat(ups[::-1], dim=1))
        return self.classifier(F.relu(self.batch_norm(y)))


class SegformerForSemanticSegmentation(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.segformer = SegformerModel(c)
        self.decode_head = DecodeHead(c)

    def forward(self, pixel_values):
        return self.decode_head(self.segformer.encoder(pixel_values))


def detector(model, pre, image):
    """DIAMOND's detector pipeline: image in [-1, 1] -> (logits, mask_small, mask)."""
    x = ((image + 1) / 2).clamp(0, 1)
    if pre["do_resize"]:
        size = (pre["size"]["height"], pre["size"]["width"])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if pre["do_normalize"]:
        mean = torch.tensor(pre["image_mean"], dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(pre["image_std"], dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
    logits = model(x)
    mask_small = torch.sigmoid(logits)
    mask = F.interpolate(mask_small, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits, mask_small, mask


# ---- weights -------------------------------------------------------------------------------------

def init_weights(model, gen):
    """Seeded float32 weights scaled so activations stay O(1) and the mask is not saturated."""
    for name, p in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            p.fill_(7)
        elif name.endswith("running_mean"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("running_var"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        elif p.ndim == 1 and ("norm" in name and name.endswith("weight")):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def bf16_rounded(state):
    return {k: v.to(torch.bfloat16).to(torch.float32) if v.is_floating_point() else v
            for k, v in state.items()}


# ---- cases, and the converter checked against the fixtures ---------------------------------

def run_case(model, pre, image):
    x = image.double().requires_grad_()
    logits, mask_small, mask = detector(model, pre, x)
    (mask ** 2).mean().backward()
    return {"image": image, "logits": logits, "mask_small": mask_small, "mask": mask,
            "grad": x.grad}


def check_converter(state):
    """torch.save the state dict, convert it as a user would, compare with the fixtures' bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        pickle = os.path.join(tmp, "ad_pytorch_model.bin")
        torch.save(state, pickle)
        for dtype, fixture in (("F32", FIXTURE), ("BF16", FIXTURE_BF16)):
            out = os.path.join(tmp, dtype)
            convert_diffdoctor.convert(pickle, out, dtype, CONFIG, PREPROCESSOR)
            for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
                with open(os.path.join(out, name), "rb") as a, \
                        open(os.path.join(fixture, name), "rb") as b:
                    if a.read() != b.read():
                        raise SystemExit(f"convert_diffdoctor.py ({dtype}): {name} differs")
    print("convert_diffdoctor.py: the converted pickle matches the fixtures byte for byte")


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(20261126)
    model = SegformerForSemanticSegmentation(CONFIG).eval()
    with torch.no_grad():
        init_weights(model, gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    for path, dtype in ((FIXTURE, "F32"), (FIXTURE_BF16, "BF16")):
        convert_diffdoctor.write_detector(path, state, dtype, CONFIG, PREPROCESSOR)
    check_converter(state)

    resize_image = torch.rand(2, 3, 48, 80, generator=gen) * 2.4 - 1.2  # some pixels clamp
    native_image = torch.rand(1, 3, 64, 48, generator=gen) * 2 - 1
    plain_image = torch.rand(1, 3, 36, 44, generator=gen) * 2 - 1
    plain = dict(PREPROCESSOR, do_resize=False, do_normalize=False)

    golden = {}
    model64 = model.double()
    cases = (("resize", PREPROCESSOR, resize_image), ("native", PREPROCESSOR, native_image),
             ("plain", plain, plain_image))
    for name, pre, image in cases:
        for key, t in run_case(model64, pre, image).items():
            golden[f"{name}.{key}"] = t
    model64.load_state_dict({k: v.double() if v.is_floating_point() else v
                             for k, v in bf16_rounded(state).items()})
    for key, t in run_case(model64, PREPROCESSOR, native_image).items():
        golden[f"native_bf16.{key}"] = t
    for key in sorted(golden):
        if key.endswith("mask_small"):
            m = golden[key]
            print(f"{key}: min {m.min().item():.3f} max {m.max().item():.3f}")
    safetensors_file.write(GOLDEN, golden, metadata={"format": "pt"})
    train_reference(state, gen)


# ---- the trainable detector --------------------------------------------------------------------

def identity_head(state, gen):
    """state with a random linear_c and classifier, linear_fuse = [I .. I] (the concat puts the
    last stage first, all blocks are I) and a batch norm that is the identity."""
    d, n = CONFIG["decoder_hidden_size"], CONFIG["num_encoder_blocks"]
    state = dict(state)
    for i, hs in enumerate(CONFIG["hidden_sizes"]):
        state[f"decode_head.linear_c.{i}.proj.weight"] = torch.randn(d, hs, generator=gen) / math.sqrt(hs)
        state[f"decode_head.linear_c.{i}.proj.bias"] = 0.1 * torch.randn(d, generator=gen)
    state["decode_head.linear_fuse.weight"] = torch.eye(d).repeat(1, n).view(d, n * d, 1, 1)
    eps = torch.tensor(1e-5, dtype=torch.float32)
    state["decode_head.batch_norm.weight"] = torch.full((d,), 1.0) * torch.sqrt(1 + eps)
    state["decode_head.batch_norm.bias"] = torch.zeros(d)
    state["decode_head.batch_norm.running_mean"] = torch.zeros(d)
    state["decode_head.batch_norm.running_var"] = torch.ones(d)
    state["decode_head.batch_norm.num_batches_tracked"] = torch.tensor(0)
    return state


def train_reference(state, gen):
    """The golden data of tests/test_detector_train.c (see the module docstring)."""
    state = identity_head(state, gen)
    model = SegformerForSemanticSegmentation(CONFIG).eval().double()
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    convert_diffdoctor.write_detector(TRAIN_FIXTURE, state, "F32", CONFIG, PREPROCESSOR)
    image = torch.rand(2, 3, 64, 48, generator=gen) * 2 - 1
    mask = torch.zeros(2, 64, 48)
    mask[1, 5:9, 7:10] = 1   # inside one 4x4 cell and across its neighbours
    mask[1, 30:45, 20:41] = 1
    target = F.max_pool2d(mask.unsqueeze(1), 4)
    logits, _, _ = detector(model, PREPROCESSOR, image.double())
    loss = F.binary_cross_entropy_with_logits(
        logits, target.double(), pos_weight=torch.tensor([POS_WEIGHT], dtype=torch.float64))
    loss.backward()
    params = dict(model.named_parameters())
    golden = {"image": image, "mask": mask, "target": target, "logits": logits,
              "loss": loss.reshape(1)}
    for name in TRAIN_GRADS:
        golden[f"grad.{name}"] = params[name].grad
    print(f"detector_train: loss {loss.item():.6f}, logits in [{logits.min().item():.3f}, "
          f"{logits.max().item():.3f}]")
    safetensors_file.write(TRAIN_GOLDEN, golden, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
