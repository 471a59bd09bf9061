"""A frontal chest radiograph phantom: anatomy plus findings, as an attenuation map.

Coordinates are normalised: x in [-1, 1] from image left (the patient's right) to image right,
y in [-1, 1] from top to bottom. The output is "density" in [0, 1] (1 = radio-opaque, shown
white); the site's acquisition (``acquisition.py``) turns it into detector values. Every
finding is drawn the way a radiologist would look for it, with a severity in (0, 1] so some
cases are subtle. ``render`` also returns the masks it drew, so tests can measure the anatomy
(e.g. the cardiothoracic ratio) from the geometry rather than trusting the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

AP_MAGNIFICATION = 1.10  # AP films magnify the heart (it is far from the detector)
NORMAL_CTR = (0.35, 0.43)  # x 1.10 on AP stays below 0.5 (0.473 + edge pixels)
CARDIOMEGALY_CTR = (0.54, 0.68)


@dataclass
class Anatomy:
    """One patient's body, sampled once and reused for every image of that patient."""

    body_half_width: float
    lung_half_width: float
    lung_centre: float
    apex: float
    dome: float  # hemidiaphragm level (right side, image left); left side is lower
    dome_curvature: float
    ctr: float
    rotation_deg: float
    soft_tissue: float
    vessel_seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator, *, sex: str, age: float) -> Anatomy:
        male = sex == "M"
        return cls(
            body_half_width=rng.uniform(0.84, 0.93) + (0.03 if male else 0.0),
            lung_half_width=rng.uniform(0.25, 0.29) + (0.01 if male else 0.0),
            lung_centre=rng.uniform(0.37, 0.41),
            apex=rng.uniform(-0.76, -0.68),
            dome=rng.uniform(0.40, 0.55),
            dome_curvature=rng.uniform(0.09, 0.14),
            ctr=min(rng.uniform(*NORMAL_CTR) * (1.0 + 0.0006 * max(age - 40.0, 0.0)),
                    NORMAL_CTR[1]),
            rotation_deg=rng.normal(0.0, 1.8),
            soft_tissue=rng.uniform(0.30, 0.40) + (0.02 if not male else 0.0),
            vessel_seed=int(rng.integers(2**31)),
        )


@dataclass
class Finding:
    severity: float  # (0, 1]: subtle ... obvious
    side: int  # -1: patient's right (image left), +1: patient's left (image right)
    x: float = 0.0  # location for focal findings, relative to the lung
    y: float = 0.0


@dataclass
class Rendered:
    image: np.ndarray  # float32 density in [0, 1]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # bool masks
    # Where each drawn finding is, as a radiologist would box it: (x0, y0, x1, y1) pixels
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of a bool mask's true pixels (x1, y1 exclusive); None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _soft(q: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (q < 1), 0 outside, with a soft edge of relative width ``edge``."""
    return np.clip((1.0 - q) / edge, 0.0, 1.0)


def _blob(X, Y, cx, cy, rx, ry=None):
    ry = rx if ry is None else ry
    return np.exp(-(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2))


