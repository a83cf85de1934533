"""What a super-resolution release shows and does: card lines, the summary table, the predictor
(``python -m zoo.predict``: upscaled PNGs, computed in overlapping tiles) and the test data the
checkpoint benchmark uses."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...cards import float_reference_bytes, made_by, seed_cell
from ...datasets import BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL, read_image, save_png, to_tensor, to_uint8


def domain(cfg: dict) -> str | None:
    if made_by(cfg).get("data") != "sr_images":
        return None
    return ("natural photos whose low-resolution version is a clean MATLAB-style bicubic downscale; "
            "noise, JPEG artefacts or blur in the input are outside what it learned (it sharpens them).")


def card_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    s = cfg["input_contract"].get("scale", "?")
    data = train.get("data", "?")
    if data == "sr_images":
        data = (f"sr_images: photos bundled with scikit-image/scikit-learn, LR by MATLAB-style bicubic "
                f"x1/{s}; train {', '.join(BUILTIN_TRAIN)}; validation {', '.join(BUILTIN_VAL)}; "
                f"test {', '.join(BUILTIN_TEST)} (never trained or validated on)")
    lines = [f"- **Scale:** x{s}", f"- **Data:** {data}"]
    if m.get("test_psnr") is not None:
        lines.append(
            f"- **Test PSNR / SSIM** (Y channel, border {s} cropped, mean over {m.get('test_images', '?')} "
            f"images; packed model as loaded by `zoo.load`): **{m['test_psnr']:.2f} dB / "
            f"{m['test_ssim']:.4f}**; bicubic on the same images: {m['test_bicubic_psnr']:.2f} dB / "
            f"{m['test_bicubic_ssim']:.4f} (model {m['test_psnr'] - m['test_bicubic_psnr']:+.2f} dB)")
        depths = sorted((k for k in m if k.startswith("test_psnr_depth")),
                        key=lambda k: -int(k.rsplit("depth", 1)[1]))
        if depths:
            lines.append("- **DQA, fewer quantized blocks at inference** (`zoo.load(..., depth=d)`): "
                         + "; ".join(f"depth {k.rsplit('depth', 1)[1]}: {m[k]:.2f} dB" for k in depths))
    return lines


def card_usage(name: str) -> list[str]:
    return [f"or `python -m zoo.predict {name} photo.png --out upscaled/`.", ""]


CARD_IMAGES = (("sample.png", "Centre crop of the first test image: bicubic | this model | ground truth:",
                "bicubic | model | HR"),)


def summary_table(rows) -> str:
    fp = {(c["arch"], c["input_contract"]["scale"]): c["metrics"].get("test_psnr")
          for _, c in rows if not c.get("quant")}
    seeds = any(c.get("seeds") for _, c in rows)
    out = ["| model | scale | PSNR dB | vs FP32 (same arch) dB | vs bicubic dB |"
           + (" PSNR over seeds (n) |" if seeds else "") + " SSIM | weights file bytes | vs FP32 file |",
           "|---|---|---|---|---|" + ("---|" if seeds else "") + "---|---|---|"]

    def key(dc):
        return -dc[1]["input_contract"]["scale"], dc[1]["arch"], bool(dc[1].get("quant")), dc[0].name

    for path, cfg in sorted(rows, key=key):
        m, s = cfg.get("metrics", {}), cfg["input_contract"]["scale"]
        psnr, ref = m.get("test_psnr"), fp.get((cfg["arch"], s))
        gap = f"{psnr - ref:+.2f}" if psnr is not None and ref is not None else "n/a"
        bic = f"{psnr - m['test_bicubic_psnr']:+.2f}" if psnr is not None else "n/a"
        col = f" {seed_cell(cfg, 'test_psnr', digits=3) or '—'} |" if seeds else ""
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        out.append(f"| [{path.name}]({path}/README.md) | x{s} | {psnr:.2f} | {gap} | {bic} |{col} "
                   f"{m.get('test_ssim', float('nan')):.4f} | {wb:,} | 1/{fb / wb:.1f} |")
    return "\n".join(out)


@torch.no_grad()
def upscale_tiled(model, lr: torch.Tensor, scale: int, tile: int = 128, overlap: int = 16) -> torch.Tensor:
    """SR of one LR image [3, H, W] in [0, 1], computed in ``tile`` x ``tile`` LR tiles that see
    ``overlap`` extra pixels on each side (enough for the network's receptive field, so the seams
    match the whole-image result); only each tile's own region is kept."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
    _, h, w = lr.shape
    out = torch.empty(3, h * scale, w * scale, dtype=lr.dtype, device=lr.device)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(y - overlap, 0), max(x - overlap, 0)
            y1, x1 = min(y + tile + overlap, h), min(x + tile + overlap, w)
            sr = model(lr[None, :, y0:y1, x0:x1])[0]
            ty, tx = min(tile, h - y), min(tile, w - x)
            oy, ox = (y - y0) * scale, (x - x0) * scale
            out[:, y * scale:(y + ty) * scale, x * scale:(x + tx) * scale] = \
                sr[:, oy:oy + ty * scale, ox:ox + tx * scale]
    return out


