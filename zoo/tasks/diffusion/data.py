"""Diffusion data: Fashion-MNIST padded to 32 x 32 (``data=fmnist32``, from Debian's
``dataset-fashion-mnist``; an optional class filter) and any folder of the user's images
(``data=folder data.root=DIR data.size=32``: resized so the shorter side is ``size``, centre-cropped).
Batches are (images in [0, 1], label); the label is the class index (0 for a folder)."""
from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ...datasets import FMNIST_CLASSES, FMNIST_DIR, IMAGE_EXTS, SplitLoaders, load_fmnist


class _Collate:
    def __init__(self, flip: bool):
        self.flip = flip

    def __call__(self, samples):
        x = torch.stack([s[0] for s in samples])
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        y = torch.as_tensor([int(s[1]) for s in samples])
        if self.flip:
            m = torch.rand(len(x)) < 0.5
            x[m] = x[m].flip(-1)
        return x, y


class DiffusionData(SplitLoaders, L.LightningDataModule):
    """Base: subclasses set ``train_set`` / ``val_set`` / ``test_set`` (uint8 or float images) in setup."""

    channels, size, classes = 1, [32, 32], []
    drop_last_train = True

    def __init__(self, batch_size=128, num_workers=0, seed=0, limit_train=None, limit_test=None, augment=True,
                 fd_feature=None, fd_layer="fc", fd_steps=50):
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.limit_train, self.limit_test, self.augment = limit_train, limit_test, augment
        if isinstance(fd_steps, bool) or not isinstance(fd_steps, int) or fd_steps < 1:
            raise ValueError(f"data.fd_steps={fd_steps!r} is not valid; valid: an integer >= 1")
        self.fd = {"feature": str(fd_feature), "layer": str(fd_layer), "steps": fd_steps} if fd_feature else None

    def input_contract(self) -> dict:
        """Images in [0, 1]; the model works in [-1, 1] (mean 0.5, std 0.5 per channel). ``fd``: how
        the release's FD / KID are measured (feature network, its layer, DDIM steps), or None."""
        return {"channels": self.channels, "size": list(self.size), "range": [0.0, 1.0],
                "mean": [0.5] * self.channels, "std": [0.5] * self.channels, "classes": list(self.classes),
                "fd": self.fd}

    def collate(self, train):
        return _Collate(train and self.augment)

    def images(self, split: str, n: int | None = None) -> torch.Tensor:
        """The first ``n`` images (all if None) of ``split`` as a float tensor in [0, 1]."""
        ds = getattr(self, f"{split}_set")
        n = len(ds) if n is None else min(int(n), len(ds))
        return _Collate(False)([ds[i] for i in range(n)])[0]


def class_indices(classes) -> list[int] | None:
    """Fashion-MNIST class names or indices -> sorted indices (None: all); errors list the valid ones."""
    if classes is None:
        return None
    if isinstance(classes, (str, int)):
        classes = [classes]
    out = set()
    for c in classes:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(FMNIST_CLASSES):
            out.add(c)
        elif isinstance(c, str) and c in FMNIST_CLASSES:
            out.add(FMNIST_CLASSES.index(c))
        else:
            raise ValueError(f"data.classes: {c!r} is not a Fashion-MNIST class; valid: indices 0-9 or "
                             f"{FMNIST_CLASSES}")
    if not out:
        raise ValueError("data.classes is empty; give null for all classes")
    return sorted(out)


class FashionMNIST32Data(DiffusionData):
    """Fashion-MNIST train images padded with 2 black pixels to 32 x 32: the last ``val_size`` of a
    seeded permutation of the train split for validation, the rest for training; the test split
    (FD reference) is Fashion-MNIST's test split. ``classes``: keep only these (names or indices)."""

    def __init__(self, root=FMNIST_DIR, classes=None, val_size=1000, **kw):
        super().__init__(**kw)
        self.root, self.val_size = root, int(val_size)
        self.keep = class_indices(classes)
        self.classes = [FMNIST_CLASSES[i] for i in self.keep] if self.keep else list(FMNIST_CLASSES)

    def _split(self, split):
        x, y = load_fmnist(self.root, split)
        if self.keep:
            m = torch.isin(y, torch.tensor(self.keep))
            x, y = x[m], y[m]
            y = torch.searchsorted(torch.tensor(self.keep), y)  # indices into self.classes
        return F.pad(x, (2, 2, 2, 2)), y

    def setup(self, stage=None):
        if getattr(self, "train_set", None) is not None:
            return
        x, y = self._split("train")
        if not 0 < self.val_size < len(x):
            raise ValueError(f"data.val_size={self.val_size} is not valid; valid: 1..{len(x) - 1}")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        tr, va = perm[:-self.val_size], perm[-self.val_size:]
        self.train_set = self._limit(TensorDataset(x[tr], y[tr]), self.limit_train)
        self.val_set = self._limit(TensorDataset(x[va], y[va]), self.limit_test)
        xt, yt = self._split("test")
        self.test_set = self._limit(TensorDataset(xt, yt), self.limit_test)


class _FolderImages(Dataset):
    def __init__(self, files, channels, size):
        self.files, self.channels, self.size = files, channels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                s = self.size / min(im.size)
                im = im.resize((max(self.size, round(im.size[0] * s)), max(self.size, round(im.size[1] * s))),
                               Image.BICUBIC)
                left, top = (im.size[0] - self.size) // 2, (im.size[1] - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                t = torch.as_tensor(bytearray(im.tobytes()), dtype=torch.uint8)
        except OSError as e:
            raise ValueError(f"{self.files[i]} is not a readable image: {e}") from None
        return t.view(self.size, self.size, self.channels).permute(2, 0, 1).contiguous(), 0


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


class FolderDiffusionData(DiffusionData):
    """The user's images: ``root/train`` (+ ``root/val``, ``root/test``) if present, else every image
    under ``root`` (recursively) with a seeded ``val_fraction`` held out for validation and testing."""

    def __init__(self, root, channels=3, size=32, val_fraction=0.05, mean=None, std=None, **kw):
        super().__init__(**kw)
        self.root, self.channels = Path(root), int(channels)
        size = size[0] if isinstance(size, (list, tuple)) else size
        self.size, self._side, self.val_fraction = [int(size)] * 2, int(size), float(val_fraction)
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels={channels!r} is not valid; valid: 1 or 3")

    def setup(self, stage=None):
        if getattr(self, "train_set", None) is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root} is not a folder of images")
        if (self.root / "train").is_dir():
            splits = {s: find_images(self.root / s) if (self.root / s).is_dir() else [] for s in ("train", "val", "test")}
            splits["val"] = splits["val"] or splits["test"]
            splits["test"] = splits["test"] or splits["val"]
        else:
            files = find_images(self.root)
            random.Random(self.seed).shuffle(files)
            k = max(1, round(len(files) * self.val_fraction))
            splits = {"train": files[k:], "val": files[:k], "test": files[:k]}
        for s, files in splits.items():
            if not files:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) for the {s} split under {self.root}")
        mk = lambda fs: _FolderImages(fs, self.channels, self._side)  # noqa: E731
        self.train_set = self._limit(mk(splits["train"]), self.limit_train)
        self.val_set = self._limit(mk(splits["val"]), self.limit_test)
        self.test_set = self._limit(mk(splits["test"]), self.limit_test)
