"""golden_train.py - PyTorch reference optimizer steps for tests/test_train.c.

Writes tests/golden/train.safetensors: torch.optim.AdamW (lr 0.01, betas (0.9, 0.99), eps 1e-8;
weight decay 0.1 on the matrix only, as diamond's adamw_step decays tensors of 2+ dims) with
torch.nn.utils.clip_grad_norm_(max_norm 1.0) before each step, over two parameters:
  w0 [3, 5], b0 [5]                the initial values
  g{t}.w, g{t}.b   t = 0..3        the gradients given at step t (step 2 gives b a zero one, as
                                   zero_grad(set_to_none=False) leaves a parameter the loss
                                   did not reach: it is still updated, its moments decay)
  w{t}, b{t}       t = 1..4        the values after step t
  norm{t}          [1]             clip_grad_norm_'s returned norm at step t (before clipping)
  ema{t}.w, ema{t}.b  t = 1..4     torch.optim.swa_utils.AveragedModel's average after step t,
                                   avg_fn 0.9 avg + 0.1 p (the first update copies)
The gradients grow with t so that clipping is active on some steps and not on others.
Run with Debian's python3 (it has torch): /usr/bin/python3 tools/golden_train.py
"""
import os

import torch

import safetensors_file

STEPS = 4
EMA_DECAY = 0.9


def main():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 5, generator=gen).requires_grad_()
    b = torch.randn(5, generator=gen).requires_grad_()
    out = {"w0": w.detach().clone(), "b0": b.detach().clone()}
    params = torch.nn.ParameterList([w, b])
    ema = torch.optim.swa_utils.AveragedModel(
        params, avg_fn=lambda avg, p, n: EMA_DECAY * avg + (1.0 - EMA_DECAY) * p)
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1},
                             {"params": [b], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for t in range(STEPS):
        gw = torch.randn(3, 5, generator=gen) * (0.1 * 4 ** t)
        gb = torch.randn(5, generator=gen) * (0.1 * 4 ** t)
        w.grad = gw.clone()
        if t == 2:
            gb = torch.zeros(5)
        b.grad = gb.clone()
        out[f"g{t}.w"] = gw
        out[f"g{t}.b"] = gb
        norm = torch.nn.utils.clip_grad_norm_([w, b], 1.0)
        out[f"norm{t + 1}"] = norm.reshape(1)
        opt.step()
        out[f"w{t + 1}"] = w.detach().clone()
        out[f"b{t + 1}"] = b.detach().clone()
        ema.update_parameters(params)
        out[f"ema{t + 1}.w"] = ema.module[0].detach().clone()
        out[f"ema{t + 1}.b"] = ema.module[1].detach().clone()
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "train.safetensors")
    safetensors_file.write(path, out)


if __name__ == "__main__":
    main()
