"""ONNX export of packed models (QDQ form) and an onnxruntime backend.

    zoo.export.onnx("resnet20.lsq_w4a4_fmnist", "r20.onnx")
    model = zoo.load("resnet20.lsq_w4a4_fmnist", backend="onnxruntime")   # exported once, cached

The graph is built from the packed checkpoint: every packed layer becomes

* **weights**: an int8 initializer holding the exact codes ``m_w * (q - z_w)`` (``m_w`` = 2 for a
  half-integer zero point such as XNOR's 1/2, so binary weights are +-1 codes) with a per-channel
  ``DequantizeLinear`` of scale ``s_w / m_w`` and zero point 0; a zero point that no small multiple
  makes an integer (muL2Q) or codes outside int8 keep a float initializer of the dequantized weight;
* **activations**: ``QuantizeLinear`` -> (for fewer than 8 bits, ``Clip`` of the integer codes to
  their range) -> ``DequantizeLinear`` where the codes fit (u)int8 with an integer zero point; sign activations as
  ``2 * Cast(x >= 0) - 1``; other forms (muL2Q's real-valued offsets, N2UQ's thresholds) written out
  in float ops (Round, Clip, comparisons), which compute the same codes;
* a ``BatchNormalization`` right after a dequantized-weight ``Conv`` is folded into that conv's
  per-channel weight scale and bias, so onnxruntime fuses ``DQ -> Conv -> Q`` into ``QLinearConv``;
* a ``Conv`` whose output feeds no quantizer (before a float residual add, a resize or concat, the
  output) cannot be fused: it gets the float32 values its ``DequantizeLinear`` would compute as a
  constant weight, which onnxruntime prepacks;
* a quantizer after a nearest ``Resize`` or a ``Concat`` of such (a U-Net decoder) moves before them (the
  same codes), so the conv before the resize can fuse too.

The graph passes are in :mod:`zoo.onnx_graph`.

Where the results differ from the reference backend, and why:

* a conv bias becomes int32 in the accumulator's units (``int8_kernels=True``, the default: what an
  integer kernel adds, and what lets onnxruntime fuse ``DQ -> Conv -> Q`` into ``QLinearConv``), i.e.
  rounded to a multiple of ``s_a * s_w``; where activations are coarse (2 bits) this moves some next-
  layer codes;
* a fused layer requantizes its int32 sums to the next layer's codes with onnxruntime's own float
  rounding of ``s_a * s_w / s_next``;
* ``QuantizeLinear`` rounds ``x / s`` half to even before adding the zero point (the training form
  rounds ``x / s + z``): an input exactly on a tie can get the neighbouring code.

So outputs agree with the reference to within a quantization step at such points, not bit for bit;
``tests/test_export.py`` measures the agreement of every shipped classifier.

What the graph is belongs to the task (its ``onnx_form``, an :class:`ImageForm`): by default images in
[0, 1] in and the network's one tensor out; a detector's graph holds its backbone and heads, and its
decoding and NMS run in torch (``zoo/tasks/det/onnx.py``). ViTs export their quantized attention
(QDQ matmul operands, softmax quantizer levels in float ops); ``export_blocker`` says why a model is not
exported (I-ViT's integer ops, mmdet heads, generators, recurrent matting).

Needs the ``export`` extra: ``pip install -c constraints.txt -e ".[export]"`` (onnx, onnxruntime).
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .onnx_graph import run_passes
from .quantizers.attention import QuantMatMul, QuantSoftmax
from .quantizers.binary import RPReLU
from .quantizers.logq import LogAct, MPQAct
from .quantizers.packed import PackedConv2d, PackedConvTranspose2d, PackedLayer, PackedLinear

OPSET = 17
EXPORT_VERSION = 14  # part of the onnxruntime cache key: bump when the exported graph changes
INT8 = (-128, 127)
UINT8 = (0, 255)


def exportable(task) -> bool:
    """Whether ``zoo.export.onnx`` covers the task's models (its ``onnx_exportable``; its ``onnx_form``
    says what the graph is, ``ImageForm`` by default: image in, one tensor out)."""
    from .tasks import get_task

    try:
        return bool(get_task(task).onnx_exportable)
    except (KeyError, ValueError, ImportError):  # no such task, or its extra is not installed
        return False


def export_blocker(model) -> str | None:
    """Why ``zoo.export.onnx`` cannot export this loaded model, or None if it can."""
    from .quantizers.quantize import quantized_ops

    task = getattr(model, "task", None)
    if not exportable(task):
        return f"ONNX export covers the tasks {exportable_tasks()}; this model's task is {task!r}"
    reason = _form_class(model).blocker(model)
    if reason:
        return reason
    from .quantizers.ivit import ILayerNorm, IntSoftmax, ShiftGELU

    if any(isinstance(m, (ILayerNorm, IntSoftmax, ShiftGELU)) for m in model.modules()):
        return ("I-ViT's integer LayerNorm / softmax / GELU have no ONNX form here; run the model with zoo.load "
                "(or integer-only with zoo.quantizers.ivit_integer.IntegerViT)")
    for name, op in quantized_ops(model):
        if isinstance(op, QuantMatMul) and not all(_affine_act(q) for q in (op.aq_a, op.aq_b) if q is not None):
            return f"{name}: only affine matmul operand quantizers are exported"
        if isinstance(op, QuantSoftmax) and not (_affine_act(op.oq) or isinstance(op.oq, (LogAct, MPQAct))):
            return f"{name}: softmax quantizer {type(op.oq).__name__} has no export form"
    return None


def _affine_act(q) -> bool:
    return getattr(q, "mode", None) == "affine"


def exportable_tasks() -> list[str]:
    from .tasks import task_names

    return [t for t in task_names() if exportable(t)]


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing): "
                          f'pip install -c constraints.txt -e ".[export]"') from None


# ---------------------------------------------------------------------------- export modules
def _int_weight(layer: PackedLayer):
    """(codes as float, per-channel scale, per-channel zero point, code range) such that
    scale * (codes - zero) is the layer's weight: int8 codes m_w (q - z_w) with zero point 0 where they
    fit (m_w in {1, 2, 4} makes a half- or quarter-integer z_w whole), else the uint8 codes q with the
    integer zero points z_w (asymmetric 8-bit weights); None if neither represents the weight exactly."""
    q = layer.codes().double()
    z, s = layer.w_zero.double(), layer.w_scale.double()
    shape = [1] * q.ndim
    shape[layer.ch_axis] = -1
    zeros = torch.zeros(len(z), dtype=torch.int32)
    for m in (1, 2, 4):
        if torch.equal(z * m, torch.round(z * m)):
            codes = (q - z.reshape(shape)) * m
            if not codes.numel() or (codes.min() >= INT8[0] and codes.max() <= INT8[1]):
                # widen low-bit codes by the largest power of two that keeps them in int8: the same
                # weights, but a 2^k finer accumulator unit, so an int32 bias rounds 2^k times finer
                peak, f = (float(codes.abs().max()) if codes.numel() else 0.0), 1
                while peak and peak * f * 2 <= INT8[1]:
                    f *= 2
                return (codes * f).float(), (s / (m * f)).float(), zeros, INT8
            break
    if torch.equal(z, torch.round(z)) and z.min() >= UINT8[0] and z.max() <= UINT8[1] and layer.bits <= 8:
        return q.float(), s.float(), z.to(torch.int32), UINT8
    return None


class ExportAct(nn.Module):
    """One call site's activation quantization, written with ops ONNX has."""

    def __init__(self, mode: str, p: dict, ch_axis: int):
        super().__init__()
        self.mode, self.ch_axis = mode, ch_axis
        self.shift = p["shift"].float().clone() if "shift" in p else None
        if mode == "sign":
            return
        self.scale, self.zero = float(p["scale"]), float(p["zero"])
        self.offset = float(p.get("offset", p["zero"]))
        self.qmin, self.qmax = float(p["qmin"]), float(p["qmax"])
        self.thresholds = p["thresholds"].float().clone() if mode == "threshold" else None
        self.qdq = None
        z = self.zero
        if mode == "affine" and z == self.offset and z == math.floor(z):
            for lo, hi in (UINT8, INT8):
                if lo <= self.qmin and self.qmax <= hi and lo <= z <= hi:
                    self.qdq = (int(z), lo, hi)
                    break

    def forward(self, x):
        if self.shift is not None:
            shape = [1] * x.ndim
            shape[self.ch_axis] = -1
            x = x - self.shift.to(x.dtype).reshape(shape)
        if self.mode == "sign":  # +-1 (NaN: -1); onnxruntime's Where would be ~10x slower than Cast, Mul, Sub
            return (x >= 0).to(x.dtype) * 2 - 1
        s, z = self.scale, self.zero
        if self.mode == "threshold":
            v = (x.unsqueeze(-1) > self.thresholds.to(x.dtype)).to(x.dtype).sum(-1)
            return (v - z) * s
        if self.qdq is not None:
            zp, lo, hi = self.qdq
            if (self.qmin, self.qmax) != (lo, hi):  # fewer than 8 bits: Clip to the codes' range first
                x = torch.clamp(x, (self.qmin - z) * s, (self.qmax - z) * s)
            return torch.fake_quantize_per_tensor_affine(x, s, zp, lo, hi)
        v = torch.clamp(torch.round(x / s + self.offset), self.qmin, self.qmax)
        return (v - z) * s


