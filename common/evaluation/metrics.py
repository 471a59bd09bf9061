"""Per-label statistics beyond the AUC: operating-point metrics with Wilson CIs, threshold
choice, calibration and multiplicity correction.

Thresholds are chosen from *ROC counts*: per-bin counts of positive and negative scores on a
fixed grid. Training sites send these (never per-image scores); the server sums them across
sites and chooses the operating point. The external evaluator only ever receives thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np

# scikit-learn and statsmodels are imported where they are used: this module's constants are
# read by common.config, which every process (CLI, waiter, ServerApp, nodes) imports first,
# and the two libraries are most of its import time (`python -X importtime`).

GRID = np.linspace(0.0, 1.0, 1001)  # threshold grid on predicted probability
ThresholdMethod = Literal["specificity", "sensitivity", "youden", "max_f1"]
THRESHOLD_METHODS = get_args(ThresholdMethod)


class ThresholdsRequired(ValueError):
    """The evaluator was asked to choose an operating point on the data it validates."""


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (statsmodels' ``proportion_confint``)."""
    return wilson_intervals([k], [n], level)[0]


def wilson_intervals(ks, ns, level: float = 0.95) -> list[tuple[float, float]]:
    """Wilson score intervals of several proportions (k out of n each; NaN where n is 0) in
    one call of statsmodels' ``proportion_confint``, which computes the same elementwise: its
    normal quantile (scipy.stats' ``norm.isf``, most of a call's time) is then found once
    for all of them, not once each."""
    ks, ns = np.asarray(ks), np.asarray(ns)
    out = [(float("nan"), float("nan"))] * len(ns)
    some = ns > 0
    if some.any():
        from statsmodels.stats.proportion import proportion_confint

        low, high = proportion_confint(ks[some], ns[some], alpha=1 - level, method="wilson")
        for i, lo, hi in zip(np.flatnonzero(some), np.atleast_1d(low), np.atleast_1d(high),
                             strict=True):
            out[i] = (float(max(0.0, lo)), float(min(1.0, hi)))
    return out


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    f1: float
    sensitivity_ci: tuple[float, float]
    specificity_ci: tuple[float, float]
    ppv_ci: tuple[float, float]
    npv_ci: tuple[float, float]

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def at_threshold(y_true, y_score, threshold: float, level: float = 0.95) -> OperatingPoint:
    """Confusion counts and rates at ``score >= threshold`` (NaN labels ignored)."""
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(y_score, dtype=float)
    keep = ~np.isnan(y)
    y, s = y[keep] == 1, s[keep] >= threshold
    tp, fp = int((y & s).sum()), int((~y & s).sum())
    fn, tn = int((y & ~s).sum()), int((~y & ~s).sum())
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    sensitivity, specificity, ppv, npv = wilson_intervals(
        [tp, tn, tp, tn], [tp + fn, tn + fp, tp + fp, tn + fn], level)
    return OperatingPoint(
        float(threshold), tp, fp, tn, fn,
        _ratio(tp, tp + fn), _ratio(tn, tn + fp), _ratio(tp, tp + fp), _ratio(tn, tn + fn), f1,
        sensitivity, specificity, ppv, npv,
    )


def roc_counts(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives with score >= each GRID threshold: (pos_ge, neg_ge).

    These cumulative counts are aggregate statistics: they can be summed across sites and
    carry no per-image score.
    """
    y = np.asarray(y_true, dtype=float)
    s = np.clip(np.asarray(y_score, dtype=float), 0, 1)
    keep = ~np.isnan(y)
    y, s = y[keep] == 1, s[keep]
    idx = np.searchsorted(GRID, s, side="right") - 1  # bin of the largest grid value <= s
    pos = np.bincount(idx[y], minlength=len(GRID))
    neg = np.bincount(idx[~y], minlength=len(GRID))
    return pos[::-1].cumsum()[::-1], neg[::-1].cumsum()[::-1]


def choose_threshold(pos_ge: np.ndarray, neg_ge: np.ndarray, method: str,
                     target: float | None = None) -> float:
    """Operating point from (summed) ROC counts.

    ``specificity``: lowest threshold with specificity >= target (most sensitive such point);
    ``sensitivity``: highest threshold with sensitivity >= target; ``youden``: max TPR - FPR;
    ``max_f1``: max F1.
    """
    pos_ge, neg_ge = np.asarray(pos_ge, float), np.asarray(neg_ge, float)
    P, N = pos_ge[0], neg_ge[0]
    if P == 0 or N == 0:
        return 0.5
    tpr, fpr = pos_ge / P, neg_ge / N
    if method == "specificity":
        ok = np.flatnonzero(1 - fpr >= (0.9 if target is None else target))
        return float(GRID[ok[0]]) if len(ok) else 1.0
    if method == "sensitivity":
        ok = np.flatnonzero(tpr >= (0.9 if target is None else target))
        return float(GRID[ok[-1]]) if len(ok) else 0.0
    if method == "youden":
        return float(GRID[int(np.argmax(tpr - fpr))])
    if method == "max_f1":
        f1 = 2 * pos_ge / np.maximum(pos_ge + neg_ge + P, 1)
        return float(GRID[int(np.argmax(f1))])
    raise ValueError(f"threshold method {method!r}; use one of {', '.join(THRESHOLD_METHODS)}")


def reliability(y_true, y_prob, bins: int = 15) -> dict[str, list]:
    """Equal-width bins: mean predicted probability, observed fraction and count per bin."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_prob, dtype=float)
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"mean_predicted": list(sum_p / count), "observed": list(sum_y / count),
                "count": [int(c) for c in count]}


def ece(y_true, y_prob, bins: int = 15) -> float:
    """Expected calibration error: count-weighted |observed - predicted| over 15 bins."""
    r = reliability(y_true, y_prob, bins)
    count = np.array(r["count"], dtype=float)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.nan_to_num(np.array(r["observed"])) - np.nan_to_num(
        np.array(r["mean_predicted"])))
    return float((gap * count).sum() / count.sum())


def brier(y_true, y_prob) -> float:
    """Brier score over the known labels (scikit-learn's ``brier_score_loss``)."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_prob, dtype=float)
    keep = ~np.isnan(y)
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(y[keep], p[keep])) if keep.any() else float("nan")


METHODS = {"holm": "holm", "bh": "fdr_bh", "fdr": "fdr_bh", "benjamini-hochberg": "fdr_bh"}


def adjust(p_values, method: str = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values (statsmodels' ``multipletests``); NaN entries stay NaN
    and are not counted in the family."""
    if method not in METHODS:
        raise ValueError(f"multiplicity correction {method!r}; use holm or bh")
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        from statsmodels.stats.multitest import multipletests

        out[ok] = multipletests(p[ok], method=METHODS[method])[1]
    return out


def holm(p_values) -> np.ndarray:
    """Holm step-down adjusted p-values."""
    return adjust(p_values, "holm")


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg step-up adjusted p-values (false discovery rate)."""
    return adjust(p_values, "bh")
