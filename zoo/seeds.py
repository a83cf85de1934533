"""``python -m zoo.seeds seeds=[0,1,2] task=sr bits=2 scale=4``: one recipe trained with several seeds.

Each seed is an ordinary ``zoo.train`` run of the same overrides plus ``seed=<s>`` into
``<output_dir>/seed<s>/`` (a seed whose release already exists from the same command is reused; one
that was interrupted resumes from its last checkpoint, so several processes can share the work). The
released checkpoint is the *median* seed by the task's monitored test metric, copied to
``release_dir``; its ``config.json`` gains a ``seeds`` record (every seed's test metrics, their mean
and sample standard deviation) that the card and the summary tables show as mean +- std. The card's
command is this one, so the numbers on it reproduce from it.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

RESERVED = ("seed", "output_dir", "release_dir", "ckpt_path")


def parse_seeds(text: str) -> list[int]:
    """``[0,1,2]`` or ``0,1,2`` -> [0, 1, 2]; at least two distinct seeds."""
    body = text.strip().removeprefix("[").removesuffix("]")
    try:
        seeds = [int(s) for s in body.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds={text!r} is not a list of integers; e.g. seeds=[0,1,2]") from None
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={text!r}: give at least two distinct seeds, e.g. seeds=[0,1,2]")
    return seeds


def split_args(argv: list[str]) -> tuple[list[int], list[str]]:
    """(seeds, the training overrides) from the command line; the overrides may not set RESERVED
    keys other than ``output_dir``/``release_dir`` (where the runs and the median release go)."""
    seeds, rest = None, []
    for a in argv:
        key = a.split("=", 1)[0].lstrip("+")
        if key == "seeds":
            seeds = parse_seeds(a.split("=", 1)[1])
        elif key in ("seed", "ckpt_path"):
            raise ValueError(f"{a!r}: zoo.seeds sets {key} itself for each seed; remove it")
        else:
            rest.append(a)
    if seeds is None:
        raise ValueError("missing seeds=[...]; e.g. python -m zoo.seeds seeds=[0,1,2] task=cls bits=2")
    return seeds, rest


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def seed_overrides(overrides: list[str], seed: int, out: Path) -> list[str]:
    kept = [a for a in overrides if a.split("=", 1)[0].lstrip("+") not in RESERVED]
    return kept + [f"seed={seed}", f"output_dir={out}/seed{seed}"]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_metric(task_cls) -> tuple[str, str]:
    """("test_<metric>", mode) for the task's monitored validation metric."""
    key, mode = task_cls.monitor
    return "test_" + key.split("/", 1)[1], mode


def summarise(runs: dict[int, dict], key: str, mode: str) -> dict:
    """Mean and sample std of every numeric test metric over seeds; the median seed by ``key``."""
    numeric = sorted({k for m in runs.values() for k, v in m.items()
                      if isinstance(v, (int, float)) and k.startswith("test_")})
    mean = {k: statistics.fmean(m[k] for m in runs.values()) for k in numeric if all(k in m for m in runs.values())}
    std = {k: statistics.stdev(m[k] for m in runs.values()) for k in mean}
    order = sorted(runs, key=lambda s: (runs[s][key], s), reverse=mode == "max")
    return {"metric": key, "mode": mode, "selected": order[(len(order) - 1) // 2],
            "runs": {str(s): runs[s] for s in sorted(runs)}, "mean": mean, "std": std}


def _copy_release(src: Path, dst: Path) -> None:
    """Copy a release directory over ``dst`` atomically (temp copy + rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp / "d")
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
            os.replace(dst, old / "d")
            os.replace(tmp / "d", dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / "d", dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_seeds(seeds: list[int], overrides: list[str]) -> dict:
    """Train (or reuse) every seed, release the median one with the seed statistics."""
    from .cards import write_card
    from .train import ConfigError, run, validate

    base = compose(overrides)
    task_cls = validate(base, overrides)[0]
    key, mode = test_metric(task_cls)
    out = Path(base.output_dir)
    runs, seconds = {}, {}
    for s in seeds:
        ov = seed_overrides(overrides, s, out)
        command = "python -m zoo.train " + " ".join(ov)
        rel = out / f"seed{s}" / "release"
        done = _read(rel / "config.json")
        if done and done.get("train", {}).get("command") == command:
            print(f"seed {s}: reusing {rel}")
            runs[s], seconds[s] = done["metrics"], done["train"].get("train_seconds")
            continue
        last = out / f"seed{s}" / "checkpoints" / "last.ckpt"
        cfg = compose(ov + (["ckpt_path=last"] if last.is_file() else []))
        print(f"seed {s}: {command}" + (" (resuming)" if last.is_file() else ""))
        runs[s] = run(cfg, command=command, overrides=ov)["metrics"]
        seconds[s] = _read(rel / "config.json")["train"].get("train_seconds")
        if key not in runs[s]:
            raise ConfigError(f"seed {s} reported no {key} (evaluate_packed=false?)")
    record = {**summarise(runs, key, mode), "runs_dir": str(out),
              "train_seconds": {str(k): v for k, v in seconds.items()}}
    release = Path(base.release_dir)
    _copy_release(out / f"seed{record['selected']}" / "release", release)
    cfg_path = release / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["train"]["seed_command"] = cfg["train"]["command"]
    cfg["train"]["command"] = "python -m zoo.seeds " + " ".join(
        [f"seeds=[{','.join(map(str, seeds))}]"] + overrides)
    cfg["seeds"] = record
    tmp = cfg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.replace(cfg_path)
    write_card(release)
    m, sd = record["mean"][key], record["std"][key]
    print(f"\n{key} over seeds {seeds}: {m:.4f} +- {sd:.4f}; released seed {record['selected']} "
          f"(the median) to {release}")
    return record


def main(argv=None) -> int:
    from .train import ConfigError

    try:
        seeds, overrides = split_args(sys.argv[1:] if argv is None else argv)
        run_seeds(seeds, overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
