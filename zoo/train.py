"""``python -m zoo.train task=cls bits=4``: quantization-aware training from the command line.

``run(cfg)`` is a pure function of the composed config (tests call it directly); ``main`` is a thin
``@hydra.main`` around it that turns configuration errors into a non-zero exit with a message.
At the end it evaluates on the test split and writes a packed release checkpoint with the metrics.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import platform
import sys
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad configuration value (the message names it and the valid choices)."""


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _bits(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ConfigError(f"{name}={value!r} is not a valid bit width; valid: integers 1..8 "
                          f"(use quant=none for full precision)")


def _batch_size(batch) -> int:
    """Samples in a batch: the leading size of its input tensor."""
    from .datasets import batch_input

    x = batch_input(batch)
    return int(x.shape[0]) if hasattr(x, "shape") and len(x.shape) else 1


def throughput_callback(warmup: int = 3):
    """A Lightning callback that logs ``train/samples_per_s`` per epoch: training samples over the wall
    time from the end of batch ``warmup`` to the end of the epoch's last batch (data loading and the
    optimizer step included, validation and the first batches' compilation/caching excluded; CUDA
    is synchronised at each batch end so queued GPU work is counted). ``.last`` keeps the value."""
    import time

    import lightning as L
    import torch

    class Throughput(L.Callback):
        last = None

        def on_train_epoch_start(self, trainer, module):
            self.prev, self.samples, self.seconds = None, 0, 0.0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            now = time.perf_counter()
            if batch_idx >= warmup and self.prev is not None:
                self.samples += _batch_size(batch)
                self.seconds += now - self.prev
            self.prev = now

        def on_train_epoch_end(self, trainer, module):
            if self.seconds > 0:
                self.last = self.samples / self.seconds
                module.log("train/samples_per_s", self.last, rank_zero_only=True)

    return Throughput()


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
    weight = OmegaConf.to_container(q.weight, resolve=True) if q.weight is not None else None
    act = OmegaConf.to_container(q.act, resolve=True) if q.act is not None else None
    levels = _act_levels(cfg, act)
    overrides = {}
    for glob in cfg.task.get("keep_layers", []):
        n = next((n for g, n in levels.items() if fnmatch.fnmatchcase(glob, g)), 1)
        overrides[glob] = keep if keep is None or n == 1 else {**keep, "act_sites": n}
    for glob, lq in _plain(q.get("layers")).items():  # the quant config's own per-layer specs
        overrides.setdefault(str(glob), lq)
    for glob, n in levels.items():  # after the keep layers (the first matching glob wins)
        overrides.setdefault(glob, {"weight": weight, "act": act, "act_sites": n})
    d = {"weight": weight, "act": act, "overrides": overrides, "extra": _plain(q.get("extra"))}
    try:
        qc = QuantConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"quant={q.name}: {e}") from None
    return with_overrides(qc, q.get("overrides_from")).to_dict()


def _act_levels(cfg: DictConfig, act) -> dict:
    """{layer glob: calls per forward} of the task's ``act_levels`` when ``per_level_act=true``
    (each such layer then gets one activation quantizer per call, i.e. per pyramid level); {} if not."""
    if not cfg.get("per_level_act"):
        return {}
    levels = _plain(cfg.task.get("act_levels"))
    if not levels:
        raise ConfigError(f"per_level_act=true: task={cfg.task.name} has no layers called once per level "
                          f"(task.act_levels is empty); valid: per_level_act=false")
    if act is None:
        raise ConfigError(f"per_level_act=true needs quantized activations; quant={cfg.quant.name} has none")
    return {str(g): int(n) for g, n in levels.items()}


def with_overrides(qc, path):
    """``qc`` with the per-layer bit widths of ``quant.overrides_from=<bits.json>`` (zoo.mixed)."""
    if not path:
        return qc
    from .mixed.search import apply_bits, load_bits

    try:
        return apply_bits(qc, load_bits(path))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


QUANT_KEYS = ("quant", "bits", "wbits", "abits", "keep_bits", "per_level_act")  # overrides that choose the quantization


