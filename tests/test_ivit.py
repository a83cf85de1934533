"""I-ViT's integer nonlinearities against a plain-Python integer reference written from the paper's
algorithms (independent of the torch code: Python ints, // and >> with floor semantics), and close to
the float functions; the modules' straight-through gradients; quantize(..., extra ivit) swaps them in."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.quantizers import MinMax, QuantConfig, quantize
from zoo.quantizers.ivit import (ILayerNorm, IntSoftmax, ShiftGELU, i_layernorm, int_exp, shift_gelu, shiftmax,
                                 to_integer_only)

M = 2 ** 31 - 1


def ref_exp(x: int, s: float, n: int) -> int:
    p = x + (x >> 1) - (x >> 4)
    x0 = math.floor(-1 / s)
    p = max(p, n * x0)
    q = p // x0
    r = p - q * x0
    return max(((r >> 1) - x0) << (n - q), 0)


def ref_shiftmax(row: list[int], s: float, bits: int) -> list[int]:
    m = max(row)
    e = [ref_exp(v - m, s, 15) for v in row]
    f = M // min(max(sum(e), 1), M)
    return [(v * f) >> (32 - bits) for v in e]


def ref_gelu(row: list[int], s: float, bits: int) -> list[int]:
    m = max(max(row), 0)
    out = []
    for v in row:
        a, b = ref_exp(v - m, 1.702 * s, 23), ref_exp(-m, 1.702 * s, 23)
        out.append(v * ((a * (M // max(a + b, 1))) >> (32 - bits)))
    return out


def ref_layernorm(row: list[int]) -> list[int]:
    mean = round(sum(row) / len(row))
    y = [v - mean for v in row]
    v = sum(t * t for t in y)
    k = 2 ** 16
    for _ in range(10):
        k = max((k + v // k) >> 1, 1)
    return [(t * (M // k)) >> 1 for t in y]


def _ints(shape, lo, hi, seed=0):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed))


def test_int_exp_is_the_shift_algorithm_and_close_to_exp():
    s = 0.01
    x = torch.arange(-2000, 1, 7)
    got = int_exp(x, s, 15)
    assert got.tolist() == [ref_exp(v, s, 15) for v in x.tolist()]
    approx = got.double() * s / 2 ** 15
    assert torch.allclose(approx, torch.exp(x.double() * s), atol=0.04, rtol=0.07)


def test_shiftmax_bit_exact_to_the_integer_reference_and_close_to_softmax():
    s = 8 / 2047
    x = _ints((6, 50), -2047, 2048)
    got = shiftmax(x, s, 16)
    assert got.tolist() == [ref_shiftmax(r, s, 16) for r in x.tolist()]
    p = got.double() / 2 ** 15
    assert (p - torch.softmax(x.double() * s, -1)).abs().max() < 0.02


def test_shift_gelu_bit_exact_and_close_to_gelu():
    s = 6 / 127
    x = _ints((4, 96), -127, 128, seed=1)
    got = shift_gelu(x, s, 8)
    assert got.tolist() == [ref_gelu(r, s, 8) for r in x.tolist()]
    y = got.double() * s / 2 ** 7
    xf = x.double() * s  # the sigmoid's 8 bits and the linear 2^t: within 5% of |x|
    assert bool(((y - F.gelu(xf)).abs() <= 0.05 * xf.abs() + 1e-12).all())


def test_i_layernorm_bit_exact_and_close_to_layernorm():
    x = _ints((5, 96), -30000, 30000, seed=2) // 3 + 4000
    y, scale = i_layernorm(x)
    assert y.tolist() == [ref_layernorm(r) for r in x.tolist()]
    assert scale == math.sqrt(96) / 2 ** 30
    ref = F.layer_norm(x.double(), (96,), eps=0.0)
    assert (y.double() * scale - ref).abs().max() < 1e-3


def test_modules_compute_the_integer_function_and_pass_the_float_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 10, requires_grad=True)
    sm = IntSoftmax()
    sm.train()
    y = sm(x)
    s = float(sm.iq.amax) / 2047
    codes = torch.clamp(torch.round(x.detach().double() / s), -2047, 2047).long()
    assert torch.equal(y.detach(), (shiftmax(codes, s, 16).float() * 2.0 ** -15))
    w = torch.randn_like(x)
    (y * w).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2.softmax(-1) * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad)
    ln = ILayerNorm.from_float(nn.LayerNorm(10))
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2), ln.bias.uniform_(-1, 1)
    x.grad = None
    out = ln(x)
    ref = F.layer_norm(x, (10,), ln.weight, ln.bias, ln.eps)
    assert (out - ref).abs().max() < 0.01
    (out * w).sum().backward()
    gx, gw, gb = x.grad.clone(), ln.weight.grad.clone(), ln.bias.grad.clone()
    x.grad, ln.weight.grad, ln.bias.grad = None, None, None
    (ref * w).sum().backward()  # the float LayerNorm's gradients w.r.t. the input and both parameters
    assert torch.allclose(gx, x.grad, atol=1e-6)
    assert torch.allclose(gw, ln.weight.grad, atol=1e-6) and torch.allclose(gb, ln.bias.grad, atol=1e-6)
    g = ShiftGELU()
    g.train()
    out = g(x.detach())
    s = float(g.iq.amax) / 127
    codes = torch.clamp(torch.round(x.detach().double() / s), -127, 127).long()
    assert torch.equal(out, (shift_gelu(codes, s, 8).double() * (s / 128)).float())


def test_quantize_with_ivit_swaps_every_nonlinearity():
    m = zoo.create_model("vit_tiny_p4", depth=2, embed_dim=48)
    cfg = QuantConfig(weight=MinMax(8, granularity="channel"), act=MinMax(8), extra={"ivit": True})
    sd = m.state_dict()
    quantize(m, cfg)
    kinds = [type(mod) for mod in m.modules()]
    assert kinds.count(ILayerNorm) == 5 and kinds.count(ShiftGELU) == 2 and kinds.count(IntSoftmax) == 2
    assert nn.LayerNorm not in kinds and nn.GELU not in kinds
    m.load_state_dict(sd, strict=True)  # the float state dict still loads
    assert to_integer_only(m) is m and [type(mod) for mod in m.modules()] == kinds  # idempotent


def test_int_softmax_rejects_another_dim():
    with pytest.raises(ValueError, match="IntSoftmax works over the last dim; got dim=1"):
        IntSoftmax(dim=1)


# ----------------------------------------------------------------------------- integer-only inference
def test_dyadic_requantization_against_python_integers():
    """requant(q, mult, z, lo, hi) = clamp(floor(q m / 2^k + 1/2) + z) with m / 2^k within 2^-30 of mult
    (relative), written out with Python ints; per-channel multipliers over the last dim, negative ones."""
    from zoo.quantizers.ivit_integer import dyadic, requant

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-2 ** 30, 2 ** 30, (7, 5), generator=g)
    mult = torch.tensor([3.7e-9, 0.0123, 1.0, -0.75, 812.5], dtype=torch.float64)
    m, k = dyadic(mult)
    for mi, ki, f in zip(m.tolist(), k.tolist(), mult.tolist()):
        assert 2 ** 30 <= abs(mi) < 2 ** 31 and abs(mi / 2 ** ki - f) <= abs(f) * 2 ** -30
    got = requant(q, mult, 3, -2 ** 20, 2 ** 20)
    for i in range(7):
        for j in range(5):
            qi, mi, ki = int(q[i, j]), int(m[j]), int(k[j])
            want = min(max((qi * mi + 2 ** (ki - 1)) // 2 ** ki + 3, -2 ** 20), 2 ** 20)
            assert int(got[i, j]) == want
    assert int(requant(torch.tensor(5), 0.5)) == 3 and int(requant(torch.tensor(-5), 0.5)) == -2  # half up
    with pytest.raises(ValueError, match="dyadic range"):
        dyadic(torch.tensor([2.0 ** 40]))


def test_integer_only_vit_agrees_with_the_release_and_refuses_other_models():
    """The shipped I-ViT release run integer-only (dyadic requantization, integer residual stream):
    the same predictions as zoo.load's forward on its golden images, logits within 0.5 (the full test
    set: benchmarks/ivit_integer.py, README). A model that is not an I-ViT release is refused."""
    from zoo.cards import read_golden
    from zoo.quantizers.ivit_integer import IntegerViT
    from zoo.registry import resolve_checkpoint

    name = "vit_tiny_p4.ivit_w8a8_fmnist"
    model = zoo.load(name)
    x, _ = read_golden(resolve_checkpoint(name))
    with torch.no_grad():
        a, b = model(x), IntegerViT(model)(x)
    assert torch.equal(a.argmax(-1), b.argmax(-1)) and (a - b).abs().max() < 0.5
    assert not torch.equal(a, b)  # a different computation, not a call of the same forward
    with pytest.raises(ValueError, match="I-ViT releases"):
        IntegerViT(zoo.load("vit_tiny_p4.ptq_w8a8_fmnist"))


@pytest.mark.parametrize("amax", [0.05, 1.0, 7.3, 300.0])
def test_modules_at_inference_take_one_cpp_pass_with_identical_outputs(amax, monkeypatch):
    """In eval on CPU float32 inputs the three modules run csrc/ivit.cpp (one pass per row); outputs equal
    the torch integer functions' (ZOO_CPU_KERNELS=0) bit for bit: codes clamped at the grid's ends,
    LayerNorm rows whose mean is exactly k + 1/2 (round half to even), negative and tiny gammas (a -0.0
    becomes +0.0 as the straight-through + 0 makes it), and rows with NaN or inf (the torch functions
    then run, so the NaN/inf are theirs)."""
    from zoo.kernels import cpu_ops

    if not cpu_ops.available():
        pytest.skip("C++ kernels not built here")
    g = torch.Generator().manual_seed(int(amax * 10))
    mods = [IntSoftmax(), ShiftGELU(), ILayerNorm.from_float(nn.LayerNorm(48))]
    with torch.no_grad():
        mods[2].weight.uniform_(-2, 2, generator=g)
        mods[2].weight[:3] = torch.tensor([0.0, 1e-13, -1e-13])
        mods[2].bias.uniform_(-1, 1, generator=g)
        mods[2].weight[3:6], mods[2].bias[3:6] = -1.0, 0.0  # the zero row gives (0 + 0) * (negative) = -0.0
    for m in mods:
        m.iq.amax.fill_(amax)
        m.eval()
    x = torch.randn(4, 7, 48, generator=g) * amax * 0.6
    x[0, 0] = amax * 3  # beyond the grid: clamped codes
    x[0, 1, :] = 0.0
    s = amax / (2 ** 15 - 1)  # LayerNorm's 16-bit grid: a row with code sum 48 k + 24 (mean k + 1/2)
    x[0, 2] = torch.tensor([5.0] * 24 + [6.0] * 24) * s
    x[0, 3] = torch.tensor([-5.0] * 24 + [-6.0] * 24) * s
    bad = x.clone()
    bad[1, 2, 5], bad[2, 3, 0], bad[3, 0, 7] = float("nan"), float("inf"), -float("inf")
    calls = []
    real = cpu_ops.ivit

    def spy(*a):
        y = real(*a)
        calls.append((a[0], y is not None))
        return y

    monkeypatch.setattr(cpu_ops, "ivit", spy)
    for inp in (x, bad):
        for m in mods:
            with torch.no_grad():
                got = m(inp)
                with monkeypatch.context() as mp:
                    mp.setenv("ZOO_CPU_KERNELS", "0")
                    want = m(inp)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), m
            assert torch.equal(got.signbit(), want.signbit())  # -0.0 where the torch path has it, and only there
    # C++ on the finite input, then None with ZOO_CPU_KERNELS=0; on the input with NaN/inf: None (torch) both times
    assert calls == [(op, ran) for finite in (True, False) for op in ("softmax", "gelu", "layernorm")
                     for ran in (finite, False)]


@pytest.mark.parametrize("in_bits", [8, 12])
def test_shift_gelu_over_many_row_maxima_equals_the_torch_function(in_bits, monkeypatch):
    """ShiftGELU at inference over 4000 rows whose code maxima cover the whole 8-bit grid (negative-only
    rows too, whose clamped maximum is 0): the C++ pass -- per-thread tables of each row maximum's
    outputs for 8-bit codes, every element computed for 12-bit ones -- equals the torch integer
    function (ZOO_CPU_KERNELS=0) bit for bit."""
    from zoo.kernels import cpu_ops

    if not cpu_ops.available():
        pytest.skip("C++ kernels not built here")
    g = torch.Generator().manual_seed(in_bits)
    m = ShiftGELU(in_bits=in_bits).eval()
    m.iq.amax.fill_(4.0)
    x = (torch.rand(4000, 96, generator=g) * 2 - 1) * torch.linspace(0.0, 5.0, 4000).view(-1, 1)
    x[::7] = -x[::7].abs()  # rows with only negative codes
    with torch.no_grad():
        got = m(x)
        monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
        want = m(x)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
