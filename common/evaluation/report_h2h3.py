"""The report's reader section (H2) and localisation section (H3), in words a clinician reads.

Kept apart from ``report`` (which renders the H1 protocol) so each section's tables live
beside the sentences that explain them. Everything here formats aggregates already in
results.json; nothing is computed from images.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.evaluation.report_tables import Table, fmt, interval, table


@dataclass(frozen=True)
class ReaderSection:
    sentences: list[str]
    effect: Table | None
    agreement: Table | None
    readers: Table | None
    model_vs_readers: Table | None


@dataclass(frozen=True)
class LocalisationSection:
    sentences: list[str]
    localisation: Table | None
    shortcut: Table | None


def reader_section(results: dict) -> ReaderSection | None:
    """Reference standard (what replaced the site's labels, and what that changed), reader
    agreement, each reader, and each model against the readers."""
    studies = results.get("readers", [])
    sources = results.get("reference_standard", [])
    if not studies and not sources:
        return None
    sentences = []
    by_site: dict[str, list[dict]] = {}
    for s in sources:
        by_site.setdefault(s["site"], []).append(s)
    for site, rows in by_site.items():
        kinds = sorted({r["source"] for r in rows})
        sentences.append(
            f"At {site} the truth of {len(rows)} label(s) is the reference standard "
            f"({'; '.join(kinds)}), not the site's own labels; every AUC, threshold and the "
            "primary endpoint there use it. A tie between readers is no reference: that image "
            "is left out of that label.")
    for c in results.get("reference_changes", []):
        if c["changed"] is None:
            sentences.append(f"{c['site']}, {c['label']}: the reference standard disagrees "
                             f"with the site's label on {c['status']} images (min-cell).")
        elif c["changed"] or c["no_reference"]:
            sentences.append(
                f"{c['site']}, {c['label']}: the reference standard disagrees with the site's "
                f"label on {c['changed']} of {c['images']} images"
                + (f"; {c['no_reference']} image(s) have no reference (tie)"
                   if c["no_reference"] else "") + ".")
    ref = {(r["site"], r["model"]): r for r in results.get("primary_auc", [])}
    effect_rows = []
    for r in results.get("primary_auc_site_labels", []):
        a = ref.get((r["site"], r["model"]))
        effect_rows.append([r["site"], r["model"],
                            interval(a["macro_auc"], a["ci_low"], a["ci_high"]) if a else "–",
                            interval(r["macro_auc"], r["ci_low"], r["ci_high"]),
                            f"{a['macro_auc'] - r['macro_auc']:+.3f}" if a else "–"])
    for d in results.get("primary_site_labels", []):
        ref = d.get("diff_reference")
        effect_rows.append([d["site"], f"{d['model_a']} − {d['model_b']}",
                            interval(ref, d.get("diff_reference_low"),
                                     d.get("diff_reference_high"), sign=True),
                            interval(d["diff"], d["diff_low"], d["diff_high"], sign=True),
                            f"{ref - d['diff']:+.3f}" if ref is not None else "–"])
    effect = table(["site", "model or difference", "primary macro-AUC: reference standard",
                    "against the site's own labels", "change"], effect_rows) \
        if effect_rows else None
    agreement = table(
        ["site", "label", "reference", "readers", "images (readers each)",
         "Fleiss κ (95% CI)", "Cohen κ, each pair"],
        [[s["site"], s["label"], s["reference"], s["readers"],
          f"{s['fleiss']['images']} ({s['fleiss'].get('readers_per_image', '–')})",
          interval(s["fleiss"]["kappa"], s["fleiss"]["ci_low"], s["fleiss"]["ci_high"]),
          ", ".join(f"{k} {fmt(v, 2)}" for k, v in s["cohen_kappa"].items())]
         for s in studies]) if studies else None
    readers = table(
        ["site", "label", "reader", "sensitivity (95% CI)", "specificity (95% CI)"],
        [[s["site"], s["label"], p["reader"],
          interval(p["sensitivity"], *(p["sensitivity_ci"] or [None, None]), digits=2),
          interval(p["specificity"], *(p["specificity_ci"] or [None, None]), digits=2)]
         for s in studies for p in s["reader_points"]]) if studies else None
    mvr = [[s["site"], s["label"], model,
            " / ".join(fmt(s["mean_reader"][k], 2) for k in ("sensitivity", "specificity")),
            interval(m["sensitivity_at_reader_specificity"], *m["sensitivity_ci"], digits=2),
            interval(m["specificity_at_reader_sensitivity"], *m["specificity_ci"], digits=2)]
           for s in studies if s.get("mean_reader") for model, m in s["models"].items()]
    model_vs_readers = table(
        ["site", "label", "model", "readers' mean sensitivity / specificity",
         "model sensitivity at the readers' specificity (95% CI)",
         "model specificity at the readers' sensitivity (95% CI)"], mvr) if mvr else None
    return ReaderSection(sentences, effect, agreement, readers, model_vs_readers)


def localisation_section(results: dict) -> LocalisationSection | None:
    """Pointing game and IoU per model and label; shortcut reliance per model."""
    loc = results.get("localisation", [])
    cut = results.get("shortcut", [])
    skipped = results.get("localisation_skipped", [])
    if not loc and not cut:
        if not skipped:
            return None
        reasons = sorted({s["reason"] for s in skipped})
        return LocalisationSection([f"Localisation was not computed: {r}." for r in reasons],
                                   None, None)
    sentences = [
        "Grad-CAM maps of each model, on positive images with a box of that label: a hit "
        "when the map's hottest point lies in a box (pointing game), and the overlap (IoU) "
        "of the map's hotter half with the boxes. Maps are normalised per image; they stay "
        "at the site, only these rates leave. CIs are clustered by patient. A map is as "
        "coarse as DenseNet's last block: 2 x 2 cells at 64 px, 7 x 7 at 224 px, so at small "
        "sizes these rates say which part of the image, not which structure."]
    if cut:
        sentences.append(
            "Shortcut reliance: the share of each map's mass on burned-in markers (letters, "
            "tokens). Markers cover only the stated share of the image; a model that puts "
            "much more of its attention there reads the marker, not the lungs (Zech et al. "
            "2018).")
    shown = [r for r in loc if r.get("status") == "ok"]
    if len(shown) < len(loc):
        sentences.append(f"{len(loc) - len(shown)} (site, model, label) cell(s) had fewer "
                         "positive images with boxes than the site's min-cell: not released.")
    localisation = table(
        ["setting", "site", "model", "label", "images", "maps with no positive evidence",
         "pointing-game hit rate (95% CI)", "IoU (95% CI)"],
        [[r.get("setting", "external"), r["site"], r["model"], r["label"], r["n_images"],
          r.get("empty_maps", "–"),
          interval(r["hit_rate"], r["hit_low"], r["hit_high"], digits=2),
          interval(r["iou"], r["iou_low"], r["iou_high"], digits=2)] for r in shown]) \
        if shown else None
    strongest: dict[tuple, dict] = {}
    for r in cut:
        if r.get("status") != "ok":
            continue
        key = (r.get("setting", "external"), r["site"], r["model"])
        if key not in strongest or r["marker_share"] > strongest[key]["marker_share"]:
            strongest[key] = r
    shortcut = table(
        ["setting", "site", "model", "images", "label whose map leans most on markers",
         "share of attention on markers (95% CI)", "share of the image markers cover",
         "attention / area"],
        [[k[0], k[1], k[2], r["n_images"], r["label"],
          interval(r["marker_share"], r["share_low"], r["share_high"], digits=3),
          fmt(r["marker_area"], 3),
          f"{r['marker_share'] / r['marker_area']:.1f}x" if r["marker_area"] else "–"]
         for k, r in strongest.items()]) if strongest else None
    return LocalisationSection(sentences, localisation, shortcut)


def summary_lines(results: dict) -> list[str]:
    """Two lines for a terminal: what the reference standard did to the primary differences
    (H2) and which model leans most on burned-in markers where a shortcut can live (H3)."""
    lines = []
    rows = [d for d in results.get("primary_site_labels", [])
            if d.get("diff_reference") is not None]
    if rows:
        d = max(rows, key=lambda r: abs(r["diff_reference"] - r["diff"]))
        lines.append(
            f"H2: over {len(rows)} primary comparison(s) the readers' reference standard moved "
            f"a difference by up to {d['diff_reference'] - d['diff']:+.3f} ({d['model_a']} − "
            f"{d['model_b']} at {d['site']}: {d['diff_reference']:+.3f} against the readers, "
            f"{d['diff']:+.3f} against the site's labels)")
    internal = [r for r in results.get("shortcut", [])
                if r.get("status") == "ok" and r.get("setting") == "internal"
                and r.get("marker_area")]
    if internal:
        top = max(internal, key=lambda r: r["marker_share"] / r["marker_area"])
        same = [r for r in internal if r["site"] == top["site"] and r["label"] == top["label"]]
        others = ", ".join(f"{r['model']} {r['marker_share'] / r['marker_area']:.1f}x"
                           for r in sorted(same, key=lambda r: r["model"])
                           if r["model"] != top["model"])
        lines.append(
            f"H3: on {top['site']}'s test split, {top['model']}'s {top['label']} map puts "
            f"{top['marker_share']:.1%} of its mass on burned-in markers, "
            f"{top['marker_share'] / top['marker_area']:.1f}x their share of the image"
            + (f" (same label: {others})" if others else ""))
    return lines
