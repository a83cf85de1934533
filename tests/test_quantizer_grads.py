"""Forward values, gradients (w.r.t. the input and every learnable parameter) and initialisation of
every quantizer, in float64, against formulas written out here from the papers (see each spec's
docstring in zoo/quantizers/config.py), never by calling the code under test."""
import math

import pytest
import torch

import zoo
from zoo.quantizers import (EBB, N2UQ, PACT, PAMS, RLQ, DoReFa, IRNet, LayerQuant, LSQ, MinMax, QuantConfig,
                            ReAct, UL2Q, XNOR, quantize)
from zoo.quantizers.binary import RPReLU
from zoo.quantizers.config import build_quantizer

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
PAPER_LAMBDA = {2: 0.9957, 3: 0.5860, 4: 0.3352}


class _Layer:
    """The attributes a handler reads from the layer it quantizes."""

    def __init__(self, weight_shape, in_channels=None, ch_axis=0):
        self.weight = torch.zeros(weight_shape)
        self.in_channels = in_channels if in_channels is not None else weight_shape[1]
        self.ch_axis = ch_axis


def make(spec, role, weight_shape=(6, 4, 3, 3), in_channels=None):
    return build_quantizer(spec, role, _Layer(weight_shape, in_channels)).to(DT)


def grads(q, x, g, train=True):
    """(value, dL/dx, {param name: dL/dparam}) for L = sum(q(x) * g)."""
    q.train(train)
    q.zero_grad()
    x = x.detach().clone().to(DT).requires_grad_(True)
    y = q(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in q.named_parameters()}


