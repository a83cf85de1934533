"""Forward values and gradients of every quantizer against formulas written out independently."""
import math

import pytest
import torch

import zoo
from zoo.quantizers import (IRNet, LSQ, MinMax, QuantConfig, ReAct, XNOR,
                            optimal_lambda, register_quantizer)
from zoo.quantizers.binary import (IRNetWeight, SignAct)
from zoo.quantizers.config import QuantSpec, spec_from_dict
from zoo.quantizers.ul2q import UL2QAct, expected_l2

# mu-L2Q paper table (lambda_k and expected loss), k = 1..8
PAPER_LAMBDA = [1.5958, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308]
PAPER_LOSS = [0.3634, 0.1188, 0.0374, 0.0115, 0.0035, 0.0010, 0.0003, 0.0001]


@pytest.mark.parametrize("k", range(1, 9))
def test_ul2q_lambda_table_matches_paper(k):
    lam, loss = optimal_lambda(k)
    assert lam == pytest.approx(PAPER_LAMBDA[k - 1], abs=6e-5)
    assert loss == pytest.approx(PAPER_LOSS[k - 1], abs=6e-5)


def test_ul2q_one_bit_is_closed_form():
    lam, loss = optimal_lambda(1)
    assert lam == pytest.approx(2 * math.sqrt(2 / math.pi), abs=1e-6)
    assert loss == pytest.approx(1 - 2 / math.pi, abs=1e-7)


def test_ul2q_expected_error_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    lam, k = 0.9957, 2
    q = (torch.clamp(torch.round(x / lam - 0.5), -2, 1) + 0.5) * lam
    assert ((x - q) ** 2).mean().item() == pytest.approx(expected_l2(lam, k), rel=5e-3)




def test_ul2q_act_tracks_ema_and_freezes_in_eval():
    q = UL2QAct(4, momentum=0.5)
    x1 = torch.randn(1000) * 2 + 1
    q.train()
    q(x1)
    assert q.mu.item() == pytest.approx(x1.mean().item(), abs=1e-5)
    x2 = torch.randn(1000) * 3
    q(x2)
    assert q.mu.item() == pytest.approx(0.5 * x1.mean().item() + 0.5 * x2.mean().item(), abs=1e-5)
    q.eval()
    mu = q.mu.clone()
    q(torch.randn(100) + 10)
    assert torch.equal(q.mu, mu)








def test_lsq_rejects_one_bit():
    with pytest.raises(ValueError, match="LSQ supports bits 2..8"):
        LSQ(bits=1)








def test_irnet_libra_pb_weights():
    torch.manual_seed(0)
    w = (torch.randn(4, 32) + 0.3).requires_grad_(True)
    q = IRNetWeight()
    out = q(w)
    c = w.detach() - w.detach().mean(1, keepdim=True)
    std = c / c.std(1, keepdim=True)
    shift = 2.0 ** torch.round(torch.log2(std.abs().mean(1, keepdim=True)))
    assert torch.allclose(out, shift * torch.where(std >= 0, 1.0, -1.0))
    # balanced: about half of each channel is +1 (Libra-PB maximises the binary entropy)
    pos = (out > 0).float().mean(1)
    assert ((pos - 0.5).abs() <= 0.2).all()




def test_sign_act_ste_and_sign_of_zero():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = SignAct()(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))






# ----------------------------------------------------------------------------- config
def test_config_round_trip_and_overrides():
    cfg = QuantConfig(weight=LSQ(4, "channel"), act=LSQ(4),
                      overrides={"stem*": zoo.LayerQuant(MinMax(8), MinMax(8)), "fc": None})
    d = cfg.to_dict()
    import json

    back = QuantConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert cfg.for_layer("stem").weight == MinMax(8)
    assert cfg.for_layer("fc") is None
    assert cfg.for_layer("layers.0.conv1").weight == LSQ(4, "channel")


def test_from_dict_only_builds_registered_classes():
    with pytest.raises(ValueError, match="unknown quantizer 'os.system'"):
        spec_from_dict({"type": "os.system", "bits": 4})
    with pytest.raises(ValueError, match="no field"):
        spec_from_dict({"type": "LSQ", "bits": 4, "evil": 1})
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        spec_from_dict({"type": "LSQ", "bits": 9})
    with pytest.raises(ValueError, match="granularity"):
        LSQ(4, "row")
    with pytest.raises(ValueError, match="version"):
        QuantConfig.from_dict({"version": 99})


@pytest.mark.parametrize("cls", [XNOR, IRNet, ReAct])
def test_binary_specs_reject_bits_above_one(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} supports bits 1..1"):
        cls(bits=2)


def test_adding_a_quantizer_is_one_dataclass_and_one_handler():
    from dataclasses import dataclass

    from zoo.quantizers.base import WeightQuantizer

    @dataclass(frozen=True)
    class Ternary(QuantSpec):
        bits: int = 2

    class TernaryWeight(WeightQuantizer):
        def codes(self, w):
            d = 0.7 * w.abs().mean()
            q = (w > d).float() - (w < -d).float() + 1
            s = w.abs().mean().detach()
            return q.detach(), s, torch.ones(()), w

    register_quantizer(Ternary, "weight")(lambda spec, layer: TernaryWeight(2))
    net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    zoo.quantize(net, QuantConfig(weight=Ternary()))
    assert set(net[0].quant_weight().detach().unique().tolist()) <= {-net[0].weight.abs().mean().item(), 0.0,
                                                                   net[0].weight.abs().mean().item()}
    assert QuantConfig.from_dict(QuantConfig(weight=Ternary()).to_dict()).weight == Ternary()
