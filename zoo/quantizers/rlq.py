"""Super-resolution quantizers: QuantSR's RLQ (Qin et al., NeurIPS 2023) and the PAMS baseline.

RLQ: ``Q(x) = round(phi(clip(x + tau) / v)) * v``. The forward value is the plain rounding of the
shifted, clipped input on a learnable step ``v`` (LSQ-initialised, LSQ gradient scale); the
redistribution ``phi`` shapes only the backward pass: inside each quantization bin the rounding is
replaced by ``floor(t) + tanh(k (frac(t) - 1/2)) / (2 tanh(k / 2)) + 1/2``, a tanh staircase whose
slope lets gradients reach values anywhere in the bin (``k -> 0`` is the straight-through estimator,
large ``k`` approaches the hard step). Activations carry a learnable per-input-channel shift ``tau``
added before quantization, as in the authors' code; weights use no shift.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import ActQuantizer, WeightQuantizer, affine_codes, all_ranks, channel_view, dequantize, nudge, round_ste, ste
from .config import PAMS, RLQ, register_quantizer
from .uniform import LSQAct, LSQWeight


def round_phi(t: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """Forward ``torch.round(t)`` exactly; backward the derivative of the tanh staircase phi."""
    floor = torch.floor(t).detach()
    soft = floor + torch.tanh(k * (t - floor - 0.5)) / (2 * math.tanh(k / 2)) + 0.5
    return soft + (torch.round(t) - soft).detach()


def _channels(layer) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels


class RLQWeight(LSQWeight):
    def __init__(self, bits, channels=1, ch_axis=0, phi_k=1.0):
        super().__init__(bits, channels, ch_axis)
        self.phi_k = phi_k

    def surrogate_round(self, t):
        return round_phi(t, self.phi_k)


class RLQAct(LSQAct):
    """LSQ-style activation step plus a learnable per-channel shift tau, phi in the backward. The
    signed/unsigned range is decided with the authors' tolerance: signed only if min(x) < -1e-5, so
    float noise around a ReLU output's zeros does not halve its resolution."""

    sign_tol = 1e-5

    def __init__(self, bits, channels, ch_axis=1, phi_k=1.0, grad_numel="batch"):
        super().__init__(bits, ch_axis, grad_numel)
        self.phi_k = phi_k
        self.tau = nn.Parameter(torch.zeros(channels))

    def surrogate_round(self, t):
        return round_phi(t, self.phi_k)

    def forward(self, x):
        return super().forward(x + channel_view(self.tau, x.ndim, self.ch_axis))

    @torch.no_grad()
    def export(self) -> dict:
        # the packed form quantizes x - shift; x - (-tau) == x + tau exactly in floating point
        return {**super().export(), "shift": (-self.tau.detach()).float().cpu().clone()}

    @torch.no_grad()
    def restore(self, params):
        super().restore(params)
        self.tau.copy_(-params["shift"])


@register_quantizer(RLQ, "weight")
def _rlq_w(spec, layer):
    axis = getattr(layer, "ch_axis", 0)
    channels = layer.weight.shape[axis] if spec.granularity == "channel" else 1
    return RLQWeight(spec.bits, channels, axis, spec.phi_k)


@register_quantizer(RLQ, "act")
def _rlq_a(spec, layer):
    return RLQAct(spec.bits, _channels(layer), -1 if isinstance(layer, nn.Linear) else 1, spec.phi_k,
                  spec.grad_numel)


# ----------------------------------------------------------------------------- PAMS
class PAMSWeight(WeightQuantizer):
    """Symmetric: step max|w| / (2^(b-1) - 1), codes round(w / step) in [-(2^(b-1) - 1), 2^(b-1) - 1]."""

    def codes(self, w):
        n = 2 ** (self.bits - 1) - 1
        with torch.no_grad():
            scale = (w.abs().max() / n).clamp(min=1e-8)
            q = torch.clamp(torch.round(w / scale), -n, n) + n
        return q, scale, torch.full_like(scale, float(n)), w

    @torch.no_grad()
    def restore(self, q, scale, zero):
        return dequantize(q, scale, zero, self.ch_axis)  # max|w| has code 0 or 2n: same step


class PAMSAct(ActQuantizer):
    """y = round(clip(x, -alpha, alpha) / s) * s, s = alpha / (2^(b-1) - 1), alpha learnable
    (initialised to max|x| of the first training batch). The gradient is autograd's through that
    expression with a straight-through rounding, as in the authors' code: dy/dalpha = sign(x) where
    |x| > alpha, round(x / s) / (2^(b-1) - 1) - x / alpha inside; dy/dx = 1 inside, 0 outside."""

    def __init__(self, bits, ch_axis=1):
        super().__init__(bits, ch_axis)
        self.alpha = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def params(self, x):
        if x is not None and self.training and not self.initialized:
            with torch.no_grad():
                self.alpha.copy_(all_ranks(x.detach().abs().max(), "max").clamp(min=1e-4))
                self.initialized.fill_(True)
        n = 2 ** (self.bits - 1) - 1
        return dict(scale=self.alpha.detach().abs().clamp(min=1e-4) / n, offset=0.0, zero=0.0,
                    qmin=-n, qmax=n)

    def forward(self, x):
        p = self.params(x)
        v = affine_codes(x.detach(), p["scale"], 0.0, p["qmin"], p["qmax"])
        alpha = self.alpha.abs().clamp(min=1e-4)
        s = alpha / p["qmax"]
        return ste(v * p["scale"], round_ste(torch.clamp(x, -alpha, alpha) / s) * s)

    @torch.no_grad()
    def restore(self, params):
        n = 2 ** (self.bits - 1) - 1
        self.alpha.copy_(nudge(lambda a: a.abs().clamp(min=1e-4) / n, params["scale"][:1],
                               params["scale"][:1] * n)[0])
        self.initialized.fill_(True)


@register_quantizer(PAMS, "weight")
def _pams_w(spec, layer):
    return PAMSWeight(spec.bits, getattr(layer, "ch_axis", 0))


@register_quantizer(PAMS, "act")
def _pams_a(spec, layer):
    return PAMSAct(spec.bits)
