"""The cached CPU path for packed layers (``backend="cpu"``, and ``"auto"`` on CPU tensors).

The reference (``reference.py``) unpacks the weights on every call, computes sum(u) with a second
convolution and falls back to float64 convolutions where float32 might not be exact. Here what is
constant at inference is built once per layer, device and weight version (outside the state dict,
rebuilt when the packed weights change in place):

    W'[c] = m_w * (q[c] - z_w[c])          (float32; m_w in {1, 2, 4} makes it integer-valued)

so the weight zero point is folded into the weights and one float32 convolution (or matmul) of the
integer-valued activations U' = m_a * (v - z_a) (m_a likewise; a half-integer zero point, as muL2Q's,
gives m_a = 2) gives m_a * m_w * (sum u*q - z_w * sum u) exactly: every partial sum is an integer, and
the sums are computed in float32 when max|U'| * max_c sum_k |W'[c, k]| < 2^24 (max|U'| from the
activation code range, so no data-dependent check; the weight rows' L1 norms bound every partial sum
of one output, far below K * max|U'| * max|W'| for real weights), where float32 integer sums are exact
in any order, and in float64 (exact below 2^53) otherwise. The epilogue is the reference's, in float64
on the output:

    y = acc * (s_a * s_w / (m_a * m_w)) + bias

(dividing by a power of two is exact), so outputs are identical to the reference's, bit for bit.

Zero points with no such multiple (muL2Q's, any real number) take the expanded form instead, with
integer codes only inside the convolution:

    sum (v - z_a)(q - z_w) = sum v*q - z_w sum v - z_a C_q + z_a z_w C_1

where sum v*q and sum v come from one float32 convolution of the codes v with [q; 1] (exact, as
above) and C_q = sum q, C_1 = sum 1 over each output's window of real (unpadded) input positions are
constants of the input size, cached per size. The terms are exact integers combined in float64;
the reference convolves the non-integer u = v - z_a in float64, so the two agree to float64
rounding (not bit for bit); float32 or float64 by the same bound. Sums that could pass 2^53 (none in
practice) return ``None`` (the reference).

Where the CPU has exact int8 sums (``onednn.py``: oneDNN's u8 x s8 convolutions and matmuls, int32
accumulation, self-tested on first use), a float32-exact plan runs them instead of the float32
convolution: the same integer sums, several times faster at the zoo's shapes. Codes go in as uint8 from the C++
input kernel, W' (or [q; 1]) as int8 -- 8-bit asymmetric weight rows, whose W' spans up to 256 values
around a non-zero centre, are shifted by their integer centre d[c] and a row of ones stacked on, whose
sum s gives sum u W' = sum u (W' - d) + d s back exactly in the float64 epilogue (``_int8_spec``). Plans
whose sums need float64 split W' = 16 H + L and sum both halves in int8 (16 sum u H + sum u L in the
epilogue); transposed convs run as one ordinary int8 convolution in sub-pixel form
(``onednn.ConvTranspose``), whose sums the C++ epilogues read in place as the interleaved image.
Results take the layout the reference's would have (``_keeps_channels_last``), so the float layers
after a packed one see the same input, bit for bit. ``ZOO_CPU_INT8=0`` turns the int8 sums off.

Everything data-dependent (the multipliers, the bounds, the packed weights) is decided once per layer,
weight version and activation site (a ``Plan``), so the call itself is tensor operations only and a
model runs under ``torch.compile`` without graph breaks in its packed layers. Inside a compile trace
the plans are used as built, without the version checks (``prepare``, which ``zoo.load`` runs, builds
them beforehand); after changing weights in place, call ``clear(model)`` and compile again.

Memory: the cache holds a float32 copy of each packed layer's weights, i.e. as much as the float
model's weights (4 bytes per weight against 1/8 to 1 byte packed; 8 for the float64 layers), plus
oneDNN's prepacked int8 copy (1 byte per weight) where the int8 sums run. ``backend="reference"`` (or
:func:`clear`) turns it off. ``prepare`` also fixes glibc's malloc thresholds once per process
(``cpu_ops.tune_malloc``; ``ZOO_MALLOC_TUNE=0`` skips it).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..quantizers.base import channel_view
from . import cpu_ops, dispatch, onednn, reference

MULTIPLIERS = (1, 2, 4)  # the power-of-two multiples tried to make a zero point an integer
EXACT_LIMIT = 2 ** 24  # float32 holds every integer below this


def _multiplier(z: torch.Tensor | float) -> int | None:
    """Smallest m in MULTIPLIERS with m * z integer-valued (exactly), or None."""
    z = torch.as_tensor(z, dtype=torch.float64)
    for m in MULTIPLIERS:
        if torch.equal(z * m, torch.round(z * m)):
            return m
    return None


class _Cache(dict):
    """A layer's CPU-path cache (plans, float32 and oneDNN-prepacked weights, border terms). Copying
    or pickling the layer gives an empty one, rebuilt on the next call: oneDNN's prepacked tensors
    cannot be copied or pickled, and everything here is derived from the layer's buffers anyway."""

    def __deepcopy__(self, memo):
        return _Cache()

    def __reduce__(self):
        return _Cache, ()


