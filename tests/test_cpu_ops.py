"""The C++ CPU kernels (zoo/kernels/cpu_ops.py): the W1A1 convolution (csrc/binary_conv.cpp: packed
signs, XOR + popcount with zero padding and the float64 epilogue) against sums written out here with
+-1 tensors; the elementwise input and epilogue kernels (csrc/elementwise.cpp) against torch's
operations written out here; and the cached CPU path taking them (bit-identical to the integer
reference) exactly where they apply."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.kernels import cached, cpu_ops


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if shutil.which("c++") is None or shutil.which("ninja") is None and not _ninja_module():
        pytest.skip("no C++ compiler or ninja here: the CPU binary kernel cannot be built")
    assert cpu_ops.available(), "the C++ kernel failed to build (see the warning above)"


def _ninja_module():
    import importlib.util

    return importlib.util.find_spec("ninja") is not None


def _expected(x, shift, q, stride, padding, dilation, scale, bias):
    """float32(float64(sum over valid taps of u * w) * scale + bias), u = +-1 from x - shift >= 0 (zero
    outside the input), w = 2q - 1, written with float64 convolutions of +-1 tensors."""
    xs = x - shift.view(1, -1, 1, 1) if shift is not None else x
    u = torch.where(xs >= 0, 1.0, -1.0).double()
    w = q.double() * 2 - 1
    acc = F.conv2d(u, w, None, stride, padding, dilation)
    y = acc * scale.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    return y.float()


GEOMETRIES = [  # c_in, c_out, k, stride, padding, dilation, h, w
    (16, 16, 3, 1, 1, 1, 9, 7), (70, 130, 3, 2, 1, 1, 11, 13), (64, 64, 1, 1, 0, 1, 5, 5),
    (3, 8, 5, 1, 2, 2, 12, 10), (128, 65, 3, 1, 0, 1, 6, 8), (200, 9, (1, 3), (2, 1), (0, 1), 1, 7, 9),
    # few input channels: horizontally adjacent taps share a word (2 to 21 taps per word)
    (32, 40, 3, 2, 1, 1, 9, 9), (21, 16, 3, 1, 0, 2, 10, 11), (16, 33, (3, 5), 1, (1, 2), 1, 8, 9),
    (1, 8, 7, 2, 3, 1, 13, 12), (20, 5, (2, 3), (1, 2), 2, (1, 2), 6, 7)]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("with_shift", [False, True])
def test_binary_conv_equals_the_written_out_sums(geom, with_shift):
    ci, co, k, stride, padding, dilation, h, w = geom
    g = torch.Generator().manual_seed(ci * co)
    pair = nn.modules.utils._pair
    k, stride, padding, dilation = pair(k), pair(stride), pair(padding), pair(dilation)
    x = torch.randn(2, ci, h, w, generator=g)
    shift = torch.randn(ci, generator=g) * 0.3 if with_shift else None
    if with_shift:
        x[:, :, 0, 0] = shift  # ties: x - shift == 0 is +1, as sign(0) = +1 in the training form
    else:
        x[:, :, 0, 0] = 0.0
    q = torch.randint(0, 2, (co, ci, *k), generator=g, dtype=torch.uint8)
    scale = torch.rand(co, generator=g, dtype=torch.float64) + 0.1
    bias = torch.randn(co, generator=g)
    xbits = cpu_ops.pack_signs(x, shift)
    wbits = cpu_ops.pack_weight_signs(q)
    y = cpu_ops.binary_conv2d(xbits, wbits, ci, stride, padding, dilation, scale, bias)
    assert torch.equal(y, _expected(x, shift, q, stride, padding, dilation, scale, bias))
    y0 = cpu_ops.binary_conv2d(xbits, wbits, ci, stride, padding, dilation, scale, None)
    assert torch.equal(y0, _expected(x, shift, q, stride, padding, dilation, scale, None))
    # float32 scales and no bias (a packed layer's): the vector kernel's float32 form
    s32 = scale.float().double()
    y1 = cpu_ops.binary_conv2d(xbits, wbits, ci, stride, padding, dilation, s32, None)
    assert torch.equal(y1, _expected(x, shift, q, stride, padding, dilation, s32, None))


def test_packed_sign_words_bit_by_bit():
    x = torch.tensor([[[[0.5, -1.0]], [[-0.0, 2.0]], [[-3.0, 0.0]]]])  # 1 x 3 x 1 x 2
    words = cpu_ops.pack_signs(x)
    assert words.shape == (1, 1, 2, 1)
    # pixel 0: channel 0 (+0.5) and channel 1 (-0.0 >= 0) set -> 0b011; pixel 1: channels 1, 2 -> 0b110
    assert words.flatten().tolist() == [0b011, 0b110]
    x = torch.full((1, 130, 1, 1), -1.0)
    x[0, [0, 63, 64, 129]] = 1.0
    words = cpu_ops.pack_signs(x).flatten().tolist()
    assert words == [1 - 2 ** 63, 1, 2]  # bit 63 of word 0 is the int64 sign bit
    q = torch.zeros(2, 65, 1, 1, dtype=torch.uint8)
    q[1, 64] = 1
    q[0, 3] = 1
    words = cpu_ops.pack_weight_signs(q)  # taps x words x C_out, padded to a multiple of 32 with zeros
    assert words.shape == (1, 1, 2, 32)
    assert words[0, 0, :, :2].tolist() == [[8, 0], [0, 1]] and not words[..., 2:].any()


def test_bad_inputs_are_refused():
    with pytest.raises(RuntimeError, match="not a 1-bit code"):
        cpu_ops.pack_weight_signs(torch.full((1, 1, 1, 1), 2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="shift has 2 values for 3 channels"):
        cpu_ops.pack_signs(torch.randn(1, 3, 2, 2), torch.zeros(2))
    xbits = cpu_ops.pack_signs(torch.randn(1, 70, 4, 4))
    wbits = cpu_ops.pack_weight_signs(torch.zeros(4, 70, 3, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="64 channels need 1 words, got 2"):
        cpu_ops.binary_conv2d(xbits, wbits, 64, (1, 1), (1, 1), (1, 1), torch.ones(4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="40 output channels for packed weights of 32"):
        cpu_ops.binary_conv2d(xbits, wbits, 70, (1, 1), (1, 1), (1, 1), torch.ones(40, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="3 biases for 4 output channels"):
        cpu_ops.binary_conv2d(xbits, wbits, 70, (1, 1), (1, 1), (1, 1), torch.ones(4, dtype=torch.float64),
                                 torch.zeros(3))


def _binary_net(spec, shift=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 70, 3, stride=2, padding=1), nn.Conv2d(70, 8, 3, padding=1, bias=False))
    zoo.quantize(net, zoo.QuantConfig(weight=spec, act=spec))
    net.train()
    for _ in range(3):
        net(torch.randn(4, 6, 11, 10))
    net = zoo.to_packed(net.eval())
    if shift:  # ReAct's RSign thresholds, away from their zero init
        for m in net.modules():
            if hasattr(m, "a_shift"):
                m.a_shift.copy_(torch.randn_like(m.a_shift) * 0.2)
    return net


def _count(monkeypatch):
    calls = []
    real = cpu_ops.binary_conv2d
    monkeypatch.setattr(cpu_ops, "binary_conv2d", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("spec,shift", [(zoo.XNOR(1), False), (zoo.IRNet(1), False), (zoo.ReAct(1), True)])
def test_binary_layers_take_the_kernel_and_equal_the_reference(spec, shift, monkeypatch):
    net = _binary_net(spec, shift)
    x = torch.randn(3, 6, 11, 10)
    zoo.set_backend(net, "reference")
    with torch.no_grad():
        y_ref = net(x)
    calls = _count(monkeypatch)
    for backend in ("cpu", "auto"):
        zoo.set_backend(net, backend)
        calls.clear()
        with torch.no_grad():
            y = net(x)
        assert len(calls) == 2, backend  # both convs
        assert torch.equal(y, y_ref), (backend, (y - y_ref).abs().max())


def test_layers_that_are_not_w1a1_or_not_float32_do_not_take_it(monkeypatch):
    calls = _count(monkeypatch)
    for cfg in (zoo.QuantConfig(weight=zoo.LSQ(2), act=zoo.XNOR(1)), zoo.QuantConfig(weight=zoo.XNOR(1), act=zoo.LSQ(4))):
        torch.manual_seed(0)
        net = zoo.quantize(nn.Sequential(nn.Conv2d(6, 8, 3, padding=1)), cfg)
        net.train()(torch.randn(4, 6, 5, 5))
        net = zoo.to_packed(net.eval())
        zoo.set_backend(net, "cpu")
        with torch.no_grad():
            net(torch.randn(2, 6, 5, 5))
    net = _binary_net(zoo.XNOR(1))
    zoo.set_backend(net, "cpu")
    x = torch.randn(2, 6, 11, 10)
    with torch.no_grad():
        y16 = net(x.half())
        zoo.set_backend(net, "reference")
        assert torch.equal(y16, net(x.half()))
    assert not calls


def test_the_kernel_can_be_turned_off_and_follows_weight_updates(monkeypatch):
    net = _binary_net(zoo.XNOR(1))
    x = torch.randn(2, 6, 11, 10)
    zoo.set_backend(net, "cpu")
    calls = _count(monkeypatch)
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    with torch.no_grad():
        y_off = net(x)
    assert not calls
    monkeypatch.setenv("ZOO_CPU_KERNELS", "1")
    with torch.no_grad():
        assert torch.equal(net(x), y_off) and calls
        conv = net[1]
        conv.qweight.bitwise_not_()  # every weight sign flips, in place
        y_flipped = net(x)
        zoo.set_backend(net, "reference")
        assert torch.equal(y_flipped, net(x))
    cached.clear(net)


def test_shipped_binary_classifiers_identical_through_the_kernel(monkeypatch):
    from zoo.cards import read_golden
    from zoo.registry import resolve_checkpoint

    names = [n for n in zoo.list_models("resnet20.*w1a1*", task="cls")]
    assert len(names) >= 3
    calls = _count(monkeypatch)
    fused = []  # their ResNet-20 blocks run fused (tests/test_binary_block.py)
    real = cpu_ops.binary_conv2d_table
    monkeypatch.setattr(cpu_ops, "binary_conv2d_table", lambda *a: fused.append(1) or real(*a))
    for name in names:
        x = read_golden(resolve_checkpoint(name))[0]
        model = zoo.load(name, backend="reference")
        with torch.no_grad():
            y_ref = model(x)
            zoo.set_backend(model, "auto")
            calls.clear()
            fused.clear()
            y = model(x)
        assert len(fused) == 18 and not calls, name
        assert torch.equal(y, y_ref), name


@pytest.mark.slow
def test_the_portable_build_without_avx512_gives_the_same_results(tmp_path):
    """The plain-loop popcount (what CPUs without AVX-512 VPOPCNTDQ run), built with -march=x86-64-v2
    into a fresh cache in another process, passes this file's kernel tests and the fused block's
    (tests/test_binary_block.py: its plain-loop epilogue too)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ZOO_CPU_KERNEL_MARCH": "x86-64-v2", "ZOO_CACHE": str(tmp_path)}
    block = str(Path(__file__).with_name("test_binary_block.py"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, block, "-k",
                        "written_out or bit_by_bit or refused or batchnorm or fused"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    so = next(tmp_path.rglob("zoo_cpu_kernels.so"))  # built fresh, into the given cache
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True).stdout
        assert "popcnt" in asm and "vpopcntq" not in asm  # the scalar popcount, not AVX-512's


@pytest.mark.slow
def test_a_compiler_without_openmp_gets_a_single_threaded_build(tmp_path):
    """If the -fopenmp build fails (a compiler without OpenMP), the kernels are built without it."""
    import os
    import subprocess
    import sys

    code = ("from zoo.kernels import cpu_ops\n"
            "cpu_ops.OPENMP = ['-fno-such-openmp-flag']\n"
            "assert cpu_ops.available()\n"
            "assert cpu_ops.OPENMP == ['-fno-such-openmp-flag']\n"  # cpp_extension must not have appended to it
            "print(cpu_ops.build_dir(cpu_ops.CFLAGS))\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ZOO_CACHE": str(tmp_path)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    built = [p.parent for p in tmp_path.rglob("zoo_cpu_kernels*.so")]  # a retry is versioned: _v1.so
    assert [str(p) for p in built] == [r.stdout.strip()]  # only the build without the flag exists


# ----------------------------------------------------------------------------- elementwise kernels
def test_affine_input_equals_torchs_operations():
    """(clamp(round((x - shift) / s + o), qmin, qmax) - z) * m in float32: ties round to even, both
    clamps, NaN kept, channels on dim 1 or last, with and without a shift."""
    g = torch.Generator().manual_seed(0)
    s, o, lo, hi, z, m = 0.0731, 3.0, 0.0, 15.0, 3.0, 1.0
    x = torch.randn(3, 5, 4, 6, generator=g) * 0.6
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, -0.5]) * s  # exact ties of x / s (before the offset)
    x[0, 1, 0, 0] = float("nan")
    shift = torch.randn(5, generator=g) * 0.1

    def written_out(x, shift, ch_last):
        if shift is not None:
            x = x - (shift if ch_last else shift.view(1, -1, 1, 1))
        v = torch.clamp(torch.round(x / torch.tensor(s) + torch.tensor(o)), torch.tensor(lo), torch.tensor(hi))
        return (v - z) * m

    for sh in (None, shift):
        got = cpu_ops.affine_input(x, sh, s, o, lo, hi, z, m, False)
        assert torch.allclose(got, written_out(x, sh, False), rtol=0, atol=0, equal_nan=True)  # exactly equal
        xl = x.permute(0, 2, 3, 1).contiguous()  # channels last: a linear layer's input
        assert torch.allclose(cpu_ops.affine_input(xl, sh, s, o, lo, hi, z, m, True), written_out(xl, sh, True),
                              rtol=0, atol=0, equal_nan=True)
    for c, rows in ((30, 2101), (3, 5000), (1500, 7)):  # channels-last runs of many rows (the last one short)
        xr = torch.randn(rows, c, generator=g) * 0.6
        sr = torch.randn(c, generator=g) * 0.1
        assert torch.equal(cpu_ops.affine_input(xr, sr, s, o, lo, hi, z, m, True), written_out(xr, sr, True)), c
        xc = torch.randn(2, c, 9, 9, generator=g) * 0.6  # NCHW -> channels-last codes: a full 64-pixel tile + 17
        got = cpu_ops.affine_input(xc, sr, s, o, lo, hi, z, m, False, False, True)
        assert torch.equal(got, written_out(xc, sr, False)) and got.is_contiguous(memory_format=torch.channels_last)
    half = cpu_ops.affine_input(x, None, s, o, lo, hi, 7.5, 2.0, False)  # muL2Q-style half-integer zero point
    assert torch.allclose(half, (written_out(x, None, False) + z - 7.5) * 2, rtol=0, atol=0, equal_nan=True)
    # x / s + o = 3.5, 4.5, 5.5, 2.5 round half to even to 4, 4, 6, 2 (half up would give 4, 5, 6, 3)
    assert torch.isnan(half[0, 1, 0, 0]) and half[0, 0, 0, :4].tolist() == [(v - 7.5) * 2 for v in (4, 4, 6, 2)]


