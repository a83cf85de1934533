"""Triton kernels against the pure-torch reference, bit for bit.

Without a GPU, conftest sets TRITON_INTERPRET=1 so every kernel runs in Triton's interpreter; shapes
stay small and tiles large. The integer paths (activation codes, sum u*q, sum u) must be identical;
the float outputs are compared with torch.equal too, because the kernels' epilogue is the
reference's float64 formula in the same order.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import zoo
from zoo.kernels import dispatch, reference
from zoo.kernels.packing import pack
from zoo.quantizers.packed import PackedConv2d, PackedLinear

tb = pytest.importorskip("zoo.kernels.triton_binary")
tlb = pytest.importorskip("zoo.kernels.triton_lowbit")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BIN_BLOCKS = {"popcount": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=2, SPLIT_K=1),
              "dot": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=2, SPLIT_K=1)}
# the kernels take s_a as a float32 scalar (the layers' scales are float32 tensors)
S_A = float(torch.tensor(0.1))
S_A2 = float(torch.tensor(0.05))


def _act(scale, zero, qmin, qmax, offset=None):
    t = lambda v: torch.tensor([float(v)], device=DEV)  # noqa: E731
    return dict(scale=t(scale), offset=t(zero if offset is None else offset), zero=t(zero),
                qmin=t(qmin), qmax=t(qmax))


# ------------------------------------------------------------------------------ activation codes
@pytest.mark.parametrize("qmin,qmax,zero", [(0, 255, 0), (0, 255, 131), (0, 15, 0), (-8, 7, 0),
                                            (-128, 127, 0), (0, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_act_matches_reference_including_ties(qmin, qmax, zero, dtype):
    g = torch.Generator().manual_seed(qmax + zero)
    scale = 0.0625  # power of two: x / scale + k.5 are exact ties
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale
    x = torch.cat([torch.randn(2000, generator=g) * 4, ties]).to(dtype).reshape(4, -1, 5, 5)
    x = x.to(DEV)
    p = _act(scale, zero, qmin, qmax)
    c = tlb.act_centre(qmin, qmax)
    a = tlb.quantize_act(x, "affine", p, c)
    v = reference.quantize_act(x, "affine", p)
    assert a.dtype == torch.int8
    assert torch.equal(a.float() + c, v.float())


def test_quantize_act_sign_with_shift():
    x = torch.randn(2, 7, 5, 3, device=DEV)
    x[0, 0, 0, 0] = 0.0
    shift = torch.randn(7, device=DEV)
    x[1, 3, 2, 1] = shift[3]  # x - shift == 0 -> +1
    a = tlb.quantize_act(x, "sign", {"shift": shift})
    assert torch.equal(a.float(), reference.quantize_act(x, "sign", {"shift": shift}))


def test_act_centre_choices():
    assert tlb.act_centre(0, 15) == 0 and tlb.act_centre(-128, 127) == 0
    assert tlb.act_centre(0, 255) == 128 and tlb.act_centre(-200, 0) is None


# ------------------------------------------------------------------------------ int8 x low-bit
CONV_CASES = [
    # bits, (N, C, H, W), (C_out, kh, kw), stride, padding, dilation, (qmin, qmax, z_a)
    (4, (2, 5, 9, 7), (6, 3, 3), (1, 1), (1, 1), (1, 1), (0, 15, 0)),        # K=45 < block
    (8, (1, 8, 8, 8), (70, 3, 3), (2, 2), (1, 1), (1, 1), (0, 255, 3)),      # u8 acts, N > block
    (2, (1, 16, 6, 5), (5, 1, 1), (1, 1), (0, 0), (1, 1), (-2, 1, -1)),     # 1x1, signed codes
    (3, (2, 9, 7, 7), (4, 3, 3), (2, 1), (2, 1), (2, 1), (0, 7, 2)),        # 3-bit in 4, dilation
    (1, (1, 11, 5, 9), (3, 5, 3), (1, 2), (2, 0), (1, 1), (-128, 127, 5)),   # 1-bit weights, K=165
    (8, (1, 15, 4, 4), (9, 2, 2), (2, 2), (0, 0), (1, 1), (0, 255, 255)),    # pad code at the edge
]


def _conv_case(bits, xs, ws, za, qmin, qmax, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*xs, generator=g) * 0.5).to(DEV)
    p = _act(0.1, za, qmin, qmax)
    v = reference.quantize_act(x, "affine", p)
    q = torch.randint(0, 2 ** bits, (ws[0], xs[1], ws[1], ws[2]), generator=g, dtype=torch.uint8).to(DEV)
    w_scale = (torch.rand(ws[0], generator=g) + 0.05).to(DEV)
    w_zero = torch.randint(0, 2 ** bits, (ws[0],), generator=g).float().to(DEV)
    w_zero[0] = (2 ** bits - 1) / 2  # DoReFa-style non-integer zero point
    bias = torch.randn(ws[0], generator=g).to(DEV)
    return x, p, v, q, w_scale, w_zero, bias


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"w{c[0]}-{c[1]}-{c[2]}-s{c[3]}")
def test_lowbit_conv2d_bit_exact(case, split):
    """split=3: the K loop split over 3 programs per tile (BLOCK_K=32, the smallest int8 MMA depth;
    with K=45 the third program has no K left and must still take part), partial sums combined in the
    workspace, which must be left zeroed for the next launch."""
    bits, xs, ws, st, pd, dl, (qmin, qmax, za) = case
    blocks = None if split == 1 else dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split)
    x, p, v, q, w_scale, w_zero, bias = _conv_case(bits, xs, ws, za, qmin, qmax, seed=bits)
    c = tlb.act_centre(qmin, qmax)
    a = tlb.quantize_act(x, "affine", p, c)
    qw = pack(q.reshape(q.shape[0], -1), bits)
    bsum = tlb.bias_free_colsum(qw, bits, q[0].numel())
    sum_uq, sum_u = tlb.conv2d(a, za - c, qw, bits, q.shape, bsum, w_scale, w_zero, S_A, bias, st, pd,
                               dl, raw=True, blocks=blocks)
    ref_uq, ref_u = reference.int_conv2d(v - za, q.float(), st, pd, dl, 1)
    assert torch.equal(sum_uq.double(), ref_uq)
    assert torch.equal(sum_u.double(), ref_u.permute(0, 2, 3, 1).reshape(-1))
    y = tlb.conv2d(a, za - c, qw, bits, q.shape, bsum, w_scale, w_zero, S_A, bias, st, pd, dl, blocks=blocks)
    y_ref = reference.conv2d(v, S_A, za, q.float(), w_scale, w_zero, bias, st, pd, dl, 1).float()
    assert y.shape == y_ref.shape and torch.equal(y, y_ref)
    y_relu = tlb.conv2d(a, za - c, qw, bits, q.shape, bsum, w_scale, w_zero, S_A, None, st, pd, dl,
                        relu=True, blocks=blocks)
    y_ref_nb = reference.conv2d(v, S_A, za, q.float(), w_scale, w_zero, None, st, pd, dl, 1).float()
    assert torch.equal(y_relu, y_ref_nb.clamp(min=0))
    if split > 1:
        part, upart, count = tlb.split_workspace(a.device, 1, 1)
        assert not part.any() and not upart.any() and not count.any()


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("bits,shape,za", [(4, (2, 12, 6, 5), 0), (8, (1, 20, 5, 5), 0),
                                           (2, (1, 9, 7, 6), 0), (4, (2, 12, 6, 5), 3)])
def test_lowbit_conv2d_centred_weights_bit_exact(bits, shape, za, split, monkeypatch):
    """Integer z_w with every q - z_w in int8: the kernel multiplies by q - z_w directly (no activation
    row sums) when the activation pad code is 0; with za=3 (pad code 3) it must take the general path."""
    g = torch.Generator().manual_seed(bits + za)
    x = (torch.randn(*shape, generator=g) * 0.5).to(DEV)
    p = _act(S_A, za, -8, 7) if za == 0 else _act(S_A, za, 0, 15)
    v = reference.quantize_act(x, "affine", p)
    q = torch.randint(0, 2 ** bits, (7, shape[1], 3, 3), generator=g, dtype=torch.uint8).to(DEV)
    w_scale = (torch.rand(7, generator=g) + 0.05).to(DEV)
    w_zero = torch.full((7,), 2.0 ** (bits - 1), device=DEV)
    if bits < 8:
        w_zero[1] = 0.0  # unsymmetric but q - z_w still in int8 range
    qw = pack(q.reshape(7, -1), bits)
    k = q[0].numel()
    wzi = tlb.centred_zero(qw, bits, k, w_zero)
    assert wzi is not None and torch.equal(wzi.float(), w_zero)
    c = tlb.act_centre(float(p["qmin"]), float(p["qmax"]))
    a = tlb.quantize_act(x, "affine", p, c)
    blocks = None if split == 1 else dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split)
    bias = torch.randn(7, generator=g).to(DEV)
    taken = []
    real_launch = tlb.launch
    monkeypatch.setattr(tlb, "launch", lambda *a: taken.append(a[-1]["CENTRED"]) or real_launch(*a))
    y = tlb.conv2d(a, za - c, qw, bits, q.shape, tlb.bias_free_colsum(qw, bits, k), w_scale, w_zero, S_A,
                   bias, padding=(1, 1), blocks=blocks, wzi=wzi)
    y_ref = reference.conv2d(v, S_A, za, q.float(), w_scale, w_zero, bias, 1, 1, 1, 1).float()
    assert torch.equal(y, y_ref)
    assert taken == [za == 0]  # the centred variant exactly when the pad code is 0


def test_centred_zero_rules():
    q = torch.tensor([[0, 255], [3, 4]], dtype=torch.uint8)
    qw = pack(q, 8)
    assert tlb.centred_zero(qw, 8, 2, torch.tensor([128.0, 0.0])).tolist() == [128, 0]
    assert tlb.centred_zero(qw, 8, 2, torch.tensor([100.0, 0.0])) is None  # 255 - 100 > 127
    assert tlb.centred_zero(qw, 8, 2, torch.tensor([128.0, 0.5])) is None  # non-integer z_w


def test_half_output_rounds_like_torch():
    """float64 -> float16 the way torch casts it (through float32, two roundings): a direct cast
    differs on ~1 output in 10^4, so 65,536 outputs would all but surely catch it (P(miss) ~ e^-8)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 64, 64, generator=g).to(DEV)
    p = _act(S_A, 0, -128, 127)
    v = reference.quantize_act(x, "affine", p)
    q = torch.randint(0, 256, (16, 16, 1, 1), generator=g, dtype=torch.uint8).to(DEV)
    w_scale = (torch.rand(16, generator=g) * 0.01 + 0.001).to(DEV)
    w_zero = torch.full((16,), 128.0, device=DEV)
    bias = torch.randn(16, generator=g).to(DEV)
    qw = pack(q.reshape(16, -1), 8)
    a = tlb.quantize_act(x, "affine", p, 0)
    y = tlb.conv2d(a, 0, qw, 8, q.shape, tlb.bias_free_colsum(qw, 8, 16), w_scale, w_zero, S_A, bias,
                   out_dtype=torch.float16)
    y64 = reference.conv2d(v, S_A, 0.0, q.float(), w_scale, w_zero, bias)
    assert torch.equal(y, y64.half())
    direct = torch.from_numpy(y64.cpu().numpy().astype("float16")).to(DEV)  # one rounding
    assert not torch.equal(direct, y64.half())  # the case this test is about does occur here


