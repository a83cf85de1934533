"""``zoo.cost(model, input_shape)``: storage and compute of a (quantized) model, layer by layer.

For every conv / linear / transposed-conv layer, in any of its three forms (float, training-form
quantized, packed):

- ``weight_bytes``: the bytes the layer takes in a packed release: the packed integer codes
  (``rows x ceil(k * bits / 8)``, exactly as ``zoo.kernels.packing.pack`` lays them out) plus one
  float32 scale and zero point per channel, plus the float32 bias; a layer with float weights counts
  its weights and bias at their dtype's size.
- ``macs``: multiply-accumulates of one forward pass on an input of ``input_shape`` (measured with a
  forward hook on a zero input, so it follows the model's real strides and shapes).
- ``bops``: bit operations, ``macs x w_bits x a_bits`` (a float operand counts 32 bits), the measure
  of HAWQ-v3 and HTQ.

``other_bytes`` is everything else the model stores (BatchNorm, quantizer and activation parameters,
embeddings, ...) at its dtype's size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .kernels.packing import pack
from .quantizers.packed import PackedConv2d, PackedConvTranspose2d, PackedLayer, PackedLinear

FLOAT_BITS = 32
LAYER_TENSORS = ("weight", "bias", "qweight", "w_scale", "w_zero")  # what weight_bytes counts
_CONV = (nn.Conv2d, PackedConv2d)
_LINEAR = (nn.Linear, PackedLinear)
_TCONV = (nn.ConvTranspose2d, PackedConvTranspose2d)


def packed_weight_bytes(weight_shape, bits: int, ch_axis: int = 0, bias: bool = False) -> int:
    """Bytes of one layer in a packed release at ``bits`` weight bits (``bits`` >= 32: float32)."""
    shape = tuple(int(s) for s in weight_shape)
    out_ch = shape[0] if ch_axis == 0 else shape[1]  # transposed convs: [C_in, C_out/groups, kh, kw]
    bias_bytes = 4 * out_ch if bias else 0
    if bits >= FLOAT_BITS:
        return 4 * math.prod(shape) + bias_bytes
    rows, k = shape[0], math.prod(shape[1:])
    codes = rows * pack(torch.zeros(1, k, dtype=torch.uint8), bits).shape[1]
    return codes + 8 * shape[ch_axis] + bias_bytes


def nominal_weight_bytes(weight_shape, bits: int, ch_axis: int = 0, bias: bool = False) -> int:
    """Like ``packed_weight_bytes`` with ``bits`` bits per weight exactly (``ceil(n * bits / 8)``), the
    size mixed-precision papers count. The packed format stores 3-bit codes in 4-bit and 5-7-bit codes
    in 8-bit containers, so for those widths this is less than the release takes on disk."""
    shape = tuple(int(s) for s in weight_shape)
    if bits >= FLOAT_BITS:
        return packed_weight_bytes(shape, bits, ch_axis, bias)
    out_ch = shape[0] if ch_axis == 0 else shape[1]
    return -(-math.prod(shape) * bits // 8) + 8 * shape[ch_axis] + (4 * out_ch if bias else 0)


SIZE_MEASURES = {"packed": packed_weight_bytes, "nominal": nominal_weight_bytes}


@dataclass
class LayerCost:
    name: str
    kind: str              # "conv" | "linear" | "tconv"
    weight_shape: tuple
    w_bits: int            # 32 for float weights
    a_bits: int            # 32 for float inputs
    weight_bytes: int
    macs: int = 0
    ch_axis: int = 0
    bias: bool = False

    @property
    def nominal_bytes(self) -> int:
        """``nominal_weight_bytes`` of this layer: its bits per weight exactly, no containers."""
        return nominal_weight_bytes(self.weight_shape, self.w_bits, self.ch_axis, self.bias)

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


@dataclass
class Cost:
    layers: list[LayerCost]
    other_bytes: int
    input_shape: tuple = field(default=())

    @property
    def weight_bytes(self) -> int:
        return sum(c.weight_bytes for c in self.layers)

    @property
    def nominal_bytes(self) -> int:
        return sum(c.nominal_bytes for c in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.other_bytes

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.layers)

    @property
    def bops(self) -> int:
        return sum(c.bops for c in self.layers)

    def as_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "total_bytes": self.total_bytes,
                "weight_bytes": self.weight_bytes, "nominal_weight_bytes": self.nominal_bytes, "other_bytes": self.other_bytes, "macs": self.macs,
                "bops": self.bops,
                "layers": [{"name": c.name, "kind": c.kind, "w_bits": c.w_bits, "a_bits": c.a_bits,
                            "weight_bytes": c.weight_bytes, "macs": c.macs, "bops": c.bops} for c in self.layers]}

    def table(self) -> str:
        rows = ["| layer | kind | W | A | bytes | MACs | BOPs |", "|---|---|---|---|---|---|---|"]
        for c in self.layers:
            rows.append(f"| {c.name} | {c.kind} | {c.w_bits} | {c.a_bits} | {c.weight_bytes:,} | {c.macs:,} | {c.bops:,} |")
        rows.append(f"| total (+{self.other_bytes:,} other bytes) | | | | {self.total_bytes:,} | {self.macs:,} | "
                    f"{self.bops:,} |")
        return "\n".join(rows)


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, _TCONV):
        return "tconv"
    if isinstance(mod, _CONV):
        return "conv"
    if isinstance(mod, _LINEAR):
        return "linear"
    return None


def _act_bits(mod: nn.Module) -> int:
    if isinstance(mod, PackedLayer):
        if mod.act_mode == "none":
            return FLOAT_BITS
        if mod.act_mode == "sign":
            return 1
        if hasattr(mod, "a_qmax"):
            span = float(mod.a_qmax.max()) - float(mod.a_qmin.min())  # one value per call site
            return max(1, int(round(math.log2(span + 1))))
        return FLOAT_BITS
    aq = getattr(mod, "aq", None)
    return FLOAT_BITS if aq is None else int(aq.bits)


def _layer_cost(name: str, mod: nn.Module) -> LayerCost:
    kind = _kind(mod)
    if isinstance(mod, PackedLayer):
        shape, bits = mod.weight_shape, mod.bits
        nbytes = sum(t.numel() * t.element_size() for t in (getattr(mod, k, None) for k in LAYER_TENSORS)
                     if t is not None)
        ch_axis, bias = mod.ch_axis, getattr(mod, "bias", None) is not None
    else:
        shape = tuple(mod.weight.shape)
        wq = getattr(mod, "wq", None)
        quantized = wq is not None and getattr(mod, "weight_quant_enabled", True)
        bits = int(wq.bits) if quantized else FLOAT_BITS
        ch_axis = 1 if isinstance(mod, nn.ConvTranspose2d) else 0  # training-form layers subclass it
        bias = mod.bias is not None
        if quantized:
            nbytes = packed_weight_bytes(shape, bits, ch_axis, bias)
        else:
            nbytes = sum(p.numel() * p.element_size() for p in (mod.weight, mod.bias) if p is not None)
    return LayerCost(name, kind, tuple(shape), int(bits), _act_bits(mod), int(nbytes), 0, ch_axis, bias)


def _macs(kind: str, shape: tuple, x: torch.Tensor, y: torch.Tensor) -> int:
    if kind == "conv":  # each output value: C_in/groups * kh * kw products
        return y[:1].numel() * math.prod(shape[1:])
    if kind == "linear":
        return (y[:1].numel() if y.dim() > 1 else y.numel()) * shape[1]
    return x[:1].numel() * math.prod(shape[1:])  # tconv: each input value feeds C_out/groups * kh * kw


def layers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``cost`` counts: conv, linear and transposed conv in every form."""
    return [(n, m) for n, m in model.named_modules() if n and _kind(m) is not None
            and not any(isinstance(c, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d, PackedLayer))
                        for c in m.children())]


def cost(model: nn.Module, input_shape) -> Cost:
    """Per-layer packed bytes, MACs and BOPs of ``model`` on an input of ``input_shape`` (with or
    without the batch dimension; costs are per sample). See the module docstring."""
    from .wrapper import ZooModel

    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2:
        raise ValueError(f"input_shape={shape} is not valid; valid: (C, H, W), (N, C, H, W) or (N, features)")
    net = model.net if isinstance(model, ZooModel) else model
    mods = layers_of(net)
    costs = {n: _layer_cost(n, m) for n, m in mods}
    counted = {id(getattr(m, k)) for _, m in mods for k in LAYER_TENSORS if getattr(m, k, None) is not None}
    other = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers())
                if id(t) not in counted)

    def hook(name):
        def fn(mod, args, out):
            c = costs[name]
            c.macs += _macs(c.kind, c.weight_shape, args[0], out)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods]
    was_training = model.training
    x = torch.zeros(shape if len(shape) != 3 else (1, *shape))
    try:
        p = next(iter(list(net.parameters()) + list(net.buffers())), None)
        if p is not None:
            x = x.to(p.device)
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Cost(list(costs.values()), int(other), shape)

