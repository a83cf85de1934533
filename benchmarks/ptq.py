"""Post-training quantization of a float release with several calibration sources and seeds.

    python benchmarks/ptq.py                                   # default task, W4A4, real/zeroq/dsg x seeds 0-2
    python benchmarks/ptq.py bits=8 --calib real --seeds 0     # any python -m zoo.ptq override
    python benchmarks/ptq.py task=vit bits=4 --calib real --methods base log2 repq apq   # ViT methods

Each (calibration, seed) is one ``python -m zoo.ptq`` run (``zoo.ptq.cli.run``; releases under
``--runs``, default runs/ptq_bench/); the seed picks the real calibration images or seeds the synthesis. Prints and saves
(benchmarks/results/ptq_<task>.md) the test metric per run, mean ± sample std per calibration, and
the time to make the calibration data and the whole calibration.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, markdown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", nargs="+", default=["real", "zeroq", "dsg"])
    ap.add_argument("--methods", nargs="+", default=["base"], help="zoo.ptq algo= (base, log2, repq, apq)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--runs", default="runs/ptq_bench", help="where the runs' releases go")
    ap.add_argument("--tag", default="", help="appended to the results file's name (e.g. for an ablation)")
    args, overrides = ap.parse_known_args(argv)
    bad = [c for c in args.calib if c not in ("real", "zeroq", "dsg", "ddaq", "coleq", "psaq")]
    if bad:  # e.g. an override after --calib, which nargs="+" swallows
        ap.error(f"--calib {bad} is not valid; valid: real, zeroq, dsg, ddaq, coleq, psaq (put key=value overrides "
                 f"before --calib)")
    bad = [m for m in args.methods if m not in ("base", "log2", "repq", "apq")]
    if bad:
        ap.error(f"--methods {bad} is not valid; valid: base, log2, repq, apq (put key=value overrides first)")
    from hydra import compose, initialize_config_module

    from zoo.ptq.cli import run
    from zoo.tasks import get_task

    rows, results = [], {}
    for method in args.methods:
        for calib in args.calib:
            key = calib if args.methods == ["base"] else f"{method} / {calib}"
            for seed in args.seeds:
                sub = calib if args.methods == ["base"] else f"{method}_{calib}"
                with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
                    cfg = compose("ptq", overrides=[*overrides, f"calib={calib}", f"algo={method}", f"seed={seed}",
                                                    f"output_dir={args.runs}/{sub}_s{seed}"])
                metric = "test_" + get_task(cfg.task.name).monitor[0].split("/", 1)[1]
                t = time.perf_counter()
                out = run(cfg, command="python benchmarks/ptq.py " + " ".join(sys.argv[1:]))
                value = out["metrics"][metric]
                results.setdefault(key, []).append(value)
                rows.append([key, seed, f"{value:.4f}", out["seconds"], f"{time.perf_counter() - t:.0f}"])
                print(rows[-1], flush=True)
                _save(args, cfg, metric, rows, results)  # after every run: an interrupted run leaves its table
    path = _save(args, cfg, metric, rows, results, final=True)
    print(f"saved {path}")
    return 0


def _save(args, cfg, metric, rows, results, final: bool = False) -> Path:
    """Write (and, at the end, print) the table of the runs so far."""
    summary = [[c, len(v), f"{statistics.mean(v):.4f}", f"{statistics.stdev(v):.4f}" if len(v) > 1 else "n/a"]
               for c, v in results.items()]
    what = "calibration" if args.methods == ["base"] else "method / calibration"
    text = "\n".join([f"# PTQ of `{cfg.init_from}` ({cfg.task.name}, W{cfg.wbits}A{cfg.abits}, estimator "
                      f"{cfg.estimator}, weight rounding {cfg.rounding}"
                      f"{f', then {cfg.distill.steps} distillation steps' if cfg.distill.steps else ''})", "", f"`python benchmarks/ptq.py {' '.join(sys.argv[1:])}`", "",
                      markdown([what, "seed", metric, "calibration s (data + ranges)", "run s (+ test)"], rows),
                      "", markdown([what, "runs", f"{metric} mean", "sample std"], summary)])
    if final:
        print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = "" if args.calib == ["real", "zeroq", "dsg"] else "_" + "_".join(args.calib)
    methods = "" if args.methods == ["base"] else "_" + "_".join(args.methods)
    arch = "" if cfg.arch.startswith("resnet") else f"_{cfg.arch}"  # the cls files before the ViTs: resnet20
    path = args.out / (f"ptq_{cfg.task.name}{arch}_w{cfg.wbits}a{cfg.abits}{'_learned' if cfg.rounding == 'learned' else ''}"
                       f"{'_distill' if cfg.distill.steps else ''}{sources}{methods}{'_' + args.tag if args.tag else ''}.md")
    path.write_text(text + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
