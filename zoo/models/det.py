"""torchvision's FCOS and RetinaNet (object detection), unchanged, on a CPU-sized backbone.

The factories only choose arguments: a narrow ResNet-18 layout (7x7/2 stem, 3x3/2 max-pool, four
stages of two ``BasicBlock`` s with widths ``width, 2w, 4w, 8w``; BatchNorm, since the nets train
from scratch) under torchvision's FPN (``BackboneWithFPN``: P3-P5 from ``layer2``-``layer4``, P6/P7
from P5 through ``LastLevelP6P7``; strides 8..128, ``fpn_channels`` wide, default ``2 * width``) and
torchvision's detection heads. ``min_size = max_size = size``, so a ``size`` x ``size`` image is not
resized (torchvision's 800 px default is never used), and the model's transform normalises inputs
in [0, 1] with the ImageNet mean / std. Everything is randomly initialised: nothing is downloaded.
torchvision is imported only when one of these is built.

Call contract: ``model(x)`` with ``x`` a float tensor N x 3 x H x W in [0, 1] (torchvision iterates
it into N images) returns in eval mode a list of N dicts ``{"boxes": K x 4 xyxy in input pixels,
"scores": K, "labels": K int64}``; labels index the classes from 0 (both heads score every class
with a sigmoid: there is no background class). In training mode ``model(x, targets)`` (one dict
``{"boxes": M x 4 float xyxy, "labels": M int64}`` per image) returns torchvision's loss dict.
``score_thresh``, ``nms_thresh``, ``detections_per_img`` and ``topk_candidates`` are factory
arguments, so they are stored with the model's config.

- ``fcos_r18``: torchvision's FCOS head (four 3x3 convs + GroupNorm per branch; points = strides,
  torchvision's center sampling and scale ranges).
- ``retinanet_r18``: torchvision's RetinaNet head in its v2 form (GroupNorm in the head convs, GIoU
  box loss), since it trains from scratch; 9 anchors per cell with base size ``2 x stride``
  (16 .. 256 px, x 2^0, 2^(1/3), 2^(2/3); torchvision's 800 px recipe uses 4 x stride).

The head GroupNorms have torchvision's 32 groups (at the default 64 channels too), fewer for narrower
FPNs so that every group keeps at least 2 channels (``gn_groups``): a 1-channel group on a 1 x 1 map
(P6 / P7 of small inputs) normalises to a constant and passes no gradient.

``KEEP_LAYERS`` names the first conv and the final classification / box convs (the layers the
detection recipes keep at 8 bits); ``PER_LEVEL_MODULES`` the head modules whose weights are shared
by all five FPN levels (each is called once per level in a forward, so an activation quantizer
there sees all five levels, and ``zoo.cost`` counts their MACs five times). Quantized with
``LayerQuant(act_sites=5)`` (``python -m zoo.train task=det per_level_act=true``) each of them gets
one activation quantizer per level, as AQD argues; the head resets and checks the call counts
(``zoo.quantizers.sites.track_sites``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

from torch import nn

from ..quantizers.sites import track_sites
from . import resnet
from ..registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (8, 16, 32, 64, 128)  # P3, P4, P5 (layer2-4) and P6, P7 (LastLevelP6P7)
RETINANET_ANCHOR_SCALE = 2  # RetinaNet anchor base size / stride (torchvision's 800 px recipe: 4)

KEEP_LAYERS = {
    "fcos_r18": ["backbone.body.conv1", "head.classification_head.cls_logits",
                 "head.regression_head.bbox_reg", "head.regression_head.bbox_ctrness"],
    "retinanet_r18": ["backbone.body.conv1", "head.classification_head.cls_logits",
                      "head.regression_head.bbox_reg"],
}
PER_LEVEL_MODULES = {
    "fcos_r18": ["head.classification_head.conv", "head.classification_head.cls_logits",
                 "head.regression_head.conv", "head.regression_head.bbox_reg",
                 "head.regression_head.bbox_ctrness"],
    "retinanet_r18": ["head.classification_head.conv", "head.classification_head.cls_logits",
                      "head.regression_head.conv", "head.regression_head.bbox_reg"],
}
# constructor arguments the factories set themselves
_FIXED = ("min_size", "max_size", "anchor_generator", "head", "backbone")


class BinaryFriendlyBlock(resnet.BasicBlock):
    """torchvision's ``BasicBlock`` (same parameter names: ``conv1, bn1, conv2, bn2, downsample``, so a
    float checkpoint of the plain body loads into it) computed as ``zoo.models.resnet.BasicBlock``:
    activation ``act`` and, with ``per_conv_shortcut``, a shortcut around each conv (Bi-Real / IR-Net
    block), so the input of every conv stays signed, which a 1-bit activation (sign) needs (after a
    ReLU it would be all +1)."""

    def __init__(self, in_ch, out_ch, stride, downsample, act, per_conv_shortcut):
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = resnet._act(act, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = resnet._act(act, out_ch)
        self.downsample = downsample
        self.per_conv_shortcut = per_conv_shortcut

    def shortcut(self, x):  # what resnet.BasicBlock.forward adds: torchvision's projection shortcut
        return x if self.downsample is None else self.downsample(x)


def resnet18_body(width: int = 32, in_chans: int = 3, act: str = "relu",
                  per_conv_shortcut: bool = False) -> nn.Sequential:
    """ResNet-18 layout at widths ``width, 2w, 4w, 8w`` (torchvision's is fixed at 64..512), children
    named as in torchvision's ``resnet18`` (``conv1, bn1, relu, maxpool, layer1..layer4``). The
    default is torchvision's ``BasicBlock``; ``act`` (``relu | hardtanh | rprelu``, also the stem's)
    or ``per_conv_shortcut`` give the binary-friendly :class:`BinaryFriendlyBlock`."""
    from torchvision.models.resnet import BasicBlock

    if act not in resnet.ACTS:
        raise ValueError(f"act must be one of {list(resnet.ACTS)}, got {act!r}")
    plain = act == "relu" and not per_conv_shortcut

    def block(in_ch, out_ch, stride=1, down=None):
        if plain:
            return BasicBlock(in_ch, out_ch, stride, down)
        return BinaryFriendlyBlock(in_ch, out_ch, stride, down, act, per_conv_shortcut)

    def stage(in_ch, out_ch, stride):
        down = None
        if stride != 1 or in_ch != out_ch:
            down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        return nn.Sequential(block(in_ch, out_ch, stride, down), block(out_ch, out_ch))

    w = width
    body = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_chans, w, 7, 2, 3, bias=False), bn1=nn.BatchNorm2d(w),
        relu=nn.ReLU(inplace=True) if plain else resnet._act(act, w),
        maxpool=nn.MaxPool2d(3, 2, 1), layer1=stage(w, w, 1), layer2=stage(w, 2 * w, 2),
        layer3=stage(2 * w, 4 * w, 2), layer4=stage(4 * w, 8 * w, 2)))
    for m in body.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return body


def gn_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: torchvision's 32, fewer so that each group has >= 2 channels."""
    return math.gcd(32, max(1, channels // 2))


def _check(num_classes, size, width, fpn_channels, score_thresh, nms_thresh, detections_per_img,
           topk_candidates, kwargs):
    for name, v, lo in (("num_classes", num_classes, 1), ("size", size, 32), ("width", width, 1),
                        ("fpn_channels", fpn_channels, 1), ("detections_per_img", detections_per_img, 1),
                        ("topk_candidates", topk_candidates, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    for name, v in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    fixed = sorted(set(kwargs) & set(_FIXED + ("weights", "weights_backbone")))
    if fixed:
        raise ValueError(f"argument(s) {fixed} are set by the factory (min_size = max_size = size; "
                         f"nothing is downloaded); valid: num_classes, size, width, fpn_channels, "
                         f"score_thresh, nms_thresh, detections_per_img, topk_candidates and "
                         f"torchvision's other detector arguments")


def _build(arch, num_classes, size, width, fpn_channels, score_thresh, nms_thresh, detections_per_img,
           topk_candidates, kwargs):
    fpn_channels = 2 * width if fpn_channels is None else fpn_channels
    _check(num_classes, size, width, fpn_channels, score_thresh, nms_thresh, detections_per_img,
           topk_candidates, kwargs)
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = resnet18_body(width, act=kwargs.pop("act", "relu"),
                         per_conv_shortcut=kwargs.pop("per_conv_shortcut", False))
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [2 * width, 4 * width, 8 * width], fpn_channels,
                               extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    norm = partial(nn.GroupNorm, gn_groups(fpn_channels))
    common = dict(min_size=size, max_size=size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                  score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                  topk_candidates=topk_candidates, **kwargs)
    if arch == "fcos":
        from torchvision.models.detection.fcos import (
            FCOS,
            FCOSClassificationHead,
            FCOSHead,
            FCOSRegressionHead,
        )

        anchors = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
        # FCOSHead hard-codes GroupNorm(32, C): build it bare and give it its two branches with `norm`
        head = FCOSHead(fpn_channels, 1, num_classes, num_convs=0)
        head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, num_convs=4,
                                                          norm_layer=norm)
        head.regression_head = FCOSRegressionHead(fpn_channels, 1, num_convs=4, norm_layer=norm)
        model = FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **common)
        track_sites(model.head)  # per-level activation quantizers (act_sites) count their calls per head forward
        return model
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

    base = [RETINANET_ANCHOR_SCALE * s for s in STRIDES]
    anchors = AnchorGenerator(tuple((b, int(b * 2 ** (1 / 3)), int(b * 2 ** (2 / 3))) for b in base),
                              ((0.5, 1.0, 2.0),) * len(base))
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
    head.regression_head._loss_type = "giou"  # as torchvision's retinanet_resnet50_fpn_v2
    model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **common)
    track_sites(model.head)
    return model


@register_model
def fcos_r18(num_classes: int = 10, size: int = 128, width: int = 32, fpn_channels: int | None = None,
             score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
             topk_candidates: int = 1000, **kwargs):
    """torchvision FCOS on a narrow ResNet-18 + FPN (P3-P7), randomly initialised, for
    ``size`` x ``size`` inputs in [0, 1]. ``kwargs`` go to ``torchvision...FCOS``
    (e.g. ``center_sampling_radius``)."""
    return _build("fcos", num_classes, size, width, fpn_channels, score_thresh, nms_thresh,
                  detections_per_img, topk_candidates, kwargs)


@register_model
def retinanet_r18(num_classes: int = 10, size: int = 128, width: int = 32, fpn_channels: int | None = None,
                  score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                  topk_candidates: int = 1000, **kwargs):
    """torchvision RetinaNet (v2 head: GroupNorm, GIoU loss) on a narrow ResNet-18 + FPN (P3-P7),
    randomly initialised, for ``size`` x ``size`` inputs in [0, 1]. ``kwargs`` go to
    ``torchvision...RetinaNet`` (e.g. ``fg_iou_thresh``, ``bg_iou_thresh``)."""
    return _build("retinanet", num_classes, size, width, fpn_channels, score_thresh, nms_thresh,
                  detections_per_img, topk_candidates, kwargs)
