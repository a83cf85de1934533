"""The built-in saliency scenes (clip art and Fashion-MNIST items over real photos) and the
``sal_real`` photo evaluation: exact masks, alpha compositing by its formula, fixed and disjoint
splits, clear errors for missing packages, and the real-photo metrics against hand formulas."""
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo import sources
from zoo.tasks.sal import real, scenes

from .conftest import needs_scenes


class Const(np.random.Generator):
    """A generator whose draws make ``paste`` deterministic and simple: no flip, no channel
    permutation, no recolouring, no shadow, the object at the top-left corner."""

    def __init__(self):
        super().__init__(np.random.PCG64(0))

    def random(self, *a, **k):
        return 0.99  # every "with probability p" branch is skipped

    def uniform(self, lo=0.0, hi=1.0, size=None):
        return 1.0 if (lo, hi) in ((0.6, 1.4), (0.7, 1.3)) else 0.0 if (lo, hi) == (-0.15, 0.15) else lo

    def integers(self, lo, hi=None, size=None):
        return 0 if size is None else np.zeros(size, dtype=np.int64)


def test_paste_is_alpha_compositing_and_the_mask_is_alpha_over_half():
    obj = torch.zeros(4, 8, 8)
    obj[:3] = torch.tensor([0.9, 0.2, 0.4])[:, None, None]
    obj[3, :, :4] = 1.0      # opaque left half
    obj[3, 2:6, 4:6] = 0.4   # translucent patch: blended, not in the mask
    bg = torch.rand(3, 16, 16)
    img, mask = bg.clone(), torch.zeros(1, 16, 16)
    scenes.paste(img, mask, obj, Const(), longest=8)  # longest side 8: no resizing
    a = obj[3:]
    expect = bg.clone()
    expect[:, :8, :8] = (1 - a) * bg[:, :8, :8] + a * obj[:3]
    assert torch.allclose(img, expect, atol=1e-6)
    want = torch.zeros(1, 16, 16)
    want[0, :8, :4] = 1
    assert torch.equal(mask, want)


def test_shadow_darkens_the_background_but_is_not_foreground():
    class Shadow(Const):
        def random(self, *a, **k):
            return 0.0 if self._shadow_next() else 0.99

        calls = 0

        def _shadow_next(self):
            self.calls += 1
            return self.calls == 3  # flip? no; recolour permutation? no; shadow? yes

        def integers(self, lo, hi=None, size=None):
            return np.full(size, 4, dtype=np.int64) if size is not None else 0

    obj = torch.ones(4, 8, 8)
    bg = torch.full((3, 24, 24), 0.5)
    img, mask = bg.clone(), torch.zeros(1, 24, 24)
    scenes.paste(img, mask, obj, Shadow(), longest=8)
    assert mask.sum() == 64 and mask[0, :8, :8].all()  # the object only
    outside = mask[0] == 0
    assert (img[:, outside] < 0.5 - 1e-3).any()          # a shadow fell somewhere off the object
    assert (img[:, outside] <= 0.5 + 1e-6).all()          # and only darkens


