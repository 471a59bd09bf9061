"""External validation at one site: every model it is sent, at the thresholds it is sent.

``evaluate_scores`` is pure statistics on (labels, scores); ``evaluate_site`` scores the
models on the site's cache first, and adds device shift and Grad-CAM overlays (written
locally). What they return is aggregate only: AUCs, CIs, tests, rates, bins, curve points
on a fixed threshold grid. No per-image score, label, id or image is in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_path, write_text
from common.cache import SiteCache
from common.data import CachedImages, make_loader
from common.evaluation import readers as reader_mod
from common.evaluation.delong import (
    ClusterComponents,
    NotEstimable,
    cluster_codes,
    cluster_components,
    critical_z,
    delong_components,
    macro_auc,
    paired_from,
)
from common.evaluation.gradcam import write_overlays
from common.evaluation.localisation import LocalisationOptions, localise
from common.evaluation.metrics import (
    GRID,
    ThresholdsRequired,
    at_threshold,
    brier,
    ece,
    reliability,
    roc_counts,
)
from common.evaluation.shift import SHIFTS, apply_shift
from common.evaluation.subgroups import subgroup_table, subgroups
from common.labels import LABELS

ROC_POINTS = 101


@dataclass
class EvaluationOptions:
    batch_size: int = 64
    device: str = "cpu"  # where models score (common.model.resolve_device)
    comparisons: list[tuple[str, str]] | None = None  # default: first model vs each other
    shift: bool = True
    shift_models: list[str] | None = None  # default: all
    gradcam_dir: Path | None = None
    gradcam_images: int = 4
    min_subgroup: int = 30
    min_cell: int = 10  # no released count rests on fewer images (node config min-cell)
    level: float = 0.95
    primary_labels: list[str] | None = None  # the primary endpoint's labels (macro-AUC)
    primary_pairs: list[tuple[str, str]] | None = None  # (model_a, model_b) compared on the
    # primary endpoint (default: the first model against every other one)
    localisation: LocalisationOptions | None = None  # Grad-CAM against boxes; None: not run


def clusters_of(meta) -> tuple[np.ndarray | None, str]:
    """Patient ids of the site's images (blank ids: one cluster per image) and what the
    statistics are clustered by: "patient", or "image" where the site has no patient ids."""
    if meta is None or "patient_id" not in meta:
        return None, "image"
    ids = meta["patient_id"].to_numpy(dtype=object)
    known = [v for v in ids if isinstance(v, str) and v.strip()]
    if not known:
        return None, "image"
    return ids, "patient" if len(known) == len(ids) else "patient (image where id is blank)"


def auc_rows(site: str, names: list[str], label: str, comp: ClusterComponents | None,
             n_pos: int, n_neg: int, zcrit: float) -> list[dict]:
    """One row per model: AUC with its clustered CI (aggregate only)."""
    if comp is None:
        return [{"site": site, "model": name, "label": label, "auc": None, "ci_low": None,
                 "ci_high": None, "n_pos": n_pos, "n_neg": n_neg, "status": "not estimable"}
                for name in names]
    cov = comp.covariance()
    ok = bool(np.isfinite(cov[0, 0]))
    rows = []
    for i, name in enumerate(names):
        sd = float(np.sqrt(max(cov[i, i], 0))) if ok else float("nan")
        auc = float(comp.aucs[i])
        rows.append({
            "site": site, "model": name, "label": label, "auc": auc,
            "ci_low": float(max(0.0, auc - zcrit * sd)) if ok else None,
            "ci_high": float(min(1.0, auc + zcrit * sd)) if ok else None,
            "variance": float(cov[i, i]) if ok else None, "n_pos": n_pos, "n_neg": n_neg,
            "status": "ok" if ok else "no CI (fewer than 2 patients with a positive or with a "
                                      "negative)"})
    return rows


def _components(y: np.ndarray, stacked: np.ndarray, codes: np.ndarray
                ) -> ClusterComponents | None:
    try:
        return cluster_components(y, stacked, codes, int(codes.max()) + 1 if len(codes) else 0)
    except NotEstimable:
        return None


def primary_endpoint(labels: np.ndarray, scores: dict[str, np.ndarray], clusters,
                     primary: list[str], pairs: list[tuple[str, str]], *, site: str,
                     level: float = 0.95, components: dict | None = None
                     ) -> dict[str, list[dict]]:
    """The primary endpoint at one site: each model's macro-AUC over the primary labels with
    its clustered CI, and the paired differences of ``pairs`` (aggregate only). Labels not
    estimable at this site are left out of the macro-AUC (``labels`` names those used)."""
    names = list(scores)
    cols = [LABELS.index(lb) for lb in primary]
    try:
        m = macro_auc(labels, None if components else np.stack([scores[n] for n in names]),
                      clusters, cols, components)
    except NotEstimable:
        return {"primary_auc": [], "primary": []}
    zcrit = critical_z(level)
    used = [LABELS[c] for c in m.labels]
    aucs = []
    for i, name in enumerate(names):
        sd = float(np.sqrt(max(m.covariance[i, i], 0)))
        aucs.append({"site": site, "model": name, "macro_auc": float(m.aucs[i]),
                     "ci_low": float(max(0.0, m.aucs[i] - zcrit * sd)),
                     "ci_high": float(min(1.0, m.aucs[i] + zcrit * sd)), "sd": sd,
                     "labels": used,
                     "n_clusters": m.n_clusters})
    index = {n: i for i, n in enumerate(names)}
    rows = []
    for a, b in pairs:
        t = m.paired(index[a], index[b], level)
        rows.append({"site": site, "model_a": a, "model_b": b, "auc_a": t.auc_a,
                     "auc_b": t.auc_b, "diff": t.auc_a - t.auc_b, "diff_low": t.diff_lower,
                     "diff_high": t.diff_upper, "sd": (t.diff_upper - t.diff_lower) / (2 * zcrit),
                     "labels": used, "n_clusters": m.n_clusters})
    return {"primary_auc": aucs, "primary": rows}


def internal_validation(labels: np.ndarray, scores: dict[str, np.ndarray], meta, *, site: str,
                        primary: list[str], level: float = 0.95) -> dict:
    """A training site's own test split: per-label AUC with clustered CI, and each model's
    macro-AUC over the primary labels (the internal side of the internal-to-external drop)."""
    clusters, clustered_by = clusters_of(meta)
    codes = cluster_codes(clusters, len(labels))
    names = list(scores)
    zcrit = critical_z(level)
    rows, components = [], {}
    for k, label in enumerate(LABELS):
        y = labels[:, k]
        comp = components[k] = _components(y, np.stack([scores[n][:, k] for n in names]),
                                           codes)
        for r in auc_rows(site, names, label, comp, int(np.nansum(y == 1)),
                          int(np.nansum(y == 0)), zcrit):
            r.pop("variance", None)
            rows.append(r)
    endpoint = primary_endpoint(labels, scores, clusters, primary, [], site=site, level=level,
                                components=components)
    return {"site": site, "n_images": int(len(labels)), "clustered_by": clustered_by,
            "internal": rows, "internal_primary": endpoint["primary_auc"]}


def _check_thresholds(names: list[str], thresholds: dict[str, dict[str, float]]) -> None:
    missing = [n for n in names if n not in thresholds]
    if missing:
        raise ThresholdsRequired(
            f"no thresholds sent for model(s) {', '.join(missing)}: the external evaluator never "
            "chooses an operating point on the data it validates; choose them on training-site "
            "validation data and pass them in"
        )


def reference_labels(labels: np.ndarray, meta) -> tuple[np.ndarray, dict[str, str]]:
    """The labels external validation is judged against: for each label with readers or an
    adjudication at this site, its reference standard (``readers.reference_standard``);
    elsewhere the site's own label. Also says where each replaced label came from."""
    if meta is None:
        return labels, {}
    out, sources = np.array(labels, dtype=float, copy=True), {}
    for k, label in enumerate(LABELS):
        if reader_mod.has_reference(meta, label):
            out[:, k] = reader_mod.reference_standard(meta, label)
            adjudicated = f"adjudicated/{label}" in meta.columns
            readers = bool(reader_mod.reader_columns(meta, label))
            sources[label] = ("adjudicated, else readers' majority" if adjudicated and readers
                              else "adjudicated" if adjudicated else "readers' majority")
    return out, sources


