"""Architectures no dependency provides. Importing this package registers them."""
from . import resnet, sr  # noqa: F401
