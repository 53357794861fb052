#!/usr/bin/python3
"""Golden data for tests/test_sampler.c: DIAMOND's guided sampling loop in float64 torch.

The loop follows gmum/DIAMOND's FLUX.2 single-image task (src/tasks/single_image_flux2.py,
utils/flux2_helpers.py, utils/lambda_schedule.py), written from it, on the tiny fixtures:
tools/ref_flux2.py's transformer (tests/fixtures/tiny-flux2/transformer), tools/ref_vae.py's
decoder (tests/fixtures/tiny-flux2/vae) and tools/ref_segformer.py's detector
(tests/fixtures/tiny-detector), each loaded from the fixture files. Per step i:
    v = flow(x_t, sigma_i)                      (no gradient)
    with classifier-free guidance (the "cfg" case, as diffusers' Flux2KleinPipeline for base
    models): v = v_neg + cfg (v - v_neg), v_neg = flow(x_t, sigma_i) on the negative embeddings
    x0 = x_t - sigma_i v
    mask = detector(vae_decode(x0)) at image size; L = sum over samples of mean(loss(mask))
    g = dL/dx0; each sample b with detector max >= gate (gate 0: all) is shifted:
    x_next = x_t + (sigma_{i+1} - sigma_i) v - lambda_i g_b / (||g_b|| + 1e-6)
Where lambda_i = 0 the detector does not run (as upstream). Sigmas are the FLUX.2 schedule
(linspace + empirical mu), rounded to float32 as the scheduler stores them; lambda_i is rounded to
float32 as the C code keeps it. The official schedules divide by zero at N = 1 and for an
exponential window of one step; here (as in nn.c) u = 0 there.

Writes tests/golden/sampler.safetensors (float32):
  noise [2, 6, 16], txt [5, 24]            the inputs every case shares (batch 1 takes noise[0])
  neg_txt [4, 24]                          the "cfg" case's negative prompt embeddings
  CASE.step.I.{x_t, sigma, v, x0, mask, grad, lambda}, CASE.final.latent, CASE.final.image
                                           mask and grad only where the detector / backward ran
  sched.SPEC.N                             lambda_i for i < N of a schedule spec
  seed.S.noise [6, 16]                     the FLUX.2 pipeline's initial latent for seed S:
                                           randn((1, C, h, w)) from a CPU generator, packed
Run with /usr/bin/python3 (Debian's torch).
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_flux2  # noqa: E402
import ref_segformer  # noqa: E402
import ref_vae  # noqa: E402
import safetensors_file  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
F64 = torch.float64
H, W, L = 2, 3, 5  # token grid, prompt length

# name, batch, steps, guided, lambda schedule, loss, gate[, cfg scale] (kept in step with
# tests/test_sampler.c)
CASES = [
    ("base1", 1, 3, False, "constant", "mse", 0.0),
    ("base2", 2, 3, False, "constant", "mse", 0.0),
    ("constant", 1, 3, True, "constant:value=0.5", "mse", 0.0),
    ("linear", 1, 3, True, "linear:start=0.8,end=0.2", "mse", 0.0),
    ("power", 2, 3, True, "power:start=0.8,end=0.2,power=2", "mse", 0.0),
    ("cosine", 1, 3, True, "cosine:start=0.8,end=0.2", "mse", 0.0),
    ("hard_then_exp", 2, 4, True, "hard_then_exp:start=0.8,after=0.4,power=2", "mse", 0.0),
    ("exponential", 1, 4, True, "exponential:start=0.8,end=0.2,power=3,warmup=1,cooldown=1",
     "mse", 0.0),
    ("exponential_one", 1, 3, True, "exponential:start=0.6,end=0.2,power=2,warmup=1,cooldown=1",
     "mse", 0.0),
    ("loss_power", 2, 3, True, "linear:start=0.8,end=0.2", "power:gamma=3", 0.0),
    ("loss_focal", 2, 3, True, "linear:start=0.8,end=0.2", "focal:gamma=2,alpha=1", 0.0),
    ("one_step", 1, 1, True, "linear:start=0.5,end=0.1", "mse", 0.0),
    ("gate", 2, 3, True, "linear:start=0.8,end=0.2", "mse", 0.5),
    ("cfg", 2, 3, True, "linear:start=0.8,end=0.2", "mse", 0.0, 3.0),
]
SCHEDULE_SPECS = ["constant", "linear", "power", "cosine", "hard_then_exp", "exponential",
                  "power:start=25,end=1,power=2",
                  "exponential:start=2,end=1,power=2,warmup=1,cooldown=1",
                  "exponential:warmup=0,cooldown=0"]
SCHEDULE_STEPS = [1, 2, 3, 5, 30]

DEFAULTS = {
    "constant": {"value": 0.0},
    "linear": {"start": 12.0, "end": 1.0},
    "power": {"start": 12.0, "end": 1.0, "power": 2.0},
    "cosine": {"start": 12.0, "end": 1.0},
    "hard_then_exp": {"start": 30.0, "after": 2.0, "power": 2.0},
    "exponential": {"start": 30.0, "end": 1.0, "power": 5.0, "warmup": 5, "cooldown": 12},
}


def parse_spec(spec):
    kind, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        params[k] = float(v)
    return kind, params


def schedule(spec):
    kind, given = parse_spec(spec)
    p = dict(DEFAULTS[kind], **given)

    def progress(i, span):
        return i / (span - 1) if span > 1 else 0.0

    def at(i, n):
        if kind == "constant":
            return p["value"]
        if kind == "linear":
            u = progress(i, n)
            return p["start"] * (1 - u) + p["end"] * u
        if kind == "power":
            return p["end"] + (p["start"] - p["end"]) * (1 - progress(i, n)) ** p["power"]
        if kind == "cosine":
            cosine = 0.5 * (1 + math.cos(math.pi * progress(i, n)))
            return p["end"] + (p["start"] - p["end"]) * cosine
        if kind == "hard_then_exp":
            if i == 0:
                return p["start"]
            return p["after"] * (1 - (i - 1) / max(1, n - 2)) ** p["power"]
        warmup, cooldown = int(p["warmup"]), int(p["cooldown"])
        if i < warmup or i >= n - cooldown:
            return 0.0
        u = progress(i - warmup, n - warmup - cooldown)
        return p["end"] + (p["start"] - p["end"]) * (1 - u) ** p["power"]
    return at


def loss_fn(spec):
    kind, p = parse_spec(spec)
    gamma, alpha = p.get("gamma", 2.0), p.get("alpha", 1.0)

    def per_sample_sum(mask):
        m = mask.clamp(0, 1)
        if kind == "mse":
            per = m ** 2
        elif kind == "power":
            per = m ** gamma
        else:
            per = -alpha * (1 - m) ** gamma * torch.log(1 - m + 1e-6)
        return per.mean() * mask.shape[0]
    return per_sample_sum


# ---- fixtures ---------------------------------------------------------------------------------

def read_dir(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(safetensors_file.read(os.path.join(directory, name)))
    return out


class Models:
    def __init__(self):
        fixtures = os.path.join(ROOT, "tests", "fixtures")
        self.flow = {k: v.double() for k, v in
                     read_dir(os.path.join(fixtures, "tiny-flux2", "transformer")).items()}
        self.vae = {k: v.double() for k, v in
                    read_dir(os.path.join(fixtures, "tiny-flux2", "vae")).items()}
        self.detector = ref_segformer.SegformerForSemanticSegmentation(ref_segformer.CONFIG)
        state = read_dir(os.path.join(fixtures, "tiny-detector"))
        self.detector.load_state_dict(state, strict=True)
        self.detector = self.detector.double().eval()

    def velocity(self, x, sigma, txt):
        s = torch.full([x.shape[0]], sigma, dtype=F64)
        return ref_flux2.forward(self.flow, ref_flux2.CONFIG, x, H, W, txt, s)

    def decode(self, x):
        return ref_vae.decode(x, self.vae, ref_vae.CONFIG, H, W)

    def detect(self, image):
        _, small, mask = ref_segformer.detector(self.detector, ref_segformer.PREPROCESSOR, image)
        return small, mask


def f32(x):
    return float(torch.tensor(x, dtype=torch.float32))


def run_case(models, name, batch, steps, guided, spec, loss_spec, gate, cfg, noise, txt, neg_txt):
    lam_at, loss = schedule(spec), loss_fn(loss_spec)
    sigmas = ref_flux2.klein_sigmas(steps, H * W).float().double()
    x = noise[:batch].clone()
    txt = txt.expand(batch, -1, -1)
    neg_txt = neg_txt.expand(batch, -1, -1)
    out = {}
    for i in range(steps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        lam = f32(lam_at(i, steps)) if guided else 0.0
        with torch.no_grad():
            v = models.velocity(x, s, txt)
            if cfg > 1.0:
                v_neg = models.velocity(x, s, neg_txt)
                v = v_neg + cfg * (v - v_neg)
        x0 = x - s * v
        p = f"{name}.step.{i}."
        out.update({p + "x_t": x, p + "sigma": torch.tensor([s]), p + "v": v, p + "x0": x0,
                    p + "lambda": torch.tensor([lam])})
        grad, shifted = None, [False] * batch
        if lam != 0.0:
            leaf = x0.detach().requires_grad_(True)
            small, mask = models.detect(models.decode(leaf))
            out[p + "mask"] = mask.detach()
            maxima = [small[b].max().item() for b in range(batch)]
            shifted = [gate <= 0 or m >= gate for m in maxima]
            if gate > 0:
                print(f"{name} step {i}: detector max {maxima} gate {gate} -> {shifted}")
            if any(shifted):
                loss(mask).backward()
                grad = leaf.grad.clone()
                for b in range(batch):
                    if not shifted[b]:
                        grad[b].zero_()
                out[p + "grad"] = grad
        x = x + (s_next - s) * v
        for b in range(batch):
            if shifted[b]:
                x[b] = x[b] - lam * grad[b] / (grad[b].norm() + 1e-6)
    out[f"{name}.final.latent"] = x
    with torch.no_grad():
        out[f"{name}.final.image"] = models.decode(x)
    return out


def main():
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(20261127)
    cin, jd = ref_flux2.CONFIG["in_channels"], ref_flux2.CONFIG["joint_attention_dim"]
    noise = torch.randn(2, H * W, cin, generator=gen, dtype=torch.float32).double()
    txt = torch.randn(L, jd, generator=gen, dtype=torch.float32).double()
    neg_txt = torch.randn(L - 1, jd, generator=gen, dtype=torch.float32).double()
    models = Models()
    golden = {"noise": noise, "txt": txt, "neg_txt": neg_txt}
    for case in CASES:
        name, batch, steps, guided, spec, loss_spec, gate = case[:7]
        cfg = case[7] if len(case) > 7 else 1.0
        golden.update(run_case(models, name, batch, steps, guided, spec, loss_spec, gate, cfg,
                               noise, txt, neg_txt))
    for spec in SCHEDULE_SPECS:
        at = schedule(spec)
        for n in SCHEDULE_STEPS:
            golden[f"sched.{spec}.{n}"] = torch.tensor([at(i, n) for i in range(n)], dtype=F64)
    for seed in (42, 7):
        latent = torch.randn(1, cin, H, W, generator=torch.Generator().manual_seed(seed))
        golden[f"seed.{seed}.noise"] = latent.reshape(cin, H * W).T.double()
    safetensors_file.write(os.path.join(ROOT, "tests", "golden", "sampler.safetensors"), golden)
    print(f"sampler.safetensors: {len(golden)} tensors")


if __name__ == "__main__":
    main()
