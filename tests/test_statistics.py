"""Statistics against reference values: R's pROC on aSAH, scikit-learn, bootstrap, textbooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from common.evaluation.delong import (
    NotEstimable,
    auc_ci,
    delong_components,
    midranks,
    paired_test,
)
from common.evaluation.metrics import (
    at_threshold,
    benjamini_hochberg,
    brier,
    choose_threshold,
    ece,
    holm,
    roc_counts,
    wilson,
    wilson_intervals,
)
from common.evaluation.readers import (
    cohen_kappa,
    fleiss_kappa,
    model_sensitivity_at_specificity,
    reference_standard,
)
from tests.conftest import DATA


@pytest.fixture(scope="module")
def asah():
    d = pd.read_csv(DATA / "aSAH.csv")
    return (d["outcome"] == "Poor").astype(float).to_numpy(), d


def test_asah_matches_proc(asah):
    y, d = asah
    assert auc_ci(y, d["wfns"]).auc == pytest.approx(0.823678861788618, abs=1e-6)
    assert auc_ci(y, d["s100b"]).auc == pytest.approx(0.731368563685637, abs=1e-6)
    ndka = auc_ci(y, d["ndka"])
    assert ndka.auc == pytest.approx(0.611957994579946, abs=1e-6)
    assert ndka.lower == pytest.approx(0.501244999271703, abs=1e-6)
    assert ndka.upper == pytest.approx(0.722670989888189, abs=1e-6)
    t = paired_test(y, d["wfns"], d["s100b"])
    assert t.z == pytest.approx(2.20898359144091, abs=1e-6)
    assert t.p_value == pytest.approx(0.0271757822291882, abs=1e-6)
    assert t.diff_lower == pytest.approx(0.01040618, abs=1e-6)
    assert t.diff_upper == pytest.approx(0.17421442, abs=1e-6)
    t2 = paired_test(y, d["wfns"], d["ndka"])
    assert t2.z == pytest.approx(2.79777591868904, abs=1e-6)
    assert t2.p_value == pytest.approx(0.00514557970691098, abs=1e-6)


def test_auc_equals_sklearn_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(20, 400))
        y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(float)
        if y.min() == y.max():
            continue
        s = np.round(rng.normal(y * rng.uniform(0, 2), 1), int(rng.integers(0, 3)))
        assert auc_ci(y, s).auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_midranks_are_scipys_average_ranks():
    """The numpy ranks behind every AUC (``midranks``) equal scipy.stats.rankdata's average
    ranks row by row: heavy ties, no ties, one value, a NaN row."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(7)
    for shape in [(1, 1), (3, 40), (2, 500), (4, 7)]:
        tied = rng.integers(0, 5, size=shape).astype(float)  # many ties
        distinct = rng.normal(size=shape)
        for values in (tied, distinct):
            np.testing.assert_array_equal(midranks(values), rankdata(values, axis=1))
    row = np.array([[0.3, np.nan, 0.1], [0.2, 0.2, 0.1]])
    ranks = midranks(row)
    assert np.isnan(ranks[0]).all() and np.isnan(rankdata(row[:1], axis=1)).all()
    np.testing.assert_array_equal(ranks[1], [2.5, 2.5, 1.0])


def test_a_sites_aucs_and_their_cis_do_not_import_scipy_stats():
    """A training message's validation AUC (``delong_components``) and a site's CIs run
    without scipy.stats (1.2 s to import, paid by each simulated site process's first
    validation message): the normal quantile is scipy.special's ``ndtri``, the function
    ``scipy.stats.norm.ppf`` computes with, so the CI is the same to the last bit."""
    import subprocess
    import sys

    from scipy.stats import norm

    from common.evaluation.delong import delong_components

    code = ("import sys, numpy as np\n"
            "from common.evaluation.delong import auc_ci, delong_components\n"
            "y = np.array([0, 1, 0, 1, 1, 0]); s = np.array([[.1, .9, .3, .6, .4, .5]])\n"
            "aucs, cov, m, n = delong_components(y, s)\n"
            "print(round(float(aucs[0]), 4), 'scipy.stats' in sys.modules)\n"
            "ci = auc_ci(y, s[0], level=0.9); print('scipy.stats' in sys.modules)\n"
            "print(repr(ci.lower), repr(ci.upper))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
    y, s = np.array([0, 1, 0, 1, 1, 0]), np.array([[.1, .9, .3, .6, .4, .5]])
    assert out[:3] == [str(round(roc_auc_score(y, s[0]), 4)), "False", "False"]
    aucs, cov, _, _ = delong_components(y, s)
    half = norm.ppf(0.95) * np.sqrt(cov[0, 0])
    assert [float(out[3]), float(out[4])] == [max(0.0, aucs[0] - half), min(1.0, aucs[0] + half)]


def test_delong_variance_agrees_with_bootstrap():
    rng = np.random.default_rng(1)
    n = 400
    y = (rng.random(n) < 0.3).astype(float)
    s = rng.normal(y * 1.0, 1.0)
    var = auc_ci(y, s).variance
    boots = []
    for _ in range(3000):
        i = rng.integers(0, n, n)
        if 0 < y[i].sum() < n:
            boots.append(roc_auc_score(y[i], s[i]))
    assert var == pytest.approx(np.var(boots), rel=0.15)


def test_nan_labels_are_ignored_and_one_class_is_not_estimable():
    y = np.array([1, 0, np.nan, 1, 0])
    s = np.array([0.9, 0.1, 0.5, 0.8, 0.3])
    assert auc_ci(y, s).auc == 1.0 and auc_ci(y, s).n_pos == 2
    with pytest.raises(NotEstimable):
        auc_ci(np.zeros(5), s)
    aucs, cov, m, n = delong_components(np.array([1, 0, 0]), np.array([0.9, 0.2, 0.1]))
    assert aucs[0] == 1.0 and np.isnan(cov).all()


def test_wilson_interval_known_value():
    # 81 of 263 (Wilson 1927 / Newcombe 1998 example): 0.2553 to 0.3662
    lo, hi = wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)


