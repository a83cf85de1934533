"""Training-form quantized layers: the float layer plus a weight and an input-activation quantizer.

They subclass the float layers and keep ``weight``/``bias`` under the same names, so a float
state dict loads strictly into a quantized model.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .config import LayerQuant, build_quantizer
from .sites import MultiSiteAct


class _QuantMixin:
    ch_axis = 0
    spec: LayerQuant
    weight_quant_enabled = True  # False: float weights (the first stage of two-stage binary training)

    def _init_quant(self, spec: LayerQuant):
        self.spec = spec
        self.wq = build_quantizer(spec.weight, "weight", self) if spec.weight else None
        self.aq = None
        if spec.act is not None and spec.act_sites > 1:
            self.aq = MultiSiteAct([build_quantizer(spec.act, "act", self) for _ in range(spec.act_sites)])
        elif spec.act is not None:
            self.aq = build_quantizer(spec.act, "act", self)

    def quant_weight(self):
        if self.wq is None or not self.weight_quant_enabled:
            return self.weight
        return self.wq(self.weight)

    def quant_input(self, x):
        return self.aq(x) if self.aq is not None else x

    @classmethod
    def from_float(cls, mod, spec: LayerQuant):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        # copy the float layer's attributes (and share its Parameters)
        for k, v in mod.__dict__.items():
            if k not in ("_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
                new.__dict__[k] = v.copy() if isinstance(v, dict) else v
        new._modules = dict(mod._modules)
        new._init_quant(spec)
        return new

    def extra_repr(self):
        w = type(self.spec.weight).__name__ + f"(w{self.spec.weight.bits})" if self.spec.weight else "float"
        a = type(self.spec.act).__name__ + f"(a{self.spec.act.bits})" if self.spec.act else "float"
        if self.spec.act_sites > 1:
            a += f" x{self.spec.act_sites} sites"
        return super().extra_repr() + f", weight={w}, act={a}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    def forward(self, x):
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


class QuantConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    ch_axis = 1  # weight is [C_in, C_out / groups, kh, kw]

    def forward(self, x, output_size=None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(self.quant_input(x), self.quant_weight(), self.bias, self.stride,
                                  self.padding, output_padding, self.groups, self.dilation)


LAYER_MAP: dict[type, type] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.ConvTranspose2d: QuantConvTranspose2d,
}
QUANT_LAYERS = tuple(LAYER_MAP.values())