def reference_effect(site_labels: np.ndarray, reference: np.ndarray,
                     scores: dict[str, np.ndarray], clusters, options: EvaluationOptions,
                     pairs: list[tuple[str, str]], site: str, sources: dict[str, str],
                     reference_rows: list[dict]) -> dict:
    """H2: the same primary endpoint against the site's own labels, beside the reference
    standard's, and how many images' truth the reference standard changed per label."""
    effect = primary_endpoint(site_labels, scores, clusters, options.primary_labels or [],
                              pairs, site=site, level=options.level)
    judged = {(r["model_a"], r["model_b"]): r for r in reference_rows}
    for row in effect["primary"]:  # the same comparison against the reference standard
        ref = judged.get((row["model_a"], row["model_b"]))
        row["diff_reference"] = ref["diff"] if ref else None
        row["diff_reference_low"] = ref["diff_low"] if ref else None
        row["diff_reference_high"] = ref["diff_high"] if ref else None
    changed = []
    for k, label in enumerate(LABELS):
        if label not in sources:
            continue
        a, b = site_labels[:, k], reference[:, k]
        both = ~np.isnan(a) & ~np.isnan(b)
        n_changed = int(np.sum(a[both] != b[both]))
        n_tied = int(np.sum(np.isnan(b) & ~np.isnan(a)))
        small = [n for n in (n_changed, n_tied) if 0 < n < options.min_cell]
        changed.append({"site": site, "label": label, "reference": sources[label],
                        "images": int(both.sum()),
                        # a count under min-cell is not released exactly (small cells)
                        "changed": None if small else n_changed,
                        "no_reference": None if small else n_tied,
                        "status": f"fewer than {options.min_cell}" if small else "ok"})
    return {"primary_auc_site_labels": effect["primary_auc"],
            "primary_site_labels": effect["primary"], "reference_changes": changed}


