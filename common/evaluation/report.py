"""results.json -> the H1 verdict and a self-contained report.html.

``results.json`` schema (version 1), top-level keys:

- ``schema_version``: "2".
- ``protocol``: the prespecified analysis (primary_labels, primary_metric, margin, selection,
  alpha, correction, clustered_by, power), fixed in the run config before training.
- ``cohort``: rows of site, role, n_images, format, prevalence {label: fraction}.
- ``arms``: rows of name, kind (federated | single-site | given), site, status
  (complete | incomplete), reason, selection, best_round (the round whose model was
  evaluated), history (rows of round, val_auc, loss, epsilon).
- ``clustering``: rows of site, clustered_by (patient, or image where a site has no ids).
- ``external``: rows of site, model, label, auc, ci_low, ci_high, n_pos, n_neg, status;
  CIs patient-clustered (Obuchowski 1997).
- ``primary_auc``: rows of site, model, macro_auc, ci_low, ci_high, labels (the primary
  labels estimable there), n_clusters.
- ``internal``, ``internal_primary``: the same at training sites' own test splits;
  ``internal_external``: rows of model, label, internal_auc, external_auc, drop.
- ``comparisons``: rows of site, label, model_a, model_b, auc_a, auc_b, diff, diff_low,
  diff_high, z, p, p_adjusted (``correction`` names the method, across labels x comparisons
  x sites): the secondary analysis, its own family.
- ``operating_points``, ``calibration``, ``roc``, ``subgroups``, ``readers``, ``shift``:
  the evaluator's tables (common.evaluation.external), all aggregate.
- ``verdict``: ``status`` (supported | contradicted | inconclusive | not testable), ``rule``
  (one sentence), ``overall`` (one sentence, with the minimal detectable difference when
  inconclusive), ``primary`` (rows of site, model_a, model_b, diff, diff_low, diff_high, sd,
  z, p_value, p_adjusted, mdd), ``labels`` (secondary: label, status, sentence).
- ``privacy``: rows of site, epsilon, delta, max_epsilon, accountant, privacy_unit,
  n_units, max_images_per_patient, patient_epsilon / patient_delta (the group-privacy bound
  at image level; equal to epsilon / delta at patient level).
- ``client_dp``: the federated arm's client-level guarantee under ``client-dp`` (mode,
  noise_multiplier, clipping_norm, final_clipping_norm, rounds, sites, epsilon, delta), or
  null.
- ``releases``: rows of site, role, statistic, message, covered_by_dp, epsilon (that
  mechanism's own ε where covered), note (how an uncovered statistic is protected).
- ``screening``: update-screening counts and rejections (federation runs).
- ``provenance``: code version, config, seeds, data fingerprints, created.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from markupsafe import Markup

from common.atomic import write_text
from common.evaluation.metrics import adjust
from common.evaluation.report_h2h3 import localisation_section, reader_section
from common.evaluation.report_tables import Table, fmt, table
from common.evaluation.report_template import REPLICATES_TEMPLATE, TEMPLATE
from common.evaluation.verdict import (
    ALPHA,
    Protocol,
    primary_rows,
    primary_verdict,
    reference_check,
    secondary_labels,
    split_primary,
    untrained_verdict,
)
from common.labels import LABELS

SCHEMA_VERSION = "2"
FIGURE_LABELS = 6  # labels per row of ROC / calibration figures (the page stays readable)
SUBGROUP_ROWS = 400  # subgroup table rows shown (results.json keeps them all)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    return version("fedcxr")


def adjust_comparisons(comparisons: list[dict], method: str = "holm") -> list[dict]:
    """Add p_adjusted across all labels x comparisons x sites."""
    adjusted = adjust([c["p"] for c in comparisons], method) if comparisons else []
    return [{**c, "p_adjusted": float(p), "correction": method}
            for c, p in zip(comparisons, adjusted, strict=True)]


def internal_external_drop(internal: list[dict], internal_primary: list[dict],
                           external: list[dict], primary_auc: list[dict]) -> list[dict]:
    """Each model's mean internal AUC (over training sites' test splits) minus its mean
    external AUC (over held-out sites), per label and for the primary endpoint (the Zech et
    al. 2018 design). Rows only where both sides were estimated."""
    def mean_by(rows: list[dict], value: str, key) -> dict:
        acc: dict = {}
        for r in rows:
            if r.get(value) is not None:
                acc.setdefault(key(r), []).append(r[value])
        return {k: float(np.mean(v)) for k, v in acc.items()}

    def sd_of_mean(rows: list[dict], model: str) -> float | None:
        sds = [r.get("sd") for r in rows if r["model"] == model]
        if not sds or any(s is None or s <= 0 for s in sds):
            return None  # a degenerate site (e.g. one positive): no honest interval
        return float(np.sqrt(np.sum(np.square(sds))) / len(sds))

    out = []
    pairs = [(internal, external, "auc", lambda r: (r["model"], r["label"])),
             (internal_primary, primary_auc, "macro_auc", lambda r: (r["model"], PRIMARY))]
    for inside, outside, value, key in pairs:
        a, b = mean_by(inside, value, key), mean_by(outside, value, key)
        out += [{"model": m, "label": lb, "internal_auc": a[(m, lb)],
                 "external_auc": b[(m, lb)], "drop": a[(m, lb)] - b[(m, lb)]}
                for (m, lb) in a if (m, lb) in b]
    # The primary endpoint's drop with a 95% CI: internal and external data are disjoint
    # images, so the variances of the two site means add.
    for row in out:
        if row["label"] != PRIMARY:
            continue
        s_in, s_out = sd_of_mean(internal_primary, row["model"]), sd_of_mean(primary_auc,
                                                                             row["model"])
        if s_in is not None and s_out is not None:
            half = 1.959964 * float(np.hypot(s_in, s_out))
            row["drop_low"], row["drop_high"] = row["drop"] - half, row["drop"] + half
    return out


PRIMARY = "primary (macro-AUC)"


def build_results(*, cohort: list[dict], arms: list[dict], evaluation: dict, federated: str,
                  protocol: Protocol, privacy: list[dict] | None = None,
                  screening: dict | None = None, config: dict | None = None,
                  fingerprints: dict | None = None, internal: dict | None = None,
                  releases: list[dict] | None = None, client_dp: dict | None = None) -> dict:
    """results.json: the evaluator's tables, the primary endpoint's verdict (decided by
    ``common.evaluation.verdict``) and the secondary per-label family."""
    comparisons = adjust_comparisons(evaluation.get("comparisons", []), protocol.correction)
    singles = [a["name"] for a in arms if a.get("kind") == "single-site"]
    reference = next((a["name"] for a in arms if a.get("kind") == "centralised-reference"),
                     None)
    family, others = split_primary(evaluation.get("primary", []), reference)
    primary = primary_rows(family, alpha=protocol.alpha, margin=protocol.margin,
                           correction=protocol.correction, power=protocol.power)
    decided = primary_verdict(primary, protocol)
    if (blocked := untrained_verdict(arms, federated)) is not None:
        decided = {**decided, **blocked}
    decided["untrained"] = [a["name"] for a in arms if a.get("status") == "not trained"]
    # The per-label family is about the federated model against the models a hospital could
    # have: the centralised reference (simulation only) is shown, never counted there.
    decided["labels"] = secondary_labels([c for c in comparisons if c["model_b"] != reference],
                                         federated, protocol.alpha)
    decided["federated"] = federated
    decided["reference"] = reference_check(others, protocol, reference, federated, singles) \
        if reference else None
    internal = internal or {}
    return {
        "schema_version": SCHEMA_VERSION,
        "protocol": protocol.as_dict(),
        "cohort": cohort,
        "arms": arms,
        "clustering": evaluation.get("clustering", []) + internal.get("clustering", []),
        "external": evaluation.get("external", []),
        "primary_auc": evaluation.get("primary_auc", []),
        "internal": internal.get("internal", []),
        "internal_primary": internal.get("internal_primary", []),
        "internal_external": internal_external_drop(
            internal.get("internal", []), internal.get("internal_primary", []),
            evaluation.get("external", []), evaluation.get("primary_auc", [])),
        "comparisons": comparisons,
        "operating_points": evaluation.get("operating_points", []),
        "calibration": evaluation.get("calibration", []),
        "roc": evaluation.get("roc", []),
        "subgroups": evaluation.get("subgroups", []),
        "readers": evaluation.get("readers", []),
        "reference_standard": evaluation.get("reference_standard", []),
        "reference_changes": evaluation.get("reference_changes", []),
        "primary_site_labels": evaluation.get("primary_site_labels", []),
        "primary_auc_site_labels": evaluation.get("primary_auc_site_labels", []),
        "localisation": _setting(evaluation, internal, "localisation"),
        "shortcut": _setting(evaluation, internal, "shortcut"),
        "localisation_skipped": _setting(evaluation, internal, "localisation_skipped"),
        "shift": evaluation.get("shift", []),
        "verdict": decided,
        "privacy": privacy or [],
        "releases": releases or [],
        "client_dp": client_dp,
        "screening": screening or {},
        "provenance": {"code_version": code_version(), "config": config or {},
                       "data_fingerprints": fingerprints or {},
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def _setting(evaluation: dict, internal: dict, key: str) -> list[dict]:
    """Rows of ``key`` from held-out sites ("external") and from training sites' own test
    splits ("internal"), each saying which."""
    return ([{**r, "setting": "external"} for r in evaluation.get(key, [])]
            + [{**r, "setting": "internal"} for r in internal.get(key, [])])


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(obj):
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def write_results(results: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(_clean(results), indent=1, default=_json_default,
                                       allow_nan=False))


# ---------------------------------------------------------------- HTML rendering


# How the report's figures are written: SVG with its text as text (the browser draws the
# glyphs; rasterising them and encoding a PNG was a third of the figures' time, and the
# report's figures are the last thing a run waits for), the same ids and no date in every
# run, so one run's report.html is the same bytes when it is written again.
_SVG = {"svg.fonttype": "none", "svg.hashsalt": "fedcxr-report"}


def _figure_tag(fig, *, tight: bool = True) -> Markup:
    """The figure as an inline SVG image (``_SVG``). ``tight``: cropped to what is drawn,
    which costs a second pass over every artist (matplotlib lays the whole figure out once to
    find its extent); figures laid out in advance (``_unit_axes``) are drawn once. An
    ``<img>`` never runs a script an SVG might hold, and the page keeps none."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    with matplotlib.rc_context(_SVG):
        fig.savefig(buf, format="svg", bbox_inches="tight" if tight else None,
                    metadata={"Date": None})
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return Markup(f'<img alt="figure" src="data:image/svg+xml;base64,{data}">')


