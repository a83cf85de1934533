"""What a saliency release shows and does: card lines, the summary table, the predictor
(``python -m zoo.predict``: a mask and an overlay per image) and the test data the checkpoint
benchmark uses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ...cards import float_reference_bytes, made_by, low_bit_cell, seed_cell
from ...datasets import BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL, read_image, save_png

CARD_IMAGES = (("sample.jpg", "Fixed test images: image | ground truth | this model's saliency map:",
                 "image | ground truth | prediction"),
               ("real.jpg", "The `sal_real` photos (see `zoo/tasks/sal/real.py`): photo | mask | this model's "
                "saliency map:", "photo | mask | prediction"))


def extra_metrics(model) -> dict:
    """``sal_real``: MAE / max F / S-measure on the six opencv-doc photos (see :mod:`.real`); {} with
    a warning where opencv-doc is not installed."""
    import logging

    from .real import evaluate_real

    try:
        return evaluate_real(model)
    except FileNotFoundError as e:
        logging.getLogger(__name__).warning("sal_real not measured: %s", e)
        return {}


def real_line(m: dict) -> str | None:
    if m.get("real_mae") is None:
        return None
    return (f"- **Real photos** (`sal_real`: {m.get('real_images', 6)} opencv-doc photos of objects, masks by "
            f"GrabCut, see `zoo/tasks/sal/real.py`; at the model's size, resized back): "
            f"**MAE {m['real_mae']:.4f}, max F-measure {m['real_maxf']:.4f}, S-measure {m['real_smeasure']:.4f}**")


def domain(cfg: dict) -> str | None:
    data = made_by(cfg).get("data")
    size = cfg.get("input_contract", {}).get("train_size") or ["?", "?"]
    if data == "sal_composites":
        return (f"synthetic {size[0]}x{size[1]} composites: Fashion-MNIST silhouettes pasted over photo crops. "
                "On ordinary photos it is out of its domain and its masks are poor; resize inputs to its size "
                "(zoo.predict does).")
    if data == "sal_scenes":
        m = cfg.get("metrics", {})
        real = (f" On ordinary photos of objects (`sal_real`) its S-measure is {m['real_smeasure']:.2f} and its "
                f"MAE {m['real_mae']:.3f}." if m.get("real_smeasure") is not None else "")
        return (f"trained on one to three distinct objects (clip art, clothing) over photo or plain backgrounds at "
                f"{size[0]}x{size[1]}; inputs are resized to that size (zoo.predict does).{real}")
    return None


def card_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    size = cfg["input_contract"].get("train_size")
    data = train.get("data", "?")
    if data == "sal_composites":
        data = (f"sal_composites: 1-3 Fashion-MNIST items (exact masks) pasted over crops of bundled "
                f"photos, {size[0]}x{size[1]}; train: items 0-49,999 over {', '.join(BUILTIN_TRAIN)}; "
                f"validation: items 50,000-59,999 over {', '.join(BUILTIN_VAL)}; test: the Fashion-MNIST "
                f"test items over {', '.join(BUILTIN_TEST)} (no item or photo shared between splits)")
    elif data == "sal_scenes":
        data = (f"sal_scenes: 1-3 objects (openclipart-png clip art with true alpha, or tinted Fashion-MNIST "
                f"items) over crops of real photos or plain graded backgrounds, {size[0]}x{size[1]}, with "
                "scale, colour, blur, noise and shadow augmentation; splits disjoint by clip-art file "
                "(CRC-32 of its path), Fashion-MNIST item and photo (see `zoo/tasks/sal/scenes.py`)")
    lines = [f"- **Data:** {data}"]
    if m.get("test_mae") is not None:
        lines.append(f"- **Test** ({m.get('test_images', '?')} images; packed model as loaded by `zoo.load`): "
                     f"**MAE {m['test_mae']:.4f}, max F-measure {m['test_maxf']:.4f}, "
                     f"S-measure {m['test_smeasure']:.4f}** (training form: MAE "
                     f"{m.get('test_mae_training_form', float('nan')):.4f})")
    if real_line(m):
        lines.append(real_line(m))
    return lines


def card_usage(name: str) -> list[str]:
    return [f"or `python -m zoo.predict {name} photos/ --out masks/` (a mask and an overlay per image).", ""]


def summary_table(rows) -> str:
    fp = {c["arch"]: c["metrics"].get("test_mae") for _, c in rows if not c.get("quant")}
    seeds = any(c.get("seeds") for _, c in rows)
    real = any(c.get("metrics", {}).get("real_mae") is not None for _, c in rows)
    out = ["| model | MAE | vs FP32 (same arch) |" + (" MAE over seeds (n) |" if seeds else "")
           + " max F | S-measure |" + (" sal_real MAE | sal_real S |" if real else "")
           + " weights file bytes | vs FP32 file | low-bit layers vs FP32 |",
           "|---|---|---|" + ("---|" if seeds else "") + "---|---|" + ("---|---|" if real else "") + "---|---|---|"]
    for path, cfg in sorted(rows, key=lambda dc: (dc[1]["arch"], bool(dc[1].get("quant")), dc[0].name)):
        m = cfg.get("metrics", {})
        ref = fp.get(cfg["arch"])
        gap = f"{m['test_mae'] - ref:+.4f}" if cfg.get("quant") and ref is not None else "—"
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        lb = low_bit_cell(path)
        col = f" {seed_cell(cfg, 'test_mae', digits=4) or '—'} |" if seeds else ""
        rc = ""
        if real:
            rc = (f" {m['real_mae']:.4f} | {m['real_smeasure']:.4f} |" if m.get("real_mae") is not None
                  else " — | — |")
        out.append(f"| [{path.name}]({path}/README.md) | {m['test_mae']:.4f} | {gap} |{col} {m['test_maxf']:.4f} | "
                   f"{m['test_smeasure']:.4f} |{rc} {wb:,} | 1/{fb / wb:.1f} | {lb} |")
    return "\n".join(out)


def overlay(img: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 HxWx3 image with the region prob > threshold tinted red and its border drawn."""
    m = prob > threshold
    out = img.astype(np.float32)
    out[m] = 0.5 * out[m] + 0.5 * np.array([255.0, 0.0, 0.0])
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = (255.0, 255.0, 0.0)
    return out.round().astype(np.uint8)


