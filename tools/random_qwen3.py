"""A random Qwen3 text encoder at a config's real sizes, for benchmarks (no download needed).

Writes OUT/text_encoder/: config.json (a copy of CONFIG) and random BF16 weights with the real
tensor names and layout (ref_qwen3.weight_shapes), sharded save_pretrained-style into
model-0000k-of-0000n.safetensors of at most MAX_SHARD_GB each (default 5: the real klein-4B's
two shards) with model.safetensors.index.json. Tensors are made and written in row blocks, so
memory stays near one block (~256 MiB) whatever the model size. The values follow
ref_qwen3.random_weight (norm scales near 1, projections N(0, 1 / fan_in)): activations stay O(1)
and free of denormals, so timings are those of real weights.

    /usr/bin/python3 tools/random_qwen3.py OUT [CONFIG] [MAX_SHARD_GB]

CONFIG defaults to tests/fixtures/qwen3-4b-config/config.json (Qwen3-4B: ~8 GB written, a few
minutes); tests/fixtures/tiny-klein/text_encoder/config.json gives a tiny one in a second.
Deterministic (seeded) for a given config.
"""
import json
import math
import os
import sys

import torch

import ref_qwen3
import safetensors_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEFAULT_CONFIG = os.path.join(ROOT, "tests", "fixtures", "qwen3-4b-config", "config.json")
BLOCK_VALUES = 1 << 26  # values made at once: 256 MiB of float32


def row_blocks(shapes, gen):
    """blocks(name): the tensor's random rows, BLOCK_VALUES values at most at a time."""
    def blocks(name):
        shape = shapes[name]
        row = math.prod(shape[1:])
        rows = max(1, BLOCK_VALUES // row)
        for start in range(0, shape[0], rows):
            part = [min(rows, shape[0] - start)] + shape[1:]
            # the fan-in scaling reads shape[1], the same for a block as for the whole tensor
            yield ref_qwen3.random_weight(name, part, gen, torch.float32)
    return blocks


def main():
    if len(sys.argv) not in (2, 3, 4):
        raise SystemExit(__doc__)
    out = os.path.join(sys.argv[1], "text_encoder")
    config_path = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_CONFIG
    max_shard_bytes = float(sys.argv[3] if len(sys.argv) > 3 else 5) * 1e9
    with open(config_path, "rb") as f:
        config_bytes = f.read()
    cfg = json.loads(config_bytes)
    safetensors_file.write_bytes(os.path.join(out, "config.json"), config_bytes)
    shapes = ref_qwen3.weight_shapes(cfg)
    gen = torch.Generator().manual_seed(4)
    shards = ref_qwen3.write_sharded(out, shapes, row_blocks(shapes, gen), max_shard_bytes)
    total = sum(math.prod(s) for s in shapes.values())
    print(f"{out}: {total / 1e9:.2f} G values, {2 * total / 1e9:.2f} GB in {shards} shards")


if __name__ == "__main__":
    main()
