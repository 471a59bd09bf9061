"""Replicates: the same experiment under K seeds (model initialisation and training order).

A single run's confidence intervals cover the held-out *data* (which patients happened to be
tested); they say nothing about how much the answer moves when the same cohort is trained
again with another seed. ``aggregate`` puts the two side by side: for each primary comparison
(held-out site x single-site model), the mean difference over replicates with a t-interval
across replicates (training variance), next to the mean within-run CI; and the verdict of
every replicate.
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.weightstats import DescrStatsW

LEVEL = 0.95


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Two-sided t-interval of the mean of ``values`` (None with fewer than two)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) < 2:
        return None
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    low, high = DescrStatsW(x).tconfint_mean(alpha=1 - level)
    return float(low), float(high)


def _summary(diffs: list[float], lows: list[float], highs: list[float]) -> dict:
    interval = t_interval(diffs)
    return {"mean_diff": float(np.mean(diffs)),
            "t_low": interval[0] if interval else None,
            "t_high": interval[1] if interval else None,
            "sd_between": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
            "within_low": float(np.mean(lows)), "within_high": float(np.mean(highs)),
            "diffs": [float(d) for d in diffs]}


def aggregate(replicates: list[tuple[int, dict]]) -> dict:
    """``replicates.json`` from (seed, results.json) of each replicate."""
    if not replicates:
        raise ValueError("no replicate finished")
    runs, by_pair = [], {}
    means, mean_lows, mean_highs = [], [], []
    for seed, results in replicates:
        v = results["verdict"]
        rows = v.get("primary", [])
        ref = v.get("reference") or {}
        runs.append({"seed": seed, "status": v["status"], "overall": v["overall"],
                     "mean_primary_diff": float(np.mean([r["diff"] for r in rows]))
                     if rows else None,
                     "pooling_helps": ref.get("pooling_helps")})
        if rows:
            means.append(np.mean([r["diff"] for r in rows]))
            mean_lows.append(np.mean([r["diff_low"] for r in rows]))
            mean_highs.append(np.mean([r["diff_high"] for r in rows]))
        for r in rows + ref.get("federated_vs_reference", []) + ref.get("against_single", []):
            key = (r["site"], r["model_a"], r["model_b"])
            by_pair.setdefault(key, ([], [], []))
            for acc, field in zip(by_pair[key], ("diff", "diff_low", "diff_high"), strict=True):
                acc.append(r[field])
    statuses = [r["status"] for r in runs]
    return {
        "replicates": runs,
        "seeds": [seed for seed, _ in replicates],
        "verdicts": {s: statuses.count(s) for s in dict.fromkeys(statuses)},
        "consistent": len(set(statuses)) == 1,
        "level": LEVEL,
        "mean_primary_diff": _summary(means, mean_lows, mean_highs) if means else None,
        "comparisons": [{"site": s, "model_a": a, "model_b": b, **_summary(*vals)}
                        for (s, a, b), vals in by_pair.items()],
    }


def sentence(summary: dict) -> str:
    """One line: the verdicts and the mean primary difference across replicates."""
    k = len(summary["replicates"])
    verdicts = ", ".join(f"{n} {s}" for s, n in summary["verdicts"].items())
    m = summary.get("mean_primary_diff")
    if not m:
        return f"{k} replicates: {verdicts}."
    spread = (f"; {summary['level']:.0%} t-interval across replicates {m['t_low']:+.3f} to "
              f"{m['t_high']:+.3f}" if m["t_low"] is not None else "")
    return (f"{k} replicates: {verdicts}. Mean primary difference (federated minus single-site,"
            f" averaged over comparisons) {m['mean_diff']:+.3f}{spread}; mean within-run 95% CI "
            f"{m['within_low']:+.3f} to {m['within_high']:+.3f}.")
