import gzip
import struct

import numpy as np
import pytest
import torch

from tests.conftest import needs_fmnist
from zoo.datasets import load_fmnist, read_idx
from zoo.tasks.cls.data import FashionMNISTData, ImageFolderData, augment


def _write_idx(path, arr, gz=True):
    header = struct.pack(">I", 0x00000800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "b"), arr)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not a uint8 idx file"):
        read_idx(tmp_path / "bad")
    arr = np.zeros((4, 2), dtype=np.uint8)
    _write_idx(tmp_path / "t", arr, gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "t")


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fmnist(tmp_path, "test")


def test_fashion_mnist_from_custom_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    dm = FashionMNISTData(root=tmp_path, val_size=10, batch_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert dm.input_contract()["channels"] == 1 and len(dm.input_contract()["classes"]) == 10


@needs_fmnist
def test_real_fashion_mnist_split_sizes():
    x, y = load_fmnist(split="test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert sorted(torch.bincount(y).tolist()) == [1000] * 10


def test_augment_keeps_shape_and_content():
    x = torch.rand(6, 1, 28, 28)
    out = augment(x)
    assert out.shape == x.shape
    assert torch.equal(augment(x, pad=0, flip=False), x)


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    dm = ImageFolderData(tmp_path, channels=3, size=(16, 16), batch_size=4)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and dm.input_contract()["classes"] == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="needs"):
        ImageFolderData(tmp_path / "nope").setup()
