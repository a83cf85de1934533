"""Activation range estimators for post-training calibration.

Each returns the (lo, hi) range of an asymmetric ``bits``-bit grid, in the convention of the MinMax
activation quantizer the packed path runs: lo <= 0 <= hi, scale = (hi - lo) / (2^b - 1), zero point
round(-lo / scale), codes clamp(round(x / scale) + zero, 0, 2^b - 1).

- ``minmax``: the observed extremes.
- ``percentile``: the ``p``-th and (100 - p)-th percentiles (outliers clipped).
- ``mse``: the range alpha * (min, max), alpha on a grid of ``grid`` values in (0, 1], minimising the
  mean squared error between x and its fake-quantized value on that grid (per layer).
"""
from __future__ import annotations

import torch

ESTIMATORS = ("minmax", "percentile", "mse")


def check_estimator(method: str) -> str:
    if method not in ESTIMATORS:
        raise ValueError(f"unknown range estimator {method!r}; valid: {list(ESTIMATORS)}")
    return method


def grid(lo: float, hi: float, bits: int) -> tuple[float, float]:
    """(scale, zero point) of the grid for the range (lo, hi), as MinMaxAct computes them."""
    n = 2 ** bits - 1
    scale = max((hi - lo) / n, 1e-8)
    return scale, float(torch.round(torch.tensor(-lo / scale)))


def fake_quant(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    scale, zero = grid(lo, hi, bits)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
    return (q - zero) * scale


def estimate_range(x: torch.Tensor, bits: int, method: str = "mse", percentile: float = 99.99,
                   steps: int = 100) -> tuple[float, float]:
    """The (lo, hi) range of samples ``x`` (any shape) for a ``bits``-bit activation grid."""
    check_estimator(method)
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} is not valid; valid: 1..16")
    x = x.detach().float().flatten()
    if x.numel() == 0:
        raise ValueError("no samples to estimate a range from")
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if method == "minmax" or hi == lo:
        return lo, hi
    if method == "percentile":
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile={percentile} is not valid; valid: a number in (50, 100]")
        qs = torch.quantile(x.double(), torch.tensor([1 - percentile / 100, percentile / 100],
                                                     dtype=torch.float64))
        return min(float(qs[0]), 0.0), max(float(qs[1]), 0.0)
    best = None
    for i in range(steps, 0, -1):  # from the full range down, so ties keep the wider range
        a = i / steps
        err = float(torch.mean((fake_quant(x, a * lo, a * hi, bits) - x) ** 2))
        if best is None or err < best[0]:
            best = (err, a * lo, a * hi)
    return best[1], best[2]


class RangeObserver:
    """Collects a layer's inputs over calibration batches: exact extremes, plus a seeded random
    subsample of at most ``max_samples`` values for the percentile and MSE estimators."""

    def __init__(self, max_samples: int = 2 ** 21, per_batch: int = 2 ** 18, seed: int = 0):
        self.max_samples, self.per_batch = max_samples, per_batch
        self.gen = torch.Generator().manual_seed(seed)
        self.parts: list[torch.Tensor] = []
        self.lo, self.hi = float("inf"), float("-inf")

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten().cpu()
        if x.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if x.numel() > self.per_batch:
            x = x[torch.randperm(x.numel(), generator=self.gen)[: self.per_batch]]
        self.parts.append(x)

    def samples(self) -> torch.Tensor:
        x = torch.cat(self.parts) if self.parts else torch.empty(0)
        if x.numel() > self.max_samples:
            x = x[torch.randperm(x.numel(), generator=self.gen)[: self.max_samples]]
        return x

    def range(self, bits: int, method: str, **kw) -> tuple[float, float]:
        if method == "minmax":  # the exact extremes, not the subsample's
            if self.lo > self.hi:
                raise ValueError("no samples to estimate a range from")
            return min(self.lo, 0.0), max(self.hi, 0.0)
        return estimate_range(self.samples(), bits, method, **kw)