def evaluate_scores(labels: np.ndarray, scores: dict[str, np.ndarray],
                    thresholds: dict[str, dict[str, float]], *, site: str,
                    meta=None, options: EvaluationOptions | None = None) -> dict:
    """All statistics for one site from labels (N, L) and each model's scores (N, L). Where
    the site has readers or adjudicated labels, the reference standard replaces the site's
    labels for every statistic, and the primary endpoint is also given against the site's
    own labels (H2)."""
    options = options or EvaluationOptions()
    names = list(scores)
    _check_thresholds(names, thresholds)
    pairs = options.comparisons or [(names[0], b) for b in names[1:]]
    zcrit = critical_z(options.level)
    clusters, clustered_by = clusters_of(meta)
    codes = cluster_codes(clusters, len(labels))
    site_labels = labels
    labels, sources = reference_labels(labels, meta)
    out = {"site": site, "n_images": int(len(labels)), "clustered_by": clustered_by,
           "external": [], "comparisons": [], "operating_points": [], "calibration": [],
           "roc": [], "subgroups": [], "readers": [],
           "reference_standard": [{"site": site, "label": lb, "source": src}
                                  for lb, src in sources.items()]}
    components = {}
    groups = subgroups(meta) if meta is not None else None
    for k, label in enumerate(LABELS):
        y = labels[:, k]
        n_pos = int(np.nansum(y == 1))
        n_neg = int(np.nansum(y == 0))
        stacked = np.stack([scores[n][:, k] for n in names])
        comp = components[k] = _components(y, stacked, codes)
        out["external"] += auc_rows(site, names, label, comp, n_pos, n_neg, zcrit)
        if comp is None:
            continue
        aucs, cov = comp.aucs, comp.covariance()
        index = {n: i for i, n in enumerate(names)}
        variance_ok = bool(np.isfinite(cov[0, 0]))
        for name, i in index.items():
            score = stacked[i]
            if label in thresholds[name]:
                op = at_threshold(y, score, thresholds[name][label], options.level)
                out["operating_points"].append({"site": site, "model": name, "label": label,
                                                **op.as_dict()})
            out["calibration"].append({"site": site, "model": name, "label": label,
                                       "ece": ece(y, score), "brier": brier(y, score),
                                       "reliability": reliability(y, score)})
            pos_ge, neg_ge = roc_counts(y, score)
            pick = np.linspace(0, len(GRID) - 1, ROC_POINTS).astype(int)
            out["roc"].append({"site": site, "model": name, "label": label,
                               "threshold": GRID[pick].tolist(),
                               "tpr": (pos_ge[pick] / max(n_pos, 1)).tolist(),
                               "fpr": (neg_ge[pick] / max(n_neg, 1)).tolist()})
            if groups is not None:
                for row in subgroup_table(groups, y, score, thresholds[name].get(label, 0.5),
                                          min_size=options.min_subgroup,
                                          min_cell=options.min_cell):
                    out["subgroups"].append({"site": site, "model": name, "label": label,
                                             **row})
        for a, b in pairs:
            ia, ib = index[a], index[b]
            if not variance_ok:
                continue  # no test without a variance; the AUCs are still reported above
            t = paired_from(aucs[ia], aucs[ib], cov[ia, ia] + cov[ib, ib] - 2 * cov[ia, ib],
                            options.level)
            out["comparisons"].append({
                "site": site, "label": label, "model_a": a, "model_b": b, "auc_a": t.auc_a,
                "auc_b": t.auc_b, "diff": t.auc_a - t.auc_b, "diff_low": t.diff_lower,
                "diff_high": t.diff_upper, "z": t.z, "p": t.p_value})
    if meta is not None:
        ids = clusters if clusters is not None else np.arange(len(labels))
        for label in reader_mod.reader_labels(meta):
            k = LABELS.index(label) if label in LABELS else None
            model_scores = {} if k is None else {n: scores[n][:, k] for n in names}
            study = reader_mod.reader_study(meta, label, model_scores, clusters=ids,
                                            level=options.level)
            if study:
                out["readers"].append({"site": site, **study})
    if options.primary_labels:
        primary_pairs = (options.primary_pairs if options.primary_pairs is not None
                         else [(names[0], b) for b in names[1:]])
        out.update(primary_endpoint(labels, scores, clusters, options.primary_labels,
                                    primary_pairs, site=site,
                                    level=options.level, components=components))
        if sources:
            out.update(reference_effect(site_labels, labels, scores, clusters, options,
                                        primary_pairs, site, sources, out.get("primary", [])))
    return out


