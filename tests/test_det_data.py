"""Detection data: composite boxes are the extents of the pasted items' visible pixels; splits are
fixed and disjoint; the COCO loader reads a hand-written folder and names bad files and boxes."""
import json

import numpy as np
import pytest
import torch

from zoo.datasets import builtin_backgrounds
from zoo.tasks.det.data import MAX_HIDDEN, CocoDetData, CompositeDetData, det_composite


def _items(n=20):
    g = torch.Generator().manual_seed(0)
    items = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):  # a filled rectangle per item, of varying size and place
        h, w = 6 + i % 15, 5 + (3 * i) % 18
        y, x = int(torch.randint(0, 28 - h, (1,), generator=g)), int(torch.randint(0, 28 - w, (1,), generator=g))
        items[i, y:y + h, x:x + w] = 200
    return items, torch.arange(n) % 10


@pytest.fixture(scope="module")
def backgrounds():
    return [torch.rand(3, 80, 90, generator=torch.Generator().manual_seed(1))]


def test_boxes_are_the_visible_extents_of_the_pasted_items(backgrounds):
    items, labels = _items()
    seen = 0
    for i in range(40):
        img, target, ids, _ = det_composite(np.random.default_rng(i), backgrounds, items, labels, 64, with_ids=True)
        k = len(target["labels"])
        assert img.shape == (3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
        assert target["boxes"].shape == (k, 4) and target["labels"].dtype == torch.int64
        assert set(ids.unique().tolist()) == set(range(-1, k)) - ({-1} if bool((ids >= 0).all()) else set())
        for j in range(k):
            ys, xs = np.nonzero((ids == j).numpy())  # independent of the code's box rule
            assert target["boxes"][j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        seen += k
    assert seen >= 40  # 1-4 items a sample; few are left out


def test_no_item_is_hidden_beyond_the_limit(backgrounds):
    """Each later item hides at most MAX_HIDDEN of an earlier one's visible pixels, so item j of k keeps
    at least (1 - MAX_HIDDEN)^(k - 1 - j) of what was pasted."""
    items, labels = _items()
    crowded = 0
    for i in range(30):
        _, target, ids, pasted = det_composite(np.random.default_rng(i), backgrounds, items, labels, 64,
                                               objects=(4, 4), scale=(0.5, 0.6), with_ids=True)
        k = len(pasted)
        for j in range(k):
            visible = int((ids == j).sum())
            assert visible >= pasted[j] * (1 - MAX_HIDDEN) ** (k - 1 - j) - 1e-9
        crowded += visible < pasted[-1] or any(int((ids == j).sum()) < pasted[j] for j in range(k))
    assert crowded > 0  # the limit was exercised: some items do overlap


def test_composite_splits_are_fixed_and_disjoint(tmp_path):
    dm = CompositeDetData(train_size=4, val_size=3, test_size=3, size=64, seed=5)
    dm2 = CompositeDetData(train_size=4, val_size=3, test_size=3, size=64, seed=6)
    a, b = dm.split("test")[1], dm2.split("test")[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])  # test data: seed-free
    assert not torch.equal(dm.split("train")[0][0], dm2.split("train")[0][0])
    x, targets = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 64, 64) and len(targets) == 3
    assert dm.input_contract()["classes"][0] == "T-shirt/top"
    names = {s: [float(t.sum()) for t in builtin_backgrounds(s)] for s in ("train", "val", "test")}
    assert not set(names["train"]) & set(names["test"]) and not set(names["val"]) & set(names["test"])
    with pytest.raises(ValueError, match="data.size=100 is not valid; valid: a multiple of 32"):
        CompositeDetData(size=100)


def _coco(tmp_path, boxes=((2, 3, 10, 5),), split_dirs=("images",), cats=((7, "cat"), (3, "dog"))):
    from PIL import Image

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for d in split_dirs:
        (root / d).mkdir()
        Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(root / d / "a.png")
    for split in ("train", "val"):
        doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
               "annotations": [{"id": i, "image_id": 1, "bbox": list(b), "category_id": 7 if i == 0 else 3,
                                "iscrowd": 0} for i, b in enumerate(boxes)]
               + [{"id": 99, "image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 3, "iscrowd": 1}],
               "categories": [{"id": i, "name": n} for i, n in cats]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def test_coco_folder_remaps_categories_and_scales_boxes(tmp_path):
    root = _coco(tmp_path, boxes=((2, 3, 10, 5), (20, 0, 20, 20)))
    dm = CocoDetData(root=str(root), size=32, batch_size=2)
    img, t = dm.split("train")[0]
    assert dm.classes == ["dog", "cat"]  # ids 3, 7 -> 0, 1
    assert t["labels"].tolist() == [1, 0]  # the crowd box is skipped
    sx, sy = 32 / 40, 32 / 20
    assert torch.allclose(t["boxes"], torch.tensor([[2 * sx, 3 * sy, 12 * sx, 8 * sy], [20 * sx, 0, 40 * sx, 20 * sy]]))
    assert img.shape == (3, 32, 32)
    assert len(dm.split("test")) == 1  # no test json: the test split is val


@pytest.mark.parametrize("change,msg", [
    ("nojson", "instances_train.json does not exist"),
    ("outside", "has box [35, 3, 10, 5] (x, y, w, h) outside its 40x20 image"),
    ("noimage", "a.png does not exist"),
    ("empty", "has no annotations"),
])
def test_coco_errors_name_the_file_and_box(tmp_path, change, msg):
    root = _coco(tmp_path, boxes=((35, 3, 10, 5),) if change == "outside" else ((2, 3, 10, 5),))
    if change == "nojson":
        (root / "annotations" / "instances_train.json").unlink()
    if change == "noimage":
        (root / "images" / "a.png").unlink()
    if change == "empty":
        p = root / "annotations" / "instances_train.json"
        doc = json.loads(p.read_text())
        doc["annotations"] = []
        p.write_text(json.dumps(doc))
    with pytest.raises((ValueError, FileNotFoundError), match=msg.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        CocoDetData(root=str(root), size=32).setup()


def test_coco_map_by_hand():
    """Class 0: one perfect box (AP 1 at every IoU threshold). Class 1: the box shifted by 2 of its 10
    pixels, IoU 80/120 = 0.667, a true positive at thresholds 0.50-0.65 (4 of 10) only: AP 0.4.
    mAP = (1 + 0.4) / 2 = 0.7, mAP50 = 1, mAP75 = 0.5."""
    from zoo.tasks.det.metrics import DetectionMeter, boxes_iou

    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])}
    pred = {"boxes": torch.tensor([[0.0, 0, 10, 10], [22, 20, 32, 30]]), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 1])}
    assert float(boxes_iou(pred["boxes"][1:], gt["boxes"][1:])) == pytest.approx(80 / 120)
    m = DetectionMeter()
    m.update([pred], [gt])
    r = m.compute()
    assert r["map"] == pytest.approx(0.7, abs=1e-6) and r["map50"] == pytest.approx(1.0) and r["map75"] == pytest.approx(0.5)
    assert r["images"] == 1
