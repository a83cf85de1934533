"""Shared pieces of every quantizer module.

Every quantizer computes its forward *value* through an integer form (codes, scale, zero) with no
gradient, and its gradient through a differentiable *surrogate* defined by its paper; ``ste``
joins the two so the forward value is bit-identical to what the packed model computes.
"""
from __future__ import annotations

import torch
from torch import nn


def ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` exactly, backward the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() with identity gradient; the forward value is exactly torch.round(x)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward x, backward grad * g (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def affine_codes(x, scale, offset, qmin, qmax):
    """Integer codes of the affine activation form: clamp(round(x / scale + offset), qmin, qmax)."""
    return torch.clamp(torch.round(x / scale + offset), qmin, qmax)


def sign_codes(x):
    """±1 with sign(0) = +1 (so every value packs into one bit)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def reduce_dims(ndim: int, axis: int) -> tuple:
    return tuple(d for d in range(ndim) if d != axis)


class Quantizer(nn.Module):
    """Base class. Missing quantizer state in a loaded state dict keeps its initial value, so a
    float checkpoint loads strictly into a quantized model (the quantizer then initialises from
    data on its first forward)."""

    bits: int = 8

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        own = [k for k in missing_keys[before:] if k.startswith(prefix)]
        for k in own:
            missing_keys.remove(k)

    def set_progress(self, fraction: float) -> None:  # noqa: D401 - optional hook
        """Training progress in [0, 1]; quantizers with a schedule (IR-Net EDE) override this."""


class WeightQuantizer(Quantizer):
    """Weight quantizers return fake-quantized weights and expose their integer form."""

    def __init__(self, bits: int, ch_axis: int = 0):
        super().__init__()
        self.bits = bits
        self.ch_axis = ch_axis

    def codes(self, w: torch.Tensor):
        """(q, scale, zero, surrogate): unsigned integer codes q in [0, 2^bits - 1] (float dtype),
        per-channel ``scale`` and ``zero`` broadcastable to w, and the gradient surrogate."""
        raise NotImplementedError  # abstract

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q, scale, zero, surrogate = self.codes(w)
        return ste((q - zero) * scale, surrogate)

    @torch.no_grad()
    def integer_form(self, w: torch.Tensor):
        """(q uint8 same shape as w, scale [C], zero [C]) with (q - zero) * scale == forward(w)."""
        q, scale, zero, _ = self.codes(w)
        c = w.shape[self.ch_axis]
        scale = torch.broadcast_to(scale, w.shape).movedim(self.ch_axis, 0).reshape(c, -1)[:, 0]
        zero = torch.broadcast_to(zero, w.shape).movedim(self.ch_axis, 0).reshape(c, -1)[:, 0]
        return q.to(torch.uint8), scale.float().contiguous(), zero.float().contiguous()


class ActQuantizer(Quantizer):
    """Activation quantizers. ``mode`` is "affine" (codes via :func:`affine_codes`) or "sign"."""

    mode = "affine"

    def __init__(self, bits: int, ch_axis: int = 1):
        super().__init__()
        self.bits = bits
        self.ch_axis = ch_axis

    def params(self, x: torch.Tensor) -> dict:
        """Affine mode: dict(scale, offset, zero, qmin, qmax) as used by forward (no grad)."""
        raise NotImplementedError  # abstract

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Affine fake quantization with the clipped straight-through gradient (1 inside the
        representable range, 0 outside); quantizers with learnable ranges override this."""
        p = self.params(x)
        v = affine_codes(x.detach(), p["scale"], p["offset"], p["qmin"], p["qmax"])
        lo = (p["qmin"] - p["zero"]) * p["scale"]
        hi = (p["qmax"] - p["zero"]) * p["scale"]
        return ste((v - p["zero"]) * p["scale"], torch.clamp(x, lo, hi))

    @torch.no_grad()
    def export(self) -> dict:
        """Frozen inference parameters: scale, offset, zero, qmin, qmax as float tensors of shape [1]."""
        return {k: torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(1).clone()
                for k, v in self.params(None).items()}
