"""H2 and H3 statistics: Grad-CAM against a hand computation, pointing game / IoU / marker
mass on hand-made maps, the clustered CI of a mean against statsmodels and by its coverage,
and the reader statistics (Fleiss on sparse readers, its bootstrap CI's coverage, readers
against the others' majority, the weighted operating points) against brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from statsmodels.stats.inter_rater import aggregate_raters
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

from common.evaluation import readers as rd
from common.evaluation.gradcam import gradcam, gradcam_batch, gradcam_labels
from common.evaluation.localisation import (
    LocalisationOptions,
    box_mask,
    clustered_mean,
    iou,
    localise,
    mass_inside,
    pointing_hit,
)
from common.labels import LABELS
from common.model import build_model


class Tiny(torch.nn.Module):
    """features -> ReLU -> mean -> linear: DenseNet's head on a one-layer trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.classifier = torch.nn.Linear(3, len(LABELS))

    def forward(self, x):
        return self.classifier(F.relu(self.features(x)).mean(dim=(2, 3)))


def _bilinear(a: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling (align_corners=False), written out."""
    n = a.shape[0]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    t = src - i0
    rows = a[i0] * (1 - t)[:, None] + a[i1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i1] * t[None, :]


def test_gradcam_equals_the_hand_computation_on_a_tiny_model():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(1, 1, 8, 8)
    label = 5
    a = model.features(x)[0].detach().numpy()  # (3, 4, 4)
    w = model.classifier.weight[label].detach().numpy()
    # d logit / d a[k, i, j] = w[k] * [a > 0] / 16: Grad-CAM's channel weight is its mean
    alpha = w * (a > 0).mean(axis=(1, 2)) / 16
    cam = np.maximum((alpha[:, None, None] * a).sum(axis=0), 0)
    up = _bilinear(cam, 8)
    expected = (up - up.min()) / (up.max() - up.min())
    np.testing.assert_allclose(gradcam(model, x, label), expected, atol=1e-5)


def test_a_batch_and_several_labels_give_each_image_its_own_map():
    """One forward for the batch, one backward per label: the same maps as image by image
    (DenseNet in eval mode mixes nothing between images)."""
    torch.manual_seed(1)
    model = build_model(norm="batch").eval()
    x = torch.rand(3, 1, 96, 96)  # a 3 x 3 map
    together = gradcam_labels(model, x, [2, 7])
    for i in range(3):
        for n, label in enumerate([2, 7]):
            np.testing.assert_allclose(together[n, i], gradcam(model, x[i:i + 1], label),
                                       atol=1e-4)
    assert gradcam_batch(model, x, 2).shape == (3, 96, 96)
    peaks = together.max(axis=(2, 3))  # each map min-max normalised, or empty (ReLU'd away)
    assert together.min() >= 0 and np.all(np.isclose(peaks, 1) | (peaks == 0)) and peaks.any()


def test_pointing_game_iou_and_marker_mass_on_hand_made_maps():
    mask = box_mask(np.array([[2.0, 2.0, 5.0, 4.0]]), 8)  # x 2..5, y 2..4: pixels 2-4 x 2-3
    assert mask.sum() == 6 and mask[2:4, 2:5].all()
    heat = np.zeros((8, 8))
    heat[3, 4] = 1.0
    assert pointing_hit(heat, mask)
    heat[3, 4], heat[7, 7] = 0.5, 1.0
    assert not pointing_hit(heat, mask)
    assert not pointing_hit(np.zeros((8, 8)), mask)  # an empty map points nowhere
    plateau = np.zeros((8, 8))
    plateau[1:5, 1:6] = 1.0  # a plateau of maxima: its centre (3, 3) is in the box
    assert pointing_hit(plateau, mask)
    hot = np.zeros((8, 8))
    hot[2:4, 2:6] = 0.8  # 8 hot pixels, 6 of them in the box: IoU 6 / 8
    assert iou(hot, mask) == pytest.approx(6 / 8)
    assert iou(hot * 0.5, mask) == 0.0  # below the 0.5 threshold nothing is hot
    assert mass_inside(hot, mask) == pytest.approx(6 / 8)
    assert mass_inside(np.zeros((8, 8)), mask) == 0.0


def test_clustered_mean_ci_equals_statsmodels_cluster_robust_intercept():
    import statsmodels.api as sm

    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(30), rng.integers(1, 4, 30))
    values = rng.random(len(clusters)) + 0.3 * (clusters % 3)
    mean, low, high = clustered_mean(values, clusters)
    fit = sm.OLS(values, np.ones((len(values), 1))).fit(cov_type="cluster",
                                                        cov_kwds={"groups": clusters},
                                                        use_t=False)
    lo_sm, hi_sm = fit.conf_int()[0]
    assert mean == pytest.approx(fit.params[0])
    assert (low, high) == pytest.approx((lo_sm, hi_sm), rel=1e-9)


def test_clustered_mean_ci_covers_the_true_rate_about_95_percent():
    """Hit rates of patients with 1-3 correlated images: the CI covers the true rate."""
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(1000):
        n_img = rng.integers(1, 4, 60)
        p = rng.beta(2, 2, 60)  # each patient's own hit probability; mean 0.5
        values = np.concatenate([rng.random(k) < q for k, q in zip(n_img, p, strict=True)])
        clusters = np.repeat(np.arange(60), n_img)
        _, low, high = clustered_mean(values.astype(float), clusters)
        covered += low <= 0.5 <= high
    assert 0.92 <= covered / 1000 <= 0.975


def test_fleiss_on_sparse_readers_uses_the_images_read_by_the_usual_number():
    """VinDr: three of seventeen readers per image. The table is the images with the most
    common count; on it, our kappa is statsmodels'."""
    rng = np.random.default_rng(5)
    votes = np.full((50, 6), np.nan)
    for i in range(50):
        who = rng.choice(6, 2 if i < 5 else 3, replace=False)
        votes[i, who] = rng.random(len(who)) < 0.3
    table, keep = rd.fleiss_table(votes)
    assert keep.sum() == 45 and (table.sum(axis=1) == 3).all()
    calls = np.array([v[~np.isnan(v)] for v in votes[keep]])
    expected = sm_fleiss(aggregate_raters(calls.astype(int), n_cat=2)[0])
    assert rd.fleiss_kappa(table) == pytest.approx(expected)


def _readers(rng, n_patients: int, agree: float):
    """Three readers who each copy a latent truth with probability ``agree``, else guess."""
    truth = rng.random(n_patients) < 0.3
    copy = rng.random((n_patients, 3)) < agree
    guess = rng.random((n_patients, 3)) < 0.3
    return np.where(copy, truth[:, None], guess).astype(float)


def test_fleiss_bootstrap_ci_covers_the_population_kappa():
    """The population kappa of this reader model (from 200,000 images), covered by the
    patient-bootstrap CI of samples of 150 in about 95% of 120 samples."""
    rng = np.random.default_rng(6)
    big = _readers(rng, 200_000, 0.6)
    truth = rd.fleiss_kappa(rd.fleiss_table(big)[0])
    covered = 0
    for s in range(120):
        votes = _readers(rng, 150, 0.6)
        ci = rd.fleiss_with_ci(votes, np.arange(150), n_boot=200, seed=s)
        covered += ci["ci_low"] <= truth <= ci["ci_high"]
    assert covered / 120 >= 0.88


def test_each_reader_is_scored_against_the_others_majority():
    votes = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 1], [1, 0, 1]], float)
    frame = pd.DataFrame(votes, columns=[f"reader{k}/Edema" for k in (1, 2, 3)])
    study = rd.reader_study(frame, "Edema", {}, n_boot=0)
    for r, point in enumerate(study["reader_points"]):
        others = np.delete(votes, r, axis=1)
        ref = others.sum(axis=1)  # two others: 2 positive, 0 negative, 1 a tie (left out)
        pos, neg = ref == 2, ref == 0
        assert point["sensitivity"] == pytest.approx(votes[pos, r].mean())
        assert point["specificity"] == pytest.approx(1 - votes[neg, r].mean())


