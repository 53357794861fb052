"""golden_eval.py - DIAMOND's evaluation metrics by the official formulas, for tests/test_eval.c.

The formulas are gmum/DIAMOND's src/tasks/metrics.py (artifact_metrics, l1_between_sets,
mae_by_artifact_regions), restated here in torch on made-up images and detector maps:
  artifact flag      probs.max() >= thr                        (map at 1/4 of the input)
  pixel ratio        (probs >= thr).float().mean()
  MAE                F.l1_loss(g, r) * 255, g and r the 8-bit images / 255
  MAE(A), MAE(NA)    mask = interpolate(probs, image size, bilinear, align_corners=False) >= thr;
                     sum(|g - r| * 255 * mask) / mask.sum().clamp_min(1) over the 3 channels, and
                     the same with 1 - mask
  table              each figure the mean over images, frequency and ratio * 100
The map is resized in float32 as upstream (the model's output dtype); the means are taken in
float64 (upstream: float32), stored float32.

Writes tests/golden/eval.safetensors. For each case i:
  case{i}.size       [4]  H, W, h, w
  case{i}.baseline   [H, W, 3] 8-bit values as floats; case{i}.guided likewise
  case{i}.bmap       [h, w] the baseline's sigmoid map; case{i}.gmap the guided one's
  case{i}.metrics    [8]  baseline flag, guided flag, baseline ratio, guided ratio, MAE, MAE(A),
                          MAE(NA), artifact pixels (fractions, not percent)
  summary            [8]  n, baseline freq %, baseline ratio %, guided freq %, guided ratio %,
                          MAE, MAE(A), MAE(NA)
Run with Debian's python3 (it has torch): /usr/bin/python3 tools/golden_eval.py
"""
import os

import torch
import torch.nn.functional as F

import safetensors_file

THRESHOLD = 0.5

# H, W, h, w, map kind: odd sizes, maps that are not exactly 1/4 of the image, a baseline with
# no artifact pixel (MAE(A) adds 0), one that is artifact everywhere (MAE(NA) adds 0), and a
# guided image equal to its baseline.
CASES = [
    (16, 24, 4, 6, "mixed"),
    (13, 17, 4, 5, "mixed"),
    (9, 7, 3, 2, "clean"),
    (8, 8, 2, 2, "all"),
    (20, 12, 5, 3, "mixed_same"),
    (1, 1, 1, 1, "mixed"),
]


def make_map(h, w, kind, gen):
    """A sigmoid map whose resized values keep clear of the threshold (no rounding ties)."""
    if kind == "clean":
        return torch.rand(h, w, generator=gen) * 0.4
    if kind == "all":
        return 0.6 + torch.rand(h, w, generator=gen) * 0.4
    return torch.sigmoid(torch.randn(h, w, generator=gen) * 2)


def upsampled(probs, H, W):
    return F.interpolate(probs[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]


def official_metrics(base, guided, bmap, gmap):
    """base, guided: [H, W, 3] uint8 values; maps [h, w] float32."""
    r = base.double().permute(2, 0, 1) / 255
    g = guided.double().permute(2, 0, 1) / 255
    flag_b = float(bmap.max() >= THRESHOLD)
    flag_g = float(gmap.max() >= THRESHOLD)
    ratio_b = (bmap >= THRESHOLD).double().mean().item()
    ratio_g = (gmap >= THRESHOLD).double().mean().item()
    mae = F.l1_loss(g, r).item() * 255
    mask_hw = (upsampled(bmap, base.shape[0], base.shape[1]) >= THRESHOLD).double()
    diff = torch.abs(g - r) * 255
    mask_3 = mask_hw.unsqueeze(0).expand_as(diff)
    inv_3 = 1.0 - mask_3
    mae_a = ((diff * mask_3).sum() / mask_3.sum().clamp_min(1.0)).item()
    mae_na = ((diff * inv_3).sum() / inv_3.sum().clamp_min(1.0)).item()
    return [flag_b, flag_g, ratio_b, ratio_g, mae, mae_a, mae_na, mask_hw.sum().item()]


def main():
    gen = torch.Generator().manual_seed(7)
    tensors, rows = [], []
    for i, (H, W, h, w, kind) in enumerate(CASES):
        while True:
            bmap = make_map(h, w, kind.replace("_same", ""), gen)
            up = upsampled(bmap, H, W)
            if (up - THRESHOLD).abs().min() > 1e-4 and (bmap - THRESHOLD).abs().min() > 1e-4:
                break
        gmap = make_map(h, w, "mixed", gen) * 0.8
        base = torch.randint(0, 256, (H, W, 3), generator=gen)
        noise = torch.randint(-40, 41, (H, W, 3), generator=gen)
        guided = base.clone() if kind.endswith("_same") else (base + noise).clamp(0, 255)
        m = official_metrics(base, guided, bmap, gmap)
        rows.append(m)
        tensors += [(f"case{i}.size", torch.tensor([H, W, h, w])),
                    (f"case{i}.baseline", base), (f"case{i}.guided", guided),
                    (f"case{i}.bmap", bmap), (f"case{i}.gmap", gmap),
                    (f"case{i}.metrics", torch.tensor(m, dtype=torch.float64))]
    t = torch.tensor(rows, dtype=torch.float64)
    summary = [len(rows), t[:, 0].mean() * 100, t[:, 2].mean() * 100, t[:, 1].mean() * 100,
               t[:, 3].mean() * 100, t[:, 4].mean(), t[:, 5].mean(), t[:, 6].mean()]
    tensors.append(("summary", torch.tensor([float(v) for v in summary], dtype=torch.float64)))
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "eval.safetensors")
    safetensors_file.write(out, [(name, t.double()) for name, t in tensors])
    print("wrote", out, "summary", [round(float(v), 4) for v in summary])


if __name__ == "__main__":
    main()
