"""Binary (1-bit) quantizers: XNOR, IR-Net (Libra-PB + EDE), ReActNet (RSign, RPReLU).

Weights binarize per output channel to ``scale * sign`` and store as one bit (q = w >= 0) with
scale' = 2 * scale and zero = 1/2, so (q - zero) * scale' = ±scale. Activations binarize to ±1
(sign(0) = +1).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import cpu_ops
from .base import ActQuantizer, WeightQuantizer, channel_view, dequantize, reduce_dims, sign_codes, ste
from .config import XNOR, IRNet, ReAct, register_quantizer


def _per_channel_mean_abs(w, axis):
    return channel_view(w.abs().mean(dim=reduce_dims(w.ndim, axis)), w.ndim, axis)


def ede_factors(t_min: float, t_max: float, progress: float) -> tuple[float, float]:
    """IR-Net's EDE schedule: t = t_min * 10^(p * log10(t_max / t_min)), k = max(1/t, 1)."""
    p = min(max(float(progress), 0.0), 1.0)
    t = t_min * 10 ** (p * math.log10(t_max / t_min))
    return t, max(1.0 / t, 1.0)


class _EDESchedule:
    """Holds IR-Net's EDE factors t and k as buffers (so a resumed run continues the schedule)."""

    def _init_ede(self, t_min, t_max):
        self.t_min, self.t_max = t_min, t_max
        self.register_buffer("t", torch.tensor(float(t_min)))
        self.register_buffer("k", torch.tensor(max(1.0 / t_min, 1.0)))

    def set_progress(self, fraction):
        t, k = ede_factors(self.t_min, self.t_max, fraction)
        self.t.fill_(t), self.k.fill_(k)


class XNORWeight(WeightQuantizer):
    """w_b = alpha * sign(w), alpha = mean(|w|) per output channel. Backward as XNOR-Net writes it:
    dC/dw = dC/dw_b * (1/n + alpha * 1[|w| <= 1]), n the weights per output channel."""

    def __init__(self, ch_axis=0):
        super().__init__(1, ch_axis)

    def surrogate(self, w, alpha):
        n = w.numel() // w.shape[self.ch_axis]
        return w / n + alpha.detach() * torch.clamp(w, -1, 1)

    def codes(self, w):
        alpha = _per_channel_mean_abs(w, self.ch_axis)
        with torch.no_grad():
            q = (w >= 0).to(w.dtype)
        return q, 2 * alpha.detach(), torch.full_like(alpha, 0.5), self.surrogate(w, alpha)

    @torch.no_grad()
    def restore(self, q, scale, zero):
        return dequantize(q, scale, zero, self.ch_axis)  # +-alpha: mean|w| is alpha again


class ReActWeight(XNORWeight):
    """ReActNet's weights: the same forward as XNOR (alpha * sign(w), alpha = mean|w| per output
    channel, detached); backward 1[|w| <= 1], not scaled by alpha (the authors' HardBinaryConv)."""

    def surrogate(self, w, alpha):
        return torch.clamp(w, -1, 1)


class SignAct(ActQuantizer):
    """sign(x) with the clipped straight-through estimator (grad 1 where |x| <= 1)."""

    mode = "sign"

    def __init__(self, ch_axis=1):
        super().__init__(1, ch_axis)

    def surrogate(self, x):
        return torch.clamp(x, -1, 1)

    def shift(self, x):
        return None

    def forward(self, x):
        sh = self.shift(x)
        xs = x if sh is None else x - sh
        return ste(sign_codes(xs.detach()), self.surrogate(xs))

    @torch.no_grad()
    def export(self) -> dict:
        return {}

    @torch.no_grad()
    def restore(self, params):
        pass  # sign(x): no state


