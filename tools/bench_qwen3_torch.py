"""PyTorch's time for FLUX.2 [klein]'s prompt encoding, the baseline for diamond's Qwen3 in C.

Loads a Qwen3 text encoder directory in the real layout (config.json, BF16 safetensors, sharded
with model.safetensors.index.json or one model.safetensors): only the tensors of layers
0..26 and the embedding rows of the prompt's ids, converted bf16 -> float32. Then it runs the
klein pipeline's encoding (ref_qwen3.prompt_embeds: hidden_states 9, 18, 27 concatenated) in
float32 on one prompt of TOKENS tokens, REAL real ones (random ids) then padding, as the
pipeline pads every prompt to 512, and prints the forward's seconds (loading excluded) and the
peak RSS (getrusage), after loading and after the forward.

    /usr/bin/python3 tools/bench_qwen3_torch.py DIR [THREADS] [--tokens 512] [--real 20]
                                                [--repeat 1] [--check FILE]

--check FILE takes the prompt from a `diamond encode` output instead (its input_ids and
attention_mask) and compares diamond's prompt_embeds there with this computation: the max
absolute difference, and relative to the largest value (a check of the C encoder at the real
sizes, which the tiny golden fixtures do not reach).

DIR is the model's folder (holding text_encoder/) or the text encoder's own folder; THREADS
(default 2) goes to torch.set_num_threads. A random checkpoint at the real size comes from
    /usr/bin/python3 tools/random_qwen3.py /tmp/qwen3-4b
    /usr/bin/python3 tools/bench_qwen3_torch.py /tmp/qwen3-4b 2
Peak RSS then counts the ~10.9 GB of float32 weights of 27 layers of Qwen3-4B.

Debian's torch does its matrix products through libblas.so.3, which is the slow reference BLAS
unless an optimised one is installed (the script prints the BLAS library it runs with). OpenBLAS
without changing the system: `apt-get download libopenblas0-pthread`, `dpkg-deb -x` it into D,
then run with LD_LIBRARY_PATH=D/usr/lib/x86_64-linux-gnu/openblas-pthread and OPENBLAS_CORETYPE
set to the CPU's family (e.g. Haswell for AVX2 without AVX-512): 14x faster here than the
reference BLAS, 2.5x faster than OpenBLAS's own guess of the core on an AMD EPYC.
"""
import argparse
import json
import os
import resource
import struct
import time

import numpy
import torch

import ref_qwen3
import safetensors_file


def text_encoder_dir(path):
    sub = os.path.join(path, "text_encoder")
    return sub if os.path.isdir(sub) else path


def tensor_files(directory):
    """name -> shard file name, from the index or the single file's header."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    header, _ = read_header(os.path.join(directory, "model.safetensors"))
    return {name: "model.safetensors" for name in header}


def read_header(path):
    """({name: info}, offset of the data area) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def bf16_to_f32(raw, shape):
    """little-endian bf16 values (int16 numpy array) -> float32 torch tensor"""
    bits = torch.from_numpy(raw.astype("<i2", copy=False))
    return bits.view(torch.bfloat16).float().reshape(shape)


def read_bf16(f, start, info, rows=None):
    """A BF16 tensor read from file f (a plain read, not a mapping, so RSS shows only what is
    kept), or only the given rows of it."""
    if info["dtype"] != "BF16":
        raise SystemExit(f"a {info['dtype']} tensor: BF16 expected")
    begin = start + info["data_offsets"][0]
    shape = info["shape"]
    if rows is None:
        f.seek(begin)
        return bf16_to_f32(numpy.fromfile(f, dtype="<i2", count=numpy.prod(shape)), shape)
    width = int(numpy.prod(shape[1:]))
    out = []
    for r in rows:
        f.seek(begin + 2 * width * r)
        out.append(bf16_to_f32(numpy.fromfile(f, dtype="<i2", count=width), [1] + shape[1:]))
    return torch.cat(out)


def load(directory, layers, embed_rows):
    """The weights of layers 0..layers-1, and rows embed_rows of the embedding as a small table."""
    files = tensor_files(directory)
    wanted = [n for n in files if any(n.startswith(f"model.layers.{i}.") for i in range(layers))]
    weights = {}
    for file in sorted(set(files[n] for n in wanted) | {files["model.embed_tokens.weight"]}):
        path = os.path.join(directory, file)
        header, start = read_header(path)
        with open(path, "rb") as f:
            for name in header:
                if name == "model.embed_tokens.weight":
                    weights[name] = read_bf16(f, start, header[name], embed_rows)
                elif name in wanted:
                    weights[name] = read_bf16(f, start, header[name])
    return weights


def blas_library():
    """The BLAS shared library this process has mapped (the real file, links resolved)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "blas" in line.lower() or "mkl" in line.lower()}
    return ", ".join(sorted({os.path.realpath(p) for p in paths if p.startswith("/")})) or "none"


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def main():
    parser = argparse.ArgumentParser(description="time klein's Qwen3 prompt encoding in PyTorch")
    parser.add_argument("dir")
    parser.add_argument("threads", nargs="?", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--real", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--check", help="a diamond encode output to compare with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    directory = text_encoder_dir(args.dir)
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (1, args.tokens), generator=gen)
    ids[0, args.real:] = cfg["bos_token_id"]  # <|endoftext|>, the pad token
    mask = (torch.arange(args.tokens) < args.real).long()[None]
    if args.check:
        theirs = safetensors_file.read(args.check)
        ids, mask = theirs["input_ids"], theirs["attention_mask"]
        args.tokens, args.real = ids.shape[1], int(mask.sum())
    # the embedding table holds only the prompt's rows: ids become indices into it
    rows, table_ids = torch.unique(ids, return_inverse=True)
    layers = max(ref_qwen3.KLEIN_LAYERS)

    t = time.perf_counter()
    weights = load(directory, layers, rows.tolist())
    print(f"loaded {len(weights)} tensors in {time.perf_counter() - t:.2f} s, "
          f"peak RSS {peak_rss_gb():.2f} GB")
    for _ in range(args.repeat):
        t = time.perf_counter()
        with torch.no_grad():
            out = ref_qwen3.prompt_embeds(weights, cfg, table_ids, mask, torch.float32, layers)
        seconds = time.perf_counter() - t
        print(f"prompt_embeds {list(out.shape)} ({args.real} real tokens of {args.tokens}): "
              f"{seconds:.3f} s with {args.threads} threads, peak RSS {peak_rss_gb():.2f} GB, "
              f"mean |x| {out.abs().mean().item():.4f}")
    if args.check:
        diff = (out - theirs["prompt_embeds"]).abs().max().item()
        print(f"{args.check}: max |diamond - PyTorch| {diff:.3g}, "
              f"{diff / out.abs().max().item():.3g} of the largest value")
    print(f"BLAS: {blas_library()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")


if __name__ == "__main__":
    main()
