"""Bit allocation: per-layer options -> the exact 3-D Pareto front -> one configuration.

Every searchable layer l has options o = (w_bits, a_bits) with three additive costs: perturbation
``Omega_w(l, w) + Omega_a(l, a)`` (from ``sensitivity``), packed bytes (``zoo.cost``'s formula) and
BOPs (``MACs_l * w * a``). A configuration's objectives are the sums over layers (plus the fixed
layers' constant part).

- ``pareto_front``: the configurations no other configuration beats on all three objectives, exactly:
  layer by layer, the front of the layers so far is combined with the next layer's options and the
  dominated combinations are pruned (a combination dominated so far stays dominated whatever the
  remaining layers choose, so nothing on the final front is lost). Pruning sorts by (size, BOPs,
  perturbation) and keeps a point if no kept point has BOPs <= and perturbation <=, a prefix-minimum
  query over BOPs ranks (Fenwick tree): O(N log N) per layer.
- ``tradeoff_point``: HTQ's automatic choice, no constraint to set: each objective is min-max
  normalised over the front and the point nearest the ideal point (0, 0, 0) is taken (our reading of
  "automatically determined trade-off point"; the seed states the goal, not the rule).
- ``within_budget``: the least perturbation among front points with size <= ``size`` and BOPs <=
  ``bops``; exact for this additive model (the optimum of the budgeted problem is on the front), so
  it is the integer program's answer without an ILP solver.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..cost_model import FLOAT_BITS, SIZE_MEASURES, cost
from ..quantizers import QuantConfig

BITS_FORMAT = "zoo.mixed.bits/1"


@dataclass
class Front:
    """Pareto-optimal configurations: objective arrays and, per point, the option index per layer."""

    layers: list            # searchable layer names, in order
    options: dict           # name -> list of (w_bits, a_bits)
    perturbation: np.ndarray
    size: np.ndarray
    bops: np.ndarray
    choice: np.ndarray      # [points, layers] option indices

    def __len__(self):
        return len(self.size)

    def bits(self, i: int) -> dict:
        """{layer: (w_bits, a_bits)} of front point ``i``."""
        return {n: self.options[n][int(k)] for n, k in zip(self.layers, self.choice[i])}

    def point(self, i: int) -> dict:
        return {"perturbation": float(self.perturbation[i]), "size": int(self.size[i]), "bops": int(self.bops[i])}


def layer_table(model: nn.Module, input_shape, layers=None) -> dict:
    """name -> dict(macs, shape, ch_axis, bias) for ``layers`` (default: every conv/linear layer) of
    the (float) ``model``, from ``zoo.cost``."""
    costs = {c.name: c for c in cost(model, input_shape).layers}
    bad = [n for n in (layers or []) if n not in costs]
    if bad:
        raise ValueError(f"layer(s) {bad} are not conv/linear layers of the model; valid: {sorted(costs)}")
    return {n: {"macs": costs[n].macs, "shape": costs[n].weight_shape, "ch_axis": costs[n].ch_axis,
                "bias": costs[n].bias} for n in (layers or costs)}


def size_fn(measure: str):
    """The per-layer bytes function of a size measure: "packed" (on disk) or "nominal" (bits exactly)."""
    if measure not in SIZE_MEASURES:
        raise ValueError(f"size measure {measure!r} is not valid; valid: {list(SIZE_MEASURES)}")
    return SIZE_MEASURES[measure]


def layer_options(sens, table: dict, wbits, abits, size: str = "packed") -> dict:
    """``all_options`` with each layer's dominated options removed; ``size``: "packed" (bytes on disk)
    or "nominal" (bits per weight exactly, as papers count)."""
    out = {}
    for n, opts in all_options(sens, table, wbits, abits, size).items():
        keep = nondominated(*(np.array([o[i] for o in opts]) for i in (2, 3, 4)))
        out[n] = [opts[i] for i in sorted(keep)]
    return out


def nondominated(p: np.ndarray, s: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Indices of the points (p, s, b) that no other point is <= on all three (of equal points, one)."""
    n = len(p)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((p, b, s))
    ranks = np.searchsorted(np.unique(b), b) + 1  # 1-based BOPs ranks for the Fenwick tree
    size = int(ranks.max())
    tree = [math.inf] * (size + 1)
    kept = []
    pl, rl = p.tolist(), ranks.tolist()
    for i in order.tolist():
        r, v = rl[i], pl[i]
        j, best = r, math.inf
        while j > 0:                  # min perturbation among kept points with BOPs rank <= r
            if tree[j] < best:
                best = tree[j]
            j -= j & -j
        if best <= v:
            continue
        kept.append(i)
        j = r
        while j <= size:
            if v < tree[j]:
                tree[j] = v
            j += j & -j
    return np.array(kept, dtype=np.int64)