def _smooth_noise(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
    return n / (n.std() + 1e-6)


def render(
    anatomy: Anatomy,
    findings: dict[str, Finding],
    size: int,
    rng: np.random.Generator,
    *,
    view: str = "PA",
    conspicuity: float = 1.0,
) -> Rendered:
    """Draw one frontal radiograph of ``anatomy`` with ``findings`` at ``size`` x ``size``."""
    a = anatomy
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    X0, Y0 = np.meshgrid(lin, lin)
    th = np.deg2rad(a.rotation_deg)
    X = np.cos(th) * X0 - np.sin(th) * Y0
    Y = np.sin(th) * X0 + np.cos(th) * Y0
    px = 2.0 / size  # one pixel in normalised units
    edge = max(2.5 * px, 0.01)

    # Volume changes decided by findings, before drawing.
    dome = {-1: a.dome, 1: a.dome + 0.04}
    curvature = a.dome_curvature
    lung_density = 0.30
    vessel_gain = 1.0
    if "Emphysema" in findings:
        s = findings["Emphysema"].severity
        dome = {k: v + 0.05 + 0.06 * s for k, v in dome.items()}
        curvature *= 1.0 - 0.6 * s  # flattened hemidiaphragms
        lung_density += 0.05 + 0.06 * s  # hyperlucency
        vessel_gain *= 1.0 - 0.5 * s  # pruned markings
    for name, lift in (("Atelectasis", 0.07), ("Fibrosis", 0.04)):
        if name in findings:
            f = findings[name]
            dome[f.side] -= lift * f.severity

    # Body and soft tissue (thicker centrally).
    body_q = (X / a.body_half_width) ** 2 + ((Y - 0.05) / 1.05) ** 2
    body = _soft(body_q, 0.04)
    density = body * (a.soft_tissue + 0.12 * (1 - np.clip(np.abs(X) / a.body_half_width, 0, 1)))

    # Lungs: ellipses cut by the hemidiaphragm domes.
    lungs = np.zeros_like(X)
    lung_masks = {}
    pleural = {}  # each lung's ellipse before the dome cut: where pleural fluid can collect
    for side in (-1, 1):
        cx = side * a.lung_centre
        hw = a.lung_half_width
        top = a.apex
        yc = (top + dome[side]) / 2 + 0.06
        hh = (dome[side] - top) / 2 + 0.06
        q = ((X - cx) / hw) ** 2 + ((Y - yc) / hh) ** 2
        dome_y = dome[side] - curvature * (1 - ((X - cx) / hw) ** 2)
        below = np.clip((Y - dome_y) / edge + 0.5, 0, 1)
        lung = _soft(q, 0.06) * (1 - below)
        pleural[side] = _soft(q, 0.06) * (1 - below)
        lung_masks[side] = lung > 0.5
        lungs = np.maximum(lungs, lung)
    density -= lung_density * lungs

    # Vessel-like markings, densest at the hila, fading to the periphery.
    vrng = np.random.default_rng(a.vessel_seed)
    texture = np.abs(_smooth_noise(vrng, X.shape, max(size / 180, 0.8)))
    ridges = np.exp(-((texture - 1.0) ** 2) / 0.08)
    hilum = np.zeros_like(X)
    for side in (-1, 1):
        hilum = np.maximum(hilum, np.exp(-np.hypot(X - side * 0.18, Y - (a.dome - 0.35)) / 0.3))
    markings = lungs * ridges * (0.05 + 0.06 * hilum) * vessel_gain
    if "Edema" in findings:  # vascular indistinctness
        markings = gaussian_filter(markings, size / 128)

    # Pneumothorax: no markings beyond the visceral pleural line, which is drawn thinly.
    ptx_mask = np.zeros_like(X, dtype=bool)
    if "Pneumothorax" in findings:
        f = findings["Pneumothorax"]
        side = f.side
        cx = side * a.lung_centre
        gap = 0.03 + 0.10 * f.severity
        hw, top = a.lung_half_width, a.apex
        yc = (top + dome[side]) / 2 + 0.06
        hh = (dome[side] - top) / 2 + 0.06
        inner_q = ((X - cx + side * gap * 0.6) / (hw - gap)) ** 2 + (
            (Y - yc - gap * 0.8) / (hh - gap)
        ) ** 2
        inner = inner_q < 1
        lateral = (X - cx) * side > -0.5 * hw
        ptx_mask = lung_masks[side] & ~inner & lateral
        markings = np.where(ptx_mask, 0.0, markings)
        density -= 0.05 * ptx_mask
        line = np.exp(-(((np.sqrt(inner_q) - 1) * (hw - gap)) / (1.2 * px)) ** 2)
        density += 0.10 * line * lateral * lung_masks[side]
    density += markings

    # Heart and mediastinum.
    thorax_width = 2 * (a.lung_centre + a.lung_half_width)
    ctr = a.ctr * (AP_MAGNIFICATION if view == "AP" else 1.0)
    heart_hw = ctr * thorax_width / 2
    heart_cx = 0.2 * heart_hw  # sits more to the patient's left
    heart_cy = min(dome.values()) - 0.10
    heart_q = ((X - heart_cx) / heart_hw) ** 2 + ((Y - heart_cy) / 0.30) ** 2
    heart = _soft(heart_q, 0.05) * np.clip((dome[1] + 0.02 - Y) / (2 * px), 0, 1)
    medi = _soft((X / 0.12) ** 2 + ((Y - (heart_cy - 0.55)) / 0.55) ** 2, 0.15)
    central = np.maximum(heart, medi)
    density += 0.20 * central + 0.12 * central * lungs

    # Spine with vertebral bodies, ribs, clavicles.
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (Y + 1) / 0.13)
    spine = _soft((X / 0.055) ** 2, 0.2) * (Y > -0.95)
    density += spine * (0.08 + 0.05 * vert)
    ribs = np.zeros_like(X)
    lung_h = min(dome.values()) - a.apex
    for side in (-1, 1):
        u = (X * side - 0.05) / (a.lung_centre + a.lung_half_width)
        inside = (u > 0) & (u < 1.12)
        for k in range(10):
            yk = a.apex - 0.04 + k * lung_h * 0.115
            curve = yk - 0.10 * u + 0.28 * u**2
            ribs = np.maximum(ribs, inside * np.exp(-(((Y - curve) / 0.022) ** 2)))
    for side in (-1, 1):
        u = (X * side - 0.07) / 0.5
        curve = a.apex - 0.06 + 0.06 * u - 0.05 * u**2
        clav = (u > 0) & (u < 1)
        ribs = np.maximum(ribs, 1.4 * clav * np.exp(-(((Y - curve) / 0.028) ** 2)))
    density += 0.09 * ribs * body

    masks = {
        "lungs": lungs > 0.5,
        "heart": heart > 0.5,
        "mediastinum": medi > 0.5,
        "pneumothorax": ptx_mask,
    }
    # ``conspicuity`` scales the opacity every drawn finding adds (1: as a radiologist sees
    # it; the known-answer scenarios use more, so a small model learns them in minutes).
    boxes: dict[str, tuple[int, int, int, int]] = {}
    density += conspicuity * _draw_findings(X, Y, findings, anatomy, dome, lung_masks, pleural,
                                            lungs, size, rng, masks, boxes)
    for name, mask in (("Cardiomegaly", masks["heart"]), ("Pneumothorax", ptx_mask)):
        # the heart is boxed always; the caller keeps the box only where it is enlarged
        if (name in findings or name == "Cardiomegaly") and (box := bounding_box(mask)):
            boxes[name] = box
    img = np.clip(density, 0.0, 1.0).astype(np.float32)
    return Rendered(image=img, masks=masks, boxes=boxes)