def _cache(layer) -> dict:
    return layer.__dict__.setdefault("_cpu_cache", _Cache())


def clear(model) -> None:
    """Drop every packed layer's cached weights (they are rebuilt on the next call)."""
    for m in model.modules():
        m.__dict__.pop("_cpu_cache", None)


def compiling() -> bool:
    """Inside a torch.compile trace: the caches are read as they are (their version checks would be
    graph breaks), so they must be built before compiling (``prepare``, which ``zoo.load`` runs)."""
    return torch.compiler.is_compiling()


def _tag(layer) -> tuple:
    """Device, storage and version of every buffer: a plan is rebuilt when any of them changes."""
    return tuple((t.device, t.data_ptr(), t._version) for t in layer._buffers.values() if t is not None)


class Plan:
    """What a packed layer runs on this path, built once per weight/parameter version and site.

    kind: "folded" (W', the epilogue scale), "expanded" (codes q, [q; 1]) or "reference" (none fits
    float64 exactly); binary: a W1A1 conv the C++ kernel (``cpu_ops``) can run, with its packed sign words
    in ``bits`` once built (on the first call with the kernel available and enabled)."""

    def __init__(self, kind, p, s_a=1.0, z_a=0.0, m_a=1, w=None, scale=None, stack=None, binary=False, affine=None,
                 int8=None):
        self.kind, self.p, self.s_a, self.z_a, self.m_a = kind, p, s_a, z_a, m_a
        self.w, self.scale, self.stack, self.binary, self.bits = w, scale, stack, binary, None
        self.affine = affine  # (scale, offset, qmin, qmax) as floats for the C++ input kernel, or None
        # int8 sums (onednn.py): spec = an Int8Spec where they can run (``_int8_spec``), else
        # None; int8 = the prepacked weights once built
        self.spec, self.int8 = int8, None


def _exact_dtype(bound: float):
    """float32 where every partial sum stays below 2^24, float64 below 2^53, else None."""
    return torch.float32 if bound < EXACT_LIMIT else torch.float64 if bound < 2.0 ** 53 else None


def _row_l1(w: torch.Tensor, ch_axis: int) -> float:
    """max over output channels of sum |w| over everything else: no partial sum of one output's terms
    u*w can exceed max|u| times this (a transposed conv's output sums a subset of its column)."""
    if not w.numel():
        return 0.0
    return float(w.abs().transpose(0, ch_axis).reshape(w.shape[ch_axis], -1).sum(1).max())


