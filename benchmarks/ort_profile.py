"""Where an exported model's time goes in onnxruntime: per operator type, from onnxruntime's own profiler.

    python benchmarks/ort_profile.py unet_r18.lsq_w2a2_sal_scenes --batch 8
    python benchmarks/ort_profile.py edsr.quantsr_w4a4_x2 --batch 8 --size 16 24

Exports the shipped model as ``zoo.load(name, backend="onnxruntime")`` does (into the cache), runs it
with the backend's session options plus profiling on random images of the model's golden-input size
(or ``--size H W``), and prints the milliseconds per forward spent in each operator type of
onnxruntime's optimized graph, then each convolution of that graph: ``QLinearConv`` (an integer kernel)
or a float ``Conv``/``FusedConv`` and whether its weight is a constant (prepacked) or computed on every
run. Prints only; nothing is saved (the profile's JSON goes to a temporary directory).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a shipped model, e.g. resnet20.lsq_w4a4_fmnist")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="input size (default: the golden input's)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort

    import zoo
    from zoo.cards import read_golden
    from zoo.registry import resolve_checkpoint

    size = tuple(args.size or read_golden(resolve_checkpoint(args.name))[0].shape[-2:])
    model = zoo.load(args.name, backend="onnxruntime")
    model._session(size)  # exports into the cache if needed
    path = model._path(size)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=["WeightBiasQuantization"])
        x = np.random.default_rng(0).random((args.batch, model.input_contract["channels"], *size), np.float32)
        warm = 3
        for _ in range(warm):
            s.run(None, {"images": x})
        t = time.perf_counter()
        for _ in range(args.reps):
            s.run(None, {"images": x})
        wall = (time.perf_counter() - t) / args.reps * 1e3
        events = json.loads(Path(s.end_profiling()).read_text())
        graph = onnx.load(str(Path(tmp) / "optimized.onnx")).graph
    runs = warm + args.reps
    per_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
            count[e["args"]["op_name"]] += 1
    print(f"{args.name}, batch {args.batch}, {size[0]}x{size[1]}: {wall:.2f} ms a forward (profiling on)")
    print(f"{'operator':24s} {'ms/forward':>10s} {'nodes':>6s}")
    for op, ms in per_op.most_common():
        print(f"{op:24s} {ms:10.2f} {count[op] // runs:6d}")
    init = {i.name for i in graph.initializer}
    made = {o: n.op_type for n in graph.node for o in n.output}
    print("\nconvolutions of the optimized graph:")
    for n in graph.node:
        if n.op_type == "QLinearConv":
            print(f"  QLinearConv   {n.name}")
        elif n.op_type in ("Conv", "FusedConv"):
            w = n.input[1]
            how = "constant weight" if w in init else f"weight computed by {made.get(w, '?')} every run"
            print(f"  {n.op_type:13s} {n.name}: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
