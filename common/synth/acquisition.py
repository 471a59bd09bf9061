"""A site's equipment: density -> displayed intensity in [0, 1] (white = dense).

Blur (focal spot, detector resolution), a vendor intensity curve (gamma, contrast,
brightness), quantum noise, collimation borders and burned-in markers. The optional shortcut
token is what Zech et al. 2018 warned about: something in the image that tells the model the
label at one site (a "portable" token put on films of sick patients) and means nothing
anywhere else.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from common.synth.profiles import Acquisition

# 5x3 glyphs for burned-in letters.
GLYPHS = {
    "L": ["100", "100", "100", "100", "111"],
    "R": ["110", "101", "110", "101", "101"],
    "P": ["110", "101", "110", "100", "100"],
}


def _stamp(img: np.ndarray, text: str, top: int, left: int, cell: int, value: float) -> None:
    """Burn ``text`` into ``img`` as blocky letters (what a lead marker looks like)."""
    for k, ch in enumerate(text):
        glyph = GLYPHS[ch]
        for r, row in enumerate(glyph):
            for c, bit in enumerate(row):
                if bit == "1":
                    y, x = top + r * cell, left + (k * 4 + c) * cell
                    img[y : y + cell, x : x + cell] = value


def marker_boxes(size: int, marker: str, shortcut_token: bool
                 ) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of every burned-in marker ``acquire`` draws at this size: the
    laterality letter (unless ``marker`` is none) and the shortcut token."""
    cell = max(1, size // 96)
    boxes = []
    if marker != "none":
        top = int(size * 0.04)
        left = int(size * 0.06) if marker == "tl" else int(size * 0.94) - 3 * cell
        boxes.append((left, top, left + 3 * cell, top + 5 * cell))
    if shortcut_token:
        top, left, c = int(size * 0.86), int(size * 0.08), cell + 1
        boxes.append((left, top, left + 3 * c, top + 5 * c))
    return boxes


def acquire(
    density: np.ndarray,
    acq: Acquisition,
    rng: np.random.Generator,
    *,
    laterality_marker: bool = True,
    shortcut_token: bool = False,
) -> np.ndarray:
    size = density.shape[0]
    img = density
    if acq.blur_px > 0:
        img = gaussian_filter(img, acq.blur_px * size / 256)
    img = np.clip((img - 0.5) * acq.contrast + 0.5 + acq.brightness, 0, 1) ** acq.gamma
    # Quantum noise: stronger where fewer photons arrive (dense regions are bright).
    noise = rng.standard_normal(img.shape).astype(np.float32)
    img = img + acq.noise * noise * (0.6 + 0.8 * img)
    img = np.clip(img, 0, 1).astype(np.float32)

    cell = max(1, size // 96)
    if laterality_marker and acq.marker != "none":
        top = int(size * 0.04)
        left = int(size * 0.06) if acq.marker == "tl" else int(size * 0.94) - 3 * cell
        _stamp(img, "R" if acq.marker == "tl" else "L", top, left, cell, 1.0)
    if shortcut_token:
        # A "P" (portable) token low on the image: bright, unmistakable to a CNN.
        _stamp(img, "P", int(size * 0.86), int(size * 0.08), cell + 1, 1.0)
    if acq.collimation > 0:
        w = int(round(size * acq.collimation * rng.uniform(0.6, 1.4)))
        if w > 0:
            for sl in (np.s_[:, :w], np.s_[:, size - w :], np.s_[:w, :]):
                img[sl] = 0.97  # unexposed detector behind the collimator blades
    return img
