"""``python -m zoo.predict <name-or-dir> <images or folders> --out DIR``: run a checkpoint on your images.

Each task registers one predictor (``@predictor("sr")``) that takes the loaded model, the image
paths and the options and writes its outputs under ``--out``:

- ``sr``: the upscaled images as PNG (``<stem>_x<scale>.png``), computed in overlapping tiles so
  memory stays bounded on large photos (``--tile``, ``--overlap``);
- ``cls``: ``predictions.csv`` with the top-5 classes and probabilities of each image;
- ``sal``: a saliency mask (``<stem>_mask.png``, 0-255 at the image's own size) and an overlay
  (``<stem>_overlay.png``: the image with the salient region tinted red and outlined), computed at
  the model's training size and resized back, as SOD models are evaluated.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PREDICTORS: dict[str, Callable] = {}


def predictor(task: str):
    def deco(fn):
        PREDICTORS[task] = fn
        return fn
    return deco


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


def _read(path: Path, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except OSError as e:
        raise ValueError(f"{path} is not a readable image: {e}") from None


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written PNG


@torch.no_grad()
def upscale_tiled(model, lr: torch.Tensor, scale: int, tile: int = 128, overlap: int = 16) -> torch.Tensor:
    """SR of one LR image [3, H, W] in [0, 1], computed in ``tile`` x ``tile`` LR tiles that see
    ``overlap`` extra pixels on each side (enough for the network's receptive field, so the seams
    match the whole-image result); only each tile's own region is kept."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
    _, h, w = lr.shape
    out = torch.empty(3, h * scale, w * scale, dtype=lr.dtype, device=lr.device)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(y - overlap, 0), max(x - overlap, 0)
            y1, x1 = min(y + tile + overlap, h), min(x + tile + overlap, w)
            sr = model(lr[None, :, y0:y1, x0:x1])[0]
            ty, tx = min(tile, h - y), min(tile, w - x)
            oy, ox = (y - y0) * scale, (x - x0) * scale
            out[:, y * scale:(y + ty) * scale, x * scale:(x + tx) * scale] = \
                sr[:, oy:oy + ty * scale, ox:ox + tx * scale]
    return out


@predictor("sr")
def predict_sr(model, images, out: Path, args) -> list[Path]:
    from .tasks.data.sr import to_tensor, to_uint8

    scale = model.input_contract["scale"]
    written = []
    for path in tqdm(images, desc=f"x{scale}", unit="img"):
        lr = to_tensor(_read(path, "RGB")).to(args.device)
        sr = upscale_tiled(model, lr, scale, args.tile, args.overlap)
        dst = out / f"{path.stem}_x{scale}.png"
        _save_png(to_uint8(sr), dst)
        written.append(dst)
    return written


@predictor("cls")
def predict_cls(model, images, out: Path, args) -> list[Path]:
    ic = model.input_contract
    mode = "L" if ic["channels"] == 1 else "RGB"
    classes = ic.get("classes") or []
    rows = []
    for path in tqdm(images, desc="classify", unit="img"):
        arr = _read(path, mode)
        x = torch.from_numpy(arr.copy()).float().div_(255.0)
        x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
        if ic.get("size"):
            x = torch.nn.functional.interpolate(x, size=tuple(ic["size"]), mode="bilinear",
                                                antialias=True, align_corners=False)
        with torch.no_grad():
            p = model(x.to(args.device)).softmax(-1)[0].cpu()
        top = p.topk(min(5, len(p)))
        rows.append([str(path)] + [f"{classes[i] if i < len(classes) else i}:{v:.4f}"
                                   for v, i in zip(top.values.tolist(), top.indices.tolist())])
    dst = out / "predictions.csv"
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([["image"] + [f"top{i + 1}" for i in range(len(rows[0]) - 1)]] + rows)
    tmp.replace(dst)
    return [dst]


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                                           antialias=True)


def overlay(img: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 HxWx3 image with the region prob > threshold tinted red and its border drawn."""
    m = prob > threshold
    out = img.astype(np.float32)
    out[m] = 0.5 * out[m] + 0.5 * np.array([255.0, 0.0, 0.0])
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = (255.0, 255.0, 0.0)
    return out.round().astype(np.uint8)


@predictor("sal")
def predict_sal(model, images, out: Path, args) -> list[Path]:
    size = model.input_contract.get("train_size") or [352, 352]
    written = []
    for path in tqdm(images, desc="saliency", unit="img"):
        img = _read(path, "RGB")
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().div_(255.0)
        with torch.no_grad():
            prob = model(_resize(x, size).to(args.device)).sigmoid().cpu()
        prob = _resize(prob, img.shape[:2]).clamp_(0, 1)[0, 0].numpy()
        mask_path, over_path = out / f"{path.stem}_mask.png", out / f"{path.stem}_overlay.png"
        _save_png((prob * 255).round().astype(np.uint8), mask_path)
        _save_png(overlay(img, prob), over_path)
        written += [mask_path, over_path]
    return written


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m zoo.predict", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a shipped model name (see zoo.list_models()) or a checkpoint directory")
    ap.add_argument("images", nargs="+", help="image files and/or folders of images")
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--backend", default="auto", help="kernel backend: auto | triton | reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depth", type=int, default=None,
                    help="DQA models: number of quantized residual blocks to run (default: all)")
    ap.add_argument("--tile", type=int, default=128, help="sr: LR tile size (bounds memory)")
    ap.add_argument("--overlap", type=int, default=16, help="sr: LR pixels of context around each tile")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from . import load
    from .models.sr import set_depth

    args = parse_args(argv)
    try:
        model = load(args.model, backend=args.backend, map_location=args.device)
        if model.task not in PREDICTORS:
            raise ValueError(f"no predictor for task {model.task!r}; tasks with one: {sorted(PREDICTORS)}")
        if args.depth is not None:
            set_depth(model, args.depth)
        images = collect_images(args.images)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = PREDICTORS[model.task](model, images, out, args)
    print(f"wrote {len(written)} file(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
