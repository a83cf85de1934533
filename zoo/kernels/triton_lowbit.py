"""Triton kernels for packed low-bit layers: int8 activations x {1,2,4,8}-bit packed weights.

Two launches per layer:

1. ``quantize_act`` turns float activations into int8 codes ``a = v - c`` where v are the training
   form's integer codes (affine: clamp(round_half_even(x / s + offset), qmin, qmax); sign: ±1) and
   ``c`` (0 or 128) recentres unsigned 8-bit codes into int8.
2. ``_igemm_kernel``: implicit GEMM conv2d (no im2col is materialised: each K tile gathers its input
   window from the activation tensor by index arithmetic) over M = N·OH·OW output pixels and
   N = C_out channels. Weights are read exactly as the checkpoint stores them (uint8 rows packed along
   K = C_in·kh·kw, little-endian within a byte) and unpacked to int8 inside the K loop; ``tl.dot``
   accumulates int8 x int8 in int32. Linear layers are the 1x1 case on an [M, K, 1, 1] view.

Padding: the training form zero-pads the dequantised activation, i.e. pads ``u = v - z_a`` with 0.
The kernel loads out-of-window positions as ``pa = z_a - c`` so that u = a - pa is 0 there, which
keeps every sum an integer. With b = q - cw (cw = 128 for 8-bit weights so b fits int8):

    acc   = sum a*b                 (int32, tensor cores)
    sum_u = sum a - pa*K            (row sums of the A tiles)
    sum_uq = acc - pa*sum_K(b) + cw*sum_u

and the epilogue computes, in float64 and in the reference's order,
``y = (sum_uq - z_w[c]*sum_u) * (s_a*s_w[c]) + bias[c]`` (optionally ReLU), then casts to the output
dtype, so outputs agree with ``reference.py`` to the last bit in practice and the integer sums agree
exactly (``raw=True`` returns them for tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton import knobs

from .packing import packed_row_bytes, storage_bits

INTERPRET = bool(knobs.runtime.interpret)
# The interpreter runs one Python program per tile, so it gets few, large tiles; on a GPU the
# autotuner picks among GEMM_CONFIGS per (M, N, K) shape unless a caller passes explicit blocks.
INTERPRET_BLOCKS = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)
GEMM_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 3),
                              (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
                              (128, 256, 64, 8, 3), (64, 32, 128, 4, 4)]]
TUNE_KEY = ["M", "N", "K", "KH", "KW", "SB"]
QUANT_BLOCK = 1024


def launch_options() -> dict:
    """No FMA contraction, so the float64 epilogue rounds exactly like the torch reference."""
    return {"enable_fp_fusion": False}


# --------------------------------------------------------------------------------------- kernels
@triton.jit
def round_half_even(t):
    """torch.round semantics (ties to even) from floor, exact for every float32."""
    r = tl.floor(t)
    d = t - r  # exact: t and floor(t) share the exponent range
    half = r * 0.5
    odd = tl.floor(half) != half
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def store_output(y_ptr, usum_ptr, ws_ptr, wz_ptr, bias_ptr, s_a, sum_uq, sum_u, img, pix, offs_m, offs_n,
                 m_ok, n_ok, pid_n, N, OHW, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                 RAW: tl.constexpr):
    """Shared epilogue: the exact sums (RAW) or the reference's float64 formula, into NCHW y."""
    y_off = (img.to(tl.int64) * N * OHW + pix)[:, None] + offs_n[None, :].to(tl.int64) * OHW
    out_ok = m_ok[:, None] & n_ok[None, :]
    if RAW:
        tl.store(y_ptr + y_off, sum_uq, mask=out_ok)
        tl.store(usum_ptr + offs_m, sum_u, mask=m_ok & (pid_n == 0))
    else:
        wz = tl.load(wz_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)
        ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)
        y = (sum_uq.to(tl.float64) - wz[None, :] * sum_u.to(tl.float64)[:, None]) * (ws * s_a)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _quant_act_kernel(x_ptr, a_ptr, shift_ptr, numel, C, HW, scale, offset, qmin, qmax, c,
                      SIGN: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        ch = (offs // HW) % C
        x = x - tl.load(shift_ptr + ch, mask=mask, other=0.0)
    if SIGN:
        v = tl.where(x >= 0, 1.0, -1.0)
    else:
        t = tl.math.div_rn(x, scale) + offset
        v = tl.minimum(tl.maximum(round_half_even(t), qmin), qmax)
    tl.store(a_ptr + offs, (v - c).to(tl.int8), mask=mask)


@triton.jit
def _igemm_kernel(a_ptr, w_ptr, y_ptr, usum_ptr, bsum_ptr, ws_ptr, wz_ptr, bias_ptr,
                  s_a, pa, M, N, K, KB, C, H, W, OH, OW, s_n, s_c, s_h, s_w,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  KH: tl.constexpr, KW: tl.constexpr, SB: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RELU: tl.constexpr, RAW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER: tl.constexpr = 8 // SB
    QMASK: tl.constexpr = (1 << SB) - 1
    CW: tl.constexpr = 128 if SB == 8 else 0
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    ih0 = (pix // OW) * stride_h - pad_h
    iw0 = (pix % OW) * stride_w - pad_w
    a_row = a_ptr + img.to(tl.int64) * s_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    asum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        cin = offs_k // (KH * KW)
        rs = offs_k % (KH * KW)
        ih = ih0[:, None] + (rs // KW)[None, :] * dil_h
        iw = iw0[:, None] + (rs % KW)[None, :] * dil_w
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_row[:, None] + cin[None, :] * s_c + ih * s_h + iw * s_w, mask=inside, other=0)
        # out-of-window taps read pa (u = 0); taps past K read 0 (their weights are 0 too)
        a = tl.where(inside, a.to(tl.int32), tl.where(k_ok[None, :], pa, 0))
        asum += tl.sum(a, axis=1)

        byte = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * KB + (offs_k // PER)[:, None],
                       mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = (byte.to(tl.int32) >> ((offs_k % PER) * SB)[:, None]) & QMASK
        b = tl.where(k_ok[:, None], q - CW, 0)
        acc += tl.dot(a.to(tl.int8), b.to(tl.int8), out_dtype=tl.int32)

    bsum = tl.load(bsum_ptr + offs_n, mask=n_ok, other=0)
    sum_u = asum - pa * K
    sum_uq = acc - pa * bsum[None, :] + CW * sum_u[:, None]
    store_output(y_ptr, usum_ptr, ws_ptr, wz_ptr, bias_ptr, s_a, sum_uq, sum_u, img, pix, offs_m, offs_n,
                 m_ok, n_ok, pid_n, N, OH * OW, HAS_BIAS, RELU, RAW)


_igemm_tuned = _igemm_kernel if INTERPRET else triton.autotune(GEMM_CONFIGS, key=TUNE_KEY)(_igemm_kernel)


def launch(kernel, tuned, defaults, blocks, m, n, args, meta):
    """Explicit blocks (or the interpreter's defaults) launch ``kernel``; otherwise ``tuned``."""
    if blocks is None and not INTERPRET:
        grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))  # noqa: E731
        tuned[grid](*args, **meta, **launch_options())
        return
    blk = dict(defaults, **(blocks or {}))
    grid = (triton.cdiv(m, blk["BLOCK_M"]), triton.cdiv(n, blk["BLOCK_N"]))
    kernel[grid](*args, **meta, **blk, **launch_options())


# ------------------------------------------------------------------------------------ host side
def act_centre(qmin: float, qmax: float) -> int | None:
    """c such that v - c fits int8 for v in [qmin, qmax], or None."""
    if qmin >= -128 and qmax <= 127:
        return 0
    if qmin >= 0 and qmax <= 255:
        return 128
    return None


def quantize_act(x: torch.Tensor, mode: str, params: dict, centre: int = 0) -> torch.Tensor:
    """int8 codes ``v - centre`` of ``x`` (any float dtype, NCHW or [.., K]), same shape, contiguous."""
    x = x.contiguous()
    a = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    numel = x.numel()
    if numel == 0:
        return a
    sign = mode == "sign"
    shift = params.get("shift")
    c_dim = x.shape[1] if x.ndim > 1 else 1
    hw = math.prod(x.shape[2:]) if x.ndim > 2 else 1
    if sign:
        scale = offset = qmin = qmax = 0.0
    else:
        scale, offset = float(params["scale"]), float(params["offset"])
        qmin, qmax = float(params["qmin"]), float(params["qmax"])
    grid = (triton.cdiv(numel, QUANT_BLOCK),)
    _quant_act_kernel[grid](x, a, shift if shift is not None else x, numel, c_dim, hw, scale, offset,
                            qmin, qmax, float(centre), SIGN=sign, HAS_SHIFT=shift is not None,
                            BLOCK=QUANT_BLOCK)
    return a


def bias_free_colsum(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """sum_K (q - cw) per output row (int32), the constant the padding trick subtracts."""
    from .packing import unpack

    cw = 128 if storage_bits(bits) == 8 else 0
    q = unpack(qweight, bits, k).to(torch.int32)
    return (q.sum(dim=1) - cw * k).to(torch.int32).contiguous()


def conv2d(a: torch.Tensor, pa: int, qweight: torch.Tensor, bits: int, weight_shape, bsum: torch.Tensor,
           w_scale: torch.Tensor, w_zero: torch.Tensor, s_a: float, bias: torch.Tensor | None,
           stride=(1, 1), padding=(0, 0), dilation=(1, 1), relu: bool = False,
           out_dtype=torch.float32, raw: bool = False, blocks: dict | None = None):
    """Conv2d (groups=1) of int8 activation codes ``a`` [N, C, H, W] with packed weights.

    Returns y [N, C_out, OH, OW] in ``out_dtype``; with ``raw=True`` returns the exact integer
    sums (sum u*q [N, C_out, OH, OW] int32, sum u [N*OH*OW] int32) instead.
    """
    n_img, c_in, h, w = a.shape
    c_out, c_w, kh, kw = weight_shape
    if c_w != c_in:
        raise ValueError(f"activation has {c_in} channels, weights expect {c_w}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    m, k = n_img * oh * ow, c_in * kh * kw
    kb = packed_row_bytes(k, bits)
    if qweight.shape != (c_out, kb):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} != {(c_out, kb)} for {bits}-bit K={k}")
    y = torch.empty((n_img, c_out, oh, ow), dtype=torch.int32 if raw else out_dtype, device=a.device)
    usum = torch.empty(m if raw else 1, dtype=torch.int32, device=a.device)
    if m == 0 or c_out == 0:
        return (y, usum) if raw else y
    args = (a, qweight, y, usum, bsum, w_scale, w_zero, bias if bias is not None else w_scale,
            float(s_a), int(pa), m, c_out, k, kb, c_in, h, w, oh, ow, *a.stride(),
            sh, sw, ph, pw, dh, dw)
    meta = dict(KH=kh, KW=kw, SB=storage_bits(bits), HAS_BIAS=bias is not None, RELU=relu, RAW=raw)
    launch(_igemm_kernel, _igemm_tuned, INTERPRET_BLOCKS, blocks, m, c_out, args, meta)
    return (y, usum) if raw else y


def linear(a: torch.Tensor, pa: int, qweight, bits, weight_shape, bsum, w_scale, w_zero, s_a, bias,
           relu=False, out_dtype=torch.float32, raw=False, blocks=None):
    """Linear on int8 codes ``a`` [.., K]: the 1x1 conv on an [M, K, 1, 1] view."""
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    out = conv2d(a2[:, :, None, None], pa, qweight, bits, (weight_shape[0], weight_shape[1], 1, 1),
                 bsum, w_scale, w_zero, s_a, bias, relu=relu, out_dtype=out_dtype, raw=raw,
                 blocks=blocks)
    if raw:
        return out[0].reshape(*lead, -1), out[1]
    return out.reshape(*lead, -1)
