"""zoo.save / zoo.load for quantized models that are not ZooModels (torchvision, your own): by a
builder the loader must be allowed to call, or into a float skeleton; mistakes fail at save time."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.checkpoint import ALLOWED_BUILDERS, CheckpointError

tv = pytest.importorskip("torchvision")
CFG = zoo.QuantConfig(weight=zoo.LSQ(4, "channel"), act=zoo.LSQ(4),
                      overrides={"conv1": zoo.LayerQuant(zoo.MinMax(8), zoo.MinMax(8)), "fc": None})


@pytest.fixture
def trained_resnet18():
    torch.manual_seed(0)
    net = zoo.quantize(tv.models.resnet18(weights=None, num_classes=10), CFG)
    net.train()
    net(torch.rand(4, 3, 32, 32))  # initialise the activation steps and ranges
    return net.eval()


@pytest.fixture(autouse=True)
def clean_allow_list():
    before = set(ALLOWED_BUILDERS)
    yield
    ALLOWED_BUILDERS.clear(), ALLOWED_BUILDERS.update(before)


def test_torchvision_model_round_trip_by_builder_and_by_skeleton(trained_resnet18, tmp_path):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = zoo.to_packed(__import__("copy").deepcopy(trained_resnet18))(x)
    zoo.save(trained_resnet18, tmp_path / "r18", builder="torchvision.models:resnet18",
             kwargs={"num_classes": 10, "weights": None})
    with pytest.raises(CheckpointError, match=r"built by 'torchvision.models:resnet18', which is not allowed: "
                                              r"call zoo.allow_builder\('torchvision'\)"):
        zoo.load(tmp_path / "r18")
    zoo.allow_builder("torchvision.models")
    loaded = zoo.load(tmp_path / "r18")
    assert isinstance(loaded.layer1[0].conv1, zoo.quantizers.packed.PackedConv2d)
    assert isinstance(loaded.fc, nn.Linear) and not isinstance(loaded.fc, zoo.quantizers.QuantLinear)  # float head
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)
        skeleton = zoo.load(tmp_path / "r18", model=tv.models.resnet18(weights=None, num_classes=10))
        torch.testing.assert_close(skeleton(x), ref)


def test_save_without_builder_loads_only_into_a_skeleton(trained_resnet18, tmp_path):
    zoo.save(trained_resnet18, tmp_path / "r18")
    with pytest.raises(CheckpointError, match="records no builder: pass model="):
        zoo.load(tmp_path / "r18")
    with pytest.raises(CheckpointError, match="do not match the given model"):
        zoo.load(tmp_path / "r18", model=tv.models.resnet18(weights=None, num_classes=7))


@pytest.mark.parametrize("kwargs, match, exc", [
    (dict(builder="torchvision.models:nope"), "cannot be imported", ValueError),
    (dict(builder="torchvision.models.resnet18"), "must be 'package.module:factory'", ValueError),
    (dict(builder="torchvision.models:resnet18", kwargs={"num_classes": 5}), "does not give back this model", ValueError),
    (dict(kwargs={"num_classes": 10}), "kwargs= without builder=", TypeError),
])
def test_save_time_mistakes(trained_resnet18, tmp_path, kwargs, match, exc):
    with pytest.raises(exc, match=match):
        zoo.save(trained_resnet18, tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_missing_quant_config_fails_at_save(trained_resnet18, tmp_path):
    del trained_resnet18._zoo_quant_config  # e.g. layers swapped by hand
    with pytest.raises(TypeError, match="has quantized layers but no QuantConfig: pass quant="):
        zoo.save(trained_resnet18, tmp_path / "x")
    zoo.save(trained_resnet18, tmp_path / "x", quant=CFG)  # given explicitly, it works
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = zoo.to_packed(__import__("copy").deepcopy(trained_resnet18))(x)
        got = zoo.load(tmp_path / "x", model=tv.models.resnet18(weights=None, num_classes=10))(x)
    torch.testing.assert_close(got, ref)


def test_quantize_a_bare_layer_returns_the_quantized_layer():
    conv = nn.Conv2d(3, 4, 3)
    q = zoo.quantize(conv, zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)))
    assert isinstance(q, zoo.quantizers.QuantConv2d) and q.weight is conv.weight
    with pytest.raises(ValueError, match="quantizes nothing for a bare Linear"):
        zoo.quantize(nn.Linear(3, 4), zoo.QuantConfig(weight=zoo.LSQ(4), overrides={"": None}))


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.proj(x)
        return self.attn(x, x, x)[0]


def test_multihead_attention_is_quantized_explicitly_and_survives_save_load(tmp_path):
    """quantize() makes nn.MultiheadAttention explicit (zoo.quantizers.attention): its projections, both
    matmuls and the softmax are quantized; a variant it cannot make explicit stays fused and float."""
    from zoo.quantizers.attention import MultiheadAttention, QuantMatMul, QuantSoftmax

    torch.manual_seed(0)
    net = zoo.quantize(_Attn(), zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)))
    assert isinstance(net.proj, zoo.quantizers.QuantLinear) and type(net.attn) is MultiheadAttention
    assert isinstance(net.attn.in_proj, zoo.quantizers.QuantLinear)
    assert isinstance(net.attn.out_proj, zoo.quantizers.QuantLinear)
    assert isinstance(net.attn.matmul1, QuantMatMul) and isinstance(net.attn.softmax, QuantSoftmax)
    odd = zoo.quantize(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), zoo.QuantConfig(weight=zoo.LSQ(4)))
    assert type(odd[0]) is nn.MultiheadAttention
    assert type(odd[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.rand(2, 5, 8)
    net.train()(x)
    net.eval()
    with torch.no_grad():
        ref = net(x)
    zoo.save(net, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(zoo.load(tmp_path / "a", model=_Attn())(x), ref, rtol=1e-5, atol=1e-5)


def test_readme_quantize_your_own_model_snippet_runs_as_written(tmp_path, monkeypatch):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("## Quantize your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
