"""``python -m zoo.ptq``: post-training quantization of a float release from the command line.

It composes the same Hydra groups as ``zoo.train`` (task, data, quant — the last unused: PTQ always
calibrates MinMax quantizers; ``quant.overrides_from=`` a ``python -m zoo.mixed`` bits file sets per-layer
bits) plus ``calib`` (real | zeroq | dsg | ddaq | coleq | psaq) and ``algo`` (base | log2 | repq | apq: the
vision-transformer methods of zoo/ptq/vit.py), calibrates (``rounding=learned``: block reconstruction;
``distill.steps=N``: then label-free distillation on the calibration images; ``calib=ddaq|coleq``: the quantized
model trained on a generator's samples, ``zoo.ptq.ddaq`` / ``zoo.ptq.coleq``), evaluates the packed
model on the test split and writes a release with a card, like ``zoo.train``.
"""
from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..train import (ConfigError, checked_cli, exit_on_user_error, hardware, split_sizes, task_and_data,
                     with_overrides)
from .calibrate import ROUNDINGS
from .estimators import ESTIMATORS

log = logging.getLogger(__name__)
GROUPS = ("quant", "data", "task", "calib", "algo")
SOFTMAX = {"uniform": None, "log2": "Log2", "logsqrt2": "LogSqrt2", "mpq": "MPQ"}  # algo.softmax -> spec
GENERATORS = ("ddaq", "coleq")  # calibration sources with a generator and a training stage


def _command() -> str:
    return "python -m zoo.ptq " + " ".join(sys.argv[1:])


def _check(cfg: DictConfig):
    task_cls = task_and_data(cfg)
    for key in ("wbits", "abits"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
            raise ConfigError(f"{key}={v!r} is not a valid PTQ bit width; valid: integers 2..8 "
                              "(1-bit models need training: python -m zoo.train)")
    if cfg.keep_bits is not None and (isinstance(cfg.keep_bits, bool) or cfg.keep_bits not in range(2, 9)):
        raise ConfigError(f"keep_bits={cfg.keep_bits!r} is not valid; valid: null or an integer 2..8")
    st = cfg.distill.steps
    if isinstance(st, bool) or not isinstance(st, int) or st < 0:
        raise ConfigError(f"distill.steps={st!r} is not valid; valid: 0 (off) or a positive integer")
    if cfg.rounding not in ROUNDINGS:
        raise ConfigError(f"rounding={cfg.rounding!r} is not valid; valid: {list(ROUNDINGS)}")
    if isinstance(cfg.recon.iters, bool) or not isinstance(cfg.recon.iters, int) or cfg.recon.iters < 1:
        raise ConfigError(f"recon.iters={cfg.recon.iters!r} is not valid; valid: an integer >= 1")
    if cfg.estimator not in ESTIMATORS:
        raise ConfigError(f"estimator={cfg.estimator!r} is not valid; valid: {list(ESTIMATORS)}")
    for key in ("n",) + (("warmup", "steps", "batch_size") if cfg.calib.name in GENERATORS else ()):
        v = cfg.calib[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"calib.{key}={v!r} is not valid; valid: an integer >= 1")
    if cfg.algo.softmax not in SOFTMAX:
        raise ConfigError(f"algo.softmax={cfg.algo.softmax!r} is not valid; valid: {list(SOFTMAX)}")
    if cfg.algo.get("weight_clip", "minmax") not in ("minmax", "percentile"):
        raise ConfigError(f"algo.weight_clip={cfg.algo.weight_clip!r} is not valid; valid: ['minmax', 'percentile']")
    if cfg.algo.blockwise and not 0 <= cfg.algo.eliminate < 1:
        raise ConfigError(f"algo.eliminate={cfg.algo.eliminate!r} is not valid; valid: a fraction in [0, 1)")
    if not cfg.init_from:
        raise ConfigError("init_from= is required: the float release to quantize (a shipped name or a directory)")
    from .calibrate import ptq_config

    with_overrides(ptq_config(cfg.wbits, cfg.abits), cfg.quant.get("overrides_from"))  # a bad file fails here
    return task_cls


def _real_images(dm, n: int):
    import torch

    from .calibrate import batches

    out, have = [], 0
    for x in batches(dm.train_dataloader()):  # model-ready inputs, as training feeds them
        out.append(x[: n - have])
        have += len(out[-1])
        if have >= n:
            break
    return torch.cat(out)


def float_release(cfg: DictConfig, task_cls, starts: str):
    """The float release ``init_from`` names, checked to be float and of the run's task."""
    from ..checkpoint import CheckpointError, load

    try:
        fp = load(str(cfg.init_from))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init_from={cfg.init_from!r}: {e}") from None
    if fp.quant is not None:
        raise ConfigError(f"init_from={cfg.init_from!r} is already quantized; {starts} from a float release")
    if fp.task != task_cls.task_name:
        raise ConfigError(f"init_from={cfg.init_from!r} is a task={fp.task} model, not task={task_cls.task_name}")
    return fp


def datamodule(cfg: DictConfig, task_cls):
    """The run's DataModule (cfg.data), set up for its training split."""
    data_kw = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
               if k not in ("name", "release_tag")}
    dm = task_cls.datamodules[cfg.data.name](batch_size=cfg.batch_size, seed=cfg.seed, **data_kw)
    dm.setup("fit")
    return dm


