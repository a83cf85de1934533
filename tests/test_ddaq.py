"""DDAQ (zoo.ptq.ddaq): the two discriminators' losses by hand, the Hessian-trace layer prior against
the exact Hessian, the producer map, the generator, and the adversarial game's two directions."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo.ptq
from zoo.ptq import ddaq


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    for bn in (net[1], net[4]):  # running statistics of "real" images some generator can match
        bn.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(256, 1, 6, 6) ** 3)
    return net.eval()


def test_bn_stat_loss_by_hand():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0])), bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    bn.eps = 0.0
    # channel 0 holds 1, 3 (mean 2, std 1); channel 1 holds -1, -1 (mean -1, std 0)
    x = torch.tensor([[[[1.0]], [[-1.0]]], [[[3.0]], [[-1.0]]]])
    by_hand = (2 - 0.5) ** 2 + (1 - 2) ** 2 + 0.0 + (0 - 1) ** 2
    assert float(ddaq.bn_stat_loss([x], [bn], [1.0])) == pytest.approx(by_hand)
    assert float(ddaq.bn_stat_loss([x, x], [bn, bn], [0.5, 3.0])) == pytest.approx(3.5 * by_hand)


def test_discrepancy_by_hand():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))  # sigma 2 and 0.5
    bn.eps = 0.0
    a = torch.zeros(1, 2, 1, 2)
    b = torch.tensor([[[[2.0, 0.0]], [[1.0, -1.0]]]])  # |a-b|/sigma: 1, 0, 2, 2 -> mean 1.25
    logits_t, logits_s = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = torch.softmax(logits_t, 1)
    kl = float((p * (p.log() - torch.log(torch.tensor([0.5, 0.5])))).sum())
    got = ddaq.discrepancy([a], [b], logits_t, logits_s, [bn], [2.0])
    assert float(got) == pytest.approx(2.0 * 1.25 + kl)
    # non-classifier outputs: mean squared error
    got = ddaq.discrepancy([a], [a], torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), [bn], [1.0])
    assert float(got) == pytest.approx(1.0)


def test_hessian_trace_matches_the_exact_hessian():
    torch.manual_seed(1)
    lin = nn.Linear(3, 4)
    net = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(5, 3)
    target = net(x).argmax(1).detach()
    w0 = lin.weight.detach().clone()

    def loss_of(w):  # the loss written out, as a function of the first layer's weight
        h = torch.tanh(x @ w.t() + lin.bias)
        return F.cross_entropy(net[2](h), target)

    exact = float(torch.autograd.functional.hessian(loss_of, w0).reshape(12, 12).diagonal().sum()) / 12
    est = ddaq.hessian_trace(net, [lin], x, probes=3000, seed=0)[0]
    assert est == pytest.approx(exact, rel=0.05)
    assert lin.weight.grad is None  # nothing accumulated into the model


def test_producers_and_importance():
    net = _net()
    bns = [net[1], net[4]]
    assert ddaq.producers(net, bns, torch.rand(2, 1, 5, 5)) == [net[0], net[3]]

    class Sum(nn.Module):  # a BatchNorm after an addition has no single producer
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.a(x) + self.b(x)).flatten(1)

    s = Sum().eval()
    assert ddaq.producers(s, [s.bn], torch.rand(2, 1, 3, 3)) == [None]
    assert ddaq.importance(s, [s.bn], torch.rand(2, 1, 3, 3)) == [1.0]
    x = torch.rand(8, 1, 5, 5)
    t = ddaq.hessian_trace(net, [net[0], net[3]], x, probes=8, seed=0)
    w = ddaq.importance(net, bns, x, probes=8, seed=0)
    mean = (abs(t[0]) + abs(t[1])) / 2
    assert w == pytest.approx([max(t[0] / mean, 0.01), max(t[1] / mean, 0.01)])


def test_generator_shapes_range_and_determinism():
    g = ddaq.Generator((3, 30, 22), classes=4, latent=8, width=4)
    x = ddaq.sample(g, 10, seed=3, batch_size=4)
    assert x.shape == (10, 3, 30, 22) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x, ddaq.sample(g, 10, seed=3, batch_size=4))
    assert not torch.equal(x, ddaq.sample(g, 10, seed=4, batch_size=4))


def test_warm_up_matches_bn_statistics_better_than_its_start():
    net = _net()
    bns = [net[1], net[4]]
    store = [None, None]
    hooks = [bn.register_forward_pre_hook(ddaq._keep(store, i)) for i, bn in enumerate(bns)]

    def mismatch(g):
        with torch.no_grad():
            net(ddaq.sample(g, 64, seed=9))
            return float(ddaq.bn_stat_loss(store, bns, [1.0, 1.0]))

    torch.manual_seed(0)
    start = ddaq.Generator((1, 6, 6), 3, latent=16, width=8)
    trained = ddaq.warm_up(net, (1, 6, 6), 150, latent=16, width=8, lr=1e-2, ce=0.0, seed=0, progress=False)
    assert mismatch(trained) < 0.5 * mismatch(start)
    for h in hooks:
        h.remove()
    assert all(p.grad is None for p in net.parameters())  # the float model is only read


def _quantized(net):
    x = torch.rand(32, 1, 6, 6)
    return zoo.ptq.calibrate(net, zoo.ptq.ptq_config(2), x, "minmax", progress=False)


def _discrepancy_on(fmodel, qmodel, x):
    fb, qb = ddaq.bn_layers(fmodel), ddaq.bn_layers(qmodel)
    fs, qs = [None] * len(fb), [None] * len(qb)
    hooks = [b.register_forward_pre_hook(ddaq._keep(fs, i)) for i, b in enumerate(fb)]
    hooks += [b.register_forward_pre_hook(ddaq._keep(qs, i)) for i, b in enumerate(qb)]
    with torch.no_grad():
        d = float(ddaq.discrepancy(fs, qs, fmodel(x), qmodel(x), fb, [1.0] * len(fb)))
    for h in hooks:
        h.remove()
    return d


def test_the_quantized_model_learns_to_agree_with_the_float_one():
    net = _net()
    q = _quantized(net)
    torch.manual_seed(0)
    g = ddaq.Generator((1, 6, 6), 3, latent=16, width=8)
    x = ddaq.sample(copy.deepcopy(g), 64, seed=5)
    before = _discrepancy_on(net, q, x)
    ddaq.adversarial(q, net, g, 60, batch_size=32, lr_g=1e-12, lr_q=1e-2, beta=0.0, probes=2, progress=False)
    assert _discrepancy_on(net, q, x) < 0.7 * before
    assert all(p.grad is None for p in net.parameters())


def test_the_generator_seeks_disagreement():
    net = _net()
    q = _quantized(net)
    torch.manual_seed(0)
    g = ddaq.Generator((1, 6, 6), 3, latent=16, width=8)
    frozen = copy.deepcopy(q)
    start = _discrepancy_on(net, frozen, ddaq.sample(copy.deepcopy(g), 64, seed=5))
    hist = ddaq.adversarial(q, net, g, 40, batch_size=32, lr_g=1e-2, lr_q=1e-12, beta=100.0, ce=0.0,
                            layer_importance=False, progress=False)
    assert _discrepancy_on(net, frozen, ddaq.sample(g, 64, seed=5)) > 1.5 * start
    assert hist["layer_weights"] == [1.0, 1.0] and len(hist["quantized"]) == 40


def test_errors():
    net = _net()
    with pytest.raises(ValueError, match="steps=0 is not valid; valid: an integer >= 1"):
        ddaq.warm_up(net, (1, 6, 6), 0)
    with pytest.raises(ValueError, match="lr_q=0"):
        ddaq.adversarial(_quantized(net), net, ddaq.Generator((1, 6, 6), 3), 1, lr_q=0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        ddaq.warm_up(nn.Sequential(nn.Conv2d(1, 1, 1)), (1, 6, 6), 1)


# ------------------------------------------------------------------------------ CoLeQ
def test_info_nce_by_hand():
    import math

    from zoo.ptq import coleq

    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    pos, negs = 0.6 / tau, [0.0 / tau, -1.0 / tau]
    by_hand = -(pos - math.log(math.exp(pos) + sum(math.exp(v) for v in negs)))
    assert float(coleq.info_nce(q, k, queue, tau)) == pytest.approx(by_hand)
    assert float(coleq.info_nce(q, k, None, tau)) == pytest.approx(0.0, abs=1e-7)  # no negatives yet


def test_tied_decoder_is_the_encoders_transpose():
    """decode(f) = J1^T relu(J2^T f): the vector-Jacobian products of the two convolutions, which
    autograd computes independently of the decoder's code."""
    from zoo.ptq import coleq

    torch.manual_seed(0)
    enc = coleq.Encoder(1, width=3)
    x0 = torch.rand(2, 1, 12, 12)
    h0 = torch.rand(2, 3, 6, 6)
    f = torch.randn(2, 6, 3, 3)
    _, t2 = torch.autograd.functional.vjp(enc.c2, h0, f)
    _, t1 = torch.autograd.functional.vjp(enc.c1, x0, torch.relu(t2))
    assert torch.allclose(enc.decode(f, (12, 12)), t1, atol=1e-6)
    assert enc(torch.rand(2, 1, 13, 11)).shape == (2, 6, 4, 3)  # odd sizes are padded
    assert enc.decode(torch.randn(2, 6, 4, 3), (13, 11)).shape == (2, 1, 13, 11)


