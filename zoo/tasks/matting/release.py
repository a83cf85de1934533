"""What a matting release shows and does: the operation count, the sample strip, card lines, the
summary table, the predictor (``python -m zoo.predict``: a video file or a folder of frames in; alpha
PNGs and a composite video out, frame by frame with the recurrent state) and the benchmark data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...cards import float_reference_bytes, low_bit_cell, made_by
from ...datasets import IMAGE_EXTS, read_image, save_panel, save_png

CARD_IMAGES = (("sample.png", "A test clip: frames | this model's alpha | composite over green (top to bottom):",
                "frames, alpha, composite"),)
VIDEO_EXTS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
GREEN = (0.0, 177 / 255, 64 / 255)
FLOAT_BITS = 32


# ---------------------------------------------------------------------- operations
def _bits(mod) -> tuple[int, int]:
    """(weight bits, activation bits) of a conv in any form; 32 for float."""
    from ...quantizers.layers import QuantConv2d
    from ...quantizers.packed import PackedConv2d

    if isinstance(mod, PackedConv2d):
        a = 1 if mod.act_mode == "sign" else FLOAT_BITS if mod.act_mode == "none" else 8
        return mod.bits, a
    if isinstance(mod, QuantConv2d):
        w = mod.wq.bits if mod.wq is not None else FLOAT_BITS
        a = mod.aq.bits if mod.aq is not None else FLOAT_BITS
        return w, a
    return FLOAT_BITS, FLOAT_BITS


class OperationCounter:
    """Counts operations while it is entered (``with OperationCounter(model) as ops: model(clip) ...``),
    as BiMatting and ReActNet count them: ``ops = flops + bops / 64`` with ``flops`` the MACs of float
    convs and ``bops`` the MACs x w_bits x a_bits of quantized ones. The 3x3 branch of an SAB block counts
    only the positions its mask selected. Convolutions only (BatchNorm, the GRU gates' pointwise maths
    and resampling are not counted). ``result()``: per frame of the clips it saw."""

    def __init__(self, model):
        self.model, self.flops, self.bops, self.frames, self.size = model, 0, 0, 0, None
        self.handles = []

    def _add(self, mod, macs):
        w, a = _bits(mod)
        if w >= FLOAT_BITS and a >= FLOAT_BITS:
            self.flops += macs
        else:
            self.bops += macs * w * a

    def _conv(self, mod, args, out):
        from ...quantizers.packed import PackedConv2d

        if not getattr(mod, "_zoo_in_sab", False):  # an SAB's 3x3 conv is counted by its block
            k = mod.weight_shape[1:] if isinstance(mod, PackedConv2d) else mod.weight.shape[1:]
            self._add(mod, out.numel() * int(np.prod(k)))

    def _sab(self, mod, args, out):
        from ...quantizers.packed import PackedConv2d

        w, mask = mod.conv3, args[1]
        k = w.weight_shape[1:] if isinstance(w, PackedConv2d) else w.weight.shape[1:]
        self._add(w, int((mask > 0).sum()) * mod.bn3.num_features * int(np.prod(k)))

    def _clip(self, mod, args, out):
        self.frames += args[0].shape[0] * args[0].shape[1]
        self.size = list(args[0].shape[-2:])

    def __enter__(self):
        from ...models.matting import SABlock
        from ...quantizers.packed import PackedConv2d

        for m in self.model.net.modules():
            if isinstance(m, SABlock):
                m.conv3._zoo_in_sab = True
                self.handles.append(m.register_forward_hook(self._sab))
            elif isinstance(m, (torch.nn.Conv2d, PackedConv2d)):
                self.handles.append(m.register_forward_hook(self._conv))
        self.handles.append(self.model.register_forward_hook(self._clip))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m in self.model.net.modules():
            if hasattr(m, "conv3"):
                m.conv3._zoo_in_sab = False
        return False

    def result(self) -> dict:
        n = max(self.frames, 1)
        return {"flops": self.flops / n, "bops": self.bops / n, "ops": (self.flops + self.bops / 64) / n,
                "ops_size": self.size}


@torch.no_grad()
def operations(model, clip: torch.Tensor) -> dict:
    """Operations per frame of ``model`` (in eval mode) on ``clip`` N x T x 3 x H x W (:class:`OperationCounter`)."""
    was = model.training
    model.eval()
    try:
        with OperationCounter(model) as counter:
            model(clip)
    finally:
        model.train(was)
    return counter.result()


# ---------------------------------------------------------------------- pictures
def fixed_clip(dm) -> torch.Tensor:
    return dm.split("test")[0][0][None]


def _row(frames: torch.Tensor) -> np.ndarray:
    """T x C x H x W in [0, 1] -> uint8 H x (T (W + 2)) x 3."""
    frames = frames.detach().float().cpu().clamp(0, 1)
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    gap = torch.ones(frames.shape[0], 3, frames.shape[2], 2)
    row = torch.cat([torch.cat([f, g], -1) for f, g in zip(frames, gap)], -1)
    return (row * 255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def sample_strip(model, clip: torch.Tensor, path, zoom: int = 2) -> Path:
    """A PNG: the clip's frames, this model's alpha, and the composite over green (one row each)."""

    was = model.training
    model.eval()
    alpha, fgr = model(clip, fgr=True)
    model.train(was)
    green = torch.tensor(GREEN, device=clip.device).view(1, 3, 1, 1)
    comp = alpha[0] * fgr[0] + (1 - alpha[0]) * green
    rows = [_row(clip[0]), _row(alpha[0]), _row(comp)]
    hgap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    panel = np.concatenate([rows[0], hgap, rows[1], hgap, rows[2]], 0)
    return save_panel(panel, path, zoom)


# ---------------------------------------------------------------------- cards
def domain(cfg: dict) -> str | None:
    if made_by(cfg).get("data") != "matting_composites":
        return None
    size = cfg.get("input_contract", {}).get("train_size") or ["?", "?"]
    return (f"synthetic {size[0]}x{size[1]} clips: clip art, clothing items and hair-like strands moving over "
            "video frames and photo pans. Real footage of people is outside its domain; zoo.predict runs it at "
            f"{size[0]} pixels on the shorter side and resizes the alpha back.")


def card_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    ic = cfg["input_contract"]
    data = train.get("data", "?")
    if data == "matting_composites":
        data = (f"matting_composites: clips of {ic.get('frames', '?')} frames ({ic['train_size'][0]}x"
                f"{ic['train_size'][1]}; validation and test clips of {ic.get('eval_frames', 8)}) in which clip art "
                "(openclipart-png, true alpha), Fashion-MNIST items (soft alpha) and drawn strands (exact fractional "
                "alpha) move over OpenCV sample videos or photo pans, composited as I = aF + (1-a)B; splits share no "
                "foreground and no video (see `zoo/tasks/matting/data.py`)")
    lines = [f"- **Data:** {data}"]
    if m.get("test_mad") is not None:
        lines.append(f"- **Test** ({m.get('test_clips', '?')} clips; packed model as loaded by `zoo.load`): "
                     f"**MAD {m['test_mad']:.2f}**, MSE {m['test_mse']:.2f}, Grad {m['test_grad']:.3f}, "
                     f"Conn {m['test_conn']:.3f}, dtSSD {m['test_dtssd']:.2f} (MAD, MSE x1e3; Grad, Conn /1e3 "
                     f"at {ic['train_size'][0]}x{ic['train_size'][1]}; dtSSD x1e2; training form: MAD "
                     f"{m.get('test_mad_training_form', float('nan')):.2f})")
    if m.get("test_ops") is not None:
        size = m.get("test_ops_size", ["?", "?"])
        dens = (f"; the SAB 3x3 branches computed **{m['test_sab_density']:.1%}** of their positions on the "
                f"test clips" if m.get("test_sab_density") is not None else "")
        lines.append(f"- **Operations per {size[0]}x{size[1]} frame** (the first test clip): "
                     f"{m['test_ops'] / 1e6:.2f} M "
                     f"(FLOPs {m['test_flops'] / 1e6:.2f} M + BOPs {m['test_bops'] / 1e6:.2f} M / 64, "
                     f"convolutions only){dens}")
    return lines


def card_snippet(name: str, cfg: dict) -> list[str]:
    return [f'model = zoo.load("{name}")  # clips N x T x 3 x H x W in [0, 1] (H, W multiples of 16)',
            "alpha = model(clip)  # N x T x 1 x H x W; model(clip, fgr=True) -> (alpha, foreground)",
            "model.reset(); a0 = model.step(frame0); a1 = model.step(frame1)  # streaming, state kept"]


def card_usage(name: str) -> list[str]:
    return [f"or `python -m zoo.predict {name} video.avi --out matte/` (a video file or a folder of frames: "
            "alpha PNGs, alpha.mp4 and a composite over green or `--background image.jpg`).", ""]


def summary_table(rows) -> str:
    fp = {c["arch"]: c["metrics"].get("test_mad") for _, c in rows if not c.get("quant")}
    ref = next(iter(fp.values()), None)
    fp_ops = next((c["metrics"].get("test_ops") for _, c in rows if not c.get("quant")), None)
    out = ["| model | MAD | vs FP32 | MSE | Grad | Conn | dtSSD | SAB 3x3 density | ops / frame (M) | vs FP32 ops "
           "| weights file bytes | vs FP32 file | low-bit layers vs FP32 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, cfg in sorted(rows, key=lambda dc: (bool(dc[1].get("quant")), dc[0].name)):
        m = cfg.get("metrics", {})
        gap = f"{m['test_mad'] - ref:+.2f}" if cfg.get("quant") and ref is not None else "—"
        dens = f"{m['test_sab_density']:.1%}" if m.get("test_sab_density") is not None else "—"
        ops = m.get("test_ops")
        rel = f"1/{fp_ops / ops:.1f}" if ops and fp_ops else "—"
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        out.append(f"| [{path.name}]({path}/README.md) | {m['test_mad']:.2f} | {gap} | {m['test_mse']:.2f} | "
                   f"{m['test_grad']:.3f} | {m['test_conn']:.3f} | {m['test_dtssd']:.2f} | {dens} | "
                   f"{ops / 1e6 if ops else float('nan'):.2f} | {rel} | {wb:,} | 1/{fb / wb:.1f} | "
                   f"{low_bit_cell(path)} |")
    return "\n".join(out)


# ---------------------------------------------------------------------- zoo.predict
def predict_args(parser) -> None:
    parser.add_argument("--background", default=None, help="matting: composite over this image (default: green)")
    parser.add_argument("--side", type=int, default=None,
                        help="matting: run at this shorter side, a multiple of 16 (default: the training size)")
    parser.add_argument("--max-frames", type=int, default=None, help="matting: stop after this many frames")


def predict_inputs(paths) -> list[Path]:
    """One video file (any OpenCV-readable) or one folder of frames."""
    if len(paths) != 1:
        raise ValueError(f"matting takes one video file or one folder of frames, got {len(paths)}: {list(paths)}")
    p = Path(paths[0])
    if p.is_dir():
        if not any(f.suffix.lower() in IMAGE_EXTS for f in p.iterdir()):
            raise FileNotFoundError(f"no frames ({', '.join(IMAGE_EXTS)}) in {p}")
        return [p]
    if not p.is_file():
        raise FileNotFoundError(f"{p} is neither a video file nor a folder of frames")
    if p.suffix.lower() not in VIDEO_EXTS:
        raise ValueError(f"{p.name}: not a video file (valid: {', '.join(VIDEO_EXTS)}) or a folder of frames")
    return [p]


def input_problem(path: Path) -> str | None:
    """Why ``path`` cannot be matted: a video OpenCV cannot open or read a frame from (a folder's frames
    are read one by one while streaming)."""
    if path.is_dir():
        return None
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        return None if cap.isOpened() and cap.read()[0] else "OpenCV cannot read a frame from this video"
    finally:
        cap.release()


def read_frames(path: Path):
    """(frames iterator of uint8 H x W x 3 RGB, frames per second) from a video file or a folder of frames."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        return (read_image(f) for f in files), 25.0
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: OpenCV cannot open this video")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0

    def gen():
        try:
            while True:
                ok, f = cap.read()
                if not ok:
                    return
                yield np.ascontiguousarray(f[..., ::-1])
        finally:
            cap.release()
    return gen(), float(fps)


