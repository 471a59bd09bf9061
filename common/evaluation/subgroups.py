"""Metrics by subgroup (sex, age band, view, manufacturer) at the fixed thresholds.

A subgroup below ``min_size`` images, or without both classes, is reported as too small /
not estimable rather than as a noisy number; the gap is to the best estimable subgroup.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.evaluation.delong import NotEstimable, auc_ci
from common.evaluation.metrics import at_threshold

AGE_BANDS = ((0, 20, "0-20"), (20, 40, "20-40"), (40, 60, "40-60"), (60, 80, "60-80"),
             (80, 200, "80+"))
ATTRIBUTES = ("sex", "age_band", "view", "manufacturer")


def age_band(age: float) -> str:
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return "unknown"
    for lo, hi, name in AGE_BANDS:
        if lo <= age < hi:
            return name
    return "unknown"


def subgroups(meta: pd.DataFrame) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Each attribute's groups (sorted) and which images are in each: the same for every
    model and label of a site, so found once (pandas' per-column work was most of the
    held-out statistics' time when it was repeated for each)."""
    frame = meta.assign(age_band=[age_band(a) for a in meta["age"]])
    out = {}
    for attr in ATTRIBUTES:
        values = frame[attr].fillna("").astype(str).replace("", "unknown").to_numpy()
        out[attr] = [(group, values == group) for group in sorted(set(values))]
    return out


def subgroup_table(groups: dict[str, list[tuple[str, np.ndarray]]], y: np.ndarray,
                   score: np.ndarray, threshold: float, *, min_size: int = 30,
                   min_cell: int = 10) -> list[dict]:
    """Rows of attribute, group, n, prevalence, auc, ci, sensitivity, specificity, gap, over
    the site's ``subgroups``. A group of fewer than ``min_cell`` images releases neither its
    size nor its prevalence (a cell of 4 is four patients' data in disguise)."""
    rows = []
    for attr in ATTRIBUTES:
        attr_rows = []
        for group, idx in groups[attr]:
            yk, sk = y[idx], score[idx]
            known = ~np.isnan(yk)
            row = {"attribute": attr, "group": group, "n": int(known.sum()),
                   "prevalence": float(np.nanmean(yk)) if known.any() else None,
                   "status": "ok"}
            if row["n"] < min_cell:
                row.update(n=None, prevalence=None,
                           status=f"fewer than {min_cell} images (suppressed)")
            elif row["n"] < min_size:
                row["status"] = "too small"
            else:
                try:
                    ci = auc_ci(yk, sk)
                    op = at_threshold(yk, sk, threshold)
                    row.update(auc=ci.auc, ci_low=ci.lower, ci_high=ci.upper,
                               sensitivity=op.sensitivity, specificity=op.specificity)
                except NotEstimable:
                    row["status"] = "not estimable"
            attr_rows.append(row)
        best = max((r["auc"] for r in attr_rows if r["status"] == "ok"), default=None)
        for r in attr_rows:
            r["gap"] = best - r["auc"] if best is not None and r["status"] == "ok" else None
        rows += attr_rows
    return rows
