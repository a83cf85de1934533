"""Post-training quantization methods for vision transformers (used by ``python -m zoo.ptq method=...``).

- ``repq_reparameterize`` (RepQ-ViT, Li et al., ICCV 2023): the inputs of ``attn.qkv`` and ``mlp.fc1``
  come out of a LayerNorm and differ wildly between channels, so they are quantized per channel
  (scale s_c, zero point z_c) and the per-channel grid is then folded into a per-tensor one
  (s~ = mean s_c, z~ = round(mean z_c)) by rewriting the LayerNorm's affine and the next Linear:
  with r1 = s_c / s~ and r2 = z_c - z~ (an integer),

      LayerNorm:  gamma' = gamma / r1,  beta' = beta / r1 + s~ r2        (its output X' = X / r1 + s~ r2)
      Linear:     W'[:, c] = W[:, c] r1_c,  b' = b - W' (s~ r2)           (so W' X' + b' = W X + b)

  and round(X'_c / s~) + z~ = round(X_c / s_c) + z_c: the per-tensor codes of X' are exactly the
  per-channel codes of X. The float function is unchanged (up to float rounding); the layers' input
  quantizers then get the fixed per-tensor grid (s~, z~). The weights get RepQ-ViT's per-channel range
  search (``percentile_clip``: quantiles 0.999 / 0.9999 / 0.99999 by squared error, as its code does).
- ``apq_blockwise`` (APQ-ViT, Ding et al., ACM MM 2022): block by block, each activation quantizer's
  range (uniform ranges, the softmax quantizer's scale) is searched over multiples of its calibrated
  value to minimise the block output error weighted by the squared gradient of the task loss at the
  block output (a diagonal Hessian estimate, as BRECQ/PTQ4ViT), with *bottom elimination*: the
  positions whose output error is among the smallest ``eliminate`` fraction are dropped from the loss,
  so the calibration spends its effort on the errors that matter. Earlier blocks are already quantized
  when a block is calibrated. The paper's elimination fraction and search grid are not public
  (no official code); ours are options (``eliminate``, ``grid``, ``rounds``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..quantizers.logq import LogAct, MPQAct
from ..quantizers.quantize import quantized_layers, quantized_ops
from ..quantizers.uniform import MinMaxAct
from .calibrate import _net, batches
from .estimators import estimate_range


def blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks (modules with ``norm1``, ``attn``, ``norm2``, ``mlp``), in order."""
    return [(n, m) for n, m in net.named_modules()
            if all(hasattr(m, k) for k in ("norm1", "attn", "norm2", "mlp"))]


def ln_linear_pairs(net: nn.Module) -> list[tuple[str, str]]:
    """(LayerNorm, the Linear it feeds) of every block: norm1 -> attn.qkv, norm2 -> mlp.fc1."""
    out = []
    for name, b in blocks(net):
        p = f"{name}." if name else ""
        if isinstance(b.norm1, nn.LayerNorm) and isinstance(getattr(b.attn, "qkv", None), nn.Linear):
            out.append((p + "norm1", p + "attn.qkv"))
        if isinstance(b.norm2, nn.LayerNorm) and isinstance(getattr(b.mlp, "fc1", None), nn.Linear):
            out.append((p + "norm2", p + "mlp.fc1"))
    return out


def channel_grid(x: torch.Tensor, bits: int, method: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, zero point) of rows ``x`` [R, C] on the MinMax activation grid."""
    n = 2 ** bits - 1
    s, z = torch.empty(x.shape[1], dtype=torch.float64), torch.empty(x.shape[1], dtype=torch.float64)
    for c in range(x.shape[1]):
        lo, hi = estimate_range(x[:, c], bits, method)
        s[c] = max((hi - lo) / n, 1e-8)
        z[c] = round(-lo / float(s[c]))
    return s, z


@torch.no_grad()
def fold_channel_grid(norm: nn.LayerNorm, linear: nn.Linear, s: torch.Tensor, z: torch.Tensor, bits: int):
    """Rewrite ``norm`` and ``linear`` (in place) so the per-channel grid (s, z) of the norm's output
    becomes the per-tensor grid (mean s, round(mean z)); returns that grid's (lo, hi) range."""
    s_t, z_t = float(s.mean()), float(torch.round(z.mean()))
    r1, r2 = s / s_t, z - z_t
    shift = s_t * r2
    norm.weight.copy_((norm.weight.double() / r1).to(norm.weight.dtype))
    norm.bias.copy_((norm.bias.double() / r1 + shift).to(norm.bias.dtype))
    w = linear.weight.double() * r1
    linear.weight.copy_(w.to(linear.weight.dtype))
    if linear.bias is None:
        raise ValueError("RepQ-ViT's reparameterisation needs a bias on the Linear after the LayerNorm")
    linear.bias.copy_((linear.bias.double() - w @ shift).to(linear.bias.dtype))
    lo = -z_t * s_t
    return lo, lo + (2 ** bits - 1) * s_t


