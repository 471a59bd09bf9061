"""Evaluator speed: 100,000 images x 14 labels x 6 models, every AUC, DeLong CI and paired
test (model 0 vs each other), against scikit-learn computing the AUCs alone; and the
patient-clustered path (Obuchowski; 40,000 patients) against the unclustered one, per label
and for the macro-AUC primary endpoint.

    .venv/bin/python benchmarks/evaluator_speed.py [--images 100000 --patients 40000 --models 6]

Target: under 5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from common.evaluation.external import EvaluationOptions, evaluate_scores
from common.labels import LABELS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--patients", type=int, default=40_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, k = args.images, len(LABELS)
    y = (rng.random((n, k)) < 0.1).astype(float)
    # Scores rounded to 3 decimals: ties, as real model outputs have.
    scores = {f"m{j}": np.round(1 / (1 + np.exp(-rng.normal(y * (0.5 + 0.2 * j), 1))), 3)
              for j in range(args.models)}
    thresholds = {m: {lb: 0.5 for lb in LABELS} for m in scores}

    from common.evaluation.delong import delong_components

    start = time.perf_counter()
    for label in range(k):
        delong_components(y[:, label], np.stack([s[:, label] for s in scores.values()]))
    core = time.perf_counter() - start

    start = time.perf_counter()
    evaluate_scores(y, scores, thresholds, site="bench", options=EvaluationOptions())
    full = time.perf_counter() - start

    start = time.perf_counter()
    for s in scores.values():
        for label in range(k):
            roc_auc_score(y[:, label], s[:, label])
    sk = time.perf_counter() - start
    # Patient-clustered: the same statistics, components summed within 40,000 patients.
    from common.evaluation.delong import cluster_codes, cluster_components, macro_auc

    patients = np.sort(rng.integers(0, args.patients, n)).astype(str)
    stacked = np.stack(list(scores.values()))
    start = time.perf_counter()
    codes = cluster_codes(patients, n)
    for label in range(k):
        cluster_components(y[:, label], stacked[:, :, label], codes,
                           int(codes.max()) + 1).covariance()
    clustered = time.perf_counter() - start
    start = time.perf_counter()
    macro_auc(y, stacked, patients)
    macro = time.perf_counter() - start
    start = time.perf_counter()
    evaluate_scores(y, scores, thresholds, site="bench",
                    meta=None, options=EvaluationOptions(primary_labels=list(LABELS)))
    full_primary = time.perf_counter() - start

    combos = args.models * k
    print(f"{n} images x {k} labels x {args.models} models ({combos} AUCs, "
          f"{(args.models - 1) * k} paired tests)")
    print(f"AUCs + DeLong CIs + paired tests:   {core:6.2f} s  (target < 5 s)")
    print(f"full evaluate_scores (+ operating points, calibration, ROC points): {full:6.2f} s")
    print(f"scikit-learn roc_auc_score alone:   {sk:6.2f} s")
    print(f"ratio (ours, AUC+CI+tests) / (sklearn, AUC only): {core / sk:.2f}x")
    print(f"clustered by {args.patients} patients, AUCs + CIs + covariances: {clustered:6.2f} s"
          f"  ratio clustered / unclustered: {clustered / core:.2f}x")
    print(f"clustered macro-AUC over {k} labels, {args.models} models (primary endpoint): "
          f"{macro:6.2f} s")
    print(f"full evaluate_scores with the primary endpoint (image clusters): {full_primary:6.2f} s"
          f"  ratio to without: {full_primary / full:.2f}x")


if __name__ == "__main__":
    main()
