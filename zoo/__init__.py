"""zoo: quantized (1-8 bit) vision models with packed storage.

    import zoo
    model = zoo.load("resnet20.irnet_w1a1_fmnist")      # eval-mode, takes images in [0, 1]
    zoo.quantize(any_torch_model, zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)))
    zoo.cost(model, (1, 28, 28)).table()                  # packed bytes, MACs, BOPs per layer

Importing zoo imports neither Triton nor Lightning and touches no CUDA device.
"""
from . import export
from .checkpoint import CheckpointError, allow_builder, load, save
from .cost_model import cost
from .quantizers import (DoReFa, EBB, IRNet, LayerQuant, LSQ, MinMax, N2UQ, PACT, PAMS, QuantConfig, ReAct,
                         RLQ, UL2Q, XNOR, quantize, register_quantizer, set_backend, to_packed)
from .registry import create_model, list_archs, list_models, register_model
from .wrapper import ZooModel

__version__ = "0.1.0"

__all__ = [
    "load", "save", "allow_builder", "cost", "CheckpointError", "quantize", "to_packed", "set_backend", "QuantConfig", "LayerQuant",
    "MinMax", "LSQ", "DoReFa", "PACT", "UL2Q", "XNOR", "IRNet", "ReAct", "EBB", "RLQ", "PAMS", "N2UQ",
    "register_quantizer",
    "create_model", "list_models", "list_archs", "register_model", "ZooModel", "export", "__version__",
]
