"""Tasks: ``QuantTask`` LightningModules and their DataModules. Importing this imports Lightning."""
from .base import QuantTask
from .cls import ClassificationTask
from .sal import SaliencyTask
from .sr import SuperResolutionTask

TASKS = {"cls": ClassificationTask, "sr": SuperResolutionTask, "sal": SaliencyTask}

__all__ = ["QuantTask", "ClassificationTask", "SuperResolutionTask", "SaliencyTask", "TASKS"]
