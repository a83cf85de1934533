"""Architecture factories: our own (ResNet), torchvision's detectors (FCOS, RetinaNet), mmdet's
single-stage detectors (``arch=mmdet``), basicsr's SR networks and smp's saliency networks. Importing
this registers them (torchvision's detection models, mmdet, basicsr and smp are imported only when
one of theirs is built)."""
from . import det, mmdet_adapter, resnet, sal, sr  # noqa: F401
