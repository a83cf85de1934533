"""Image classification: cross-entropy (+ optional distillation from the float teacher), top-1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base import QuantTask
from . import release
from .data import FashionMNISTData, ImageFolderData


@torch.no_grad()
def evaluate(model, loader, progress: bool = True) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model`` (images in [0, 1]) over ``loader``."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        total += len(y)
    return {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1), "images": total}


class ClassificationTask(QuantTask):
    onnx_exportable = True
    task_name = "cls"
    datamodules = {"fmnist": FashionMNISTData, "folder": ImageFolderData}
    monitor = ("val/acc", "max")
    head_layers = ("fc",)  # another number of classes re-initialises the classifier
    evaluate = staticmethod(evaluate)
    card_lines = staticmethod(release.card_lines)
    card_usage = staticmethod(release.card_usage)
    domain = staticmethod(release.domain)
    finetune_demo = staticmethod(release.finetune_demo)
    finetune_variants = release.FINETUNE_VARIANTS
    summary_table = staticmethod(release.summary_table)
    predict = staticmethod(release.predict)
    benchmark_loader = staticmethod(release.benchmark_loader)

    @staticmethod
    def data_model_args(contract: dict) -> dict:
        return {"in_chans": contract["channels"], "num_classes": len(contract["classes"])}

    def loss_and_metrics(self, batch, stage):
        x, y = batch
        logits = self.model(x)
        ce = F.cross_entropy(logits, y)
        loss = self.with_distill(ce, logits, x, stage)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"loss": ce.detach(), "acc": acc}
