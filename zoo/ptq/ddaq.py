"""DDAQ (Li et al., "Dual-Discriminator Adversarial Framework for Data-Free Quantization",
Neurocomputing 2022): a generator trained against two discriminators, then the quantized model
trained on its samples under the float model's supervision. No real data anywhere.

The paper describes the framework, not every formula, and ships no code; this is our reading of it
(the choices the paper leaves open are marked "ours"):

- **Generator** (GDFQ-style, which DDAQ builds on): Gaussian noise z times a learned embedding of a
  random class label -> linear -> two upsample + 3x3 conv + BatchNorm + LeakyReLU stages -> 3x3 conv
  -> sigmoid, an image in [0, 1] of the model's input shape. Models without class outputs get an
  unconditional generator (one "class").
- **Discriminator 1, BN distribution matching** (the float model): per BatchNorm layer l, the
  batch mean and standard deviation of its input against its running statistics,
  ``L_bn = sum_l w_l (||mu_l - mu||^2 + ||sigma_l - sigma||^2)``; plus, for classifiers, the
  cross-entropy of the float model's output against the sampled label (GDFQ's "classification
  boundary" term; weight ``ce``).
- **Discriminator 2, model discrepancy** (float vs quantized model):
  ``L_dis = sum_l w_l mean(|h_l^fp - h_l^q| / sigma_l) + KL(p_fp || p_q)``, h_l the input of BatchNorm
  l in either model (sigma_l its running standard deviation, so every layer is measured in its own
  normalised units; ours) and the last term the output discrepancy (MSE for non-classifier outputs).
  The generator *maximises* it (weight ``beta``), seeking samples on which the quantized model still
  disagrees; the quantized model minimises it.
- **Layer importance** (the paper's "average Hessian trace" prior): w_l is the Hutchinson estimate of
  the Hessian trace of the float model's loss (cross-entropy against its own argmax labels; MSE
  against its own output otherwise) per weight of the layer feeding BatchNorm l, computed once on
  generator samples and normalised to mean 1 (clamped at 1% of the mean; ours). Layers whose
  producer is unknown get weight 1.
- **Schedule** (two stages): a warm-up trains the generator on discriminator 1 alone (the quantized
  model does not exist yet: its activation ranges are calibrated on the warmed-up generator's
  samples); then each adversarial step is a generator step (``L_bn + ce*CE - beta*L_dis``) followed by
  a quantized-model step (``L_dis`` on the same, detached samples). The quantized model stays in
  eval mode (BatchNorm on the float running statistics, calibrated activation ranges), as in
  ``zoo.ptq.distill``; its weights learn through the straight-through estimator.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distill import cosine_schedule
from .synthesize import _keep, bn_layers


class Generator(nn.Module):
    """Noise (x a class embedding) -> image in [0, 1] of shape (C, H, W)."""

    def __init__(self, shape, classes: int = 1, latent: int = 64, width: int = 64):
        super().__init__()
        c, h, w = shape
        self.shape, self.classes, self.latent = tuple(shape), int(classes), int(latent)
        self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
        self.embed = nn.Embedding(self.classes, latent)
        self.fc = nn.Linear(latent, 2 * width * self.h0 * self.w0)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(size=(h, w)),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, c, 3, padding=1))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(z * self.embed(labels)).view(len(z), -1, self.h0, self.w0)
        return torch.sigmoid(self.body(h))

    def draw(self, n: int, gen: torch.Generator):
        """(z, labels) for n samples from ``gen``."""
        return torch.randn(n, self.latent, generator=gen), torch.randint(0, self.classes, (n,), generator=gen)


def bn_stat_loss(inputs, bns, weights) -> torch.Tensor:
    """Discriminator 1's statistics term: sum_l w_l (||mu_l - running_mean||^2 + ||sigma_l - sqrt(running_var + eps)||^2)
    with batch statistics of each BatchNorm input (over N, H, W)."""
    total = 0.0
    for x, bn, w in zip(inputs, bns, weights):
        dims = (0,) + tuple(range(2, x.ndim))
        mu, sd = x.mean(dims), torch.sqrt(x.var(dims, unbiased=False) + bn.eps)
        total = total + w * (((mu - bn.running_mean) ** 2).sum() + ((sd - torch.sqrt(bn.running_var + bn.eps)) ** 2).sum())
    return total


def generator_terms(g: "Generator", fmodel: nn.Module, inputs: list, bns, weights, ce: float, batch_size: int,
                    gen: torch.Generator):
    """A fresh generator batch through the float model (whose BatchNorm inputs land in ``inputs``):
    (images, float output, discriminator 1's statistics term, its cross-entropy on the sampled labels, 0
    for unconditional generators or ``ce`` = 0)."""
    z, y = g.draw(batch_size, gen)
    x = g(z, y)
    out = fmodel(x)
    l_ce = F.cross_entropy(out, y) if g.classes > 1 and ce else out.new_zeros(())
    return x, out, bn_stat_loss(inputs, bns, weights), l_ce


def output_discrepancy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), batch mean, for N x C outputs; MSE otherwise."""
    if student.dim() != 2:
        return F.mse_loss(student, teacher)
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), reduction="batchmean", log_target=True)