def _lung_point(a: Anatomy, f: Finding, dome: dict[int, float]) -> tuple[float, float]:
    """A point inside the lung for a focal finding (f.x, f.y in [0, 1])."""
    cx = f.side * a.lung_centre + (f.x - 0.5) * 1.2 * a.lung_half_width
    cy = a.apex + 0.12 + f.y * (dome[f.side] - a.apex - 0.25)
    return cx, cy


def _draw_findings(X, Y, findings, a, dome, lung_masks, pleural, lungs, size, rng, masks,
                   boxes):
    """The opacity every finding adds; each finding's box (where it adds at least a tenth of
    its own peak) goes into ``boxes``."""
    add = np.zeros_like(X)
    px = 2.0 / size
    for name, f in findings.items():
        before = add.copy()
        _draw_one(name, f, X, Y, a, dome, lung_masks, pleural, lungs, size, rng, masks, add, px)
        delta = np.abs(add - before)
        if delta.max() > 0 and (box := bounding_box(delta >= delta.max() / 10)) is not None:
            boxes[name] = box
    return add


def _draw_one(name, f, X, Y, a, dome, lung_masks, pleural, lungs, size, rng, masks, add, px):
    """Draw one finding into ``add`` (in place)."""
    s = f.severity
    cx_lung = f.side * a.lung_centre
    hw = a.lung_half_width
    side_lung = lung_masks[f.side].astype(np.float32)
    if name == "Effusion":
        # Fluid in the costophrenic recess: a meniscus rising laterally, blunting the angle.
        level = dome[f.side] - (0.06 + 0.22 * s)
        lateral = np.clip((X - cx_lung) * f.side / hw, 0, 1)
        surface = level - 0.10 * s * lateral**2
        fluid = np.clip((Y - surface) / (3 * px), 0, 1) * pleural[f.side]
        add += (0.22 + 0.12 * s) * fluid
        masks["effusion"] = fluid > 0.5
    elif name in ("Nodule", "Mass"):
        cx, cy = _lung_point(a, f, dome)
        if name == "Nodule":
            r = 0.014 + 0.022 * s
            add += (0.10 + 0.10 * s) * _blob(X, Y, cx, cy, r) * lungs
        else:
            r = 0.06 + 0.08 * s
            ang = np.arctan2(Y - cy, X - cx)
            lob = 1 + 0.15 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.1 * np.sin(5 * ang)
            q = np.hypot(X - cx, Y - cy) / (r * lob)
            add += (0.18 + 0.12 * s) * _soft(q, 0.25)
        masks[name.lower()] = _blob(X, Y, cx, cy, r) > 0.5
    elif name in ("Consolidation", "Pneumonia", "Infiltration"):
        cx, cy = _lung_point(a, f, dome)
        spread = {"Consolidation": 0.16, "Pneumonia": 0.20, "Infiltration": 0.30}[name]
        amp = {"Consolidation": 0.16, "Pneumonia": 0.12, "Infiltration": 0.07}[name]
        region = _blob(X, Y, cx, cy, spread * (0.6 + 0.6 * s), spread * (0.5 + 0.5 * s))
        patch = _smooth_noise(rng, X.shape, size / (40 if name != "Infiltration" else 90))
        patchy = np.clip(patch + 0.6, 0, 2) / 2
        add += (amp + 0.10 * s) * region * patchy * side_lung
    elif name == "Atelectasis":
        # Plate-like (discoid) band in the lower zone, with ipsilateral volume loss above.
        cy = dome[f.side] - 0.10 - 0.08 * f.y
        tilt = (f.x - 0.5) * 0.2
        band = np.exp(-(((Y - cy - tilt * (X - cx_lung)) / (0.012 + 0.02 * s)) ** 2))
        add += (0.16 + 0.12 * s) * band * side_lung
    elif name == "Edema":
        # Bilateral perihilar "bat-wing" haze.
        haze = np.zeros_like(X)
        for side in (-1, 1):
            haze += _blob(X, Y, side * 0.22, a.dome - 0.32, 0.20 + 0.06 * s, 0.24)
        add += (0.07 + 0.09 * s) * haze * lungs
    elif name == "Fibrosis":
        # Coarse reticulation, basal and peripheral.
        fine = np.abs(_smooth_noise(rng, X.shape, max(size / 256, 0.7)))
        reticular = np.exp(-((fine - 1.0) ** 2) / 0.05)
        periphery = np.clip((np.abs(X) - 0.3) / 0.35, 0, 1)
        basal = np.clip((Y - (a.apex + 0.5)) / 0.6, 0, 1)
        add += (0.06 + 0.06 * s) * reticular * periphery * basal * lungs
    elif name == "Pleural_Thickening":
        lat = (X - cx_lung) * f.side
        wall = np.exp(-(((lat - hw * 0.95) / (0.015 + 0.02 * s)) ** 2)) * (Y < dome[f.side])
        apical = _blob(X, Y, cx_lung, a.apex + 0.04, hw * 0.8, 0.03 + 0.02 * s)
        add += (0.14 + 0.08 * s) * np.maximum(wall, apical) * (
            _soft(((X - cx_lung) / (hw * 1.15)) ** 2, 0.2)
        )
    elif name == "Hernia":
        # Hiatal hernia: retrocardiac round opacity with an air-fluid level.
        cx, cy, r = 0.02, min(dome.values()) - 0.08, 0.05 + 0.04 * s
        sac = _soft((np.hypot(X - cx, Y - cy) / r) ** 2, 0.2)
        air = sac * (Y < cy - 0.2 * r)
        add += 0.10 * sac - 0.16 * air
    # Cardiomegaly, Emphysema and Pneumothorax change the anatomy itself (see render).
