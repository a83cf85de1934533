"""Video matting (BiMatting): RVM's losses on clips -- L1 and Laplacian-pyramid L1 on alpha, temporal
coherence (the MSE of frame differences, x5), L1 and coherence on the foreground where alpha > 0,
and an auxiliary L1 (x0.25) on the 1/4-resolution coarse alpha that drives the SAB mask; MAD, MSE,
Grad, Conn and dtSSD (``metrics``) per validation epoch and on the test split, ``val/mad`` selecting
the released epoch; a sample strip (frames | alpha | composite over green) after every validation
epoch."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...models.matting import clamp01
from ..base import QuantTask
from . import release
from .data import CompositeMattingData, VideoMatteData
from .metrics import MattingMeter

COHERENCE = 5.0
COARSE = 0.25
LAPLACIAN_LEVELS = 3


def laplacian_loss(p: torch.Tensor, g: torch.Tensor, levels: int = LAPLACIAN_LEVELS) -> torch.Tensor:
    """sum_l 2^l |lap_l(p) - lap_l(g)|_1 / levels over a Laplacian pyramid (average-pool down, bilinear up)."""
    loss = p.new_zeros(())
    for level in range(levels):
        if level == levels - 1 or min(p.shape[-2:]) < 2:
            loss = loss + 2 ** level * F.l1_loss(p, g)
            break
        pd, gd = F.avg_pool2d(p, 2), F.avg_pool2d(g, 2)
        up = lambda t, ref: F.interpolate(t, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        loss = loss + 2 ** level * F.l1_loss(p - up(pd, p), g - up(gd, g))
        p, g = pd, gd
    return loss / levels


def coherence(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """MSE of the frame-to-frame differences of N x T x ... clips (0 for T = 1)."""
    if p.shape[1] < 2:
        return p.new_zeros(())
    return F.mse_loss(p[:, 1:] - p[:, :-1], g[:, 1:] - g[:, :-1])


def matting_loss(alpha, fgr, coarse, true_alpha, true_fgr) -> tuple[torch.Tensor, dict]:
    a, ta = alpha.flatten(0, 1), true_alpha.flatten(0, 1)
    l_alpha = F.l1_loss(alpha, true_alpha) + laplacian_loss(a, ta) + COHERENCE * coherence(alpha, true_alpha)
    m = (true_alpha > 0).float()
    l_fgr = F.l1_loss(fgr * m, true_fgr * m) + COHERENCE * coherence(fgr * m, true_fgr * m)
    tc = F.adaptive_avg_pool2d(ta, coarse.shape[-2:])
    l_coarse = F.l1_loss(coarse.flatten(0, 1), tc)
    loss = l_alpha + l_fgr + COARSE * l_coarse
    return loss, {"loss_alpha": l_alpha.detach(), "loss_fgr": l_fgr.detach(), "loss_coarse": l_coarse.detach()}


@torch.no_grad()
def evaluate(model, loader, progress: bool = True) -> dict:
    """MAD, MSE, Grad, Conn and dtSSD of ``model``'s alpha over the clips of ``loader``, the measured
    density of its SAB 3x3 branches (fraction of positions computed, over all the clips) and its
    operations per frame (on the first clip)."""
    model.eval()
    meter = MattingMeter()
    blocks = model.net.sab_blocks()
    for b in blocks:
        b.active = b.total = 0
    first = None
    for x, alpha, _ in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        meter.update(model(x), alpha)
        first = x[:1] if first is None else first
    out = meter.compute()
    out["clips"] = len(meter.rows)
    if blocks:
        out["sab_density"] = sum(b.active for b in blocks) / max(sum(b.total for b in blocks), 1)
    if first is not None:
        out.update(release.operations(model, first))
    return out


class MattingTask(QuantTask):
    task_name = "matting"
    datamodules = {"matting_composites": CompositeMattingData, "videomatte": VideoMatteData}
    monitor = ("val/mad", "min")
    sample_unit = "clips"
    meter_factory = MattingMeter
    meter_keys = ("mse", "grad", "conn", "dtssd")  # MAD is logged per batch (val/mad selects the epoch)
    evaluate = staticmethod(evaluate)
    card_lines = staticmethod(release.card_lines)
    card_usage = staticmethod(release.card_usage)
    card_snippet = staticmethod(release.card_snippet)
    domain = staticmethod(release.domain)
    card_images = release.CARD_IMAGES
    summary_table = staticmethod(release.summary_table)
    predict = staticmethod(release.predict)
    predict_args = staticmethod(release.predict_args)
    predict_inputs = staticmethod(release.predict_inputs)
    input_problem = staticmethod(release.input_problem)
    benchmark_loader = staticmethod(release.benchmark_loader)

    @staticmethod
    def golden_input(dm) -> torch.Tensor:
        test = dm.split("test")
        return test[0][0][:4].unsqueeze(0)

    @staticmethod
    def report(model, dm, release_dir) -> str:
        png = release.sample_strip(model, release.fixed_clip(dm), Path(release_dir) / "sample.png")
        m = model.metrics
        line = (f"MAD {m['test_mad']:.2f}  MSE {m['test_mse']:.2f}  Grad {m['test_grad']:.3f}  Conn "
                f"{m['test_conn']:.3f}  dtSSD {m['test_dtssd']:.2f}  ({m.get('test_clips', '?')} test clips)")
        if m.get("test_sab_density") is not None:
            line += f"\nSAB 3x3 density {m['test_sab_density']:.3f}"
        return f"{line}\noperations per frame {m['test_ops'] / 1e6:.2f} M\nsample strip: {png}"

    # ------------------------------------------------------------------ training
    def distill_loss(self, student_alpha, x):
        with torch.no_grad():
            target = self.teacher(x)
        return F.l1_loss(student_alpha, target)

    def loss_and_metrics(self, batch, stage):
        x, alpha, fgr = batch
        model = self.model
        pha, res, coarse, _ = model.net((x - model.mean) / model.std)
        loss, metrics = matting_loss(pha, clamp01(x + res), coarse, alpha, fgr)
        metrics["loss"] = loss.detach()
        loss = self.with_distill(loss, pha, x, stage)
        metrics["mad"] = (pha.detach() - alpha).abs().mean() * 1e3
        if stage != "train":
            self._meter.update(pha, alpha)
        return loss, metrics

    def epoch_picture(self, dm, path):
        release.sample_strip(self.model, release.fixed_clip(dm).to(self.device), path)
