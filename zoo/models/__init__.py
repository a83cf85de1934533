"""Architecture factories: our own (ResNet), torchvision's detectors (FCOS, RetinaNet), mmdet's
single-stage detectors (``arch=mmdet``), basicsr's SR networks, smp's saliency networks, our matting nets and diffusers'
DDPM UNet. Importing this registers them (torchvision's detection models, mmdet, basicsr, smp and
diffusers are imported only when one of theirs is built)."""
from . import det, diffusion, matting, mmdet_adapter, resnet, sal, sr, vit  # noqa: F401