# The margins of a ``_unit_axes`` figure, in inches: room for its tick labels (fontsize 6),
# axis labels (7) and panel titles (8), the only text outside its panels.
_UNIT_MARGINS = {"left": 0.42, "right": 0.1, "bottom": 0.42, "top": 0.22, "between": 0.2}


def _unit_axes(n: int, width: float, height: float):
    """One row of ``n`` panels whose axes both run 0 to 1 (ROC, calibration), sharing them,
    with fixed ticks: matplotlib's automatic tick placement, per panel, was about half the
    time of drawing these figures, the report's slowest part (a run's report is the last
    thing it waits for). Their margins are fixed too (``_UNIT_MARGINS``): drawn with
    ``_figure_tag(fig, tight=False)``, once."""
    import matplotlib.pyplot as plt

    m = _UNIT_MARGINS
    total = width * n
    fig, axes = plt.subplots(1, n, figsize=(total, height), squeeze=False, sharex=True,
                             sharey=True)
    panel = (total - m["left"] - m["right"] - m["between"] * (n - 1)) / n
    fig.subplots_adjust(left=m["left"] / total, right=1 - m["right"] / total,
                        bottom=m["bottom"] / height, top=1 - m["top"] / height,
                        wspace=m["between"] / panel)
    for ax in axes[0]:
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        ax.tick_params(labelsize=6)
    return fig, axes


