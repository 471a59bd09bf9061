"""Does the model look at the finding (H3)? Grad-CAM against annotated boxes, at the site.

For each label, on positive images (by the reference standard) that have boxes of that label
(at most ``max_images``, the first ones in the site's order), each model's Grad-CAM map is
compared with the boxes:

- pointing game (Zhang et al. 2016): a hit when the map's maximum lies inside a box;
- IoU of the map thresholded at 0.5 with the union of the boxes;

and on images with ``Marker`` boxes (burned-in markers) the share of the map's mass inside
them: shortcut reliance, the failure of Zech et al. 2018, measured.

Each figure is a mean over images with a 95% CI from the cluster-robust (sandwich) standard
error of a mean, clustered by patient. Only these aggregates leave the site; the maps stay
(written as overlays under the site's own folder when the node config asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.evaluation.delong import critical_z
from common.evaluation.gradcam import gradcam_labels, overlay
from common.labels import LABELS, MARKER_LABEL

MIN_SIZE = 64  # DenseNet-121 downsamples 32x: 64 px gives a 2 x 2 map, 224 px 7 x 7


@dataclass(frozen=True)
class LocalisationOptions:
    max_images: int = 100  # per label (run config gradcam-max-images)
    batch_size: int = 16
    min_cell: int = 10  # no figure rests on fewer images (node config min-cell)
    level: float = 0.95
    overlays: Path | None = None  # where overlays go (node config gradcam-overlays); None: none
    device: str = "cpu"


def box_mask(boxes: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies inside any (x0, y0, x1, y1) box."""
    c = np.arange(size) + 0.5
    mask = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= ((c[:, None] >= y0) & (c[:, None] <= y1)) & ((c[None, :] >= x0)
                                                              & (c[None, :] <= x1))
    return mask


