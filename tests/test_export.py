"""ONNX export (zoo.export) and the onnxruntime backend: the exported graph against the export form
and the reference, the int8 initializers against the packed codes, BatchNorm folded, integer Clips,
QLinearConv really fused, the shipped classifiers' predictions, the cache, and errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo import export, onnx_graph
from zoo.kernels import reference
from zoo.quantizers.packed import PackedLayer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class _Wrapped(nn.Module):
    """The attributes export_form reads from a zoo model."""

    def __init__(self, net, channels):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))


def _packed(cfg, layers, shape=(4, 6, 8, 8)):
    torch.manual_seed(0)
    net = nn.Sequential(*layers)
    zoo.quantize(net, cfg)
    net.train()
    for _ in range(3):
        net(torch.randn(*shape))
    return zoo.to_packed(net.eval())


def _export(net, x, path, int8_kernels=True, float_convs=True, concat=True, dynamic=False):
    ef = export.export_form(_Wrapped(net, x.shape[1]))
    torch.onnx.export(ef, (x,), str(path), opset_version=export.OPSET, dynamo=False, input_names=["images"],
                      dynamic_axes={"images": {0: "batch"}} if dynamic else None)
    m = onnx.load(str(path))
    onnx_graph.int8_weights(m)
    onnx_graph.fold_batchnorm(m)
    onnx_graph.integer_clips(m)
    if concat:
        onnx_graph.quantize_before_resize_and_concat(m)
    if float_convs:
        onnx_graph.float_weights_for_float_convs(m)
    if int8_kernels:
        onnx_graph.int32_biases(m)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return ef, m


def _run(path, x, level="ORT_DISABLE_ALL"):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["WeightBiasQuantization"])
    return s.run(None, {"images": x.numpy()})[0]


ACT_CFGS = {"lsq4": zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)),
            "minmax8_signed": zoo.QuantConfig(weight=zoo.MinMax(8), act=zoo.MinMax(8)),
            "react1": zoo.QuantConfig(weight=zoo.ReAct(1), act=zoo.ReAct(1)),
            "n2uq2": zoo.QuantConfig(weight=zoo.N2UQ(2), act=zoo.N2UQ(2)),
            "ul2q2": zoo.QuantConfig(weight=zoo.UL2Q(2), act=zoo.UL2Q(2))}


@pytest.mark.parametrize("name", list(ACT_CFGS))
def test_export_activation_codes_match_the_reference(name):
    """s_a (v - z_a) of the export form's activation against the reference's codes; QuantizeLinear's
    x * (1/s) rounding may move a value sitting on a tie by one step, never more, and rarely."""
    net = _packed(ACT_CFGS[name], [nn.Conv2d(6, 8, 3, padding=1)])
    layer = net[0]
    act = export.ExportLayer(layer).acts[0]
    x = torch.randn(4, 6, 8, 8) * 2
    p = layer.act_params()
    v = reference.quantize_act(x, layer.act_mode, p, 1)
    want = (v - reference.act_zero(layer.act_mode, p)) * reference.act_scale(layer.act_mode, p)
    got = act(x)
    step = reference.act_scale(layer.act_mode, p)
    diff = (got - want).abs()
    assert (diff <= step * 1.0001 + 1e-6).all()
    assert (diff > 1e-6).float().mean() < 0.002, name


def test_int8_initializers_hold_the_packed_codes_and_batchnorm_is_folded(tmp_path):
    cfgs = {"lsq4": ACT_CFGS["lsq4"], "xnor_w1a4": zoo.QuantConfig(weight=zoo.XNOR(1), act=zoo.LSQ(4))}
    for name, cfg in cfgs.items():
        net = _packed(cfg, [nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 4, 3, padding=1)])
        net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2)
        x = torch.randn(2, 6, 8, 8)
        ef, m = _export(net, x, tmp_path / f"{name}.onnx", int8_kernels=False, float_convs=False)
        g = m.graph
        consts = onnx_graph._consts(g)
        ops = [n.op_type for n in g.node]
        assert "BatchNormalization" not in ops
        dq_weights = [consts[n.input[0]] for n in g.node
                      if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[0]].ndim == 4]
        packed = [mod for mod in net.modules() if isinstance(mod, PackedLayer)]
        assert len(dq_weights) == len(packed) == 2
        scales = [consts[n.input[1]] for n in g.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[0]].ndim == 4]
        bn = net[1]
        folds = [(bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy(), 1.0]  # BN folded into conv 1
        for codes, scale, layer, fold in zip(dq_weights, scales, packed, folds):
            q = layer.codes().double()
            z = layer.w_zero.double().reshape(-1, 1, 1, 1)
            base = (q - z).numpy() * (2 if name == "xnor_w1a4" else 1)  # XNOR's zero point 1/2: 2q - 1 = +-1
            # widened by the largest power of two M that keeps the codes in int8, the scale divided by it
            mult = 1
            while np.abs(base).max() * mult * 2 <= 127:
                mult *= 2
            assert codes.dtype == np.int8 and mult > 1
            np.testing.assert_array_equal(codes, (base * mult).astype(np.int8))
            s_w = layer.w_scale.double().numpy() / ((2 if name == "xnor_w1a4" else 1) * mult)
            np.testing.assert_allclose(scale.astype(np.float64), s_w * fold, rtol=1e-6)
        if name == "xnor_w1a4":
            assert set(np.unique(dq_weights[0] // np.abs(dq_weights[0]).max()).tolist()) == {-1, 1}
        # 4-bit activations: the Clip runs on the integer codes after QuantizeLinear (the signed input:
        # int8 codes -8..7; after the ReLU: uint8 codes 0..15)
        clips = [n for n in g.node if n.op_type == "Clip" and n.input[1] in consts
                 and consts[n.input[1]].dtype in (np.uint8, np.int8)]
        ranges = [(int(consts[c.input[1]]), int(consts[c.input[2]])) for c in clips]
        assert ranges == [(-8, 7), (0, 15)], ranges
        # the graph computes the export form (float rounding apart), and that is the reference's
        np.testing.assert_allclose(_run(tmp_path / f"{name}.onnx", x), ef(x).detach().numpy(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            zoo.set_backend(net, "reference")
            np.testing.assert_allclose(ef(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-4)


def test_int32_biases_are_the_float_biases_rounded_to_the_accumulator_grid(tmp_path):
    net = _packed(ACT_CFGS["lsq4"], [nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)])
    x = torch.randn(2, 6, 8, 8)
    _, m = _export(net, x, tmp_path / "b.onnx", float_convs=False)  # both convs keep int8 weights here
    consts = onnx_graph._consts(m.graph)
    biases = [n for n in consts if n.endswith("_bias_int32")]
    assert len(biases) == 2
    for name, layer in zip(sorted(biases), [mod for mod in net.modules() if isinstance(mod, PackedLayer)]):
        scale = consts[name + "_scale"].astype(np.float64)
        s_w = layer.w_scale.double().numpy()
        # the accumulator unit: s_a times the (widened) weight scale, 2^k finer than s_a * s_w
        ratio = float(layer.act_params()["scale"]) * s_w / scale
        k = np.log2(ratio)
        assert np.allclose(k, np.round(k), atol=1e-5) and np.all(np.round(k) >= 3), ratio
        assert consts[name].dtype == np.int32
        assert np.all(np.abs(consts[name] * scale - layer.bias.double().numpy()) <= scale / 2 * 1.0001)


def test_a_conv_that_feeds_no_quantizer_gets_its_dequantized_weight_as_a_float_initializer(tmp_path):
    """The last conv (its output is the graph's) cannot be an integer kernel: it gets the float32 values
    DequantizeLinear would compute from its codes, float32(code) * float32(scale), and keeps its float
    bias; the first (feeding the ReLU and the next quantizer) keeps its int8 codes and int32 bias. The
    graph computes the same as with the DequantizeLinear at run time."""
    for cfg in (ACT_CFGS["lsq4"], zoo.QuantConfig(weight=zoo.XNOR(1), act=zoo.LSQ(4))):
        net = _packed(cfg, [nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 4, 3, padding=1)])
        x = torch.randn(2, 6, 8, 8)
        _, plain = _export(net, x, tmp_path / "plain.onnx", int8_kernels=False, float_convs=False)
        _, m = _export(net, x, tmp_path / "float.onnx", int8_kernels=True)
        consts, pconsts = onnx_graph._consts(m.graph), onnx_graph._consts(plain.graph)
        producer = {o: n for n in m.graph.node for o in n.output}
        pproducer = {o: n for n in plain.graph.node for o in n.output}
        convs, pconvs = ([n for n in g.node if n.op_type == "Conv"] for g in (m.graph, plain.graph))
        assert len(convs) == 2
        first, last = convs
        assert producer[first.input[1]].op_type == "DequantizeLinear" and first.input[2].endswith("_bias_int32_dq")
        assert last.input[1] in consts and last.input[1] not in producer
        dq = pproducer[pconvs[1].input[1]]
        codes, scale = pconsts[dq.input[0]], pconsts[dq.input[1]]
        assert codes.dtype == np.int8 and scale.dtype == np.float32
        want = codes.astype(np.float32) * scale.reshape(-1, 1, 1, 1)  # float32 products
        np.testing.assert_array_equal(consts[last.input[1]], want)
        np.testing.assert_array_equal(consts[last.input[2]], net[3].bias.detach().numpy())
        # computed directly from the packed layer: s_w (q - z) as the codes' float32 values
        layer = net[3]
        base = (layer.codes().double() - layer.w_zero.double().reshape(-1, 1, 1, 1)) * layer.w_scale.double().reshape(
            -1, 1, 1, 1)
        np.testing.assert_allclose(consts[last.input[1]], base.numpy(), rtol=1e-6, atol=0)
        onnx.save(m, str(tmp_path / "float.onnx"))
        _, m2 = _export(net, x, tmp_path / "plain_bias.onnx", int8_kernels=False, float_convs=True)
        onnx.save(m2, str(tmp_path / "float_bias.onnx"))
        np.testing.assert_array_equal(_run(tmp_path / "float_bias.onnx", x), _run(tmp_path / "plain.onnx", x))


class _Decoder(nn.Module):
    """A U-Net decoder step: a low-resolution branch upsampled (nearest), concatenated with a skip (or
    not: the last step), then a quantized conv."""

    def __init__(self, skip: bool):
        super().__init__()
        self.skip = nn.Conv2d(6, 8, 3, padding=1) if skip else None
        self.low, self.out = nn.Conv2d(6, 4, 3, 2, 1), nn.Conv2d(12 if skip else 4, 4, 3, padding=1)

    def forward(self, x):
        low = torch.relu(self.low(x))  # the output size read from the input's shape, as smp's decoder does it
        up = F.interpolate(low, size=(low.shape[2] * 2, low.shape[3] * 2), mode="nearest")
        return self.out(torch.cat([up, torch.relu(self.skip(x))], 1) if self.skip is not None else up)


def _decoder_exports(tmp_path, skip: bool):
    """A packed LSQ W4A4 _Decoder, an input, and its graph without and with the resize/concat pass (a
    dynamic batch: the resize's output size comes from a Shape of its input, as in zoo.export.onnx)."""
    torch.manual_seed(0)
    net = _Decoder(skip)
    zoo.quantize(net, ACT_CFGS["lsq4"])
    net.train()
    for _ in range(3):
        net(torch.randn(4, 6, 8, 8))
    net = zoo.to_packed(net.eval())
    x = torch.randn(2, 6, 8, 8)
    _, before = _export(net, x, tmp_path / "before.onnx", int8_kernels=False, concat=False, dynamic=True)
    _, after = _export(net, x, tmp_path / "after.onnx", int8_kernels=False, dynamic=True)
    return net, x, before, after


def test_quantizer_after_a_resize_moves_before_it_with_the_same_codes(tmp_path):
    """Q(Resize_nearest(a)) -> Resize(Q(a)): the resize copies codes, the conv before it ends in a
    QuantizeLinear, and the graph computes exactly what it computed before."""
    net, x, before, after = _decoder_exports(tmp_path, skip=False)
    producer = {o: n for n in after.graph.node for o in n.output}
    resize = next(n for n in after.graph.node if n.op_type == "Resize")
    assert producer[resize.input[0]].op_type == "QuantizeLinear"
    assert not any(n.op_type == "QuantizeLinear" and producer.get(n.input[0]) is resize for n in after.graph.node)
    relu = producer[producer[resize.input[0]].input[0]]
    assert relu.op_type == "Relu"
    assert [n.op_type for n in after.graph.node if relu.output[0] in n.input] == ["QuantizeLinear"]
    for path, m in (("before.onnx", before), ("after.onnx", after)):
        onnx.save(m, str(tmp_path / path))
    np.testing.assert_array_equal(_run(tmp_path / "after.onnx", x), _run(tmp_path / "before.onnx", x))


def test_quantizer_after_concat_moves_onto_its_inputs_with_the_same_codes(tmp_path):
    """Q(Concat(Resize_nearest(a), b)) -> Concat(Resize(Q(a)), Q(b)): the concat and resize move uint8 codes,
    the low branch's conv now ends in a QuantizeLinear (onnxruntime fuses it into QLinearConv), and the
    graph computes exactly what it computed before."""
    net, x, before, after = _decoder_exports(tmp_path, skip=True)
    assert any(n.op_type == "Shape" for n in before.graph.node)
    # the low branch's ReLU feeds only the QuantizeLinear now (its Shape reads the codes)
    relu = next(n for n in after.graph.node if n.op_type == "Relu" and "low" in "".join(n.input) + n.name)
    assert [n.op_type for n in after.graph.node if relu.output[0] in n.input] == ["QuantizeLinear"]
    producer = {o: n for n in after.graph.node for o in n.output}
    cat = next(n for n in after.graph.node if n.op_type == "Concat"
               and any(i in producer and producer[i].op_type == "Resize" for i in n.input))
    made = [producer[i] for i in cat.input]
    assert [n.op_type for n in made] == ["Resize", "QuantizeLinear"]
    assert producer[made[0].input[0]].op_type == "QuantizeLinear"
    assert not any(n.op_type == "QuantizeLinear" and producer.get(n.input[0]) is cat for n in after.graph.node)
    assert sum(n.op_type == "QuantizeLinear" for n in after.graph.node) == \
        sum(n.op_type == "QuantizeLinear" for n in before.graph.node) + 1
    # the low branch's conv feeds a quantizer now: it keeps its int8 weight (an integer kernel's input)
    low = next(n for n in after.graph.node if n.op_type == "Conv" and "low" in n.name)
    assert producer[low.input[1]].op_type == "DequantizeLinear"
    for path, m in (("before.onnx", before), ("after.onnx", after)):
        onnx.save(m, str(tmp_path / path))
    np.testing.assert_array_equal(_run(tmp_path / "after.onnx", x), _run(tmp_path / "before.onnx", x))
    with torch.no_grad():
        zoo.set_backend(net, "reference")
        np.testing.assert_allclose(_run(tmp_path / "after.onnx", x), net(x).numpy(), rtol=1e-4, atol=1e-4)


def test_sign_activation_exports_as_plus_minus_one_with_the_references_edge_cases(tmp_path):
    """x - shift >= 0 -> +1 (zero and -0.0 included), else -1 (NaN too), through onnxruntime."""
    net = _packed(ACT_CFGS["react1"], [nn.Conv2d(6, 8, 1)])
    layer = net[0]
    act = export.ExportLayer(layer).acts[0]
    shift = layer.act_params()["shift"].reshape(1, -1, 1, 1)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 0.5, -0.5])
    x = shift + torch.zeros(1, 6, 1, 7) + special.reshape(1, 1, 1, 7)
    want = torch.where(x - shift >= 0, 1.0, -1.0)
    torch.onnx.export(act, (x,), str(tmp_path / "s.onnx"), opset_version=export.OPSET, dynamo=False,
                      input_names=["images"])
    got = _run(tmp_path / "s.onnx", x, level="ORT_ENABLE_ALL")
    np.testing.assert_array_equal(got, want.numpy())
    assert set(np.unique(got).tolist()) == {-1.0, 1.0}
    assert np.all(got[..., 2] == -1) and np.all(got[..., :2] == 1)


