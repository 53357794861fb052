"""golden_gemm.py - PyTorch reference products for tests/test_gemm.c.

Writes tests/golden/gemm.safetensors. For each case i:
  case{i}.params  [7]  M, N, K, trans_a, trans_b, alpha, beta
  case{i}.a            A as gemm reads it: [M, K], or [K, M] when trans_a
  case{i}.b            B as gemm reads it: [K, N], or [N, K] when trans_b
  case{i}.c            C before the call: [M, N] (the beta term reads it)
  case{i}.out          alpha * op(A) @ op(B) + beta * C, computed in float64, stored float32
  case{i}.bf16         the same with A and B rounded to bfloat16 first (gemm_stored_bf16's
                       operands), in float64
  case{i}.torch_bf16   torch.matmul(op(A).bfloat16(), op(B).bfloat16()): PyTorch's own bf16
                       product (oneDNN's f32 sums, the result rounded to bf16), without alpha and
                       beta; only for products of 16^3 multiply-adds or more: PyTorch 1.13 sums
                       smaller ones in its own loop, in bf16 (up to 74% off here)
Run with Debian's python3 (it has torch): /usr/bin/python3 tools/golden_gemm.py
"""
import os

import torch

import safetensors_file

# M, N, K, trans_a, trans_b, alpha, beta: odd sizes, every transpose pair, sizes past the
# micro-tile and cache blocks (KC = 384), and a product of vectors.
CASES = [
    (7, 13, 17, False, False, 1.0, 0.0),
    (33, 65, 129, True, False, 0.5, 0.0),
    (64, 48, 300, False, True, 1.5, -0.5),
    (130, 70, 200, True, True, 1.0, 1.0),
    (1, 37, 64, False, False, -2.0, 0.0),
    (45, 1, 9, True, True, 1.0, 0.25),
    (200, 150, 400, False, False, 1.0, 0.0),
]


def main():
    torch.manual_seed(0)
    tensors = []
    for i, (M, N, K, ta, tb, alpha, beta) in enumerate(CASES):
        a = torch.rand(K, M) * 2 - 1 if ta else torch.rand(M, K) * 2 - 1
        b = torch.rand(N, K) * 2 - 1 if tb else torch.rand(K, N) * 2 - 1
        c = torch.rand(M, N) * 2 - 1
        op_a = a.double().t() if ta else a.double()
        op_b = b.double().t() if tb else b.double()
        out = alpha * torch.matmul(op_a, op_b) + beta * c.double()
        bf16 = alpha * torch.matmul(op_a.bfloat16().double(), op_b.bfloat16().double())
        bf16 = bf16 + beta * c.double()
        params = torch.tensor([M, N, K, float(ta), float(tb), alpha, beta])
        tensors += [(f"case{i}.params", params), (f"case{i}.a", a), (f"case{i}.b", b),
                    (f"case{i}.c", c), (f"case{i}.out", out), (f"case{i}.bf16", bf16)]
        if M * N * K >= 16**3:
            torch_bf16 = torch.matmul(op_a.float().bfloat16(), op_b.float().bfloat16())
            tensors.append((f"case{i}.torch_bf16", torch_bf16.float()))
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    path = os.path.join(root, "tests", "golden", "gemm.safetensors")
    safetensors_file.write(path, tensors)
    print(f"wrote {os.path.normpath(path)} ({len(CASES)} cases)")


if __name__ == "__main__":
    main()