def test_weighted_operating_points_equal_duplicated_rows():
    """Bootstrap weights of 2 are the same as the row twice (brute force)."""
    rng = np.random.default_rng(7)
    y = (rng.random(40) < 0.4).astype(float)
    s = rng.random(40) + 0.5 * y
    w = rng.integers(0, 3, 40).astype(float)
    y2, s2 = np.repeat(y, w.astype(int)), np.repeat(s, w.astype(int))
    for target in (0.5, 0.8, 0.95):
        assert rd._sens_at_spec(y, s, w, target) == pytest.approx(
            rd._sens_at_spec(y2, s2, np.ones(len(y2)), target))
        assert rd._spec_at_sens(y, s, w, target) == pytest.approx(
            rd._spec_at_sens(y2, s2, np.ones(len(y2)), target))


def test_model_against_readers_has_cis_from_cases_and_readers():
    rng = np.random.default_rng(8)
    votes = _readers(rng, 120, 0.8)
    frame = pd.DataFrame(votes, columns=[f"reader{k}/Effusion" for k in (1, 2, 3)])
    ref = rd.reference_standard(frame, "Effusion")
    perfect = ref + 0.01 * rng.random(120)
    study = rd.reader_study(frame, "Effusion", {"m": perfect}, n_boot=100)
    m = study["models"]["m"]
    assert m["sensitivity_at_reader_specificity"] == 1.0
    assert m["specificity_at_reader_sensitivity"] == 1.0
    lo, hi = m["sensitivity_ci"]
    assert lo is not None and lo <= 1.0 <= hi
    assert 0 < study["mean_reader"]["specificity"] < 1


def test_localise_releases_only_aggregates_and_honours_min_cell():
    torch.manual_seed(2)
    model = build_model(norm="batch").eval()
    rng = np.random.default_rng(9)
    images = (rng.random((12, 64, 64)) * 255).astype(np.uint8)
    reference = np.zeros((12, len(LABELS)))
    reference[:, LABELS.index("Nodule")] = 1
    boxes = pd.DataFrame(
        [(i, "Nodule", 4.0, 4.0, 24.0, 24.0, "") for i in range(12)]
        + [(i, "Marker", 0.0, 56.0, 8.0, 64.0, "") for i in range(5)],
        columns=["row", "label", "x0", "y0", "x1", "y1", "reader"])
    out = localise(model, images, 255.0, boxes, reference, np.arange(12), site="s",
                   model_name="m", options=LocalisationOptions(min_cell=10))
    (row,) = out["localisation"]
    assert row["label"] == "Nodule" and row["n_images"] == 12 and row["status"] == "ok"
    assert 0 <= row["hit_low"] <= row["hit_rate"] <= row["hit_high"] <= 1
    assert len(out["shortcut"]) == len(LABELS)
    # 5 marked images (empty maps left out of the share): under min-cell, nothing released
    assert all(r["n_images"] + r["empty_maps"] == 5 and "marker_share" not in r
               for r in out["shortcut"])
    capped = localise(model, images, 255.0, boxes, reference, np.arange(12), site="s",
                      model_name="m", options=LocalisationOptions(min_cell=1, max_images=3))
    assert capped["localisation"][0]["n_images"] == 3
    small = localise(model, images[:, :32, :32], 255.0, boxes, reference, np.arange(12),
                     site="s", model_name="m")
    assert not small["localisation"] and "one cell" in small["localisation_skipped"][0]["reason"]

