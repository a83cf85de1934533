"""Mixed precision against uniform precision at the same size, after the same PTQ calibration.

    python benchmarks/mixed.py                       # default task, budget = uniform W3A4's size, seeds 0-2
    python benchmarks/mixed.py --budget w2a4 --bops  # also cap BOPs at the uniform configuration's
    python benchmarks/mixed.py abits_choices=[4,8]   # any python -m zoo.mixed override

1. ``python -m zoo.mixed`` (``zoo.mixed.cli.run``) once per sensitivity method (HTQ, HAWQ, and the
   measured single-layer loss change, ``direct``), each writing its bits file; their statistic's
   time, and the Spearman rank correlations between their per-layer sensitivities (per role and bit
   width), are printed.
2. ``python -m zoo.ptq`` (``zoo.ptq.cli.run``) for the uniform configuration and for each method's
   bits (``quant.overrides_from=``), once per seed (the seed picks the calibration images).
3. Saves benchmarks/results/mixed_<task>_<budget>.md and the HTQ front plot next to it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, markdown

METHODS = ("htq", "hawq", "direct")
PTQ_KEYS = ("task", "data", "init_from", "keep_bits", "estimator", "batch_size")  # overrides zoo.ptq shares


def _compose(name, overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return compose(name, overrides=overrides)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="w3a4", help="the uniform configuration whose size is the budget")
    ap.add_argument("--bops", action="store_true", help="cap BOPs at the uniform configuration's too")
    ap.add_argument("--size-measure", default="nominal", choices=["nominal", "packed"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--runs", default="runs/mixed_bench", help="where the runs go")
    args, overrides = ap.parse_known_args(argv)
    import torch

    import zoo
    from zoo.mixed.cli import UNIFORM, run as run_mixed
    from zoo.mixed.measure import spearman
    from zoo.ptq.cli import run as run_ptq
    from zoo.tasks import get_task

    m = UNIFORM.match(args.budget)
    if not m:
        ap.error(f"--budget={args.budget!r} is not valid; valid: w<W>a<A>, e.g. w3a4")
    w, a = int(m.group(1)), int(m.group(2))
    sens, bits_files, searches = {}, {}, []
    for method in args.methods:
        out = f"{args.runs}/{method}"
        cfg = _compose("mixed", [*overrides, f"method={method}", f"budget.size={args.budget}",
                                 f"size_measure={args.size_measure}", f"output_dir={out}",
                                 *([f"budget.bops={args.budget}"] if args.bops else [])])
        t = time.perf_counter()
        res = run_mixed(cfg, command=f"python benchmarks/mixed.py {' '.join(sys.argv[1:])} (method={method})")
        sens[method] = json.loads((Path(out) / "sensitivity.json").read_text())
        bits_files[method] = str(Path(out) / "bits.json")
        searches.append([method, f"{sens[method]['seconds']:.2f}", f"{sens[method]['prep_seconds']:.2f}",
                         sens[method]["iterations"] or "", f"{time.perf_counter() - t:.0f}",
                         " ".join(f"{x[0]}/{x[1]}" for x in res["bits"].values())])
    corr = []
    pairs = [(p, q) for i, p in enumerate(args.methods) for q in args.methods[i + 1:]]
    for p, q in pairs:
        for role in ("weight", "act"):
            layers = list(sens[p][role])
            for b in sorted({int(k) for k in sens[p][role][layers[0]]}):
                corr.append([f"{p} vs {q}", role, b, f"{spearman([sens[p][role][n][str(b)] for n in layers], [sens[q][role][n][str(b)] for n in layers]):.2f}"])
    configs = {f"uniform W{w}A{a}": [f"wbits={w}", f"abits={a}"]}
    configs.update({f"{method} mixed": [f"quant.overrides_from={f}"] for method, f in bits_files.items()})
    rows, results = [], {}
    for label, extra in configs.items():
        for seed in args.seeds:
            cfg = _compose("ptq", [*[o for o in overrides if o.split("=")[0].split(".")[0] in PTQ_KEYS],
                                   *extra, f"seed={seed}", f"output_dir={args.runs}/ptq_{label.replace(' ', '_')}_s{seed}"])
            metric = "test_" + get_task(cfg.task.name).monitor[0].split("/", 1)[1]
            out = run_ptq(cfg, command="python benchmarks/mixed.py " + " ".join(sys.argv[1:]))
            results.setdefault(label, []).append(out["metrics"][metric])
            if seed == args.seeds[0]:
                rel = zoo.load(out["release_dir"])
                c = zoo.cost(rel, (1, rel.input_contract["channels"], *rel.input_contract["size"]))
                results[label + " cost"] = (c.weight_bytes, c.nominal_bytes, c.bops)
            print(label, seed, out["metrics"][metric], flush=True)
    for label in configs:
        v = results[label]
        pb, nb, bo = results[label + " cost"]
        rows.append([label, f"{pb:,}", f"{nb:,}", f"{bo / 1e9:.3f}", len(v), f"{statistics.mean(v):.4f}",
                     f"{statistics.stdev(v):.4f}" if len(v) > 1 else "n/a", " ".join(f"{x:.4f}" for x in v)])
    title = (f"# Mixed precision at the size of uniform W{w}A{a} ({args.size_measure} size"
             f"{', BOPs capped too' if args.bops else ''}): `{cfg.init_from}`, PTQ ({cfg.estimator} ranges)")
    text = "\n".join([
        title, "", f"`python benchmarks/mixed.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)", "",
        "## Sensitivity and search (seconds: the method's statistic; the perturbations it shares with the others)", "",
        markdown(["method", "statistic s", "perturbations s", "Hutchinson iterations", "search s (all)",
                  "chosen W/A per searched layer"], searches), "",
        "## Spearman rank correlation of the per-layer sensitivities", "",
        markdown(["methods", "tensor", "bits", "Spearman"], corr), "",
        f"## PTQ on the test split ({metric}; seeds {args.seeds} pick the calibration images)", "",
        markdown(["configuration", "packed bytes (layers)", "nominal bytes", "GBOPs / image", "runs", "mean",
                  "sample std", "per seed"], rows)])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mixed_{cfg.task.name}_{args.budget}{'_bops' if args.bops else ''}.md"
    path.write_text(text + "\n")
    if "htq" in bits_files:
        shutil.copy(Path(bits_files["htq"]).with_name("front.png"), path.with_suffix(".png"))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
