"""Super-resolution metrics exactly as basicsr defines them (checked against ``basicsr.metrics`` in
the tests): PSNR and SSIM on the Y channel (ITU-R BT.601) of uint8 RGB images, ``border`` pixels
cropped."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Y_WEIGHTS = (65.481, 128.553, 24.966)  # ITU-R BT.601, RGB order, on [0, 1] inputs


def y_channel(img: np.ndarray) -> np.ndarray:
    """uint8 RGB HxWx3 -> Y in [16, 235] (float64), basicsr's ``rgb2ycbcr(..., y_only=True) * 255``."""
    x = img.astype(np.float64) / 255.0
    return x @ np.array(Y_WEIGHTS) + 16.0


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border > 0 else y


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR (dB) between two uint8 RGB images on the Y channel, ``border`` pixels cropped."""
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")
    mse = np.mean((_crop(y_channel(sr), border) - _crop(y_channel(hr), border)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM on the Y channel (Wang et al.: 11x11 Gaussian, sigma 1.5, valid region), border cropped."""
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")
    a = torch.from_numpy(_crop(y_channel(sr), border))[None, None]
    b = torch.from_numpy(_crop(y_channel(hr), border))[None, None]
    w = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a ** 2
    var_b = F.conv2d(b * b, w) - mu_b ** 2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
