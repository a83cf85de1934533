"""Multi-bit uniform quantizers: min-max, LSQ, DoReFa, PACT."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import (ActQuantizer, WeightQuantizer, affine_codes, channel_view, grad_scale,
                   reduce_dims, round_ste, ste)
from .config import LSQ, PACT, DoReFa, MinMax, register_quantizer


def _amin_amax(w, per_channel, axis):
    if per_channel:
        dims = reduce_dims(w.ndim, axis)
        return (channel_view(w.amin(dim=dims), w.ndim, axis),
                channel_view(w.amax(dim=dims), w.ndim, axis))
    return w.min(), w.max()


# ----------------------------------------------------------------------------- min-max
class MinMaxWeight(WeightQuantizer):
    def __init__(self, bits, per_channel=False, ch_axis=0):
        super().__init__(bits, ch_axis)
        self.per_channel = per_channel

    def codes(self, w):
        with torch.no_grad():
            mn, mx = _amin_amax(w, self.per_channel, self.ch_axis)
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)
            n = 2 ** self.bits - 1
            scale = ((mx - mn) / n).clamp(min=1e-8)
            zero = torch.round(-mn / scale)
            q = torch.clamp(torch.round(w / scale) + zero, 0, n)
        return q, scale, zero, w


class MinMaxAct(ActQuantizer):
    """Asymmetric uniform quantizer whose range is an EMA of the batch min/max, frozen in eval."""

    def __init__(self, bits, momentum=0.1, ch_axis=1):
        super().__init__(bits, ch_axis)
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def params(self, x):
        if x is not None and self.training:
            with torch.no_grad():
                lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
                if not self.initialized:
                    self.lo.copy_(lo), self.hi.copy_(hi), self.initialized.fill_(True)
                else:
                    self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)
        n = 2 ** self.bits - 1
        scale = ((self.hi - self.lo) / n).clamp(min=1e-8)
        zero = torch.round(-self.lo / scale)
        return dict(scale=scale, offset=zero, zero=zero, qmin=0, qmax=n)


@register_quantizer(MinMax, "weight")
def _minmax_w(spec, layer):
    return MinMaxWeight(spec.bits, spec.granularity == "channel", getattr(layer, "ch_axis", 0))


@register_quantizer(MinMax, "act")
def _minmax_a(spec, layer):
    return MinMaxAct(spec.bits, spec.momentum)


# ----------------------------------------------------------------------------- LSQ
class LSQWeight(WeightQuantizer):
    """v_hat = round(clip(v / s, -Q_N, Q_P)) * s with a learnable step s (per tensor/channel)."""

    def __init__(self, bits, channels=1, ch_axis=0):
        super().__init__(bits, ch_axis)
        self.qn, self.qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
        self.step = nn.Parameter(torch.ones(channels))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def surrogate_round(self, t):
        """The rounding the gradient sees (identity: the straight-through estimator)."""
        return round_ste(t)

    def _step(self, w):
        if not self.initialized:
            with torch.no_grad():
                dims = reduce_dims(w.ndim, self.ch_axis) if self.step.numel() > 1 else None
                mean_abs = w.abs().mean(dim=dims) if dims else w.abs().mean()
                self.step.copy_((2 * mean_abs / math.sqrt(self.qp)).clamp(min=1e-8).reshape(-1))
                self.initialized.fill_(True)
        g = 1.0 / math.sqrt(w.numel() * self.qp)
        s = grad_scale(self.step, g)
        return channel_view(s, w.ndim, self.ch_axis) if s.numel() > 1 else s.reshape(())

    def codes(self, w):
        s = self._step(w)
        surrogate = self.surrogate_round(torch.clamp(w / s, -self.qn, self.qp)) * s
        with torch.no_grad():
            q = torch.clamp(torch.round(w / s), -self.qn, self.qp) + self.qn
        return q, s.detach(), torch.full_like(s.detach(), float(self.qn)), surrogate


class LSQAct(ActQuantizer):
    """LSQ for activations. Unsigned ([0, 2^b-1]) when the first batch is non-negative, else signed."""

    def __init__(self, bits, ch_axis=1):
        super().__init__(bits, ch_axis)
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))

    def surrogate_round(self, t):
        return round_ste(t)

    def _range(self):
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def params(self, x):
        if x is not None and not self.initialized:
            with torch.no_grad():
                self.signed.fill_(bool(x.min() < 0))
                qp = self._range()[1]
                self.step.copy_((2 * x.abs().mean() / math.sqrt(qp)).clamp(min=1e-8))
                self.initialized.fill_(True)
        qmin, qmax = self._range()
        return dict(scale=self.step.detach().abs().clamp(min=1e-8), offset=0.0, zero=0.0,
                    qmin=qmin, qmax=qmax)

    def forward(self, x):
        p = self.params(x)
        qmin, qmax = p["qmin"], p["qmax"]
        s = grad_scale(self.step.abs().clamp(min=1e-8), 1.0 / math.sqrt(x[0].numel() * qmax))
        surrogate = self.surrogate_round(torch.clamp(x / s, qmin, qmax)) * s
        v = affine_codes(x.detach(), p["scale"], 0.0, qmin, qmax)
        return ste(v * p["scale"], surrogate)


@register_quantizer(LSQ, "weight")
def _lsq_w(spec, layer):
    axis = getattr(layer, "ch_axis", 0)
    channels = layer.weight.shape[axis] if spec.granularity == "channel" else 1
    return LSQWeight(spec.bits, channels, axis)


@register_quantizer(LSQ, "act")
def _lsq_a(spec, layer):
    return LSQAct(spec.bits)


# ----------------------------------------------------------------------------- DoReFa
class DoReFaWeight(WeightQuantizer):
    """w_q = 2 * quant_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1 (per tensor)."""

    def codes(self, w):
        n = 2 ** self.bits - 1
        t = torch.tanh(w)
        x = t / (2 * t.abs().max().clamp(min=1e-8)) + 0.5
        surrogate = 2 * x - 1
        with torch.no_grad():
            q = torch.round(x * n)
        scale = torch.full((), 2.0 / n, device=w.device)
        zero = torch.full((), n / 2.0, device=w.device)
        return q, scale, zero, surrogate


class DoReFaAct(ActQuantizer):
    """Activations clipped to [0, 1], then quantized to k bits."""

    def params(self, x):
        n = 2 ** self.bits - 1
        return dict(scale=1.0 / n, offset=0.0, zero=0.0, qmin=0, qmax=n)


@register_quantizer(DoReFa, "weight")
def _dorefa_w(spec, layer):
    return DoReFaWeight(spec.bits, getattr(layer, "ch_axis", 0))


@register_quantizer(DoReFa, "act")
def _dorefa_a(spec, layer):
    return DoReFaAct(spec.bits)


# ----------------------------------------------------------------------------- PACT
class PACTAct(ActQuantizer):
    """y = clip(x, 0, alpha) quantized to k bits; d y / d alpha = 1 where x >= alpha (STE)."""

    def __init__(self, bits, init_alpha=6.0, ch_axis=1):
        super().__init__(bits, ch_axis)
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    def params(self, x):
        n = 2 ** self.bits - 1
        alpha = self.alpha.detach().abs().clamp(min=1e-4)
        return dict(scale=alpha / n, offset=0.0, zero=0.0, qmin=0, qmax=n)

    def forward(self, x):
        p = self.params(x)
        v = affine_codes(x.detach(), p["scale"], 0.0, p["qmin"], p["qmax"])
        alpha = self.alpha.abs().clamp(min=1e-4)
        surrogate = torch.minimum(torch.relu(x), alpha)
        return ste(v * p["scale"], surrogate)


@register_quantizer(PACT, "act")
def _pact_a(spec, layer):
    return PACTAct(spec.bits, spec.init_alpha)
