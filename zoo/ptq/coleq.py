"""CoLeQ (contrastive learning for data-free quantization, seed 003): a generator trained with
BatchNorm distribution matching plus a MoCo-style contrastive loss against a queue of earlier
batches (data-diversity enhancement, against mode collapse), and the quantized model trained on the
current batch concatenated with samples recovered from that queue by a decoder that shares the
encoder's weights (old-knowledge recovery, against forgetting), distilling the float model.

The paper's description fixes the framework, not every layer; our choices (marked "ours"):

- **Encoder** (ours): two stride-2 4x4 convolutions with a ReLU between (C -> w -> 2w channels); its
  key, the L2-normalised flattened feature map. A momentum copy (MoCo's key encoder, m = 0.99)
  encodes the keys and the queue (``queue`` entries: normalised keys for the contrastive loss, raw
  feature maps for recovery).
- **Data-diversity enhancement**: InfoNCE at temperature ``tau`` between the encoder's query of one
  random view of each generated sample (flip + shift up to 2 px) and the key encoder's key of another
  view (positive), against the queue's keys of previous batches (negatives). Generator loss:
  ``L_bn + ce*CE + lam*InfoNCE``, L_bn and CE as in ``zoo.ptq.ddaq`` (uniform layer weights).
- **Old-knowledge recovery**: the decoder is the encoder's transposed convolutions with the key
  encoder's weights (no parameters of its own), applied to ``recover`` randomly drawn queued feature
  maps, clamped to [0, 1]. So that this inverse means something, the encoder is also trained to
  reconstruct the current (detached) samples through its tied decoder (MSE, weight 1; ours: the paper
  says the decoder needs no extra training, and it needs none of its own).
- **Quantized model**: eval mode (frozen BatchNorm statistics and activation ranges, as in
  ``zoo.ptq.distill``), Adam with a cosine decay, loss KL(p_fp || p_q) (MSE for non-classifier
  outputs) on the current samples + the recovered ones.
- Stage 1 is ``zoo.ptq.ddaq.warm_up`` (the generator on the BatchNorm statistics and CE), whose
  samples calibrate the activation ranges; ``train`` then runs the three steps above per iteration.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .ddaq import Generator, _frozen, generator_terms, output_discrepancy
from .distill import cosine_schedule
from .synthesize import _keep, bn_layers


class Encoder(nn.Module):
    """x (N x C x H x W) -> feature map (N x 2w x ceil(H/4) x ceil(W/4)); ``decode`` is its tied-weight
    transpose back to (C, H, W)."""

    def __init__(self, channels: int, width: int = 16):
        super().__init__()
        self.c1 = nn.Conv2d(channels, width, 4, 2, 1, bias=False)
        self.c2 = nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:  # even sizes, so that the transpose can come back
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        h = F.relu(self.c1(x))
        if h.shape[-2] % 2 or h.shape[-1] % 2:
            h = F.pad(h, (0, h.shape[-1] % 2, 0, h.shape[-2] % 2))
        return self.c2(h)

    def decode(self, f: torch.Tensor, size) -> torch.Tensor:
        h = F.relu(F.conv_transpose2d(f, self.c2.weight, stride=2, padding=1))
        x = F.conv_transpose2d(h, self.c1.weight, stride=2, padding=1)
        return x[..., : size[0], : size[1]]


def key(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f.flatten(1), dim=1)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE: -log( exp(q.k/tau) / (exp(q.k/tau) + sum_j exp(q.n_j/tau)) ), batch mean; q, k
    and the queue's n_j L2-normalised."""
    pos = (q * k).sum(1, keepdim=True)
    logits = pos if queue is None or len(queue) == 0 else torch.cat([pos, q @ queue.t()], 1)
    return F.cross_entropy(logits / tau, torch.zeros(len(q), dtype=torch.long))


