"""Golden data for tests/test_attention.c, from PyTorch (never from our C code).

Attention is computed with explicit torch ops in float64 -- softmax(scale * Q K^T + mask) V --
and its gradients by autograd for a random dout; RoPE is written from the definition in
diffusers' apply_rotary_emb (use_real=True, use_real_unbind_dim=-1, FLUX's interleaved pairs)
and, as rope_halves, from transformers' apply_rotary_pos_emb (Qwen3: x * cos + rotate_half(x)
* sin, cos and sin repeated over the two halves).
Inputs are drawn, rounded to float32 and used from there, so the C code sees exactly the values
the reference saw. Everything is stored as float32 in tests/golden/attention.safetensors:
  <case>.config   [B, H, Hkv, Nq, Nk, D, causal, scale]   <case>.kv_valid [B]
  <case>.q .k .v .dout  inputs      <case>.out .lse .dq .dk .dv  reference results
  rope.config [B, N, H, D], rope.x .cos .sin .dy, rope.y .dx   (and the same as rope_halves.*)
Run with /usr/bin/python3 (Debian's torch).
"""
import math
import os

import torch

import safetensors_file

torch.manual_seed(0)


def as_f32_inputs(*shape, gain=1.0):
    """Random normal values rounded to float32, returned in float64 for the reference."""
    return (gain * torch.randn(*shape, dtype=torch.float64)).float().double()


def attention_reference(q, k, v, causal, kv_valid, scale):
    """q: [B, Nq, H, D], k, v: [B, Nk, Hkv, D] -> out [B, Nq, H, D], lse [B, H, Nq]."""
    B, Nq, H, _ = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    k_heads = k.repeat_interleave(group, dim=2)  # query head h reads kv head h // group
    v_heads = v.repeat_interleave(group, dim=2)
    scores = scale * torch.einsum("bihd,bjhd->bhij", q, k_heads)
    i = torch.arange(Nq)[:, None]
    j = torch.arange(Nk)[None, :]
    allowed = (j[None] < torch.tensor(kv_valid)[:, None, None])[:, None]  # [B, 1, 1, Nk]
    if causal:
        allowed = allowed & (j <= i + (Nk - Nq))
    allowed = allowed.expand(B, H, Nq, Nk)
    has_key = allowed.any(-1, keepdim=True)
    # rows that see no key output 0; give them finite scores so no NaN reaches autograd
    masked = torch.where(has_key, scores.masked_fill(~allowed, -math.inf), torch.zeros_like(scores))
    probs = torch.softmax(masked, dim=-1) * has_key
    out = torch.einsum("bhij,bjhd->bihd", probs, v_heads)
    lse = torch.where(has_key[..., 0], torch.logsumexp(masked, dim=-1),
                      torch.full_like(scores[..., 0], -math.inf))
    return out, lse


def attention_case(name, B, H, Hkv, Nq, Nk, D, causal, kv_valid=None, scale=None, q_gain=1.0):
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kv_valid = [Nk] * B if kv_valid is None else kv_valid
    q = as_f32_inputs(B, Nq, H, D, gain=q_gain).requires_grad_()
    k = as_f32_inputs(B, Nk, Hkv, D).requires_grad_()
    v = as_f32_inputs(B, Nk, Hkv, D).requires_grad_()
    dout = as_f32_inputs(B, Nq, H, D)
    out, lse = attention_reference(q, k, v, causal, kv_valid, float(torch.tensor(scale).float()))
    out.backward(dout)
    config = torch.tensor([B, H, Hkv, Nq, Nk, D, int(causal), scale], dtype=torch.float64)
    tensors = {"config": config, "kv_valid": torch.tensor(kv_valid, dtype=torch.float64),
               "q": q, "k": k, "v": v, "dout": dout, "out": out, "lse": lse,
               "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {f"{name}.{key}": t.detach() for key, t in tensors.items()}


def rope_reference(x, cos, sin):
    """diffusers apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) on x: [B, N, H, D]
    with cos, sin: [N, D/2] (one angle per pair, repeated for both members of the pair)."""
    cos_full = cos.repeat_interleave(2, dim=-1)[None, :, None, :]
    sin_full = sin.repeat_interleave(2, dim=-1)[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return x * cos_full + x_rotated * sin_full


def rope_halves_reference(x, cos, sin):
    """transformers' apply_rotary_pos_emb on x: [B, N, H, D] with cos, sin: [N, D/2], the angles
    concatenated twice (emb = cat(freqs, freqs)) and rotate_half(x) = cat(-x2, x1)."""
    cos_full = torch.cat([cos, cos], dim=-1)[None, :, None, :]
    sin_full = torch.cat([sin, sin], dim=-1)[None, :, None, :]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos_full + torch.cat([-x2, x1], dim=-1) * sin_full


def rope_case(B, N, H, D, name="rope", reference=rope_reference):
    positions = torch.arange(N, dtype=torch.float64)[:, None]
    freqs = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # FLUX-style theta = 1e4
    angles = positions * freqs[None, :]
    cos, sin = angles.cos().float().double(), angles.sin().float().double()
    x = as_f32_inputs(B, N, H, D).requires_grad_()
    dy = as_f32_inputs(B, N, H, D)
    y = reference(x, cos, sin)
    y.backward(dy)
    tensors = {"config": torch.tensor([B, N, H, D], dtype=torch.float64), "x": x, "cos": cos,
               "sin": sin, "dy": dy, "y": y, "dx": x.grad}
    return {f"{name}.{key}": t.detach() for key, t in tensors.items()}


def main():
    tensors = {}
    # grouped-query, causal, one batch row with padded keys
    tensors.update(attention_case("gqa_causal_padded", B=2, H=4, Hkv=2, Nq=33, Nk=33, D=32,
                                  causal=True, kv_valid=[33, 20]))
    # cross attention to a shorter (spatially reduced) key set, odd head_dim
    tensors.update(attention_case("cross_reduced", B=1, H=2, Hkv=2, Nq=70, Nk=17, D=12, causal=False))
    # multi-query, causal with fewer queries than keys, several blocks each way
    tensors.update(attention_case("mqa_causal_long_kv", B=1, H=2, Hkv=1, Nq=65, Nk=130, D=64,
                                  causal=True, scale=0.125))
    # plain self attention at head_dim 128 with sharp (large) logits
    tensors.update(attention_case("self_sharp", B=1, H=1, Hkv=1, Nq=130, Nk=130, D=128,
                                  causal=False, q_gain=4.0))
    # rows that see no key: causal with more queries than keys, and a fully padded batch row
    tensors.update(attention_case("empty_rows", B=2, H=1, Hkv=1, Nq=20, Nk=9, D=8, causal=True,
                                  kv_valid=[9, 0]))
    tensors.update(rope_case(B=2, N=7, H=3, D=16))
    tensors.update(rope_case(B=2, N=7, H=3, D=16, name="rope_halves", reference=rope_halves_reference))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden",
                        "attention.safetensors")
    safetensors_file.write(os.path.normpath(path), tensors)
    print(f"wrote {os.path.normpath(path)}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
