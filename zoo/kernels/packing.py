"""Exact packing of 1/2/4/8-bit unsigned codes into bytes along the last (reduction) axis.

Element j of a row lives in byte j // (8 // bits) at bit offset (j % (8 // bits)) * bits
(little-endian within the byte), so four consecutive bytes read as a little-endian int32 hold
32 one-bit codes with element i at bit i.
"""
from __future__ import annotations

import torch

STORAGE_BITS = (1, 2, 4, 8)


def storage_bits(bits: int) -> int:
    """The container width a ``bits``-bit code is stored in (3 -> 4, 5..7 -> 8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return next(b for b in STORAGE_BITS if b >= bits)


def packed_row_bytes(k: int, bits: int) -> int:
    per = 8 // storage_bits(bits)
    return -(-k // per)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) of shape [R, K] into uint8 [R, ceil(K / (8 // sb))]."""
    sb = storage_bits(bits)
    if q.ndim != 2:
        raise ValueError(f"pack expects a 2-D [rows, K] tensor, got shape {tuple(q.shape)}")
    q = q.to(torch.int32)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits}-bit packing, "
                         f"got [{int(q.min())}, {int(q.max())}]")
    per = 8 // sb
    r, k = q.shape
    pad = (-k) % per
    if pad:
        q = torch.cat([q, q.new_zeros(r, pad)], dim=1)
    q = q.view(r, -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * sb
    return (q << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [R, B] -> int codes (uint8) [R, k]."""
    sb = storage_bits(bits)
    per = 8 // sb
    if packed.ndim != 2 or packed.shape[1] * per < k:
        raise ValueError(f"packed tensor of shape {tuple(packed.shape)} cannot hold {k} {bits}-bit codes")
    p = packed.to(torch.int32).unsqueeze(-1)
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * sb
    codes = (p >> shifts) & (2 ** sb - 1)
    return codes.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)
