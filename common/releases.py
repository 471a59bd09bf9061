"""Label counts a DP training site releases, and the list of everything a site releases.

Under DP the class weights (``pos_weight``) and the prevalence a site reports must not come
from its exact training labels: ``pos_weight`` scales every image's loss, so computed from
all labels it makes each image's clipped gradient depend on every other image's label, and
prevalence is a count. Both come instead from one Gaussian release of the training split's
per-label positive and negative counts over privacy units (a patient counts once: positive
for a label if any of its images is), made once per run, recorded in the site's ledger like
a DP-SGD unit (one step at sample rate 1: the plain Gaussian mechanism) and kept on the
site's disk. Adding or removing one unit changes, for each of the 14 labels, one of the two
counts by one: L2 sensitivity sqrt(14), noise standard deviation z sqrt(14).

``RELEASES`` is what a site sends, message by message, and whether DP covers it; results.json
lists it per site (``privacy.releases``).
"""

from __future__ import annotations

import fcntl
import json
import math
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.atomic import atomic_path
from common.labels import LABELS
from common.privacy import PlannedUnit, PrivacyLedger, Spend, compose_epsilon

if TYPE_CHECKING:  # the ServerApp imports this module (release_rows) and never torch
    from common.data import CachedImages

COUNTS_ARM = "label-counts"  # the ledger's name for the release
SENSITIVITY = math.sqrt(len(LABELS))


@dataclass(frozen=True)
class LabelCounts:
    """Per-label positive and negative counts of the training split's privacy units."""

    pos: list[float]
    neg: list[float]
    noised: bool
    noise_multiplier: float | None = None
    epsilon_alone: float | None = None  # this release's ε on its own, at the site's δ

    def pos_weight(self, cap: float) -> np.ndarray:
        """negatives / positives per label, capped; 1 where there are (about) no positives."""
        pos, neg = np.asarray(self.pos), np.maximum(np.asarray(self.neg), 0.0)
        w = np.where(pos >= 1, neg / np.maximum(pos, 1), 1.0)
        return np.clip(w, 1.0, cap)

    def prevalence(self, known: np.ndarray) -> list[float]:
        """pos / (pos + neg) in [0, 1]; -1 where the site never annotates the label."""
        pos, neg = np.maximum(self.pos, 0.0), np.maximum(self.neg, 0.0)
        total = pos + neg
        p = np.where(total > 0, pos / np.maximum(total, 1e-12), 0.0)
        return [float(x) if k else -1.0 for x, k in zip(p, known, strict=True)]


def unit_counts(train: CachedImages, privacy_unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-label (positives, negatives) over privacy units."""
    from common.data import patient_groups

    labels = train.labels()
    if privacy_unit == "patient":
        rows = []
        for g in patient_groups(train):
            block = labels[g]
            pos = np.nanmax(np.where(np.isnan(block), -np.inf, block), axis=0)
            rows.append(np.where(np.isfinite(pos), (pos == 1).astype(float), np.nan))
        labels = np.array(rows) if rows else np.empty((0, len(LABELS)))
    return (np.nansum(labels == 1, axis=0).astype(float),
            np.nansum(labels == 0, axis=0).astype(float))


def released_counts(train: CachedImages, *, privacy_unit: str, ledger: PrivacyLedger,
                    store: Path, delta: float, max_epsilon: float, noise_multiplier: float,
                    run_id: str, n_units: int) -> LabelCounts:
    """The run's noised label counts: read from ``store`` if this run released them already,
    else released now (budget-checked and recorded in the ledger before the data is used)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if store.exists():
            return LabelCounts(**json.loads(store.read_text()))
        spend = Spend(1, 1.0, noise_multiplier)
        unit = ledger.reserve([PlannedUnit(spend, COUNTS_ARM, 0, run_id)], delta, max_epsilon,
                              what="the label-count release (pos_weight, prevalence)",
                              privacy_unit=privacy_unit, n=n_units)[0]
        pos, neg = unit_counts(train, privacy_unit)
        rng = np.random.default_rng(secrets.randbits(128))
        sd = noise_multiplier * SENSITIVITY
        counts = LabelCounts((pos + rng.normal(0, sd, len(pos))).tolist(),
                             (neg + rng.normal(0, sd, len(neg))).tolist(), True,
                             noise_multiplier,
                             compose_epsilon([spend], delta, ledger.accountant))
        with atomic_path(store, fsync=True) as tmp:
            tmp.write_text(json.dumps(asdict(counts)))
        ledger.complete(unit, spend, delta, run_id=run_id, arm=COUNTS_ARM, round=0)
        return counts


@dataclass(frozen=True)
class Release:
    """One statistic a site sends: in which message, and whether DP covers it."""

    statistic: str
    message: str
    role: str  # train | evaluate
    dp: str  # "weights": DP-SGD; "counts": the label-count release; "roc": withheld under
    # DP unless the site opts in; "": never covered
    note: str


RELEASES = (
    Release("model weights", "train", "train", "weights",
            "DP-SGD on the training split (per-unit clipping, Gaussian noise)"),
    Release("label counts (prevalence; pos_weight used in training)", "query", "train",
            "counts", "Gaussian release of per-label counts, once per run, in the ledger"),
    Release("training loss and example count", "train", "train", "",
            "computed during DP-SGD from the training split, sent exactly"),
    Release("validation AUC per label", "train, evaluate.validate", "train", "",
            "validation split (patients never in training); labels known on fewer than "
            "min-cell images are withheld"),
    Release("validation ROC counts", "train, evaluate.validate", "train", "roc",
            "validation split; score bins merged until each holds at least min-cell images"),
    Release("split sizes", "query", "train", "", "numbers of images per split"),
    Release("internal test AUCs with CIs", "evaluate.internal", "train", "",
            "test split (patients never in training)"),
    Release("external statistics (AUCs, CIs, tests, rates, calibration, subgroups)",
            "evaluate.external", "evaluate", "",
            "held-out site: never trains; subgroups under min-cell images are suppressed"),
    Release("label prevalence and image count", "query", "evaluate", "", "sent exactly"),
)


def release_rows(role: str, *, dp: bool, exact_counts: bool, site_epsilon: float | None,
                 counts_epsilon: float | None, min_cell: int) -> list[dict]:
    """results.json ``privacy.releases`` rows for one site."""
    rows = []
    for r in RELEASES:
        if r.role != role:
            continue
        covered = dp and (r.dp == "weights" or (r.dp == "counts" and not exact_counts))
        note = r.note.replace("min-cell", f"min-cell ({min_cell})")
        if r.dp == "counts" and dp and exact_counts:
            note = "sent exactly: the site's node config sets release-exact-counts = true"
        elif r.dp == "roc" and dp:
            note = (f"sent exactly (release-exact-counts = true); {note}" if exact_counts else
                    "withheld: DP run and the site did not set release-exact-counts (its "
                    "validation gives no operating point)")
        elif r.dp and not dp:
            note = "sent exactly: this run has no DP"
        rows.append({"statistic": r.statistic, "message": r.message, "covered_by_dp": covered,
                     "sent": not (r.dp == "roc" and dp and not exact_counts),
                     "epsilon": (site_epsilon if r.dp == "weights" else counts_epsilon)
                     if covered else None, "note": note})
    return rows
