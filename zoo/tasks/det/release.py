"""What a detection release shows and does: card lines, the summary table, the predictor
(``python -m zoo.predict``: the image with its labelled boxes per image, and ``detections.json`` in
COCO results format) and the test data the checkpoint benchmark uses."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...cards import float_reference_bytes, made_by, low_bit_cell, seed_cell
from ...datasets import BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL, read_image, save_png

CARD_IMAGES = (("sample.png", ("Fixed test images: ground-truth boxes (green) | this model's detections with "
                               "score >= 0.3 (class and score):"), "ground truth | detections"),)
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def domain(cfg: dict) -> str | None:
    data = made_by(cfg).get("data")
    size = cfg.get("input_contract", {}).get("size") or ["?", "?"]
    if data == "det_composites":
        return (f"synthetic {size[0]}x{size[1]} composites: 1-4 tinted Fashion-MNIST items (its 10 clothing "
                "classes) pasted over photo crops. On ordinary photos it is out of its domain and finds little; "
                "inputs are resized to its size and the boxes scaled back (zoo.predict does).")
    if data == "coco":
        classes = cfg.get("input_contract", {}).get("classes") or []
        return (f"the {len(classes)} classes of its COCO-format training folder at {size[0]}x{size[1]}; inputs are "
                "resized to that size and the boxes scaled back (zoo.predict does).")
    return None


def card_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    size = cfg["input_contract"].get("size") or ["?", "?"]
    data = train.get("data", "?")
    if data == "det_composites":
        data = (f"det_composites: 1-4 Fashion-MNIST items (exact boxes: the extents of their visible pixels) "
                f"pasted over crops of bundled photos, {size[0]}x{size[1]}; train: items 0-49,999 over "
                f"{', '.join(BUILTIN_TRAIN)}; validation: items 50,000-59,999 over {', '.join(BUILTIN_VAL)}; "
                f"test: the Fashion-MNIST test items over {', '.join(BUILTIN_TEST)} (no item or photo shared "
                f"between splits)")
    elif data == "coco":
        classes = cfg["input_contract"].get("classes") or []
        data = (f"coco: a COCO-format folder, {len(classes)} classes ({', '.join(classes[:10])}"
                f"{', ...' if len(classes) > 10 else ''}), images resized to {size[0]}x{size[1]}")
    lines = [f"- **Data:** {data}"]
    if m.get("test_map") is not None:
        tf = m.get("test_map_training_form")
        lines.append((f"- **Test** ({m.get('test_images', '?')} images; packed model as loaded by `zoo.load`; COCO "
                      f"box metrics): **mAP {m['test_map']:.4f}, mAP50 {m['test_map50']:.4f}, mAP75 "
                      f"{m['test_map75']:.4f}**") + (f" (training form: mAP {tf:.4f})" if tf is not None else ""))
    return lines


def card_usage(name: str) -> list[str]:
    return [(f"or `python -m zoo.predict {name} photos/ --out detections/` (labelled boxes drawn over each image, "
             "and `detections.json` in COCO results format)."), ""]


def _num(m: dict, key: str) -> str:
    return f"{m[key]:.4f}" if m.get(key) is not None else "n/a"


def summary_table(rows) -> str:
    # the float reference of an arch: its float release with the fewest model arguments (the default
    # architecture, not a variant such as the IR-Net-block float start of the binary bodies)
    fp = {}
    for d, c in sorted(((d, c) for d, c in rows if not c.get("quant")),
                       key=lambda dc: (len(dc[1].get("model_args") or {}), dc[0].name), reverse=True):
        fp[c["arch"]] = c["metrics"].get("test_map")
    seeds = any(c.get("seeds") for _, c in rows)
    out = ["| model | mAP | vs FP32 (same arch) |" + (" mAP over seeds (n) |" if seeds else "")
           + " mAP50 | mAP75 | weights file bytes | vs FP32 file | low-bit layers vs FP32 |",
           "|---|---|---|" + ("---|" if seeds else "") + "---|---|---|---|---|"]
    for path, cfg in sorted(rows, key=lambda dc: (dc[1]["arch"], bool(dc[1].get("quant")), dc[0].name)):
        m = cfg.get("metrics", {})
        mp = m.get("test_map")
        ref = fp.get(cfg["arch"])
        gap = f"{mp - ref:+.4f}" if cfg.get("quant") and ref is not None and mp is not None else "—"
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        lb = low_bit_cell(path)
        col = f" {seed_cell(cfg, 'test_map', digits=4) or '—'} |" if seeds else ""
        out.append(f"| [{path.name}]({path}/README.md) | {_num(m, 'test_map')} | {gap} |{col} "
                   f"{_num(m, 'test_map50')} | {_num(m, 'test_map75')} | {wb:,} | 1/{fb / wb:.1f} | {lb} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- drawing and zoo.predict
def label_text(label: int, score: float | None, classes) -> str:
    name = classes[label] if classes and 0 <= label < len(classes) else str(label)
    return name if score is None else f"{name} {score:.2f}"


def draw_boxes(img: np.ndarray, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None,
               classes, zoom: int = 1, colour=None) -> np.ndarray:
    """uint8 HxWx3 ``img`` (enlarged ``zoom`` times, nearest) with xyxy pixel ``boxes`` drawn and labelled
    "class score" (one colour per class, or ``colour``); returns a new array."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(img)
    if zoom != 1:
        im = im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    width = max(1, round(max(im.size) / 300))
    boxes, labels = boxes.detach().cpu().float() * zoom, labels.detach().cpu().tolist()
    scores = scores.detach().cpu().tolist() if scores is not None else [None] * len(labels)
    for box, label, score in zip(boxes.tolist(), labels, scores):
        c = colour or PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = box
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=c, width=width)
        text = label_text(label, score, classes)
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        ty = y1 - (b - t) - 2 if y1 - (b - t) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (r - l) + 2, ty + (b - t) + 2], fill=c)
        draw.text((x1 + 1 - l, ty + 1 - t), text, fill=(0, 0, 0), font=font)
    return np.asarray(im).copy()