class ExportLayer(nn.Module):
    """A packed layer in export form: activation fake-quantization (one per call site), then the float
    op on per-channel fake-quantized int8 weights (exported as an int8 initializer + DequantizeLinear)."""

    def __init__(self, layer: PackedLayer):
        super().__init__()
        self.kind = {PackedConv2d: "conv", PackedLinear: "linear", PackedConvTranspose2d: "transposed"}[type(layer)]
        self.ch_axis = layer.ch_axis
        for k in ("stride", "padding", "dilation", "groups", "output_padding"):
            if hasattr(layer, k):
                setattr(self, k, getattr(layer, k))
        iw = _int_weight(layer)
        if iw is None:
            self.register_buffer("weight", layer.dequantized_weight().float())
            self.w_scale = None
        else:
            codes, scale, zero, self.w_range = iw
            shape = [1] * codes.ndim
            shape[self.ch_axis] = -1
            # s * (code - zero) in float32; the fake-quantization below gives back exactly these codes
            self.register_buffer("weight", (codes - zero.reshape(shape)) * scale.reshape(shape))
            self.register_buffer("w_scale", scale)
            self.register_buffer("w_zero", zero)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        act_axis = -1 if self.kind == "linear" else 1
        sites = []
        if layer.act_mode != "none":
            for i in range(layer.num_sites):
                layer.site = i
                sites.append(ExportAct(layer.act_mode, layer.act_params(), act_axis))
            layer.site = 0
        self.acts = nn.ModuleList(sites)
        self.calls = 0

    def _weight(self):
        if self.w_scale is None:
            return self.weight
        return torch.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zero, self.ch_axis,
                                                      *self.w_range)

    def forward(self, x):
        if len(self.acts):
            x = self.acts[self.calls % len(self.acts)](x)
            self.calls += 1
        w = self._weight()
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return F.conv_transpose2d(x, w, self.bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


class ExportMatMul(nn.Module):
    """A quantized attention matmul: each quantized operand through its per-tensor QDQ, then MatMul
    (the first operand of attn·v arrives quantized by the softmax's quantizer)."""

    def __init__(self, mm: QuantMatMul):
        super().__init__()
        self.qa = ExportAct("affine", mm.aq_a.params(None), -1) if mm.aq_a is not None else None
        self.qb = ExportAct("affine", mm.aq_b.params(None), -1)

    def forward(self, a, b):
        return (self.qa(a) if self.qa is not None else a) @ self.qb(b)


class ExportSoftmax(nn.Module):
    """Softmax, then its output quantizer: QDQ for a uniform one; the log quantizers' and MPQ's codes
    and levels written in float ops (Log, Round, Where, Clip, Pow; Floor), which give the same levels."""

    def __init__(self, sm: QuantSoftmax):
        super().__init__()
        self.dim, q = sm.dim, sm.oq
        self.act = ExportAct("affine", q.params(None), -1) if _affine_act(q) else None
        self.mpq = isinstance(q, MPQAct)
        if self.act is None:  # Python numbers: constants of the traced graph
            self.top = 2 ** q.bits - 1
            self.scale = float(q.step) if self.mpq else float(q.scale)
            self.k = None if self.mpq else q.k

    def forward(self, x):
        p = x.softmax(self.dim)
        if self.act is not None:
            return self.act(p)
        if self.mpq:
            return torch.clamp(torch.floor(p / self.scale), 0, self.top) * self.scale
        r = torch.round(-self.k * torch.log(p / self.scale) / math.log(2))
        code = torch.clamp(torch.where(p > 0, r, torch.full_like(r, self.top)), 0, self.top)
        if self.k == 1:
            v = torch.pow(2.0, -code)
        else:  # 2^(-ceil(q/2)) (1 + (q mod 2)(sqrt 2 - 1)), as LogAct.levels forms odd codes
            odd = code - 2 * torch.floor(code / 2)
            v = torch.pow(2.0, -torch.ceil(code / 2)) * (1 + odd * (math.sqrt(2) - 1))
        return torch.where(code == self.top, torch.zeros_like(v), v * self.scale)


class ExportRPReLU(nn.Module):
    """ReActNet's RPReLU as ONNX ``Sub -> PRelu -> Add``: ``PRelu(y, slope)`` is ``y >= 0 ? y : slope * y``,
    the training form's ``where`` (onnxruntime's ``Where`` on full tensors is several times slower)."""

    def __init__(self, m: RPReLU):
        super().__init__()
        for k in ("gamma", "slope", "zeta"):
            self.register_buffer(k, getattr(m, k).detach().float().clone())

    def forward(self, x):
        shape = [1, -1] + [1] * (x.ndim - 2)
        return F.prelu(x - self.gamma.reshape(shape), self.slope) + self.zeta.reshape(shape)


class _Images(nn.Module):
    """The network on images in [0, 1]: the zoo model's normalisation, then its net."""

    def __init__(self, model):
        super().__init__()
        self.net = model.net
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("std", model.std.clone())

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def export_copy(model) -> nn.Module:
    """A copy of the packed zoo ``model`` (on the CPU, eval mode) with every packed layer and quantized
    attention op in export form."""
    from .quantizers.quantize import _set_child

    m = copy.deepcopy(model).cpu().eval()
    forms = {PackedLayer: ExportLayer, QuantMatMul: ExportMatMul, QuantSoftmax: ExportSoftmax, RPReLU: ExportRPReLU}
    for name, mod in list(m.named_modules()):
        for kind, form in forms.items():
            if isinstance(mod, kind):
                _set_child(m, name, form(mod))
    return m


def export_form(model) -> nn.Module:
    """``export_copy(model)`` on images in [0, 1] (the default graph: its normalisation, then its net)."""
    return _Images(export_copy(model)).eval()


class ImageForm:
    """What a task's ONNX graph is and how its outputs become the model's output (a task's
    ``onnx_form``; this default: images in [0, 1] in, the network's one tensor out). ``feed`` turns the
    model's input into the graph's input (and a context for ``result``), ``graph`` is the module traced
    from the export copy, ``result`` builds the model's output from the graph's outputs."""

    output_names: tuple[str, ...] = ("output",)

    def __init__(self, model):
        self.model = model

    @staticmethod
    def blocker(model) -> str | None:
        return None

    def graph(self, export_model: nn.Module) -> nn.Module:
        return _Images(export_model).eval()

    def feed(self, x: torch.Tensor):
        return x, None

    def result(self, outputs: list[torch.Tensor], context):
        return outputs[0]


def _form_class(model) -> type[ImageForm]:
    from .tasks import get_task

    return getattr(get_task(model.task), "onnx_form", None) or ImageForm


def onnx_form(model) -> ImageForm:
    return _form_class(model)(model)


# ---------------------------------------------------------------------------- public API
def onnx(model_or_name, path, int8_kernels: bool = True, size: tuple[int, int] | None = None,
         opset: int = OPSET) -> Path:
    """Export a packed zoo model (or a shipped model's name / checkpoint directory) to an ONNX file
    in QDQ form (see the module docstring), for images of the model's fixed size, or of ``size``
    (H, W) for a model that takes any size (super-resolution: one graph per input size, as windowed
    attention bakes the size into its reshapes); the batch is dynamic. ``int8_kernels``: write conv
    biases as int32 in the accumulator's units (what lets onnxruntime fuse ``DQ -> Conv -> Q`` into
    ``QLinearConv``; it rounds each bias to a multiple of s_a * s_w, which with coarse 2-bit activation
    grids moves outputs visibly); False keeps them float (float convs on the exact dequantized codes:
    closest to the reference, no integer speed-up). Returns the path, written atomically."""
    _require()
    import onnx as onnx_lib

    from .checkpoint import load

    model = load(model_or_name) if isinstance(model_or_name, (str, os.PathLike)) else model_or_name
    blocker = export_blocker(model)
    if blocker:
        raise ValueError(blocker)
    ic = model.input_contract
    fixed = ic.get("size")
    if fixed and size is not None and tuple(size) != tuple(fixed):
        raise ValueError(f"this model takes {fixed[0]} x {fixed[1]} images; size={tuple(size)} is not valid")
    if not fixed and size is None:
        raise ValueError("this model takes images of any size: give the size=(H, W) to export for")
    x = torch.rand(1, ic["channels"], *(fixed or size), generator=torch.Generator().manual_seed(0))
    form = onnx_form(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            feed, _ = form.feed(x)
            names = list(form.output_names)
            torch.onnx.export(form.graph(export_copy(model)), (feed,), tmp, opset_version=opset, dynamo=False,
                              input_names=["images"], output_names=names,
                              dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}})
        graph = onnx_lib.load(tmp)
        run_passes(graph, int8_kernels)
        onnx_lib.checker.check_model(graph)
        onnx_lib.save(graph, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cache_dir() -> Path:
    from .registry import cache_root

    return cache_root() / "onnx"


def session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported graph (every optimisation level but the
    ``WeightBiasQuantization`` pass, which would quantize float biases and requantize float weights it
    finds after an activation's DequantizeLinear to per-tensor int8, losing precision)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting threads after a run: they would steal the cores from torch work around it
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"])


class OnnxModel(nn.Module):
    """A zoo model run by onnxruntime: takes images in [0, 1] (checked as the zoo model checks them),
    returns the network's output as a torch tensor on the input's device. The graph is exported into
    the cache on first use (per input size for a model that takes any size), keyed by the release's
    config.json (which holds the weights' sha256) and the export version."""

    def __init__(self, model, directory: Path, int8_kernels: bool = True, threads: int | None = None):
        super().__init__()
        self.source = model  # the packed zoo model: metadata and the input check
        self.task, self.input_contract = model.task, model.input_contract
        self.metrics = getattr(model, "metrics", {})
        self.int8_kernels, self.threads = int8_kernels, threads
        self.form = onnx_form(model)
        key = (Path(directory) / "config.json").read_bytes() + f"export{EXPORT_VERSION}-{int8_kernels}".encode()
        self.stem = f"{Path(directory).name}-{hashlib.sha256(key).hexdigest()[:16]}"
        self.sessions = {}
        fixed = self.input_contract.get("size")
        self.onnx_path = self._path(tuple(fixed)) if fixed else None
        if fixed:
            self._session(tuple(fixed))

    def _path(self, size) -> Path:
        return cache_dir() / (self.stem + ("" if self.input_contract.get("size") else f"-{size[0]}x{size[1]}")
                              + ".onnx")

    def _session(self, size):
        if size not in self.sessions:
            path = self._path(size)
            if not path.is_file():
                onnx(self.source, path, self.int8_kernels, None if self.input_contract.get("size") else size)
            self.sessions[size] = session(path, self.threads)
        return self.sessions[size]

    def config(self) -> dict:
        return self.source.config()

    def forward(self, x: torch.Tensor):
        self.source.check_input(x)
        s = self._session(tuple(x.shape[-2:]))
        feed, context = self.form.feed(x.detach().float().cpu())
        outs = [torch.from_numpy(o) for o in s.run(None, {"images": feed.numpy()})]
        out = self.form.result(outs, context)
        return out.to(x.device) if torch.is_tensor(out) else out


def load_onnxruntime(model, directory: Path, int8_kernels: bool = True) -> OnnxModel:
    """``zoo.load(..., backend="onnxruntime")``."""
    _require()
    return OnnxModel(model, directory, int8_kernels)
