"""Time image generation of generative releases (tasks whose zoo.predict takes no images: diffusion):
``model.generate(num, steps)`` (DDIM), packed models against the float one, on this machine (CPU).

    python benchmarks/generate.py                                  # every shipped generative release
    python benchmarks/generate.py ddpm_unet.fp32_fmnist32 DIR ...  # chosen releases (names or dirs)
    python benchmarks/generate.py --num 64 --steps 50 --repeats 3  # the issue's setting (the default)
    python benchmarks/generate.py --smoke                          # tiny untrained models, 1 run

The models are timed interleaved (one generate() of each per round, ``--repeats`` rounds, after one
warm-up round), so a slow phase of a shared machine hits all of them; the table gives the median and
the minimum per model and each model's median over the float model's median (the float release in the
list; none: not given). Prints the table and saves it to benchmarks/results/generate_<device>.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from benchmarks.common import RESULTS, slug  # noqa: E402
from zoo.tasks import get_task, task_names  # noqa: E402
from zoo.train import hardware  # noqa: E402


def generative_tasks() -> list[str]:
    return [t for t in task_names() if not get_task(t).predict_takes_images]


def smoke_models() -> dict:
    """A tiny untrained float UNet and its EBB W1A4 packed copy (no release needed)."""
    from zoo.checkpoint import packed_copy
    from zoo.models.diffusion import DiffusionModel, KEEP_LAYERS
    from zoo.quantizers import EBB, LSQ, LayerQuant, MinMax, QuantConfig, quantize, set_progress
    from zoo.registry import create_model

    args = dict(in_chans=1, size=8, widths=(8, 16), norm_groups=4, timesteps=50)
    contract = {"channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.5]}
    torch.manual_seed(0)
    task = generative_tasks()[0]
    fp = DiffusionModel(create_model("ddpm_unet", **args), "ddpm_unet", args, task, contract).eval()
    q = DiffusionModel(create_model("ddpm_unet", **args), "ddpm_unet", args, task, contract)
    q.load_state_dict(fp.state_dict())
    keep = {g: LayerQuant(MinMax(8, "channel"), MinMax(8)) for g in KEEP_LAYERS}
    q.quant = QuantConfig(weight=EBB(), act=LSQ(4), overrides=keep)
    quantize(q.net, q.quant)
    q.train()(torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]))
    set_progress(q.net, 1.0)
    return {"tiny fp32": fp, "tiny EBB W1A4 (packed)": packed_copy(q)}


def time_generation(models: dict, num: int, steps: int, repeats: int) -> dict:
    times = {name: [] for name in models}
    for r in range(repeats + 1):  # round 0: warm-up, not counted
        for name, m in models.items():
            t0 = time.perf_counter()
            m.generate(num, steps=steps, seed=0, progress=False)
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def table(models: dict, times: dict, num: int, steps: int) -> str:
    fp = next((n for n, m in models.items() if getattr(m, "quant", None) is None), None)
    ref = statistics.median(times[fp]) if fp else None
    out = ["| model | weights | median s | min s | vs float (median) |", "|---|---|---|---|---|"]
    for name, m in models.items():
        med = statistics.median(times[name])
        kind = "float" if getattr(m, "quant", None) is None else "packed"
        out.append(f"| {name} | {kind} | {med:.2f} | {min(times[name]):.2f} | "
                   f"{'—' if ref is None else f'{med / ref:.2f}x'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", help="generative releases (names or dirs); default: all shipped")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny untrained models, one round")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.smoke:
        models, a.num, a.steps, a.repeats = smoke_models(), 4, 2, 1
    else:
        names = a.models or [n for t in generative_tasks() for n in zoo.list_models(task=t)]
        if not names:
            print("error: no generative release given or shipped", file=sys.stderr)
            return 2
        models = {str(n): zoo.load(n) for n in names}
    times = time_generation(models, a.num, a.steps, a.repeats)
    text = (f"Generating {a.num} images with {a.steps} DDIM steps (`model.generate`), {a.repeats} interleaved "
            f"rounds after a warm-up; {hardware()}, torch {torch.__version__}\n\n"
            + table(models, times, a.num, a.steps) + "\n")
    print(text)
    if a.smoke:
        print("(smoke run: tiny untrained models; nothing saved)")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"generate_{slug(hardware().split(',')[0])}.md"
    path.write_text(text)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
