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
   The autotuner may split K over several programs per output tile (``split_reduce``), and layers
   whose weight zero points are integers with q - z_w in int8 take a variant that multiplies by
   q - z_w directly and needs no activation row sums (``centred_zero``).

Padding: the training form zero-pads the dequantised activation, i.e. pads ``u = v - z_a`` with 0.
The kernel loads out-of-window positions as ``pa = z_a - c`` so that u = a - pa is 0 there, which
keeps every sum an integer. With b = q - cw (cw = 128 for 8-bit weights so b fits int8):

    acc   = sum a*b                 (int32, tensor cores)
    sum_u = sum a - pa*K            (row sums of the A tiles)
    sum_uq = acc - pa*sum_K(b) + cw*sum_u

and the epilogue computes, in float64 and in the reference's order,
``y = (sum_uq - z_w[c]*sum_u) * (s_a*s_w[c]) + bias[c]`` (optionally ReLU), then casts to the output
dtype through float32 (as torch does), so outputs agree with ``reference.py`` to the last bit in
practice and the integer sums agree exactly (``raw=True`` returns them for tests).
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
# SPLIT_K > 1 splits the K loop over that many programs per output tile (for few output tiles:
# small batches, 7x7 maps); their exact int32 partial sums meet in a workspace (see ``split_reduce``).
INTERPRET_BLOCKS = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1)
GEMM_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), num_warps=w, num_stages=st)
    for bm, bn, bk, sk, w, st in [
        (16, 64, 128, 4, 4, 4), (16, 128, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (64, 64, 128, 4, 4, 3),
        (64, 128, 64, 1, 4, 3), (128, 64, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3),
        (64, 128, 128, 2, 4, 3)]]
