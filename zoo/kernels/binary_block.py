"""A binary residual block at inference in two C++ passes (``csrc/binary_conv.cpp: binary_conv2d_table``).

A W1A1 block (IR-Net's, XNOR-Net's, ReActNet's ResNet-20: ``BasicBlock`` with 1-bit convolutions)
computes, per convolution, ``act(bn(conv(x)) + residual)``: on the cached CPU path that was five passes
over the output (the popcount convolution's float64 epilogue, BatchNorm, the add, the activation, and
the next convolution's sign packing). Here each convolution is one pass: its integer window sums s lie
in [-K, K] (K = C_in * kh * kw), so everything between the convolution and the residual add -- the
reference's epilogue float32(float64(s) * scale + bias), then the eval BatchNorm -- is a function of
(channel, s) alone, tabulated once per weight and statistics version by running *torch's own*
operations on the 2K + 1 possible convolution outputs (nothing of BatchNorm's arithmetic is
reproduced; where one fused multiply-add per value reproduces every entry, checked entry by entry, the
kernel computes it instead of looking it up). The kernel then does the float32 residual add, the
activation (hardtanh's clamp or RPReLU, with their float32 operations), and packs the signs the next
binary convolution reads. Outputs are identical to the module-by-module forward
(tests/test_binary_block.py).

Taken only where all of it holds, else the block's own forward runs: eager float32 NCHW-contiguous CPU
inference (no gradients needed), the C++ kernels built and enabled, both convolutions packed W1A1 on a
cached-path backend with one activation site, BatchNorm2d in eval with running statistics, hardtanh
(bounds other than 0), RPReLU or no activations, and no hooks on the parts.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import cached, cpu_ops, dispatch

_pair = nn.modules.utils._pair


def _act(act) -> tuple | None:
    """(lo, hi, rprelu) of the activation -- a clamp, or ReActNet's RPReLU as its 3 x C (gamma, slope, zeta)
    -- or None where the kernel does not reproduce it. Hardtanh bounds of 0 are left out: clamping -0.0
    at 0 may keep either zero's sign."""
    from ..quantizers.binary import RPReLU

    if type(act) is nn.Identity:
        return -math.inf, math.inf, None
    if type(act) is nn.Hardtanh and act.min_val != 0 and act.max_val != 0 and act.min_val <= act.max_val:
        return float(act.min_val), float(act.max_val), None
    if type(act) is RPReLU:
        return -math.inf, math.inf, torch.stack([act.gamma, act.slope, act.zeta]).detach().float()
    return None


def _hooked(*mods) -> bool:
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in mods if isinstance(m, nn.Module))  # (a block's shortcut may be a method)


def _binary_plan(conv, x: torch.Tensor):
    """The conv's cached-path plan with packed sign words, or None where the kernel does not run it."""
    from ..quantizers.packed import PackedConv2d

    if (type(conv) is not PackedConv2d or conv.num_sites != 1 or conv.act_mode != "sign" or conv.groups != 1
            or isinstance(conv.padding, str) or not dispatch.cpu_cached(conv.backend, x)):
        return None
    pl = cached.plan(conv, math.prod(conv.weight_shape[1:]), binary_ok=True)
    return pl if pl.binary and cached._binary_ready(conv, pl) else None


def _bn_ok(bn) -> bool:
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
            and bn.running_var is not None)


