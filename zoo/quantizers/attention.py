"""Attention as explicit, quantizable ops: the two matmuls (q·kᵀ, attn·v) and the softmax output.

A fused attention (timm's ``Attention`` with ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``)
hides both matmuls and the softmax inside one call, so nothing can quantize them. ``quantize()`` first
replaces such modules by :class:`Attention` / :class:`MultiheadAttention` (``ATTENTION_MAP``), which
compute the same thing from explicit :class:`MatMul` and :class:`Softmax` modules and keep the float
state dict (same parameter names, shared tensors), then quantizes those like any layer:

- ``MatMul`` -> :class:`QuantMatMul`: both operands through activation quantizers of the layer's act
  spec (per tensor); the attn·v matmul quantizes only v (its first operand is the softmax's quantized
  output). In eval mode the product is computed from the integer codes, exactly (float64 sums), as the
  packed layers do: ``y = s_a s_b Σ (q_a - z_a)(q_b - z_b)``.
- ``Softmax`` -> :class:`QuantSoftmax`: the output goes through the act spec's quantizer; a softmax
  override picks a softmax quantizer (``Log2``, ``LogSqrt2``, ``MPQ``; ``zoo/quantizers/logq.py``).

The config names them ``<attention>.matmul1`` (q·kᵀ), ``<attention>.matmul2`` (attn·v) and
``<attention>.softmax``, so ``{"*.softmax": {"act": {"type": "LogSqrt2", "bits": 4}}}`` sets every softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerQuant, build_quantizer


class MatMul(nn.Module):
    """``a @ b`` as a module. ``quant_a=False``: the first operand arrives quantized (softmax output)."""

    def __init__(self, quant_a: bool = True):
        super().__init__()
        self.quant_a = quant_a

    def forward(self, a, b):
        return a @ b

    def extra_repr(self):
        return "" if self.quant_a else "quant_a=False"


class Softmax(nn.Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.softmax(self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"


class QuantMatMul(MatMul):
    """Both operands fake-quantized in training; in eval mode computed from their integer codes."""

    def __init__(self, quant_a: bool, spec: LayerQuant):
        super().__init__(quant_a)
        self.spec = spec
        self.aq_a = build_quantizer(spec.act, "act") if quant_a else None
        self.aq_b = build_quantizer(spec.act, "act")

    backend = "auto"  # zoo.set_backend sets it, as on packed layers (kernels.dispatch.BACKENDS)

    @classmethod
    def from_float(cls, mod: MatMul, spec: LayerQuant) -> "QuantMatMul":
        return cls(mod.quant_a, spec)

    def grids(self) -> tuple:
        """The operands' eval-mode grids as Python numbers (``grid``), built once per quantizer state: the
        versions of their parameters and buffers, so a training step or a recalibration rebuilds them.
        Inside a torch.compile trace they are used as built before (no .item() in the trace); zoo.load
        builds them through ``kernels.cached.prepare``."""
        quantizers = [q for q in (self.aq_a, self.aq_b) if q is not None]
        hit = self.__dict__.get("_grids")
        if hit is not None and torch.compiler.is_compiling():
            return hit[1]
        tag = tuple((t.data_ptr(), t._version) for q in quantizers for t in [*q.parameters(), *q.buffers()])
        if hit is None or hit[0] != tag:
            hit = (tag, tuple(grid(q.params(None)) if q is not None else None for q in (self.aq_a, self.aq_b)))
            self.__dict__["_grids"] = hit
        return hit[1]

    def forward(self, a, b):
        if self.training or not _affine(self.aq_b) or (self.aq_a is not None and not _affine(self.aq_a)):
            a = self.aq_a(a) if self.aq_a is not None else a
            return a @ self.aq_b(b)
        return integer_matmul(a, self.aq_a, b, self.aq_b, self.backend, self.grids(), b.dtype).to(b.dtype)

    def extra_repr(self):
        return f"act={type(self.spec.act).__name__}(a{self.spec.act.bits})" + ("" if self.quant_a else
                                                                              ", a quantized upstream")


def _affine(q) -> bool:
    return getattr(q, "mode", None) == "affine"


def grid(p: dict) -> tuple[float, float, float, float, float]:
    """(scale, offset, zero, qmin, qmax) of an affine activation quantizer's eval-mode ``params(None)``,
    as Python numbers (the float32 values exactly)."""
    return tuple(float(torch.as_tensor(p[k]).reshape(-1)[0]) for k in ("scale", "offset", "zero", "qmin", "qmax"))


def _codes(x, grid):
    """Codes v (float64) of ``x`` on ``grid``: clamp(round(x / s + offset), qmin, qmax), as the quantizer."""
    s, off, _, lo, hi = grid
    return torch.clamp(torch.round(x.detach() / s + off), lo, hi).double()


def _int8_centre(qmin: float, qmax: float) -> int | None:
    """c with v - c in int8 for every code v in [qmin, qmax], or None."""
    return 0 if qmin >= -128 and qmax <= 127 else 128 if qmin >= 0 and qmax <= 255 else None


def integer_matmul(a, aq_a, b, aq_b, backend: str = "reference", grids: tuple | None = None,
                   out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``a @ b`` from integer codes: ``s_a s_b Σ u_a u_b`` with u = code - zero, in float64 (|u| < 2^8,
    K < 2^20 terms: exact far below 2^53). With ``aq_a=None`` the first operand is taken as the exact
    values it holds (the softmax quantizer's levels) and only b is quantized.

    Where both operands are quantized the integer sum has faster exact forms (``backend`` as on packed
    layers, ``kernels.dispatch``): on CUDA (or interpreted) under ``auto``/``triton``, the Triton int8
    batched matmul of the codes centred into int8 with the centring terms added back; on CPU under
    ``auto``/``cpu``, a float32 matmul when every partial sum is an integer below 2^24 (integer zero
    points and K max|u_a| max|u_b| < 2^24). Both give the float64 sum exactly; ``reference`` is the
    float64 product alone. ``grids``: the operands' ``grid``s when already known (``QuantMatMul.grids``).

    On that CPU path with the C++ kernels (``kernels.cpu_ops``, eager, float32 operands, integer zero
    points) the centred codes u = v - z come from one pass each (float32, exact: small integers) and,
    with ``out_dtype=float32``, the result is float32(float64(sum) * s_a s_b) in one more pass: the
    values the float64 product gives, rounded to float32 as ``QuantMatMul`` does."""
    from ..kernels import cpu_ops, dispatch

    ga, gb = grids if grids is not None else tuple(grid(q.params(None)) if q is not None else None
                                                   for q in (aq_a, aq_b))
    fast = dispatch.cpu_cached(backend, a) and a.dtype == b.dtype == torch.float32 and cpu_ops.ready()
    if fast and gb[2] == round(gb[2]) and (aq_a is None or ga[2] == round(ga[2])):
        return _cpu_integer_matmul(a, ga if aq_a is not None else None, b, gb, out_dtype)
    (sb, _, zb, bmin, bmax), vb = gb, _codes(b, gb)
    if aq_a is None:
        return (a.double() @ (vb - zb)) * sb
    (sa, _, za, amin, amax), va = ga, _codes(a, ga)
    k = a.shape[-1]
    ops = dispatch.triton_ops(backend, a)
    ca, cb = _int8_centre(amin, amax), _int8_centre(bmin, bmax)
    if ops is not None and ca is not None and cb is not None:
        a8, b8 = (va - ca).to(torch.int8), (vb - cb).to(torch.int8)
        acc = ops.int8_matmul(a8, b8)
        if acc is not None:  # Σ (a8 + da)(b8 + db), da = ca - za, db = cb - zb
            da, db = ca - za, cb - zb
            s = (acc.double() + db * a8.double().sum(-1, keepdim=True) + da * b8.double().sum(-2, keepdim=True)
                 + k * da * db)
            return s * (sa * sb)
    ua, ub = va - za, vb - zb
    if dispatch.cpu_cached(backend, a) and za == round(za) and zb == round(zb):
        if _bound(k, ga, gb) < 2 ** 24:
            return (ua.float() @ ub.float()).double() * (sa * sb)
    return (ua @ ub) * (sa * sb)