def discrepancy(f_in, q_in, f_out, q_out, bns, weights) -> torch.Tensor:
    """Discriminator 2: sum_l w_l mean(|h_l^fp - h_l^q| / sigma_l) + the output discrepancy."""
    total = output_discrepancy(q_out, f_out)
    for a, b, bn, w in zip(f_in, q_in, bns, weights):
        sd = torch.sqrt(bn.running_var + bn.eps).view(1, -1, *([1] * (a.ndim - 2)))
        total = total + w * ((a - b).abs() / sd).mean()
    return total


def producers(model: nn.Module, bns, x: torch.Tensor) -> list:
    """For each BatchNorm, the weighted layer (conv/linear) whose output it normalises, found by
    running ``x`` (None where the input comes from elsewhere)."""
    made, found = {}, [None] * len(bns)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
              or (hasattr(m, "weight") and hasattr(m, "weight_quantizer"))]
    hooks = [m.register_forward_hook(lambda mod, a, out: made.__setitem__(id(out), mod)) for m in layers]
    index = {id(bn): i for i, bn in enumerate(bns)}
    hooks += [bn.register_forward_pre_hook(lambda mod, a: found.__setitem__(index[id(mod)], made.get(id(a[0]))))
              for bn in bns]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def hessian_trace(model: nn.Module, layers, x: torch.Tensor, probes: int = 8, seed: int = 0) -> list[float]:
    """Hutchinson estimate, per layer, of tr(H)/numel for the layer's weight, H the Hessian of the
    model's loss on ``x`` against its own predictions (cross-entropy against the argmax for N x C
    outputs, else MSE against the detached output)."""
    gen = torch.Generator().manual_seed(seed)
    weights = [m.weight for m in layers]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        out = model(x)
        target = out.detach().argmax(1) if out.dim() == 2 else out.detach()
        loss = F.cross_entropy(out, target) if out.dim() == 2 else F.mse_loss(out, target)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        est = [0.0] * len(weights)
        for p in range(probes):
            vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]
            hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=p < probes - 1, allow_unused=True)
            for i, (v, h) in enumerate(zip(vs, hv)):
                if h is not None:
                    est[i] += float((v * h).sum()) / probes
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    return [e / w.numel() for e, w in zip(est, weights)]


def importance(model: nn.Module, bns, x: torch.Tensor, probes: int = 8, seed: int = 0) -> list[float]:
    """DDAQ's layer-importance prior per BatchNorm: the average Hessian trace of its producing layer,
    normalised to mean 1 over the layers that have one (floor 0.01); 1.0 where none is known."""
    prods = producers(model, bns, x)
    known = [m for m in prods if m is not None]
    if not known:
        return [1.0] * len(bns)
    uniq = list({id(m): m for m in known}.values())
    traces = dict(zip(map(id, uniq), hessian_trace(model, uniq, x, probes, seed)))
    vals = [traces[id(m)] for m in known]
    mean = sum(abs(v) for v in vals) / len(vals) or 1.0
    return [1.0 if m is None else max(traces[id(m)] / mean, 0.01) for m in prods]


def _frozen(model: nn.Module):
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    return params, flags


def _classes(model: nn.Module, shape) -> int:
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    return out.shape[1] if out.dim() == 2 else 1