def run(cfg: DictConfig, command: str | None = None) -> dict:
    import lightning as L
    import torch

    from ..cards import write_card, write_golden
    from ..checkpoint import load, packed_copy, save
    from .calibrate import calibrate, ptq_config
    from .synthesize import synthesize

    command = command or _command()
    task_cls = _check(cfg)
    fp = float_release(cfg, task_cls, "PTQ starts")
    if cfg.quant.get("overrides_from"):
        from ..mixed.search import check_layers, load_bits

        try:
            check_layers(load_bits(cfg.quant.overrides_from), [n for n, _ in fp.net.named_modules()])
        except ValueError as e:
            raise ConfigError(f"quant.overrides_from={cfg.quant.overrides_from!r}: {e}") from None
    L.seed_everything(cfg.seed, workers=True)
    dm = datamodule(cfg, task_cls)
    if not task_cls.contract_fits(fp.input_contract, dm.input_contract()):
        raise ConfigError(f"init_from={cfg.init_from!r} does not fit data={cfg.data.name} "
                          f"(its input contract: {fp.input_contract})")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    real = _real_images(dm, cfg.calib.n)
    gen = None
    if cfg.calib.name == "ptq":
        data = real
    elif cfg.calib.name in GENERATORS:
        from . import ddaq

        c = cfg.calib
        gen = ddaq.warm_up(fp, tuple(real.shape[1:]), c.warmup, batch_size=c.batch_size, lr=c.lr_g, ce=c.ce,
                           width=c.width, seed=cfg.seed)
        data = ddaq.sample(gen, c.n, seed=cfg.seed, batch_size=c.batch_size)
    elif cfg.calib.name == "psaq":
        from .psaq import synthesize_psaq

        data = synthesize_psaq(fp, cfg.calib.n, seed=cfg.seed, shape=tuple(real.shape[1:]), iters=cfg.calib.iters,
                               lr=cfg.calib.lr, batch_size=cfg.calib.batch_size)
    else:
        opts = {k: cfg.calib[k] for k in ("iters", "lr", "slack", "sci") if k in cfg.calib}
        data = synthesize(fp, "zeroq" if cfg.calib.name == "zeroq" else "dsg", n=cfg.calib.n, seed=cfg.seed,
                          shape=tuple(real.shape[1:]), **opts)
    t_data = time.perf_counter() - t0
    keep = None
    if cfg.task.get("keep_layers"):
        keep = {g: cfg.keep_bits for g in cfg.task.keep_layers}
    qcfg = with_overrides(ptq_config(cfg.wbits, cfg.abits, keep=keep, softmax=SOFTMAX[cfg.algo.softmax]),
                          cfg.quant.get("overrides_from"))
    source, method_meta = fp, {"name": cfg.algo.name, "softmax": cfg.algo.softmax}
    if cfg.algo.reparam:  # RepQ-ViT: fold per-channel post-LayerNorm grids into a copy of the float model
        import copy

        from .vit import repq_reparameterize

        source = copy.deepcopy(fp)
        folded = repq_reparameterize(source, data, cfg.abits, batch_size=cfg.batch_size, method=cfg.estimator)
        method_meta["reparameterised"] = sorted(folded)
    if cfg.algo.get("weight_clip", "minmax") == "percentile":  # RepQ-ViT's per-channel weight range search
        import copy
        from fnmatch import fnmatch

        from .vit import PERCENTILES, clip_weights

        source = copy.deepcopy(source) if source is fp else source
        kept = lambda name: next((b for g, b in (keep or {}).items() if fnmatch(name, g)), cfg.wbits)  # noqa: E731
        method_meta["weight_clip"] = {"percentiles": list(PERCENTILES), "layers": len(clip_weights(source, kept))}
    q = calibrate(source, qcfg, data, cfg.estimator, percentile=cfg.percentile,
                  bias_correction=bool(cfg.bias_correction), batch_size=cfg.batch_size, rounding=cfg.rounding,
                  recon={**OmegaConf.to_container(cfg.recon, resolve=True), "seed": int(cfg.seed)})
    if cfg.algo.reparam:
        from .vit import apply_ranges

        apply_ranges(q, folded)
    if cfg.algo.blockwise:
        from .vit import apq_blockwise

        opts = {k: cfg.algo[k] for k in ("eliminate", "rounds")}
        report = apq_blockwise(q, source, data, grid=tuple(cfg.algo.grid), batch_size=cfg.batch_size, **opts)
        method_meta.update(opts, grid=list(cfg.algo.grid), blocks=report)
    generator_stage, recovered = None, None
    if gen is not None:
        generator_stage, recovered = _train_with_generator(cfg, q, fp, gen)
        data = ddaq.sample(gen, cfg.calib.n, seed=cfg.seed + 1, batch_size=cfg.calib.batch_size)  # the grid's
    distilled = None
    if cfg.distill.steps:
        from .distill import distill

        t1 = time.perf_counter()
        d = OmegaConf.to_container(cfg.distill, resolve=True)
        losses = distill(q, fp, data, seed=int(cfg.seed), **d)
        distilled = {**d, "first_loss": round(losses[0], 6), "last_loss": round(losses[-1], 6),
                     "seconds": round(time.perf_counter() - t1, 1)}
    seconds = round(time.perf_counter() - t0, 1)
    packed = packed_copy(q)
    test = dm.test_dataloader()
    if cfg.limit_test_batches:
        test = [b for _, b in zip(range(int(cfg.limit_test_batches)), test)]
    with torch.no_grad():
        metrics = {f"test_{k}": v for k, v in task_cls.evaluate(packed, test).items()}
        metrics.update(task_cls.extra_metrics(packed))
    calib = {"data": "real" if cfg.calib.name == "ptq" else cfg.calib.name, "n": int(len(data)),
             "estimator": cfg.estimator, "bias_correction": bool(cfg.bias_correction), "rounding": cfg.rounding,
             "reconstruction": _recon_meta(cfg, q), "distill": distilled, "trained": generator_stage,
             "synthesis": None if cfg.calib.name == "ptq" else OmegaConf.to_container(cfg.calib, resolve=True),
             "data_seconds": round(t_data, 1), "method": method_meta}
    release = save(q, cfg.release_dir, metrics=metrics, extra={"ptq": {
        "command": command, "init_from": str(cfg.init_from), "data": cfg.data.name,
        "splits": split_sizes(dm), "calibration": calib,
        "mixed": _mixed_meta(cfg.quant.get("overrides_from")), "seconds": seconds, "hardware": hardware(),
        "torch": torch.__version__}})
    if cfg.calib.name != "ptq":
        save_grid(data[:64], release / "synthetic.png")
    if recovered is not None:
        save_grid(recovered, release / "recovered.png")
    loaded = load(release)
    x = task_cls.golden_input(dm)
    write_golden(partial(task_cls.golden_output, loaded), x, release)  # the task's tensor form of the output
    print(f"\nrelease: {release}\n{task_cls.report(loaded, dm, release)}\ncalibration: {calib['data']}, "
          f"{calib['n']} images, estimator {cfg.estimator}, {seconds} s")
    write_card(release)
    return {"metrics": metrics, "release_dir": str(release), "seconds": seconds}


