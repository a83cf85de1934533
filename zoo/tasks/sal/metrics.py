"""Salient-object detection metrics, as the SOD benchmarks define them.

Predictions are saliency maps in [0, 1] (the model's sigmoid, used as is), ground truths binary.

- **MAE**: mean |pred - gt| per image, averaged over images.
- **max F-measure** (beta^2 = 0.3): the map is quantised to 0..255 (``floor(255 p)``), binarised at
  every threshold t = 0..255 (pred >= t), precision/recall/F computed per image, the F curves
  averaged over images, and the maximum over t taken.
  F = (1 + b^2) P R / (b^2 P + R), 0 where P = R = 0.
- **S-measure** (Fan et al., ICCV 2017), alpha = 0.5: S = a S_object + (1 - a) S_region; 1 - mean(p)
  for an empty ground truth, mean(p) for a full one.
"""
from __future__ import annotations

import math

import torch

BETA2 = 0.3
EPS = 1e-8


def mae(pred: torch.Tensor, gt: torch.Tensor) -> float:
    return float((pred.double() - gt.double()).abs().mean())


def f_curve(pred: torch.Tensor, gt: torch.Tensor, beta2: float = BETA2) -> torch.Tensor:
    """F-measure of one map at the 256 thresholds t = 0..255 (float64 [256])."""
    q = (pred.double().clamp(0, 1) * 255).floor().long().flatten()
    g = gt.flatten() > 0.5
    # number of pixels with code >= t: reversed cumulative histogram
    hist_all = torch.bincount(q, minlength=256)
    hist_fg = torch.bincount(q[g], minlength=256)
    pp = hist_all.flip(0).cumsum(0).flip(0).double()   # predicted positive at threshold t
    tp = hist_fg.flip(0).cumsum(0).flip(0).double()    # true positives
    n_pos = float(g.sum())
    precision = torch.where(pp > 0, tp / pp.clamp(min=1), torch.zeros_like(tp))
    recall = tp / n_pos if n_pos > 0 else torch.zeros_like(tp)
    denom = beta2 * precision + recall
    return torch.where(denom > 0, (1 + beta2) * precision * recall / denom.clamp(min=EPS),
                       torch.zeros_like(denom))


def _object(x: torch.Tensor, region: torch.Tensor) -> float:
    v = x[region]
    if v.numel() == 0:
        return 0.0
    mean = float(v.mean())
    std = float(v.std(unbiased=True)) if v.numel() > 1 else 0.0
    return 2 * mean / (mean * mean + 1 + std + EPS)


def _s_object(p: torch.Tensor, g: torch.Tensor) -> float:
    u = float(g.double().mean())
    fg = _object(torch.where(g, p, torch.zeros_like(p)), g)
    bg = _object(torch.where(~g, 1 - p, torch.zeros_like(p)), ~g)
    return u * fg + (1 - u) * bg


def _ssim_block(p: torch.Tensor, g: torch.Tensor) -> float:
    """The S-measure's global SSIM of one block (sample variances, N - 1)."""
    n = p.numel()
    x, y = float(p.mean()), float(g.mean())
    if n > 1:
        sx = float(((p - x) ** 2).sum()) / (n - 1)
        sy = float(((g - y) ** 2).sum()) / (n - 1)
        sxy = float(((p - x) * (g - y)).sum()) / (n - 1)
    else:
        sx = sy = sxy = 0.0
    a = 4 * x * y * sxy
    b = (x * x + y * y) * (sx + sy)
    if a != 0:
        return a / (b + EPS)
    return 1.0 if b == 0 else 0.0


def _round(v: float) -> int:
    """MATLAB's round (halves away from zero; v >= 0 here), not Python's round-half-to-even."""
    return int(math.floor(v + 0.5))


def _s_region(p: torch.Tensor, g: torch.Tensor) -> float:
    h, w = g.shape
    gf = g.double()
    total = float(gf.sum())
    if total == 0:
        cx, cy = _round(w / 2), _round(h / 2)
    else:  # centroid, 1-based like the reference MATLAB code; splits after row/column (cy, cx)
        cx = _round(float((gf.sum(0) * torch.arange(1, w + 1, dtype=torch.float64)).sum()) / total)
        cy = _round(float((gf.sum(1) * torch.arange(1, h + 1, dtype=torch.float64)).sum()) / total)
    score = 0.0
    for rows in (slice(0, cy), slice(cy, h)):
        for cols in (slice(0, cx), slice(cx, w)):
            pb, gb = p[rows, cols], gf[rows, cols]
            if pb.numel() == 0:
                continue
            score += pb.numel() / (h * w) * _ssim_block(pb, gb)
    return score


def s_measure(pred: torch.Tensor, gt: torch.Tensor, alpha: float = 0.5) -> float:
    """S-measure of one map (H x W, or 1 x H x W)."""
    def hw(t):  # drop leading singleton dims only (an H of 1 stays)
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        return t

    p, g = hw(pred.double().clamp(0, 1)), hw(gt) > 0.5
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} must be one H x W map")
    y = float(g.double().mean())
    if y == 0:
        return 1.0 - float(p.mean())
    if y == 1:
        return float(p.mean())
    s = alpha * _s_object(p, g) + (1 - alpha) * _s_region(p, g)
    return max(s, 0.0)


class SaliencyMeter:
    """Accumulates per-image MAE, F curves and S-measures; ``compute()`` gives the dataset means."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.n, self.mae, self.s, self.f = 0, 0.0, 0.0, torch.zeros(256, dtype=torch.float64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: [N, 1, H, W] (or [N, H, W]) saliency maps in [0, 1] and binary masks."""
        pred, gt = pred.detach().float().cpu(), gt.detach().float().cpu()
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ")
        for p, g in zip(pred, gt):
            self.mae += mae(p, g)
            self.f += f_curve(p, g)
            self.s += s_measure(p, g)
            self.n += 1

    def compute(self) -> dict:
        n = max(self.n, 1)
        return {"mae": self.mae / n, "maxf": float((self.f / n).max()), "smeasure": self.s / n,
                "images": self.n}
