"""Super-resolution architectures from basicsr (EDSR, MSRResNet, SwinIR), used unchanged, plus
QuantSR's depth-dynamic quantized architecture (DQA) as a wrapper around their residual trunk.

basicsr is an optional dependency (installed after torch, see the README) and is imported only when
one of these architectures is built, so ``import zoo`` stays light.

Compatibility step: basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, a private
module torchvision 0.17 renamed to ``_functional_tensor`` (0.29 has only the new name). Before
importing basicsr, :func:`import_basicsr` registers the renamed module under the old name in
``sys.modules`` when (and only when) the old name is missing. basicsr uses it only for
``rgb_to_grayscale`` in its degradation pipeline, which the zoo never calls.
"""
from __future__ import annotations

import functools
import importlib
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_model

BASICSR_INSTALL = ("pip install -c constraints.txt --no-build-isolation basicsr==1.4.2 "
                   "(after torch is installed; see the README)")


def import_basicsr(module: str):
    """Import ``basicsr.<module>`` (e.g. ``archs.edsr_arch``), with the torchvision rename bridged."""
    old = "torchvision.transforms.functional_tensor"
    if old not in sys.modules:
        try:
            importlib.import_module(old)
        except ImportError:
            sys.modules[old] = importlib.import_module("torchvision.transforms._functional_tensor")
    try:
        return importlib.import_module("basicsr." + module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "basicsr":
            raise ModuleNotFoundError(f"the super-resolution architectures need basicsr: {BASICSR_INSTALL}") from None
        raise


# ----------------------------------------------------------------------------- DQA
class DynamicBody(nn.Sequential):
    """A residual trunk whose number of active blocks (``depth``) is chosen at run time.

    Each block's residual is scaled by a learnable gate: ``x + g_i (block_i(x) - x)``. At depth d the
    d blocks with the largest |g_i| run and the others are skipped (identity), so one trained
    network serves every depth; QuantSR's DQA trains it by sampling the depth per step.
    ``depth=None`` runs every block.
    """

    def __init__(self, blocks):
        super().__init__(*blocks)
        self.gates = nn.Parameter(torch.ones(len(blocks)))
        self.depth: int | None = None

    @property
    def depth_choices(self) -> list[int]:
        n = len(self)
        return sorted({n, max(1, math.ceil(n / 2)), max(1, math.ceil(n / 4))}, reverse=True)

    def set_depth(self, depth: int | None) -> None:
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                                  or not 1 <= depth <= len(self)):
            raise ValueError(f"depth={depth!r} is not valid for a trunk of {len(self)} blocks; "
                             f"valid: None (all) or 1..{len(self)}")
        self.depth = depth

    def active(self) -> list[int]:
        n = len(self)
        if self.depth is None or self.depth >= n:
            return list(range(n))
        mag = self.gates.detach().abs().tolist()
        return sorted(sorted(range(n), key=lambda i: (-mag[i], i))[: self.depth])

    def forward(self, x):
        active = set(self.active())
        for i, block in enumerate(self):
            if i in active:
                x = x + self.gates[i] * (block(x) - x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a plain (non-DQA) float checkpoint has no gates: they keep their initial value 1
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "gates" in missing_keys[before:]:
            missing_keys.remove(prefix + "gates")


def _with_dqa(net: nn.Module, trunk: str = "body") -> nn.Module:
    setattr(net, trunk, DynamicBody(list(getattr(net, trunk))))
    return net


def set_depth(model: nn.Module, depth: int | None) -> list[int]:
    """Run ``depth`` quantized residual blocks in every DQA trunk of ``model`` (None: all). Returns
    the active block indices of the first trunk; raises if the model has no DQA trunk."""
    bodies = [m for m in model.modules() if isinstance(m, DynamicBody)]
    if not bodies:
        if depth is None:
            return []
        raise ValueError("this model has no depth-dynamic trunk (train it with model_args.dqa=true)")
    for b in bodies:
        b.set_depth(depth)
    return bodies[0].active()


# ----------------------------------------------------------------------------- architectures
@register_model
def edsr(upscale: int = 4, num_feat: int = 32, num_block: int = 4, res_scale: float = 1.0,
         img_range: float = 1.0, in_chans: int = 3, dqa: bool = False, **kwargs):
    """basicsr EDSR (QuantSR-C). Defaults are a CPU-sized EDSR (the paper's: 64-256 feats, 16-32 blocks)."""
    arch = import_basicsr("archs.edsr_arch")
    net = arch.EDSR(in_chans, in_chans, num_feat=num_feat, num_block=num_block, upscale=upscale,
                    res_scale=res_scale, img_range=img_range, **kwargs)
    return _with_dqa(net) if dqa else net


@register_model
def msrresnet(upscale: int = 4, num_feat: int = 32, num_block: int = 4, in_chans: int = 3,
              dqa: bool = False, **kwargs):
    """basicsr MSRResNet (SRResNet without BN; QuantSR-C's SRResNet)."""
    arch = import_basicsr("archs.srresnet_arch")
    net = arch.MSRResNet(in_chans, in_chans, num_feat=num_feat, num_block=num_block, upscale=upscale,
                         **kwargs)
    return _with_dqa(net) if dqa else net


@functools.cache
def _padded_swinir():
    """basicsr's SwinIR, padding inputs to a multiple of the window size (as the SwinIR authors'
    test code does, by reflection) and cropping the output back; the layers and keys are unchanged."""
    base = import_basicsr("archs.swinir_arch").SwinIR

    class SwinIR(base):
        def __init__(self, *args, window_size=7, **kwargs):
            super().__init__(*args, window_size=window_size, **kwargs)
            self.pad_to = window_size

        def forward(self, x):
            h, w = x.shape[-2:]
            ph, pw = (-h) % self.pad_to, (-w) % self.pad_to
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
            return super().forward(x)[..., : h * self.upscale, : w * self.upscale]

    return SwinIR


@register_model
def swinir(upscale: int = 4, embed_dim: int = 30, depths=(2, 2), num_heads=(3, 3), window_size: int = 8,
           mlp_ratio: float = 2.0, img_size: int = 48, in_chans: int = 3, dqa: bool = False, **kwargs):
    """basicsr SwinIR with the lightweight pixel-shuffle-direct tail (QuantSR-T on SwinIR-S).
    Defaults are a CPU-sized SwinIR-S (SwinIR-S: embed_dim 60, depths and heads (6, 6, 6, 6))."""
    if dqa:
        raise ValueError("dqa=True needs a sequential residual trunk (edsr, msrresnet); swinir has none")
    kwargs.setdefault("upsampler", "pixelshuffledirect")
    kwargs.setdefault("img_range", 1.0)
    cls = _padded_swinir()
    return cls(upscale=upscale, in_chans=in_chans, img_size=img_size, window_size=window_size,
               embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads), mlp_ratio=mlp_ratio,
               **kwargs)
