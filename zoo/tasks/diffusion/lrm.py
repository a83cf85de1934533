"""BinaryDM's low-rank representation mimicking (LRM).

The float teacher's and the binary student's block outputs (each UNet down block, the middle block
and each up block) are projected onto the teacher's top principal directions and matched there with
a mean squared error: ``sum_b mean((f_s P_b - f_t P_b)^2)``, where ``P_b`` (C_b x k_b, k_b = C_b // 4
as in the authors' code, at least 1) holds the top eigenvectors of the covariance of the teacher's
C_b-dim feature vectors (one per pixel) on one training batch, computed once at the start of training
and kept in the checkpoint. The loss is added to the diffusion loss with the weight ``distill``.

Differences from the authors' released code (Xingyu-Zheng/BinaryDM, ``ddpm_ours.py``, read for
understanding): it hooks every ``TimestepEmbedSequential`` block of the LDM UNet, computes the
projection with ``torch.pca_lowrank`` on the teacher features reshaped to ``(-1, shape[-1])`` -- for
N x C x H x W features that is the width axis, not the channels the paper describes -- averages the
per-block MSEs over blocks and adds ``1e-4`` times that to the loss. We project the channels, as the
paper writes, sum over blocks, and choose the weight per recipe (the card states it).
"""
from __future__ import annotations

import torch
from torch import nn


def unet_blocks(unet: nn.Module) -> list[str]:
    """Names (relative to ``unet``) of a diffusers UNet2DModel's blocks whose outputs LRM matches."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


class FeatureTap:
    """Forward hooks keeping the outputs of named submodules (a block returning a tuple: its first
    element) while ``enabled``."""

    def __init__(self, root: nn.Module, names: list[str]):
        self.names, self.enabled, self.feats = list(names), False, {}
        mods = dict(root.named_modules())
        missing = [n for n in self.names if n not in mods]
        if missing:
            raise ValueError(f"no submodule(s) {missing} to tap; blocks: {[n for n in mods if n.count('.') <= 1]}")
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def fn(module, args, out):
            if self.enabled:
                self.feats[name] = out[0] if isinstance(out, tuple) else out
        return fn

    def collect(self, fn, *args):
        """Run ``fn(*args)`` and return (its output, {name: feature})."""
        self.feats, self.enabled = {}, True
        try:
            out = fn(*args)
        finally:
            self.enabled = False
        feats, self.feats = self.feats, {}
        return out, feats

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def pca_projection(features: torch.Tensor, rank: int) -> torch.Tensor:
    """C x rank: the top-``rank`` principal directions (unit eigenvectors of the covariance, largest
    eigenvalue first) of the C-dim vectors at every position of ``features`` (N x C x H x W)."""
    c = features.shape[1]
    if not 1 <= rank <= c:
        raise ValueError(f"rank={rank} is not valid for {c} channels; valid: 1..{c}")
    v = features.detach().double().movedim(1, -1).reshape(-1, c)
    v = v - v.mean(0)
    cov = v.T @ v / max(len(v) - 1, 1)
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    return vecs[:, torch.argsort(vals, descending=True)[:rank]].to(features.dtype).contiguous()


def default_rank(channels: int) -> int:
    return max(1, channels // 4)


def project(f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """N x C x H x W features on the C x k directions ``p`` -> N x k x H x W."""
    return torch.einsum("nchw,ck->nkhw", f, p.to(f.dtype))


def lrm_loss(student: dict, teacher: dict, projections: dict) -> torch.Tensor:
    """sum over blocks of mean((project(f_s) - project(f_t))^2); the teacher carries no gradient."""
    return sum(torch.mean((project(student[n], p) - project(teacher[n].detach(), p)) ** 2)
               for n, p in projections.items())
