"""The shipped ViT releases (checkpoints/cls/vit_tiny_p4.*, issue 17): golden outputs through zoo.load,
cards, how each was made, and the issue's targets on the Fashion-MNIST test set (missed ones are strict
xfails stating the measured numbers)."""
import json

import pytest
import torch

import zoo
from tests.conftest import needs_fmnist
from zoo.quantizers import quantized_ops
from zoo.registry import resolve_checkpoint

SHIPPED = zoo.list_models("vit_tiny_p4.*")
PTQ = {"ptq_w8a8": ("base", "real", 8, 8), "ptq_w6a6": ("base", "real", 6, 6), "ptq_w4a4": ("base", "real", 4, 4),
       "log2_w4a4": ("log2", "real", 4, 4), "repq_w4a4": ("repq", "real", 4, 4), "repq_w6a6": ("repq", "real", 6, 6),
       "ptq_w4a8": ("base", "real", 4, 8), "psaq_w8a8": ("base", "psaq", 8, 8),
       "psaq_w4a8": ("base", "psaq", 4, 8), "apq_w4a4": ("apq", "real", 4, 4), "apq_w6a6": ("apq", "real", 6, 6)}


def _cfg(tag: str) -> dict:
    return json.loads((resolve_checkpoint(f"vit_tiny_p4.{tag}_fmnist") / "config.json").read_text())


def _acc(tag: str) -> float:
    return _cfg(tag)["metrics"]["test_acc"]


def test_the_promised_vit_releases_are_shipped():
    tags = {n.split(".", 1)[1].removesuffix("_fmnist") for n in SHIPPED}
    assert tags == {"fp32", "ivit_w8a8"} | set(PTQ), sorted(tags)


# golden pairs and cards: tests/test_shipped.py (every classifier)
@pytest.mark.parametrize("name", SHIPPED)
def test_card_accuracy_is_on_the_whole_test_split(name):
    cfg = json.loads((resolve_checkpoint(name) / "config.json").read_text())
    assert cfg["metrics"]["test_images"] == 10_000


@pytest.mark.parametrize("tag", PTQ)
def test_ptq_releases_record_method_data_and_bits(tag):
    method, data, wb, ab = PTQ[tag]
    cfg = _cfg(tag)
    cal = cfg["ptq"]["calibration"]
    assert "train" not in cfg and cal["method"]["name"] == method and cal["data"] == data and cal["n"] == 256
    assert cfg["ptq"]["init_from"] == "vit_tiny_p4.fp32_fmnist"
    assert cfg["quant"]["weight"]["bits"] == wb and cfg["quant"]["act"]["bits"] == ab
    softmax = cfg["quant"]["overrides"].get("*softmax")
    expected = {"base": None, "log2": "Log2", "repq": "LogSqrt2", "apq": "MPQ"}[method]
    assert (softmax["act"]["type"] if softmax else None) == expected


@pytest.mark.parametrize("name", [n for n in SHIPPED if "fp32" not in n])
def test_every_matmul_and_softmax_is_quantized(name):
    from zoo.quantizers.attention import QuantMatMul, QuantSoftmax
    from zoo.quantizers.ivit import IntSoftmax

    model = zoo.load(name)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(QuantMatMul) == 2 * 6 and kinds.count(QuantSoftmax) + kinds.count(IntSoftmax) == 6
    assert len(quantized_ops(model)) == (2 if "ivit" in name else 3) * 6  # I-ViT: its own integer softmax


@needs_fmnist
@pytest.mark.parametrize("name", ["vit_tiny_p4.fp32_fmnist", "vit_tiny_p4.repq_w4a4_fmnist",
                                  "vit_tiny_p4.ivit_w8a8_fmnist"])
def test_accuracy_on_the_first_test_images(name):
    from zoo.datasets import load_fmnist

    x, y = load_fmnist(split="test")
    x, y = x[:500].float() / 255, y[:500]
    with torch.no_grad():
        acc = (zoo.load(name)(x).argmax(-1) == y).float().mean().item()
    assert abs(acc - _acc(name.split(".")[1].removesuffix("_fmnist"))) < 0.04, acc


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_full_test_split_reproduces_card(name):
    from zoo.tasks.cls.data import FashionMNISTData
    from zoo.tasks.cls.task import evaluate

    dm = FashionMNISTData(batch_size=500)
    dm.setup()
    res = evaluate(zoo.load(name), dm.test_dataloader(), progress=False)
    assert res["acc"] == pytest.approx(_acc(name.split(".")[1].removesuffix("_fmnist")), abs=1e-4)