def pointing_hit(heat: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum is in the mask; an all-zero map points nowhere. Ties: the
    maximal pixel nearest the image centre. A coarse map upsampled (bilinear, half-pixel
    centres) peaks at its hottest cell's centre, but a border cell's value runs flat from
    its centre out to the image edge: the first maximum in row-major order, or the plateau's
    centroid, would point at the corner; the one nearest the centre is the cell's centre."""
    top = heat.max()
    if top <= 0:
        return False
    ys, xs = np.nonzero(heat >= top - 1e-6)
    cy, cx = (heat.shape[0] - 1) / 2, (heat.shape[1] - 1) / 2
    j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return bool(mask[ys[j], xs[j]])


def iou(heat: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of ``heat >= threshold`` with the mask."""
    hot = heat >= threshold
    union = np.sum(hot | mask)
    return float(np.sum(hot & mask) / union) if union else 0.0


def mass_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """The share of the map's total mass inside the mask (0 for an empty map)."""
    total = float(heat.sum())
    return float(heat[mask].sum() / total) if total > 0 else 0.0


def clustered_mean(values: np.ndarray, clusters: np.ndarray, level: float = 0.95
                   ) -> tuple[float, float, float]:
    """Mean with a CI from the cluster-robust standard error (clusters: patients)."""
    values = np.asarray(values, float)
    n = len(values)
    mean = float(values.mean())
    resid = pd.Series(values - mean).groupby(np.asarray(clusters)).sum().to_numpy()
    g = len(resid)
    se = float(np.sqrt(np.sum(resid**2) * g / max(g - 1, 1))) / n if g > 1 else float("nan")
    z = critical_z(level)
    if not np.isfinite(se):
        return mean, float("nan"), float("nan")
    return mean, mean - z * se, mean + z * se


def _maps(model: torch.nn.Module, images: np.ndarray, scale: float, labels: list[int],
          options: LocalisationOptions) -> np.ndarray:
    """(len(labels), N, S, S) Grad-CAM maps, a batch at a time."""
    out = []
    for start in range(0, len(images), options.batch_size):
        x = torch.from_numpy(np.asarray(images[start:start + options.batch_size],
                                        dtype=np.float32) / scale)[:, None]
        out.append(gradcam_labels(model, x.to(options.device), labels))
    return (np.concatenate(out, axis=1) if out
            else np.zeros((len(labels), 0) + images.shape[1:], dtype=np.float32))


def localise(model: torch.nn.Module, images: np.ndarray, scale: float, boxes: pd.DataFrame,
             reference: np.ndarray, clusters: np.ndarray, *, site: str, model_name: str,
             options: LocalisationOptions | None = None, rows: np.ndarray | None = None
             ) -> dict[str, list[dict]]:
    """Localisation and shortcut rows for one model. ``images`` are the cache's (N, S, S)
    array, ``boxes`` its boxes (``row`` indexes ``images``), ``reference`` (N, 14) the labels
    positives are taken from; ``rows`` limits the images used (e.g. a test split)."""
    options = options or LocalisationOptions()
    size = images.shape[-1]
    if size < MIN_SIZE:
        return {"localisation": [], "shortcut": [], "localisation_skipped": [{
            "site": site, "model": model_name,
            "reason": f"images of {size} px: DenseNet's last block is one cell, so Grad-CAM "
                      f"has no spatial map (at least {MIN_SIZE} px)"}]}
    allowed = np.arange(len(images)) if rows is None else np.asarray(rows)
    boxes_of: dict[tuple[int, str], np.ndarray] = {
        (int(r), str(lb)): g[["x0", "y0", "x1", "y1"]].to_numpy(dtype=float)
        for (r, lb), g in boxes.groupby(["row", "label"])} if len(boxes) else {}
    loc_rows, shortcut_rows = [], []
    model = model.to(options.device).eval()

    def release(n: int) -> bool:
        return n >= options.min_cell

    for k, label in enumerate(LABELS):
        chosen = [int(r) for r in allowed if reference[r, k] == 1
                  and (int(r), label) in boxes_of][: options.max_images]
        if not chosen:
            continue
        heat = _maps(model, images[chosen], scale, [k], options)[0]
        hits, ious = [], []
        empty = int(np.sum(heat.max(axis=(1, 2)) <= 0))  # no positive evidence anywhere
        for j, r in enumerate(chosen):
            mask = box_mask(boxes_of[(r, label)], size)
            hits.append(float(pointing_hit(heat[j], mask)))
            ious.append(iou(heat[j], mask))
        _write_overlays(options, model_name, label, images[chosen], scale, heat, chosen)
        row = {"site": site, "model": model_name, "label": label, "n_images": len(chosen),
               "empty_maps": empty}
        if release(len(chosen)):
            cl = clusters[chosen]
            h, h_lo, h_hi = clustered_mean(np.array(hits), cl, options.level)
            m, m_lo, m_hi = clustered_mean(np.array(ious), cl, options.level)
            row.update(hit_rate=h, hit_low=max(h_lo, 0.0), hit_high=min(h_hi, 1.0), iou=m,
                       iou_low=max(m_lo, 0.0), iou_high=min(m_hi, 1.0), status="ok")
        else:
            row["status"] = f"fewer than {options.min_cell} images (min-cell): not released"
        loc_rows.append(row)
    marked = [int(r) for r in allowed
              if (int(r), MARKER_LABEL) in boxes_of][: options.max_images]
    if marked:
        masks = [box_mask(boxes_of[(r, MARKER_LABEL)], size) for r in marked]
        # NaN: an empty map (no positive evidence for the label on that image) has no mass to
        # place; it is left out of the share, not counted as "nothing on the markers"
        shares = np.full((len(LABELS), len(marked)), np.nan)
        for start in range(0, len(marked), options.batch_size):  # a batch's maps at a time
            part = marked[start:start + options.batch_size]
            heat = _maps(model, images[part], scale, list(range(len(LABELS))), options)
            for j in range(len(part)):
                for k in range(len(LABELS)):
                    if heat[k, j].max() > 0:
                        shares[k, start + j] = mass_inside(heat[k, j], masks[start + j])
        for k, label in enumerate(LABELS):
            used = ~np.isnan(shares[k])
            row = {"site": site, "model": model_name, "label": label,
                   "n_images": int(used.sum()), "empty_maps": int((~used).sum())}
            if release(int(used.sum())):
                s, lo, hi = clustered_mean(shares[k][used], clusters[marked][used],
                                           options.level)
                row.update(marker_share=s, share_low=max(lo, 0.0), share_high=min(hi, 1.0),
                           marker_area=float(np.mean([m.mean() for m, u in zip(masks, used,
                                                                               strict=True)
                                                      if u])), status="ok")
            else:
                row["status"] = f"fewer than {options.min_cell} images (min-cell): not released"
            shortcut_rows.append(row)
    return {"localisation": loc_rows, "shortcut": shortcut_rows}


def _write_overlays(options: LocalisationOptions, model_name: str, label: str,
                    images: np.ndarray, scale: float, heat: np.ndarray, rows: list) -> None:
    """Overlays on the site's own disk (never in a message), when the node config asks."""
    if options.overlays is None:
        return
    folder = options.overlays / "".join(c if c.isalnum() or c in "-_." else "_"
                                        for c in model_name)
    folder.mkdir(parents=True, exist_ok=True)
    for j, r in enumerate(rows):
        overlay(images[j] / scale, heat[j]).save(folder / f"img{int(r):05d}_{label}.png")
