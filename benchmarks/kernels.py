"""Layer-level speed of the packed Triton kernels against cuDNN/cuBLAS fp16 (and torch._int_mm).

    python benchmarks/kernels.py            # needs a CUDA GPU; saves benchmarks/results/kernels_<gpu>.md
    python benchmarks/kernels.py --smoke    # every code path once on tiny shapes (CPU: interpreted)

Each of our timings is a whole packed layer as ``zoo`` runs it (fp16 input -> activation
quantization -> integer kernel -> fp16 output, backend="triton"); fp16 is F.conv2d / F.linear with
cudnn.benchmark on; int8 is torch._int_mm on int8 operands that are already quantized (a lower
bound on any int8 layer). Times are medians of CUDA-event timings after warm-up; "x" columns are
fp16 time / our time (above 1 = faster than fp16). Every timing is taken twice: "eager" (each call
launched from Python, as a plain ``layer(x)`` runs) and "graph" (the same call captured once in a
CUDA graph and replayed: the kernels' GPU time without Python's launch overhead, as a deployment
that captures graphs sees it). Weight bytes are what the layer keeps: packed
codes plus per-channel float32 scale and zero point.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import RESULTS, device_name, graph_ms, markdown, median_ms, save, smoke_requested

SMOKE = smoke_requested()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zoo.quantizers.packed import PackedConv2d, PackedLinear  # noqa: E402

CONV = [(56, 64), (28, 128), (14, 256), (7, 512)]  # ResNet-18 3x3 stride-1 convs: (H=W, C_in=C_out)
BATCHES = [1, 8, 64]
LINEAR_M = [1, 16, 256]
LINEAR_KN = 4096
OURS = [("W8A8", 8, "affine", None), ("W4A8", 4, "affine", None), ("W2A8", 2, "affine", None),
        ("W1A1 popcount", 1, "sign", "popcount"), ("W1A1 dot", 1, "sign", "dot")]
TARGETS = "targets (issue 3, H100/H200)"
# the same layers on backend="reference" (cuDNN/cuBLAS float math on the integer codes): what
# backend="auto" can fall back to per shape (zoo/kernels/auto_policy.py reads these rows)
REFERENCE = ["W8A8", "W4A8", "W1A1 dot"]


def _fill(layer, bits, act, binary_kernel, device):
    g = torch.Generator().manual_seed(0)
    layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=g, dtype=torch.uint8))
    layer.w_scale.fill_(0.01)
    layer.w_zero.fill_(0.5 if bits == 1 else 2 ** (bits - 1))
    layer.bias.normal_(generator=g)
    if act == "affine":  # signed 8-bit activation codes
        layer.a_scale.fill_(0.05), layer.a_offset.zero_(), layer.a_zero.zero_()
        layer.a_qmin.fill_(-128), layer.a_qmax.fill_(127)
    layer.backend = "triton"
    if binary_kernel:
        layer.binary_kernel = binary_kernel
    return layer.to(device)


def timed(rec, key, fn, device, warmup, reps, graph=True):
    """rec[key + "_ms"] (eager) and rec[key + "_graph_ms"] (CUDA-graph replay) of ``fn``."""
    with torch.no_grad():
        rec[key + "_ms"] = median_ms(fn, device, warmup, reps)
        rec[key + "_graph_ms"] = graph_ms(fn, device, warmup, reps) if graph else None


def check_exact(rec, layers, x):
    """Every kernel's output against the reference backend on the same input: rec["inexact"] lists
    the layers whose outputs are not bit-identical (the tests check this at small shapes; this checks
    the configurations the autotuner chose at the benchmarked ones)."""
    bad = []
    with torch.no_grad():
        for name, layer in layers.items():
            y = layer(x)
            layer.backend = "reference"
            if not torch.equal(y, layer(x)):
                bad.append(name)
            layer.backend = "triton"
    rec["inexact"] = bad


def tuned_choices() -> list[str]:
    """The autotuner's choice per kernel and shape key, as the runs above left them."""
    if SMOKE:
        return []
    from zoo.kernels import triton_binary, triton_lowbit

    out = []
    for name, fn in [("igemm", triton_lowbit._igemm_tuned)] + [(f"binary {k}", f) for k, f in
                                                                 triton_binary._tuned.items()]:
        for key, cfg in getattr(fn, "cache", {}).items():
            args = ", ".join(f"{n}={v}" for n, v in zip(fn.keys, key))
            out.append(f"- {name} ({args}): {cfg}")
    return out


