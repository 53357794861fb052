"""PyTorch's time for what `diamond bench model` times, on the same files: the competitor's
figures beside ours, same machine, same weights.

    /usr/bin/python3 tools/bench_torch.py DIR DETECTOR [THREADS] [-W 512] [-H 512]
                                          [--text-len 512] [--only transformer|vae|detector]
                                          [--runs N] [--bf16]

DIR holds transformer/ and vae/ in the real layouts (tools/random_models.py writes random ones at
the real sizes), DETECTOR a SegFormer directory. In float32 (the weights converted once, loading
excluded from the times), batch 1, random inputs:
  transformer forward  ref_flux2.forward (the reference's own math, attention included: PyTorch
                       1.13 has no fused attention), its f64 tables made f32
  VAE decode           ref_vae.decode, forward, then forward + backward of mean(image) to the
                       latent tokens (no checkpoints: PyTorch keeps every activation)
  detector             ref_segformer's SegformerForSemanticSegmentation after DIAMOND's
                       preprocessing, forward, then forward + backward to the image
With --bf16 the transformer runs in bfloat16 instead (weights, inputs and tables converted, every
op in bf16 as PyTorch's bf16 CPU inference runs it: its large matrix products through oneDNN,
f32 sums): what `diamond bench model --precision bf16` is compared with.
THREADS (default 2) goes to torch.set_num_threads. The convolutions run through PyTorch's own
kernels (oneDNN where the build has it); the matrix products through libblas.so.3, which is the
slow reference BLAS unless an optimised one is installed: see tools/bench_qwen3_torch.py for
running with OpenBLAS without changing the system. The script prints the BLAS it ran with.
"""
import argparse
import json
import os
import time

import numpy
import torch

import bench_qwen3_torch
import ref_flux2
import ref_segformer
import ref_vae
import safetensors_file

F32 = torch.float32


def load_dir(directory, index_name, single_name, dtype=F32):
    """Every tensor of a diffusers/transformers directory (sharded with an index, or one file)
    as dtype (float32, or bfloat16 converted tensor by tensor)."""
    index = os.path.join(directory, index_name) if index_name else None
    if index and os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [single_name]
    weights = {}
    for file in files:
        path = os.path.join(directory, file)
        header, start = bench_qwen3_torch.read_header(path)
        with open(path, "rb") as f:
            for name, info in header.items():
                f.seek(start + info["data_offsets"][0])
                count = int(numpy.prod(info["shape"]))
                if info["dtype"] == "BF16":
                    raw = numpy.fromfile(f, dtype="<i2", count=count)
                    weights[name] = bench_qwen3_torch.bf16_to_f32(raw, info["shape"]).to(dtype)
                elif info["dtype"] == "F32":
                    raw = numpy.fromfile(f, dtype="<f4", count=count)
                    weights[name] = torch.from_numpy(raw).reshape(info["shape"]).to(dtype)
                else:
                    raise SystemExit(f"{path}: {name} is {info['dtype']}, BF16 or F32 expected")
    return weights


def timed(runs, what, fn):
    """fn's time, runs times: the median (the upper one of an even count, as `diamond bench`
    takes it) and the best, so a warm run is compared with a warm run."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    tail = f"   median of {runs} runs, best {times[0]:.3f} s" if runs > 1 else ""
    print(f"  {what:<46} {median:9.3f} s   (peak RSS so far "
          f"{bench_qwen3_torch.peak_rss_gb() * 1e3 / 1.048576:.0f} MiB){tail}", flush=True)


def tables_in(dtype):
    """ref_flux2's timestep and RoPE tables are float64 (a reference's exactness): dtype here
    (float32 or bfloat16), as the pipeline runs them."""
    rope, proj = ref_flux2.rope_tables, ref_flux2.timestep_proj
    ref_flux2.rope_tables = lambda *a: tuple(t.to(dtype) for t in rope(*a))
    ref_flux2.timestep_proj = lambda *a: proj(*a).to(dtype)


def bench_transformer(args, gen):
    directory = os.path.join(args.dir, "transformer")
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
    dtype = torch.bfloat16 if args.bf16 else F32
    weights = load_dir(directory, "diffusion_pytorch_model.safetensors.index.json",
                       "diffusion_pytorch_model.safetensors", dtype)
    h, w = args.height // 16, args.width // 16
    tokens = torch.rand(1, h * w, cfg["in_channels"], generator=gen) * 2 - 1
    txt = torch.rand(1, args.text_len, cfg["joint_attention_dim"], generator=gen) * 2 - 1
    tokens, txt, sigma = tokens.to(dtype), txt.to(dtype), torch.tensor([0.5], dtype=dtype)
    tables_in(dtype)
    with torch.no_grad():
        timed(args.runs, f"transformer forward (one step{', bf16' if args.bf16 else ''})",
              lambda: ref_flux2.forward(weights, cfg, tokens, h, w, txt, sigma))


def bench_vae(args, gen):
    directory = os.path.join(args.dir, "vae")
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    weights = load_dir(directory, None, "diffusion_pytorch_model.safetensors")
    ph, pw = cfg["patch_size"]
    scale = ph * 2 ** (len(cfg["block_out_channels"]) - 1)
    h, w = args.height // scale, args.width // scale
    tokens = torch.rand(1, h * w, cfg["latent_channels"] * ph * pw, generator=gen) * 2 - 1
    with torch.no_grad():
        timed(args.runs, "VAE decode forward", lambda: ref_vae.decode(tokens, weights, cfg, h, w))

    def backward():
        x = tokens.clone().requires_grad_()
        ref_vae.decode(x, weights, cfg, h, w).mean().backward()
    timed(args.runs, "VAE decode forward+backward (to the latent)", backward)


def bench_detector(args, gen):
    with open(os.path.join(args.detector, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(args.detector, "preprocessor_config.json")) as f:
        pre = json.load(f)
    model = ref_segformer.SegformerForSemanticSegmentation(cfg).eval()
    state = safetensors_file.read(os.path.join(args.detector, "model.safetensors"))
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    image = torch.rand(1, 3, args.height, args.width, generator=gen) * 2 - 1
    with torch.no_grad():
        timed(args.runs, "detector forward", lambda: ref_segformer.detector(model, pre, image))

    def backward():
        x = image.clone().requires_grad_()
        ref_segformer.detector(model, pre, x)[2].mean().backward()
    timed(args.runs, "detector forward+backward (to the image)", backward)


def main():
    parser = argparse.ArgumentParser(description="time bench model's parts in PyTorch")
    parser.add_argument("dir")
    parser.add_argument("detector")
    parser.add_argument("threads", nargs="?", type=int, default=2)
    parser.add_argument("-W", dest="width", type=int, default=512)
    parser.add_argument("-H", dest="height", type=int, default=512)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--only", choices=["transformer", "vae", "detector"])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="the transformer in bfloat16")
    args = parser.parse_args()
    if args.runs < 1:
        raise SystemExit("--runs: at least 1")
    torch.set_num_threads(args.threads)
    print(f"bench_torch: {args.width}x{args.height} image, {args.text_len} text tokens, "
          f"{'bfloat16 transformer' if args.bf16 else 'float32'}, "
          f"threads {args.threads}, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    for name, fn in [("transformer", bench_transformer), ("vae", bench_vae),
                     ("detector", bench_detector)]:
        if args.only in (None, name):
            fn(args, gen)
    print(f"BLAS: {bench_qwen3_torch.blas_library()}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")


if __name__ == "__main__":
    main()