def _train_with_generator(cfg, q, fp, gen) -> tuple:
    """DDAQ's adversarial stage or CoLeQ's contrastive one on the calibrated ``q``: (what the card
    reports, CoLeQ's recovered samples or None)."""
    c = OmegaConf.to_container(cfg.calib, resolve=True)
    t = time.perf_counter()
    if cfg.calib.name == "ddaq":
        from .ddaq import adversarial

        recovered = None
        hist = adversarial(q, fp, gen, c["steps"], seed=int(cfg.seed), **{k: c[k] for k in (
            "batch_size", "lr_g", "lr_q", "beta", "ce", "layer_importance", "probes")})
        meta = {"layer_weights": [round(w, 4) for w in hist.pop("layer_weights")]}
    else:
        from .coleq import train

        hist = train(q, fp, gen, c["steps"], seed=int(cfg.seed), width=c["enc_width"], **{k: c[k] for k in (
            "batch_size", "lr_g", "lr_q", "lr_e", "lam", "tau", "ce", "queue", "recover", "momentum")})
        hist.pop("encoder")
        recovered = hist.pop("recovered")
        meta = {}
    return {"method": cfg.calib.name, "steps": c["steps"], "seconds": round(time.perf_counter() - t, 1), **meta,
            **{f"{k}_loss": [round(v[0], 6), round(v[-1], 6)] for k, v in hist.items()}}, recovered


def _recon_meta(cfg, q) -> dict | None:
    """The reconstruction's settings and, per unit, its output MSE with nearest and learned rounding."""
    from .calibrate import RECON_ATTR

    if cfg.rounding != "learned":
        return None
    report = getattr(q, RECON_ATTR, {})
    return {**OmegaConf.to_container(cfg.recon, resolve=True),
            "unit_mse": {k: [round(a, 6), round(b, 6), kept] for k, (a, b, kept) in report.items()}}


def _mixed_meta(path) -> dict | None:
    """What the bits file of ``quant.overrides_from`` says about its search (not the bits: config.json
    has them as per-layer overrides)."""
    if not path:
        return None
    import json

    meta = {k: v for k, v in json.loads(Path(path).read_text()).items() if k not in ("bits", "format")}
    return {"file": str(path), **meta}


def save_grid(images, path: Path, nrow: int = 8) -> Path:
    """A PNG grid of images in [0, 1] (N x C x H x W)."""
    import numpy as np
    from PIL import Image

    x = images.detach().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    grid = np.ones((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = x[i].permute(1, 2, 0).numpy()
    img = (grid * 255).round().astype(np.uint8)
    Image.fromarray(img[..., 0] if c == 1 else img[..., :3]).save(path)
    return path


@hydra.main(config_path="../configs", config_name="ptq", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


def cli() -> None:
    checked_cli(GROUPS, main)
