"""Backend selection for packed layers. ``auto`` picks the fastest available path for the tensor's
device; today that is the pure-torch reference everywhere (Triton kernels plug in here)."""
from __future__ import annotations

from . import reference

BACKENDS = ("auto", "reference")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    return backend


def resolve(backend: str, x) -> object:
    """The kernel module to run ``x`` through."""
    check_backend(backend)
    return reference
