"""MAE / max F-measure / S-measure of every shipped saliency checkpoint, through ``zoo.load``.

    python benchmarks/sal_checkpoints.py                 # the built-in test composites (512)
    python benchmarks/sal_checkpoints.py --data DIR      # your DUTS-style folder (images/ + masks/)
    python benchmarks/sal_checkpoints.py --limit 128     # only the first 128 test images

Images are resized to each model's training size (its ``input_contract['train_size']``). With
``--data`` the folder's ``test/`` split is used if it has one, else every pair in it. Prints a
markdown table (with the quantized layers' bytes against float32) and saves it to
benchmarks/results/sal_checkpoints[_<folder>].md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import zoo
from zoo.cards import packed_layer_bytes
from zoo.registry import resolve_checkpoint
from zoo.tasks.data.sal import CompositeSalData, PairSet, check_readable, pair_files
from zoo.tasks.sal import evaluate
from zoo.train import hardware


def dataset(size: int, data: str | None):
    if data is None:
        dm = CompositeSalData(size=size)
        return dm.split("test"), f"built-in test composites ({size}x{size})"
    root = Path(data)
    folder = root / "test" if (root / "test").is_dir() else root
    pairs = pair_files(folder)
    check_readable(pairs)
    return PairSet(pairs, size), f"{len(pairs)} image/mask pairs from {folder}, resized to {size}x{size}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a DUTS-style folder to evaluate on instead")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ap.add_argument("--out", default=None, help="where to save the table (default: benchmarks/results/)")
    args = ap.parse_args()
    stem = "sal_checkpoints" + (f"_{Path(args.data).name}" if args.data else "")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{stem}.md"
    rows, fp, desc = [], {}, set()
    for name in zoo.list_models(task="sal"):
        d = resolve_checkpoint(name)
        cfg = json.loads((d / "config.json").read_text())
        ds, text = dataset(cfg["input_contract"]["train_size"][0], args.data)
        if args.limit:
            ds = Subset(ds, range(min(args.limit, len(ds))))
        desc.add(text)
        t = time.time()
        res = evaluate(zoo.load(name), DataLoader(ds, batch_size=16))
        secs = time.time() - t
        if cfg["quant"] is None:
            fp[cfg["arch"]] = res["mae"]
        layers = packed_layer_bytes(d)
        low = min(layers) if layers else None
        lb = f"1/{layers[low][1] / layers[low][0]:.1f} (W{low})" if low is not None else "-"
        rows.append((name, cfg["arch"], res, (d / "model.safetensors").stat().st_size, lb, secs))
    lines = [f"Packed models through zoo.load (reference backend); {hardware()}, torch {torch.__version__}"]
    lines += [f"- {t}" for t in sorted(desc)]
    lines += ["", "| model | MAE | vs FP32 (same arch) | max F | S-measure | images | weights bytes | "
                  "low-bit layers vs FP32 | eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, arch, r, wb, lb, secs in sorted(rows, key=lambda r: (r[1], "fp32" not in r[0], r[0])):
        gap = f"{r['mae'] - fp[arch]:+.4f}" if arch in fp and "fp32" not in name else "-"
        lines.append(f"| {name} | {r['mae']:.4f} | {gap} | {r['maxf']:.4f} | {r['smeasure']:.4f} | "
                     f"{r['images']} | {wb:,} | {lb} | {secs:.1f} |")
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
