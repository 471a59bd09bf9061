"""Watching a deployed model at a site: drift of its inputs and outputs against a baseline.

A run writes a baseline for every model it validates at a site, on that site's own disk
(``<state>/baselines/<run>/<model>.json``; nothing of it leaves): per label the model's score
quantiles, its AUC, and the input's pixel-intensity histogram and view / manufacturer mix, all
on the images the model was validated on. ``fedcxr site monitor`` scores new images with the
deployed model and compares them:

- scores, per label: the population stability index (PSI, on the baseline's deciles) and a
  one-sample Kolmogorov-Smirnov test against the baseline's score distribution (its CDF
  interpolated from the 101 stored quantiles; scipy's ``kstest``);
- inputs: PSI of the pixel-intensity histogram, of the view mix, of the manufacturer mix and
  of the mix of image sizes as acquired (each file's header);
- where labels have arrived, AUC per time window (the image file's modification time: when it
  reached the archive) with a DeLong 95% CI, against the baseline AUC.

An alert fires when a label's scores moved both far (PSI above its threshold; 0.2 is the usual
"significant shift") and beyond chance (the KS test, with the baseline counted as the sample
it is, rejects at ``ks_alpha`` after Holm across labels); when an input PSI passes its
threshold; or when a window's AUC is below the baseline's by more than ``auc_margin`` and a
one-sided test of the drop rejects at ``auc_alpha`` after Holm across labels and windows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import write_text
from common.errors import FedcxrError
from common.labels import LABELS

QUANTILES = np.linspace(0, 1, 101)
INTENSITY_BINS = 32
PSI_FLOOR = 1e-4  # an empty bin's share, so PSI stays finite
BASELINE_VERSION = "fedcxr-baseline/1"


@dataclass
class Baseline:
    model: str
    site: str
    run_name: str
    image_size: int
    n_images: int
    score_quantiles: dict[str, list[float]]  # label -> 101 quantiles of the model's scores
    auc: dict[str, float | None]  # label -> AUC on the baseline images (None: not estimable)
    auc_var: dict[str, float | None]  # its DeLong variance (the baseline is a sample too)
    intensity: list[float]  # pixel-intensity histogram over [0, 1], shares summing to 1
    view: dict[str, float] = field(default_factory=dict)  # category -> share
    manufacturer: dict[str, float] = field(default_factory=dict)
    acquired_size: dict[str, float] = field(default_factory=dict)  # "WxH" as acquired -> share
    version: str = BASELINE_VERSION

    def write(self, path: Path) -> Path:
        return write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> Baseline:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FedcxrError(f"{path}: no such baseline; a run writes one per model under "
                              "<state>/baselines/<run>/ at each site that validated it") from None
        except (OSError, ValueError) as exc:
            raise FedcxrError(f"{path}: unreadable baseline ({exc})") from None
        if raw.get("version") != BASELINE_VERSION:
            raise FedcxrError(f"{path}: not a fedcxr baseline (version "
                              f"{raw.get('version')!r}, expected {BASELINE_VERSION})")
        return cls(**raw)


def intensity_histogram(images: np.ndarray, scale: float) -> np.ndarray:
    """Shares of pixels in INTENSITY_BINS equal bins of [0, 1] over ``images`` (N x S x S)."""
    counts = np.zeros(INTENSITY_BINS)
    for i in range(0, len(images), 256):
        chunk = np.asarray(images[i:i + 256], dtype=np.float32) / scale
        counts += np.histogram(chunk, bins=INTENSITY_BINS, range=(0.0, 1.0))[0]
    total = counts.sum()
    return counts / total if total else counts


def mix(values) -> dict[str, float]:
    """Category shares ('' and NaN count as 'unknown')."""
    cats = ["unknown" if (v is None or (isinstance(v, float) and math.isnan(v)) or v == "")
            else str(v) for v in values]
    if not cats:
        return {}
    keys, counts = np.unique(cats, return_counts=True)
    return {str(k): float(c) / len(cats) for k, c in zip(keys, counts, strict=True)}


def label_aucs(labels: np.ndarray, scores: np.ndarray
               ) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per label AUC and its DeLong variance (None where not estimable)."""
    from common.evaluation.delong import NotEstimable, delong_components

    aucs: dict[str, float | None] = {}
    var: dict[str, float | None] = {}
    for k, name in enumerate(LABELS):
        known = ~np.isnan(labels[:, k])
        try:
            a, cov, _, _ = delong_components(labels[known, k], scores[known, k])
        except NotEstimable:
            aucs[name] = var[name] = None
            continue
        aucs[name] = float(a[0])
        var[name] = float(cov[0, 0]) if math.isfinite(cov[0, 0]) else None
    return aucs, var


