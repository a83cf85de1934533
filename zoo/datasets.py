"""Real data installed by packages, shared by the tasks' built-in defaults and by
``zoo.predict``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (the idx files it installs)
and the natural photos bundled with scikit-image and scikit-learn, with the fixed train /
validation / test split of those photos that every task using them keeps (no photo is shared
between splits). Nothing here downloads anything."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
FMNIST_MEAN, FMNIST_STD = [0.2860], [0.3530]


def batch_input(batch):
    """The model input of a DataLoader batch: the batch itself, or the first entry of a tuple, list or
    dict (recursively), as every task's DataModule yields them."""
    while isinstance(batch, (list, tuple, dict)) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return batch


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values (truncated?)")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        f"`apt-get install -y dataset-fashion-mnist`, or point data.root at a folder holding the idx files."
    )


def load_fmnist(root: str | os.PathLike = FMNIST_DIR, split: str = "train"):
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of the train (60k) or test (10k) split."""
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(x) != len(y):
        raise ValueError(f"{root}: {len(x)} images but {len(y)} labels in the {split} split")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Built-in splits. Test images are never trained or validated on; grey photos become 3-channel.
BUILTIN_TRAIN = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "stereo_motorcycle", "sklearn:china", "brick", "grass", "gravel", "moon")
BUILTIN_VAL = ("coins", "clock")
BUILTIN_TEST = ("chelsea", "sklearn:flower", "camera")


def builtin_image(name: str) -> np.ndarray:
    """A bundled photo as uint8 RGB HxWx3: ``skimage.data.<name>`` or ``sklearn:<china|flower>``."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name.split(":", 1)[1] + ".jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo pairs: the left view
            img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def read_image(path, mode: str = "RGB") -> np.ndarray:
    """An image file as uint8 (HxWx3 for ``mode="RGB"``, HxW for ``"L"``); a ValueError names a file
    PIL cannot read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path} is not a readable image: {e}") from None


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write uint8 ``arr`` as a PNG atomically (an interrupted run never leaves a half-written file)."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    return files


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float 3xHxW in [0, 1]."""
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """float 3xHxW (any range) -> uint8 HxWx3, clamped to [0, 1] and rounded like basicsr's tensor2img."""
    return (t.detach().float().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()
