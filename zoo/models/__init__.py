"""Architecture factories: our own (ResNet) and basicsr's SR networks. Importing this registers them
(basicsr itself is imported only when one of its architectures is built)."""
from . import resnet, sr  # noqa: F401