def test_missing_packages_name_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y openclipart-png"):
        sources.clipart_files(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y opencv-doc"):
        sources.photo_backgrounds("test", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y opencv-doc"):
        real.real_pairs(str(tmp_path / "nope"))


def test_clipart_loader_keeps_true_alpha_only(tmp_path):
    from PIL import Image

    yy, xx = np.mgrid[:40, :30]
    rgba = np.zeros((40, 30, 4), np.uint8)
    disc = (yy - 20) ** 2 + (xx - 12) ** 2 <= 8 ** 2
    rgba[disc] = (200, 10, 10, 255)
    Image.fromarray(rgba).save(tmp_path / "ok.png")
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(tmp_path / "opaque.png")  # no transparency
    boxed = np.zeros((40, 30, 4), np.uint8)
    boxed[5:35, 5:25] = 255  # an opaque rectangle fills its own box: no object outline to learn
    Image.fromarray(boxed).save(tmp_path / "boxed.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    t = sources.load_clipart(str(tmp_path / "ok.png"))
    assert t.shape == (4, 17, 17)  # cropped to the disc's box
    assert torch.equal(t[3] > 0.5, torch.from_numpy(disc[12:29, 4:21]))
    assert torch.allclose(t[0][t[3] > 0.5], torch.tensor(200 / 255))
    for bad in ("opaque.png", "boxed.png", "broken.png"):
        assert sources.load_clipart(str(tmp_path / bad)) is None, bad


@needs_scenes
def test_clipart_splits_are_disjoint_and_follow_the_crc_rule():
    import zlib

    files = sources.clipart_files()
    sets = {s: set(v) for s, v in files.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["train"]) > 3000 and len(sets["test"]) > 300
    for split, code in (("test", {0}), ("val", {1}), ("train", set(range(2, 10)))):
        assert {zlib.crc32(f.encode()) % 10 for f in files[split][:200]} <= code
    assert all(f.split("/")[0] in sources.CLIPART_CATEGORIES for f in files["train"])


def test_background_photos_are_disjoint_from_each_other_and_from_sal_real():
    listed = [n for s in sources.OPENCV_BACKGROUNDS.values() for n in s]
    assert len(listed) == len(set(listed))
    assert not set(listed) & set(real.REAL_PHOTOS)


@needs_scenes
def test_scenes_are_fixed_per_index_and_masks_are_binary():
    dm = scenes.SceneSalData(size=64, train_size=4, val_size=2, test_size=3, seed=5)
    dm.setup()
    x, m = dm.split("test")[2]
    y, n = scenes.SceneSalData(size=64, test_size=3, seed=9).split("test")[2]  # eval data ignore the seed
    assert torch.equal(x, y) and torch.equal(m, n)
    assert x.shape == (3, 64, 64) and m.shape == (1, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
    a, _ = dm.split("train")[0]
    b, _ = scenes.SceneSalData(size=64, train_size=4, seed=6).split("train")[0]
    assert not torch.equal(a, b)  # the run's seed varies the training scenes


# ----------------------------------------------------------------------------- sal_real
def test_real_masks_are_shipped_at_each_photos_size():
    from PIL import Image

    for name in real.REAL_PHOTOS:
        mask = Image.open(real.MASK_DIR / f"{Path(name).stem}.png")
        arr = np.asarray(mask)
        assert set(np.unique(arr).tolist()) <= {0, 255}
        assert 0.05 < (arr > 0).mean() < 0.8  # an object, not an empty or full frame
        photo = Path(real.OPENCV_DATA) / name
        if photo.is_file():
            assert Image.open(photo).size == mask.size


@needs_scenes
def test_real_masks_regenerate_by_the_documented_procedure():
    pytest.importorskip("cv2")
    from PIL import Image

    for (photo, mask_path), (box, init, space, _) in zip(real.real_pairs(), real.REAL_PHOTOS.values()):
        new = real.make_mask(photo, box, init, space)
        old = np.asarray(Image.open(mask_path)) > 0
        iou = (new & old).sum() / (new | old).sum()
        assert iou > 0.98, (photo.name, iou)


class ConstModel(torch.nn.Module):
    def __init__(self, logit):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(float(logit)))
        self.input_contract = {"train_size": [32, 32]}

    def forward(self, x):
        return self.logit.expand(x.shape[0], 1, *x.shape[2:])


@needs_scenes
def test_real_metrics_of_a_constant_map_by_hand():
    """A map of constant p: MAE = p (1 - f) + (1 - p) f per photo, f its mask's foreground share;
    max F at the only informative threshold = (1 + b2) f / (b2 f + 1) (everything predicted)."""
    from PIL import Image

    p = 0.3
    res = real.evaluate_real(ConstModel(np.log(p / (1 - p))), per_photo=True)
    maes, fs = [], []
    for name in real.REAL_PHOTOS:
        f = (np.asarray(Image.open(real.MASK_DIR / f"{Path(name).stem}.png")) > 0).mean()
        mae = p * (1 - f) + (1 - p) * f
        assert res["photos"][Path(name).stem]["mae"] == pytest.approx(mae, abs=1e-4)
        maes.append(mae)
        fs.append((1 + 0.3) * f / (0.3 * f + 1))
    assert res["real_mae"] == pytest.approx(np.mean(maes), abs=1e-4)
    assert res["real_maxf"] == pytest.approx(np.mean(fs), abs=1e-4)
    assert res["real_images"] == len(real.REAL_PHOTOS)
