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
import torch.utils.data

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the photo tasks' input normalisation
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


JPEG_QUALITY = 90  # sample grids of photos: a third of a PNG's bytes (releases ship in the wheel)


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write uint8 ``arr`` atomically (an interrupted run never leaves a half-written file): a PNG, or a
    JPEG of quality ``JPEG_QUALITY`` when ``path`` ends in ``.jpg``/``.jpeg`` (for photo grids); grey RGB
    pictures are stored with one channel."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if arr.ndim == 3 and arr.shape[-1] == 3 and (arr[..., :1] == arr).all():
        arr = arr[..., 0]  # a grey picture in RGB: one channel, the same pixels, a third of the bytes
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(arr).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


def save_panel(panel: np.ndarray, path, zoom: int = 1) -> Path:
    """Write the uint8 picture ``panel`` enlarged ``zoom`` times (nearest neighbour) with ``save_png`` (a
    PNG, or a JPEG for a ``.jpg`` path), creating its folder; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if zoom != 1:
        panel = np.asarray(Image.fromarray(panel).resize((panel.shape[1] * zoom, panel.shape[0] * zoom), Image.NEAREST))
    save_png(panel, path)
    return path


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


# ----------------------------------------------------------------------------- synthetic composites
# Shared by the tasks whose built-in data pastes Fashion-MNIST items over crops of the bundled photos:
# the splits never share an item or a photo.
SPLITS = ("train", "val", "test")
FMNIST_TRAIN_ITEMS = 50_000  # Fashion-MNIST train items [0, 50k) train, [50k, 60k) validate; test: its test split


def fmnist_items(root, split: str):
    """(uint8 [N, 28, 28] items, int64 labels) of a composite split (see FMNIST_TRAIN_ITEMS)."""
    x, y = load_fmnist(root, "test" if split == "test" else "train")
    x = x[:, 0]
    if split == "train":
        return x[:FMNIST_TRAIN_ITEMS], y[:FMNIST_TRAIN_ITEMS]
    return (x[FMNIST_TRAIN_ITEMS:], y[FMNIST_TRAIN_ITEMS:]) if split == "val" else (x, y)


def builtin_backgrounds(split: str) -> list[torch.Tensor]:
    """The split's bundled photos as float 3xHxW in [0, 1]."""
    names = {"train": BUILTIN_TRAIN, "val": BUILTIN_VAL, "test": BUILTIN_TEST}[split]
    return [torch.from_numpy(builtin_image(n)).permute(2, 0, 1).float().div_(255.0) for n in names]


def resize_chw(x: torch.Tensor, size) -> torch.Tensor:
    """[C, H, W] float -> [C, *size], bilinear (antialiased when shrinking)."""
    import torch.nn.functional as F

    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]


def jitter_colours(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random channel order and saturation (x0.3-x2.5 around each pixel's grey) of a background, so
    that a dozen training photos cover more colours than their own (a saturated test photo is
    otherwise mistaken for foreground)."""
    img = img[torch.from_numpy(rng.permutation(3))]
    grey = img.mean(0, keepdim=True)
    return (grey + float(rng.uniform(0.3, 2.5)) * (img - grey)).clamp_(0, 1)


def random_crop(rng: np.random.Generator, backgrounds, size: int, smallest: float = 0.3,
                jitter: bool = False) -> torch.Tensor:
    """A random square crop (side ``smallest``-1 x the photo's shorter side) of a random background,
    resized to ``size``, flipped half the time and (``jitter``) colour-randomised."""
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    h, w = bg.shape[1:]
    side = max(8, int(rng.uniform(smallest, 1.0) * min(h, w)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    img = resize_chw(bg[:, y:y + side, x:x + side], (size, size)).clamp_(0, 1)
    if rng.random() < 0.5:
        img = img.flip(-1)
    if jitter:
        img = jitter_colours(img, rng)
    return img


class SeededSet(torch.utils.data.Dataset):
    """``n`` synthetic samples of one split: sample ``i`` is ``make(rng)`` with ``rng`` seeded by
    (seed, split, i), so it is a pure function of them (``make``: a picklable callable, e.g. a
    ``functools.partial`` of a composite function)."""

    def __init__(self, make, n: int, seed: int, split: str):
        self.make, self.n = make, int(n)
        self.key = (int(seed), SPLITS.index(split))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(np.random.default_rng([*self.key, int(i)]))


class SplitLoaders:
    """DataModule mixin: ``train/val/test_dataloader`` over ``self.train_set``/``val_set``/``test_set``
    (which ``setup`` sets), batched by ``self.collate(train)`` (default: torch's default collate);
    ``drop_last_train`` drops a ragged last training batch. ``_limit(ds, n)`` keeps the first ``n``
    items (all if ``n`` is falsy)."""

    drop_last_train = False

    def collate(self, train: bool):
        return None  # DataLoader's default collate

    def _loader(self, ds, train: bool):
        return torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=train, drop_last=train and self.drop_last_train,
            num_workers=self.num_workers, collate_fn=self.collate(train), persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.test_set, False)

    @staticmethod
    def _limit(ds, n):
        return ds if not n or n >= len(ds) else torch.utils.data.Subset(ds, range(int(n)))
