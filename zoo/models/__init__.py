"""Architecture factories: our own (ResNet), basicsr's SR networks and smp's saliency networks.
Importing this registers them (basicsr and smp are imported only when one of theirs is built)."""
from . import resnet, sal, sr  # noqa: F401
