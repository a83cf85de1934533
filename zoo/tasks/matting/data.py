"""Video-matting data with exact ground-truth alpha, nothing downloaded.

Built-in composites (``data=matting_composites``, the default): each sample is a clip of T frames in
which one or two foregrounds move along smooth random paths (translation, a slow turn and zoom) over
a moving background, composited exactly as ``I = alpha F + (1 - alpha) B``:

- foregrounds with true alpha: RGBA clip art from Debian's ``openclipart-png`` (antialiased edges),
  Fashion-MNIST items with a soft alpha from their intensity (``min(1, 1.25 g)``) tinted a random
  colour, and procedurally drawn thin strands (hair-like curves, rendered at 4x and box-downsampled,
  so their alpha is the exact covered fraction of each pixel);
- backgrounds: consecutive frames of OpenCV's sample videos (Debian's ``opencv-doc``) under a fixed
  crop, or a pan (and slow zoom) across a bundled photo.

Layers are warped as premultiplied RGBA with bilinear ``grid_sample`` and stacked with the ``over``
operator, so the clip, alpha and foreground satisfy the compositing equation to float rounding.
Splits share no foreground and no video: clip art by the CRC-32 of its path (as ``sal_scenes``),
Fashion-MNIST items as ``sal_composites``, strands drawn from split-keyed seeds, videos by file
(train: ``Megamind``, both encodings; validation: ``tree``; test: ``vtest``) and photos by the
``sal_scenes`` lists. A sample is a pure function of (seed, split, index); validation and test use
a fixed seed.

``data=videomatte data.root=DIR``: the VideoMatte240K layout, ``DIR/fgr/<clip>/*.jpg`` and
``DIR/pha/<clip>/*.jpg`` (same names) plus background images in ``DIR/bgr/``; clips and backgrounds
are split by the CRC-32 of their names (0: test, 1: validation, else train).

Batches are ``(clips N x T x 3 x S x S, alpha N x T x 1 x S x S, foreground N x T x 3 x S x S)`` in [0, 1].
"""
from __future__ import annotations

import math
import zlib
from functools import lru_cache, partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from ...datasets import (FMNIST_DIR, IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD, SPLITS, SeededSet, SplitLoaders,
                         fmnist_items, jitter_colours, read_image, resize_chw)
from ...sources import CLIPART_ROOT, OPENCV_DATA, clipart_files, load_clipart, missing_package, photo_backgrounds

EVAL_SEED = 0
VIDEOS = {"train": ("Megamind.avi", "Megamind_bugy.avi"), "val": ("tree.avi",), "test": ("vtest.avi",)}
VIDEO_SIDE = 128       # decoded frames are kept with this shorter side (uint8, once per process)
P_VIDEO = 0.5          # background from a video (else a pan across a photo)
P_TWO = 0.3            # two foregrounds
KINDS = ("clipart", "fmnist", "strands")
P_KINDS = (0.5, 0.2, 0.3)


