"""Shipped super-resolution checkpoints, loaded by name as a user would: golden outputs, cards,
re-evaluation on the built-in test images, Triton == reference."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_golden, check_seed_record, needs_basicsr
from zoo.cards import made_by, read_golden
from zoo.registry import resolve_checkpoint

pytestmark = needs_basicsr

SHIPPED = zoo.list_models(task="sr")
PROMISED = [f"edsr.{tag}_x{s}" for s in (4, 2)
            for tag in ("fp32", "quantsr_w4a4", "quantsr_w2a2", "dorefa_w2a2")]


def _cfg(name):
    return json.loads((resolve_checkpoint(name) / "config.json").read_text())


def test_the_promised_checkpoints_are_shipped():
    for name in PROMISED:
        assert name in SHIPPED, f"{name} missing from {SHIPPED}"


@pytest.mark.parametrize("name", SHIPPED)
def test_golden_output(name):
    check_golden(name)


@pytest.mark.parametrize("name", SHIPPED)
def test_card_matches_config(name):
    d = resolve_checkpoint(name)
    cfg = _cfg(name)
    card = (d / "README.md").read_text()
    assert made_by(cfg)["command"] in card  # the training or the post-training-quantization command
    assert f"**{cfg['metrics']['test_psnr']:.2f} dB" in card
    assert f"{cfg['metrics']['test_bicubic_psnr']:.2f} dB" in card
    assert cfg["weights"]["bytes"] == (d / "model.safetensors").stat().st_size
    assert (d / "sample.png").is_file()


@pytest.mark.parametrize("name", SHIPPED)
def test_test_split_reproduces_card_and_beats_bicubic(name):
    from zoo.tasks.sr.data import BuiltinSRData
    from zoo.tasks.sr.task import evaluate

    model = zoo.load(name)
    dm = BuiltinSRData(scale=model.input_contract["scale"])
    dm.setup()
    res = evaluate(model, dm.test_dataloader(), progress=False)
    card = _cfg(name)["metrics"]
    for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
        assert res[k] == pytest.approx(card["test_" + k], abs=1e-3), k
    assert res["psnr"] > res["bicubic_psnr"]


@pytest.mark.parametrize("scale", [4, 2])
def test_quantsr_w2a2_above_the_sr_dorefa_baseline(scale):
    qsr = _cfg(f"edsr.quantsr_w2a2_x{scale}")["metrics"]["test_psnr"]
    dorefa = _cfg(f"edsr.dorefa_w2a2_x{scale}")
    assert dorefa["quant"]["weight"]["rescale"] is True  # the SR variant, not the classification one
    assert qsr > dorefa["metrics"]["test_psnr"], (qsr, dorefa["metrics"]["test_psnr"])


# a measured miss, kept visible (strict: the mark must go when a retrained model meets the bar)
@pytest.mark.xfail(strict=True, reason="QuantSR W2A2 x4 30.527 (3-seed mean) vs DoReFa-SR 30.34 dB: "
                                       "+0.19 dB, not 0.5 (see the README's SR section for why)")
def test_quantsr_w2a2_x4_is_half_a_db_above_dorefa():
    """The issue's bar: QuantSR W2A2 x4 (mean over its seeds) >= 0.5 dB above DoReFa W2A2 on the
    built-in test photos, which no training saw."""
    qsr = _cfg("edsr.quantsr_w2a2_x4")["seeds"]["mean"]["test_psnr"]
    assert qsr - _cfg("edsr.dorefa_w2a2_x4")["metrics"]["test_psnr"] >= 0.5


SEEDED = [n for n in SHIPPED if _cfg(n).get("seeds")]


def test_quantsr_and_pams_w2a2_x4_are_over_three_seeds():
    for name in ("edsr.quantsr_w2a2_x4", "edsr.pams_w2a2_x4"):
        assert name in SEEDED, name


@pytest.mark.parametrize("name", SEEDED)
def test_seed_record_is_consistent(name):
    check_seed_record(_cfg(name), "test_psnr")


def test_ptq_w4a8_release_is_close_to_its_float_model():
    """The post-training W4A8 EDSR (issue 13's release from another task): calibrated in seconds from
    edsr.fp32_x4 on real images, within 0.1 dB PSNR of it and above bicubic."""
    cfg, fp = _cfg("edsr.ptq_w4a8_x4"), _cfg("edsr.fp32_x4")
    assert "train" not in cfg and cfg["ptq"]["init_from"] == "edsr.fp32_x4"
    assert cfg["quant"]["weight"]["bits"] == 4 and cfg["quant"]["act"]["bits"] == 8
    assert fp["metrics"]["test_psnr"] - cfg["metrics"]["test_psnr"] <= 0.1


QUANTIZED = [n for n in SHIPPED if "fp32" not in n]


@pytest.mark.parametrize("name", QUANTIZED)
def test_triton_backend_matches_reference(name):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, _ = read_golden(resolve_checkpoint(name))
    x = x.to(dev)
    ref = zoo.load(name, backend="reference", map_location=dev)
    tri = zoo.load(name, backend="triton", map_location=dev)
    with torch.no_grad():
        assert torch.equal(tri(x), ref(x))
