"""PSAQ-ViT (Li et al., ECCV 2022): data-free calibration images for vision transformers.

Real images make a ViT's self-attention produce patch features whose pairwise similarities spread
over a wide, multi-modal range; Gaussian noise gives a narrow one. PSAQ-ViT optimises noise so that
the similarity distribution of every block is as *diverse* as possible, measured by the differential
entropy of a kernel density estimate:

    f_l      = the attention output (attn @ v) of block l, averaged over heads, class token dropped
    S_l      = cosine similarities between every pair of patch features of one image (N x N entries)
    p_l(t)   = mean_ij N(t; S_l[ij], h^2)                 (Gaussian kernel, bandwidth h = 0.01)
    H_l      = integral of -(p + 1e-4) log(p + 1e-4) dt    (trapezoid rule on ``points`` points between the
                                                           batch's smallest and largest similarity)
    loss     = -sum_l mean_images H_l  +  CE(model(x), y)  (y: random target classes)

(The authors' code also adds a total-variation prior tuned for 224 x 224 ImageNet images; we leave
it out for 28 x 28 ones.) Adam (lr 0.2 in normalised units, betas 0.5 / 0.9) with a cosine schedule,
random shifts and flips, images projected back to [0, 1] after each step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..quantizers.attention import MatMul, explicit_attention
from ..wrapper import ZooModel


def kde_entropy(s: torch.Tensor, bandwidth: float = 0.01, points: int = 10, lo=None, hi=None) -> torch.Tensor:
    """Per row of ``s`` [B, M] (samples), the entropy of its Gaussian kernel density estimate on
    ``points`` evenly spaced points in [lo, hi] (default: the smallest and largest value of ``s``)."""
    lo = s.detach().min() if lo is None else torch.as_tensor(lo, dtype=s.dtype)
    hi = s.detach().max() if hi is None else torch.as_tensor(hi, dtype=s.dtype)
    t = torch.linspace(0, 1, points, dtype=s.dtype, device=s.device) * (hi - lo) + lo  # [P]
    z = (t.view(1, -1, 1) - s.unsqueeze(1)) / bandwidth                                 # [B, P, M]
    p = torch.exp(-0.5 * z ** 2).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))         # [B, P]
    f = -(p + 1e-4) * torch.log(p + 1e-4)
    return torch.trapezoid(f, t, dim=-1)


def patch_similarity(f: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Cosine similarity of every pair of patch tokens: f [B, H, N, D] (per-head attention output) ->
    [B, (N - prefix)^2], heads averaged first, the ``prefix`` class/distillation tokens dropped."""
    x = F.normalize(f.mean(1)[:, prefix:], dim=-1)
    return (x @ x.transpose(1, 2)).flatten(1)


def _attn_outputs(net: nn.Module):
    mods = [m for n, m in net.named_modules() if n.endswith("matmul2") and isinstance(m, MatMul)]
    if not mods:
        raise ValueError("PSAQ-ViT needs attention blocks (explicit attn @ v matmuls); this model has none")
    return mods


def psaq_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prefix: int = 1, bandwidth: float = 0.01,
              points: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(-sum over blocks of the mean patch-similarity entropy, cross-entropy to ``y``) for images x."""
    net = model.net if isinstance(model, ZooModel) else model
    feats = []
    hooks = [m.register_forward_hook(lambda mod, a, o: feats.append(o)) for m in _attn_outputs(net)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    ent = sum(kde_entropy(patch_similarity(f, prefix), bandwidth, points).mean() for f in feats)
    return -ent, F.cross_entropy(logits, y)


def synthesize_psaq(model: nn.Module, n: int = 256, seed: int = 0, *, shape=None, iters: int = 500,
                    lr: float = 0.2, batch_size: int = 32, ce: float = 1.0, jitter: int = 2,
                    progress: bool = True) -> torch.Tensor:
    """``n`` calibration images (N x C x H x W in [0, 1]) for the float ViT ``model`` (see the module
    docstring), optimised ``batch_size`` at a time."""
    import copy

    if not isinstance(model, ZooModel) and shape is None:
        raise ValueError("shape= (C, H, W) is needed for a model that is not a zoo.ZooModel")
    m = copy.deepcopy(model).eval()
    net = m.net if isinstance(m, ZooModel) else m
    explicit_attention(net)
    for p in m.parameters():
        p.requires_grad_(False)
    if shape is None:
        c, (h, w) = m.input_contract["channels"], m.input_contract["size"]
        shape = (c, h, w)
    prefix = getattr(net, "num_prefix", 1)
    classes = len(m.input_contract.get("classes", [])) if isinstance(m, ZooModel) else None
    mean = m.mean if isinstance(m, ZooModel) else torch.zeros(1, shape[0], 1, 1)
    std = m.std if isinstance(m, ZooModel) else torch.ones(1, shape[0], 1, 1)
    g = torch.Generator().manual_seed(seed)
    out = []
    bar = tqdm(total=-(-n // batch_size) * iters, desc="PSAQ-ViT synthesis", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn((b,) + tuple(shape), generator=g)  # normalised units, as the authors start
        z.requires_grad_(True)
        with torch.no_grad():
            y_logits = m(torch.clamp(z * std + mean, 0, 1))
        k = classes or y_logits.shape[-1]
        y = torch.randint(0, k, (b,), generator=g)
        opt = torch.optim.Adam([z], lr=lr, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
        for _ in range(iters):
            dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
            img = torch.clamp(z * std + mean, 0, 1).roll((dx, dy), (2, 3))
            if bool(torch.rand((), generator=g) < 0.5):
                img = img.flip(3)
            ent, ce_loss = psaq_loss(m, img, y, prefix)
            loss = ent + ce * ce_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # keep the image in [0, 1]
                z.copy_(torch.clamp(z * std + mean, 0, 1).sub(mean).div(std))
            bar.update(1)
            bar.set_postfix(entropy=f"{-float(ent):.3f}", ce=f"{float(ce_loss):.3f}")
        out.append(torch.clamp(z.detach() * std + mean, 0, 1))
    bar.close()
    return torch.cat(out)
