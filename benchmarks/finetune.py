"""Fine-tune a shipped *quantized* release on a user-style data folder and measure its held-out split
before and after, the way a user would (``python -m zoo.train init_from=<release> data=<folder>``).

    python benchmarks/finetune.py --task sr                      # edsr.quantsr_w2a2_x4, opencv-doc photos
    python benchmarks/finetune.py --task sr --variant blur       # ... whose LR images are blurrier
    python benchmarks/finetune.py --task cls                     # resnet20.lsq_w2a2_fmnist on sklearn's digits

Each task's ``finetune_demo`` writes the folder (see its docstring: which files, which split, which
recipe). "Before" is the release through ``zoo.load`` on the folder's test split, through the task's
own DataModule and ``evaluate``; "after" is what the training command measured on the new release's
packed model on the same split. Prints the table and saves it to
benchmarks/results/finetune_<task>[_<variant>].md; the folder and the run go under --work.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import zoo
from zoo.tasks import get_task, task_names
from zoo.train import hardware


def main(argv=None):
    tasks = [t for t in task_names() if get_task(t).finetune_demo is not None]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=tasks)
    ap.add_argument("--variant", default=None, help="the task's data variant (default: its first)")
    ap.add_argument("--work", default="runs/finetune")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    task_cls = get_task(args.task)
    variant = args.variant or task_cls.finetune_variants[0]
    if variant not in task_cls.finetune_variants:
        ap.error(f"--variant {variant!r}: valid for {args.task}: {list(task_cls.finetune_variants)}")
    tag = args.task if variant == task_cls.finetune_variants[0] else f"{args.task}_{variant}"
    work = Path(args.work) / tag
    root = work / "data"
    demo = task_cls.finetune_demo(root, variant)

    dm = task_cls.datamodules[demo["data"]](root=str(root), batch_size=64, **demo["datamodule"])
    dm.setup("test")
    before = task_cls.evaluate(zoo.load(demo["release"]), dm.test_dataloader())

    out_dir = work / "run"
    cmd = [sys.executable, "-m", "zoo.train", f"task={args.task}", f"init_from={demo['release']}",
           f"data={demo['data']}", f"data.root={root}", *demo["overrides"], f"output_dir={out_dir}"]
    t = time.time()
    subprocess.run(cmd + ["+trainer.enable_progress_bar=false"], check=True)
    seconds = time.time() - t
    cfg = json.loads((out_dir / "release" / "config.json").read_text())
    after = {k[len("test_"):]: v for k, v in cfg["metrics"].items()
             if k.startswith("test_") and not k.endswith("_training_form")}
    keys = [k for k in before if isinstance(before[k], float)]
    lines = [f"Fine-tuning {demo['release']} on {root} ({tag}); {hardware()}, torch {torch.__version__}",
             f"- command: python -m zoo.train {' '.join(cmd[3:])}",
             f"- {cfg['train']['global_step']} steps, {seconds:.0f} s wall (train_seconds "
             f"{cfg['train'].get('train_seconds')}); one run", "",
             "| test split of the folder | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
             f"| {demo['release']} (before) | " + " | ".join(f"{before[k]:.4f}" for k in keys) + " |",
             "| fine-tuned release (after) | " + " | ".join(f"{after[k]:.4f}" for k in keys) + " |"]
    table = "\n".join(lines)
    print(table)
    path = Path(args.out or f"benchmarks/results/finetune_{tag}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")


if __name__ == "__main__":
    main()
