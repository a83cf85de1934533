"""Packed inference form -> training form: the inverse of ``to_packed``, so a release can be fine-tuned.

``restore_from_packed(train_net, packed_net)`` takes a network already quantized (training form,
the same ``QuantConfig`` as the release) and sets every quantized layer from the packed layer of the
same name: each weight quantizer's ``restore`` rebuilds a float weight that it quantizes back to the
stored codes, scale and zero, and each activation quantizer's ``restore`` sets its step, range,
shift or thresholds from the exported parameters. Everything else (BatchNorm, float layers, biases)
is copied. Layers that do not fit are returned, not guessed at; ``check_restored`` re-quantizes the
rebuilt weights and names any layer whose codes or scales differ from the release's.
"""
from __future__ import annotations

import torch
from torch import nn

from .packed import PackedLayer
from .quantize import quantized_layers


def _quantizer_keys(name: str, layer: nn.Module) -> set[str]:
    return {f"{name}.{k}" for k, _ in layer.named_parameters() if k != "weight" and k != "bias"} | \
           {f"{name}.{k}" for k, _ in layer.named_buffers()}


@torch.no_grad()
def restore_from_packed(train: nn.Module, packed: nn.Module) -> dict[str, str]:
    """Copy ``packed`` (inference form) into ``train`` (training form, same quantization) in place.
    Returns {layer or parameter name: why it does not fit} for what could not be copied (those keep
    their current values); an empty dict means everything was restored."""
    mods = dict(packed.named_modules())
    misfit, done = {}, set()
    for name, layer in quantized_layers(train):
        pm = mods.get(name)
        if not isinstance(pm, PackedLayer):
            continue  # float-weight layers (activation-only quantization) load as plain state below
        done |= {f"{name}.weight", f"{name}.bias"} | _quantizer_keys(name, layer)
        if tuple(pm.weight_shape) != tuple(layer.weight.shape):
            misfit[name] = f"weight {tuple(pm.weight_shape)} in the release, {tuple(layer.weight.shape)} here"
            continue
        if layer.wq is None or layer.wq.bits != pm.bits or (layer.aq is None) != (pm.act_mode == "none") \
                or getattr(layer.aq, "num_sites", 1) != pm.num_sites:
            misfit[name] = f"quantized as {layer.extra_repr()} here, {pm.extra_repr()} in the release"
            continue
        q = pm.codes().to(layer.weight.dtype)
        try:
            layer.weight.copy_(layer.wq.restore(q, pm.w_scale, pm.w_zero))
            if layer.aq is not None:
                layer.aq.restore({k: v.detach().clone() for k, v in pm.all_act_params().items()})
        except NotImplementedError as e:  # a user-registered quantizer without a restore()
            raise ValueError(f"layer {name}: {e}; give it a restore() to fine-tune from a release") from None
        if layer.bias is not None and pm.bias is not None:
            layer.bias.copy_(pm.bias)
    source = packed.state_dict()
    target = train.state_dict()
    for key, value in target.items():
        if key in done:
            continue
        if key not in source:
            misfit[key.rsplit(".", 1)[0]] = f"{key} is not in the release"
        elif source[key].shape != value.shape:
            misfit[key.rsplit(".", 1)[0]] = f"{key}: {tuple(source[key].shape)} in the release, {tuple(value.shape)} here"
        else:
            value.copy_(source[key])
    packed_layers = {n for n, m in mods.items() if isinstance(m, PackedLayer)}
    for key in source:
        owner = key.rsplit(".", 1)[0]
        if key not in target and owner not in packed_layers:
            misfit[owner] = f"{key} is in the release but not in this model"
    return misfit


@torch.no_grad()
def check_restored(train: nn.Module, packed: nn.Module, skip=(), rtol: float = 1e-5) -> dict[str, str]:
    """{layer: what differs} for every restored layer whose weights re-quantize to other codes or
    scales, or whose activation quantizer exports other parameters, than the packed layer holds
    (layers named in ``skip`` are not checked). Codes must match exactly; scales to ``rtol`` (a scale
    that is a statistic of the weights, as in mu-L2Q or N2UQ, comes back to within an ulp or two)."""
    mods = dict(packed.named_modules())
    bad = {}
    for name, layer in quantized_layers(train):
        pm = mods.get(name)
        if name in skip or not isinstance(pm, PackedLayer) or layer.wq is None:
            continue
        q, scale, zero = layer.wq.integer_form(layer.weight)
        codes = pm.codes()
        if not torch.equal(q.reshape(codes.shape), codes):
            bad[name] = f"{int((q.reshape(codes.shape) != codes).sum())} weight codes differ"
        elif not (torch.allclose(scale, pm.w_scale, rtol=rtol, atol=0) and
                  torch.allclose(zero, pm.w_zero, rtol=rtol, atol=1e-6)):
            bad[name] = f"weight scale/zero differ by {float((scale - pm.w_scale).abs().max()):.3g}"
        elif layer.aq is not None:
            got, want = layer.aq.export(), pm.all_act_params()
            for k, v in want.items():
                if k not in got or not torch.allclose(got[k].to(v), v, rtol=rtol, atol=1e-7):
                    bad[name] = f"activation {k} differs"
                    break
    return bad