def _labels_with_results(results: dict) -> list[str]:
    seen = {r["label"] for r in results["external"] if r.get("auc") is not None}
    return [label for label in LABELS if label in seen]


def _training_curves(results: dict) -> str:
    import matplotlib.pyplot as plt

    arms = [a for a in results["arms"] if a.get("history")]
    if not arms:
        return Markup("<p>No training history (models were given, not trained in this "
                      "run).</p>")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for arm in arms:
        hist = [h for h in arm["history"] if h.get("val_auc") is not None]
        ax.plot([h["round"] for h in hist], [h["val_auc"] for h in hist], marker="o",
                label=arm["name"], lw=2.5 if arm.get("kind") == "federated" else 1.2)
    ax.set_xlabel("round")
    ax.set_ylabel("mean validation AUC")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _figure_tag(fig)


def _roc_figure(results: dict, site: str, labels: list[str]) -> str:

    labels = labels[:FIGURE_LABELS]
    if not labels:
        return ""
    fig, axes = _unit_axes(len(labels), 2.6, 2.8)
    for ax, label in zip(axes[0], labels, strict=True):
        for r in results["roc"]:
            if r["site"] == site and r["label"] == label:
                ax.plot(r["fpr"], r["tpr"], label=r["model"], lw=1.2)
        for study in results["readers"]:
            if study["site"] == site and study["label"] == label:
                points = [p for p in study["reader_points"]
                          if p["specificity"] is not None and p["sensitivity"] is not None]
                for i, p in enumerate(points):
                    ax.plot(1 - p["specificity"], p["sensitivity"], "k^", ms=5,
                            label="readers" if i == 0 else None)
                if mean := study.get("mean_reader"):
                    ax.plot(1 - mean["specificity"], mean["sensitivity"], "r*", ms=8,
                            label="mean reader")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("1 - specificity", fontsize=7)
    axes[0][0].set_ylabel("sensitivity", fontsize=7)
    axes[0][-1].legend(fontsize=5, loc="lower right")
    return _figure_tag(fig, tight=False)


