"""What a diffusion release shows and does: card lines, the summary table, the sample grid, the
generator behind ``python -m zoo.predict <name> --num 64 --steps 50 --seed 0 --out DIR`` and the data
the checkpoint benchmark uses."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ...cards import float_reference_bytes, made_by, low_bit_cell
from ...datasets import save_png

CARD_IMAGES = (("sample.png", "64 DDIM samples (50 steps, seed 0) from the packed model:", "samples"),)


def grid(images: torch.Tensor, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """N x C x H x W in [0, 1] -> one uint8 image (rows of ``cols``, ``pad`` white pixels between)."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    arr = (images.clamp(0, 1) * 255).round().byte().cpu().numpy()
    for i in range(n):
        r, k = divmod(i, cols)
        tile = arr[i].transpose(1, 2, 0)
        out[r * (h + pad): r * (h + pad) + h, k * (w + pad): k * (w + pad) + w] = tile if c == 3 else tile[..., :1]
    return out


def sample_grid(model, path: Path, n: int = 64, steps: int = 50, seed: int = 0) -> Path:
    save_png(grid(model.generate(n, steps=steps, seed=seed, progress=False)), Path(path))
    return Path(path)


def domain(cfg: dict) -> str | None:
    if made_by(cfg).get("data") != "fmnist32":
        return None
    classes = cfg.get("input_contract", {}).get("classes") or []
    which = "all 10 classes" if len(classes) == 10 else ", ".join(classes)
    return (f"Fashion-MNIST-like 32x32 grayscale clothing items on black ({which}); it generates only "
            "images of that kind.")


def card_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    lines = [f"- **Data:** {train.get('data', '?')}"]
    if m.get("test_loss") is not None:
        lines.append(f"- **Test denoising loss** (eps-prediction MSE, fixed noise and timesteps, "
                     f"{m.get('test_images', '?')} test images; packed model as loaded by `zoo.load`): "
                     f"**{m['test_loss']:.5f}**")
    if m.get("test_fd") is not None:
        fd = cfg.get("input_contract", {}).get("fd", {})
        lines.append(f"- **Sample quality:** **FD {m['test_fd']:.3f}**, KID {m['test_kid']:.5f} ± {m['test_kid_std']:.5f} "
                     f"({m['test_fd_samples']:,} DDIM samples with {m['test_fd_steps']} steps, seed 0, against "
                     f"{m['test_fd_samples']:,} test images). FD here is a *classifier-feature* Fréchet "
                     f"distance, in the space of the input of `{fd.get('layer', 'fc')}` of `{fd.get('feature')}` "
                     f"(a classifier trained in this project on the same data), not ImageNet-Inception FID; "
                     f"compare it only with values measured the same way.")
    return lines


def card_snippet(name: str, cfg: dict) -> list[str]:
    c, (h, w) = cfg["input_contract"]["channels"], cfg["input_contract"]["size"]
    return [f'model = zoo.load("{name}")  # model(x_t, t) -> the predicted noise',
            f"images = model.generate(64, steps=50, seed=0)  # 64 x {c} x {h} x {w} in [0, 1] (DDIM; same seed, same images)"]


def card_usage(name: str) -> list[str]:
    return [f"or `python -m zoo.predict {name} --num 64 --steps 50 --seed 0 --out samples/` (a PNG grid "
            "and the single images).", ""]


def summary_table(rows) -> str:
    fp = next((c.get("metrics", {}).get("test_fd") for _, c in rows if c.get("quant") is None), None)
    out = ["| model | FD | FD − FD(FP32) | KID | test denoising loss | weights file bytes | vs FP32 file "
           "| low-bit layers vs FP32 |",
           "|---|---|---|---|---|---|---|---|"]
    for path, cfg in rows:
        m = cfg.get("metrics", {})
        fd = m.get("test_fd")
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        gap = f"{fd - fp:+.3f}" if fd is not None and fp is not None else "n/a"
        kid = m.get("test_kid")
        lb = low_bit_cell(path)
        out.append(f"| [{path.name}]({path}/README.md) | {'n/a' if fd is None else f'{fd:.3f}'} | {gap} | "
                   f"{'n/a' if kid is None else f'{kid:.5f}'} | "
                   f"{m.get('test_loss', float('nan')):.5f} | {wb:,} | 1/{fb / wb:.1f} | {lb} |")
    return "\n".join(out)


def predict_args(parser) -> None:
    parser.add_argument("--num", type=int, default=64, help="diffusion: images to generate")
    parser.add_argument("--steps", type=int, default=50, help="diffusion: denoising steps")
    parser.add_argument("--seed", type=int, default=0, help="diffusion: noise seed (same seed, same images)")
    parser.add_argument("--scheduler", default="ddim", help="diffusion: ddim | ddpm")


def predict(model, images, out: Path, args) -> list[Path]:
    """``samples.png`` (a grid) and ``sample_<i>.png`` for each of ``--num`` generated images."""
    x = model.generate(args.num, steps=args.steps, seed=args.seed, scheduler=args.scheduler)
    written = [out / "samples.png"]
    save_png(grid(x), written[0])
    for i, img in enumerate(x):
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        p = out / f"sample_{i:04d}.png"
        save_png(arr[..., 0] if arr.shape[-1] == 1 else arr, p)
        written.append(p)
    return written


def benchmark_loader(model, data=None, limit=None):
    """Fashion-MNIST's test split at 32 x 32 (``data``: another folder holding its idx files)."""
    from .data import FashionMNIST32Data

    dm = FashionMNIST32Data(batch_size=500, limit_test=limit, **({"root": data} if data else {}))
    dm.setup()
    return dm.test_dataloader(), f"Fashion-MNIST test split at 32x32 ({len(dm.test_set):,} images)"
