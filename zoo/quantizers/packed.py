"""Inference form: layers that hold packed integer weights and run through ``zoo.kernels``.

``to_packed(model)`` converts every training-form quantized layer in place. The packed layers'
state dict (uint8 ``qweight`` + float ``w_scale``/``w_zero``/activation parameters) is what
``zoo.save`` writes to ``model.safetensors``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cached, dispatch, reference
from ..kernels.packing import pack, unpack
from .attention import QuantMatMul
from .layers import QuantConv2d, QuantConvTranspose2d, QuantLinear

ACT_KEYS = ("scale", "offset", "zero", "qmin", "qmax")
# per-layer activation vectors: a per-channel shift subtracted before quantizing (ReAct's RSign
# threshold, QuantSR's RLQ shift) and the increasing thresholds whose count is the code (N2UQ)
ACT_VECTORS = ("shift", "thresholds")
SCALAR_MODES = ("affine", "threshold")  # modes with scale / zero / qmin / qmax


class PackedLayer(nn.Module):
    ch_axis = 0

    def __init__(self, weight_shape, bits, act_mode, has_bias, act_vectors=None, act_sites=1):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.bits = int(bits)
        self.act_mode = act_mode  # "none" | "affine" | "sign" | "threshold"
        # act_sites > 1: one activation parameter set per call in a forward (zoo.quantizers.sites);
        # every a_* buffer holds the sites' values one after another
        self.num_sites, self.calls, self.site = int(act_sites), 0, 0
        self.backend = "auto"
        self.binary_kernel = "auto"
        rows, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        nbytes = pack(torch.zeros(1, k, dtype=torch.uint8), self.bits).shape[1]
        ch = self.weight_shape[self.ch_axis]
        self.register_buffer("qweight", torch.zeros(rows, nbytes, dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(ch))
        self.register_buffer("w_zero", torch.zeros(ch))
        self.register_buffer("bias", torch.zeros(self.out_channels) if has_bias else None)
        if act_mode in SCALAR_MODES:
            for key in ACT_KEYS:
                self.register_buffer("a_" + key, torch.zeros(self.num_sites))
        for key, n in (act_vectors or {}).items():
            if key not in ACT_VECTORS:
                raise ValueError(f"unknown activation vector {key!r}; valid: {list(ACT_VECTORS)}")
            self.register_buffer("a_" + key, torch.zeros(n))  # n: the total over the sites

    @property
    def out_channels(self):
        return self.weight_shape[0]

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_quant(cls, layer, **kwargs):
        if layer.wq is None:
            raise ValueError("packed layers need a weight quantizer; layers with float weights stay float")
        w = layer.weight.detach()
        q, scale, zero = layer.wq.integer_form(w)
        act_mode, act, sites = "none", {}, 1
        if layer.aq is not None:
            act_mode, act, sites = layer.aq.mode, layer.aq.export(), getattr(layer.aq, "num_sites", 1)
        vectors = {k: act[k] for k in ACT_VECTORS if k in act}
        new = cls(w.shape, layer.wq.bits, act_mode, layer.bias is not None,
                  act_vectors={k: v.numel() for k, v in vectors.items()}, act_sites=sites, **kwargs)
        new.qweight.copy_(pack(q.reshape(q.shape[0], -1), layer.wq.bits))
        new.w_scale.copy_(scale), new.w_zero.copy_(zero)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        if act_mode in SCALAR_MODES:
            for key in ACT_KEYS:
                getattr(new, "a_" + key).copy_(act[key])
        for key, v in vectors.items():
            getattr(new, "a_" + key).copy_(v)
        return new.to(w.device)

    # ------------------------------------------------------------------ helpers
    def codes(self) -> torch.Tensor:
        k = math.prod(self.weight_shape[1:])
        return unpack(self.qweight, self.bits, k).reshape(self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        return reference.dequantize_weight(self.codes(), self.w_scale, self.w_zero, self.ch_axis)

    def _float_weight(self, x) -> torch.Tensor:
        """The dequantized weight of a weight-only layer (cached on the cached CPU path)."""
        if dispatch.cpu_cached(self.backend, x):
            return cached.dequantized_weight(self)
        return self.dequantized_weight()

    def all_act_params(self) -> dict:
        """Every activation parameter as stored (all sites, one after another)."""
        p = {k: getattr(self, "a_" + k) for k in ACT_KEYS} if self.act_mode in SCALAR_MODES else {}
        if self.act_mode != "none":
            p.update({k: getattr(self, "a_" + k) for k in ACT_VECTORS if hasattr(self, "a_" + k)})
        return p

    def act_params(self) -> dict:
        """The activation parameters of the current call's site (all of them for a single site)."""
        p = self.all_act_params()
        if self.num_sites == 1:
            return p
        return {k: v.reshape(self.num_sites, -1)[self.site] for k, v in p.items()}

    def _next_site(self) -> None:
        """Called at the top of each forward: pick this call's activation parameters."""
        if self.num_sites > 1:
            self.site = self.calls % self.num_sites
            self.calls += 1

    def _int_inputs(self, x, ch_axis=1):
        p = self.act_params()
        v = reference.quantize_act(x, self.act_mode, p, ch_axis)
        return v, reference.act_scale(self.act_mode, p), reference.act_zero(self.act_mode, p)

    def extra_repr(self):
        sites = f", act_sites={self.num_sites}" if self.num_sites > 1 else ""
        return f"weight={self.weight_shape}, bits={self.bits}, act={self.act_mode}{sites}, backend={self.backend}"


