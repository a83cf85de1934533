"""The cached CPU path (zoo/kernels/cached.py, backend "cpu" and "auto" on CPU tensors) against the
uncached integer reference: identical outputs wherever the zero points have an integer multiple
(bit for bit), float64-close for muL2Q's real-valued zero points, the weight cache following in-place
updates, and the reference still taken where float32 sums would not be exact."""
import pytest
import torch
from torch import nn

import zoo
from zoo.kernels import cached, dispatch, reference
from zoo.quantizers.packed import PackedLayer

CFGS = {"lsq4": zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)),
        "minmax8": zoo.QuantConfig(weight=zoo.MinMax(8), act=zoo.MinMax(8)),
        "dorefa2": zoo.QuantConfig(weight=zoo.DoReFa(2), act=zoo.DoReFa(2)),
        "xnor1": zoo.QuantConfig(weight=zoo.XNOR(1), act=zoo.XNOR(1)),
        "irnet1": zoo.QuantConfig(weight=zoo.IRNet(1), act=zoo.IRNet(1)),
        "react1": zoo.QuantConfig(weight=zoo.ReAct(1), act=zoo.ReAct(1)),
        "w2a1": zoo.QuantConfig(weight=zoo.LSQ(2), act=zoo.XNOR(1)),
        "w1a4": zoo.QuantConfig(weight=zoo.XNOR(1), act=zoo.LSQ(4)),
        "n2uq2": zoo.QuantConfig(weight=zoo.N2UQ(2), act=zoo.N2UQ(2)),
        "weight_only4": zoo.QuantConfig(weight=zoo.LSQ(4), act=None)}


def _packed(net, cfg, shape):
    torch.manual_seed(0)
    zoo.quantize(net, cfg)
    net.train()
    for _ in range(3):
        net(torch.randn(*shape))
    return zoo.to_packed(net.eval())


def _nets(cfg):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(6, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1))
    grouped = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1, groups=3), nn.Conv2d(12, 8, 1))
    lin = nn.Sequential(nn.Linear(40, 9))
    up = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1))
    return {"conv": (_packed(conv, cfg, (4, 6, 11, 10)), (2, 6, 11, 10)),
            "grouped": (_packed(grouped, cfg, (4, 6, 9, 9)), (2, 6, 9, 9)),
            "linear": (_packed(lin, cfg, (8, 40)), (2, 3, 40)),
            "transposed": (_packed(up, cfg, (4, 6, 5, 5)), (2, 6, 5, 5))}


def _outputs(net, x, backend):
    zoo.set_backend(net, backend)
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("name", list(CFGS))
def test_cached_path_identical_to_reference(name, monkeypatch):
    calls = []
    for fn in ("conv2d", "linear", "conv_transpose2d"):
        real = getattr(reference, fn)
        monkeypatch.setattr(reference, fn, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    for kind, (net, shape) in _nets(CFGS[name]).items():
        x = torch.randn(*shape)
        calls.clear()
        y_ref = _outputs(net, x, "reference")
        assert calls or CFGS[name].act is None, kind  # the reference really ran
        for backend in ("cpu", "auto"):
            calls.clear()
            y = _outputs(net, x, backend)
            assert not calls, (kind, backend)  # ... and the cached path replaced it everywhere
            assert y.dtype == y_ref.dtype and torch.equal(y, y_ref), (kind, backend, (y - y_ref).abs().max())


def test_cached_path_half_precision_input():
    net, shape = _nets(CFGS["lsq4"])["conv"]
    x = torch.randn(*shape).half()
    y_ref = _outputs(net, x, "reference")
    y = _outputs(net, x, "cpu")
    assert y.dtype == torch.float16 and torch.equal(y, y_ref)


def test_real_valued_zero_points_expanded_form_matches_reference():
    """muL2Q: real-valued weight and activation zero points take the expanded form (integer sums plus
    border terms C_q, C_1 for the zero-padded windows); equal to the reference to float64 rounding,
    and to the training form's float convolution."""
    cfg = zoo.QuantConfig(weight=zoo.UL2Q(2), act=zoo.UL2Q(2))
    nets = _nets(cfg)
    torch.manual_seed(1)
    up = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2))
    nets["grouped transposed"] = (_packed(up, cfg, (4, 6, 5, 5)), (2, 6, 5, 5))
    for kind in ("conv", "grouped", "linear", "transposed", "grouped transposed"):
        net, shape = nets[kind]
        first = next(m for m in net.modules() if isinstance(m, PackedLayer))
        z_a = float(first.act_params()["zero"])
        assert z_a != round(2 * z_a) / 2 and cached._multiplier(first.w_zero) is None  # really real-valued
        x = torch.randn(*shape)
        y_ref = _outputs(net, x, "reference")
        y = _outputs(net, x, "cpu")
        assert torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6), (kind, (y - y_ref).abs().max())
        plans = first.__dict__["_cpu_cache"]["plans"]
        assert [pl.kind for _, pl in plans.values()] == ["expanded"]  # the expanded form ran (not the reference)


