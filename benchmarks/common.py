"""Shared helpers for the benchmark scripts: timing, device description, saving tables."""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def smoke_requested(argv=None) -> bool:
    """``--smoke`` runs every code path once on tiny shapes (CPU: Triton interpreted). It must be
    decided before Triton is imported, hence this check on the raw argv."""
    smoke = "--smoke" in (sys.argv if argv is None else argv)
    if smoke:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    return smoke


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    return "CPU (Triton interpreter; smoke run, not a measurement)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.split("(")[0].lower()).strip("-")


def median_ms(fn, device, warmup: int = 10, reps: int = 100) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events around each call on a GPU, after warm-up
    (which also absorbs Triton compilation and autotuning)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graph_ms(fn, device, warmup: int = 10, reps: int = 100) -> float | None:
    """Median time of one replay of ``fn`` captured in a CUDA graph (CUDA events around each replay):
    the GPU time of its kernels without Python's launch overhead. None off CUDA or if ``fn`` cannot
    be captured (the reason is printed)."""
    import torch

    if device.type != "cuda":
        return None
    for _ in range(warmup):  # compile, autotune and fill every cache before capturing
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # one more eager call on the capture stream (lazy per-stream state)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - any capture failure is reported, not fatal
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0]})")
        torch.cuda.synchronize(device)
        return None
    return median_ms(graph.replay, device, warmup, reps)


def markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def save(stem: str, device_desc: str, text: str, records: list, out_dir: Path | None) -> Path | None:
    """Write ``<stem>_<device>.md`` (and .json with the raw numbers) under ``out_dir``."""
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stem}_{slug(device_desc)}"
    tmp = base.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(base.with_suffix(".md"))
    base.with_suffix(".json").write_text(json.dumps(dict(device=device_desc, records=records), indent=1))
    return base.with_suffix(".md")
