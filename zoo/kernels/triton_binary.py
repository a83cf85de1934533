"""Triton kernels for binary (W1A1) layers: sign activations x 1-bit weights, 32 signs per int32.

Layout. Activations are packed by ``pack_signs`` into [N, H, W, CW] int32 words (CW = ceil(C/32);
bit j of word w is channel 32w + j, bit 1 = +1; padding channels are 0). Weights are repacked once
per layer by ``repack_weight`` from the checkpoint's (C_in, kh, kw)-ordered bit rows into
[C_out, kh*kw*CW] words in (kh, kw, C_in) order, so one K step of the implicit GEMM is one word of
one input pixel.

Dot product of a window with a filter, over the taps inside the image (the training form pads the
*signed* activation with 0, so taps outside contribute nothing):

    dot = sum_valid (n_bits - 2*popcount(a XOR b))

Two interchangeable inner loops (``impl``): ``"popcount"`` (CUDA cores; ``libdevice.popc`` on GPU,
a pure-``tl`` SWAR popcount under TRITON_INTERPRET=1) and ``"dot"`` (bits expanded to ±1 int8 and
multiplied by ``tl.dot`` on tensor cores). Both also accumulate sum_u = sum_valid a, so the epilogue
is the reference's: sum_uq = (dot + sum_u) / 2, y = (sum_uq - z_w*sum_u) * (s_a*s_w) + bias.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .packing import unpack
from .triton_lowbit import INTERPRET, TUNE_MS, launch, split_reduce, split_workspace, store_output

IMPLS = ("popcount", "dot")
# BLOCK_K counts 32-bit words. Interpreter defaults, and the GPU autotuning space per variant.
INTERPRET_BLOCKS = {"popcount": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=4, SPLIT_K=1),
                    "dot": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=2, SPLIT_K=1)}
# (BLOCK_M, BLOCK_N, BLOCK_K words, SPLIT_K, warps)
_SPACE = {"popcount": [(16, 64, 4, 1, 4), (16, 64, 4, 4, 4), (32, 64, 2, 1, 4), (32, 64, 2, 8, 4),
                       (64, 64, 2, 1, 4), (64, 32, 4, 4, 4), (32, 128, 2, 1, 8), (128, 64, 1, 1, 8)],
          "dot": [(16, 64, 4, 1, 4), (16, 64, 4, 4, 4), (32, 64, 4, 1, 4), (32, 64, 4, 8, 4),
                  (64, 64, 2, 1, 4), (64, 64, 4, 4, 4), (128, 64, 2, 1, 8), (128, 128, 2, 1, 8)]}
CONFIGS = {impl: [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), num_warps=w,
                                num_stages=3) for bm, bn, bk, sk, w in space] for impl, space in _SPACE.items()}
TUNE_KEY = ["M", "N", "KT", "KW", "DOT"]
PACK_BLOCK = 64


@triton.jit
def popcount32(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.popc(x)
    else:
        v = x.to(tl.uint32, bitcast=True)
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        v = v + (v >> 8)
        v = v + (v >> 16)
        return (v & 0x3F).to(tl.int32)


@triton.jit
def _pack_signs_kernel(x_ptr, out_ptr, shift_ptr, P, C, HW, CW, s_n, s_c, s_p,
                       HAS_SHIFT: tl.constexpr, BLOCK_P: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    word = tl.program_id(1)
    j = tl.arange(0, 32)
    ch = word * 32 + j
    ok = (offs_p < P)[:, None] & (ch < C)[None, :]
    img = offs_p // HW
    pix = offs_p % HW
    ptr = x_ptr + (img.to(tl.int64) * s_n + pix * s_p)[:, None] + ch[None, :] * s_c
    x = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x = x - tl.load(shift_ptr + ch, mask=ch < C, other=0.0)[None, :]
    bit = tl.where(ok & (x >= 0), 1, 0).to(tl.uint32)
    packed = tl.sum(bit << j[None, :].to(tl.uint32), axis=1)
    tl.store(out_ptr + offs_p.to(tl.int64) * CW + word, packed.to(tl.int32, bitcast=True),
             mask=offs_p < P)


@triton.jit
def _binary_kernel(a_ptr, w_ptr, y_ptr, usum_ptr, ws_ptr, wz_ptr, bias_ptr, part_ptr, upart_ptr, count_ptr,
                   s_a, M, N, C, H, W, OH, OW, CW, KT, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   KW: tl.constexpr, DOT: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, RELU: tl.constexpr, RAW: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr):
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
    j = tl.arange(0, 32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    usum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    k_len = tl.cdiv(tl.cdiv(KT, SPLIT_K), BLOCK_K) * BLOCK_K  # this program's share of the words
    k_lo = tl.program_id(2) * k_len
    for k0 in range(k_lo, tl.minimum(k_lo + k_len, KT), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KT
        rs = offs_k // CW
        cw = offs_k % CW
        ih = ih0[:, None] + (rs // KW)[None, :] * dil_h
        iw = iw0[:, None] + (rs % KW)[None, :] * dil_w
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & m_ok[:, None] & k_ok[None, :]
        a_off = ((img.to(tl.int64)[:, None] * H + ih) * W + iw) * CW + cw[None, :]
        a = tl.load(a_ptr + a_off, mask=inside, other=0)
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * KT + offs_k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0)
        if DOT:
            chan_ok = (cw[:, None] * 32 + j[None, :]) < C
            a_bits = (a[:, :, None] >> j[None, None, :]) & 1
            a_pm = tl.where(inside[:, :, None] & chan_ok[None, :, :], 2 * a_bits - 1, 0)
            b_bits = (b[:, None, :] >> j[None, :, None]) & 1
            a8 = tl.reshape(a_pm, (BLOCK_M, BLOCK_K * 32)).to(tl.int8)
            b8 = tl.reshape(2 * b_bits - 1, (BLOCK_K * 32, BLOCK_N)).to(tl.int8)
            acc += tl.dot(a8, b8, out_dtype=tl.int32)
            usum += tl.sum(tl.sum(a_pm, axis=2), axis=1)
        else:
            nbits = tl.minimum(C - cw * 32, 32)
            nvalid = tl.where(inside, nbits[None, :], 0)
            pc = popcount32(a[:, :, None] ^ b[None, :, :], USE_LIBDEVICE)
            acc += tl.sum(tl.where(inside[:, :, None], nvalid[:, :, None] - 2 * pc, 0), axis=1)
            usum += tl.sum(2 * popcount32(a, USE_LIBDEVICE) - nvalid, axis=1)

    acc, usum, last = split_reduce(acc, usum, part_ptr, upart_ptr, count_ptr, pid_m, pid_n, N,
                                   BLOCK_M, BLOCK_N, SPLIT_K, True)
    sum_uq = (acc + usum[:, None]) // 2  # exact: dot + sum_u = 2 * sum(u * q)
    store_output(y_ptr, usum_ptr, ws_ptr, wz_ptr, bias_ptr, s_a, sum_uq, usum, img, pix, offs_m, offs_n,
                 m_ok & last, n_ok, pid_n, N, OH * OW, HAS_BIAS, RELU, RAW)


_tuned = {impl: _binary_kernel if INTERPRET else triton.autotune(cfgs, key=TUNE_KEY, **TUNE_MS)(_binary_kernel)
          for impl, cfgs in CONFIGS.items()}


# ------------------------------------------------------------------------------------ host side
def words(c: int) -> int:
    return -(-c // 32)


def _to_int32_words(bits: torch.Tensor) -> torch.Tensor:
    """[..., 32] 0/1 -> [...] int32 with bit j = element j (two's complement for bit 31)."""
    v = (bits.to(torch.int64) << torch.arange(32, device=bits.device)).sum(-1)
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def repack_weight(qweight: torch.Tensor, weight_shape) -> torch.Tensor:
    """Checkpoint 1-bit rows ((C_in, kh, kw) order) -> [C_out, kh*kw*CW] int32, (kh, kw, C_in) order."""
    c_out, c_in, kh, kw = weight_shape
    q = unpack(qweight, 1, c_in * kh * kw).reshape(c_out, c_in, kh, kw).permute(0, 2, 3, 1)
    cw = words(c_in)
    q = torch.nn.functional.pad(q.to(torch.int32), (0, cw * 32 - c_in))
    return _to_int32_words(q.reshape(c_out, kh * kw * cw, 32)).contiguous()


def pack_signs(x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """sign(x - shift[c]) of NCHW (or [M, K]) float x -> [N, H, W, CW] (or [M, 1, 1, CW]) int32."""
    if x.ndim == 2:
        x = x[:, :, None, None]
    n, c, h, w = x.shape
    cw = words(c)
    out = torch.empty((n, h, w, cw), dtype=torch.int32, device=x.device)
    p = n * h * w
    if p == 0 or c == 0:
        return out
    if x.stride(2) != w * x.stride(3):  # (h, w) must flatten into one pixel stride
        x = x.contiguous()
    grid = (triton.cdiv(p, PACK_BLOCK), cw)
    _pack_signs_kernel[grid](x, out, shift if shift is not None else x, p, c, h * w, cw,
                             x.stride(0), x.stride(1), x.stride(3), HAS_SHIFT=shift is not None,
                             BLOCK_P=PACK_BLOCK)
    return out


def conv2d(a_bits: torch.Tensor, c_in: int, wbits: torch.Tensor, weight_shape, w_scale, w_zero,
           s_a: float, bias, stride=(1, 1), padding=(0, 0), dilation=(1, 1), relu=False,
           out_dtype=torch.float32, impl: str = "popcount", raw: bool = False,
           blocks: dict | None = None):
    """Binary conv2d of packed sign activations [N, H, W, CW] with repacked weights [C_out, KT]."""
    if impl not in IMPLS:
        raise ValueError(f"unknown binary kernel {impl!r}; valid: {list(IMPLS)}")
    n_img, h, w, cw = a_bits.shape
    c_out, c_w, kh, kw = weight_shape
    if c_w != c_in or cw != words(c_in):
        raise ValueError(f"activation words {cw} / channels {c_in} do not match weights {tuple(weight_shape)}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    m, kt = n_img * oh * ow, kh * kw * cw
    y = torch.empty((n_img, c_out, oh, ow), dtype=torch.int32 if raw else out_dtype, device=a_bits.device)
    usum = torch.empty(m if raw else 1, dtype=torch.int32, device=a_bits.device)
    if m == 0 or c_out == 0:
        return (y, usum) if raw else y
    part, upart, count = split_workspace(a_bits.device, m, c_out)
    args = (a_bits, wbits, y, usum, w_scale, w_zero, bias if bias is not None else w_scale,
            part, upart, count, float(s_a), m, c_out, c_in, h, w, oh, ow, cw, kt, sh, sw, ph, pw, dh, dw)
    meta = dict(KW=kw, DOT=impl == "dot", USE_LIBDEVICE=not INTERPRET, HAS_BIAS=bias is not None,
                RELU=relu, RAW=raw)
    launch(_binary_kernel, _tuned[impl], INTERPRET_BLOCKS[impl], blocks, m, c_out, args, meta)
    return (y, usum) if raw else y


def linear(a_bits, k: int, wbits, weight_shape, w_scale, w_zero, s_a, bias, relu=False,
           out_dtype=torch.float32, impl="popcount", raw=False, blocks=None):
    """Binary linear on packed signs [M, 1, 1, CW] (from ``pack_signs`` of [M, K])."""
    out = conv2d(a_bits, k, wbits, (weight_shape[0], k, 1, 1), w_scale, w_zero, s_a, bias,
                 relu=relu, out_dtype=out_dtype, impl=impl, raw=raw, blocks=blocks)
    if raw:
        return out[0].reshape(out[0].shape[0], -1), out[1]
    return out.reshape(out.shape[0], -1)
