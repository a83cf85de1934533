"""Vision transformers: explicit attention, quantized matmuls and softmax, the softmax quantizers, RepQ-ViT's
reparameterisation, APQ-ViT's bottom-eliminated loss, PSAQ-ViT's entropy, and the PTQ CLI's methods."""
import math

import pytest
import torch
from torch import nn

import zoo
import zoo.ptq
from zoo.quantizers import Log2, LogSqrt2, MinMax, MPQ, QuantConfig, quantize, quantized_layers, quantized_ops
from zoo.quantizers.attention import (Attention, MultiheadAttention, QuantMatMul, QuantSoftmax, explicit_attention,
                                      integer_matmul)

timm = pytest.importorskip("timm")


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    return VisionTransformer(**{**args, **kw}).eval()


def test_explicit_attention_equals_timms_fused_attention():
    m = _timm_vit(qkv_bias=True)
    assert m.blocks[0].attn.fused_attn  # timm runs F.scaled_dot_product_attention
    x = torch.randn(3, 3, 32, 32)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(x)
        explicit_attention(m)
        out = m(x)
    assert all(type(b.attn) is Attention for b in m.blocks)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0), (out - ref).abs().max()
    assert m.state_dict().keys() == sd.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    # masks, as timm's manual path applies them
    a = _timm_vit().blocks[0].attn
    t = torch.randn(2, 7, 64)
    mask = torch.rand(7, 7) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        ref_mask, ref_causal = a(t, attn_mask=mask), a(t, is_causal=True)
        e = Attention.from_timm(a)
        assert torch.allclose(e(t, attn_mask=mask), ref_mask, atol=1e-6)
        assert torch.allclose(e(t, is_causal=True), ref_causal, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_multihead_attention_equals_torchs(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    e = MultiheadAttention(mha).eval()
    shape = (2, 6, 32) if batch_first else (6, 2, 32)
    q, kv = torch.randn(shape), torch.randn(shape[:-1] if False else shape)
    kpm = torch.tensor([[False] * 5 + [True], [False] * 6])
    am = torch.rand(6, 6) > 0.8
    am.fill_diagonal_(False)  # True = masked, as torch
    with torch.no_grad():
        for args, kw in (((q, q, q), {}), ((q, kv, kv), {}), ((q, q, q), {"key_padding_mask": kpm}),
                         ((q, q, q), {"attn_mask": am, "average_attn_weights": False})):
            (o1, w1), (o2, w2) = mha(*args, **kw), e(*args, **kw)
            assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(w1, w2, atol=1e-6)
    assert e.state_dict().keys() == mha.state_dict().keys()
    e.load_state_dict(mha.state_dict())  # strict both ways: the same names


def test_quantize_on_an_unmodified_timm_deit_tiny_and_save_load(tmp_path):
    """The issue's target: every Linear, both matmuls and the softmax of timm's deit_tiny_patch16_224
    quantized; the float state dict loads into it; save -> load gives the same output."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    float_sd = m.state_dict()
    cfg = QuantConfig(weight=MinMax(8, granularity="channel"), act=MinMax(8))
    quantize(m, cfg)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert {n for n, _ in quantized_layers(m)} >= set(linears) and len(linears) == 12 * 4 + 1
    ops = dict(quantized_ops(m))
    for i in range(12):
        assert isinstance(ops[f"blocks.{i}.attn.matmul1"], QuantMatMul)
        assert isinstance(ops[f"blocks.{i}.attn.matmul2"], QuantMatMul)
        assert isinstance(ops[f"blocks.{i}.attn.softmax"], QuantSoftmax)
    m.load_state_dict(float_sd, strict=True)
    x = torch.rand(2, 3, 224, 224)
    m.train()
    with torch.no_grad():
        m(x)  # the activation quantizers' ranges from one batch
    m.eval()
    packed = zoo.quantizers.to_packed(__import__("copy").deepcopy(m))  # the form save() writes
    with torch.no_grad():
        y, y_train = packed(x), m(x)
    assert torch.allclose(y, y_train, atol=0.05)  # the training form: rounding ties may flip a code or two
    zoo.save(m, tmp_path / "deit")
    skeleton = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    loaded = zoo.load(tmp_path / "deit", model=skeleton)
    with torch.no_grad():
        y2 = loaded(x)
    assert torch.equal(y, y2), (y - y2).abs().max()


def test_quantized_matmul_integer_path_equals_the_training_form():
    torch.manual_seed(0)
    from zoo.quantizers.config import LayerQuant
    from zoo.quantizers.attention import MatMul

    mm = QuantMatMul.from_float(MatMul(), LayerQuant(act=MinMax(4)))
    a, b = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 16, 7)
    mm.train()
    fake = mm(a, b)  # ranges from this batch (EMA initialised), fake-quantized product
    mm.eval()
    with torch.no_grad():
        fake_eval = mm.aq_a(a) @ mm.aq_b(b)
        y = mm(a, b)
    assert torch.allclose(y, fake_eval, rtol=1e-5, atol=1e-6) and torch.allclose(fake, fake_eval, atol=1e-6)
    # the sums are those of the integer codes, exactly
    pa, pb = mm.aq_a.params(None), mm.aq_b.params(None)
    ua = (torch.clamp(torch.round(a / pa["scale"] + pa["offset"]), 0, 15) - pa["zero"]).long()
    ub = (torch.clamp(torch.round(b / pb["scale"] + pb["offset"]), 0, 15) - pb["zero"]).long()
    exact = (ua @ ub).double() * (pa["scale"].double() * pb["scale"].double())
    assert torch.equal(integer_matmul(a, mm.aq_a, b, mm.aq_b), exact)


def _calibrated_matmul(spec, a, b):
    from zoo.quantizers.attention import MatMul
    from zoo.quantizers.config import LayerQuant

    mm = QuantMatMul.from_float(MatMul(), LayerQuant(act=spec))
    mm.train()
    mm(a, b)  # ranges (and LSQ's signedness) from this batch
    return mm.eval()


def _exact_product(a, aq, b, bq):
    """s_a s_b Σ (v_a - z_a)(v_b - z_b) with the codes and sums in int64, written out here."""
    def u(x, q):
        p = q.params(None)
        v = torch.clamp(torch.round(x / p["scale"] + p["offset"]), p["qmin"], p["qmax"])
        return (v - p["zero"]).long(), p["scale"].double()

    (ua, sa), (ub, sb) = u(a, aq), u(b, bq)
    return (ua @ ub).double() * (sa * sb)


@pytest.mark.parametrize("spec", [MinMax(8), MinMax(4), "lsq8"], ids=["minmax8", "minmax4", "lsq8-signed"])
@pytest.mark.parametrize("k", [16, 4096])
def test_integer_matmul_fast_cpu_path_is_exact(spec, k):
    """backend auto/cpu on CPU: a float32 product where every partial sum is an integer below 2^24,
    float64 beyond (k=4096 at 8 bits: mostly positive products sum past 2^24, where float32 rounds)."""
    from zoo.quantizers import LSQ

    torch.manual_seed(0)
    spec = LSQ(8) if spec == "lsq8" else spec
    a, b = torch.rand(2, 3, 9, k) - 0.05, torch.rand(2, 3, k, 7)
    mm = _calibrated_matmul(spec, a, b)
    if spec.__class__.__name__ == "LSQ":
        assert mm.aq_a.params(None)["qmin"] < 0  # signed codes
    exact = _exact_product(a, mm.aq_a, b, mm.aq_b)
    for backend in ("auto", "cpu", "reference"):
        assert torch.equal(integer_matmul(a, mm.aq_a, b, mm.aq_b, backend), exact), backend
    zoo.set_backend(mm, "cpu")
    with torch.no_grad():
        assert torch.equal(mm(a, b), exact.float())


def test_integer_matmul_with_exact_first_operand_same_on_every_cpu_path(monkeypatch):
    """attn @ v (the first operand the softmax quantizer's levels, only v quantized): the C++ kernels'
    centred codes, the torch operations (ZOO_CPU_KERNELS=0) and the reference give the same float64
    product; the forward rounds it to float32."""
    from zoo.quantizers.attention import MatMul
    from zoo.quantizers.config import LayerQuant

    torch.manual_seed(3)
    mm = QuantMatMul.from_float(MatMul(quant_a=False), LayerQuant(act=MinMax(4)))
    attn = torch.softmax(torch.randn(2, 3, 9, 9) * 3, -1)
    attn = torch.round(attn * 255) / 255  # levels, as a uniform softmax quantizer leaves them
    v = torch.randn(2, 3, 9, 16)
    mm.train()
    mm(attn, v)
    mm.eval()
    p = mm.aq_b.params(None)
    ub = torch.clamp(torch.round(v / p["scale"] + p["offset"]), p["qmin"], p["qmax"]) - p["zero"]
    want = (attn.double() @ ub.double()) * p["scale"].double()
    got = {b: integer_matmul(attn, None, v, mm.aq_b, b) for b in ("cpu", "reference")}
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    got["cpu, no C++ kernels"] = integer_matmul(attn, None, v, mm.aq_b, "cpu")
    for k, y in got.items():
        assert y.dtype == torch.float64 and torch.equal(y, want), k


def test_exact_first_operand_takes_float32_only_where_certified(monkeypatch):
    """attn @ v with I-ViT's softmax levels (multiples of 2^-15, rows summing to at most 1) and 8-bit v:
    every partial sum is a multiple of 2^-15 below 255, so the CPU path's float32 product is exact and
    taken (equal to the float64 product); levels that are not dyadic, a row sum too large for float32,
    NaN: the float64 product."""
    from zoo.kernels import cpu_ops
    from zoo.quantizers import attention
    from zoo.quantizers.attention import MatMul
    from zoo.quantizers.config import LayerQuant
    from zoo.quantizers.ivit import shiftmax

    torch.manual_seed(4)
    mm = QuantMatMul.from_float(MatMul(quant_a=False), LayerQuant(act=MinMax(8)))
    v = torch.randn(4, 3, 50, 32) * 3
    mm.train()
    mm(torch.rand(4, 3, 50, 50), v)
    mm.eval()
    p = mm.aq_b.params(None)
    ub = torch.clamp(torch.round(v / p["scale"] + p["offset"]), p["qmin"], p["qmax"]) - p["zero"]
    levels = shiftmax(torch.randint(-2047, 2048, (4, 3, 50, 50)), 8 / 2047, 16).float() * 2.0 ** -15
    taken = []
    real = attention._certified_float32_product
    monkeypatch.setattr(attention, "_certified_float32_product",
                        lambda *a: (lambda r: taken.append(r is not None) or r)(real(*a)))
    peaked = levels.clone()
    peaked[0, 0, 0] = 0.0
    peaked[0, 0, 0, 0] = 1.0  # a row of one 1: the largest partial sum, 255 * 2^15 < 2^24 quanta
    wide = levels.clone()
    wide[0, 0, 0, :2] = torch.tensor([2.0 ** 9, 2.0 ** -15])  # sums span 2^9 * 255 down to 2^-15: 2^32 quanta
    cases = {"ivit": (levels, True), "peaked": (peaked, True), "wide": (wide, False),
             "not dyadic": (levels * 0.3, False), "row sums 2^20": (levels * 2.0 ** 20, False),
             "nan": (levels.masked_fill(levels > 0.1, float("nan")), False)}
    for name, (a, float32) in cases.items():
        taken.clear()
        want = (a.double() @ ub.double()) * p["scale"].double()
        got = integer_matmul(a, None, v, mm.aq_b, "cpu")
        assert got.dtype == torch.float64 and torch.equal(got.nan_to_num(), want.nan_to_num()), name
        assert taken == ([float32] if cpu_ops.ready() else []), name
        got = integer_matmul(a, None, v, mm.aq_b, "cpu", None, torch.float32)  # QuantMatMul's call (then .float())
        assert got.dtype == (torch.float32 if float32 and cpu_ops.ready() else torch.float64), name
        assert torch.equal(got.float().nan_to_num(), want.float().nan_to_num()), name


@pytest.mark.parametrize("spec", [MinMax(8), MinMax(4), "lsq8"], ids=["minmax8", "minmax4", "lsq8-signed"])
def test_integer_matmul_through_the_triton_int8_kernel_is_exact(spec, monkeypatch):
    """backend triton (interpreted on CPU): codes centred into int8, the int32 batched kernel, the
    centring terms added back; equal to the int64 product, and the kernel really ran."""
    pytest.importorskip("triton")
    from zoo.kernels import dispatch, triton_layers
    from zoo.quantizers import LSQ

    if not (torch.cuda.is_available() or dispatch.interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    calls = []
    real = triton_layers.int8_matmul
    monkeypatch.setattr(triton_layers, "int8_matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    torch.manual_seed(1)
    spec = LSQ(8) if spec == "lsq8" else spec
    a, b = torch.randn(2, 2, 70, 24), torch.randn(2, 2, 24, 66) + 0.5  # M, N not multiples of the tiles
    mm = _calibrated_matmul(spec, a, b)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mm.to(dev)
    got = integer_matmul(a.to(dev), mm.aq_a, b.to(dev), mm.aq_b, "triton").cpu()
    assert calls == [(2, 2, 70, 24)]
    assert torch.equal(got, _exact_product(a, mm.aq_a.cpu(), b, mm.aq_b.cpu()))


def test_matmul_grids_follow_a_training_step():
    """The eval-mode grids are cached as numbers; an LSQ step changed in place (what an optimizer step
    does between validations) must rebuild them: the product equals the one of a fresh quantizer state."""
    from zoo.quantizers import LSQ

    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 16, 7)
    mm = _calibrated_matmul(LSQ(4), a, b)
    with torch.no_grad():
        first = mm(a, b)
        for p in mm.parameters():
            p.mul_(1.5)
        again = mm(a, b)
    assert not torch.equal(first, again)
    assert torch.equal(again, _exact_product(a, mm.aq_a, b, mm.aq_b).float())


def test_int8_bmm_kernel_against_int64_products():
    pytest.importorskip("triton")
    from zoo.kernels import dispatch

    if not (torch.cuda.is_available() or dispatch.interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from zoo.kernels.triton_bmm import int8_bmm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (3, 65, 100), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (3, 100, 33), generator=g, dtype=torch.int8)
    a[0, 0], b[0, :, 0] = -128, -128  # the extreme product, K times
    got = int8_bmm(a.to(dev), b.to(dev)).cpu()
    assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long())
    assert got[0, 0, 0] == 100 * 128 * 128
    bt = b.transpose(1, 2).contiguous().transpose(1, 2)  # strided operand
    assert torch.equal(int8_bmm(a.to(dev), bt.to(dev)).cpu(), got)
    with pytest.raises(ValueError, match="int8"):
        int8_bmm(a.float(), b)
    with pytest.raises(ValueError, match="do not multiply"):
        int8_bmm(a, b[:, :99])


def test_quantized_matmul_and_softmax_gradients_are_clipped_straight_through():
    from zoo.quantizers.config import LayerQuant
    from zoo.quantizers.attention import MatMul, Softmax

    mm = QuantMatMul.from_float(MatMul(), LayerQuant(act=MinMax(4)))
    mm.aq_a.lo.fill_(-1.0), mm.aq_a.hi.fill_(1.0), mm.aq_a.initialized.fill_(True)
    mm.aq_b.lo.fill_(-1.0), mm.aq_b.hi.fill_(1.0), mm.aq_b.initialized.fill_(True)
    mm.eval()  # frozen ranges, but the fake-quant form (grad needs it): call the quantizers directly
    a = torch.tensor([[0.5, 2.0]], requires_grad=True)
    b = torch.tensor([[1.0], [0.5]], requires_grad=True)
    (mm.aq_a(a) @ mm.aq_b(b)).sum().backward()
    # d/da_j = b_hat_j inside [-1, 1] (a_0), 0 outside (a_1 = 2 is clipped)
    bh = mm.aq_b(b.detach())
    assert torch.allclose(a.grad, torch.tensor([[float(bh[0, 0]), 0.0]]))
    sm = QuantSoftmax.from_float(Softmax(-1), LayerQuant(act=Log2(3)))
    x = torch.tensor([[0.0, 1.0, -5.0]], requires_grad=True)
    sm.oq.scale.fill_(1.0)
    w = torch.tensor([[1.0, 2.0, 3.0]])
    (sm(x) * w).sum().backward()
    p = x.detach().softmax(-1)[0]
    expect = p * (w[0] - (p * w[0]).sum())  # the softmax's own gradient (levels pass it straight through)
    assert torch.allclose(x.grad[0], expect, atol=1e-6)


def test_log2_levels_by_hand():
    q = zoo.quantizers.logq.LogAct(3, 1)
    q.scale.fill_(1.0)
    x = torch.tensor([1.0, 0.3, 0.12, 0.001, 0.0, 1.7])
    # -log2: 0, 1.737 -> 2, 3.06 -> 3, 9.97 -> top (7) = 0, 0 -> top, 1.7 > s -> code 0 = s
    assert torch.equal(q(x), torch.tensor([1.0, 0.25, 0.125, 0.0, 0.0, 1.0]))


def test_log_sqrt2_levels_by_hand():
    q = zoo.quantizers.logq.LogAct(3, 2)
    q.scale.fill_(0.5)
    x = torch.tensor([0.5, 0.15, 0.0625, 0.04, 0.01])
    # -2 log2(x / 0.5): 0; 3.47 -> 3: 0.5 * 2^-1.5; 6 -> 0.5 * 2^-3; 7.29 -> 7 = top -> 0; 11.3 -> top
    expect = torch.tensor([0.5, 0.5 * 2 ** -1.5, 0.5 * 2 ** -3, 0.0, 0.0])
    assert torch.allclose(q(x), expect, atol=1e-7, rtol=0)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("k", [1, 2])
def test_log_quantizer_inference_value_is_the_training_forward_value(k, bits, monkeypatch):
    """Without autograd the forward skips ste's surrogate -- on the CPU as one C++ pass after torch's log2
    (``cpu_ops.logact_levels``, with the torch-made table of levels), else torch's operations: the same
    values as the training forward, bit for bit (NaN, inf, 0, -0, negatives, > s, every code, a tensor
    long enough for vectorised bodies and scalar tails alike)."""
    from zoo.kernels import cpu_ops

    q = zoo.quantizers.logq.LogAct(bits, k)
    q.scale.fill_(0.6)
    g = torch.Generator().manual_seed(k * 10 + bits)
    special = torch.tensor([0.0, -0.0, -0.3, 1e-30, 0.6, 0.61, 0.6 * 2 ** -0.25, 0.6 * 2 ** -0.75, float("nan"),
                            float("inf"), -float("inf")])
    x = torch.cat([torch.rand(100_005, generator=g) ** 4, special]).reshape(-1, 7)
    slow = q(x.clone().requires_grad_()).detach()
    built, calls = cpu_ops.available(), []
    real = cpu_ops.logact_levels
    monkeypatch.setattr(cpu_ops, "logact_levels", lambda *a: calls.append(1) or real(*a))
    for kernels in ("1", "0"):
        monkeypatch.setenv("ZOO_CPU_KERNELS", kernels)
        with torch.no_grad():
            fast = q(x)
        assert torch.equal(torch.nan_to_num(fast, nan=-1.0), torch.nan_to_num(slow, nan=-1.0)), kernels
        assert torch.equal(fast.signbit(), slow.signbit())
        assert torch.isnan(fast).sum() == torch.isnan(slow).sum() == 3  # NaN and +-inf propagate as before
    assert len(calls) == (1 if built else 0)
    assert len(set(q.codes(x).flatten().tolist())) == 2 ** bits  # every code occurs


def test_mpq_levels_by_hand():
    q = zoo.quantizers.logq.MPQAct(2)
    q.fit(torch.tensor([0.1, 0.9]))  # D = 0.9 / 3 = 0.3
    x = torch.tensor([0.65, 0.29, 0.9, 0.61])
    assert torch.allclose(q(x), torch.tensor([0.6, 0.0, 0.9, 0.6]), atol=1e-7)


def test_log_quantizer_fit_picks_the_lowest_error_scale():
    q = zoo.quantizers.logq.LogAct(4, 2)
    x = torch.cat([torch.full((9995,), 0.3), torch.ones(5)])
    err = q.fit(x)
    # s = max = 1 puts 0.3 at code 3 (2^-1.5 = 0.354): error 9995 * 0.054^2; s = 0.3 (the 0.999 quantile)
    # codes 0.3 exactly and clips the five 1.0s: 5 * 0.7^2, smaller
    assert float(q.scale) == pytest.approx(0.3, abs=1e-6)
    assert err == pytest.approx(5 * 0.7 ** 2 / 10000, rel=1e-4)


def test_repq_reparameterisation_is_exact_in_float():
    """Per-channel quantization of the LayerNorm output then the Linear equals per-tensor quantization
    of the rewritten LayerNorm's output then the rewritten Linear; the float function is unchanged."""
    from zoo.ptq.estimators import fake_quant  # noqa: F401  (the grid convention below is MinMaxAct's)
    from zoo.ptq.vit import fold_channel_grid

    torch.manual_seed(0)
    ln, lin = nn.LayerNorm(6), nn.Linear(6, 4)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([0.5, 3.0, 1.0, 8.0, 0.2, 1.5]))
        ln.bias.copy_(torch.tensor([0.1, -2.0, 0.0, 4.0, 0.3, -0.5]))
    x = torch.randn(50, 6)
    bits, n = 4, 15
    h = ln(x).detach()
    lo, hi = h.amin(0).clamp(max=0), h.amax(0).clamp(min=0)
    s = ((hi - lo) / n).double()
    z = torch.round(-lo.double() / s)
    ref_float = lin(ln(x)).detach()
    per_channel = (torch.clamp(torch.round(h.double() / s) + z, 0, n) - z) * s
    ref = (per_channel @ lin.weight.double().t() + lin.bias.double())
    lo_t, hi_t = fold_channel_grid(ln, lin, s, z, bits)
    h2 = ln(x).detach().double()
    s_t = (hi_t - lo_t) / n
    z_t = round(-lo_t / s_t)
    assert s_t == pytest.approx(float(s.mean()), rel=1e-12) and z_t == round(float(z.mean()))
    codes_t = torch.clamp(torch.round(h2 / s_t) + z_t, 0, n)
    codes_c = torch.clamp(torch.round(h.double() / s) + z, 0, n)
    assert torch.equal(codes_t, codes_c)  # per tensor on the rewritten output: the per-channel codes
    out = ((codes_t - z_t) * s_t) @ lin.weight.double().t() + lin.bias.double()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(lin(ln(x)).detach(), ref_float, atol=1e-5)


def test_repq_weight_percentile_clip_gives_repq_codes():
    """RepQ-ViT's per-channel weight search, written out with numpy per row (quantiles 0.999 / 0.9999 /
    0.99999, asymmetric grid, mean squared error): the clipped rows are the rows clamped to the chosen
    range, and per-channel min-max quantization of the clipped weights gives the codes RepQ-ViT's
    quantizer gives the original ones."""
    import numpy as np

    from zoo.ptq.vit import percentile_clip
    from zoo.quantizers.uniform import MinMaxWeight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2000, generator=g)
    w[:, :3] *= 12  # outliers: the search clips them
    bits, n = 4, 15
    clipped = percentile_clip(w, bits)
    q_mm, _, _, _ = MinMaxWeight(bits, per_channel=True).codes(clipped)
    for r in range(6):
        row = w[r].double().numpy()
        best = None
        for p in (0.999, 0.9999, 0.99999):
            hi, lo = np.quantile(row, p), np.quantile(row, 1 - p)
            step = (hi - lo) / n
            zero = np.round(-lo / step)
            codes = np.clip(np.round(row / step) + zero, 0, n)
            err = np.mean(((codes - zero) * step - row) ** 2)
            if best is None or err < best[0]:
                best = (err, lo, hi, codes)
        _, lo, hi, codes = best
        np.testing.assert_allclose(clipped[r].double().numpy(), np.clip(row, lo, hi), rtol=0, atol=1e-6)
        assert hi < row.max() and lo > row.min()  # the outliers were clipped
        assert (q_mm[r].numpy() == codes).all()


def test_apq_bottom_elimination_loss_by_hand():
    from zoo.ptq.vit import eliminated_loss

    out = torch.tensor([[0.1, 0.5, 0.2, 0.4]])
    g2 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    zero = torch.zeros_like(out)
    # half eliminated: |d| 0.1 and 0.2 dropped; 2 * 0.25 + 4 * 0.16
    assert eliminated_loss(out, zero, g2, 0.5).item() == pytest.approx(1.14)
    assert eliminated_loss(out, zero, g2, 0.0).item() == pytest.approx(0.01 + 0.5 + 0.12 + 0.64)
    with pytest.raises(ValueError, match=r"eliminate=1.0 is not valid; valid: a fraction in \[0, 1\)"):
        from zoo.ptq.vit import apq_blockwise
        apq_blockwise(nn.Linear(1, 1), nn.Linear(1, 1), torch.zeros(1, 1), eliminate=1.0)


def test_psaq_entropy_against_a_hand_computation():
    from zoo.ptq.psaq import kde_entropy, patch_similarity

    s = torch.tensor([[0.0, 0.02, 0.04]])
    h, pts = 0.01, torch.tensor([0.0, 0.02, 0.04])

    def pdf(t):
        return sum(math.exp(-0.5 * ((t - c) / h) ** 2) for c in (0.0, 0.02, 0.04)) / 3 / (h * math.sqrt(2 * math.pi))

    f = [-(pdf(float(t)) + 1e-4) * math.log(pdf(float(t)) + 1e-4) for t in pts]
    expect = 0.02 * (f[0] + f[1]) / 2 + 0.02 * (f[1] + f[2]) / 2  # the trapezoid rule
    assert kde_entropy(s, h, 3).item() == pytest.approx(expect, rel=1e-5)
    # cosine similarity of patch tokens after the class token, heads averaged
    feat = torch.tensor([[[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]]])  # B=1, H=1, N=4, D=2
    sim = patch_similarity(feat).reshape(3, 3)
    r = 1 / math.sqrt(2)
    assert torch.allclose(sim, torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r], [r, r, 1.0]]), atol=1e-6)