def test_threshold_input_counts_as_bucketize():
    """N2UQ's codes: the number of thresholds below x - shift (torch.bucketize), NaN counting all of
    them, values equal to a threshold not counted; then (v - z) * m."""
    g = torch.Generator().manual_seed(2)
    th = torch.tensor([-0.4, 0.1, 0.7])
    x = torch.randn(2, 4, 3, 5, generator=g)
    x[0, 0, 0, :5] = torch.tensor([-0.4, 0.1, 0.7, float("nan"), -float("inf")])
    shift = torch.randn(4, generator=g) * 0.1
    for sh in (None, shift):
        xs = x - shift.view(1, -1, 1, 1) if sh is not None else x
        want = (torch.bucketize(xs.contiguous(), th).float() - 1.0) * 2.0
        assert torch.equal(cpu_ops.threshold_input(x, sh, th, 1.0, 2.0, False), want)
    assert cpu_ops.threshold_input(x, None, th, 0.0, 1.0, False)[0, 0, 0, :5].tolist() == [0, 1, 2, 3, 0]


def test_epilogue_equals_torchs_float64_operations():
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(7, generator=g, dtype=torch.float64) * 1e-3
    bias = torch.randn(7, generator=g)
    for dtype in (torch.float32, torch.float64):
        acc = torch.randint(-5000, 5000, (2, 7, 5, 3), generator=g).to(dtype)
        want = (acc.double() * scale.view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)).float()
        assert torch.equal(cpu_ops.epilogue(acc, scale, bias, False), want)
        assert torch.equal(cpu_ops.epilogue(acc, scale, None, False), (acc.double() * scale.view(1, -1, 1, 1)).float())
        rows = acc.permute(0, 2, 3, 1).contiguous()
        assert torch.equal(cpu_ops.epilogue(rows, scale, bias, True), (rows.double() * scale + bias.double()).float())
    with pytest.raises(RuntimeError, match="6 scales for 7 channels"):
        cpu_ops.epilogue(acc, scale[:6], None, False)


