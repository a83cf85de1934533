"""Shipped matting checkpoints, loaded by name as a user would: golden alpha, the clip contract
(streaming equals the whole clip), cards, and the issue's targets on the recorded test metrics."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_card, check_golden, needs_scenes
from zoo.cards import float_reference_bytes
from zoo.registry import resolve_checkpoint

SHIPPED = zoo.list_models(task="matting")
FP32 = "rvm_small.fp32_matting_composites"
PLAIN = {"xnor": "rvm_small.xnor_w1a1_matting_composites", "react": "rvm_small.react_w1a1_matting_composites"}
BIMATTING = "bimatting_small.react_w1a1_matting_composites"
SBB_ONLY = "bimatting_small.sbb_react_w1a1_matting_composites"
SAB_ONLY = "bimatting_small.sab_react_w1a1_matting_composites"
PROMISED = [FP32, *PLAIN.values(), BIMATTING, SBB_ONLY, SAB_ONLY]


def _config(name):
    return json.loads((resolve_checkpoint(name) / "config.json").read_text())


def _mad(name):
    return _config(name)["metrics"]["test_mad"]


def test_the_promised_releases_are_shipped():
    assert set(PROMISED) <= set(SHIPPED), sorted(set(PROMISED) - set(SHIPPED))


@pytest.mark.parametrize("name", SHIPPED)
def test_golden_alpha(name):
    out, _ = check_golden(name)
    assert out.ndim == 5 and out.shape[2] == 1 and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", [FP32, BIMATTING])
def test_streaming_equals_the_clip_on_a_shipped_model(name):
    model = zoo.load(name)
    clip = torch.rand(1, 3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(clip)
        model.reset()
        steps = torch.stack([model.step(clip[:, t]) for t in range(3)], 1)
    torch.testing.assert_close(steps, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SHIPPED)
def test_card_matches_config(name):
    cfg, card = check_card(name)
    m = cfg["metrics"]
    assert f"**MAD {m['test_mad']:.2f}**, MSE {m['test_mse']:.2f}" in card
    assert f"{m['test_ops'] / 1e6:.2f} M" in card and m["test_clips"] == 128


def test_binary_releases_share_one_recipe():
    """Same start, data, epochs and steps; the commands differ only in arch, quant, model_args and name."""
    def recipe(name):
        cfg = _config(name)
        args = sorted(a for a in cfg["train"]["command"].split()[3:]
                      if not a.lstrip("+").startswith(("quant=", "arch=", "model_args.", "name=")))
        return args, cfg["train"]["global_step"]

    first = recipe(BIMATTING)
    for name in [*PLAIN.values(), SBB_ONLY, SAB_ONLY]:
        assert recipe(name) == first, name


# ----------------------------------------------------------------------------- the targets
def _share_closed(name):
    fp = _mad(FP32)
    plain = min(_mad(p) for p in PLAIN.values())
    return 1 - (_mad(name) - fp) / (plain - fp)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured miss: BiMatting W1A1 test MAD 186.55 against FP32 158.93 and the better plain baseline (ReAct) "
    "163.36, so it widens the gap instead of closing 30% of it; the plain gap is 4.4 MAD, within the spread "
    "of one run (README, Video matting)"))
def test_bimatting_closes_30_percent_of_the_plain_binary_gap():
    assert _share_closed(BIMATTING) >= 0.30, (_mad(BIMATTING), _share_closed(BIMATTING))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured miss: SBB only 167.22 and SAB only 163.45 test MAD against plain ReAct 163.36"))
@pytest.mark.parametrize("name", [SBB_ONLY, SAB_ONLY], ids=["sbb", "sab"])
def test_sbb_and_sab_each_help_on_their_own(name):
    """Each idea alone (on the ReAct blocks it is built on) beats the plain ReAct baseline."""
    assert _mad(name) < _mad(PLAIN["react"]), (name, _mad(name), _mad(PLAIN["react"]))


def test_weights_file_at_least_15x_smaller_than_float32():
    cfg = _config(BIMATTING)
    ratio = float_reference_bytes(cfg) / cfg["weights"]["bytes"]
    assert ratio >= 15, ratio


def test_operations_at_least_5x_fewer_than_fp32():
    m, fp = _config(BIMATTING)["metrics"], _config(FP32)["metrics"]
    assert fp["test_ops"] / m["test_ops"] >= 5, fp["test_ops"] / m["test_ops"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured miss: the SAB 3x3 branches computed 52.9% of their positions on the test clips (target <= 35%): "
    "the coarse alpha of a model this weak is uncertain over half of each frame"))
def test_sab_density_at_most_35_percent():
    assert _config(BIMATTING)["metrics"]["test_sab_density"] <= 0.35


@pytest.mark.slow
@needs_scenes
def test_recorded_metrics_reproduce_on_the_test_split():
    from zoo.tasks import get_task

    model = zoo.load(BIMATTING)
    task = get_task("matting")
    loader, _ = task.benchmark_loader(model)
    res = task.evaluate(model, loader, progress=False)
    m = _config(BIMATTING)["metrics"]
    for k in ("mad", "mse", "grad", "conn", "dtssd", "sab_density"):
        assert res[k] == pytest.approx(m[f"test_{k}"], rel=1e-5), k
