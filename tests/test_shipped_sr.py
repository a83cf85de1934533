"""Shipped super-resolution checkpoints, loaded by name as a user would: golden outputs, cards,
re-evaluation on the built-in test images, Triton == reference."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_golden, needs_basicsr
from zoo.cards import read_golden
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
    assert cfg["train"]["command"] in card
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
    if "dorefa" not in name:  # the DoReFa baseline is below bicubic (see its card and the README)
        assert res["psnr"] > res["bicubic_psnr"]


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
