"""Writes tests/golden/deflate_fixed.z: zlib's own deflate (Python's zlib module, strategy
Z_FIXED: fixed Huffman codes, stored blocks where they are smaller) of the bytes
deflate_pattern() makes. tests/test_io.c makes the same bytes, checks that its deliberately
simple inflater reads the stream back to them, and then uses that inflater to check the PNGs
png_write compresses. Run with python3 (no torch needed)."""
import os
import zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden",
                   "deflate_fixed.z")
N = 100000


def deflate_pattern():
    """Incompressible bytes, short repeats, a long run of zeros, and a copy from 31000 bytes
    back with a change every 1000 bytes: literals of both code lengths, matches of every
    length and of distances up to the 32K window."""
    raw = bytearray(N)
    x = 12345
    for i in range(N):
        if i < 20000:
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            raw[i] = (x >> 16) & 255
        elif i < 50000:
            raw[i] = (i // 7) % 251
        elif i < 80000:
            raw[i] = 0
        else:
            raw[i] = raw[i - 31000] ^ (1 if i % 1000 == 0 else 0)
    return bytes(raw)


def main():
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_FIXED)
    z = c.compress(deflate_pattern()) + c.flush()
    assert zlib.decompress(z) == deflate_pattern()
    with open(OUT, "wb") as f:
        f.write(z)
    print(f"wrote {OUT}: {N} bytes as {len(z)}")


if __name__ == "__main__":
    main()
