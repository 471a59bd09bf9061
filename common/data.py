"""Torch datasets over a site cache: patient-level splits and light augmentation.

Splits are a pure function of (patient id, seed), so every process that opens the same cache
agrees on them without storing anything, and no patient is ever in two splits. A manifest's own
split column wins where it is given.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from common.cache import SiteCache

DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _unit_hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(
    index: pd.DataFrame, seed: int = 0, fractions: dict[str, float] | None = None
) -> pd.Series:
    """train / val / test per row: the manifest's split where given, else by patient hash.

    A patient is never in two splits: a blank row takes the split given on another row of
    its patient (the first, where the manifest disagrees with itself; ``site check`` reports
    that as ``patient_in_two_splits``)."""
    fractions = fractions or DEFAULT_FRACTIONS
    names = list(fractions)
    edges = np.cumsum([fractions[n] for n in names])
    edges = edges / edges[-1]

    def by_patient(pid: str) -> str:
        u = _unit_hash(f"{seed}:{pid}")
        return names[int(np.searchsorted(edges, u, side="right").clip(max=len(names) - 1))]

    given = index["split"].fillna("").astype(str)
    known = given[given != ""].sort_index()
    first = known.groupby(index["patient_id"][known.index]).first().to_dict()
    return pd.Series(
        [first.get(p) or by_patient(p) for p in index["patient_id"]],
        index=index.index,
        name="split",
    )


class CachedImages(Dataset):
    """(image 1xSxS float32 in [0, 1], labels 14 float32 with NaN) for the given cache rows."""

    def __init__(self, cache: SiteCache, rows: np.ndarray | None = None) -> None:
        self.cache = cache
        self.rows = np.arange(len(cache.index)) if rows is None else np.asarray(rows)
        self._labels = torch.from_numpy(cache.labels()[self.rows])
        self._scale = float(cache.scale)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = np.asarray(self.cache.images[self.rows[i]], dtype=np.float32) / self._scale
        return torch.from_numpy(img).unsqueeze(0), self._labels[i]

    def labels(self) -> np.ndarray:
        return self._labels.numpy()


class PatientImages(Dataset):
    """One item per patient: an image of that patient drawn uniformly at random each time
    the patient is sampled. Under patient-level DP the sampler draws patients (each with
    probability q per step) and each sampled patient adds exactly one clipped gradient, so a
    patient's whole record (however many images) is what the guarantee protects. The draw
    uses its own generator, independent of the data."""

    def __init__(self, images: CachedImages, seed: int = 0) -> None:
        self.images = images
        self.groups = patient_groups(images)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.groups[p]
        return self.images[int(rows[self._rng.integers(len(rows))])]

    def labels(self) -> np.ndarray:
        return self.images.labels()


def patient_groups(images: CachedImages) -> list[np.ndarray]:
    """Positions in ``images`` of each patient's images (patients in first-seen order)."""
    codes, _ = pd.factorize(images.cache.index["patient_id"].to_numpy()[images.rows])
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, bounds) if len(order) else []


def split_datasets(cache: SiteCache, seed: int = 0) -> dict[str, CachedImages]:
    """One dataset per split (train / val / test), split by patient."""
    splits = assign_splits(cache.index, seed).to_numpy()
    return {name: CachedImages(cache, np.flatnonzero(splits == name))
            for name in DEFAULT_FRACTIONS}


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotate_deg: float = 7.0,
    max_scale: float = 0.07,
    max_translate: float = 0.05,
    max_brightness: float = 0.08,
    max_contrast: float = 0.15,
) -> torch.Tensor:
    """Small random affine + brightness/contrast per image, on the whole batch at once.

    No horizontal flip: laterality matters on a chest radiograph (heart on the left).
    """
    n = x.shape[0]
    if n == 0:
        return x

    def u(scale: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * scale

    angle = u(max_rotate_deg * math.pi / 180)
    scale = 1 + u(max_scale)
    tx, ty = u(max_translate), u(max_translate)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = (1 + u(max_contrast)).view(n, 1, 1, 1)
    brightness = u(max_brightness).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp(0, 1)
