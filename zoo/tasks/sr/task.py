"""Super-resolution (QuantSR): L1 training on random patches, PSNR/SSIM on the Y channel of whole
images with a border of ``scale`` pixels cropped, exactly as basicsr defines them (checked against
``basicsr.metrics`` in the tests), always next to bicubic on the same images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...datasets import save_panel, to_uint8
from ...models.sr import DynamicBody, set_depth
from ...quantizers.base import from_rank0
from ..base import QuantTask
from . import release
from .data import BuiltinSRData, FolderSRData, bicubic
from .metrics import psnr_y, ssim_y

def dqa_bodies(model) -> list[DynamicBody]:
    return [m for m in model.modules() if isinstance(m, DynamicBody)]


@torch.no_grad()
def evaluate(model, loader, progress: bool = True) -> dict:
    """Mean PSNR/SSIM (Y, border = scale) of ``model`` and of bicubic over whole-image (LR, HR)
    pairs; for a DQA model ``psnr``/``ssim`` are at full depth, plus the PSNR at each smaller depth
    (the model's own depth setting is restored afterwards)."""
    model.eval()
    scale = model.input_contract["scale"] if hasattr(model, "input_contract") else None
    bodies = dqa_bodies(model)
    depths = bodies[0].depth_choices[1:] if bodies else []
    own_depth = bodies[0].depth if bodies else None
    sums: dict[str, float] = {}
    n = 0
    for lr, hr in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        s = scale or hr.shape[-1] // lr.shape[-1]
        for i in range(len(lr)):
            hr8 = to_uint8(hr[i])
            lr8 = to_uint8(lr[i])
            scores = {}
            for d in [None] + depths:
                if bodies:
                    set_depth(model, d)
                sr8 = to_uint8(model(lr[i: i + 1])[0])
                key = "" if d is None else f"_depth{d}"
                scores["psnr" + key] = psnr_y(sr8, hr8, s)
                if d is None:
                    scores["ssim"] = ssim_y(sr8, hr8, s)
            bic = bicubic(lr8, s)
            scores["bicubic_psnr"] = psnr_y(bic, hr8, s)
            scores["bicubic_ssim"] = ssim_y(bic, hr8, s)
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    if bodies:
        set_depth(model, own_depth)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["images"] = n
    return out


def side_by_side(model, lr: torch.Tensor, hr: torch.Tensor, path, crop: int = 96, zoom: int = 2) -> Path:
    """Write a PNG of one HR-sized crop: bicubic | model | ground truth (each zoomed ``zoom`` x)."""
    s = hr.shape[-1] // lr.shape[-1]
    with torch.no_grad():
        sr = to_uint8(model(lr[None])[0])
    hr8, bic = to_uint8(hr), bicubic(to_uint8(lr), s)
    c = min(crop, hr8.shape[0], hr8.shape[1])
    y, x = (hr8.shape[0] - c) // 2, (hr8.shape[1] - c) // 2
    gap = np.full((c, 4, 3), 255, np.uint8)
    panel = np.concatenate([bic[y:y + c, x:x + c], gap, sr[y:y + c, x:x + c], gap,
                            hr8[y:y + c, x:x + c]], axis=1)
    return save_panel(panel, path, zoom)


class SuperResolutionTask(QuantTask):
    onnx_exportable = True
    task_name = "sr"
    datamodules = {"sr_images": BuiltinSRData, "sr_folder": FolderSRData}
    monitor = ("val/psnr", "max")
    evaluate = staticmethod(evaluate)
    card_lines = staticmethod(release.card_lines)
    card_usage = staticmethod(release.card_usage)
    domain = staticmethod(release.domain)
    finetune_demo = staticmethod(release.finetune_demo)
    finetune_variants = release.FINETUNE_VARIANTS
    card_images = release.CARD_IMAGES
    summary_table = staticmethod(release.summary_table)
    predict = staticmethod(release.predict)
    predict_args = staticmethod(release.predict_args)
    benchmark_loader = staticmethod(release.benchmark_loader)

    @staticmethod
    def data_model_args(contract: dict) -> dict:
        return {"upscale": contract["scale"], "in_chans": contract["channels"]}

    @staticmethod
    def contract_fits(release: dict, data: dict) -> bool:
        """The same channels and the same scale (an x2 model is no starting point for x3)."""
        return QuantTask.contract_fits(release, data) and release.get("scale") == data.get("scale")

    @staticmethod
    def golden_input(dm) -> torch.Tensor:
        lr, _ = dm.split("test")[0]
        h, w = lr.shape[-2:]
        return lr[None, :, h // 2 - 8: h // 2 + 8, w // 2 - 12: w // 2 + 12].contiguous()

    @staticmethod
    def report(model, dm, release_dir) -> str:
        test = dm.split("test")
        png = side_by_side(model, *test[0], Path(release_dir) / "sample.png")
        m = model.metrics
        lines = [f"{'':>10} {'PSNR (dB)':>10} {'SSIM':>7}   (Y channel, border {dm.scale}, "
                 f"{m.get('test_images', len(test))} test images: {', '.join(test.names)})",
                 f"{'bicubic':>10} {m['test_bicubic_psnr']:10.2f} {m['test_bicubic_ssim']:7.4f}",
                 f"{'model':>10} {m['test_psnr']:10.2f} {m['test_ssim']:7.4f}"]
        for k in sorted(k for k in m if k.startswith("test_psnr_depth")):
            lines.append(f"{'depth ' + k.rsplit('depth', 1)[1]:>10} {m[k]:10.2f}")
        lines.append(f"side by side (bicubic | model | HR): {png}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ training
    def distill_loss(self, student_out, x):
        with torch.no_grad():
            t_out = self.teacher(x)
        return F.l1_loss(student_out, t_out)

    def training_step(self, batch, batch_idx):
        bodies = dqa_bodies(self.model)
        if not bodies:
            return super().training_step(batch, batch_idx)
        # DQA: the full depth half of the time, otherwise one of the smaller depths
        choices = bodies[0].depth_choices
        pick = 0  # index into choices; data-parallel ranks all take rank 0's draw
        if len(choices) > 1 and torch.rand(()).item() < 0.5:
            pick = 1 + int(torch.randint(len(choices) - 1, ()).item())
        pick = int(from_rank0(torch.tensor(pick, device=self.device)).item())
        depth = choices[pick] if pick else None
        set_depth(self.model, depth)
        try:
            return super().training_step(batch, batch_idx)
        finally:
            set_depth(self.model, None)

    def loss_and_metrics(self, batch, stage):
        lr, hr = batch
        sr = self.model(lr)
        l1 = F.l1_loss(sr, hr)
        loss = self.with_distill(l1, sr, lr, stage)
        metrics = {"loss": l1.detach()}
        if stage != "train":
            s = self.hparams.input_contract["scale"]
            metrics["psnr"] = torch.tensor(float(np.mean(
                [psnr_y(to_uint8(a), to_uint8(b), s) for a, b in zip(sr, hr)])))
        return loss, metrics
