"""The sites' external-validation results joined into one set of tables (server side).

Its own module, with no torch and no image code, because the ServerApp imports it and never
imports torch (``server.model_files``); ``external`` is what runs at a site."""

from __future__ import annotations

import itertools


def combine_sites(results: list[dict]) -> dict:
    """Concatenate per-site results (each already aggregate) into one set of tables, with
    what each site's statistics were clustered by."""
    keys = ("external", "comparisons", "operating_points", "calibration", "roc", "subgroups",
            "readers", "shift", "primary", "primary_auc", "internal", "internal_primary",
            "reference_standard", "primary_site_labels", "primary_auc_site_labels",
            "reference_changes", "localisation", "shortcut", "localisation_skipped")
    out = {k: list(itertools.chain.from_iterable(r.get(k, []) for r in results)) for k in keys}
    out["clustering"] = [{"site": r["site"], "clustered_by": r.get("clustered_by", "image")}
                         for r in results]
    return out
