"""FLUX.2 [klein]'s prompt encoder (Qwen3) in PyTorch, and the tiny-klein fixtures and golden data.

The model is a re-implementation of transformers' Qwen3Model forward (models/qwen3/
modeling_qwen3.py: Qwen3RMSNorm, Qwen3RotaryEmbedding + rotate_half, Qwen3Attention with
grouped-query attention, Qwen3MLP, Qwen3DecoderLayer) with the mask of masking_utils'
create_causal_mask (query i sees key j iff j <= i and attention_mask[j] == 1; padding queries
are not masked, they see the real tokens before them), written from the upstream source with its
tensor names and config keys. The klein pipeline (diffusers pipelines/flux2/
pipeline_flux2_klein.py, _get_qwen3_prompt_embeds) runs it with output_hidden_states and
concatenates hidden_states[9], [18], [27] over the last dim: hidden_states[0] is the embedding
output and hidden_states[k] the output of decoder layer k-1, unnormalised (transformers puts the
final norm only into the LAST entry, hidden_states[num_hidden_layers]).

    prompt_embeds(weights, cfg, input_ids, attention_mask, dtype=torch.float64, layers_needed=27)
    hidden_states(weights, cfg, input_ids, attention_mask, dtype, layers) -> [h0, ..., h_layers]

`weights` maps the real tensor names (without needing lm_head or the layers past
`layers_needed`) to tensors of any floating dtype; they are converted to `dtype` where used.
tools/bench_qwen3_torch.py imports these; tools/random_qwen3.py imports weight_shapes,
random_weight and write_sharded (BF16 shards streamed tensor by tensor, with the index).

Writes (deterministic: re-running gives identical bytes):
  tests/fixtures/tiny-klein/text_encoder/   config.json (real Qwen3 keys, TINY below) and BF16
                                            weights in model-0000{1,2}-of-00002.safetensors with
                                            model.safetensors.index.json (shards split mid-layer)
  tests/fixtures/tiny-klein/tokenizer/      tokenizer.json (byte-level BPE in Qwen2/Qwen3's
                                            layout: 256 byte tokens in GPT-2's order, MERGES,
                                            then ADDED tokens) and tokenizer_config.json
  tests/fixtures/tiny-klein-tokenizer-string-merges/   the same tokenizer with its merges as
                                            "a b" strings (the older tokenizer.json format)
  tests/fixtures/tiny-klein/transformer/    ref_flux2's tiny transformer with joint_attention_dim
                                            72 = 3 * 24, f32, 2 shards
  tests/fixtures/tiny-klein/vae/            a copy of tests/fixtures/tiny-flux2/vae
  tests/golden/qwen3.safetensors:
    input_ids [2, 16] (I64)        row 0: 16 real tokens (a full max_length prompt);
    attention_mask [2, 16] (I64)   row 1: 11 real tokens then <|endoftext|> padding, mask 0
    prompt_embeds [2, 16, 72]      concat(h9, h18, h27), from the bf16-rounded weights
    hidden_1 [2, 16, 24]           hidden_states[1]: the output of layer 0
    hidden_28 [2, 16, 24]          the output of layer 27, BEFORE the final norm
    last_hidden_state [2, 16, 24]  model.norm(hidden_28): transformers' hidden_states[28]
  all computed in float64 and stored as F32.
Run with /usr/bin/python3 (Debian's torch): /usr/bin/python3 tools/ref_qwen3.py
"""
import json
import math
import os

import torch

import ref_flux2
import safetensors_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
F64 = torch.float64
KLEIN_LAYERS = (9, 18, 27)  # the hidden_states the klein pipeline stacks

# ---- the tiny tokenizer ------------------------------------------------------------------------

# Qwen2/Qwen3's pre-tokenizer regex, as it stands in their tokenizer.json.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Byte-level BPE merges in rank order ("Ġ" is the space byte, "Ċ" the newline byte): a few
# chains ("Ġ t" + "h e" -> "Ġthe", "assistant"), competing pairs ("t h" before "h e") and
# whitespace runs, each merge's parts made by an earlier merge or a byte.
MERGES = [
    "Ġ t", "Ġ a", "t h", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t", "Ġ w",
    "Ġ o", "e n", "Ġ c", "i t", "i s", "a n", "o r", "e s", "Ġ b", "e d", "Ġ f", "in g",
    "Ġ p", "o u", "Ġa n", "a r", "Ġan d", "Ġo f", "Ġ m", "Ġ h", "l l", "Ġ Ġ", "Ċ Ċ",
    "th e", "u s", "us er", "a s", "as s", "is t", "ass ist", "assist an", "assistan t",
    "Ġc at",
]

