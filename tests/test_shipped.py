"""Golden input/output tests for every shipped checkpoint, loaded by name as a user would."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_golden, check_seed_record, needs_fmnist
from zoo.cards import read_golden
from zoo.registry import resolve_checkpoint

SHIPPED = zoo.list_models("resnet20.*", task="cls")  # the ViT releases' own checks: tests/test_shipped_vit.py
ALL_CLS = zoo.list_models(task="cls")  # the golden pair and the card: every classifier, ViTs included


def test_the_promised_checkpoints_are_shipped():
    tags = {n.split(".", 1)[1] for n in SHIPPED}
    for tag in ("fp32_fmnist", "lsq_w8a8_fmnist", "lsq_w4a4_fmnist", "lsq_w2a2_fmnist", "n2uq_w2a2_fmnist",
                "irnet_w1a1_fmnist", "xnor_w1a1_fmnist", "react_w1a1_fmnist"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"


@pytest.mark.parametrize("name", ALL_CLS)
def test_golden_output(name):
    out, expected = check_golden(name)
    assert torch.equal(out.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("name", ALL_CLS)
def test_card_matches_config(name):
    d = resolve_checkpoint(name)
    cfg = json.loads((d / "config.json").read_text())
    card = (d / "README.md").read_text()
    made = cfg.get("train") or cfg["ptq"]  # trained, or post-training quantized
    assert made["command"] in card
    assert f"{100 * cfg['metrics']['test_acc']:.2f}%" in card
    assert cfg["weights"]["bytes"] == (d / "model.safetensors").stat().st_size


def _metrics(tag):
    d = resolve_checkpoint(f"resnet20.{tag}")
    return json.loads((d / "config.json").read_text())


def _acc(tag):
    """Test top-1 on the 10,000 test images, as the training command measured it on the packed
    model (the slow test_full_test_split_reproduces_card re-measures it through zoo.load)."""
    return _metrics(tag)["metrics"]["test_acc"]


def _recipe(command):
    """A training command less what names the method (the quantizer and its own options) and
    where it writes: what must be equal for two methods to have had the same budget."""
    words = command.split(" -m zoo.", 1)[1].split()[1:]  # after "zoo.train" or "zoo.seeds"
    return " ".join(w for w in words if not w.lstrip("+").startswith(("quant=", "quant.", "output_dir=",
                                                                        "release_dir=", "trainer.")))


def test_recipe_ignores_only_the_method_and_paths():
    a = "python -m zoo.train task=cls quant=irnet +quant.weight.t_max=1 bits=1 epochs=12 output_dir=x"
    assert _recipe(a) == "task=cls bits=1 epochs=12"
    assert _recipe(a) != _recipe(a.replace("epochs=12", "epochs=4"))


BINARY = ("irnet_w1a1_fmnist", "xnor_w1a1_fmnist", "react_w1a1_fmnist")


def test_binary_releases_share_one_recipe():
    recipe = {tag: _recipe(_metrics(tag)["train"]["command"]) for tag in BINARY}
    assert len(set(recipe.values())) == 1, recipe  # the same budget and recipe for all three
    assert {"epochs=12", "two_stage=true", "distill=1.0"} <= set(recipe["irnet_w1a1_fmnist"].split())


def test_irnet_w1a1_within_six_points_of_fp32():
    assert _acc("fp32_fmnist") - _acc("irnet_w1a1_fmnist") <= 0.060, (_acc("fp32_fmnist"), _acc("irnet_w1a1_fmnist"))


def test_irnet_w1a1_above_xnor_at_the_same_recipe():
    assert _acc("irnet_w1a1_fmnist") > _acc("xnor_w1a1_fmnist"), (_acc("irnet_w1a1_fmnist"), _acc("xnor_w1a1_fmnist"))


SEEDED = [n.split(".", 1)[1] for n in SHIPPED if _metrics(n.split(".", 1)[1]).get("seeds")]


def test_lsq_w2a2_is_over_three_seeds():
    assert "lsq_w2a2_fmnist" in SEEDED


def test_n2uq_and_lsq_w2a2_share_one_recipe_and_seeds():
    n2uq, lsq = _metrics("n2uq_w2a2_fmnist"), _metrics("lsq_w2a2_fmnist")
    assert _recipe(n2uq["train"]["command"]) == _recipe(lsq["train"]["command"])
    assert sorted(n2uq["seeds"]["runs"]) == sorted(lsq["seeds"]["runs"]) == ["0", "1", "2"]


def test_n2uq_w2a2_above_lsq_w2a2_on_the_mean_over_seeds():
    """The README's claim, on the means the seed records hold."""
    n2uq, lsq = (_metrics(t)["seeds"]["mean"]["test_acc"] for t in ("n2uq_w2a2_fmnist", "lsq_w2a2_fmnist"))
    assert n2uq > lsq, (n2uq, lsq)


