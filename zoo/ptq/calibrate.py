"""Post-training quantization: ``calibrate(model, cfg, data)`` returns a calibrated quantized copy.

1. The float model runs the calibration batches once; a hook on every layer the config quantizes
   records its input (``RangeObserver``).
2. ``zoo.quantize`` replaces the layers by their training form with MinMax quantizers: weights
   per output channel, rounded to nearest (per-channel grids make folding BatchNorm's scale into the
   weights unnecessary: it scales each channel's grid with its weights, so the packed path keeps
   BatchNorm as a float layer, as for every release).
3. Each activation quantizer's range is set by the chosen estimator (min-max, percentile, MSE) from
   the recorded float inputs, and frozen (eval mode).
4. Optionally (``rounding="learned"``) the weight rounding is learned unit by unit (residual blocks,
   lone layers) so each unit's output matches the float model's (AdaRound/BRECQ; ``reconstruct.py``).
5. Optionally (``bias_correction=True``) each layer that has a bias gets it corrected by the mean,
   per output channel, of the error its quantized weights make on the recorded inputs (Nagel et al.'s
   empirical bias correction), so the layer's output mean matches the float layer's. Layers without
   a bias are left alone (a bias would change the architecture the release rebuilds).

The result is a normal quantized model: ``zoo.save`` writes it as a packed release.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import MinMax, QuantConfig, quantize, quantized_layers, quantized_ops
from ..quantizers.attention import OP_MAP, MatMul, explicit_attention
from ..quantizers.quantize import _float_type
from ..quantizers.uniform import MinMaxAct
from ..datasets import batch_input
from ..wrapper import ZooModel
from .estimators import RangeObserver, check_estimator


def ptq_config(wbits: int, abits: int | None = None, keep: dict | None = None,
               softmax: str | None = None) -> QuantConfig:
    """MinMax weights (per channel) and activations: the form PTQ calibrates. ``keep``: name glob ->
    bits for layers kept at another precision (e.g. {"stem": 8, "fc": 8}), or None to keep them float.
    ``softmax``: the attention softmax output's quantizer ("Log2", "LogSqrt2", "MPQ"; None: MinMax
    like every activation), at ``abits``."""
    abits = wbits if abits is None else abits
    for name, b in (("wbits", wbits), ("abits", abits)):
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise ValueError(f"{name}={b!r} is not valid for PTQ; valid: integers 2..8 "
                             "(1-bit models need training: python -m zoo.train)")
    overrides = {g: None if b is None else {"weight": MinMax(b, granularity="channel"), "act": MinMax(b)}
                 for g, b in (keep or {}).items()}  # None: the layer stays float
    if softmax is not None:
        overrides["*softmax"] = {"weight": None, "act": {"type": softmax, "bits": abits}}
    return QuantConfig(weight=MinMax(wbits, granularity="channel"), act=MinMax(abits), overrides=overrides)


def batches(data, batch_size: int = 64) -> Iterable[torch.Tensor]:
    """Input tensors from a tensor of samples (split into batches), or from an iterable of batches
    (tensors, or tuples/lists/dicts whose first entry is the input)."""
    if torch.is_tensor(data):
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    for b in data:
        yield batch_input(b)


def _net(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, ZooModel) else model


ROUNDINGS = ("nearest", "learned")


def calibrate(model: nn.Module, cfg: QuantConfig | dict, data, method: str = "mse", *,
              percentile: float = 99.99, bias_correction: bool = False, batch_size: int = 64,
              rounding: str = "nearest", recon: dict | None = None, progress: bool = True) -> nn.Module:
    """A quantized copy of the float ``model`` calibrated on ``data`` (see the module docstring).
    ``cfg`` must use MinMax activation quantizers (the ones whose range PTQ sets); ``method`` is the
    range estimator: "minmax", "percentile" or "mse". ``rounding="learned"``: the weights' rounding
    is learned by block-wise output reconstruction (``zoo.ptq.reconstruct``; ``recon``: its keyword
    arguments, e.g. {"iters": 500})."""
    from tqdm.auto import tqdm

    check_estimator(method)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not valid; valid: {list(ROUNDINGS)}")
    cfg = QuantConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    qmodel = copy.deepcopy(model).eval()
    net = _net(qmodel)
    explicit_attention(net)  # fused attention -> explicit matmuls and softmax (same float function)
    targets = {}
    for name, mod in net.named_modules():
        spec = cfg.for_layer(name) if name and _float_type(mod) is not None else None
        if spec is None or (spec.weight is None and spec.act is None):
            continue
        if spec.act is not None and not isinstance(spec.act, MinMax):
            raise ValueError(f"layer {name!r}: PTQ calibrates MinMax activation quantizers, got "
                             f"{type(spec.act).__name__}; use zoo.ptq.ptq_config(...) or MinMax(bits)")
        targets[name] = mod
    if not targets:
        raise ValueError("the config quantizes no layer of this model")
    ops = {n: m for n, m in net.named_modules() if type(m) in OP_MAP and (cfg.for_layer(n) or _NO).act is not None}
    for name, op in ops.items():
        act = cfg.for_layer(name).act
        if isinstance(op, MatMul) and not isinstance(act, MinMax):
            raise ValueError(f"{name!r}: PTQ calibrates MinMax quantizers for matmul inputs, got {type(act).__name__}")
    observers = {n: RangeObserver(seed=i) for i, n in enumerate(targets)}
    op_obs = {(n, k): RangeObserver(seed=1000 + i) for i, (n, m) in enumerate(ops.items())
              for k in (("aq_a", "aq_b") if isinstance(m, MatMul) else ("oq",))}
    inputs = {n: [] for n in targets} if bias_correction else None
    hooks = [m.register_forward_pre_hook(_recorder(observers[n], inputs, n)) for n, m in targets.items()]
    hooks += [m.register_forward_hook(_op_recorder(op_obs, n)) for n, m in ops.items()]
    try:
        with torch.no_grad():
            for x in tqdm(list(batches(data, batch_size)), desc="calibration batches", disable=not progress,
                          leave=False):
                qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    quantize(net, cfg)
    if isinstance(qmodel, ZooModel):
        qmodel.quant = cfg
    # the layers quantize() replaced (it leaves some alone, e.g. those nn.MultiheadAttention reads itself)
    layers = [(n, m) for n, m in quantized_layers(net) if n in observers]
    for name, layer in tqdm(layers, desc=f"ranges ({method})", disable=not progress, leave=False):
        if isinstance(layer.aq, MinMaxAct):
            lo, hi = observers[name].range(layer.aq.bits, method, percentile=percentile)
            layer.aq.lo.fill_(lo), layer.aq.hi.fill_(hi), layer.aq.initialized.fill_(True)
    for name, op in quantized_ops(net):
        for key in ("aq_a", "aq_b", "oq"):
            q = getattr(op, key, None)
            if q is not None and (name, key) in op_obs:
                set_range(q, op_obs[name, key], method, percentile)
    qmodel.eval()
    if rounding == "learned":
        from .reconstruct import reconstruct

        was_training = model.training
        try:
            report = reconstruct(qmodel, model.eval(), list(batches(data, batch_size)), progress=progress,
                                 **(recon or {}))
        finally:
            model.train(was_training)
        setattr(qmodel, RECON_ATTR, report)
    if bias_correction:
        for name, layer in layers:
            if layer.wq is not None and layer.bias is not None:
                _correct_bias(layer, inputs[name])
    return qmodel


RECON_ATTR = "_zoo_reconstruction"  # {unit: (output MSE nearest, learned, kept)} of the reconstruction


_NO = type("NoSpec", (), {"act": None})()


def set_range(q, observer, method: str, percentile: float = 99.99) -> None:
    """Calibrate activation quantizer ``q`` from the samples ``observer`` holds: a MinMax range by the
    estimator, a softmax quantizer's scale by its own ``fit``."""
    if isinstance(q, MinMaxAct):
        lo, hi = observer.range(q.bits, method, percentile=percentile)
        q.lo.fill_(lo), q.hi.fill_(hi), q.initialized.fill_(True)
    elif hasattr(q, "fit"):
        q.fit(observer.samples(), hi=observer.hi)