TUNE_KEY = ["M", "N", "K", "KH", "KW", "SB", "CENTRED"]
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
def split_reduce(acc, usum, part_ptr, upart_ptr, count_ptr, pid_m, pid_n, N,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, USUM: tl.constexpr):
    """Combine the SPLIT_K programs of one output tile: (acc, usum, last) where ``last`` is true only
    in the program that arrives last, whose acc/usum are then the whole tile's exact sums.

    Each program adds its int32 partial sums into the tile's slot of a zero-filled workspace
    (integer atomics: exact in any order), then bumps the tile's arrival counter (acq_rel, after a
    CTA barrier so every thread's additions are ordered before it). The last arrival reads the
    totals back by atomic exchange with 0 and resets the counter, leaving the workspace zeroed for
    the next launch on the stream."""
    last = True
    if SPLIT_K > 1:
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        rm = tl.arange(0, BLOCK_M)
        off = tile.to(tl.int64) * (BLOCK_M * BLOCK_N) + rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.atomic_add(part_ptr + off, acc, sem="relaxed")
        if USUM:
            tl.atomic_add(upart_ptr + tile.to(tl.int64) * BLOCK_M + rm, usum, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        last = arrived == SPLIT_K - 1
        acc = tl.atomic_xchg(part_ptr + off, tl.zeros_like(acc), mask=(off >= 0) & last, sem="acquire")
        if USUM:
            usum = tl.atomic_xchg(upart_ptr + tile.to(tl.int64) * BLOCK_M + rm, tl.zeros_like(usum),
                                  mask=(rm >= 0) & last, sem="acquire")
        tl.atomic_xchg(count_ptr + tile, 0, mask=last)
    return acc, usum, last


@triton.jit
def store_output(y_ptr, usum_ptr, ws_ptr, wz_ptr, bias_ptr, s_a, sum_uq, sum_u, img, pix, offs_m, offs_n,
                 m_ok, n_ok, pid_n, N, OHW, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                 RAW: tl.constexpr, CENTRED: tl.constexpr = False):
    """Shared epilogue: the exact sums (RAW) or the reference's float64 formula, into NCHW y.
    CENTRED: ``sum_uq`` already is sum u*(q - z_w) (integer z_w), the reference's bracket, exactly."""
    y_off = (img.to(tl.int64) * N * OHW + pix)[:, None] + offs_n[None, :].to(tl.int64) * OHW
    out_ok = m_ok[:, None] & n_ok[None, :]
    if RAW:
        tl.store(y_ptr + y_off, sum_uq, mask=out_ok)
        tl.store(usum_ptr + offs_m, sum_u, mask=m_ok & (pid_n == 0))
    else:
        ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)
        if CENTRED:
            y = sum_uq.to(tl.float64) * (ws * s_a)[None, :]
        else:
            wz = tl.load(wz_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)
            y = (sum_uq.to(tl.float64) - wz[None, :] * sum_u.to(tl.float64)[:, None]) * (ws * s_a)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        # through float32 first, as torch casts float64 to half/bfloat16 (a direct cast rounds once,
        # torch twice, and the two differ on ~1 output in 10^4)
        tl.store(y_ptr + y_off, y.to(tl.float32).to(y_ptr.dtype.element_ty), mask=out_ok)


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
def _igemm_kernel(a_ptr, w_ptr, y_ptr, usum_ptr, bsum_ptr, wzi_ptr, ws_ptr, wz_ptr, bias_ptr,
                  part_ptr, upart_ptr, count_ptr,
                  s_a, pa, M, N, K, KB, C, H, W, OH, OW, s_n, s_c, s_h, s_w,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  KH: tl.constexpr, KW: tl.constexpr, SB: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RELU: tl.constexpr, RAW: tl.constexpr, CENTRED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr):
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
    if CENTRED:  # b = q - z_w[n] fits int8 and pa == 0: acc is the reference's bracket itself
        zw = tl.load(wzi_ptr + offs_n, mask=n_ok, other=0)

    # this program's share of K (whole BLOCK_K steps)
    k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(2) * k_len
    k_hi = tl.minimum(k_lo + k_len, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    asum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        cin = offs_k // (KH * KW)
        rs = offs_k % (KH * KW)
        ih = ih0[:, None] + (rs // KW)[None, :] * dil_h
        iw = iw0[:, None] + (rs % KW)[None, :] * dil_w
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_row[:, None] + cin[None, :] * s_c + ih * s_h + iw * s_w, mask=inside, other=0)
        byte = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * KB + (offs_k // PER)[:, None],
                       mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = (byte.to(tl.int32) >> ((offs_k % PER) * SB)[:, None]) & QMASK
        if CENTRED:
            b = tl.where(k_ok[:, None], q - zw[None, :], 0)
        else:
            # out-of-window taps read pa (u = 0); taps past K read 0 (their weights are 0 too)
            a = tl.where(inside, a.to(tl.int32), tl.where(k_ok[None, :], pa, 0))
            asum += tl.sum(a, axis=1)
            b = tl.where(k_ok[:, None], q - CW, 0)
        acc += tl.dot(a.to(tl.int8), b.to(tl.int8), out_dtype=tl.int32)

    acc, asum, last = split_reduce(acc, asum, part_ptr, upart_ptr, count_ptr, pid_m, pid_n, N,
                                   BLOCK_M, BLOCK_N, SPLIT_K, not CENTRED)
    if CENTRED:
        sum_uq = acc
        sum_u = asum
    else:
        bsum = tl.load(bsum_ptr + offs_n, mask=n_ok, other=0)
        # sum_u counts only this program's K share in asum; pa * K is subtracted once, here
        sum_u = asum - pa * K
        sum_uq = acc - pa * bsum[None, :] + CW * sum_u[:, None]
    store_output(y_ptr, usum_ptr, ws_ptr, wz_ptr, bias_ptr, s_a, sum_uq, sum_u, img, pix, offs_m, offs_n,
                 m_ok & last, n_ok, pid_n, N, OH * OW, HAS_BIAS, RELU, RAW, CENTRED)


# autotuning times each config for ~30 ms (do_bench's warmup/rep, in ms): plenty of runs for kernels of
# microseconds, and a few seconds per new shape instead of ~20
TUNE_MS = dict(warmup=5, rep=25)
_igemm_tuned = _igemm_kernel if INTERPRET else triton.autotune(GEMM_CONFIGS, key=TUNE_KEY, **TUNE_MS)(_igemm_kernel)


def launch(kernel, tuned, defaults, blocks, m, n, args, meta):
    """Explicit blocks (or the interpreter's defaults) launch ``kernel``; otherwise ``tuned``."""
    if blocks is None and not INTERPRET:
        grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]),  # noqa: E731
                            cfg["SPLIT_K"])
        tuned[grid](*args, **meta, **launch_options())
        return
    blk = dict(defaults, **(blocks or {}))
    grid = (triton.cdiv(m, blk["BLOCK_M"]), triton.cdiv(n, blk["BLOCK_N"]), blk["SPLIT_K"])
    kernel[grid](*args, **meta, **blk, **launch_options())


