"""Release checkpoints: ``config.json`` + ``model.safetensors`` holding packed integer weights.

``save`` converts a training-form model to its packed inference form and writes both files into
a temporary directory that replaces the target in one rename, so an interrupted save leaves the
old checkpoint (or nothing) in place. ``load`` verifies the sha256 of the weights before reading
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

from .kernels.dispatch import check_backend, check_binary_kernel
from .quantizers import QuantConfig, quantize, set_backend, to_packed
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


def packed_copy(model: ZooModel) -> ZooModel:
    """A deep copy of ``model`` in packed inference form (eval mode)."""
    m = copy.deepcopy(model).eval()
    to_packed(m.net)
    return m


def save(model: ZooModel, directory: str | os.PathLike, metrics: dict | None = None,
         extra: dict | None = None) -> Path:
    """Write ``model`` (training or packed form) as a release checkpoint into ``directory``."""
    if not isinstance(model, ZooModel):
        raise TypeError(f"save() takes a zoo.ZooModel, got {type(model).__name__}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    packed = packed_copy(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in packed.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION),
                                                          "arch": model.arch})
        cfg = {
            "format_version": FORMAT_VERSION,
            **model.config(),
            "metrics": metrics or {},
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS),
                        "bytes": (tmp / WEIGHTS).stat().st_size},
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
    model = ZooModel(net, cfg["arch"], cfg.get("model_args", {}), cfg["task"], cfg["input_contract"],
                     quant)
    to_packed(model.net)
    return model


def load(name_or_directory: str | os.PathLike, backend: str = "auto",
         map_location: str | torch.device = "cpu", binary_kernel: str = "auto",
         depth: int | None = None) -> ZooModel:
    """Load a shipped model by name (``resnet20.irnet_w1a1_fmnist``) or a checkpoint directory.

    Returns an eval-mode :class:`ZooModel` taking float images in [0, 1]; its quantized layers run
    from the packed weights through ``zoo.kernels``: ``backend="auto"`` (Triton kernels on CUDA
    tensors, the pure-torch reference elsewhere), ``"triton"`` or ``"reference"``; W1A1 layers on
    Triton use ``binary_kernel`` ``"popcount"``, ``"dot"`` or ``"auto"``. ``depth`` runs only that
    many quantized residual blocks of a depth-dynamic (QuantSR DQA) model; None runs all.
    """
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
    model = build_from_config(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {wpath} do not match architecture {cfg['arch']!r} with "
                              f"args {cfg.get('model_args')}: {str(e).splitlines()[0]} ...\n{e}") from None
    set_backend(model, backend, binary_kernel)
    if depth is not None:
        from .models.sr import set_depth

        set_depth(model, depth)
    model.metrics = cfg.get("metrics", {})
    return model.to(map_location).eval()
