"""BinaryDM's evolvable-basis binarizer (EBB, Zheng et al., ICLR 2025) for weights.

    w_b = sigma1 * sign(w) + beta * sigma2 * sign(w - sigma1 * sign(w))

sigma1, sigma2: learnable per output channel, initialised on the first forward from the weights as
the authors' code does (sigma1 = mean|w|, sigma2 = mean|w - sigma1 sign(w)| per channel). beta, the
weight of the second basis, is our schedule for the basis evolution (the authors' released code is an
earlier, fixed multi-basis version): 1 at the start of training, falling linearly to 0 at the fraction
``decay_end`` of training (``set_progress``; it never rises again), 0 after; from then on the weight is single-basis
sigma1 * sign(w) and packs at 1 bit per weight (q = w >= 0, scale = 2 sigma1, zero = 1/2, as XNOR).
Exporting while beta > 0 is an error (a two-basis weight has no 1-bit form).

Gradients: sign() passes the clipped straight-through gradient 1[|x| <= 1] (the authors'
BinaryQuantize), in both bases, so w gets sigma1 1[|w|<=1] + beta sigma2 1[|r|<=1] (1 - sigma1 1[|w|<=1])
(r the residual), sigma1 gets sign(w) - beta sigma2 1[|r|<=1] sign(w), sigma2 gets beta sign(r).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import WeightQuantizer, channel_view, dequantize, reduce_dims, sign_codes, ste
from .config import EBB, register_quantizer


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) (sign(0) = +1) forward, gradient 1[|x| <= 1]."""
    return ste(sign_codes(x.detach()), torch.clamp(x, -1, 1))


def basis_weight(progress: float, decay_end: float) -> float:
    """beta: 1 at progress 0, linear to 0 at ``decay_end``, 0 after (0 throughout if decay_end is 0)."""
    if decay_end <= 0:
        return 0.0
    return max(0.0, 1.0 - float(progress) / decay_end)


class EBBWeight(WeightQuantizer):
    def __init__(self, channels: int, ch_axis: int = 0, decay_end: float = 0.5):
        super().__init__(1, ch_axis)
        self.decay_end = decay_end
        self.sigma1 = nn.Parameter(torch.ones(channels))
        self.sigma2 = nn.Parameter(torch.zeros(channels))
        self.register_buffer("beta", torch.tensor(basis_weight(0.0, decay_end)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def set_progress(self, fraction):
        """beta never rises: a resumed or fine-tuned single-basis weight stays single-basis."""
        self.beta.fill_(min(float(self.beta), basis_weight(fraction, self.decay_end)))

    @property
    def single_basis(self) -> bool:
        return float(self.beta) == 0.0

    final_form = single_basis  # an epoch with a second basis left cannot be released

    def _init(self, w):
        if self.initialized:
            return
        with torch.no_grad():
            dims = reduce_dims(w.ndim, self.ch_axis)
            s1 = w.abs().mean(dim=dims)
            r = w - channel_view(s1, w.ndim, self.ch_axis) * sign_codes(w)
            self.sigma1.copy_(s1), self.sigma2.copy_(r.abs().mean(dim=dims))
            self.initialized.fill_(True)

    def forward(self, w):
        self._init(w)
        s1 = channel_view(self.sigma1, w.ndim, self.ch_axis)
        first = s1 * sign_ste(w)
        if self.single_basis:
            return first
        s2 = channel_view(self.sigma2, w.ndim, self.ch_axis)
        return first + self.beta * s2 * sign_ste(w - first)

    def codes(self, w):
        if not self.single_basis:
            raise ValueError(f"EBB weight still has its second basis (beta = {float(self.beta):.4g}); it is "
                             f"single-basis 1-bit only after training passes decay_end = {self.decay_end} "
                             f"of its steps (set_progress)")
        self._init(w)
        s1 = channel_view(self.sigma1, w.ndim, self.ch_axis)
        with torch.no_grad():
            q = (w >= 0).to(w.dtype)
        return q, 2 * s1.detach(), torch.full_like(s1.detach(), 0.5), s1 * sign_ste(w)

    @torch.no_grad()
    def restore(self, q, scale, zero):
        self.sigma1.copy_(scale / 2)
        self.sigma2.zero_()
        self.beta.fill_(0.0)
        self.initialized.fill_(True)
        return dequantize(q, scale, zero, self.ch_axis)  # +-sigma1


@register_quantizer(EBB, "weight")
def _ebb_w(spec, layer):
    axis = getattr(layer, "ch_axis", 0)
    return EBBWeight(layer.weight.shape[axis], axis, spec.decay_end)
