"""Softmax-output quantizers (activations only): ``Log2``, ``LogSqrt2`` (RepQ-ViT) and ``MPQ`` (APQ-ViT).

Each holds one calibrated scale (``s`` for the log quantizers, the step ``D`` for MPQ) and computes its
forward value from integer codes, like every quantizer here; ``fit(x)`` calibrates the scale on
recorded softmax outputs (``zoo.ptq.calibrate`` calls it). Formulas: the specs' docstrings in
``zoo.quantizers.config``. At inference on CPU float32 tensors the log quantizers take torch's log2 and
then one C++ pass (``kernels.cpu_ops.logact_levels``): the same values as the torch operations.
"""
from __future__ import annotations

import math

import torch

from ..kernels import cpu_ops
from .base import ActQuantizer, ste
from .config import MPQ, Log2, LogSqrt2, register_quantizer

QUANTILES = (0.999, 0.9999, 0.99999, 1.0)  # the scale candidates of the log quantizers (RepQ-ViT's search)


def _sample(x: torch.Tensor, n: int = 1 << 20) -> torch.Tensor:
    x = x.detach().reshape(-1).float()
    if x.numel() <= n:
        return x
    g = torch.Generator().manual_seed(0)
    return x[torch.randint(0, x.numel(), (n,), generator=g)]


class LogAct(ActQuantizer):
    """``s 2^(-q / k)`` levels (k = 1: log2, k = 2: log-sqrt2) and zero (the top code)."""

    def __init__(self, bits: int, k: int):
        super().__init__(bits, -1)
        self.mode, self.k = ("log2" if k == 1 else "logsqrt2"), k
        self.register_buffer("scale", torch.ones(()))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        top = 2 ** self.bits - 1
        with torch.no_grad():
            r = torch.round(-self.k * torch.log2(x / self.scale))  # x <= 0: +inf or nan
            r = torch.where(x > 0, r, torch.full_like(r, top))
            return r.clamp(0, top)

    def levels(self, q: torch.Tensor) -> torch.Tensor:
        """The value of each code: ``s 2^(-q/k)``, 0 for the top code (odd log-sqrt2 codes as
        ``2^(-(q+1)/2) sqrt 2``, how an integer implementation forms them)."""
        top = 2 ** self.bits - 1
        if self.k == 1:
            v = torch.exp2(-q)
        else:
            c = torch.ceil(q / 2)
            odd = 2 * c - q  # q mod 2 exactly (integer-valued q), without torch.remainder's slow pass
            v = torch.exp2(-c) * (1 + odd * (math.sqrt(2) - 1))
        return torch.where(q == top, torch.zeros_like(v), v * self.scale)

    def table(self) -> torch.Tensor:
        """``levels`` of every code 0..top (float32; rebuilt when the scale changes)."""
        tag = (self.scale.data_ptr(), self.scale._version, self.scale.device)
        hit = self.__dict__.get("_table")
        if hit is None or hit[0] != tag:
            q = torch.arange(2 ** self.bits, dtype=torch.float32, device=self.scale.device)
            hit = (tag, self.levels(q).float())
            self.__dict__["_table"] = hit
        return hit[1]

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):  # inference: ste's forward value, v + (x - x),
            if x.dtype == torch.float32 and not x.is_cuda and x.numel() and cpu_ops.ready():
                # torch's log2 as in codes(), then everything else in one C++ pass (the same values)
                return cpu_ops.logact_levels(x, torch.log2(x / self.scale), self.k, self.table())
            return self.levels(self.codes(x)) + (x - x)  # without building ste's gradient surrogate
        return ste(self.levels(self.codes(x)), torch.where((x > 0) & (x <= self.scale), x, x.detach()))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, hi: float | None = None) -> float:
        """Choose ``s`` among quantiles of ``x`` (``QUANTILES``; ``hi``: the exact maximum, if the
        samples are a subsample) by the smallest squared error."""
        x = _sample(x)
        best, err = None, float("inf")
        for p in QUANTILES:
            s = torch.quantile(x, p) if p < 1 else torch.tensor(x.max().item() if hi is None else hi)
            self.scale.fill_(float(s.clamp_min(1e-8)))
            e = float(((self.levels(self.codes(x)) - x) ** 2).mean())
            if e < err:
                best, err = float(self.scale), e
        self.scale.fill_(best)
        return err

    @torch.no_grad()
    def export(self) -> dict:
        return {"scale": self.scale.detach().cpu().reshape(1).clone()}

    def extra_repr(self):
        return f"bits={self.bits}, {self.mode}, s={float(self.scale):.4g}"


class MPQAct(ActQuantizer):
    """APQ-ViT's MPQ: ``q = clamp(floor(x / D), 0, 2^b - 1)``, value ``q D``, D = max / (2^b - 1)."""

    mode = "floor"

    def __init__(self, bits: int):
        super().__init__(bits, -1)
        self.register_buffer("hi", torch.ones(()))

    @property
    def step(self) -> torch.Tensor:
        return self.hi / (2 ** self.bits - 1)

    def codes(self, x):
        with torch.no_grad():
            return torch.clamp(torch.floor(x / self.step), 0, 2 ** self.bits - 1)

    def forward(self, x):
        return ste(self.codes(x) * self.step, torch.clamp(x, 0, float(self.hi)))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, hi: float | None = None) -> float:
        """D from the maximum of the calibration softmax outputs (the seed's formula; ``hi``: the exact
        maximum when ``x`` is a subsample)."""
        x = _sample(x)
        self.hi.fill_(max(float(x.max()) if hi is None else float(hi), 1e-8))
        return float(((self.codes(x) * self.step - x) ** 2).mean())

    @torch.no_grad()
    def export(self) -> dict:
        return {"scale": self.step.detach().cpu().reshape(1).clone()}

    def extra_repr(self):
        return f"bits={self.bits}, max={float(self.hi):.4g}"


@register_quantizer(Log2, "act")
def _log2(spec, layer):
    return LogAct(spec.bits, 1)


@register_quantizer(LogSqrt2, "act")
def _logsqrt2(spec, layer):
    return LogAct(spec.bits, 2)


@register_quantizer(MPQ, "act")
def _mpq(spec, layer):
    return MPQAct(spec.bits)
