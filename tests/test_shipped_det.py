"""Shipped detection checkpoints, loaded by name as a user would: golden head outputs, the output
contract, cards, and the issue's targets (from the numbers the training commands measured)."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_card, check_golden
from zoo.cards import float_reference_bytes, read_golden
from zoo.registry import resolve_checkpoint

pytest.importorskip("pycocotools")

try:  # an arch=mmdet release needs mmdet with a compiled mmcv (bash scripts/install_mmdet.sh)
    from mmcv.ops import nms  # noqa: F401
    import mmdet  # noqa: F401
    HAVE_MMDET = True
except ImportError:
    HAVE_MMDET = False


def _shipped(name):
    if not name.startswith("mmdet."):
        return name
    return pytest.param(name, marks=[pytest.mark.mmdet, pytest.mark.skipif(
        not HAVE_MMDET, reason="an arch=mmdet release needs mmdet: bash scripts/install_mmdet.sh")])


SHIPPED = [_shipped(n) for n in zoo.list_models(task="det")]


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
    cfg, card = check_card(name)
    m = cfg["metrics"]
    assert f"mAP {m['test_map']:.4f}, mAP50 {m['test_map50']:.4f}, mAP75 {m['test_map75']:.4f}" in card


def test_float_fcos_reaches_0_60_map50():
    """The issue's target for the float FCOS on the built-in test split (a detector that works)."""
    m = _config("fcos_r18.fp32_det_composites")["metrics"]
    assert m["test_map50"] >= 0.60, m


def _mean_map(cfg) -> float:
    """Test mAP over the release's seeds (python -m zoo.seeds) where it has several, else its own."""
    return cfg["seeds"]["mean"]["test_map"] if "seeds" in cfg else cfg["metrics"]["test_map"]


@pytest.mark.parametrize("arch", ["fcos_r18", "retinanet_r18"])
def test_w4a4_within_2_map_of_float_and_6x_smaller(arch):
    """LSQ W4A4 QAT from the float model of the same arch: within 2.0 mAP points (COCO mAP, in [0, 1]:
    0.02; over seeds where the release has several) and a weights file at least 6x smaller than the
    float32 weights (the float release itself is stored as float16)."""
    fp, q = _config(f"{arch}.fp32_det_composites"), _config(f"{arch}.lsq_w4a4_det_composites")
    assert fp["metrics"]["test_map"] - _mean_map(q) <= 0.02, (fp["metrics"], q["metrics"])
    assert q["weights"]["bytes"] * 6 <= float_reference_bytes(fp)
    assert q["quant"]["weight"]["bits"] == 4 and q["quant"]["act"]["bits"] == 4


def test_per_level_head_activations_no_worse_than_shared():
    """AQD's argument: the head's activation quantizers with one parameter set per FPN level, against one
    shared set, same recipe, mean test mAP over 3 seeds each."""
    shared = _config("fcos_r18.lsq_w4a4_det_composites")
    per = _config("fcos_r18.lsq_w4a4_perlevel_det_composites")
    assert len(shared["seeds"]["runs"]) == len(per["seeds"]["runs"]) == 3
    sites = {g: lq.get("act_sites", 1) for g, lq in per["quant"]["overrides"].items() if lq}
    assert sites["head.classification_head.conv.*"] == 5 and sites["head.regression_head.conv.*"] == 5
    assert all(lq is None or "act_sites" not in lq for lq in shared["quant"]["overrides"].values())
    assert _mean_map(per) >= _mean_map(shared), (per["seeds"]["mean"], shared["seeds"]["mean"])


def _binary(cfg, kind):
    q = cfg["quant"]
    assert q["weight"]["type"] == q["act"]["type"] == kind and q["weight"]["bits"] == q["act"]["bits"] == 1
    assert q["overrides"]["head.*"]["weight"]["bits"] == 4 and q["overrides"]["head.*"]["act"]["bits"] == 4
    assert q["overrides"]["backbone.body.conv1"]["weight"]["bits"] == 8
    assert len(cfg["seeds"]["runs"]) == 3
    return _mean_map(cfg)


def test_binary_body_within_12_map_of_float():
    """IR-Net W1A1 backbone body (8-bit stem, shortcuts and final head convs) under an LSQ W4A4 FPN / head:
    within 12 mAP points of the float FCOS (COCO mAP in [0, 1]: 0.12), mean over 3 seeds."""
    fp = _config("fcos_r18.fp32_det_composites")
    irnet = _binary(_config("fcos_r18.irnet_w1a1_body_lsq_w4a4_det_composites"), "IRNet")
    assert fp["metrics"]["test_map"] - irnet <= 0.12, (fp["metrics"], irnet)


def test_binary_body_above_its_xnor_baseline():
    """IR-Net's binary body above the XNOR-Net body trained with the same recipe, start and budget: the
    two training commands differ only in quant= and IR-Net's EDE end point (+quant.*.t_max). Mean test
    mAP over the same 3 seeds each (python -m zoo.seeds)."""
    ir = _config("fcos_r18.irnet_w1a1_body_lsq_w4a4_det_composites")
    xn = _config("fcos_r18.xnor_w1a1_body_lsq_w4a4_det_composites")

    def recipe(cfg):
        return sorted(a for a in cfg["train"]["command"].split() if not a.startswith(("quant=", "+quant.")))

    assert recipe(ir) == recipe(xn)
    assert ir["train"]["global_step"] == xn["train"]["global_step"]
    assert _binary(ir, "IRNet") > _binary(xn, "XNOR")
