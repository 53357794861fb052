#!/usr/bin/python3
"""Converts DiffDoctor's artifact detector (a pickled PyTorch state dict) into a detector directory
that diamond reads: config.json, preprocessor_config.json and model.safetensors.

DiffDoctor (github ali-vilab/DiffDoctor) ships checkpoints/ad_pytorch_model.bin: the state dict of
transformers' SegformerForSemanticSegmentation with the nvidia/mit-b5 encoder and a 1-channel
decode_head.classifier. DIAMOND feeds it images resized to 512x512 and normalised with the
ImageNet mean and std. diamond itself never reads pickles, so convert once:

    /usr/bin/python3 tools/convert_diffdoctor.py ad_pytorch_model.bin models/detector [--bf16]

Needs torch (any version that reads the file). The tensor names are kept as they are; floating
tensors are stored as F32 (or BF16 with --bf16, rounded to nearest even), integer ones (the batch
norm's num_batches_tracked) unchanged. The state dict is checked against the config before anything
is written.
"""
import argparse
import os
import re

import torch

import safetensors_file

# nvidia/mit-b5 with DiffDoctor's one-label head.
MIT_B5 = {
    "architectures": ["SegformerForSemanticSegmentation"],
    "model_type": "segformer",
    "num_channels": 3,
    "num_encoder_blocks": 4,
    "hidden_sizes": [64, 128, 320, 512],
    "depths": [3, 6, 40, 3],
    "num_attention_heads": [1, 2, 5, 8],
    "sr_ratios": [8, 4, 2, 1],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "mlp_ratios": [4, 4, 4, 4],
    "decoder_hidden_size": 768,
    "num_labels": 1,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "reshape_last_stage": True,
}
# What DIAMOND's detector does before the network.
DIFFDOCTOR_PREPROCESSOR = {
    "image_processor_type": "SegformerImageProcessor",
    "do_resize": True,
    "size": {"height": 512, "width": 512},
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}

def check_state(state, config):
    """Stops with a message when the state dict and the config disagree on the architecture."""
    n = config["num_encoder_blocks"]
    for i in range(n):
        name = f"segformer.encoder.patch_embeddings.{i}.proj.weight"
        if name not in state:
            raise SystemExit(f"the state dict has no '{name}': not a SegFormer with {n} stages")
        if state[name].shape[0] != config["hidden_sizes"][i]:
            raise SystemExit(f"'{name}' is {list(state[name].shape)}, the config says hidden size "
                             f"{config['hidden_sizes'][i]}")
        layers = {int(m.group(1)) for k in state
                  for m in [re.match(rf"segformer\.encoder\.block\.{i}\.(\d+)\.", k)] if m}
        if len(layers) != config["depths"][i]:
            raise SystemExit(f"stage {i} has {len(layers)} layers, the config says "
                             f"{config['depths'][i]}")
    name = "decode_head.classifier.weight"
    if name not in state or state[name].shape[0] != config["num_labels"]:
        shape = list(state[name].shape) if name in state else "missing"
        raise SystemExit(f"'{name}' is {shape}, the config says {config['num_labels']} labels")


def load_state(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch older than 1.13 has no weights_only
        state = torch.load(path, map_location="cpu")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"{path}: not a plain state dict of tensors")
    return state


def write_detector(out_dir, state, dtype, config=MIT_B5, preprocessor=DIFFDOCTOR_PREPROCESSOR):
    """The detector directory: config.json, preprocessor_config.json, model.safetensors with the
    floating tensors as dtype ("F32" or "BF16")."""
    safetensors_file.write_json(os.path.join(out_dir, "config.json"), config)
    safetensors_file.write_json(os.path.join(out_dir, "preprocessor_config.json"), preprocessor)
    safetensors_file.write(os.path.join(out_dir, "model.safetensors"), state, dtype,
                           metadata={"format": "pt"})


def convert(pickle_path, out_dir, dtype, config=MIT_B5, preprocessor=DIFFDOCTOR_PREPROCESSOR):
    state = load_state(pickle_path)
    check_state(state, config)
    write_detector(out_dir, state, dtype, config, preprocessor)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="DiffDoctor's ad_pytorch_model.bin")
    parser.add_argument("out_dir", help="the detector directory to write")
    parser.add_argument("--bf16", action="store_true", help="store the weights as bfloat16")
    args = parser.parse_args()
    convert(args.checkpoint, args.out_dir, "BF16" if args.bf16 else "F32")
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