def predict(model, images, out: Path, args) -> list[Path]:
    """``<stem>_mask.png`` (0-255 at the image's own size) and ``<stem>_overlay.png`` per image,
    computed at the model's training size and resized back, as SOD models are evaluated."""
    from .real import saliency_map

    written = []
    for path in tqdm(images, desc="saliency", unit="img"):
        img = read_image(path)
        prob = saliency_map(model, img)[0, 0].numpy()
        mask_path, over_path = out / f"{path.stem}_mask.png", out / f"{path.stem}_overlay.png"
        save_png((prob * 255).round().astype(np.uint8), mask_path)
        save_png(overlay(img, prob), over_path)
        written += [mask_path, over_path]
    return written


def benchmark_loader(model, data=None, limit=None):
    """The built-in test scenes (``sal_scenes``), or ``data``: a DUTS-style folder (its ``test/`` split if it has
    one, else every pair in it), resized to the model's training size."""
    from torch.utils.data import DataLoader, Subset

    from .data import PairSet, check_readable, pair_files
    from .scenes import SceneSalData

    size = model.input_contract["train_size"][0]
    if data is None:
        ds, desc = SceneSalData(size=size).split("test"), f"built-in test scenes ({size}x{size})"
    else:
        root = Path(data)
        folder = root / "test" if (root / "test").is_dir() else root
        pairs = pair_files(folder)
        check_readable(pairs)
        ds, desc = PairSet(pairs, size), f"{len(pairs)} image/mask pairs from {folder}, resized to {size}x{size}"
    if limit:
        ds = Subset(ds, range(min(limit, len(ds))))
    return DataLoader(ds, batch_size=16), desc
