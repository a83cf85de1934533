"""What a quantized model's own architecture costs in float, where it differs from the float release's.

    python benchmarks/own_arch.py                 # every shipped image model whose architecture differs
    python benchmarks/own_arch.py --batch 64 --task cls

``benchmarks/cpu.py`` compares each packed model with the float *release* of its architecture name; some
methods change the network itself (ReAct: RPReLU after every conv and a shortcut around every conv), so
part of that ratio is the architecture, not the quantization. Here, per such model: the float release,
the same architecture as the packed model in float (random weights: the time does not depend on them),
and the packed model through the default CPU backend -- interleaved, medians, ratios from the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS, markdown, save

import torch  # noqa: E402

import zoo  # noqa: E402
from zoo.cards import read_golden  # noqa: E402
from zoo.registry import create_model, resolve_checkpoint  # noqa: E402
from zoo.tasks import get_task, task_names  # noqa: E402

from cpu import cpu_name, float_baseline, interleaved  # noqa: E402


def _arch(name: str) -> tuple:
    cfg = json.loads((resolve_checkpoint(name) / "config.json").read_text())
    return cfg["arch"], cfg.get("model_args", {})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="*", default=None, choices=task_names())
    ap.add_argument("--batch", nargs="*", type=int, default=[64])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows, records = [], []
    for task in args.task or task_names():
        if not get_task(task).predict_takes_images:
            continue
        names = zoo.list_models(task=task)
        floats = [n for n in names if n.split(".", 1)[1].startswith("fp32")]
        for name in names:
            fp = float_baseline(name, floats) if name not in floats else None
            if fp is None or name.startswith("mmdet.") or _arch(name) == _arch(fp):
                continue
            arch, kwargs = _arch(name)
            models = {"release": zoo.load(fp), "own arch": create_model(arch, **kwargs).eval(),
                      "cpu": zoo.load(name)}
            shape = tuple(read_golden(resolve_checkpoint(name))[0].shape[1:])
            for batch in args.batch:
                x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
                ms = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.reps, 2)
                records.append(dict(model=name, float=fp, batch=batch, model_args=kwargs, **ms))
                rows.append([name, batch, f"{ms['release']:.2f}",
                             f"{ms['own arch']:.2f} ({ms['own arch'] / ms['release']:.2f}x)",
                             f"{ms['cpu']:.2f} ({ms['cpu'] / ms['release']:.2f}x, {ms['cpu'] / ms['own arch']:.2f}x)"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    cmd = "python benchmarks/own_arch.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([f"# Quantized models' own architectures in float — {cpu_name()}", "",
                      f"torch {torch.__version__}, `{cmd}`; medians of {args.reps} interleaved runs", "",
                      markdown(["model", "batch", "float release ms", "same arch in float ms (/release)",
                                "packed, cpu backend ms (/release, /same arch)"], rows)])
    print("\n" + text)
    path = save("own_arch", cpu_name(), text, records, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