@torch.no_grad()
def repq_reparameterize(model: nn.Module, data, bits: int, batch_size: int = 64, method: str = "mse",
                        max_rows: int = 1 << 15) -> dict[str, tuple[float, float]]:
    """Apply RepQ-ViT's scale reparameterisation to the float ``model`` in place (see the module
    docstring). Returns {linear name: (lo, hi)}: the per-tensor input range each folded Linear's
    activation quantizer must use after calibration (``apply_ranges``)."""
    net = _net(model)
    pairs = ln_linear_pairs(net)
    if not pairs:
        raise ValueError("RepQ-ViT needs transformer blocks (norm1 -> attn.qkv, norm2 -> mlp.fc1); this model has none")
    rows = {lin: [] for _, lin in pairs}
    gen = torch.Generator().manual_seed(0)

    def keep(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            rows[name].append(x[torch.randperm(len(x), generator=gen)[:max_rows]])
        return hook

    hooks = [net.get_submodule(lin).register_forward_pre_hook(keep(lin)) for _, lin in pairs]
    was = model.training
    model.eval()
    try:
        for x in batches(data, batch_size):
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    ranges = {}
    for ln, lin in tqdm(pairs, desc="RepQ reparameterisation", leave=False):
        x = torch.cat(rows[lin])[:max_rows]
        s, z = channel_grid(x, bits, method)
        ranges[lin] = fold_channel_grid(net.get_submodule(ln), net.get_submodule(lin), s, z, bits)
    return ranges


PERCENTILES = (0.999, 0.9999, 0.99999)  # RepQ-ViT's weight clipping candidates (its quantizer.py)


@torch.no_grad()
def percentile_clip(w: torch.Tensor, bits: int, percentiles=PERCENTILES) -> torch.Tensor:
    """RepQ-ViT's per-channel weight range search as a clip of the float weights: for each output row,
    the candidates (lo, hi) = (quantile 1 - p, quantile p) give asymmetric ``bits``-bit grids (step
    (hi - lo) / (2^b - 1), zero point round(-lo / step)); the one with the smallest mean squared error
    of the row's quantized weights is kept, and the row is clamped to it. Per-channel min-max
    quantization of the clipped weights then uses exactly that grid (the clamp leaves its extremes at
    lo and hi), so it gives the codes RepQ-ViT's quantizer gives the unclipped ones."""
    rows = w.reshape(w.shape[0], -1).double()
    n = 2 ** bits - 1
    best_err = torch.full((rows.shape[0],), float("inf"), dtype=torch.float64)
    lo_best, hi_best = rows.amin(1), rows.amax(1)
    for p in percentiles:
        hi, lo = torch.quantile(rows, p, dim=1), torch.quantile(rows, 1 - p, dim=1)
        step = ((hi - lo) / n).clamp_min(1e-12)
        zero = torch.round(-lo / step)
        q = torch.clamp(torch.round(rows / step[:, None]) + zero[:, None], 0, n)
        err = ((q - zero[:, None]) * step[:, None] - rows).pow(2).mean(1)
        better = err < best_err
        best_err, lo_best, hi_best = (torch.where(better, err, best_err), torch.where(better, lo, lo_best),
                                      torch.where(better, hi, hi_best))
    return torch.maximum(torch.minimum(rows, hi_best[:, None]), lo_best[:, None]).to(w.dtype).reshape(w.shape)


@torch.no_grad()
def clip_weights(model: nn.Module, bits_of) -> list[str]:
    """``percentile_clip`` every Linear / Conv2d weight of ``model`` in place at ``bits_of(name)`` bits
    (None: left alone); returns the names clipped."""
    done = []
    for name, mod in _net(model).named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and bits_of(name):
            mod.weight.copy_(percentile_clip(mod.weight, bits_of(name)))
            done.append(name)
    return done


@torch.no_grad()
def apply_ranges(qmodel: nn.Module, ranges: dict[str, tuple[float, float]]) -> None:
    """Set the (lo, hi) range of the named layers' MinMax input quantizers."""
    net = _net(qmodel)
    for name, (lo, hi) in ranges.items():
        aq = net.get_submodule(name).aq
        if not isinstance(aq, MinMaxAct):
            raise ValueError(f"{name}: expected a MinMax input quantizer, got {type(aq).__name__}")
        aq.lo.fill_(lo), aq.hi.fill_(hi), aq.initialized.fill_(True)


# ----------------------------------------------------------------------------- APQ-ViT
def block_quantizers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, quantizer) of the activation quantizers APQ searches in one block."""
    out = [(f"{n}.aq", m.aq) for n, m in quantized_layers(block) if isinstance(m.aq, MinMaxAct)]
    for n, op in quantized_ops(block):
        for k in ("aq_a", "aq_b", "oq"):
            q = getattr(op, k, None)
            if isinstance(q, (MinMaxAct, LogAct, MPQAct)):
                out.append((f"{n}.{k}", q))
    return out


def _get(q) -> tuple:
    if isinstance(q, MinMaxAct):
        return float(q.lo), float(q.hi)
    return (float(q.scale),) if isinstance(q, LogAct) else (float(q.hi),)


def _set(q, value: tuple, a: float) -> None:
    if isinstance(q, MinMaxAct):
        q.lo.fill_(value[0] * a), q.hi.fill_(value[1] * a)
    elif isinstance(q, LogAct):
        q.scale.fill_(value[0] * a)
    else:
        q.hi.fill_(value[0] * a)


def eliminated_loss(out: torch.Tensor, target: torch.Tensor, g2: torch.Tensor, eliminate: float) -> torch.Tensor:
    """sum over positions of g2 (out - target)^2, leaving out the positions whose |out - target| is among
    the smallest ``eliminate`` fraction (APQ-ViT's bottom elimination), divided by the sample count."""
    d = (out - target).abs().flatten(1)
    e = g2.flatten(1) * d ** 2
    if eliminate > 0:
        k = max(1, int(eliminate * d.shape[1]))
        thr = d.kthvalue(k, dim=1, keepdim=True).values
        e = torch.where(d > thr, e, torch.zeros_like(e))
    return e.sum() / len(out)


def _block_io(model, block: nn.Module, data, batch_size, grad: bool):
    """Each batch's (input, output, squared gradient of the loss at the output) of ``block``."""
    store = {}
    h1 = block.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach()))

    def out_hook(m, a, o):
        store["y"] = o
        if grad:
            o.retain_grad()
    h2 = block.register_forward_hook(out_hook)
    res = []
    try:
        for x in batches(data, batch_size):
            with torch.set_grad_enabled(grad):
                logits = model(x)
                if grad:  # the float model's own prediction as the label (works on synthetic data too)
                    F.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum").backward()
            y = store["y"]
            res.append((store["x"], y.detach(), y.grad.detach() ** 2 if grad else None))
    finally:
        h1.remove(), h2.remove()
    return res


