"""Salient-object detection data: DUTS-style folders (``images/*.jpg`` + ``masks/*.png``) and a
built-in default with exact masks: Fashion-MNIST items composited over natural photos.

Built-in composites (``data=sal_composites``): each sample is a random crop of a bundled photo
(scikit-image / scikit-learn) with 1-3 Fashion-MNIST items pasted at random places and sizes, each
item thresholded into an exact mask and tinted a random colour. A sample is a pure function of
``(seed, split, index)``, so the splits are fixed and reproducible. The splits never share a
foreground or a background: train uses Fashion-MNIST train items 0-49,999 over the SR task's
training photos (their colours randomised: channel order, saturation), validation items 50,000-59,999
over its validation photos, and test the
Fashion-MNIST test split over the test photos (chelsea, sklearn flower, camera).

Batches are ``(images [N, 3, S, S] float in [0, 1], masks [N, 1, S, S] float in {0, 1})``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...datasets import (FMNIST_DIR, IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD, SPLITS, SeededSet, builtin_backgrounds,
                         fmnist_items, random_crop, resize_chw)

EVAL_SEED = 0  # validation / test data never depend on the run's seed
ITEM_THRESHOLD = 0.2       # an item's pixel belongs to its mask where its (resized) intensity > this


def composite(rng: np.random.Generator, backgrounds, items: torch.Tensor, size: int,
              objects=(1, 3), scale=(0.35, 0.65), jitter: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: a random crop of a random background with ``objects`` items pasted on it
    (``jitter``: the background's colours randomised first, see :func:`zoo.datasets.jitter_colours`).

    Returns (image [3, size, size] in [0, 1], mask [1, size, size] in {0, 1}); the mask is exactly
    the set of pixels whose colour came from an item."""
    img = random_crop(rng, backgrounds, size, 0.3, jitter)
    mask = torch.zeros(1, size, size)
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        item = items[int(rng.integers(len(items)))].float().div(255.0)
        s = max(4, int(rng.uniform(*scale) * size))
        g = resize_chw(item[None], (s, s))[0].clamp(0, 1)
        m = g > ITEM_THRESHOLD
        colour = torch.from_numpy(rng.uniform(0.15, 1.0, 3)).float()
        fg = colour[:, None, None] * (0.3 + 0.7 * g)[None]
        if rng.random() < 0.5:
            fg, m = fg.flip(-1), m.flip(-1)
        oy, ox = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
        region = img[:, oy:oy + s, ox:ox + s]
        region[:, m] = fg[:, m]
        mask[0, oy:oy + s, ox:ox + s][m] = 1.0
    return img, mask


class SaliencyData(L.LightningDataModule):
    """Base: subclasses fill ``self.sets`` (split -> Dataset of (image, mask)) in ``setup``."""

    def __init__(self, batch_size=16, size=64, num_workers=0, seed=0):
        super().__init__()
        if int(size) % 16:
            raise ValueError(f"data.size={size!r} must be a multiple of 16 (the depth-4 encoder's stride)")
        self.batch_size, self.size, self.num_workers, self.seed = batch_size, int(size), num_workers, seed
        self.sets: dict[str, Dataset] = {}

    def input_contract(self) -> dict:
        # any H, W divisible by 2**encoder_depth runs; zoo.predict resizes images to the training size
        return {"channels": 3, "size": None, "train_size": [self.size, self.size], "range": [0.0, 1.0],
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def split(self, name: str) -> Dataset:
        self.setup()
        return self.sets[name]

    def _loader(self, split, shuffle):
        return DataLoader(self.sets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=shuffle and len(self.sets[split]) > self.batch_size)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


class CompositeSalData(SaliencyData):
    """Built-in composites (see the module docstring). ``train_size``/``val_size``/``test_size``
    are numbers of composites; ``augment`` randomises the training backgrounds' colours."""

    def __init__(self, root=FMNIST_DIR, train_size=8000, val_size=256, test_size=512, augment=True, **kw):
        super().__init__(**kw)
        self.root, self.augment = root, augment
        self.counts = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}

    @staticmethod
    def backgrounds(split: str) -> list[torch.Tensor]:
        return builtin_backgrounds(split)

    def items(self, split: str) -> torch.Tensor:
        return fmnist_items(self.root, split)[0]

    def setup(self, stage=None):
        if self.sets:
            return
        for split in SPLITS:
            # the run's seed varies the training composites only: validation and test are the same
            # images for every seed, so seeds (and methods) are compared on one test set
            seed = self.seed if split == "train" else EVAL_SEED
            make = partial(composite, backgrounds=self.backgrounds(split), items=self.items(split), size=self.size,
                           jitter=split == "train" and self.augment)
            self.sets[split] = SeededSet(make, self.counts[split], seed, split)


