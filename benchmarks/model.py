"""End-to-end latency and peak GPU memory of the shipped checkpoints of a task (default: cls).

    python benchmarks/model.py              # needs a CUDA GPU; saves benchmarks/results/model_<gpu>.md
    python benchmarks/model.py --task sal   # another task's checkpoints (model_sal_<gpu>.md)
    python benchmarks/model.py --smoke      # every code path once, batch 1 (CPU: interpreted)

Each shipped model is loaded with ``zoo.load(name, backend=..., map_location="cuda")`` and timed on
random inputs of the shape of its golden input (median of CUDA-event timings after warm-up, batch 1
and 64).
"triton" runs the Triton kernels (what backend="auto" picks on CUDA; W1A1 models also with each
binary kernel forced); "reference" is the pure-torch integer path; the float checkpoint runs in
fp32 and in fp16 (the cuDNN baseline). Peak memory is torch.cuda.max_memory_allocated during one
forward, weights included. "graph" columns replay the forward captured in a CUDA graph (GPU time
without Python's launch overhead; n/a where the path cannot be captured).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import RESULTS, device_name, graph_ms, markdown, median_ms, save, smoke_requested

SMOKE = smoke_requested()

import torch  # noqa: E402

import zoo  # noqa: E402
from zoo.cards import read_golden  # noqa: E402
from zoo.registry import resolve_checkpoint  # noqa: E402
from zoo.tasks import task_names  # noqa: E402


def peak_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def measure(model, shape, batches, device, warmup, reps, dtype=torch.float32, graph=True):
    out = {}
    for b in batches:
        x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(b), dtype=dtype).to(device)
        with torch.no_grad():
            fn = lambda: model(x)  # noqa: E731
            out[b] = (median_ms(fn, device, warmup, reps), peak_mib(fn, device),
                      graph_ms(fn, device, warmup, reps) if graph else None)
    return out


def fp16_baseline(name, shape, batches, device, warmup, reps):
    """The float checkpoint in fp16 on cuDNN/cuBLAS: ``.half()``, or autocast where a module keeps a
    float32 tensor of its own (basicsr's SwinIR attention mask) that .half() leaves behind."""
    model = zoo.load(name, map_location=device).half()
    try:
        return "cuDNN", "fp16", measure(model, shape, batches, device, warmup, reps, torch.float16)
    except RuntimeError as e:
        if "scalar type" not in str(e) and "dtype" not in str(e):
            raise
    model = zoo.load(name, map_location=device)

    def run(x):
        with torch.autocast("cuda", dtype=torch.float16):
            return model(x)

    return "cuDNN (autocast)", "fp16", measure(run, shape, batches, device, warmup, reps, torch.float16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=task_names()[0], choices=task_names())
    ap.add_argument("--smoke", action="store_true", help="batch 1, one run each; saves nothing")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("benchmarks/model.py measures GPU latency and needs a CUDA device "
              "(use --smoke to exercise the code paths on CPU)", file=sys.stderr)
        return 2
    batches, warmup, reps = ([1], 0, 1) if args.smoke else ([1, 64], args.warmup, args.reps)
    names = zoo.list_models(task=args.task)
    if args.smoke:
        names = [n for n in names if "fp32" in n or "w4a4" in n or "irnet" in n]
    runs = []
    for name in names:
        nbytes = (resolve_checkpoint(name) / "model.safetensors").stat().st_size
        shape = tuple(read_golden(resolve_checkpoint(name))[0].shape[1:])
        if "fp32" in name:
            backends = [("auto", "auto")]
        elif "w1a1" in name:
            backends = [("triton", k) for k in ("auto", "popcount", "dot")] + [("reference", "auto")]
        else:
            backends = [("triton", "auto"), ("reference", "auto")]
        for backend, kernel in backends:
            model = zoo.load(name, backend=backend, binary_kernel=kernel, map_location=device)
            label = backend if kernel == "auto" else f"{backend} ({kernel})"
            # the reference path reads scalars back (a sync), which a CUDA graph cannot capture
            runs.append((name, label, "fp32", nbytes, measure(model, shape, batches, device, warmup, reps,
                                                              graph=backend != "reference")))
        if "fp32" in name and device.type == "cuda":
            label, dt, res = fp16_baseline(name, shape, batches, device, warmup, reps)
            runs.append((name, label, dt, nbytes, res))
    headers = ["model", "backend", "input"] + [f"b{b} ms" for b in batches] + \
        [f"b{b} graph ms" for b in batches] + [f"b{b} peak MiB" for b in batches] + ["weights file B"]
    rows, records = [], []
    na = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    for name, backend, dt, nbytes, res in runs:
        rows.append([name, backend, dt] + [f"{res[b][0]:.3f}" for b in batches]
                    + [na(res[b][2], ".3f") for b in batches]
                    + [na(res[b][1], ".1f") for b in batches] + [f"{nbytes:,}"])
        records.append(dict(model=name, backend=backend, input=dt, weights_bytes=nbytes,
                            **{f"b{b}_ms": res[b][0] for b in batches},
                            **{f"b{b}_graph_ms": res[b][2] for b in batches},
                            **{f"b{b}_peak_mib": res[b][1] for b in batches}))
    desc = device_name(device)
    text = "\n".join([f"# Shipped {args.task} models end to end — {desc}", "",
                      f"torch {torch.__version__}, `python benchmarks/model.py --task {args.task}"
                      f"{' --smoke' if args.smoke else ''}`", "", markdown(headers, rows)])
    print(text)
    stem = "model" if args.task == task_names()[0] else f"model_{args.task}"
    path = save(stem, desc, text, records, None if args.smoke else args.out)
    if path:
        print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