@lru_cache(maxsize=None)
def video_frames(path: str) -> torch.Tensor:
    """All frames of a video as uint8 [F, 3, h, w], the shorter side ``VIDEO_SIDE`` (cached per process)."""
    import cv2

    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        h, w = f.shape[:2]
        s = VIDEO_SIDE / min(h, w)
        f = cv2.resize(f, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        frames.append(torch.from_numpy(np.ascontiguousarray(f[..., ::-1])).permute(2, 0, 1))
    cap.release()
    if not frames:
        raise ValueError(f"{path} has no readable frames")
    return torch.stack(frames)


def split_videos(split: str, root: str = OPENCV_DATA) -> list[str]:
    paths = [f"{root}/{v}" for v in VIDEOS[split]]
    for p in paths:
        if not Path(p).is_file():
            raise missing_package(p, "opencv-doc")
    return paths


def video_background(rng, videos: list[str], size: int, t: int, jitter: bool) -> torch.Tensor:
    """T consecutive frames (stride 1-2) of a random video under one fixed random square crop."""
    frames = video_frames(videos[int(rng.integers(len(videos)))])
    stride = int(rng.integers(1, 3))
    start = int(rng.integers(0, len(frames) - stride * (t - 1)))
    h, w = frames.shape[2:]
    side = int(rng.uniform(0.5, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    clip = frames[start:start + stride * t:stride, :, y:y + side, x:x + side].float().div(255.0)
    clip = F.interpolate(clip, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if rng.random() < 0.5:
        clip = clip.flip(-1)
    if jitter:
        perm, sat = torch.from_numpy(rng.permutation(3)), float(rng.uniform(0.5, 1.8))
        clip = clip[:, perm]
        grey = clip.mean(1, keepdim=True)
        clip = grey + sat * (clip - grey)
    return clip.clamp(0, 1)


def pan_background(rng, photos, size: int, t: int, jitter: bool) -> torch.Tensor:
    """A square window moving (and slowly zooming) across a random photo over T frames."""
    img = photos[int(rng.integers(len(photos)))]
    if jitter:
        img = jitter_colours(img, rng)
    h, w = img.shape[1:]
    side0 = rng.uniform(0.3, 0.7) * min(h, w)
    side1 = side0 * rng.uniform(0.85, 1.15)
    c0 = np.array([rng.uniform(side0 / 2, h - side0 / 2), rng.uniform(side0 / 2, w - side0 / 2)])
    step = rng.uniform(-0.04, 0.04, 2) * side0
    out = []
    for i in range(t):
        side = side0 + (side1 - side0) * i / max(t - 1, 1)
        cy = float(np.clip(c0[0] + step[0] * i, side / 2, h - side / 2))
        cx = float(np.clip(c0[1] + step[1] * i, side / 2, w - side / 2))
        y, x, s = int(round(cy - side / 2)), int(round(cx - side / 2)), max(8, int(round(side)))
        out.append(resize_chw(img[:, max(0, y):y + s, max(0, x):x + s], (size, size)))
    return torch.stack(out).clamp(0, 1)


def fmnist_rgba(rng, items: torch.Tensor) -> torch.Tensor:
    """A Fashion-MNIST item as RGBA [4, 28, 28]: soft alpha ``min(1, 1.25 g)``, a random tint times
    its shading."""
    g = items[int(rng.integers(len(items)))].float().div(255.0)
    colour = torch.from_numpy(rng.uniform(0.1, 1.0, 3)).float()
    rgb = colour[:, None, None] * (0.35 + 0.65 * g)[None]
    return torch.cat([rgb, (1.25 * g).clamp(max=1.0)[None]])


def strands_rgba(rng, side: int) -> torch.Tensor:
    """Hair-like strands as RGBA [4, side, side]: 6-20 curves 0.25-1 px wide drawn at 4x resolution
    and box-downsampled 4x, so alpha is each pixel's exactly covered fraction (of the 4x grid)."""
    from PIL import Image, ImageDraw

    big = side * 4
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    root = rng.uniform(0.3, 0.7, 2) * big
    for _ in range(int(rng.integers(6, 21))):
        p = root + rng.normal(0, 0.08 * big, 2)
        angle = rng.uniform(0, 2 * math.pi)
        pts = []
        for _ in range(24):
            pts.append(tuple(float(v) for v in p))
            angle += rng.normal(0, 0.15)
            p = p + 0.03 * big * np.array([math.cos(angle), math.sin(angle)])
        draw.line(pts, fill=255, width=int(rng.integers(1, 5)))
    a = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None, None]
    a = F.avg_pool2d(a, 4)[0]
    base = torch.from_numpy(rng.choice([[0.12, 0.08, 0.05], [0.35, 0.22, 0.1], [0.8, 0.65, 0.35],
                                        [0.6, 0.6, 0.6], [0.05, 0.05, 0.05]])).float()
    rgb = (base + torch.from_numpy(rng.uniform(-0.05, 0.05, 3)).float()).clamp(0, 1)
    return torch.cat([rgb[:, None, None].expand(3, side, side), a])


def foreground(rng, kind: str, clipart: list[str], clipart_root: str, items: torch.Tensor, side: int) -> torch.Tensor:
    """An RGBA foreground whose longer side is ``side`` pixels (antialiased resize)."""
    obj = None
    if kind == "clipart":
        for _ in range(20):  # skip art without true transparency (deterministic given rng)
            obj = load_clipart(f"{clipart_root}/{clipart[int(rng.integers(len(clipart)))]}")
            if obj is not None:
                break
        kind = "fmnist" if obj is None else kind
    if kind == "strands":
        return strands_rgba(rng, side)
    if kind == "fmnist":
        obj = fmnist_rgba(rng, items)
    h, w = obj.shape[1:]
    f = side / max(h, w)
    obj = resize_chw(obj, (max(4, round(h * f)), max(4, round(w * f)))).clamp(0, 1)
    return obj.flip(-1) if rng.random() < 0.5 else obj


def move(rng, rgba: torch.Tensor, size: int, t: int) -> torch.Tensor:
    """Premultiplied RGBA [T, 4, size, size] of ``rgba`` moving over T frames: a random start, velocity,
    slow turn and zoom, warped with bilinear grid_sample (zero outside)."""
    h, w = rgba.shape[1:]
    pm = torch.cat([rgba[:3] * rgba[3:], rgba[3:]])[None]
    c = rng.uniform(-0.5, 0.5, 2)
    v = rng.uniform(-0.12, 0.12, 2)
    a0, da = rng.uniform(-0.3, 0.3), rng.uniform(-0.06, 0.06)
    s0, ds = 1.0, rng.uniform(-0.04, 0.04)
    thetas = []
    for i in range(t):
        ang, s = a0 + da * i, s0 * (1 + ds * i)
        sx, sy = size / (w * s), size / (h * s)  # output pixels per object pixel -> normalised scale
        cos, sin = math.cos(ang), math.sin(ang)
        cx, cy = c + v * i
        a = np.array([[cos * sx, sin * sx], [-sin * sy, cos * sy]])
        thetas.append(np.concatenate([a, -(a @ np.array([cx, cy]))[:, None]], 1))
    theta = torch.from_numpy(np.stack(thetas)).float()
    grid = F.affine_grid(theta, (t, 4, size, size), align_corners=False)
    return F.grid_sample(pm.expand(t, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).clamp(0, 1)


def composite(layers: list[torch.Tensor], bg: torch.Tensor):
    """Stack premultiplied RGBA layers (front first) with ``over`` and composite over ``bg``:
    (clip I, alpha, foreground F) with ``I = alpha F + (1 - alpha) B`` (F = 0 where alpha = 0)."""
    col = torch.zeros_like(bg)
    alpha = torch.zeros_like(bg[:, :1])
    for layer in layers:  # front to back
        col = col + (1 - alpha) * layer[:, :3]
        alpha = alpha + (1 - alpha) * layer[:, 3:]
    col = torch.minimum(col, alpha)  # premultiplied colour never exceeds its alpha
    fgr = torch.where(alpha > 0, col / alpha.clamp(min=1e-12), torch.zeros_like(col)).clamp(0, 1)
    return alpha * fgr + (1 - alpha) * bg, alpha, fgr


def clip_sample(rng, videos, photos, clipart, clipart_root, items, size: int, t: int, jitter: bool):
    """One sample: (clip [T, 3, S, S], alpha [T, 1, S, S], foreground [T, 3, S, S])."""
    if rng.random() < P_VIDEO:
        bg = video_background(rng, videos, size, t, jitter)
    else:
        bg = pan_background(rng, photos, size, t, jitter)
    layers = []
    for _ in range(2 if rng.random() < P_TWO else 1):
        kind = KINDS[int(rng.choice(len(KINDS), p=P_KINDS))]
        side = int(rng.uniform(0.45, 0.95) * size)
        layers.append(move(rng, foreground(rng, kind, clipart, clipart_root, items, side), size, t))
    return composite(layers, bg)


class MattingData(SplitLoaders, L.LightningDataModule):
    """Base: ``setup`` fills ``train_set``/``val_set``/``test_set`` with (clip, alpha, foreground) samples."""

    def __init__(self, batch_size=8, size=64, frames=4, eval_frames=8, num_workers=0, seed=0):
        super().__init__()
        if int(size) % 16:
            raise ValueError(f"data.size={size!r} must be a multiple of 16 (the encoder's stride)")
        if int(frames) < 1 or int(eval_frames) < 2:
            raise ValueError(f"data.frames={frames!r} must be >= 1 and data.eval_frames={eval_frames!r} >= 2")
        self.batch_size, self.size, self.num_workers, self.seed = batch_size, int(size), num_workers, seed
        self.frames, self.eval_frames = int(frames), int(eval_frames)
        self.train_set = self.val_set = self.test_set = None

    def input_contract(self) -> dict:
        return {"channels": 3, "size": None, "train_size": [self.size, self.size], "frames": self.frames,
                "eval_frames": self.eval_frames,
                "range": [0.0, 1.0], "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def split(self, name: str):
        self.setup()
        return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[name]


class CompositeMattingData(MattingData):
    def __init__(self, root=FMNIST_DIR, clipart_root=None, opencv_root=OPENCV_DATA, train_size=4000, val_size=64,
                 test_size=128, augment=True, **kw):
        super().__init__(**kw)
        self.root, self.clipart_root, self.opencv_root = root, clipart_root or CLIPART_ROOT, opencv_root
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.augment = bool(augment)

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        clipart = clipart_files(self.clipart_root)
        sets = {}
        for split in SPLITS:
            train = split == "train"
            make = partial(clip_sample, videos=split_videos(split, self.opencv_root),
                           photos=photo_backgrounds(split, self.opencv_root), clipart=clipart[split],
                           clipart_root=self.clipart_root, items=fmnist_items(self.root, split)[0],
                           size=self.size, t=self.frames if train else self.eval_frames, jitter=train and self.augment)
            sets[split] = SeededSet(make, self.sizes[split], self.seed if train else EVAL_SEED, split)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]


# ---------------------------------------------------------------------- VideoMatte-style folders
def _split_of(name: str) -> str:
    h = zlib.crc32(name.encode()) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def videomatte_index(root) -> tuple[dict, dict]:
    """({split: [(fgr files, pha files) per clip]}, {split: [background files]}) of a VideoMatte folder."""
    root = Path(root)
    for sub in ("fgr", "pha", "bgr"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub} does not exist; data=videomatte needs {root}/fgr/<clip>/*.jpg, "
                                    f"{root}/pha/<clip>/*.jpg and background images in {root}/bgr/")
    clips = {s: [] for s in SPLITS}
    for d in sorted(p for p in (root / "fgr").iterdir() if p.is_dir()):
        fg = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        pha = [root / "pha" / d.name / p.name for p in fg]
        missing = [str(p) for p in pha if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"alpha frames missing for clip {d.name}: {missing[:3]}")
        if fg:
            clips[_split_of(d.name)].append((fg, pha))
    bgs = {s: [] for s in SPLITS}
    for p in sorted((root / "bgr").iterdir()):
        if p.suffix.lower() in IMAGE_EXTS:
            bgs[_split_of(p.name)].append(p)
    if not clips["train"] or not bgs["train"]:
        raise FileNotFoundError(f"no training clips or backgrounds under {root} (split by CRC-32 of the names)")
    for s in ("val", "test"):  # tiny folders: evaluate on the training split rather than on nothing
        clips[s] = clips[s] or clips["train"]
        bgs[s] = bgs[s] or bgs["train"]
    return clips, bgs


def videomatte_sample(rng, clips, bgs, size: int, t: int):
    fg_files, pha_files = clips[int(rng.integers(len(clips)))]
    start = int(rng.integers(0, max(1, len(fg_files) - t + 1)))
    idx = [min(start + i, len(fg_files) - 1) for i in range(t)]
    fgr = torch.stack([torch.from_numpy(read_image(fg_files[i]).copy()).permute(2, 0, 1) for i in idx]).float() / 255
    pha = torch.stack([torch.from_numpy(read_image(pha_files[i], "L").copy())[None] for i in idx]).float() / 255
    fgr = F.interpolate(fgr, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    pha = F.interpolate(pha, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    bg = torch.from_numpy(read_image(bgs[int(rng.integers(len(bgs)))]).copy()).permute(2, 0, 1).float() / 255
    bg = resize_chw(bg, (size, size)).clamp(0, 1)[None].expand(t, -1, -1, -1)
    return pha * fgr + (1 - pha) * bg, pha, fgr


class VideoMatteData(MattingData):
    def __init__(self, root, train_size=4000, val_size=64, test_size=128, **kw):
        super().__init__(**kw)
        self.root = root
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        clips, bgs = videomatte_index(self.root)
        sets = {}
        for split in SPLITS:
            train = split == "train"
            make = partial(videomatte_sample, clips=clips[split], bgs=bgs[split], size=self.size,
                           t=self.frames if train else self.eval_frames)
            sets[split] = SeededSet(make, self.sizes[split], self.seed if train else EVAL_SEED, split)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
