"""A small ViT / DeiT for small images (Dosovitskiy et al. 2021; Touvron et al. 2021), trained here on
Fashion-MNIST: patch embedding (a stride-p conv), a class token and learned position embeddings,
pre-norm blocks of multi-head self-attention and an MLP, a final LayerNorm and a linear head. Names
follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.i.attn.qkv``, ``blocks.i.mlp.fc1``,
``norm``, ``head``). The attention is :class:`zoo.quantizers.attention.Attention`, whose two matmuls and
softmax are modules ``zoo.quantize`` can quantize. ``distilled=True`` adds DeiT's distillation token and
head (training and eval return the mean of the two heads' logits, as DeiT's inference does)."""
from __future__ import annotations

import torch
from torch import nn

from ..quantizers.attention import Attention
from ..registry import register_model


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch}")
        self.num_patches = (img_size // patch) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6,
                 num_heads=3, mlp_ratio=4.0, distilled=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_prefix = 2 if distilled else 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled else None
        for p in (self.pos_embed, self.cls_token) + ((self.dist_token,) if distilled else ()):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x):
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x):
        x = self.tokens(x)
        if self.head_dist is None:
            return self.head(x[:, 0])
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


@register_model
def vit_tiny_p4(num_classes=10, in_chans=1, img_size=28, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0,
                distilled=False):
    """ViT for 28 x 28 images, patch 4 (49 patches + class token), width 96, depth 6, 3 heads."""
    return VisionTransformer(img_size, 4, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, distilled)


@register_model
def deit_tiny_p4(num_classes=10, in_chans=1, img_size=28, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0):
    """The same with DeiT's distillation token and second head."""
    return VisionTransformer(img_size, 4, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, True)
