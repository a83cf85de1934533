import copy

import pytest
import torch
import torchvision
from torch import nn

from zoo.quantizers import (DoReFa, IRNet, LSQ, MinMax, PACT, QuantConfig, QuantConv2d,
                            QuantConvTranspose2d, QuantLinear, ReAct, UL2Q, XNOR, LayerQuant,
                            quantize, quantized_layers, to_packed)
from zoo.quantizers.packed import PackedConv2d, PackedConvTranspose2d, PackedLinear

ALL = {
    "minmax": QuantConfig(weight=MinMax(4, "channel"), act=MinMax(8)),
    "lsq": QuantConfig(weight=LSQ(4, "channel"), act=LSQ(4)),
    "lsq2": QuantConfig(weight=LSQ(2), act=LSQ(2)),
    "dorefa": QuantConfig(weight=DoReFa(2), act=DoReFa(2)),
    "pact": QuantConfig(weight=DoReFa(4), act=PACT(3)),
    "ul2q": QuantConfig(weight=UL2Q(2), act=UL2Q(2)),
    "ul2q_ch": QuantConfig(weight=UL2Q(3, "channel"), act=UL2Q(8)),
    "xnor": QuantConfig(weight=XNOR(), act=XNOR()),
    "irnet": QuantConfig(weight=IRNet(), act=IRNet()),
    "react": QuantConfig(weight=ReAct(), act=ReAct()),
    "weight_only": QuantConfig(weight=LSQ(4)),
}


class Mixed(nn.Module):
    """Conv (strided, dilated, grouped), ConvTranspose and Linear layers in one net."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.c2(x)
        x = torch.tanh(self.up(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("name", sorted(ALL))
def test_packed_matches_fake_quant(name):
    torch.manual_seed(0)
    net = quantize(Mixed(), ALL[name])
    x = torch.randn(2, 3, 9, 11)
    net.train()
    net(x)  # initialise data-dependent quantizers
    net.eval()
    y = net(x)
    packed = to_packed(copy.deepcopy(net))
    assert isinstance(packed.c2, PackedConv2d) and isinstance(packed.up, PackedConvTranspose2d)
    assert isinstance(packed.fc, PackedLinear)
    yp = packed(x)
    assert (yp - y).abs().max() <= 1e-4 * y.abs().max()


def test_quantize_swaps_every_layer_and_float_state_dict_loads():
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    sd = copy.deepcopy(net.state_dict())
    quantize(net, ALL["lsq"])
    n_conv = sum(isinstance(m, QuantConv2d) for m in net.modules())
    assert n_conv == 20 and isinstance(net.fc, QuantLinear)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules())
    net.load_state_dict(sd, strict=True)  # float weights still load, strictly
    assert torch.equal(net.conv1.weight, sd["conv1.weight"])
    net.eval()
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_quantize_is_idempotent_and_keeps_parameters():
    net = Mixed()
    w = net.c1.weight
    quantize(net, ALL["lsq"])
    first = {n: id(m) for n, m in quantized_layers(net)}
    quantize(net, ALL["xnor"])
    assert {n: id(m) for n, m in quantized_layers(net)} == first
    assert net.c1.weight is w


def test_overrides_keep_layers_float_or_8bit():
    cfg = QuantConfig(weight=LSQ(2), act=LSQ(2),
                      overrides={"c1": LayerQuant(MinMax(8), MinMax(8)), "fc": None})
    net = quantize(Mixed(), cfg)
    assert net.c1.spec.weight == MinMax(8)
    assert type(net.fc) is nn.Linear
    assert net.c2.spec.weight == LSQ(2)
    assert isinstance(net.up, QuantConvTranspose2d)


def test_quantize_accepts_a_dict_and_rejects_other_types():
    net = quantize(Mixed(), ALL["ul2q"].to_dict())
    assert isinstance(net.c1, QuantConv2d)
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize(Mixed(), "lsq")


def test_torchvision_models_quantize_and_run():
    for ctor in (torchvision.models.mobilenet_v3_small, torchvision.models.shufflenet_v2_x0_5):
        net = ctor(weights=None, num_classes=4)
        quantize(net, ALL["lsq"])
        net.train()
        out = net(torch.rand(2, 3, 32, 32))
        out.sum().backward()
        assert out.shape == (2, 4)
