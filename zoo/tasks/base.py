"""``QuantTask``: the LightningModule every task builds on.

It owns the model (a :class:`zoo.ZooModel`), quantizes it in ``configure_model`` (idempotent),
loads a float checkpoint for QAT (``init_from``), keeps an optional frozen float teacher for
distillation, drives quantizer schedules with the training progress, runs ReActNet-style
two-stage training (``two_stage``: float weights first, then quantized), and sets up the optimizer
and its cosine or linear schedule. Subclasses implement ``loss_and_metrics``, name their
DataModules and provide the release hooks (``evaluate``, ``card_lines``, ``summary_table``,
``predict``, ...) that the shared code reaches through the task registry (``zoo.tasks``).
"""
from __future__ import annotations

import math
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ..quantizers import QuantConfig, quantize, set_progress, set_weight_quant
from ..quantizers.base import Quantizer
from ..registry import create_model
from ..wrapper import ZooModel
from .init_from import float_teacher, load_float_weights, quantized_release, restore_release

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear")


class QuantTask(L.LightningModule):
    task_name = "base"
    datamodules: dict = {}
    monitor = ("val/loss", "min")
    head_layers: tuple[str, ...] = ()  # layer globs the data decides: re-initialised if a release's differ

    @staticmethod
    def data_model_args(contract: dict) -> dict:
        """Model arguments the data decides (input channels, number of classes)."""
        return {}

    @staticmethod
    def contract_fits(release: dict, data: dict) -> bool:
        """Whether a model made for the input contract ``release`` can start training on data with
        the contract ``data``: the same number of channels (tasks add what else must match); the
        classifier may differ (it is re-initialised)."""
        return release.get("channels") == data.get("channels")

    @staticmethod
    def evaluate(model, loader, progress: bool = True) -> dict:
        """The task's test metrics of a (packed) model over ``loader``; each task provides it."""
        raise NotImplementedError  # abstract

    @staticmethod
    def extra_metrics(model) -> dict:
        """Metrics of a (packed) model beyond its test split, stored in the release's config and
        shown on its card (e.g. saliency on real photos); {} when there are none."""
        return {}

    @staticmethod
    def golden_input(dm) -> torch.Tensor:
        """A small input batch from the test split for the release's golden input/output pair."""
        return next(iter(dm.test_dataloader()))[0][:8]

    @staticmethod
    def golden_output(model, x: torch.Tensor) -> torch.Tensor:
        """The tensor a release's golden pair stores for input ``x`` and the reload check compares:
        ``model(x)``; a task whose output is not one tensor (or is not continuous in the weights)
        gives a tensor that is."""
        with torch.no_grad():
            return model(x)

    @staticmethod
    def report(model, dm, release_dir) -> str:
        """What ``zoo.train`` prints about a finished release (and any files it writes next to it)."""
        return f"metrics: {model.metrics}"

    # ------------------------------------------------------------------ release hooks
    # What the shared machinery asks of a task (cards, summary tables, ``zoo.predict``, the checkpoint
    # benchmark); each task package implements them in its ``release.py``.
    card_images: tuple[tuple[str, str, str], ...] = ()  # (file, caption, alt text) shown on a card if present
    predict = None  # fn(model, images, out_dir, args) -> written paths; None: no zoo.predict support
    predict_takes_images = True  # False: zoo.predict runs the task without input images (a generator)
    # fn(paths) -> inputs for ``predict`` (None: image files and folders of images, zoo.predict.collect_images)
    # and fn(input) -> why it cannot be processed or None (None: zoo.predict.check_image)
    predict_inputs = None
    input_problem = None
    onnx_exportable = False  # zoo.export.onnx covers its models
    onnx_form = None  # a zoo.export.ImageForm subclass saying what the ONNX graph is (None: image in, one tensor out)
    sample_unit = "images"  # what one sample of its data is, for cards ("clips" for video)

    @staticmethod
    def card_lines(cfg: dict, metrics: dict, train: dict) -> list[str]:
        """Task-specific card bullets (data, test metrics)."""
        return []

    @staticmethod
    def domain(cfg: dict) -> str | None:
        """What inputs a release knows (from its training data), for its card and ``zoo.predict``."""
        return None

    @staticmethod
    def card_snippet(name: str, cfg: dict) -> list[str]:
        """The card's Python usage lines after ``import zoo``."""
        return [f'model = zoo.load("{name}")  # images in [0, 1], N x {cfg["input_contract"]["channels"]} x H x W']

    @staticmethod
    def card_usage(name: str) -> list[str]:
        """Lines after the card's usage snippet (e.g. the ``zoo.predict`` command)."""
        return []

    @classmethod
    def summary_table(cls, rows: list) -> str:
        """Markdown table of ``[(checkpoint dir, config)]``: the monitored test metric and sizes."""
        from ..cards import float_reference_bytes, seed_cell

        key = "test_" + cls.monitor[0].split("/", 1)[1]
        out = [f"| model | {key} | over seeds | weights file bytes | vs FP32 file |", "|---|---|---|---|---|"]
        for path, cfg in rows:
            v = cfg.get("metrics", {}).get(key)
            wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
            out.append(f"| [{path.name}]({path}/README.md) | {'n/a' if v is None else f'{v:.4f}'} | "
                       f"{seed_cell(cfg, key, digits=4) or '—'} | {wb:,} | 1/{fb / wb:.1f} |")
        return "\n".join(out)

    # fn(root: Path, variant: str) -> dict(release=, data=, overrides=[...], datamodule={...}): writes
    # a user-style data folder under ``root`` for ``benchmarks/finetune.py`` and says how to fine-tune
    # a shipped release on it; ``finetune_variants`` names the folders it can write (first: default)
    finetune_demo = None
    finetune_variants: tuple[str, ...] = ()

    @staticmethod
    def predict_args(parser) -> None:
        """Add this task's ``zoo.predict`` options to ``parser`` (an argparse group)."""

    @staticmethod
    def benchmark_loader(model, data: str | None = None, limit: int | None = None):
        """(test DataLoader, description) on which to re-measure a shipped ``model``: the built-in
        test split, or ``data``, a folder in the task's user format."""
        raise NotImplementedError  # abstract: each task provides it

    def __init__(self, arch: str, model_args: dict, input_contract: dict, quant: dict | None = None,
                 lr: float = 0.1, weight_decay: float = 5e-4, optimizer: str = "sgd",
                 init_from: str | None = None, distill: float = 0.0, distill_temperature: float = 1.0,
                 schedule: str = "cosine", two_stage: bool = False):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")
        self.save_hyperparameters()
        self.model: ZooModel | None = None
        self._teacher: list = []  # kept out of the module tree: not saved, not optimised

    # ------------------------------------------------------------------ model
    @property
    def quant_config(self) -> QuantConfig | None:
        q = self.hparams.quant
        return QuantConfig.from_dict(q) if q else None

    def build_float_model(self) -> ZooModel:
        net = create_model(self.hparams.arch, **self.hparams.model_args)
        wrapper = getattr(net, "zoo_wrapper", ZooModel)  # a net may name the ZooModel subclass it ships in
        return wrapper(net, self.hparams.arch, self.hparams.model_args, self.task_name,
                       self.hparams.input_contract, None)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_float_model()
        qcfg = self.quant_config
        source = self.hparams.init_from
        if source and quantized_release(source) is not None:  # fine-tune a quantized release
            restore_release(model, source, qcfg, self.head_layers,
                            tuple(self.data_model_args(self.hparams.input_contract)), self.golden_output)
        elif source:
            load_float_weights(model, source, self.head_layers)
        if self.hparams.distill > 0:
            teacher = float_teacher(source, model)
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = [teacher.eval()]
        if qcfg is not None:
            quantize(model.net, qcfg)
            model.quant = qcfg
        self.model = model

    @property
    def teacher(self):
        return self._teacher[0] if self._teacher else None

    def forward(self, x):
        return self.model(x)

    def release_model(self):
        """The model that is tested and released (a task keeping an EMA of the weights returns that)."""
        return self.model

    # ------------------------------------------------------------------ training loop
    def on_fit_start(self):
        if self.teacher is not None:
            self.teacher.to(self.device)

    # ------------------------------------------------------------------ stages
    def stage_start(self) -> int:
        """The first step of the final stage: 0, or with ``two_stage`` the first step of the second
        half of the epochs (the first half trains with float weights and quantized activations)."""
        if not self.hparams.two_stage:
            return 0
        epochs = max(int(self.trainer.max_epochs), 1)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return total // epochs * (epochs // 2)

    def stage_progress(self, step: int) -> tuple[bool, float]:
        """(whether ``step`` is in the final stage, the fraction of its stage done). Schedules (the
        learning rate, IR-Net's EDE) restart at the stage boundary, as a second run would."""
        start, total = self.stage_start(), max(int(self.trainer.estimated_stepping_batches), 1)
        if step < start:
            return False, step / start
        return True, min((step - start) / max(total - start, 1), 1.0)

    def on_train_batch_start(self, batch, batch_idx):
        final, fraction = self.stage_progress(self.global_step)
        set_progress(self.model, fraction)
        if self.hparams.two_stage:
            set_weight_quant(self.model, final)

    def on_fit_end(self):
        set_weight_quant(self.model, True)

    def log_selection(self, metrics: dict, batch_size: int) -> None:
        """``val/select``, the metric that picks the released epoch: the monitored metric, but the worst
        value while the model is not yet in its released form (with ``two_stage``, before the final
        stage; or while a quantizer's schedule still changes its form, e.g. EBB's second basis), so the
        released checkpoint always has its final quantizers."""
        key, mode = self.monitor
        final = not self.hparams.two_stage or self.stage_progress(self.global_step - 1)[0]  # the step just trained
        final = final and all(m.final_form for m in self.model.modules() if isinstance(m, Quantizer))
        value = metrics[key.split("/", 1)[1]] if final else torch.tensor(
            float("-inf") if mode == "max" else float("inf"))
        self.log("val/select", value, batch_size=batch_size, sync_dist=True)

    # ------------------------------------------------------------------ epoch-level metrics and pictures
    # meter_factory: a class whose instances ``update(prediction, target)`` during a validation / test
    # epoch and ``compute()`` a dict at its end, of which ``meter_keys`` are logged (``selects_on_meter``:
    # the monitored metric is one of them, so the released epoch is chosen from the meter);
    # ``epoch_picture(dm, path)`` writes a picture of fixed test samples after every validation epoch
    meter_factory = None
    meter_keys: tuple[str, ...] = ()
    selects_on_meter = False

    def on_validation_epoch_start(self):
        if self.meter_factory is not None:
            self._meter = self.meter_factory()

    def on_test_epoch_start(self):
        self.on_validation_epoch_start()

    def log_meter(self, stage: str) -> dict:
        res = self._meter.compute()
        metrics = {k: float(res[k]) for k in self.meter_keys if k in res}
        # sync_dist: data-parallel ranks see shards; the monitored value must be the same on all
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=stage == "val", sync_dist=True)
        return metrics

    def epoch_picture(self, dm, path: Path) -> None:
        """Write a picture of fixed samples of ``dm`` to ``path`` (tasks with pictures override it)."""

    def on_validation_epoch_end(self):
        metrics = self.log_meter("val") if self.meter_factory is not None else {}
        if self.selects_on_meter:
            self.log_selection(metrics, 1)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if self.trainer.datamodule is not None:
            path = Path(self.trainer.default_root_dir) / "samples" / f"epoch_{self.current_epoch:03d}.png"
            self.epoch_picture(self.trainer.datamodule, path)

    def on_test_epoch_end(self):
        if self.meter_factory is not None:
            self.log_meter("test")

    def distill_loss(self, student_logits, x):
        with torch.no_grad():
            t_logits = self.teacher(x)
        t = self.hparams.distill_temperature
        return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(t_logits / t, -1),
                        log_target=True, reduction="batchmean") * t * t

    def with_distill(self, loss, student_out, x, stage: str):
        """``(1 - distill) * loss + distill * distill_loss(student_out, x)`` in training when a
        teacher is set (``distill > 0``); the task's own loss otherwise."""
        if stage != "train" or self.teacher is None:
            return loss
        w = self.hparams.distill
        return (1 - w) * loss + w * self.distill_loss(student_out, x)

    def loss_and_metrics(self, batch, stage: str) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError  # implemented by each task

    def training_step(self, batch, batch_idx):
        loss, metrics = self.loss_and_metrics(batch, "train")
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, prog_bar=True, on_step=True,
                      on_epoch=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, batch_idx):
        _, metrics = self.loss_and_metrics(batch, "val")
        # sync_dist: data-parallel ranks see shards; the monitored value must be the same on all
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, batch_size=len(batch[0]),
                      sync_dist=True)
        self.log_selection(metrics, len(batch[0]))

    def test_step(self, batch, batch_idx):
        _, metrics = self.loss_and_metrics(batch, "test")
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, batch_size=len(batch[0]), sync_dist=True)

    def configure_optimizers(self):
        quant_params = {id(p) for m in self.model.modules() if isinstance(m, Quantizer)
                        for p in m.parameters(recurse=False)}
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if id(p) in quant_params or p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        name = self.hparams.optimizer
        if name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.hparams.lr, momentum=0.9, nesterov=True)
        elif name == "adam":
            opt = torch.optim.Adam(groups, lr=self.hparams.lr)
        elif name == "adamw":
            opt = torch.optim.AdamW(groups, lr=self.hparams.lr)
        else:
            raise ValueError(f"unknown optimizer {name!r}; valid: ['sgd', 'adam', 'adamw']")
        linear = self.hparams.schedule == "linear"

        def factor(step):  # recomputed from the trainer's total on resume, so more epochs work
            _, p = self.stage_progress(step)
            if linear:  # ReActNet: lr (1 - p), no warm-up
                return 1.0 - p
            if p < 0.1:  # warm-up over the first 10% of the stage, then cosine to 1% of lr
                return 0.1 + 9.0 * p
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (p - 0.1) / 0.9))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