def table(conv, pl, bn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(table, linear): table is C_out x (2K + 1) float32, bn(float32(float64(s) * scale + bias)) for
    s = -K .. K by torch's own operations (the reference's epilogue, then the BatchNorm module); linear
    is 4 x C_out float64 (scale, bias, alpha, beta) where fma(float32(float64(s) * scale + bias), alpha,
    beta) in float32 gives every entry of the table bit for bit (``cpu_ops.linear_matches`` checks all of
    them: the kernel then computes instead of looking up), else None. Cached per plan and statistics."""
    tensors = [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
    tag = (pl, bn.eps, tuple((t.data_ptr(), t._version) for t in tensors))
    hit = cached._cache(conv).get("bn_table")
    if hit is not None and hit[0][0] is pl and hit[0][1:] == tag[1:]:
        return hit[1]
    k = math.prod(conv.weight_shape[1:])
    s = torch.arange(-k, k + 1, dtype=torch.float64)
    scale = pl.scale.reshape(-1, 1).double()
    y = s * scale
    bias = torch.full_like(scale, -0.0)  # x + -0.0 == x for every x, -0.0 included
    if conv.bias is not None:
        bias = conv.bias.detach().reshape(-1, 1).double()
        y = y + bias
    with torch.no_grad():  # one row per channel, in the NCHW layout the block's BatchNorm sees
        vals = y.float()
        t = bn(vals[None, :, None, :])[0, :, 0, :].contiguous()
        # BatchNorm at inference is x * alpha + beta (torch: one fused multiply-add), alpha from its
        # statistics (two ways torch may round it), beta its value at 0
        rstd = (torch.rsqrt(bn.running_var + bn.eps), 1 / torch.sqrt(bn.running_var + bn.eps))
        beta = bn(torch.zeros(1, t.shape[0], 1, 1))[0, :, 0, 0].double()
        linear = None
        for r in rstd:
            alpha = (bn.weight * r if bn.weight is not None else r).double()
            cand = torch.stack([scale[:, 0], bias[:, 0], alpha, beta]).contiguous()
            if bool(cpu_ops.linear_matches(t, cand).all()):
                linear = cand
                break
    built = (t, linear)
    cached._cache(conv)["bn_table"] = (tag, built)
    return built


def _conv(conv, pl, bn, bits, c_in, residual, act, next_plan=None):
    """(act(bn(conv) + residual), the signs the next binary conv (``next_plan``'s) reads, packed)."""
    shift = next_plan.p.get("shift") if next_plan is not None else None
    t, linear = table(conv, pl, bn)
    return cpu_ops.binary_conv2d_table(bits, pl.bits, c_in, _pair(conv.stride), _pair(conv.padding),
                                       _pair(conv.dilation), t, residual, act[0], act[1],
                                       next_plan is not None, shift, linear, act[2])


def _plans(block, x: torch.Tensor):
    """(plan of conv1, plan of conv2, act1 and act2 as the kernel takes them) where the fused kernel runs the block
    (a ``models.resnet.BasicBlock``) on x, else None (then the block's own forward)."""
    if (x.dtype != torch.float32 or x.dim() != 4 or x.is_cuda or not x.is_contiguous()
            or getattr(block.conv1, "act_mode", None) != "sign"):
        return None
    parts = (block.conv1, block.bn1, block.act1, block.conv2, block.bn2, block.act2)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in parts for p in m.parameters())):
        return None
    if block.training or not cpu_ops.ready() or _hooked(block, block.shortcut, *parts):
        return None
    c1, c2 = _act(block.act1), _act(block.act2)
    if c1 is None or c2 is None or not (_bn_ok(block.bn1) and _bn_ok(block.bn2)):
        return None
    p1, p2 = _binary_plan(block.conv1, x), _binary_plan(block.conv2, x)
    if p1 is None or p2 is None:
        return None
    return p1, p2, c1, c2


def basic_block(block, x: torch.Tensor, plans=None, bits=None, next_plan=None):
    """(y, the signs of y packed for ``next_plan``'s conv or None) through the fused kernel, or None where
    it does not run (then the caller's module-by-module forward). ``bits``: x's signs as the block's
    first conv reads them, when the previous block packed them."""
    plans = plans or _plans(block, x)
    if plans is None:
        return None
    p1, p2, c1, c2 = plans
    sc = block.shortcut(x).contiguous()
    if bits is None:
        bits = cpu_ops.pack_signs(x, p1.p.get("shift"))
    c_mid = block.conv2.weight_shape[1]
    if block.per_conv_shortcut:  # out = act1(bn1(conv1(x)) + sc); y = act2(bn2(conv2(out)) + out)
        out, bits = _conv(block.conv1, p1, block.bn1, bits, x.shape[1], sc, c1, p2)
        y, bits = _conv(block.conv2, p2, block.bn2, bits, c_mid, out, c2, next_plan)
    else:  # out = act1(bn1(conv1(x))); y = act2(bn2(conv2(out)) + sc)
        out, bits = _conv(block.conv1, p1, block.bn1, bits, x.shape[1], None, c1, p2)
        y, bits = _conv(block.conv2, p2, block.bn2, bits, c_mid, sc, c2, next_plan)
    return y, (bits if next_plan is not None else None)


def sequential(seq: nn.Sequential, x: torch.Tensor, block_type: type) -> torch.Tensor:
    """``seq(x)``, each run of consecutive fusable blocks of ``block_type`` passing its packed signs on to
    the next (one sign packing per run instead of one per block)."""
    if _hooked(seq):
        return seq(x)
    blocks, bits = list(seq), None
    for i, block in enumerate(blocks):
        plans = _plans(block, x) if type(block) is block_type else None
        if plans is None:
            x, bits = block(x), None
            continue
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        next_plan = _binary_plan(nxt.conv1, x) if type(nxt) is block_type else None
        x, bits = basic_block(block, x, plans, bits, next_plan)
    return x
