"""Architecture factories: our own (ResNet), torchvision's detectors (FCOS, RetinaNet), basicsr's SR
networks and smp's saliency networks. Importing this registers them (torchvision's detection
models, basicsr and smp are imported only when one of theirs is built)."""
from . import det, resnet, sal, sr  # noqa: F401
