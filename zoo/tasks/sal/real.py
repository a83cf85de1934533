"""``sal_real``: does a saliency model find the object in an ordinary photo?

Six photos from Debian's ``opencv-doc`` (``/usr/share/doc/opencv-doc/examples/data``), none of
them used by any training, validation or test split: an apple, an orange, smarties and playing
cards on plain backgrounds, and a squirrel and a butterfly in front of leaves. Their masks were made
once by the procedure below, not drawn by hand, and are shipped in ``real_masks/`` (binary PNGs at
each photo's size); ``real_masks/sheet.jpg`` shows every photo next to its mask, so anyone can
judge them. Regenerate with ``python -m zoo.tasks.sal.real --masks`` (needs opencv-python).

Mask procedure (:func:`make_mask`): OpenCV's GrabCut, seeded with ``cv2.setRNGSeed(0)``, 8
iterations, initialised per photo by the only manual input, a box given as fractions of the image
(``REAL_PHOTOS``): outside it is definite background; with ``init="ellipse"`` the ellipse inscribed
in the box is probable foreground and the rest of the box probable background, with ``init="rect"``
the whole box is probable foreground (GrabCut's rectangle mode). ``space="hs"`` runs GrabCut on
the photo with its HSV value channel set to a constant (hue and saturation only: the orange's
shadowed half is otherwise as dark as the background). Definite and probable foreground are kept
and holes filled (``scipy.ndimage.binary_fill_holes``).

Evaluation (:func:`evaluate_real`, as ``zoo.predict`` runs the model): each photo is resized to the
model's training size, the sigmoid map resized back to the photo's size, and MAE, max F-measure
and S-measure are computed there against the mask (:mod:`.metrics`), averaged over the photos.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...datasets import read_image, save_png
from ...sources import OPENCV_DATA
from .metrics import SaliencyMeter

MASK_DIR = Path(__file__).parent / "real_masks"
# photo -> (box x0, y0, x1, y1 as fractions, init, colour space, background)
REAL_PHOTOS = {
    "apple.jpg": ((0.03, 0.02, 0.93, 0.88), "ellipse", "rgb", "plain"),
    "orange.jpg": ((0.03, 0.04, 0.93, 0.90), "ellipse", "hs", "plain"),
    "smarties.png": ((0.0, 0.05, 1.0, 1.0), "rect", "rgb", "plain"),
    "cards.png": ((0.02, 0.02, 0.98, 0.98), "rect", "rgb", "plain"),
    "squirrel_cls.jpg": ((0.22, 0.15, 0.70, 0.92), "ellipse", "rgb", "leaves"),
    "butterfly.jpg": ((0.0, 0.10, 1.0, 0.97), "rect", "rgb", "leaves"),
}


def make_mask(photo: Path, box, init: str, space: str) -> np.ndarray:
    """The GrabCut mask of ``photo`` (bool HxW) by the procedure in the module docstring."""
    import cv2
    from scipy import ndimage

    img = cv2.imread(str(photo))
    if img is None:
        raise FileNotFoundError(f"{photo} is not a readable image")
    if space == "hs":
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[..., 2] = 200
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    h, w = img.shape[:2]
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    cv2.setRNGSeed(0)
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    m = np.zeros((h, w), np.uint8)
    if init == "ellipse":
        m[:] = cv2.GC_BGD
        m[y0:y1, x0:x1] = cv2.GC_PR_BGD
        cv2.ellipse(m, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360,
                    int(cv2.GC_PR_FGD), -1)
        cv2.grabCut(img, m, None, bgd, fgd, 8, cv2.GC_INIT_WITH_MASK)
    elif init == "rect":
        cv2.grabCut(img, m, (x0, y0, max(1, x1 - x0 - 1), max(1, y1 - y0 - 1)), bgd, fgd, 8,
                    cv2.GC_INIT_WITH_RECT)
    else:
        raise ValueError(f"init={init!r}; valid: ['ellipse', 'rect']")
    return ndimage.binary_fill_holes((m == cv2.GC_FGD) | (m == cv2.GC_PR_FGD))


def real_pairs(root: str = OPENCV_DATA) -> list[tuple[Path, Path]]:
    """(photo, mask) paths of the ``sal_real`` set; a clear error if opencv-doc is missing."""
    pairs = []
    for name in REAL_PHOTOS:
        photo = Path(root) / name
        if not photo.is_file():
            raise FileNotFoundError(f"{photo} not found: sal_real uses Debian's opencv-doc photos "
                                    f"(apt-get install -y opencv-doc)")
        pairs.append((photo, MASK_DIR / f"{Path(name).stem}.png"))
    return pairs


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def saliency_map(model, img: np.ndarray) -> torch.Tensor:
    """The sigmoid map [1, 1, H, W] of uint8 HxWx3 ``img``: the model runs at its training size and
    the map is resized back to the image's (what ``zoo.predict`` writes and ``sal_real`` scores)."""
    size = model.input_contract.get("train_size") or [352, 352]
    device = next(model.parameters()).device
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().div_(255.0)
    return _resize(model(_resize(x, size).to(device)).sigmoid().cpu(), img.shape[:2]).clamp_(0, 1)


