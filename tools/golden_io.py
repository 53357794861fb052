"""Writes tests/golden/io.safetensors: a safetensors file made without our C code, for test_io.

The file is packed by hand (safetensors_file.frame) the way the safetensors format says: an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of 8 bytes, then the
raw little-endian data. The data area is laid out in a different order from the header, and the
header goes through json.dumps with ensure_ascii, so names arrive as \\uXXXX escapes and
surrogate pairs. Expected conversions come from PyTorch:
  f16_all           every f16 bit pattern;           f16_all_as_f32    torch's .float() of them
  bf16_sample       edge cases and random patterns;  bf16_sample_as_f32
  round_src         f32 values incl. exact ties, overflow edges, subnormals, NaN;
  round_src_to_f16  torch's .half() of them;         round_src_to_bf16 torch's .bfloat16()
  f32 / f32_as_f64  the same values as F32 and F64;  i64; scalar (shape []); empty (shape [0, 3])
Run with /usr/bin/python3 (Debian's torch)."""
import os
import struct

import numpy as np
import torch

import safetensors_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden", "io.safetensors")
rng = np.random.default_rng(20240611)

ODD_NAME = 'odd "name" \\ with é, 😀 and\ttab'


def bits16_to(dtype, bits):
    """uint16 bit patterns reinterpreted as a torch 16-bit float dtype."""
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(dtype)


def to_bits16(t):
    return t.view(torch.int16).numpy().view(np.uint16)


def f16_ties_and_edges():
    """f32 values exactly halfway between neighbouring f16 values (normal and subnormal), and
    the values around the f16 overflow and underflow thresholds."""
    h = np.concatenate([rng.integers(0, 0x7BFF, 1500), np.arange(0, 64), np.arange(0x3FF - 8, 0x408)])
    lo = bits16_to(torch.float16, h).double()
    hi = bits16_to(torch.float16, h + 1).double()
    mids = ((lo + hi) / 2).numpy()
    edges = [65504.0, 65519.0, 65519.996, 65520.0, 65520.004, 65536.0, 1e6, 2.0**-24, 2.0**-25,
             2.0**-25 * 1.0000001, 2.0**-26, 2.0**-14, 2.0**-14 * (1 - 2.0**-12), 1e-10, 1e-45]
    return np.concatenate([mids, -mids[:200], edges, [-e for e in edges]])


def bf16_ties():
    h = np.concatenate([rng.integers(0, 0x7F7F, 1000), np.arange(0, 32)])
    lo = bits16_to(torch.bfloat16, h).double()
    hi = bits16_to(torch.bfloat16, h + 1).double()
    mids = ((lo + hi) / 2).numpy()
    edges = [3.3895314e38, 3.4028235e38, 1e-40, 1e-45, 1.1754944e-38]
    return np.concatenate([mids, -mids[:100], edges, [-e for e in edges]])


def main():
    tensors = []  # (name, dtype, shape, raw bytes)

    def add(name, dtype, shape, raw):
        tensors.append((name, dtype, list(shape), raw))

    f32_values = np.array([0.0, -0.0, 1.0, -2.5, 3.1415927, 1e-40, 3.4028235e38, float("inf"),
                           float("-inf"), float("nan"), 7.0, 1.0 / 3.0, -1e-7, 65504.0, 2.0**-149,
                           123456.79, -0.1, 0.5, 42.0, 1e30, -1e-30], dtype=np.float32)
    add("f32", "F32", [3, 1, 7], f32_values.astype("<f4").tobytes())
    add("f32_as_f64", "F64", [3, 1, 7], f32_values.astype("<f8").tobytes())

    f16_bits = np.arange(65536, dtype=np.uint16)
    add("f16_all", "F16", [65536], f16_bits.astype("<u2").tobytes())
    add("f16_all_as_f32", "F32", [65536],
        bits16_to(torch.float16, f16_bits).float().numpy().astype("<f4").tobytes())

    bf16_edges = [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F, 0x7F80,
                  0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x4049]
    bf16_bits = np.concatenate([bf16_edges, rng.integers(0, 65536, 4081)]).astype(np.uint16)
    add("bf16_sample", "BF16", [64, 64], bf16_bits.astype("<u2").tobytes())
    add("bf16_sample_as_f32", "F32", [64, 64],
        bits16_to(torch.bfloat16, bf16_bits).float().numpy().astype("<f4").tobytes())

    src = np.concatenate([f16_ties_and_edges(), bf16_ties(), rng.standard_normal(500) * 1e3,
                          rng.standard_normal(500) * 1e-6, [0.0, -0.0, float("inf"), float("-inf"), float("nan")]])
    src = torch.tensor(src, dtype=torch.float64).float()  # every value above is exact in f32
    add("round_src", "F32", [src.numel()], src.numpy().astype("<f4").tobytes())
    add("round_src_to_f16", "F16", [src.numel()], to_bits16(src.half()).astype("<u2").tobytes())
    add("round_src_to_bf16", "BF16", [src.numel()], to_bits16(src.bfloat16()).astype("<u2").tobytes())

    add("i64", "I64", [5], struct.pack("<5q", 0, -1, 2**62, -(2**63), 123456789012))
    add("scalar", "F32", [], struct.pack("<f", 42.5))
    add("empty", "F32", [0, 3], b"")
    add(ODD_NAME, "F32", [2], struct.pack("<2f", 1.5, -2.0))

    # The data area in reverse header order, so that header order and offset order differ.
    header, data, offset = {}, b"", 0
    for name, dtype, shape, raw in reversed(tensors):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    ordered = {"__metadata__": {"format": "pt", "written_by": "tools/golden_io.py"}}
    ordered.update({name: header[name] for name, _, _, _ in tensors})
    blob = safetensors_file.frame(ordered, data, compact=False)  # json.dumps' spaced separators
    safetensors_file.write_bytes(OUT, blob)
    print(f"wrote {OUT}: {len(tensors)} tensors, {len(blob)} bytes")


if __name__ == "__main__":
    main()