def pareto_front(options: dict, fixed=(0.0, 0, 0), progress: bool = True) -> Front:
    """The exact Pareto front over (perturbation, size, BOPs) of all configurations of ``options``
    (``layer_options``' output); ``fixed``: the constant (perturbation, size, BOPs) of the rest."""
    from tqdm.auto import tqdm

    names = list(options)
    p = np.array([float(fixed[0])])
    s = np.array([int(fixed[1])], dtype=np.int64)
    b = np.array([int(fixed[2])], dtype=np.int64)
    choice = np.zeros((1, 0), dtype=np.int16)
    for n in tqdm(names, desc="Pareto front", disable=not progress, leave=False):
        o = options[n]
        op = np.array([x[2] for x in o]); os_ = np.array([x[3] for x in o], dtype=np.int64)
        ob = np.array([x[4] for x in o], dtype=np.int64)
        cp, cs, cb = (p[:, None] + op[None]).ravel(), (s[:, None] + os_[None]).ravel(), (b[:, None] + ob[None]).ravel()
        keep = nondominated(cp, cs, cb)
        parent, k = np.divmod(keep, len(o))
        p, s, b = cp[keep], cs[keep], cb[keep]
        choice = np.concatenate([choice[parent], k[:, None].astype(np.int16)], axis=1)
    return Front(names, {n: [(x[0], x[1]) for x in options[n]] for n in names}, p, s, b, choice)


def tradeoff_point(front: Front) -> int:
    """Index of the front point nearest the ideal point after min-max normalising each objective."""
    cols = []
    for v in (front.perturbation, front.size.astype(float), front.bops.astype(float)):
        span = v.max() - v.min()
        cols.append((v - v.min()) / span if span > 0 else np.zeros_like(v))
    return int(np.argmin(np.sqrt(sum(c ** 2 for c in cols))))


def within_budget(front: Front, size: float | None = None, bops: float | None = None) -> int:
    """Index of the least-perturbation front point with size <= ``size`` and BOPs <= ``bops``."""
    ok = np.ones(len(front), dtype=bool)
    if size is not None:
        ok &= front.size <= size
    if bops is not None:
        ok &= front.bops <= bops
    if not ok.any():
        raise ValueError(f"no configuration fits budget size<={size}, bops<={bops}; the smallest possible: "
                         f"size {int(front.size.min())} bytes, BOPs {int(front.bops.min())}")
    idx = np.flatnonzero(ok)
    return int(idx[np.argmin(front.perturbation[idx])])


def uniform_point(options: dict, w: int, a: int, fixed=(0.0, 0, 0)) -> dict:
    """Objectives of the uniform configuration (every searchable layer at w bits, inputs at a bits);
    ``options`` from ``all_options`` (``layer_options`` may have pruned the uniform option)."""
    tot = [float(fixed[0]), int(fixed[1]), int(fixed[2])]
    for n, opts in options.items():
        match = [o for o in opts if o[0] == w and o[1] == a]
        if not match:
            raise ValueError(f"layer {n!r} has no option w{w}a{a}")
        for i in range(3):
            tot[i] += match[0][2 + i]
    return {"perturbation": tot[0], "size": tot[1], "bops": tot[2]}


def all_options(sens, table: dict, wbits, abits, size: str = "packed") -> dict:
    """name -> list of (w_bits, a_bits, perturbation, size, bops) for every (w, a) pair (no inputs
    quantized when ``abits`` is empty)."""
    nbytes = size_fn(size)
    out = {}
    for n, t in table.items():
        out[n] = [(w, a, sens.weight[n][w] + (sens.act[n][a] if a != FLOAT_BITS else 0.0),
                   nbytes(t["shape"], w, t["ch_axis"], t["bias"]), t["macs"] * w * a)
                  for w in wbits for a in (abits or (FLOAT_BITS,))]
    return out