def test_rprelu_exports_as_prelu_with_the_training_forms_values(tmp_path):
    """ReActNet's RPReLU through onnxruntime as Sub -> PRelu -> Add: the values of RPReLU.forward
    (where(y >= 0, y, slope * y) + zeta, y = x - gamma) on every element, y == 0 and NaN included."""
    from zoo.quantizers.binary import RPReLU

    torch.manual_seed(0)
    m = RPReLU(8)
    for p in (m.gamma, m.zeta, m.slope):
        p.data.normal_()
    x = torch.randn(3, 8, 5, 5)
    x[0, :, 0, 0] = m.gamma.detach()  # y == 0
    x[1, 2, 1, 1] = float("nan")
    form = export.ExportRPReLU(m)
    torch.onnx.export(form, (x,), str(tmp_path / "r.onnx"), opset_version=export.OPSET, dynamo=False,
                      input_names=["images"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r.onnx")).graph.node]
    assert "PRelu" in ops and "Where" not in ops
    y = m.gamma.detach().reshape(1, -1, 1, 1)
    d = x - y
    want = torch.where(d >= 0, d, m.slope.detach().reshape(1, -1, 1, 1) * d) + m.zeta.detach().reshape(1, -1, 1, 1)
    got = _run(tmp_path / "r.onnx", x, level="ORT_ENABLE_ALL")
    np.testing.assert_array_equal(got, want.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), want.numpy())


def test_any_size_model_gets_one_graph_per_input_size(tmp_path, monkeypatch):
    """Super-resolution takes any size: onnxruntime runs a graph exported for each input size (SwinIR's
    windows bake the size into reshapes); the outputs match the reference backend closely."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    name = "edsr.quantsr_w4a4_x4"
    model, ref = zoo.load(name, backend="onnxruntime"), zoo.load(name)
    for size in [(12, 16), (10, 10), (12, 16)]:
        x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y, y_ref = model(x), ref(x)
        assert y.shape == y_ref.shape == (1, 3, 4 * size[0], 4 * size[1])
        assert (y - y_ref).abs().max() < 0.02
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "onnx").glob("*.onnx")) == ["10x10.onnx", "12x16.onnx"]


def test_onnxruntime_runs_lsq_w4a4_in_qlinearconv(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    model = zoo.load("resnet20.lsq_w4a4_fmnist", backend="onnxruntime")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(model.onnx_path), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["WeightBiasQuantization"])
    nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("QLinearConv") >= 9  # the convs whose output feeds the next quantized conv
    # the others (before the float residual add) convolve with a constant float weight onnxruntime can
    # prepack, not one a DequantizeLinear makes on every run
    producer = {o: n.op_type for n in nodes for o in n.output}
    floats = [n for n in nodes if n.op_type in ("Conv", "FusedConv")]
    assert len(floats) == 19 - ops.count("QLinearConv")
    assert all(n.input[1] not in producer for n in floats), [producer.get(n.input[1]) for n in floats]


def test_onnxruntime_backend_is_cached_and_checks_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    a = zoo.load("resnet20.lsq_w4a4_fmnist", backend="onnxruntime")
    stamp = a.onnx_path.stat().st_mtime_ns
    b = zoo.load("resnet20.lsq_w4a4_fmnist", backend="onnxruntime")
    assert b.onnx_path == a.onnx_path and b.onnx_path.stat().st_mtime_ns == stamp
    assert a.onnx_path.parent == tmp_path / "onnx"
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        a(torch.full((1, 1, 28, 28), 200.0))
    assert a.task == "cls" and a.input_contract["channels"] == 1


def _fmnist_test(n):
    from zoo.datasets import load_fmnist

    x, y = load_fmnist(split="test")
    x = torch.as_tensor(np.asarray(x[:n])).float().div(255).reshape(-1, 1, 28, 28)
    return x, torch.as_tensor(np.asarray(y[:n])).long()


def _agreement(name, n):
    x, y = _fmnist_test(n)
    ref, om = zoo.load(name), zoo.load(name, backend="onnxruntime")
    with torch.no_grad():
        a = torch.cat([ref(x[i:i + 500]) for i in range(0, len(x), 500)]).argmax(1)
        b = torch.cat([om(x[i:i + 500]) for i in range(0, len(x), 500)]).argmax(1)
    return (a == y).float().mean().item(), (b == y).float().mean().item(), (a == b).float().mean().item()


QUANT_CLS = [n for n in zoo.list_models(task="cls") if "fp32" not in n and "ivit" not in n]  # I-ViT: no ONNX form
# the fast test: the ResNet-20s and one ViT per softmax quantizer (uniform, log2, log-sqrt2, MPQ)
FAST_CLS = [n for n in QUANT_CLS if n.startswith("resnet20.") or n.split(".")[1].startswith(
    ("ptq_w8a8", "log2_w4a4", "repq_w4a4", "apq_w4a4"))]


@pytest.mark.parametrize("name", FAST_CLS)
def test_shipped_classifier_through_onnxruntime(name, tmp_path, monkeypatch):
    """500 test images: top-1 accuracy within 1 point of the reference backend and at least 95% of the
    predictions the same (measured on the whole test set by the slow test below)."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    acc_ref, acc_ort, agree = _agreement(name, 500)
    assert abs(acc_ref - acc_ort) <= 0.01 and agree >= 0.95, (acc_ref, acc_ort, agree)


@pytest.mark.slow
@pytest.mark.parametrize("name", QUANT_CLS)
def test_shipped_classifier_through_onnxruntime_full_test_set(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    acc_ref, acc_ort, agree = _agreement(name, 10_000)
    print(f"{name}: reference {acc_ref:.4f}, onnxruntime {acc_ort:.4f}, same prediction {agree:.4f}")
    assert abs(acc_ref - acc_ort) <= 0.005 and agree >= 0.97, (acc_ref, acc_ort, agree)


@pytest.mark.parametrize("kind", ["minmax8", "log2", "logsqrt2", "mpq"])
def test_softmax_export_forms_give_the_quantizers_levels(kind):
    """ExportSoftmax (float ops ONNX has) against the quantized softmax it replaces: the same levels,
    except where -k log2(p / s) lies on a rounding tie (log(p / s) / ln 2 and log2 may round apart)."""
    from zoo.quantizers import MPQ, Log2, LogSqrt2, MinMax
    from zoo.quantizers.attention import QuantSoftmax, Softmax
    from zoo.quantizers.config import LayerQuant

    spec = {"minmax8": MinMax(8), "log2": Log2(4), "logsqrt2": LogSqrt2(4), "mpq": MPQ(4)}[kind]
    sm = QuantSoftmax.from_float(Softmax(-1), LayerQuant(act=spec))
    x = torch.randn(4, 3, 50, 50, generator=torch.Generator().manual_seed(0)) * 3
    p = x.softmax(-1)
    if hasattr(sm.oq, "fit"):
        sm.oq.fit(p)
    else:
        sm.train()
        sm(x)
    sm.eval()
    with torch.no_grad():
        want, got = sm(x), export.ExportSoftmax(sm)(x)
    differ = ~torch.isclose(want, got, rtol=1e-6, atol=0)
    assert differ.float().mean() < 1e-3
    if kind in ("log2", "logsqrt2"):
        t = -sm.oq.k * torch.log2(p.double() / float(sm.oq.scale))
        assert ((t - t.floor() - 0.5).abs()[differ] < 1e-4).all()  # only ties
    else:
        assert not differ.any()


@pytest.mark.parametrize("name", ["fcos_r18.lsq_w4a4_det_composites", "retinanet_r18.lsq_w4a4_det_composites"])
def test_shipped_detector_through_onnxruntime(name, tmp_path, monkeypatch):
    """Backbone and heads in ONNX, anchors / decoding / NMS by the detector's own functions in torch: the
    graph's raw head outputs match torch's on the golden image (int8 requantization apart), and the
    detections on 64 test images score the reference backend's mAP to 0.02 (the whole split:
    benchmarks/checkpoints.py --task det --backend onnxruntime, README)."""
    pytest.importorskip("pycocotools")
    from zoo.cards import read_golden
    from zoo.registry import resolve_checkpoint
    from zoo.tasks import get_task
    from zoo.tasks.det.task import head_outputs

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    ref, om = zoo.load(name), zoo.load(name, backend="onnxruntime")
    x = read_golden(resolve_checkpoint(name))[0]
    feed, _ = om.form.feed(x)
    outs = om._session(tuple(x.shape[-2:])).run(None, {"images": feed.numpy()})
    got, want = torch.cat([torch.from_numpy(o) for o in outs], -1), head_outputs(ref, x)
    assert got.shape == want.shape and (got - want).abs().mean() < 0.05 * want.abs().mean()
    with torch.no_grad():
        dets = om(x)
    assert isinstance(dets, list) and len(dets) == 1 and set(dets[0]) == {"boxes", "scores", "labels"}
    try:
        task = get_task("det")
        loader, _ = task.benchmark_loader(ref, None, 64)
        maps = [task.evaluate(m, loader, progress=False)["map"] for m in (ref, om)]
    except FileNotFoundError as e:
        pytest.skip(f"no Fashion-MNIST for the test composites: {e}")
    assert abs(maps[0] - maps[1]) <= 0.02, maps


def test_export_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError,
                       match=r"covers the tasks \['cls', 'det', 'sal', 'sr'\]; this model's task is 'diffusion'"):
        export.onnx("ddpm_unet.fp32_fmnist32", tmp_path / "d.onnx")
    with pytest.raises(ValueError, match=r"takes images of any size: give the size=\(H, W\)"):
        export.onnx("edsr.quantsr_w4a4_x4", tmp_path / "e.onnx")
    with pytest.raises(ValueError, match=r"takes 28 x 28 images; size=\(32, 32\) is not valid"):
        export.onnx("resnet20.lsq_w4a4_fmnist", tmp_path / "r.onnx", size=(32, 32))
    with pytest.raises(ValueError, match=r"I-ViT's integer LayerNorm / softmax / GELU have no ONNX form"):
        export.onnx("vit_tiny_p4.ivit_w8a8_fmnist", tmp_path / "v.onnx")
    import builtins

    real = builtins.__import__

    def no_onnxruntime(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ImportError, match=r'onnxruntime is missing\): pip install -c constraints.txt -e "\.\[export\]"'):
        export.onnx("resnet20.lsq_w4a4_fmnist", tmp_path / "r.onnx")
    assert not (tmp_path / "r.onnx").exists()
