"""Forward values and gradients of every quantizer against formulas written out independently."""
import math

import pytest
import torch

import zoo
from zoo.quantizers import (DoReFa, IRNet, LSQ, MinMax, PACT, QuantConfig, ReAct, UL2Q, XNOR,
                            optimal_lambda, register_quantizer)
from zoo.quantizers.binary import (IRNetAct, IRNetWeight, RPReLU, RSign, SignAct, XNORWeight,
                                   ede_factors)
from zoo.quantizers.config import QuantSpec, spec_from_dict
from zoo.quantizers.ul2q import UL2QAct, UL2QWeight, expected_l2
from zoo.quantizers.uniform import DoReFaAct, DoReFaWeight, LSQAct, LSQWeight, MinMaxWeight, PACTAct

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


def test_ul2q_weight_formula_and_ste():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    k = 2
    out = UL2QWeight(k)(w)
    mu, sigma = w.detach().mean(), w.detach().std(unbiased=False)
    alpha = PAPER_LAMBDA[k - 1] * sigma
    wq = torch.clamp(torch.round((w.detach() - mu) / alpha - 0.5), -2, 1) + 0.5
    expected = alpha * wq + mu
    assert torch.allclose(out, expected, atol=2e-4 * sigma)
    assert out.detach().unique().numel() == 4
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # plain STE


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


def test_minmax_weight_values():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]])
    out = MinMaxWeight(2)(w)
    scale = 2.0 / 3
    zero = round(1 / scale)
    expected = (torch.clamp(torch.round(w / scale) + zero, 0, 3) - zero) * scale
    assert torch.allclose(out, expected)


def test_lsq_weight_forward_and_gradients():
    torch.manual_seed(0)
    w = torch.randn(4, 16, requires_grad=True)
    q = LSQWeight(3)
    out = q(w)
    s = q.step.detach()
    assert s.item() == pytest.approx(2 * w.detach().abs().mean().item() / math.sqrt(3), rel=1e-6)
    expected = torch.clamp(torch.round(w.detach() / s), -4, 3) * s
    assert torch.allclose(out, expected)
    g = torch.randn_like(w)
    (out * g).sum().backward()
    v = w.detach() / s
    inside = (v >= -4) & (v <= 3)
    clear = ((v + 4).abs() > 1e-4) & ((v - 3).abs() > 1e-4)  # away from the clip points
    assert torch.allclose(w.grad * clear, g * inside * clear, atol=1e-6)  # STE inside, 0 outside
    # step gradient (LSQ eq. 3) times the gradient scale 1 / sqrt(N * Q_P)
    ds = torch.where(v < -4, -4.0, torch.where(v > 3, 3.0, torch.round(v) - v))
    expected_ds = (g * ds).sum() / math.sqrt(w.numel() * 3)
    assert q.step.grad.item() == pytest.approx(expected_ds.item(), rel=1e-4)


def test_lsq_act_unsigned_and_signed():
    q = LSQAct(4)
    x = torch.rand(64) * 4
    out = q(x)
    assert not q.signed and out.min() >= 0
    assert out.detach().unique().numel() <= 16
    q2 = LSQAct(4)
    q2(torch.randn(64))
    assert q2.signed


def test_lsq_rejects_one_bit():
    with pytest.raises(ValueError, match="LSQ supports bits 2..8"):
        LSQ(bits=1)


def test_dorefa_weight_and_act():
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    out = DoReFaWeight(2)(w)
    t = torch.tanh(w.detach())
    x = t / (2 * t.abs().max()) + 0.5
    expected = 2 * torch.round(x * 3) / 3 - 1
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    # gradient flows through tanh / max normalisation (STE only on the rounding)
    w2 = w.detach().clone().requires_grad_(True)
    t2 = torch.tanh(w2)
    (2 * (t2 / (2 * t2.abs().max()) + 0.5) - 1).sum().backward()
    assert torch.allclose(w.grad, w2.grad)
    a = torch.tensor([-0.5, 0.1, 0.49, 0.7, 1.5], requires_grad=True)
    qa = DoReFaAct(2)(a)
    assert torch.allclose(qa, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0]))
    qa.sum().backward()
    assert torch.equal(a.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_pact_forward_and_alpha_gradient():
    q = PACTAct(2, init_alpha=3.0)
    x = torch.tensor([-1.0, 0.4, 1.6, 2.9, 5.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 2.0, 3.0, 3.0]))
    y.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(1.0)  # one element (5.0) >= alpha
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_xnor_weight():
    w = torch.tensor([[0.5, -1.5, 2.0, -0.1], [0.2, 0.2, -0.2, 0.0]], requires_grad=True)
    out = XNORWeight()(w)
    a = w.detach().abs().mean(1, keepdim=True)
    assert torch.allclose(out, a * torch.where(w.detach() >= 0, 1.0, -1.0))
    out.sum().backward()
    assert torch.allclose(w.grad, a.expand_as(w) * (w.detach().abs() <= 1))


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


def test_ede_schedule_and_backward():
    t, k = ede_factors(0.1, 10.0, 0.0)
    assert (t, k) == pytest.approx((0.1, 10.0))
    t, k = ede_factors(0.1, 10.0, 0.5)
    assert (t, k) == pytest.approx((1.0, 1.0))
    t, k = ede_factors(0.1, 10.0, 1.0)
    assert (t, k) == pytest.approx((10.0, 1.0))
    q = IRNetAct()
    q.set_progress(0.25)
    t, k = ede_factors(0.1, 10.0, 0.25)
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    y = q(x)
    assert torch.equal(y.detach(), torch.where(x.detach() >= 0, 1.0, -1.0))
    y.sum().backward()
    expected = k * t * (1 - torch.tanh(t * x.detach()) ** 2)
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_sign_act_ste_and_sign_of_zero():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = SignAct()(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_rsign_threshold_and_approxsign_gradient():
    q = RSign(2)
    with torch.no_grad():
        q.beta.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[0.25, 0.25], [0.75, -0.75]]).view(2, 2, 1, 1).requires_grad_(True)
    y = q(x)
    assert torch.equal(y.flatten(), torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    y.sum().backward()
    d = (x.detach() - q.beta.detach().view(1, 2, 1, 1)).flatten()
    expected = torch.where(d.abs() < 1, 2 - 2 * d.abs(), torch.zeros_like(d))
    assert torch.allclose(x.grad.flatten(), expected)
    assert q.beta.grad is not None


def test_rprelu():
    m = RPReLU(2)
    with torch.no_grad():
        m.gamma.copy_(torch.tensor([1.0, 0.0])), m.zeta.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    y = m(x).flatten()
    assert torch.allclose(y, torch.tensor([0.25 * -1.0 + 0.5, 2.0 - 1.0]))


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
