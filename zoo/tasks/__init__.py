"""The task registry. Each task is a package ``zoo/tasks/<task>/`` holding its LightningModule (a
:class:`~zoo.tasks.base.QuantTask` subclass), DataModules, metrics, card lines, summary table and
predictor; ``train``, ``predict``, ``cards``, ``seeds`` and the benchmarks find a task only through
:func:`get_task`. Adding a task is a package, its config files (``zoo/configs/task/<task>.yaml``,
``data/*.yaml``) and one entry here. Importing this module imports no task (and not Lightning).
"""
from __future__ import annotations

import importlib

# task name -> "module:QuantTask subclass", imported on first use
_TASKS: dict[str, str] = {
    "cls": "zoo.tasks.cls.task:ClassificationTask",
    "sr": "zoo.tasks.sr.task:SuperResolutionTask",
    "sal": "zoo.tasks.sal.task:SaliencyTask",
    "det": "zoo.tasks.det.task:DetectionTask",
    "diffusion": "zoo.tasks.diffusion.task:DiffusionTask",
    "matting": "zoo.tasks.matting.task:MattingTask",
}


def register_task(name: str, target: str) -> None:
    """Register the task ``name`` as ``"package.module:ClassName"`` (imported when first used)."""
    if name in _TASKS and _TASKS[name] != target:
        raise ValueError(f"task {name!r} is already registered as {_TASKS[name]}")
    if ":" not in target:
        raise ValueError(f"target must be 'module:ClassName', got {target!r}")
    _TASKS[name] = target


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str):
    """The QuantTask subclass registered as ``name``."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {task_names()}")
    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
