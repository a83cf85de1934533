"""Shipped saliency checkpoints, loaded by name as a user would: golden outputs, cards, the issue's
targets (from the numbers the training commands measured), Triton == reference, and (slow) the
whole test split reproducing each card."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_golden, check_seed_record, needs_fmnist
from zoo.cards import packed_layer_bytes, read_golden
from zoo.registry import resolve_checkpoint

pytest.importorskip("segmentation_models_pytorch")

ARCHS = ("unet_r18", "linknet_r18", "unetpp_r18")
SHIPPED = zoo.list_models(task="sal")
PROMISED = [f"{a}.{tag}_sal_composites" for a in ARCHS
            for tag in ("fp32", "ul2q_w4a4", "ul2q_w2a2", "lsq_w2a2")]


def _metrics(name):
    return json.loads((resolve_checkpoint(name) / "config.json").read_text())["metrics"]


def test_the_promised_checkpoints_are_shipped():
    for name in PROMISED:
        assert name in SHIPPED, f"{name} missing from {SHIPPED}"


@pytest.mark.parametrize("name", SHIPPED)
def test_golden_output(name):
    out, _ = check_golden(name)
    assert out.shape[1] == 1


@pytest.mark.parametrize("name", SHIPPED)
def test_card_matches_config(name):
    d = resolve_checkpoint(name)
    cfg = json.loads((d / "config.json").read_text())
    card = (d / "README.md").read_text()
    m = cfg["metrics"]
    assert cfg["train"]["command"] in card
    assert f"MAE {m['test_mae']:.4f}, max F-measure {m['test_maxf']:.4f}, S-measure {m['test_smeasure']:.4f}" in card
    assert cfg["weights"]["bytes"] == (d / "model.safetensors").stat().st_size
    assert (d / "sample.png").is_file()


@pytest.mark.parametrize("arch", ARCHS)
def test_targets(arch):
    """The issue's targets, on the test MAE each training command measured on its packed model."""
    mae = {tag: _metrics(f"{arch}.{tag}_sal_composites")["test_mae"] for tag in ("fp32", "ul2q_w4a4", "ul2q_w2a2")}
    assert mae["ul2q_w4a4"] - mae["fp32"] <= 0.01, mae
    assert mae["ul2q_w2a2"] - mae["fp32"] <= 0.03, mae
    packed, fp32 = packed_layer_bytes(resolve_checkpoint(f"{arch}.ul2q_w2a2_sal_composites"))[2]
    assert packed * 8 <= fp32


def _config(name):
    return json.loads((resolve_checkpoint(name) / "config.json").read_text())


def _mean_mae(name):
    """The test MAE over seeds where the release was trained with several (zoo.seeds), else its own."""
    cfg = _config(name)
    return cfg["seeds"]["mean"]["test_mae"] if cfg.get("seeds") else cfg["metrics"]["test_mae"]


SEEDED = [n for n in SHIPPED if _config(n).get("seeds")]


def test_the_unet_w2a2_comparison_is_over_three_seeds():
    assert {"unet_r18.ul2q_w2a2_sal_composites", "unet_r18.lsq_w2a2_sal_composites"} <= set(SEEDED)


@pytest.mark.parametrize("name", SEEDED)
def test_seed_record_is_consistent(name):
    check_seed_record(_config(name), "test_mae")


# measured misses are marked (strict: the mark must go when a retrained model meets the target)
LSQ_MISSES = {"unet_r18": "U-Net over 3 seeds: uL2Q W2A2 MAE 0.0482 +- 0.0030 vs LSQ W2A2 0.0438 +- 0.0022 "
                          "(see README)"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.xfail(reason=LSQ_MISSES[a], strict=True))
                                  if a in LSQ_MISSES else a for a in ARCHS])
def test_ul2q_w2a2_no_worse_than_lsq_w2a2(arch):
    """On the mean over seeds where there are several (the single-run archs compare single runs)."""
    ul2q = _mean_mae(f"{arch}.ul2q_w2a2_sal_composites")
    lsq = _mean_mae(f"{arch}.lsq_w2a2_sal_composites")
    assert ul2q <= lsq, (ul2q, lsq)


QUANTIZED = [n for n in SHIPPED if "fp32" not in n]


@pytest.mark.parametrize("name", QUANTIZED)
def test_triton_backend_matches_reference(name):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, _ = read_golden(resolve_checkpoint(name))
    x = x[:1, :, :32, :32].contiguous().to(dev)  # small: the interpreter is slow on CPU
    ref = zoo.load(name, backend="reference", map_location=dev)
    tri = zoo.load(name, backend="triton", map_location=dev)
    with torch.no_grad():
        assert torch.equal(tri(x), ref(x))


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("name", SHIPPED)
def test_test_split_reproduces_card(name):
    from zoo.tasks.sal.data import CompositeSalData
    from zoo.tasks.sal.task import evaluate

    model = zoo.load(name)
    dm = CompositeSalData(size=model.input_contract["train_size"][0])
    dm.setup()
    res = evaluate(model, dm.test_dataloader(), progress=False)
    card = _metrics(name)
    for k in ("mae", "maxf", "smeasure"):
        assert res[k] == pytest.approx(card["test_" + k], abs=1e-4), k
    assert res["images"] == card["test_images"]
