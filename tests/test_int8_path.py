"""The cached CPU path's int8 sums (zoo/kernels/onednn.py, oneDNN's u8 x s8 convolutions and matmuls):
bit-identical to the uncached float64 reference for every kind of folded and expanded plan they take
(symmetric, asymmetric 8-bit weights shifted per row, threshold codes, per-channel shifts, real-valued
zero points, groups, strides, dilation, 1 x 1 outputs), really taken where eligible, switched off by
ZOO_CPU_INT8=0 with the same outputs, and refused by the self-test where sums would saturate."""
import pytest
import torch
from torch import nn

import zoo
from zoo.kernels import cached, onednn
from zoo.quantizers.packed import PackedLayer

pytestmark = pytest.mark.skipif(not onednn.available(), reason="oneDNN int8 ops absent or not exact on this CPU")

CFGS = {"lsq4": zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)),
        "lsq8": zoo.QuantConfig(weight=zoo.LSQ(8), act=zoo.LSQ(8)),
        "minmax8": zoo.QuantConfig(weight=zoo.MinMax(8), act=zoo.MinMax(8)),  # asymmetric rows: shifted
        "dorefa2": zoo.QuantConfig(weight=zoo.DoReFa(2), act=zoo.DoReFa(2)),
        "pams2": zoo.QuantConfig(weight=zoo.PAMS(2), act=zoo.PAMS(2)),
        "n2uq2": zoo.QuantConfig(weight=zoo.N2UQ(2), act=zoo.N2UQ(2)),  # threshold codes
        "rlq4": zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.RLQ(4)),  # per-channel shift (set below)
        "ul2q2": zoo.QuantConfig(weight=zoo.UL2Q(2), act=zoo.UL2Q(2))}  # real zero points: expanded form

NETS = {  # (modules, input shape)
    "conv": (lambda: nn.Sequential(nn.Conv2d(6, 12, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(12, 8, 3, padding=2, dilation=2)), (3, 6, 11, 10)),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(6, 12, 3, padding=1, groups=3), nn.Conv2d(12, 8, 1)), (2, 6, 9, 9)),
    "one_pixel": (lambda: nn.Sequential(nn.Conv2d(16, 8, 3), nn.Conv2d(8, 4, 1)), (2, 16, 3, 3)),  # 1 x 1 outputs
    "linear": (lambda: nn.Sequential(nn.Linear(40, 9), nn.Linear(9, 5)), (2, 3, 40)),
    # transposed convs: one sub-pixel int8 convolution each (LinkNet's 4/2/1 and 3/2/1, whose 2H - 1 outputs crop)
    "transposed": (lambda: nn.Sequential(nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1), nn.ReLU(),
                                         nn.ConvTranspose2d(8, 5, 3, stride=2, padding=1)),  # cropped
                   (2, 6, 7, 9)),
}


def _packed(cfg_name, net_name):
    torch.manual_seed(0)
    build, shape = NETS[net_name]
    net = build()
    if cfg_name == "minmax8":  # all-positive weights: per-channel min-max codes q - z_w in [0, 255]
        with torch.no_grad():
            for p in net.parameters():
                p.abs_()
    zoo.quantize(net, CFGS[cfg_name])
    net.train()
    for _ in range(3):
        net(torch.randn(*shape) * 2)
    net = zoo.to_packed(net.eval())
    if cfg_name == "rlq4":  # a real per-channel shift (it starts at 0)
        for m in net.modules():
            if isinstance(m, PackedLayer):
                m.a_shift.copy_(torch.randn_like(m.a_shift) * 0.3)
    return net, shape


def _run(net, x, backend):
    zoo.set_backend(net, backend)
    with torch.no_grad():
        return net(x)


@pytest.fixture
def int8_calls(monkeypatch):
    calls = []
    for cls in (onednn.Conv, onednn.Linear):  # a transposed conv's int8 sums: one call of its sub-pixel Conv
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, x, _r=real: calls.append(type(self).__name__) or _r(self, x))
    return calls


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("cfg_name", list(CFGS))
def test_int8_sums_identical_to_reference(cfg_name, net_name, int8_calls):
    net, shape = _packed(cfg_name, net_name)
    torch.manual_seed(1)
    x = torch.randn(*shape) * 2
    x_cl = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    for inp in (x, x_cl):  # a channels-last input reads in place: same outputs
        want = _run(net, inp, "reference")
        int8_calls.clear()
        got = _run(net, inp, "cpu")
        assert got.dtype == want.dtype and torch.equal(got, want), (cfg_name, net_name, (got - want).abs().max())
        # ... in the reference's layout (float layers after them would round differently in another one)
        layout = lambda t: (t.is_contiguous(), t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))  # noqa: E731
        assert layout(got) == layout(want), (got.stride(), want.stride())
        layers = [m for m in net.modules() if isinstance(m, PackedLayer)]
        calls = int8_calls
        if net_name == "grouped" and cfg_name in ("minmax8", "ul2q2"):  # a ones row needs one group: float32 first
            assert len(calls) == 1
        elif net_name == "transposed" and cfg_name == "minmax8":  # asymmetric 8-bit columns: float32 sums
            assert not calls
        else:
            assert len(calls) == len(layers), int8_calls  # every layer took the int8 sums
    plans = [pl for m in layers for _, pl in m.__dict__["_cpu_cache"]["plans"].values()]
    assert {pl.kind for pl in plans} == ({"expanded"} if cfg_name == "ul2q2" else {"folded"})
    if cfg_name == "minmax8" and net_name not in ("grouped", "transposed"):
        assert all(pl.spec.d is not None for pl in plans)  # 8-bit asymmetric rows: shifted, ones stacked


