"""Grad-CAM (Selvaraju et al. 2017) on the last dense block, per predicted pathology.

Overlays are written to a folder on the site's own disk and never put in a message: they are
images of patients. The model's forward must not use in-place ops (see common.model), or the
hooked activation would be overwritten before the gradient arrives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.labels import LABELS


def gradcam_labels(model: torch.nn.Module, x: torch.Tensor, labels: list[int]) -> np.ndarray:
    """Grad-CAM maps (len(labels), B, H, W) at input resolution for a batch (B, 1, H, W).

    One forward for the batch and one backward per label (the graph is kept between them):
    in eval mode no layer mixes images (batch norm uses its running statistics, group norm
    is per image), so the gradient of the sum of the batch's logits is each image's own.
    Each map is normalised min-max to [0, 1] on its own, as pytorch-grad-cam does (a
    constant map is all zeros)."""
    model.eval()
    store: dict[str, torch.Tensor] = {}
    layer = model.features  # output of the last dense block + norm5

    def keep(_m, _i, out):
        store["act"] = out

    handle = layer.register_forward_hook(keep)
    maps = []
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            logits = model(x)
            act = store["act"]
            for n, label in enumerate(labels):
                (grad,) = torch.autograd.grad(logits[:, label].sum(), act,
                                              retain_graph=n < len(labels) - 1)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * act).sum(dim=1, keepdim=True)).detach()
                maps.append(F.interpolate(cam, size=x.shape[-2:], mode="bilinear",
                                          align_corners=False)[:, 0].cpu().numpy())
    finally:
        handle.remove()
    cam = np.stack(maps) if maps else np.zeros((0, *x.shape[:1], *x.shape[-2:]))
    lo = cam.min(axis=(2, 3), keepdims=True)
    hi = cam.max(axis=(2, 3), keepdims=True)
    span = hi - lo
    flat = span <= 1e-5 * np.maximum(np.abs(hi), 1e-12)  # constant up to rounding: no map
    return np.where(flat, 0.0, (cam - lo) / np.where(flat, 1, span)).astype(np.float32)


def gradcam_batch(model: torch.nn.Module, x: torch.Tensor, label_index: int) -> np.ndarray:
    """Grad-CAM maps (B, H, W) of one label for a batch (see ``gradcam_labels``)."""
    return gradcam_labels(model, x, [label_index])[0]


def gradcam(model: torch.nn.Module, x: torch.Tensor, label_index: int) -> np.ndarray:
    """Heatmap (H, W) in [0, 1] for one image (1, 1, H, W) and one label."""
    return gradcam_batch(model, x, label_index)[0]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Grey radiograph with the heatmap in red-yellow on top."""
    grey = np.stack([image] * 3, axis=-1)
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1)
    mix = (1 - alpha * heat[..., None]) * grey + alpha * heat[..., None] * colour
    return Image.fromarray(np.clip(mix * 255, 0, 255).astype(np.uint8))


def write_overlays(model, images: torch.Tensor, probs: np.ndarray, thresholds: dict[str, float],
                   out_dir: Path, ids: list[str]) -> int:
    """One PNG per (image, label above its threshold) under ``out_dir``; returns the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(len(images)):
        for k, label in enumerate(LABELS):
            if label in thresholds and probs[i, k] >= thresholds[label]:
                heat = gradcam(model, images[i : i + 1], k)
                overlay(images[i, 0].numpy(), heat).save(out_dir / f"{ids[i]}_{label}.png")
                written += 1
    return written