def score_models(cache: SiteCache, models: dict[str, torch.nn.Module], batch_size: int = 64,
                 transform=None, device: str = "cpu") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels (N, L) and each model's sigmoid scores (N, L) over the whole site."""
    return score_dataset(CachedImages(cache), models, batch_size, transform, device)


def score_dataset(ds: CachedImages, models: dict[str, torch.nn.Module], batch_size: int = 64,
                  transform=None, device: str = "cpu"
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels (N, L) and each model's sigmoid scores (N, L) over ``ds`` (e.g. a split), on
    ``device`` (the models go back to the CPU after)."""
    loader = make_loader(ds, batch_size, shuffle=False)
    scores: dict[str, list[np.ndarray]] = {n: [] for n in models}
    for m in models.values():
        m.eval().to(device)
    with torch.no_grad():
        for b, (x, _y) in enumerate(loader):
            if transform is not None:
                x = transform(x, b)
            x = x.to(device)
            for name, m in models.items():
                scores[name].append(torch.sigmoid(m(x)).cpu().numpy())
    for m in models.values():
        m.to("cpu")
    return ds.labels(), {n: np.concatenate(v) if v else np.zeros((0, len(LABELS)))
                         for n, v in scores.items()}


def device_shift(cache: SiteCache, models: dict[str, torch.nn.Module], labels: np.ndarray,
                 batch_size: int, site: str, device: str = "cpu") -> list[dict]:
    """AUC per model x label under each simulated shift (macro mean reported too)."""
    rows = []
    for kind, strengths in SHIFTS.items():
        for strength in strengths:
            _, scores = score_models(
                cache, models, batch_size,
                transform=lambda x, b, k=kind, s=strength: apply_shift(x, k, s, seed=b),
                device=device)
            for name, s in scores.items():
                aucs = []
                for k in range(len(LABELS)):
                    try:
                        a, _, _, _ = delong_components(labels[:, k], s[:, k])
                        aucs.append(float(a[0]))
                    except NotEstimable:
                        continue
                rows.append({"site": site, "model": name, "shift": kind, "strength": strength,
                             "mean_auc": float(np.mean(aucs)) if aucs else None})
    return rows


def evaluate_site(cache: SiteCache, models: dict[str, torch.nn.Module],
                  thresholds: dict[str, dict[str, float]], *, site: str,
                  options: EvaluationOptions | None = None) -> dict:
    """Score every model on the whole site and return aggregate statistics only."""
    options = options or EvaluationOptions()
    _check_thresholds(list(models), thresholds)  # before any work
    labels, scores = score_models(cache, models, options.batch_size, device=options.device)
    result = evaluate_scores(labels, scores, thresholds, site=site, meta=cache.index,
                             options=options)
    result["shift"] = []
    if options.shift:
        chosen = {n: m for n, m in models.items()
                  if options.shift_models is None or n in options.shift_models}
        result["shift"] = device_shift(cache, chosen, labels, options.batch_size, site,
                                       options.device)
    if options.localisation is not None:
        for name, model in models.items():
            for key, rows in localise_site(cache, name, model, site=site,
                                           options=options.localisation).items():
                result.setdefault(key, []).extend(rows)
    if options.gradcam_dir is not None and len(labels):
        name = next(iter(models))
        n = min(options.gradcam_images, len(labels))
        ds = CachedImages(cache, np.arange(n))
        images = torch.stack([ds[i][0] for i in range(n)])
        ids = [f"img{i:04d}" for i in range(n)]  # local file names only; never sent
        result["gradcam_written"] = write_overlays(models[name], images, scores[name][:n],
                                                   thresholds[name], options.gradcam_dir, ids)
    return result


class ScoreStore:
    """Per-model scores of one run at one held-out site, on that site's own disk.

    External validation arrives one model per message (so no message carries more than one
    model); each model's scores (and its device-shift AUCs) are kept here until the final
    statistics message, which needs all of them at once for the paired tests. Nothing in
    this folder is ever sent.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _stem(self, name: str) -> Path:
        return self.directory / "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

    def save(self, name: str, scores: np.ndarray, shift_rows: list[dict]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self._stem(name)
        with atomic_path(stem.with_suffix(".npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, scores)
        write_text(stem.with_suffix(".shift.json"), json.dumps(shift_rows))

    def save_localisation(self, name: str, rows: dict[str, list[dict]]) -> None:
        write_text(self._stem(name).with_suffix(".localisation.json"), json.dumps(rows))

    def load_localisation(self, names: list[str]) -> dict[str, list[dict]]:
        """The localisation and shortcut rows of ``names`` (models scored without boxes, or
        before localisation existed, have none)."""
        out: dict[str, list[dict]] = {"localisation": [], "shortcut": []}
        for n in names:
            path = self._stem(n).with_suffix(".localisation.json")
            if path.is_file():
                for key, rows in json.loads(path.read_text()).items():
                    out.setdefault(key, []).extend(rows)
        return out

    def load(self, names: list[str]) -> tuple[dict[str, np.ndarray], list[dict]]:
        missing = [n for n in names if not self._stem(n).with_suffix(".npy").exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.directory}: no stored scores for model(s) {', '.join(missing)}; "
                "each model must be scored (purpose=external-score) before the statistics")
        scores = {n: np.load(self._stem(n).with_suffix(".npy")) for n in names}
        shift = [row for n in names
                 for row in json.loads(self._stem(n).with_suffix(".shift.json").read_text())]
        return scores, shift


def score_into_store(cache: SiteCache, name: str, model: torch.nn.Module, store: ScoreStore,
                     *, site: str, options: EvaluationOptions | None = None) -> int:
    """Score one model on the whole site (plus device shift when asked) into ``store``."""
    options = options or EvaluationOptions()
    labels, scores = score_models(cache, {name: model}, options.batch_size,
                                  device=options.device)
    shift = []
    if options.shift and (options.shift_models is None or name in options.shift_models):
        shift = device_shift(cache, {name: model}, labels, options.batch_size, site,
                             options.device)
    store.save(name, scores[name], shift)
    if options.localisation is not None:
        store.save_localisation(name, localise_site(cache, name, model, site=site,
                                                    options=options.localisation))
    return len(labels)


def localise_site(cache: SiteCache, name: str, model: torch.nn.Module, *, site: str,
                  options: LocalisationOptions, rows: np.ndarray | None = None
                  ) -> dict[str, list[dict]]:
    """Grad-CAM localisation and shortcut reliance of one model on the site's boxes
    (positives by the reference standard); empty where the site has no boxes."""
    boxes = cache.boxes
    if not len(boxes):
        return {"localisation": [], "shortcut": []}
    meta = cache.index
    reference, _ = reference_labels(CachedImages(cache).labels(), meta)
    clusters, _ = clusters_of(meta)
    ids = np.asarray(clusters if clusters is not None else np.arange(len(meta)), dtype=object)
    return localise(model, cache.images, float(cache.scale), boxes, reference, ids, site=site,
                    model_name=name, options=options, rows=rows)


def evaluate_stored(cache: SiteCache, store: ScoreStore, names: list[str],
                    thresholds: dict[str, dict[str, float]], *, site: str,
                    options: EvaluationOptions | None = None) -> dict:
    """All statistics from the stored scores of ``names`` (in that order: the first model is
    compared with each other one)."""
    _check_thresholds(names, thresholds)
    scores, shift = store.load(names)
    labels = CachedImages(cache).labels()
    for n, s in scores.items():
        if s.shape != labels.shape:
            raise ValueError(f"{store.directory}: scores of {n} have shape {s.shape}, the site "
                             f"has {labels.shape}; the cache changed since scoring, score again")
    result = evaluate_scores(labels, scores, thresholds, site=site, meta=cache.index,
                             options=options)
    result["shift"] = shift
    result.update(store.load_localisation(names))
    return result
