"""The fused W1A1 residual block (zoo/kernels/binary_block.py; csrc/binary_conv.cpp: binary_conv2d_table,
linear_matches): the kernel against the block step written out here with +-1 float64 convolutions and
torch operations, its computed BatchNorm against torch's BatchNorm values, and whole binary ResNet-20s
bit-identical to the integer reference, taking the kernel exactly where it applies."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.kernels import binary_block, cached, cpu_ops
from zoo.models.resnet import resnet20


@pytest.fixture(scope="module", autouse=True)
def kernel():
    import importlib.util

    if shutil.which("c++") is None or shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        pytest.skip("no C++ compiler or ninja here: the CPU binary kernel cannot be built")
    assert cpu_ops.available(), "the C++ kernel failed to build (see the warning above)"


def _sums(x, shift, q, stride, padding, dilation):
    """Integer window sums of u * w, u = +-1 from x - shift >= 0 (0 outside the input), w = 2q - 1."""
    xs = x - shift.view(1, -1, 1, 1) if shift is not None else x
    u = torch.where(xs >= 0, 1.0, -1.0).double()
    return F.conv2d(u, q.double() * 2 - 1, None, stride, padding, dilation).round().long()


def _packed(y, shift):
    """N x H x W x ceil(C/64) int64: bit c of word c // 64 set where y - shift >= 0, written out."""
    ys = y - shift.view(1, -1, 1, 1) if shift is not None else y
    b = (ys >= 0).permute(0, 2, 3, 1).long()
    out = torch.zeros(b.shape[:3] + ((b.shape[-1] + 63) // 64,), dtype=torch.int64)
    for c in range(b.shape[-1]):
        out[..., c // 64] |= torch.bitwise_left_shift(b[..., c], c % 64)
    return out


def _bits(t):
    return t.view(torch.int32)


GEOMETRIES = [  # c_in, c_out, k, stride, padding, dilation, h, w
    (16, 16, 3, 1, 1, 1, 9, 28),     # taps share a word (4 per word), 28 columns: 3 vectors and a tail of 4
    (16, 32, 3, 2, 1, 1, 14, 14),    # ResNet-20's stage-2 entry
    (32, 40, 3, 1, 1, 1, 7, 7),      # 2 taps per word, fewer columns than one vector
    (64, 70, 3, 1, 1, 1, 7, 9),      # one word a tap; 70 outputs: two words of next signs
    (70, 130, 3, 2, 1, 1, 11, 13),   # two words a tap
    (3, 8, 5, 1, 2, 2, 12, 10),      # dilated, 21 taps per word
    (21, 16, (3, 5), 1, (1, 2), 1, 8, 17),
    (200, 9, (1, 3), (2, 1), (0, 1), 1, 7, 9),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("residual,shift,pack", [(True, True, True), (False, False, True), (True, False, False)])
def test_table_kernel_equals_the_written_out_block_step(geom, residual, shift, pack):
    ci, co, k, stride, padding, dilation, h, w = geom
    pair = nn.modules.utils._pair
    k, stride, padding, dilation = pair(k), pair(stride), pair(padding), pair(dilation)
    g = torch.Generator().manual_seed(sum(geom[:2]) + residual + 2 * shift)
    x = torch.randn(2, ci, h, w, generator=g)
    x[0, :, 0, :3] = 0.0  # sign(0) = +1
    q = torch.randint(0, 2, (co, ci) + k, generator=g, dtype=torch.uint8)
    kk = ci * k[0] * k[1]
    table = torch.randn(co, 2 * kk + 1, generator=g)
    table[0, kk] = -0.0  # a zero's sign survives (sum 0 of channel 0)
    s_in = torch.randn(ci, generator=g) * 0.3 if shift else None
    ref_sums = _sums(x, s_in, q, stride, padding, dilation)
    n, _, oh, ow = ref_sums.shape
    res = torch.randn(n, co, oh, ow, generator=g) if residual else None
    nxt = torch.randn(co, generator=g) * 0.3 if shift else None
    lo, hi = -0.75, 0.9
    y, bits = cpu_ops.binary_conv2d_table(cpu_ops.pack_signs(x, s_in), cpu_ops.pack_weight_signs(q), ci, stride,
                                          padding, dilation, table, res, lo, hi, pack, nxt)
    expected = table[torch.arange(co).view(1, -1, 1, 1), ref_sums + kk]
    if res is not None:
        expected = expected + res
    expected = torch.clamp(expected, lo, hi)
    assert torch.equal(_bits(y), _bits(expected))
    if pack:
        assert torch.equal(bits, _packed(expected, nxt))
    else:
        assert bits.numel() == 0


@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[4]])
def test_table_kernel_with_rprelu_equals_the_written_out_block_step(geom):
    """RPReLU instead of the clamp: (d >= 0 ? d : slope * d) + zeta, d = y - gamma, as RPReLU.forward's torch
    operations (negative and zero slopes, a NaN table row)."""
    ci, co, k, stride, padding, dilation, h, w = geom
    g = torch.Generator().manual_seed(co)
    x = torch.randn(2, ci, h, w, generator=g)
    q = torch.randint(0, 2, (co, ci, k, k), generator=g, dtype=torch.uint8)
    kk = ci * k * k
    table = torch.randn(co, 2 * kk + 1, generator=g)
    table[1] = float("nan")
    s_in = torch.randn(ci, generator=g) * 0.3
    sums = _sums(x, s_in, q, stride, padding, dilation)
    res = torch.randn(sums.shape, generator=g)
    rp = torch.randn(3, co, generator=g)
    rp[1, :3] = torch.tensor([-0.5, 0.0, 1.0])  # slopes
    nxt = torch.randn(co, generator=g) * 0.3
    y, bits = cpu_ops.binary_conv2d_table(cpu_ops.pack_signs(x, s_in), cpu_ops.pack_weight_signs(q), ci,
                                          (stride, stride), (padding, padding), (dilation, dilation), table, res,
                                          float("-inf"), float("inf"), True, nxt, None, rp)
    v = table[torch.arange(co).view(1, -1, 1, 1), sums + kk] + res
    d = v - rp[0].view(1, -1, 1, 1)
    expected = torch.where(d >= 0, d, rp[1].view(1, -1, 1, 1) * d) + rp[2].view(1, -1, 1, 1)
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected)) and torch.equal(y.isnan(), expected.isnan())
    assert y[:, 1].isnan().all()
    assert torch.equal(bits, _packed(expected, nxt))