def apq_blockwise(qmodel: nn.Module, fmodel: nn.Module, data, *, eliminate: float = 0.5,
                  grid: tuple = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2),
                  rounds: int = 2, batch_size: int = 64, progress: bool = True) -> dict:
    """APQ-ViT's block-wise calibration with bottom elimination on the calibrated ``qmodel`` (in place;
    see the module docstring). ``fmodel`` is the float model it was calibrated from. Returns, per
    block, its loss before and after."""
    if not 0 <= eliminate < 1:
        raise ValueError(f"eliminate={eliminate!r} is not valid; valid: a fraction in [0, 1)")
    qnet, fnet = _net(qmodel), _net(fmodel)
    qblocks, fblocks = blocks(qnet), dict(blocks(fnet))
    if not qblocks:
        raise ValueError("APQ-ViT calibrates transformer blocks; this model has none")
    was_f, was_q = fmodel.training, qmodel.training
    fmodel.eval(), qmodel.eval()
    report = {}
    try:
        for name, qb in tqdm(qblocks, desc="APQ block calibration", disable=not progress, leave=False):
            target = _block_io(fmodel, fblocks[name], data, batch_size, grad=True)
            fmodel.zero_grad(set_to_none=True)
            inputs = [x for x, _, _ in _block_io(qmodel, qb, data, batch_size, grad=False)]

            def loss() -> float:
                with torch.no_grad():
                    return float(sum(eliminated_loss(qb(x), y, g2, eliminate)
                                     for x, (_, y, g2) in zip(inputs, target)))

            qs = block_quantizers(qb)
            base = {n: _get(q) for n, q in qs}
            best = {n: 1.0 for n, _ in qs}
            before = cur = loss()
            for _ in range(rounds):
                for n, q in qs:
                    for a in grid:
                        _set(q, base[n], a)
                        e = loss()
                        if e < cur:
                            cur, best[n] = e, a
                    _set(q, base[n], best[n])
            report[name] = {"before": round(before, 6), "after": round(cur, 6),
                            "factors": {n: best[n] for n, _ in qs}}
    finally:
        fmodel.train(was_f), qmodel.train(was_q)
        fmodel.zero_grad(set_to_none=True)
    return report