class PackedConv2d(PackedLayer):
    def __init__(self, weight_shape, bits, act_mode, has_bias, act_vectors=None, act_sites=1, stride=1,
                 padding=0, dilation=1, groups=1, padding_mode="zeros"):
        super().__init__(weight_shape, bits, act_mode, has_bias, act_vectors, act_sites)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        if padding_mode != "zeros":
            raise ValueError(f"packed conv supports padding_mode='zeros' only, got {padding_mode!r}")

    @classmethod
    def from_quant(cls, layer):
        return super().from_quant(layer, stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, groups=layer.groups,
                                  padding_mode=layer.padding_mode)

    def forward(self, x):
        self._next_site()
        if self.act_mode == "none":
            return F.conv2d(x, self._float_weight(x), self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        ops = dispatch.triton_ops(self.backend, x)
        y = ops.conv2d(self, x) if ops is not None else None
        if y is None and dispatch.cpu_cached(self.backend, x):
            y = cached.conv2d(self, x)
        if y is not None:
            return y
        v, s_a, z_a = self._int_inputs(x)
        y = reference.conv2d(v, s_a, z_a, self.codes(), self.w_scale, self.w_zero, self.bias,
                             self.stride, self.padding, self.dilation, self.groups)
        return y.to(x.dtype)


class PackedLinear(PackedLayer):
    def forward(self, x):
        self._next_site()
        if self.act_mode == "none":
            return F.linear(x, self._float_weight(x), self.bias)
        ops = dispatch.triton_ops(self.backend, x)
        y = ops.linear(self, x) if ops is not None else None
        if y is None and dispatch.cpu_cached(self.backend, x):
            y = cached.linear(self, x)
        if y is not None:
            return y
        v, s_a, z_a = self._int_inputs(x, ch_axis=-1)
        return reference.linear(v, s_a, z_a, self.codes(), self.w_scale, self.w_zero, self.bias).to(x.dtype)


class PackedConvTranspose2d(PackedLayer):
    ch_axis = 1

    def __init__(self, weight_shape, bits, act_mode, has_bias, act_vectors=None, act_sites=1, stride=1,
                 padding=0, output_padding=0, dilation=1, groups=1):
        self.groups = groups
        super().__init__(weight_shape, bits, act_mode, has_bias, act_vectors, act_sites)
        self.stride, self.padding, self.output_padding, self.dilation = stride, padding, output_padding, dilation

    @property
    def out_channels(self):
        return self.weight_shape[1] * self.groups

    @classmethod
    def from_quant(cls, layer):
        return super().from_quant(layer, stride=layer.stride, padding=layer.padding,
                                  output_padding=layer.output_padding, dilation=layer.dilation,
                                  groups=layer.groups)

    def forward(self, x):
        self._next_site()
        if self.act_mode == "none":
            return F.conv_transpose2d(x, self._float_weight(x), self.bias, self.stride,
                                      self.padding, self.output_padding, self.groups, self.dilation)
        # no Triton kernel for transposed convs yet: the cached CPU path or the reference
        dispatch.check_backend(self.backend)
        y = cached.conv_transpose2d(self, x) if dispatch.cpu_cached(self.backend, x) else None
        if y is not None:
            return y
        v, s_a, z_a = self._int_inputs(x)
        y = reference.conv_transpose2d(v, s_a, z_a, self.codes(), self.w_scale, self.w_zero, self.bias,
                               self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        return y.to(x.dtype)


PACKED_MAP = {QuantConv2d: PackedConv2d, QuantLinear: PackedLinear,
              QuantConvTranspose2d: PackedConvTranspose2d}


def to_packed(model: nn.Module) -> nn.Module:
    """Replace every training-form quantized layer whose weights are quantized by its packed form
    (in place). Layers with float weights keep their training form."""
    from .quantize import _set_child

    for name, mod in list(model.named_modules()):
        cls = PACKED_MAP.get(type(mod))
        if cls is not None and mod.wq is not None:
            _set_child(model, name, cls.from_quant(mod))
    return model


def set_backend(model: nn.Module, backend: str, binary_kernel: str | None = None) -> None:
    """Choose the compute backend (``dispatch.BACKENDS``) of every packed layer and quantized attention
    matmul, and optionally the binary kernel variant (``"auto" | "popcount" | "dot"``) their W1A1
    layers use under Triton."""
    dispatch.check_backend(backend)
    if binary_kernel is not None:
        dispatch.check_binary_kernel(binary_kernel)
    for m in model.modules():
        if isinstance(m, PackedLayer):
            m.backend = backend
            if binary_kernel is not None:
                m.binary_kernel = binary_kernel
        elif isinstance(m, QuantMatMul):  # attention's integer matmuls take the same backends
            m.backend = backend