def test_psaq_entropy_is_higher_for_spread_similarities():
    from zoo.ptq.psaq import kde_entropy

    narrow = torch.full((1, 100), 0.5) + 1e-3 * torch.randn(1, 100)
    wide = torch.linspace(-1, 1, 100).unsqueeze(0)
    assert kde_entropy(wide).item() > kde_entropy(narrow).item()


def test_ptq_config_sets_the_softmax_quantizer():
    cfg = zoo.ptq.ptq_config(4, keep={"head": 8}, softmax="LogSqrt2")
    assert cfg.for_layer("blocks.3.attn.softmax").act == LogSqrt2(4)
    assert cfg.for_layer("blocks.3.attn.matmul1").act == MinMax(4)
    assert cfg.for_layer("head").act == MinMax(8)
    assert zoo.ptq.ptq_config(4, softmax="MPQ").for_layer("x.softmax").act == MPQ(4)


def test_our_vit_quantizes_every_linear_matmul_and_softmax_and_ptq_runs():
    torch.manual_seed(0)
    m = zoo.create_model("vit_tiny_p4", depth=2, embed_dim=48).eval()
    x = torch.rand(16, 1, 28, 28)
    for sm in (None, "Log2", "LogSqrt2", "MPQ"):
        q = zoo.ptq.calibrate(m, zoo.ptq.ptq_config(8, softmax=sm), x, "minmax", progress=False)
        ops = dict(quantized_ops(q))
        assert len(ops) == 6 and len(quantized_layers(q)) == 2 * 4 + 2
        with torch.no_grad():
            err = (q(x) - m(x)).abs().max() / m(x).abs().max()
        assert err < 0.1, (sm, err)  # 8 bits: close to float


def test_ptq_cli_rejects_a_bad_softmax_quantizer(tmp_path):
    from hydra import compose, initialize_config_module

    from zoo.ptq.cli import _check
    from zoo.train import ConfigError

    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("ptq", overrides=["task=vit", "algo=repq", "algo.softmax=cubic"])
    with pytest.raises(ConfigError, match=r"algo.softmax='cubic' is not valid; valid: \['uniform', 'log2', "
                                          r"'logsqrt2', 'mpq'\]"):
        _check(cfg)
