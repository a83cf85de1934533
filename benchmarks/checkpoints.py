"""Re-measure every shipped checkpoint of a task through ``zoo.load``, the way a user would.

    python benchmarks/checkpoints.py --task cls                 # Fashion-MNIST's test split
    python benchmarks/checkpoints.py --task sr                  # the built-in test photos
    python benchmarks/checkpoints.py --task sr --data DIR       # your own HR photos (any size)
    python benchmarks/checkpoints.py --task sal --data DIR      # your DUTS-style folder
    python benchmarks/checkpoints.py --task sal --limit 128     # only the first 128 test images
    python benchmarks/checkpoints.py --task sr --backend onnxruntime   # through the ONNX export

The test data is the task's (its ``benchmark_loader``: the built-in test split, or ``--data`` in
the task's user format); the table is the task's summary table of the re-measured numbers (the
cards' tables show the numbers the training commands measured, and over seeds where there are
several). Prints it and saves it to benchmarks/results/<task>_checkpoints[_<folder>].md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import zoo
from zoo.registry import resolve_checkpoint
from zoo.tasks import get_task, task_names
from zoo.train import hardware


def remeasure(task: str, data: str | None = None, limit: int | None = None,
              link_from: Path | None = None, backend: str = "auto") -> str:
    """The task's summary table of every shipped model's metrics as measured now; links to the
    cards are relative to ``link_from`` (the folder the table is saved in) when given."""
    task_cls = get_task(task)
    rows, described, seconds = [], set(), {}
    for name in zoo.list_models(task=task):
        d = resolve_checkpoint(name)
        cfg = json.loads((d / "config.json").read_text())
        if backend == "onnxruntime" and name.split(".", 1)[0] == "mmdet":
            continue
        model = zoo.load(name, backend=backend)
        loader, desc = task_cls.benchmark_loader(model, data, limit)
        described.add(desc)
        t = time.time()
        res = task_cls.evaluate(model, loader)
        seconds[name] = time.time() - t
        cfg = {**{k: v for k, v in cfg.items() if k != "seeds"},  # this run's numbers only
               "metrics": {**{f"test_{k}": v for k, v in res.items()}, **task_cls.extra_metrics(model)}}
        rows.append((d, cfg))
    lines = [f"Packed models through zoo.load (backend={backend!r}); {hardware()}, torch {torch.__version__}"]
    lines += [f"- {t}" for t in sorted(described)]
    lines += ["- evaluation seconds: " + ", ".join(f"{n} {s:.1f}" for n, s in seconds.items()), ""]
    table = task_cls.summary_table(rows)
    if link_from:
        for d, _ in rows:
            table = table.replace(f"]({d}/README.md)", f"]({os.path.relpath(d, link_from)}/README.md)")
    return "\n".join(lines) + "\n" + table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=task_names())
    ap.add_argument("--data", default=None, help="a folder in the task's user format to evaluate on instead")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    ap.add_argument("--out", default=None, help="where to save the table (default: benchmarks/results/)")
    ap.add_argument("--backend", default="auto", help="zoo.load's backend, e.g. onnxruntime (the export extra)")
    args = ap.parse_args(argv)
    stem = f"{args.task}_checkpoints" + (f"_{Path(args.data).name}" if args.data else "") + \
        (f"_{args.backend}" if args.backend != "auto" else "")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{stem}.md"
    text = remeasure(args.task, args.data, args.limit, link_from=out.parent.resolve(), backend=args.backend)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
