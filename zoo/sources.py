"""Real foregrounds and backgrounds installed by Debian packages, shared by the built-in datasets:
RGBA clip art with true alpha from ``openclipart-png`` (split by the CRC-32 of each file's path:
0 test, 1 validation, 2-9 train) and photos (scikit-image, scikit-learn and ``opencv-doc``'s sample
photos), each photo listed under exactly one split (two views of one scene share a split)."""
from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .datasets import (
    BUILTIN_TEST,
    BUILTIN_TRAIN,
    BUILTIN_VAL,
    SPLITS,
    builtin_image,
    read_image,
)

CLIPART_ROOT = "/usr/share/openclipart/png"
OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
# categories of things (not flags, maps, patterns, arrows or abstract shapes)
CLIPART_CATEGORIES = ("animals", "food", "people", "plants", "transportation", "tools", "office",
                      "recreation", "buildings", "electronics", "containers", "decorations", "science",
                      "education", "computer", "unsorted")
ALPHA_COVER = (0.06, 0.85)  # a usable clip art's opaque fraction of its box (else: no true alpha)
CLIPART_MAX_SIDE = 224      # clip art is decoded once per process and kept at most this size
CLIPART_MAX_PIXELS = 16_000_000  # larger files (a few posters) are skipped: too slow to decode
# opencv-doc photos used as backgrounds, by split (two views of one scene share a split)
OPENCV_BACKGROUNDS = {
    "train": ("aero1.jpg", "aero3.jpg", "baboon.jpg", "building.jpg", "fruits.jpg", "home.jpg",
              "starry_night.jpg", "messi5.jpg", "leuvenA.jpg", "leuvenB.jpg", "board.jpg",
              "ela_original.jpg", "licenseplate_motion.jpg", "Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg",
              "box_in_scene.png", "notes.png"),
    "val": ("graf1.png", "graf3.png", "aloeL.jpg", "aloeR.jpg"),
    "test": ("basketball1.png", "basketball2.png", "rubberwhale1.png", "rubberwhale2.png", "text_defocus.jpg"),
}
BUILTIN_BACKGROUNDS = {"train": BUILTIN_TRAIN, "val": BUILTIN_VAL, "test": BUILTIN_TEST}


def missing_package(path: str, package: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found: the built-in data needs Debian's {package} "
                             f"(apt-get install -y {package})")


def clipart_files(root: str = CLIPART_ROOT) -> dict[str, list[str]]:
    """Paths (relative to ``root``) of the clip art of each split, sorted."""
    base = Path(root)
    if not base.is_dir():
        raise missing_package(root, "openclipart-png")
    out = {s: [] for s in SPLITS}
    for cat in CLIPART_CATEGORIES:
        for p in sorted((base / cat).rglob("*.png")):
            rel = p.relative_to(base).as_posix()
            h = zlib.crc32(rel.encode()) % 10
            out["test" if h == 0 else "val" if h == 1 else "train"].append(rel)
    if not out["train"]:
        raise FileNotFoundError(f"no clip art under {root}/{{{','.join(CLIPART_CATEGORIES)}}}")
    return out


@lru_cache(maxsize=None)
def load_clipart(path: str) -> torch.Tensor | None:
    """RGBA float [4, h, w] in [0, 1], cropped to its opaque box and shrunk to at most
    ``CLIPART_MAX_SIDE``; None for art without usable transparency (cached per process)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # a few posters trip PIL's decompression-bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.size[0] * im.size[1] > CLIPART_MAX_PIXELS:
                return None
            im = im.convert("RGBA")
            im.thumbnail((CLIPART_MAX_SIDE, CLIPART_MAX_SIDE), Image.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    opaque = a[..., 3] >= 128
    if not opaque.any():
        return None
    ys, xs = np.nonzero(opaque)
    a = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    cover = (a[..., 3] >= 128).mean()
    if min(a.shape[:2]) < 12 or not ALPHA_COVER[0] <= cover <= ALPHA_COVER[1]:
        return None
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def photo_backgrounds(split: str, opencv_root: str = OPENCV_DATA) -> list[torch.Tensor]:
    """The split's photos as float [3, H, W] in [0, 1]."""
    out = [torch.from_numpy(builtin_image(n)).permute(2, 0, 1).float().div_(255.0)
           for n in BUILTIN_BACKGROUNDS[split]]
    root = Path(opencv_root)
    if not root.is_dir():
        raise missing_package(opencv_root, "opencv-doc")
    for name in OPENCV_BACKGROUNDS[split]:
        out.append(torch.from_numpy(read_image(root / name).copy()).permute(2, 0, 1).float().div_(255.0))
    return out
