"""``backend="auto"`` on CUDA: Triton or the reference per layer, from measured speed.

Rule, per packed conv/linear layer call on a CUDA tensor: take the benchmarked shape nearest to the
layer's GEMM (same layer kind and kernel class — the int8 kernel for 2–8-bit weights, the binary
kernel for W1A1 — nearest by |log M/M'| + |log N/N'| + |log K/K'|, with M = output pixels or rows,
N = output channels, K = reduction length). Run the reference math (cuDNN / cuBLAS on the integer
codes) if there Triton measured slower than ``MIN_RATIO`` x the fp16 layer *and* the reference
measured faster than Triton; otherwise run Triton. Without a table (or off CUDA) nothing changes.

The table (``auto_table.json`` beside this file) holds eager medians (each call launched from
Python, as layers run) from ``python benchmarks/kernels.py`` on the device it names; it is
rebuilt from a saved run with ``python benchmarks/kernels.py --write-policy <results .json>``.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

TABLE = Path(__file__).with_name("auto_table.json")
MIN_RATIO = 0.8  # Triton below 0.8x fp16 speed is a candidate for the fallback


@functools.lru_cache(maxsize=1)
def table() -> dict:
    if not TABLE.is_file():
        return {"device": None, "rows": []}
    return json.loads(TABLE.read_text())


def nearest(kind: str, kernel: str, m: int, n: int, k: int) -> dict | None:
    rows = [r for r in table()["rows"] if r["kind"] == kind and r["kernel"] == kernel]
    if not rows:
        return None

    def dist(r):
        return sum(abs(math.log(max(a, 1) / max(b, 1))) for a, b in ((m, r["m"]), (n, r["n"]), (k, r["k"])))

    return min(rows, key=dist)


@functools.lru_cache(maxsize=4096)
def prefer_triton(kind: str, kernel: str, m: int, n: int, k: int) -> bool:
    """``kind`` "conv" | "linear"; ``kernel`` "int8" | "binary"."""
    r = nearest(kind, kernel, m, n, k)
    if r is None:
        return True
    slow = r["fp16_us"] / r["triton_us"] < MIN_RATIO
    return not (slow and r["reference_us"] < r["triton_us"])


def rows_from_records(records: list[dict], device: str) -> dict:
    """The table from ``benchmarks/kernels.py`` records (its .json): W4A8 stands for the int8 kernel,
    W1A1 ``dot`` for the binary one, each with its reference timing."""
    rows = []
    for r in records:
        if r["kind"] == "conv":  # 3x3 convs, C_in = C_out
            m, n, k = r["batch"] * r["hw"] ** 2, r["c"], 9 * r["c"]
        else:  # square linear layers: "M=.. K×N"
            m = r["m"]
            n = k = r.get("n") or int(r["shape"].split()[1].split("×")[0])
        for kernel, ours, ref in (("int8", "W4A8", "W4A8 ref"), ("binary", "W1A1 dot", "W1A1 ref")):
            if r.get(ours + "_ms") and r.get(ref + "_ms"):
                rows.append(dict(kind=r["kind"], kernel=kernel, shape=r["shape"], m=m, n=n, k=k,
                                 triton_us=round(1e3 * r[ours + "_ms"], 1),
                                 reference_us=round(1e3 * r[ref + "_ms"], 1),
                                 fp16_us=round(1e3 * r["fp16_ms"], 1)))
    return {"device": device, "source": "python benchmarks/kernels.py (eager medians)", "rows": rows}
