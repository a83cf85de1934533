"""Per-call-site activation quantizers (zoo/quantizers/sites.py, ``LayerQuant(act_sites=n)``): a layer
called n times per forward (a detection head shared by the FPN levels) with one activation quantizer
per call. Checked against n independent single-site quantizers fed the same inputs."""
import copy

import pytest
import torch
from torch import nn

from zoo.quantizers import LSQ, LayerQuant, MinMax, QuantConfig, quantize, to_packed
from zoo.quantizers.sites import MultiSiteAct, track_sites
from zoo.quantizers.unpack import check_restored, restore_from_packed

N_SITES = 3


class SharedHead(nn.Module):
    """One conv applied to each input of a list (as torchvision's detection heads do per FPN level)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, xs):
        return [self.conv(x) for x in xs]


def levels(seed=1):
    g = torch.Generator().manual_seed(seed)
    # very different ranges per level, as FPN levels have
    return [torch.randn(2, 4, 8 >> i, 8 >> i, generator=g) * 3.0 ** i for i in range(N_SITES)]


def config(sites=N_SITES, spec=LSQ(bits=4)):
    return QuantConfig(overrides={"conv": LayerQuant(LSQ(bits=4, granularity="channel"), spec, act_sites=sites)})


def per_site_head():
    head = track_sites(SharedHead())
    return quantize(head, config())


def test_each_call_uses_its_own_quantizer_values_and_gradients():
    head = per_site_head().train()
    aq = head.conv.aq
    assert isinstance(aq, MultiSiteAct) and aq.num_sites == N_SITES
    # reference: N_SITES independent single-site layers sharing the float weights
    refs = [quantize(copy.deepcopy(SharedHead()), config(sites=1)) for _ in range(N_SITES)]
    xs = levels()
    xs_ref = [x.clone().requires_grad_(True) for x in xs]
    xs = [x.clone().requires_grad_(True) for x in xs]
    out = head(xs)
    out_ref = [r.conv(x) for r, x in zip(refs, xs_ref)]
    for o, r in zip(out, out_ref):
        assert torch.equal(o, r)
    # steps initialised from each level's own first batch: LSQ's 2 mean|x| / sqrt(Q_P)
    for q, x in zip(aq.sites, xs):
        signed = bool(x.min() < 0)
        qp = 7 if signed else 15
        assert torch.allclose(q.step.detach(), 2 * x.detach().abs().mean() / qp ** 0.5)
    w = torch.randn(sum(o.numel() for o in out), generator=torch.Generator().manual_seed(2))
    loss = lambda outs: (torch.cat([o.reshape(-1) for o in outs]) * w).sum()  # noqa: E731
    loss(out).backward()
    loss(out_ref).backward()
    for q, r, x, xr in zip(aq.sites, refs, xs, xs_ref):
        assert torch.allclose(q.step.grad, r.conv.aq.step.grad, rtol=1e-5, atol=1e-9)
        assert torch.allclose(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
    # the shared weight and its step get the sum over the sites
    for name in ("weight", "bias"):
        total = sum(getattr(r.conv, name).grad for r in refs)
        assert torch.allclose(getattr(head.conv, name).grad, total, rtol=1e-5, atol=1e-6)
    wstep = sum(r.conv.wq.step.grad for r in refs)
    assert torch.allclose(head.conv.wq.step.grad, wstep, rtol=1e-4, atol=1e-8)


def test_steps_differ_per_level_and_shared_is_one_step():
    head = per_site_head().train()
    head(levels())
    steps = [float(q.step.detach()) for q in head.conv.aq.sites]
    assert steps[2] > 3 * steps[0]  # level 2's inputs are 9x larger
    shared = quantize(SharedHead(), config(sites=1)).train()
    shared(levels())
    assert shared.conv.aq.step.numel() == 1


def test_packed_form_equals_training_form_and_round_trips(tmp_path):
    head = per_site_head().train()
    head(levels())
    head.eval()
    xs = levels(seed=5)
    with torch.no_grad():
        expected = head(xs)
        packed = to_packed(copy.deepcopy(head))
        got = packed(xs)
    assert packed.conv.num_sites == N_SITES and packed.conv.a_scale.shape == (N_SITES,)
    exported = head.conv.aq.export()["scale"]
    assert torch.equal(packed.conv.a_scale, exported)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # packed -> training form (fine-tuning a release) restores every site's step
    fresh = per_site_head()
    assert restore_from_packed(fresh, packed) == {}
    assert check_restored(fresh, packed) == {}
    assert torch.equal(fresh.conv.aq.export()["scale"], exported)
    # a shifted site order would change the outputs: the sites are really used in turn
    packed.conv.a_scale.copy_(packed.conv.a_scale.flip(0))
    with torch.no_grad():
        shifted = packed(xs)
    assert not torch.allclose(shifted[0], expected[0], atol=1e-3)


def test_packed_single_site_layers_are_unchanged():
    net = quantize(SharedHead(), config(sites=1)).train()
    net(levels())
    p = to_packed(copy.deepcopy(net).eval())
    assert p.conv.num_sites == 1 and p.conv.a_scale.shape == (1,)
    assert "sites" not in repr(p.conv)


def test_wrong_number_of_calls_is_an_error():
    head = per_site_head().train()
    with pytest.raises(RuntimeError, match=r"SharedHead: layer 'conv' has 3 activation sites \(act_sites\) but was called 2 times"):
        head(levels()[:2])
    out = head(levels())  # the next forward starts again at site 0
    assert len(out) == N_SITES


def test_minmax_sites_track_their_own_ranges():
    head = quantize(track_sites(SharedHead()), config(spec=MinMax(bits=8))).train()
    xs = levels()
    head(xs)
    for q, x in zip(head.conv.aq.sites, xs):
        assert torch.equal(q.hi, x.max().clamp(min=0)) and torch.equal(q.lo, x.min().clamp(max=0))


def test_layer_quant_act_sites_config():
    lq = LayerQuant(LSQ(bits=4), LSQ(bits=4), act_sites=5)
    assert lq.to_dict()["act_sites"] == 5 and LayerQuant.from_dict(lq.to_dict()) == lq
    assert "act_sites" not in LayerQuant(LSQ(bits=4), LSQ(bits=4)).to_dict()  # old configs read the same
    qc = QuantConfig(weight=LSQ(bits=4), act=LSQ(bits=4), overrides={"head.*": lq})
    assert QuantConfig.from_dict(qc.to_dict()) == qc
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="act_sites must be an int >= 1"):
            LayerQuant(LSQ(bits=4), LSQ(bits=4), act_sites=bad)
    with pytest.raises(ValueError, match="needs an activation quantizer"):
        LayerQuant(LSQ(bits=4), None, act_sites=2)
    with pytest.raises(ValueError, match=r"no field\(s\) \['sites'\]"):
        LayerQuant.from_dict({"weight": None, "act": None, "sites": 2})


def test_mixed_precision_bits_keep_the_sites():
    from zoo.mixed.search import apply_bits

    qc = QuantConfig(weight=LSQ(bits=4), act=LSQ(bits=4),
                     overrides={"conv": LayerQuant(LSQ(bits=4), LSQ(bits=4), act_sites=5)})
    new = apply_bits(qc, {"conv": (2, 3)})
    lq = new.for_layer("conv")
    assert (lq.weight.bits, lq.act.bits, lq.act_sites) == (2, 3, 5)


def test_cost_counts_the_activation_bits_of_a_multi_site_layer():
    from zoo.cost_model import _act_bits

    head = per_site_head().train()
    head(levels())
    packed = to_packed(copy.deepcopy(head).eval())
    assert _act_bits(head.conv) == 4 and _act_bits(packed.conv) == 4