def with_acquired_size(meta):
    """``meta`` (a cache index) with an ``acquired_size`` column read from each file's header
    once, so that every baseline and window computed from it reads no header again."""
    from common.imaging import stored_size

    if "acquired_size" in meta or "path" not in meta:
        return meta
    return meta.assign(acquired_size=[stored_size(Path(p)) for p in meta["path"]])


def input_mix(meta) -> dict[str, dict[str, float]]:
    """View, manufacturer and acquired image size shares of the images in ``meta``."""
    meta = with_acquired_size(meta)
    return {key: mix(meta[key]) for key in ("view", "manufacturer", "acquired_size")
            if key in meta}


def make_baseline(*, model: str, site: str, run_name: str, image_size: int,
                  scores: np.ndarray, labels: np.ndarray, images: np.ndarray, scale: float,
                  meta) -> Baseline:
    """The baseline of ``model`` on the images it was validated on at ``site``."""
    aucs, var = label_aucs(labels, scores)
    mixes = input_mix(meta)
    return Baseline(
        model=model, site=site, run_name=run_name, image_size=image_size,
        n_images=len(scores),
        score_quantiles={lb: np.quantile(scores[:, k], QUANTILES).tolist()
                         for k, lb in enumerate(LABELS)} if len(scores) else {},
        auc=aucs, auc_var=var, intensity=intensity_histogram(images, scale).tolist(),
        view=mixes.get("view", {}), manufacturer=mixes.get("manufacturer", {}),
        acquired_size=mixes.get("acquired_size", {}))


def psi(expected, actual) -> float:
    """Population stability index sum((a - e) ln(a / e)) over matching bins (shares)."""
    e = np.maximum(np.asarray(expected, dtype=float), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=float), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def _deciles(quantiles: list[float]) -> np.ndarray:
    """Inner decile edges of the baseline scores (bins holding 10% of it each)."""
    return np.asarray(quantiles)[10:100:10]


def score_psi(quantiles: list[float], new: np.ndarray) -> float:
    edges = _deciles(quantiles)
    shares = np.bincount(np.searchsorted(edges, new, side="right"), minlength=10) / len(new)
    return psi(np.full(10, 0.1), shares)


def score_ks(quantiles: list[float], new: np.ndarray, n_baseline: int | None = None
             ) -> tuple[float, float]:
    """Kolmogorov-Smirnov distance of ``new`` from the baseline's score distribution (its
    CDF linear between the stored quantiles) and its p-value. With ``n_baseline`` the
    baseline counts as the sample it is: the two-sample test's null distribution at the
    effective size n m / (n + m) (scipy's ``kstwo``); without, the baseline is taken as
    exact (scipy's one-sample ``kstest``)."""
    from scipy.stats import kstest, kstwo

    q = np.asarray(quantiles)
    xs, idx = np.unique(q, return_index=True)  # equal quantiles (ties): keep the first
    ps = QUANTILES[idx]

    def cdf(x):
        return np.interp(x, xs, ps, left=0.0, right=1.0)

    res = kstest(new, cdf)
    if not n_baseline:
        return float(res.statistic), float(res.pvalue)
    n_eff = max(1, round(n_baseline * len(new) / (n_baseline + len(new))))
    return float(res.statistic), float(kstwo.sf(res.statistic, n_eff))


def mix_psi(expected: dict[str, float], actual: dict[str, float]) -> float:
    cats = sorted(set(expected) | set(actual))
    return psi([expected.get(c, 0.0) for c in cats], [actual.get(c, 0.0) for c in cats])


@dataclass
class Thresholds:
    """When an alert fires."""

    psi: float = 0.2  # score PSI per label (0.1-0.2 moderate, > 0.2 significant)
    input_psi: float = 0.2  # intensity histogram, view mix, manufacturer mix
    ks_alpha: float = 0.01  # per-label KS, Holm across labels
    auc_margin: float = 0.05  # an AUC drop smaller than this never alerts
    auc_alpha: float = 0.01  # one-sided test of a window's AUC drop, Holm across the family
    min_images: int = 30  # fewer new images: no drift statistic (too noisy to alert on)


