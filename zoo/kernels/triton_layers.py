"""Run packed layers through the Triton kernels. Each function returns ``None`` for a layer or input
the kernels do not cover, and the caller falls back to the reference (no error).

Covered: Conv2d with groups=1 and numeric padding, and Linear, whose activations are quantized
(affine with an integer zero point that fits int8 after centring, or sign); weights of any bit
width (1-8, stored in 1/2/4/8-bit containers); K up to ``MAX_K`` so int32 sums cannot overflow.
Binary layers (1-bit weights, sign activations) run the packed-sign kernel; the rest the int8 one.
Derived weight tensors (column sums, repacked sign words) are cached on the layer per device and
weight version, outside its state dict.
"""
from __future__ import annotations

import math

import torch

from . import auto_policy, triton_binary, triton_lowbit

MAX_K = 32768  # |int32 partial sums| <= 3 * K * 128 * 128 < 2^31


def binary_impl(choice: str, m: int) -> str:
    """``auto``: popcount for few output pixels, tensor-core dot otherwise (untuned default)."""
    if choice == "auto":
        return "popcount" if m < 128 else "dot"
    return choice


def _cached(layer, key: str, build, tensors=None):
    """``build()`` once per device and version of ``tensors`` (default: the packed weights)."""
    tensors = [layer.qweight] if tensors is None else tensors
    tag = tuple((t.device, t.data_ptr(), t._version) for t in tensors)
    cache = layer.__dict__.setdefault("_kernel_cache", {})
    hit = cache.get(key)
    if hit is None or hit[0] != tag:
        hit = (tag, build())
        cache[key] = hit
    return hit[1]


def _int8_act(layer):
    """(centre c, pad code pa, s_a, host-side params) for the int8 kernel, or None if it cannot
    represent the layer. Cached, so a forward pass on a GPU does not sync to read scalars."""
    if layer.act_mode == "sign":
        return 0, 0, 1.0, layer.act_params()
    if layer.act_mode != "affine":  # N2UQ's threshold codes: the reference path
        return None
    keys = ("scale", "offset", "zero", "qmin", "qmax") + (("shift",) if hasattr(layer, "a_shift") else ())
    key = "act" if getattr(layer, "num_sites", 1) == 1 else f"act{layer.site}"  # per call site
    return _cached(layer, key, lambda: _int8_act_params(layer),
                   [getattr(layer, "a_" + k) for k in keys])


def _int8_act_params(layer):
    params = layer.act_params()
    p = {k: float(v) for k, v in params.items() if k != "shift"}
    z = p["zero"]
    c = triton_lowbit.act_centre(p["qmin"], p["qmax"])
    if c is None or z != math.floor(z) or not -128 <= z - c <= 127:
        return None
    if "shift" in params:
        p["shift"] = params["shift"]
    return c, int(z) - c, p["scale"], p


def _weight_sums(layer, k):
    """(column sums for the padding trick, integer z_w for the centred variant or None), cached."""
    bsum = _cached(layer, "bsum", lambda: triton_lowbit.bias_free_colsum(layer.qweight, layer.bits, k))
    wzi = _cached(layer, "wzi", lambda: triton_lowbit.centred_zero(layer.qweight, layer.bits, k, layer.w_zero),
                  [layer.qweight, layer.w_zero])
    return bsum, wzi


def _supported_input(x, ndim=None) -> bool:
    return x.is_floating_point() and (ndim is None or x.ndim == ndim) and x.numel() > 0


def _auto_allows(layer, kind: str, binary: bool, m: int, k: int) -> bool:
    """backend="auto": the measured per-shape rule of ``auto_policy`` (Triton unless it measured slow
    there and the reference faster); "triton" always runs Triton."""
    return layer.backend != "auto" or auto_policy.prefer_triton(
        kind, "binary" if binary else "int8", m, layer.weight_shape[0], k)


