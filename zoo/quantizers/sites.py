"""Activation quantizers with one parameter set per *call site* of a layer.

A layer whose weights are shared by several inputs in one forward (a detection head applied to every
FPN level) sees inputs whose statistics differ per call: AQD (Chen et al., CVPR 2021) gives such a
head per-level normalisation and quantizer parameters. ``LayerQuant(act_sites=n)`` gives the layer
``n`` activation quantizers used in turn: the k-th call of a forward uses site ``k mod n``; packed
layers keep ``n`` sets of activation parameters the same way. The module that makes the calls resets
the count before each forward and checks it after (``track_sites``), so a forward interrupted
half-way, or a layer called a number of times other than ``n``, can never shift the sites silently.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import ActQuantizer


class MultiSiteAct(ActQuantizer):
    """``n`` activation quantizers of one spec; call ``k`` (since the last reset) uses ``sites[k % n]``.
    Exports (and restores) every parameter as the concatenation over sites, so a packed layer stores
    tensors of ``n`` times the single-site length."""

    def __init__(self, quantizers: list[ActQuantizer]):
        first = quantizers[0]
        super().__init__(first.bits, first.ch_axis)
        self.sites = nn.ModuleList(quantizers)
        self.mode = first.mode
        self.calls = 0

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def next_site(self) -> ActQuantizer:
        q = self.sites[self.calls % self.num_sites]
        self.calls += 1
        return q

    def forward(self, x):
        return self.next_site()(x)

    def params(self, x):
        raise TypeError("MultiSiteAct has one parameter set per call site: use export() or sites[k].params()")

    @torch.no_grad()
    def export(self) -> dict:
        parts = [q.export() for q in self.sites]
        return {k: torch.cat([p[k].reshape(-1) for p in parts]) for k in parts[0]}

    @torch.no_grad()
    def restore(self, params: dict) -> None:
        n = self.num_sites
        for i, q in enumerate(self.sites):
            q.restore({k: v.reshape(n, -1)[i].clone() for k, v in params.items()})

    def extra_repr(self):
        return f"sites={self.num_sites}"


def site_counters(root: nn.Module):
    """The modules under ``root`` that count their calls (multi-site quantizers, packed layers)."""
    return [m for m in root.modules() if getattr(m, "num_sites", 1) > 1 and hasattr(m, "calls")]


def reset_sites(root: nn.Module) -> None:
    for m in site_counters(root):
        m.calls = 0


def _pre_hook(module, args):
    reset_sites(module)


def _post_hook(module, args, output):
    for m in site_counters(module):
        if m.calls != m.num_sites:
            name = next((n for n, c in module.named_modules() if c is m), "?")
            name = name[:-len(".aq")] if name.endswith(".aq") else name  # the layer, not its quantizer
            raise RuntimeError(f"{type(module).__name__}: layer {name!r} has {m.num_sites} activation sites "
                               f"(act_sites) but was called {m.calls} times in one forward; act_sites must "
                               f"equal the number of calls per forward")


def track_sites(module: nn.Module) -> nn.Module:
    """Reset the call count of every multi-site layer under ``module`` before each of its forwards and
    check after it that each was called exactly ``num_sites`` times. Install once on the module that
    makes the calls (the detection head); layers quantized or packed later are found at call time."""
    module.register_forward_pre_hook(_pre_hook)
    module.register_forward_hook(_post_hook)
    return module
