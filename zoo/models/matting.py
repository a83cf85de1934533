"""RVM-style recurrent video matting at CPU size, and BiMatting's binary-friendly variant.

``rvm_small``: a MobileNet-like encoder (float stem, then blocks of a 3x3 conv and a 1x1 conv, each
with BatchNorm and, with ``per_conv_shortcut``, a shortcut around it as in Bi-Real / ReActNet) to
1/16 resolution, and a recurrent decoder (RVM): a bottleneck and two upsampling blocks carry ConvGRU
states across frames (on half their channels), two more upsampling blocks reach full resolution,
each block sees the encoder's skip feature and the pooled frame, and a float 1x1 projection gives
alpha and a foreground residual. A float 1x1 head on the 1/4 decoder feature gives a coarse alpha
(trained with an auxiliary loss).

``bimatting_small``: the same network with BiMatting's two ideas (Qin et al., NeurIPS 2023; our own
code after reading the paper and ``htqin/BiMatting``):

- **Shrinkable Binarized Block** (``sbb``): each encoder stage's second block becomes a widen-then-
  shrink pair with a skip, ``o = theta_dn(theta_up(x')) + x'``; ``theta_up`` widens C -> 2C (its 1x1
  conv's shortcut repeats the input channels), ``theta_dn`` shrinks 2C -> C (its shortcut averages the
  two halves).
- **Sparse-Assisted Binarization** (``sab``): the 3x3 convs of the full- and half-resolution decoder
  blocks become ``o = SA-BiConv3x3(x; M) + BiConv1x1(x)``: the 3x3 branch (conv, BN, activation) is
  kept only where the mask ``M`` is set, ``M`` the uncertain band of the 1/4-resolution coarse alpha
  (``SAB_LOW < alpha < SAB_HIGH``) resized bilinearly to each block's resolution (nonzero: set). In
  training the branch is dense times M; in eval mode with ``sparse`` on (the default) it is computed
  only at the active positions (gather their 3x3 patches, one matrix product, scatter), which equals
  dense times M. :attr:`SABlock.density` records the fraction of positions computed.

The net takes normalised clips N x T x 3 x H x W (H, W multiples of 16) and returns
``(alpha, fgr_residual, coarse_alpha, state)``; :class:`MattingModel` (the ``ZooModel`` it is released
in) takes [0, 1] clips and returns alpha N x T x 1 x H x W in [0, 1] (and the foreground), carrying the
recurrent state across the T frames; ``model.step(frame)`` streams frame by frame (``model.reset()``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_model
from ..wrapper import RANGE_SLACK, ZooModel
from .resnet import _act

KEEP_LAYERS = ("encoder.stem", "decoder.project", "decoder.coarse")  # float in BiMatting
SAB_LOW, SAB_HIGH = 0.02, 0.98  # coarse alpha strictly between these is "uncertain"


def clamp01(x: torch.Tensor) -> torch.Tensor:
    """``x.clamp(0, 1)`` whose gradient passes straight through (a plain clamp has none outside [0, 1],
    so a head whose outputs all leave the range, as a freshly binarized net's may, never recovers)."""
    if not x.requires_grad:
        return x.clamp(0, 1)
    return x + (x.clamp(0, 1) - x).detach()


def _conv_bn(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)


def _match(x: torch.Tensor, cout: int) -> torch.Tensor:
    """Shortcut to ``cout`` channels: repeat the channels (widen) or average groups of them (shrink)."""
    cin = x.shape[1]
    if cout == cin:
        return x
    if cout % cin == 0:
        return x.repeat(1, cout // cin, 1, 1)
    if cin % cout == 0:
        return x.reshape(x.shape[0], cin // cout, cout, *x.shape[2:]).mean(1)
    raise ValueError(f"cannot match {cin} channels to {cout}")


class Block(nn.Module):
    """3x3 conv (cin -> cin, stride) + BN [+ shortcut] -> act; 1x1 conv (cin -> cout) + BN [+ shortcut] -> act."""

    def __init__(self, cin, cout, stride, act, per_conv_shortcut):
        super().__init__()
        self.conv3, self.bn3 = _conv_bn(cin, cin, 3, stride)
        self.act3 = _act(act, cin)
        self.conv1, self.bn1 = _conv_bn(cin, cout, 1)
        self.act1 = _act(act, cout)
        self.stride, self.shortcut, self.cout = stride, per_conv_shortcut, cout

    def forward(self, x):
        y = self.bn3(self.conv3(x))
        if self.shortcut:
            y = y + (F.avg_pool2d(x, 2, ceil_mode=True) if self.stride > 1 else x)
        y = self.act3(y)
        z = self.bn1(self.conv1(y))
        if self.shortcut:
            z = z + _match(y, self.cout)
        return self.act1(z)


class SBB(nn.Module):
    """Shrinkable Binarized Block: ``o = dn(up(x)) + x``, ``up`` widening C -> 2C, ``dn`` shrinking back."""

    def __init__(self, c, act, per_conv_shortcut):
        super().__init__()
        self.up = Block(c, 2 * c, 1, act, per_conv_shortcut)
        self.dn = Block(2 * c, c, 1, act, per_conv_shortcut)

    def forward(self, x):
        return self.dn(self.up(x)) + x


class Encoder(nn.Module):
    def __init__(self, widths, act, per_conv_shortcut, sbb):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 2, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.stages = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            second = SBB(cout, act, per_conv_shortcut) if sbb else Block(cout, cout, 1, act, per_conv_shortcut)
            self.stages.append(nn.Sequential(Block(cin, cout, 2, act, per_conv_shortcut), second))

    def forward(self, x):
        feats = [self.stem_bn(self.stem(x))]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats  # 1/2, 1/4, 1/8, 1/16


class ConvGRU(nn.Module):
    """RVM's ConvGRU: ``r, z = sigmoid(W_ih [x, h])``, ``c = tanh(W_hh [x, r h])``, ``h' = (1 - z) h + z c``."""

    def __init__(self, c):
        super().__init__()
        self.ih = nn.Conv2d(2 * c, 2 * c, 3, 1, 1)
        self.hh = nn.Conv2d(2 * c, c, 3, 1, 1)

    def forward(self, x, h):
        """x: N x T x C x H x W, h: N x C x H x W or None -> (outputs N x T x C x H x W, last h)."""
        if h is None:
            h = x.new_zeros(x.shape[0], *x.shape[2:])
        out = []
        for t in range(x.shape[1]):
            xt = x[:, t]
            r, z = torch.sigmoid(self.ih(torch.cat([xt, h], 1))).chunk(2, 1)
            c = torch.tanh(self.hh(torch.cat([xt, r * h], 1)))
            h = (1 - z) * h + z * c
            out.append(h)
        return torch.stack(out, 1), h


def gather_patches(x: torch.Tensor, n_idx: torch.Tensor, p_idx: torch.Tensor) -> torch.Tensor:
    """The 3x3 zero-padded patches of ``x`` (N x C x H x W) at the positions ``(n_idx, p_idx = y * W + x)``
    only, as K x (C * 9) in ``conv.weight.flatten(1)`` order (what ``F.unfold`` gives, without unfolding
    the positions that are not asked for)."""
    w = x.shape[-1]
    ys, xs = p_idx // w, p_idx % w
    xp = F.pad(x, (1, 1, 1, 1))
    taps = [xp[n_idx, :, ys + dy, xs + dx] for dy in range(3) for dx in range(3)]  # each K x C
    return torch.stack(taps, -1).flatten(1)


def sparse_conv(conv: nn.Module, x: torch.Tensor, n_idx: torch.Tensor, p_idx: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (3x3, stride 1, padding 1) at the positions ``(n_idx, p_idx = y * W + x)`` only, as
    K x C_out for K positions, from the 3x3 patches gathered there: one matrix product instead of the
    dense convolution. Works for float, training-form quantized and packed convs; a packed conv
    computes from its integer codes (float64 sums, as ``zoo.kernels.reference``) like its dense path."""
    from ..kernels import reference
    from ..quantizers.layers import QuantConv2d
    from ..quantizers.packed import PackedConv2d

    if isinstance(conv, PackedConv2d) and conv.act_mode != "none":
        conv._next_site()
        v, s_a, z_a = conv._int_inputs(x)
        u = v.double() - z_a  # the training form zero-pads the dequantized input: u = v - z_a, padded with 0
        patches = gather_patches(u, n_idx, p_idx)
        acc_q = patches @ conv.codes().flatten(1).double().t()
        acc_1 = patches.sum(-1, keepdim=True)
        return reference._epilogue(acc_q, acc_1, s_a, conv.w_scale, conv.w_zero, conv.bias, -1).to(x.dtype)
    if isinstance(conv, PackedConv2d):  # weight-only
        conv._next_site()
        w, bias = conv.dequantized_weight(), conv.bias
    elif isinstance(conv, QuantConv2d):
        x, w, bias = conv.quant_input(x), conv.quant_weight(), conv.bias
    else:
        w, bias = conv.weight, conv.bias
    return F.linear(gather_patches(x, n_idx, p_idx), w.flatten(1), bias)


class SABlock(nn.Module):
    """Sparse-Assisted Binarization: ``o = M * act3(bn3(conv3x3(x))) + act1(bn1(conv1x1(x)))``."""

    sparse = True  # eval mode: compute the 3x3 branch only where M is set

    def __init__(self, cin, cout, act):
        super().__init__()
        self.conv3, self.bn3 = _conv_bn(cin, cout, 3)
        self.act3 = _act(act, cout)
        self.conv1, self.bn1 = _conv_bn(cin, cout, 1)
        self.act1 = _act(act, cout)
        self.active, self.total = 0, 0  # positions computed / positions seen by the 3x3 branch (eval)

    @property
    def density(self) -> float:
        return self.active / self.total if self.total else float("nan")

    def branch3(self, x, mask):
        if self.training or not self.sparse:
            return self.act3(self.bn3(self.conv3(x))) * mask
        n, _, h, w = x.shape
        keep = mask.reshape(n, h * w) > 0
        n_idx, p_idx = keep.nonzero(as_tuple=True)
        out = x.new_zeros(n, h * w, self.bn3.num_features)
        if len(n_idx):
            y = sparse_conv(self.conv3, x, n_idx, p_idx)  # K x C_out
            bn = self.bn3
            y = (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            y = self.act3(y[:, :, None, None])[:, :, 0, 0]
            out[n_idx, p_idx] = y * mask.reshape(n, h * w)[n_idx, p_idx, None]
        return out.transpose(1, 2).reshape(n, -1, h, w)

    def forward(self, x, mask):
        if not self.training:
            self.active += int((mask > 0).sum())
            self.total += mask.numel()
        return self.branch3(x, mask) + self.act1(self.bn1(self.conv1(x)))


class DenseBlock(nn.Module):
    """The plain decoder conv: 3x3 conv + BN [+ shortcut when the widths match] -> act (mask ignored)."""

    def __init__(self, cin, cout, act, per_conv_shortcut):
        super().__init__()
        self.conv3, self.bn3 = _conv_bn(cin, cout, 3)
        self.act3 = _act(act, cout)
        self.shortcut = per_conv_shortcut and cin == cout

    def forward(self, x, mask=None):
        y = self.bn3(self.conv3(x))
        return self.act3(y + x if self.shortcut else y)


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip feature and the pooled frame, a (SAB or dense) conv block,
    and a ConvGRU on half the channels (``gru``)."""

    def __init__(self, cin, cskip, cout, act, per_conv_shortcut, gru, sab):
        super().__init__()
        c = cin + cskip + 3
        self.conv = SABlock(c, cout, act) if sab else DenseBlock(c, cout, act, per_conv_shortcut)
        self.gru = ConvGRU(cout // 2) if gru else None

    def forward(self, x, skip, img, n, t, h, mask=None):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.conv(torch.cat([x, skip, img], 1), mask)
        if self.gru is None:
            return x, None
        a, b = x.split(x.shape[1] // 2, 1)
        b, h = self.gru(b.unflatten(0, (n, t)), h)
        return torch.cat([a, b.flatten(0, 1)], 1), h


class Decoder(nn.Module):
    def __init__(self, enc, dec, act, per_conv_shortcut, sab):
        super().__init__()
        self.neck = Block(enc[4], dec[0], 1, act, per_conv_shortcut)
        self.neck_gru = ConvGRU(dec[0] // 2)
        self.up8 = UpBlock(dec[0], enc[3], dec[1], act, per_conv_shortcut, True, False)
        self.up4 = UpBlock(dec[1], enc[2], dec[2], act, per_conv_shortcut, True, False)
        self.coarse = nn.Conv2d(dec[2], 1, 1)  # coarse alpha at 1/4 (float)
        self.up2 = UpBlock(dec[2], enc[1], dec[3], act, per_conv_shortcut, False, sab)
        self.up1 = UpBlock(dec[3], 0, dec[4], act, per_conv_shortcut, False, sab)
        self.refine = SABlock(dec[4], dec[4], act) if sab else DenseBlock(dec[4], dec[4], act, per_conv_shortcut)
        self.project = nn.Conv2d(dec[4], 4, 1)  # alpha + foreground residual (float)

    def forward(self, feats, imgs, n, t, state):
        f2, f4, f8, f16 = feats
        x = self.neck(f16)
        a, b = x.split(x.shape[1] // 2, 1)
        b, s0 = self.neck_gru(b.unflatten(0, (n, t)), state[0])
        x = torch.cat([a, b.flatten(0, 1)], 1)
        x, s1 = self.up8(x, f8, imgs[3], n, t, state[1])
        x, s2 = self.up4(x, f4, imgs[2], n, t, state[2])
        coarse = clamp01(self.coarse(x))
        with torch.no_grad():
            m = ((coarse > SAB_LOW) & (coarse < SAB_HIGH)).float()
        masks = [(F.interpolate(m, size=i.shape[-2:], mode="bilinear", align_corners=False) > 0).float()
                 for i in (imgs[1], imgs[0])]
        x, _ = self.up2(x, f2, imgs[1], n, t, None, masks[0])
        x, _ = self.up1(x, imgs[0][:, :0], imgs[0], n, t, None, masks[1])
        x = self.refine(x, masks[1])
        return self.project(x), coarse, [s0, s1, s2]


class MattingNet(nn.Module):
    """``forward(src, state=None)``: normalised clips N x T x 3 x H x W -> (alpha N x T x 1 x H x W in
    [0, 1], foreground residual N x T x 3 x H x W, coarse alpha N x T x 1 x H/4 x W/4, state)."""

    def __init__(self, widths=(16, 32, 64, 128), dec=(64, 32, 24, 16, 16), act="relu", per_conv_shortcut=True,
                 sbb=False, sab=False):
        super().__init__()
        widths, dec = tuple(int(w) for w in widths), tuple(int(d) for d in dec)
        if len(widths) != 4 or len(dec) != 5:
            raise ValueError(f"widths needs 4 values and dec 5, got {widths} and {dec}")
        if any(d % 2 for d in dec[:3]):
            raise ValueError(f"dec[:3]={dec[:3]} must be even (a ConvGRU runs on half of their channels)")
        self.encoder = Encoder(widths, act, per_conv_shortcut, sbb)
        self.decoder = Decoder((3,) + widths, dec, act, per_conv_shortcut, sab)
        self.sbb, self.sab = bool(sbb), bool(sab)

    def forward(self, src, state=None):
        if src.ndim != 5 or src.shape[2] != 3:
            raise ValueError(f"expected clips N x T x 3 x H x W, got {tuple(src.shape)}")
        n, t, _, h, w = src.shape
        if h % 16 or w % 16:
            raise ValueError(f"frame size {h} x {w} must be a multiple of 16 (the encoder's stride)")
        x = src.flatten(0, 1)
        imgs = [x]
        for _ in range(3):
            imgs.append(F.avg_pool2d(imgs[-1], 2))
        out, coarse, state = self.decoder(self.encoder(x), imgs, n, t, state or [None, None, None])
        alpha = clamp01(out[:, :1]).unflatten(0, (n, t))
        return alpha, out[:, 1:].unflatten(0, (n, t)), coarse.unflatten(0, (n, t)), state

    def sab_blocks(self) -> list[SABlock]:
        return [m for m in self.modules() if isinstance(m, SABlock)]


class MattingModel(ZooModel):
    """A released matting model: ``model(clip)`` -> alpha N x T x 1 x H x W in [0, 1] for clips
    N x T x 3 x H x W in [0, 1], the recurrent state carried across the T frames (starting from
    zeros, or from ``state``). ``fgr=True`` also returns the foreground (N x T x 3 x H x W);
    ``return_state=True`` also returns the state after the last frame. ``model.step(frame)`` streams:
    one N x 3 x H x W frame at a time, keeping the state in the model until ``model.reset()``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._state = None

    def check_input(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"expected a float tensor of clips in [0, 1], got "
                            f"{type(x).__name__ if not torch.is_tensor(x) else x.dtype}")
        if x.ndim != 5 or x.shape[2] != 3:
            raise ValueError(f"expected clips of shape N x T x 3 x H x W, got {tuple(x.shape)} "
                             "(one frame: model.step(frame) or frame[:, None])")
        if not self.training and x.numel():
            lo, hi = torch.aminmax(x.detach())
            if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
                raise ValueError(f"expected frames in [0, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]"
                                 + (" (0-255 images: divide by 255)" if hi > 2 else ""))

    def forward(self, x, state=None, fgr: bool = False, return_state: bool = False):
        self.check_input(x)
        alpha, res, _, state = self.net((x - self.mean) / self.std, state)
        out = (alpha, (x + res).clamp(0, 1)) if fgr else (alpha,)
        out = out + (state,) if return_state else out
        return out if len(out) > 1 else out[0]

    def reset(self) -> None:
        """Forget the streaming state (the next ``step`` starts a new video)."""
        self._state = None

    def step(self, frame: torch.Tensor, fgr: bool = False):
        """One frame N x 3 x H x W -> its alpha N x 1 x H x W (and foreground), carrying the state."""
        if not torch.is_tensor(frame) or frame.ndim != 4:
            raise ValueError(f"expected a frame N x 3 x H x W, got {getattr(frame, 'shape', type(frame))}")
        out = self(frame[:, None], state=self._state, fgr=fgr, return_state=True)
        self._state = out[-1]
        return tuple(o[:, 0] for o in out[:-1]) if fgr else out[0][:, 0]


MattingNet.zoo_wrapper = MattingModel


@register_model
def rvm_small(widths=(16, 32, 64, 128), dec=(64, 32, 24, 16, 16), act="relu", per_conv_shortcut=True,
              sbb=False, sab=False) -> MattingNet:
    """The float RVM-style matting network (see the module docstring); binarized plainly it is the
    XNOR / ReAct baseline (``quant=xnor|react bits=1``)."""
    return MattingNet(widths, dec, act, per_conv_shortcut, sbb, sab)


@register_model
def bimatting_small(widths=(16, 32, 64, 128), dec=(64, 32, 24, 16, 16), act="relu", per_conv_shortcut=True,
                    sbb=True, sab=True) -> MattingNet:
    """``rvm_small`` with BiMatting's Shrinkable Binarized Blocks (``sbb``) in the encoder and
    Sparse-Assisted Binarization (``sab``) in the high-resolution decoder; ``sbb=False`` / ``sab=False``
    are the ablations."""
    return MattingNet(widths, dec, act, per_conv_shortcut, sbb, sab)
