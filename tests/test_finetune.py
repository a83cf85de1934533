"""Fine-tuning a release: packed form -> training form (``zoo.quantizers.unpack``) is exact.

For every quantizer, a small net is trained a few steps (so steps, ranges, shifts and thresholds
move off their initial values), packed, and rebuilt into a fresh training form: the rebuilt weights
must re-quantize to the very same integer codes, the training form's output must equal the packed
model's, and packing the rebuilt model again must give back the same tensors.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zoo.quantizers import (N2UQ, PACT, PAMS, RLQ, UL2Q, XNOR, DoReFa, IRNet, LSQ, MinMax,
                            QuantConfig, ReAct, quantize, to_packed)
from zoo.quantizers.unpack import check_restored, restore_from_packed

CONFIGS = {
    "lsq_w2a2": (LSQ(2), LSQ(2)),
    "lsq_w4a4_channel": (LSQ(4, "channel"), LSQ(4)),
    "minmax_w8a8_channel": (MinMax(8, "channel"), MinMax(8)),
    "minmax_w3a3": (MinMax(3), MinMax(3)),
    "dorefa_w2a2": (DoReFa(2), DoReFa(2)),
    "dorefa_sr_w2a2": (DoReFa(2, rescale=True), DoReFa(2)),
    "pact_w3a3": (DoReFa(3), PACT(3)),
    "ul2q_w2a2": (UL2Q(2), UL2Q(2)),
    "ul2q_w3a4_channel": (UL2Q(3, "channel"), UL2Q(4)),
    "xnor_w1a1": (XNOR(1), XNOR(1)),
    "irnet_w1a1": (IRNet(1), IRNet(1)),
    "react_w1a1": (ReAct(1), ReAct(1)),
    "rlq_w2a2": (RLQ(2), RLQ(2)),
    "pams_w4a4": (PAMS(4), PAMS(4)),
    "n2uq_w2a2": (N2UQ(2), N2UQ(2)),
    "n2uq_w3a3": (N2UQ(3), N2UQ(3)),
    "lsq_weights_only": (LSQ(4), None),
}


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5))


def trained(cfg: QuantConfig, seed=0, steps=5):
    torch.manual_seed(seed)
    net = quantize(tiny_net(), cfg)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(steps):
        x = torch.rand(8, 3, 8, 8) * 2 - 0.5
        loss = nn.functional.cross_entropy(net(x), torch.randint(0, 5, (8,)))
        opt.zero_grad(), loss.backward(), opt.step()
    return net.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_release_rebuilds_into_an_identical_training_form(name):
    w, a = CONFIGS[name]
    cfg = QuantConfig(weight=w, act=a)
    packed = to_packed(copy.deepcopy(trained(cfg)))
    fresh = quantize(tiny_net(), cfg)
    torch.manual_seed(123)  # a different init: everything must come from the release
    assert restore_from_packed(fresh, packed) == {}
    assert check_restored(fresh, packed) == {}
    fresh.eval()
    x = torch.rand(6, 3, 8, 8) * 2 - 0.5
    with torch.no_grad():
        ref, out = packed(x), fresh(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    again = to_packed(copy.deepcopy(fresh)).state_dict()
    for k, v in packed.state_dict().items():
        if v.dtype == torch.uint8:  # the packed codes
            assert torch.equal(again[k], v), k
        elif v.is_floating_point():
            torch.testing.assert_close(again[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_rebuilt_quantizers_hold_the_release_state():
    """The quantizer parameters come back as the formulas say (not merely some values that work)."""
    cfg = QuantConfig(weight=LSQ(2), act=LSQ(2))
    net = trained(cfg)
    packed = to_packed(copy.deepcopy(net))
    fresh = quantize(tiny_net(), cfg)
    restore_from_packed(fresh, packed)
    for (n, m), (_, f) in zip(net.named_modules(), fresh.named_modules()):
        if hasattr(m, "wq") and m.wq is not None:
            torch.testing.assert_close(f.wq.step, m.wq.step.abs(), rtol=0, atol=0)
            torch.testing.assert_close(f.aq.step, m.aq.step.detach().abs(), rtol=0, atol=0)
            assert bool(f.aq.signed) == bool(m.aq.signed) and bool(f.aq.initialized)
            s = m.wq.step.detach().abs()
            # the weights are the dequantized ones: step * clamp(round(w / step), -2, 1)
            torch.testing.assert_close(f.weight, torch.clamp(torch.round(m.weight / s), -2, 1) * s)


def test_n2uq_thresholds_come_back_from_the_packed_midpoints():
    q = quantize(nn.Sequential(nn.Conv2d(2, 2, 1)), QuantConfig(weight=N2UQ(2), act=N2UQ(2)))[0].aq
    t = torch.tensor([0.1, 0.35, 1.4])  # uneven thresholds, T_2 - T_1 small
    q.restore({"thresholds": t, "scale": torch.tensor([0.5])})
    a = q.lengths().double()
    mid = (q.start.double() + torch.cumsum(a, 0) - a / 2) / q.beta1.double()
    torch.testing.assert_close(mid, t.double(), rtol=0, atol=1e-6)
    assert (q.a > 1e-3).all()
    torch.testing.assert_close(q.beta2 * q.delta, torch.tensor(0.5))


def test_layers_that_do_not_fit_are_named():
    cfg = QuantConfig(weight=LSQ(2), act=LSQ(2))
    packed = to_packed(copy.deepcopy(trained(cfg)))
    other = tiny_net()
    other[-1] = nn.Linear(16, 7)  # another number of classes
    other = quantize(other, cfg)
    misfit = restore_from_packed(other, packed)
    assert list(misfit) == ["9"] and "(5, 16)" in misfit["9"] and "(7, 16)" in misfit["9"]
    bits = quantize(tiny_net(), QuantConfig(weight=LSQ(4), act=LSQ(4)))
    assert set(restore_from_packed(bits, packed)) == {"0", "3", "6", "9"}


def test_irnet_weights_with_a_small_power_of_two_scale_rebuild_exactly():
    """Heavy-tailed channels have E|standardised w| far below 1 (scale 2^-1, 2^-2): the rebuilt
    +-1 pattern must be stretched (one +M/-M pair) until it rounds to the same power of two."""
    from zoo.quantizers.binary import IRNetWeight

    torch.manual_seed(0)
    w = torch.randn(4, 100) * 0.01
    w[:, :2] = torch.tensor([1.0, -1.0])  # outliers
    w[1, 2:6] = torch.tensor([0.5, -0.5, 0.5, -0.5])
    wq = IRNetWeight()
    q, scale, zero = wq.integer_form(w)
    assert sorted(set((scale / 2).tolist())) != [1.0]  # the case under test: shifts below 1
    rebuilt = wq.restore(q.float(), scale, zero)
    q2, scale2, zero2 = wq.integer_form(rebuilt)
    assert torch.equal(q2, q)
    torch.testing.assert_close(scale2, scale, rtol=0, atol=0)


def test_a_quantizer_without_restore_is_named():
    cfg = QuantConfig(weight=LSQ(2), act=LSQ(2))
    packed = to_packed(copy.deepcopy(trained(cfg)))
    fresh = quantize(tiny_net(), cfg)
    fresh[3].wq.restore = lambda *a: (_ for _ in ()).throw(NotImplementedError("MyQuant cannot be rebuilt"))
    with pytest.raises(ValueError, match="layer 3: MyQuant cannot be rebuilt; give it a restore()"):
        restore_from_packed(fresh, packed)


@pytest.mark.parametrize("seed", [0, 1])
def test_irnet_magnitude_weights_rebuild_exactly(seed):
    """IRNet(magnitude=True): the stored power of two is of E|w - mean|; the rebuilt +-1 pattern
    (stretched by 1 / (1 - m^2) for a channel of mean m) gives back the same codes and scales."""
    from zoo.quantizers.binary import IRNetWeight

    torch.manual_seed(seed)
    w = torch.randn(5, 40) * torch.tensor([0.01, 0.03, 0.1, 0.4, 2.0])[:, None] + 0.3 * torch.randn(5, 1) * 0.01
    w[2] = torch.tensor([0.1] * 36 + [-0.9] * 4)  # skewed: mean 0, 36 of 40 codes +1 (sign mean m = 0.8),
    # so an unstretched rebuild would have E|w - mean| 0.36x the stored power of two
    wq = IRNetWeight(magnitude=True)
    q, scale, zero = wq.integer_form(w)
    assert len(set((scale / 2).tolist())) >= 3  # several powers of two, far from 1
    rebuilt = wq.restore(q.float(), scale, zero)
    q2, scale2, zero2 = wq.integer_form(rebuilt)
    assert torch.equal(q2, q)
    torch.testing.assert_close(scale2, scale, rtol=0, atol=0)
