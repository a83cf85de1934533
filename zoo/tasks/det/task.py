"""Object detection: torchvision FCOS / RetinaNet (``zoo.models.det``) trained on the sum of their own
loss dict (each loss logged); COCO mAP, mAP50 and mAP75 (``metrics``) per validation epoch and on the
test split; a PNG of fixed test images with their ground-truth and predicted boxes after every
validation epoch and next to the release.

A torchvision detector computes its losses only in training mode and only given the targets
(``net(x, targets)``), and returns detections in eval mode: the training step calls the wrapped net
with the targets, validation and test (eval mode, as Lightning runs them) call the model as a user
does. The golden output of a release is the heads' raw outputs (``head_outputs``), which are
continuous in the weights: the detections after score thresholding and NMS are not (a tie can
reorder two boxes, a score at the threshold can drop one).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..base import QuantTask
from . import release
from .data import CocoDetData, CompositeDetData
from .metrics import DetectionMeter
from .onnx import DetectorForm

SAMPLES = 6          # fixed test images in the sample PNG
DRAW_MIN_SCORE = 0.3  # detections drawn in the sample PNG


def model_device(model) -> torch.device:
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model, loader, progress: bool = True) -> dict:
    """COCO mAP@[.5:.95], mAP50 and mAP75 (fractions) of ``model``'s detections over ``loader``
    (batches of images and torchvision-style targets); ``images``: how many were seen."""
    model.eval()
    device = model_device(model)
    meter = DetectionMeter()
    for x, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        meter.update(model(x.to(device)), targets)
    return meter.compute()


@torch.no_grad()
def head_outputs(model, x: torch.Tensor) -> torch.Tensor:
    """The detection head's raw outputs for images ``x`` in [0, 1], concatenated per anchor / point:
    N x A x (classes + 4 box regressions [+ 1 centerness for FCOS]), keys in sorted order. What a
    release's golden pair stores (a continuous function of the weights, unlike the detections)."""
    model.check_input(x)
    net = model.net
    if hasattr(net, "head_outputs"):  # a detector that says how (arch=mmdet)
        return net.head_outputs((x - model.mean) / model.std)
    images, _ = net.transform(list((x - model.mean) / model.std))
    out = net.head(list(net.backbone(images.tensors).values()))
    return torch.cat([out[k] for k in sorted(out)], dim=-1)


def fixed_samples(dm, n: int = SAMPLES):
    test = dm.split("test")
    pairs = [test[i] for i in range(min(n, len(test)))]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


@torch.no_grad()
def sample_grid(model, images: torch.Tensor, targets: list, classes, path, zoom: int = 2) -> Path:
    """A PNG with one row per image: ground-truth boxes | predicted boxes (score >= DRAW_MIN_SCORE)."""
    import numpy as np

    from ...datasets import save_panel, to_uint8

    was_training = model.training
    model.eval()
    preds = model(images.to(model_device(model)))
    model.train(was_training)
    rows = []
    for img, t, p in zip(images, targets, preds):
        base = to_uint8(img)
        keep = p["scores"] >= DRAW_MIN_SCORE
        gt = release.draw_boxes(base, t["boxes"], t["labels"], None, classes, zoom, colour=(0, 255, 0))
        pr = release.draw_boxes(base, p["boxes"][keep], p["labels"][keep], p["scores"][keep], classes, zoom)
        gap = np.full((gt.shape[0], 6, 3), 255, np.uint8)
        rows.append(np.concatenate([gt, gap, pr], axis=1))
    hgap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    panel = np.concatenate([r for row in rows for r in (row, hgap)][:-1], axis=0)
    return save_panel(panel, path)


class DetectionTask(QuantTask):
    onnx_exportable = True
    onnx_form = DetectorForm
    task_name = "det"
    datamodules = {"det_composites": CompositeDetData, "coco": CocoDetData}
    monitor = ("val/map", "max")
    meter_factory = DetectionMeter
    meter_keys = ("map", "map50", "map75")
    selects_on_meter = True  # mAP is an epoch-level metric
    # another number of classes re-initialises the classification layer (a release's or float init_from's)
    head_layers = ("head.classification_head.cls_logits",)
    evaluate = staticmethod(evaluate)
    card_lines = staticmethod(release.card_lines)
    card_usage = staticmethod(release.card_usage)
    domain = staticmethod(release.domain)
    card_images = release.CARD_IMAGES
    summary_table = staticmethod(release.summary_table)
    predict = staticmethod(release.predict)
    predict_args = staticmethod(release.predict_args)
    benchmark_loader = staticmethod(release.benchmark_loader)
    golden_output = staticmethod(head_outputs)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hparams.distill > 0:
            raise ValueError(f"distill={self.hparams.distill} is not supported for task={self.task_name} "
                             f"(valid: 0.0): the detectors train on their own loss only")

    @staticmethod
    def data_model_args(contract: dict) -> dict:
        return {"num_classes": len(contract["classes"]), "size": int(contract["size"][0])}

    @staticmethod
    def contract_fits(release: dict, data: dict) -> bool:
        """The same channels and the same number of classes (the default starting point must have a
        classification layer for this data; an explicit ``init_from`` re-initialises it)."""
        return (QuantTask.contract_fits(release, data)
                and len(release.get("classes") or []) == len(data.get("classes") or []))

    @staticmethod
    def golden_input(dm) -> torch.Tensor:
        return fixed_samples(dm, 1)[0]

    @staticmethod
    def report(model, dm, release_dir) -> str:
        png = sample_grid(model, *fixed_samples(dm), model.input_contract.get("classes"),
                          Path(release_dir) / "sample.png")
        m = model.metrics
        return "\n".join([
            f"{'mAP':>8} {'mAP50':>7} {'mAP75':>7}   ({m.get('test_images', '?')} test images, COCO box mAP)",
            f"{m['test_map']:8.4f} {m['test_map50']:7.4f} {m['test_map75']:7.4f}",
            f"test samples (ground truth | detections with score >= {DRAW_MIN_SCORE}): {png}"])

    # ------------------------------------------------------------------ training
    def loss_and_metrics(self, batch, stage):
        if stage != "train":
            raise RuntimeError("detection losses exist in training mode only (validation measures mAP)")
        x, targets = batch
        self.model.check_input(x)
        losses = self.model.net((x - self.model.mean) / self.model.std, targets)
        loss = sum(losses.values())
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}

    def _eval_step(self, batch):
        x, targets = batch
        self._meter.update(self.model(x), targets)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def epoch_picture(self, dm, path):
        x, t = fixed_samples(dm)
        sample_grid(self.model, x, t, self.hparams.input_contract.get("classes"), path)
