"""The cached CPU path for packed layers (``backend="cpu"``, and ``"auto"`` on CPU tensors).

The reference (``reference.py``) unpacks the weights on every call, computes sum(u) with a second
convolution and falls back to float64 convolutions where float32 might not be exact. Here what is
constant at inference is built once per layer, device and weight version (outside the state dict,
rebuilt when the packed weights change in place):

    W'[c] = m_w * (q[c] - z_w[c])          (float32; m_w in {1, 2, 4} makes it integer-valued)

so the weight zero point is folded into the weights and one float32 convolution (or matmul) of the
integer-valued activations U' = m_a * (v - z_a) (m_a likewise; a half-integer zero point, as muL2Q's,
gives m_a = 2) gives m_a * m_w * (sum u*q - z_w * sum u) exactly: every partial sum is an integer, and
the layer is only taken here when K * max|U'| * max|W'| < 2^24 (max|U'| from the activation code
range, so no data-dependent check), where float32 integer sums are exact in any order. The epilogue
is the reference's, in float64 on the output:

    y = acc * (s_a * s_w / (m_a * m_w)) + bias

(dividing by a power of two is exact), so outputs are identical to the reference's, bit for bit.

Zero points with no such multiple (muL2Q's, any real number) take the expanded form instead, with
integer codes only inside the convolution:

    sum (v - z_a)(q - z_w) = sum v*q - z_w sum v - z_a C_q + z_a z_w C_1

where sum v*q and sum v come from one float32 convolution of the codes v with [q; 1] (exact, as
above) and C_q = sum q, C_1 = sum 1 over each output's window of real (unpadded) input positions are
constants of the input size, cached per size. The terms are exact integers combined in float64;
the reference convolves the non-integer u = v - z_a in float64, so the two agree to float64
rounding (not bit for bit). A K too large for exact float32 sums returns ``None`` (the reference).

Memory: the cache holds a float32 copy of each packed layer's weights, i.e. as much as the float
model's weights (4 bytes per weight against 1/8 to 1 byte packed). ``backend="reference"`` (or
:func:`clear`) turns it off.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference

MULTIPLIERS = (1, 2, 4)  # the power-of-two multiples tried to make a zero point an integer
EXACT_LIMIT = 2 ** 24  # float32 holds every integer below this


def _multiplier(z: torch.Tensor | float) -> int | None:
    """Smallest m in MULTIPLIERS with m * z integer-valued (exactly), or None."""
    z = torch.as_tensor(z, dtype=torch.float64)
    for m in MULTIPLIERS:
        if torch.equal(z * m, torch.round(z * m)):
            return m
    return None


def _cache(layer) -> dict:
    return layer.__dict__.setdefault("_cpu_cache", {})


def clear(model) -> None:
    """Drop every packed layer's cached weights (they are rebuilt on the next call)."""
    for m in model.modules():
        m.__dict__.pop("_cpu_cache", None)


def _weights(layer, x: torch.Tensor):
    """(W' float32, m_w, max|W'|) for the layer on ``x``'s device, or None; cached per device and
    version of the packed weights and zero points."""
    tag = tuple((t.device, t.data_ptr(), t._version) for t in (layer.qweight, layer.w_zero))
    hit = _cache(layer).get("w")
    if hit is None or hit[0] != tag:
        m_w = _multiplier(layer.w_zero)
        built = None
        if m_w is not None:
            q = layer.codes().to(torch.float32)
            z = layer.w_zero.to(torch.float32)
            w = (q - reference_view(z, q.ndim, layer.ch_axis)) * m_w
            built = (w.contiguous(), m_w, float(w.abs().max()) if w.numel() else 0.0)
        hit = (tag, built)
        _cache(layer)["w"] = hit
    return hit[1]


def reference_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def dequantized_weight(layer) -> torch.Tensor:
    """The float weight of a weight-only packed layer, built once per device and weight version."""
    tag = tuple((t.device, t.data_ptr(), t._version) for t in (layer.qweight, layer.w_scale, layer.w_zero))
    hit = _cache(layer).get("wf")
    if hit is None or hit[0] != tag:
        hit = (tag, reference.dequantize_weight(layer.codes(), layer.w_scale, layer.w_zero, layer.ch_axis))
        _cache(layer)["wf"] = hit
    return hit[1]


def _general_weights(layer):
    """(codes q float32, max q) for the expanded form, cached per device and weight version."""
    tag = (layer.qweight.device, layer.qweight.data_ptr(), layer.qweight._version)
    hit = _cache(layer).get("q")
    if hit is None or hit[0] != tag:
        q = layer.codes().to(torch.float32).contiguous()
        hit = (tag, (q, float(q.max()) if q.numel() else 0.0))
        _cache(layer)["q"] = hit
    return hit[1]


def _act(layer):
    """(v range bound max|v|, s_a, z_a, params) for the current call site."""
    p = layer.act_params()
    mode = layer.act_mode
    if mode == "sign":
        return 1.0, 1.0, 0.0, p
    vmax = max(abs(float(p["qmin"])), abs(float(p["qmax"])))
    return vmax, reference.act_scale(mode, p), reference.act_zero(mode, p), p


