"""DeLong AUC variance, confidence intervals and paired tests, by the fast midrank algorithm
of Sun & Xu (2014): O(n log n) per score vector instead of DeLong's O(m n); and the same
patient-clustered (Obuchowski 1997). One computation serves both: DeLong is the clustered
one with every image its own cluster.

Higher scores mean "more positive". Matches R's pROC (``ci.auc`` and ``roc.test`` with
``method="delong"``): the CI is AUC +/- z * sd clipped to [0, 1]; the paired test's Z is the
AUC difference over the sd of the difference from the joint covariance.

The normal quantiles (``critical_z``) and tails are scipy.special's ``ndtri`` and ``ndtr``, the
functions scipy.stats' ``norm.ppf`` and ``norm.sf`` compute with (the same floats), so that
a CI does not import scipy.stats (1.2 s, which the first validation message of every
simulated site process paid). scipy.special (0.16 s) is imported by the functions that need
it: a training node's process imports this module for its validation AUC (``midranks``, the
ranks in numpy) and for age bands (``common.site``), and never needs a CI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def critical_z(level: float) -> float:
    """The two-sided normal critical value of a ``level`` CI: ``norm.ppf(0.5 + level / 2)``
    as scipy.stats computes it (``ndtri``), without importing scipy.stats."""
    from scipy.special import ndtri

    return float(ndtri(0.5 + level / 2))


class NotEstimable(ValueError):
    """AUC is undefined: the labels have no positives or no negatives."""


@dataclass(frozen=True)
class AucCI:
    auc: float
    lower: float
    upper: float
    variance: float
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class PairedTest:
    auc_a: float
    auc_b: float
    z: float
    p_value: float
    diff_lower: float
    diff_upper: float


def delong_components(y_true, scores) -> tuple[np.ndarray, np.ndarray, int, int]:
    """AUCs (k,) and their DeLong covariance (k, k) for k score vectors on the same cases:
    the clustered computation below with every case its own cluster (one implementation,
    checked against pROC). The covariance is NaN without two cases of each class."""
    y = np.asarray(y_true, dtype=float)
    comp = cluster_components(y, scores, np.arange(len(y)), len(y))
    return comp.aucs, comp.covariance(), comp.m, comp.n


def auc_ci(y_true, y_score, level: float = 0.95) -> AucCI:
    """AUC with its DeLong variance and CI (pROC's ``ci.auc`` default)."""
    aucs, cov, m, n = delong_components(y_true, y_score)
    auc, var = float(aucs[0]), float(cov[0, 0])
    half = critical_z(level) * np.sqrt(max(var, 0.0))
    return AucCI(auc, float(max(0.0, auc - half)), float(min(1.0, auc + half)), var, int(m),
                 int(n))


def paired_test(y_true, score_a, score_b, level: float = 0.95) -> PairedTest:
    """Two-sided paired DeLong test of AUC(a) = AUC(b) on the same cases (pROC ``roc.test``)."""
    aucs, cov, _, _ = delong_components(y_true, np.vstack([score_a, score_b]))
    return paired_from(aucs[0], aucs[1], cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], level)


