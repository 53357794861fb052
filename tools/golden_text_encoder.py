"""diamond's character-level text encoder (nn.c, section "text encoder") in PyTorch float64, for
tests/test_text_encoder.c. The architecture is our own (issue 5), so this script is its
specification: upper-cased characters -> ids 1..V (0 pads to max_length), token + position
embeddings, pre-norm layers x + attn(LN1(x)), x + fc2(gelu(fc1(LN2(x)))) with nn.Linear layers
(weight and bias), multi-head softmax attention over the keys of the prompt's own characters
(the padding keys masked; an empty prompt keeps its first position), a final LayerNorm.

Writes (deterministic: re-running gives identical bytes):
  tests/fixtures/tiny-text-encoder/{config.json, model.safetensors}   f32 weights
  tests/fixtures/tiny-flux2/text_encoder/    hidden_size 24 (tiny-flux2's joint_attention_dim),
                                             for `diamond generate --prompt`
  tests/golden/text_encoder.safetensors:
    out [3, 6, 16]            the prompts PROMPTS encoded
    probe [3, 6, 16]          r: the loss sum(r * out) ...
    grad.<name>               ... and its gradient for every weight
Run with /usr/bin/python3 (Debian's torch).
"""
import math
import os

import torch

import safetensors_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
F64 = torch.float64

CONFIG = {
    "_class_name": "DiamondCharEncoder",
    "vocab": "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    "max_length": 6,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 32,
    "layer_norm_eps": 1e-05,
}

# lower case is upper-cased; "a1B2c3" fills every position; "" is all padding
PROMPTS = ["Hi", "a1B2c3", ""]


def weight_shapes(cfg):
    d, mlp = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"token_embedding.weight": [len(cfg["vocab"]) + 1, d],
              "position_embedding.weight": [cfg["max_length"], d]}
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        shapes[p + "norm1.weight"] = [d]
        shapes[p + "norm1.bias"] = [d]
        for n in ["to_q", "to_k", "to_v", "to_out"]:
            shapes[p + f"attn.{n}.weight"] = [d, d]
            shapes[p + f"attn.{n}.bias"] = [d]
        shapes[p + "norm2.weight"] = [d]
        shapes[p + "norm2.bias"] = [d]
        shapes[p + "mlp.fc1.weight"] = [mlp, d]
        shapes[p + "mlp.fc1.bias"] = [mlp]
        shapes[p + "mlp.fc2.weight"] = [d, mlp]
        shapes[p + "mlp.fc2.bias"] = [d]
    shapes["final_norm.weight"] = [d]
    shapes["final_norm.bias"] = [d]
    return shapes


def make_weights(cfg, gen):
    """Seeded random weights, rounded to float32; norm scales around 1, biases around 0."""
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        w = torch.randn(shape, generator=gen, dtype=F64)
        if len(shape) == 1:
            w = (1.0 if name.endswith(".weight") else 0.0) + 0.1 * w
        elif "embedding" not in name:
            w = w / math.sqrt(shape[1])
        weights[name] = w.float().double()
    return weights


def tokenize(cfg, prompt):
    ids = [cfg["vocab"].index(ch) + 1 for ch in prompt.upper()]
    return ids + [0] * (cfg["max_length"] - len(ids)), max(len(ids), 1)


def layernorm(x, w, b, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps)


def linear(W, name, x):
    return x @ W[name + ".weight"].T + W[name + ".bias"]


def attention(W, p, cfg, x, valid):
    B, L, d = x.shape
    H = cfg["num_heads"]
    q, k, v = [linear(W, p + f"attn.{n}", x).view(B, L, H, d // H).transpose(1, 2)
               for n in ["to_q", "to_k", "to_v"]]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // H)
    keys = torch.arange(L)[None, :] < valid[:, None]                 # [B, L]
    scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
    out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, L, d)
    return linear(W, p + "attn.to_out", out)


def encode(W, cfg, prompts):
    ids, valid = zip(*[tokenize(cfg, p) for p in prompts])
    ids, valid = torch.tensor(ids), torch.tensor(valid)
    eps = cfg["layer_norm_eps"]
    x = W["token_embedding.weight"][ids] + W["position_embedding.weight"][None]
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        x = x + attention(W, p, cfg, layernorm(x, W[p + "norm1.weight"], W[p + "norm1.bias"], eps),
                          valid)
        h = layernorm(x, W[p + "norm2.weight"], W[p + "norm2.bias"], eps)
        h = torch.nn.functional.gelu(linear(W, p + "mlp.fc1", h))
        x = x + linear(W, p + "mlp.fc2", h)
    return layernorm(x, W["final_norm.weight"], W["final_norm.bias"], eps)


def main():
    gen = torch.Generator().manual_seed(5)
    weights = make_weights(CONFIG, gen)
    d = os.path.join(ROOT, "tests", "fixtures", "tiny-text-encoder")
    os.makedirs(d, exist_ok=True)
    safetensors_file.write_json(os.path.join(d, "config.json"), CONFIG)
    safetensors_file.write(os.path.join(d, "model.safetensors"), weights)

    flux_cfg = dict(CONFIG, hidden_size=24, num_heads=3, intermediate_size=48)
    d = os.path.join(ROOT, "tests", "fixtures", "tiny-flux2", "text_encoder")
    os.makedirs(d, exist_ok=True)
    safetensors_file.write_json(os.path.join(d, "config.json"), flux_cfg)
    safetensors_file.write(os.path.join(d, "model.safetensors"), make_weights(flux_cfg, gen))

    leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    out = encode(leaves, CONFIG, PROMPTS)
    probe = torch.randn(out.shape, generator=gen, dtype=F64).float().double()
    (probe * out).sum().backward()
    golden = [("out", out.detach()), ("probe", probe)]
    golden += [("grad." + k, v.grad) for k, v in leaves.items()]
    safetensors_file.write(os.path.join(ROOT, "tests", "golden", "text_encoder.safetensors"),
                           golden)


if __name__ == "__main__":
    main()