# (content, special) after the BPE vocabulary, in id order; <think> and </think> are not
# special in Qwen3 (they stay in decoded text).
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
         ("<think>", False), ("</think>", False)]


def byte_to_unicode():
    """GPT-2's table: printable bytes map to themselves, the others to 256, 257, ... in order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab():
    """token -> id: the 256 byte tokens sorted by code point (GPT-2's and Qwen's order, so an id
    is not its byte), then one token per merge."""
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode().values()))}
    for merge in MERGES:
        a, b = merge.split(" ")
        if a not in vocab or b not in vocab or a + b in vocab:
            raise SystemExit(f"merge '{merge}': a part is missing or the result exists")
        vocab[a + b] = len(vocab)
    return vocab


def added_token_ids():
    first = len(bpe_vocab())
    return {content: first + i for i, (content, _) in enumerate(ADDED)}


def tokenizer_json(merges_as_strings=False):
    """The HF tokenizers file, with the fields and field order of Qwen3's tokenizer.json; merges
    as [a, b] pairs (tokenizers >= 0.20, Qwen3's file) or "a b" strings (older files)."""
    ids = added_token_ids()
    added = [{"id": ids[c], "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": special} for c, special in ADDED]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated",
             "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": bpe_vocab(),
                  "merges": list(MERGES) if merges_as_strings else [m.split(" ") for m in MERGES]},
    }


def tokenizer_config():
    ids = added_token_ids()
    decoder = {str(ids[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": special} for c, special in ADDED}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(directory, merges_as_strings=False):
    """tokenizer.json as the real file has it: indent 2, raw UTF-8 (no \\u escapes for "Ġ")."""
    text = json.dumps(tokenizer_json(merges_as_strings), indent=2, ensure_ascii=False) + "\n"
    safetensors_file.write_bytes(os.path.join(directory, "tokenizer.json"), text.encode("utf-8"))
    safetensors_file.write_json(os.path.join(directory, "tokenizer_config.json"),
                                tokenizer_config())


# ---- the tiny model's config ------------------------------------------------------------------

def tiny_config():
    """A tiny Qwen3 with the real config keys: heads * head_dim = 32 != hidden_size = 24, 2 query
    heads per kv head, 28 layers so that hidden_states 9, 18, 27 and the final norm all exist."""
    ids = added_token_ids()
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 24,
        "initializer_range": 0.02,
        "intermediate_size": 40,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": len(bpe_vocab()) + len(ADDED),
    }


# ---- weights ------------------------------------------------------------------------------------

def weight_shapes(cfg):
    """Every tensor of the checkpoint with its shape, in upstream module order (no lm_head, which
    is tied to the embeddings)."""
    d, hd, mlp = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": [cfg["vocab_size"], d]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = [q, d]
        shapes[p + "self_attn.k_proj.weight"] = [kv, d]
        shapes[p + "self_attn.v_proj.weight"] = [kv, d]
        shapes[p + "self_attn.o_proj.weight"] = [d, q]
        shapes[p + "self_attn.q_norm.weight"] = [hd]
        shapes[p + "self_attn.k_norm.weight"] = [hd]
        shapes[p + "mlp.gate_proj.weight"] = [mlp, d]
        shapes[p + "mlp.up_proj.weight"] = [mlp, d]
        shapes[p + "mlp.down_proj.weight"] = [d, mlp]
        shapes[p + "input_layernorm.weight"] = [d]
        shapes[p + "post_attention_layernorm.weight"] = [d]
    shapes["model.norm.weight"] = [d]
    return shapes


def random_weight(name, shape, gen, dtype=F64):
    """Norm scales 1 + 0.1 N(0, 1), embeddings N(0, 1), projections N(0, 1 / fan_in): activations
    stay O(1) through the layers (the residual stream grows like sqrt(2 * layers))."""
    w = torch.randn(shape, generator=gen, dtype=dtype)
    if len(shape) == 1:
        return 1.0 + 0.1 * w
    if "embed_tokens" in name:
        return w
    return w / math.sqrt(shape[1])


def make_weights(cfg, gen):
    """Seeded random weights rounded to bf16 (as float64): what the files hold, exactly."""
    return {name: random_weight(name, shape, gen).to(torch.bfloat16).double()
            for name, shape in weight_shapes(cfg).items()}


# ---- the model -------------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    """Qwen3RMSNorm over the last dim: w * x / sqrt(mean(x^2) + eps)."""
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))


