"""Multi-reader reference standard, inter-reader agreement, and model-vs-reader comparison.

Reader columns are ``reader<k>/<Label>`` (1 / 0 / blank); an ``adjudicated/<Label>`` column,
when present, is the reference standard, otherwise the readers' majority (ties: unknown).
The model is compared at each reader's own specificity (the point-on-curve comparison of
CheXNet, Rajpurkar et al. 2017).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa as statsmodels_fleiss_kappa

from common.evaluation.metrics import at_threshold

_READER = re.compile(r"^reader(\d+)/(.+)$")


def reader_columns(frame: pd.DataFrame, label: str) -> list[str]:
    cols = [c for c in frame.columns if (m := _READER.match(c)) and m.group(2) == label]
    return sorted(cols, key=lambda c: int(_READER.match(c).group(1)))


def reference_standard(frame: pd.DataFrame, label: str) -> np.ndarray:
    adjudicated = f"adjudicated/{label}"
    if adjudicated in frame.columns:
        return frame[adjudicated].to_numpy(dtype=float)
    votes = frame[reader_columns(frame, label)].to_numpy(dtype=float)
    pos = np.nansum(votes, axis=1)
    n = np.sum(~np.isnan(votes), axis=1)
    out = np.where(pos * 2 > n, 1.0, np.where(pos * 2 < n, 0.0, np.nan))
    return np.where(n == 0, np.nan, out)


def cohen_kappa(a, b) -> float:
    """Cohen's kappa for two raters' binary calls (scikit-learn's ``cohen_kappa_score``;
    rows with a missing call are dropped). NaN when chance agreement is perfect."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) == 0 or (len(np.unique(a)) == 1 and np.array_equal(a, b)):
        return float("nan")
    return float(cohen_kappa_score(a, b))


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa from an (items x categories) table of how many raters chose each
    (statsmodels' ``fleiss_kappa``)."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=1)
    if not np.all(n == n[0]) or n[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings per item")
    p_j = counts.sum(axis=0) / counts.sum()
    if np.sum(p_j**2) >= 1:
        return float("nan")
    return float(statsmodels_fleiss_kappa(counts, method="fleiss"))


def model_sensitivity_at_specificity(y, score, specificity: float) -> tuple[float, float]:
    """Model sensitivity at the most sensitive threshold whose specificity >= target."""
    y, score = np.asarray(y, float), np.asarray(score, float)
    keep = ~np.isnan(y)
    y, score = y[keep] == 1, score[keep]
    neg = np.sort(score[~y])
    if len(neg) == 0 or y.sum() == 0:
        return float("nan"), float("nan")
    k = int(np.ceil(specificity * len(neg)))  # need >= k negatives below threshold
    threshold = np.nextafter(neg[k - 1], np.inf) if k > 0 else -np.inf
    sens = float(np.mean(score[y] >= threshold))
    spec = float(np.mean(score[~y] < threshold))
    return sens, spec


def reader_study(frame: pd.DataFrame, label: str, model_scores: dict[str, np.ndarray]) -> dict:
    """Everything about one label's readers: agreement, each reader vs the reference standard,
    and each model at each reader's specificity."""
    cols = reader_columns(frame, label)
    if not cols:
        return {}
    ref = reference_standard(frame, label)
    calls = frame[cols].to_numpy(dtype=float)
    complete = ~np.isnan(calls).any(axis=1)
    positives = calls[complete].sum(axis=1)
    table = np.stack([len(cols) - positives, positives], axis=1)
    out = {
        "label": label,
        "reference": "adjudicated" if f"adjudicated/{label}" in frame.columns else "majority",
        "readers": len(cols),
        "fleiss_kappa": fleiss_kappa(table) if len(cols) >= 2 and complete.any() else None,
        "cohen_kappa": {f"{a}|{b}": cohen_kappa(frame[a], frame[b])
                        for a, b in itertools.combinations(cols, 2)},
        "reader_points": [],
    }
    for col in cols:
        op = at_threshold(ref, frame[col].to_numpy(dtype=float), 0.5)
        point = {"reader": col.split("/")[0], "sensitivity": op.sensitivity,
                 "specificity": op.specificity, "sensitivity_ci": op.sensitivity_ci,
                 "specificity_ci": op.specificity_ci, "models": {}}
        for name, score in model_scores.items():
            sens, spec = model_sensitivity_at_specificity(ref, score, op.specificity)
            point["models"][name] = {"sensitivity": sens, "specificity": spec}
        out["reader_points"].append(point)
    return out
