"""The shared quantizer library: config dataclasses, quantizer modules, quantized layers,
``quantize()`` and the packed inference form. Importing a quantizer module registers its specs."""
from . import binary, ebb, logq, n2uq, rlq, ul2q, uniform  # noqa: F401  (register the built-in quantizers)
from .binary import RPReLU
from .config import (DoReFa, EBB, IRNet, LayerQuant, Log2, LogSqrt2, LSQ, MinMax, MPQ, N2UQ, PACT, PAMS, QuantConfig, QuantSpec,
                     ReAct, RLQ, SHORT_NAMES, UL2Q, XNOR, quantizer_names, register_quantizer, spec_from_dict)
from .layers import LAYER_MAP, QuantConv2d, QuantConvTranspose2d, QuantLinear
from .packed import PackedConv2d, PackedConvTranspose2d, PackedLinear, set_backend, to_packed
from .quantize import quantize, quantized_layers, quantized_ops, set_progress, set_weight_quant
from .ul2q import optimal_lambda

__all__ = [
    "QuantConfig", "LayerQuant", "QuantSpec", "MinMax", "LSQ", "DoReFa", "PACT", "UL2Q", "XNOR",
    "IRNet", "ReAct", "EBB", "RLQ", "PAMS", "N2UQ", "Log2", "LogSqrt2", "MPQ", "SHORT_NAMES", "register_quantizer", "quantizer_names", "spec_from_dict",
    "quantize", "quantized_layers", "quantized_ops", "set_progress", "set_weight_quant", "to_packed", "set_backend", "LAYER_MAP",
    "QuantConv2d", "QuantLinear", "QuantConvTranspose2d", "PackedConv2d", "PackedLinear",
    "PackedConvTranspose2d", "RPReLU", "optimal_lambda",
]