def test_wilson_intervals_at_once_equal_one_call_each():
    """``at_threshold``'s four intervals come from one ``proportion_confint`` call: each is
    statsmodels' own interval for that proportion alone, bit for bit (NaN where n is 0)."""
    from statsmodels.stats.proportion import proportion_confint

    ks, ns = [0, 3, 7, 7, 81, 0, 1], [5, 10, 7, 0, 263, 0, 1]
    got = wilson_intervals(ks, ns, 0.9)
    assert len(got) == len(ks)
    for k, n, (lo, hi) in zip(ks, ns, got, strict=True):
        if n == 0:
            assert np.isnan(lo) and np.isnan(hi)
            continue
        low, high = proportion_confint(k, n, alpha=0.1, method="wilson")
        assert (lo, hi) == (max(0.0, float(low)), min(1.0, float(high)))
    assert wilson_intervals([], []) == []


def test_operating_point_counts():
    y = np.array([1, 1, 1, 0, 0, 0, 0, np.nan])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.05, 0.99])
    op = at_threshold(y, s, 0.5)
    assert (op.tp, op.fn, op.fp, op.tn) == (2, 1, 1, 3)
    assert op.sensitivity == pytest.approx(2 / 3) and op.specificity == pytest.approx(3 / 4)
    assert op.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert (op.sensitivity_ci, op.specificity_ci, op.ppv_ci, op.npv_ci) == (
        wilson(2, 3), wilson(3, 4), wilson(2, 3), wilson(3, 4))
    none = at_threshold(np.array([0.0, 0.0]), np.array([0.1, 0.2]), 0.5)  # no positives
    assert np.isnan(none.sensitivity_ci[0]) and none.specificity_ci == wilson(2, 2)


def test_threshold_choice_from_summed_counts():
    rng = np.random.default_rng(2)
    y = (rng.random(2000) < 0.3).astype(float)
    s = 1 / (1 + np.exp(-rng.normal(2 * y - 1, 1)))
    half = 1000
    a, b = roc_counts(y[:half], s[:half]), roc_counts(y[half:], s[half:])
    pooled = (a[0] + b[0], a[1] + b[1])
    t = choose_threshold(*pooled, "specificity", 0.9)
    spec = at_threshold(y, s, t).specificity
    assert spec >= 0.9 and at_threshold(y, s, t - 0.002).specificity < 0.9 + 0.01
    t_sens = choose_threshold(*pooled, "sensitivity", 0.8)
    assert at_threshold(y, s, t_sens).sensitivity >= 0.8
    t_y = choose_threshold(*pooled, "youden")
    grid = np.linspace(0, 1, 1001)
    j = [at_threshold(y, s, g).sensitivity + at_threshold(y, s, g).specificity for g in grid]
    assert t_y == pytest.approx(grid[int(np.argmax(j))], abs=1e-9)
    t_f1 = choose_threshold(*pooled, "max_f1")
    f1 = [at_threshold(y, s, g).f1 for g in grid]
    assert at_threshold(y, s, t_f1).f1 == pytest.approx(np.nanmax(f1), abs=1e-9)


def test_ece_and_brier_on_constructed_cases():
    y = np.array([1, 0] * 50, dtype=float)
    p = np.full(100, 0.8)
    assert ece(y, p) == pytest.approx(0.3)
    assert brier(y, p) == pytest.approx(0.5 * 0.04 + 0.5 * 0.64)
    # two bins, each exactly calibrated
    y2 = np.array([1] * 2 + [0] * 8 + [1] * 9 + [0] * 1, dtype=float)
    p2 = np.array([0.2] * 10 + [0.9] * 10)
    assert ece(y2, p2) == pytest.approx(0.0, abs=1e-12)


def test_holm_and_bh_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(holm([0.5, np.nan]), [0.5, np.nan])


def test_kappas_on_textbook_examples():
    # Fleiss (1971) as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
             [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
             [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    # Cohen: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4
    a = np.array([1] * 25 + [0] * 25)
    b = np.array([1] * 20 + [0] * 5 + [1] * 10 + [0] * 15)
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_reference_standard_majority_and_adjudicated():
    frame = pd.DataFrame({"reader1/Edema": [1, 1, 0, 1], "reader2/Edema": [1, 0, 0, np.nan],
                          "reader3/Edema": [0, 1, 0, np.nan]})
    np.testing.assert_array_equal(reference_standard(frame, "Edema"), [1, 1, 0, 1])
    frame["reader3/Edema"] = [0, 0, 0, 0]
    ref = reference_standard(frame.drop(columns="reader1/Edema"), "Edema")
    assert np.isnan(ref[0]) and ref[2] == 0
    frame["adjudicated/Edema"] = [0, 0, 1, 1]
    np.testing.assert_array_equal(reference_standard(frame, "Edema"), [0, 0, 1, 1])


def test_model_sensitivity_at_reader_specificity():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.3, 0.7, 0.2, 0.1, 0.05])
    sens, spec = model_sensitivity_at_specificity(y, s, 0.75)  # threshold just above 0.2
    assert spec == 0.75 and sens == 1.0
    sens, spec = model_sensitivity_at_specificity(y, s, 1.0)
    assert spec == 1.0 and sens == pytest.approx(0.5)
