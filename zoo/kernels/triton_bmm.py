"""Triton batched int8 x int8 -> int32 matmul, for products of two quantized activations (attention's
q·kᵀ): ``c[b] = a[b] @ b[b]`` with a [B, M, K] and b [B, K, N] int8, exact int32 sums from ``tl.dot``
(|a|, |b| <= 128: exact while K < 2^17). The callers centre unsigned codes into int8 and add the
centring terms back on the host (``zoo.quantizers.attention.integer_matmul``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_lowbit import INTERPRET, launch_options

# The interpreter runs one Python program per tile: few, large tiles. On a GPU the autotuner picks.
INTERPRET_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
BMM_CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in [(32, 32, 32, 2, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3),
                                         (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)]]
MAX_K = 2 ** 17  # 128 * 128 * K < 2^31


@triton.jit
def _bmm_i8_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sa_b, sa_m, sa_k, sb_b, sb_k, sb_n, sc_b, sc_m, sc_n,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bat = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + bat * sa_b + offs_m[:, None] * sa_m + offs_k[None, :] * sa_k,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        b = tl.load(b_ptr + bat * sb_b + offs_k[:, None] * sb_k + offs_n[None, :] * sb_n,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    tl.store(c_ptr + bat * sc_b + offs_m[:, None] * sc_m + offs_n[None, :] * sc_n, acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_bmm_tuned = triton.autotune(configs=BMM_CONFIGS, key=["M", "N", "K"])(_bmm_i8_kernel)


def int8_bmm(a: torch.Tensor, b: torch.Tensor, blocks: dict | None = None) -> torch.Tensor:
    """int32 [B, M, N] = a [B, M, K] @ b [B, K, N] for int8 tensors on one device (CUDA, or CPU when
    interpreting); ``blocks`` fixes BLOCK_M/N/K instead of autotuning."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"int8_bmm takes int8 [B, M, K] and [B, K, N] tensors, got {a.dtype} "
                         f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    (nb, m, k), (nb2, k2, n) = a.shape, b.shape
    if nb != nb2 or k != k2:
        raise ValueError(f"int8_bmm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    if k >= MAX_K:
        raise ValueError(f"int8_bmm: K={k} could overflow the int32 sums (K < {MAX_K})")
    c = torch.empty(nb, m, n, dtype=torch.int32, device=a.device)
    args = (a, b, c, m, n, k, *a.stride(), *b.stride(), *c.stride())
    if blocks is None and not INTERPRET:
        grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), nb)  # noqa: E731
        _bmm_tuned[grid](*args, **launch_options())
        return c
    blk = dict(INTERPRET_BLOCKS, **(blocks or {}))
    grid = (triton.cdiv(m, blk["BLOCK_M"]), triton.cdiv(n, blk["BLOCK_N"]), nb)
    _bmm_i8_kernel[grid](*args, **blk, **launch_options())
    return c