def reference_rows(rec, layers, x, device, warmup, reps):
    for name in REFERENCE:
        layers[name].backend = "reference"
        # the reference reads scalars back to choose an exact dtype (a sync): not capturable
        timed(rec, name.split()[0] + " ref", lambda: layers[name](x), device, warmup, reps, graph=False)
        layers[name].backend = "triton"


def weight_bytes(layer) -> int:
    return layer.qweight.numel() + 8 * layer.w_scale.numel()


def conv_rows(device, batches, shapes, warmup, reps, part=(0, 1)):
    torch.backends.cudnn.benchmark = True
    rows = []
    for i, (hw, c) in enumerate(shapes):
        if i % part[1] != part[0]:
            continue
        w16 = torch.randn(c, c, 3, 3, device=device).half() * 0.05
        b16 = torch.randn(c, device=device).half()
        layers = {name: _fill(PackedConv2d((c, c, 3, 3), bits, act, True, padding=1), bits, act, bk, device)
                  for name, bits, act, bk in OURS}
        for b in batches:
            x = torch.randn(b, c, hw, hw, device=device).half()
            rec = dict(kind="conv", shape=f"{hw}²×{c} b{b}", hw=hw, c=c, batch=b, n=c, k=9 * c,
                       bytes=dict(fp16=w16.numel() * 2))
            timed(rec, "fp16", lambda: F.conv2d(x, w16, b16, padding=1), device, warmup, reps)
            for name, layer in layers.items():
                timed(rec, name, lambda: layer(x), device, warmup, reps)
                rec["bytes"][name.split()[0]] = weight_bytes(layer)
            reference_rows(rec, layers, x, device, warmup, reps)
            check_exact(rec, layers, x)
            rows.append(rec)
    return rows


def linear_rows(device, ms, kn, warmup, reps, part=(0, 1)):
    rows = []
    if part[0] != part[1] - 1:
        return rows
    w16 = torch.randn(kn, kn, device=device).half() * 0.02
    b16 = torch.randn(kn, device=device).half()
    w8 = torch.randint(-128, 128, (kn, kn), device=device, dtype=torch.int8)
    layers = {name: _fill(PackedLinear((kn, kn), bits, act, True), bits, act, bk, device)
              for name, bits, act, bk in OURS}
    for m in ms:
        x = torch.randn(m, kn, device=device).half()
        rec = dict(kind="linear", shape=f"M={m} {kn}×{kn}", m=m, batch=m, n=kn, k=kn,
                   bytes=dict(fp16=w16.numel() * 2))
        timed(rec, "fp16", lambda: F.linear(x, w16, b16), device, warmup, reps)
        if device.type == "cuda" and m > 16 and kn % 8 == 0:  # torch._int_mm's constraints
            a8 = torch.randint(-128, 128, (m, kn), device=device, dtype=torch.int8)
            timed(rec, "int8", lambda: torch._int_mm(a8, w8.t()), device, warmup, reps)
        for name, layer in layers.items():
            timed(rec, name, lambda: layer(x), device, warmup, reps)
            rec["bytes"][name.split()[0]] = weight_bytes(layer)
        reference_rows(rec, layers, x, device, warmup, reps)
        check_exact(rec, layers, x)
        rows.append(rec)
    return rows


def _cell(rec, key, mode):
    t, base = rec.get(f"{key}{mode}_ms"), rec.get(f"fp16{mode}_ms")
    if t is None or base is None:
        return "n/a"
    return f"{1e3 * t:.1f} ({base / t:.2f}×)"


def table(records, mode: str = "") -> str:
    """``mode`` "" (eager) or "_graph" (CUDA-graph replay)."""
    names = [n for n, *_ in OURS] + [n.split()[0] + " ref" for n in REFERENCE]
    headers = (["layer", "fp16 µs", "int8 _int_mm µs (×)"] + [f"{n} µs (× fp16)" for n in names]
               + ["weight bytes fp16 / W8 / W4 / W2 / W1", "not bit-exact vs reference"])
    rows = []
    for r in records:
        b = r["bytes"]
        base = r.get(f"fp16{mode}_ms")
        rows.append([r["shape"], "n/a" if base is None else f"{1e3 * base:.1f}", _cell(r, "int8", mode)]
                    + [_cell(r, n, mode) for n in names]
                    + [" / ".join(f"{b[k]:,}" for k in ("fp16", "W8A8", "W4A8", "W2A8", "W1A1")),
                       ", ".join(r.get("inexact", [])) or "none"])
    return markdown(headers, rows)