def compare(baseline: Baseline, scores: np.ndarray, images: np.ndarray, scale: float, meta,
            t: Thresholds) -> dict:
    """Drift of one batch of new images against the baseline; ``alerts`` lists what fired."""
    from common.evaluation.metrics import holm

    n = len(scores)
    out: dict = {"n_images": n, "labels": [], "inputs": {}, "alerts": []}
    if n < t.min_images:
        out["note"] = (f"{n} new image(s), fewer than {t.min_images}: no drift statistic "
                       "computed")
        return out
    rows = []
    for k, lb in enumerate(LABELS):
        q = baseline.score_quantiles.get(lb)
        if not q:
            continue
        stat, p = score_ks(q, scores[:, k], baseline.n_images)
        rows.append({"label": lb, "psi": score_psi(q, scores[:, k]), "ks": stat, "p": p,
                     "baseline_median": q[50], "median": float(np.median(scores[:, k]))})
    adjusted = holm([r["p"] for r in rows]) if rows else []
    for r, p_adj in zip(rows, adjusted, strict=True):
        r["p_adjusted"] = float(p_adj)
        # large (PSI) and not chance (KS, Holm across labels): either alone alarms too often
        if r["psi"] > t.psi and r["p_adjusted"] < t.ks_alpha:
            out["alerts"].append(f"scores of {r['label']}: PSI {r['psi']:.2f} > {t.psi}, KS "
                                 f"{r['ks']:.2f} (adjusted p {r['p_adjusted']:.1e})")
    out["labels"] = rows
    hist = intensity_histogram(images, scale)
    inputs = {"intensity": psi(baseline.intensity, hist)}
    new_meta = input_mix(meta)
    for key in ("view", "manufacturer", "acquired_size"):
        base = getattr(baseline, key)
        if base and new_meta.get(key):
            inputs[key] = mix_psi(base, new_meta[key])
    out["inputs"] = {k: float(v) for k, v in inputs.items()}
    out["intensity_histogram"] = hist.tolist()
    out["mix"] = new_meta
    for key, value in inputs.items():
        if value > t.input_psi:
            out["alerts"].append(f"input {key}: PSI {value:.2f} > {t.input_psi}")
    return out


def windows(dates: np.ndarray, labels: np.ndarray, scores: np.ndarray, baseline: Baseline,
            days: float, t: Thresholds) -> tuple[list[dict], list[str]]:
    """AUC per label per time window of ``days`` (where labels have arrived), with DeLong
    95% CIs. A drop alerts when it is larger than ``auc_margin`` and the one-sided test of
    window AUC < baseline AUC (both DeLong variances: the baseline is a sample too) rejects
    at ``auc_alpha`` after Holm across every label and window."""
    from scipy.stats import norm

    from common.evaluation.delong import NotEstimable, auc_ci
    from common.evaluation.metrics import holm

    if not len(dates):
        return [], []
    start = float(np.min(dates))
    which = np.floor((dates - start) / (days * 86400)).astype(int)
    rows = []
    for w in np.unique(which):
        sel = which == w
        for k, lb in enumerate(LABELS):
            known = sel & ~np.isnan(labels[:, k])
            try:
                ci = auc_ci(labels[known, k], scores[known, k])
            except NotEstimable:
                continue
            if not math.isfinite(ci.variance):  # fewer than two cases of a class
                continue
            base, base_var = baseline.auc.get(lb), baseline.auc_var.get(lb)
            p = None
            if base is not None and base_var is not None:
                se = math.sqrt(ci.variance + base_var)
                p = float(norm.cdf((ci.auc - base) / se)) if se > 0 else None
            rows.append({"window": int(w), "start": start + w * days * 86400, "label": lb,
                         "n": int(known.sum()), "auc": ci.auc, "ci_low": ci.lower,
                         "ci_high": ci.upper, "baseline_auc": base, "p_drop": p})
    tested = [r for r in rows if r["p_drop"] is not None]
    for r, p_adj in zip(tested, holm([r["p_drop"] for r in tested]) if tested else [],
                        strict=True):
        r["p_drop_adjusted"] = float(p_adj)
    alerts = [f"AUC of {r['label']} in window {r['window'] + 1}: {r['auc']:.3f} (95% CI "
              f"{r['ci_low']:.3f}-{r['ci_high']:.3f}) below baseline {r['baseline_auc']:.3f} "
              f"(adjusted p {r['p_drop_adjusted']:.1e})" for r in tested
              if r["baseline_auc"] - r["auc"] > t.auc_margin
              and r["p_drop_adjusted"] < t.auc_alpha]
    return rows, alerts
