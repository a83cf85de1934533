"""Shipped saliency checkpoints, loaded by name as a user would: golden outputs, cards, the issues'
targets (from the numbers the training commands measured), the ``sal_real`` photos reproducing each
card, Triton == reference, and (slow) the whole test split reproducing each card."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_golden, needs_scenes
from zoo.cards import packed_layer_bytes, read_golden
from zoo.registry import resolve_checkpoint

pytest.importorskip("segmentation_models_pytorch")

ARCHS = ("unet_r18", "linknet_r18", "unetpp_r18")
SHIPPED = zoo.list_models(task="sal")
PROMISED = [f"{a}.{tag}_sal_scenes" for a in ARCHS
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
    assert f"MAE {m['real_mae']:.4f}, max F-measure {m['real_maxf']:.4f}, S-measure {m['real_smeasure']:.4f}" in card
    assert cfg["weights"]["bytes"] == (d / "model.safetensors").stat().st_size
    assert "](sample.jpg)" in card and (d / "sample.jpg").is_file()


def _config(name):
    return json.loads((resolve_checkpoint(name) / "config.json").read_text())


def _mean_mae(name):
    """The test MAE over seeds where the release was trained with several (zoo.seeds), else its own."""
    cfg = _config(name)
    return cfg["seeds"]["mean"]["test_mae"] if cfg.get("seeds") else cfg["metrics"]["test_mae"]


# measured misses are marked (strict: the mark must go when a retrained model meets the target)
REAL_MISSES = {a: f"{a} FP32 on sal_real: {v} (target MAE <= 0.12, S >= 0.75; see README)" for a, v in (
    ("unet_r18", "MAE 0.156, S 0.739"), ("linknet_r18", "MAE 0.209, S 0.696"), ("unetpp_r18", "MAE 0.166, S 0.731"))}
W4_MISSES = {}
W2_MISSES = {}
LSQ_MISSES = {a: f"{a} single runs, test MAE uL2Q W2A2 {u} vs LSQ W2A2 {q} (see README)" for a, u, q in (
    ("unet_r18", 0.0932, 0.0894), ("linknet_r18", 0.1136, 0.1023), ("unetpp_r18", 0.0861, 0.0820))}


def _marked(misses):
    return [pytest.param(a, marks=pytest.mark.xfail(reason=misses[a], strict=True)) if a in misses else a
            for a in ARCHS]


@pytest.mark.parametrize("arch", _marked(REAL_MISSES))
def test_float_model_finds_objects_in_real_photos(arch):
    """Issue 12: FP32 MAE <= 0.12 and S-measure >= 0.75 on the sal_real photos."""
    m = _metrics(f"{arch}.fp32_sal_scenes")
    assert m["real_mae"] <= 0.12 and m["real_smeasure"] >= 0.75, (m["real_mae"], m["real_smeasure"])


@pytest.mark.parametrize("arch", _marked(W4_MISSES))
def test_ul2q_w4a4_within_002_of_fp32(arch):
    """Issue 12: muL2Q W4A4 within 0.02 MAE of FP32, on the test scenes and on the real photos."""
    fp, w4 = _metrics(f"{arch}.fp32_sal_scenes"), _metrics(f"{arch}.ul2q_w4a4_sal_scenes")
    assert w4["test_mae"] - fp["test_mae"] <= 0.02, (w4["test_mae"], fp["test_mae"])
    assert w4["real_mae"] - fp["real_mae"] <= 0.02, (w4["real_mae"], fp["real_mae"])


@pytest.mark.parametrize("arch", _marked(W2_MISSES))
def test_ul2q_w2a2_within_003_of_fp32_at_an_eighth_of_the_bytes(arch):
    mae = {tag: _metrics(f"{arch}.{tag}_sal_scenes")["test_mae"] for tag in ("fp32", "ul2q_w2a2")}
    assert mae["ul2q_w2a2"] - mae["fp32"] <= 0.03, mae
    packed, fp32 = packed_layer_bytes(resolve_checkpoint(f"{arch}.ul2q_w2a2_sal_scenes"))[2]
    assert packed * 8 <= fp32


@pytest.mark.parametrize("arch", _marked(LSQ_MISSES))
def test_ul2q_w2a2_no_worse_than_lsq_w2a2(arch):
    """On the mean over seeds where there are several (else single runs: see the README's caveat)."""
    ul2q = _mean_mae(f"{arch}.ul2q_w2a2_sal_scenes")
    lsq = _mean_mae(f"{arch}.lsq_w2a2_sal_scenes")
    assert ul2q <= lsq, (ul2q, lsq)


@needs_scenes
@pytest.mark.parametrize("name", SHIPPED)
def test_real_photos_reproduce_card(name):
    from zoo.tasks.sal.real import evaluate_real

    res = evaluate_real(zoo.load(name))
    card = _metrics(name)
    for k in ("real_mae", "real_maxf", "real_smeasure"):
        assert res[k] == pytest.approx(card[k], abs=1e-4), k
    assert (resolve_checkpoint(name) / "real.jpg").is_file()


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
@needs_scenes
@pytest.mark.parametrize("name", SHIPPED)
def test_test_split_reproduces_card(name):
    from zoo.tasks.sal.scenes import SceneSalData
    from zoo.tasks.sal.task import evaluate

    model = zoo.load(name)
    dm = SceneSalData(size=model.input_contract["train_size"][0])
    dm.setup()
    res = evaluate(model, dm.test_dataloader(), progress=False)
    card = _metrics(name)
    for k in ("mae", "maxf", "smeasure"):
        assert res[k] == pytest.approx(card["test_" + k], abs=1e-4), k
    assert res["images"] == card["test_images"]