def warm_up(model: nn.Module, shape, steps: int = 300, *, batch_size: int = 64, lr: float = 1e-3, ce: float = 1.0,
            latent: int = 64, width: int = 64, seed: int = 0, progress: bool = True) -> Generator:
    """Stage 1 without a quantized model: a generator trained ``steps`` Adam steps on discriminator 1
    (BN statistics, uniform layer weights, + ``ce`` x cross-entropy for classifiers) of the float
    ``model`` (eval mode, untouched)."""
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not valid; valid: an integer >= 1")
    torch.manual_seed(seed)
    model.eval()
    bns = bn_layers(model)
    classes = _classes(model, shape)
    g = Generator(shape, classes, latent, width)
    opt = torch.optim.Adam(g.parameters(), lr=lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    inputs: list = [None] * len(bns)
    hooks = [bn.register_forward_pre_hook(_keep(inputs, i)) for i, bn in enumerate(bns)]
    params, flags = _frozen(model)
    try:
        bar = tqdm(range(steps), desc="DDAQ generator warm-up", disable=not progress, leave=False)
        for _ in bar:
            _, _, l_bn, l_ce = generator_terms(g, model, inputs, bns, [1.0] * len(bns), ce, batch_size, gen)
            loss = l_bn + ce * l_ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return g


@torch.no_grad()
def sample(g: Generator, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """``n`` images from the generator (its BatchNorm on batch statistics, as in training), deterministic
    for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    g.train()
    out = []
    for start in range(0, n, batch_size):
        z, y = g.draw(min(batch_size, n - start), gen)
        out.append(g(z, y))
    return torch.cat(out)


def adversarial(qmodel: nn.Module, fmodel: nn.Module, g: Generator, steps: int = 500, *, batch_size: int = 64,
                lr_g: float = 1e-3, lr_q: float = 1e-4, beta: float = 0.1, ce: float = 1.0,
                layer_importance: bool = True, probes: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Stage 2, in place: ``steps`` alternations of a generator step and a quantized-model step (see the
    module docstring). ``qmodel`` is a calibrated quantized copy of ``fmodel`` whose BatchNorm layers sit
    at the same places. Returns the per-step losses and the layer weights used."""
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not valid; valid: an integer >= 1")
    if not lr_q > 0 or not lr_g > 0:
        raise ValueError(f"lr_g={lr_g!r}, lr_q={lr_q!r}: both must be positive numbers")
    fmodel.eval(), qmodel.eval()
    f_bns, q_bns = bn_layers(fmodel), bn_layers(qmodel)
    if len(f_bns) != len(q_bns):
        raise ValueError(f"the float model has {len(f_bns)} BatchNorm layers and the quantized one {len(q_bns)}")
    gen = torch.Generator().manual_seed(seed)
    if layer_importance:
        weights = importance(fmodel, f_bns, sample(g, batch_size, seed + 1), probes, seed)
    else:
        weights = [1.0] * len(f_bns)
    f_in: list = [None] * len(f_bns)
    q_in: list = [None] * len(q_bns)
    hooks = [bn.register_forward_pre_hook(_keep(f_in, i)) for i, bn in enumerate(f_bns)]
    hooks += [bn.register_forward_pre_hook(_keep(q_in, i)) for i, bn in enumerate(q_bns)]
    f_params, f_flags = _frozen(fmodel)
    q_params = [p for p in qmodel.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(g.parameters(), lr=lr_g, betas=(0.5, 0.999))
    opt_q = torch.optim.Adam(q_params, lr=lr_q)
    sched_q = cosine_schedule(opt_q, steps)
    hist = {"generator": [], "bn": [], "discrepancy": [], "quantized": []}
    try:
        bar = tqdm(range(steps), desc="DDAQ adversarial", disable=not progress, leave=False)
        for _ in bar:
            g.train()
            x, f_out, l_bn, l_ce = generator_terms(g, fmodel, f_in, f_bns, weights, ce, batch_size, gen)
            q_out = qmodel(x)
            l_dis = discrepancy(f_in, q_in, f_out, q_out, f_bns, weights)
            loss_g = l_bn + ce * l_ce - beta * l_dis
            grads = torch.autograd.grad(loss_g, list(g.parameters()))
            for p, gr in zip(g.parameters(), grads):
                p.grad = gr
            opt_g.step()
            # the quantized model learns on the same samples, detached (the float model's side is as computed)
            f_feat = [t.detach() for t in f_in]
            q_out = qmodel(x.detach())  # refills q_in
            l_q = discrepancy(f_feat, q_in, f_out.detach(), q_out, f_bns, weights)
            opt_q.zero_grad(set_to_none=True)
            l_q.backward()
            opt_q.step()
            sched_q.step()
            for k, v in (("generator", loss_g), ("bn", l_bn), ("discrepancy", l_dis), ("quantized", l_q)):
                hist[k].append(float(v.detach()))
            bar.set_postfix(bn=f"{hist['bn'][-1]:.3g}", q=f"{hist['quantized'][-1]:.3g}")
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(f_params, f_flags):
            p.requires_grad_(f)
        qmodel.eval()
    return {**hist, "layer_weights": weights}
