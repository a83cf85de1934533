"""N2UQ: Nonuniform-to-Uniform Quantization (Liu et al., CVPR 2022).

Activations (the paper's learnable-threshold quantizer): on ``u = beta1 * x`` the break points are
``d_0 = s``, ``d_i = s + a_1 + ... + a_i`` (learnable offset s and interval lengths a_i >= 1e-3), the
thresholds the interval mid-points ``T_i = d_(i-1) + a_i / 2``; the output is *uniform*,
``y = beta2 * Delta * k`` with ``k = #{i : u > T_i}`` in 0..2^b-1 and ``Delta = 2 / (2^b - 1)``.
So the thresholds are non-uniform but the codes k are plain integers on a uniform grid, and packed
inference stays an integer GEMM: the packed layer stores the thresholds in input units, T_i / beta1,
and counts them (activation mode ``"threshold"``). Backward, the generalised straight-through
estimator (G-STE): the expectation of a stochastic rounding inside each interval, a piecewise-linear
surrogate ``beta2 Delta ((u - d_(i-1)) / a_i + i - 1)`` on interval i, 0 below d_0 and
``beta2 Delta (2^b - 1)`` above d_(2^b-1); the gradient w.r.t. beta2 is ``Delta k`` (the forward
value over beta2), as in the authors' code. Initialisation as theirs: s = 0, a_i = Delta,
beta1 = beta2 = 1 (plain rounding on [0, 2]).

Weights (entropy-preserving regularisation): per output channel ``s_c = gamma mean|w_c|`` with
``gamma = (2^b - 1) / 2^(b-1)`` (no gradient), ``w' = w / s_c`` and
``w_q = s_c (round((clip(w', -1, 1) + 1) (2^b - 1) / 2) 2 / (2^b - 1) - 1)``: 2^b symmetric levels,
no zero level. Gradient ``dL/dw = dL/dw_q / s_c`` (no clip mask), as in the authors' code.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import ActQuantizer, WeightQuantizer, channel_view, reduce_dims, ste
from .config import N2UQ, register_quantizer

MIN_LENGTH = 1e-3  # the paper keeps every interval length a_i above this


class N2UQWeight(WeightQuantizer):
    def codes(self, w):
        n = 2 ** self.bits - 1
        gamma = n / 2 ** (self.bits - 1)
        dims = reduce_dims(w.ndim, self.ch_axis)
        s_c = (gamma * channel_view(w.detach().abs().mean(dim=dims), w.ndim, self.ch_axis)).clamp(min=1e-8)
        with torch.no_grad():
            q = torch.round((torch.clamp(w / s_c, -1, 1) + 1) * n / 2)
        # w_q = s_c (2 q / n - 1) = (2 s_c / n) (q - n / 2)
        return q, 2 * s_c / n, torch.full_like(s_c, n / 2), w / s_c


class N2UQAct(ActQuantizer):
    mode = "threshold"

    def __init__(self, bits, ch_axis=1):
        super().__init__(bits, ch_axis)
        n = 2 ** bits - 1
        self.delta = 2.0 / n
        self.start = nn.Parameter(torch.zeros(()))
        self.a = nn.Parameter(torch.full((n,), self.delta))
        self.beta1 = nn.Parameter(torch.ones(()))
        self.beta2 = nn.Parameter(torch.ones(()))

    def lengths(self) -> torch.Tensor:
        """The interval lengths a_i, held at >= 1e-3 (no gradient where held)."""
        return torch.where(self.a > MIN_LENGTH, self.a, torch.full_like(self.a, MIN_LENGTH))

    def input_scale(self) -> torch.Tensor:
        return self.beta1.abs().clamp(min=1e-4)

    def thresholds(self) -> torch.Tensor:
        """T_i / beta1: the thresholds in input units, increasing (the packed layer stores these)."""
        with torch.no_grad():
            a = self.lengths()
            t = self.start + torch.cumsum(a, 0) - a / 2
            return t / self.input_scale()

    def params(self, x):
        n = 2 ** self.bits - 1
        return dict(scale=(self.beta2.detach() * self.delta), offset=0.0, zero=0.0, qmin=0, qmax=n)

    def forward(self, x):
        n = 2 ** self.bits - 1
        k = torch.bucketize(x.detach().contiguous(), self.thresholds().to(x.dtype)).to(x.dtype)
        # G-STE surrogate (in integer units) on u = beta1 x
        a = self.lengths()
        d = torch.cat([self.start.reshape(1), self.start + torch.cumsum(a, 0)])  # d_0 .. d_n
        u = x * self.input_scale()
        j = torch.bucketize(u.detach().contiguous(), d.detach())  # d_(j-1) < u <= d_j
        i = j.clamp(1, n) - 1
        inside = (u - d[i]) / a[i] + i.to(x.dtype)
        sur = torch.where(j == 0, torch.zeros_like(u), torch.where(j > n, torch.full_like(u, float(n)), inside))
        value = k * (self.beta2.detach() * self.delta)
        return ste(value, (k + sur - sur.detach()) * self.beta2 * self.delta)

    @torch.no_grad()
    def export(self) -> dict:
        return {**super().export(), "thresholds": self.thresholds().float().cpu().clone()}


@register_quantizer(N2UQ, "weight")
def _n2uq_w(spec, layer):
    return N2UQWeight(spec.bits, getattr(layer, "ch_axis", 0))


@register_quantizer(N2UQ, "act")
def _n2uq_a(spec, layer):
    return N2UQAct(spec.bits)