def test_uint8_codes_and_channels_last_in_place():
    """u8=True writes (v - z) * m as uint8 (the int8 sums' codes; NaN gives 0); a 4-d channels-last input
    is read in place and gives a channels-last result with the values of the contiguous one (input
    kernels and epilogue, with and without a per-channel shift)."""
    g = torch.Generator().manual_seed(3)
    s, o, lo, hi = 0.11, 2.0, -2.0, 5.0
    x = torch.randn(2, 6, 5, 7, generator=g)
    x[0, 0, 0, 0] = float("nan")
    shift = torch.randn(6, generator=g) * 0.2
    th = torch.tensor([-0.3, 0.0, 0.4])
    for sh in (None, shift):
        xs = x - shift.view(1, -1, 1, 1) if sh is not None else x
        v = torch.clamp(torch.round(xs / torch.tensor(s) + torch.tensor(o)), torch.tensor(lo), torch.tensor(hi))
        want = torch.nan_to_num((v - lo) * 2, nan=0.0).to(torch.uint8)  # m = 2: codes 0, 2, ..., 14
        got = cpu_ops.affine_input(x, sh, s, o, lo, hi, lo, 2.0, False, True)
        assert got.dtype == torch.uint8 and torch.equal(got, want)
        xc = x.contiguous(memory_format=torch.channels_last)
        for u8 in (False, True):
            flat = cpu_ops.affine_input(x, sh, s, o, lo, hi, lo, 2.0, False, u8)
            cl = cpu_ops.affine_input(xc, sh, s, o, lo, hi, lo, 2.0, False, u8)
            assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
            assert torch.allclose(cl.float(), flat.float(), rtol=0, atol=0, equal_nan=True)
            t_flat = cpu_ops.threshold_input(x, sh, th, 0.0, 1.0, False, u8)
            t_cl = cpu_ops.threshold_input(xc, sh, th, 0.0, 1.0, False, u8)
            assert t_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(t_cl, t_flat)
        counts = torch.bucketize(xs.contiguous(), th)
        assert torch.equal(cpu_ops.threshold_input(x, sh, th, 0.0, 1.0, False, True), counts.to(torch.uint8))
    scale = torch.rand(6, generator=g, dtype=torch.float64)
    acc = torch.randint(-900, 900, (2, 6, 5, 7), generator=g).float()
    acc_cl = acc.contiguous(memory_format=torch.channels_last)
    y = cpu_ops.epilogue(acc_cl, scale, shift, False)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, cpu_ops.epilogue(acc, scale, shift, False))
    for hw in ((5, 7), (13, 11)):  # planes of 35 and 143 pixels: one partial tile, and full ones plus a partial
        a = torch.randint(-900, 900, (2, 6) + hw, generator=g).float()
        planes = cpu_ops.epilogue(a.contiguous(memory_format=torch.channels_last), scale, shift, False, True)
        assert planes.is_contiguous() and torch.equal(planes, cpu_ops.epilogue(a, scale, shift, False))


