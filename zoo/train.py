"""``python -m zoo.train task=cls bits=4``: quantization-aware training from the command line.

``run(cfg)`` is a pure function of the composed config (tests call it directly); ``main`` is a thin
``@hydra.main`` around it that turns configuration errors into a non-zero exit with a message.
At the end it evaluates on the test split and writes a packed release checkpoint with the metrics.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad configuration value (the message names it and the valid choices)."""


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _bits(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ConfigError(f"{name}={value!r} is not a valid bit width; valid: integers 1..8 "
                          f"(use quant=none for full precision)")


def quant_dict(cfg: DictConfig) -> dict | None:
    """The QuantConfig (as a dict) that cfg.quant + cfg.keep_bits describe; None for float."""
    from .quantizers import QuantConfig

    q = cfg.quant
    if q.weight is None and q.act is None:
        return None
    _bits("wbits", cfg.wbits)
    _bits("abits", cfg.abits)
    keep = None
    if cfg.keep_bits is not None:
        _bits("keep_bits", cfg.keep_bits)
        kb = int(cfg.keep_bits)
        keep = {"weight": {"type": "MinMax", "bits": kb, "granularity": "channel"},
                "act": {"type": "MinMax", "bits": kb}}
    d = {
        "weight": OmegaConf.to_container(q.weight, resolve=True) if q.weight is not None else None,
        "act": OmegaConf.to_container(q.act, resolve=True) if q.act is not None else None,
        "overrides": {glob: keep for glob in cfg.task.get("keep_layers", [])},
        "extra": _plain(q.get("extra")),
    }
    try:
        return QuantConfig.from_dict(d).to_dict()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"quant={q.name}: {e}") from None


def validate(cfg: DictConfig):
    """Check the names in cfg; returns (task class, datamodule class, quant dict, model args)."""
    from .registry import list_archs
    from .tasks import get_task, task_names

    if cfg.task.name not in task_names():
        raise ConfigError(f"unknown task {cfg.task.name!r}; valid: {task_names()}")
    task_cls = get_task(cfg.task.name)
    if cfg.arch not in list_archs():
        raise ConfigError(f"unknown arch {cfg.arch!r}; valid: {list_archs()}")
    if cfg.data.name not in task_cls.datamodules:
        raise ConfigError(f"data={cfg.data.name!r} is not available for task {cfg.task.name}; "
                          f"valid: {sorted(task_cls.datamodules)}")
    q = quant_dict(cfg)
    model_args = {**_plain(cfg.task.get("model_args")), **_plain(cfg.quant.get("model_args")),
                  **_plain(cfg.get("model_args"))}
    if cfg.distill and not cfg.init_from:
        raise ConfigError("distill > 0 needs init_from= (the float teacher)")
    from .tasks.base import SCHEDULES

    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"schedule={cfg.schedule!r} is not valid; valid: {list(SCHEDULES)}")
    if cfg.two_stage and q is None:
        raise ConfigError("two_stage=true needs a quantized model (quant=none has no weight quantizers)")
    return task_cls, task_cls.datamodules[cfg.data.name], q, model_args


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def _command() -> str:
    """The recipe: this invocation's arguments, less a resume (resuming continues the same run)."""
    args = [a for a in sys.argv[1:] if not a.startswith("ckpt_path=")]
    return "python -m zoo.train " + " ".join(args)


def run(cfg: DictConfig, command: str | None = None) -> dict:
    """Train, test and export as ``cfg`` says. Returns the release metrics and paths. ``command``
    is the recipe recorded on the card (default: this process's ``python -m zoo.train`` arguments)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, Timer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .cards import write_card, write_golden
    from .checkpoint import load, packed_copy, save

    task_cls, dm_cls, qdict, model_args = validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    data_kw = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "name"}
    dm = dm_cls(batch_size=cfg.batch_size, seed=cfg.seed, **data_kw)
    dm.setup("fit")
    contract = dm.input_contract()
    model_args = {**task_cls.data_model_args(contract), **model_args}
    module = task_cls(arch=cfg.arch, model_args=model_args, input_contract=contract,
                      quant=qdict, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                      init_from=cfg.init_from, distill=cfg.distill,
                      distill_temperature=cfg.distill_temperature, schedule=cfg.schedule,
                      two_stage=bool(cfg.two_stage))
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    metric, mode = ("val/select", task_cls.monitor[1]) if cfg.two_stage else task_cls.monitor
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=metric, mode=mode,
                                 save_last=True, save_top_k=1),
                 LearningRateMonitor(logging_interval="step"), Timer(verbose=False)]
    loggers = [CSVLogger(out, name="csv"), TensorBoardLogger(out, name="tb")]
    trainer = L.Trainer(max_epochs=cfg.epochs, callbacks=callbacks, logger=loggers,
                        default_root_dir=out, limit_train_batches=cfg.limit_train_batches,
                        limit_val_batches=cfg.limit_val_batches,
                        limit_test_batches=cfg.limit_test_batches, deterministic=False,
                        **OmegaConf.to_container(cfg.trainer, resolve=True))
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = ckpt_dir / "last.ckpt"
        if not ckpt_path.is_file():
            raise ConfigError(f"ckpt_path=last but {ckpt_path} does not exist (nothing to resume)")
    # a checkpoint written before the Timer callback existed carries no elapsed time: then the
    # resumed run's total is unknown and is recorded as such rather than as its tail alone
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path else {}
    timed = not ckpt_path or any(k.startswith("Timer") for k in saved.get("callbacks", {}))
    del saved
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None,
                weights_only=True if ckpt_path else None)
    # fit time (training and validation); a resumed run adds the time its checkpoint had recorded
    seconds = round(callbacks[2].time_elapsed("train"), 1) if timed else None
    best = callbacks[0].best_model_path
    if best and Path(best).is_file():  # release the best validation epoch, not merely the last
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    metrics = {f"{k.replace('/', '_')}_training_form": float(v) for k, v in test.items()}
    if cfg.evaluate_packed:
        packed = packed_copy(module.model.cpu())
        res = task_cls.evaluate(packed, dm.test_dataloader())
        metrics.update({f"test_{k}": v for k, v in res.items()})
    metrics["best_val"] = float(callbacks[0].best_model_score or float("nan"))
    release = save(module.model.cpu(), cfg.release_dir, metrics=metrics, extra={"train": {
        "command": command or _command(), "data": cfg.data.name, "epochs": int(cfg.epochs),
        "global_step": int(trainer.global_step), "train_seconds": seconds, "resumed": bool(ckpt_path),
        "selected": "best validation epoch" if best else "last epoch",
        "hardware": hardware(), "torch": torch.__version__}})
    # the release must load by itself and agree with the model we trained
    loaded = load(release)
    x = task_cls.golden_input(dm)
    ref = packed_copy(module.model.cpu())(x)
    diff = (loaded(x) - ref).abs().max().item()
    if diff > 1e-4 * max(ref.abs().max().item(), 1.0):
        raise RuntimeError(f"reloaded release differs from the trained model by {diff}")
    write_golden(loaded, x, release)
    print(f"\nrelease: {release}\n{task_cls.report(loaded, dm, release)}")
    write_card(release)
    return {"metrics": metrics, "release_dir": str(release), "global_step": int(trainer.global_step),
            "output_dir": str(out)}


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