def test_border_terms_by_hand():
    """C_q and C_1 of a 3x3 conv, padding 1, on a 3x3 input, against sums written out by hand."""
    torch.manual_seed(0)
    q = torch.randint(0, 4, (2, 1, 3, 3)).float()

    ones = torch.ones(1, 1, 3, 3)
    conv = lambda a, b: torch.nn.functional.conv2d(a, b, padding=1)  # noqa: E731
    stacked = cached.Plan("expanded", {}, w=q, stack=torch.cat([q, torch.ones(1, 1, 3, 3)]))  # groups = 1
    c_q, c_1 = cached._sums(conv, ones, stacked)
    c_q2, c_1g = cached._sums(conv, ones, cached.Plan("expanded", {}, w=q))  # no stack: grouped layers' form
    assert torch.equal(c_q2, c_q) and torch.equal(c_1g, c_1.expand_as(c_1g))
    # output (0, 0) sees input rows/cols 0..1 through kernel rows/cols 1..2; (1, 1) sees everything
    assert torch.equal(c_q[0, :, 0, 0], q[:, 0, 1:, 1:].sum((1, 2)))
    assert torch.equal(c_q[0, :, 1, 1], q[:, 0].sum((1, 2)))
    assert torch.equal(c_q[0, :, 0, 1], q[:, 0, 1:, :].sum((1, 2)))
    assert c_1[0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]


def test_cache_follows_in_place_weight_updates():
    net, shape = _nets(CFGS["irnet1"])["conv"]
    x = torch.randn(*shape)
    _outputs(net, x, "cpu")
    conv = net[0]
    conv.qweight.copy_(conv.qweight ^ 0xFF)  # flip every sign in place (same storage)
    y = _outputs(net, x, "cpu")
    assert torch.equal(y, _outputs(net, x, "reference"))
    net, shape = _nets(CFGS["lsq4"])["conv"]
    _outputs(net, x, "cpu")
    net[0].w_zero.add_(1.0)
    net[0].a_scale.mul_(1.5)  # activation parameters are read per call
    assert torch.equal(_outputs(net, x, "cpu"), _outputs(net, x, "reference"))


