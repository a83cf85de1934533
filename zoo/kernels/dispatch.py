"""Backend selection for packed layers.

``reference``: the pure-torch integer path (``reference.py``), any device, nothing cached.
``cpu``: the cached CPU path (``cached.py``: weights unpacked once, one float32 conv/matmul per
layer, outputs identical to the reference); CUDA tensors run the reference.
``triton``: the Triton kernels on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``
was set before Triton was imported (slow; for tests).
``auto``: Triton on CUDA tensors when Triton is installed, the cached CPU path on CPU tensors, the
reference everywhere else.

Layers or inputs a kernel does not cover fall back to the reference silently in every backend.
Nothing here imports Triton until a Triton path is actually taken.
"""
from __future__ import annotations

import importlib.util
import os

BACKENDS = ("auto", "triton", "cpu", "reference")
BINARY_KERNELS = ("auto", "popcount", "dot")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    return backend


def check_binary_kernel(kernel: str) -> str:
    if kernel not in BINARY_KERNELS:
        raise ValueError(f"unknown binary kernel {kernel!r}; valid: {list(BINARY_KERNELS)}")
    return kernel


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cpu_cached(backend: str, x) -> bool:
    """Whether ``x`` runs through the cached CPU path (``cached.py``) before the reference."""
    return backend in ("auto", "cpu") and not x.is_cuda


def triton_ops(backend: str, x):
    """The Triton layer functions to run ``x`` through, or None for the reference."""
    check_backend(backend)
    if backend in ("reference", "cpu"):
        return None
    if backend == "auto":
        if not (x.is_cuda and triton_available()):
            return None
    elif not triton_available():
        raise RuntimeError("backend='triton' needs the 'triton' package: pip install triton "
                           "(or use backend='auto'/'reference')")
    elif not x.is_cuda and not interpreting():
        raise RuntimeError(f"backend='triton' runs on CUDA tensors; got a tensor on {x.device}. "
                           "Set TRITON_INTERPRET=1 before importing triton to interpret the kernels "
                           "on CPU (slow), or use backend='auto'/'reference'")
    from . import triton_layers

    return triton_layers
