"""Simulated device shift: how much AUC a model loses when the images change the way a new
scanner would change them (gamma, contrast, noise, blur, lower resolution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHIFTS: dict[str, tuple[float, ...]] = {
    "gamma": (0.7, 1.5),
    "contrast": (0.6, 1.5),
    "noise": (0.03, 0.08),
    "blur": (1.0, 2.0),
    "downsample": (2.0, 4.0),
}


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def apply_shift(x: torch.Tensor, kind: str, strength: float, seed: int = 0) -> torch.Tensor:
    """Shift a batch (B, 1, H, W) in [0, 1]; deterministic given ``seed``."""
    if kind == "gamma":
        return x.clamp(0, 1) ** strength
    if kind == "contrast":
        mean = x.mean(dim=(2, 3), keepdim=True)
        return ((x - mean) * strength + mean).clamp(0, 1)
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return (x + strength * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "blur":
        k = _gaussian_kernel(strength)
        pad = len(k) // 2
        out = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(out, (0, 0, pad, pad), mode="replicate"), k.view(1, 1, -1, 1))
    if kind == "downsample":
        size = x.shape[-1]
        small = F.interpolate(x, scale_factor=1 / strength, mode="area")
        return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    raise ValueError(f"unknown shift {kind!r}; use one of {', '.join(SHIFTS)}")
