"""Per-layer quantization sensitivity: how much the loss moves when one layer's weights or input
activations are quantized to b bits, for every candidate b.

Both methods share the perturbations: ``dW(b) = Q_b(W) - W`` with the PTQ weight quantizer (MinMax,
per output channel, nearest rounding) and ``dx(b) = Q_b(x) - x`` on the layer's input with the PTQ
activation grid (range from the calibration data by ``estimator``, per b). They differ in how the
loss reacts to a perturbation:

- **HAWQ** (Dong et al., HAWQ-V2, NeurIPS 2020): second order, ``Omega = Tr(H) / n * ||d||^2`` with
  the trace of the loss Hessian block of that tensor estimated by Hutchinson's method,
  ``Tr(H) = E_v[v^T H v]`` over Rademacher vectors v (Hessian-vector products by double
  back-propagation; every layer's weight block from the same v, as PyHessian does, the activation
  blocks from a second product of their own), iterated until every
  block's running mean changes by less than ``tol`` (relative) or ``max_iter`` iterations (PyHessian's
  defaults: 1e-3, 100). For activations H is the Hessian w.r.t. the layer's input (HAWQ-V2's
  activation sensitivity), averaged over the calibration batches.
- **HTQ** (seed 003): first order, connection sensitivity: the first-order change of the loss when
  connection i moves by its quantization error is ``g_i * d_i`` (SNIP's saliency ``g * w`` with the
  perturbation in place of the weight); the layer's saliency is ``Omega = E_batch sum_i (g_i d_i)^2``,
  gradients only (one pass over the calibration data, no Hessian). The square makes it estimate the
  same second-order quantity as HAWQ with the empirical Fisher ``E[g g^T]`` (which equals the Hessian's
  Gauss-Newton part near a minimum) in place of the Hessian. The seed gives the criterion, not the
  formula: with the absolute value ``sum_i |g_i d_i|`` instead, the per-layer ranking on resnet20 had
  a Spearman correlation of about 0 with HAWQ's (weights, 2-8 bits; 0.92 squared), so the squared
  form is the one implemented.

- **direct** (a measured reference, neither paper's): quantize that one tensor (everything else float)
  and take the mean loss change on the calibration data; one forward pass over the data per layer
  and bit width. Used to check the two estimates against what they estimate.

``loss_fn(output, target)`` defaults to cross-entropy for integer targets and MSE otherwise; with no
targets (data-free images) a classifier's own argmax labels are the targets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import batch_input
from ..ptq.estimators import RangeObserver, check_estimator, fake_quant
from ..quantizers import MinMax
from ..quantizers.config import build_quantizer
from ..wrapper import ZooModel

METHODS = ("htq", "hawq", "direct")
BITS = (2, 3, 4, 8)


@dataclass
class Sensitivity:
    """``weight[name][b]`` / ``act[name][b]``: the loss perturbation of quantizing that tensor to b bits."""

    method: str
    weight: dict = field(default_factory=dict)
    act: dict = field(default_factory=dict)
    seconds: float = 0.0          # the method's own statistic (gradient pass / Hutchinson iterations)
    prep_seconds: float = 0.0     # the shared perturbations (activation ranges, dW, dx)
    iterations: int = 0           # Hutchinson iterations (HAWQ)

    def to_dict(self) -> dict:
        def plain(d):
            return {n: {str(b): float(v) for b, v in per.items()} for n, per in d.items()}
        return {"method": self.method, "weight": plain(self.weight), "act": plain(self.act),
                "seconds": self.seconds, "prep_seconds": self.prep_seconds, "iterations": self.iterations}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        def typed(x):
            return {n: {int(b): float(v) for b, v in per.items()} for n, per in x.items()}
        return cls(d["method"], typed(d["weight"]), typed(d["act"]), d.get("seconds", 0.0),
                   d.get("prep_seconds", 0.0), d.get("iterations", 0))


def _net(model):
    return model.net if isinstance(model, ZooModel) else model


def _check_bits(name: str, bits) -> tuple:
    bits = tuple(sorted({int(b) for b in bits}))
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise ValueError(f"{name}={bits} is not valid; valid: bit widths in 2..8")
    return bits


def input_target(batch) -> tuple:
    """(input, target) of a batch: a tensor is an input without target; a tuple, list or dict holds the
    input first (as ``zoo.datasets.batch_input`` reads it) and the target second, if any."""
    if torch.is_tensor(batch):
        return batch, None
    items = list(batch.values()) if isinstance(batch, dict) else list(batch)
    return batch_input(items[0]), (items[1] if len(items) > 1 else None)


def _pairs(data):
    """(input, target) pairs from a tensor of images (target None) or an iterable of batches."""
    if torch.is_tensor(data):
        return [(data[i:i + 64], None) for i in range(0, len(data), 64)]
    return [input_target(b) for b in data]


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not target.is_floating_point():
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def _targets(model, pairs):
    out = []
    for x, y in pairs:
        if y is None:
            with torch.no_grad():
                o = model(x)
            if o.dim() != 2:
                raise ValueError("data without targets works for classifiers only (argmax labels); "
                                 "pass (input, target) batches")
            y = o.argmax(1)
        out.append((x, y))
    return out


def _layers(net: nn.Module, layers) -> dict:
    mods = dict(net.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; valid: {[n for n, m in mods.items() if hasattr(m, 'weight')]}")
    return {n: mods[n] for n in layers}


def _capture(targets: dict, store: dict):
    """Forward pre-hooks giving each layer a private alias of its input (``view_as``: a new autograd
    node), stored by name: the gradient and Hessian w.r.t. it are those through that layer alone, not
    through the other consumers of the same tensor (a residual branch, a sibling layer)."""
    def make(name):
        def hook(mod, args):
            x = args[0].view_as(args[0])
            store[name] = x
            return (x, *args[1:])
        return hook
    return [m.register_forward_pre_hook(make(n)) for n, m in targets.items()]


@torch.no_grad()
def _perturbations(model, targets, pairs, wbits, abits, estimator):
    """dW per layer and bits; per layer and bits the activation range (lo, hi) from the data."""
    d_w = {}
    for name, mod in targets.items():
        w = mod.weight.detach()
        d_w[name] = {b: build_quantizer(MinMax(b, granularity="channel"), "weight", mod)(w) - w for b in wbits}
    obs = {n: RangeObserver(max_samples=2 ** 16, per_batch=2 ** 14, seed=i) for i, n in enumerate(targets)}
    store: dict = {}
    hooks = _capture(targets, store)
    try:
        for x, _ in pairs:
            store.clear()
            model(x)
            for n, t in store.items():
                obs[n].update(t)
    finally:
        for h in hooks:
            h.remove()
    ranges = {n: {b: obs[n].range(b, estimator) for b in abits} for n in targets}
    return d_w, ranges


def sensitivity(model: nn.Module, data, method: str = "htq", layers=None, wbits=BITS, abits=BITS, *,
                loss_fn: Callable | None = None, estimator: str = "mse", max_iter: int = 100, tol: float = 1e-3,
                seed: int = 0, progress: bool = True) -> Sensitivity:
    """Sensitivity of each of ``layers`` (names; default every conv/linear layer) of the float
    ``model`` to quantizing its weights to each of ``wbits`` and its input to each of ``abits``
    (``abits=()``: weights only). ``data``: (input, target) batches, or a tensor of images."""
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; valid: {list(METHODS)}")
    check_estimator(estimator)
    wbits = _check_bits("wbits", wbits)
    abits = _check_bits("abits", abits) if abits else ()
    was_training = model.training
    model.eval()
    net = _net(model)
    if layers is None:
        layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
    targets = _layers(net, layers)
    loss_fn = loss_fn or default_loss
    pairs = _targets(model, _pairs(data))
    t0 = time.perf_counter()
    d_w, ranges = _perturbations(model, targets, pairs, wbits, abits, estimator)
    prep = time.perf_counter() - t0
    params = [m.weight for m in targets.values()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        t0 = time.perf_counter()
        if method == "htq":
            out = _htq(model, targets, pairs, loss_fn, d_w, ranges, progress)
        elif method == "direct":
            out = _direct(model, targets, pairs, loss_fn, d_w, ranges, progress)
        else:
            out = _hawq(model, targets, pairs, loss_fn, d_w, ranges, max_iter, tol, seed, progress)
        out.seconds = time.perf_counter() - t0
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
        model.train(was_training)
    out.prep_seconds = prep
    return out


def _htq(model, targets, pairs, loss_fn, d_w, ranges, progress) -> Sensitivity:
    from tqdm.auto import tqdm

    res = Sensitivity("htq", {n: dict.fromkeys(d_w[n], 0.0) for n in targets},
                      {n: dict.fromkeys(ranges[n], 0.0) for n in targets})
    store: dict = {}
    hooks = _capture(targets, store)
    try:
        for x, y in tqdm(pairs, desc="HTQ saliency", disable=not progress, leave=False):
            store.clear()
            x = x.detach().clone().requires_grad_(True)  # so the first layer's input has a gradient too
            for m in targets.values():
                m.weight.grad = None
            out = model(x)
            for t in store.values():
                t.retain_grad()
            loss_fn(out, y).backward()
            with torch.no_grad():
                for n, m in targets.items():
                    g = m.weight.grad
                    for b, d in d_w[n].items():
                        res.weight[n][b] += float(((g * d) ** 2).sum()) / len(pairs)
                    t = store[n]
                    if t.grad is None:
                        continue
                    gx, xv = t.grad, t.detach()
                    for b, (lo, hi) in ranges[n].items():
                        res.act[n][b] += float(((gx * (fake_quant(xv, lo, hi, b) - xv)) ** 2).sum()) / len(pairs)
    finally:
        for h in hooks:
            h.remove()
        for m in targets.values():
            m.weight.grad = None
    return res


@torch.no_grad()
def _direct(model, targets, pairs, loss_fn, d_w, ranges, progress) -> Sensitivity:
    from tqdm.auto import tqdm

    def mean_loss():
        return sum(float(loss_fn(model(x), y)) for x, y in pairs) / len(pairs)

    base = mean_loss()
    res = Sensitivity("direct")
    for n, mod in tqdm(targets.items(), desc="direct sensitivity", disable=not progress, leave=False):
        w = mod.weight.detach().clone()
        res.weight[n] = {}
        for b, d in d_w[n].items():
            mod.weight.copy_(w + d)
            try:
                res.weight[n][b] = mean_loss() - base
            finally:
                mod.weight.copy_(w)
        res.act[n] = {}
        for b, (lo, hi) in ranges[n].items():
            h = mod.register_forward_pre_hook(lambda m, a, lo=lo, hi=hi, b=b: (fake_quant(a[0], lo, hi, b), *a[1:]))
            try:
                res.act[n][b] = mean_loss() - base
            finally:
                h.remove()
    return res


def _hawq(model, targets, pairs, loss_fn, d_w, ranges, max_iter, tol, seed, progress) -> Sensitivity:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    names = list(targets)
    w_trace = dict.fromkeys(names, 0.0)     # running means of v^T H v per tensor
    a_trace = dict.fromkeys(names, 0.0)     # ... per activation element (averaged over batches)
    a_sq = {n: dict.fromkeys(ranges[n], 0.0) for n in names}  # mean ||dx(b)||^2 per batch
    store: dict = {}
    hooks = _capture(targets, store)
    it = 0
    try:
        bar = tqdm(range(max_iter), desc="HAWQ Hutchinson", disable=not progress, leave=False)
        for it in bar:
            w_est, a_est = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
            for x, y in pairs:
                store.clear()
                x = x.detach().clone().requires_grad_(True)
                out = model(x)
                loss = loss_fn(out, y)
                acts = [n for n in names if ranges[n] and n in store and store[n].requires_grad]
                tensors = [targets[n].weight for n in names] + [store[n] for n in acts]
                grads = torch.autograd.grad(loss, tensors, create_graph=True)
                vs = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for t in tensors]
                # weights and activations in separate products (as HAWQ-V2 estimates them): a block's
                # estimate v_l^T (H v)_l carries cross terms v_l^T H_lm v_m (zero in expectation, not in
                # variance) from the other blocks of its own product only
                k = len(names)
                hv = list(torch.autograd.grad(grads[:k], tensors[:k], grad_outputs=vs[:k], allow_unused=True,
                                              retain_graph=bool(acts)))
                if acts:
                    hv += torch.autograd.grad(grads[k:], tensors[k:], grad_outputs=vs[k:], allow_unused=True)
                with torch.no_grad():
                    for i, n in enumerate(names):
                        w_est[n] += float((vs[i] * hv[i]).sum()) / len(pairs) if hv[i] is not None else 0.0
                    for j, n in enumerate(acts):
                        k = len(names) + j
                        per_elem = float((vs[k] * hv[k]).sum()) / store[n].numel() if hv[k] is not None else 0.0
                        a_est[n] += per_elem / len(pairs)
                        if it == 0:
                            xv = store[n].detach()
                            for b, (lo, hi) in ranges[n].items():
                                a_sq[n][b] += float(((fake_quant(xv, lo, hi, b) - xv) ** 2).sum()) / len(pairs)
            change = 0.0
            for n in names:
                for run, est in ((w_trace, w_est), (a_trace, a_est)):
                    new = run[n] + (est[n] - run[n]) / (it + 1)
                    if it > 0:
                        change = max(change, abs(new - run[n]) / (abs(new) + 1e-6))
                    run[n] = new
            if it > 0 and change < tol:
                break
    finally:
        for h in hooks:
            h.remove()
    res = Sensitivity("hawq", iterations=it + 1)
    for n in names:
        per_w = w_trace[n] / targets[n].weight.numel()
        res.weight[n] = {b: per_w * float((d ** 2).sum()) for b, d in d_w[n].items()}
        res.act[n] = {b: a_trace[n] * a_sq[n][b] for b in ranges[n]}
    return res


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences (average ranks for ties)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")

    def ranks(v):
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in torch.unique(v):  # ties: the average rank
            m = v == u
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))
