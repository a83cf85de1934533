"""Shipped detection checkpoints, loaded by name as a user would: golden head outputs, the output
contract, cards, and the issue's targets (from the numbers the training commands measured)."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_golden
from zoo.cards import read_golden
from zoo.registry import resolve_checkpoint

pytest.importorskip("pycocotools")

SHIPPED = zoo.list_models(task="det")


def _config(name):
    return json.loads((resolve_checkpoint(name) / "config.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_golden_output(name):
    out, _ = check_golden(name)
    assert out.ndim == 3  # N x anchors x (classes + box (+ centerness))


@pytest.mark.parametrize("name", SHIPPED)
def test_detections_follow_the_contract(name):
    model = zoo.load(name)
    x, _ = read_golden(resolve_checkpoint(name))
    with torch.no_grad():
        out = model(x)
    classes = model.input_contract["classes"]
    assert isinstance(out, list) and len(out) == len(x)
    for d in out:
        k = len(d["scores"])
        assert d["boxes"].shape == (k, 4) and d["labels"].dtype == torch.int64
        assert ((d["labels"] >= 0) & (d["labels"] < len(classes))).all()
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= x.shape[-1]).all()


@pytest.mark.parametrize("name", SHIPPED)
def test_card_matches_config(name):
    d = resolve_checkpoint(name)
    cfg = _config(name)
    card = (d / "README.md").read_text()
    m = cfg["metrics"]
    assert cfg["train"]["command"] in card
    assert f"mAP {m['test_map']:.4f}, mAP50 {m['test_map50']:.4f}, mAP75 {m['test_map75']:.4f}" in card
    assert cfg["weights"]["bytes"] == (d / "model.safetensors").stat().st_size
    assert (d / "sample.png").is_file()


def test_float_fcos_reaches_0_60_map50():
    """The issue's target for the float FCOS on the built-in test split (a detector that works)."""
    m = _config("fcos_r18.fp32_det_composites")["metrics"]
    assert m["test_map50"] >= 0.60, m


def test_w4a4_within_2_map_of_float_and_6x_smaller():
    """LSQ W4A4 QAT from the float FCOS: within 2.0 mAP points (COCO mAP, in [0, 1]: 0.02) and a weights
    file at least 6x smaller."""
    fp, q = _config("fcos_r18.fp32_det_composites"), _config("fcos_r18.lsq_w4a4_det_composites")
    assert fp["metrics"]["test_map"] - q["metrics"]["test_map"] <= 0.02, (fp["metrics"], q["metrics"])
    assert q["weights"]["bytes"] * 6 <= fp["weights"]["bytes"]
    assert q["quant"]["weight"]["bits"] == 4 and q["quant"]["act"]["bits"] == 4