def conv2d(layer, x: torch.Tensor, relu: bool = False):
    if not _supported_input(x, 4) or layer.groups != 1 or isinstance(layer.padding, str):
        return None
    k = math.prod(layer.weight_shape[1:])
    if k > MAX_K or x.shape[1] != layer.weight_shape[1]:
        return None
    geom = dict(stride=_pair(layer.stride), padding=_pair(layer.padding), dilation=_pair(layer.dilation))
    n, _, h, w = x.shape
    m = n * _out(h, layer.weight_shape[2], geom, 0) * _out(w, layer.weight_shape[3], geom, 1)
    binary = layer.bits == 1 and layer.act_mode == "sign"
    if not _auto_allows(layer, "conv", binary, m, k):
        return None
    if binary:
        wbits = _cached(layer, "sign_words", lambda: triton_binary.repack_weight(layer.qweight,
                                                                                 layer.weight_shape))
        a = triton_binary.pack_signs(x, layer.act_params().get("shift"))
        return triton_binary.conv2d(a, x.shape[1], wbits, layer.weight_shape, layer.w_scale,
                                    layer.w_zero, 1.0, layer.bias, relu=relu, out_dtype=x.dtype,
                                    impl=binary_impl(getattr(layer, "binary_kernel", "auto"), m), **geom)
    act = _int8_act(layer)
    if act is None:
        return None
    c, pa, s_a, params = act
    bsum, wzi = _weight_sums(layer, k)
    a = triton_lowbit.quantize_act(x, layer.act_mode, params, c)
    return triton_lowbit.conv2d(a, pa, layer.qweight, layer.bits, layer.weight_shape, bsum,
                                layer.w_scale, layer.w_zero, s_a, layer.bias, relu=relu,
                                out_dtype=x.dtype, wzi=wzi, **geom)


def linear(layer, x: torch.Tensor, relu: bool = False):
    k = layer.weight_shape[1]
    if not _supported_input(x) or x.ndim < 1 or x.shape[-1] != k or k > MAX_K:
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    binary = layer.bits == 1 and layer.act_mode == "sign"
    if not _auto_allows(layer, "linear", binary, x2.shape[0], k):
        return None
    if binary:
        wbits = _cached(layer, "sign_words", lambda: triton_binary.repack_weight(
            layer.qweight, (layer.weight_shape[0], k, 1, 1)))
        a = triton_binary.pack_signs(x2, layer.act_params().get("shift"))
        y = triton_binary.linear(a, k, wbits, layer.weight_shape, layer.w_scale, layer.w_zero, 1.0,
                                 layer.bias, relu=relu, out_dtype=x.dtype,
                                 impl=binary_impl(getattr(layer, "binary_kernel", "auto"), x2.shape[0]))
        return y.reshape(*lead, -1)
    act = _int8_act(layer)
    if act is None:
        return None
    c, pa, s_a, params = act
    bsum, wzi = _weight_sums(layer, k)
    a = triton_lowbit.quantize_act(x2, layer.act_mode, params, c)
    y = triton_lowbit.linear(a, pa, layer.qweight, layer.bits, layer.weight_shape, bsum, layer.w_scale,
                             layer.w_zero, s_a, layer.bias, relu=relu, out_dtype=x.dtype, wzi=wzi)
    return y.reshape(*lead, -1)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out(size, kernel, geom, i):
    s, p, d = geom["stride"][i], geom["padding"][i], geom["dilation"][i]
    return (size + 2 * p - d * (kernel - 1) - 1) // s + 1


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Exact int32 ``a @ b`` of int8 [..., M, K] and [..., K, N] with the same leading dims (attention's
    q·kᵀ on its centred codes), or None when K could overflow the int32 sums."""
    from . import triton_bmm

    if a.shape[-1] >= triton_bmm.MAX_K or a.shape[:-2] != b.shape[:-2]:
        return None
    c = triton_bmm.int8_bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return c.reshape(*a.shape[:-2], *c.shape[-2:])
