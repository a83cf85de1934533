"""CPU latency of the shipped checkpoints: the float network against the packed model's CPU backends.

    python benchmarks/cpu.py                  # every task; saves benchmarks/results/cpu_<cpu>.md (with --task: cpu_<tasks>_<cpu>.md)
    python benchmarks/cpu.py --task cls --batch 1 64
    python benchmarks/cpu.py --smoke          # one model per task, batch 1, one run; saves nothing
    python benchmarks/cpu.py --task cls --layers   # also the W1A1 conv layers alone (the C++ kernel)

For each shipped quantized model and the float release of the same architecture and data ("torch
FP32"), on random inputs of its golden input's shape: ``backend="reference"`` (the uncached integer
path: weights unpacked on every call), ``backend="cpu"`` (the cached CPU path, what ``auto`` runs on
CPU tensors) and, with the ``export`` extra, onnxruntime on the float release ("ort FP32") and on the
packed model's QDQ export ("ort int8", ``backend="onnxruntime"``; exported once into the cache).
The runs of one model are interleaved (FP32, reference, cpu, ..., FP32, ..., the order rotated each
repeat) and the table gives each one's median over the repeats and the ratio to FP32 from the same run
(> 1: slower than float). "cache MiB": what the cached path holds after a forward (float32 weights,
border terms); a second table gives each backend's peak memory of one forward (``peak_mib``).
Timings on a shared machine are noisy: compare ratios, not absolute times across runs.

``--compile`` adds two columns: the float release and the packed model (cpu backend) under
``torch.compile`` (inductor), both as ratios to the eager float network.

``--layers`` adds a table of single W1A1 convolutions at ResNet-20 and ResNet-18 shapes (3x3, stride 1,
padding 1): torch's float32 conv of the same shape against the packed binary layer through the C++
XOR-popcount kernel (``zoo/kernels/cpu_ops.py``; float input: its signs packed first), the same kernel on
signs already packed (as in the fused binary blocks, whose epilogues pack the next conv's input) and
the cached float32 path it replaces (``ZOO_CPU_KERNELS=0``), interleaved, medians, ratios to FP32
(> 1: slower).
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
COMPILED = ("FP32 compiled", "cpu compiled")


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
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):  # a layer's Plan
            add(vars(obj))

    for m in model.modules():
        add(m.__dict__.get("_cpu_cache", {}))
    return total / 2 ** 20


def _vm(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_mib(fn) -> float | None:
    """Peak resident memory one call of ``fn`` adds above the resident set before it (Linux: freed heap
    memory is first returned to the system with malloc_trim, the peak is reset through
    /proc/self/clear_refs and read back as VmHWM; None elsewhere). Run on a model's first call, it counts
    what torch or onnxruntime allocate for the call (activations, workspaces, onnxruntime's arena)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return None
    before = _vm("VmRSS")
    with torch.no_grad():
        fn()
    peak = _vm("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) / 2 ** 20


def interleaved(fns: dict, reps: int, warmup: int) -> dict:
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {k: [] for k in fns}
        keys = list(fns)
        for r in range(reps):  # the order rotates each repeat: no column always runs after the same one
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                t = time.perf_counter()
                fns[k]()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


LAYERS = [  # (name, C_in = C_out, H = W, batch): ResNet-20 on 28x28 Fashion-MNIST, ResNet-18 on 224x224
    ("resnet20 stage 1", 16, 28, 64), ("resnet20 stage 2", 32, 14, 64), ("resnet20 stage 3", 64, 7, 64),
    ("resnet18 layer1", 64, 56, 1), ("resnet18 layer2", 128, 28, 1), ("resnet18 layer3", 256, 14, 1),
    ("resnet18 layer4", 512, 7, 1), ("resnet18 layer4", 512, 7, 8)]


def binary_layers(reps: int, warmup: int, smoke: bool = False) -> tuple[list, list]:
    """Rows and records of the W1A1 layer table (empty when the C++ kernel is not available)."""
    import os

    from torch import nn

    from zoo.kernels import cached, cpu_ops

    if not cpu_ops.available():
        print("the C++ binary kernel is not available: no layer table")
        return [], []
    rows, records = [], []
    for name, c, hw, batch in LAYERS[:1] if smoke else LAYERS:
        torch.manual_seed(0)
        conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        q = zoo.quantize(nn.Sequential(conv), zoo.QuantConfig(weight=zoo.IRNet(1), act=zoo.IRNet(1)))
        x = torch.randn(batch, c, hw, hw)
        q.train()(x)
        packed = zoo.to_packed(q.eval())
        zoo.set_backend(packed, "cpu")
        w = conv.weight.detach().clone()

        def off(m=packed):
            os.environ["ZOO_CPU_KERNELS"] = "0"
            try:
                return m(x)
            finally:
                os.environ.pop("ZOO_CPU_KERNELS")

        # the same conv on signs already packed, as a binary network runs it: its fused blocks
        # (zoo/kernels/binary_block.py) pack each conv's output signs in the epilogue that writes it
        layer = packed[0]
        with torch.no_grad():
            packed(x)  # builds the layer's plan and packed weights
        pl = cached.plan(layer, c * 9, binary_ok=True)
        xbits = cpu_ops.pack_signs(x, pl.p.get("shift"))
        with torch.no_grad():
            assert torch.equal(cpu_ops.binary_conv2d(xbits, pl.bits, c, (1, 1), (1, 1), (1, 1), pl.scale, layer.bias),
                               packed(x))
        ms = interleaved({"fp32": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1),
                          "kernel": lambda: packed(x), "float32 path": off,
                          "packed signs": lambda: cpu_ops.binary_conv2d(xbits, pl.bits, c, (1, 1), (1, 1), (1, 1),
                                                                        pl.scale, layer.bias)}, reps, warmup)
        records.append(dict(layer=name, channels=c, size=hw, batch=batch, **{f"{k}_ms": v for k, v in ms.items()}))
        rows.append([name, f"{c}x{hw}x{hw}", batch, f"{ms['fp32']:.3f}",
                     f"{ms['kernel']:.3f} ({ms['kernel'] / ms['fp32']:.2f}x)",
                     f"{ms['packed signs']:.3f} ({ms['packed signs'] / ms['fp32']:.2f}x)",
                     f"{ms['float32 path']:.3f} ({ms['float32 path'] / ms['fp32']:.2f}x)"])
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    return rows, records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="*", default=None, choices=task_names(), help="default: every task")
    ap.add_argument("--batch", nargs="*", type=int, default=None, help="default: 1 and 32")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="one model per task, batch 1, one run; saves nothing")
    ap.add_argument("--layers", action="store_true", help="also time single W1A1 convs (the C++ kernel)")
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile'd FP32 and packed (cpu backend) models (compiling takes a while)")
    ap.add_argument("--models", nargs="*", default=None,
                    help="only models whose name contains one of these (a quick look; saves nothing)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    batches = [1] if args.smoke else (args.batch or [1, 32])
    reps, warmup = (1, 0) if args.smoke else (args.reps, args.warmup)
    rows, records, mem_rows = [], [], []
    from zoo.export import export_blocker, exportable

    for task in args.task or task_names():
        ort = have_onnxruntime() and exportable(task)
        if not get_task(task).predict_takes_images:  # generators are timed by their own benchmark
            continue
        names = zoo.list_models(task=task)
        floats = [n for n in names if n.split(".", 1)[1].startswith("fp32")]
        quantized = [(n, float_baseline(n, floats)) for n in names if n not in floats]
        quantized = [(n, f) for n, f in quantized if f is not None and not n.startswith("mmdet.")]
        if args.models:
            quantized = [(n, f) for n, f in quantized if any(m in n for m in args.models)]
        if args.smoke:
            quantized = quantized[:1]
        for name, fp in quantized:
            shape = tuple(read_golden(resolve_checkpoint(name))[0].shape[1:])
            models = {"fp32": zoo.load(fp)} | {b: zoo.load(name, backend=b) for b in BACKENDS}
            blocker = export_blocker(models["cpu"])
            if blocker:
                print(f"{name}: no onnxruntime columns: {blocker}", flush=True)
            if ort and not blocker:
                models |= {"ort FP32": zoo.load(fp, backend="onnxruntime"),
                           "ort int8": zoo.load(name, backend="onnxruntime")}
            if args.compile:
                torch._dynamo.reset()
                models |= {"FP32 compiled": torch.compile(zoo.load(fp)),
                           "cpu compiled": torch.compile(zoo.load(name, backend="cpu"))}
            for batch in batches:
                x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
                peaks = {k: peak_mib(lambda m=m: m(x)) for k, m in models.items()}  # first call at this size
                ms = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, reps, warmup)
                rec = dict(model=name, float=fp, batch=batch, **{f"{k}_ms": v for k, v in ms.items()},
                           **{f"{k}_peak_mib": v for k, v in peaks.items()}, cache_mib=cache_mib(models["cpu"]))
                records.append(rec)
                mem_rows.append([name, batch] + [f"{peaks[k]:.1f}" if peaks.get(k) is not None else "n/a"
                                                 for k in ("fp32",) + BACKENDS + ORT])
                rows.append([name, batch, f"{ms['fp32']:.2f}"]
                            + [f"{ms[b]:.2f} ({ms[b] / ms['fp32']:.2f}x)" if b in ms else "n/a"
                               for b in BACKENDS + ORT + (COMPILED if args.compile else ())]
                            + [f"{rec['cache_mib']:.2f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    desc = cpu_name()
    headers = ["model", "batch", "torch FP32 ms"] + [f"{b} ms (/FP32)" for b in BACKENDS + ORT] \
        + [f"{b} ms (/FP32)" for b in (COMPILED if args.compile else ())] + ["cache MiB"]
    cmd = "python benchmarks/cpu.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([f"# Shipped models on CPU — {desc}", "",
                      f"torch {torch.__version__}, `{cmd}`; medians of {reps} interleaved runs, "
                      "ratios to the float network from the same run (> 1: slower)", "",
                      markdown(headers, rows)])
    if any(v != "n/a" for r in mem_rows for v in r[2:]):
        text += "\n".join(["", "", "## Peak memory of one forward", "",
                           "MiB of resident memory the first call at this batch adds above the resident set "
                           "before it (models loaded; VmHWM after malloc_trim and a reset, Linux)", "",
                           markdown(["model", "batch", "torch FP32", *BACKENDS, *ORT], mem_rows)])
    if args.layers:
        lrows, lrecords = binary_layers(reps, warmup, args.smoke)
        records += lrecords
        if lrows:
            text += "\n".join(["", "", "## W1A1 convolutions (3x3, stride 1, padding 1)", "",
                               "The packed IR-Net layer through the C++ XOR-popcount kernel (its float input's "
                               "signs packed, then the conv), the same kernel on signs already packed (as inside "
                               "the fused binary blocks, where the previous conv's epilogue packs them), and the "
                               "cached float32 path (`ZOO_CPU_KERNELS=0`), against torch's float32 conv of the "
                               "same shape; medians, ratios to FP32 (< 1: faster)", "",
                               markdown(["layer", "C x H x W", "batch", "torch FP32 ms", "kernel ms (/FP32)",
                                         "on packed signs ms (/FP32)", "float32 path ms (/FP32)"], lrows)])
    print("\n" + text)
    stem = "_".join(["cpu", *(args.task or [])])  # one file per task selection: runs do not overwrite each other
    path = save(stem, desc, text, records, None if args.smoke or args.models else args.out)
    if path:
        print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
