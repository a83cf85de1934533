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


def _phases(k: int, s: int, p: int, op: int):
    """One dimension of a transposed conv (kernel k, stride s, padding p, output padding op, dilation 1) as
    s phases of one ordinary convolution: output o = s i + a sums x[i + delta] w[k'] over the taps k' with
    a + p - k' = s delta. Returns (taps, t, pad, off, n): taps[a][j] = the tap k' at window position j of
    phase a (or -1), t the window (all phases' deltas), pad the ordinary conv's symmetric padding, off the
    first of its outputs that is phase output i = 0, n = ceil(H_out / s) its outputs used, less H."""
    deltas = [(a + p - kk) // s for a in range(s) for kk in range(k) if (a + p - kk) % s == 0]
    d0 = min(deltas)
    t = max(deltas) - d0 + 1
    taps = [[a + p - s * (d0 + j) if 0 <= a + p - s * (d0 + j) < k else -1 for j in range(t)] for a in range(s)]
    n = -(-(k + op - 2 * p) // s) - 1  # ceil(H_out / s) - H, for every H
    pad = max(0, -d0, n - 1 + d0 + t)
    return taps, t, pad, d0 + pad, n


class ConvTranspose:
    """A transposed conv's int8 weights (C_in x C_out x kh x kw, groups 1, dilation 1) as one ordinary
    convolution with s_h s_w C_out outputs, one group of C_out per output phase (sub-pixel form), zero
    weights where a phase's window has no tap: the same products and sums, without the zeros a
    zero-inserted input would multiply. Padded positions contribute 0, as the transposed conv's
    missing inputs do. Called, it returns the transposed conv's sums, stored channels-last."""

    def __init__(self, w8: torch.Tensor, x_zp: int, stride, padding, output_padding):
        pair = torch.nn.modules.utils._pair
        (sh, sw), (ph, pw), (oph, opw) = pair(stride), pair(padding), pair(output_padding)
        c_in, c_out, kh, kw = w8.shape
        (taps_h, th, pad_h, self.off_h, self.n_h), (taps_w, tw, pad_w, self.off_w, self.n_w) = \
            _phases(kh, sh, ph, oph), _phases(kw, sw, pw, opw)
        self.s, self.c, self.out_pad = (sh, sw), c_out, (kh - 2 * ph + oph - sh, kw - 2 * pw + opw - sw)
        w = torch.zeros(sh, sw, c_out, c_in, th, tw, dtype=torch.int8)
        wt = w8.permute(1, 0, 2, 3)  # C_out x C_in x kh x kw
        for a in range(sh):
            for b in range(sw):
                for i, ky in enumerate(taps_h[a]):
                    for j, kx in enumerate(taps_w[b]):
                        if ky >= 0 and kx >= 0:
                            w[a, b, :, :, i, j] = wt[:, :, ky, kx]
        self.conv = Conv(w.reshape(sh * sw * c_out, c_in, th, tw), x_zp, 1, (pad_h, pad_w), 1, 1)

    def sums(self, x8: torch.Tensor) -> torch.Tensor:
        """The sub-pixel convolution's sums: N x (s_h s_w C_out) x H' x W', channels-last."""
        return self.conv(x8)

    def subpixel(self, h: int, w: int) -> list[int]:
        """[s_h, s_w, off_h, off_w, H_out, W_out] for an h x w input: the transposed conv's output pixel
        (y, x) is phase (y % s_h, x % s_w)'s group of ``sums`` at pixel (y // s_h + off_h, x // s_w + off_w)
        (what ``cpu_ops``' epilogues read)."""
        (sh, sw), (eh, ew) = self.s, self.out_pad
        return [sh, sw, self.off_h, self.off_w, h * sh + eh, w * sw + ew]

    def __call__(self, x8: torch.Tensor) -> torch.Tensor:
        """The transposed conv's sums, N x C_out x H_out x W_out, stored channels-last."""
        (sh, sw), (n, _, h, w) = self.s, x8.shape
        nh, nw = h + self.n_h, w + self.n_w
        out = self.sums(x8).permute(0, 2, 3, 1)[:, self.off_h:self.off_h + nh, self.off_w:self.off_w + nw]
        out = out.reshape(n, nh, nw, sh, sw, self.c).permute(0, 1, 3, 2, 4, 5).reshape(n, nh * sh, nw * sw, self.c)
        h_out, w_out = self.subpixel(h, w)[4:]
        return out[:, :h_out, :w_out].contiguous().permute(0, 3, 1, 2)  # channels-last (no copy if uncropped)
