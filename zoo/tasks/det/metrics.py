"""COCO box metrics: mAP@[.5:.95], mAP50 and mAP75 (torchmetrics' ``MeanAveragePrecision`` with the
pycocotools backend, i.e. the COCO evaluation itself: 101-point interpolated precision, IoU thresholds
0.50:0.05:0.95, up to 100 detections an image, mean over the classes present)."""
from __future__ import annotations

import torch


def _map_metric():
    try:
        from torchmetrics.detection import MeanAveragePrecision

        return MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    except (ImportError, ModuleNotFoundError) as e:
        raise ImportError("detection metrics need pycocotools: pip install -c constraints.txt -e '.[det]'") from e


class DetectionMeter:
    """Accumulates (predictions, targets) batches in torchvision's form; ``compute()`` -> {map, map50,
    map75} as fractions in [0, 1] (-1 where no box was seen at all)."""

    def __init__(self):
        self.metric = _map_metric()
        self.images = 0

    @staticmethod
    def _cpu(d: dict, keys) -> dict:
        return {k: d[k].detach().cpu() for k in keys}

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        self.metric.update([self._cpu(p, ("boxes", "scores", "labels")) for p in preds],
                           [self._cpu(t, ("boxes", "labels")) for t in targets])
        self.images += len(preds)

    def compute(self) -> dict:
        r = self.metric.compute()
        return {"map": float(r["map"]), "map50": float(r["map_50"]), "map75": float(r["map_75"]),
                "images": self.images}


def boxes_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes (K x 4, M x 4) -> K x M."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)
