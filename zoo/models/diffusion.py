"""Denoising diffusion: diffusers' ``UNet2DModel`` and schedulers, unchanged, at CPU size.

``ddpm_unet`` builds a :class:`DiffusionUNet`: the UNet (``widths`` per resolution, ``layers`` resnet
blocks per block, optional self-attention at the middle resolution) plus its noise schedule
(``timesteps``, ``beta_schedule``, ``beta_start``/``beta_end``, stored as factory arguments, so with the
model's config). Its forward is the UNet's ``(x_t, t) -> eps_hat`` (epsilon prediction). Everything is
randomly initialised; diffusers is imported only when one is built.

:class:`DiffusionModel` is the :class:`~zoo.wrapper.ZooModel` such a net is released in (the net names
it as ``zoo_wrapper``): ``model(x_t, t)`` is the UNet (inputs in the model's space, images scaled to
[-1, 1] by the input contract's mean/std, so no [0, 1] check), and ``model.generate(n, steps=50, seed=0,
scheduler="ddim")`` samples N images in [0, 1], deterministic for a seed, with a progress bar.

``KEEP_LAYERS``: the input and output convs and the time-embedding MLP, which the diffusion recipes
keep at ``keep_bits`` (8 by default; BinaryDM keeps them float).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_model
from ..wrapper import ZooModel

KEEP_LAYERS = ("unet.conv_in", "unet.conv_out", "unet.time_embedding.*")
SCHEDULERS = ("ddim", "ddpm")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class DiffusionUNet(nn.Module):
    """diffusers ``UNet2DModel`` with its training noise schedule; ``forward(x_t, t) -> eps_hat``."""

    def __init__(self, in_chans=1, size=32, widths=(32, 64, 64), layers=1, attention=False, norm_groups=8,
                 timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02):
        super().__init__()
        from diffusers import UNet2DModel

        widths = tuple(int(w) for w in widths)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={beta_schedule!r} is not valid; valid: {list(BETA_SCHEDULES)}")
        if any(w % norm_groups for w in widths):
            raise ValueError(f"every width in {widths} must be a multiple of norm_groups={norm_groups}")
        if size % 2 ** (len(widths) - 1):
            raise ValueError(f"size={size} must be divisible by 2^{len(widths) - 1} (one halving per extra width)")
        mid = len(widths) // 2
        down = tuple("AttnDownBlock2D" if attention and i == mid else "DownBlock2D" for i in range(len(widths)))
        up = tuple("AttnUpBlock2D" if attention and i == len(widths) - 1 - mid else "UpBlock2D"
                   for i in range(len(widths)))
        self.unet = UNet2DModel(sample_size=size, in_channels=in_chans, out_channels=in_chans,
                                block_out_channels=widths, layers_per_block=layers, down_block_types=down,
                                up_block_types=up, norm_num_groups=norm_groups,
                                attention_head_dim=widths[mid] if attention else None,
                                add_attention=bool(attention))
        self.schedule = dict(num_train_timesteps=int(timesteps), beta_schedule=beta_schedule,
                             beta_start=float(beta_start), beta_end=float(beta_end))
        self.in_chans, self.size = in_chans, size
        self._alphas_cumprod = None

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.unet(x, t).sample

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t of the training schedule (the DDPM scheduler's, computed once)."""
        if self._alphas_cumprod is None:
            self._alphas_cumprod = self.scheduler("ddpm").alphas_cumprod
        return self._alphas_cumprod

    def scheduler(self, name: str = "ddpm"):
        """A fresh diffusers scheduler with this model's training noise schedule."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if name not in SCHEDULERS:
            raise ValueError(f"scheduler={name!r} is not valid; valid: {list(SCHEDULERS)}")
        if name == "ddim":
            return DDIMScheduler(**self.schedule, clip_sample=True)
        return DDPMScheduler(**self.schedule, clip_sample=True)


class DiffusionModel(ZooModel):
    """A released diffusion model: ``model(x_t, t)`` -> eps_hat and ``model.generate(...)``."""

    def check_input(self, x: torch.Tensor) -> None:
        ic = self.input_contract
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"expected a float tensor x_t, got {type(x).__name__ if not torch.is_tensor(x) else x.dtype}")
        size = tuple(ic.get("size") or (x.shape[-2], x.shape[-1]))
        if x.ndim != 4 or x.shape[1] != ic["channels"] or tuple(x.shape[-2:]) != size:
            raise ValueError(f"expected x_t of shape N x {ic['channels']} x {size[0]} x {size[1]}, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        self.check_input(x)
        t = torch.as_tensor(t, device=x.device)
        if t.is_floating_point() or t.ndim > 1 or (t.ndim == 1 and len(t) != len(x)):
            raise ValueError(f"t must be an integer timestep or N={len(x)} of them, got {tuple(t.shape)} {t.dtype}")
        return self.net(x, t.expand(len(x)) if t.ndim == 0 else t)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model space (the contract's normalisation) back to images in [0, 1]."""
        return (x * self.std + self.mean).clamp(0, 1)

    @torch.no_grad()
    def generate(self, n: int, steps: int = 50, seed: int = 0, scheduler: str = "ddim",
                 batch_size: int = 256, progress: bool = True) -> torch.Tensor:
        """``n`` samples (N x C x H x W in [0, 1]) from ``steps`` denoising steps of ``scheduler``
        ("ddim": deterministic DDIM, eta = 0; "ddpm": ancestral sampling, ``steps`` spaced over the
        training schedule). The same ``seed`` (and ``batch_size``) gives the same images."""
        from tqdm.auto import tqdm

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} is not valid; valid: an integer >= 1")
        total = self.net.schedule["num_train_timesteps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
            raise ValueError(f"steps={steps!r} is not valid; valid: an integer in 1..{total}")
        sched = self.net.scheduler(scheduler)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(int(seed))
        ic = self.input_contract
        h, w = ic.get("size") or (self.net.size, self.net.size)
        device = self.mean.device
        x_all = torch.randn(n, ic["channels"], h, w, generator=gen)
        was_training = self.training
        self.eval()
        out = []
        chunks = math.ceil(n / batch_size)
        bar = tqdm(total=chunks * len(sched.timesteps), desc=f"generate ({scheduler}, {steps} steps)",
                   disable=not progress, leave=False)
        try:
            for c in range(chunks):
                x = x_all[c * batch_size:(c + 1) * batch_size].to(device)
                for t in sched.timesteps:
                    eps = self(x, int(t))
                    x = sched.step(eps, t, x, generator=gen).prev_sample  # (diffusers draws DDPM noise from the CPU generator)
                    bar.update(1)
                out.append(self.to_images(x).cpu())
        finally:
            bar.close()
            self.train(was_training)
        return torch.cat(out)


DiffusionUNet.zoo_wrapper = DiffusionModel


@register_model
def ddpm_unet(in_chans: int = 1, size: int = 32, widths=(32, 64, 64), layers: int = 1, attention: bool = False,
              norm_groups: int = 8, timesteps: int = 1000, beta_schedule: str = "linear",
              beta_start: float = 1e-4, beta_end: float = 0.02) -> DiffusionUNet:
    """A CPU-sized DDPM UNet (diffusers ``UNet2DModel``) for ``size`` x ``size`` images with
    ``in_chans`` channels; see the module docstring."""
    return DiffusionUNet(in_chans, size, widths, layers, attention, norm_groups, timesteps, beta_schedule,
                         beta_start, beta_end)
