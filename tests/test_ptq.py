"""Post-training quantization (zoo.ptq): range estimators, calibration, bias correction, data-free
synthesis losses — each against numbers or rules written down here, independently of the code."""
import numpy as np
import pytest
import torch
from torch import nn

import zoo
import zoo.ptq
from zoo.quantizers import quantized_layers


# ------------------------------------------------------------------------------ estimators
def test_minmax_and_percentile_ranges_by_hand():
    x = torch.tensor([-1.0, 0.5, 3.0])
    assert zoo.ptq.estimate_range(x, 8, "minmax") == (-1.0, 3.0)
    assert zoo.ptq.estimate_range(torch.tensor([0.5, 2.0]), 8, "minmax") == (0.0, 2.0)  # 0 always inside
    x = torch.arange(-50, 51).float()  # 101 values: the 90th percentile is 40, the 10th is -40
    lo, hi = zoo.ptq.estimate_range(x, 8, "percentile", percentile=90)
    assert lo == pytest.approx(-40.0) and hi == pytest.approx(40.0)


def _mse_by_hand(x, lo, hi, bits):
    n = 2 ** bits - 1
    s = max((hi - lo) / n, 1e-8)
    z = np.round(-lo / s)
    q = np.clip(np.round(x / s) + z, 0, n)
    return float(np.mean(((q - z) * s - x) ** 2))


def test_mse_range_is_the_best_on_its_grid():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4000), [25.0, -18.0]])  # two outliers
    lo0, hi0 = x.min(), x.max()
    lo, hi = zoo.ptq.estimate_range(torch.tensor(x), 4, "mse", steps=50)
    errs = {a: _mse_by_hand(x, a / 50 * lo0, a / 50 * hi0, 4) for a in range(1, 51)}
    best = min(errs.values())
    assert _mse_by_hand(x, lo, hi, 4) == pytest.approx(best, rel=1e-6)
    assert best < 0.5 * errs[50]  # clipping the outliers beats the full range by far here
    assert hi < hi0 and lo > lo0


def test_estimator_errors():
    with pytest.raises(ValueError, match="unknown range estimator 'max'; valid"):
        zoo.ptq.estimate_range(torch.ones(3), 8, "max")
    with pytest.raises(ValueError, match="percentile=40"):
        zoo.ptq.estimate_range(torch.randn(10), 8, "percentile", percentile=40)
    with pytest.raises(ValueError, match="wbits=1 is not valid for PTQ; valid: integers 2..8"):
        zoo.ptq.ptq_config(1)


# ------------------------------------------------------------------------------ calibration
def _tiny(bias=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5)).eval()


def test_calibrated_ranges_are_the_float_inputs_extremes():
    net = _tiny()
    net[1].running_mean.normal_(), net[1].running_var.uniform_(0.5, 2)
    data = torch.randn(40, 3, 6, 6)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, k=k: seen.setdefault(k, []).append(a[0]))
             for k, m in (("0", net[0]), ("3", net[3]), ("6", net[6]))]
    with torch.no_grad():
        net(data)
    for h in hooks:
        h.remove()
    q = zoo.ptq.calibrate(net, zoo.ptq.ptq_config(8), data, "minmax", batch_size=16, progress=False)
    layers = dict(quantized_layers(q))
    for k in ("0", "3", "6"):
        x = torch.cat(seen[k])
        assert float(layers[k].aq.lo) == pytest.approx(min(float(x.min()), 0.0))
        assert float(layers[k].aq.hi) == pytest.approx(max(float(x.max()), 0.0))
    assert isinstance(net[0], nn.Conv2d) and type(net[0]) is nn.Conv2d  # the float model is untouched
    with torch.no_grad():
        y, yq = net(data), zoo.to_packed(q)(data)
    assert (yq - y).norm() / y.norm() < 0.02  # W8A8 with exact ranges: close to float


def test_bias_correction_matches_the_float_output_mean():
    layer = nn.Sequential(nn.Conv2d(4, 6, 3, bias=True)).eval()
    torch.manual_seed(1)
    data = torch.randn(32, 4, 7, 7) + 0.7  # a non-zero input mean makes the weight error biased
    cfg = zoo.QuantConfig(weight=zoo.MinMax(2, granularity="channel"), act=None)
    with torch.no_grad():
        ref = layer(data).mean(dim=(0, 2, 3))
        plain = zoo.ptq.calibrate(layer, cfg, data, "minmax", progress=False)(data).mean(dim=(0, 2, 3))
        fixed = zoo.ptq.calibrate(layer, cfg, data, "minmax", bias_correction=True,
                                  progress=False)(data).mean(dim=(0, 2, 3))
    assert (plain - ref).abs().max() > 1e-2
    assert torch.allclose(fixed, ref, atol=1e-5)