def _op_recorder(obs, name):
    def hook(mod, args, out):
        if isinstance(mod, MatMul):
            obs[name, "aq_a"].update(args[0])
            obs[name, "aq_b"].update(args[1])
        else:
            obs[name, "oq"].update(out)
    return hook


def _recorder(observer, inputs, name):
    def hook(mod, args):
        observer.update(args[0])
        if inputs is not None:
            inputs[name].append(args[0].detach())
    return hook


@torch.no_grad()
def _correct_bias(layer, xs: list[torch.Tensor]) -> None:
    """bias -= mean over the calibration inputs and positions of (W_q - W) * x, per output channel."""
    w_err = layer.quant_weight().detach() - layer.weight.detach()
    total, count = None, 0
    for x in xs:
        if isinstance(layer, nn.Conv2d):
            e = layer._conv_forward(x, w_err, None)
            s, c = e.sum(dim=(0, 2, 3)), e.numel() // e.shape[1]
        elif isinstance(layer, nn.Linear):
            e = F.linear(x, w_err)
            s, c = e.reshape(-1, e.shape[-1]).sum(0), e.numel() // e.shape[-1]
        else:  # transposed convs: no correction
            return
        total = s if total is None else total + s
        count += c
    if total is None:
        return
    layer.bias.data -= (total / count).to(layer.bias.dtype)