def _calibration_figure(results: dict, site: str, model: str, labels: list[str]) -> str:

    rows = [r for r in results["calibration"] if r["site"] == site and r["model"] == model
            and r["label"] in labels[:FIGURE_LABELS]]
    if not rows:
        return ""
    fig, axes = _unit_axes(len(rows), 2.4, 2.6)
    for ax, r in zip(axes[0], rows, strict=True):
        rel = r["reliability"]
        pairs = [(p, o) for p, o, c in zip(rel["mean_predicted"], rel["observed"], rel["count"],
                                           strict=True) if c and p is not None]
        if pairs:
            ax.plot(*zip(*pairs, strict=True), "o-", ms=3)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(f"{r['label']} ECE {r['ece']:.3f}", fontsize=7)
    return _figure_tag(fig, tight=False)


def _shift_figure(results: dict) -> str:
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("shift", []) if r.get("mean_auc") is not None]
    if not rows:
        return Markup("<p>Device-shift analysis was not run.</p>")
    kinds = sorted({r["shift"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(2.6 * len(kinds), 2.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for model in sorted({r["model"] for r in rows}):
            pts = sorted((r["strength"], r["mean_auc"]) for r in rows
                         if r["shift"] == kind and r["model"] == model)
            ax.plot(*zip(*pts, strict=True), "o-", label=model, ms=3)
        ax.set_title(kind, fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("mean AUC", fontsize=7)
    axes[0][-1].legend(fontsize=5)
    return _figure_tag(fig)


def _forest_figure(results: dict) -> str:
    """The primary differences with their 95% CIs, per held-out site: the federated model
    against each single-site model (the verdict's family, adjusted p beside each), against
    the centralised reference, and the reference against each single-site model (the
    known-answer check), with the margin line."""
    import matplotlib.pyplot as plt

    v = results["verdict"]
    ref = v.get("reference") or {}
    groups = [("federated vs single-site (verdict)", "#1f5fbf", v.get("primary", [])),
              ("federated vs centralised", "#7a3db8", ref.get("federated_vs_reference", [])),
              ("centralised vs single-site (known-answer check)", "#888888",
               ref.get("against_single", []))]
    rows = [(name, colour, r) for name, colour, rs in groups for r in rs]
    if not rows:
        return Markup("<p>No primary comparison was estimated.</p>")
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.1))
    ticks, seen = [], set()
    for i, (name, colour, r) in enumerate(rows):
        y = len(rows) - 1 - i
        ax.errorbar(r["diff"], y, xerr=[[r["diff"] - r["diff_low"]], [r["diff_high"] - r["diff"]]],
                    fmt="o", color=colour, ms=4, capsize=2, label=None if name in seen else name)
        seen.add(name)
        star = " *" if r.get("p_adjusted") is not None and r["p_adjusted"] < v.get("alpha", ALPHA) \
            else ""
        ticks.append((y, f"{r['site']}: {r['model_a']} − {r['model_b']}{star}"))
    margin = (results.get("protocol") or {}).get("margin", 0.0) or 0.0
    ax.axvline(0, color="black", lw=0.8)
    if margin:
        ax.axvline(margin, color="#b00020", ls="--", lw=1, label=f"margin {margin:g}")
    ax.set_yticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=7)
    ax.set_xlabel("difference in macro-AUC over the primary labels (95% CI, patient-clustered)",
                  fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _figure_tag(fig)


def _arm_drops(results: dict) -> Table | None:
    """Each arm's primary macro-AUC on the training sites' own test splits, at the held-out
    sites, and the drop with its 95% CI."""
    rows = [d for d in results.get("internal_external", []) if d["label"] == PRIMARY]
    if not rows:
        return None
    return table(["arm", "internal macro-AUC", "external macro-AUC", "drop (95% CI)"],
                  [[d["model"], fmt(d["internal_auc"]), fmt(d["external_auc"]),
                    f"{d['drop']:+.3f}" + (f" ({d['drop_low']:+.3f}, {d['drop_high']:+.3f})"
                                           if d.get("drop_low") is not None else "")]
                   for d in rows])


def _client_dp_sentence(row: dict | None) -> str | None:
    if not row:
        return None
    eps = f"{row['epsilon']:.2f}" if row.get("epsilon") is not None else "∞ (no finite bound)"
    return (f"Client-level DP ({row['mode']}, Flower's wrapper): each site's whole contribution "
            f"to the federated model is protected at ε = {eps}, δ = "
            f"{row['delta']:.1e} over {row['rounds']} aggregated round(s) of {row['sites']} "
            f"site(s) (noise multiplier {row['noise_multiplier']:g}, clipping norm "
            f"{row['clipping_norm']:g}, finally {row['final_clipping_norm']:.3g}; "
            f"{row['accountant']} accountant). The single-site models are not covered by it.")


def _patient_bound(row: dict) -> str:
    """What a privacy row guarantees a patient: ε itself at patient level, else the group
    privacy bound for the site's largest number of images per patient."""
    if row.get("epsilon") is None:
        return "–"
    if row.get("privacy_unit") == "patient":
        return "ε above (the patient is the unit)"
    k = row.get("max_images_per_patient") or 1
    return (f"up to {k} images: ε ≤ {fmt(row.get('patient_epsilon'), 2)}, "
            f"δ ≤ {fmt(row.get('patient_delta'), 6)}")


def _privacy_figure(results: dict) -> str:
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("privacy", []) if r.get("epsilon") is not None]
    if not rows:
        return Markup("<p>No differential privacy in this run (ε not applicable).</p>")
    fig, ax = plt.subplots(figsize=(4, 2.4))
    ax.bar([r["site"] for r in rows], [r["epsilon"] for r in rows])
    for i, r in enumerate(rows):
        if r.get("max_epsilon"):
            ax.plot([i - 0.4, i + 0.4], [r["max_epsilon"]] * 2, "r--")
    ax.set_ylabel("ε spent")
    return _figure_tag(fig)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
.verdict{font-size:1.1em;background:#f6f8ff;border-left:4px solid #36c;padding:.6em 1em}
.supported{color:#16702e} .contradicted{color:#b00020} .inconclusive{color:#8a6d00}
tr.gap td{background:#fde2e2} .sig{font-weight:bold}
"""


def render_html(results: dict) -> str:
    """report.html from results.json (the Jinja2 template in ``report_template``)."""
    v = results["verdict"]
    alpha = v.get("alpha", ALPHA)
    labels = _labels_with_results(results)
    protocol = results.get("protocol", {})
    context = {
        "css": Markup(CSS), "verdict": v, "verdict_class": v["status"].split()[0],
        "forest_figure": _forest_figure(results), "arm_drops": _arm_drops(results),
        "reference": (v.get("reference") or {}).get("sentence"),
        "replicates": results.get("replicates"),
        "alpha": alpha, "secondary": [x["sentence"] for x in v.get("labels", [])],
        "protocol": ", ".join(f"{k}={', '.join(x) if isinstance(x, list) else x}"
                              for k, x in protocol.items()),
        "by_image": [c["site"] for c in results.get("clustering", [])
                     if c["clustered_by"] == "image"],
        "primary": table(
            ["site", "A", "B", "macro-AUC A", "macro-AUC B", "diff (95% CI)", "p",
             "adjusted p", "minimal detectable difference"],
            [[r["site"], r["model_a"], r["model_b"], fmt(r["auc_a"]), fmt(r["auc_b"]),
              f"{r['diff']:+.3f} ({r['diff_low']:+.3f}, {r['diff_high']:+.3f})",
              fmt(r["p_value"], 4), fmt(r["p_adjusted"], 4), fmt(r.get("mdd"))]
             for r in v.get("primary", [])]) if v.get("primary") else None,
        "cohort": table(["site", "role", "images", "format"] + [lb[:6] for lb in LABELS],
                         [[fmt(c["site"]), fmt(c.get("role")), fmt(c.get("n_images")),
                           fmt(c.get("format"))]
                          + [fmt((c.get("prevalence") or {}).get(lb), 2) for lb in LABELS]
                          for c in results["cohort"]]),
        "training_figure": _training_curves(results),
        "arms": table(["arm", "kind", "site", "status", "selected round", "reason"],
                       [[fmt(a["name"]), fmt(a.get("kind")), fmt(a.get("site")),
                         fmt(a.get("status")), fmt(a.get("best_round")),
                         fmt(a.get("reason"))] for a in results["arms"]])
        if results["arms"] else None,
        "sites": [_site_section(results, site, labels, alpha) for site in
                  sorted({r["site"] for r in results["external"]})],
        "drops": _drops_table(results, labels),
        "comparisons": table(
            ["site", "label", "A", "B", "AUC A", "AUC B", "diff (95% CI)", "z", "p",
             "adjusted p"],
            [[c["site"], c["label"], c["model_a"], c["model_b"], fmt(c["auc_a"]),
              fmt(c["auc_b"]),
              f"{c['diff']:+.3f} ({c['diff_low']:+.3f}, {c['diff_high']:+.3f})",
              fmt(c["z"], 2), fmt(c["p"], 4), fmt(c["p_adjusted"], 4)]
             for c in results["comparisons"]]),
        "subgroups": _subgroup_table(results, v),
        "readers": reader_section(results),
        "localisation": localisation_section(results),
        "shift_figure": _shift_figure(results),
        "privacy_figure": _privacy_figure(results),
        "privacy": table(["site", "ε", "δ", "max ε", "accountant", "privacy unit",
                           "per patient (group privacy)"],
                          [[p["site"], fmt(p.get("epsilon"), 2), fmt(p.get("delta"), 6),
                            fmt(p.get("max_epsilon"), 2), p.get("accountant", ""),
                            p.get("privacy_unit", "image"), _patient_bound(p)]
                           for p in results["privacy"]]) if results.get("privacy") else None,
        "releases": table(["site", "statistic", "message", "covered by DP", "ε", "note"],
                           [[r["site"], r["statistic"], r["message"],
                             "yes" if r["covered_by_dp"] else "no (declared)",
                             fmt(r.get("epsilon"), 2), r["note"]]
                            for r in results["releases"]]) if results.get("releases") else None,
        "client_dp": _client_dp_sentence(results.get("client_dp")),
        "provenance": json.dumps(results.get("provenance", {}), indent=1),
    }
    return _environment().from_string(TEMPLATE).render(**context)


@functools.cache
def _environment():
    from jinja2 import Environment

    return Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)


def _site_section(results: dict, site: str, labels: list[str], alpha: float) -> dict:
    """One held-out site: AUC table (with significance marks), ROC and calibration figures."""
    sig = {(c["site"], c["label"], c["model_b"]): c for c in results["comparisons"]}
    models = list(dict.fromkeys(r["model"] for r in results["external"] if r["site"] == site))
    rows = []
    for label in labels:
        row = [label]
        for m in models:
            r = next((e for e in results["external"] if e["site"] == site and
                      e["label"] == label and e["model"] == m), None)
            if r is None or r.get("auc") is None:
                row.append("not estimable")
            elif str(r.get("status", "")).startswith("not trained"):
                row.append("not trained on label")
            elif r.get("ci_low") is None:
                row.append(f"{r['auc']:.3f} (no CI)")
            else:
                c = sig.get((site, label, m))
                mark = "*" if c and c["p_adjusted"] < alpha else ""
                row.append(Markup("<span class='{}'>{:.3f}{}</span> ({:.2f}–{:.2f})").format(
                    "sig" if mark else "", r["auc"], mark, r["ci_low"], r["ci_high"]))
        rows.append(row)
    return {"name": site, "aucs": table(["label"] + models, rows),
            "roc_figure": _roc_figure(results, site, labels),
            "calibration_model": models[0] if models else None,
            "calibration_figure": _calibration_figure(results, site, models[0], labels)
            if models else ""}


def _drops_table(results: dict, labels: list[str]) -> Table | None:
    drops = results.get("internal_external", [])
    if not drops:
        return None
    models = list(dict.fromkeys(d["model"] for d in drops))
    rows = []
    for label in [PRIMARY] + labels:
        row = [label]
        for m in models:
            d = next((x for x in drops if x["model"] == m and x["label"] == label), None)
            row.append("–" if d is None else f"{d['internal_auc']:.3f} → "
                       f"{d['external_auc']:.3f} ({-d['drop']:+.3f})")
        rows.append(row)
    return table(["label"] + models, rows)


def _subgroup_table(results: dict, v: dict) -> Table:
    sub = [s for s in results["subgroups"] if s["model"] == (v.get("federated") or "")] or \
        results["subgroups"]
    sub = sub[:SUBGROUP_ROWS]
    return table(
        ["site", "model", "label", "attribute", "group", "n", "prevalence", "AUC", "sens",
         "spec", "gap", "status"],
        [[s["site"], s["model"], s["label"], fmt(s["attribute"]), fmt(s["group"]),
          fmt(s["n"]), fmt(s.get("prevalence"), 2), fmt(s.get("auc")),
          fmt(s.get("sensitivity"), 2), fmt(s.get("specificity"), 2), fmt(s.get("gap")),
          fmt(s["status"])] for s in sub],
        row_class=lambda i: "gap" if (sub[i].get("gap") or 0) > 0.05 else "")


def write_replicates(summary: dict, out_dir: Path) -> tuple[Path, Path]:
    """replicates.json and replicates.html (the replicates section) into ``out_dir``."""
    from common.evaluation.replicates import sentence

    out_dir = Path(out_dir)
    jpath = write_results(summary, out_dir / "replicates.json")
    runs = table(["replicate", "seed", "verdict", "mean primary difference",
                   "centralised beats every single-site model"],
                  [[name, r["seed"], r["status"], fmt(r["mean_primary_diff"]),
                    fmt(r["pooling_helps"])]
                   for name, r in zip(summary.get("runs", []) or
                                      [str(i + 1) for i in range(len(summary["replicates"]))],
                                      summary["replicates"], strict=False)])

    def interval(low, high) -> str:
        return "–" if low is None else f"{low:+.3f} to {high:+.3f}"

    comparisons = table(
        ["site", "A", "B", "mean diff", "t-interval across replicates", "sd between",
         "mean within-run 95% CI", "per replicate"],
        [[c["site"], c["model_a"], c["model_b"], f"{c['mean_diff']:+.3f}",
          interval(c["t_low"], c["t_high"]), fmt(c["sd_between"]),
          interval(c["within_low"], c["within_high"]),
          " ".join(f"{d:+.3f}" for d in c["diffs"])] for c in summary["comparisons"]])
    hpath = write_text(out_dir / "replicates.html", _environment().from_string(
        REPLICATES_TEMPLATE).render(css=Markup(CSS), sentence=sentence(summary), runs=runs,
                                    comparisons=comparisons))
    return jpath, hpath


def load_report_libraries() -> None:
    """Import what the report phase needs and a run would otherwise pay for at its very end:
    matplotlib (its file backend) and pyplot, and statsmodels' multiple-testing module (with
    pandas under it). The ServerApp calls this ahead, in a thread, while it waits for the
    sites' validation replies (``server.app.load_the_analysis``; ``benchmarks/peers.py``
    prints the report phase's time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import statsmodels.stats.multitest  # noqa: F401


def write_report(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write results.json and report.html into ``out_dir``."""
    load_report_libraries()
    out_dir = Path(out_dir)
    rpath = write_results(results, out_dir / "results.json")
    clean = json.loads(rpath.read_text())
    hpath = out_dir / "report.html"
    hpath.write_text(render_html(clean))
    return rpath, hpath