def _inputs(layer, x: torch.Tensor, ch_axis: int, k: int):
    """("folded", U', W', epilogue scale) or ("expanded", v, q, s_a, z_a), or None (the reference)."""
    if x.is_cuda or not x.is_floating_point() or x.numel() == 0:
        return None
    vmax, s_a, z_a, p = _act(layer)
    m_a = _multiplier(z_a)
    wt = _weights(layer, x) if m_a is not None else None
    if wt is not None:
        w, m_w, wmax = wt
        umax = max(abs(float(p.get("qmin", -1)) - z_a), abs(float(p.get("qmax", 1)) - z_a))
        if k * umax * m_a * wmax < EXACT_LIMIT:
            v = reference.quantize_act(x, layer.act_mode, p, ch_axis).float()  # the reference's codes
            u = (v - z_a) * m_a if (z_a or m_a != 1) else v  # exact: v and z_a are small (half-)integers
            return "folded", u, w, (s_a * layer.w_scale.double()) / (m_a * m_w)
    q, qmax = _general_weights(layer)
    if k * vmax * qmax >= EXACT_LIMIT:
        return None
    return "expanded", reference.quantize_act(x, layer.act_mode, p, ch_axis).float(), q, s_a, z_a


def _borders(layer, key, build):
    """C_q and C_1 of the expanded form for one input size, cached with the weights' version."""
    tag = (layer.qweight.device, layer.qweight.data_ptr(), layer.qweight._version, key)
    cache = _cache(layer).setdefault("borders", {})
    hit = cache.get(key)
    if hit is None or hit[0] != tag:
        if len(cache) > 16:  # many input sizes: keep the cache bounded
            cache.clear()
        hit = (tag, build())
        cache[key] = hit
    return hit[1]


def _expanded(layer, acc_v, sum_v, c_q, c_1, s_a, z_a, ch_dim, dtype):
    """y = s_a s_w (sum v q - z_w sum v - z_a C_q + z_a z_w C_1) + bias, in float64."""
    shape = [1] * acc_v.ndim
    shape[ch_dim] = -1
    z_w = layer.w_zero.double().reshape(shape)
    acc = acc_v.double().round_() - z_w * sum_v.double().round_()
    if z_a:
        acc = acc - z_a * (c_q.double().round_() - z_w * c_1.double().round_())
    y = acc * (s_a * layer.w_scale.double().reshape(shape))
    if layer.bias is not None:
        y = y + layer.bias.double().reshape(shape)
    return y.to(dtype)


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, bias, ch_dim: int, dtype) -> torch.Tensor:
    shape = [1] * acc.ndim
    shape[ch_dim] = -1
    y = acc.double().round_().mul_(scale.reshape(shape))  # round: a no-op for exact integer sums
    if bias is not None:
        y.add_(bias.double().reshape(shape))
    return y.to(dtype)


def _sums(op, v, q, layer):
    """(op(v, q), op(v, 1)): one call with [q; 1] stacked as an extra output channel when groups = 1."""
    if getattr(layer, "groups", 1) == 1 and layer.ch_axis == 0:
        both = _cached_stack(layer, q)
        out = op(v, both)
        return out[:, :-1], out[:, -1:]
    return op(v, q), op(v, torch.ones_like(q))


def _cached_stack(layer, q):
    hit = _cache(layer).get("stack")
    if hit is None or hit[0] is not q:
        hit = (q, torch.cat([q, q.new_ones((1,) + tuple(q.shape[1:]))]))
        _cache(layer)["stack"] = hit
    return hit[1]


def conv2d(layer, x: torch.Tensor):
    k = math.prod(layer.weight_shape[1:])
    got = _inputs(layer, x, 1, k)
    if got is None:
        return None
    geom = (layer.stride, layer.padding, layer.dilation, layer.groups)
    if got[0] == "folded":
        _, u, w, scale = got
        return _epilogue(F.conv2d(u, w, None, *geom), scale, layer.bias, 1, x.dtype)
    _, v, q, s_a, z_a = got
    acc_v, sum_v = _sums(lambda a, b: F.conv2d(a, b, None, *geom), v, q, layer)
    c_q = c_1 = None
    if z_a:
        ones = v.new_ones((1,) + tuple(v.shape[1:]))
        c_q, c_1 = _borders(layer, tuple(v.shape[1:]), lambda: _sums(
            lambda a, b: F.conv2d(a, b, None, *geom), ones, q, layer))
    return _expanded(layer, acc_v, sum_v, c_q, c_1, s_a, z_a, 1, x.dtype)


def linear(layer, x: torch.Tensor):
    k = layer.weight_shape[1]
    got = _inputs(layer, x, -1, k)
    if got is None:
        return None
    if got[0] == "folded":
        _, u, w, scale = got
        return _epilogue(u @ w.t(), scale, layer.bias, -1, x.dtype)
    _, v, q, s_a, z_a = got
    c_q = c_1 = None
    if z_a:
        c_q, c_1 = q.sum(1), torch.full((1,), float(k), dtype=torch.float64)
    return _expanded(layer, v @ q.t(), v.sum(-1, keepdim=True), c_q, c_1, s_a, z_a, -1, x.dtype)


def conv_transpose2d(layer, x: torch.Tensor):
    c_in, _, kh, kw = layer.weight_shape
    got = _inputs(layer, x, 1, c_in // layer.groups * kh * kw)
    if got is None:
        return None
    geom = (layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    if got[0] == "folded":
        _, u, w, scale = got
        # per-output-channel scales are stored per column of the [C_in, C_out/g] weight
        return _epilogue(F.conv_transpose2d(u, w, None, *geom), scale.repeat(layer.groups), layer.bias, 1,
                         x.dtype)
    return None  # no transposed layer uses a non-integer zero point yet: the reference