@torch.no_grad()
def predict(model, inputs, out: Path, args) -> list[Path]:
    """``alpha/<i>.png`` per frame (at the input's size), ``alpha.mp4`` and ``composite.mp4`` (over
    ``--background`` or green): frame by frame with the recurrent state, so memory stays bounded."""
    import cv2

    path = Path(inputs[0])
    frames, fps = read_frames(path)
    side = args.side or model.input_contract["train_size"][0]
    if side % 16:
        raise ValueError(f"--side {side} must be a multiple of 16")
    device = model.mean.device
    bg_img = read_image(args.background) if args.background else None
    (out / "alpha").mkdir(parents=True, exist_ok=True)
    writers, written = {}, []
    model.reset()
    model.eval()
    for i, frame in enumerate(tqdm(frames, desc=f"matting {path.name}", unit="frame")):
        if args.max_frames and i >= args.max_frames:
            break
        h, w = frame.shape[:2]
        s = side / min(h, w)
        mh, mw = max(16, round(h * s / 16) * 16), max(16, round(w * s / 16) * 16)
        x = torch.from_numpy(frame.copy()).permute(2, 0, 1).float().div(255)[None].to(device)
        alpha, fgr = model.step(F.interpolate(x, size=(mh, mw), mode="bilinear", align_corners=False,
                                              antialias=True).clamp(0, 1), fgr=True)
        alpha = F.interpolate(alpha, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
        fgr = F.interpolate(fgr, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
        if bg_img is not None:
            bg = cv2.resize(bg_img, (w, h), interpolation=cv2.INTER_AREA)
            bg = torch.from_numpy(bg).permute(2, 0, 1).float().div(255)[None].to(device)
        else:
            bg = torch.tensor(GREEN, device=device).view(1, 3, 1, 1)
        comp = alpha * fgr + (1 - alpha) * bg
        a8 = (alpha[0, 0] * 255).round().byte().cpu().numpy()
        c8 = (comp[0] * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        p = out / "alpha" / f"{i:05d}.png"
        save_png(a8, p)
        written.append(p)
        if not writers:
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            writers = {k: cv2.VideoWriter(str(out / f"{k}.mp4"), fourcc, fps, (w, h)) for k in ("alpha", "composite")}
        writers["alpha"].write(np.repeat(a8[..., None], 3, 2))
        writers["composite"].write(np.ascontiguousarray(c8[..., ::-1]))
    for k, wr in writers.items():
        wr.release()
        written.append(out / f"{k}.mp4")
    model.reset()
    if not written:
        raise ValueError(f"{path}: no frames could be read")
    return written


def benchmark_loader(model, data=None, limit=None):
    """The built-in test clips at the model's training size, or ``data``: a VideoMatte-style folder."""
    from torch.utils.data import DataLoader, Subset

    from .data import CompositeMattingData, VideoMatteData

    size = model.input_contract["train_size"][0]
    dm = CompositeMattingData(size=size) if data is None else VideoMatteData(root=data, size=size)
    ds = dm.split("test")
    if limit:
        ds = Subset(ds, range(min(limit, len(ds))))
    desc = f"built-in test clips ({size}x{size})" if data is None else f"VideoMatte clips from {data}"
    return DataLoader(ds, batch_size=8), desc
