"""I-ViT (Li & Gu, ICCV 2023): the ViT nonlinearities in integer arithmetic and bit shifts.

Integer functions (int64 tensors in, int64 out; ``s`` the input's scale, a Python float):

- ``int_exp(x, s, n)`` for x <= 0: ``p = x + (x >> 1) - (x >> 4)`` (x log2 e with log2 e ~ 1.0111b),
  ``x0 = floor(-1 / s)`` (the integer for -1), ``p = max(p, n x0)``, ``q = floor(p / x0)``, ``r = p - q x0``
  (so p s ~ -q + r s, r s in (-1, 0]), ``e = (r >> 1) - x0`` (2^(r s) ~ 1 + r s / 2, in units of s) and
  ``exp = e << (n - q)`` at scale ``s / 2^n``.
- ``shiftmax(x, s, bits)``: ``exp`` of ``x - rowmax`` (n = 15), ``S = min(sum exp, 2^31 - 1)``,
  ``f = floor((2^31 - 1) / S)``, ``out = (exp f) >> (32 - bits)`` at scale ``2^-(bits - 1)``.
- ``shift_gelu(x, s, bits)``: x sigmoid(1.702 x) with the sigmoid as a two-term Shiftmax at scale
  s' = 1.702 s: ``m = rowmax``, ``a = int_exp(x - m, s', 23)``, ``b = int_exp(-m, s', 23)``,
  ``sig = (a floor((2^31 - 1) / (a + b))) >> (32 - bits)`` (scale 2^-(bits - 1)); ``out = x sig`` at scale
  ``s 2^-(bits - 1)``.
- ``i_layernorm(x, s)``: ``y = x - round(mean x)``, ``V = sum y^2`` (over the C channels), integer square
  root by Newton's iteration ``k <- (k + V // k) >> 1`` from k = 2^16, 10 times; ``y = (y floor((2^31 - 1) /
  k)) >> 1`` at scale ``sqrt(C) / 2^30`` (= (x - mean) / std); LayerNorm's affine follows as
  ``(y + floor(beta / gamma / scale)) * scale * gamma`` (the bias added in the integer domain).

The modules (``IntSoftmax``, ``ShiftGELU``, ``ILayerNorm``) quantize their float input to signed
integers on a calibrated symmetric grid (an EMA of max|x| in training, frozen in eval: 12 bits for the
softmax logits, 16 for the LayerNorm input, 8 for GELU; the softmax output has 16 bits, the sigmoid 8),
run the integer function, and return its value (integer times scale). In training the gradient is the
float function's (straight-through), which is how I-ViT's QAT trains. ``to_integer_only(model)`` swaps
them in (``quantize()`` does when the config's ``extra`` has ``ivit: true``). At inference on the CPU
(eager, float32, finite inputs) each runs as one C++ pass with the same int64 arithmetic
(``kernels.cpu_ops.ivit``): identical outputs. What stays float in these
modules: the requantization between ops (a multiply by the ratio of scales and a round) and the residual
stream; ``ivit_integer.IntegerViT`` runs a packed release with integers only (dyadic requantization).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_ops
from .attention import QuantSoftmax, Softmax
from .base import Quantizer, ste

INT32_MAX = 2 ** 31 - 1


def int_exp(x: torch.Tensor, s: float, n: int) -> torch.Tensor:
    """I-ViT's shift-based exp of integers x <= 0 at scale s; the result is at scale s / 2^n."""
    p = x + (x >> 1) - (x >> 4)
    x0 = math.floor(-1.0 / s)
    p = torch.clamp(p, min=n * x0)
    q = torch.div(p, x0, rounding_mode="floor")
    r = p - q * x0
    e = (r >> 1) - x0
    return torch.clamp(e << (n - q), min=0)


def shiftmax(x: torch.Tensor, s: float, bits: int = 8) -> torch.Tensor:
    """Integer softmax over the last dim; the output is at scale 2^-(bits - 1)."""
    e = int_exp(x - x.amax(-1, keepdim=True), s, 15)
    total = torch.clamp(e.sum(-1, keepdim=True), 1, INT32_MAX)
    return (e * torch.div(INT32_MAX, total, rounding_mode="floor")) >> (32 - bits)


def shift_gelu(x: torch.Tensor, s: float, bits: int = 8) -> torch.Tensor:
    """Integer x sigmoid(1.702 x) over the last dim's channels; the output is at scale s 2^-(bits - 1)."""
    s2 = 1.702 * s
    m = torch.clamp(x.amax(-1, keepdim=True), min=0)
    a, b = int_exp(x - m, s2, 23), int_exp(-m, s2, 23)
    sig = (a * torch.div(INT32_MAX, torch.clamp(a + b, min=1), rounding_mode="floor")) >> (32 - bits)
    return x * sig


def isqrt_newton(v: torch.Tensor, iters: int = 10) -> torch.Tensor:
    k = torch.full_like(v, 2 ** 16)
    for _ in range(iters):
        k = torch.clamp((k + torch.div(v, k, rounding_mode="floor")) >> 1, min=1)
    return k


