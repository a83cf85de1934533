"""Re-export shipped releases in the current checkpoint format and measure them again.

    python scripts/reexport.py checkpoints/sal/unet_r18.fp32_sal_scenes [more release dirs]
    python scripts/reexport.py --golden-only checkpoints/*/*

For each release: load it, rebuild the data of the training command on its card (composed the way
``python -m zoo.train`` composes it), write it again with ``zoo.save`` (today: a float model's
weights stored as float16), evaluate the model exactly as re-saved on the test split, and rewrite
its metrics, golden pair, sample images and card. The training-form metrics and ``best_val`` are
kept: they describe the training run, which is not repeated. ``reexported`` in config.json records
the previous weights' sha256 and this command.

``--golden-only`` rewrites only each release's golden pair in the current format (images as 8-bit
codes), after checking that the release still gives the output its old pair stored; weights, metrics
and card are untouched.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from zoo.cards import read_golden, write_card, write_golden
from zoo.checkpoint import load, packed_copy, read_config, save
from zoo.tasks import get_task
from zoo.train import validate

HEADER = {"format_version", "arch", "model_args", "task", "input_contract", "quant", "metrics", "weights",
          "created"}


def reexport(directory: Path) -> dict:
    cfg = read_config(directory)
    command = cfg.get("train", {}).get("command", "")
    if not command.startswith("python -m zoo.train"):
        raise SystemExit(f"{directory}: no training command on the card ({command!r}); only trained releases")
    overrides = [a for a in shlex.split(command)[3:] if "=" in a]
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        tcfg = compose("train", overrides=overrides)
    task_cls, dm_cls, _, _ = validate(tcfg, overrides)
    data_kw = {k: v for k, v in OmegaConf.to_container(tcfg.data, resolve=True).items()
               if k not in ("name", "release_tag")}
    dm = dm_cls(batch_size=tcfg.batch_size, seed=tcfg.seed, **data_kw)
    dm.setup("fit")
    dm.setup("test")
    model = load(directory)
    old_sha = cfg["weights"]["sha256"]
    packed = packed_copy(model)
    res = task_cls.evaluate(packed, dm.test_dataloader())
    kept = {k: v for k, v in cfg["metrics"].items() if k.endswith("_training_form") or k == "best_val"}
    metrics = {**kept, **{f"test_{k}": v for k, v in res.items()}, **task_cls.extra_metrics(packed)}
    extra = {k: v for k, v in cfg.items() if k not in HEADER}
    extra["reexported"] = {"command": f"python scripts/reexport.py {directory}", "previous_sha256": old_sha,
                           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "torch": torch.__version__}
    save(model, directory, metrics=metrics, extra=extra)
    loaded = load(directory)
    x = task_cls.golden_input(dm)
    if not torch.equal(task_cls.golden_output(loaded, x), task_cls.golden_output(packed, x)):
        raise RuntimeError(f"{directory}: the re-saved release differs from the model that was measured")
    write_golden(partial(task_cls.golden_output, loaded), x, directory)
    print(f"\n{directory}\n{task_cls.report(loaded, dm, directory)}")
    write_card(directory)
    return {k: (cfg["metrics"].get(k), v) for k, v in metrics.items() if k.startswith("test_")}


def regolden(directory: Path) -> None:
    model = load(directory)
    output = partial(get_task(model.task).golden_output, model)
    x, expected = read_golden(directory)
    diff = (output(x) - expected).abs().max().item()
    if diff > 1e-4 * expected.abs().max().item():
        raise RuntimeError(f"{directory}: the release no longer gives its golden output (max diff {diff})")
    before = (directory / "golden.safetensors").stat().st_size
    write_golden(output, x, directory)
    print(f"{directory}: golden pair {before:,} -> {(directory / 'golden.safetensors').stat().st_size:,} bytes")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("releases", nargs="+", type=Path)
    p.add_argument("--golden-only", action="store_true", help="rewrite only the golden pairs")
    args = p.parse_args(argv)
    for d in args.releases:
        if args.golden_only:
            regolden(d)
            continue
        for k, (before, after) in reexport(d).items():
            print(f"  {k}: {before} -> {after}")


if __name__ == "__main__":
    main(sys.argv[1:])
