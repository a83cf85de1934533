"""Data-free calibration images: ``synthesize(model, method, n, seed)`` -> N x C x H x W in [0, 1].

Images start as uniform noise and are optimised (Adam with a cosine learning-rate decay, projected
back to [0, 1] after each step) so
that the statistics of every BatchNorm layer's input match the layer's running statistics, with the
model in eval mode:

- ``zeroq`` (ZeroQ, Cai et al. 2020): per-batch, per-channel mean and standard deviation of each BN
  input against running_mean and sqrt(running_var + eps);
  loss = sum over layers ||mu_b - mu||^2 + ||sigma_b - sigma||^2.
- ``dsg`` (DSG, Zhang et al. 2021), three changes for diversity:
  * slack distribution alignment: per-*sample* statistics, and a squared hinge that is zero inside
    margins, l = ||max(|mu_i - mu| - delta, 0)||^2 + ||max(|sigma_i - sigma| - gamma, 0)||^2 summed
    over samples and channels, / N. The margins are ``slack`` times the per-channel gap of the initial
    noise batch's mean statistics (computed once); the authors' public code loads its margins from
    files it does not ship, so this rule is ours.
  * layer-wise sample enhancement: sample i's residual at layer (i mod L) is doubled (4x its loss).
  * sample-correlation inhibition: ``sci`` x the mean squared correlation between different samples
    (flattened, mean-centred), which pushes samples apart. (The public code's version of this term is
    detached from the graph; this one has a gradient.)
- ``ddaq``: not optimised images but samples of a generator trained ``iters`` steps on the BatchNorm
  statistics (+ the float model's cross-entropy on the sampled class): DDAQ's first stage
  (``zoo.ptq.ddaq.warm_up``); its adversarial stage needs a quantized model (``zoo.ptq.ddaq.adversarial``,
  or ``python -m zoo.ptq calib=ddaq``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..wrapper import ZooModel

METHODS = ("zeroq", "dsg", "ddaq")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown data-free method {method!r}; valid: {list(METHODS)}")
    return method


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns:
        raise ValueError("data-free synthesis matches BatchNorm statistics, and this model has no "
                         "BatchNorm layer with running statistics")
    return bns


def _stats(x: torch.Tensor, per_sample: bool, eps: float):
    """(mean, std) of a BN input per channel: over (N, H, W), or per sample over (H, W)."""
    dims = tuple(range(2, x.ndim)) if per_sample else (0,) + tuple(range(2, x.ndim))
    mu = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return mu, torch.sqrt(var + eps)


def zeroq_loss(inputs: list[torch.Tensor], bns) -> torch.Tensor:
    total = 0.0
    for x, bn in zip(inputs, bns):
        mu, sd = _stats(x, False, bn.eps)
        total = total + ((mu - bn.running_mean) ** 2).sum() + ((sd - torch.sqrt(bn.running_var + bn.eps)) ** 2).sum()
    return total


def dsg_loss(inputs: list[torch.Tensor], bns, margins, enhance: bool = True) -> torch.Tensor:
    """Slack alignment with per-sample statistics (+ layer-wise sample enhancement)."""
    total = 0.0
    n_layers = len(bns)
    for li, (x, bn, (dm, ds)) in enumerate(zip(inputs, bns, margins)):
        mu, sd = _stats(x, True, bn.eps)  # N x C
        rm = torch.clamp((mu - bn.running_mean).abs() - dm, min=0)
        rs = torch.clamp((sd - torch.sqrt(bn.running_var + bn.eps)).abs() - ds, min=0)
        if enhance:
            w = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
            w[li::n_layers] = 2.0  # samples li, li + L, ... stress this layer
            rm, rs = rm * w, rs * w
        total = total + ((rm ** 2).sum() + (rs ** 2).sum()) / x.shape[0]
    return total


def slack_margins(x: torch.Tensor, bn, slack: float):
    """DSG's (delta, gamma) per channel: ``slack`` x the gap between the batch statistics of the initial
    noise batch's BN input ``x`` and the running ones."""
    mu, sd = _stats(x, False, bn.eps)
    return slack * (mu - bn.running_mean).abs(), slack * (sd - torch.sqrt(bn.running_var + bn.eps)).abs()


def correlation_loss(x: torch.Tensor) -> torch.Tensor:
    """Mean squared correlation (Pearson: cosine similarity of the mean-centred, flattened samples)
    between different samples. Centring keeps it from rewarding disjoint supports, which in [0, 1]
    would drive pixels to 0 and 1."""
    f = x.flatten(1)
    f = torch.nn.functional.normalize(f - f.mean(dim=1, keepdim=True), dim=1)
    g = f @ f.t()
    n = x.shape[0]
    if n < 2:
        return g.new_zeros(())
    off = g - torch.diag(torch.diag(g))
    return (off ** 2).sum() / (n * (n - 1))


def _input_shape(model: nn.Module, shape) -> tuple:
    if shape is not None:
        return tuple(shape)
    if isinstance(model, ZooModel):
        ic = model.input_contract
        if ic.get("size"):
            return (ic["channels"], *ic["size"])
    raise ValueError("the input shape is unknown: pass shape=(C, H, W)")


def synthesize(model: nn.Module, method: str = "dsg", n: int = 256, seed: int = 0, *, shape=None,
               iters: int = 500, lr: float = 0.1, batch_size: int = 256, slack: float = 0.1,
               sci: float = 0.1, progress: bool = True) -> torch.Tensor:
    """``n`` calibration images in [0, 1] (float32, N x C x H x W) for ``model`` (float, with BatchNorm),
    deterministic for ``seed``. See the module docstring for the methods."""
    from tqdm.auto import tqdm

    check_method(method)
    if n < 1 or iters < 1:
        raise ValueError(f"n={n} and iters={iters} must be >= 1")
    was_training = model.training
    model.eval()
    bns = bn_layers(model)
    c_h_w = _input_shape(model, shape)
    if method == "ddaq":
        from .ddaq import sample, warm_up

        g = warm_up(model, c_h_w, iters, batch_size=min(batch_size, 64), seed=seed, progress=progress)
        model.train(was_training)
        return sample(g, n, seed=seed, batch_size=min(batch_size, 64))
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.rand(b, *c_h_w, generator=gen).requires_grad_(True)
            inputs: list = [None] * len(bns)
            hooks = [bn.register_forward_pre_hook(_keep(inputs, i)) for i, bn in enumerate(bns)]
            try:
                margins = None
                if method == "dsg":
                    with torch.no_grad():
                        model(x)
                        margins = [slack_margins(t, bn, slack) for t, bn in zip(inputs, bns)]
                opt = torch.optim.Adam([x], lr=lr)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
                bar = tqdm(range(iters), desc=f"{method} synthesis {start // batch_size + 1}/"
                           f"{-(-n // batch_size)}", disable=not progress, leave=False)
                for _ in bar:
                    opt.zero_grad()
                    model(x)
                    if method == "zeroq":
                        loss = zeroq_loss(inputs, bns)
                    else:
                        loss = dsg_loss(inputs, bns, margins) + sci * correlation_loss(x)
                    loss.backward()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        x.clamp_(0.0, 1.0)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
            finally:
                for h in hooks:
                    h.remove()
            out.append(x.detach())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return torch.cat(out)


def _keep(store, i):
    def hook(mod, args):
        store[i] = args[0]
    return hook