def predict_args(parser) -> None:
    parser.add_argument("--min-score", type=float, default=0.3,
                        help="detection: draw boxes with at least this score (detections.json has them all)")


def image_id(path: Path, index: int) -> int:
    """COCO's image id for ``path``: the number its name is (COCO's 000000397133.jpg is 397133), else its
    1-based position among the inputs."""
    return int(path.stem) if path.stem.isdigit() else index + 1


@torch.no_grad()
def detect(model, img: np.ndarray, device="cpu") -> dict:
    """Detections for uint8 HxWx3 ``img`` in its own pixels: computed at the model's size, boxes scaled back."""
    h, w = img.shape[:2]
    size = model.input_contract["size"]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().div_(255.0)
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", antialias=True,
                                        align_corners=False).clamp_(0, 1)
    d = {k: v.cpu() for k, v in model(x.to(device))[0].items()}
    scale = torch.tensor([w / size[1], h / size[0]] * 2)
    d["boxes"] = d["boxes"] * scale
    return d


def predict(model, images, out: Path, args) -> list[Path]:
    """``<stem>_boxes.png`` per image (its boxes with score >= ``--min-score``, labelled "class score") and
    ``detections.json``: every detection in COCO results format (``image_id``, ``category_id``, ``bbox``
    [x, y, w, h] in the image's own pixels, ``score``, plus ``file_name``). Category ids are the
    training folder's COCO ids where the model records them (``category_ids``), else class indices."""
    ic = model.input_contract
    classes = ic.get("classes") or []
    cat_ids = ic.get("category_ids") or list(range(len(classes)))
    min_score = getattr(args, "min_score", 0.3)
    device = getattr(args, "device", "cpu")
    written, results = [], []
    for i, path in enumerate(tqdm(images, desc="detect", unit="img")):
        img = read_image(path)
        d = detect(model, img, device)
        iid = image_id(path, i)
        for box, score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": iid, "category_id": int(cat_ids[label]) if label < len(cat_ids) else label,
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(float(score), 5), "file_name": path.name})
        keep = d["scores"] >= min_score
        dst = out / f"{path.stem}_boxes.png"
        save_png(draw_boxes(img, d["boxes"][keep], d["labels"][keep], d["scores"][keep], classes), dst)
        written.append(dst)
    dst = out / "detections.json"
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text(json.dumps(results) + "\n")
    tmp.replace(dst)
    return written + [dst]


def benchmark_loader(model, data=None, limit=None):
    """The built-in test composites (``det_composites``), or ``data``: a COCO-format folder (its test
    split, else its val split), resized to the model's size; its classes must be the model's."""
    from torch.utils.data import DataLoader, Subset

    from .data import CocoDetData, CompositeDetData, collate

    size = model.input_contract["size"][0]
    if data is None:
        dm = CompositeDetData(size=size)
        ds, desc = dm.split("test"), f"built-in test composites ({size}x{size})"
    else:
        dm = CocoDetData(root=data, size=size)
        ds = dm.split("test")
        if dm.classes != list(model.input_contract.get("classes") or []):
            raise ValueError(f"{data}: its classes {dm.classes[:10]} are not the model's "
                             f"{(model.input_contract.get('classes') or [])[:10]}")
        desc = f"{len(ds)} images of the COCO folder {data}, resized to {size}x{size}"
    if limit:
        ds = Subset(ds, range(min(limit, len(ds))))
    return DataLoader(ds, batch_size=16, collate_fn=collate), desc
