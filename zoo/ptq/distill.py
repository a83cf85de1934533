"""Fine-tune a calibrated quantized model on its calibration images by distillation from the float
model: DSG's "QAT use" of synthetic data (no labels, no real data).

The quantized model stays in eval mode throughout: BatchNorm keeps the float model's running
statistics and every activation quantizer its calibrated range; the weights (and biases, BatchNorm
affine parameters) learn through the weight quantizers' straight-through gradient. Loss: KL(p_T ||
q_T) * T^2 between the float and quantized models' softened outputs for classifier outputs (N x
classes), mean squared error otherwise. Adam with a cosine decay of the learning rate to 1%.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)) (batch mean) for N x C outputs, else MSE."""
    if student.dim() != 2:
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True) * t * t


def cosine_schedule(opt, steps: int):
    """The learning rate decays from its value to 1% over ``steps`` (half a cosine)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * s / steps)))


def distill(qmodel: nn.Module, fmodel: nn.Module, images: torch.Tensor, steps: int = 500, lr: float = 1e-4,
            batch_size: int = 64, temperature: float = 1.0, seed: int = 0, progress: bool = True) -> list[float]:
    """Fine-tune ``qmodel`` in place for ``steps`` Adam steps on random batches of ``images`` to match
    ``fmodel``'s outputs. Returns the loss of every step."""
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not valid; valid: an integer >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is not valid; valid: a positive number")
    qmodel.eval(), fmodel.eval()
    with torch.no_grad():
        targets = torch.cat([fmodel(images[i:i + 256]) for i in range(0, len(images), 256)])
    params = [p for p in qmodel.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = cosine_schedule(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="distillation", disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        loss = kd_loss(qmodel(images[idx]), targets[idx], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    qmodel.eval()
    return losses
