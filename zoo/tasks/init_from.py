"""Where training starts (``init_from``): a float checkpoint, a Lightning ``.ckpt``, or a quantized
release to fine-tune.

A quantized release is rebuilt into its training form (``zoo.quantizers.unpack``): the rebuilt
model's output equals the release's before the first step. If the run asks for another quantization
than the release's, training starts from the rebuilt float weights with fresh quantizers. Layers the
task lets the data decide (the classifier, for another number of classes) are re-initialised with a
log line; any other layer that does not fit is an error naming it.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
from pathlib import Path

import torch

from ..quantizers import QuantConfig, quantize
from ..wrapper import ZooModel

log = logging.getLogger(__name__)


def quantized_release(source: str | None) -> tuple[Path, dict] | None:
    """(directory, config) when ``source`` is a zoo checkpoint holding a quantized model, else None."""
    from ..checkpoint import read_config
    from ..registry import resolve_checkpoint

    if not source or Path(str(source)).suffix == ".ckpt":
        return None
    directory = resolve_checkpoint(source)
    cfg = read_config(directory)
    return (directory, cfg) if cfg.get("quant") else None


def load_float_weights(model: ZooModel, source: str, head_layers: tuple[str, ...] = ()) -> None:
    """Load float weights into ``model`` (before quantization) from a zoo checkpoint directory or
    shipped name holding a float model, or from a Lightning ``.ckpt`` (read with weights_only).
    Parameters of layers matching ``head_layers`` whose shapes differ keep their initialisation (with
    a log line); any other shape that differs raises ValueError naming the layers."""
    from ..checkpoint import WEIGHTS
    from ..registry import resolve_checkpoint

    path = Path(source)
    if path.suffix == ".ckpt" and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    else:
        if quantized_release(source) is not None:
            raise ValueError(f"init_from={source!r} is a quantized release: use restore_release")
        from safetensors.torch import load_file

        state = load_file(str(resolve_checkpoint(source) / WEIGHTS))
    own = model.state_dict()
    misfit = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
              if k in own and v.shape != own[k].shape}
    layer = {k: k[len("net."):].rsplit(".", 1)[0] for k in misfit}
    bad = [k for k in misfit if not any(fnmatch.fnmatch(layer[k], g) for g in head_layers)]
    if bad:
        raise ValueError(f"init_from={source!r} does not fit {model.arch} with model_args {model.model_args}; "
                         "mismatching layers: " + "; ".join(f"{layer[k]} ({k.rsplit('.', 1)[1]} {misfit[k][0]} "
                                                            f"in the checkpoint, {misfit[k][1]} here)" for k in bad))
    for k in misfit:
        log.warning("init_from=%s: layer %s re-initialised (%s %s in the checkpoint, %s here)", source,
                    layer[k], k.rsplit(".", 1)[1], misfit[k][0], misfit[k][1])
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in misfit]
    if unexpected:
        raise ValueError(f"init_from={source!r} does not match {model.arch}: unexpected keys {unexpected[:5]}")
    if missing:  # parameters the float net lacks (e.g. RPReLU shifts) keep their initial values
        log.info("init_from=%s: %d parameters not in the float checkpoint keep their init: %s",
                 source, len(missing), missing[:5])


def float_teacher(source: str, student_float: ZooModel) -> ZooModel:
    """The frozen teacher for distillation: the ``init_from`` checkpoint in its *own* architecture
    (a binary student's blocks differ from the float net it starts from; a quantized release
    teaches as released), or, for a Lightning ``.ckpt``, a copy of the student's float model."""
    from ..checkpoint import load

    if Path(source).suffix == ".ckpt":
        return copy.deepcopy(student_float)
    return load(source)