def test_epilogue_sum_equals_its_float64_formula():
    """((a[c] + d[c] s) * scale[c] + bias[c]) for C + 1 channels-last channels (s the last one), 4-d
    (channels-last, also 1 x 1 pixels) and 2-d; the sums are integers, so the bracket is exact."""
    g = torch.Generator().manual_seed(4)
    c = 5
    scale = torch.rand(c, generator=g, dtype=torch.float64) * 1e-2
    bias = torch.randn(c, generator=g)
    d = torch.randint(-128, 128, (c,), generator=g).double()
    for shape in ((2, c + 1, 4, 3), (3, c + 1, 1, 1), (7, c + 1)):
        acc = torch.randint(-20000, 20000, shape, generator=g).float()
        if acc.dim() == 4:
            acc = acc.contiguous(memory_format=torch.channels_last)
        view = (1, -1) + (1,) * (acc.dim() - 2)
        a, s_ = acc[:, :c].double(), acc[:, c:].double()
        for b in (bias, None):
            want = (a + d.view(view) * s_) * scale.view(view)
            want = (want + b.double().view(view) if b is not None else want).float()
            got = cpu_ops.epilogue_sum(acc, d, scale, b)
            assert got.shape == want.shape and torch.equal(got, want), shape
            if acc.dim() == 4:
                assert got.is_contiguous(memory_format=torch.channels_last)
                planes = cpu_ops.epilogue_sum(acc, d, scale, b, True)  # written as N x C x H x W
                assert planes.is_contiguous() and torch.equal(planes, want), shape
    with pytest.raises(RuntimeError, match="4 scales and 5 shifts for 5 channels"):
        cpu_ops.epilogue_sum(acc, d, scale[:4], None)