def test_float64_sums_where_float32_would_not_be_exact(monkeypatch):
    """max|u| * max_c sum_k |w'[c, k]| >= 2^24 (8-bit codes, K = 512 * 9): the layer's sums run in float64 (exact
    below 2^53), still bit-identical to the reference; the reference itself is not called."""
    calls = []
    real = reference.conv2d
    monkeypatch.setattr(reference, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = _packed(nn.Sequential(nn.Conv2d(512, 4, 3, padding=1)), CFGS["minmax8"], (2, 512, 5, 5))
    x = torch.randn(1, 512, 5, 5)
    y = _outputs(net, x, "cpu")
    assert not calls
    (_, pl), = net[0].__dict__["_cpu_cache"]["plans"].items()
    assert pl[1].kind == "folded" and pl[1].w.dtype == torch.float64
    assert torch.equal(y, _outputs(net, x, "reference")) and calls == [1]
    small = _packed(nn.Sequential(nn.Conv2d(8, 4, 3, padding=1)), CFGS["minmax8"], (2, 8, 5, 5))
    _outputs(small, torch.randn(1, 8, 5, 5), "cpu")  # K = 72: 72 * 255 * 255 < 2^24 -> float32
    assert next(iter(small[0].__dict__["_cpu_cache"]["plans"].values()))[1].w.dtype == torch.float32


def test_float32_bound_uses_the_weight_rows_l1_norm():
    """The float32/float64 choice bounds every partial sum by max|u| * max_c sum_k |w'[c, k]|. Peaked
    weights (one large tap per row, the rest at the zero point) pass K * max|u| * max|w'| >= 2^24 but
    not that bound: float32, identical to the reference. All-positive weights and inputs sum past 2^24,
    where float32 really rounds (checked): float64, identical to the reference."""
    def conv_with(weight, x):
        net = nn.Sequential(nn.Conv2d(512, 4, 3, padding=1, bias=False))
        with torch.no_grad():
            net[0].weight.copy_(weight)
        zoo.quantize(net, CFGS["minmax8"])
        net.train()
        net(x)
        net = zoo.to_packed(net.eval())
        y = _outputs(net, x, "cpu")
        (_, pl), = net[0].__dict__["_cpu_cache"]["plans"].items()
        assert torch.equal(y, _outputs(net, x, "reference"))
        return net, pl[1]

    torch.manual_seed(0)
    x = torch.rand(1, 512, 6, 6)
    peaked = torch.randn(4, 512, 3, 3) * 1e-4
    peaked[:, 0, 1, 1] = torch.tensor([1.0, -1.0, 0.5, 2.0])
    _, pl = conv_with(peaked, x)
    assert 4608 * 255 * float(pl.w.abs().max()) >= 2 ** 24 and pl.kind == "folded" and pl.w.dtype == torch.float32
    net, pl = conv_with(torch.rand(4, 512, 3, 3) + 1.0, x)
    assert pl.w.dtype == torch.float64
    u = torch.nn.functional.pad(reference.quantize_act(x, "affine", pl.p, 1) - pl.z_a, (1, 1, 1, 1))
    f32 = torch.nn.functional.conv2d(u, pl.w.float()).double()
    assert not torch.equal(f32, torch.nn.functional.conv2d(u.double(), pl.w))  # float32 would round here


def test_backend_reference_caches_nothing_and_clear_drops_the_cache():
    net, shape = _nets(CFGS["lsq4"])["conv"]
    x = torch.randn(*shape)
    _outputs(net, x, "reference")
    assert not any("_cpu_cache" in m.__dict__ for m in net.modules())
    _outputs(net, x, "auto")
    assert all("_cpu_cache" in m.__dict__ for m in net.modules() if isinstance(m, PackedLayer))
    cached.clear(net)
    assert not any("_cpu_cache" in m.__dict__ for m in net.modules())
    assert "_cpu_cache" not in str(net.state_dict().keys())


def test_backend_names():
    assert dispatch.BACKENDS == ("auto", "triton", "cpu", "reference")
    cpu = torch.zeros(1)
    assert dispatch.cpu_cached("auto", cpu) and dispatch.cpu_cached("cpu", cpu)
    assert not dispatch.cpu_cached("reference", cpu) and not dispatch.cpu_cached("triton", cpu)
    assert dispatch.triton_ops("cpu", cpu) is None
    with pytest.raises(ValueError, match=r"unknown backend 'fast'; valid: \['auto', 'triton', 'cpu', 'reference'\]"):
        dispatch.check_backend("fast")