def _bound(k: int, ga, gb) -> float:
    """k max|u_a| max|u_b|: no partial sum of the integer product exceeds it."""
    return k * max(abs(ga[3] - ga[2]), abs(ga[4] - ga[2])) * max(abs(gb[3] - gb[2]), abs(gb[4] - gb[2]))


def _certified_float32_product(a: torch.Tensor, ub: torch.Tensor, umax: float) -> torch.Tensor | None:
    """``a @ ub`` in float32 where this call's values make it exact, else None: with ub integer-valued
    (|ub| <= umax) and every a a multiple of 2^-e, every partial sum of a row is a multiple of 2^-e below
    umax * sum|a_row| in magnitude, so float32 holds them all exactly (in any order, FMA or not) when
    that bound times 2^e is below 2^24. e is the largest that bound allows, and a * 2^e must be
    integer-valued: I-ViT's 16-bit softmax levels (multiples of 2^-15, rows summing to at most 1)
    pass; levels with a real-valued scale (log2, log-sqrt2) do not and take the float64 product."""
    from ..kernels import cpu_ops

    # (in C++: two passes over a -- the row sums, then the check -- where the torch form took six)
    return a @ ub if cpu_ops.dyadic_exponent(a, umax) >= 0 else None


def _cpu_integer_matmul(a, ga, b, gb, out_dtype):
    """``integer_matmul``'s CPU path with the C++ kernels (integer zero points; ``ga`` None: a is exact)."""
    from ..kernels import cpu_ops

    def centred(x, g):  # v - z in float32: one pass, exact
        s, off, z, lo, hi = g
        return cpu_ops.affine_input(x.detach(), None, s, off, lo, hi, z, 1.0, True)

    ub = centred(b, gb)
    if ga is None:  # a holds the softmax levels: the float64 product, as the reference, unless float32 is exact
        acc = _certified_float32_product(a.detach(), ub, max(abs(gb[3] - gb[2]), abs(gb[4] - gb[2])))
        if acc is None:
            return (a.double() @ ub.double()) * gb[0]
        if out_dtype == torch.float32:  # float(double(acc) * s) in one pass
            return cpu_ops.epilogue(acc, torch.full((acc.shape[-1],), gb[0], dtype=torch.float64), None, True)
        return acc.double() * gb[0]
    ua = centred(a, ga)
    if _bound(a.shape[-1], ga, gb) >= 2 ** 24:
        return (ua.double() @ ub.double()) * (ga[0] * gb[0])
    acc = ua @ ub  # float32: every partial sum an integer below 2^24
    if out_dtype == torch.float32:
        return cpu_ops.epilogue(acc, torch.full((acc.shape[-1],), ga[0] * gb[0], dtype=torch.float64), None, True)
    return acc.double() * (ga[0] * gb[0])