@pytest.mark.parametrize("bits,k,lead", [(8, 200, (3,)), (4, 70, (2, 3)), (2, 64, (1,))])
def test_lowbit_linear_bit_exact(bits, k, lead):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(*lead, k, generator=g).to(DEV)
    p = _act(S_A2, 0, -8, 7)
    v = reference.quantize_act(x, "affine", p)
    q = torch.randint(0, 2 ** bits, (33, k), generator=g, dtype=torch.uint8).to(DEV)
    w_scale, w_zero = (torch.rand(33, generator=g) + 0.1).to(DEV), torch.full((33,), 2.0 ** (bits - 1), device=DEV)
    qw = pack(q, bits)
    a = tlb.quantize_act(x.reshape(-1, k), "affine", p, 0)
    y = tlb.linear(a, 0, qw, bits, q.shape, tlb.bias_free_colsum(qw, bits, k), w_scale, w_zero, S_A2,
                   None)
    y_ref = reference.linear(v.reshape(-1, k), S_A2, 0.0, q.float(), w_scale, w_zero, None).float()
    assert torch.equal(y, y_ref)


# ------------------------------------------------------------------------------ binary
BIN_CASES = [
    ((2, 5, 9, 7), (6, 3, 3), (1, 1), (1, 1), (1, 1)),    # C < 32: one partial word
    ((1, 40, 8, 8), (70, 3, 3), (2, 2), (1, 1), (1, 1)),  # 2 words, stride 2, batch 1
    ((1, 64, 7, 7), (5, 1, 1), (1, 1), (0, 0), (1, 1)),   # exact words, 1x1
    ((2, 33, 7, 5), (4, 3, 3), (2, 1), (2, 1), (2, 1)),   # 33 channels, dilation, odd sizes
]


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("impl", tb.IMPLS)
@pytest.mark.parametrize("case", BIN_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}")
def test_binary_conv2d_bit_exact(case, impl, split):
    xs, ws, st, pd, dl = case
    blocks = dict(BIN_BLOCKS[impl], BLOCK_K=1, SPLIT_K=2) if split == 2 else BIN_BLOCKS[impl]
    g = torch.Generator().manual_seed(xs[1])
    x = torch.randn(*xs, generator=g).to(DEV)
    shift = (torch.randn(xs[1], generator=g) * 0.3).to(DEV)
    v = reference.quantize_act(x, "sign", {"shift": shift})
    q = torch.randint(0, 2, (ws[0], xs[1], ws[1], ws[2]), generator=g, dtype=torch.uint8).to(DEV)
    wbits = tb.repack_weight(pack(q.reshape(ws[0], -1), 1), q.shape)
    w_scale = (torch.rand(ws[0], generator=g) + 0.1).to(DEV)
    w_zero = torch.full((ws[0],), 0.5, device=DEV)
    w_zero[-1] = 0.25  # the general formula, not just the symmetric +-alpha case
    bias = torch.randn(ws[0], generator=g).to(DEV)
    a = tb.pack_signs(x, shift)
    assert a.shape == (xs[0], xs[2], xs[3], -(-xs[1] // 32)) and a.dtype == torch.int32
    sum_uq, sum_u = tb.conv2d(a, xs[1], wbits, q.shape, w_scale, w_zero, 1.0, bias, st, pd, dl,
                              impl=impl, raw=True, blocks=blocks)
    ref_uq, ref_u = reference.int_conv2d(v, q.float(), st, pd, dl, 1)
    assert torch.equal(sum_uq.double(), ref_uq)
    assert torch.equal(sum_u.double(), ref_u.permute(0, 2, 3, 1).reshape(-1))
    y = tb.conv2d(a, xs[1], wbits, q.shape, w_scale, w_zero, 1.0, bias, st, pd, dl, impl=impl, blocks=blocks)
    y_ref = reference.conv2d(v, 1.0, 0.0, q.float(), w_scale, w_zero, bias, st, pd, dl, 1).float()
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("impl", tb.IMPLS)
def test_binary_linear_bit_exact(impl):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 70, generator=g).to(DEV)
    v = reference.quantize_act(x, "sign", {})
    q = torch.randint(0, 2, (20, 70), generator=g, dtype=torch.uint8).to(DEV)
    wbits = tb.repack_weight(pack(q, 1), (20, 70, 1, 1))
    w_scale, w_zero = torch.rand(20, device=DEV) + 0.1, torch.full((20,), 0.5, device=DEV)
    y = tb.linear(tb.pack_signs(x), 70, wbits, q.shape, w_scale, w_zero, 1.0, None, impl=impl)
    assert torch.equal(y, reference.linear(v, 1.0, 0.0, q.float(), w_scale, w_zero, None).float())


def test_pack_signs_bit_layout():
    x = -torch.ones(1, 40, 1, 1, device=DEV)
    x[0, [0, 31, 32, 39]] = 1.0
    words = tb.pack_signs(x)[0, 0, 0].cpu()
    assert words.tolist() == [1 | -(2 ** 31), 1 | (1 << 7)]


def test_binary_kernel_choice_is_checked():
    with pytest.raises(ValueError, match="unknown binary kernel 'xor'; valid"):
        tb.conv2d(torch.zeros(1, 1, 1, 1, dtype=torch.int32), 3, torch.zeros(1, 1, dtype=torch.int32),
                  (1, 3, 1, 1), torch.ones(1), torch.zeros(1), 1.0, None, impl="xor")


# ------------------------------------------------------------------------------ layers + dispatch
def _packed_conv(cfg, **conv_kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 12, 3, **conv_kw), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1))
    zoo.quantize(net, cfg)
    net.train()
    for _ in range(3):
        net(torch.randn(4, 6, 11, 10))
    return zoo.to_packed(net.eval()).to(DEV)