# ----------------------------------------------------------------------------- the targets
def test_w8a8_within_half_a_point_of_fp32():
    best = max(_acc(t) for t in ("ptq_w8a8", "psaq_w8a8", "ivit_w8a8"))
    assert _acc("fp32") - best <= 0.005, (_acc("fp32"), best)


def test_psaq_data_free_w8a8_within_one_point_of_real_data_calibration():
    """Same algorithm (base PTQ), PSAQ-ViT's synthetic images against 256 real training images."""
    assert _acc("ptq_w8a8") - _acc("psaq_w8a8") <= 0.01, (_acc("ptq_w8a8"), _acc("psaq_w8a8"))


def test_repq_w4a4_above_base_and_log2():
    """RepQ-ViT above plain PTQ and the log2-softmax baseline at W4A4 (seed 0; the means over three
    calibration seeds are in benchmarks/results/ptq_cls_vit_tiny_p4_w4a4_real_base_log2_repq_apq.md and, for
    RepQ-ViT with its weight search, ptq_cls_vit_tiny_p4_w4a4_real_repq.md)."""
    assert _acc("repq_w4a4") > max(_acc("ptq_w4a4"), _acc("log2_w4a4"))


@pytest.mark.xfail(strict=True, reason="measured: base W4A4 is only 1.46 points below FP32 (85.49 vs 86.95), so no "
                   "method can gain 5 points; RepQ-ViT gains 0.49 (seed 0), 0.57 on the mean of three seeds")
def test_repq_w4a4_five_points_above_base():
    assert _acc("repq_w4a4") - _acc("ptq_w4a4") >= 0.05


@pytest.mark.xfail(strict=True, reason="measured: APQ-ViT W4A4 83.20 < base 85.49 (seed 0); the seed's MPQ "
                   "softmax quantizer (floor(x / (max / 15))) sends every attention weight below max/15 to 0")
def test_apq_w4a4_five_points_above_base_and_above_log2():
    assert _acc("apq_w4a4") - _acc("ptq_w4a4") >= 0.05 and _acc("apq_w4a4") > _acc("log2_w4a4")


def test_ivit_integer_ops_within_one_point_of_fp32():
    cfg = _cfg("ivit_w8a8")
    assert cfg["quant"]["extra"] == {"ivit": True}
    assert _acc("fp32") - _acc("ivit_w8a8") <= 0.01, (_acc("fp32"), _acc("ivit_w8a8"))


@needs_fmnist
@pytest.mark.slow
def test_ivit_integer_only_inference_within_one_point_of_fp32():
    """The release run integer-only end to end (zoo.quantizers.ivit_integer; ~5 min on 2 cores)."""
    from zoo.quantizers.ivit_integer import IntegerViT
    from zoo.tasks.cls.data import FashionMNISTData
    from zoo.tasks.cls.task import evaluate

    dm = FashionMNISTData(batch_size=500)
    dm.setup()
    acc = evaluate(IntegerViT(zoo.load("vit_tiny_p4.ivit_w8a8_fmnist")), dm.test_dataloader(), progress=False)["acc"]
    assert _acc("fp32") - acc <= 0.01, (_acc("fp32"), acc)


def test_ivit_release_runs_the_integer_nonlinearities():
    from zoo.quantizers.ivit import ILayerNorm, IntSoftmax, ShiftGELU

    kinds = [type(m) for m in zoo.load("vit_tiny_p4.ivit_w8a8_fmnist").modules()]
    assert (kinds.count(ILayerNorm), kinds.count(ShiftGELU), kinds.count(IntSoftmax)) == (13, 6, 6)


@pytest.mark.parametrize("tag", ["ivit_w8a8", "log2_w4a4", "repq_w4a4"])
def test_cpp_inference_passes_equal_the_torch_operations_on_a_release(tag, monkeypatch):
    """The C++ passes a ViT release takes at CPU inference (I-ViT's integer nonlinearities, the log
    softmax quantizers, the packed layers' codes and epilogues) and the certified float32 attn·v product
    give exactly the logits of the torch operations and float64 products (ZOO_CPU_KERNELS=0), on the
    golden images and 60 random ones."""
    from zoo.cards import read_golden
    from zoo.kernels import cached, cpu_ops

    if not cpu_ops.available():
        pytest.skip("C++ kernels not built here")
    name = f"vit_tiny_p4.{tag}_fmnist"
    x, _ = read_golden(resolve_checkpoint(name))
    x = torch.cat([x, torch.rand(60, *x.shape[1:], generator=torch.Generator().manual_seed(0))])
    model = zoo.load(name)
    with torch.no_grad():
        fast = model(x)
        monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
        cached.clear(model)
        assert torch.equal(fast, model(x))
