"""Tasks: ``QuantTask`` LightningModules and their DataModules. Importing this imports Lightning."""
from .base import QuantTask
from .cls import ClassificationTask
from .sr import SuperResolutionTask

TASKS = {"cls": ClassificationTask, "sr": SuperResolutionTask}

__all__ = ["QuantTask", "ClassificationTask", "SuperResolutionTask", "TASKS"]