def rope_tables(length, head_dim, theta, dtype):
    """cos, sin: [L, head_dim] for positions 0..L-1, each frequency twice (cat(freqs, freqs))."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    freqs = torch.arange(length, dtype=dtype)[:, None] * inv_freq[None, :]
    angle = torch.cat([freqs, freqs], dim=-1)
    return torch.cos(angle), torch.sin(angle)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (not interleaved pairs)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    """x: [B, L, H, D], cos, sin: [L, D]"""
    return x * cos[None, :, None, :] + rotate_half(x) * sin[None, :, None, :]


def attention_allowed(attention_mask):
    """[B, L] 0/1 -> [B, L, L] bool: query i sees key j iff j <= i and key j is a real token."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal[None] & (attention_mask[:, None, :] != 0)
    if not allowed.any(-1).all():
        # left padding or an all-padding row: upstream's eager and sdpa paths disagree there
        raise ValueError("a query sees no key: only right padding after a real first token")
    return allowed


def self_attention(W, p, cfg, x, cos, sin, allowed, dtype):
    """x: [B, L, hidden] -> [B, L, hidden]"""
    B, L, _ = x.shape
    hd, eps = cfg["head_dim"], cfg["rms_norm_eps"]
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]

    def proj(name):
        return x @ W[p + f"self_attn.{name}.weight"].to(dtype).T

    q = rmsnorm(proj("q_proj").view(B, L, -1, hd), W[p + "self_attn.q_norm.weight"].to(dtype), eps)
    k = rmsnorm(proj("k_proj").view(B, L, -1, hd), W[p + "self_attn.k_norm.weight"].to(dtype), eps)
    v = proj("v_proj").view(B, L, -1, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # query head h reads kv head h // group
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)
    return out.reshape(B, L, -1) @ W[p + "self_attn.o_proj.weight"].to(dtype).T


def mlp(W, p, x, dtype):
    """down(silu(gate(x)) * up(x))"""
    gate = x @ W[p + "mlp.gate_proj.weight"].to(dtype).T
    up = x @ W[p + "mlp.up_proj.weight"].to(dtype).T
    return (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].to(dtype).T


def decoder_layer(W, i, cfg, x, cos, sin, allowed, dtype):
    p, eps = f"model.layers.{i}.", cfg["rms_norm_eps"]
    h = rmsnorm(x, W[p + "input_layernorm.weight"].to(dtype), eps)
    x = x + self_attention(W, p, cfg, h, cos, sin, allowed, dtype)
    h = rmsnorm(x, W[p + "post_attention_layernorm.weight"].to(dtype), eps)
    return x + mlp(W, p, h, dtype)


def hidden_states(W, cfg, input_ids, attention_mask, dtype, layers):
    """input_ids, attention_mask: [B, L] -> [h0, ..., h_layers], each [B, L, hidden]: the
    embeddings, then the output of each of the first `layers` decoder layers (no final norm)."""
    if layers > cfg["num_hidden_layers"]:
        raise ValueError(f"{layers} layers asked of a model with {cfg['num_hidden_layers']}")
    allowed = attention_allowed(attention_mask)
    cos, sin = rope_tables(input_ids.shape[1], cfg["head_dim"], cfg["rope_theta"], dtype)
    x = W["model.embed_tokens.weight"][input_ids].to(dtype)
    out = [x]
    for i in range(layers):
        x = decoder_layer(W, i, cfg, x, cos, sin, allowed, dtype)
        out.append(x)
    return out


def prompt_embeds(W, cfg, input_ids, attention_mask, dtype=F64, layers_needed=max(KLEIN_LAYERS)):
    """The klein pipeline's prompt_embeds: [B, L, 3 * hidden] = cat(h9, h18, h27) per token."""
    hs = hidden_states(W, cfg, input_ids, attention_mask, dtype, layers_needed)
    return torch.cat([hs[k] for k in KLEIN_LAYERS], dim=-1)


# ---- files --------------------------------------------------------------------------------------

