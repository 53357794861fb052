"""Random FLUX.2 [klein] 4B models at the real sizes in the real file layouts, for benchmarks (no
download needed): what `diamond bench model` and `diamond bench step` time, read from files.

    /usr/bin/python3 tools/random_models.py OUT [transformer] [vae] [detector]

writes, from the configs in tests/fixtures (the upstream ones, copied byte for byte):
  OUT/transformer/  klein-4B's Flux2Transformer2DModel: BF16, sharded as diffusers saves it
                    (diffusion_pytorch_model-0000k-of-0000n.safetensors of at most 5 GB and
                    diffusion_pytorch_model.safetensors.index.json); ~7.8 GB, a few minutes
  OUT/vae/          FLUX.2's AutoencoderKLFlux2: F32, one diffusion_pytorch_model.safetensors
  OUT/detector/     a SegFormer MiT-b5 detector (DiffDoctor's config and preprocessor): F32,
                    model.safetensors
(all three when none is named). tools/random_qwen3.py writes OUT/text_encoder/ the same way. The
values follow the reference scripts' rules (ref_flux2.make_weights, ref_vae.make_weights,
ref_segformer.init_weights): activations stay O(1) and free of denormals, so timings are those of
real weights. Tensors are made and written in row blocks, so memory stays near one block. Seeded:
the same files every run.
"""
import json
import math
import os
import sys

import torch

import convert_diffdoctor
import ref_flux2
import ref_qwen3
import ref_segformer
import ref_vae
import safetensors_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KLEIN = os.path.join(ROOT, "tests", "fixtures", "klein-4b-config")
MIT_B5 = os.path.join(ROOT, "tests", "fixtures", "mit-b5-config")
BLOCK_VALUES = 1 << 26  # values made at once: 256 MiB of float32
MAX_SHARD_BYTES = 5e9


def copy_file(source, directory):
    with open(source, "rb") as f:
        data = f.read()
    safetensors_file.write_bytes(os.path.join(directory, os.path.basename(source)), data)
    return json.loads(data)


def flux2_blocks(shapes, gen):
    """blocks(name): the tensor's random rows as ref_flux2.make_weights draws them (norm scales
    1 + 0.1 N(0, 1), matrices N(0, 1 / fan_in), the modulations at half that gain), at most
    BLOCK_VALUES values at a time."""
    def blocks(name):
        shape = shapes[name]
        if len(shape) == 1:
            yield 1.0 + 0.1 * torch.randn(shape, generator=gen)
            return
        gain = 0.5 if "modulation" in name or "norm_out" in name else 1.0
        rows = max(1, BLOCK_VALUES // shape[1])
        for start in range(0, shape[0], rows):
            part = [min(rows, shape[0] - start), shape[1]]
            yield gain * torch.randn(part, generator=gen) / math.sqrt(shape[1])
    return blocks


def write_transformer(out):
    directory = os.path.join(out, "transformer")
    cfg = copy_file(os.path.join(KLEIN, "transformer", "config.json"), directory)
    cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
    shapes = ref_flux2.weight_shapes(cfg)
    gen = torch.Generator().manual_seed(5)
    shards = ref_qwen3.write_sharded(directory, shapes, flux2_blocks(shapes, gen), MAX_SHARD_BYTES,
                                     prefix="diffusion_pytorch_model")
    total = sum(math.prod(s) for s in shapes.values())
    print(f"{directory}: {total / 1e9:.2f} G values, {2 * total / 1e9:.2f} GB in {shards} shards")


def write_vae(out):
    directory = os.path.join(out, "vae")
    cfg = copy_file(os.path.join(KLEIN, "vae", "config.json"), directory)
    gen = torch.Generator().manual_seed(6)
    weights = ref_vae.make_weights(cfg, gen)
    weights.update(ref_vae.make_encoder_weights(cfg, gen))
    safetensors_file.write(os.path.join(directory, "diffusion_pytorch_model.safetensors"), weights)
    total = sum(w.numel() for w in weights.values())
    print(f"{directory}: {total / 1e6:.1f} M values, {4 * total / 1e9:.2f} GB")


def write_detector(out):
    directory = os.path.join(out, "detector")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(MIT_B5, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(MIT_B5, "preprocessor_config.json")) as f:
        pre = json.load(f)
    model = ref_segformer.SegformerForSemanticSegmentation(cfg)
    ref_segformer.init_weights(model, torch.Generator().manual_seed(7))
    state = model.state_dict()
    convert_diffdoctor.write_detector(directory, state, "F32", cfg, pre)
    total = sum(v.numel() for v in state.values())
    print(f"{directory}: {total / 1e6:.1f} M values, {4 * total / 1e9:.2f} GB")


WRITERS = {"transformer": write_transformer, "vae": write_vae, "detector": write_detector}


def main():
    if len(sys.argv) < 2 or any(a not in WRITERS for a in sys.argv[2:]):
        raise SystemExit(__doc__)
    for name in sys.argv[2:] or list(WRITERS):
        WRITERS[name](sys.argv[1])


if __name__ == "__main__":
    main()
