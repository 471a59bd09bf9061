"""Patient-clustered AUC statistics (Obuchowski 1997) against DeLong and brute force, and the
primary rule's type-I error by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from common.evaluation.delong import (
    auc_ci,
    cluster_codes,
    cluster_components,
    clustered_auc,
    clustered_paired_test,
    macro_auc,
    paired_test,
)
from tests.conftest import DATA


def brute_force(y, scores, clusters):
    """Obuchowski's variance and covariance from the definition, O(M N) with loops."""
    y = np.asarray(y, float)
    k = len(scores)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    ids = sorted(set(clusters))
    cl = np.array([ids.index(c) for c in clusters])
    big_i = len(ids)
    aucs, v10, v01 = [], [], []
    for s in scores:
        psi = np.array([[1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0 for j in neg]
                        for i in pos])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    a = np.zeros((k, big_i))
    b = np.zeros((k, big_i))
    m_i = np.zeros(big_i)
    n_i = np.zeros(big_i)
    for r in range(k):
        for t, i in enumerate(pos):
            a[r, cl[i]] += v10[r][t]
        for t, j in enumerate(neg):
            b[r, cl[j]] += v01[r][t]
    for i in pos:
        m_i[cl[i]] += 1
    for j in neg:
        n_i[cl[j]] += 1
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    cov = np.zeros((k, k))
    for r in range(k):
        for q in range(k):
            s10 = i10 / ((i10 - 1) * m) * sum(
                (a[r, i] - m_i[i] * aucs[r]) * (a[q, i] - m_i[i] * aucs[q]) for i in range(big_i))
            s01 = i01 / ((i01 - 1) * n) * sum(
                (b[r, i] - n_i[i] * aucs[r]) * (b[q, i] - n_i[i] * aucs[q]) for i in range(big_i))
            s11_rq = big_i / (big_i - 1) * sum(
                (a[r, i] - m_i[i] * aucs[r]) * (b[q, i] - n_i[i] * aucs[q]) for i in range(big_i))
            s11_qr = big_i / (big_i - 1) * sum(
                (a[q, i] - m_i[i] * aucs[q]) * (b[r, i] - n_i[i] * aucs[r]) for i in range(big_i))
            cov[r, q] = s10 / m + s01 / n + (s11_rq + s11_qr) / (m * n)
    return np.array(aucs), cov


def clustered_data(rng, patients=30, max_images=4, effect=1.0, patient_sd=1.0, ties=False):
    """Patients with 1..max_images images, a patient-level random effect on both models'
    scores and on disease (so images of one patient are correlated)."""
    sizes = rng.integers(1, max_images + 1, patients)
    clusters = np.repeat([f"P{i}" for i in range(patients)], sizes)
    u = np.repeat(rng.normal(0, patient_sd, patients), sizes)
    y = (rng.random(len(u)) < 1 / (1 + np.exp(-(u - 0.3)))).astype(float)
    a = effect * y + u + rng.normal(0, 1, len(u))
    b = effect * y + u + rng.normal(0, 1, len(u))
    if ties:
        a, b = np.round(a), np.round(b)
    return y, a, b, clusters


def test_singleton_clusters_equal_delong_on_asah():
    import pandas as pd

    d = pd.read_csv(DATA / "aSAH.csv")
    y = (d["outcome"] == "Poor").astype(float).to_numpy()
    ids = np.arange(len(y))
    for col in ("wfns", "s100b", "ndka"):
        c, plain = clustered_auc(y, d[col], ids), auc_ci(y, d[col])
        assert c.auc == pytest.approx(plain.auc, abs=1e-12)
        assert c.variance == pytest.approx(plain.variance, rel=1e-10)
        assert (c.lower, c.upper) == pytest.approx((plain.lower, plain.upper), abs=1e-10)
    t, ref = clustered_paired_test(y, d["wfns"], d["s100b"], ids), paired_test(
        y, d["wfns"], d["s100b"])
    # pROC roc.test(..., method="delong"): Z = 2.20898359144091, p = 0.0271757822291882
    assert t.z == pytest.approx(2.20898359144091, abs=1e-6)
    assert t.p_value == pytest.approx(0.0271757822291882, abs=1e-6)
    assert (t.diff_lower, t.diff_upper) == pytest.approx((ref.diff_lower, ref.diff_upper),
                                                         abs=1e-10)


def test_clustered_equals_brute_force_with_ties():
    rng = np.random.default_rng(3)
    for trial in range(6):
        y, a, b, cl = clustered_data(rng, patients=int(rng.integers(8, 25)), ties=trial % 2 == 0)
        if y.sum() < 3 or (1 - y).sum() < 3:
            continue
        aucs, cov = brute_force(y, [a, b], list(cl))
        ca = clustered_auc(y, a, cl)
        assert ca.auc == pytest.approx(aucs[0], abs=1e-12)
        assert ca.variance == pytest.approx(cov[0, 0], rel=1e-9)
        t = clustered_paired_test(y, a, b, cl)
        sd = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
        assert t.z == pytest.approx((aucs[0] - aucs[1]) / sd, rel=1e-9)
        # macro-AUC over one label is the same statistic
        macro = macro_auc(y[:, None], np.stack([a, b])[:, :, None], cl)
        assert macro.aucs == pytest.approx(aucs, abs=1e-12)
        assert macro.covariance == pytest.approx(cov, rel=1e-9)


