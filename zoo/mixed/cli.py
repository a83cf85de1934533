"""``python -m zoo.mixed``: sensitivity, Pareto front and bit allocation for a float release."""
from __future__ import annotations

import fnmatch
import json
import re
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..train import ConfigError, checked_cli, exit_on_user_error, task_and_data

GROUPS = ("quant", "data", "task")
UNIFORM = re.compile(r"^w([1-8])a([1-8])$")


def _bits_list(name, v) -> tuple:
    v = list(v) if v is not None else []
    if not v or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in v):
        raise ConfigError(f"{name}={v!r} is not valid; valid: a non-empty list of bit widths 2..8")
    return tuple(sorted(set(v)))


def _budget(key, v, wbits, abits):
    """A budget: None, a positive number, or (W, A) for w<W>a<A> (that uniform configuration's value)."""
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return float(v)
    m = UNIFORM.match(str(v))
    if m and int(m.group(1)) in wbits and int(m.group(2)) in abits:
        return int(m.group(1)), int(m.group(2))
    raise ConfigError(f"budget.{key}={v!r} is not valid; valid: null, a positive number, or w<W>a<A> with W in "
                      f"wbits_choices {list(wbits)} and A in abits_choices {list(abits)}")


def _pairs(dm, n):
    """The first ``n`` training samples as (input, target) batches."""
    from .measure import input_target

    out, have = [], 0
    for b in dm.train_dataloader():
        x, y = input_target(b)
        out.append((x[: n - have], None if y is None else y[: n - have]))
        have += len(out[-1][0])
        if have >= n:
            break
    return out


def run(cfg: DictConfig, command: str | None = None) -> dict:
    import lightning as L

    from ..ptq.cli import datamodule, float_release
    from ..cost_model import FLOAT_BITS
    from .search import (all_options, layer_options, layer_table, pareto_front, plot_front, save_bits, size_fn,
                         tradeoff_point, uniform_point, within_budget)
    from .measure import METHODS, sensitivity

    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not valid; valid: {list(METHODS)}")
    task_cls = task_and_data(cfg)
    wbits, abits = _bits_list("wbits_choices", cfg.wbits_choices), _bits_list("abits_choices", cfg.abits_choices)
    n = cfg.calib.n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"calib.n={n!r} is not valid; valid: an integer >= 1")
    budget = {k: _budget(k, cfg.budget[k], wbits, abits) for k in ("size", "bops")}
    if cfg.size_measure not in ("packed", "nominal"):
        raise ConfigError(f"size_measure={cfg.size_measure!r} is not valid; valid: ['packed', 'nominal']")
    kb = cfg.keep_bits
    if kb is not None and (isinstance(kb, bool) or kb not in range(2, 9)):
        raise ConfigError(f"keep_bits={kb!r} is not valid; valid: null or an integer 2..8")
    fp = float_release(cfg, task_cls, "the search starts")
    L.seed_everything(cfg.seed, workers=True)
    dm = datamodule(cfg, task_cls)
    pairs = _pairs(dm, n)
    shape = (1, *pairs[0][0].shape[1:])
    table_all = layer_table(fp, shape)
    keep = list(cfg.task.get("keep_layers") or [])
    searched = [m for m in table_all if not any(fnmatch.fnmatchcase(m, g) for g in keep)]
    kept = [m for m in table_all if m not in searched]
    fb = FLOAT_BITS if kb is None else int(kb)
    nbytes = size_fn(cfg.size_measure)
    fixed = (0.0, sum(nbytes(table_all[m]["shape"], fb, table_all[m]["ch_axis"], table_all[m]["bias"])
                      for m in kept), sum(table_all[m]["macs"] * fb * fb for m in kept))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sens = sensitivity(fp, pairs, cfg.method, searched, wbits, abits, estimator=cfg.estimator,
                       max_iter=int(cfg.max_iter), tol=float(cfg.tol), seed=int(cfg.seed))
    table = {m: table_all[m] for m in searched}
    front = pareto_front(layer_options(sens, table, wbits, abits, cfg.size_measure), fixed)
    full = all_options(sens, table, wbits, abits, cfg.size_measure)

    def uniform(w, a):
        return uniform_point(full, w, a, fixed)

    size, bops = (uniform(*v)[k] if isinstance(v, tuple) else v for k, v in budget.items())
    trade = tradeoff_point(front)
    chosen = trade if size is None and bops is None else within_budget(front, size, bops)
    seconds = round(time.perf_counter() - t0, 1)
    uni = {f"w{w}a{a}": uniform(w, a) for w in wbits for a in abits if w == a or (w, a) in ((3, 4), (2, 4))}
    bits = front.bits(chosen)
    meta = {"command": command or "python -m zoo.mixed " + " ".join(sys.argv[1:]), "method": cfg.method,
            "init_from": str(cfg.init_from), "calibration": {"data": cfg.data.name, "n": n},
            "budget": {"size": cfg.budget.size, "bops": cfg.budget.bops}, "size_measure": cfg.size_measure,
            "point": front.point(chosen), "tradeoff_point": front.point(trade), "kept": {m: fb for m in kept},
            "front_size": len(front), "sensitivity_seconds": round(sens.seconds, 2), "seconds": seconds}
    save_bits(out / "bits.json", bits, meta)
    (out / "sensitivity.json").write_text(json.dumps(sens.to_dict(), indent=1))
    (out / "front.json").write_text(json.dumps({"perturbation": front.perturbation.tolist(),
                                                 "size": front.size.tolist(), "bops": front.bops.tolist(),
                                                 "chosen": chosen, "tradeoff": trade, "uniform": uni}))
    plot_front(front, out / "front.png", chosen, trade, uni,
               title=f"{cfg.method.upper()} front of {cfg.init_from}: {len(front)} configurations")
    print(f"\n{cfg.method}: sensitivity {sens.seconds:.1f} s (+{sens.prep_seconds:.1f} s perturbations), "
          f"front of {len(front)} configurations, {seconds} s in all")
    print("| layer | W | A |\n|---|---|---|")
    for m, (w, a) in bits.items():
        print(f"| {m} | {w} | {a} |")
    p = front.point(chosen)
    print(f"chosen: size {p['size']:,} B, {p['bops']:,} BOPs, perturbation {p['perturbation']:.4g}")
    for k, u in uni.items():
        print(f"uniform {k}: size {u['size']:,} B, {u['bops']:,} BOPs, perturbation {u['perturbation']:.4g}")
    print(f"wrote {out / 'bits.json'} and {out / 'front.png'}; use it: python -m zoo.ptq ... "
          f"quant.overrides_from={out / 'bits.json'}")
    return {"bits": bits, "point": p, "output_dir": str(out), "seconds": seconds}


@hydra.main(config_path="../configs", config_name="mixed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


def cli() -> None:
    checked_cli(GROUPS, main)