def predict_args(parser) -> None:
    parser.add_argument("--depth", type=int, default=None,
                        help="DQA models: number of quantized residual blocks to run (default: all)")
    parser.add_argument("--tile", type=int, default=128, help="LR tile size (bounds memory)")
    parser.add_argument("--overlap", type=int, default=16, help="LR pixels of context around each tile")


def predict(model, images, out: Path, args) -> list[Path]:
    """``<stem>_x<scale>.png`` for every image."""
    from ...models.sr import set_depth

    if args.depth is not None:
        set_depth(model, args.depth)
    scale = model.input_contract["scale"]
    written = []
    for path in tqdm(images, desc=f"x{scale}", unit="img"):
        lr = to_tensor(read_image(path)).to(args.device)
        sr = upscale_tiled(model, lr, scale, args.tile, args.overlap)
        dst = out / f"{path.stem}_x{scale}.png"
        save_png(to_uint8(sr), dst)
        written.append(dst)
    return written


def benchmark_loader(model, data=None, limit=None):
    """The built-in test photos, or ``data``: a folder of HR images (LR by bicubic downsampling)."""
    from torch.utils.data import DataLoader

    from ...datasets import list_images
    from .data import BuiltinSRData, ImagePairs, make_pair

    scale = model.input_contract["scale"]
    if data is None:
        ds = BuiltinSRData(scale=scale).split("test")
        desc = "built-in test images: " + ", ".join(ds.names)
    else:
        files = list_images(data)[:limit]
        ds = ImagePairs([make_pair(read_image(f), scale) for f in files], [f.name for f in files])
        desc = f"{len(files)} images from {data}"
    return DataLoader(ds, batch_size=1), f"x{scale}: {desc}"


OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
FINETUNE_SPLITS = {  # opencv-doc's sample photos (none is in the built-in SR data), split by file
    "train": ["aero1.jpg", "aero3.jpg", "baboon.jpg", "building.jpg", "butterfly.jpg", "fruits.jpg",
              "home.jpg", "leuvenA.jpg", "messi5.jpg", "stuff.jpg", "board.jpg", "HappyFish.jpg",
              "graf1.png", "starry_night.jpg", "blox.jpg"],
    "val": ["smarties.png", "basketball1.png"],
    "test": ["aloeL.jpg", "apple.jpg", "orange.jpg", "squirrel_cls.jpg", "pic1.png", "rubberwhale1.png"],
}
FINETUNE_VARIANTS = ("bicubic", "blur")


def finetune_demo(root: Path, variant: str, scale: int = 4) -> dict:
    """A user SR folder of opencv-doc photos (train / val / test by file). ``bicubic``: the LR images
    are made as the shipped model's were (MATLAB-style bicubic, by the DataModule); ``blur``: paired
    ``<split>_lr`` images from a softer lens, a Gaussian blur (radius 1.5 px) before PIL's bicubic
    x1/scale. Fine-tunes ``edsr.quantsr_w2a2_x4`` for 200 steps at lr 5e-5."""
    from PIL import Image, ImageFilter

    if not OPENCV.is_dir():
        raise FileNotFoundError(f"{OPENCV} not found: apt-get install -y opencv-doc")
    for split, files in FINETUNE_SPLITS.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for f in files:
            hr = Image.open(OPENCV / f).convert("RGB")
            hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
            hr.save(root / split / (Path(f).stem + ".png"))
            if variant == "blur":
                (root / f"{split}_lr").mkdir(exist_ok=True)
                lr = hr.filter(ImageFilter.GaussianBlur(1.5)).resize((hr.width // scale, hr.height // scale),
                                                                      Image.BICUBIC)
                lr.save(root / f"{split}_lr" / (Path(f).stem + ".png"))
    return {"release": "edsr.quantsr_w2a2_x4", "data": "sr_folder", "datamodule": {"scale": scale},
            "overrides": ["epochs=2", "data.steps_per_epoch=100", "lr=5e-5"]}  # 200 steps of 16 patches