@pytest.mark.parametrize("tag", SEEDED)
def test_seed_record_is_consistent(tag):
    check_seed_record(_metrics(tag), "test_acc")


PTQ = {"ptq_w8a8_fmnist": ("real", 8), "ptq_w4a4_fmnist": ("real", 4), "zeroq_w4a4_fmnist": ("zeroq", 4),
       "dsg_w4a4_fmnist": ("dsg", 4), "dsg_qat_w4a4_fmnist": ("dsg", 4), "ddaq_w4a4_fmnist": ("ddaq", 4),
       "coleq_w4a4_fmnist": ("coleq", 4)}


@pytest.mark.parametrize("tag", PTQ)
def test_ptq_releases_state_their_calibration(tag):
    """Post-training releases: no training, the calibration source and size on record and on the card."""
    cfg = _metrics(tag)
    data, bits = PTQ[tag]
    assert "train" not in cfg and cfg["ptq"]["calibration"]["data"] == data
    assert cfg["ptq"]["calibration"]["n"] == 256 and cfg["ptq"]["init_from"] == "resnet20.fp32_fmnist"
    assert cfg["quant"]["weight"]["bits"] == bits and cfg["quant"]["act"]["bits"] == bits
    assert (resolve_checkpoint(f"resnet20.{tag}") / "synthetic.png").is_file() == (data != "real")


def test_ptq_w8a8_within_0_3_points_of_fp32():
    assert _acc("fp32_fmnist") - _acc("ptq_w8a8_fmnist") <= 0.003, (_acc("fp32_fmnist"), _acc("ptq_w8a8_fmnist"))


def test_ptq_w4a4_within_2_points_of_fp32():
    """The issue's target for W4A4 PTQ with reconstruction (learned rounding, MSE ranges)."""
    assert _metrics("ptq_w4a4_fmnist")["ptq"]["calibration"]["rounding"] == "learned"
    assert _acc("fp32_fmnist") - _acc("ptq_w4a4_fmnist") <= 0.02, (_acc("fp32_fmnist"), _acc("ptq_w4a4_fmnist"))


def test_dsg_within_3_points_of_real_data_calibration():
    """Data-free DSG (nearest rounding) against real images with learned rounding: within 3 points even
    across rounding methods (same-algorithm numbers, nearest rounding both: benchmarks/results/ptq_cls_w4a4.md)."""
    assert _acc("ptq_w4a4_fmnist") - _acc("dsg_w4a4_fmnist") <= 0.03


@pytest.mark.xfail(strict=True, reason="target missed: DSG 91.93 ± 0.06 vs ZeroQ 92.29 ± 0.09 over 3 seeds "
                                       "(benchmarks/results/ptq_cls_w4a4.md); the shipped median seeds too")
def test_dsg_w4a4_at_least_zeroq():
    assert _acc("dsg_w4a4_fmnist") >= _acc("zeroq_w4a4_fmnist")


def test_dsg_qat_above_dsg_ptq():
    """DSG's QAT use (distillation from the float model on the synthetic images, no labels) against
    DSG-PTQ, both from seed 1's images (3-seed means in the README)."""
    cfg = _metrics("dsg_qat_w4a4_fmnist")
    assert cfg["ptq"]["calibration"]["distill"]["steps"] == 500
    assert _acc("dsg_qat_w4a4_fmnist") > _acc("dsg_w4a4_fmnist"), (_acc("dsg_qat_w4a4_fmnist"), _acc("dsg_w4a4_fmnist"))