def test_views_flip_and_shift_within_bounds():
    from zoo.ptq import coleq

    x = torch.arange(36.0).view(1, 1, 6, 6).repeat(16, 1, 1, 1).requires_grad_(True)
    v = coleq.view(x, torch.Generator().manual_seed(0), shift=1)
    assert v.shape == x.shape
    rows = v[:, 0, 2, 1:5].detach()  # an inner stretch of a row: itself, flipped, and/or shifted by <= 1
    base = x[0, 0].detach()
    allowed = [torch.flip(base, [1]) if f else base for f in (0, 1)]
    ok = [any(torch.equal(r, a[2 + dy, 1 + dx:5 + dx]) for a in allowed for dy in (-1, 0, 1) for dx in (-1, 0, 1))
          for r in rows]
    assert all(ok)
    v.sum().backward()
    assert float(x.grad.sum()) == pytest.approx(16 * 36)  # every output pixel comes from one input pixel


def test_coleq_training_learns_recovery_and_agreement():
    from zoo.ptq import coleq

    net = _net()
    q = _quantized(net)
    g = ddaq.warm_up(net, (1, 6, 6), 20, batch_size=32, latent=16, width=8, progress=False)
    x = ddaq.sample(copy.deepcopy(g), 64, seed=5)

    def kl():  # what the quantized model is trained on: the output discrepancy
        with torch.no_grad():
            return float(ddaq.output_discrepancy(q(x), net(x)))

    before = kl()
    hist = coleq.train(q, net, g, 80, batch_size=16, lr_q=1e-2, lr_e=1e-2, queue=64, recover=8, width=4,
                       progress=False)
    assert kl() < 0.7 * before
    rec = hist["reconstruction"]
    assert sum(rec[-10:]) < 0.5 * sum(rec[:10])  # the tied decoder learns to invert the encoder
    assert hist["recovered"].shape[1:] == (1, 6, 6) and float(hist["recovered"].min()) >= 0
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="queue=8 is not valid; valid: an integer >= batch_size"):
        coleq.train(q, net, g, 1, batch_size=16, queue=8)


def test_synthesize_ddaq_gives_the_warmed_up_generators_samples():
    net = _net()
    x = zoo.ptq.synthesize(net, "ddaq", n=5, seed=2, shape=(1, 6, 6), iters=3, progress=False)
    g = ddaq.warm_up(net, (1, 6, 6), 3, seed=2, progress=False)
    assert torch.equal(x, ddaq.sample(g, 5, seed=2))
    assert x.shape == (5, 1, 6, 6) and not net.training
