"""Diffusion (BinaryDM): DDPM epsilon-prediction training of a diffusers UNet, an EMA of the float
model's weights, BinaryDM's LRM against the float teacher (``distill`` = its weight), and sample
quality as classifier-feature FD / KID of DDIM samples."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from ..base import QuantTask
from . import release
from .data import FashionMNIST32Data, FolderDiffusionData
from .lrm import FeatureTap, default_rank, lrm_loss, pca_projection, unet_blocks

EMA_DECAY = 0.999  # the float model's weight EMA (quantized models train without one)
GOLDEN_T = (0, 250, 500, 999)


def noisy(model, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with x0 the images in the model's space."""
    abar = model.net.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
    x0 = (x - model.mean) / model.std
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def fixed_draw(x: torch.Tensor, timesteps: int, seed: int):
    """(t, noise) for a batch from a seeded generator: evaluation batches see the same draw every time."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, timesteps, (len(x),), generator=g)
    return t.to(x.device), torch.randn(x.shape, generator=g).to(x.device)


@torch.no_grad()
def denoising_loss(model, loader, progress: bool = True) -> tuple[float, int]:
    """Mean epsilon-prediction MSE over ``loader`` with a fixed (t, noise) draw per batch."""
    from tqdm.auto import tqdm

    total, n = 0.0, 0
    steps = model.net.schedule["num_train_timesteps"]
    for i, (x, _) in enumerate(tqdm(loader, desc="denoising loss", disable=not progress, leave=False)):
        t, noise = fixed_draw(x, steps, 10_000 + i)
        eps = model(noisy(model, x, t, noise), t)
        total += F.mse_loss(eps, noise, reduction="sum").item() / noise[0].numel()
        n += len(x)
    return total / max(n, 1), n


@torch.no_grad()
def evaluate(model, loader, progress: bool = True) -> dict:
    """The denoising loss on the test split and, when the data names a feature network (input contract
    ``fd``), FD / KID of as many DDIM samples (``fd.steps`` steps, seed 0) as the split has images."""
    from .metrics import feature_network, sample_distances

    model.eval()
    loss, n = denoising_loss(model, loader, progress)
    out = {"loss": loss, "images": n}
    fd = model.input_contract.get("fd") or {}
    if fd.get("feature"):
        real = torch.cat([x for x, _ in loader])
        fake = model.generate(len(real), steps=int(fd["steps"]), seed=0, scheduler="ddim", progress=progress)
        out.update(sample_distances(real, fake, feature_network(fd["feature"], fd.get("layer", "fc"))))
        out.update({"fd_samples": len(fake), "fd_steps": int(fd["steps"])})
    return out


class DiffusionTask(QuantTask):
    task_name = "diffusion"
    datamodules = {"fmnist32": FashionMNIST32Data, "folder": FolderDiffusionData}
    monitor = ("val/loss", "min")
    evaluate = staticmethod(evaluate)
    card_lines = staticmethod(release.card_lines)
    card_usage = staticmethod(release.card_usage)
    card_snippet = staticmethod(release.card_snippet)
    domain = staticmethod(release.domain)
    card_images = release.CARD_IMAGES
    summary_table = staticmethod(release.summary_table)
    predict = staticmethod(release.predict)
    predict_takes_images = False  # it generates images
    predict_args = staticmethod(release.predict_args)
    benchmark_loader = staticmethod(release.benchmark_loader)

    @staticmethod
    def data_model_args(contract: dict) -> dict:
        return {"in_chans": contract["channels"], "size": contract["size"][0]}

    @staticmethod
    def contract_fits(release: dict, data: dict) -> bool:
        return QuantTask.contract_fits(release, data) and release.get("size") == data.get("size")

    @staticmethod
    def golden_input(dm) -> torch.Tensor:
        c, (h, w) = dm.channels, dm.size
        return torch.randn(len(GOLDEN_T), c, h, w, generator=torch.Generator().manual_seed(0))

    @staticmethod
    def golden_output(model, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x, torch.tensor(GOLDEN_T[:len(x)]))

    @staticmethod
    def report(model, dm, release_dir) -> str:
        png = release.sample_grid(model, Path(release_dir) / "sample.png")
        m = model.metrics
        line = f"test denoising loss (MSE of eps) {m['test_loss']:.5f} on {m.get('test_images', '?')} images"
        if m.get("test_fd") is not None:
            line += (f"\nFD {m['test_fd']:.3f}, KID {m['test_kid']:.5f} ({m['test_fd_samples']} DDIM samples, "
                     f"{m['test_fd_steps']} steps, classifier features)")
        return f"{line}\nsamples: {png}"

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        self.ema = None
        if self.quant_config is None and EMA_DECAY:
            self.ema = copy.deepcopy(self.model)
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.lrm_projections: dict[str, torch.Tensor] = {}
        self._taps = None

    def release_model(self):
        """The weights that are evaluated and released: the EMA for a float model."""
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is None:
            return
        step = self.global_step
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # a warm-up: early weights are forgotten fast
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    # ------------------------------------------------------------------ LRM
    def _lrm_taps(self):
        if self._taps is None:
            names = unet_blocks(self.model.net.unet)
            self._taps = (FeatureTap(self.model.net.unet, names), FeatureTap(self.teacher.net.unet, names))
        return self._taps

    def on_save_checkpoint(self, checkpoint):
        checkpoint["lrm_projections"] = {k: v.cpu() for k, v in self.lrm_projections.items()}

    def on_load_checkpoint(self, checkpoint):
        self.lrm_projections = dict(checkpoint.get("lrm_projections", {}))

    # ------------------------------------------------------------------ training
    def validation_step(self, batch, batch_idx):
        self._draw_seed = 20_000 + batch_idx
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._draw_seed = 10_000 + batch_idx
        return super().test_step(batch, batch_idx)

    def loss_and_metrics(self, batch, stage):
        x, _ = batch
        model = self.model if stage == "train" else self.release_model()
        steps = model.net.schedule["num_train_timesteps"]
        if stage == "train":
            t = torch.randint(0, steps, (len(x),), device=x.device)
            noise = torch.randn_like(x)
        else:
            t, noise = fixed_draw(x, steps, self._draw_seed)
        xt = noisy(model, x, t, noise)
        lrm_w = self.hparams.distill if stage == "train" and self.teacher is not None else 0.0
        if lrm_w:
            s_tap, t_tap = self._lrm_taps()
            eps, s_feats = s_tap.collect(model, xt, t)
            with torch.no_grad():
                _, t_feats = t_tap.collect(self.teacher, xt, t)
            if not self.lrm_projections:  # once, from the teacher on the first training batch
                self.lrm_projections = {n: pca_projection(f, default_rank(f.shape[1])) for n, f in t_feats.items()}
            proj = {n: p.to(x.device) for n, p in self.lrm_projections.items()}
            lrm = lrm_loss(s_feats, t_feats, proj)
        else:
            eps = model(xt, t)
        mse = F.mse_loss(eps, noise)
        metrics = {"loss": mse.detach()}
        loss = mse
        if lrm_w:
            loss = mse + lrm_w * lrm
            metrics["lrm"] = lrm.detach()
        return loss, metrics