def test_calibrate_refuses_learned_activation_quantizers():
    with pytest.raises(ValueError, match="PTQ calibrates MinMax activation quantizers, got LSQ"):
        zoo.ptq.calibrate(_tiny(), zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)), torch.rand(4, 3, 6, 6))


# ------------------------------------------------------------------------------ data-free losses
def _bn_inputs():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[2.0, -2.0]]]])  # N=2, C=2, 1x2
    return bn, x


def test_zeroq_loss_by_hand():
    bn, x = _bn_inputs()
    # channel 0 over the batch: values 1, 3, 0, 0 -> mean 1, var 1.5; channel 1: 0, 0, 2, -2 -> 0, 2
    eps = bn.eps
    want = ((1 - 0.5) ** 2 + (0 + 1.0) ** 2 + (np.sqrt(1.5 + eps) - np.sqrt(4 + eps)) ** 2
            + (np.sqrt(2 + eps) - np.sqrt(0.25 + eps)) ** 2)
    assert float(zoo.ptq.zeroq_loss([x], [bn])) == pytest.approx(want, rel=1e-6)


def test_dsg_slack_is_zero_inside_the_margin_and_squared_outside():
    bn, x = _bn_inputs()
    eps = bn.eps
    # per-sample statistics: sample 0: ch0 mean 2, sd 1; ch1 mean 0, sd 0. sample 1: ch0 0, 0; ch1 0, 2
    mu = np.array([[2.0, 0.0], [0.0, 0.0]])
    sd = np.sqrt(np.array([[1.0, 0.0], [0.0, 4.0]]) + eps)
    gm, gs = np.abs(mu - [0.5, -1.0]), np.abs(sd - np.sqrt(np.array([4.0, 0.25]) + eps))
    big = (torch.tensor(gm.max(0)) + 1, torch.tensor(gs.max(0)) + 1)
    assert float(zoo.ptq.dsg_loss([x], [bn], [big], enhance=False)) == 0.0  # all inside the margins
    dm, ds = np.array([0.6, 0.2]), np.array([0.1, 0.3])
    hm, hs = np.maximum(gm - dm, 0), np.maximum(gs - ds, 0)
    want = ((hm ** 2).sum() + (hs ** 2).sum()) / 2
    got = zoo.ptq.dsg_loss([x], [bn], [(torch.tensor(dm).float(), torch.tensor(ds).float())], enhance=False)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # layer-wise enhancement, one layer: every sample i with i % 1 == 0 is doubled -> 4x the loss
    got = zoo.ptq.dsg_loss([x], [bn], [(torch.tensor(dm).float(), torch.tensor(ds).float())], enhance=True)
    assert float(got) == pytest.approx(4 * want, rel=1e-5)


def test_layerwise_enhancement_picks_one_layer_per_sample():
    bn, x = _bn_inputs()
    zero = (torch.zeros(2), torch.zeros(2))
    enh = zoo.ptq.dsg_loss([x, x], [bn, bn], [zero, zero], enhance=True)
    # s_i: sample i's squared residuals at one layer (a batch of one divides by N = 1)
    s0, s1 = (float(zoo.ptq.dsg_loss([x[i:i + 1]], [bn], [zero], enhance=False)) for i in range(2))
    # layer 0 doubles sample 0's residual (4x its loss), layer 1 sample 1's; each layer divides by N = 2
    assert float(enh) == pytest.approx((4 * s0 + s1) / 2 + (s0 + 4 * s1) / 2, rel=1e-5)


