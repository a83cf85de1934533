"""I-ViT's integer-only inference of a packed I-ViT release of ``zoo/models/vit.py`` (``quant=ivit``).

``zoo.load`` runs such a model with integer LayerNorm / softmax / GELU (``ivit.py``) and integer matmul
sums, but passes float values between the ops: every op quantizes its float input (``round(x / s)``),
the residual stream and the biases are float. :class:`IntegerViT` runs the same network with integers
only between the 8-bit input pixels and the logits, as I-ViT deploys it:

- every change of grid is a **dyadic requantization** ``(q m + 2^(k-1)) >> k`` (+ the next zero point,
  clamped to the next code range), ``m / 2^k`` the ratio of the two scales with ``m`` in
  ``[2^30, 2^31)`` (per output channel where the scale is: Linear outputs, LayerNorm's gamma);
- biases are integers in their accumulator's units (``round(b / (s_a s_w))``), LayerNorm's beta is
  added in the normalised integer domain (as ``ILayerNorm`` does), the class token and position
  embeddings are integers on the residual grid;
- the **residual stream** is integer: each addition requantizes both terms to the grid of the
  LayerNorm that reads the sum (16-bit, that LayerNorm's calibrated input scale) and adds them;
- the input pixels p = round(255 x) enter the patch embedding's codes through a fixed-point affine map
  (the normalisation and the input scale folded in); only the logits are scaled back to float.

Integer sums of products (the Linear layers, q·kᵀ, attn·v) are computed exactly (in float64 below
2^53, then held as int64), the shifts and requantizations in int64. The constants (multipliers, shifts,
integer biases) are derived once per module from the packed model's scales. Differences from
``zoo.load``'s forward: two roundings where that one rounds once (a residual sum, the token embedding),
and ±1 code where a dyadic multiplier rounds the scale ratio; measured on the whole test set in the
README (same top-1 to a few hundredths of a point).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import QuantMatMul, grid
from .ivit import ILayerNorm, IntSoftmax, ShiftGELU, i_layernorm, shift_gelu, shiftmax
from .packed import PackedConv2d, PackedLinear

FRAC = 30  # dyadic multipliers m / 2^k with |m| in [2^30, 2^31)


def dyadic(mult) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, k), int64, with m / 2^k the nearest such fraction to each ``mult`` and |m| in [2^30, 2^31)
    (m = 0 for mult = 0)."""
    mult = torch.as_tensor(mult, dtype=torch.float64)
    e = torch.floor(torch.log2(mult.abs().clamp_min(1e-300)))
    k = (FRAC - e).long()
    if bool((k < 1).any()) or bool((k > 62).any()):
        raise ValueError(f"scale ratios {mult.abs().min().item():.3g}..{mult.abs().max().item():.3g} are out of "
                         "the dyadic range (2^-32 .. 2^29)")
    m = torch.round(mult * torch.exp2(k.double())).long()
    return torch.where(mult == 0, 0, m), torch.where(mult == 0, 1, k)


