"""Multi-reader reference standard, inter-reader agreement, and the model against readers (H2).

Reader columns are ``reader<k>/<Label>`` (1 / 0 / blank: that reader did not read the
image), as ``common.annotations`` makes them from VinDr-CXR-style files or a canonical
manifest has them. The reference standard of an image is its ``adjudicated/<Label>`` value
where there is one, else the majority of the readers who read it; a tie (or no reader) is
no reference: the image is left out of that label (stated in the report, never guessed).

Statistics (all aggregate):
- Fleiss' kappa per label (statsmodels) over the images read by the most common number of
  readers, with a 95% percentile CI from a seeded bootstrap over patients (images of one
  patient are not independent);
- Cohen's kappa for each pair of readers (scikit-learn) on the images both read;
- each reader's sensitivity / specificity against the majority of the *other* readers (a
  reader is never scored against a reference they voted in);
- each model's sensitivity at the readers' mean specificity and specificity at their mean
  sensitivity, against the reference standard, with 95% CIs from a two-way bootstrap that
  resamples patients and readers together, so the CI carries both case and reader
  variability (the random-readers, random-cases view of Obuchowski-Rockette MRMC).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pandas as pd

from common.evaluation.metrics import at_threshold

_READER = re.compile(r"^reader(\d+)/(.+)$")
BOOTSTRAP = 500
SEED = 20191


def reader_columns(frame: pd.DataFrame, label: str) -> list[str]:
    cols = [c for c in frame.columns if (m := _READER.match(c)) and m.group(2) == label]
    return sorted(cols, key=lambda c: int(_READER.match(c).group(1)))


def reader_labels(frame: pd.DataFrame) -> list[str]:
    """Every label some reader column or adjudication covers (canonical and extra)."""
    labels = [m.group(2) for c in frame.columns if (m := _READER.match(c))]
    labels += [c.split("/", 1)[1] for c in frame.columns if c.startswith("adjudicated/")]
    return list(dict.fromkeys(labels))


def _votes(frame: pd.DataFrame, cols: list[str]) -> np.ndarray:
    return frame[cols].to_numpy(dtype=float) if cols else np.zeros((len(frame), 0))


def majority(votes: np.ndarray) -> np.ndarray:
    """1 / 0 where more than half / fewer than half of the readers who read an image said
    positive; NaN for a tie or no reader."""
    pos = np.nansum(votes, axis=1)
    n = np.sum(~np.isnan(votes), axis=1)
    out = np.where(pos * 2 > n, 1.0, np.where(pos * 2 < n, 0.0, np.nan))
    return np.where(n == 0, np.nan, out)


def reference_standard(frame: pd.DataFrame, label: str) -> np.ndarray:
    """The adjudicated label where present, else the readers' majority (ties: NaN)."""
    ref = majority(_votes(frame, reader_columns(frame, label)))
    adjudicated = f"adjudicated/{label}"
    if adjudicated in frame.columns:
        adj = frame[adjudicated].to_numpy(dtype=float)
        ref = np.where(np.isnan(adj), ref, adj)
    return ref


def has_reference(frame: pd.DataFrame, label: str) -> bool:
    return bool(reader_columns(frame, label)) or f"adjudicated/{label}" in frame.columns


def cohen_kappa(a, b) -> float:
    """Cohen's kappa for two raters' binary calls (scikit-learn's ``cohen_kappa_score``;
    rows with a missing call are dropped). NaN when chance agreement is perfect."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) == 0 or (len(np.unique(a)) == 1 and np.array_equal(a, b)):
        return float("nan")
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(a, b))


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa from an (items x categories) table of how many raters chose each
    (statsmodels' ``fleiss_kappa``)."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=1)
    if not len(n) or not np.all(n == n[0]) or n[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings per item")
    p_j = counts.sum(axis=0) / counts.sum()
    if np.sum(p_j**2) >= 1:
        return float("nan")
    from statsmodels.stats.inter_rater import fleiss_kappa

    return float(fleiss_kappa(counts, method="fleiss"))


def fleiss_table(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (items x [negative, positive]) table over the images read by the most common
    number (>= 2) of readers, and which images those are (VinDr has 3 of 17 per image)."""
    n = np.sum(~np.isnan(votes), axis=1)
    counts = Counter(int(k) for k in n if k >= 2)
    if not counts:
        return np.zeros((0, 2)), np.zeros(len(votes), dtype=bool)
    m = counts.most_common(1)[0][0]
    keep = n == m
    pos = np.nansum(votes[keep], axis=1)
    return np.stack([m - pos, pos], axis=1), keep