def targets(records, mode: str = "") -> list[str]:
    """The issue's targets evaluated on these numbers; a miss says by how much."""
    def ratio(r, name):
        t, base = r.get(f"{name}{mode}_ms"), r.get(f"fp16{mode}_ms")
        return base / t if t and base else float("nan")

    def verdict(label, got, need):
        ok = got >= need
        return f"- {label}: {got:.2f}× vs ≥ {need}× → {'met' if ok else f'MISSED by {need - got:.2f}×'}"

    out = []
    w4 = [r for r in records if r["kind"] == "conv" and r["hw"] in (14, 7) and r["batch"] in (1, 8)]
    for r in w4:
        out.append(verdict(f"W4A8 conv {r['shape']}", ratio(r, "W4A8"), 1.3))
    for r in records:
        if r["kind"] == "conv" and r["hw"] == 7 and r["batch"] == 1:
            best = max(("W1A1 popcount", "W1A1 dot"), key=lambda n: ratio(r, n))
            out.append(verdict(f"W1A1 conv {r['shape']} ({best.split()[1]})", ratio(r, best), 2.0))
        if r["kind"] == "linear" and r["m"] == 256:
            out.append(verdict(f"W8A8 linear {r['shape']}", ratio(r, "W8A8"), 1.5))
    from zoo.kernels.triton_layers import binary_impl

    worst = None
    for r in records:  # what backend="auto" runs on CUDA for these layers
        m = r["batch"] * r["hw"] ** 2 if r["kind"] == "conv" else r["m"]
        for name in ("W8A8", "W4A8", "W2A8", f"W1A1 {binary_impl('auto', m)}"):
            got = ratio(r, name)
            if worst is None or got < worst[0]:
                worst = (got, f"{name} {r['shape']}")
    if worst:
        out.append(verdict(f"slowest layer auto picks ({worst[1]})", worst[0], 0.8))
    return out


def write_policy(results: Path) -> int:
    import json

    from zoo.kernels import auto_policy

    saved = json.loads(results.read_text())
    tab = auto_policy.rows_from_records(saved["records"], saved["device"])
    tab["source"] += f", from {results.name}"
    auto_policy.TABLE.write_text(json.dumps(tab, indent=1) + "\n")
    auto_policy.table.cache_clear()
    auto_policy.prefer_triton.cache_clear()
    print(f"wrote {auto_policy.TABLE} ({len(tab['rows'])} rows, {tab['device']})")
    for r in tab["rows"]:
        pick = "triton" if auto_policy.prefer_triton(r["kind"], r["kernel"], r["m"], r["n"], r["k"]) else "reference"
        print(f"  {r['kind']:6} {r['kernel']:6} {r['shape']:16} triton {r['triton_us']:7.1f} µs  reference "
              f"{r['reference_us']:7.1f} µs  fp16 {r['fp16_us']:6.1f} µs  -> {pick}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one run each; saves nothing")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--write-policy", type=Path, metavar="RESULTS_JSON",
                    help="rebuild zoo/kernels/auto_table.json (backend='auto''s measured rule) from a saved "
                         "run's .json and exit")
    ap.add_argument("--part", default="0/1", help="i/n: only every n-th layer shape from the i-th, saving "
                    "nothing (run n parts in parallel first to compile every kernel variant at once)")
    args = ap.parse_args(argv)
    part = tuple(int(v) for v in args.part.split("/"))
    if args.write_policy:
        return write_policy(args.write_policy)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("benchmarks/kernels.py measures GPU kernels and needs a CUDA device "
              "(use --smoke to exercise the code paths on CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        records = conv_rows(device, [1], [(6, 32)], 0, 1) + linear_rows(device, [2], 64, 0, 1)
    else:
        records = (conv_rows(device, BATCHES, CONV, args.warmup, args.reps, part)
                   + linear_rows(device, LINEAR_M, LINEAR_KN, args.warmup, args.reps, part))
    desc = device_name(device)
    import triton

    parts = [f"# Packed-layer kernels vs fp16 — {desc}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, `python benchmarks/kernels.py"
             f"{' --smoke' if args.smoke else ''}`"]
    for mode, title in (("", "eager (launched from Python)"), ("_graph", "CUDA-graph replay (GPU time)")):
        parts += ["", f"## {title}", "", table(records, mode), "", f"### {TARGETS}, {title.split()[0]}", "",
                  *(["- not evaluated in a smoke run"] if args.smoke else targets(records, mode))]
    tuned = tuned_choices()
    if tuned:
        parts += ["", "## autotuner choices", "", *tuned]
    text = "\n".join(parts)
    print(text)
    path = save("kernels", desc, text, records, None if args.smoke or part != (0, 1) else args.out)
    if path:
        print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