# ----------------------------------------------------------------------------- DUTS-style folders
def pair_files(folder: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of ``folder/images/*`` and ``folder/masks/*`` matched by file stem."""
    img_dir, mask_dir = folder / "images", folder / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"saliency data needs {img_dir}/ and {mask_dir}/ (DUTS layout: "
                                    f"images/<name>.jpg with masks/<name>.png); {d} is missing")

    def by_stem(d):
        files = {}
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS:
                if p.stem in files:
                    raise ValueError(f"two files with the stem {p.stem!r} in {d}: {files[p.stem].name}, {p.name}")
                files[p.stem] = p
        return files

    imgs, masks = by_stem(img_dir), by_stem(mask_dir)
    if not imgs:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {img_dir}")
    lone_i, lone_m = sorted(set(imgs) - set(masks)), sorted(set(masks) - set(imgs))
    if lone_i or lone_m:
        msg = []
        if lone_i:
            msg.append(f"{len(lone_i)} image(s) without a mask in {mask_dir} (e.g. {lone_i[:3]})")
        if lone_m:
            msg.append(f"{len(lone_m)} mask(s) without an image in {img_dir} (e.g. {lone_m[:3]})")
        raise ValueError("unmatched saliency files: " + "; ".join(msg))
    return [(imgs[s], masks[s]) for s in sorted(imgs)]


def _open(path: Path, mode: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path} is not a readable image: {e}") from None
    t = torch.from_numpy(arr.copy()).float().div_(255.0)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def check_readable(pairs) -> None:
    """Raise a ValueError naming the first file that PIL cannot read (checked before training)."""
    from PIL import Image

    for pair in pairs:
        for p in pair:
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for broken files
                raise ValueError(f"{p} is not a readable image: {e}") from None


class PairSet(Dataset):
    """(image, mask) files resized to ``size`` x ``size``; masks binarised at 0.5."""

    def __init__(self, pairs, size: int, flip: bool = False):
        self.pairs, self.size, self.flip = list(pairs), int(size), flip

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        ip, mp = self.pairs[i]
        img = resize_chw(_open(ip, "RGB"), (self.size, self.size)).clamp_(0, 1)
        mask = (resize_chw(_open(mp, "L"), (self.size, self.size)) >= 0.5).float()
        if self.flip and torch.rand(()) < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        return img, mask


class FolderSalData(SaliencyData):
    """Your data, DUTS layout: ``root/{train,val,test}/images`` + ``.../masks`` (``val``/``test``
    optional), or just ``root/images`` + ``root/masks``. Missing splits are held out of the training
    pairs with a fixed seed (``holdout`` of them each)."""

    def __init__(self, root, holdout=0.1, augment=True, **kw):
        super().__init__(**kw)
        self.root, self.holdout, self.augment = Path(root), float(holdout), augment

    def setup(self, stage=None):
        if self.sets:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} is not a folder")
        base = self.root / "train" if (self.root / "train").is_dir() else self.root
        pairs = {"train": pair_files(base)}
        for split in ("val", "test"):
            if (self.root / split).is_dir():
                pairs[split] = pair_files(self.root / split)
        train = pairs["train"]
        missing = [s for s in ("val", "test") if s not in pairs]
        if missing:
            order = np.random.default_rng(EVAL_SEED).permutation(len(train))  # the same hold-out for every seed
            k = max(1, int(round(self.holdout * len(train))))
            if len(train) <= k * len(missing):
                raise ValueError(f"{len(train)} training pairs are too few to hold out {missing} "
                                 f"({k} each); add {self.root}/val and {self.root}/test")
            for j, split in enumerate(missing):
                pairs[split] = [train[i] for i in sorted(order[j * k:(j + 1) * k])]
            held = set(order[: k * len(missing)].tolist())
            pairs["train"] = [p for i, p in enumerate(train) if i not in held]
        for split in SPLITS:
            check_readable(pairs[split])
            self.sets[split] = PairSet(pairs[split], self.size, flip=split == "train" and self.augment)