def plan_shards(shapes, max_shard_bytes, bytes_per_value=2):
    """Names grouped into shards in order, a new shard when the next tensor would overflow the
    current one (save_pretrained's rule, so a layer may straddle two shards)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = math.prod(shape) * bytes_per_value
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_shard(path, shapes, names, blocks):
    """A BF16 safetensors file written tensor by tensor: the header first (offsets from the
    shapes), then each tensor's blocks(name) (row blocks that concatenate to it) streamed to
    disk."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        n = math.prod(shapes[name]) * 2
        header[name] = {"dtype": "BF16", "shape": shapes[name],
                        "data_offsets": [offset, offset + n]}
        offset += n
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(safetensors_file.frame(header, b""))
        for name in names:
            written = 0
            for block in blocks(name):
                _, raw = safetensors_file.tensor_bytes(block, "BF16")
                f.write(raw)
                written += len(raw)
            begin, end = header[name]["data_offsets"]
            if written != end - begin:
                raise SystemExit(f"{name}: {written} bytes written, {end - begin} expected")
    os.replace(tmp, path)


def write_sharded(directory, shapes, blocks, max_shard_bytes, prefix="model"):
    """PREFIX-0000k-of-0000n.safetensors (BF16) and PREFIX.safetensors.index.json (sorted keys, as
    save_pretrained writes it; diffusers' PREFIX is diffusion_pytorch_model). Returns the number of
    shards."""
    os.makedirs(directory, exist_ok=True)
    shards = plan_shards(shapes, max_shard_bytes)
    weight_map = {}
    for s, names in enumerate(shards):
        file = f"{prefix}-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(directory, file), shapes, names, blocks)
        weight_map.update({name: file for name in names})
    total = sum(math.prod(shape) * 2 for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    safetensors_file.write_json(os.path.join(directory, f"{prefix}.safetensors.index.json"),
                                index, sort_keys=True)
    return len(shards)


def write_text_encoder(directory, cfg, weights):
    """Two shards, the first a little over half the bytes, so a layer straddles them."""
    shapes = weight_shapes(cfg)
    safetensors_file.write_json(os.path.join(directory, "config.json"), cfg, sort_keys=True)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    if write_sharded(directory, shapes, lambda name: [weights[name]], total * 0.55) != 2:
        raise SystemExit("the tiny text encoder should make 2 shards")


def write_flux2(fixture, gen):
    """ref_flux2's tiny transformer, its text input 3 * the tiny Qwen3's hidden size, and a copy of
    tiny-flux2's VAE."""
    text_dim = len(KLEIN_LAYERS) * tiny_config()["hidden_size"]
    cfg = dict(ref_flux2.CONFIG, joint_attention_dim=text_dim)
    d = os.path.join(fixture, "transformer")
    os.makedirs(d, exist_ok=True)
    ref_flux2.write_config(d, cfg)
    ref_flux2.write_sharded(d, ref_flux2.make_weights(cfg, gen))
    source = os.path.join(ROOT, "tests", "fixtures", "tiny-flux2", "vae")
    for file in sorted(os.listdir(source)):
        with open(os.path.join(source, file), "rb") as f:
            safetensors_file.write_bytes(os.path.join(fixture, "vae", file), f.read())


def golden_inputs(cfg, gen, batch=2, length=16, real=(16, 11)):
    """Random ids below vocab_size; row b has real[b] tokens, then <|endoftext|> padding."""
    ids = torch.randint(0, cfg["vocab_size"], (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.int64)
    for b, n in enumerate(real):
        mask[b, :n] = 1
        ids[b, n:] = added_token_ids()["<|endoftext|>"]
    return ids, mask


def main():
    gen = torch.Generator().manual_seed(2027)
    cfg = tiny_config()
    weights = make_weights(cfg, gen)
    fixture = os.path.join(ROOT, "tests", "fixtures", "tiny-klein")
    write_text_encoder(os.path.join(fixture, "text_encoder"), cfg, weights)
    write_tokenizer(os.path.join(fixture, "tokenizer"))
    write_tokenizer(os.path.join(ROOT, "tests", "fixtures", "tiny-klein-tokenizer-string-merges"),
                    merges_as_strings=True)
    write_flux2(fixture, gen)

    ids, mask = golden_inputs(cfg, gen)
    hs = hidden_states(weights, cfg, ids, mask, F64, cfg["num_hidden_layers"])
    last = rmsnorm(hs[-1], weights["model.norm.weight"], cfg["rms_norm_eps"])
    golden = [
        ("input_ids", ids), ("attention_mask", mask),
        ("prompt_embeds", torch.cat([hs[k] for k in KLEIN_LAYERS], dim=-1)),
        ("hidden_1", hs[1]), ("hidden_28", hs[28]), ("last_hidden_state", last),
    ]
    safetensors_file.write(os.path.join(ROOT, "tests", "golden", "qwen3.safetensors"), golden)


if __name__ == "__main__":
    main()
