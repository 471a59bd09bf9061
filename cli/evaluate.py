"""``fedcxr evaluate`` (offline external validation at a site, the same code path as a
held-out node) and ``fedcxr report RUN_DIR`` (re-render report.html from results.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cli.args import IMAGE_SIZES, int_in
from common.errors import FedcxrError
from common.labels import LABELS


def _models(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if name in out:
            raise FedcxrError(f"--model {spec}: two models are named {name!r}; use NAME=PATH")
        out[name] = Path(path)
    return out


def load_thresholds(path: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """{model: {label: t}} or one {label: t} for every model. Unknown labels are an error."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise FedcxrError(f"{path}: thresholds file not found") from exc
    except json.JSONDecodeError as exc:
        raise FedcxrError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if data and all(isinstance(v, int | float) for v in data.values()):
        data = {n: data for n in names}
    for model, table in data.items():
        if not isinstance(table, dict):
            raise FedcxrError(f"{path}: key {model!r} must map labels to thresholds")
        bad = [k for k in table if k not in LABELS]
        if bad:
            raise FedcxrError(f"{path}: unknown label(s) {', '.join(bad)} under {model!r}")
    return data


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from common.config import label_list
    from common.evaluation.combine import combine_sites
    from common.evaluation.external import EvaluationOptions, evaluate_site
    from common.evaluation.localisation import LocalisationOptions
    from common.evaluation.report import build_results, write_report
    from common.evaluation.verdict import Protocol
    from common.model import load_checkpoint, resolve_device
    from common.site import SiteSource, ensure_cache

    resolve_device(args.device)  # a wrong device is one line, before any work
    paths = _models(args.model)
    extra = _models(args.extra_model or [])
    clash = set(paths) & set(extra)
    if clash:
        raise FedcxrError(f"--extra-model: {', '.join(sorted(clash))} is also a --model")
    first, *others = list(paths)
    primary_pairs = [(first, b) for b in others]
    paths = {**paths, **extra}
    thresholds = load_thresholds(Path(args.thresholds), list(paths))
    models = {name: load_checkpoint(p) for name, p in paths.items()}
    size = args.image_size
    if size is None:
        meta = torch.load(next(iter(paths.values())), map_location="cpu", weights_only=True)
        size = int(meta.get("image_size", 224)) if isinstance(meta, dict) else 224
    site_dir = Path(args.site)
    source = SiteSource(site_dir, Path(args.manifest) if args.manifest else None, args.format,
                        annotations=tuple(Path(p) for p in (args.readers, args.boxes) if p))
    cache = ensure_cache(source, size, Path(args.cache) if args.cache else None)
    out = Path(args.out)
    labels = cache.labels()
    primary = label_list(args.primary_labels, key="--primary-labels") or [
        lb for lb, known in zip(LABELS, (~np.isnan(labels)).any(axis=0), strict=True) if known]
    protocol = Protocol(primary_labels=primary, selection="given", margin=args.margin,
                        alpha=args.alpha, correction=args.correction)
    options = EvaluationOptions(shift=not args.no_shift, device=resolve_device(args.device),
                                gradcam_dir=out / "gradcam" if args.gradcam else None,
                                primary_labels=primary, primary_pairs=primary_pairs,
                                localisation=LocalisationOptions(
                                    max_images=args.gradcam_max_images,
                                    device=resolve_device(args.device),
                                    overlays=out / "gradcam" if args.gradcam else None)
                                if args.gradcam_max_images > 0 else None)
    evaluation = combine_sites([evaluate_site(cache, models, thresholds, site=site_dir.name,
                                              options=options)])
    cohort = [{"site": site_dir.name, "role": "evaluate", "n_images": len(labels),
               "prevalence": {lb: float(v) for lb, v in zip(LABELS, _nanmean(labels),
                                                             strict=True)}}]
    arms = [{"name": n, "kind": "extra" if n in extra else "given", "status": "complete",
             "selection": "given", "best_round": None, "history": []} for n in paths]
    results = build_results(cohort=cohort, arms=arms, evaluation=evaluation,
                            federated=next(iter(paths)), protocol=protocol,
                            config={"models": {n: str(p) for n, p in paths.items()},
                                    "thresholds": str(args.thresholds), "image_size": size},
                            fingerprints={site_dir.name: cache.fingerprint})
    rpath, hpath = write_report(results, out)
    print(results["verdict"]["overall"])
    print(f"wrote {rpath} and {hpath}")
    return 0


def _nanmean(a):
    with np.errstate(invalid="ignore"):
        return np.nanmean(a, axis=0) if len(a) else np.full(a.shape[1], np.nan)


def cmd_report(args: argparse.Namespace) -> int:
    from common.evaluation.report import render_html

    run = Path(args.run_dir)
    path = run / "results.json"
    if not path.is_file():
        raise FedcxrError(f"{run}: no results.json here; give a run folder (runs/<run-id>)")
    import matplotlib

    matplotlib.use("Agg")
    (run / "report.html").write_text(render_html(json.loads(path.read_text())))
    print(f"wrote {run / 'report.html'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="external validation of models at one site (offline)")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a checkpoint; repeat; the first is compared against the others")
    p.add_argument("--site", required=True, help="the site's data folder")
    p.add_argument("--thresholds", required=True,
                   help="JSON {model: {label: t}} fixed on training-site validation data")
    p.add_argument("--out", required=True)
    p.add_argument("--manifest")
    p.add_argument("--format")
    p.add_argument("--readers", help="reader annotations CSV (default: found beside the "
                   "manifest)")
    p.add_argument("--boxes", help="box annotations CSV (default: found beside the manifest)")
    p.add_argument("--gradcam-max-images", type=int_in(0, 100_000), default=100,
                   help="Grad-CAM localisation against the site's boxes: at most this many "
                        "images per label and model (0: none)")
    p.add_argument("--cache")
    p.add_argument("--image-size", type=int_in(*IMAGE_SIZES),
                   help="default: from the checkpoint, else 224")
    p.add_argument("--extra-model", action="append", metavar="NAME=PATH",
                   help="a model compared with the first --model as secondary analysis only")
    p.add_argument("--primary-labels", default="",
                   help="comma-separated labels of the primary macro-AUC (default: every "
                        "label annotated at the site)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="primary endpoint: the first model must exceed each other --model by "
                        "more than this macro-AUC difference")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--correction", choices=("holm", "bh"), default="holm")
    p.add_argument("--no-shift", action="store_true", help="skip simulated device shift")
    p.add_argument("--device", default="auto",
                   help="where models score: auto (CUDA when present, else CPU), cpu, cuda")
    p.add_argument("--gradcam", action="store_true",
                   help="write Grad-CAM overlays to OUT/gradcam (stays on this machine)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("report", help="re-render report.html from RUN_DIR/results.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