def requant(q: torch.Tensor, mult, zero: int = 0, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
    """``clamp(round(q * mult) + zero, lo, hi)`` with the rounding as a dyadic multiply and shift,
    ``(q m + 2^(k-1)) >> k`` (half up); ``mult`` a scalar or a vector over q's last dim."""
    m, k = dyadic(mult)
    out = ((q * m + (torch.ones_like(k) << (k - 1))) >> k) + zero
    return out.clamp(lo, hi) if lo is not None or hi is not None else out


def _int(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.double()).long()


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product of int64 tensors (float64 sums: exact while they stay below 2^53)."""
    return _int(a.double() @ b.double())


class _Grid:
    """An affine activation grid (a quantizer's eval-mode params ``p``): scale s, integer zero z, codes lo..hi."""

    def __init__(self, p: dict):
        self.s, offset, z, lo, hi = grid(p)
        if offset != z or z != round(z):
            raise ValueError("integer-only inference needs integer zero points equal to the offset")
        self.z, self.lo, self.hi = int(z), int(lo), int(hi)


class _Layer:
    """A packed Linear / patch conv as integers: W = q - z_w [out, K], input grid (s, z, lo, hi), the
    integer bias in accumulator units, and the per-output-channel accumulator scale s s_w."""

    def __init__(self, layer):
        if layer.act_mode != "affine":
            raise ValueError(f"integer-only inference needs affine activation codes, got {layer.act_mode!r}")
        g = _Grid(layer.act_params())
        self.s, self.z, self.lo, self.hi = g.s, g.z, g.lo, g.hi
        q = layer.codes().reshape(layer.weight_shape[0], -1).double()
        z_w = layer.w_zero.double().reshape(-1, 1)
        if not torch.equal(z_w, torch.round(z_w)):
            raise ValueError("integer-only inference needs integer weight zero points")
        self.w = _int(q - z_w)
        self.acc_scale = self.s * layer.w_scale.double()
        self.bias = _int(layer.bias.double() / self.acc_scale) if layer.bias is not None else None

    def __call__(self, q: torch.Tensor, mult) -> torch.Tensor:
        """Integer accumulator (scale ``acc_scale``) of the input held as ints q whose scale / this
        layer's input scale is ``mult``."""
        v = requant(q, mult, self.z, self.lo, self.hi) - self.z
        acc = _matmul(v, self.w.t())
        return acc + self.bias if self.bias is not None else acc


def _norm(norm: ILayerNorm, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I-LayerNorm of residual codes r (already on its input grid): (ints, per-channel scale)."""
    y, sc = i_layernorm(r)
    g = norm.weight.detach().double()
    g = torch.where(g.abs() < 1e-12, torch.full_like(g, 1e-12), g)
    return y + torch.floor(norm.bias.detach().double() / g / sc).long(), sc * g


def _residual_grid(norm: ILayerNorm) -> tuple[float, int]:
    """(scale, max code) of the residual grid a LayerNorm reads."""
    return norm.iq.scale(), 2 ** (norm.iq.bits - 1) - 1


class IntegerViT(nn.Module):
    """Integer-only forward of a ``zoo.load``-ed packed I-ViT ``vit_tiny_p4``-style model (a patch conv
    with stride = kernel, pre-norm blocks of ``ILayerNorm`` / attention with ``IntSoftmax`` / MLP with
    ``ShiftGELU``, a final ``ILayerNorm``, a class-token head). Input: images in [0, 1] (8-bit levels),
    N x C x H x W, as ``model``; output: float logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        net = model.net
        blocks = list(net.blocks)
        checks = [isinstance(net.patch_embed.proj, PackedConv2d), isinstance(net.head, PackedLinear),
                  getattr(net, "dist_token", None) is None, isinstance(net.norm, ILayerNorm)]
        for b in blocks:
            checks += [isinstance(b.norm1, ILayerNorm), isinstance(b.norm2, ILayerNorm),
                       isinstance(b.attn.softmax, IntSoftmax), isinstance(b.mlp.act, ShiftGELU),
                       isinstance(b.attn.matmul1, QuantMatMul), isinstance(b.attn.matmul2, QuantMatMul)]
        conv = net.patch_embed.proj
        if not all(checks) or conv.stride != conv.weight_shape[2:] or conv.padding not in (0, (0, 0)):
            raise ValueError("IntegerViT runs packed I-ViT releases of zoo/models/vit.py (quant=ivit, no "
                             "distillation token); this model is not one")
        self.model = model
        # the packed layers as integers (weights unpacked, integer biases), built once
        self.layers = {id(m): _Layer(m) for m in net.modules() if isinstance(m, (PackedLinear, PackedConv2d))}

    def _affine_input(self, x: torch.Tensor, emb: _Layer) -> torch.Tensor:
        """Codes of the patch conv's input from pixels p = round(255 x): round(p A + B) + z in fixed point,
        A = 1 / (255 sigma s), B = -mu / (sigma s) per input channel."""
        mean, std = self.model.mean.double().reshape(-1), self.model.std.double().reshape(-1)
        p = torch.round(x.double() * 255).long()
        a = 1 / (255 * std * emb.s)
        m, k = dyadic(a)
        b = torch.round(-mean / (std * emb.s) * torch.exp2(k.double())).long()
        shape = (1, -1, 1, 1)
        v = (p * m.reshape(shape) + b.reshape(shape) + (1 << (k.reshape(shape) - 1))) >> k.reshape(shape)
        return (v + emb.z).clamp(emb.lo, emb.hi)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check_input(x)
        net = self.model.net
        emb = self.layers[id(net.patch_embed.proj)]
        v = self._affine_input(x, emb) - emb.z
        n, c, h, w = v.shape
        kh, kw = net.patch_embed.proj.weight_shape[2:]
        patches = v.reshape(n, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * kh * kw)
        acc = _matmul(patches, emb.w.t()) + emb.bias  # [N, P, D] at emb.acc_scale
        blocks = list(net.blocks)
        s_r, top = _residual_grid(blocks[0].norm1 if blocks else net.norm)
        pos = _int(net.pos_embed.detach().double()[0] / s_r)  # the token embeddings on the residual grid
        cls = _int(net.cls_token.detach().double()[0, 0] / s_r) + pos[0]
        r = torch.cat([cls.expand(n, 1, -1), requant(acc, emb.acc_scale / s_r) + pos[1:]], 1).clamp(-top, top)
        for i, blk in enumerate(blocks):
            s_mid, top_mid = _residual_grid(blk.norm2)
            nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else net.norm
            s_next, top_next = _residual_grid(nxt)
            y = self._attention(blk.attn, *_norm(blk.norm1, r))
            r = (requant(r, s_r / s_mid) + requant(y[0], y[1] / s_mid)).clamp(-top_mid, top_mid)
            y = self._mlp(blk.mlp, *_norm(blk.norm2, r))
            r = (requant(r, s_mid / s_next) + requant(y[0], y[1] / s_next)).clamp(-top_next, top_next)
            s_r = s_next
        h, sc = _norm(net.norm, r[:, 0])
        head = self.layers[id(net.head)]
        acc = head(h, sc / head.s)
        return (acc.double() * head.acc_scale).to(x.dtype)  # the logits: the one float step

    def _attention(self, attn, h, sc):
        """(ints, per-channel scale) of the attention branch's output for normalised ints h at scale sc."""
        qkv = self.layers[id(attn.qkv)]
        acc = qkv(h, sc / qkv.s)  # [N, T, 3 D] at qkv.acc_scale
        n, t, _ = acc.shape
        nh, hd = attn.num_heads, attn.head_dim
        acc = acc.reshape(n, t, 3, nh, hd).permute(2, 0, 3, 1, 4)
        scale = qkv.acc_scale.reshape(3, 1, nh, 1, hd)
        mm1, mm2 = attn.matmul1, attn.matmul2
        qa, qb, qv = (_Grid(q.params(None)) for q in (mm1.aq_a, mm1.aq_b, mm2.aq_b))  # the matmul operands' grids
        a = requant(acc[0], scale[0] * attn.scale / qa.s, qa.z, qa.lo, qa.hi) - qa.z
        b = requant(acc[1], scale[1] / qb.s, qb.z, qb.lo, qb.hi) - qb.z
        vv = requant(acc[2], scale[2] / qv.s, qv.z, qv.lo, qv.hi) - qv.z
        logits = _matmul(a, b.transpose(-2, -1))  # at qa.s * qb.s
        sm = attn.softmax
        s_in, top = sm.iq.scale(), 2 ** (sm.iq.bits - 1) - 1
        p = shiftmax(requant(logits, qa.s * qb.s / s_in, 0, -top, top), s_in, sm.bits)  # at 2^-(bits - 1)
        out = _matmul(p, vv).transpose(1, 2).reshape(n, t, nh * hd)  # at 2^-(bits - 1) * qv.s
        proj = self.layers[id(attn.proj)]
        return proj(out, 2.0 ** -(sm.bits - 1) * qv.s / proj.s), proj.acc_scale

    def _mlp(self, mlp, h, sc):
        fc1, fc2 = self.layers[id(mlp.fc1)], self.layers[id(mlp.fc2)]
        acc = fc1(h, sc / fc1.s)
        s_g, top = mlp.act.iq.scale(), 2 ** (mlp.act.iq.bits - 1) - 1
        g = shift_gelu(requant(acc, fc1.acc_scale / s_g, 0, -top, top), s_g, mlp.act.bits)
        return fc2(g, s_g * 2.0 ** -(mlp.act.bits - 1) / fc2.s), fc2.acc_scale


def integer_only(model: nn.Module) -> IntegerViT:
    """The integer-only form of a ``zoo.load``-ed I-ViT release (see :class:`IntegerViT`)."""
    return IntegerViT(model)


