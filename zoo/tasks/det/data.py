"""Object-detection data: a built-in default with exact boxes (Fashion-MNIST items pasted over crops of
the bundled photos) and a user's COCO-format folder.

Built-in composites (``data=det_composites``): each sample is a random crop of a bundled photo
(scikit-image / scikit-learn) at ``size`` x ``size`` (128 by default) with 1-4 Fashion-MNIST items
pasted at random places and scales (0.2-0.6 of the side), each thresholded into an exact mask and
tinted a random colour. A new item never hides more than ``MAX_HIDDEN`` of an earlier item's visible
pixels (otherwise another place is drawn, or the item is left out), and every box is the tight extent
of its item's *visible* pixels, in torchvision's continuous pixel coordinates: a box (x1, y1, x2, y2)
covers pixel columns x1..x2-1 and rows y1..y2-1. A sample is a pure function of ``(seed, split,
index)``; the splits never share an item or a photo (train: Fashion-MNIST train items 0-49,999 over
the training photos, colours randomised; validation: items 50,000-59,999 over the validation photos;
test: the Fashion-MNIST test split over the test photos).

COCO folders (``data=coco data.root=DIR``): ``DIR/annotations/instances_<split>.json`` with images in
``DIR/images/`` or ``DIR/<split>/``, splits train and val (and test, if there is one; else the test split
is val). Category ids are remapped to 0..K-1 in id order (``classes``: their names); crowd annotations
are skipped; every image is resized to ``size`` x ``size`` and its boxes with it.

Batches are ``(images [N, 3, S, S] float in [0, 1], targets)``, targets a list of N dicts with
``boxes`` (K x 4 float, xyxy pixels) and ``labels`` (K int64).
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...datasets import (FMNIST_CLASSES, FMNIST_DIR, SPLITS, SeededSet, builtin_backgrounds, fmnist_items,
                         random_crop, read_image, resize_chw, to_tensor)

EVAL_SEED = 0        # validation / test data never depend on the run's seed
ITEM_THRESHOLD = 0.2  # an item's pixel belongs to its mask where its (resized) intensity > this
MAX_HIDDEN = 0.2      # a new item may hide at most this fraction of an earlier item's visible pixels
PLACEMENT_TRIES = 20


def tight_box(mask: torch.Tensor) -> list[float]:
    """(x1, y1, x2, y2) of a boolean H x W mask's pixels, continuous coordinates (x2 = last column + 1)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def det_composite(rng: np.random.Generator, backgrounds, items: torch.Tensor, labels: torch.Tensor, size: int,
                  objects=(1, 4), scale=(0.2, 0.6), jitter: bool = False, with_ids: bool = False):
    """One sample (see the module docstring): (image [3, size, size], {"boxes", "labels"}), plus, with
    ``with_ids``, the H x W map of which item each pixel shows (-1: background) and each item's number of
    pasted pixels."""
    img = random_crop(rng, backgrounds, size, 0.3, jitter)
    ids = torch.full((size, size), -1, dtype=torch.long)
    kept: list[int] = []
    pasted: list[int] = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        k = int(rng.integers(len(items)))
        s = max(6, int(rng.uniform(*scale) * size))
        g = resize_chw(items[k].float().div(255.0)[None], (s, s))[0].clamp(0, 1)
        m = g > ITEM_THRESHOLD
        if not m.any():
            continue
        colour = torch.from_numpy(rng.uniform(0.15, 1.0, 3)).float()
        fg = colour[:, None, None] * (0.3 + 0.7 * g)[None]
        if rng.random() < 0.5:
            fg, m = fg.flip(-1), m.flip(-1)
        visible = {j: int((ids == j).sum()) for j in range(len(kept))}
        for _ in range(PLACEMENT_TRIES):
            oy, ox = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            under = ids[oy:oy + s, ox:ox + s][m]
            if all(int((under == j).sum()) <= MAX_HIDDEN * visible[j] for j in visible):
                break
        else:
            continue  # no place where it leaves the others visible enough: leave it out
        img[:, oy:oy + s, ox:ox + s][:, m] = fg[:, m]
        ids[oy:oy + s, ox:ox + s][m] = len(kept)
        kept.append(int(labels[k]))
        pasted.append(int(m.sum()))
    boxes = [tight_box(ids == j) for j in range(len(kept))]
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(kept, dtype=torch.int64)}
    return (img, target, ids, pasted) if with_ids else (img, target)


def collate(samples):
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


