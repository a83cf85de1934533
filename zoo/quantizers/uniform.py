"""Multi-bit uniform quantizers: min-max, LSQ, DoReFa, PACT."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .base import (ActQuantizer, WeightQuantizer, affine_codes, all_ranks, channel_view, dequantize,
                   global_mean, grad_scale, nudge, reduce_dims, round_ste, ste)
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

    @torch.no_grad()
    def restore(self, q, scale, zero):
        """The dequantized weights: the extremes have codes 0 and 2^b - 1, so they span the range;
        the top code's value is moved by a few ulps so (max - min) / n is the stored scale exactly."""
        n = 2 ** self.bits - 1
        w = dequantize(q, scale, zero, self.ch_axis)
        if not self.per_channel:
            scale, zero = scale[:1], zero[:1]
        mn = -zero * scale
        mx = nudge(lambda hi: ((hi - mn) / n).clamp(min=1e-8), scale, mn + n * scale)
        top = channel_view(mx, q.ndim, self.ch_axis) if self.per_channel else mx.reshape(())
        return torch.where(q == n, top.expand_as(w), w)


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
                lo, hi = all_ranks(x.min(), "min").clamp(max=0), all_ranks(x.max(), "max").clamp(min=0)
                if not self.initialized:
                    self.lo.copy_(lo), self.hi.copy_(hi), self.initialized.fill_(True)
                else:
                    self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)
        n = 2 ** self.bits - 1
        scale = ((self.hi - self.lo) / n).clamp(min=1e-8)
        zero = torch.round(-self.lo / scale)
        return dict(scale=scale, offset=zero, zero=zero, qmin=0, qmax=n)

    @torch.no_grad()
    def restore(self, params):
        n, scale = 2 ** self.bits - 1, params["scale"][:1]
        lo = -params["zero"][:1] * scale
        self.lo.copy_(lo[0])
        self.hi.copy_(nudge(lambda hi: ((hi - lo) / n).clamp(min=1e-8), scale, lo + n * scale)[0])
        self.initialized.fill_(True)


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

    @torch.no_grad()
    def restore(self, q, scale, zero):
        self.step.copy_(scale if self.step.numel() > 1 else scale[:1])
        self.initialized.fill_(True)
        return dequantize(q, scale, zero, self.ch_axis)


class LSQAct(ActQuantizer):
    """LSQ for activations. The first *training* batch initialises the step and decides the range:
    signed [-2^(b-1), 2^(b-1)-1] if its minimum is below ``-sign_tol``, else unsigned [0, 2^b-1].
    An eval-mode pass never initialises anything (a validation or sanity-check batch must not choose
    the step); before the first training batch it quantizes with a step computed from its own batch
    and stored nowhere, and warns. ``grad_numel``: N of the step gradient scale 1/sqrt(N Q_P) is the
    element count of one example (``"sample"``) or of the whole batch tensor (``"batch"``)."""

    sign_tol = 0.0

    def __init__(self, bits, ch_axis=1, grad_numel="sample"):
        super().__init__(bits, ch_axis)
        self.grad_numel = grad_numel
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))

    def surrogate_round(self, t):
        return round_ste(t)

    def _range(self, signed=None):
        signed = bool(self.signed) if signed is None else signed
        if signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    @torch.no_grad()
    def _first_batch(self, x, global_batch: bool = False):
        """(signed, step) that the first training batch ``x`` gives (LSQ's initialisation); with
        ``global_batch``, over every data-parallel rank's batch."""
        if global_batch:
            signed, mean_abs = bool(all_ranks(x.min(), "min") < -self.sign_tol), global_mean(x.abs())
        else:
            signed, mean_abs = bool(x.min() < -self.sign_tol), x.abs().mean()
        qp = self._range(signed)[1]
        return signed, (2 * mean_abs / math.sqrt(qp)).clamp(min=1e-8)

    def _state(self, x):
        """(signed, step parameter or a temporary step): initialise from a training batch."""
        if x is None or self.initialized:
            return bool(self.signed), self.step
        signed, step = self._first_batch(x.detach(), global_batch=self.training)
        if self.training:
            with torch.no_grad():
                self.signed.fill_(signed), self.step.copy_(step), self.initialized.fill_(True)
            return signed, self.step
        warnings.warn(f"{type(self).__name__}: the step is not initialised (no training batch seen); "
                      "this eval pass uses a step from its own batch and stores nothing. Run a training "
                      "batch first, or load a trained checkpoint.", stacklevel=3)
        return signed, step

    def params(self, x):
        signed, step = self._state(x)
        qmin, qmax = self._range(signed)
        return dict(scale=step.detach().abs().clamp(min=1e-8), offset=0.0, zero=0.0, qmin=qmin, qmax=qmax)

    def step_grad_factor(self, x, qmax) -> float:
        """LSQ's gradient scale g = 1/sqrt(N Q_P), N per ``grad_numel``."""
        n = x.numel() if self.grad_numel == "batch" else x[0].numel()
        return 1.0 / math.sqrt(n * qmax)

    def forward(self, x):
        signed, step = self._state(x)
        qmin, qmax = self._range(signed)
        s = grad_scale(step.abs().clamp(min=1e-8), self.step_grad_factor(x, qmax))
        surrogate = self.surrogate_round(torch.clamp(x / s, qmin, qmax)) * s
        scale = step.detach().abs().clamp(min=1e-8)  # the exact value the packed layer exports
        v = affine_codes(x.detach(), scale, 0.0, qmin, qmax)
        return ste(v * scale, surrogate)

    @torch.no_grad()
    def restore(self, params):
        self.step.copy_(params["scale"][0])
        self.signed.fill_(bool(params["qmin"][0] < 0))
        self.initialized.fill_(True)


