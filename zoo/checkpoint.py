"""Release checkpoints: ``config.json`` + ``model.safetensors`` holding packed integer weights.

``save`` converts a training-form model to its packed inference form and writes both files into
a temporary directory that replaces the target in one rename, so an interrupted save leaves the
old checkpoint (or nothing) in place. A float model (no quantized layer) stores its float32 tensors
as float16 (``FLOAT_STORAGE``; a tensor outside float16's range stays float32): :func:`packed_copy`
rounds the same way, so the model a release's metrics are measured on is the model it stores, and
it still computes in float32 after loading. ``load`` verifies the sha256 of the weights before reading
them and rebuilds the architecture from the config.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .kernels.dispatch import check_backend, check_binary_kernel
from .quantizers import QuantConfig, quantize, set_backend, set_progress, to_packed
from .quantizers.packed import PackedLayer
from .registry import create_model, resolve_checkpoint
from .wrapper import ZooModel

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, or does not match its architecture."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


FLOAT_STORAGE = torch.float16  # the dtype a float model's float32 tensors are released in
_F16_MAX = torch.finfo(torch.float16).max


def is_float_model(model: nn.Module) -> bool:
    """True if ``model`` has no quantized layer (training or packed form)."""
    from .quantizers.quantize import quantized_layers, quantized_ops

    return not quantized_layers(model) and not quantized_ops(model) and not any(
        isinstance(m, PackedLayer) for m in model.modules())


def _storable(t: torch.Tensor) -> bool:
    """A float32 tensor whose values float16 can hold (finite and within its range)."""
    if t.dtype != torch.float32:
        return False
    return t.numel() == 0 or (bool(torch.isfinite(t).all()) and t.abs().max().item() <= _F16_MAX)


def round_to_storage(model: nn.Module) -> nn.Module:
    """Round the float32 tensors of a float model's state dict (what ``save`` writes) to what its
    release stores (float16 values, kept as float32 tensors), in place. A quantized model is left
    alone; non-persistent buffers (input normalisation) are not saved, so not rounded."""
    if is_float_model(model):
        with torch.no_grad():
            for t in model.state_dict().values():  # shares storage with the model's tensors
                if _storable(t):
                    t.copy_(t.to(FLOAT_STORAGE))
    return model


def packed_copy(model: ZooModel) -> ZooModel:
    """A deep copy of ``model`` in packed inference form (eval mode): exactly the model a release
    of it stores (a float model's weights rounded to ``FLOAT_STORAGE``)."""
    m = copy.deepcopy(model).eval()
    to_packed(m.net)
    return round_to_storage(m)


def save(model: nn.Module, directory: str | os.PathLike, metrics: dict | None = None,
         extra: dict | None = None, *, builder: str | None = None, kwargs: dict | None = None,
         quant: QuantConfig | None = None) -> Path:
    """Write ``model`` (training or packed form) as a release checkpoint into ``directory``.

    A :class:`ZooModel` describes itself. Any other quantized ``nn.Module`` (torchvision, timm, smp,
    your own) is saved with its ``QuantConfig`` (the one ``zoo.quantize`` recorded on it, or
    ``quant=``) and, optionally, how to rebuild its float skeleton: ``builder="package.module:factory"``
    and JSON ``kwargs``. The rebuild is tried here, so a builder, kwargs or config that would not give
    back this model fails now rather than at load time. Without a builder, load it with
    ``zoo.load(directory, model=<float skeleton>)``. A model without quantized layers is stored with
    float16 values (see ``FLOAT_STORAGE``); ``packed_copy`` gives the model exactly as stored."""
    if isinstance(model, ZooModel):
        if builder is not None or quant is not None:
            raise TypeError("a zoo.ZooModel describes itself: builder= and quant= are for other models")
        packed = packed_copy(model)
        header = {**model.config()}
        arch = model.arch
    else:
        header = _module_header(model, builder, kwargs, quant)
        packed = copy.deepcopy(model).eval()
        to_packed(packed)
        if builder is not None:
            _check_rebuild(packed, header)
        arch = builder or type(model).__name__
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in packed.state_dict().items()}
    stored = "float32"
    if is_float_model(packed):  # float16 storage: load_state_dict copies it back into float32
        tensors = {k: v.to(FLOAT_STORAGE) if _storable(v) else v for k, v in tensors.items()}
        stored = str(FLOAT_STORAGE).removeprefix("torch.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION),
                                                          "arch": arch})
        cfg = {
            "format_version": FORMAT_VERSION,
            **header,
            "metrics": metrics or {},
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS),
                        "bytes": (tmp / WEIGHTS).stat().st_size, "float_dtype": stored},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        for f in (tmp / WEIGHTS, tmp / CONFIG):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # swap in: keep anything else already in the directory (a README card, samples)
        if directory.exists():
            for keep in directory.iterdir():
                if keep.name not in (WEIGHTS, CONFIG) and not (tmp / keep.name).exists():
                    os.replace(keep, tmp / keep.name)
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "d")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