def rand(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale + shift


def close(a, b, **kw):
    assert a is not None, "no gradient reached this tensor"
    torch.testing.assert_close(a, b.to(a.dtype), **(kw or TOL))


def per_channel(t, c=0):
    """Reduce over every dim but c, keeping dims (the per-output-channel statistic layout)."""
    dims = tuple(d for d in range(t.ndim) if d != c)
    return dims


# ----------------------------------------------------------------------------- MinMax
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_minmax_weight_value_and_identity_gradient(granularity):
    w, g = rand(6, 4, 3, 3), rand(6, 4, 3, 3, seed=1)
    y, dw, params = grads(make(MinMax(3, granularity), "weight"), w, g)
    dims = per_channel(w) if granularity == "channel" else tuple(range(w.ndim))
    lo = w.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = w.amax(dim=dims, keepdim=True).clamp(min=0)
    s = (hi - lo) / 7
    z = torch.round(-lo / s)
    close(y, (torch.clamp(torch.round(w / s) + z, 0, 7) - z) * s)
    close(dw, g)  # the straight-through estimator: every weight gets the output gradient
    assert params == {}


def test_minmax_act_ema_range_and_clipped_gradient():
    q = make(MinMax(2, momentum=0.25), "act")
    x1, x2 = rand(4, 6, 5, 5, scale=2), rand(4, 6, 5, 5, seed=2, scale=3, shift=1)
    grads(q, x1, torch.zeros_like(x1))
    lo = (0.75 * x1.min().clamp(max=0) + 0.25 * x2.min().clamp(max=0))
    hi = (0.75 * x1.max().clamp(min=0) + 0.25 * x2.max().clamp(min=0))
    g = rand(4, 6, 5, 5, seed=3)
    y, dx, _ = grads(q, x2, g)  # updates the EMA, then quantizes x2 with it
    s = (hi - lo) / 3
    z = torch.round(-lo / s)
    close(y, (torch.clamp(torch.round(x2 / s) + z, 0, 3) - z) * s)
    inside = (x2 >= (0 - z) * s) & (x2 <= (3 - z) * s)
    close(dx, g * inside)
    frozen = (q.lo.clone(), q.hi.clone())
    grads(q, x2 * 10, g, train=False)  # eval: the range does not move
    assert torch.equal(q.lo, frozen[0]) and torch.equal(q.hi, frozen[1])


# ----------------------------------------------------------------------------- LSQ
def lsq_expected(v, s, qn, qp, g, numel):
    """LSQ (Esser et al. 2020) eq. 1-3: value, dL/dv, dL/ds (times 1/sqrt(numel * Q_P))."""
    r = v / s
    value = torch.clamp(torch.round(r), -qn, qp) * s
    inside = (r >= -qn) & (r <= qp)
    dv = g * inside
    ds_elem = torch.where(r <= -qn, -qn * torch.ones_like(r),
                          torch.where(r >= qp, qp * torch.ones_like(r), torch.round(r) - r))
    return value, dv, g * ds_elem / math.sqrt(numel * qp)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_weight_init_value_and_gradients(granularity, bits):
    w, g = rand(6, 4, 3, 3, scale=0.3), rand(6, 4, 3, 3, seed=1)
    q = make(LSQ(bits, granularity), "weight")
    y, dw, params = grads(q, w, g)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    dims = per_channel(w) if granularity == "channel" else tuple(range(w.ndim))
    s = 2 * w.abs().mean(dim=dims, keepdim=True) / math.sqrt(qp)  # LSQ's step initialisation
    close(q.step.detach().reshape(-1), s.reshape(-1))
    with torch.no_grad():  # move the step away from its initial value: the gradient formula holds anywhere
        q.step.mul_(torch.linspace(0.7, 1.3, q.step.numel(), dtype=DT))
    s = q.step.detach().reshape(-1, 1, 1, 1) if granularity == "channel" else q.step.detach().reshape(())
    y, dw, params = grads(q, w, g)
    value, dv, ds = lsq_expected(w, s, qn, qp, g, w.numel())
    close(y, value)
    close(dw, dv)
    close(params["step"], ds.sum(dim=(1, 2, 3)) if granularity == "channel" else ds.sum().reshape(1))


@pytest.mark.parametrize("grad_numel", ["sample", "batch"])
def test_lsq_act_init_sign_value_and_gradients(grad_numel):
    x, g = rand(4, 6, 5, 5), rand(4, 6, 5, 5, seed=1)
    q = make(LSQ(3, grad_numel=grad_numel), "act")
    grads(q, x, g)
    s0 = 2 * x.abs().mean() / math.sqrt(3)  # signed (min < 0): Q_P = 3
    assert bool(q.signed)
    close(q.step.detach(), s0)
    with torch.no_grad():
        q.step.mul_(0.8)
    s = q.step.detach()
    y, dx, params = grads(q, x, g)
    n = x.numel() if grad_numel == "batch" else x[0].numel()
    value, dv, ds = lsq_expected(x, s, 4, 3, g, n)
    close(y, value)
    close(dx, dv)
    close(params["step"], ds.sum())
    # a non-negative first batch gives the unsigned range [0, 2^b - 1]
    u = make(LSQ(3), "act")
    xu = x.abs()
    grads(u, xu, g)
    assert not bool(u.signed)
    close(u.step.detach(), 2 * xu.abs().mean() / math.sqrt(7))
    close(grads(u, xu, g)[0], torch.clamp(torch.round(xu / u.step.detach()), 0, 7) * u.step.detach())


@pytest.mark.parametrize("spec", [LSQ(4), RLQ(4)])
def test_act_step_is_initialised_only_by_training_batches(spec):
    q = make(spec, "act", in_channels=6)
    val = rand(2, 6, 4, 4, scale=5)
    with pytest.warns(UserWarning, match="not initialised"):
        y, _, _ = grads(q, val, torch.ones_like(val), train=False)  # a sanity-check pass
    assert not bool(q.initialized) and q.step.item() == 1.0  # nothing stored from validation data
    s_tmp = 2 * val.abs().mean() / math.sqrt(7)
    close(y, torch.clamp(torch.round(val / s_tmp), -8, 7) * s_tmp)  # quantized on its own batch's step
    x = rand(2, 6, 4, 4, seed=4)
    grads(q, x, torch.ones_like(x))
    close(q.step.detach(), 2 * x.abs().mean() / math.sqrt(7))
    assert bool(q.initialized)


# ----------------------------------------------------------------------------- DoReFa
@pytest.mark.parametrize("rescale", [False, True])
def test_dorefa_weight_value_and_gradient_through_tanh_and_max(rescale):
    w, g = rand(6, 4, 3, 3, scale=0.5), rand(6, 4, 3, 3, seed=1)
    y, dw, _ = grads(make(DoReFa(2, rescale=rescale), "weight"), w, g)
    t = torch.tanh(w)
    m = t.abs().max()
    r = m if rescale else 1.0
    close(y, r * (2 * torch.round((t / (2 * m) + 0.5) * 3) / 3 - 1))
    # d/dw of r * tanh(w) / m (r constant), m = |tanh(w_j*)| at the arg-max j*
    sech2 = 1 - t ** 2
    expected = r * g * sech2 / m
    j = t.abs().argmax()
    flat = expected.reshape(-1).clone()
    flat[j] -= r * torch.sign(t.reshape(-1)[j]) * sech2.reshape(-1)[j] / m ** 2 * (g * t).sum()
    close(dw, flat.reshape(w.shape))


def test_dorefa_act_clips_to_unit_interval():
    x, g = rand(3, 5, 4, 4, scale=0.8, shift=0.4), rand(3, 5, 4, 4, seed=1)
    y, dx, _ = grads(make(DoReFa(3), "act"), x, g)
    close(y, torch.round(torch.clamp(x, 0, 1) * 7) / 7)
    close(dx, g * ((x >= 0) & (x <= 1)))


# ----------------------------------------------------------------------------- PACT
def test_pact_value_and_gradients_including_x_equal_alpha():
    q = make(PACT(2, init_alpha=2.5), "act")
    x = torch.cat([rand(200, scale=2, shift=1), torch.tensor([2.5, 2.5, 0.0, -0.3], dtype=DT)])
    g = rand(204, seed=1)
    y, dx, params = grads(q, x, g)
    a = 2.5
    close(y, torch.round(torch.clamp(x, 0, a) / (a / 3)) * (a / 3))
    close(dx, g * ((x >= 0) & (x < a)))  # PACT eq. 3: 1 on [0, alpha)
    close(params["alpha"], (g * (x >= a)).sum().reshape(()))  # all of x == alpha goes to alpha


# ----------------------------------------------------------------------------- mu-L2Q
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ul2q_weight_value_and_ste(granularity):
    w, g = rand(6, 4, 3, 3, scale=0.2, shift=0.05), rand(6, 4, 3, 3, seed=1)
    y, dw, _ = grads(make(UL2Q(2, granularity), "weight"), w, g)
    dims = per_channel(w) if granularity == "channel" else tuple(range(w.ndim))
    mu, sigma = w.mean(dim=dims, keepdim=True), w.std(dim=dims, keepdim=True, unbiased=False)
    alpha = PAPER_LAMBDA[2] * sigma
    expected = alpha * (torch.clamp(torch.round((w - mu) / alpha - 0.5), -2, 1) + 0.5) + mu
    close(y, expected, rtol=1e-4, atol=1e-4 * float(sigma.max()))  # lambda from the paper's 4 digits
    close(dw, g)


def test_ul2q_act_ema_and_clipped_gradient():
    q = make(UL2Q(2, momentum=0.5), "act")
    x1, x2 = rand(2, 3, 6, 6, scale=2, shift=1), rand(2, 3, 6, 6, seed=2)
    grads(q, x1, torch.zeros_like(x1))
    g = rand(2, 3, 6, 6, seed=3)
    y, dx, _ = grads(q, x2, g)
    mu = 0.5 * x1.mean() + 0.5 * x2.mean()
    sigma = 0.5 * x1.std(unbiased=False) + 0.5 * x2.std(unbiased=False)
    lam = zoo.quantizers.optimal_lambda(2)[0]
    alpha = lam * sigma
    code = torch.clamp(torch.round((x2 - mu) / alpha - 0.5), -2, 1)
    close(y, alpha * (code + 0.5) + mu)
    inside = (x2 >= mu - 1.5 * alpha) & (x2 <= mu + 1.5 * alpha)
    close(dx, g * inside)


# ----------------------------------------------------------------------------- binary
def test_xnor_weight_value_and_paper_gradient():
    w, g = rand(6, 4, 3, 3, scale=0.8), rand(6, 4, 3, 3, seed=1)
    y, dw, _ = grads(make(XNOR(), "weight"), w, g)
    n = 4 * 3 * 3
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    close(y, alpha * torch.where(w >= 0, 1.0, -1.0).to(DT))
    close(dw, g * (1.0 / n + alpha * (w.abs() <= 1)))  # XNOR-Net: dC/dW (1/n + alpha 1[|W| <= 1])


@pytest.mark.parametrize("spec", [XNOR(), ReAct()])
def test_react_weight_is_xnor_forward_with_unscaled_clipped_ste(spec):
    w, g = rand(6, 4, 3, 3, scale=0.8), rand(6, 4, 3, 3, seed=1)
    y, dw, _ = grads(make(spec, "weight"), w, g)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    close(y, alpha * torch.where(w >= 0, 1.0, -1.0).to(DT))
    if isinstance(spec, ReAct):
        close(dw, g * (w.abs() <= 1))


def sgn(t):
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


@pytest.mark.parametrize("progress,beta", [(0.0, 1.0), (0.3, 0.4), (0.5, 0.0), (0.9, 0.0)])
def test_ebb_two_basis_value_and_gradients_then_single_basis(progress, beta):
    """BinaryDM EBB: sigma1 sgn(w) + beta sigma2 sgn(w - sigma1 sgn(w)), sigma1 = mean|w| and sigma2 =
    mean|residual| per channel at init, beta = 1 - progress / decay_end (decay_end 0.5) down to 0;
    each sign passes the clipped straight-through gradient 1[|x| <= 1] (the authors' BinaryQuantize)."""
    w, g = rand(6, 4, 3, 3, scale=1.5), rand(6, 4, 3, 3, seed=1)
    q = make(EBB(decay_end=0.5), "weight")
    q.set_progress(progress)
    y, dw, dp = grads(q, w, g)
    s1 = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    r = w - s1 * sgn(w)
    s2 = r.abs().mean(dim=(1, 2, 3), keepdim=True)
    close(y, s1 * sgn(w) + beta * s2 * sgn(r))
    iw, ir = (w.abs() <= 1).to(DT), (r.abs() <= 1).to(DT)
    assert 0 < iw.mean() < 1 and 0 < ir.mean() < 1  # both clipping regions are exercised
    close(dw, g * (s1 * iw + beta * s2 * ir * (1 - s1 * iw)))
    close(dp["sigma1"], (g * (sgn(w) - beta * s2 * ir * sgn(w))).sum(dim=(1, 2, 3)))
    if beta:
        close(dp["sigma2"], (g * beta * sgn(r)).sum(dim=(1, 2, 3)))
    else:  # single basis: sigma2 is out of the graph
        assert dp["sigma2"] is None
    assert q.single_basis == (beta == 0.0)


def test_ebb_basis_weight_never_rises_and_export_needs_a_single_basis():
    w = rand(6, 4, 3, 3, scale=0.5)
    q = make(EBB(decay_end=0.5), "weight")
    q(w)
    with pytest.raises(ValueError, match="second basis.*decay_end = 0.5"):
        q.integer_form(w)
    for p, beta in [(0.1, 0.8), (0.25, 0.5), (0.1, 0.5), (0.5, 0.0), (0.0, 0.0)]:
        q.set_progress(p)
        assert float(q.beta) == pytest.approx(beta)
    codes, scale, zero = q.integer_form(w)
    close(scale, 2 * q.sigma1.detach())
    close(zero, torch.full((6,), 0.5, dtype=DT))
    assert torch.equal(codes, (w >= 0).to(torch.uint8))
    close(q(w), (codes.to(DT) - 0.5) * 2 * q.sigma1.detach().view(-1, 1, 1, 1))  # exactly +-sigma1
    fresh = make(EBB(), "weight")  # rebuilt from the packed form (fine-tuning a release): single basis
    rebuilt = fresh.restore(codes.to(DT), scale.to(DT), zero.to(DT))
    assert fresh.single_basis and torch.equal(fresh.integer_form(rebuilt)[0], codes)
    close(fresh.integer_form(rebuilt)[1], scale)
    fresh.set_progress(0.0)
    assert fresh.single_basis  # and stays so
    assert EBB(decay_end=0.0).decay_end == 0.0 and float(make(EBB(decay_end=0.0), "weight").beta) == 0.0
    with pytest.raises(ValueError, match=r"decay_end must be in \[0, 1\].*1.5"):
        EBB(decay_end=1.5)


def test_ebb_trained_past_decay_end_packs_at_one_bit_and_reloads_to_the_same_output(tmp_path):
    from zoo.quantizers import set_progress, to_packed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
    quantize(net, QuantConfig(weight=EBB(decay_end=0.5), act=LSQ(4)))
    w0 = net[0].weight.detach().clone()
    r0 = w0 - w0.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.where(w0 >= 0, 1.0, -1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in range(6):  # second basis present, then gone from step 3 on
        set_progress(net, step / 6)
        net.train()
        opt.zero_grad()
        net(torch.rand(4, 4, 6, 6)).square().mean().backward()
        opt.step()
    assert all(float(m.wq.beta) == 0.0 for m in net if hasattr(m, "wq"))
    s2 = net[0].wq.sigma2.detach()  # the second basis was trained while it existed:
    assert not torch.allclose(s2, r0.abs().mean(dim=(1, 2, 3)), rtol=1e-4, atol=0)  # moved from its init
    net.eval()
    x = torch.rand(3, 4, 6, 6)
    with torch.no_grad():
        y = net(x)
    packed = to_packed(__import__("copy").deepcopy(net))
    torch.testing.assert_close(packed(x), y, rtol=1e-5, atol=1e-6)
    w = net[2].weight
    stored = {n: b for n, b in packed[2].state_dict().items()}
    code_bytes = sum(t.numel() * t.element_size() for n, t in stored.items() if t.dtype == torch.uint8)
    assert code_bytes == w.numel() // 8  # one bit per weight


def test_sign_act_clipped_ste():
    x, g = rand(3, 4, 5, 5, scale=1.5), rand(3, 4, 5, 5, seed=1)
    y, dx, _ = grads(make(XNOR(), "act"), x, g)
    close(y, torch.where(x >= 0, 1.0, -1.0).to(DT))
    close(dx, g * (x.abs() <= 1))


def ede(t_min, t_max, p):
    """IR-Net EDE schedule, written from the paper: t = t_min 10^(p log10(t_max / t_min)), k = max(1/t, 1)."""
    t = t_min * 10 ** (p * math.log10(t_max / t_min))
    return t, max(1 / t, 1.0)


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_irnet_weight_libra_pb_and_ede_through_the_standardisation(progress, magnitude):
    """magnitude=True: the power of two of E|w - mean| (here 2^-2 or 2^-3) instead of E|w_std| (1)."""
    w, g = rand(6, 4, 3, 3, scale=0.2, shift=0.03), rand(6, 4, 3, 3, seed=1)
    q = make(IRNet(t_min=0.1, t_max=10.0, magnitude=magnitude), "weight")
    q.set_progress(progress)
    t, k = ede(0.1, 10.0, progress)
    y, dw, _ = grads(q, w, g)
    n = w[0].numel()
    mu = w.mean(dim=(1, 2, 3), keepdim=True)
    sd = w.std(dim=(1, 2, 3), keepdim=True)  # unbiased, as the authors' torch.std
    z = (w - mu) / sd
    shift = 2.0 ** torch.round(torch.log2(((w - mu) if magnitude else z).abs().mean(dim=(1, 2, 3), keepdim=True)))
    assert set(shift.flatten().tolist()) <= ({2.0 ** -2, 2.0 ** -3} if magnitude else {1.0})
    close(y, shift * torch.where(z >= 0, 1.0, -1.0).to(DT))
    h = g * shift * k * t * (1 - torch.tanh(t * z) ** 2)  # dL/dz (EDE on sign, power-of-two scale a constant)
    c = w - mu
    dz = (h - h.mean(dim=(1, 2, 3), keepdim=True)) / sd \
        - c * (h * c).sum(dim=(1, 2, 3), keepdim=True) / ((n - 1) * sd ** 3)
    close(dw, dz, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("progress", [0.0, 0.5, 0.9])
def test_irnet_act_ede_gradient(progress):
    q = make(IRNet(t_min=0.2, t_max=5.0), "act")
    q.set_progress(progress)
    t, k = ede(0.2, 5.0, progress)
    x, g = rand(3, 4, 5, 5), rand(3, 4, 5, 5, seed=1)
    y, dx, _ = grads(q, x, g)
    close(y, torch.where(x >= 0, 1.0, -1.0).to(DT))
    close(dx, g * k * t * (1 - torch.tanh(t * x) ** 2))


def test_rsign_threshold_and_approxsign_gradients():
    q = make(ReAct(), "act", in_channels=4)
    with torch.no_grad():
        q.beta.copy_(torch.tensor([0.3, -0.2, 0.0, 0.5], dtype=DT))
    x, g = rand(3, 4, 5, 5, scale=0.8), rand(3, 4, 5, 5, seed=1)
    y, dx, params = grads(q, x, g)
    d = x - q.beta.detach().view(1, 4, 1, 1)
    close(y, torch.where(d >= 0, 1.0, -1.0).to(DT))
    approx = torch.where(d.abs() < 1, 2 - 2 * d.abs(), torch.zeros_like(d))  # Bi-Real ApproxSign'
    close(dx, g * approx)
    close(params["beta"], -(g * approx).sum(dim=(0, 2, 3)))


def test_rprelu_value_and_gradients():
    m = RPReLU(3).to(DT)
    with torch.no_grad():
        m.gamma.copy_(torch.tensor([0.2, -0.1, 0.0], dtype=DT))
        m.zeta.copy_(torch.tensor([0.5, 0.0, -0.3], dtype=DT))
        m.slope.copy_(torch.tensor([0.25, 0.1, 0.4], dtype=DT))
    x, g = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)
    x.requires_grad_(True)
    y = m(x)
    (y * g).sum().backward()
    v = lambda p: p.detach().view(1, 3, 1, 1)  # noqa: E731
    u = x.detach() - v(m.gamma)
    close(y.detach(), torch.where(u >= 0, u, v(m.slope) * u) + v(m.zeta))
    du = torch.where(u >= 0, torch.ones_like(u), v(m.slope).expand_as(u))
    close(x.grad, g * du)
    close(m.gamma.grad, -(g * du).sum(dim=(0, 2, 3)))
    close(m.zeta.grad, g.sum(dim=(0, 2, 3)))
    close(m.slope.grad, (g * torch.where(u >= 0, 0.0, u)).sum(dim=(0, 2, 3)))


# ----------------------------------------------------------------------------- RLQ (QuantSR)
def phi_prime(r, k):
    """Slope of QuantSR's redistribution phi(t) = floor(t) + tanh(k (frac(t) - 1/2)) / (2 tanh(k/2)) + 1/2."""
    frac = r - torch.floor(r)
    return k * (1 - torch.tanh(k * (frac - 0.5)) ** 2) / (2 * math.tanh(k / 2))


def rlq_expected(v, s, qn, qp, g, numel, k):
    r = v / s
    rc = torch.clamp(r, -qn, qp)
    inside = (r >= -qn) & (r <= qp)
    value = torch.round(rc) * s
    dv = g * inside * phi_prime(rc, k)
    ds_elem = torch.where(inside, torch.round(rc) - r * phi_prime(rc, k), rc)
    return value, dv, g * ds_elem / math.sqrt(numel * qp)


@pytest.mark.parametrize("granularity, phi_k", [("tensor", 1.0), ("channel", 3.0)])
def test_rlq_weight_value_and_phi_gradients(granularity, phi_k):
    w, g = rand(6, 4, 3, 3, scale=0.3), rand(6, 4, 3, 3, seed=1)
    q = make(RLQ(3, granularity, phi_k=phi_k), "weight")
    grads(q, w, g)
    dims = per_channel(w) if granularity == "channel" else tuple(range(w.ndim))
    close(q.step.detach().reshape(-1), (2 * w.abs().mean(dim=dims) / math.sqrt(3)).reshape(-1))
    with torch.no_grad():
        q.step.mul_(0.6)
    s = q.step.detach().reshape(-1, 1, 1, 1) if granularity == "channel" else q.step.detach().reshape(())
    y, dw, params = grads(q, w, g)
    value, dv, ds = rlq_expected(w, s, 4, 3, g, w.numel(), phi_k)
    close(y, value)
    close(dw, dv)
    close(params["step"], ds.sum(dim=(1, 2, 3)) if granularity == "channel" else ds.sum().reshape(1))


@pytest.mark.parametrize("grad_numel", ["batch", "sample"])
def test_rlq_act_shift_value_and_gradients(grad_numel):
    q = make(RLQ(2, grad_numel=grad_numel), "act", in_channels=4)
    x, g = rand(3, 4, 5, 5), rand(3, 4, 5, 5, seed=1)
    grads(q, x, g)
    assert bool(q.signed)
    close(q.step.detach(), 2 * x.abs().mean() / math.sqrt(1))
    tau = torch.tensor([0.3, -0.2, 0.0, 0.1], dtype=DT)
    with torch.no_grad():
        q.tau.copy_(tau)
        q.step.mul_(0.5)
    s = q.step.detach()
    y, dx, params = grads(q, x, g)
    n = x.numel() if grad_numel == "batch" else x[0].numel()  # the authors: the whole tensor
    value, dv, ds = rlq_expected(x + tau.view(1, 4, 1, 1), s, 2, 1, g, n, 1.0)
    close(y, value)
    close(dx, dv)
    close(params["tau"], dv.sum(dim=(0, 2, 3)))
    close(params["step"], ds.sum())


def test_rlq_sign_decision_tolerates_float_noise():
    x = rand(2, 4, 3, 3).abs()
    x[0, 0, 0, 0] = -1e-6  # a ReLU output touched by float noise stays unsigned (the authors' -1e-5)
    q = make(RLQ(2), "act", in_channels=4)
    grads(q, x, torch.ones_like(x))
    assert not bool(q.signed)
    x[0, 0, 0, 0] = -1e-4
    q = make(RLQ(2), "act", in_channels=4)
    grads(q, x, torch.ones_like(x))
    assert bool(q.signed)


def test_rlq_phi_through_a_quantized_conv():
    """QuantSR's phi reaches the input, the weight, both steps and tau through a QuantConv2d."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1, bias=True)
    net = torch.nn.Sequential(conv)
    quantize(net, QuantConfig(weight=RLQ(2, phi_k=2.0), act=RLQ(2, phi_k=2.0)))
    layer = net[0].to(DT)
    x = rand(2, 4, 6, 6)
    layer.train()
    layer(x)  # initialise both steps
    with torch.no_grad():
        layer.aq.tau.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3], dtype=DT))
        layer.aq.step.mul_(0.7)
        layer.wq.step.mul_(1.2)
    gout = rand(2, 5, 6, 6, seed=5)
    xr = x.clone().requires_grad_(True)
    (layer(xr) * gout).sum().backward()
    sa, sw = layer.aq.step.detach(), layer.wq.step.detach()
    tau = layer.aq.tau.detach().view(1, 4, 1, 1)
    w = layer.weight.detach()
    ones = torch.ones_like(x)
    a_val, _, _ = rlq_expected(x + tau, sa, 2, 1, ones, 1, 2.0)
    w_val, _, _ = rlq_expected(w, sw, 2, 1, torch.ones_like(w), 1, 2.0)
    g_a = torch.nn.grad.conv2d_input(x.shape, w_val, gout, padding=1)  # dL/d(quantized input)
    g_w = torch.nn.grad.conv2d_weight(a_val, w.shape, gout, padding=1)  # dL/d(quantized weight)
    _, dx, dsa = rlq_expected(x + tau, sa, 2, 1, g_a, x.numel(), 2.0)
    _, dw, dsw = rlq_expected(w, sw, 2, 1, g_w, w.numel(), 2.0)
    close(xr.grad, dx, rtol=1e-9, atol=1e-10)
    close(layer.weight.grad, dw, rtol=1e-9, atol=1e-10)
    close(layer.aq.tau.grad, dx.sum(dim=(0, 2, 3)), rtol=1e-9, atol=1e-10)
    close(layer.aq.step.grad, dsa.sum(), rtol=1e-9, atol=1e-10)
    close(layer.wq.step.grad, dsw.sum().reshape(1), rtol=1e-9, atol=1e-10)
    close(layer.bias.grad, gout.sum(dim=(0, 2, 3)))


# ----------------------------------------------------------------------------- PAMS
def test_pams_weight_symmetric_max_and_ste():
    w, g = rand(6, 4, 3, 3, scale=0.3), rand(6, 4, 3, 3, seed=1)
    y, dw, _ = grads(make(PAMS(3), "weight"), w, g)
    s = w.abs().max() / 3
    close(y, torch.clamp(torch.round(w / s), -3, 3) * s)
    close(dw, g)


def test_pams_act_alpha_init_value_and_gradients():
    q = make(PAMS(3), "act")
    x, g = rand(3, 4, 5, 5, scale=1.5), rand(3, 4, 5, 5, seed=1)
    grads(q, x, g)
    close(q.alpha.detach(), x.abs().max())  # alpha <- max|x| of the first training batch
    with torch.no_grad():
        q.alpha.fill_(1.2)
    y, dx, params = grads(q, x, g)
    a, n = 1.2, 3
    s = a / n
    close(y, torch.round(torch.clamp(x, -a, a) / s) * s)
    inside = x.abs() <= a
    close(dx, g * inside)
    dalpha = torch.where(inside, torch.round(x / s) / n - x / a, torch.sign(x))
    close(params["alpha"], (g * dalpha).sum())


# ----------------------------------------------------------------------------- N2UQ
@pytest.mark.parametrize("bits", [2, 3])
def test_n2uq_weight_entropy_preserving_value_and_gradient(bits):
    w, g = rand(6, 4, 3, 3, scale=0.2, shift=0.02), rand(6, 4, 3, 3, seed=1)
    y, dw, _ = grads(make(N2UQ(bits), "weight"), w, g)
    n = 2 ** bits - 1
    s = (n / 2 ** (bits - 1)) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
    close(y, s * (torch.round((torch.clamp(w / s, -1, 1) + 1) * n / 2) * 2 / n - 1))
    assert y.unique().numel() <= 2 ** bits * 6 and not (y == 0).any()  # no zero level
    close(dw, g / s)  # no clip mask, no gradient through s


@pytest.mark.parametrize("bits", [2, 3])
def test_n2uq_act_thresholds_value_and_gste_gradients(bits):
    q = make(N2UQ(bits), "act")
    n = 2 ** bits - 1
    delta = 2 / n
    a = torch.linspace(0.4, 0.9, n, dtype=DT)
    s0, b1, b2 = -0.1, 1.3, 0.8
    with torch.no_grad():
        q.a.copy_(a), q.start.fill_(s0), q.beta1.fill_(b1), q.beta2.fill_(b2)
    x, g = rand(4, 3, 5, 5, scale=1.5, shift=0.8), rand(4, 3, 5, 5, seed=1)
    y, dx, params = grads(q, x, g)
    d = s0 + torch.cat([torch.zeros(1, dtype=DT), torch.cumsum(a, 0)])  # break points d_0..d_n
    thr = d[:-1] + a / 2  # T_i: interval mid-points
    u = b1 * x
    k = (u[..., None] > thr).sum(-1).to(DT)
    close(y, b2 * delta * k)
    dx_e = torch.zeros_like(x)
    da_e = torch.zeros(n, dtype=DT)
    ds_e = torch.zeros((), dtype=DT)
    db1_e = torch.zeros((), dtype=DT)
    for i in range(1, n + 1):  # interval i: d_(i-1) < u <= d_i
        m = (u > d[i - 1]) & (u <= d[i])
        gi = g * m
        dx_e += gi * b1 * b2 * delta / a[i - 1]
        da_e[i - 1] += (gi * -b2 * delta * (u - d[i - 1]) / a[i - 1] ** 2).sum()
        da_e[: i - 1] += (gi * -b2 * delta / a[i - 1]).sum()
        ds_e += (gi * -b2 * delta / a[i - 1]).sum()
        db1_e += (gi * x * b2 * delta / a[i - 1]).sum()
    close(dx, dx_e)
    close(params["a"], da_e)
    close(params["start"], ds_e)
    close(params["beta1"], db1_e)
    close(params["beta2"], (g * delta * k).sum())  # the hard value over beta2, as the authors' code


def test_n2uq_initialisation_is_uniform_rounding_on_0_2():
    q = make(N2UQ(2), "act")
    x = torch.linspace(-0.5, 2.5, 61, dtype=DT) + 1e-3  # off the thresholds (i - 1/2) 2/3
    y, dx, _ = grads(q, x, torch.ones_like(x))
    # the initial lengths 2/3 are float32 parameters: compare to float32 precision
    close(y, torch.clamp(torch.round(x / (2 / 3)), 0, 3) * (2 / 3), rtol=1e-6, atol=1e-7)
    close(dx, ((x > 0) & (x <= 2)).to(DT), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("spec", [LSQ(4, "channel"), MinMax(8, "channel"), UL2Q(2, "channel"), RLQ(4, "channel")])
def test_per_channel_activations_are_refused_naming_what_is_supported(spec):
    with pytest.raises(ValueError, match=r"not supported for activations.*granularity in \['tensor'\]"):
        QuantConfig(weight=spec, act=spec)
    with pytest.raises(ValueError, match="not supported for activations"):
        QuantConfig(overrides={"fc": LayerQuant(LSQ(4), spec)})
    with pytest.raises(ValueError, match="not supported for activations"):
        QuantConfig.from_dict({"act": spec.to_dict()})
    QuantConfig(weight=spec, act=type(spec)(spec.bits))  # per-channel weights are fine


def test_grad_numel_defaults_and_validation():
    assert LSQ(4).grad_numel == "sample" and RLQ(4).grad_numel == "batch"
    with pytest.raises(ValueError, match=r"grad_numel must be one of \('sample', 'batch'\)"):
        LSQ(4, grad_numel="channel")


def test_packed_n2uq_and_rescaled_dorefa_match_the_training_form():
    import copy

    from zoo.quantizers import to_packed

    for lq in (LayerQuant(N2UQ(2), N2UQ(2)), LayerQuant(DoReFa(2, rescale=True), DoReFa(2))):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(5, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64, 3))
        quantize(net, QuantConfig(overrides={"*": lq}))
        net.train()
        net(torch.rand(4, 5, 4, 4)).sum().backward()
        if isinstance(lq.act, N2UQ):
            with torch.no_grad():
                for m in net.modules():
                    if hasattr(m, "beta1"):
                        m.a.uniform_(0.2, 1.0), m.start.fill_(0.1), m.beta1.fill_(1.7)
        net.eval()
        x = torch.rand(3, 5, 4, 4)
        with torch.no_grad():
            y = net(x)
        packed = to_packed(copy.deepcopy(net))
        assert packed[0].act_mode == ("threshold" if isinstance(lq.act, N2UQ) else "affine")
        torch.testing.assert_close(packed(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("spec", [MinMax(3, "channel"), LSQ(3, "channel"), UL2Q(2, "channel"), RLQ(3, "channel"),
                                  XNOR(), IRNet(), IRNet(magnitude=True), ReAct(), N2UQ(2), EBB()])
def test_transposed_conv_weights_are_per_output_channel_on_axis_1(spec):
    """ConvTranspose2d weights are [C_in, C_out, kh, kw]: quantizing them along axis 1 equals
    quantizing the transposed tensor along axis 0, values and gradients."""
    w, g = rand(4, 6, 3, 3, scale=0.3), rand(4, 6, 3, 3, seed=1)
    q1 = build_quantizer(spec, "weight", _Layer((4, 6, 3, 3), ch_axis=1)).to(DT)
    q0 = build_quantizer(spec, "weight", _Layer((6, 4, 3, 3), ch_axis=0)).to(DT)
    y1, dw1, _ = grads(q1, w, g)
    y0, dw0, _ = grads(q0, w.transpose(0, 1), g.transpose(0, 1))
    close(y1, y0.transpose(0, 1))
    close(dw1, dw0.transpose(0, 1))
