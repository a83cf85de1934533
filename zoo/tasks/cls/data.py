"""Image-classification data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (the idx files
it installs) and any ImageFolder tree of the user's. Batches are float images in [0, 1]."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset, TensorDataset, random_split

from ...datasets import FMNIST_CLASSES, FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, SplitLoaders, load_fmnist


def to_float_batch(batch):
    x, y = batch
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x, y


def augment(x: torch.Tensor, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per sample, on a float batch."""
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, 2 * pad + 1, (n,))
    j = torch.randint(0, 2 * pad + 1, (n,))
    rows = (i[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (j[:, None] + torch.arange(w)[None])[:, None, None, :]
    out = xp[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        m = torch.rand(n) < 0.5
        out[m] = out[m].flip(-1)
    return out


class _Collate:
    def __init__(self, train: bool):
        self.train = train

    def __call__(self, samples):
        x = torch.stack([s[0] for s in samples])
        y = torch.as_tensor([int(s[1]) for s in samples])
        x, y = to_float_batch((x, y))
        return (augment(x) if self.train else x), y


class ClassificationData(SplitLoaders, L.LightningDataModule):
    """Base: subclasses set ``self.train_set``/``val_set``/``test_set`` in ``setup``."""

    channels, size, mean, std, classes = 1, None, [0.0], [1.0], []

    def __init__(self, batch_size=128, num_workers=0, val_size=5000, seed=0, limit_train=None,
                 limit_test=None, augment=True):
        super().__init__()
        self.batch_size, self.num_workers, self.val_size, self.seed = batch_size, num_workers, val_size, seed
        self.limit_train, self.limit_test, self.augment = limit_train, limit_test, augment

    def input_contract(self) -> dict:
        return {"channels": self.channels, "size": self.size, "range": [0.0, 1.0],
                "mean": list(self.mean), "std": list(self.std), "classes": list(self.classes)}

    def collate(self, train):
        return _Collate(train and self.augment)


class FashionMNISTData(ClassificationData):
    """Fashion-MNIST: 55k train / 5k validation (held out from the train split, fixed seed) and the
    10k test split, read from the idx files Debian installs."""

    channels, size, mean, std, classes = 1, [28, 28], FMNIST_MEAN, FMNIST_STD, FMNIST_CLASSES

    def __init__(self, root=FMNIST_DIR, **kw):
        super().__init__(**kw)
        self.root = root

    def setup(self, stage=None):
        if getattr(self, "train_set", None) is not None:
            return
        x, y = load_fmnist(self.root, "train")
        full = TensorDataset(x, y)
        gen = torch.Generator().manual_seed(self.seed)
        train, val = random_split(full, [len(full) - self.val_size, self.val_size], generator=gen)
        self.train_set = self._limit(train, self.limit_train)
        self.val_set = self._limit(val, self.limit_test)
        xt, yt = load_fmnist(self.root, "test")
        self.test_set = self._limit(TensorDataset(xt, yt), self.limit_test)


class _ImageFolderSet(Dataset):
    def __init__(self, root, channels, size):
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2 as T

        tf = [T.Grayscale(1)] if channels == 1 else [T.RGB()]
        tf += [T.Resize(size), T.CenterCrop(size), T.ToImage(), T.ToDtype(torch.uint8)]
        self.ds = ImageFolder(str(root), transform=T.Compose(tf))
        self.classes = self.ds.classes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


class ImageFolderData(ClassificationData):
    """The user's images: ``root/train/<class>/*.png`` and ``root/val/<class>/...`` (and optionally
    ``root/test``; without it the validation split is also the test split)."""

    def __init__(self, root, channels=3, size=(32, 32), mean=None, std=None, **kw):
        super().__init__(**kw)
        self.root, self.channels, self.size = Path(root), int(channels), [int(s) for s in size]
        self.mean = list(mean) if mean else [0.5] * self.channels
        self.std = list(std) if std else [0.25] * self.channels

    def setup(self, stage=None):
        if getattr(self, "train_set", None) is not None:
            return
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise FileNotFoundError(f"ImageFolder data needs {self.root / split}/<class>/<images>")
        self.train_set = _ImageFolderSet(self.root / "train", self.channels, self.size)
        self.val_set = _ImageFolderSet(self.root / "val", self.channels, self.size)
        test = self.root / "test"
        self.test_set = _ImageFolderSet(test, self.channels, self.size) if test.is_dir() else self.val_set
        self.classes = self.train_set.classes
        if self.val_set.classes != self.classes:
            raise ValueError(f"class folders differ: train {self.classes} vs val {self.val_set.classes}")
        self.train_set = self._limit(self.train_set, self.limit_train)