def chosen(overrides, *keys: str) -> bool:
    """Whether the command-line ``overrides`` set any of the top-level ``keys`` (``quant.act.bits=3``
    sets ``quant``); ``None`` (a config composed in Python) counts every setting as chosen."""
    if overrides is None:
        return True
    given = {a.split("=", 1)[0].lstrip("+~").split(".")[0] for a in overrides if "=" in a}
    return bool(given & set(keys))


def adopt_release(cfg: DictConfig, overrides) -> dict | None:
    """``init_from`` a quantized release (fine-tuning): the run takes the release's architecture,
    model arguments and quantization unless the command sets them, and a release name of its own
    (``<release>_ft_<data>``). Returns the release config, or None when init_from is not one."""
    from .checkpoint import CheckpointError
    from .tasks.init_from import quantized_release

    if not chosen(overrides, "init_from"):
        return None  # the tasks' default starting points are float models
    try:
        found = quantized_release(cfg.init_from)
    except (ValueError, CheckpointError) as e:
        raise ConfigError(f"init_from={cfg.init_from!r}: {e}") from None
    if found is None:
        return None
    directory, rel = found
    if rel.get("task") != cfg.task.name:
        raise ConfigError(f"init_from={cfg.init_from!r} is a task={rel.get('task')} model, not task={cfg.task.name}")
    with open_dict(cfg):
        cfg.init_from = str(cfg.init_from)  # pin it: it may interpolate ${arch}
        if not chosen(overrides, "arch"):
            cfg.arch = rel["arch"]
        if not chosen(overrides, "name"):
            cfg.name = f"{directory.name}_ft_{cfg.data.name}"
    if rel["arch"] != cfg.arch:
        raise ConfigError(f"init_from={cfg.init_from!r} is a {rel['arch']} model but arch={cfg.arch}; "
                          f"drop arch= to fine-tune it")
    return {"config": rel, "keep_quant": not chosen(overrides, *QUANT_KEYS)}


def default_init(task_cls, arch: str, contract: dict, preferred: str | None) -> str | None:
    """The float model a run starts from when the command names none: the task's default
    (``preferred``) if it is shipped and fits the data, else the first shipped float model of the
    same task and arch that fits (``task_cls.contract_fits``), else None (from scratch); logged."""
    from .checkpoint import read_config
    from .registry import list_models, resolve_checkpoint

    names = list_models(f"{arch}.*", task=task_cls.task_name)
    for name in ([preferred] if preferred in names else []) + names:
        rel = read_config(resolve_checkpoint(name))
        if not rel.get("quant") and rel["arch"] == arch and task_cls.contract_fits(rel["input_contract"], contract):
            if name != preferred:
                log.info("init_from: %s is not shipped or does not fit this data; starting from %s", preferred, name)
            return name
    log.warning("init_from: no shipped float %s model fits this data (input contract %s; shipped: %s): "
                "training from scratch (give init_from= to start from a checkpoint)", arch,
                {k: v for k, v in contract.items() if k not in ("classes", "mean", "std")}, names)
    return None


def split_sizes(dm) -> dict:
    """Images per split: the DataModule's ``split_sizes()``, else the lengths of its datasets."""
    if hasattr(dm, "split_sizes"):
        return dm.split_sizes()
    return {s: len(getattr(dm, f"{s}_set")) for s in ("train", "val", "test")
            if getattr(dm, f"{s}_set", None) is not None}


def task_and_data(cfg: DictConfig):
    """The task class cfg.task.name names, after checking that it exists and offers data=cfg.data.name."""
    from .tasks import get_task, task_names

    if cfg.task.name not in task_names():
        raise ConfigError(f"unknown task {cfg.task.name!r}; valid: {task_names()}")
    task_cls = get_task(cfg.task.name)
    if cfg.data.name not in task_cls.datamodules:
        raise ConfigError(f"data={cfg.data.name!r} is not available for task {cfg.task.name}; "
                          f"valid: {sorted(task_cls.datamodules)}")
    return task_cls