QCFGS = {"lsq4": zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)),
         "minmax8": zoo.QuantConfig(weight=zoo.MinMax(8), act=zoo.MinMax(8)),
         "dorefa2": zoo.QuantConfig(weight=zoo.DoReFa(2), act=zoo.DoReFa(2)),
         "irnet1": zoo.QuantConfig(weight=zoo.IRNet(1), act=zoo.IRNet(1)),
         "react1": zoo.QuantConfig(weight=zoo.ReAct(1), act=zoo.ReAct(1)),
         "w2a1": zoo.QuantConfig(weight=zoo.LSQ(2), act=zoo.XNOR(1))}


@pytest.mark.parametrize("name", list(QCFGS))
def test_packed_layers_triton_equals_reference(name):
    net = _packed_conv(QCFGS[name], stride=2, padding=1)
    x = torch.randn(2, 6, 11, 10, device=DEV)
    zoo.set_backend(net, "reference")
    y_ref = net(x)
    zoo.set_backend(net, "triton")
    assert torch.equal(net(x), y_ref)


@pytest.mark.parametrize("name", ["lsq4", "irnet1"])
def test_packed_layers_half_precision_input(name):
    net = _packed_conv(QCFGS[name], padding=1)
    x = torch.randn(2, 6, 9, 8, device=DEV).half()
    zoo.set_backend(net, "reference")
    y_ref = net(x)
    zoo.set_backend(net, "triton")
    y = net(x)
    assert y.dtype == torch.float16 and torch.equal(y, y_ref)


