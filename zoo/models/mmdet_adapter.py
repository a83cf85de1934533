"""mmdet detectors behind the torchvision detection contract (``arch=mmdet``), so ``task=det`` trains,
quantizes and releases them exactly as it does ``fcos_r18`` / ``retinanet_r18``.

``mmdet(config="retinanet/retinanet_r18_fpn_1x_coco.py", ...)`` reads a config bundled in the mmdet
package (``mmdet/.mim/configs``; its ``_base_`` files resolve there), makes it a CPU-sized detector
trained from scratch and builds it with mmdet's registry:

- nothing is downloaded: the backbone's ``init_cfg`` (a torchvision checkpoint) is removed; the
  backbone trains from scratch (``frozen_stages=-1``, ``norm_eval=False``: the COCO configs freeze the
  stem and keep BatchNorm in eval mode, which only makes sense with ImageNet weights);
  ``model.init_weights()`` runs mmdet's own initialisation (the focal-loss prior on the class bias);
- ``width`` narrows a ResNet + FPN config as ``fcos_r18`` is narrowed (ResNet ``base_channels=width``,
  FPN ``in_channels`` to match, FPN and head ``2 * width`` wide); ``width=None`` keeps the config's;
- ``num_classes``, ``score_thresh`` (``test_cfg.score_thr``), ``nms_thresh`` (``test_cfg.nms``) and
  ``detections_per_img`` (``test_cfg.max_per_img``) are set in the config; ``overrides`` (a dict of
  dotted keys, as ``mmengine.Config.merge_from_dict`` takes them) go on top of everything.

Call contract (torchvision's, which the det task relies on): ``net(x)`` with ``x`` N x 3 x H x W in
[0, 1] returns in eval mode a list of N dicts ``boxes`` (xyxy, input pixels), ``scores``, ``labels``
(int64, from 0); ``net(x, targets)`` in training mode returns the loss dict (each of mmdet's losses
summed over its per-level terms, as mmengine's ``parse_losses`` does). Images go through mmdet's own
data preprocessor (the config's ``DetDataPreprocessor``: normalisation and padding to a multiple of
32), given 0-255 RGB with the ImageNet mean / std of ``zoo.models.det`` (``bgr_to_rgb`` off: our
images are RGB), and each sample's meta data is filled in (image = padded = batch shape, no
rescaling). ``head_outputs(x)`` is the head's raw output, per anchor, for golden
checks. ``KEEP_LAYERS`` / ``ACT_LEVELS`` name the first conv, the final convs and the per-level head
layers of the mmdet heads the zoo knows (RetinaHead, FCOSHead).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from ..quantizers.sites import track_sites
from ..registry import register_model
from .det import IMAGENET_MEAN, IMAGENET_STD

INSTALL = "bash scripts/install_mmdet.sh (mmcv 2.1.0 with its ops, mmengine, mmdet 3.3.0)"
# names inside the adapter (prefix "detector."): the stem conv and the final convs of each head type
KEEP_LAYERS = ["detector.backbone.conv1", "detector.bbox_head.retina_cls", "detector.bbox_head.retina_reg",
               "detector.bbox_head.conv_cls", "detector.bbox_head.conv_reg",
               "detector.bbox_head.conv_centerness"]
# head layers run once per FPN level
ACT_LEVELS = ["detector.bbox_head.cls_convs.*", "detector.bbox_head.reg_convs.*",
              "detector.bbox_head.retina_cls", "detector.bbox_head.retina_reg",
              "detector.bbox_head.conv_cls", "detector.bbox_head.conv_reg",
              "detector.bbox_head.conv_centerness"]


def _import_mmdet():
    try:
        import mmdet  # noqa: F401
        from mmengine.config import Config
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    except ImportError as e:
        raise ImportError(f"arch=mmdet needs mmdet with a compiled mmcv ({e}); install it with {INSTALL}") from None
    return mmdet, Config, MODELS, register_all_modules


@contextlib.contextmanager
def _quiet_mmengine():
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def config_dir() -> str:
    mmdet = _import_mmdet()[0]
    return os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")


def bundled_configs(family: str | None = None) -> list[str]:
    """Relative names of the configs bundled in the mmdet package (of one family, e.g. "retinanet")."""
    root = config_dir()
    out = []
    for d in sorted(os.listdir(root)):
        if d.startswith("_") or (family and d != family) or not os.path.isdir(os.path.join(root, d)):
            continue
        out += [f"{d}/{f}" for f in sorted(os.listdir(os.path.join(root, d))) if f.endswith(".py")]
    return out


def _set(cfg, key: str, value) -> None:
    cfg.merge_from_dict({key: value})


def build_config(config: str, num_classes: int, width: int | None, score_thresh: float, nms_thresh: float,
                 detections_per_img: int, overrides: dict | None):
    _, Config, _, _ = _import_mmdet()
    path = os.path.join(config_dir(), config)
    if os.path.isabs(config) or ".." in config.split("/") or not os.path.isfile(path):
        family = config.split("/")[0] if "/" in config else None
        near = bundled_configs(family) if family and os.path.isdir(os.path.join(config_dir(), family)) else []
        raise ValueError(f"config={config!r} is not a config bundled in mmdet (under {config_dir()}); "
                         f"valid: e.g. {near[:8] or bundled_configs('retinanet')[:8]}")
    cfg = Config.fromfile(path)
    m = cfg.model
    if "bbox_head" not in m:
        raise ValueError(f"config={config!r} ({m.get('type')}) has no bbox_head: arch=mmdet supports the "
                         f"single-stage detectors (RetinaNet, FCOS, ATSS, ...)")
    if m.get("backbone", {}).get("type") == "ResNet":
        _set(cfg, "model.backbone.init_cfg", None)
        _set(cfg, "model.backbone.frozen_stages", -1)
        _set(cfg, "model.backbone.norm_eval", False)
        if width is not None:
            _set(cfg, "model.backbone.base_channels", width)
            if m.get("neck", {}).get("type") == "FPN":
                _set(cfg, "model.neck.in_channels", [width, 2 * width, 4 * width, 8 * width])
                _set(cfg, "model.neck.out_channels", 2 * width)
                _set(cfg, "model.bbox_head.in_channels", 2 * width)
                if "feat_channels" in m.bbox_head:
                    _set(cfg, "model.bbox_head.feat_channels", 2 * width)
    elif width is not None:
        raise ValueError(f"width={width} narrows ResNet + FPN configs only; config={config!r} has a "
                         f"{m.get('backbone', {}).get('type')} backbone (valid: width=null)")
    # mmdet's preprocessor, on 0-255 RGB: the same normalisation as zoo.models.det's detectors
    _set(cfg, "model.data_preprocessor", {"type": "DetDataPreprocessor", "mean": [255 * m for m in IMAGENET_MEAN],
                                          "std": [255 * s for s in IMAGENET_STD], "bgr_to_rgb": False,
                                          "pad_size_divisor": 32})
    _set(cfg, "model.bbox_head.num_classes", num_classes)
    _set(cfg, "model.test_cfg.score_thr", score_thresh)
    _set(cfg, "model.test_cfg.nms", {"type": "nms", "iou_threshold": nms_thresh})
    _set(cfg, "model.test_cfg.max_per_img", detections_per_img)
    if overrides:
        cfg.merge_from_dict(dict(overrides))
    return cfg


class MMDetDetector(nn.Module):
    """An mmdet single-stage detector with torchvision's call contract (see the module docstring)."""

    def __init__(self, cfg, size: int):
        super().__init__()
        _, _, MODELS, register_all_modules = _import_mmdet()
        register_all_modules(init_default_scope=True)
        with _quiet_mmengine():  # mmengine logs every parameter's initialisation at INFO
            self.detector = MODELS.build(cfg.model)
            self.detector.init_weights()
        self.size = size
        track_sites(self.detector.bbox_head)  # per-level activation quantizers (act_sites)

    def _samples(self, x, targets=None):
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        h, w = x.shape[-2:]
        out = []
        for i in range(len(x)):
            s = DetDataSample()
            s.set_metainfo({"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w),
                            "batch_input_shape": (h, w), "scale_factor": (1.0, 1.0)})
            if targets is not None:
                t = targets[i]
                s.gt_instances = InstanceData(bboxes=t["boxes"].float(), labels=t["labels"].long())
            out.append(s)
        return out

    def _preprocess(self, x, targets=None):
        """Images in [0, 1] (a batch tensor or a list) through mmdet's data preprocessor: the batch
        tensor the detector takes and the samples (with ``targets`` as ground truth)."""
        if isinstance(x, (list, tuple)):
            x = torch.stack(list(x))
        pre = self.detector.data_preprocessor
        pre._device = x.device  # mmengine moves data to the preprocessor's own device record
        data = pre({"inputs": list(x * 255), "data_samples": self._samples(x, targets)}, training=self.training)
        return data["inputs"], data["data_samples"]

    def forward(self, x, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("in training mode the detector needs targets (one dict per image)")
            losses = self.detector.loss(*self._preprocess(x, targets))
            out = {}
            for k, v in losses.items():  # mmengine's parse_losses: mean of each term, lists summed
                if "loss" not in k:
                    continue
                out[k] = sum(t.mean() for t in v) if isinstance(v, (list, tuple)) else v.mean()
            return out
        results = self.detector.predict(*self._preprocess(x), rescale=False)
        return [{"boxes": r.pred_instances.bboxes.float(), "scores": r.pred_instances.scores.float(),
                 "labels": r.pred_instances.labels.long()} for r in results]

    def head_outputs(self, x) -> torch.Tensor:
        """The head's raw outputs per anchor, as torchvision's detectors give them: N x anchors (levels
        P3 first, then positions row by row, then the anchors of a position) x (classes + 4 box
        regressions [+ 1 centerness]), what a release's golden pair stores. ``x``: images as ``forward``
        takes them."""
        inputs, _ = self._preprocess(x)
        outs = self.detector._forward(inputs)  # (cls per level, box per level[, centerness per level])
        priors = self.detector.bbox_head.num_base_priors
        n = len(inputs)
        per_output = [torch.cat([t.permute(0, 2, 3, 1).reshape(n, -1, t.shape[1] // priors) for t in level], 1)
                      for level in outs]
        return torch.cat(per_output, dim=-1)


@register_model
def mmdet(config: str = "retinanet/retinanet_r18_fpn_1x_coco.py", num_classes: int = 10, size: int = 128,
          width: int | None = 32, score_thresh: float = 0.05, nms_thresh: float = 0.5,
          detections_per_img: int = 100, overrides: dict | None = None):
    """A detector from a config bundled in mmdet, trained from scratch, with the torchvision detection
    contract (``zoo.models.mmdet_adapter``). ``overrides``: dotted config keys, e.g.
    ``{"model.bbox_head.stacked_convs": 2}``."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 32 or size % 32:
        raise ValueError(f"size must be a multiple of 32 (>= 32), got {size!r}")
    cfg = build_config(config, num_classes, width, score_thresh, nms_thresh, detections_per_img, overrides)
    return MMDetDetector(cfg, size)