# ---------------------------------------------------------------- patient-clustered (Obuchowski)
#
# Images of one patient are correlated, so an image-level DeLong variance is too small when
# patients contribute several images. Obuchowski (1997, Biometrics 53:567-578) keeps DeLong's
# structural components but sums them within each cluster (patient) before taking variances:
#
#   V10(x) = mean over negatives of psi(x, y), V01(y) = mean over positives of psi(x, y)
#   A_i = sum of V10 over cluster i's positives - m_i * AUC    (m_i positives in cluster i)
#   B_i = sum of V01 over cluster i's negatives - n_i * AUC    (n_i negatives in cluster i)
#   S10 = I10 / ((I10 - 1) M) sum_i A_i^2     I10: clusters with at least one positive
#   S01 = I01 / ((I01 - 1) N) sum_i B_i^2     I01: clusters with at least one negative
#   S11 = I / (I - 1) sum_i A_i B_i           I: all clusters
#   var = S10 / M + S01 / N + 2 S11 / (M N)
#
# The covariance of two score vectors on the same images uses the same sums with A and B of
# both (S11 then has both cross terms, A^a B^b and A^b B^a). With one image per cluster it is
# DeLong's (pROC's) variance exactly; duplicating every image inside its own cluster leaves it
# unchanged.
#
# Macro-AUC (the primary endpoint: the mean AUC over L labels) uses the same per-cluster
# components, each label's scaled by its own counts (A_il / M_l, B_il / N_l), averaged over
# the labels, and summed over clusters as above:
#
#   var(macro) = sum_i (mean_l c10_l A_il / M_l)^2 + sum_i (mean_l c01_l B_il / N_l)^2
#              + 2 I / (I - 1) sum_i (mean_l A_il / M_l) (mean_l B_il / N_l)
#
# with c10_l = sqrt(I10_l / (I10_l - 1)), c01_l = sqrt(I01_l / (I01_l - 1)) (each label's
# small-sample factors) and I the clusters with a known value of any label used. Stacking the
# models gives the paired covariance the same way. With L = 1 it is Obuchowski's variance
# exactly; in general it is the variance of the mean of correlated per-label AUCs, the
# correlation between labels (same patients, same images) included through the shared sums.


@dataclass(frozen=True)
class ClusteredAuc:
    auc: float
    variance: float
    lower: float
    upper: float
    n_pos: int
    n_neg: int
    n_clusters: int


def cluster_codes(clusters, n: int) -> np.ndarray:
    """Integer codes 0..I-1 of the cluster of each case; None (or blank ids) -> one per case."""
    if clusters is None:
        return np.arange(n)
    c = np.asarray(clusters, dtype=object)
    if c.shape != (n,):
        raise ValueError(f"clusters has shape {c.shape}, expected ({n},): one id per image")
    blank = np.array([v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == ""
                      for v in c])
    keys = np.where(blank, np.array([f"\0image{i}" for i in range(n)], dtype=object),
                    c.astype(str).astype(object))
    return np.unique(keys.astype(str), return_inverse=True)[1].ravel()


@dataclass(frozen=True)
class ClusterComponents:
    """Per-cluster structural components of k score vectors on one label.

    ``a`` and ``b`` are (k, clusters): A_i and B_i above (sums over the cluster's cases minus
    the cluster's share of the AUC; zero for a cluster with no case of this label). ``m``,
    ``n``: positives and negatives; ``i10``, ``i01``, ``i_all``: clusters with a positive,
    with a negative, with any case of this label.
    """

    aucs: np.ndarray
    a: np.ndarray
    b: np.ndarray
    m: int
    n: int
    i10: int
    i01: int
    i_all: int
    present: np.ndarray  # (clusters,) bool: clusters with a known value of this label

    def covariance(self) -> np.ndarray:
        """(k, k) Obuchowski covariance of the k AUCs (NaN without two clusters of each)."""
        k = len(self.aucs)
        if min(self.i10, self.i01) < 2:
            return np.full((k, k), np.nan)
        s10 = self.i10 / ((self.i10 - 1) * self.m) * (self.a @ self.a.T)
        s01 = self.i01 / ((self.i01 - 1) * self.n) * (self.b @ self.b.T)
        s11 = self.i_all / (self.i_all - 1) * (self.a @ self.b.T)
        return s10 / self.m + s01 / self.n + (s11 + s11.T) / (self.m * self.n)

    def small_sample_factors(self) -> tuple[float, float]:
        """sqrt(I10 / (I10 - 1)) and sqrt(I01 / (I01 - 1)) (see the module notes)."""
        if min(self.i10, self.i01) < 2:
            raise NotEstimable("fewer than 2 clusters with a positive or with a negative")
        return np.sqrt(self.i10 / (self.i10 - 1)), np.sqrt(self.i01 / (self.i01 - 1))