def test_correlation_loss():
    a = torch.randn(1, 3, 4, 4)
    assert float(zoo.ptq.correlation_loss(torch.cat([a, 2 * a + 1]))) == pytest.approx(1.0, rel=1e-5)
    assert float(zoo.ptq.correlation_loss(torch.cat([a, -a]))) == pytest.approx(1.0, rel=1e-5)  # squared
    u = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]).reshape(2, 1, 2, 2)  # uncorrelated
    assert float(zoo.ptq.correlation_loss(u + 5)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("method", ["zeroq", "dsg"])
def test_synthesis_lowers_the_bn_mismatch_and_is_deterministic(method):
    net = _tiny()
    # running statistics of a reachable target: smooth mid-grey images, unlike uniform noise
    target = (0.5 + 0.1 * torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(9))).clamp(0, 1)
    with torch.no_grad():
        t = net[0](target)
    net[1].running_mean.copy_(t.mean(dim=(0, 2, 3)))
    net[1].running_var.copy_(t.var(dim=(0, 2, 3), unbiased=False))
    start = zoo.ptq.synthesize(net, method, n=6, seed=3, shape=(3, 6, 6), iters=1, lr=1e-12, progress=False)
    x = zoo.ptq.synthesize(net, method, n=6, seed=3, shape=(3, 6, 6), iters=60, progress=False)
    assert x.shape == (6, 3, 6, 6) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x, zoo.ptq.synthesize(net, method, n=6, seed=3, shape=(3, 6, 6), iters=60,
                                             progress=False))
    bns = zoo.ptq.synthesize.__globals__["bn_layers"](net)

    def mismatch(batch):
        store = []
        h = bns[0].register_forward_pre_hook(lambda m, a: store.append(a[0]))
        with torch.no_grad():
            net(batch)
        h.remove()
        if method == "zeroq":  # the batch statistics it matches
            return float(zoo.ptq.zeroq_loss(store, bns))
        zero = (torch.zeros(8), torch.zeros(8))  # DSG: per-sample statistics, measured without slack
        return float(zoo.ptq.dsg_loss(store, bns, [zero], enhance=False))

    assert mismatch(x) < 0.5 * mismatch(start)


def test_synthesis_errors():
    with pytest.raises(ValueError, match="unknown data-free method 'gan'; valid"):
        zoo.ptq.synthesize(_tiny(), "gan", shape=(3, 6, 6))
    with pytest.raises(ValueError, match="no BatchNorm"):
        zoo.ptq.synthesize(nn.Sequential(nn.Conv2d(3, 3, 1)), "zeroq", shape=(3, 6, 6))


