"""Shared pieces of every quantizer module.

Every quantizer computes its forward *value* through an integer form (codes, scale, zero) with no
gradient, and its gradient through a differentiable *surrogate* defined by its paper; ``ste``
joins the two so the forward value is bit-identical to what the packed model computes.
"""
from __future__ import annotations

import struct

import torch
from torch import nn


def ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` exactly, backward the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() with identity gradient; the forward value is exactly torch.round(x)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward x, backward grad * g (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def affine_codes(x, scale, offset, qmin, qmax):
    """Integer codes of the affine activation form: clamp(round(x / scale + offset), qmin, qmax)."""
    return torch.clamp(torch.round(x / scale + offset), qmin, qmax)


GRID = ("scale", "offset", "zero", "qmin", "qmax")


def _affine_inference(x: torch.Tensor, p: dict) -> torch.Tensor | None:
    """``ActQuantizer.forward``'s value at CPU inference in one C++ pass (``kernels.cpu_ops.affine_input``):
    (clamp(round(x / scale + offset), qmin, qmax) - zero) * scale in float32, the operations and order of
    ``affine_codes`` and the ste's value; its ``+ (clamp(x) - clamp(x))`` is + 0 (NaN where x is, and
    then the value is NaN too), a no-op for scale > 0. None where that does not apply: gradients
    needed, not eager float32 CPU work with the kernels built, not a contiguous tensor of 2 or more
    dims, a per-channel grid, a non-float32 or non-positive scale, a Python number float32 cannot hold."""
    from ..kernels import cpu_ops

    if x.is_cuda or x.dtype != torch.float32 or x.dim() < 2 or not x.numel() or not x.is_contiguous():
        return None  # (contiguous: the output has torch's layout)
    if torch.is_grad_enabled() and (x.requires_grad or any(isinstance(p[k], torch.Tensor) and p[k].requires_grad
                                                           for k in GRID)):
        return None  # (training: nothing below, not even the kernels' build)
    if not cpu_ops.ready():  # (before the .item()s below: inside a torch.compile trace, not ready)
        return None
    grid = []
    for k in GRID:
        t = p[k]
        if isinstance(t, torch.Tensor):
            if t.numel() != 1 or t.dtype != torch.float32 or t.is_cuda:
                return None
            grid.append(float(t.reshape(())))
        elif abs(float(t)) < 2.0 ** 127 and struct.unpack("f", struct.pack("f", float(t)))[0] == float(t):
            grid.append(float(t))
        else:
            return None
    s, off, z, lo, hi = grid
    if not s > 0:
        return None
    return cpu_ops.affine_input(x, None, s, off, lo, hi, z, s, True)


def sign_codes(x):
    """±1 with sign(0) = +1 (so every value packs into one bit)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def reduce_dims(ndim: int, axis: int) -> tuple:
    return tuple(d for d in range(ndim) if d != axis)


def distributed() -> bool:
    """Whether this process is one of several data-parallel ranks (torch.distributed running)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks(t: torch.Tensor, op: str) -> torch.Tensor:
    """``t`` reduced over the data-parallel ranks (``op``: "sum", "min" or "max") when
    torch.distributed runs with more than one process; ``t`` itself otherwise. Quantizers call it on
    the statistics they initialise or track from a training batch, so every rank ends with the state a
    single process would get from the whole global batch."""
    import torch.distributed as dist

    if not distributed():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    t = t.detach().clone()
    dist.all_reduce(t, op=ops[op])
    return t


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every data-parallel rank (a random choice all ranks must share)."""
    import torch.distributed as dist

    if not distributed():
        return t
    t = t.detach().clone()
    dist.broadcast(t, src=0)
    return t


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over every rank's batch (sum and count reduced, so shard sizes may differ)."""
    s = all_ranks(torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)]), "sum")
    return s[0] / s[1]


def global_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) standard deviation of ``x`` over every rank's batch, two-pass as
    ``x.mean()``, ``x.std(unbiased=False)`` (which it is in a single process)."""
    if not distributed():
        return x.mean(), x.std(unbiased=False)
    mu = global_mean(x)
    return mu, global_mean((x - mu) ** 2).sqrt()


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int) -> torch.Tensor:
    """(q - zero_c) * scale_c for codes ``q`` and per-channel ``scale``/``zero`` along ``axis``."""
    return (q - channel_view(zero, q.ndim, axis)) * channel_view(scale, q.ndim, axis)


def nudge(f, target: torch.Tensor, guess: torch.Tensor, steps: int = 64) -> torch.Tensor:
    """Per element, a float within ``steps`` representable values of ``guess`` with ``f(x) == target``
    bit for bit (``guess`` where there is none): inverts a quantizer's float formula exactly, so a
    rebuilt quantizer state exports the very same parameters."""
    guess = torch.as_tensor(guess, dtype=target.dtype).clone()
    best, found = guess.clone(), f(guess) == target
    up, down = guess.clone(), guess.clone()
    inf = torch.full_like(guess, float("inf"))
    for _ in range(steps):
        if bool(found.all()):
            break
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        for c in (up, down):
            ok = (f(c) == target) & ~found
            best, found = torch.where(ok, c, best), found | ok
    return best


def fit_in_bins(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, normalise, margin: float,
                iters: int = 2000) -> torch.Tensor:
    """Values inside the open bins (lo, hi) that also satisfy the statistics ``normalise`` imposes
    (e.g. a quantizer that derives its scale from the weights' mean and std): alternate the two
    projections until the normalised values sit in their bins. Used to rebuild float weights from
    packed codes; the caller checks the result re-quantizes to the same codes."""
    for _ in range(iters):
        t = normalise(t)
        if bool(((t > lo) & (t < hi)).all()):
            break
        t = torch.maximum(torch.minimum(t, hi - margin), lo + margin)
    return t


class Quantizer(nn.Module):
    """Base class. Missing quantizer state in a loaded state dict keeps its initial value, so a
    float checkpoint loads strictly into a quantized model (the quantizer then initialises from
    data on its first forward)."""

    bits: int = 8

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        own = [k for k in missing_keys[before:] if k.startswith(prefix)]
        for k in own:
            missing_keys.remove(k)

    def set_progress(self, fraction: float) -> None:  # noqa: D401 - optional hook
        """Training progress in [0, 1]; quantizers with a schedule (IR-Net EDE) override this."""

    @property
    def final_form(self) -> bool:
        """Whether the quantizer is in the form it is released in (a schedule that changes the form,
        as EBB's decaying second basis, is False until it ends); only then may an epoch be released."""
        return True


class WeightQuantizer(Quantizer):
    """Weight quantizers return fake-quantized weights and expose their integer form."""

    def __init__(self, bits: int, ch_axis: int = 0):
        super().__init__()
        self.bits = bits
        self.ch_axis = ch_axis

    def codes(self, w: torch.Tensor):
        """(q, scale, zero, surrogate): unsigned integer codes q in [0, 2^bits - 1] (float dtype),
        per-channel ``scale`` and ``zero`` broadcastable to w, and the gradient surrogate."""
        raise NotImplementedError  # abstract

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q, scale, zero, surrogate = self.codes(w)
        return ste((q - zero) * scale, surrogate)

    @torch.no_grad()
    def restore(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The inverse of packing, for fine-tuning a release: given codes ``q`` (float, shaped like
        the weight) and per-channel ``scale``/``zero`` [C], set this quantizer's own state and return
        a float weight that it quantizes back to exactly these codes, scale and zero."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rebuilt from packed codes")

    @torch.no_grad()
    def integer_form(self, w: torch.Tensor):
        """(q uint8 same shape as w, scale [C], zero [C]) with (q - zero) * scale == forward(w)."""
        q, scale, zero, _ = self.codes(w)
        c = w.shape[self.ch_axis]
        scale = torch.broadcast_to(scale, w.shape).movedim(self.ch_axis, 0).reshape(c, -1)[:, 0]
        zero = torch.broadcast_to(zero, w.shape).movedim(self.ch_axis, 0).reshape(c, -1)[:, 0]
        return q.to(torch.uint8), scale.float().contiguous(), zero.float().contiguous()


class ActQuantizer(Quantizer):
    """Activation quantizers. ``mode`` is "affine" (codes via :func:`affine_codes`) or "sign"."""

    mode = "affine"

    def __init__(self, bits: int, ch_axis: int = 1):
        super().__init__()
        self.bits = bits
        self.ch_axis = ch_axis

    def params(self, x: torch.Tensor) -> dict:
        """Affine mode: dict(scale, offset, zero, qmin, qmax) as used by forward (no grad)."""
        raise NotImplementedError  # abstract

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Affine fake quantization with the clipped straight-through gradient (1 inside the
        representable range, 0 outside); quantizers with learnable ranges override this."""
        p = self.params(x)
        y = _affine_inference(x, p)
        if y is not None:
            return y
        v = affine_codes(x.detach(), p["scale"], p["offset"], p["qmin"], p["qmax"])
        lo = (p["qmin"] - p["zero"]) * p["scale"]
        hi = (p["qmax"] - p["zero"]) * p["scale"]
        return ste((v - p["zero"]) * p["scale"], torch.clamp(x, lo, hi))

    @torch.no_grad()
    def restore(self, params: dict) -> None:
        """The inverse of :meth:`export`, for fine-tuning a release: set this quantizer's state from
        the packed layer's activation parameters (float tensors: scale, offset, zero, qmin, qmax of
        shape [1], and the vectors it exported) so it quantizes exactly as the packed layer does."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rebuilt from packed parameters")

    @torch.no_grad()
    def export(self) -> dict:
        """Frozen inference parameters: scale, offset, zero, qmin, qmax as float tensors of shape [1]."""
        return {k: torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(1).clone()
                for k, v in self.params(None).items()}
