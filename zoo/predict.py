"""``python -m zoo.predict <name-or-dir> <images or folders> --out DIR``: run a checkpoint on your images.

The loaded model's task (see ``zoo.tasks``) writes its outputs under ``--out``; each task documents
its outputs and adds its own options (``python -m zoo.predict --help`` lists them all):

- ``cls``: ``predictions.csv`` with the top-5 classes and probabilities of each image;
- ``sr``: the upscaled images as PNG (``<stem>_x<scale>.png``), computed in overlapping tiles so
  memory stays bounded on large photos (``--tile``, ``--overlap``; ``--depth`` for DQA models);
- ``diffusion``: no images in; ``--num`` generated images (``samples.png``, a grid, and
  ``sample_<i>.png``) from ``--steps`` DDIM steps with ``--seed``;
- ``sal``: a saliency mask (``<stem>_mask.png``, 0-255 at the image's own size) and an overlay
  (``<stem>_overlay.png``: the image with the salient region tinted red and outlined);
- ``matting``: one video file or folder of frames in, streamed frame by frame with the recurrent
  state: ``alpha/<i>.png``, ``alpha.mp4`` and ``composite.mp4`` (over green or ``--background``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .datasets import IMAGE_EXTS


def collect_images(inputs) -> list[Path]:
    """Image files named directly or found (non-recursively) in the named folders, in order; a file
    named twice (or found in a folder also named) is listed once."""
    out, seen = [], set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            found = [p]
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {list(map(str, inputs))}")
    return out


MAX_PIXELS = 64_000_000  # larger images are refused (PIL's decompression-bomb guard is at 89M)


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be processed (unreadable, truncated, too large), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                return f"{w} x {h} pixels is more than the {MAX_PIXELS:,} this tool processes"
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; each is reported
        return f"not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})"
    return None


def check_device(device: str) -> str:
    """``device`` if torch can use it here; a ValueError naming the valid choices otherwise."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not supported; valid: cpu, cuda, cuda:N")
    return device


def build_parser() -> argparse.ArgumentParser:
    from .tasks import get_task, task_names

    ap = argparse.ArgumentParser(prog="python -m zoo.predict", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a shipped model name (see zoo.list_models()) or a checkpoint directory")
    ap.add_argument("images", nargs="*", help="image files and/or folders of images (none for a generator: diffusion)")
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
    from .checkpoint import read_config
    from .registry import resolve_checkpoint
    from .tasks import get_task, task_names

    args = build_parser().parse_args(argv)
    try:
        check_device(args.device)
        model = load(args.model, backend=args.backend, map_location=args.device)
        task = get_task(model.task)
        if task.predict is None:
            raise ValueError(f"no predictor for task {model.task!r}; tasks with one: "
                             f"{[t for t in task_names() if get_task(t).predict is not None]}")
        if not task.predict_takes_images:
            if args.images:
                raise ValueError(f"task {model.task} generates images and takes none; got {args.images}")
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            written = task.predict(model, [], out, args)
            print(f"wrote {len(written)} file(s) to {out}")
            return 0
        if not args.images:
            raise ValueError(f"task {model.task} needs images: give image files and/or folders after the model")
        images = (task.predict_inputs or collect_images)(args.images)
        domain = task.domain(read_config(resolve_checkpoint(args.model)))
        if domain:
            print(f"note: {args.model} knows {domain}", file=sys.stderr)
        bad = {p: why for p in images if (why := (task.input_problem or check_image)(p))}
        good = [p for p in images if p not in bad]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        written = task.predict(model, good, out, args) if good else []
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "image(s)" if task.predict_inputs is None else "input(s)"
    print(f"wrote {len(written)} file(s) for {len(good)} {what} to {out}")
    if bad:
        for p, why in bad.items():
            print(f"skipped {p}: {why}", file=sys.stderr)
        print(f"error: {len(bad)} of {len(images)} image(s) could not be processed (listed above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