def cluster_components(y_true, scores, codes: np.ndarray, n_clusters: int
                       ) -> ClusterComponents:
    """Obuchowski components of k score vectors; ``codes`` from ``cluster_codes``.

    Cases with a NaN label are dropped (their cluster may still count for other labels, but
    not in this label's I10 / I01 / I). Raises NotEstimable without positives or negatives.
    """
    y = np.asarray(y_true, dtype=float)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    keep = ~np.isnan(y)
    y, s, codes = y[keep], s[:, keep], np.asarray(codes)[keep]
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m == 0 or n == 0:
        raise NotEstimable(f"{m} positives and {n} negatives: AUC is not estimable")
    x, yneg = s[:, pos], s[:, ~pos]
    tz = midranks(np.concatenate([x, yneg], axis=1))
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - midranks(x)) / n
    v01 = 1.0 - (tz[:, m:] - midranks(yneg)) / m
    cpos, cneg = codes[pos], codes[~pos]
    m_i = np.bincount(cpos, minlength=n_clusters)
    n_i = np.bincount(cneg, minlength=n_clusters)
    a = _cluster_sums(v10, cpos, n_clusters) - aucs[:, None] * m_i[None, :]
    b = _cluster_sums(v01, cneg, n_clusters) - aucs[:, None] * n_i[None, :]
    present = (m_i + n_i) > 0
    return ClusterComponents(aucs, a, b, m, n, int((m_i > 0).sum()), int((n_i > 0).sum()),
                             int(present.sum()), present)


def midranks(values) -> np.ndarray:
    """Average ranks along the last axis (1-based; tied values share the mean of their
    positions; a row with a NaN is all NaN): ``scipy.stats.rankdata(values, axis=-1)``, in
    numpy. A training site's validation AUC needs only this, and importing scipy.stats for
    it cost every training message's process 0.8 s (``tests/test_statistics.py`` checks it
    against scipy's)."""
    values = np.asarray(values, dtype=float)
    out = np.empty(values.shape, dtype=float)
    for index in np.ndindex(values.shape[:-1]):
        row = values[index]
        if np.isnan(row).any():
            out[index] = np.nan
            continue
        order = np.argsort(row, kind="mergesort")
        ordered = row[order]
        first = np.concatenate(([True], ordered[1:] != ordered[:-1]))
        starts = np.flatnonzero(first)  # each run of equal values: [start, end)
        ends = np.append(starts[1:], len(row))
        ranks = np.empty(len(row))
        ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(first) - 1]
        out[index] = ranks
    return out


def _cluster_sums(values: np.ndarray, codes: np.ndarray, n_clusters: int) -> np.ndarray:
    """(k, I): each row of ``values`` (k, cases) summed within clusters."""
    out = np.zeros((values.shape[0], n_clusters))
    for r in range(values.shape[0]):
        out[r] = np.bincount(codes, weights=values[r], minlength=n_clusters)
    return out


def _clustered(y_true, scores, clusters) -> ClusterComponents:
    y = np.asarray(y_true, dtype=float)
    codes = cluster_codes(clusters, len(y))
    return cluster_components(y, scores, codes, int(codes.max()) + 1 if len(codes) else 0)


def clustered_auc(y_true, scores, clusters, level: float = 0.95) -> ClusteredAuc:
    """AUC with its patient-clustered (Obuchowski 1997) variance and normal CI."""
    comp = _clustered(y_true, scores, clusters)
    auc, var = float(comp.aucs[0]), float(comp.covariance()[0, 0])
    half = critical_z(level) * np.sqrt(max(var, 0.0))
    return ClusteredAuc(auc, var, float(max(0.0, auc - half)), float(min(1.0, auc + half)),
                        comp.m, comp.n, comp.i_all)