def _build_plan(layer, k: int, binary_ok: bool) -> Plan:
    vmax, s_a, z_a, p = _act(layer)
    m_a, m_w = _multiplier(z_a), _multiplier(layer.w_zero)
    q = layer.codes()
    # W1A1: the folded scale below has m_a = 1 (sign codes, z_a = 0) and m_w = 2 (W' = 2 (q - 1/2) = +-1)
    binary = binary_ok and layer.act_mode == "sign" and layer.bits == 1 and bool((layer.w_zero == 0.5).all())
    affine = None  # the C++ input kernels' parameters
    if layer.act_mode == "affine":
        affine = tuple(float(p[key].reshape(-1)[0]) for key in ("scale", "offset", "qmin", "qmax"))
    if m_a is not None and m_w is not None:
        w = (q.to(torch.float64) - channel_view(layer.w_zero.double(), q.ndim, layer.ch_axis)) * m_w
        umax = max(abs(float(p.get("qmin", -1)) - z_a), abs(float(p.get("qmax", 1)) - z_a))
        dtype = _exact_dtype(umax * m_a * _row_l1(w, layer.ch_axis))
        if dtype is not None:
            scale = (s_a * layer.w_scale.double()) / (m_a * m_w)
            return Plan("folded", p, s_a, z_a, m_a, w=w.to(dtype).contiguous(), scale=scale, binary=binary,
                        affine=affine, int8=_int8_spec(layer, p, w, dtype, m_a, z_a, umax * m_a))
    dtype = _exact_dtype(vmax * max(_row_l1(q.to(torch.float64), layer.ch_axis), k))  # [q; 1] rows
    if dtype is None:
        return Plan("reference", p)
    qf = q.to(dtype).contiguous()
    stack = spec = None
    if getattr(layer, "groups", 1) == 1:  # [q; 1]: a ones output channel (dim 1 of a transposed conv's weight)
        ones = list(qf.shape)
        ones[layer.ch_axis] = 1
        stack = torch.cat([qf, qf.new_ones(ones)], dim=layer.ch_axis)
        spec = _int8_spec(layer, p, stack, dtype, 1, 0.0, vmax)
        spec = spec if spec is not None and spec.d is None and spec.split is None else None  # [q; 1] itself
    return Plan("expanded", p, s_a, z_a, m_a, w=qf, stack=stack, affine=affine, int8=spec)


class Int8Spec(NamedTuple):
    """How a plan's sums run in int8 (``_int8_spec``): codes x8 = m8 (v - lo) with zero point x_zp; d: per-row
    integer centres the weights were shifted by (a row of ones stacked on), or None; split: W' = split * H + L
    with H and L summed apart (stacked as 2 C output channels), or None."""
    lo: float
    m8: int
    x_zp: int
    d: torch.Tensor | None = None
    split: int | None = None


SPLIT = 16  # W' = 16 H + L, L in [0, 15]: float64-sum layers whose two halves' sums stay below 2^24


