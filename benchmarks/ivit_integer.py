"""I-ViT integer-only inference (``zoo.quantizers.ivit_integer.IntegerViT``) against ``zoo.load``'s forward
of the same release (integer ops, float values between them) on the Fashion-MNIST test set: top-1 of
each, the share of identical predictions, the largest logit difference, and the time per batch.

    python benchmarks/ivit_integer.py                                   # vit_tiny_p4.ivit_w8a8_fmnist, 10,000 images
    python benchmarks/ivit_integer.py --limit 1000 --batch 250

Prints the table and saves it to benchmarks/results/ivit_integer_<device>.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from benchmarks.common import RESULTS, markdown, save  # noqa: E402
from zoo.datasets import load_fmnist  # noqa: E402
from zoo.quantizers.ivit_integer import IntegerViT  # noqa: E402
from zoo.train import hardware  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", default="vit_tiny_p4.ivit_w8a8_fmnist")
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default: all)")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    model = zoo.load(args.name)
    integer = IntegerViT(model)
    x, y = load_fmnist(split="test")
    x, y = x[:args.limit].float() / 255, y[:args.limit]  # [N, 1, 28, 28] in [0, 1]
    hits = {"zoo.load": 0, "integer-only": 0}
    same, diff, secs = 0, 0.0, {"zoo.load": 0.0, "integer-only": 0.0}
    with torch.no_grad():
        for i in range(0, len(y), args.batch):
            xb, yb = x[i:i + args.batch], y[i:i + args.batch]
            out = {}
            for key, net in (("zoo.load", model), ("integer-only", integer)):
                t = time.perf_counter()
                out[key] = net(xb)
                secs[key] += time.perf_counter() - t
                hits[key] += (out[key].argmax(-1) == yb).sum().item()
            same += (out["zoo.load"].argmax(-1) == out["integer-only"].argmax(-1)).sum().item()
            diff = max(diff, (out["zoo.load"] - out["integer-only"]).abs().max().item())
    n = len(y)
    rows = [[k, f"{100 * hits[k] / n:.2f}", f"{1e3 * secs[k] / -(-n // args.batch):.0f}"] for k in hits]
    cmd = "python benchmarks/ivit_integer.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    desc = hardware()
    text = "\n".join([f"# I-ViT integer-only inference — {args.name}", "", f"`{cmd}`; {n} Fashion-MNIST test images, "
                      f"batch {args.batch}, {desc}, torch {torch.__version__}", "",
                      markdown(["forward", "top-1 %", "ms per batch"], rows), "",
                      f"identical predictions: {100 * same / n:.2f} %; largest logit difference: {diff:.4f}"])
    print(text)
    path = save("ivit_integer", desc, text, [dict(name=args.name, images=n, same=same, max_logit_diff=diff,
                                                  **{f"{k}_correct": v for k, v in hits.items()})], args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