GEOMETRIES = [  # (kernel, stride, padding, output_padding) of transposed convs, per dimension
    ((4, 4), (2, 2), (1, 1), (0, 0)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (0, 0)),
    ((2, 2), (2, 2), (0, 0), (0, 0)), ((5, 3), (3, 2), (2, 0), (1, 1)), ((1, 1), (1, 1), (0, 0), (0, 0)),
    ((3, 5), (1, 3), (2, 1), (0, 2)), ((4, 4), (3, 3), (3, 0), (2, 0)), ((6, 2), (4, 1), (1, 0), (3, 0)),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_transposed_conv_as_one_sub_pixel_int8_conv(geom):
    """onednn.ConvTranspose: the transposed conv's exact sums of (x8 - x_zp) * w (float64 conv_transpose2d
    of the same integers), from one ordinary int8 conv and a phase interleave, channels-last; and the C++
    epilogues reading the sub-pixel sums in place equal them on the interleaved sums."""
    from zoo.kernels import cpu_ops

    (kh, kw), stride, padding, out_pad = geom
    g = torch.Generator().manual_seed(sum(sum(t) for t in geom))
    x8 = torch.randint(0, 256, (2, 5, 6, 7), generator=g).to(torch.uint8)
    w8 = torch.randint(-128, 128, (5, 4, kh, kw), generator=g).to(torch.int8)
    want = torch.nn.functional.conv_transpose2d(x8.double() - 9, w8.double(), None, stride, padding, out_pad)
    ct = onednn.ConvTranspose(w8, 9, stride, padding, out_pad)
    got = ct(x8)
    assert got.shape == want.shape and torch.equal(got.double(), want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    if not cpu_ops.ready():
        return
    sums, sub = ct.sums(x8), ct.subpixel(6, 7)
    assert sub[4:] == list(want.shape[2:])
    scale, bias = torch.rand(4, generator=g).double(), torch.randn(4, generator=g)
    for nchw in (True, False):
        y = cpu_ops.epilogue(sums, scale, bias, False, nchw, sub)
        y_want = (want * scale.view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)).float()
        assert torch.equal(y, y_want) and y.is_contiguous() == nchw
        # the expanded form's: [sum v q; sum v] as C + 1 groups (the last one here: the sums of channel 3)
        zw, za = torch.rand(3, generator=g).double(), 0.37
        c_q, c_1 = torch.randn(1, 3, *sub[4:], generator=g).round(), torch.randn(1, 1, *sub[4:], generator=g).round()
        y = cpu_ops.expanded_epilogue(sums, c_q, c_1, zw, za, scale[:3], bias[:3], nchw, sub)
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        y_want = ((want[:, :3] - v(zw) * want[:, 3:]) - za * (c_q.double() - v(zw) * c_1.double())) * v(scale[:3])
        assert torch.equal(y, (y_want + v(bias[:3].double())).float())


@pytest.mark.parametrize("cfg_name", ["lsq4", "ul2q2"])
def test_transposed_int8_sums_without_the_cpp_kernels(cfg_name, int8_calls, monkeypatch):
    """ZOO_CPU_KERNELS=0: the sub-pixel int8 sums interleaved by torch (ConvTranspose.__call__) and the torch
    epilogues (folded and expanded forms), identical to the reference; channels-last input too."""
    net, shape = _packed(cfg_name, "transposed")
    x = torch.randn(*shape) * 2
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        want = _run(net, inp, "reference")
        int8_calls.clear()
        got = _run(net, inp, "cpu")
        assert torch.equal(got, want) and len(int8_calls) == 2
        assert got.is_contiguous() == want.is_contiguous()


def test_sums_that_need_float64_run_as_two_int8_halves(int8_calls, monkeypatch):
    """A conv and a linear with K = 2304 and 8-bit codes spread over the whole range: their sums can pass
    2^24 (the plan takes float64), so the int8 path splits W' = 16 H + L and sums each half in int8
    (the ones FCOS W8A8's layer4 takes); outputs identical to the reference's float64 sums."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(256, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 9, 2304), nn.Linear(2304, 4))
    for p in net.parameters():
        nn.init.uniform_(p, -1, 1)
    zoo.quantize(net, CFGS["lsq8"])
    net.train()
    for _ in range(3):
        net(torch.randn(2, 256, 3, 3) * 2)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "wq"):  # codes over the whole int8 range
                m.wq.step.copy_(m.weight.abs().amax() / 127)
    net = zoo.to_packed(net.eval())
    x = torch.randn(3, 256, 3, 3) * 2
    want = _run(net, x, "reference")
    got = _run(net, x, "cpu")
    assert torch.equal(got, want)
    plans = {n: pl for n, m in net.named_modules()
             for _, pl in m.__dict__.get("_cpu_cache", {}).get("plans", {}).values()}
    split = [n for n, pl in plans.items() if pl.spec is not None and pl.spec.split]
    assert split == ["0", "3"] and all(plans[n].w.dtype == torch.float64 for n in split)  # the K = 2304 layers
    assert len(int8_calls) == 3  # every layer in int8
    assert torch.equal(_run(net, x.contiguous(memory_format=torch.channels_last), "cpu"), want)
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")  # the epilogue in torch's operations: the same
    assert torch.equal(_run(net, x, "cpu"), want)


def test_int8_sums_of_a_shipped_model_and_the_off_switch(monkeypatch, int8_calls):
    """resnet20 LSQ W4A4 on its golden images: every layer through int8 (its 8-bit first conv and
    classifier with shifted rows), identical to the reference; ZOO_CPU_INT8=0 runs float32 sums, same outputs."""
    from zoo.cards import read_golden
    from zoo.registry import resolve_checkpoint

    x, _ = read_golden(resolve_checkpoint("resnet20.lsq_w4a4_fmnist"))
    model = zoo.load("resnet20.lsq_w4a4_fmnist")
    want = _run(model, x, "reference")
    got = _run(model, x, "cpu")
    assert torch.equal(got, want) and len(int8_calls) == 20
    monkeypatch.setenv("ZOO_CPU_INT8", "0")
    int8_calls.clear()
    cached.clear(model)
    assert torch.equal(_run(model, x, "cpu"), want) and not int8_calls


def test_self_test_passes_here_and_rejects_saturating_sums(monkeypatch):
    assert onednn._self_test()
    real = onednn.Conv.__call__

    def saturating(self, x8):  # what int16 pair sums would do to large sums
        return real(self, x8).clamp(-2 ** 15, 2 ** 15 - 1)

    monkeypatch.setattr(onednn.Conv, "__call__", saturating)
    assert not onednn._self_test()
    monkeypatch.setattr(onednn, "_state", {})
    assert not onednn.available()  # ... and the path is then off


def test_a_model_with_built_caches_copies_and_pickles(int8_calls):
    """oneDNN's prepacked weights cannot be copied or pickled: deepcopy of a loaded model after a forward
    gives empty caches that rebuild on the next call, with the same outputs; pickling (torch.save of the
    module) works and stores an empty cache."""
    import copy
    import pickle

    model = zoo.load("resnet20.lsq_w4a4_fmnist")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    assert int8_calls  # the prepacked weights exist
    other = copy.deepcopy(model)
    int8_calls.clear()
    with torch.no_grad():
        assert torch.equal(other(x), want)
    assert len(int8_calls) == 20  # rebuilt
    pickle.dumps(model)  # raised on oneDNN's opaque tensors before
    layer = next(m for m in model.modules() if "_cpu_cache" in m.__dict__)
    cache = layer.__dict__["_cpu_cache"]
    assert cache and cache.__reduce__() == (type(cache), ())  # what pickle stores: an empty cache


def test_a_single_vector_through_a_packed_linear():
    """nn.Linear takes 1-d inputs; so do the int8 and float32 sums (the C++ kernels need 2-d: torch's
    operations make the codes instead), identical to the reference."""
    net, _ = _packed("lsq4", "linear")
    x = torch.randn(40)
    want = _run(net, x, "reference")
    for int8 in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ZOO_CPU_INT8", int8)
            mp.setattr(onednn, "_state", {})
            cached.clear(net)
            got = _run(net, x, "cpu")
        assert got.shape == want.shape == (5,) and torch.equal(got, want), int8


@pytest.mark.slow
def test_every_shipped_model_identical_through_the_cpu_path_and_the_reference():
    """Every shipped quantized model (mmdet's aside) on its golden input: the task's raw output tensor
    through the default CPU path equals the reference's bit for bit; prints how many packed layer sites
    take the int8 sums (the README's count)."""
    from zoo.cards import read_golden
    from zoo.registry import resolve_checkpoint
    from zoo.tasks import get_task

    names = [n for n in zoo.list_models() if ".fp32" not in n and not n.startswith("mmdet.")]
    sites = int8 = 0
    for name in names:
        x, _ = read_golden(resolve_checkpoint(name))
        models = {b: zoo.load(name, backend=b) for b in ("cpu", "reference")}
        with torch.no_grad():
            outs = {b: get_task(m.task).golden_output(m, x) for b, m in models.items()}
        assert torch.equal(outs["cpu"], outs["reference"]), name
        plans = [pl for m in models["cpu"].modules()
                 for _, pl in m.__dict__.get("_cpu_cache", {}).get("plans", {}).values()]
        sites, int8 = sites + len(plans), int8 + sum(bool(pl.int8) for pl in plans)
    print(f"\n{len(names)} models identical; {int8} of {sites} packed layer sites run the int8 sums")