def _int8_spec(layer, p, w: torch.Tensor, dtype, m8: int, z8: float, umax: float):
    """An ``Int8Spec`` when the sums with the weights ``w`` (the folded W' or the expanded [q; 1]) can
    run in int8 (``onednn.py``), else None. The uint8 codes are x8 = m8 (v - lo) with lo the lowest
    activation code, and x8 - x_zp = m8 (v - z8): the folded U' (m8 = m_a, z8 = z_a) or the codes v
    (1, 0). Needs float32-exact sums, x8 in [0, 255] for every code v, and w in int8 -- or, for one
    group, w - d[c] in int8 with d[c] the integer centre of row c (8-bit asymmetric weights): then a
    row of ones is stacked as one more output channel, its sum s of the inputs gives
    sum u w = sum u (w - d) + d s back in float64, and every sum the int8 op returns, umax = max|x8 - x_zp|
    times its row's L1 norm (K for the ones), must stay below 2^24 too (float32 outputs). Sums that need
    float64 (dtype) split the weights instead: W' = 16 H + L with L = W' mod 16, whose sums with u each
    stay below 2^24 where umax times the rows' L1 norms of H and of L do (one group, H in int8); the
    float64 epilogue takes 16 sum u H + sum u L, the exact sum."""
    if dtype not in (torch.float32, torch.float64) or layer.act_mode not in ("affine", "threshold") or not w.numel():
        return None
    if isinstance(getattr(layer, "padding", 0), str):
        return None
    transposed = getattr(layer, "output_padding", None) is not None  # run as one sub-pixel conv (``_subpixel``)
    if transposed and (layer.groups != 1 or torch.nn.modules.utils._pair(layer.dilation) != (1, 1)):
        return None
    lo, hi = (0.0, float(p["thresholds"].numel())) if layer.act_mode == "threshold" else \
        (float(p["qmin"]), float(p["qmax"]))
    if lo != int(lo) or m8 * (hi - lo) > 255:
        return None
    x_zp = round(m8 * (z8 - lo))  # an integer: m_a z_a is one
    if dtype == torch.float64:
        if transposed or getattr(layer, "groups", 1) != 1:
            return None
        high = torch.floor(w.double() / SPLIT)
        low = w.double() - SPLIT * high
        if not onednn.int8_range(high) or umax * max(_row_l1(high, 0), _row_l1(low, 0)) >= EXACT_LIMIT:
            return None
        return Int8Spec(lo, m8, x_zp, None, SPLIT)
    if onednn.int8_range(w):
        return Int8Spec(lo, m8, x_zp)
    if transposed:  # no shifted rows for the transposed convs' columns
        return None
    rows = w.double().reshape(len(w), -1)
    d = torch.ceil((rows.amax(1) + rows.amin(1)) / 2)  # a row of 256 values: [-128, 127]
    shifted = rows - d[:, None]
    if getattr(layer, "groups", 1) != 1 or not onednn.int8_range(shifted):
        return None
    if umax * max(_row_l1(shifted, 0), rows.shape[1]) >= EXACT_LIMIT:
        return None
    return Int8Spec(lo, m8, x_zp, d)


def plan(layer, k: int, binary_ok: bool = False) -> Plan:
    """The layer's plan for its current activation site, rebuilt when a buffer changed (not while
    compiling: then the plan built before is used as it is)."""
    plans = _cache(layer).setdefault("plans", {})
    hit = plans.get(layer.site)
    if hit is not None and (compiling() or hit[0] == _tag(layer)):
        return hit[1]
    built = _build_plan(layer, k, binary_ok)
    plans[layer.site] = (_tag(layer), built)
    return built


def dequantized_weight(layer) -> torch.Tensor:
    """The float weight of a weight-only packed layer, built once per device and weight version."""
    hit = _cache(layer).get("wf")
    if hit is not None and compiling():
        return hit[1]
    tag = tuple((t.device, t.data_ptr(), t._version) for t in (layer.qweight, layer.w_scale, layer.w_zero))
    if hit is None or hit[0] != tag:
        hit = (tag, reference.dequantize_weight(layer.codes(), layer.w_scale, layer.w_zero, layer.ch_axis))
        _cache(layer)["wf"] = hit
    return hit[1]


def _act(layer):
    """(v range bound max|v|, s_a, z_a, params) for the current call site."""
    p = layer.act_params()
    mode = layer.act_mode
    if mode == "sign":
        return 1.0, 1.0, 0.0, p
    vmax = max(abs(float(p["qmin"])), abs(float(p["qmax"])))
    return vmax, reference.act_scale(mode, p), reference.act_zero(mode, p), p


def _usable(x: torch.Tensor) -> bool:
    return not x.is_cuda and x.is_floating_point() and x.numel() > 0


