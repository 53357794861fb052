"""golden_rng.py - what PyTorch's CPU generator draws, written to tests/golden/rng.safetensors for
tests/test_rng.c.

Run with Debian's python3 (torch 1.13): /usr/bin/python3 tools/golden_rng.py

Every value comes from torch.Generator('cpu'). The file stores only float32, so:
  mt.<seed>.hi / .lo   raw mt19937 draws split into 16-bit halves (exact in float32). torch has
                       no call returning one raw 32-bit draw; int64 random_() returns
                       random64() % 2^63 = ((d0 & 0x7fffffff) << 32) | d1 for two successive
                       draws d0, d1, so the stored draws are d0 & 0x7fffffff, d1, d2 & ..., d3, ...
  randn.<n>            torch.randn(n) from manual_seed(<seed of the case>); big sizes keep only
  randn.<n>.head/.tail their first and last 64 values and .check, a checksum of every value's
                       bits: sum of bits[i] * (i % 65521 + 1) mod 2^31 - 1, as 16-bit halves
  seq.<k>              successive randn calls on one generator (the stream carries over, and so
                       does the cached second Box-Muller value of the scalar path)
  reseed               randn(3) after randn(1) and manual_seed(5) again: reseeding drops the cache
  latent.<C>x<h>x<w>   randn((1, C, h, w)) packed to tokens [h*w, C] as the Flux2 pipeline does
Seeds above 2^32 are included because manual_seed keeps only their low 32 bits for mt19937.

Caveat: for n >= 16 torch picks its Box-Muller kernel by CPU capability. This file is written on
a machine where torch reports "CPU capability usage: AVX2" (AVX512 gives the same values); with
ATEN_CPU_CAPABILITY=default, or on CPUs without AVX2, torch uses libm's logf/cosf/sinf instead
and the last bits differ. The C code follows the AVX2 kernel."""
import os

import torch

import safetensors_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden",
                   "rng.safetensors")

MT_SEEDS = [0, 1, 42, 4444, 2**32 + 5, 2**63 - 1]
MT_PAIRS = 700          # 1400 draws: crosses the first regeneration of the 624-word state
RANDN_SEED = 1234
SMALL = [1, 2, 7, 15, 16, 17, 31, 32, 33, 1000]
BIG = [4096 * 3 + 5, 128 * 64 * 64]
SEQ = [(7, [1, 1, 3, 17, 2, 16])]
LATENTS = [(128, 16, 16, 0), (128, 3, 5, 42), (16, 4, 6, 4444), (128, 4, 4, 2**32 + 5)]

tensors = {}


def put(name, t):
    tensors[name] = t.detach().to(torch.float32).contiguous()


def mt_draws(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.empty(MT_PAIRS, dtype=torch.int64).random_(generator=g).tolist()
    draws = []
    for x in v:
        draws += [x >> 32, x & 0xFFFFFFFF]
    d = torch.tensor(draws, dtype=torch.int64)
    return (d >> 16).float(), (d & 0xFFFF).float()


def bits_checksum(x):
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    weights = torch.arange(x.numel(), dtype=torch.int64) % 65521 + 1
    c = int(((bits * weights) % (2**31 - 1)).sum()) % (2**31 - 1)
    return torch.tensor([c >> 16, c & 0xFFFF], dtype=torch.float32)


def randn(n, seed=RANDN_SEED):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def main():
    for seed in MT_SEEDS:
        hi, lo = mt_draws(seed)
        put(f"mt.{seed}.hi", hi)
        put(f"mt.{seed}.lo", lo)
    for n in SMALL:
        put(f"randn.{n}", randn(n))
    for n in BIG:
        x = randn(n)
        put(f"randn.{n}.head", x[:64])
        put(f"randn.{n}.tail", x[-64:])
        put(f"randn.{n}.check", bits_checksum(x))
    for seed, sizes in SEQ:
        g = torch.Generator().manual_seed(seed)
        for k, n in enumerate(sizes):
            put(f"seq.{k}", torch.randn(n, generator=g, dtype=torch.float32))
    g = torch.Generator().manual_seed(5)
    torch.randn(1, generator=g)
    g.manual_seed(5)
    put("reseed", torch.randn(3, generator=g, dtype=torch.float32))
    for c, h, w, seed in LATENTS:
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((1, c, h, w), generator=g, dtype=torch.float32)
        put(f"latent.{c}x{h}x{w}", x.reshape(c, h * w).T)
    print(torch.__config__.show().split("CPU capability usage: ")[1].split()[0])
    safetensors_file.write(OUT, tensors, compact=False)  # spaced JSON, as the file was first written
    print(f"wrote {OUT}: {len(tensors)} tensors, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