def validate(cfg: DictConfig, overrides=None):
    """Check the names in cfg; returns (task class, datamodule class, quant dict, model args).
    ``overrides``: the command-line overrides, i.e. which settings the user chose (None: all)."""
    from .registry import list_archs
    from .tasks import get_task, task_names

    if cfg.task.name not in task_names():
        raise ConfigError(f"unknown task {cfg.task.name!r}; valid: {task_names()}")
    task_cls = get_task(cfg.task.name)
    release = adopt_release(cfg, overrides)
    if cfg.arch not in list_archs():
        raise ConfigError(f"unknown arch {cfg.arch!r}; valid: {list_archs()}")
    if cfg.data.name not in task_cls.datamodules:
        raise ConfigError(f"data={cfg.data.name!r} is not available for task {cfg.task.name}; "
                          f"valid: {sorted(task_cls.datamodules)}")
    q = quant_dict(cfg)
    if cfg.get("per_level_act") and q is not None and not str(cfg.quant.tag).endswith("_perlevel"):
        cfg.quant.tag = f"{cfg.quant.tag}_perlevel"  # the release name says so (unless name= is given)
    model_args = {**_plain(cfg.task.get("model_args")), **_plain(cfg.quant.get("model_args")),
                  **_plain(cfg.get("model_args"))}
    if release is not None and release["keep_quant"]:
        q = release["config"]["quant"]
        rel = release["config"]
        decided = set(task_cls.data_model_args(rel["input_contract"]))  # the user's data decides these
        model_args = {**{k: v for k, v in rel.get("model_args", {}).items() if k not in decided},
                      **_plain(cfg.get("model_args"))}
        log.info("init_from=%s: fine-tuning with its quantization %s", cfg.init_from, q)
    if cfg.distill and not cfg.init_from:
        raise ConfigError("distill > 0 needs init_from= (the float teacher)")
    from .tasks.base import SCHEDULES

    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"schedule={cfg.schedule!r} is not valid; valid: {list(SCHEDULES)}")
    if cfg.two_stage and q is None:
        raise ConfigError("two_stage=true needs a quantized model (quant=none has no weight quantizers)")
    _numbers(cfg)
    return task_cls, task_cls.datamodules[cfg.data.name], q, model_args


def _numbers(cfg: DictConfig) -> None:
    """Numeric settings in their valid ranges."""
    checks = {  # key: (test, what is valid)
        "epochs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        "batch_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        "lr": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
        "weight_decay": (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
        "distill": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a number in [0, 1]"),
        "distill_temperature": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    }
    for key, (ok, valid) in checks.items():
        value = cfg.get(key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not valid; valid: {valid}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"{key}={value!r} is not valid; valid: null, a fraction in (0, 1] or a "
                              f"number of batches >= 1")


GROUPS = ("quant", "data", "task", "trainer")  # Hydra config groups, zoo/configs/<group>/*.yaml


def check_groups(argv: list[str], groups=GROUPS) -> None:
    """A ``group=choice`` on the command line that names no config file is a ConfigError naming the
    valid choices (before Hydra reports it with a multi-line message and exit code 1)."""
    root = Path(__file__).parent / "configs"
    for arg in argv:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key in groups and value:
            valid = sorted(f.stem for f in (root / key).glob("*.yaml"))
            if value not in valid:
                raise ConfigError(f"{key}={value!r} is not available; valid: {valid}")


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


def rank_digests(model, world_size: int) -> list[str]:
    """Every data-parallel rank's quantizer-state digest (one entry in a single process)."""
    from .quantizers.quantize import quantizer_state_digest

    digest = quantizer_state_digest(model)
    if world_size <= 1:
        return [digest]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, digest)
    return out


def _command() -> str:
    """The recipe: this invocation's arguments, less a resume (resuming continues the same run)."""
    args = [a for a in sys.argv[1:] if not a.startswith("ckpt_path=")]
    return "python -m zoo.train " + " ".join(args)