def test_duplicating_images_within_patient_leaves_variance_unchanged():
    rng = np.random.default_rng(4)
    y, a, b, cl = clustered_data(rng, patients=40)
    once = clustered_auc(y, a, cl)
    twice = clustered_auc(np.tile(y, 2), np.tile(a, 2), np.tile(cl, 2))
    assert twice.auc == pytest.approx(once.auc, abs=1e-12)
    assert twice.variance == pytest.approx(once.variance, rel=1e-10)
    # ... whereas image-level DeLong shrinks it, treating the copies as new patients.
    assert auc_ci(np.tile(y, 2), np.tile(a, 2)).variance < 0.6 * auc_ci(y, a).variance


def test_blank_patient_ids_are_clusters_of_one_image():
    rng = np.random.default_rng(5)
    y, a, _, _ = clustered_data(rng, patients=50)
    blank = np.array([None] * len(y), dtype=object)
    assert clustered_auc(y, a, blank).variance == pytest.approx(auc_ci(y, a).variance,
                                                                rel=1e-10)


def test_macro_auc_is_the_mean_and_its_variance_matches_simulation():
    """Variance of the macro-AUC of 3 correlated labels against its spread over many
    simulated cohorts (the same generating model)."""
    rng = np.random.default_rng(6)

    def cohort():
        patients = 120
        sizes = rng.integers(1, 4, patients)
        cl = np.repeat(np.arange(patients), sizes)
        u = np.repeat(rng.normal(0, 1, patients), sizes)
        y = np.stack([(rng.random(len(u)) < 1 / (1 + np.exp(-(u + o)))) for o in
                      (-0.5, 0.0, 0.5)], axis=1).astype(float)
        s = y * 0.8 + u[:, None] + rng.normal(0, 1, y.shape)
        return y, s[None], cl

    y, s, cl = cohort()
    y[:40, 1] = np.nan  # a label unknown for some images
    m = macro_auc(y, s, cl)
    per_label = [clustered_auc(y[:, k], s[0, :, k], cl).auc for k in range(3)]
    assert m.aucs[0] == pytest.approx(np.mean(per_label), abs=1e-12)
    # the evaluator's path: components computed once per label, reused for the macro-AUC
    codes = cluster_codes(cl, len(y))
    comps = {k: cluster_components(y[:, k], s[:, :, k], codes, int(codes.max()) + 1)
             for k in range(3)}
    reused = macro_auc(y, None, cl, components=comps)
    assert reused.aucs == pytest.approx(m.aucs) and reused.covariance == pytest.approx(
        m.covariance, rel=1e-12)
    estimates, variances = [], []
    for _ in range(400):
        y, s, cl = cohort()
        r = macro_auc(y, s, cl)
        estimates.append(r.aucs[0])
        variances.append(r.covariance[0, 0])
    assert np.mean(variances) == pytest.approx(np.var(estimates), rel=0.2)


def simulate_primary(rng, clustered: bool, sites=2, models_b=3, patients=100, labels=2):
    """One replicate of the primary rule on two (or more) equally good models: True when any
    Holm-adjusted comparison is significant (a false claim of a difference)."""
    from common.evaluation.verdict import primary_rows

    rows = []
    for site in range(sites):
        sizes = rng.integers(1, 8, patients)
        cl = np.repeat(np.arange(patients), sizes)
        u = np.repeat(rng.normal(0, 1.5, patients), sizes)
        y = np.stack([(rng.random(len(u)) < 1 / (1 + np.exp(-(u - 0.5 * k))))
                      for k in range(labels)], axis=1).astype(float)
        # every model: the same signal and patient effect, plus its own error on each
        # patient (shared by that patient's images) and on each image
        scores = np.stack([y + u[:, None] + np.repeat(rng.normal(0, 1, (patients, 1)), sizes,
                                                      axis=0) + rng.normal(0, 0.5, y.shape)
                           for _ in range(models_b + 1)])
        m = macro_auc(y, scores, cl if clustered else None)
        for j in range(1, models_b + 1):
            t = m.paired(0, j)
            rows.append({"site": f"s{site}", "model_a": "fed", "model_b": f"b{j}",
                         "diff": t.auc_a - t.auc_b, "diff_low": t.diff_lower,
                         "diff_high": t.diff_upper, "z": t.z, "p_value": t.p_value,
                         "sd": (t.diff_upper - t.diff_lower) / (2 * norm.ppf(0.975))})
    return any(r["p_adjusted"] < 0.05 for r in primary_rows(rows, alpha=0.05))


@pytest.mark.slow
def test_primary_rule_type_one_error_on_nulls():
    """500 null replicates: the clustered primary rule rejects at most alpha (within Monte
    Carlo error); the same rule with image-level variances rejects far more often."""
    rng = np.random.default_rng(11)
    reps = 500
    clustered = np.mean([simulate_primary(rng, True) for _ in range(reps)])
    mc = 3 * np.sqrt(0.05 * 0.95 / reps)
    naive = np.mean([simulate_primary(rng, False) for _ in range(200)])
    print(f"\nprimary rule on nulls: clustered rejects {clustered:.3f} of {reps}, "
          f"image-level {naive:.3f} of 200 (alpha 0.05)")
    assert clustered <= 0.05 + mc, clustered
    assert naive > 0.05 + 3 * np.sqrt(0.05 * 0.95 / 200), (naive, clustered)