_WORKSPACES: dict = {}


def split_workspace(device, m: int, n: int):
    """Zero-filled int32 (partial sums, partial row sums, arrival counters) big enough for any tile
    shape of an M x N output, shared by every split-K launch on ``device``. The kernels leave it zeroed
    again, so launches on one stream can share it (concurrent launches on several streams cannot).
    Outgrown buffers are kept alive: a captured CUDA graph may still point at them."""
    need = (m + 255) * (n + 255)
    held = _WORKSPACES.setdefault(str(device), [])
    if not held or held[-1][0].numel() < need:
        size = max(need, 2 * held[-1][0].numel()) if held else need
        held.append(tuple(torch.zeros(size, dtype=torch.int32, device=device) for _ in range(3)))
    return held[-1]


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


def centred_zero(qweight: torch.Tensor, bits: int, k: int, w_zero: torch.Tensor) -> torch.Tensor | None:
    """int32 z_w per output row if every z_w is an integer and every q - z_w fits int8 (then the kernel
    multiplies by q - z_w directly and needs no activation row sums when pa == 0), else None."""
    from .packing import unpack

    if not torch.equal(w_zero, torch.round(w_zero)):
        return None
    d = unpack(qweight, bits, k).to(torch.int32) - w_zero.to(torch.int32)[:, None]
    if d.numel() and (int(d.min()) < -128 or int(d.max()) > 127):
        return None
    return w_zero.to(torch.int32).contiguous()


def conv2d(a: torch.Tensor, pa: int, qweight: torch.Tensor, bits: int, weight_shape, bsum: torch.Tensor,
           w_scale: torch.Tensor, w_zero: torch.Tensor, s_a: float, bias: torch.Tensor | None,
           stride=(1, 1), padding=(0, 0), dilation=(1, 1), relu: bool = False,
           out_dtype=torch.float32, raw: bool = False, blocks: dict | None = None,
           wzi: torch.Tensor | None = None):
    """Conv2d (groups=1) of int8 activation codes ``a`` [N, C, H, W] with packed weights.

    Returns y [N, C_out, OH, OW] in ``out_dtype``; with ``raw=True`` returns the exact integer
    sums (sum u*q [N, C_out, OH, OW] int32, sum u [N*OH*OW] int32) instead. ``wzi`` (from
    ``centred_zero``) selects the centred-weight variant when ``pa == 0`` (not with ``raw``).
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
    centred = wzi is not None and int(pa) == 0 and not raw
    part, upart, count = split_workspace(a.device, m, c_out)
    args = (a, qweight, y, usum, bsum, wzi if centred else bsum, w_scale, w_zero,
            bias if bias is not None else w_scale, part, upart, count,
            float(s_a), int(pa), m, c_out, k, kb, c_in, h, w, oh, ow, *a.stride(),
            sh, sw, ph, pw, dh, dw)
    meta = dict(KH=kh, KW=kw, SB=storage_bits(bits), HAS_BIAS=bias is not None, RELU=relu, RAW=raw,
                CENTRED=centred)
    launch(_igemm_kernel, _igemm_tuned, INTERPRET_BLOCKS, blocks, m, c_out, args, meta)
    return (y, usum) if raw else y


def linear(a: torch.Tensor, pa: int, qweight, bits, weight_shape, bsum, w_scale, w_zero, s_a, bias,
           relu=False, out_dtype=torch.float32, raw=False, blocks=None, wzi=None):
    """Linear on int8 codes ``a`` [.., K]: the 1x1 conv on an [M, K, 1, 1] view."""
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    out = conv2d(a2[:, :, None, None], pa, qweight, bits, (weight_shape[0], weight_shape[1], 1, 1),
                 bsum, w_scale, w_zero, s_a, bias, relu=relu, out_dtype=out_dtype, raw=raw,
                 blocks=blocks, wzi=wzi)
    if raw:
        return out[0].reshape(*lead, -1), out[1]
    return out.reshape(*lead, -1)
