"""int8 convolutions and matmuls of the cached CPU path, through oneDNN (torch's ``onednn`` ops).

A folded plan (``cached.py``) computes the exact integer sums of U' = m_a (v - z_a) and W' = m_w (q - z_w)
with one float32 convolution. When W' fits int8 and the activation codes fit uint8,

    x8 = m_a (v - qmin)  in [0, 255],   x_zp = m_a (z_a - qmin),   so  x8 - x_zp = U'

and oneDNN's u8 x s8 convolution (or matmul) with the source zero point x_zp, unit scales and a float32
output gives the same sums: its products are summed in int32 (exact) and converted to float32 once,
which is exact because the plan's bound keeps every sum below 2^24. Padding is the training form's:
a padded position contributes (x_zp - x_zp) * w = 0. The epilogue stays the reference's (float64), so
outputs are identical to ``backend="reference"``, bit for bit; the tests check it with ``torch.equal``.

On CPUs with AVX-512 VNNI, AVX-VNNI or AMX, oneDNN sums u8 x s8 products straight into int32. On
older x86 CPUs its int8 kernels may pair products into int16 with saturation, which would not be
exact: ``available()`` therefore runs a self-test on first use (all-255 codes against +127 and -128
weights, whose pairs saturate int16, and a random case) and turns the int8 path off where any sum
differs. ``ZOO_CPU_INT8=0`` turns it off too; then the float32 convolution of the cached path runs
(same outputs). Eager only: inside a ``torch.compile`` trace the float32 path is traced instead.

The prepacked weights (oneDNN's blocked layout, one byte per weight) are cached in the layer's plan,
beside the float32 copy the other paths use (they cannot be copied or pickled: ``cached._Cache``).
Convolutions return channels-last sums; the cached path's epilogues write the layout the reference's
result would have (``cached._keeps_channels_last``), because a float conv after a packed layer can
round differently in another layout.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_state: dict = {}


def enabled() -> bool:
    return os.environ.get("ZOO_CPU_INT8", "1").lower() not in ("0", "false", "off", "no")


def _ops_present() -> bool:
    try:
        ops = torch.ops.onednn
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "qconv_prepack")
                and hasattr(ops, "qconv2d_pointwise") and hasattr(ops, "qlinear_prepack")
                and hasattr(ops, "qlinear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _self_test() -> bool:
    """Whether oneDNN's int8 sums are exact here: cases where int16 pair sums would saturate."""
    g = torch.Generator().manual_seed(0)
    cases = [  # (codes, zero point, weights)
        (torch.full((2, 64, 6, 6), 255, dtype=torch.uint8), 0, torch.full((8, 64, 3, 3), 127, dtype=torch.int8)),
        (torch.full((2, 64, 6, 6), 255, dtype=torch.uint8), 3, torch.full((8, 64, 3, 3), -128, dtype=torch.int8)),
        (torch.randint(0, 256, (2, 32, 7, 7), generator=g).to(torch.uint8), 131,
         torch.randint(-128, 128, (16, 32, 3, 3), generator=g).to(torch.int8)),
    ]
    for x8, zp, w8 in cases:
        want = F.conv2d(x8.double() - zp, w8.double(), None, 1, 1)
        got = Conv(w8, zp, 1, 1, 1, 1)(x8)
        if not torch.equal(got.double(), want):
            return False
        x2 = x8.permute(0, 2, 3, 1).reshape(-1, x8.shape[1])
        w2 = w8[:, :, 1, 1].contiguous()
        if not torch.equal(Linear(w2, zp)(x2).double(), (x2.double() - zp) @ w2.double().t()):
            return False
    return True


def available() -> bool:
    """oneDNN's int8 ops are present, enabled and exact on this CPU (self-tested once per process)."""
    if not enabled():
        return False
    if "ok" not in _state:
        _state["ok"] = False
        try:
            _state["ok"] = _ops_present() and _self_test()
            if not _state["ok"]:
                log.info("oneDNN int8 sums are not exact on this CPU (or absent): packed layers use float32 sums")
        except Exception as e:  # an op missing or refusing this CPU: the float32 path runs instead
            log.info("oneDNN int8 path unavailable (%s: %s)", type(e).__name__, e)
    return _state["ok"]


def int8_range(w: torch.Tensor) -> bool:
    """Whether integer-valued float weights fit int8."""
    return bool(w.numel()) and float(w.min()) >= -128 and float(w.max()) <= 127


class Conv:
    """A conv's int8 weights prepacked by oneDNN for inputs with zero point ``x_zp`` and this geometry."""

    def __init__(self, w8: torch.Tensor, x_zp: int, stride, padding, dilation, groups: int):
        pair = torch.nn.modules.utils._pair
        self.x_zp, self.groups = int(x_zp), int(groups)
        self.geom = [list(pair(stride)), list(pair(padding)), list(pair(dilation))]
        self.ones, self.zeros = torch.ones(len(w8)), torch.zeros(len(w8), dtype=torch.int64)
        self.packed = torch.ops.onednn.qconv_prepack(w8, self.ones, 1.0, self.x_zp, *self.geom, self.groups, None)

    def __call__(self, x8: torch.Tensor) -> torch.Tensor:
        """sum (x8 - x_zp) * w over each window (zero padding of x8 - x_zp), float32, channels-last."""
        return torch.ops.onednn.qconv2d_pointwise(x8, 1.0, self.x_zp, self.packed, self.ones, self.zeros, None,
                                                  *self.geom, self.groups, 1.0, 0, torch.float32, "none", [], "")


class Linear:
    """A linear layer's N x K int8 weights prepacked by oneDNN, for inputs with zero point ``x_zp``."""

    def __init__(self, w8: torch.Tensor, x_zp: int):
        self.x_zp = int(x_zp)
        self.ones, self.zeros = torch.ones(len(w8)), torch.zeros(len(w8), dtype=torch.int64)
        self.packed = torch.ops.onednn.qlinear_prepack(w8, None)

    def __call__(self, x8: torch.Tensor) -> torch.Tensor:
        """(x8 - x_zp) @ w.T in float32; x8: ... x K uint8."""
        out = torch.ops.onednn.qlinear_pointwise(x8.reshape(-1, x8.shape[-1]), 1.0, self.x_zp, self.packed,
                                                 self.ones, self.zeros, None, 1.0, 0, torch.float32, "none", [], "")
        return out.reshape(*x8.shape[:-1], out.shape[-1])
