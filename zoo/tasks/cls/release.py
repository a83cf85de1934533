"""What a classification release shows and does: card lines, the summary table, the predictor
(``python -m zoo.predict``: top-5 classes per image) and the test data the checkpoint benchmark uses."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...cards import float_reference_bytes, made_by, seed_cell
from ...datasets import read_image


def domain(cfg: dict) -> str | None:
    if made_by(cfg).get("data") != "fmnist":
        return None
    return ("Fashion-MNIST only: 28x28 grayscale photos of single clothing items on black (10 classes). "
            "Any other image is out of its domain: it still answers one of these 10 classes (a photo "
            "of a scene often comes out as 'Bag'), so its answer means nothing there.")


def card_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    data = train.get("data", "?")
    if data == "fmnist" and not train.get("splits"):  # releases from before the splits were recorded
        data += (f" (train 55,000 / validation 5,000 held out of the train split; test: the "
                 f"{m.get('test_images', '?')}-image test split)")
    lines = [f"- **Data:** {data}"]
    if m.get("test_acc") is not None:
        tf = m.get("test_acc_training_form")
        lines.append(f"- **Test top-1 (packed model, as loaded by `zoo.load`):** {100 * m['test_acc']:.2f}%"
                     + (f" (training form: {100 * tf:.2f}%)" if tf is not None else ""))
    return lines


def card_usage(name: str) -> list[str]:
    return [f"or `python -m zoo.predict {name} images/ --out predictions/` (top-5 classes per image).", ""]


def summary_table(rows) -> str:
    fps = {c.get("arch"): c.get("metrics", {}).get("test_acc") for _, c in rows if c.get("quant") is None}
    seeds = any(c.get("seeds") for _, c in rows)
    out = ["| model | test top-1 % | vs FP32 (points) |" + (" top-1 % over seeds (n) |" if seeds else "")
           + " weights file bytes | vs FP32 file |",
           "|---|---|---|" + ("---|" if seeds else "") + "---|---|"]
    for path, cfg in rows:
        acc, fp = cfg.get("metrics", {}).get("test_acc"), fps.get(cfg.get("arch"))  # vs the same net's FP32
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        gap = f"{100 * (acc - fp):+.2f}" if fp is not None and acc is not None else "n/a"
        top1 = f"{100 * acc:.2f}" if acc is not None else "n/a"
        col = f" {seed_cell(cfg, 'test_acc', scale=100) or '—'} |" if seeds else ""
        out.append(f"| [{path.name}]({path}/README.md) | {top1} | {gap} |{col} {wb:,} | 1/{fb / wb:.1f} |")
    return "\n".join(out)


def predict(model, images, out: Path, args) -> list[Path]:
    """``predictions.csv``: the top-5 classes and probabilities of each image (resized to the
    model's input size, converted to its channel count)."""
    ic = model.input_contract
    mode = "L" if ic["channels"] == 1 else "RGB"
    classes = ic.get("classes") or []
    rows = []
    for path in tqdm(images, desc="classify", unit="img"):
        arr = read_image(path, mode)
        x = torch.from_numpy(arr.copy()).float().div_(255.0)
        x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
        if ic.get("size"):
            x = torch.nn.functional.interpolate(x, size=tuple(ic["size"]), mode="bilinear",
                                                antialias=True, align_corners=False)
        with torch.no_grad():
            p = model(x.to(args.device)).softmax(-1)[0].cpu()
        top = p.topk(min(5, len(p)))
        rows.append([str(path)] + [f"{classes[i] if i < len(classes) else i}:{v:.4f}"
                                   for v, i in zip(top.values.tolist(), top.indices.tolist())])
    dst = out / "predictions.csv"
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([["image"] + [f"top{i + 1}" for i in range(len(rows[0]) - 1)]] + rows)
    tmp.replace(dst)
    return [dst]


def benchmark_loader(model, data=None, limit=None):
    """Fashion-MNIST's test split (``data``: another folder holding its idx files)."""
    from .data import FashionMNISTData

    dm = FashionMNISTData(batch_size=500, limit_test=limit, **({"root": data} if data else {}))
    dm.setup()
    return dm.test_dataloader(), f"Fashion-MNIST test split ({len(dm.test_set):,} images)"


FINETUNE_VARIANTS = ("digits",)


def finetune_demo(root: Path, variant: str) -> dict:
    """scikit-learn's 1,797 8x8 handwritten digits as a 1-channel ImageFolder of 28x28 PNGs (train
    1,200 / val 200 / test 397, split by image with seed 0). Fine-tunes ``resnet20.lsq_w2a2_fmnist``
    for 200 steps (20 epochs of 10 batches)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    for split, idx in {"train": order[:1200], "val": order[1200:1400], "test": order[1400:]}.items():
        for i in idx:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = (d.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(img).resize((28, 28), Image.BICUBIC).save(folder / f"{i}.png")
    return {"release": "resnet20.lsq_w2a2_fmnist", "data": "folder",
            "datamodule": {"channels": 1, "size": (28, 28)},
            "overrides": ["epochs=20", "data.channels=1", "data.size=[28,28]", "data.augment=false"]}