# ------------------------------------------------------------------ configs and files
def apply_bits(cfg: QuantConfig, bits: dict) -> QuantConfig:
    """``cfg`` with per-layer overrides giving each named layer its (w_bits, a_bits): the layer's own
    quantizer specs (from ``cfg``) with the bit widths replaced. Earlier overrides keep their place
    after the new, exact-name ones."""
    new = {}
    for name, (w, a) in bits.items():
        base = cfg.for_layer(name)
        if base is None or base.weight is None:
            raise ValueError(f"layer {name!r} is not quantized by the config, so it has no bits to set")
        act = base.act
        if act is not None and a is not None and a != FLOAT_BITS:
            act = dataclasses.replace(act, bits=int(a))
        new[_escape(name)] = dataclasses.replace(base, weight=dataclasses.replace(base.weight, bits=int(w)), act=act)
    # (an earlier override under the very same key as a new one is replaced, not merged over it)
    rest = {k: v for k, v in cfg.overrides if k not in new}
    return QuantConfig(weight=cfg.weight, act=cfg.act, overrides={**new, **rest},
                       version=cfg.version, extra=cfg.extra)


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def save_bits(path, bits: dict, meta: dict | None = None) -> Path:
    """Write the per-layer bit widths (``quant.overrides_from=`` reads it) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": BITS_FORMAT, "bits": {n: {"weight": int(w), "act": None if a is None else int(a)}
                                            for n, (w, a) in bits.items()}, **(meta or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
    return path


def load_bits(path) -> dict:
    """{layer: (w_bits, a_bits)} from a file ``save_bits`` wrote; errors name the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"overrides_from={str(path)!r}: no such file (write one with python -m zoo.mixed)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"overrides_from={str(path)!r} is not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != BITS_FORMAT or not isinstance(d.get("bits"), dict):
        raise ValueError(f"overrides_from={str(path)!r} is not a {BITS_FORMAT} file (keys format, bits)")
    out = {}
    for n, e in d["bits"].items():
        w, a = (e or {}).get("weight"), (e or {}).get("act")
        if not isinstance(w, int) or not 1 <= w <= 8 or (a is not None and (not isinstance(a, int) or not 1 <= a <= 8)):
            raise ValueError(f"overrides_from={str(path)!r}: layer {n!r} has bits {e!r}; valid: weight 1..8, "
                             "act 1..8 or null")
        out[n] = (w, a)
    return out


def check_layers(bits: dict, names) -> None:
    """Every layer the bits file names must exist in the model."""
    names = list(names)
    bad = [n for n in bits if not any(fnmatch.fnmatchcase(m, _escape(n)) for m in names)]
    if bad:
        raise ValueError(f"the bits file names layer(s) {bad} the model does not have; its layers: {names}")


def plot_front(front: Front, path, chosen: int | None = None, tradeoff: int | None = None,
               uniform: dict | None = None, title: str = "") -> Path:
    """PNG of the front: size vs BOPs coloured by perturbation, and size vs perturbation; the chosen
    and trade-off points and the uniform configurations (``{"w3a4": point, ...}``) marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    kb = front.size / 1024
    gb = front.bops / 1e9
    sc = axes[0].scatter(kb, gb, c=np.log10(front.perturbation + 1e-12), s=4, cmap="viridis")
    fig.colorbar(sc, ax=axes[0], label="log10 perturbation")
    axes[1].scatter(kb, front.perturbation, s=4, c="0.6")
    axes[1].set_yscale("log")
    for ax, y in ((axes[0], gb), (axes[1], front.perturbation)):
        ax.set_xlabel("weights, KiB (packed)")
        if tradeoff is not None:
            ax.scatter([kb[tradeoff]], [y[tradeoff]], marker="^", s=120, c="tab:orange", edgecolors="k",
                       label="trade-off point", zorder=3)
        if chosen is not None:
            ax.scatter([kb[chosen]], [y[chosen]], marker="*", s=220, c="tab:red", edgecolors="k",
                       label="chosen", zorder=4)
        for name, u in (uniform or {}).items():
            uy = u["bops"] / 1e9 if ax is axes[0] else u["perturbation"]
            ax.scatter([u["size"] / 1024], [uy], marker="x", s=60, c="k", zorder=3)
            ax.annotate(name.upper(), (u["size"] / 1024, uy), fontsize=8, xytext=(3, 3), textcoords="offset points")
    axes[0].set_ylabel("GBOPs per image")
    axes[1].set_ylabel("total perturbation")
    axes[1].legend(loc="upper right", fontsize=8)
    fig.suptitle(title or f"Pareto front: {len(front)} configurations (x: uniform)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