ALLOWED_BUILDERS: set[str] = set()  # module prefixes whose factories zoo.load may call (opt-in)


def allow_builder(*prefixes: str) -> None:
    """Let ``zoo.load`` call checkpoint builders from these modules (``"torchvision.models"``,
    ``"timm"``, your package): a checkpoint naming a builder runs that code, so you opt in."""
    ALLOWED_BUILDERS.update(prefixes)


def _import_builder(target: str):
    import importlib

    module, _, name = str(target).partition(":")
    if not module or not name:
        raise ValueError(f"builder={target!r} must be 'package.module:factory'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"builder={target!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"builder={target!r} is not callable")
    return fn


def _module_header(model: nn.Module, builder, kwargs, quant) -> dict:
    from .quantizers.quantize import QUANT_CONFIG_ATTR, quantized_layers

    quant = quant if quant is not None else getattr(model, QUANT_CONFIG_ATTR, None)
    has_quant = bool(quantized_layers(model)) or any(isinstance(m, PackedLayer) for m in model.modules())
    if quant is None and has_quant:
        raise TypeError(f"save(): the {type(model).__name__} has quantized layers but no QuantConfig: pass "
                        f"quant= (the config given to zoo.quantize)")
    if kwargs is not None and builder is None:
        raise TypeError("save(): kwargs= without builder= (the factory they are for)")
    if builder is not None:
        _import_builder(builder)
        try:
            json.dumps(kwargs or {})
        except TypeError as e:
            raise TypeError(f"save(): kwargs must be JSON (numbers, strings, lists, dicts): {e}") from None
    return {"kind": "module", "builder": builder, "kwargs": kwargs or {},
            "quant": quant.to_dict() if quant is not None else None}


def _rebuild(header: dict, skeleton: nn.Module | None = None) -> nn.Module:
    """The packed model a generic-module config describes: ``skeleton`` (a float model, quantized
    here in place) or the builder's model."""
    net = skeleton if skeleton is not None else _import_builder(header["builder"])(**header.get("kwargs", {}))
    if header.get("quant"):
        net = quantize(net, QuantConfig.from_dict(header["quant"]))
        set_progress(net, 1.0)  # quantizers as training ends (EBB: one basis)
    net.eval()
    return to_packed(net)


def _check_rebuild(packed: nn.Module, header: dict) -> None:
    rebuilt = _rebuild(header).state_dict()
    mine = packed.state_dict()
    bad = sorted(set(rebuilt) ^ set(mine)) + sorted(k for k in mine if k in rebuilt and rebuilt[k].shape != mine[k].shape)
    if bad:
        raise ValueError(f"save(): {header['builder']}(**{header['kwargs']}) quantized with this config does not "
                         f"give back this model; differing tensors: {bad[:6]}{' ...' if len(bad) > 6 else ''}")


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not a zoo checkpoint directory") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this zoo reads "
                              f"{FORMAT_VERSION})")
    return cfg


def build_from_config(cfg: dict) -> ZooModel:
    """The (packed, untrained) model a config describes."""
    net = create_model(cfg["arch"], **cfg.get("model_args", {}))
    quant = QuantConfig.from_dict(cfg["quant"]) if cfg.get("quant") else None
    if quant is not None:
        quantize(net, quant)
        set_progress(net, 1.0)  # a release holds its quantizers as training ends (EBB: one basis)
    wrapper = getattr(net, "zoo_wrapper", ZooModel)  # a net may name the ZooModel subclass it ships in
    model = wrapper(net, cfg["arch"], cfg.get("model_args", {}), cfg["task"], cfg["input_contract"], quant)
    to_packed(model.net)
    return model


