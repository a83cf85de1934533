"""mu-L2Q (Gong et al., J. Software 2021): Gaussian-optimal mid-rise uniform quantization.

Weights are standardised, phi = (w - mu) / sigma, and quantized with step alpha = lambda_k * sigma
and offset beta = mu:  w'_q = clamp(round((w - beta) / alpha - 1/2), -2^(k-1), 2^(k-1) - 1) + 1/2,
w_q = alpha * w'_q + beta. lambda_k minimises the expected L2 error of the 2^k-level mid-rise
quantizer on N(0, 1); :func:`optimal_lambda` computes it by numerical integration.
"""
from __future__ import annotations

import functools
import math

import torch

from .base import ActQuantizer, WeightQuantizer, channel_view, fit_in_bins, global_mean_std, nudge, reduce_dims
from .config import UL2Q, register_quantizer


def _norm_pdf(x):
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _norm_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def expected_l2(lam: float, k: int) -> float:
    """E[(x - Q(x))^2] for x ~ N(0,1) and the 2^k-level mid-rise quantizer of step ``lam``.

    Level i (i = -2^(k-1) .. 2^(k-1)-1) is c_i = lam * (i + 1/2) and covers the interval between
    the mid-points of its neighbours (the outermost ones extend to infinity). For an interval
    [a, b] and level c the integral of (x - c)^2 phi(x) is closed-form in phi and Phi.
    """
    half = 2 ** (k - 1)
    total = 0.0
    for i in range(-half, half):
        c = lam * (i + 0.5)
        a = -math.inf if i == -half else lam * i
        b = math.inf if i == half - 1 else lam * (i + 1)
        # int_a^b (x - c)^2 phi = [Phi](1 + c^2) + [-x phi] + 2c [phi]  (evaluated a..b)
        pa, pb = (_norm_pdf(a) if math.isfinite(a) else 0.0), (_norm_pdf(b) if math.isfinite(b) else 0.0)
        xa = a * pa if math.isfinite(a) else 0.0
        xb = b * pb if math.isfinite(b) else 0.0
        prob = _norm_cdf(b) - _norm_cdf(a)
        total += (1 + c * c) * prob - (xb - xa) + 2 * c * (pb - pa)
    return total


@functools.lru_cache(maxsize=None)
def optimal_lambda(k: int) -> tuple[float, float]:
    """(lambda_k, expected loss): the step minimising :func:`expected_l2`, by golden-section search."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lam: expected_l2(lam, k), bounds=(1e-4, 4.0), method="bounded",
                          options={"xatol": 1e-9})
    return float(res.x), float(res.fun)


class UL2QWeight(WeightQuantizer):
    def __init__(self, bits, per_channel=False, ch_axis=0):
        super().__init__(bits, ch_axis)
        self.per_channel = per_channel
        self.lam = optimal_lambda(bits)[0]

    def codes(self, w):
        half = 2 ** (self.bits - 1)
        with torch.no_grad():
            if self.per_channel:
                dims = reduce_dims(w.ndim, self.ch_axis)
                mu = channel_view(w.mean(dim=dims), w.ndim, self.ch_axis)
                sigma = channel_view(w.std(dim=dims, unbiased=False), w.ndim, self.ch_axis)
            else:
                mu, sigma = w.mean(), w.std(unbiased=False)
            alpha = (self.lam * sigma).clamp(min=1e-8)
            zero = (half - 0.5) - mu / alpha
            q = torch.clamp(torch.round((w - mu) / alpha - 0.5), -half, half - 1) + half
        return q, alpha, zero, w

    @torch.no_grad()
    def restore(self, q, scale, zero):
        """w = mu + alpha t with t in code v's bin (v, v + 1) (the outer bins open) and, per channel
        (or tensor), mean(t) = 0 and std(t) = 1 / lambda: then the weights' own mu and sigma give
        back alpha and zero."""
        half = 2 ** (self.bits - 1)
        v = q.double() - half
        axis = self.ch_axis
        alpha = channel_view(scale.double(), q.ndim, axis)
        mu = channel_view(((half - 0.5) - zero.double()) * scale.double(), q.ndim, axis)
        dims = reduce_dims(q.ndim, axis) if self.per_channel else tuple(range(q.ndim))
        inf = torch.full_like(v, float("inf"))
        lo = torch.where(v <= -half, -inf, v)
        hi = torch.where(v >= half - 1, inf, v + 1)

        def normalise(t):
            t = t - t.mean(dim=dims, keepdim=True)
            return t / t.std(dim=dims, keepdim=True, unbiased=False).clamp(min=1e-12) / self.lam
        t = fit_in_bins(v + 0.5, lo, hi, normalise, margin=0.02)
        # the weights' float32 mean and std give back alpha and zero to within an ulp or two (the
        # codes exactly): unlike a stored step, a statistic cannot be set bit for bit
        return (mu + alpha * t).to(scale.dtype)


class UL2QAct(ActQuantizer):
    """Activations: mu and sigma tracked by EMA in training, frozen for inference."""

    def __init__(self, bits, momentum=0.1, ch_axis=1):
        super().__init__(bits, ch_axis)
        self.momentum = momentum
        self.lam = optimal_lambda(bits)[0]
        self.register_buffer("mu", torch.zeros(()))
        self.register_buffer("sigma", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def params(self, x):
        if x is not None and self.training:
            with torch.no_grad():
                mu, sigma = global_mean_std(x)  # over every data-parallel rank's batch
                if not self.initialized:
                    self.mu.copy_(mu), self.sigma.copy_(sigma), self.initialized.fill_(True)
                else:
                    self.mu.lerp_(mu, self.momentum), self.sigma.lerp_(sigma, self.momentum)
        half = 2 ** (self.bits - 1)
        alpha = (self.lam * self.sigma).clamp(min=1e-8)
        # codes v in [-half, half-1]: v = round((x - mu)/alpha - 1/2); value alpha * (v + 1/2) + mu
        return dict(scale=alpha, offset=-self.mu / alpha - 0.5, zero=-0.5 - self.mu / alpha,
                    qmin=-half, qmax=half - 1)

    @torch.no_grad()
    def restore(self, params):
        scale, zero = params["scale"][:1], params["zero"][:1]
        self.sigma.copy_(nudge(lambda s: (self.lam * s).clamp(min=1e-8), scale, scale / self.lam)[0])
        alpha = (self.lam * self.sigma).clamp(min=1e-8)
        self.mu.copy_(nudge(lambda m: -0.5 - m / alpha, zero, -(zero + 0.5) * alpha)[0])
        self.initialized.fill_(True)


@register_quantizer(UL2Q, "weight")
def _ul2q_w(spec, layer):
    return UL2QWeight(spec.bits, spec.granularity == "channel", getattr(layer, "ch_axis", 0))


@register_quantizer(UL2Q, "act")
def _ul2q_a(spec, layer):
    return UL2QAct(spec.bits, spec.momentum)
