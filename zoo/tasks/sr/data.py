"""Super-resolution data: folders of HR images (DIV2K style) and a built-in default made of the
natural photos bundled with scikit-image and scikit-learn (no download).

LR images are made by MATLAB-style bicubic downsampling (basicsr's ``imresize``, the convention of
DIV2K and the SR benchmarks) unless paired LR folders are given. Training samples random HR patches
with flips and 90-degree rotations; validation and test use whole images (HR cropped to a multiple
of the scale), batch size 1.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ...datasets import (BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL, builtin_image, list_images, read_image,
                         to_tensor)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def bicubic(img: np.ndarray, factor: float) -> np.ndarray:
    """MATLAB-style bicubic resize (antialiased when shrinking) of uint8 HxWx3, rounded to uint8."""
    from ...models.sr import import_basicsr

    imresize = import_basicsr("utils.matlab_functions").imresize
    out = imresize(img.astype(np.float64) / 255.0, factor)
    return (np.clip(out, 0, 1) * 255.0).round().astype(np.uint8)


def make_pair(hr: np.ndarray, scale: int, lr: np.ndarray | None = None):
    """(lr, hr) uint8 with hr mod-cropped to the scale; lr by bicubic downsampling unless given."""
    hr = mod_crop(hr, scale)
    if lr is None:
        lr = bicubic(hr, 1.0 / scale)
    elif lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
        raise ValueError(f"LR image {lr.shape[:2]} x {scale} does not match HR {hr.shape[:2]}")
    return lr, hr


class PatchDataset(Dataset):
    """``length`` random (LR, HR) patch pairs per epoch, LR patches ``patch`` x ``patch``."""

    def __init__(self, pairs, scale: int, patch: int, length: int, augment: bool = True, seed: int = 0):
        small = [lr.shape[:2] for lr, _ in pairs if min(lr.shape[:2]) < patch]
        if small:
            raise ValueError(f"LR images {small} are smaller than the patch size {patch}")
        self.pairs, self.scale, self.patch, self.length = pairs, scale, patch, length
        self.augment, self.seed, self.draws = augment, seed, 0

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        # new patches every epoch (the loader is built once): in the main process a draw counter,
        # in a loader worker the worker's seed (a fresh one each epoch); reproducible for a seed
        self.draws += 1
        info = get_worker_info()
        salt = info.seed % 2 ** 63 if info is not None else self.draws
        rng = np.random.default_rng((self.seed, i, salt))
        lr, hr = self.pairs[rng.integers(len(self.pairs))]
        p, s = self.patch, self.scale
        y, x = rng.integers(lr.shape[0] - p + 1), rng.integers(lr.shape[1] - p + 1)
        a, b = lr[y:y + p, x:x + p], hr[y * s:(y + p) * s, x * s:(x + p) * s]
        if self.augment:
            k = int(rng.integers(4))
            flip = bool(rng.integers(2))
            a, b = np.rot90(a, k), np.rot90(b, k)
            if flip:
                a, b = a[:, ::-1], b[:, ::-1]
        return to_tensor(a), to_tensor(b)


class ImagePairs(Dataset):
    """Whole (LR, HR) images, float [0, 1]; ``names[i]`` says where image i came from."""

    def __init__(self, pairs, names):
        self.pairs, self.names = pairs, list(names)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        lr, hr = self.pairs[i]
        return to_tensor(lr), to_tensor(hr)


class SRData(L.LightningDataModule):
    """Base: subclasses fill ``self._splits`` = {split: (pairs, names)} in ``_load``."""

    name = "sr"

    def __init__(self, scale: int = 4, patch_size: int = 24, batch_size: int = 16,
                 steps_per_epoch: int = 100, num_workers: int = 0, augment: bool = True, seed: int = 0):
        super().__init__()
        if scale not in (2, 3, 4, 8):
            raise ValueError(f"scale={scale!r} is not supported; valid: 2, 3, 4, 8")
        self.scale, self.patch_size, self.batch_size = int(scale), int(patch_size), int(batch_size)
        self.steps_per_epoch, self.num_workers = int(steps_per_epoch), int(num_workers)
        self.augment, self.seed = augment, seed
        self._splits: dict | None = None

    def _load(self) -> dict:
        raise NotImplementedError  # abstract: each data source provides its splits

    def setup(self, stage=None):
        if self._splits is None:
            self._splits = self._load()

    def input_contract(self) -> dict:
        return {"channels": 3, "scale": self.scale, "range": [0.0, 1.0], "size": None}

    def split_sizes(self) -> dict:
        """Images per split (training samples random patches of the train images)."""
        self.setup()
        return {k: len(pairs) for k, (pairs, _) in self._splits.items()}

    def split(self, name: str) -> ImagePairs:
        self.setup()
        pairs, names = self._splits[name]
        return ImagePairs(pairs, names)

    def train_dataloader(self):
        self.setup()
        ds = PatchDataset(self._splits["train"][0], self.scale, self.patch_size,
                          self.steps_per_epoch * self.batch_size, self.augment, self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          drop_last=True)

    def _whole(self, name):
        return DataLoader(self.split(name), batch_size=1, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._whole("val")

    def test_dataloader(self):
        return self._whole("test")


class BuiltinSRData(SRData):
    """Photos bundled with scikit-image / scikit-learn: 12 train, 2 validation, 3 test images."""

    name = "sr_images"

    def __init__(self, train=BUILTIN_TRAIN, val=BUILTIN_VAL, test=BUILTIN_TEST, **kwargs):
        super().__init__(**kwargs)
        self.names = {"train": list(train), "val": list(val), "test": list(test)}
        overlap = (set(train) & set(test)) | (set(val) & set(test)) | (set(train) & set(val))
        if overlap:
            raise ValueError(f"images {sorted(overlap)} are in more than one split")

    def _load(self):
        return {split: ([make_pair(builtin_image(n), self.scale) for n in names], names)
                for split, names in self.names.items()}


class FolderSRData(SRData):
    """Your images: ``root/train``, ``root/val`` and ``root/test`` folders of HR images (val and test
    optional: without them 2 / 10% of the train images are held out for each). Paired LR images, if
    you have them, go in ``<split>_lr`` folders with the same file names."""

    name = "sr_folder"

    def __init__(self, root: str = "???", **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)

    def _read_split(self, split):
        folder = self.root / split
        if not folder.is_dir():
            return None
        files = list_images(folder)
        lr_dir = self.root / f"{split}_lr"
        pairs = []
        for f in files:
            lr = None
            if lr_dir.is_dir():
                match = [p for p in lr_dir.iterdir() if p.stem == f.stem]
                if not match:
                    raise FileNotFoundError(f"{lr_dir} has no LR image for {f.name}")
                lr = read_image(match[0])
            pairs.append(make_pair(read_image(f), self.scale, lr))
        return pairs, [f.name for f in files]

    def _load(self):
        train = self._read_split("train")
        if train is None:
            raise FileNotFoundError(f"{self.root / 'train'} not found: data.root must hold train/ "
                                    f"(and optionally val/, test/) folders of HR images")
        out = {"train": train}
        pairs, names = train
        n_hold = max(1, len(pairs) // 10)
        for split in ("test", "val"):
            got = self._read_split(split)
            if got is None:
                if len(pairs) <= n_hold:
                    raise ValueError(f"{self.root / 'train'} has {len(pairs)} image(s): add {split}/ "
                                     f"or more train images to hold some out")
                got = (pairs[-n_hold:], names[-n_hold:])
                pairs, names = pairs[:-n_hold], names[:-n_hold]
            out[split] = got
        out["train"] = (pairs, names)
        return out