def paired_from(est_a: float, est_b: float, var_diff: float, level: float,
            margin: float = 0.0) -> PairedTest:
    from scipy.special import ndtr

    diff = est_a - est_b
    sd = float(np.sqrt(max(var_diff, 0.0))) if np.isfinite(var_diff) else float("nan")
    if not sd > 0:
        z, p = 0.0, 1.0
    else:
        z = float((diff - margin) / sd)
        p = float(2 * ndtr(-abs(z)))  # norm.sf(|z|)
    half = critical_z(level) * sd
    return PairedTest(float(est_a), float(est_b), z, p, float(diff - half), float(diff + half))


def clustered_paired_test(y_true, score_a, score_b, clusters, level: float = 0.95
                          ) -> PairedTest:
    """Two-sided paired test of AUC(a) = AUC(b), patient-clustered (Obuchowski 1997)."""
    comp = _clustered(y_true, np.vstack([score_a, score_b]), clusters)
    cov = comp.covariance()
    return paired_from(comp.aucs[0], comp.aucs[1], cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], level)


@dataclass(frozen=True)
class MacroAuc:
    """Macro-AUC over labels of k models and its clustered covariance."""

    labels: list[int]
    aucs: np.ndarray  # (k,) macro-AUC per model
    covariance: np.ndarray  # (k, k)
    n_clusters: int

    def paired(self, i: int, j: int, level: float = 0.95, margin: float = 0.0) -> PairedTest:
        """Model i minus model j (test of diff = margin, two-sided)."""
        c = self.covariance
        return paired_from(self.aucs[i], self.aucs[j], c[i, i] + c[j, j] - 2 * c[i, j], level,
                       margin)


def macro_auc(y_true: np.ndarray, scores: np.ndarray, clusters,
              labels: list[int] | None = None,
              components: dict[int, ClusterComponents | None] | None = None) -> MacroAuc:
    """Macro-AUC of k models over label columns ``labels``, patient-clustered.

    ``y_true`` is (N, L) with NaN for unknown; ``scores`` is (k, N, L). Labels that are not
    estimable here (no positive or negative, or fewer than 2 clusters of either) are left
    out; ``MacroAuc.labels`` says which were used. Raises NotEstimable when none is left.
    ``components`` (label column -> its components, None when not estimable) reuses what a
    per-label pass already computed with the same clusters.
    """
    y = np.asarray(y_true, dtype=float)
    s = None if components is not None else np.asarray(scores, dtype=float)
    codes = cluster_codes(clusters, len(y))
    n_clusters = int(codes.max()) + 1 if len(codes) else 0
    used, aucs, sq_a, sq_b, x_a, x_b = [], [], [], [], [], []
    known = np.zeros(n_clusters, dtype=bool)
    for lab in labels if labels is not None else range(y.shape[1]):
        try:
            if components is not None:
                comp = components[lab]
                if comp is None:
                    continue
            else:
                comp = cluster_components(y[:, lab], s[:, :, lab], codes, n_clusters)
            c10, c01 = comp.small_sample_factors()
        except NotEstimable:
            continue
        used.append(lab)
        aucs.append(comp.aucs)
        x_a.append(comp.a / comp.m)
        x_b.append(comp.b / comp.n)
        sq_a.append(c10 * x_a[-1])
        sq_b.append(c01 * x_b[-1])
        known |= comp.present
    if not used:
        raise NotEstimable("no label is estimable: no macro-AUC")
    a, b = np.mean(sq_a, axis=0), np.mean(sq_b, axis=0)
    xa, xb = np.mean(x_a, axis=0), np.mean(x_b, axis=0)
    i_all = int(known.sum())
    cross = i_all / (i_all - 1) * (xa @ xb.T)
    cov = a @ a.T + b @ b.T + cross + cross.T
    return MacroAuc(used, np.mean(aucs, axis=0), cov, n_clusters)