def test_expanded_epilogue_equals_the_torch_expanded_form():
    """muL2Q's expanded epilogue in one pass: equal to ``cached._expanded``'s float64 torch operations (on
    the same sums, with and without border terms and bias), contiguous or channels-last."""
    from types import SimpleNamespace

    from zoo.kernels import cached

    g = torch.Generator().manual_seed(5)
    c, h, w = 6, 4, 5
    acc = torch.randint(-3000, 3000, (3, c + 1, h, w), generator=g).float()
    c_q = torch.randint(0, 40, (1, c, h, w), generator=g).float()
    c_1 = torch.randint(1, 10, (1, 1, h, w), generator=g).float()
    layer = SimpleNamespace(w_zero=torch.rand(c, generator=g) * 3, w_scale=torch.rand(c, generator=g) * 0.1,
                            bias=torch.randn(c, generator=g))
    s_a = 0.0371
    for z_a in (-1.2935960292816162, 0.0):
        for bias in (layer.bias, None):
            layer.bias = bias
            cq, c1 = (c_q, c_1) if z_a else (None, None)
            want = cached._expanded(layer, acc[:, :c], acc[:, c:], cq, c1, s_a, z_a, 1, torch.float32)
            for a in (acc, acc.contiguous(memory_format=torch.channels_last)):
                for nchw in (True, False):
                    got = cpu_ops.expanded_epilogue(a, cq, c1, layer.w_zero, z_a, s_a * layer.w_scale.double(),
                                                    bias, nchw)
                    assert torch.equal(got, want), (z_a, bias is None, nchw)
                    assert got.is_contiguous() == nchw
        layer.bias = torch.randn(c, generator=g)


