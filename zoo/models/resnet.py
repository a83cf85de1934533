"""CIFAR-style ResNet-20 (He et al. 2016, option-A shortcuts) for small grey or colour images.

``act`` picks the nonlinearity (``relu`` for multi-bit nets; ``hardtanh`` or ``rprelu`` keep signed
activations for binary nets) and ``per_conv_shortcut`` adds a shortcut around every conv
(Bi-Real / IR-Net style), which keeps the same parameters, so a float checkpoint of the plain
net initialises the binary-friendly one.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..kernels import binary_block
from ..quantizers.binary import RPReLU
from ..registry import register_model

ACTS = ("relu", "hardtanh", "rprelu")


def _act(kind: str, channels: int) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "hardtanh":
        return nn.Hardtanh(inplace=True)
    if kind == "rprelu":
        return RPReLU(channels)
    raise ValueError(f"unknown act {kind!r}; valid: {list(ACTS)}")


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample and zero-pad the new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, out_ch - in_ch

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


NORMS = ("bn", "gn")


def _norm(kind: str, ch: int) -> nn.Module:
    """BatchNorm, or GroupNorm (4 groups): batch-independent, for tiny per-device batches and for
    data-parallel runs on CPU, where SyncBatchNorm is not available."""
    return nn.BatchNorm2d(ch) if kind == "bn" else nn.GroupNorm(min(4, ch), ch)


class BasicBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride, act, per_conv_shortcut, norm="bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, out_ch)
        self.act1 = _act(act, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, out_ch)
        self.act2 = _act(act, out_ch)
        self.shortcut = ShortcutA(in_ch, out_ch, stride)
        self.per_conv_shortcut = per_conv_shortcut

    def forward(self, x):
        if not self.training:  # W1A1 blocks at inference: two fused C++ passes where they apply
            fused = binary_block.basic_block(self, x)
            if fused is not None:
                return fused[0]
        sc = self.shortcut(x)
        out = self.bn1(self.conv1(x))
        if self.per_conv_shortcut:
            out = self.act1(out + sc)
            return self.act2(self.bn2(self.conv2(out)) + out)
        out = self.bn2(self.conv2(self.act1(out)))
        return self.act2(out + sc)


class ResNetCifar(nn.Module):
    def __init__(self, depth=20, num_classes=10, in_chans=3, width=16, act="relu",
                 per_conv_shortcut=False, norm="bn"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56), got {depth}")
        if act not in ACTS:
            raise ValueError(f"unknown act {act!r}; valid: {list(ACTS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {list(NORMS)}")
        n = (depth - 2) // 6
        self.stem = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn = _norm(norm, width)
        self.act = _act(act, width)
        blocks, ch = [], width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(ch, out_ch, stride, act, per_conv_shortcut, norm))
                ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.layers(x) if self.training else binary_block.sequential(self.layers, x, BasicBlock)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model
def resnet20(num_classes=10, in_chans=3, width=16, act="relu", per_conv_shortcut=False, norm="bn"):
    return ResNetCifar(20, num_classes, in_chans, width, act, per_conv_shortcut, norm)


@register_model
def resnet32(num_classes=10, in_chans=3, width=16, act="relu", per_conv_shortcut=False, norm="bn"):
    return ResNetCifar(32, num_classes, in_chans, width, act, per_conv_shortcut, norm)