def _cluster_resample(clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Case weights of one bootstrap draw over patients (each image of a drawn patient
    counts as often as the patient was drawn)."""
    codes, inverse = np.unique(clusters, return_inverse=True)
    drawn = np.bincount(rng.integers(0, len(codes), len(codes)), minlength=len(codes))
    return drawn[inverse].astype(float)


def fleiss_with_ci(votes: np.ndarray, clusters: np.ndarray, level: float = 0.95,
                   n_boot: int = BOOTSTRAP, seed: int = SEED) -> dict:
    """Fleiss' kappa and its percentile bootstrap CI over patients (seeded)."""
    table, keep = fleiss_table(votes)
    if len(table) < 2:
        return {"kappa": None, "ci_low": None, "ci_high": None, "images": int(len(table))}
    kappa = fleiss_kappa(table)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        w = _cluster_resample(clusters[keep], rng)
        rows = np.repeat(table, w.astype(int), axis=0)
        if len(rows) >= 2:
            k = fleiss_kappa(rows)
            if np.isfinite(k):
                draws.append(k)
    lo, hi = _percentiles(draws, level)
    return {"kappa": _num(kappa), "ci_low": lo, "ci_high": hi, "images": int(len(table)),
            "readers_per_image": int(table[0].sum())}


def _percentiles(draws: list[float], level: float) -> tuple[float | None, float | None]:
    if len(draws) < 20:
        return None, None
    a = (1 - level) / 2
    return float(np.quantile(draws, a)), float(np.quantile(draws, 1 - a))


def _num(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def model_sensitivity_at_specificity(y, score, specificity: float) -> tuple[float, float]:
    """Model sensitivity at the most sensitive threshold whose specificity >= target."""
    y, score = np.asarray(y, float), np.asarray(score, float)
    return _sens_at_spec(y, score, np.ones(len(y)), specificity)


def _sens_at_spec(y, score, w, specificity: float) -> tuple[float, float]:
    """Weighted: the threshold just above the ``specificity`` quantile of the negatives."""
    ok = ~np.isnan(y) & (w > 0)
    y, score, w = y[ok] == 1, score[ok], w[ok]
    if not y.any() or y.all():
        return float("nan"), float("nan")
    order = np.argsort(score[~y], kind="stable")
    neg, wn = score[~y][order], w[~y][order]
    cum = np.cumsum(wn) / wn.sum()
    k = int(np.searchsorted(cum, specificity - 1e-12))  # need cum >= specificity
    threshold = np.nextafter(neg[min(k, len(neg) - 1)], np.inf) if specificity > 0 else -np.inf
    sens = float(np.sum(w[y] * (score[y] >= threshold)) / w[y].sum())
    spec = float(np.sum(w[~y] * (score[~y] < threshold)) / w[~y].sum())
    return sens, spec


def _spec_at_sens(y, score, w, sensitivity: float) -> float:
    """Weighted: the most specific threshold whose sensitivity >= target."""
    ok = ~np.isnan(y) & (w > 0)
    y, score, w = y[ok] == 1, score[ok], w[ok]
    if not y.any() or y.all():
        return float("nan")
    order = np.argsort(-score[y], kind="stable")
    pos, wp = score[y][order], w[y][order]
    cum = np.cumsum(wp) / wp.sum()
    k = int(np.searchsorted(cum, sensitivity - 1e-12))
    threshold = pos[min(k, len(pos) - 1)]
    return float(np.sum(w[~y] * (score[~y] < threshold)) / w[~y].sum())


def _others(votes: np.ndarray) -> list[np.ndarray]:
    """Each reader's reference: the majority of the other readers (NaN where a tie, or
    where this reader did not read the image)."""
    out = []
    for r in range(votes.shape[1]):
        others = majority(np.delete(votes, r, axis=1))
        others[np.isnan(votes[:, r])] = np.nan
        out.append(others)
    return out


def _reader_rates(votes: np.ndarray, others_of: list[np.ndarray], w: np.ndarray,
                  readers: np.ndarray) -> tuple[list[float], list[float]]:
    """Each chosen reader's sensitivity and specificity against the others' majority, with
    case weights ``w``."""
    sens, spec = [], []
    for r in readers:
        others = others_of[r]
        call = votes[:, r]
        ok = ~np.isnan(others) & ~np.isnan(call) & (w > 0)
        pos, neg = ok & (others == 1), ok & (others == 0)
        if w[pos].sum() > 0:
            sens.append(float(np.sum(w[pos] * call[pos]) / w[pos].sum()))
        if w[neg].sum() > 0:
            spec.append(float(np.sum(w[neg] * (1 - call[neg])) / w[neg].sum()))
    return sens, spec


def reader_study(frame: pd.DataFrame, label: str, model_scores: dict[str, np.ndarray], *,
                 clusters: np.ndarray | None = None, level: float = 0.95,
                 n_boot: int = BOOTSTRAP, seed: int = SEED) -> dict:
    """Everything about one label's readers: agreement (Fleiss with CI, pairwise Cohen), each
    reader against the others, and each model at the readers' mean operating point."""
    cols = reader_columns(frame, label)
    if not cols:
        return {}
    clusters = (np.arange(len(frame)) if clusters is None
                else np.asarray([str(c) for c in clusters], dtype=object))
    votes = _votes(frame, cols)
    ref = reference_standard(frame, label)
    adjudicated = f"adjudicated/{label}" in frame.columns
    out = {
        "label": label,
        "reference": "adjudicated" if adjudicated else "majority",
        "readers": len(cols),
        "images_read": int(np.sum(np.any(~np.isnan(votes), axis=1))),
        "fleiss": fleiss_with_ci(votes, clusters, level, n_boot, seed),
        "cohen_kappa": {f"{a.split('/')[0]}|{b.split('/')[0]}": _num(cohen_kappa(frame[a],
                                                                                   frame[b]))
                        for a, b in itertools.combinations(cols, 2)},
        "reader_points": [],
        "models": {},
    }
    out["fleiss_kappa"] = out["fleiss"]["kappa"]
    if len(cols) < 2:
        return out
    ones = np.ones(len(frame))
    others_of = _others(votes)
    for r, col in enumerate(cols):
        op = at_threshold(others_of[r], votes[:, r], 0.5, level)
        out["reader_points"].append({
            "reader": col.split("/")[0], "sensitivity": _num(op.sensitivity),
            "specificity": _num(op.specificity), "sensitivity_ci": op.sensitivity_ci,
            "specificity_ci": op.specificity_ci})
    sens, spec = _reader_rates(votes, others_of, ones, np.arange(len(cols)))
    if not sens or not spec:
        return out
    mean_sens, mean_spec = float(np.mean(sens)), float(np.mean(spec))
    out["mean_reader"] = {"sensitivity": mean_sens, "specificity": mean_spec}
    rng = np.random.default_rng(seed)
    boots = {n: ([], []) for n in model_scores}
    for _ in range(n_boot):
        w = _cluster_resample(clusters, rng)
        readers = rng.integers(0, len(cols), len(cols))
        bs, bp = _reader_rates(votes, others_of, w, readers)
        if not bs or not bp:
            continue
        for name, score in model_scores.items():
            s, _ = _sens_at_spec(ref, np.asarray(score, float), w, float(np.mean(bp)))
            p = _spec_at_sens(ref, np.asarray(score, float), w, float(np.mean(bs)))
            boots[name][0].append(s)
            boots[name][1].append(p)
    for name, score in model_scores.items():
        s, _ = _sens_at_spec(ref, np.asarray(score, float), ones, mean_spec)
        p = _spec_at_sens(ref, np.asarray(score, float), ones, mean_sens)
        s_lo, s_hi = _percentiles([v for v in boots[name][0] if np.isfinite(v)], level)
        p_lo, p_hi = _percentiles([v for v in boots[name][1] if np.isfinite(v)], level)
        out["models"][name] = {
            "sensitivity_at_reader_specificity": _num(s), "sensitivity_ci": [s_lo, s_hi],
            "specificity_at_reader_sensitivity": _num(p), "specificity_ci": [p_lo, p_hi]}
    return out