def view(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """A random view: horizontal flip (half the samples) and a shift of up to ``shift`` px (replicated
    border), differentiable in x."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    p = F.pad(x, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    return torch.stack([p[i, :, int(dy[i]): int(dy[i]) + h, int(dx[i]): int(dx[i]) + w] for i in range(n)])


def train(qmodel: nn.Module, fmodel: nn.Module, g: Generator, steps: int = 500, *, batch_size: int = 64,
          lr_g: float = 1e-3, lr_q: float = 1e-4, lr_e: float = 1e-3, lam: float = 0.1, tau: float = 0.2,
          ce: float = 1.0, queue: int = 1024, recover: int = 32, momentum: float = 0.99, width: int = 16,
          seed: int = 0, progress: bool = True) -> dict:
    """CoLeQ's training, in place on ``qmodel`` (a calibrated quantized copy of ``fmodel``) and the
    generator ``g`` (warmed up by ``zoo.ptq.ddaq.warm_up``). Returns per-step losses."""
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not valid; valid: an integer >= 1")
    if not lr_q > 0 or not lr_g > 0:
        raise ValueError(f"lr_g={lr_g!r}, lr_q={lr_q!r}: both must be positive numbers")
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < batch_size:
        raise ValueError(f"queue={queue!r} is not valid; valid: an integer >= batch_size ({batch_size})")
    if isinstance(recover, bool) or not isinstance(recover, int) or not 0 <= recover <= queue:
        raise ValueError(f"recover={recover!r} is not valid; valid: an integer in 0..queue ({queue})")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fmodel.eval(), qmodel.eval()
    bns = bn_layers(fmodel)
    size = g.shape[1:]
    enc = Encoder(g.shape[0], width)
    enc_k = copy.deepcopy(enc).requires_grad_(False)
    keys = torch.empty(0, 0)
    feats = None
    inputs: list = [None] * len(bns)
    hooks = [bn.register_forward_pre_hook(_keep(inputs, i)) for i, bn in enumerate(bns)]
    f_params, f_flags = _frozen(fmodel)
    opt_g = torch.optim.Adam(g.parameters(), lr=lr_g, betas=(0.5, 0.999))
    opt_e = torch.optim.Adam(enc.parameters(), lr=lr_e)
    opt_q = torch.optim.Adam([p for p in qmodel.parameters() if p.requires_grad], lr=lr_q)
    sched_q = cosine_schedule(opt_q, steps)
    hist = {"bn": [], "contrastive": [], "reconstruction": [], "quantized": []}
    try:
        bar = tqdm(range(steps), desc="CoLeQ", disable=not progress, leave=False)
        for _ in bar:
            g.train()
            x, out, l_bn, l_ce = generator_terms(g, fmodel, inputs, bns, [1.0] * len(bns), ce, batch_size, gen)
            q = key(enc(view(x, gen)))
            with torch.no_grad():
                k = key(enc_k(view(x, gen)))
            l_con = info_nce(q, k, keys if len(keys) else None, tau)
            xd = x.detach()
            l_rec = F.mse_loss(enc.decode(enc(xd), size), xd)
            opt_g.zero_grad(set_to_none=True), opt_e.zero_grad(set_to_none=True)
            (l_bn + ce * l_ce + lam * l_con + l_rec).backward()
            opt_g.step(), opt_e.step()
            with torch.no_grad():  # momentum key encoder, then enqueue this batch (newest first)
                for pk, p in zip(enc_k.parameters(), enc.parameters()):
                    pk.mul_(momentum).add_(p.detach(), alpha=1 - momentum)
                fk = enc_k(xd)
                keys = torch.cat([key(fk), keys.reshape(-1, fk[0].numel())])[:queue]
                feats = fk if feats is None else torch.cat([fk, feats])[:queue]
            # the quantized model: this batch + samples recovered from the queue, distilling the float model
            batch, target = xd, out.detach()
            if recover and feats is not None and len(feats) > batch_size:
                pick = torch.randint(batch_size, len(feats), (recover,), generator=gen)  # older batches only
                with torch.no_grad():
                    old = enc_k.decode(feats[pick], size).clamp(0, 1)
                    batch, target = torch.cat([xd, old]), torch.cat([target, fmodel(old)])
            l_q = output_discrepancy(qmodel(batch), target)
            opt_q.zero_grad(set_to_none=True)
            l_q.backward()
            opt_q.step()
            sched_q.step()
            for name, v in (("bn", l_bn), ("contrastive", l_con), ("reconstruction", l_rec), ("quantized", l_q)):
                hist[name].append(float(v.detach()))
            bar.set_postfix(bn=f"{hist['bn'][-1]:.3g}", nce=f"{hist['contrastive'][-1]:.3g}", q=f"{hist['quantized'][-1]:.3g}")
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(f_params, f_flags):
            p.requires_grad_(f)
        qmodel.eval()
    hist["encoder"], hist["recovered"] = enc_k, (enc_k.decode(feats[batch_size:batch_size + 64], size).clamp(0, 1)
                                                  if feats is not None and len(feats) > batch_size else None)
    return hist
