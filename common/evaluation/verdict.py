"""The H1 decision: the prespecified primary endpoint and its verdict, and the secondary
per-label analysis. The report renders what this module decides; it decides nothing itself.

Primary endpoint (fixed in the run config before training, written to results.json as
``protocol``): at each held-out site, the federated model's macro-AUC over the primary labels
minus each single-site model's, paired and patient-clustered (``delong.macro_auc``). The
family is (held-out sites x single-site models), Holm-corrected. Per-label tests are a
separate family (secondary analysis) and never decide the verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from common.evaluation.metrics import adjust
from common.labels import LABELS

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Protocol:
    """The prespecified analysis (results.json ``protocol``)."""

    primary_labels: list[str]
    selection: str = "best-val"
    margin: float = 0.0
    alpha: float = ALPHA
    correction: str = "holm"
    primary_metric: str = "macro-auc"
    clustered_by: str = "patient"
    power: float = POWER

    def as_dict(self) -> dict:
        return asdict(self)


def test_against_margin(diff: float, sd: float | None, margin: float) -> tuple[float, float]:
    """(z, two-sided p) of diff = margin; (0, 1) without a variance."""
    if sd is None or not np.isfinite(sd) or sd <= 0:
        return 0.0, 1.0
    z = (diff - margin) / sd
    return float(z), float(2 * norm.sf(abs(z)))


def minimal_detectable_difference(sd: float | None, alpha: float, family: int,
                                  power: float = POWER) -> float | None:
    """Smallest true difference a two-sided test with this sd detects with ``power`` at the
    strictest level Holm can apply in a family of ``family`` tests (alpha / family)."""
    if sd is None or not np.isfinite(sd) or sd <= 0 or family < 1:
        return None
    return float((norm.isf(alpha / family / 2) + norm.ppf(power)) * sd)


def primary_rows(rows: list[dict], *, alpha: float = ALPHA, margin: float = 0.0,
                 correction: str = "holm", power: float = POWER) -> list[dict]:
    """Primary comparisons (site, model_b, diff, sd, ...) with z and p against ``margin``,
    ``p_adjusted`` over the family (all rows) and ``mdd``."""
    tested = []
    for r in rows:
        z, p = test_against_margin(r["diff"], r.get("sd"), margin)
        tested.append({**r, "z": z, "p_value": p})
    adjusted = adjust([r["p_value"] for r in tested], correction) if tested else []
    return [{**r, "p_adjusted": float(p),
             "mdd": minimal_detectable_difference(r.get("sd"), alpha, len(tested), power)}
            for r, p in zip(tested, adjusted, strict=True)]


RULE = ("H1 is supported when, at every held-out site, the federated model's macro-AUC over "
        "the primary labels exceeds every single-site model's by more than the margin with "
        "{correction}-adjusted p < {alpha} over (held-out sites x single-site models); "
        "contradicted when any of those comparisons is significantly below the margin; "
        "inconclusive otherwise.")


def primary_verdict(rows: list[dict], protocol: Protocol) -> dict:
    """``verdict`` of results.json from the primary rows (already adjusted)."""
    rule = RULE.format(correction=protocol.correction.capitalize()
                       if protocol.correction == "holm" else protocol.correction,
                       alpha=protocol.alpha)
    base = {"rule": rule, "primary": rows, "alpha": protocol.alpha}
    if not rows:
        return {**base, "status": "not testable",
                "overall": "H1 not testable: no primary comparison could be estimated (no "
                           "held-out site, or no primary label estimable there)."}
    sig = [r for r in rows if r["p_adjusted"] < protocol.alpha]
    wins = [r for r in sig if r["diff"] > protocol.margin]
    losses = [r for r in sig if r["diff"] < protocol.margin]
    if losses:
        status = "contradicted"
    elif len(wins) == len(rows):
        status = "supported"
    else:
        status = "inconclusive"
    worst = min(rows, key=lambda r: r["diff"])
    margin = f" by more than {protocol.margin:g}" if protocol.margin else ""
    sentence = (f"H1 {status}: the federated model's macro-AUC over {len(protocol.primary_labels)}"
                f" primary label(s) exceeded every single-site model's{margin} in {len(wins)} "
                f"of {len(rows)} primary comparisons (closest: {worst['model_b']} at "
                f"{worst['site']}, difference {worst['diff']:+.3f}, 95% CI "
                f"{worst['diff_low']:+.3f} to {worst['diff_high']:+.3f}, adjusted p = "
                f"{worst['p_adjusted']:.3g}).")
    if status == "inconclusive":
        mdds = [r["mdd"] for r in rows if r.get("mdd") is not None]
        if mdds:
            spread = (f" (largest over comparisons; smallest {min(mdds):.3f})"
                      if len(mdds) > 1 else "")
            sentence += (f" With this held-out data a true difference of {max(mdds):.3f} in "
                         f"macro-AUC{spread} would have been detected with "
                         f"{protocol.power:.0%} power; smaller differences could not be told "
                         "from none.")
    return {**base, "status": status, "overall": sentence}


def split_primary(rows: list[dict], reference: str | None) -> tuple[list[dict], list[dict]]:
    """(the verdict's family: every primary comparison without the centralised reference,
    i.e. federated vs each single-site model; the reference's comparisons)."""
    theirs = [r for r in rows if reference in (r["model_a"], r["model_b"])]
    return [r for r in rows if r not in theirs], theirs


def reference_check(rows: list[dict], protocol: Protocol, reference: str, federated: str,
                    singles: list[str]) -> dict | None:
    """The known-answer check of a centralised reference (simulation only): does a model
    trained on the pooled training sites beat every single-site model at every held-out site
    on the primary endpoint (the verdict's rule, its own Holm family)? If it does not,
    pooling does not help on this cohort, and a federated "supported" is not expected.
    Also the federated arm against the reference (how much federation gives up)."""
    against = [r for r in rows if r["model_a"] == reference and r["model_b"] in singles]
    versus = [r for r in rows if r["model_a"] == federated and r["model_b"] == reference]
    if not (against or versus):
        return None
    tested = primary_rows(against, alpha=protocol.alpha, margin=protocol.margin,
                          correction=protocol.correction, power=protocol.power)
    wins = [r for r in tested if r["p_adjusted"] < protocol.alpha and r["diff"] > protocol.margin]
    helps = bool(tested) and len(wins) == len(tested)
    sentence = (f"Centralised reference (simulation only): it beat every single-site model in "
                f"{len(wins)} of {len(tested)} comparisons; pooling the training sites "
                f"{'helps' if helps else 'was not shown to help'} at the held-out sites.")
    if versus:
        gap = float(np.mean([r["diff"] for r in versus]))
        sentence += f" Federated minus centralised macro-AUC: {gap:+.3f} (mean over sites)."
    return {"model": reference, "pooling_helps": helps, "sentence": sentence,
            "against_single": tested,
            "federated_vs_reference": primary_rows(versus, alpha=protocol.alpha,
                                                   margin=0.0, correction=protocol.correction,
                                                   power=protocol.power)}


def secondary_labels(comparisons: list[dict], federated: str, alpha: float = ALPHA
                     ) -> list[dict]:
    """Per-label secondary analysis: for each label, how many comparisons of the federated
    model (per-label family, adjusted) favour it, and how many go against it."""
    out = []
    for label in LABELS:
        rows = [c for c in comparisons if c["label"] == label and c["model_a"] == federated]
        if not rows:
            continue
        wins = [c for c in rows if c["diff"] > 0 and c["p_adjusted"] < alpha]
        losses = [c for c in rows if c["diff"] < 0 and c["p_adjusted"] < alpha]
        status = ("favours federated" if len(wins) == len(rows) else
                  "against federated" if losses else "no difference shown")
        worst = min(rows, key=lambda c: c["diff"])
        sentence = (
            f"{label}: {status}. Federated AUC {worst['auc_a']:.3f} vs {worst['model_b']} "
            f"{worst['auc_b']:.3f} at {worst['site']} (closest comparison, difference "
            f"{worst['diff']:+.3f}, 95% CI {worst['diff_low']:+.3f} to {worst['diff_high']:+.3f},"
            f" adjusted p = {worst['p_adjusted']:.3g}); {len(wins)} of {len(rows)} comparisons "
            "significantly favour the federated model.")
        out.append({"label": label, "status": status, "sentence": sentence,
                    "wins": len(wins), "losses": len(losses), "comparisons": len(rows)})
    return out


def untrained_verdict(arms: list[dict], federated: str) -> dict | None:
    """The verdict when an arm H1 needs never trained (every round refused or failed): no
    verdict on a model that is its initial weights. None when the federated arm and at
    least one single-site arm trained."""
    untrained = {a["name"]: a for a in arms if a.get("status") == "not trained"}
    singles = [a for a in arms if a.get("kind") == "single-site"]
    if federated in untrained:
        why = untrained[federated].get("reason") or "no round aggregated an update"
    elif singles and all(a["name"] in untrained for a in singles):
        why = "no single-site arm trained (" + "; ".join(
            f"{a['name']}: {a.get('reason') or 'no reply'}" for a in singles) + ")"
    else:
        return None
    if federated in untrained:
        why = f"the federated arm never trained ({why})"
    return {"status": "not testable", "primary": [], "untrained": sorted(untrained),
            "overall": f"H1 not testable: {why}; no verdict is given on a model that never "
                       "trained."}
