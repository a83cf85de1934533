"""Tasks: ``QuantTask`` LightningModules and their DataModules. Importing this imports Lightning."""
from .base import QuantTask
from .cls import ClassificationTask

TASKS = {"cls": ClassificationTask}

__all__ = ["QuantTask", "ClassificationTask", "TASKS"]
