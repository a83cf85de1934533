"""CPU latency of the shipped checkpoints: the float network against the packed model's CPU backends.

    python benchmarks/cpu.py                  # every task; saves benchmarks/results/cpu_<cpu>.md
    python benchmarks/cpu.py --task cls --batch 1 64
    python benchmarks/cpu.py --smoke          # one model per task, batch 1, one run; saves nothing

For each shipped quantized model and the float release of the same architecture and data ("torch
FP32"), on random inputs of its golden input's shape: ``backend="reference"`` (the uncached integer
path: weights unpacked on every call), ``backend="cpu"`` (the cached CPU path, what ``auto`` runs on
CPU tensors) and, with the ``export`` extra, onnxruntime on the float release ("ort FP32") and on the
packed model's QDQ export ("ort int8", ``backend="onnxruntime"``; exported once into the cache).
The runs of one model are interleaved (FP32, reference, cpu, ..., FP32, ...) and the table
gives each one's median over the repeats and the ratio to FP32 from the same run (> 1: slower than
float). "cache MiB": what the cached path holds after a forward (float32 weights, border terms).
Timings on a shared machine are noisy: compare ratios, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, markdown, save, smoke_requested

SMOKE = smoke_requested()

import torch  # noqa: E402

import zoo  # noqa: E402
from zoo.cards import read_golden  # noqa: E402
from zoo.registry import resolve_checkpoint  # noqa: E402
from zoo.tasks import get_task, task_names  # noqa: E402

BACKENDS = ("reference", "cpu")
ORT = ("ort FP32", "ort int8")


def have_onnxruntime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def float_baseline(name: str, floats: list[str]) -> str | None:
    """The float release of ``name``'s architecture whose data suffix ``name`` ends with (longest)."""
    arch = name.split(".", 1)[0]
    best = None
    for f in floats:
        fa, tag = f.split(".", 1)
        suffix = tag.removeprefix("fp32")
        if fa == arch and name.endswith(suffix) and (best is None or len(f) > len(best)):
            best = f
    return best


def cache_mib(model) -> float:
    seen, total = set(), 0

    def add(obj):
        nonlocal total
        if torch.is_tensor(obj) and id(obj) not in seen:
            seen.add(id(obj))
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                add(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                add(o)

    for m in model.modules():
        add(m.__dict__.get("_cpu_cache", {}))
    return total / 2 ** 20


def interleaved(fns: dict, reps: int, warmup: int) -> dict:
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="*", default=None, choices=task_names(), help="default: every task")
    ap.add_argument("--batch", nargs="*", type=int, default=None, help="default: 1 and 32")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="one model per task, batch 1, one run; saves nothing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    batches = [1] if args.smoke else (args.batch or [1, 32])
    reps, warmup = (1, 0) if args.smoke else (args.reps, args.warmup)
    rows, records = [], []
    from zoo.export import exportable

    for task in args.task or task_names():
        ort = have_onnxruntime() and exportable(task)
        if not get_task(task).predict_takes_images:  # generators are timed by their own benchmark
            continue
        names = zoo.list_models(task=task)
        floats = [n for n in names if n.split(".", 1)[1].startswith("fp32")]
        quantized = [(n, float_baseline(n, floats)) for n in names if n not in floats]
        quantized = [(n, f) for n, f in quantized if f is not None and not n.startswith("mmdet.")]
        if args.smoke:
            quantized = quantized[:1]
        for name, fp in quantized:
            shape = tuple(read_golden(resolve_checkpoint(name))[0].shape[1:])
            models = {"fp32": zoo.load(fp)} | {b: zoo.load(name, backend=b) for b in BACKENDS}
            if ort:
                models |= {"ort FP32": zoo.load(fp, backend="onnxruntime"),
                           "ort int8": zoo.load(name, backend="onnxruntime")}
            for batch in batches:
                x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
                ms = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, reps, warmup)
                rec = dict(model=name, float=fp, batch=batch, **{f"{k}_ms": v for k, v in ms.items()},
                           cache_mib=cache_mib(models["cpu"]))
                records.append(rec)
                rows.append([name, batch, f"{ms['fp32']:.2f}"]
                            + [f"{ms[b]:.2f} ({ms[b] / ms['fp32']:.2f}x)" if b in ms else "n/a"
                               for b in BACKENDS + ORT]
                            + [f"{rec['cache_mib']:.2f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    desc = cpu_name()
    headers = ["model", "batch", "torch FP32 ms"] + [f"{b} ms (/FP32)" for b in BACKENDS + ORT] + ["cache MiB"]
    cmd = "python benchmarks/cpu.py" + (" --smoke" if args.smoke else "")
    text = "\n".join([f"# Shipped models on CPU — {desc}", "",
                      f"torch {torch.__version__}, `{cmd}`; medians of {reps} interleaved runs, "
                      "ratios to the float network from the same run (> 1: slower)", "",
                      markdown(headers, rows)])
    print("\n" + text)
    path = save("cpu", desc, text, records, None if args.smoke else args.out)
    if path:
        print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