def _codes(layer, pl: Plan, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """The reference's activation codes v for this plan's site, in the plan's dtype."""
    return reference.quantize_act(x, layer.act_mode, pl.p, ch_axis).to(pl.w.dtype)


def _fast(x: torch.Tensor, dtypes=(torch.float32,)) -> bool:
    """Eager work on ``dtypes`` with the C++ elementwise kernels (``cpu_ops``) built and enabled."""
    return x.dtype in dtypes and cpu_ops.ready()


def _int8(layer, pl: Plan, linear: bool):
    """The plan's prepacked int8 weights (built on the first eager call), or None where the float32
    sums run: compiling, oneDNN's int8 path off or not exact here, or the plan not eligible."""
    if pl.spec is None or compiling() or not onednn.available():
        return None
    if pl.int8 is None:
        x_zp, d, split = pl.spec.x_zp, pl.spec.d, pl.spec.split
        w = (pl.w if pl.kind == "folded" else pl.stack).double()
        if d is not None:  # shifted rows and a row of ones
            w = torch.cat([w - channel_view(d, w.ndim, 0), w.new_ones((1,) + tuple(w.shape[1:]))])
        if split is not None:  # [H; L]
            high = torch.floor(w / split)
            w = torch.cat([high, w - split * high])
        w8 = w.to(torch.int8)
        if linear:
            pl.int8 = onednn.Linear(w8, x_zp)
        elif layer.ch_axis == 1:  # a transposed conv, as one sub-pixel convolution
            pl.int8 = onednn.ConvTranspose(w8, x_zp, layer.stride, layer.padding, layer.output_padding)
        else:
            pl.int8 = onednn.Conv(w8, x_zp, layer.stride, layer.padding, layer.dilation, layer.groups)
    return pl.int8


def _int8_epilogue(pl: Plan, acc: torch.Tensor, bias, ch_dim: int, dtype, nchw: bool = False) -> torch.Tensor:
    """The epilogue of the int8 sums: with shifted weights, sum u W' = a[c] + d[c] s first (float64); with
    split ones, split * a[c] + a[C + c]."""
    d, split = pl.spec.d, pl.spec.split
    if split is not None:
        if dtype == torch.float32 and acc.dim() >= 2 and _fast(acc):
            return cpu_ops.epilogue_split(acc, split, pl.scale, bias, nchw)
        c = acc.shape[ch_dim] // 2
        acc = acc.narrow(ch_dim, 0, c).double() * split + acc.narrow(ch_dim, c, c).double()
        return _epilogue(acc, pl.scale, bias, ch_dim, dtype, nchw)
    if d is None:
        return _epilogue(acc, pl.scale, bias, ch_dim, dtype, nchw)
    if dtype == torch.float32 and acc.dim() >= 2 and _fast(acc):
        return cpu_ops.epilogue_sum(acc, d, pl.scale, bias, nchw)
    c = len(d)
    a, s = acc.narrow(ch_dim, 0, c).double(), acc.narrow(ch_dim, c, 1).double()
    return _epilogue(a + channel_view(d, acc.ndim, ch_dim % acc.ndim) * s, pl.scale, bias, ch_dim, dtype, nchw)


def _int8_input(layer, pl: Plan, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """m8 (v - lo) as uint8: the codes of the int8 sums."""
    lo, m8 = pl.spec.lo, pl.spec.m8
    if x.dtype == torch.float32 and x.dim() >= 2 and _fast(x):
        cl = ch_axis == 1 and x.dim() == 4  # convolutions take channels-last codes (no reorder in oneDNN)
        if pl.affine is not None:
            s, o, qmin, qmax = pl.affine
            return cpu_ops.affine_input(x, pl.p.get("shift"), s, o, qmin, qmax, lo, m8, ch_axis == -1, True, cl)
        return cpu_ops.threshold_input(x, pl.p.get("shift"), pl.p["thresholds"], lo, m8, ch_axis == -1, True, cl)
    v = reference.quantize_act(x, layer.act_mode, pl.p, ch_axis)
    return ((v - lo) * m8).to(torch.uint8)


def _folded_input(layer, pl: Plan, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    if pl.w.dtype == torch.float32 and layer.act_mode in ("affine", "threshold") and x.dim() >= 2 and _fast(x):
        if pl.affine is not None:
            s, o, lo, hi = pl.affine
            return cpu_ops.affine_input(x, pl.p.get("shift"), s, o, lo, hi, pl.z_a, pl.m_a, ch_axis == -1)
        return cpu_ops.threshold_input(x, pl.p.get("shift"), pl.p["thresholds"], pl.z_a, pl.m_a, ch_axis == -1)
    v = _codes(layer, pl, x, ch_axis)
    return (v - pl.z_a) * pl.m_a if (pl.z_a or pl.m_a != 1) else v  # exact: small (half-)integers


def _borders(layer, key, sums):
    """C_q and C_1 of the expanded form for one input size (``sums()``: the two convolutions of a ones
    input), cached with the weights' version (while compiling: the cached ones if any, else computed in
    the graph). C_q is kept channels-last, the layout the C++ epilogue reads."""
    def build():
        c_q, c_1 = sums()
        return c_q.contiguous(memory_format=torch.channels_last), c_1.contiguous()

    cache = _cache(layer).setdefault("borders", {})
    hit = cache.get(key)
    if compiling():
        return hit[1] if hit is not None else build()
    tag = (layer.qweight.device, layer.qweight.data_ptr(), layer.qweight._version, key)
    if hit is None or hit[0] != tag:
        if len(cache) > 16:  # many input sizes: keep the cache bounded
            cache.clear()
        hit = (tag, build())
        cache[key] = hit
    return hit[1]


def _expanded(layer, acc_v, sum_v, c_q, c_1, s_a, z_a, ch_dim, dtype, groups=1):
    """y = s_a s_w (sum v q - z_w sum v - z_a C_q + z_a z_w C_1) + bias, in float64 (``groups``: the
    transposed conv's per-column scales and zero points, repeated per group)."""
    shape = [1] * acc_v.ndim
    shape[ch_dim] = -1
    z_w = layer.w_zero.double().repeat(groups).reshape(shape)
    acc = acc_v.double().round_() - z_w * sum_v.double().round_()
    if z_a:
        acc = acc - z_a * (c_q.contiguous().double().round_() - z_w * c_1.double().round_())
    y = acc * (s_a * layer.w_scale.double().repeat(groups).reshape(shape))
    if layer.bias is not None:
        y = y + layer.bias.double().reshape(shape)
    return y.to(dtype)


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, bias, ch_dim: int, dtype, nchw: bool = False) -> torch.Tensor:
    """``nchw``: a contiguous result from a channels-last acc (the int8 convolutions' sums of NCHW inputs)."""
    if dtype == torch.float32 and acc.dim() >= 2 and _fast(acc, (torch.float32, torch.float64)):
        return cpu_ops.epilogue(acc, scale, bias, ch_dim == -1, nchw)
    shape = [1] * acc.ndim
    shape[ch_dim] = -1
    y = acc.double().round_().mul_(scale.reshape(shape))  # round: a no-op for exact integer sums
    if bias is not None:
        y.add_(bias.double().reshape(shape))
    return y.to(dtype).contiguous() if nchw else y.to(dtype)


def _keeps_channels_last(layer, x: torch.Tensor) -> bool:
    """Whether the reference's conv result for ``x`` is channels-last: x is 4-d, stored channels-last (and
    not also contiguous), and its codes keep that layout (torch's elementwise operations do, N2UQ's
    bucketize of x.contiguous() does not). The cached path's results take the same layout, so float
    layers after a packed one compute exactly what they compute after the reference (a float conv
    can round differently in another layout)."""
    return (x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            and layer.act_mode != "threshold")


def _sums(op, v, pl: Plan):
    """(op(v, q), op(v, 1)): one call with [q; 1] stacked as an extra output channel when groups = 1."""
    if pl.stack is not None:
        out = op(v, pl.stack)
        return out[:, :-1], out[:, -1:]
    return op(v, pl.w), op(v, torch.ones_like(pl.w))


def _binary_ready(layer, pl: Plan) -> bool:
    """Whether the C++ kernel runs this W1A1 plan now (packing its weights on first use)."""
    if compiling():
        return pl.bits is not None  # as prepared before compiling
    if isinstance(layer.padding, str) or not cpu_ops.enabled() or not cpu_ops.available():
        return False
    if pl.bits is None:
        pl.bits = cpu_ops.pack_weight_signs(layer.codes().to(torch.uint8))
    return True


def conv2d(layer, x: torch.Tensor):
    if not _usable(x):
        return None
    pl = plan(layer, math.prod(layer.weight_shape[1:]), binary_ok=layer.groups == 1)
    geom = (layer.stride, layer.padding, layer.dilation, layer.groups)
    keep_cl = _keeps_channels_last(layer, x)
    if pl.binary and x.dtype == torch.float32 and x.dim() == 4 and _binary_ready(layer, pl):
        pair = torch.nn.modules.utils._pair
        xbits = cpu_ops.pack_signs(x, pl.p.get("shift"))
        y = cpu_ops.binary_conv2d(xbits, pl.bits, x.shape[1], pair(layer.stride), pair(layer.padding),
                                  pair(layer.dilation), pl.scale, layer.bias)
        return y.contiguous(memory_format=torch.channels_last) if keep_cl else y
    if pl.kind == "folded":
        int8 = _int8(layer, pl, linear=False) if x.dim() == 4 else None
        if int8:
            return _int8_epilogue(pl, int8(_int8_input(layer, pl, x, 1)), layer.bias, 1, x.dtype, not keep_cl)
        return _epilogue(F.conv2d(_folded_input(layer, pl, x, 1), pl.w, None, *geom), pl.scale, layer.bias, 1,
                         x.dtype, not keep_cl)
    if pl.kind == "reference":
        return None
    int8 = _int8(layer, pl, linear=False) if x.dim() == 4 else None
    acc = int8(_int8_input(layer, pl, x, 1)) if int8 else None  # [sum v q; sum v] from one int8 convolution
    c_q = c_1 = None
    if pl.z_a:
        ones = x.new_ones((1,) + tuple(x.shape[1:]), dtype=pl.w.dtype)
        op = lambda a, b: F.conv2d(a, b, None, *geom)  # noqa: E731
        c_q, c_1 = _borders(layer, tuple(x.shape[1:]), lambda: _sums(op, ones, pl))
    if acc is not None and x.dtype == torch.float32 and _fast(acc):
        return cpu_ops.expanded_epilogue(acc, c_q, c_1, layer.w_zero, pl.z_a, pl.s_a * layer.w_scale.double(),
                                         layer.bias, not keep_cl)
    if acc is not None:
        acc = acc if keep_cl else acc.contiguous()  # the reference's layout (``_keeps_channels_last``)
        acc_v, sum_v = acc[:, :-1], acc[:, -1:]
    else:
        acc_v, sum_v = _sums(lambda a, b: F.conv2d(a, b, None, *geom), _codes(layer, pl, x, 1), pl)
    return _expanded(layer, acc_v, sum_v, c_q, c_1, pl.s_a, pl.z_a, 1, x.dtype)


def linear(layer, x: torch.Tensor):
    if not _usable(x):
        return None
    k = layer.weight_shape[1]
    pl = plan(layer, k)
    if pl.kind == "folded":
        int8 = _int8(layer, pl, linear=True)
        if int8:
            return _int8_epilogue(pl, int8(_int8_input(layer, pl, x, -1)), layer.bias, -1, x.dtype)
        return _epilogue(_folded_input(layer, pl, x, -1) @ pl.w.t(), pl.scale, layer.bias, -1, x.dtype)
    if pl.kind == "reference":
        return None
    int8 = _int8(layer, pl, linear=True)
    if int8:  # [sum v q, sum v] from one int8 matmul
        acc = int8(_int8_input(layer, pl, x, -1))
        acc_v, sum_v = acc[..., :-1], acc[..., -1:]
    else:
        v = _codes(layer, pl, x, -1)
        acc_v, sum_v = v @ pl.w.t(), v.sum(-1, keepdim=True)
    c_q = c_1 = None
    if pl.z_a:
        c_q, c_1 = pl.w.sum(1), torch.full((1,), float(k), dtype=torch.float64)
    return _expanded(layer, acc_v, sum_v, c_q, c_1, pl.s_a, pl.z_a, -1, x.dtype)


def conv_transpose2d(layer, x: torch.Tensor):
    if not _usable(x):
        return None
    c_in, _, kh, kw = layer.weight_shape
    pl = plan(layer, c_in // layer.groups * kh * kw)
    if pl.kind == "reference":
        return None
    geom = (layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    nchw = not _keeps_channels_last(layer, x)
    int8 = _int8(layer, pl, linear=False) if x.dim() == 4 else None
    acc = sub = None
    if int8 and x.dtype == torch.float32 and _fast(x):  # the C++ epilogues read the sub-pixel sums in place
        acc, sub = int8.sums(_int8_input(layer, pl, x, 1)), int8.subpixel(*x.shape[2:])
    elif int8:
        acc = int8(_int8_input(layer, pl, x, 1))  # the transposed conv's sums, channels-last
    if pl.kind == "folded":
        # per-output-channel scales are stored per column of the [C_in, C_out/g] weight
        if sub is not None:
            return cpu_ops.epilogue(acc, pl.scale, layer.bias, False, nchw, sub)
        if acc is None:
            acc = F.conv_transpose2d(_folded_input(layer, pl, x, 1), pl.w, None, *geom)
        return _epilogue(acc, pl.scale.repeat(layer.groups), layer.bias, 1, x.dtype, nchw)
    op = lambda a, b: F.conv_transpose2d(a, b, None, *geom)  # noqa: E731
    c_q = c_1 = None
    if pl.z_a:
        ones = x.new_ones((1,) + tuple(x.shape[1:]), dtype=pl.w.dtype)
        c_q, c_1 = _borders(layer, tuple(x.shape[1:]), lambda: _sums(op, ones, pl))
    if acc is None and pl.stack is not None and x.dtype == torch.float32 and x.dim() == 4 and _fast(x):
        acc = op(_codes(layer, pl, x, 1), pl.stack)  # [sum v q; sum v]
        nchw = acc.is_contiguous()  # in the layout the reference's sums have
    if acc is not None and x.dtype == torch.float32 and _fast(acc):
        return cpu_ops.expanded_epilogue(acc, c_q, c_1, layer.w_zero, pl.z_a, pl.s_a * layer.w_scale.double(),
                                         layer.bias, nchw, sub)
    if acc is not None:
        acc = acc.contiguous() if nchw else acc
        acc_v, sum_v = acc[:, :-1], acc[:, -1:]
    else:
        acc_v, sum_v = _sums(op, _codes(layer, pl, x, 1), pl)
    return _expanded(layer, acc_v, sum_v, c_q, c_1, pl.s_a, pl.z_a, 1, x.dtype, layer.groups)


def prepare(model) -> None:
    """Build the plan of every packed layer on the CPU (every activation site) and the grids of every
    quantized attention matmul now, so a first call -- or a torch.compile trace, which cannot build them
    without graph breaks -- finds them ready. Also tunes glibc's malloc for the path's temporaries
    (``cpu_ops.tune_malloc``) when any layer runs it."""
    from ..quantizers.attention import QuantMatMul
    from ..quantizers.packed import PackedConv2d, PackedConvTranspose2d, PackedLayer, PackedLinear

    for m in model.modules():
        if isinstance(m, QuantMatMul) and not m.training:  # the attention matmuls' grids, as numbers
            m.grids()
        if not isinstance(m, PackedLayer) or m.qweight.is_cuda or not dispatch.cpu_cached(m.backend, m.qweight):
            continue
        cpu_ops.tune_malloc()
        if m.act_mode == "none":
            dequantized_weight(m)
            continue
        site = m.site
        for s in range(m.num_sites):
            m.site = s
            if isinstance(m, PackedConv2d):
                pl = plan(m, math.prod(m.weight_shape[1:]), binary_ok=m.groups == 1)
                if pl.binary:
                    _binary_ready(m, pl)
                else:
                    _int8(m, pl, linear=False)
            elif isinstance(m, PackedLinear):
                _int8(m, plan(m, m.weight_shape[1]), linear=True)
            elif isinstance(m, PackedConvTranspose2d):
                c_in, _, kh, kw = m.weight_shape
                _int8(m, plan(m, c_in // m.groups * kh * kw), linear=False)
        m.site = site
