"""Matting metrics as the matting literature reports them (and BiMatting's evaluation scripts scale
them), per frame, averaged over the frames of a clip and then over clips:

- MAD  = mean |p - g| x 1e3
- MSE  = mean (p - g)^2 x 1e3
- Grad = sum (|grad G_s * p| - |grad G_s * g|)^2 / 1e3, the gradient magnitudes by first-order
  Gaussian derivative filters with sigma = 1.4 (Rhemann et al. 2009)
- Conn = sum |phi(p) - phi(g)| / 1e3, with thresholds 0, 0.1, ..., 1: l(i) is the last threshold at
  which pixel i still belongs to the largest 4-connected component of (p >= t) & (g >= t), and
  phi(a)_i = 1 - d_i [d_i >= 0.15] with d_i = a_i - l(i) (Rhemann et al. 2009)
- dtSSD = sqrt(sum ((p_t - p_{t-1}) - (g_t - g_{t-1}))^2 / pixels) x 1e2 per frame t >= 1 (Erofeev et
  al. 2015), averaged over the clip's frames after the first

Grad and Conn are sums over pixels, so they grow with the frame size: compare them at one size.
"""
from __future__ import annotations

import numpy as np
import torch

GRAD_SIGMA = 1.4
CONN_STEP = 0.1
CONN_DELTA = 0.15
KEYS = ("mad", "mse", "grad", "conn", "dtssd")


def mad(p: np.ndarray, g: np.ndarray) -> float:
    return float(np.abs(p - g).mean() * 1e3)


def mse(p: np.ndarray, g: np.ndarray) -> float:
    return float(((p - g) ** 2).mean() * 1e3)


def _grad_mag(a: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    gy = gaussian_filter(a, GRAD_SIGMA, order=(1, 0), mode="nearest")
    gx = gaussian_filter(a, GRAD_SIGMA, order=(0, 1), mode="nearest")
    return np.sqrt(gx ** 2 + gy ** 2)


def grad(p: np.ndarray, g: np.ndarray) -> float:
    return float(((_grad_mag(p.astype(np.float64)) - _grad_mag(g.astype(np.float64))) ** 2).sum() / 1e3)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import label

    lab, n = label(mask)  # 4-connectivity (scipy's default structure)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(np.argmax(sizes)))


def conn(p: np.ndarray, g: np.ndarray) -> float:
    p, g = p.astype(np.float64), g.astype(np.float64)
    steps = np.round(np.arange(0, 1 + CONN_STEP / 2, CONN_STEP), 10)
    level = np.full(p.shape, -1.0)
    for t in steps[1:]:
        omega = _largest_component((p >= t) & (g >= t))
        level[(level == -1) & ~omega] = t - CONN_STEP
    level[level == -1] = 1.0
    dp, dg = p - level, g - level
    phi_p = 1 - dp * (dp >= CONN_DELTA)
    phi_g = 1 - dg * (dg >= CONN_DELTA)
    return float(np.abs(phi_p - phi_g).sum() / 1e3)


def dtssd(p: np.ndarray, g: np.ndarray) -> float:
    """Mean over frames t >= 1 of a clip (arrays T x H x W)."""
    dp, dg = np.diff(p.astype(np.float64), axis=0), np.diff(g.astype(np.float64), axis=0)
    per = np.sqrt(((dp - dg) ** 2).reshape(len(dp), -1).mean(1)) * 1e2
    return float(per.mean())


def clip_metrics(p: np.ndarray, g: np.ndarray, full: bool = True) -> dict:
    """Metrics of one clip (alpha arrays T x H x W in [0, 1]); ``full=False`` skips Grad and Conn."""
    out = {"mad": np.mean([mad(a, b) for a, b in zip(p, g)]), "mse": np.mean([mse(a, b) for a, b in zip(p, g)])}
    if full:
        out["grad"] = np.mean([grad(a, b) for a, b in zip(p, g)])
        out["conn"] = np.mean([conn(a, b) for a, b in zip(p, g)])
    if len(p) > 1:
        out["dtssd"] = dtssd(p, g)
    return {k: float(v) for k, v in out.items()}


class MattingMeter:
    """Accumulates clip metrics over batches of alpha N x T x 1 x H x W; ``compute()`` averages over clips."""

    def __init__(self, full: bool = True):
        self.full, self.rows = full, []

    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        p = pred.detach().float().cpu().clamp(0, 1)[:, :, 0].numpy()
        g = true.detach().float().cpu()[:, :, 0].numpy()
        self.rows += [clip_metrics(a, b, self.full) for a, b in zip(p, g)]

    def compute(self) -> dict:
        if not self.rows:
            return {}
        keys = [k for k in KEYS if k in self.rows[0]]
        return {k: float(np.mean([r[k] for r in self.rows])) for k in keys}