def test_affine_layers_take_the_elementwise_kernels(monkeypatch):
    """An LSQ W4A4 conv + linear through the cached path: the C++ input and epilogue kernels run (and
    nothing of it with ZOO_CPU_KERNELS=0), outputs identical to the reference either way."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    zoo.quantize(net, zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)))
    net.train()(torch.randn(4, 3, 5, 5))
    net = zoo.to_packed(net.eval())
    x = torch.randn(2, 3, 5, 5)
    zoo.set_backend(net, "reference")
    with torch.no_grad():
        y_ref = net(x)
    calls = []
    for fn in ("affine_input", "epilogue"):
        real = getattr(cpu_ops, fn)
        monkeypatch.setattr(cpu_ops, fn, lambda *a, _r=real, _n=fn: calls.append(_n) or _r(*a))
    zoo.set_backend(net, "cpu")
    with torch.no_grad():
        assert torch.equal(net(x), y_ref)
        assert calls == ["affine_input", "epilogue"] * 2
        calls.clear()
        monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
        assert torch.equal(net(x), y_ref) and not calls


def test_rprelu_at_inference_takes_one_pass_with_the_formulas_values(monkeypatch):
    """ReActNet's RPReLU at CPU inference (the C++ ``rprelu`` pass): equal, value and sign bit, to
    where(x - gamma >= 0, x - gamma, slope * (x - gamma)) + zeta written out here, per channel, for
    NCHW, channels-last, 3-d and 2-d inputs, with negative and zero slopes, a zero gamma/zeta and
    -0.0, +-0.0 / NaN / +-inf inputs; the op really runs, not with ZOO_CPU_KERNELS=0 nor while
    gradients are needed (training: the torch form and its gradients)."""
    from zoo.quantizers import RPReLU

    g = torch.Generator().manual_seed(0)
    m = RPReLU(16)
    with torch.no_grad():
        for p in (m.gamma, m.zeta, m.slope):
            p.copy_(torch.randn(16, generator=g))
        m.zeta[0], m.gamma[1], m.zeta[1], m.slope[1], m.slope[2], m.slope[3] = 0.0, 0.0, -0.0, -0.25, 0.0, -0.5
    x = torch.randn(4, 16, 9, 7, generator=g)
    x[0, 0, 0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    x[:, 1, 0, :2] = torch.tensor([0.0, -0.0])
    x[:, 3, 1, :3] = m.gamma[3].item()  # y == 0 exactly

    def want(x):
        y = x - m.gamma.detach().view(1, -1, *[1] * (x.dim() - 2))
        s, z = (t.detach().view(1, -1, *[1] * (x.dim() - 2)) for t in (m.slope, m.zeta))
        return torch.where(y >= 0, y, s * y) + z

    calls = []
    real = cpu_ops.rprelu
    monkeypatch.setattr(cpu_ops, "rprelu", lambda *a: (lambda y: calls.append(y is not None) or y)(real(*a)))
    inputs = (x, x.contiguous(memory_format=torch.channels_last), x[:, :, 0], x[:, :, 0, 0])
    with torch.no_grad():
        for xx in inputs:
            calls.clear()
            got, ref = m(xx), want(xx)
            assert calls == [True], xx.shape
            assert torch.equal(got.nan_to_num(), ref.nan_to_num()), xx.shape
            assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.signbit(), ref.signbit()), xx.shape
            assert got.stride() == ref.stride()  # the layout torch gives (channels-last kept)
        monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
        calls.clear()
        assert torch.equal(m(x).nan_to_num(), want(x).nan_to_num()) and calls == [False]
    monkeypatch.delenv("ZOO_CPU_KERNELS")
    calls.clear()
    xg = torch.randn(2, 16, 3, 3, generator=g, requires_grad=True)
    m(xg).sum().backward()
    assert calls == [False]  # training: the torch form, with its gradients
    y = xg.detach() - m.gamma.detach().view(1, -1, 1, 1)
    assert torch.equal(m.zeta.grad, torch.full((16,), 18.0))
    assert torch.equal(m.slope.grad, torch.where(y >= 0, 0.0, y).sum((0, 2, 3)))


def test_affine_act_quantizer_at_inference_takes_one_pass_with_the_formulas_values(monkeypatch):
    """An affine activation quantizer's forward at CPU inference (MinMax, as a ViT's softmax output
    quantizer; the C++ ``affine_input`` pass): equal, value and sign bit, to (clamp(round(x / s + o),
    qmin, qmax) - z) * s written out here, with NaN / +-inf / +-0 / huge inputs, for contiguous 2-d and
    4-d tensors; the op runs there, not for a channels-last input (the torch form, the same values and
    its layout), not with ZOO_CPU_KERNELS=0, not while gradients are needed."""
    from zoo.quantizers.uniform import MinMaxAct

    q = MinMaxAct(8).eval()
    q.lo.fill_(-0.3), q.hi.fill_(1.7), q.initialized.fill_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 10, 10, generator=g) * 2
    x.view(-1)[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30])
    p = q.params(None)
    s, o, z = p["scale"], p["offset"], p["zero"]
    assert z != 0 and 0 < s < 1  # (a real zero point and scale, so a missing term shows)

    def want(x):
        return (torch.clamp(torch.round(x / s + o), 0, 255) - z) * s

    calls = []
    real = cpu_ops.affine_input
    monkeypatch.setattr(cpu_ops, "affine_input", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        for xx, fast in ((x, True), (x.flatten(1), True), (x.contiguous(memory_format=torch.channels_last), False)):
            calls.clear()
            got, ref = q(xx), want(xx)
            assert calls == ([xx.shape] if fast else []), xx.shape
            assert torch.equal(got.nan_to_num(), ref.nan_to_num()) and torch.equal(got.isnan(), ref.isnan())
            assert torch.equal(got.signbit(), ref.signbit()) and got.stride() == ref.stride(), xx.shape
        monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
        calls.clear()
        assert torch.equal(q(x).nan_to_num(), want(x).nan_to_num()) and not calls
    monkeypatch.delenv("ZOO_CPU_KERNELS")
    xg = torch.randn(4, 5, generator=g, requires_grad=True)
    q(xg).sum().backward()  # training-time gradients: the torch form, its clipped straight-through gradient
    assert not calls
    assert torch.equal(xg.grad, ((xg >= -z * s) & (xg <= (255 - z) * s)).float())