def run(cfg: DictConfig, command: str | None = None, overrides=None) -> dict:
    """Train, test and export as ``cfg`` says. Returns the release metrics and paths. ``command``
    is the recipe recorded on the card (default: this process's ``python -m zoo.train`` arguments);
    ``overrides`` are the command-line overrides, which tell the settings the user chose from the
    defaults (a fine-tuned release keeps its quantization unless they set it; a default init_from
    that does not fit the data is replaced). None, for a config composed in Python: all chosen."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, Timer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .cards import write_card, write_golden
    from .checkpoint import load, packed_copy, save

    command = command or _command()
    missing = sorted(OmegaConf.missing_keys(cfg.data))
    if missing:
        raise ConfigError(f"data={cfg.data.name} needs " + ", ".join(f"{k}=..." for k in missing)
                          + " (e.g. data.root=DIR, your data folder)")
    task_cls, dm_cls, qdict, model_args = validate(cfg, overrides)
    L.seed_everything(cfg.seed, workers=True)
    data_kw = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
               if k not in ("name", "release_tag")}
    dm = dm_cls(batch_size=cfg.batch_size, seed=cfg.seed, **data_kw)
    dm.setup("fit")
    contract = dm.input_contract()
    if cfg.init_from and not chosen(overrides, "init_from"):
        with open_dict(cfg):  # the task's default start: only if it is shipped and fits the data
            cfg.init_from = default_init(task_cls, cfg.arch, contract, str(cfg.init_from))
        if cfg.distill and not cfg.init_from:
            raise ConfigError("distill > 0 needs init_from= (the float teacher); none fits this data")
    model_args = {**task_cls.data_model_args(contract), **model_args}
    module = task_cls(arch=cfg.arch, model_args=model_args, input_contract=contract,
                      quant=qdict, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                      init_from=cfg.init_from, distill=cfg.distill,
                      distill_temperature=cfg.distill_temperature, schedule=cfg.schedule,
                      two_stage=bool(cfg.two_stage))
    try:  # build (and load init_from) now, so a checkpoint that does not fit is a config error
        module.configure_model()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    metric, mode = "val/select", task_cls.monitor[1]  # the monitored metric, once the model is in its final form
    # best.ckpt: the best validation epoch (the release); last.ckpt: every epoch, whatever the metric
    # did, for ckpt_path=last (Lightning's save_last writes it only when the monitored checkpoint is saved)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=metric, mode=mode, save_top_k=1),
                 LearningRateMonitor(logging_interval="step"), Timer(verbose=False),
                 throughput_callback(),
                 ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                                 enable_version_counter=False)]
    loggers = [CSVLogger(out, name="csv"), TensorBoardLogger(out, name="tb")]
    trainer_kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kw.get("sync_batchnorm") and trainer_kw.get("accelerator") != "gpu" and not torch.cuda.is_available():
        log.warning("sync_batchnorm: SyncBatchNorm needs GPUs, so on CPU each rank normalises with its own "
                    "batch statistics (models with norm=gn do not depend on them)")
        trainer_kw["sync_batchnorm"] = False
    trainer = L.Trainer(max_epochs=cfg.epochs, callbacks=callbacks, logger=loggers,
                        default_root_dir=out, limit_train_batches=cfg.limit_train_batches,
                        limit_val_batches=cfg.limit_val_batches,
                        limit_test_batches=cfg.limit_test_batches, deterministic=False,
                        **trainer_kw)
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
    # each rank's own quantizer state as training left it (before the best epoch is reloaded from
    # rank 0's checkpoint, which would make them equal whatever happened)
    digests = rank_digests(module.model, trainer.world_size)
    # fit time (training and validation); a resumed run adds the time its checkpoint had recorded
    seconds = round(callbacks[2].time_elapsed("train"), 1) if timed else None
    if callbacks[3].last and trainer.is_global_zero:
        print(f"training throughput (last epoch, after 3 warm-up batches): {callbacks[3].last:.1f} samples/s "
              f"on {trainer.strategy.root_device}")
    best = callbacks[0].best_model_path
    if best and Path(best).is_file():  # release the best validation epoch, not merely the last
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    released = module.release_model()  # the trained weights, or a task's EMA of them
    if len(set(digests)) > 1:
        raise RuntimeError(f"the data-parallel ranks ended with different quantizer states: {digests}")
    if not trainer.is_global_zero:  # rank 0 evaluates the packed model on the whole test split and releases
        return {"metrics": {}, "release_dir": None, "global_step": int(trainer.global_step), "output_dir": str(out)}
    metrics = {f"{k.replace('/', '_')}_training_form": float(v) for k, v in test.items()}
    if cfg.evaluate_packed:
        packed = packed_copy(released.cpu())
        res = task_cls.evaluate(packed, dm.test_dataloader())
        metrics.update({f"test_{k}": v for k, v in res.items()})
        metrics.update(task_cls.extra_metrics(packed))
    best_score = callbacks[0].best_model_score  # a tensor; 0.0 is a score (``or`` would drop it)
    metrics["best_val"] = float(best_score) if best_score is not None else float("nan")
    release = save(released.cpu(), cfg.release_dir, metrics=metrics, extra={"train": {
        "command": command, "data": cfg.data.name, "data_root": cfg.data.get("root"),
        "splits": split_sizes(dm), "epochs": int(cfg.epochs),
        "global_step": int(trainer.global_step), "train_seconds": seconds, "resumed": bool(ckpt_path),
        "train_samples_per_s": round(callbacks[3].last, 1) if callbacks[3].last else None,
        "selected": "best validation epoch" if best else "last epoch",
        "hardware": hardware(), "torch": torch.__version__,
        **({"ranks": trainer.world_size, "quantizer_digests": digests} if trainer.world_size > 1 else {})}})
    # the release must load by itself and agree with the model we trained
    loaded = load(release)
    x = task_cls.golden_input(dm)
    golden = partial(task_cls.golden_output, loaded)  # the task's tensor form of the output
    ref = task_cls.golden_output(packed_copy(released.cpu()), x)
    diff = (golden(x) - ref).abs().max().item()
    if diff > 1e-4 * max(ref.abs().max().item(), 1.0):
        raise RuntimeError(f"reloaded release differs from the trained model by {diff}")
    write_golden(golden, x, release)
    if cfg.evaluate_packed:
        print(f"\nrelease: {release}\n{task_cls.report(loaded, dm, release)}")
    else:  # the task's report prints the packed model's test metrics, which were not measured
        print(f"\nrelease: {release} (evaluate_packed=false: the packed model was not evaluated)")
    write_card(release)
    return {"metrics": metrics, "release_dir": str(release), "global_step": int(trainer.global_step),
            "output_dir": str(out)}


USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               OmegaConfBaseException)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg, overrides=[a for a in sys.argv[1:] if "=" in a])


def exit_on_user_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, where a mistake in the user's input (a setting, a path, a checkpoint
    that does not fit) ends in one line naming it and exit code 2; ``ZOO_DEBUG=1`` shows the traceback."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if os.environ.get("ZOO_DEBUG"):
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)


def checked_cli(groups, main_fn) -> None:
    """The entry point of a Hydra CLI: unknown config groups are a one-line error (exit 2), then ``main_fn``."""
    try:
        check_groups(sys.argv[1:], groups)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main_fn()


def check_overrides(argv: list[str]) -> None:
    """Compose the config the way Hydra will, so an override it cannot apply (a typo'd key, a bad
    value type) is a one-line ConfigError instead of Hydra's multi-line report with exit code 1."""
    from hydra import compose, initialize_config_module

    overrides = [a for a in argv if "=" in a and not a.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
            compose("train", overrides=overrides)
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf raise many types; each is reported
        text = " ".join(line.strip() for line in str(e).split("\n\n")[0].splitlines() if line.strip())
        raise ConfigError(text or type(e).__name__) from None


def open_model_args(argv: list[str]) -> list[str]:
    """``model_args.<key>=v`` as Hydra's ``++model_args.<key>=v``: ``model_args`` is an open map of the
    architecture's arguments (empty in train.yaml), so a key is set whether or not a config gave one."""
    return [f"++{a}" if a.startswith("model_args.") else a for a in argv]


def cli() -> None:
    """``python -m zoo.train``: settings Hydra would reject are reported in one line (exit 2)."""
    sys.argv[1:] = open_model_args(sys.argv[1:])
    try:
        check_groups(sys.argv[1:])
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