def load(name_or_directory: str | os.PathLike, backend: str = "auto",
         map_location: str | torch.device = "cpu", binary_kernel: str = "auto",
         depth: int | None = None, model: nn.Module | None = None) -> nn.Module:
    """Load a shipped model by name (``resnet20.irnet_w1a1_fmnist``) or a checkpoint directory.

    Returns an eval-mode :class:`ZooModel` taking float images in [0, 1]; its quantized layers run
    from the packed weights through ``zoo.kernels``: ``backend="auto"`` (Triton kernels on CUDA
    tensors, the cached CPU path on CPU tensors), ``"triton"``, ``"cpu"`` (the cached CPU path: weights
    unpacked once, outputs identical to the reference) or ``"reference"`` (nothing cached), or ``"onnxruntime"`` (the
    model exported to ONNX in QDQ form once, cached, and run by onnxruntime on CPU: ``zoo.export``); W1A1 layers on
    Triton use ``binary_kernel`` ``"popcount"``, ``"dot"`` or ``"auto"``. ``depth`` runs only that
    many quantized residual blocks of a depth-dynamic (QuantSR DQA) model; None runs all.

    A checkpoint of another model (``zoo.save(torchvision_net, ...)``) comes back as that model in
    packed form: rebuilt by its recorded builder if you allowed it (:func:`allow_builder`), or from
    ``model=``, a float skeleton you build (it is quantized and packed in place).
    """
    if backend == "onnxruntime":  # the packed model exported to ONNX once (cached), run by onnxruntime
        from .export import load_onnxruntime

        model = load(name_or_directory, "reference", "cpu", binary_kernel, depth, model)
        return load_onnxruntime(model, resolve_checkpoint(name_or_directory))
    check_backend(backend)
    check_binary_kernel(binary_kernel)
    directory = resolve_checkpoint(name_or_directory)
    cfg = read_config(directory)
    wpath = directory / cfg.get("weights", {}).get("file", WEIGHTS)
    if not wpath.is_file():
        raise CheckpointError(f"{wpath} not found")
    expected = cfg.get("weights", {}).get("sha256")
    actual = sha256_file(wpath)
    if expected != actual:
        raise CheckpointError(f"checksum mismatch for {wpath}: config.json says sha256 {expected}, "
                              f"the file has {actual} (corrupted or replaced file)")
    try:
        state = load_file(str(wpath), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath} is not a readable safetensors file: {e}") from None
    if cfg.get("kind") == "module":
        net, what = _module_net(cfg, wpath, model), "the given model" if model is not None else cfg["builder"]
    else:
        if model is not None:
            raise TypeError(f"model= is for checkpoints of other models; {directory} is a zoo {cfg.get('arch')} model")
        try:
            net = build_from_config(cfg)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{directory / CONFIG} does not describe a buildable model: {e}") from None
        what = f"architecture {cfg['arch']!r} with args {cfg.get('model_args')}"
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {wpath} do not match {what}: {str(e).splitlines()[0]}") from None
    set_backend(net, backend, binary_kernel)
    if depth is not None:
        from .models.sr import set_depth

        set_depth(net, depth)
    net.metrics = cfg.get("metrics", {})
    net = net.to(map_location).eval()
    from .kernels import cached

    cached.prepare(net)  # the CPU path's caches now: a first call, or a torch.compile trace, finds them built
    return net


def _module_net(cfg: dict, wpath: Path, skeleton: nn.Module | None) -> nn.Module:
    """The packed, not yet loaded model of a generic-module checkpoint: ``skeleton`` quantized, or
    the recorded builder's model if the user allowed that builder."""
    builder = cfg.get("builder")
    if skeleton is None:
        if builder is None:
            raise CheckpointError(f"{wpath.parent} records no builder: pass model=<the float model>, e.g. "
                                  f"zoo.load(path, model=torchvision.models.resnet18(num_classes=10))")
        module = builder.partition(":")[0]
        if not any(module == p or module.startswith(p + ".") for p in ALLOWED_BUILDERS):
            raise CheckpointError(f"{wpath.parent} is built by {builder!r}, which is not allowed: call "
                                  f"zoo.allow_builder({module.split('.')[0]!r}) if you trust this checkpoint, "
                                  f"or pass model=<the float model>")
    return _rebuild(cfg, skeleton)
