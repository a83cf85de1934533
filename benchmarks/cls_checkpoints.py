"""Accuracy and size of every shipped classification checkpoint, measured through ``zoo.load``.

    python benchmarks/cls_checkpoints.py [--limit N]

Prints a markdown table and saves it to benchmarks/results/cls_checkpoints.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import zoo
from zoo.cards import float_reference_bytes
from zoo.registry import resolve_checkpoint
from zoo.tasks.cls import evaluate
from zoo.tasks.data.images import FashionMNISTData
from zoo.train import hardware


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cls_checkpoints.md"))
    args = ap.parse_args()
    dm = FashionMNISTData(batch_size=500, limit_test=args.limit)
    dm.setup()
    rows = []
    fp_acc = None
    for name in zoo.list_models(task="cls"):
        d = resolve_checkpoint(name)
        cfg = json.loads((d / "config.json").read_text())
        t = time.time()
        res = evaluate(zoo.load(name), dm.test_dataloader())
        secs = time.time() - t
        wbytes = (d / "model.safetensors").stat().st_size
        fbytes = float_reference_bytes(cfg)
        if cfg["quant"] is None:
            fp_acc = res["acc"]
        rows.append((name, res["acc"], res["images"], wbytes, fbytes, secs))
    lines = [f"Fashion-MNIST test split, packed models through zoo.load (reference backend); "
             f"{hardware()}, torch {torch.__version__}", "",
             "| model | top-1 % | vs FP32 (points) | images | weights bytes | FP32 bytes | smaller | eval s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, acc, n, wb, fb, secs in rows:
        gap = f"{100 * (acc - fp_acc):+.2f}" if fp_acc is not None else "n/a"
        lines.append(f"| {name} | {100 * acc:.2f} | {gap} | {n} | {wb:,} | {fb:,} | {fb / wb:.1f}x | {secs:.1f} |")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