@pytest.mark.parametrize("method", ["ddaq", "coleq"])
def test_generator_releases_above_dsg_ptq(method):
    """DDAQ and CoLeQ (a generator's samples, then the quantized model trained on them; no data): above
    DSG-PTQ, as over 3 seeds (benchmarks/results/ptq_cls_w4a4_coleq_ddaq.md against ptq_cls_w4a4.md)."""
    cfg = _metrics(f"{method}_w4a4_fmnist")
    trained = cfg["ptq"]["calibration"]["trained"]
    assert trained["method"] == method and trained["steps"] == 500
    assert (resolve_checkpoint(f"resnet20.{method}_w4a4_fmnist") / "recovered.png").is_file() == (method == "coleq")
    assert _acc(f"{method}_w4a4_fmnist") > _acc("dsg_w4a4_fmnist"), (_acc(f"{method}_w4a4_fmnist"), _acc("dsg_w4a4_fmnist"))


def test_htq_mixed_release_is_mixed_within_uniform_w3a4_size():
    """resnet20.htq_mp_fmnist: per-layer bits chosen by HTQ at most uniform W3A4's nominal size, computed
    here from the float model's layer shapes (3-bit weights, 8-bit stem and classifier)."""
    from zoo.cost_model import nominal_weight_bytes

    cfg = _metrics("htq_mp_fmnist")
    mixed = cfg["ptq"]["mixed"]
    assert mixed["method"] == "htq" and mixed["budget"]["size"] == "w3a4" and mixed["size_measure"] == "nominal"
    c = zoo.cost(zoo.load("resnet20.htq_mp_fmnist"), (1, 1, 28, 28))
    inner = {x.name: x.w_bits for x in c.layers if x.name not in ("stem", "fc")}
    assert len(set(inner.values())) >= 3, inner  # really mixed
    fp = zoo.cost(zoo.load("resnet20.fp32_fmnist"), (1, 1, 28, 28))
    uniform = sum(nominal_weight_bytes(x.weight_shape, 8 if x.name in ("stem", "fc") else 3, 0, x.bias)
                  for x in fp.layers)
    assert c.nominal_bytes <= uniform and c.nominal_bytes == mixed["point"]["size"]
    assert "Mixed precision:" in (resolve_checkpoint("resnet20.htq_mp_fmnist") / "README.md").read_text()


def test_binary_weights_file_is_under_a_tenth_of_float():
    from zoo.cards import float_reference_bytes

    fp = float_reference_bytes(_metrics("fp32_fmnist"))  # float32 weights (the float release stores float16)
    for tag in ("irnet_w1a1_fmnist", "xnor_w1a1_fmnist"):
        assert _metrics(tag)["weights"]["bytes"] * 10 <= fp


@needs_fmnist
@pytest.mark.parametrize("name", SHIPPED)
def test_accuracy_on_test_images(name):
    """The first 1,000 test images through the packed model agree with the card's accuracy."""
    from zoo.datasets import load_fmnist

    x, y = load_fmnist(split="test")
    x, y = x[:1000].float() / 255, y[:1000]
    model = zoo.load(name)
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    card = _metrics(name.split(".", 1)[1])["metrics"]["test_acc"]
    assert abs(acc - card) < 0.03, (acc, card)


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_full_test_split_reproduces_card(name):
    from zoo.tasks.cls.task import evaluate
    from zoo.tasks.cls.data import FashionMNISTData

    dm = FashionMNISTData(batch_size=500)
    dm.setup()
    res = evaluate(zoo.load(name), dm.test_dataloader(), progress=False)
    assert res["acc"] == pytest.approx(_metrics(name.split(".", 1)[1])["metrics"]["test_acc"], abs=1e-4)


QUANTIZED = [n for n in SHIPPED if "fp32" not in n]
TRITON_CASES = [(n, "auto") for n in QUANTIZED] + [("resnet20.irnet_w1a1_fmnist", "popcount")]


@pytest.mark.parametrize("name,binary_kernel", TRITON_CASES)
def test_triton_backend_matches_reference(name, binary_kernel):
    """Same logits (hence predictions) through the Triton kernels as through the reference; without
    a GPU the kernels run interpreted, so two golden images keep this quick. With 2 images the
    binary layers under 'auto' use the dot kernel at 28x28 and 14x14 and popcount at 7x7."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, _ = read_golden(resolve_checkpoint(name))
    x = x[:2].to(dev)
    ref = zoo.load(name, backend="reference", map_location=dev)
    tri = zoo.load(name, backend="triton", binary_kernel=binary_kernel, map_location=dev)
    with torch.no_grad():
        y_ref, y = ref(x), tri(x)
    assert torch.equal(y.argmax(-1), y_ref.argmax(-1))
    assert torch.equal(y, y_ref)
