"""zoo.cost and zoo.mixed: costs by hand, sensitivities against formulas and a toy model whose
ranking is known, the Pareto front against brute force, bits files, and the CLI end to end."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from zoo.cost_model import nominal_weight_bytes, packed_weight_bytes
from zoo.mixed import (Front, apply_bits, layer_options, load_bits, nondominated, pareto_front, save_bits,
                       sensitivity, spearman, tradeoff_point, within_budget)
from zoo.mixed.measure import Sensitivity


# ------------------------------------------------------------------------------ zoo.cost
class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2, bias=False)
        self.fc = nn.Linear(2 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(self.up(self.conv(x)).flatten(1))


def test_cost_by_hand_in_all_three_forms():
    torch.manual_seed(0)
    net = _ConvNet().eval()
    f = zoo.cost(net, (3, 8, 8))
    conv, up, fc = f.layers
    # MACs: conv: 8 channels x 8x8 positions x 27 products; transposed conv: each of its 8x8x8 inputs
    # feeds C_out x kh x kw = 2x2x2 outputs; linear: 512 x 5
    assert conv.macs == 8 * 8 * 8 * 27
    assert up.macs == 8 * 8 * 8 * (2 * 2 * 2)          # each input value feeds C_out * kh * kw outputs
    assert fc.macs == 512 * 5
    assert conv.weight_bytes == 4 * (8 * 27 + 8) and up.weight_bytes == 4 * 8 * 2 * 4 and fc.weight_bytes == 4 * (512 * 5 + 5)
    assert f.bops == 32 * 32 * (conv.macs + up.macs + fc.macs)
    cfg = zoo.QuantConfig(weight=zoo.MinMax(4, granularity="channel"), act=zoo.MinMax(8),
                          overrides={"fc": {"weight": {"type": "MinMax", "bits": 3, "granularity": "channel"},
                                            "act": {"type": "MinMax", "bits": 6}}})
    q = zoo.quantize(_ConvNet().eval(), cfg)
    q(torch.rand(2, 3, 8, 8))
    c = zoo.cost(q, (1, 3, 8, 8))
    qc, qu, qf = c.layers
    # 4-bit conv: 8 rows of ceil(27 / 2) = 14 bytes, 8 scales + 8 zero points (float32), 8 biases
    assert qc.weight_bytes == 8 * 14 + 8 * 8 + 8 * 4
    # transposed conv, per-channel on axis 1 (2 channels), 8 rows of 2*2*2 = 8 codes -> 4 bytes, no bias
    assert qu.weight_bytes == 8 * 4 + 2 * 8
    # 3-bit fc: stored in 4-bit containers; nominal counts 3 bits a weight
    assert qf.weight_bytes == 5 * 256 + 5 * 8 + 5 * 4
    assert qf.nominal_bytes == math.ceil(512 * 5 * 3 / 8) + 5 * 8 + 5 * 4
    assert (qc.w_bits, qc.a_bits, qf.w_bits, qf.a_bits) == (4, 8, 3, 6)
    assert c.bops == qc.macs * 32 + qu.macs * 32 + qf.macs * 18
    assert c.other_bytes > 0  # the activation quantizers' ranges
    zoo.to_packed(q)
    p = zoo.cost(q, (3, 8, 8))
    assert [(x.weight_bytes, x.macs, x.w_bits, x.a_bits) for x in p.layers] == \
        [(x.weight_bytes, x.macs, x.w_bits, x.a_bits) for x in c.layers]


def test_weight_byte_formulas():
    assert packed_weight_bytes((16, 16, 3, 3), 1) == 16 * 18 + 16 * 8
    assert packed_weight_bytes((16, 16, 3, 3), 3) == packed_weight_bytes((16, 16, 3, 3), 4) == 16 * 72 + 128
    assert nominal_weight_bytes((16, 16, 3, 3), 3) == 16 * 144 * 3 // 8 + 128
    assert packed_weight_bytes((16, 16, 3, 3), 32, bias=True) == 4 * (16 * 144 + 16)
    with pytest.raises(ValueError, match="input_shape"):
        zoo.cost(_ConvNet(), (8,))


# ------------------------------------------------------------------------------ sensitivity
class _Branches(nn.Module):
    """y = concat_k(c_k * L_k(x)) with identical L_k: independent blocks (the loss separates), whose
    sensitivity grows with c_k."""

    def __init__(self, scales=(1.0, 10.0, 100.0), d_in=6, d_out=3):
        super().__init__()
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False)
        self.branches = nn.ModuleList()
        for _ in scales:
            b = nn.Linear(d_in, d_out, bias=False)
            b.weight.data.copy_(base.weight.data)
            self.branches.append(b)
        self.scales = scales

    def forward(self, x):
        return torch.cat([c * b(x) for c, b in zip(self.scales, self.branches)], dim=1)


def _toy_data(n=12, d_in=6, d_out=3, branches=3):
    g = torch.Generator().manual_seed(1)
    # inputs are scaled basis vectors, so sum_n x_n x_n^T is diagonal: the weight Hessian is diagonal
    x = torch.zeros(n, d_in)
    x[torch.arange(n), torch.arange(n) % d_in] = torch.rand(n, generator=g) + 0.5
    e = torch.randn(n, d_out, generator=g).repeat(1, branches)  # the same residual for every branch
    return x, e


def test_htq_and_hawq_weight_sensitivity_by_hand():
    net = _Branches()
    x, e = _toy_data()
    t = net(x).detach() + 0.1 * e
    names = ["branches.0", "branches.1", "branches.2"]
    h = sensitivity(net, [(x, t)], "htq", names, wbits=(2, 4), abits=(), progress=False)
    w = sensitivity(net, [(x, t)], "hawq", names, wbits=(2, 4), abits=(), max_iter=3, progress=False)
    assert w.iterations == 2  # diagonal blocks, no cross terms: every Rademacher estimate is exact
    n, o = t.shape
    for k, name in enumerate(names):
        c, lin = net.scales[k], net.branches[k]
        wt = lin.weight.detach()
        for b in (2, 4):
            # per-channel min-max grid with 0 representable, nearest rounding
            lo, hi = wt.min(1, keepdim=True).values.clamp(max=0), wt.max(1, keepdim=True).values.clamp(min=0)
            s = (hi - lo) / (2 ** b - 1)
            z = torch.round(-lo / s)
            dw = (torch.clamp(torch.round(wt / s) + z, 0, 2 ** b - 1) - z) * s - wt
            grad = 2 / (n * o) * c * (-0.1 * e[:, 3 * k:3 * k + 3]).T @ x   # dL/dW_k of the mean squared error
            assert h.weight[name][b] == pytest.approx(float(((grad * dw) ** 2).sum()), rel=1e-4)
            trace = c ** 2 * 2 / (n * o) * 3 * float((x ** 2).sum())     # Hessian block c^2 2/(NO) I_3 (x) X^T X
            assert w.weight[name][b] == pytest.approx(trace / wt.numel() * float((dw ** 2).sum()), rel=1e-4)
    # identical blocks but for c_k: HTQ scales as c^2 (gradient squared), HAWQ as c^2 (Hessian)
    assert h.weight[names[2]][2] / h.weight[names[0]][2] == pytest.approx(100 ** 2, rel=1e-4)
    assert w.weight[names[2]][2] / w.weight[names[0]][2] == pytest.approx(100 ** 2, rel=1e-4)


@pytest.mark.parametrize("method", ["htq", "hawq", "direct"])
def test_every_method_ranks_the_toy_branches_by_their_gain(method):
    net = _Branches()
    x, e = _toy_data()
    t = net(x).detach() + 0.05 * e  # near the optimum, as a trained model is
    names = ["branches.0", "branches.1", "branches.2"]
    s = sensitivity(net, [(x, t)], method, names, wbits=(3,), abits=(3,), max_iter=20, progress=False)
    for role in (s.weight, s.act):
        v = [role[n][3] for n in names]
        assert v[0] < v[1] < v[2], (method, v)


def test_activation_sensitivity_is_per_consumer():
    """Two layers reading the same tensor: each one's input gradient is through itself alone."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.a(x) + 0.0 * self.b(x)  # b's output does not reach the loss

    torch.manual_seed(0)
    net = Two()
    x, t = torch.randn(8, 4), torch.randn(8, 2)
    for method in ("htq", "hawq"):
        s = sensitivity(net, [(x, t)], method, ["a", "b"], wbits=(4,), abits=(2,), max_iter=5, progress=False)
        assert s.act["a"][2] > 0 and s.act["b"][2] == 0.0 and s.weight["b"][4] == 0.0


