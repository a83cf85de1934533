"""``python -m zoo.predict <name-or-dir> <images or folders> --out DIR``: run a checkpoint on your images.

The loaded model's task (see ``zoo.tasks``) writes its outputs under ``--out``; each task documents
its outputs and adds its own options (``python -m zoo.predict --help`` lists them all):

- ``cls``: ``predictions.csv`` with the top-5 classes and probabilities of each image;
- ``sr``: the upscaled images as PNG (``<stem>_x<scale>.png``), computed in overlapping tiles so
  memory stays bounded on large photos (``--tile``, ``--overlap``; ``--depth`` for DQA models);
- ``sal``: a saliency mask (``<stem>_mask.png``, 0-255 at the image's own size) and an overlay
  (``<stem>_overlay.png``: the image with the salient region tinted red and outlined).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .datasets import IMAGE_EXTS


def collect_images(inputs) -> list[Path]:
    """Image files named directly or found (non-recursively) in the named folders, in order."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {list(map(str, inputs))}")
    return out


def build_parser() -> argparse.ArgumentParser:
    from .tasks import get_task, task_names

    ap = argparse.ArgumentParser(prog="python -m zoo.predict", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a shipped model name (see zoo.list_models()) or a checkpoint directory")
    ap.add_argument("images", nargs="+", help="image files and/or folders of images")
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--backend", default="auto", help="kernel backend: auto | triton | reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in task_names():
        task = get_task(name)
        if task.predict is not None:
            task.predict_args(ap.add_argument_group(f"task {name}"))
    return ap


def main(argv=None) -> int:
    from . import load
    from .tasks import get_task, task_names

    args = build_parser().parse_args(argv)
    try:
        model = load(args.model, backend=args.backend, map_location=args.device)
        task = get_task(model.task)
        if task.predict is None:
            raise ValueError(f"no predictor for task {model.task!r}; tasks with one: "
                             f"{[t for t in task_names() if get_task(t).predict is not None]}")
        images = collect_images(args.images)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        written = task.predict(model, images, out, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} file(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
