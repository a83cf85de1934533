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

from .base import ActQuantizer, WeightQuantizer, channel_view, fit_in_bins, nudge, reduce_dims
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

    @torch.no_grad()
    def restore(self, q, scale, zero):
        """w = s_c u with u in code q's bin ((2q - 1)/n - 1, (2q + 1)/n - 1) (the outer ones open)
        and mean|u| = 1 / gamma per channel, so gamma mean|w| gives s_c back."""
        n = 2 ** self.bits - 1
        gamma = n / 2 ** (self.bits - 1)
        qd = q.double()
        inf = torch.full_like(qd, float("inf"))
        lo = torch.where(qd <= 0, -inf, (2 * qd - 1) / n - 1)
        hi = torch.where(qd >= n, inf, (2 * qd + 1) / n - 1)
        dims = reduce_dims(q.ndim, self.ch_axis)

        def normalise(u):
            return u / (gamma * u.abs().mean(dim=dims, keepdim=True)).clamp(min=1e-12)
        u = fit_in_bins(2 * qd / n - 1, lo, hi, normalise, margin=0.02 / n)
        s_c = channel_view(scale.double() * n / 2, q.ndim, self.ch_axis)
        return (s_c * u).to(scale.dtype)


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
        return _GSTE.apply(x, self.thresholds().to(x.dtype), self.start, self.lengths(), self.input_scale(),
                           self.beta2, self.delta)

    @torch.no_grad()
    def export(self) -> dict:
        return {**super().export(), "thresholds": self.thresholds().float().cpu().clone()}

    @torch.no_grad()
    def restore(self, params):
        """beta2 from the output step; beta1 = 1 (thresholds in input units) and interval lengths
        whose mid-points are the stored thresholds: a_i + a_(i+1) = 2 (T_(i+1) - T_i) leaves a_1
        free, chosen mid-way in the range that keeps every a_i >= 1e-3 (beta1 grows if needed)."""
        t = params["thresholds"].double()
        scale = params["scale"][:1]
        self.beta2.copy_(nudge(lambda b: b * self.delta, scale, scale / self.delta)[0])
        gaps = 2 * (t[1:] - t[:-1])
        # a_i = sign_i a_1 + c_i with alternating signs; bounds on a_1 from a_i >= 0
        sign, c, lo, hi = [1.0], [0.0], 0.0, float("inf")
        for g in gaps.tolist():
            sign.append(-sign[-1]), c.append(g - c[-1])
        for sg, ci in zip(sign, c):
            lo, hi = (max(lo, -ci), hi) if sg > 0 else (lo, min(hi, ci))
        a1 = (lo + hi) / 2 if hi < float("inf") else lo + self.delta
        a = torch.tensor([sg * a1 + ci for sg, ci in zip(sign, c)], dtype=torch.float64)
        beta1 = max(1.0, 2 * MIN_LENGTH / float(a.min())) if a.min() > 0 else 1.0
        a = a * beta1
        self.beta1.fill_(beta1)
        self.a.copy_(a)
        self.start.fill_(float(t[0]) * beta1 - float(a[0]) / 2)


def _count_above(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """#{m : x > edges_m} per element (torch.bucketize's value for increasing edges, one compare per
    edge: much faster than a binary search over 2^b - 1 edges on CPU; no host sync on a GPU)."""
    k = torch.zeros_like(x)
    for m in range(edges.numel()):
        k += (x > edges[m]).to(x.dtype)
    return k


class _GSTE(torch.autograd.Function):
    """Forward ``beta2 Delta k``; backward the G-STE surrogate's gradients, written out per interval
    (the autograd form gathers d_i and a_i per element, several times slower on CPU)."""

    @staticmethod
    def forward(ctx, x, thresholds, start, a, b1, beta2, delta):
        k = _count_above(x, thresholds)
        ctx.save_for_backward(x, k, start, a, b1, beta2)
        ctx.delta = delta
        return k * (beta2.detach() * delta)

    @staticmethod
    def backward(ctx, g):
        x, k, start, a, b1, beta2 = ctx.saved_tensors
        delta = ctx.delta
        u = x * b1
        d = torch.cat([start.reshape(1), start + torch.cumsum(a, 0)])  # d_0 .. d_n
        gs = g * (beta2 * delta)  # dL/d(surrogate), integer units
        zero = torch.zeros((), dtype=gs.dtype, device=gs.device)
        du = torch.zeros_like(x)
        dd, da = [], []  # per interval i: dL/d(lower edge d_(i-1)) and dL/da_i through its own slope
        for i in range(1, a.numel() + 1):  # d_(i-1) < u <= d_i: surrogate (u - d_(i-1)) / a_i + i - 1
            lo, ai = d[i - 1], a[i - 1]
            gi = torch.where((u > lo) & (u <= d[i]), gs, zero)
            du += gi / ai
            dd.append(-gi.sum() / ai)
            da.append(-(gi * (u - lo)).sum() / ai ** 2)
        dd, da = torch.stack(dd), torch.stack(da)
        # d_(i-1) = start + a_1 + ... + a_(i-1): the lower edge's gradient reaches start and a_(<i)
        dstart = dd.sum()
        da = da + torch.flip(torch.cumsum(torch.flip(dd, [0]), 0), [0]) - dd  # edges above a_l
        dx = du * b1 if ctx.needs_input_grad[0] else None
        db1 = (du * x).sum() if ctx.needs_input_grad[4] else None
        dbeta2 = (g * k).sum() * delta if ctx.needs_input_grad[5] else None
        return (dx, None, dstart.to(start.dtype).reshape(start.shape), da.to(a.dtype), db1, dbeta2, None)


@register_quantizer(N2UQ, "weight")
def _n2uq_w(spec, layer):
    return N2UQWeight(spec.bits, getattr(layer, "ch_axis", 0))


@register_quantizer(N2UQ, "act")
def _n2uq_a(spec, layer):
    return N2UQAct(spec.bits)