def test_sensitivity_errors_and_spearman():
    net = _Branches()
    x, t = _toy_data()
    t = t * 0
    with pytest.raises(ValueError, match=r"unknown sensitivity method 'fisher'; valid: \['htq', 'hawq', 'direct'\]"):
        sensitivity(net, [(x, t)], "fisher", progress=False)
    with pytest.raises(ValueError, match="unknown layer"):
        sensitivity(net, [(x, t)], "htq", ["nope"], progress=False)
    with pytest.raises(ValueError, match="wbits"):
        sensitivity(net, [(x, t)], "htq", wbits=(1,), progress=False)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # average ranks for ties


# ------------------------------------------------------------------------------ search
def _brute(options):
    pts = {}
    for combo in itertools.product(*[range(len(o)) for o in options.values()]):
        p = sum(o[i][2] for o, i in zip(options.values(), combo))
        s = sum(o[i][3] for o, i in zip(options.values(), combo))
        b = sum(o[i][4] for o, i in zip(options.values(), combo))
        pts[(round(p, 9), s, b)] = combo
    keys = list(pts)
    front = {k for k in keys if not any(all(q[j] <= k[j] for j in range(3)) and q != k for q in keys)}
    return front, keys


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pareto_front_is_exact_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = {}
    for layer in range(4):  # small integer ranges: plenty of ties and duplicates
        options[f"l{layer}"] = [(int(w), 0, float(rng.integers(0, 6)) / 4, int(rng.integers(1, 5)),
                                 int(rng.integers(1, 5))) for w in range(5)]
    front = pareto_front(options, progress=False)
    got = {(round(float(p), 9), int(s), int(b)) for p, s, b in zip(front.perturbation, front.size, front.bops)}
    want, allpts = _brute(options)
    assert got == want and len(front) == len(want)
    # each point's choices add up to its objectives
    for i in range(len(front)):
        ch = front.choice[i]
        assert sum(options[n][k][3] for n, k in zip(front.layers, ch)) == front.size[i]
    # the budgeted optimum from the front equals brute force's
    sizes, bops_ = [k[1] for k in allpts], [k[2] for k in allpts]
    for qs, qb in ((0.2, 0.8), (0.5, 0.5), (0.8, 0.2), (1.0, 1.0)):
        size, bops = np.quantile(sizes, qs), np.quantile(bops_, qb)
        feasible = [k for k in allpts if k[1] <= size and k[2] <= bops]
        if not feasible:
            with pytest.raises(ValueError, match="no configuration fits budget"):
                within_budget(front, size, bops)
            continue
        i = within_budget(front, size, bops)
        assert round(float(front.perturbation[i]), 9) == min(k[0] for k in feasible)
        assert front.size[i] <= size and front.bops[i] <= bops
    with pytest.raises(ValueError, match="no configuration fits budget"):
        within_budget(front, 1, 1)