def test_table_kernel_keeps_nan_and_unclamped_values():
    x = torch.randn(1, 16, 5, 9)
    q = torch.randint(0, 2, (8, 16, 3, 3), dtype=torch.uint8)
    table = torch.randn(8, 289)
    table[3] = float("nan")
    y, bits = cpu_ops.binary_conv2d_table(cpu_ops.pack_signs(x), cpu_ops.pack_weight_signs(q), 16, (1, 1), (1, 1),
                                          (1, 1), table, None, float("-inf"), float("inf"), True, None)
    expected = table[torch.arange(8).view(1, -1, 1, 1), _sums(x, None, q, 1, 1, 1) + 144]
    assert torch.equal(y[:, 3].isnan(), torch.ones_like(y[:, 3], dtype=torch.bool))
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))
    assert torch.equal(bits, _packed(expected, None))  # NaN >= 0 is false: bit 3 clear


def test_bad_table_inputs_are_refused():
    xbits = cpu_ops.pack_signs(torch.randn(1, 16, 4, 4))
    wbits = cpu_ops.pack_weight_signs(torch.zeros(8, 16, 3, 3, dtype=torch.uint8))
    args = (xbits, wbits, 16, (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="a table row holds 100 values; sums of 144 terms need 289"):
        cpu_ops.binary_conv2d_table(*args, torch.zeros(8, 100), None, -1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"residual must be float32 of the output's shape \[1, 8, 4, 4\]"):
        cpu_ops.binary_conv2d_table(*args, torch.zeros(8, 289), torch.zeros(1, 8, 4, 5), -1.0, 1.0)
    with pytest.raises(RuntimeError, match="shift has 3 values for 8 channels"):
        cpu_ops.binary_conv2d_table(*args, torch.zeros(8, 289), None, -1.0, 1.0, True, torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"rprelu must be 3 x 8 \(gamma, slope, zeta\)"):
        cpu_ops.binary_conv2d_table(*args, torch.zeros(8, 289), None, -1.0, 1.0, False, None, None, torch.zeros(3, 7))
    with pytest.raises(RuntimeError, match=r"linear must be 4 x 8 \(scale, bias, alpha, beta\)"):
        cpu_ops.binary_conv2d_table(*args, torch.zeros(8, 289), None, -1.0, 1.0, False, None,
                                    torch.zeros(3, 8, dtype=torch.float64))


def _bn(co, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(co).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(co, generator=g))
        bn.bias.copy_(torch.randn(co, generator=g) * 0.5)
        bn.running_mean.copy_(torch.randn(co, generator=g) * 3)
        bn.running_var.copy_(torch.rand(co, generator=g) * 20 + 0.1)
    return bn


@pytest.mark.parametrize("f32", [True, False])
def test_computed_batchnorm_equals_torchs_batchnorm_values(f32):
    """The linear mode: fma(float32(float64(s) * scale + bias), alpha, beta) gives torch's BatchNorm of the
    epilogue's values, every sum, checked by linear_matches; the kernel's outputs equal the table's. f32:
    float32-valued scales without bias (the kernel's float32 arithmetic); else float64 scales and a bias."""
    ci, co, kk = 16, 24, 144
    g = torch.Generator().manual_seed(7)
    bn = _bn(co, 3)
    scale = torch.rand(co, generator=g, dtype=torch.float64) * 0.2 + 0.01
    scale = scale.float().double() if f32 else scale
    bias = torch.full((co,), -0.0, dtype=torch.float64) if f32 else torch.randn(co, generator=g).double()
    s = torch.arange(-kk, kk + 1, dtype=torch.float64)
    vals = (s * scale[:, None] + bias[:, None]).float()
    with torch.no_grad():
        table = bn(vals[None, :, None, :])[0, :, 0, :].contiguous()
        beta = bn(torch.zeros(1, co, 1, 1)).flatten().double()
    alpha = (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach().double()
    linear = torch.stack([scale, bias, alpha, beta])
    assert bool(cpu_ops.linear_matches(table, linear).all())
    off = table.clone()
    off[5, 77] = torch.nextafter(off[5, 77], torch.tensor(float("inf")))  # one entry one ulp away
    assert cpu_ops.linear_matches(off, linear).tolist() == [c != 5 for c in range(co)]
    x = torch.randn(2, ci, 9, 11, generator=g)
    q = torch.randint(0, 2, (co, ci, 3, 3), generator=g, dtype=torch.uint8)
    args = (cpu_ops.pack_signs(x), cpu_ops.pack_weight_signs(q), ci, (1, 1), (1, 1), (1, 1), table)
    res = torch.randn(2, co, 9, 11, generator=g)
    y_table, b_table = cpu_ops.binary_conv2d_table(*args, res, -1.0, 1.0, True, None)
    y_lin, b_lin = cpu_ops.binary_conv2d_table(*args, res, -1.0, 1.0, True, None, linear)
    assert torch.equal(_bits(y_lin), _bits(y_table)) and torch.equal(b_lin, b_table)
    expected = torch.clamp(table[torch.arange(co).view(1, -1, 1, 1), _sums(x, None, q, 1, 1, 1) + kk] + res, -1, 1)
    assert torch.equal(y_lin, expected)


def _binary_resnet(per_conv_shortcut=True, act="hardtanh", spec=None, seed=0):
    torch.manual_seed(seed)
    net = resnet20(num_classes=10, in_chans=1, act=act, per_conv_shortcut=per_conv_shortcut)
    spec = spec or zoo.IRNet(1)
    zoo.quantize(net, zoo.QuantConfig(weight=spec, act=spec, overrides={"stem": None, "fc": None}))
    net.train()
    for _ in range(2):
        net(torch.randn(8, 1, 12, 12))
    for i, m in enumerate(net.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.load_state_dict({**m.state_dict(), **{k: v for k, v in _bn(m.num_features, i).state_dict().items()
                                                     if k != "num_batches_tracked"}})
    return zoo.to_packed(net.eval())


def _counting(monkeypatch):
    calls = {"table": 0, "pack": 0, "conv": 0}
    for key, name in (("table", "binary_conv2d_table"), ("pack", "pack_signs"), ("conv", "binary_conv2d")):
        real = getattr(cpu_ops, name)

        def counted(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)
        monkeypatch.setattr(cpu_ops, name, counted)
    return calls


def _reference(net, x):
    zoo.set_backend(net, "reference")
    with torch.no_grad():
        y = net(x)
    zoo.set_backend(net, "auto")
    return y


@pytest.mark.parametrize("per_conv_shortcut,spec,act", [(True, zoo.IRNet(1), "hardtanh"),
                                                        (False, zoo.XNOR(1), "hardtanh"),
                                                        (True, zoo.ReAct(1), "rprelu")])
def test_binary_resnet_takes_the_fused_blocks_and_equals_the_reference(per_conv_shortcut, spec, act, monkeypatch):
    net = _binary_resnet(per_conv_shortcut, act=act, spec=spec)
    if act == "rprelu":  # ReActNet: RSign thresholds and RPReLU parameters away from their initial values
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for m in net.modules():
                if hasattr(m, "a_shift"):
                    m.a_shift.copy_(torch.randn(m.a_shift.shape, generator=g) * 0.2)
                for name in ("gamma", "zeta", "slope"):
                    if isinstance(getattr(m, name, None), nn.Parameter):
                        getattr(m, name).copy_(torch.randn(getattr(m, name).shape, generator=g) * 0.3)
    x = torch.randn(3, 1, 12, 13)
    y_ref = _reference(net, x)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        y = net(x)
    assert calls == {"table": 18, "pack": 1, "conv": 0}  # one sign packing for the nine blocks
    assert torch.equal(y, y_ref), (y - y_ref).abs().max()
    tables = [cached._cache(m)["bn_table"][1] for m in net.modules() if "bn_table" in cached._cache(m)]
    assert len(tables) == 18 and all(t[1] is not None for t in tables)  # all computed, none looked up
    block = net.layers[3]  # a block on its own (stride 2, new channels): its forward takes the kernel too
    h = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        yb = block(h)
    assert calls["table"] == 20 and calls["pack"] == 2
    zoo.set_backend(net, "reference")
    with torch.no_grad():
        assert torch.equal(yb, block(h))


def test_batchnorm_changes_rebuild_the_tables():
    net = _binary_resnet()
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        net(x)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.25)  # in place: same storage, new version
        y = net(x)
    assert torch.equal(y, _reference(net, x))


def test_blocks_it_does_not_cover_run_their_own_forward(monkeypatch):
    x = torch.randn(2, 1, 12, 12)
    calls = _counting(monkeypatch)
    relu = _binary_resnet(act="relu")  # ReLU: a zero's sign at the clamp is torch's business
    with torch.no_grad():
        y = relu(x)
    assert calls["table"] == 0 and calls["conv"] == 18
    assert torch.equal(y, _reference(relu, x))
    net = _binary_resnet()
    y_ref = _reference(net, x)
    handle = net.layers[4].bn2.register_forward_hook(lambda m, i, o: None)
    with torch.no_grad():
        calls["table"] = 0
        assert torch.equal(net(x), y_ref)
    assert calls["table"] == 16  # the hooked block ran module by module
    handle.remove()
    calls["table"] = 0
    y = net(x)  # gradients on: the module-by-module forward
    assert calls["table"] == 0 and torch.equal(y.detach(), y_ref)
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    with torch.no_grad():
        assert torch.equal(net(x), y_ref)
    assert calls["table"] == 0
    monkeypatch.setenv("ZOO_CPU_KERNELS", "1")
    with torch.no_grad():
        assert torch.equal(net(x.contiguous(memory_format=torch.channels_last)), y_ref)


def test_table_entries_are_the_blocks_own_values():
    """binary_block.table: row o, entry s + K is bn(conv's epilogue of the sum s) by the modules' torch
    operations -- checked here against the reference conv and the BatchNorm module on inputs whose sums
    are known."""
    net = _binary_resnet()
    conv, bn = net.layers[0].conv1, net.layers[0].bn1
    pl = binary_block._binary_plan(conv, torch.zeros(1))
    t, _ = binary_block.table(conv, pl, bn)
    # an all-(+1) 3x3 input: the centre output's sum is sum_k w_k = 2 * popcount(q) - K per channel
    x = torch.ones(1, 16, 3, 3)
    q = conv.codes()
    s = (2 * q.flatten(1).sum(1) - 144).long()
    zoo.set_backend(net, "reference")
    with torch.no_grad():
        ref = bn(conv(x))[0, :, 1, 1]
    assert torch.equal(t[torch.arange(16), s + 144], ref)


@pytest.mark.parametrize("c,shift,w", [(16, False, 19), (130, True, 19), (64, True, 19), (16, True, 28), (70, False, 28)])
def test_sign_packing_of_wide_rows_equals_the_written_out_words(c, shift, w):
    """pack_signs over rows of 16-pixel vectors and a masked tail (3 or 12 pixels), one to three words a
    pixel, with -0.0, +-0.0 after the shift, NaN and infinities."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, 3, w, generator=g)
    s = torch.randn(c, generator=g) if shift else None
    x[0, :, 0, :8] = float("nan")
    x[0, 1, 1, :] = -0.0
    x[1, 2, :, 3] = float("inf")
    x[1, 3, :, 9] = -float("inf")
    if s is not None:
        x[1, 4, 2, :] = s[4]  # x - shift == 0 exactly: the bit is set
    assert torch.equal(cpu_ops.pack_signs(x, s), _packed(x, s))
