"""Compute kernels for packed low-bit layers: ``reference`` (pure torch ground truth), packing, and
the backend dispatch. Importing this package imports no Triton."""
from .dispatch import BACKENDS, BINARY_KERNELS, check_backend
from .packing import pack, packed_row_bytes, storage_bits, unpack

__all__ = ["BACKENDS", "BINARY_KERNELS", "check_backend", "pack", "unpack", "packed_row_bytes", "storage_bits"]
