"""The BiMatting comparison over seeds: test MAD (and the other metrics) of each recipe's releases,
mean +- std over the seeds found, the share of the plain binary baseline's gap to FP32 that each
recipe closes, and whether SBB and SAB help on their own.

    python -m zoo.tasks.matting.ablation                        # checkpoints/matting (seed 0) + runs/matting/seed*/
    python -m zoo.tasks.matting.ablation --extra DIR [DIR ...]  # more release folders (any seed)

A release's recipe is its name (``<arch>.<tag>_<data>``); its seed is its ``train`` record's command
(``seed=<s>``, default 0). Prints the table and saves it to benchmarks/results/matting_ablation.md.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

ROOT = Path.cwd()  # run from the repository root (runs/ and benchmarks/results/ are there)
RESULTS = ROOT / "benchmarks" / "results"
FP32 = "rvm_small.fp32_matting_composites"
PLAIN = ("rvm_small.xnor_w1a1_matting_composites", "rvm_small.react_w1a1_matting_composites")
BIMATTING = "bimatting_small.react_w1a1_matting_composites"
SBB = "bimatting_small.sbb_react_w1a1_matting_composites"
SAB = "bimatting_small.sab_react_w1a1_matting_composites"
ORDER = (FP32, *PLAIN, SBB, SAB, BIMATTING)


def releases(folders) -> dict[str, dict[int, dict]]:
    """{recipe name: {seed: metrics}} of every release config found under ``folders``."""
    out: dict[str, dict[int, dict]] = {}
    for folder in folders:
        for cfg_path in sorted(Path(folder).glob("**/config.json")):
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("task") != "matting" or "train" not in cfg:
                continue
            cmd = cfg["train"].get("command", "")
            name = re.search(r"\bname=(\S+)", cmd)
            name = name.group(1) if name else cfg_path.parent.name
            if name == "release":  # runs/<...>/<name>/release
                name = cfg_path.parent.parent.name
            seed = re.search(r"\bseed=(\d+)", cmd)
            out.setdefault(name, {})[int(seed.group(1)) if seed else 0] = cfg["metrics"]
    return out


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def table(found: dict[str, dict[int, dict]]) -> str:
    def mad(name):
        return stats([m["test_mad"] for m in found[name].values()])[0] if name in found else None

    fp, plain = mad(FP32), min((mad(p) for p in PLAIN if p in found), default=None)
    lines = ["| recipe | seeds | MAD per seed | MAD mean ± std | gap to FP32 | share of plain gap closed "
             "| MSE mean | Grad mean | Conn mean | dtSSD mean |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER)):
        runs = found[name]
        mean, sd = stats([m["test_mad"] for m in runs.values()])
        gap = mean - fp if fp is not None else float("nan")
        closed = None
        if plain is not None and fp is not None and name not in (FP32, *PLAIN):
            closed = 1 - gap / (plain - fp)
        cell = lambda k: f"{stats([m[k] for m in runs.values()])[0]:.3f}"  # noqa: E731
        per = " / ".join(f"{runs[s]['test_mad']:.2f}" for s in sorted(runs))
        lines.append(f"| {name} | {','.join(map(str, sorted(runs)))} | "
                     f"{per} | {mean:.2f}{'' if sd != sd else f' ± {sd:.2f}'} | "
                     f"{gap:+.2f} | {'—' if closed is None else f'{closed:.0%}'} | {cell('test_mse')} | "
                     f"{cell('test_grad')} | {cell('test_conn')} | {cell('test_dtssd')} |")
    lines += ["", "MAD and MSE x1e3, Grad and Conn /1e3 (64x64 frames), dtSSD x1e2; packed models through "
              "`zoo.load` on the 128 built-in test clips (8 frames each). \"Plain gap\": the better plain binary "
              "baseline's (lower mean MAD) gap to FP32."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra", nargs="*", default=[], help="more folders holding matting releases")
    ap.add_argument("--out", type=Path, default=RESULTS / "matting_ablation.md")
    args = ap.parse_args(argv)
    from ...registry import checkpoint_root

    folders = [checkpoint_root() / "matting", *sorted((ROOT / "runs" / "matting").glob("seed*")), *args.extra]
    found = releases(f for f in folders if Path(f).is_dir())
    if not found:
        print("no matting releases found")
        return 1
    text = table(found)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# BiMatting ablation over seeds\n\n`python -m zoo.tasks.matting.ablation`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
