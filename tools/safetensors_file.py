"""The safetensors format by hand, for the reference scripts in tools/ (no pip package needed).

A file is an 8-byte little-endian header length, a JSON header padded with spaces so the data
starts 8-byte aligned, then the raw little-endian data. The header maps each name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data area), in the order the
tensors are given, after an optional "__metadata__" entry.

    write(path, tensors, dtype="F32", metadata=None, compact=True)
    encode(tensors, dtype="F32", metadata=None, compact=True) -> bytes
    frame(header, data, compact=True) -> bytes      a header dict + data area -> file bytes
    read(path) -> {name: tensor}                    F32 and I64 tensors, as stored
    write_bytes(path, data), write_json(path, obj, sort_keys=False)

`tensors` is a dict or a list of (name, tensor) pairs. Floating tensors are stored as `dtype`:
"F32", or "BF16" rounded to nearest even; int64 tensors as I64. compact=True writes the JSON
without spaces after "," and ":" (json.dumps' default separators otherwise). Files are written
to a temporary name and renamed, so an interrupted run leaves no half-written file.
"""
import json
import os
import struct

import torch

FLOATING = {"F32": torch.float32, "BF16": torch.bfloat16}  # what floating tensors are stored as
READABLE = {"F32": torch.float32, "I64": torch.int64}


def tensor_bytes(t, dtype="F32"):
    """(dtype name, little-endian bytes) of t: floating as `dtype`, int64 as I64."""
    t = t.detach()
    if t.is_floating_point():
        t = t.to(FLOATING[dtype])
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw 16 bits
        return "BF16", t.view(torch.int16).numpy().astype("<i2").tobytes()
    if t.dtype == torch.float32:
        return "F32", t.numpy().astype("<f4").tobytes()
    if t.dtype == torch.int64:
        return "I64", t.numpy().astype("<i8").tobytes()
    raise SystemExit(f"cannot store a tensor of dtype {t.dtype}")


def frame(header, data, compact=True):
    """header: {name: {dtype, shape, data_offsets}} (and "__metadata__"), data: the data area."""
    separators = (",", ":") if compact else None
    text = json.dumps(header, separators=separators).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def encode(tensors, dtype="F32", metadata=None, compact=True):
    items = tensors.items() if isinstance(tensors, dict) else tensors
    header = {} if metadata is None else {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, t in items:
        kind, raw = tensor_bytes(t, dtype)
        header[name] = {"dtype": kind, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    return frame(header, b"".join(blobs), compact)


def write_bytes(path, data):
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write(path, tensors, dtype="F32", metadata=None, compact=True):
    write_bytes(path, encode(tensors, dtype, metadata, compact))


def write_json(path, obj, sort_keys=False):
    """obj as JSON indented by 2, with a final newline (the layout of config.json files)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def read(path):
    """Every F32 or I64 tensor of a safetensors file, by name, in header order."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in READABLE:
            raise SystemExit(f"{path}: '{name}' is {info['dtype']}, only F32 and I64 are read")
        dtype, (a, b) = READABLE[info["dtype"]], info["data_offsets"]
        if a == b:  # torch.frombuffer refuses an empty buffer
            out[name] = torch.zeros(info["shape"], dtype=dtype)
            continue
        raw = bytearray(data[8 + n + a:8 + n + b])
        out[name] = torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]).clone()
    return out
