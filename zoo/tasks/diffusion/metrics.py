"""Sample quality without downloads: the Frechet distance (FD) and kernel distance (KID) in the feature
space of a classifier trained in this project on the same data (by default the penultimate layer, the
input of ``fc``, of the shipped ``resnet20.fp32_fmnist``), through torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with ``feature=<that module>``. This is a
classifier-feature FD (as TF-GAN's ``frechet_classifier_distance``), not ImageNet-Inception FID: its
values are comparable only with other values measured the same way (same feature network, sample
count and DDIM steps, which every card states)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierFeatures(nn.Module):
    """Images in [0, 1] (N x C x H x W) -> the input of ``classifier``'s layer ``layer`` (a Linear):
    centre-cropped (or resized) to the classifier's input size first."""

    def __init__(self, classifier: nn.Module, layer: str = "fc"):
        super().__init__()
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        mods = dict(classifier.net.named_modules())
        if layer not in mods or not hasattr(mods[layer], "in_features"):
            raise ValueError(f"fd layer {layer!r} is not a Linear layer of the feature network; "
                             f"Linear layers: {[n for n, m in mods.items() if isinstance(m, nn.Linear)]}")
        self.num_features = int(mods[layer].in_features)
        self.size = tuple(classifier.input_contract["size"])
        self.channels = int(classifier.input_contract["channels"])
        self._feats = None
        mods[layer].register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self._feats = args[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"the FD feature network takes {self.channels}-channel images, got {x.shape[1]}")
        h, w = self.size
        if x.shape[-2] >= h and x.shape[-1] >= w and (x.shape[-2] - h) % 2 == 0 and (x.shape[-1] - w) % 2 == 0:
            top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            x = x[..., top:top + h, left:left + w]
        else:
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        self.classifier(x.clamp(0, 1).float())
        return self._feats.double()


def feature_network(name: str, layer: str = "fc") -> ClassifierFeatures:
    from ...checkpoint import load

    return ClassifierFeatures(load(name), layer)


@torch.no_grad()
def sample_distances(real: torch.Tensor, fake: torch.Tensor, features: ClassifierFeatures,
                     batch_size: int = 500) -> dict:
    """FD and KID (mean, std over subsets) between two image sets in [0, 1] in ``features``' space."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=True)
    kid = KernelInceptionDistance(feature=features, normalize=True, subsets=100, subset_size=min(1000, n))
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, len(imgs), batch_size):
            b = imgs[i:i + batch_size].float()
            fid.update(b, real=is_real)
            kid.update(b, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fd": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
