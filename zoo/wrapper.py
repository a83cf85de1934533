"""``ZooModel``: an architecture plus the metadata that makes it a self-describing checkpoint.

It takes float images in [0, 1] (N x C x H x W), checks them against its input contract,
normalises internally and runs the wrapped network ``net`` (which ``quantize`` rewrites).
"""
from __future__ import annotations

import torch
from torch import nn

from .quantizers.config import QuantConfig


RANGE_SLACK = 1e-3  # resampling (bicubic, antialiasing) overshoots [0, 1] slightly


class ZooModel(nn.Module):
    def __init__(self, net: nn.Module, arch: str, model_args: dict, task: str,
                 input_contract: dict, quant: QuantConfig | None = None):
        super().__init__()
        self.net = net
        self.arch, self.model_args, self.task = arch, dict(model_args), task
        self.input_contract = dict(input_contract)
        self.quant = quant
        c = input_contract["channels"]
        mean = torch.tensor(input_contract.get("mean", [0.0] * c), dtype=torch.float32)
        std = torch.tensor(input_contract.get("std", [1.0] * c), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, c, 1, 1), persistent=False)

    def check_input(self, x: torch.Tensor) -> None:
        ic = self.input_contract
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"expected a float tensor of images in [0, 1], got "
                            f"{type(x).__name__ if not torch.is_tensor(x) else x.dtype}")
        if x.ndim != 4 or x.shape[1] != ic["channels"]:
            raise ValueError(f"expected images of shape N x {ic['channels']} x H x W, got {tuple(x.shape)}")
        # the range is checked in eval mode (training data comes from the DataModules, in range, and
        # skipping it there avoids a device sync per step); not while a CUDA graph is being captured,
        # where reading the values back (a sync) is not allowed, nor inside a torch.compile trace (a
        # check on the values would split the graph)
        if not self.training and x.numel() and not torch.compiler.is_compiling() \
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = torch.aminmax(x.detach())
            if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
                raise ValueError(f"expected images in [0, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]"
                                 + (" (0-255 images: divide by 255)" if hi > 2 else ""))
        size = ic.get("size")
        if size and tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(f"this model takes {size[0]} x {size[1]} images, got "
                             f"{x.shape[-2]} x {x.shape[-1]} (resize them first)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.net((x - self.mean) / self.std)

    def config(self) -> dict:
        return {
            "arch": self.arch,
            "model_args": self.model_args,
            "task": self.task,
            "input_contract": self.input_contract,
            "quant": self.quant.to_dict() if self.quant is not None else None,
        }
