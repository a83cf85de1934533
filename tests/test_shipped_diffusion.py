"""Shipped diffusion checkpoints, loaded by name as a user would: golden noise predictions, the
generation contract, cards, and (as the releases arrive) the issue's targets."""
import json

import pytest
import torch

import zoo
from tests.conftest import check_card, check_golden
from zoo.registry import resolve_checkpoint

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

SHIPPED = zoo.list_models(task="diffusion")


def _config(name):
    return json.loads((resolve_checkpoint(name) / "config.json").read_text())


def test_a_float_model_is_shipped():
    assert "ddpm_unet.fp32_fmnist32" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_golden_noise_prediction(name):
    out, _ = check_golden(name)
    assert out.shape[1:] == (1, 32, 32)


@pytest.mark.parametrize("name", SHIPPED)
def test_generation_contract(name):
    """generate(n, steps, seed): N x 1 x 32 x 32 in [0, 1], the same images for the same seed, other
    images for another seed."""
    model = zoo.load(name)
    a = model.generate(3, steps=4, seed=0, progress=False)
    b = model.generate(3, steps=4, seed=0, progress=False)
    c = model.generate(3, steps=4, seed=1, progress=False)
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", SHIPPED)
def test_card_matches_config(name):
    cfg, card = check_card(name)
    m = cfg["metrics"]
    assert f"**FD {m['test_fd']:.3f}**, KID {m['test_kid']:.5f}" in card
    assert "classifier-feature" in card and "not ImageNet-Inception FID" in card
    assert m["test_fd_samples"] >= 2000 and m["test_fd_steps"] == cfg["input_contract"]["fd"]["steps"]