def test_nondominated_keeps_one_of_equal_points():
    p, s, b = np.array([1.0, 1.0, 0.5, 2.0]), np.array([1, 1, 2, 1]), np.array([1, 1, 1, 0])
    assert sorted(nondominated(p, s, b).tolist()) in ([0, 2, 3], [1, 2, 3])


def test_tradeoff_point_is_nearest_the_ideal_after_normalising():
    f = Front(["a"], {"a": [(2, 2), (4, 4), (8, 8)]}, np.array([10.0, 2.0, 0.0]), np.array([0, 4, 10]),
              np.array([0, 4, 10]), np.zeros((3, 1), dtype=np.int16))
    # normalised: (1, 0, 0), (0.2, 0.4, 0.4), (0, 1, 1): the middle one is nearest (0, 0, 0)
    assert tradeoff_point(f) == 1


def test_layer_options_drop_dominated_options():
    s = Sensitivity("htq", weight={"l": {2: 1.0, 4: 0.1}}, act={"l": {4: 0.2, 8: 0.2}})
    table = {"l": {"macs": 10, "shape": (4, 8), "ch_axis": 0, "bias": False}}
    opts = layer_options(s, table, (2, 4), (4, 8))
    # a8 has a4's perturbation and size at twice the BOPs: dominated, so only the a4 options stay
    assert [(o[0], o[1]) for o in opts["l"]] == [(2, 4), (4, 4)]


