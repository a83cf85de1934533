"""Where one packed layer's time goes on a GPU: kernel time per launch vs. the wall time of a call.

    python benchmarks/profile_layer.py                       # the issue's target shapes
    python benchmarks/profile_layer.py --layer conv --hw 7 --c 512 --batch 1 --name W4A8

For each layer it runs ``reps`` back-to-back calls under ``torch.profiler`` and prints the GPU kernels
with their mean time per call, next to the wall time per call measured without the profiler (host
clock around ``reps`` calls, synchronised once). Wall time far above the kernels' sum means the call
is bound by Python/launch overhead, not by the kernels. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kernels import OURS, _fill
from zoo.quantizers.packed import PackedConv2d, PackedLinear

DEFAULT = [("conv", 14, 256, 1, "W4A8"), ("conv", 7, 512, 1, "W4A8"), ("conv", 14, 256, 8, "W4A8"),
           ("conv", 7, 512, 1, "W1A1 popcount"), ("conv", 7, 512, 1, "W1A1 dot"),
           ("linear", 0, 4096, 256, "W8A8")]


def build(kind, hw, c, batch, name, device):
    bits, act, bk = {n: (b, a, k) for n, b, a, k in OURS}[name]
    if kind == "conv":
        layer = _fill(PackedConv2d((c, c, 3, 3), bits, act, True, padding=1), bits, act, bk, device)
        w16 = torch.randn(c, c, 3, 3, device=device).half()
        x = torch.randn(batch, c, hw, hw, device=device).half()
        return (lambda: layer(x)), (lambda: F.conv2d(x, w16, None, padding=1))
    layer = _fill(PackedLinear((c, c), bits, act, True), bits, act, bk, device)
    w16 = torch.randn(c, c, device=device).half()
    x = torch.randn(batch, c, device=device).half()
    return (lambda: layer(x)), (lambda: F.linear(x, w16))


def wall_us(fn, reps):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def kernels_us(fn, reps):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key[:70], e.count / reps, t / reps))
    return sorted(rows, key=lambda r: -r[2])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", choices=["conv", "linear"])
    ap.add_argument("--hw", type=int, default=7)
    ap.add_argument("--c", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--name", default="W4A8", choices=[n for n, *_ in OURS])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/profile_layer.py needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    cases = [(args.layer, args.hw, args.c, args.batch, args.name)] if args.layer else DEFAULT
    for case in cases:
        ours, fp16 = build(*case, device)
        with torch.no_grad():
            for fn in (ours, fp16):
                for _ in range(20):  # compile, autotune, cudnn.benchmark
                    fn()
            print(f"\n== {case[0]} {case[4]} hw={case[1]} c={case[2]} batch={case[3]}")
            for label, fn in (("ours", ours), ("fp16", fp16)):
                ks = kernels_us(fn, args.reps)
                print(f"  {label}: wall {wall_us(fn, args.reps):.1f} µs/call, kernels "
                      f"{sum(k[2] for k in ks):.1f} µs/call")
                for key, count, us in ks:
                    print(f"    {us:8.1f} µs  x{count:.0f}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