def test_unsupported_layers_fall_back_without_error(monkeypatch):
    calls = []
    real = reference.conv2d
    monkeypatch.setattr(reference, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4))
    grouped = _packed_conv(cfg, groups=2)  # first conv grouped -> reference; second -> Triton
    x = torch.randn(1, 6, 9, 9, device=DEV)
    zoo.set_backend(grouped, "reference")
    y_ref = grouped(x)
    calls.clear()
    zoo.set_backend(grouped, "triton")
    assert torch.equal(grouped(x), y_ref) and len(calls) == 1
    # a non-integer activation zero point (muL2Q) has no int8 padding code -> reference
    ul2q = _packed_conv(zoo.QuantConfig(weight=zoo.UL2Q(2), act=zoo.UL2Q(2)))
    zoo.set_backend(ul2q, "reference")
    y_ref = ul2q(x)
    calls.clear()
    zoo.set_backend(ul2q, "triton")
    assert torch.allclose(ul2q(x), y_ref) and len(calls) == 2


def test_linear_layer_dispatch_with_leading_dims():
    torch.manual_seed(1)
    net = zoo.quantize(nn.Sequential(nn.Linear(40, 9)), zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(8)))
    net.train()
    net(torch.randn(16, 40))
    lin = zoo.to_packed(net.eval())[0].to(DEV)
    assert isinstance(lin, PackedLinear)
    x = torch.randn(2, 3, 40, device=DEV)
    lin.backend = "reference"
    y_ref = lin(x)
    lin.backend = "triton"
    assert torch.equal(lin(x), y_ref)