# ------------------------------------------------------------------------------ CLI
def _ptq_cfg(tmp, root, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return compose("ptq", overrides=[f"data.root={root}", "data.val_size=32", "batch_size=32",
                                         f"output_dir={tmp}", *overrides])


@pytest.mark.parametrize("calib", ["real", "zeroq", "ddaq", "coleq"])
def test_cli_run_end_to_end(tmp_path, tiny_fmnist, calib):
    """The shipped float resnet20, calibrated on a tiny Fashion-MNIST stand-in: a release that loads,
    whose card states the calibration, and whose test metrics are those of the loaded model."""
    from zoo.ptq.cli import run
    from zoo.tasks.cls.task import evaluate

    out = run(_ptq_cfg(tmp_path, tiny_fmnist, f"calib={calib}", "calib.n=16", "bits=8",
                       *{"real": [], "zeroq": ["calib.iters=3"],
                         "ddaq": ["calib.warmup=2", "calib.steps=2", "calib.batch_size=8", "calib.probes=1",
                                  "calib.width=4"],
                         "coleq": ["calib.warmup=2", "calib.steps=3", "calib.batch_size=8", "calib.queue=16",
                                   "calib.recover=4", "calib.width=4", "calib.enc_width=4"]}[calib]),
              command="python -m zoo.ptq (test)")
    rel = tmp_path / "release"
    assert out["release_dir"] == str(rel)
    model = zoo.load(rel)
    assert model.quant is not None and (rel / "README.md").is_file()
    card = (rel / "README.md").read_text()
    header = "(then fine-tuned without labels, below)" if calib in ("ddaq", "coleq") else "(no training)"
    assert f"Post-training quantization {header}" in card and "mse estimator" in card
    assert ("16 real training samples" in card) == (calib == "real")
    assert (rel / "synthetic.png").is_file() == (calib != "real")
    assert ("(DDAQ)" in card) == (calib == "ddaq") and ("(CoLeQ)" in card) == (calib == "coleq")
    assert (rel / "recovered.png").is_file() == (calib == "coleq")
    from zoo.tasks.cls.data import FashionMNISTData

    dm = FashionMNISTData(root=str(tiny_fmnist), val_size=32, batch_size=32)
    dm.setup()
    with torch.no_grad():
        assert evaluate(model, dm.test_dataloader(), progress=False)["acc"] == out["metrics"]["test_acc"]


@pytest.mark.parametrize("args,msg", [
    (["calib=gan"], "calib='gan' is not available; valid: ['coleq', 'ddaq', 'dsg', 'psaq', 'real', 'zeroq']"),
    (["algo=gptq"], "algo='gptq' is not available; valid: ['apq', 'base', 'log2', 'repq']"),
    (["bits=1"], "wbits=1 is not a valid PTQ bit width; valid: integers 2..8"),
    (["estimator=max"], "estimator='max' is not valid; valid: ['minmax', 'percentile', 'mse']"),
    (["distill.steps=-1"], "distill.steps=-1 is not valid; valid: 0 (off) or a positive integer"),
    (["calib=ddaq", "calib.steps=0"], "calib.steps=0 is not valid; valid: an integer >= 1"),
    (["rounding=adaround"], "rounding='adaround' is not valid; valid: ['nearest', 'learned']"),
    (["init_from=resnet20.lsq_w4a4_fmnist"], "is already quantized; PTQ starts from a float release"),
])
def test_cli_errors_name_the_valid_choices(tmp_path, args, msg):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zoo.ptq", *args, f"output_dir={tmp_path}", "data.root=/nonexistent"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and msg in out.stderr, out.stderr[-2000:]


def test_ptq_config_keeps_layers_at_other_precisions_or_float():
    cfg = zoo.ptq.ptq_config(4, 6, keep={"stem": 8, "head.*": None})
    assert cfg.for_layer("body.0").weight.bits == 4 and cfg.for_layer("body.0").act.bits == 6
    assert cfg.for_layer("body.0").weight.granularity == "channel"
    assert cfg.for_layer("stem").weight.bits == 8 and cfg.for_layer("stem").act.bits == 8
    spec = cfg.for_layer("head.conv")
    assert spec is None or (spec.weight is None and spec.act is None)


# ------------------------------------------------------------------------------ learned rounding
class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)),
                                  nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def test_reconstruction_units_soft_start_and_exact_hard_codes():
    from zoo.ptq.reconstruct import _Rounding, units

    torch.manual_seed(0)
    net = _Blocks().eval()
    x = torch.rand(32, 3, 8, 8)
    q = zoo.ptq.calibrate(net, zoo.ptq.ptq_config(3), x, "minmax", progress=False)
    assert units(q) == ["stem", "body.0", "body.1", "fc"]
    layer = q.body[0][0]
    r = _Rounding(layer)
    # V is initialised so the soft weights are the float weights (h(V) = frac(W / s)), up to the clamp of
    # frac; the range-defining elements sit at their nearest codes (off the float value by the zero point's rounding)
    soft, w = r.soft(), layer.weight
    t = w / r.s + r.z
    free = ~r.fixed & (t >= 0) & (t <= r.n)  # the zero point's rounding puts a few weights off the grid's ends
    assert free.float().mean() > 0.9
    assert torch.allclose(soft[free], w[free], atol=float(r.s.max()) * 2e-4)
    assert torch.equal(soft[t < 0], (-r.z * r.s)[t < 0])
    assert torch.equal(soft[r.fixed], ((r.q_nearest - r.z) * r.s)[r.fixed])
    assert r.fixed.flatten(1).sum(1).min() >= 1
    # h(V) >= 0.5 rounds up: at init that is round-to-nearest, so the hard codes are the nearest codes
    assert torch.equal(r.hard_codes(), layer.wq.codes(layer.weight)[0])
    with torch.no_grad():
        r.v.copy_(torch.randn_like(r.v) * 3)  # any learned rounding...
    codes = r.hard_codes()
    assert ((codes - r.base - r.z).abs() <= 1).all() and (codes[~r.fixed] != r.q_nearest[~r.fixed]).any()
    w = layer.wq.restore(codes, r.scale, r.zero)
    assert torch.equal(layer.wq.codes(w)[0], codes)  # ...re-quantizes to exactly its codes on the same grid
    assert torch.allclose(layer.wq.integer_form(w)[1], r.scale)
    # a per-tensor grid: only the tensor's own extremes define it (and keep their codes)
    qt = zoo.ptq.calibrate(net, zoo.QuantConfig(weight=zoo.MinMax(3), act=zoo.MinMax(3)), x, "minmax", progress=False)
    rt = _Rounding(qt.body[0][0])
    wt = qt.body[0][0].weight
    assert int(rt.fixed.sum()) == int((wt == wt.min()).sum() + (wt == wt.max()).sum())
    with torch.no_grad():
        rt.v.copy_(torch.randn_like(rt.v) * 3)
    c = rt.hard_codes()
    assert torch.equal(qt.body[0][0].wq.codes(qt.body[0][0].wq.restore(c, rt.scale, rt.zero))[0], c)


