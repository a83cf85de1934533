"""Built-in saliency data that looks like the world (``data=sal_scenes``, the default): RGBA clip
art with true alpha from Debian's ``openclipart-png`` (animals, food, people, plants, vehicles,
tools, ...) and Fashion-MNIST items, pasted over real photos (scikit-image, scikit-learn and
``opencv-doc``'s sample photos) or plain, graded backgrounds, with scale, colour, blur, noise and
drop-shadow augmentation. The mask is exactly the pasted objects' alpha (>= 0.5); shadows are not
foreground.

Splits are disjoint by source: a clip-art file belongs to one split by the CRC-32 of its path
relative to ``clipart_root`` (0: test, 1: validation, 2-9: train), Fashion-MNIST items split as in
``sal_composites``, and every photo is listed under exactly one split (pairs of views of one scene
stay together). The photos of the ``sal_real`` evaluation (:mod:`.real`) are in no split.
A sample is a pure function of (seed, split, index); validation and test use a fixed seed.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from ...datasets import FMNIST_DIR, FMNIST_TRAIN_ITEMS, SPLITS, SeededSet, random_crop
from ...sources import CLIPART_ROOT, OPENCV_DATA, clipart_files, load_clipart, photo_backgrounds
from .data import EVAL_SEED, ITEM_THRESHOLD, SaliencyData

P_PLAIN = 0.3      # plain / graded background instead of a photo
P_CLIPART = 0.75   # an object is clip art (else a Fashion-MNIST item)
P_SHADOW = 0.4
P_BG_BLUR = 0.3    # depth of field: the photo behind the objects is blurred


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x[None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * int(np.ceil(2.5 * sigma)) + 1
    return gaussian_blur(x, [k, k], [sigma, sigma])


def plain_background(rng: np.random.Generator, size: int) -> torch.Tensor:
    """A plain colour with a linear shade across it and faint noise (a table, a wall, a studio)."""
    c0 = torch.from_numpy(rng.uniform(0.05, 0.95, 3)).float()
    c1 = (c0 + torch.from_numpy(rng.uniform(-0.25, 0.25, 3)).float()).clamp(0, 1)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    t = (np.cos(ang) * xx + np.sin(ang) * yy)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    img = img + float(rng.uniform(0, 0.03)) * torch.from_numpy(rng.standard_normal((3, size, size))).float()
    return img.clamp_(0, 1)


def photo_background(rng: np.random.Generator, photos, size: int, jitter: bool) -> torch.Tensor:
    img = random_crop(rng, photos, size, 0.25, jitter)
    if rng.random() < P_BG_BLUR:
        img = _blur(img, float(rng.uniform(1.0, 3.0)))
    return img


def recolour(rgb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Colour augmentation of an object: channel order (sometimes), brightness, contrast, saturation."""
    if rng.random() < 0.3:
        rgb = rgb[torch.from_numpy(rng.permutation(3))]
    grey = rgb.mean(0, keepdim=True)
    rgb = grey + float(rng.uniform(0.6, 1.4)) * (rgb - grey)
    rgb = (rgb - 0.5) * float(rng.uniform(0.7, 1.3)) + 0.5 + float(rng.uniform(-0.15, 0.15))
    return rgb.clamp_(0, 1)


def fmnist_object(rng: np.random.Generator, items: torch.Tensor) -> torch.Tensor:
    """A Fashion-MNIST item as RGBA [4, 28, 28]: its thresholded silhouette tinted a random colour."""
    g = items[int(rng.integers(len(items)))].float().div(255.0)
    colour = torch.from_numpy(rng.uniform(0.1, 1.0, 3)).float()
    rgb = colour[:, None, None] * (0.3 + 0.7 * g)[None]
    return torch.cat([rgb, (g > ITEM_THRESHOLD).float()[None]])