def _probe(model: ZooModel) -> torch.Tensor:
    ic = model.input_contract
    size = ic.get("size") or [32, 32]
    return torch.rand(2, ic["channels"], *size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def restore_release(model: ZooModel, source: str, qcfg: QuantConfig | None,
                    head_layers: tuple[str, ...] = (), data_args: tuple[str, ...] = (),
                    output=None) -> None:
    """Start ``model`` (float, as built) from the quantized release ``source``: quantize it with
    ``qcfg`` and set every layer from the release. With the release's own ``QuantConfig`` the result
    is exact (checked on a probe input); with another, the float weights are the release's rebuilt
    ones and the new quantizers initialise from data as in any QAT run. Layers matching
    ``head_layers`` that do not fit are re-initialised; others raise ValueError naming them, as do
    model arguments that differ from the release's other than ``data_args`` (which the data decides).
    ``output(model, x)``: the tensor form of a model's output that the check compares (the task's
    ``golden_output``; default ``model(x)``)."""
    from ..checkpoint import load
    from ..quantizers.unpack import check_restored, restore_from_packed

    release = load(source)
    if release.arch != model.arch:
        raise ValueError(f"init_from={source!r} is a {release.arch} model, not {model.arch}")
    differ = {k: (release.model_args.get(k), model.model_args.get(k))
              for k in set(release.model_args) | set(model.model_args)
              if k not in data_args and release.model_args.get(k) != model.model_args.get(k)}
    if differ:
        raise ValueError(f"init_from={source!r} was built with other model_args: " + "; ".join(
            f"{k}={a!r} in the release, {b!r} here" for k, (a, b) in sorted(differ.items())))
    same = qcfg is not None and qcfg.to_dict() == release.quant.to_dict()
    work = model if same else copy.deepcopy(model)
    quantize(work.net, release.quant)
    misfit = restore_from_packed(work.net, release.net)
    bad = {n: why for n, why in misfit.items() if not any(fnmatch.fnmatch(n, g) for g in head_layers)}
    if bad:
        raise ValueError(f"init_from={source!r} does not fit {model.arch} with model_args "
                         f"{model.model_args}; mismatching layers: " +
                         "; ".join(f"{n} ({why})" for n, why in sorted(bad.items())))
    for name, why in sorted(misfit.items()):
        log.warning("init_from=%s: layer %s re-initialised (%s)", source, name, why)
    wrong = check_restored(work.net, release.net, skip=set(misfit))
    if wrong:
        raise ValueError(f"init_from={source!r}: the rebuilt training form does not re-quantize to the "
                         f"release in layers: " + "; ".join(f"{n} ({w})" for n, w in sorted(wrong.items())))
    if not misfit:
        # the training form computes in float what the packed form computes in integers: rounding
        # differences flip the odd activation code at a bin edge, and at 2 bits in a deep net that
        # spreads. So the output must agree to within the release's own sensitivity to float noise.
        run = output or (lambda m, t: m(t))
        x = _probe(model)
        ref, out = run(release, x), run(work.eval(), x)
        noise = max(float((run(release, x + 1e-5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(s)))
                           - ref).abs().mean()) for s in (1, 2, 3))
        diff = float((out - ref).abs().mean())
        if diff > max(1e-5 * max(float(ref.abs().max()), 1.0), 10 * noise):
            raise ValueError(f"init_from={source!r}: the rebuilt training form's output differs from the "
                             f"release's by {diff:.3g} on average (a 1e-5 input perturbation of the release "
                             f"moves it by {noise:.3g})")
        log.info("init_from=%s: training form rebuilt from the packed release (mean output difference "
                 "%.2g; the release's own sensitivity to 1e-5 input noise: %.2g)", source, diff, noise)
    work.train()
    if same:
        return
    # another quantization: start from the rebuilt float weights (quantizer state left behind)
    float_keys = set(model.state_dict())
    state = {k: v for k, v in work.state_dict().items() if k in float_keys}
    model.load_state_dict(state, strict=True)
    log.info("init_from=%s: float weights rebuilt from the release (quantized as %s); the run's "
             "quantization starts fresh", source, release.quant.to_dict())