class DetectionData(L.LightningDataModule):
    """Base: subclasses fill ``self.sets`` (split -> Dataset of (image, target)) and ``self.classes``
    in ``setup``."""

    def __init__(self, batch_size=16, size=128, num_workers=0, seed=0):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size % 32:
            raise ValueError(f"data.size={size!r} is not valid; valid: a multiple of 32, >= 32 (the backbone's stride)")
        self.batch_size, self.size, self.num_workers, self.seed = batch_size, size, num_workers, seed
        self.sets: dict[str, Dataset] = {}
        self.classes: list[str] = []

    def input_contract(self) -> dict:
        self.setup()
        return {"channels": 3, "size": [self.size, self.size], "range": [0.0, 1.0], "classes": list(self.classes)}

    def split(self, name: str) -> Dataset:
        self.setup()
        return self.sets[name]

    def _loader(self, split, shuffle):
        self.setup()
        return DataLoader(self.sets[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=shuffle and len(self.sets[split]) > self.batch_size)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


class CompositeDetData(DetectionData):
    """Built-in composites (see the module docstring); ``*_size``: numbers of images; ``augment``
    randomises the training backgrounds' colours."""

    def __init__(self, root=FMNIST_DIR, train_size=8000, val_size=256, test_size=512, augment=True, **kw):
        super().__init__(**kw)
        self.root, self.augment = root, augment
        self.counts = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}

    def setup(self, stage=None):
        if self.sets:
            return
        self.classes = list(FMNIST_CLASSES)
        for split in SPLITS:
            items, labels = fmnist_items(self.root, split)
            seed = self.seed if split == "train" else EVAL_SEED  # one val / test set for every run
            make = partial(det_composite, backgrounds=builtin_backgrounds(split), items=items, labels=labels,
                           size=self.size, jitter=split == "train" and self.augment)
            self.sets[split] = SeededSet(make, self.counts[split], seed, split)


# ----------------------------------------------------------------------------- COCO folders
def read_coco(root: Path, split: str):
    """(records, classes) of ``root/annotations/instances_<split>.json``: records are (image path,
    width, height, [[x1, y1, x2, y2], ...], [category id, ...]) for images with at least one box."""
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"data=coco: {ann} does not exist (expected annotations/instances_<split>.json "
                                f"for splits train and val under data.root={root})")
    try:
        doc = json.loads(ann.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann} is not valid JSON: {e}") from None
    images, anns, cats = doc.get("images") or [], doc.get("annotations") or [], doc.get("categories") or []
    if not images or not anns or not cats:
        raise ValueError(f"{ann} has no {'images' if not images else 'annotations' if not anns else 'categories'}")
    folder = next((d for d in (root / "images", root / split) if d.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"data=coco: no image folder {root / 'images'} or {root / split} for {ann}")
    by_id = {im["id"]: im for im in images}
    boxes: dict = {}
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        im = by_id.get(a["image_id"])
        if im is None:
            raise ValueError(f"{ann}: annotation {a.get('id')} refers to image id {a['image_id']}, which is not listed")
        x, y, w, h = (float(v) for v in a["bbox"])
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > im["width"] + 0.5 or y + h > im["height"] + 0.5:
            raise ValueError(f"{ann}: annotation {a.get('id')} of {im['file_name']} has box {a['bbox']} (x, y, w, h) "
                             f"outside its {im['width']}x{im['height']} image or empty")
        boxes.setdefault(im["id"], []).append(([x, y, x + w, y + h], a["category_id"]))
    records = []
    for iid, bs in boxes.items():
        im = by_id[iid]
        path = folder / im["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{ann}: image {path} does not exist")
        records.append((path, im["width"], im["height"], [b for b, _ in bs], [c for _, c in bs]))
    return records, sorted(cats, key=lambda c: c["id"])


class CocoSet(Dataset):
    def __init__(self, records, cat_index: dict, size: int):
        self.records, self.cat_index, self.size = records, cat_index, size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, w, h, boxes, cats = self.records[i]
        img = to_tensor(read_image(path))
        if tuple(img.shape[1:]) != (h, w):
            raise ValueError(f"{path} is {img.shape[2]}x{img.shape[1]}, its annotations say {w}x{h}")
        img = resize_chw(img, (self.size, self.size)).clamp_(0, 1)
        scale = torch.tensor([self.size / w, self.size / h] * 2)
        return img, {"boxes": torch.tensor(boxes, dtype=torch.float32) * scale,
                     "labels": torch.tensor([self.cat_index[c] for c in cats], dtype=torch.int64)}


class CocoDetData(DetectionData):
    """A COCO-format folder (see the module docstring)."""

    def __init__(self, root, **kw):
        super().__init__(**kw)
        if not root:
            raise ValueError("data=coco needs data.root=DIR (a folder with annotations/instances_<split>.json)")
        self.root = Path(root)
        self.category_ids: list[int] = []

    def input_contract(self) -> dict:
        """The base contract plus ``category_ids``: the folder's COCO id of each class (zoo.predict writes them)."""
        return {**super().input_contract(), "category_ids": list(self.category_ids)}

    def setup(self, stage=None):
        if self.sets:
            return
        recs = {s: read_coco(self.root, s) for s in ("train", "val")}
        has_test = (self.root / "annotations" / "instances_test.json").is_file()
        recs["test"] = read_coco(self.root, "test") if has_test else recs["val"]
        cats = recs["train"][1]
        for s in ("val", "test"):
            if [c["id"] for c in recs[s][1]] != [c["id"] for c in cats]:
                raise ValueError(f"data=coco: the {s} split's categories differ from train's")
        index = {c["id"]: i for i, c in enumerate(cats)}
        self.classes = [c["name"] for c in cats]
        self.category_ids = [c["id"] for c in cats]
        self.sets = {s: CocoSet(r, index, self.size) for s, (r, _) in recs.items()}