def paste(img: torch.Tensor, mask: torch.Tensor, obj: torch.Tensor, rng: np.random.Generator,
          longest: int) -> None:
    """Alpha-composite RGBA ``obj`` (resized so its longest side is ``longest``) onto ``img`` in place,
    with an optional drop shadow under it; ``mask`` gets the object's alpha >= 0.5."""
    size = img.shape[-1]
    h, w = obj.shape[1:]
    f = longest / max(h, w)
    oh, ow = max(4, min(size, round(h * f))), max(4, min(size, round(w * f)))
    obj = _resize(obj, (oh, ow)).clamp_(0, 1)
    if rng.random() < 0.5:
        obj = obj.flip(-1)
    rgb, a = recolour(obj[:3], rng), obj[3:]
    y, x = int(rng.integers(0, size - oh + 1)), int(rng.integers(0, size - ow + 1))
    if rng.random() < P_SHADOW:
        pad = torch.zeros(1, size, size)
        dy, dx = (int(v) for v in rng.integers(-size // 16, size // 16 + 1, 2))
        ys, xs = slice(max(0, y + dy), min(size, y + dy + oh)), slice(max(0, x + dx), min(size, x + dx + ow))
        pad[:, ys, xs] = a[:, ys.start - (y + dy):ys.stop - (y + dy), xs.start - (x + dx):xs.stop - (x + dx)]
        shadow = _blur(pad, float(rng.uniform(1.0, 4.0))) * float(rng.uniform(0.3, 0.7))
        img.mul_(1 - shadow)
    region = img[:, y:y + oh, x:x + ow]
    region.mul_(1 - a).add_(a * rgb)
    mask[:, y:y + oh, x:x + ow] = torch.maximum(mask[:, y:y + oh, x:x + ow], (a >= 0.5).float())


def scene(rng: np.random.Generator, photos, clipart: list[str], clipart_root: str, items: torch.Tensor,
          size: int, jitter: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: (image [3, size, size] in [0, 1], mask [1, size, size] in {0, 1})."""
    img = plain_background(rng, size) if rng.random() < P_PLAIN else photo_background(rng, photos, size, jitter)
    mask = torch.zeros(1, size, size)
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    for _ in range(n):
        obj = None
        if rng.random() < P_CLIPART:
            for _try in range(20):  # skip art without true transparency (deterministic given rng)
                obj = load_clipart(f"{clipart_root}/{clipart[int(rng.integers(len(clipart)))]}")
                if obj is not None:
                    break
        if obj is None:
            obj = fmnist_object(rng, items)
        hi = 0.9 if n == 1 else 0.6
        paste(img, mask, obj, rng, longest=int(rng.uniform(0.3, hi) * size))
    if rng.random() < 0.2:
        img = _blur(img, float(rng.uniform(0.5, 1.2)))
    if rng.random() < 0.3:
        img = img + float(rng.uniform(0.005, 0.03)) * torch.from_numpy(rng.standard_normal(img.shape)).float()
    return img.clamp_(0, 1), mask


class SceneSalData(SaliencyData):
    """Clip art and Fashion-MNIST items over real photos (see the module docstring)."""

    def __init__(self, root=FMNIST_DIR, clipart_root=CLIPART_ROOT, opencv_root=OPENCV_DATA,
                 train_size=4000, val_size=256, test_size=512, augment=True, **kw):
        super().__init__(**kw)
        self.root, self.clipart_root, self.opencv_root, self.augment = root, clipart_root, opencv_root, augment
        self.counts = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}

    def items(self, split: str) -> torch.Tensor:
        from ...datasets import load_fmnist

        x = load_fmnist(self.root, "test" if split == "test" else "train")[0][:, 0]
        if split == "test":
            return x
        return x[:FMNIST_TRAIN_ITEMS] if split == "train" else x[FMNIST_TRAIN_ITEMS:]

    def setup(self, stage=None):
        if self.sets:
            return
        art = clipart_files(self.clipart_root)
        for split in SPLITS:
            seed = self.seed if split == "train" else EVAL_SEED
            make = partial(scene, photos=photo_backgrounds(split, self.opencv_root), clipart=art[split],
                           clipart_root=self.clipart_root, items=self.items(split), size=self.size,
                           jitter=split == "train" and self.augment)
            self.sets[split] = SeededSet(make, self.counts[split], seed, split)