@torch.no_grad()
def evaluate_real(model, root: str = OPENCV_DATA, per_photo: bool = False) -> dict:
    """Mean MAE / max F / S-measure over the ``sal_real`` photos (at their own size, see above);
    ``per_photo`` adds ``{stem: {mae, maxf, smeasure}}`` under ``"photos"``."""
    model.eval()
    meter, photos = SaliencyMeter(), {}
    for photo, mask_path in real_pairs(root):
        prob = saliency_map(model, read_image(photo))
        gt = torch.from_numpy(read_image(mask_path, "L") >= 128).float()[None, None]
        meter.update(prob, gt)
        if per_photo:
            one = SaliencyMeter()
            one.update(prob, gt)
            photos[photo.stem] = {k: v for k, v in one.compute().items() if k != "images"}
    out = {f"real_{k}": v for k, v in meter.compute().items()}
    if per_photo:
        out["photos"] = photos
    return out


@torch.no_grad()
def real_grid(model, path, root: str = OPENCV_DATA, height: int = 112) -> Path:
    """A picture (PNG, or JPEG for a ``.jpg`` path) with one row per ``sal_real`` photo: photo | mask | the
    model's saliency map."""
    from PIL import Image

    model.eval()
    rows = []
    for photo, mask_path in real_pairs(root):
        img = read_image(photo)
        p = (saliency_map(model, img)[0, 0].numpy() * 255).round().astype(np.uint8)
        m = read_image(mask_path, "L")
        w = round(img.shape[1] * height / img.shape[0])
        tiles = [np.asarray(Image.fromarray(a).resize((w, height), Image.BILINEAR)) for a in
                 (img, np.repeat(m[..., None], 3, 2), np.repeat(p[..., None], 3, 2))]
        gap = np.full((height, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    path = Path(path)
    save_png(np.concatenate(rows, 0), path)
    return path


def update_release(directory) -> dict:
    """Measure ``sal_real`` for a saliency release folder, store it in its config.json metrics,
    write its ``real.jpg`` and rewrite its card (for releases made before ``zoo.train`` measured it)."""
    import json
    import os

    import zoo
    from ...cards import write_card

    directory = Path(directory)
    model = zoo.load(directory)
    res = evaluate_real(model)
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("metrics", {}).update(res)
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, cfg_path)
    real_grid(model, directory / "real.jpg")
    write_card(directory)
    return res


def write_masks(root: str = OPENCV_DATA, sheet: bool = True) -> list[Path]:
    """(Re)generate ``real_masks/*.png`` and the contact sheet ``real_masks/sheet.jpg``."""
    from PIL import Image

    MASK_DIR.mkdir(exist_ok=True)
    written, rows = [], []
    for (photo, mask_path), (box, init, space, _) in zip(real_pairs(root), REAL_PHOTOS.values()):
        m = make_mask(photo, box, init, space)
        save_png((m * 255).astype(np.uint8), mask_path)
        written.append(mask_path)
        img = read_image(photo)
        shown = img.copy()
        shown[~m] = (shown[~m] * 0.25).astype(np.uint8)
        row = Image.fromarray(np.concatenate([img, shown], 1))
        row.thumbnail((480, 160))
        rows.append(row)
    if sheet:
        w, h = max(r.size[0] for r in rows), sum(r.size[1] + 4 for r in rows)
        out = Image.new("RGB", (w, h), "white")
        y = 0
        for r in rows:
            out.paste(r, (0, y))
            y += r.size[1] + 4
        out.save(MASK_DIR / "sheet.jpg", quality=85)
        written.append(MASK_DIR / "sheet.jpg")
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description="sal_real: saliency on ordinary photos (opencv-doc)")
    ap.add_argument("--masks", action="store_true", help="regenerate real_masks/ by the documented procedure")
    ap.add_argument("--update", action="store_true",
                    help="store the measurements in each release folder's config.json and card")
    ap.add_argument("models", nargs="*", help="shipped names or release folders to evaluate")
    args = ap.parse_args(argv)
    if args.masks:
        for p in write_masks():
            print(p)
    import zoo

    for name in args.models:
        if args.update:
            from ...registry import resolve_checkpoint

            res = update_release(resolve_checkpoint(name))
            print(f"{name}: MAE {res['real_mae']:.4f}  maxF {res['real_maxf']:.4f}  S {res['real_smeasure']:.4f}")
            continue
        res = evaluate_real(zoo.load(name), per_photo=True)
        print(f"{name}: MAE {res['real_mae']:.4f}  maxF {res['real_maxf']:.4f}  S {res['real_smeasure']:.4f}  "
              + "  ".join(f"{k} {v['smeasure']:.2f}" for k, v in res["photos"].items()))


if __name__ == "__main__":
    main()
