"""Model registry (timm style): ``@register_model`` architectures, ``create_model("arch.tag")``,
and ``list_models`` over the shipped checkpoints (``checkpoints/<task>/<arch>.<tag>/``)."""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Callable

_ARCHS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register an architecture factory under its function name."""
    if fn.__name__ in _ARCHS:
        raise ValueError(f"architecture {fn.__name__!r} is already registered")
    _ARCHS[fn.__name__] = fn
    return fn


def _ensure_builtin():
    from . import models  # noqa: F401  (registers the built-in architectures)


def list_archs(pattern: str = "*") -> list[str]:
    _ensure_builtin()
    return sorted(a for a in _ARCHS if fnmatch.fnmatch(a, pattern))


def create_model(name: str, **kwargs):
    """Build the architecture ``name`` (``arch`` or ``arch.tag``; the tag is ignored: use
    ``zoo.load`` for trained weights) with random initialisation."""
    _ensure_builtin()
    arch = name.split(".", 1)[0]
    if arch not in _ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid: {list_archs()}")
    return _ARCHS[arch](**kwargs)


def checkpoint_root() -> Path:
    """Where shipped checkpoints live: $ZOO_CHECKPOINTS; else ``zoo/checkpoints/`` inside an installed
    package (the wheel carries them there, ``setup.py``); else the repository's ``checkpoints/`` (a
    source checkout or an editable install)."""
    env = os.environ.get("ZOO_CHECKPOINTS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    packaged = here / "checkpoints"
    return packaged if packaged.is_dir() else here.parent / "checkpoints"


def cache_root() -> Path:
    """Where built artefacts are cached (ONNX exports, the compiled CPU kernels, the mmcv wheel):
    $ZOO_CACHE, else $XDG_CACHE_HOME/lowbit-vision-zoo, else ~/.cache/lowbit-vision-zoo."""
    root = os.environ.get("ZOO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                       "lowbit-vision-zoo")
    return Path(root)


def _shipped() -> dict[str, tuple[str, Path]]:
    out = {}
    root = checkpoint_root()
    if root.is_dir():
        for cfg in sorted(root.glob("*/*/config.json")):
            try:
                task = json.loads(cfg.read_text()).get("task", cfg.parent.parent.name)
            except (OSError, ValueError):
                continue
            out[cfg.parent.name] = (task, cfg.parent)
    return out


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Names (``arch.tag``) of the shipped checkpoints, optionally filtered by task and glob."""
    return sorted(n for n, (t, _) in _shipped().items()
                  if (task is None or t == task) and fnmatch.fnmatch(n, pattern))


def resolve_checkpoint(name_or_dir: str | os.PathLike) -> Path:
    """A checkpoint directory from a shipped name or a path."""
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    shipped = _shipped()
    if str(name_or_dir) in shipped:
        return shipped[str(name_or_dir)][1]
    raise ValueError(f"{str(name_or_dir)!r} is neither a checkpoint directory nor a shipped model; "
                     f"shipped: {sorted(shipped)}")
