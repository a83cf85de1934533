"""PSNR/SSIM of every shipped super-resolution checkpoint next to bicubic, through ``zoo.load``.

    python benchmarks/sr_checkpoints.py                      # the built-in test images
    python benchmarks/sr_checkpoints.py --images DIR         # your own HR photos (any size)

Y-channel PSNR/SSIM with a border of ``scale`` pixels cropped (basicsr's definitions), LR made by
MATLAB-style bicubic downsampling of the HR image; DQA models also at their smaller depths. Prints
a markdown table and saves it to benchmarks/results/sr_checkpoints[_<folder>].md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import zoo
from zoo.cards import float_reference_bytes
from zoo.registry import resolve_checkpoint
from zoo.tasks.data.sr import BuiltinSRData, ImagePairs, list_images, make_pair, read_image
from zoo.tasks.sr import evaluate
from zoo.train import hardware


def loader(scale: int, images: str | None) -> tuple[DataLoader, str]:
    if images is None:
        dm = BuiltinSRData(scale=scale)
        ds = dm.split("test")
        return DataLoader(ds, batch_size=1), "built-in test images: " + ", ".join(ds.names)
    files = list_images(images)
    ds = ImagePairs([make_pair(read_image(f), scale) for f in files], [f.name for f in files])
    return DataLoader(ds, batch_size=1), f"{len(files)} images from {images}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=None, help="a folder of HR images to evaluate on instead")
    ap.add_argument("--out", default=None, help="where to save the table (default: benchmarks/results/)")
    args = ap.parse_args()
    stem = "sr_checkpoints" + (f"_{Path(args.images).name}" if args.images else "")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{stem}.md"
    rows, fp, desc = [], {}, {}
    for name in zoo.list_models(task="sr"):
        d = resolve_checkpoint(name)
        cfg = json.loads((d / "config.json").read_text())
        scale = cfg["input_contract"]["scale"]
        dl, desc[scale] = loader(scale, args.images)
        t = time.time()
        res = evaluate(zoo.load(name), dl)
        secs = time.time() - t
        if cfg["quant"] is None:
            fp[(cfg["arch"], scale)] = res["psnr"]
        depths = ", ".join(f"d{k.rsplit('depth', 1)[1]} {v:.2f}" for k, v in res.items()
                           if k.startswith("psnr_depth"))
        rows.append((name, (cfg["arch"], scale), res, (d / "model.safetensors").stat().st_size, float_reference_bytes(cfg),
                     depths, secs))
    lines = [f"Packed models through zoo.load (reference backend); {hardware()}, torch {torch.__version__}"]
    lines += [f"- x{s}: {v}" for s, v in sorted(desc.items(), reverse=True)]
    lines += ["", "| model | scale | PSNR dB | vs FP32 (same arch) | vs bicubic | SSIM | bicubic PSNR / SSIM | "
                  "fewer blocks (DQA) | weights bytes | smaller | eval s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, key, r, wb, fb, depths, secs in sorted(rows, key=lambda r: (-r[1][1], r[0])):
        gap = f"{r['psnr'] - fp[key]:+.2f}" if key in fp else "n/a"
        lines.append(f"| {name} | x{key[1]} | {r['psnr']:.2f} | {gap} | {r['psnr'] - r['bicubic_psnr']:+.2f} | "
                     f"{r['ssim']:.4f} | {r['bicubic_psnr']:.2f} / {r['bicubic_ssim']:.4f} | {depths or '-'} | "
                     f"{wb:,} | {fb / wb:.1f}x | {secs:.1f} |")
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
