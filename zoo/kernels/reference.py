"""Pure-torch reference (ground truth) for quantized layers computed from integer codes.

Weights: w_hat[c] = s_w[c] * (q - z_w[c]), q unsigned codes. Activations: a_hat = s_a * (v - z_a),
v integer codes. The training form zero-pads a_hat, i.e. pads u = v - z_a with 0. Then

    y[c] = s_a * s_w[c] * (sum u * q  -  z_w[c] * sum u) + bias[c]

Both sums are integer accumulations when z_a is an integer. They are computed in float32 when
every partial sum provably stays below 2^24 (K * max|u| * max q), else in float64 (exact below
2^53), so either way they are the bit-exact target for the integer kernels.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..quantizers.base import affine_codes, sign_codes


def quantize_act(x: torch.Tensor, mode: str, p: dict, ch_axis: int = 1) -> torch.Tensor:
    """Integer activation codes v (float dtype) from float x, as the training form computes them."""
    shift = p.get("shift")
    if shift is not None:  # per-channel (ReAct's RSign threshold, QuantSR's RLQ shift)
        shape = [1] * x.ndim
        shape[ch_axis] = -1
        x = x - shift.reshape(shape)
    if mode == "sign":
        return sign_codes(x)
    if mode == "threshold":  # N2UQ: the code is the number of thresholds below x
        return torch.bucketize(x.contiguous(), p["thresholds"].to(x.dtype)).to(x.dtype)
    return affine_codes(x, p["scale"], p["offset"], p["qmin"], p["qmax"])


def act_zero(mode: str, p: dict) -> float:
    return 0.0 if mode == "sign" else float(p["zero"])


def act_scale(mode: str, p: dict) -> float:
    return 1.0 if mode == "sign" else float(p["scale"])


def _epilogue(acc_q, acc_1, s_a, w_scale, w_zero, bias, ch_dim):
    shape = [1] * acc_q.ndim
    shape[ch_dim] = -1
    y = (acc_q - w_zero.double().reshape(shape) * acc_1) * (s_a * w_scale.double().reshape(shape))
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y


def integer_valued(u: torch.Tensor) -> bool:
    return u.numel() > 0 and torch.equal(u, torch.round(u))


def exact_dtype(u: torch.Tensor, q: torch.Tensor, integral: bool | None = None) -> torch.dtype:
    """float32 if integer-valued u times q summed over a row of q can never reach 2^24, else float64.
    Always float64 on CUDA: with cudnn.benchmark on, cuDNN may pick FFT or Winograd convolutions,
    whose float32 rounding errors can exceed 0.5 (float64's stay far below it; see ``_int_conv2d``)."""
    u = u.detach()
    if u.is_cuda or not (integer_valued(u) if integral is None else integral):
        return torch.float64
    k = q[0].numel()
    bound = k * float(u.abs().max()) * float(q.max() if q.numel() else 0)
    return torch.float32 if bound < 2 ** 24 else torch.float64


def exact_conv_context(t: torch.Tensor):
    """cuDNN may run float32 convolutions in TF32 (10-bit mantissa), which would break exactness."""
    if not t.is_cuda:
        return contextlib.nullcontext()
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic,
                   allow_tf32=False)


def int_conv2d(u, q, stride, padding, dilation, groups):
    """(sum u*q, sum u) over each output window, exact; q is [C_out, C_in/g, kh, kw]."""
    with exact_conv_context(u):
        return _int_conv2d(u, q, stride, padding, dilation, groups)


def _int_conv2d(u, q, stride, padding, dilation, groups):
    integral = integer_valued(u.detach())  # one check (a device sync on CUDA) for both uses
    dt = exact_dtype(u, q, integral)
    u = u.to(dt)
    acc_q = F.conv2d(u, q.to(dt), None, stride, padding, dilation, groups)
    if groups == 1:
        ones = q.new_ones((1,) + tuple(q.shape[1:]), dtype=dt)
        acc_1 = F.conv2d(u, ones, None, stride, padding, dilation, 1)
    else:
        acc_1 = F.conv2d(u, torch.ones_like(q, dtype=dt), None, stride, padding, dilation, groups)
    acc_q, acc_1 = acc_q.double(), acc_1.double()
    if integral:  # the true sums are integers: undo any algorithm's rounding error (a no-op when exact)
        acc_q, acc_1 = acc_q.round(), acc_1.round()
    return acc_q, acc_1


def conv2d(v, s_a, z_a, q, w_scale, w_zero, bias, stride=1, padding=0, dilation=1, groups=1):
    acc_q, acc_1 = int_conv2d(v - z_a if z_a == int(z_a) else v.double() - z_a, q, stride, padding,
                              dilation, groups)
    return _epilogue(acc_q, acc_1, s_a, w_scale, w_zero, bias, 1)


def conv_transpose2d(v, s_a, z_a, q, w_scale, w_zero, bias, stride, padding, output_padding, groups,
                     dilation):
    u = v.double() - z_a
    acc_q = F.conv_transpose2d(u, q.double(), None, stride, padding, output_padding, groups, dilation)
    acc_1 = F.conv_transpose2d(u, torch.ones_like(q, dtype=torch.float64), None, stride, padding,
                               output_padding, groups, dilation)
    # per-output-channel scales are stored per column of the [C_in, C_out/g] weight
    return _epilogue(acc_q, acc_1, s_a, w_scale.repeat(groups), w_zero.repeat(groups), bias, 1)


def linear(v, s_a, z_a, q, w_scale, w_zero, bias):
    u = v.double() - z_a
    acc_q = u @ q.double().t()
    acc_1 = u.sum(dim=-1, keepdim=True)
    return _epilogue(acc_q, acc_1, s_a, w_scale, w_zero, bias, -1)


def dequantize_weight(q, w_scale, w_zero, ch_axis=0):
    shape = [1] * q.ndim
    shape[ch_axis] = -1
    return (q.float() - w_zero.reshape(shape)) * w_scale.reshape(shape)
