"""Salient-object detection: BCE + IoU loss on one-channel logits; MAE, max F-measure and S-measure
(``metrics``) per validation epoch and on the test split; a grid PNG (image | ground truth |
prediction) of fixed test samples after every validation epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...datasets import save_panel
from ..base import QuantTask
from . import release
from .data import CompositeSalData, FolderSalData
from .scenes import SceneSalData
from .metrics import SaliencyMeter

GRID_SAMPLES = 6


def iou_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - soft IoU per image, averaged: sum(p g) / sum(p + g - p g) on sigmoid probabilities."""
    p = logits.sigmoid().flatten(1)
    g = mask.flatten(1)
    inter = (p * g).sum(1)
    union = (p + g - p * g).sum(1)
    return (1 - (inter + 1) / (union + 1)).mean()


def sal_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, mask) + iou_loss(logits, mask)


@torch.no_grad()
def evaluate(model, loader, progress: bool = True) -> dict:
    """MAE, max F-measure (beta^2 = 0.3) and S-measure of ``model``'s sigmoid maps over ``loader``."""
    model.eval()
    meter = SaliencyMeter()
    for x, mask in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        meter.update(model(x).sigmoid(), mask)
    return meter.compute()


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    t = t.detach().float().cpu().clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return (t * 255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def sample_grid(model, images: torch.Tensor, masks: torch.Tensor, path, zoom: int = 2) -> Path:
    """A JPEG with one row per sample: image | ground truth | predicted saliency map."""
    was_training = model.training
    model.eval()
    pred = model(images).sigmoid()
    model.train(was_training)
    gap = np.full((images.shape[-2], 4, 3), 255, np.uint8)
    rows = [np.concatenate([_to_uint8(i), gap, _to_uint8(m), gap, _to_uint8(p)], axis=1)
            for i, m, p in zip(images, masks, pred)]
    hgap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    panel = np.concatenate([r for row in rows for r in (row, hgap)][:-1], axis=0)
    return save_panel(panel, path, zoom)


def fixed_samples(dm, n: int = GRID_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    test = dm.split("test")
    pairs = [test[i] for i in range(min(n, len(test)))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class SaliencyTask(QuantTask):
    onnx_exportable = True
    task_name = "sal"
    datamodules = {"sal_scenes": SceneSalData, "sal_composites": CompositeSalData, "sal_folder": FolderSalData}
    monitor = ("val/mae", "min")
    meter_factory = SaliencyMeter
    meter_keys = ("maxf", "smeasure")
    evaluate = staticmethod(evaluate)
    extra_metrics = staticmethod(release.extra_metrics)
    card_lines = staticmethod(release.card_lines)
    card_usage = staticmethod(release.card_usage)
    domain = staticmethod(release.domain)
    card_images = release.CARD_IMAGES
    summary_table = staticmethod(release.summary_table)
    predict = staticmethod(release.predict)
    benchmark_loader = staticmethod(release.benchmark_loader)

    @staticmethod
    def data_model_args(contract: dict) -> dict:
        return {"in_chans": contract["channels"]}

    @staticmethod
    def golden_input(dm) -> torch.Tensor:
        return fixed_samples(dm, 1)[0]

    @staticmethod
    def report(model, dm, release_dir) -> str:
        png = sample_grid(model, *fixed_samples(dm), Path(release_dir) / "sample.jpg")
        m = model.metrics
        real = []
        if m.get("real_mae") is not None:
            from .real import real_grid

            grid = real_grid(model, Path(release_dir) / "real.jpg")
            real = [f"sal_real ({m.get('real_images', '?')} photos): MAE {m['real_mae']:.4f}  maxF "
                    f"{m['real_maxf']:.4f}  S {m['real_smeasure']:.4f}; photo | mask | prediction: {grid}"]
        return "\n".join([
            f"{'MAE':>8} {'maxF':>7} {'S':>7}   ({m.get('test_images', '?')} test images)",
            f"{m['test_mae']:8.4f} {m['test_maxf']:7.4f} {m['test_smeasure']:7.4f}",
            f"test samples (image | ground truth | prediction): {png}", *real])

    # ------------------------------------------------------------------ training
    def distill_loss(self, student_logits, x):
        with torch.no_grad():
            target = self.teacher(x).sigmoid()
        return F.binary_cross_entropy_with_logits(student_logits, target)

    def loss_and_metrics(self, batch, stage):
        x, mask = batch
        logits = self.model(x)
        loss = sal_loss(logits, mask)
        metrics = {"loss": loss.detach()}
        loss = self.with_distill(loss, logits, x, stage)
        p = logits.detach().sigmoid()
        metrics["mae"] = (p - mask).abs().mean()
        if stage != "train":
            self._meter.update(p, mask)
        return loss, metrics

    def epoch_picture(self, dm, path):
        x, m = fixed_samples(dm)
        sample_grid(self.model, x.to(self.device), m, path)
