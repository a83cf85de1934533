"""Learned weight rounding by block-wise output reconstruction (AdaRound, Nagel et al. ICML 2020;
block granularity as BRECQ, Li et al. ICLR 2021).

For each unit of the quantized model, in order — a residual block (a child of an ``nn.Sequential`` /
``nn.ModuleList`` that holds quantized layers) or a quantized layer outside any block — the rounding
of every weight is learned so the unit's output matches the float model's:

- soft weights ``W~ = s * (clamp(floor(W / s) + z + h(V), 0, 2^b - 1) - z)`` on the layer's own
  per-channel MinMax grid (s, z), with the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma)
  + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, V initialised so h(V) = frac(W / s) (the soft weights
  start at the float weights);
- loss ``mean_batch ||f_q(x_q) - f(x)||^2 + lam * sum (1 - |2 h(V) - 1|^beta)``: the unit's input
  ``x_q`` comes from the quantized model with the earlier units already reconstructed, the target
  from the float model (BRECQ's choice); activations are quantized inside the unit as the inference
  path does (the calibrated, frozen ranges); the regulariser is off for the first ``warmup`` of the
  iterations, then beta anneals linearly from 20 to 2 (AdaRound's schedule);
- Adam on V only; at the end each weight rounds up where h(V) >= 0.5, down otherwise (a unit whose
  output error ends above nearest rounding's keeps nearest rounding). The elements
  that define a channel's range (its min and max) keep their nearest codes, 0 and 2^b - 1, throughout,
  so the rounded weights re-quantize to the same grid and to exactly the learned codes.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quantizers import quantized_layers
from ..quantizers.uniform import MinMaxWeight, _amin_amax

ZETA, GAMMA = 1.1, -0.1


def units(net: nn.Module) -> list[str]:
    """Names of the reconstruction units of ``net``, in module order (see the module docstring)."""
    out = []
    for name, layer in quantized_layers(net):
        if not isinstance(layer.wq, MinMaxWeight):
            continue
        parts, unit = name.split("."), name
        for i in range(1, len(parts)):
            parent = net.get_submodule(".".join(parts[:i - 1])) if i > 1 else net
            if isinstance(parent, (nn.Sequential, nn.ModuleList)):
                unit = ".".join(parts[:i])
                break
        if unit not in out:
            out.append(unit)
    return out


def _h(v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


class _Rounding:
    """The learned rounding of one layer's weights on its frozen per-channel grid."""

    def __init__(self, layer):
        wq = layer.wq
        w = layer.weight.detach()
        q, s, z, _ = wq.codes(w)                 # s, z broadcast against w
        _, self.scale, self.zero = wq.integer_form(w)  # [C], what restore() takes
        self.layer, self.n = layer, 2 ** wq.bits - 1
        self.s, self.z = torch.broadcast_to(s, w.shape), torch.broadcast_to(z, w.shape)
        self.q_nearest = q
        t = w / self.s
        self.base = torch.floor(t)
        frac = (t - self.base).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        lo, hi = _amin_amax(w, wq.per_channel, wq.ch_axis)  # the grid's range, as MinMaxWeight takes it
        self.fixed = (w == lo.clamp(max=0)) | (w == hi.clamp(min=0))  # these keep their nearest codes

    def soft(self):
        q = torch.where(self.fixed, self.q_nearest, torch.clamp(self.base + self.z + _h(self.v), 0, self.n))
        return self.s * (q - self.z)

    def reg(self, beta):
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_codes(self):
        q = torch.clamp(self.base + self.z + (_h(self.v) >= 0.5).to(self.base.dtype), 0, self.n)
        return torch.where(self.fixed, self.q_nearest, q)


def _record(model, module, batches, what: str) -> list[torch.Tensor]:
    """The ``module``'s single tensor input (``what="input"``) or its output, for every batch."""
    got = []

    def pre(mod, args):
        if len(args) != 1 or not torch.is_tensor(args[0]):
            raise ValueError("reconstruction units must take one tensor input")
        got.append(args[0].detach())

    h = (module.register_forward_pre_hook(pre) if what == "input" else
         module.register_forward_hook(lambda mod, args, out: got.append(out.detach())))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        h.remove()
    return got


def reconstruct(qmodel: nn.Module, fmodel: nn.Module, batches: list[torch.Tensor], iters: int = 500,
                lr: float = 1e-3, lam: float = 0.01, batch_size: int = 32, warmup: float = 0.2,
                seed: int = 0, progress: bool = True) -> dict:
    """Learn the weight rounding of ``qmodel`` (calibrated, MinMax weights) unit by unit against the
    float ``fmodel`` on the input ``batches``; rewrites the quantized layers' weights in place so they
    quantize to the learned codes. Returns {unit: (output MSE with nearest rounding, with the learned
    rounding, which one the unit keeps)}: a unit whose learned rounding ends with a larger output error
    than nearest rounding keeps nearest rounding."""
    from tqdm.auto import tqdm

    from .calibrate import _net

    if iters < 1:
        raise ValueError(f"iters={iters} is not valid; valid: an integer >= 1")
    qnet, fnet = _net(qmodel), _net(fmodel)
    gen = torch.Generator().manual_seed(seed)
    report = {}
    names = units(qnet)
    for unit in tqdm(names, desc="reconstruction (units)", disable=not progress, leave=False):
        qb, fb = qnet.get_submodule(unit), fnet.get_submodule(unit)
        x = torch.cat(_record(qmodel, qb, batches, "input"))
        y = torch.cat(_record(fmodel, fb, batches, "output"))
        layers = [m for _, m in quantized_layers(qb) if isinstance(m.wq, MinMaxWeight)]  # qb itself too

        def err():
            with torch.no_grad():
                return sum(float(((qb(x[i:i + 256]) - y[i:i + 256]) ** 2).sum()) for i in range(0, len(x), 256)) / len(x)

        before = err()  # nearest rounding
        rounds = [_Rounding(m) for m in layers]
        for r in rounds:
            r.layer.quant_weight = r.soft  # the instance attribute shadows the method during training
        frozen = [(p, p.requires_grad) for p in qb.parameters()]  # only the roundings V learn
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            _learn(qb, rounds, x, y, iters, lr, lam, batch_size, warmup, gen)
        finally:
            for p, req in frozen:
                p.requires_grad_(req)
            for r in rounds:
                del r.layer.quant_weight
        saved = [r.layer.weight.detach().clone() for r in rounds]
        for r in rounds:
            with torch.no_grad():
                r.layer.weight.copy_(r.layer.wq.restore(r.hard_codes(), r.scale, r.zero))
        after = err()
        if after > before:  # the hard rounding can end above nearest rounding: keep nearest then
            with torch.no_grad():
                for r, w in zip(rounds, saved):
                    r.layer.weight.copy_(w)
        report[unit] = (before, after, "learned" if after <= before else "nearest")
    return report


def _learn(qb, rounds, x, y, iters, lr, lam, batch_size, warmup, gen) -> None:
    """Adam on the roundings' V: the unit's output error, plus the annealed rounding regulariser
    after the warm-up."""
    opt = torch.optim.Adam([r.v for r in rounds], lr=lr)
    start = int(warmup * iters)
    for it in range(iters):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        loss = ((qb(x[idx]) - y[idx]) ** 2).flatten(1).sum(1).mean()
        if it >= start:
            beta = 20 + (2 - 20) * (it - start) / max(1, iters - start - 1)
            loss = loss + lam * sum(r.reg(beta) for r in rounds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