@register_quantizer(LSQ, "weight")
def _lsq_w(spec, layer):
    axis = getattr(layer, "ch_axis", 0)
    channels = layer.weight.shape[axis] if spec.granularity == "channel" else 1
    return LSQWeight(spec.bits, channels, axis)


@register_quantizer(LSQ, "act")
def _lsq_a(spec, layer):
    return LSQAct(spec.bits, grad_numel=spec.grad_numel)


# ----------------------------------------------------------------------------- DoReFa
class DoReFaWeight(WeightQuantizer):
    """w_q = 2 * quant_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1 (per tensor); with ``rescale`` times
    max|tanh(w)| (a constant for the gradient), the SR variant."""

    def __init__(self, bits, ch_axis=0, rescale=False):
        super().__init__(bits, ch_axis)
        self.rescale = rescale

    def codes(self, w):
        n = 2 ** self.bits - 1
        t = torch.tanh(w)
        m = t.abs().max().clamp(min=1e-8)
        x = t / (2 * m) + 0.5
        r = m.detach() if self.rescale else torch.ones((), dtype=w.dtype, device=w.device)
        surrogate = r * (2 * x - 1)
        with torch.no_grad():
            q = torch.round(x * n)
        return q, 2.0 * r / n, torch.full((), n / 2.0, dtype=w.dtype, device=w.device), surrogate

    @torch.no_grad()
    def restore(self, q, scale, zero):
        # w = atanh(c (2q/n - 1)): max|tanh w| = c (the largest |tanh w| has code 0 or n), so the
        # normalised value is q/n again; c is the stored max|tanh w| (rescale) or any c < 1
        n = 2 ** self.bits - 1
        c = float(scale.double().mean()) * n / 2 if self.rescale else 0.5
        return torch.atanh(c * (2 * q.double() / n - 1)).to(scale.dtype)


class DoReFaAct(ActQuantizer):
    """Activations clipped to [0, 1], then quantized to k bits."""

    def params(self, x):
        n = 2 ** self.bits - 1
        return dict(scale=1.0 / n, offset=0.0, zero=0.0, qmin=0, qmax=n)

    @torch.no_grad()
    def restore(self, params):
        pass  # no state: the range is fixed


@register_quantizer(DoReFa, "weight")
def _dorefa_w(spec, layer):
    return DoReFaWeight(spec.bits, getattr(layer, "ch_axis", 0), spec.rescale)


@register_quantizer(DoReFa, "act")
def _dorefa_a(spec, layer):
    return DoReFaAct(spec.bits)


# ----------------------------------------------------------------------------- PACT
class PACTAct(ActQuantizer):
    """y = clip(x, 0, alpha) quantized to k bits; dy/dx = 1 on [0, alpha), dy/dalpha = 1 where
    x >= alpha (PACT eq. 3; the rounding is straight-through)."""

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
        surrogate = torch.where(x >= alpha, alpha.expand_as(x), torch.where(x >= 0, x, torch.zeros_like(x)))
        return ste(v * p["scale"], surrogate)

    @torch.no_grad()
    def restore(self, params):
        n = 2 ** self.bits - 1
        self.alpha.copy_(nudge(lambda a: a.abs().clamp(min=1e-4) / n, params["scale"][:1],
                               params["scale"][:1] * n)[0])


@register_quantizer(PACT, "act")
def _pact_a(spec, layer):
    return PACTAct(spec.bits, spec.init_alpha)
