"""``quantize(model, cfg)``: swap float layers for quantized ones in place, through ``LAYER_MAP``."""
from __future__ import annotations

from torch import nn

from .attention import OP_MAP, QUANT_OPS, explicit_attention
from .config import QuantConfig
from .layers import LAYER_MAP, QUANT_LAYERS


def _float_type(mod: nn.Module):
    if isinstance(mod, QUANT_LAYERS):
        return None
    for float_cls in LAYER_MAP:
        if isinstance(mod, float_cls):
            return float_cls
    return None


def _set_child(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# float layers whose parent reads their ``weight`` directly instead of calling them (so a quantized
# or packed layer there would be bypassed or break): left float. quantize() first makes the supported
# nn.MultiheadAttention modules explicit (zoo.quantizers.attention); only the variants it cannot are left.
_READ_BY_PARENT = (nn.MultiheadAttention,)
QUANT_CONFIG_ATTR = "_zoo_quant_config"  # where quantize() records the config on the model it rewrote


def quantize(model: nn.Module, cfg: QuantConfig | dict) -> nn.Module:
    """Replace every ``nn.Conv2d`` / ``nn.Linear`` / ``nn.ConvTranspose2d`` of ``model`` (in place)
    with its quantized form as ``cfg`` says for that layer's name. Idempotent: layers already
    quantized are left alone. Returns ``model``; a bare layer (``quantize(nn.Conv2d(...), cfg)``)
    cannot be replaced in place, so its quantized copy (sharing its parameters) is returned. The config
    is recorded on ``model`` so ``zoo.save`` can write it.

    Attention: timm's ``Attention`` and ``nn.MultiheadAttention`` are first replaced by explicit
    modules computing the same (``zoo.quantizers.attention``; same state dict), whose two matmuls and
    softmax output are then quantized as the config says for ``<attn>.matmul1`` / ``.matmul2`` /
    ``.softmax`` (their act spec; a matmul's weight spec is unused). An ``nn.MultiheadAttention`` variant
    the explicit form does not cover (kdim/vdim, bias_k, add_zero_attn) stays fused, and its projections
    stay float (its forward reads their weights directly). ``extra={"ivit": True}``: LayerNorm, GELU and
    the softmax also become I-ViT's integer ops (``zoo.quantizers.ivit``)."""
    if isinstance(cfg, dict):
        cfg = QuantConfig.from_dict(cfg)
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a QuantConfig or dict, got {type(cfg).__name__}")
    root_cls = _float_type(model)
    if root_cls is not None:  # a bare layer
        spec = cfg.for_layer("")
        if spec is None or (spec.weight is None and spec.act is None):
            raise ValueError(f"the config quantizes nothing for a bare {type(model).__name__} (its name is '')")
        new = LAYER_MAP[root_cls].from_float(model, spec)
        setattr(new, QUANT_CONFIG_ATTR, cfg)
        return new
    explicit_attention(model)
    skip = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, _READ_BY_PARENT)
            for c, _ in m.named_children()}
    targets = []
    for name, mod in model.named_modules():
        float_cls = _float_type(mod)
        if float_cls is None or not name or name in skip:
            continue
        spec = cfg.for_layer(name)
        if spec is None or (spec.weight is None and spec.act is None):
            continue
        targets.append((name, mod, LAYER_MAP[float_cls], spec))
    for name, mod in model.named_modules():
        qcls = OP_MAP.get(type(mod))
        spec = cfg.for_layer(name) if qcls is not None else None
        if spec is not None and spec.act is not None:
            targets.append((name, mod, qcls, spec))
    for name, mod, qcls, spec in targets:
        _set_child(model, name, qcls.from_float(mod, spec))
    if cfg.options.get("ivit"):  # I-ViT: LayerNorm, GELU and softmax in integer arithmetic
        from .ivit import to_integer_only

        to_integer_only(model)
    setattr(model, QUANT_CONFIG_ATTR, cfg)
    return model


def quantized_layers(model: nn.Module):
    """(name, layer) of every training-form quantized layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def quantized_ops(model: nn.Module):
    """(name, op) of every quantized attention matmul and softmax (``zoo.quantizers.attention``)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_OPS)]


def set_progress(model: nn.Module, fraction: float) -> None:
    """Tell every quantizer how far training has come (drives schedules such as IR-Net's EDE)."""
    from .base import Quantizer

    for m in model.modules():
        if isinstance(m, Quantizer):
            m.set_progress(fraction)


def set_weight_quant(model: nn.Module, enabled: bool) -> None:
    """Turn the weight quantizers of every training-form layer on or off (off: the layer computes
    with its float weights and still quantizes its input). Packing always quantizes the weights."""
    for _, m in quantized_layers(model):
        m.weight_quant_enabled = bool(enabled)


def quantizer_state_digest(model: nn.Module) -> str:
    """sha256 of every quantizer's parameters and buffers (steps, clips, shifts, thresholds, EMA
    ranges, flags), in module order: equal digests mean identical quantizer state (data-parallel
    ranks must agree)."""
    import hashlib

    from .base import Quantizer

    h = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            for key, t in sorted(m.state_dict().items()):
                h.update(f"{name}.{key}".encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