def i_layernorm(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Integer (x - mean) / std over the last dim: (y, scale) with y * scale ~ the normalised x."""
    c = x.shape[-1]
    mean = torch.round(x.double().mean(-1, keepdim=True)).long()
    y = x - mean
    k = isqrt_newton((y * y).sum(-1, keepdim=True))
    return (y * torch.div(INT32_MAX, k, rounding_mode="floor")) >> 1, math.sqrt(c) / 2 ** 30


class SymmetricInput(Quantizer):
    """Signed ``bits``-bit symmetric grid for an integer op's input: s = max|x| / (2^(bits-1) - 1),
    max|x| an EMA over training batches (the first batch initialises it), frozen in eval."""

    def __init__(self, bits: int, momentum: float = 0.1):
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.register_buffer("amax", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def scale(self, x: torch.Tensor | None = None) -> float:
        if x is not None and self.training:
            with torch.no_grad():
                m = x.detach().abs().max().clamp_min(1e-8)
                if not self.initialized:
                    self.amax.copy_(m), self.initialized.fill_(True)
                else:
                    self.amax.lerp_(m, self.momentum)
        return float(self.amax) / (2 ** (self.bits - 1) - 1)

    def codes(self, x: torch.Tensor, s: float) -> torch.Tensor:
        q = 2 ** (self.bits - 1) - 1
        return torch.clamp(torch.round(x.detach().double() / s), -q, q).long()


class IntSoftmax(Softmax):
    """Shiftmax on the 12-bit quantized logits; output levels k 2^-(bits-1), 16 bits as I-ViT's PyTorch
    attention (at 8 bits each of the ~50 entries of a row loses up to 1/128 to the final shift: rows
    sum to ~0.9). 12-bit logits keep sum(exp) below 2^31 (16-bit ones overflow it, as 1/s grows)."""

    def __init__(self, dim: int = -1, bits: int = 16, in_bits: int = 12):
        super().__init__(dim)
        if dim not in (-1,):
            raise ValueError(f"IntSoftmax works over the last dim; got dim={dim}")
        self.bits, self.iq = bits, SymmetricInput(in_bits)

    def forward(self, x):
        s = self.iq.scale(x)
        y = None if self.training else cpu_ops.ivit("softmax", x, s, self.bits, self.iq.bits)
        if y is not None:  # the same values in one C++ pass (inference on the CPU)
            return y
        y = shiftmax(self.iq.codes(x, s), s, self.bits).to(x.dtype) * 2.0 ** -(self.bits - 1)
        return ste(y, x.softmax(-1))

    def extra_repr(self):
        return f"shiftmax, out bits={self.bits}, in bits={self.iq.bits}"


class ShiftGELU(nn.Module):
    def __init__(self, bits: int = 8, in_bits: int = 8):
        super().__init__()
        self.bits, self.iq = bits, SymmetricInput(in_bits)

    def forward(self, x):
        s = self.iq.scale(x)
        y = None if self.training else cpu_ops.ivit("gelu", x, s, self.bits, self.iq.bits)
        if y is not None:
            return y
        y = (shift_gelu(self.iq.codes(x, s), s, self.bits).double() * (s * 2.0 ** -(self.bits - 1))).to(x.dtype)
        return ste(y, F.gelu(x))

    def extra_repr(self):
        return f"sigmoid bits={self.bits}, in bits={self.iq.bits}"


class ILayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim in integers (same parameters and state dict as ``nn.LayerNorm``)."""

    @classmethod
    def from_float(cls, mod: nn.LayerNorm, in_bits: int = 16) -> "ILayerNorm":
        if len(mod.normalized_shape) != 1 or not mod.elementwise_affine or mod.bias is None:
            raise ValueError("ILayerNorm replaces LayerNorms over the last dim with weight and bias")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = mod.normalized_shape, mod.eps, True
        new.weight, new.bias = mod.weight, mod.bias
        new.iq = SymmetricInput(in_bits)
        return new

    def forward(self, x):
        s = self.iq.scale(x)
        scale = math.sqrt(x.shape[-1]) / 2 ** 30  # i_layernorm's output scale
        g = self.weight.detach().double()
        g = torch.where(g.abs() < 1e-12, torch.full_like(g, 1e-12), g)
        b = torch.floor(self.bias.detach().double() / g / scale).long()
        v = None if self.training else cpu_ops.ivit("layernorm", x, s, self.iq.bits, b, scale * g)
        if v is not None:
            return v
        y, scale = i_layernorm(self.iq.codes(x, s))
        v = ((y + b).double() * (scale * g)).to(x.dtype)
        return ste(v, F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))

    def extra_repr(self):
        return f"{self.normalized_shape}, integer, in bits={self.iq.bits}"


def to_integer_only(model: nn.Module) -> nn.Module:
    """Swap (in place) every LayerNorm over the last dim, GELU and attention softmax under ``model`` for
    its I-ViT integer form. Idempotent."""
    from .quantize import _set_child

    for name, mod in list(model.named_modules()):
        if not name:
            continue
        if type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1 and mod.elementwise_affine:
            _set_child(model, name, ILayerNorm.from_float(mod))
        elif type(mod) is nn.GELU:
            _set_child(model, name, ShiftGELU())
        elif type(mod) in (Softmax, QuantSoftmax):
            _set_child(model, name, IntSoftmax(mod.dim))
    return model