# ------------------------------------------------------------------------------ configs and files
def test_apply_bits_and_bits_file_round_trip(tmp_path):
    base = zoo.ptq.ptq_config(4, keep={"stem": 8})
    cfg = apply_bits(base, {"body.0": (2, 8), "body[1]": (3, None)})
    assert cfg.for_layer("body.0").weight.bits == 2 and cfg.for_layer("body.0").act.bits == 8
    assert cfg.for_layer("body[1]").weight.bits == 3 and cfg.for_layer("body[1]").act.bits == 4
    assert cfg.for_layer("body1").weight.bits == 4  # the bracket is a literal, not a glob class
    assert cfg.for_layer("stem").weight.bits == 8 and cfg.for_layer("other").weight.bits == 4
    assert cfg.for_layer("body.0").weight.granularity == "channel"
    assert zoo.QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = save_bits(tmp_path / "bits.json", {"body.0": (2, 8), "fc": (4, None)}, {"method": "htq"})
    assert load_bits(path) == {"body.0": (2, 8), "fc": (4, None)}
    with pytest.raises(ValueError, match="is not quantized by the config"):
        apply_bits(zoo.ptq.ptq_config(4, keep={"stem": None}), {"stem": (2, 2)})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "zoo.mixed.bits/1", "bits": {"body.0": {"weight": 9, "act": 4}}}))
    with pytest.raises(ValueError, match=r"layer 'body.0' has bits .* valid: weight 1..8"):
        load_bits(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError, match="is not a zoo.mixed.bits/1 file"):
        load_bits(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_bits(tmp_path / "missing.json")


def _cfg(name, tmp, root, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return compose(name, overrides=[f"data.root={root}", "data.val_size=32", "batch_size=32",
                                        f"output_dir={tmp}", *overrides])


def test_cli_search_then_ptq_with_the_bits(tmp_path, tiny_fmnist):
    """zoo.mixed on the shipped float resnet20 with a tiny data stand-in, then zoo.ptq with
    quant.overrides_from: the release's layers have the chosen bits and its cost is the chosen point."""
    from zoo.mixed.cli import run as run_mixed
    from zoo.ptq.cli import run as run_ptq

    res = run_mixed(_cfg("mixed", tmp_path / "mx", tiny_fmnist, "calib.n=32", "budget.size=w3a4",
                         "budget.bops=w3a4", "abits_choices=[4,8]", "size_measure=nominal"))
    bits = load_bits(tmp_path / "mx" / "bits.json")
    assert bits == res["bits"] and (tmp_path / "mx" / "front.png").is_file()
    out = run_ptq(_cfg("ptq", tmp_path / "pq", tiny_fmnist, "calib.n=16",
                       f"quant.overrides_from={tmp_path / 'mx' / 'bits.json'}"), command="test")
    model = zoo.load(out["release_dir"])
    c = zoo.cost(model, (1, 1, 28, 28))
    got = {x.name: (x.w_bits, x.a_bits) for x in c.layers}
    assert all(got[n] == tuple(b) for n, b in bits.items())
    assert got["stem"] == (8, 8) and got["fc"] == (8, 8)
    assert c.nominal_bytes == res["point"]["size"] and c.bops == res["point"]["bops"]
    assert "Mixed precision:" in (tmp_path / "pq" / "release" / "README.md").read_text()


@pytest.mark.parametrize("args,msg", [
    (["method=fisher"], "method='fisher' is not valid; valid: ['htq', 'hawq', 'direct']"),
    (["budget.size=w9a4"], "budget.size='w9a4' is not valid"),
    (["wbits_choices=[1,4]"], "wbits_choices=[1, 4] is not valid"),
    (["size_measure=disk"], "size_measure='disk' is not valid; valid: ['packed', 'nominal']"),
])
def test_cli_errors_name_the_valid_choices(tmp_path, tiny_fmnist, args, msg):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zoo.mixed", *args, f"output_dir={tmp_path}",
                          f"data.root={tiny_fmnist}", "data.val_size=32", "calib.n=16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and msg in out.stderr, out.stderr[-2000:]


def test_overrides_from_a_missing_file_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zoo.ptq", f"quant.overrides_from={tmp_path}/nope.json",
                          f"output_dir={tmp_path}", "data.root=/nonexistent"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "no such file" in out.stderr, out.stderr[-2000:]
