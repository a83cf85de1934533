"""``QuantTask``: the LightningModule every task builds on.

It owns the model (a :class:`zoo.ZooModel`), quantizes it in ``configure_model`` (idempotent),
loads a float checkpoint for QAT (``init_from``), keeps an optional frozen float teacher for
distillation, drives quantizer schedules with the training progress, and sets up the optimizer.
Subclasses implement ``loss_and_metrics`` and name their DataModules.
"""
from __future__ import annotations

import copy
import math
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ..quantizers import QuantConfig, quantize, set_progress
from ..quantizers.base import Quantizer
from ..registry import create_model
from ..wrapper import ZooModel

log = logging.getLogger(__name__)


def load_float_weights(model: ZooModel, source: str) -> None:
    """Load float weights into ``model`` (before quantization) from a zoo checkpoint directory or
    shipped name holding a float model, or from a Lightning ``.ckpt`` (read with weights_only)."""
    from ..checkpoint import WEIGHTS, read_config
    from ..registry import resolve_checkpoint

    path = Path(source)
    if path.suffix == ".ckpt" and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    else:
        directory = resolve_checkpoint(source)
        cfg = read_config(directory)
        if cfg.get("quant"):
            raise ValueError(f"init_from={source!r} is a quantized checkpoint; QAT starts from a float one")
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"init_from={source!r} does not match {model.arch}: {e}") from None
    if unexpected:
        raise ValueError(f"init_from={source!r} does not match {model.arch}: unexpected keys {unexpected[:5]}")
    if missing:  # parameters the float net lacks (e.g. RPReLU shifts) keep their initial values
        log.info("init_from=%s: %d parameters not in the float checkpoint keep their init: %s",
                 source, len(missing), missing[:5])


class QuantTask(L.LightningModule):
    task_name = "base"
    datamodules: dict = {}
    monitor = ("val/loss", "min")

    @staticmethod
    def data_model_args(contract: dict) -> dict:
        """Model arguments the data decides (input channels, number of classes)."""
        return {}

    @staticmethod
    def evaluate(model, loader, progress: bool = True) -> dict:
        """The task's test metrics of a (packed) model over ``loader``; each task provides it."""
        raise NotImplementedError  # abstract

    @staticmethod
    def golden_input(dm) -> torch.Tensor:
        """A small input batch from the test split for the release's golden input/output pair."""
        return next(iter(dm.test_dataloader()))[0][:8]

    @staticmethod
    def report(model, dm, release_dir) -> str:
        """What ``zoo.train`` prints about a finished release (and any files it writes next to it)."""
        return f"metrics: {model.metrics}"

    def __init__(self, arch: str, model_args: dict, input_contract: dict, quant: dict | None = None,
                 lr: float = 0.1, weight_decay: float = 5e-4, optimizer: str = "sgd",
                 init_from: str | None = None, distill: float = 0.0, distill_temperature: float = 1.0):
        super().__init__()
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
        return ZooModel(net, self.hparams.arch, self.hparams.model_args, self.task_name,
                        self.hparams.input_contract, None)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_float_model()
        if self.hparams.init_from:
            load_float_weights(model, self.hparams.init_from)
        if self.hparams.distill > 0:
            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = [teacher]
        qcfg = self.quant_config
        if qcfg is not None:
            quantize(model.net, qcfg)
            model.quant = qcfg
        self.model = model

    @property
    def teacher(self):
        return self._teacher[0] if self._teacher else None

    def forward(self, x):
        return self.model(x)

    # ------------------------------------------------------------------ training loop
    def on_fit_start(self):
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_train_batch_start(self, batch, batch_idx):
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        set_progress(self.model, self.global_step / total)

    def distill_loss(self, student_logits, x):
        with torch.no_grad():
            t_logits = self.teacher(x)
        t = self.hparams.distill_temperature
        return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(t_logits / t, -1),
                        log_target=True, reduction="batchmean") * t * t

    def loss_and_metrics(self, batch, stage: str) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError  # implemented by each task

    def training_step(self, batch, batch_idx):
        loss, metrics = self.loss_and_metrics(batch, "train")
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, prog_bar=True, on_step=True,
                      on_epoch=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, batch_idx):
        _, metrics = self.loss_and_metrics(batch, "val")
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, batch_size=len(batch[0]))

    def test_step(self, batch, batch_idx):
        _, metrics = self.loss_and_metrics(batch, "test")
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, batch_size=len(batch[0]))

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
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(1, int(0.1 * total))

        def warmup_cosine(step):  # recomputed from the trainer's total on resume, so more epochs work
            if step < warmup:
                return 0.1 + 0.9 * step / warmup
            p = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