def test_kernel_cache_follows_weight_updates():
    net = _packed_conv(QCFGS["irnet1"], padding=1)
    conv = net[0]
    assert isinstance(conv, PackedConv2d)
    zoo.set_backend(net, "triton")
    x = torch.randn(1, 6, 7, 7, device=DEV)
    net(x)
    conv.qweight.copy_(conv.qweight ^ 0xFF)  # flip every sign in place (same storage)
    y = net(x)
    zoo.set_backend(net, "reference")
    assert torch.equal(y, net(x))
    # cached host-side activation parameters follow in-place updates too
    net = _packed_conv(QCFGS["lsq4"], padding=1)
    zoo.set_backend(net, "triton")
    net(x)
    net[0].a_scale.mul_(1.5)
    y = net(x)
    zoo.set_backend(net, "reference")
    assert torch.equal(y, net(x))


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    assert dispatch.triton_ops("reference", cpu) is None
    assert dispatch.triton_ops("auto", cpu) is None  # auto: Triton only for CUDA tensors
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid"):
        dispatch.triton_ops("gpu", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.triton_ops("triton", cpu)
    with pytest.raises(ValueError, match="unknown binary kernel"):
        zoo.set_backend(nn.Sequential(), "triton", binary_kernel="xnor")


# ------------------------------------------------------------------------------ GPU code path
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU itself runs the kernels")
def test_kernels_compile_for_hopper():
    """Triton's whole GPU pipeline (to cubin, bundled ptxas) for every variant, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "zoo.kernels.aot", "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 11, out.stdout  # header + 10 variants
    assert all("expected" not in ln for ln in lines)


# ------------------------------------------------------------------------------ auto policy
def _policy_table(monkeypatch, rows):
    from zoo.kernels import auto_policy

    monkeypatch.setattr(auto_policy, "table", lambda: {"device": "test", "rows": rows})
    auto_policy.prefer_triton.cache_clear()
    monkeypatch.setattr(auto_policy, "prefer_triton",
                        auto_policy.prefer_triton.__wrapped__)  # no caching across tables
    return auto_policy


def _row(kind, kernel, m, n, k, triton, ref, fp16):
    return dict(kind=kind, kernel=kernel, shape="", m=m, n=n, k=k, triton_us=triton, reference_us=ref,
                fp16_us=fp16)


def test_auto_policy_rule(monkeypatch):
    ap = _policy_table(monkeypatch, [
        _row("conv", "int8", 49, 512, 4608, 100.0, 50.0, 60.0),    # slow (0.6x), reference faster
        _row("conv", "int8", 3136, 64, 576, 100.0, 300.0, 60.0),   # slow, reference slower still
        _row("conv", "binary", 49, 512, 4608, 70.0, 50.0, 60.0),   # 0.86x fp16: fast enough
        _row("linear", "int8", 256, 4096, 4096, 40.0, 30.0, 35.0)])
    assert not ap.prefer_triton("conv", "int8", 49, 512, 4608)
    assert not ap.prefer_triton("conv", "int8", 98, 512, 4608)     # nearest row: the first
    assert ap.prefer_triton("conv", "int8", 3000, 64, 576)
    assert ap.prefer_triton("conv", "binary", 49, 512, 4608)
    assert ap.prefer_triton("linear", "int8", 256, 4096, 4096)     # 0.875x: fast enough
    assert ap.prefer_triton("linear", "binary", 1, 10, 10)         # no measurement: Triton


def test_shipped_auto_table_follows_the_rule():
    from zoo.kernels import auto_policy

    tab = auto_policy.table()
    assert tab["device"] and {(r["kind"], r["kernel"]) for r in tab["rows"]} == {
        ("conv", "int8"), ("conv", "binary"), ("linear", "int8"), ("linear", "binary")}
    for r in tab["rows"]:
        fallback = r["fp16_us"] / r["triton_us"] < 0.8 and r["reference_us"] < r["triton_us"]
        assert auto_policy.prefer_triton(r["kind"], r["kernel"], r["m"], r["n"], r["k"]) is not fallback


def test_auto_backend_consults_the_policy(monkeypatch):
    from zoo.kernels import triton_layers

    net = _packed_conv(QCFGS["lsq4"], padding=1)
    x = torch.randn(1, 6, 9, 9, device=DEV)
    ap = _policy_table(monkeypatch, [_row("conv", "int8", 81, 12, 54, 100.0, 10.0, 20.0)])
    assert not ap.prefer_triton("conv", "int8", 81, 12, 54)
    conv = net[0]
    conv.backend = "reference"
    y_ref = conv(x)
    conv.backend = "auto"
    assert triton_layers.conv2d(conv, x) is None  # measured slow there: the reference runs
    conv.backend = "triton"
    assert torch.equal(triton_layers.conv2d(conv, x), y_ref)  # an explicit choice is obeyed