class QuantSoftmax(Softmax):
    """softmax, then the output quantizer of the act spec (a uniform one, or a softmax quantizer)."""

    def __init__(self, dim: int, spec: LayerQuant):
        super().__init__(dim)
        self.spec = spec
        self.oq = build_quantizer(spec.act, "act")

    @classmethod
    def from_float(cls, mod: Softmax, spec: LayerQuant) -> "QuantSoftmax":
        return cls(mod.dim, spec)

    def forward(self, x):
        return self.oq(x.softmax(self.dim))

    def extra_repr(self):
        return super().extra_repr() + f", act={type(self.spec.act).__name__}(a{self.spec.act.bits})"


OP_MAP: dict[type, type] = {MatMul: QuantMatMul, Softmax: QuantSoftmax}
QUANT_OPS = tuple(OP_MAP.values())


# ----------------------------------------------------------------------------- explicit attention
class Attention(nn.Module):
    """Multi-head self-attention computed step by step (timm's ``Attention`` parameters and names:
    ``qkv``, ``proj``, ``q_norm``/``k_norm``, ``norm``, ``attn_drop``/``proj_drop``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.gate = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self._add_ops()

    def _add_ops(self):
        self.matmul1, self.softmax, self.matmul2 = MatMul(), Softmax(-1), MatMul(quant_a=False)

    @classmethod
    def from_timm(cls, mod: nn.Module) -> "Attention":
        """The same computation as timm's ``Attention`` ``mod``, sharing its submodules and parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k in ("num_heads", "head_dim", "attn_dim", "scale"):
            setattr(new, k, getattr(mod, k))
        for k in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(new, k, getattr(mod, k, None) if k != "norm" else getattr(mod, k, nn.Identity()))
        new._add_ops()
        return new

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = _masked(attn, attn_mask, is_causal)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _masked(attn, attn_mask, is_causal):
    n, m = attn.shape[-2:]
    if is_causal:
        causal = torch.ones(n, m, dtype=torch.bool, device=attn.device).tril()
        attn = attn.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
    return attn


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` step by step, with ``in_proj`` as an ``nn.Linear`` (so it can be
    quantized) while the state dict keeps MHA's names (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj.*``). Supports what the common uses need: equal q/k/v embedding sizes, no ``bias_k`` /
    ``add_zero_attn``, ``attn_mask`` and ``key_padding_mask`` (bool or additive), ``need_weights``."""

    def __init__(self, mod: nn.MultiheadAttention):
        super().__init__()
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            raise ValueError("explicit MultiheadAttention supports kdim == vdim == embed_dim, no bias_k/bias_v "
                             "and add_zero_attn=False; this module is left as it is")
        self.embed_dim, self.num_heads, self.batch_first = mod.embed_dim, mod.num_heads, mod.batch_first
        self.head_dim = mod.head_dim
        self.dropout = mod.dropout
        self.in_proj = nn.Linear(mod.embed_dim, 3 * mod.embed_dim, bias=mod.in_proj_bias is not None)
        self.in_proj.weight = mod.in_proj_weight
        self.in_proj.bias = mod.in_proj_bias
        self.out_proj = mod.out_proj
        self.matmul1, self.softmax, self.matmul2 = MatMul(), Softmax(-1), MatMul(quant_a=False)
        self._register_state_dict_hook(_mha_names_out)
        self._register_load_state_dict_pre_hook(_mha_names_in)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, B, E = query.shape
        S = key.shape[0]
        H, D = self.num_heads, self.head_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q = self.in_proj(query)[..., :E]
            k = self.in_proj(key)[..., E:2 * E]
            v = self.in_proj(value)[..., 2 * E:]
        q = q.reshape(L, B * H, D).transpose(0, 1)
        k = k.reshape(S, B * H, D).transpose(0, 1)
        v = v.reshape(S, B * H, D).transpose(0, 1)
        attn = self.matmul1(q * (D ** -0.5), k.transpose(-2, -1)).view(B, H, L, S)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(B, H, L, S)
            attn = attn.masked_fill(m, float("-inf")) if m.dtype == torch.bool else attn + m
        elif is_causal:
            attn = attn.masked_fill(torch.ones(L, S, dtype=torch.bool, device=attn.device).triu(1), float("-inf"))
        if key_padding_mask is not None:
            m = key_padding_mask.view(B, 1, 1, S)
            attn = attn.masked_fill(m, float("-inf")) if m.dtype == torch.bool else attn + m
        w = self.softmax(attn)
        if self.training and self.dropout > 0:
            w = F.dropout(w, self.dropout)
        out = self.matmul2(w.reshape(B * H, L, S), v).transpose(0, 1).reshape(L, B, E)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (w.mean(dim=1) if average_attn_weights else w)


def _mha_names_out(module, state, prefix, local_metadata):
    for a, b in (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias")):
        if prefix + a in state:
            state[prefix + b] = state.pop(prefix + a)
    return state


def _mha_names_in(state, prefix, *args):
    for a, b in (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias")):
        if prefix + b in state:
            state[prefix + a] = state.pop(prefix + b)


def _timm_attention():
    import sys

    mod = sys.modules.get("timm.models.vision_transformer")  # only if the user's code imported timm
    return getattr(mod, "Attention", None) if mod is not None else None


def explicit_attention(model: nn.Module) -> nn.Module:
    """Replace (in place) every timm ``Attention`` and ``nn.MultiheadAttention`` under ``model`` by its
    explicit form (same parameters, same outputs in float). Returns ``model``; idempotent."""
    from .quantize import _set_child

    timm_cls = _timm_attention()
    for name, mod in list(model.named_modules()):
        if not name:
            continue
        if timm_cls is not None and type(mod) is timm_cls:
            _set_child(model, name, Attention.from_timm(mod))
        elif type(mod) is nn.MultiheadAttention:
            try:
                _set_child(model, name, MultiheadAttention(mod))
            except ValueError:
                continue  # an unsupported variant stays fused (and float)
    return model