def test_reconstruction_lowers_every_unit_error_and_packs_exactly():
    import copy

    torch.manual_seed(0)
    net = _Blocks().eval()
    x = torch.rand(64, 3, 8, 8)
    q0 = zoo.ptq.calibrate(net, zoo.ptq.ptq_config(3), x, "mse", progress=False)
    q = zoo.ptq.calibrate(net, zoo.ptq.ptq_config(3), x, "mse", rounding="learned",
                          recon={"iters": 150, "batch_size": 16}, progress=False)
    report = q._zoo_reconstruction
    assert list(report) == ["stem", "body.0", "body.1", "fc"]
    # each unit keeps whichever rounding has the lower output error; most keep the learned one
    assert all(min(b, a) == (a if kept == "learned" else b) for b, a, kept in report.values()), report
    assert sum(kept == "learned" and a < b for b, a, kept in report.values()) >= 2, report
    assert report["stem"][2] == "learned"
    with torch.no_grad():  # the first unit sees the same input either way: its output error, measured here
        e_learned = ((q.stem(x) - net.stem(x)) ** 2).flatten(1).sum(1).mean()
        e_nearest = ((q0.stem(x) - net.stem(x)) ** 2).flatten(1).sum(1).mean()
        assert e_learned < 0.95 * e_nearest
        assert float(e_learned) == pytest.approx(report["stem"][1], rel=1e-5)
        packed = zoo.to_packed(copy.deepcopy(q))  # the learned codes are what the packed layers hold
        assert torch.allclose(packed(x), q(x), atol=1e-4)
    # the activation ranges are the calibrated ones: reconstruction changes weights only
    for (_, a), (_, b) in zip(zoo.quantizers.quantized_layers(q0), zoo.quantizers.quantized_layers(q)):
        assert a.aq.lo == b.aq.lo and a.aq.hi == b.aq.hi
    with pytest.raises(ValueError, match=r"rounding='adaround' is not valid; valid: \['nearest', 'learned'\]"):
        zoo.ptq.calibrate(net, zoo.ptq.ptq_config(3), x, rounding="adaround")


# ------------------------------------------------------------------------------ distillation (DSG's QAT use)
def test_kd_loss_by_hand():
    from zoo.ptq.distill import kd_loss

    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.5, 0.0]])
    p = torch.softmax(t / 2, 1)
    want = float((p * (torch.log(p) - torch.log_softmax(s / 2, 1))).sum()) * 4
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(want, rel=1e-6)
    img = torch.rand(2, 3, 4, 4)
    assert float(kd_loss(img, img * 0)) == pytest.approx(float((img ** 2).mean()))


def test_distillation_moves_the_quantized_outputs_to_the_float_ones():
    import copy

    from zoo.ptq.distill import distill

    torch.manual_seed(0)
    net = _Blocks().eval()
    x = torch.rand(64, 3, 8, 8)
    q = zoo.ptq.calibrate(net, zoo.ptq.ptq_config(3), x, "mse", progress=False)
    before = copy.deepcopy(q)
    ranges = [(float(m.aq.lo), float(m.aq.hi)) for _, m in zoo.quantizers.quantized_layers(q)]
    losses = distill(q, net, x, steps=60, lr=1e-3, batch_size=16, progress=False)
    assert len(losses) == 60 and not q.training
    with torch.no_grad():
        err = lambda m: float(((m(x) - net(x)) ** 2).mean())  # noqa: E731
        assert err(q) < 0.8 * err(before)
    # activation ranges stay the calibrated ones; weights moved
    assert ranges == [(float(m.aq.lo), float(m.aq.hi)) for _, m in zoo.quantizers.quantized_layers(q)]
    assert not torch.equal(q.stem.weight, before.stem.weight)
    with pytest.raises(ValueError, match="steps=0 is not valid"):
        distill(q, net, x, steps=0)