class IRNetWeight(_EDESchedule, WeightQuantizer):
    """Libra-PB: balance and standardise each output channel, binarize, scale by 2^round(log2 E|w|);
    EDE backward k * t * (1 - tanh^2(t x)). ``magnitude``: the power of two of E|w - mean| instead."""

    def __init__(self, t_min=0.1, t_max=10.0, ch_axis=0, magnitude=False):
        super().__init__(1, ch_axis)
        self._init_ede(t_min, t_max)
        self.magnitude = magnitude

    def codes(self, w):
        dims = reduce_dims(w.ndim, self.ch_axis)
        centred = w - w.mean(dim=dims, keepdim=True)
        std = centred.std(dim=dims, keepdim=True).clamp(min=1e-8)
        wstd = centred / std
        with torch.no_grad():
            size = (centred if self.magnitude else wstd).abs().mean(dim=dims, keepdim=True)
            shift = torch.pow(2.0, torch.round(torch.log2(size)))
            q = (wstd >= 0).to(w.dtype)
        surrogate = shift * self.k * torch.tanh(self.t * wstd)
        return q, 2 * shift, torch.full_like(shift, 0.5), surrogate

    @torch.no_grad()
    def restore(self, q, scale, zero):
        """Per channel: +-1 by the codes, except one +M and one -M (M found by bisection) so that
        E|standardised w| rounds to the stored power of two; the pair leaves the mean (and so every
        sign after centring) unchanged."""
        w = (2 * q.double() - 1).movedim(self.ch_axis, 0).reshape(q.shape[self.ch_axis], -1).clone()
        if self.magnitude:  # +-1 of mean m has E|w - m| = 1 - m^2: stretched, exactly the stored power of two
            m = w.mean(dim=1, keepdim=True)
            stretch = torch.where(m.abs() < 1, 1 - m * m, torch.ones_like(m))
            w = w * (scale.double().reshape(-1, 1) / 2) / stretch
            return w.reshape(q.movedim(self.ch_axis, 0).shape).movedim(0, self.ch_axis).to(scale.dtype)
        target = torch.log2(scale.double() / 2)
        for c in range(w.shape[0]):
            row, pos, neg = w[c], (w[c] > 0).nonzero(), (w[c] < 0).nonzero()
            if len(pos) == 0 or len(neg) == 0:
                continue  # one sign only: not something Libra-PB produces; the check reports it

            def level(m):
                row[pos[0]], row[neg[0]] = m, -m
                z = (row - row.mean()) / row.std()
                return float(torch.log2(z.abs().mean()))
            lo, hi = 1.0, 1e6
            if abs(level(lo) - target[c]) > 0.5:
                for _ in range(200):  # E|z| falls as M grows
                    mid = (lo * hi) ** 0.5
                    if level(mid) > target[c]:
                        lo = mid
                    else:
                        hi = mid
                level((lo * hi) ** 0.5)
        w = w.reshape(q.movedim(self.ch_axis, 0).shape).movedim(0, self.ch_axis)
        return w.to(scale.dtype)


class IRNetAct(_EDESchedule, SignAct):
    """sign(x) with IR-Net's EDE backward."""

    def __init__(self, t_min=0.1, t_max=10.0, ch_axis=1):
        super().__init__(ch_axis)
        self._init_ede(t_min, t_max)

    def surrogate(self, x):
        return self.k * torch.tanh(self.t * x)


class RSign(SignAct):
    """ReActNet RSign: sign(x - beta_c) with a learnable per-channel threshold and the
    ApproxSign backward (2 + 2x for -1 <= x < 0, 2 - 2x for 0 <= x < 1, else 0)."""

    def __init__(self, channels, ch_axis=1):
        super().__init__(ch_axis)
        self.beta = nn.Parameter(torch.zeros(channels))

    def shift(self, x):
        return channel_view(self.beta, x.ndim, self.ch_axis % x.ndim)

    def surrogate(self, x):
        x = torch.clamp(x, -1, 1)
        return torch.where(x < 0, 2 * x + x * x, 2 * x - x * x)

    @torch.no_grad()
    def export(self) -> dict:
        return {"shift": self.beta.detach().clone().float()}

    @torch.no_grad()
    def restore(self, params):
        self.beta.copy_(params["shift"])


class RPReLU(nn.Module):
    """ReActNet RPReLU: PReLU(x - gamma_c) + zeta_c, with per-channel learnable shifts."""

    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.zeta = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), init))

    def forward(self, x):
        y = cpu_ops.rprelu(x, self.gamma, self.slope, self.zeta)  # CPU inference: one C++ pass, same values
        if y is not None:
            return y
        g = channel_view(self.gamma, x.ndim, 1)
        z = channel_view(self.zeta, x.ndim, 1)
        s = channel_view(self.slope, x.ndim, 1)
        y = x - g
        return torch.where(y >= 0, y, s * y) + z


@register_quantizer(XNOR, "weight")
def _xnor_w(spec, layer):
    return XNORWeight(getattr(layer, "ch_axis", 0))


@register_quantizer(XNOR, "act")
def _xnor_a(spec, layer):
    return SignAct()


@register_quantizer(IRNet, "weight")
def _irnet_w(spec, layer):
    return IRNetWeight(spec.t_min, spec.t_max, getattr(layer, "ch_axis", 0), spec.magnitude)


@register_quantizer(IRNet, "act")
def _irnet_a(spec, layer):
    return IRNetAct(spec.t_min, spec.t_max)


@register_quantizer(ReAct, "weight")
def _react_w(spec, layer):
    return ReActWeight(getattr(layer, "ch_axis", 0))


@register_quantizer(ReAct, "act")
def _react_a(spec, layer):
    return RSign(layer.in_channels if hasattr(layer, "in_channels") else layer.in_features,
                 ch_axis=1 if hasattr(layer, "in_channels") else -1)
