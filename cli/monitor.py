"""``fedcxr site monitor``: watch a deployed model at a site (common/monitoring.py).

    fedcxr site monitor --model MODEL --data DIR --baseline BASELINE.json --out OUT
        [--since DATE] [--window-days 7] [--psi 0.2] [--input-psi 0.2] [--ks-alpha 0.01]
        [--auc-margin 0.05] [--min-images 30]

MODEL is a fedcxr checkpoint or a TorchScript file from ``fedcxr export``. New images are the
data folder's usable images (whose file was modified on or after ``--since``); they are
decoded into a cache at the baseline's image size, scored, and compared with the baseline.
Writes OUT/monitor.json and OUT/monitor.html (drift and AUC per time window). Exit code 4
when an alert fired, 0 when none did (1: no usable image, 2: bad input, as everywhere).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cli.args import positive
from common.errors import FedcxrError

EXIT_ALERT = 4


def load_deployed(path: Path, device: str):
    """A callable images -> probabilities: an exported TorchScript model (its output is
    already probabilities) or a fedcxr checkpoint (sigmoid of its logits)."""
    import warnings

    import torch

    from common.model import ModelLoadError, load_checkpoint

    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location=device).eval()
        return lambda x: scripted(x)
    except (RuntimeError, ValueError):
        pass
    try:
        model = load_checkpoint(path).eval().to(device)
    except (ModelLoadError, OSError, RuntimeError) as exc:
        raise FedcxrError(f"--model {path}: neither a TorchScript export nor a fedcxr "
                          f"checkpoint ({str(exc).splitlines()[0][:200]})") from None
    return lambda x: torch.sigmoid(model(x))


def _since(text: str) -> float:
    try:
        day = datetime.fromisoformat(text)
    except ValueError:
        raise FedcxrError(f"--since {text!r}: use a date such as 2026-11-01") from None
    if day.tzinfo is None:
        day = day.replace(tzinfo=UTC)
    return day.timestamp()


def _figure(window_drift: list[dict], window_auc: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    labels = sorted({r["label"] for w in window_drift for r in w["labels"]})
    for lb in labels:
        xs = [w["window"] + 1 for w in window_drift if any(r["label"] == lb for r in w["labels"])]
        ys = [next(r["psi"] for r in w["labels"] if r["label"] == lb) for w in window_drift
              if any(r["label"] == lb for r in w["labels"])]
        axes[0].plot(xs, ys, marker="o", label=lb)
    axes[0].plot([w["window"] + 1 for w in window_drift if "intensity" in w["inputs"]],
                 [w["inputs"]["intensity"] for w in window_drift if "intensity" in w["inputs"]],
                 "k--", marker="s", label="intensity (input)")
    axes[0].set(title="PSI per time window", xlabel="window", ylabel="PSI")
    axes[0].legend(fontsize=6, ncol=2)
    for lb in sorted({r["label"] for r in window_auc}):
        rows = [r for r in window_auc if r["label"] == lb]
        x = [r["window"] + 1 for r in rows]
        y = [r["auc"] for r in rows]
        err = [[a - r["ci_low"] for a, r in zip(y, rows, strict=True)],
               [r["ci_high"] - a for a, r in zip(y, rows, strict=True)]]
        axes[1].errorbar(x, y, yerr=err, marker="o", capsize=3, label=lb)
    axes[1].set(title="AUC per time window (95% CI)", xlabel="window", ylabel="AUC",
                ylim=(0, 1))
    if window_auc:
        axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


HTML = """<!doctype html><html><head><meta charset="utf-8"><title>fedcxr monitor: {{ r.model }}
</title><style>body{font-family:sans-serif;margin:2em;max-width:70em}td,th{padding:2px 8px;
border-bottom:1px solid #ddd}.alert{color:#b00;font-weight:bold}</style></head><body>
<h1>Monitoring {{ r.model }} at {{ r.site }}</h1>
<p>Baseline: {{ r.baseline.n_images }} images of run {{ r.baseline.run_name }}; new images:
{{ r.drift.n_images }} (since {{ r.since or "the beginning" }}), in {{ r.windows | length }}
window(s) of {{ r.window_days }} days.</p>
{% if r.alerts %}<p class="alert">{{ r.alerts | length }} alert(s):</p><ul>
{% for a in r.alerts %}<li class="alert">{{ a }}</li>{% endfor %}</ul>
{% else %}<p>No alert.</p>{% endif %}
{% if r.drift.note %}<p>{{ r.drift.note }}</p>{% endif %}
<img alt="drift and AUC over time" src="data:image/png;base64,{{ r.figure }}">
<h2>Score drift per label</h2><table><tr><th>label</th><th>PSI</th><th>KS</th>
<th>adjusted p</th><th>median (baseline)</th></tr>
{% for x in r.drift.labels %}<tr><td>{{ x.label }}</td><td>{{ "%.3f" | format(x.psi) }}</td>
<td>{{ "%.3f" | format(x.ks) }}</td><td>{{ "%.1e" | format(x.p_adjusted) }}</td>
<td>{{ "%.3f" | format(x.median) }} ({{ "%.3f" | format(x.baseline_median) }})</td></tr>
{% endfor %}</table>
<h2>Input drift</h2><table>{% for k, v in r.drift.inputs.items() %}<tr><td>{{ k }}</td>
<td>PSI {{ "%.3f" | format(v) }}</td></tr>{% endfor %}</table>
</body></html>"""


def run(args: argparse.Namespace) -> int:
    import torch
    from jinja2 import Environment

    from common.atomic import write_text
    from common.data import CachedImages, make_loader
    from common.model import resolve_device
    from common.monitoring import Baseline, Thresholds, compare, windows, with_acquired_size
    from common.site import SiteSource, ensure_cache

    since = _since(args.since) if args.since else None  # bad input: one line, before work
    device = resolve_device(args.device)
    baseline = Baseline.read(Path(args.baseline))
    predict = load_deployed(Path(args.model), device)
    source = SiteSource(Path(args.data), Path(args.manifest) if args.manifest else None,
                        args.format)
    cache = ensure_cache(source, baseline.image_size, Path(args.cache) if args.cache else None)
    dates = np.array([_mtime(p) for p in cache.index["path"]])
    rows = np.flatnonzero(dates >= since) if since is not None else np.arange(len(dates))
    if not len(rows):
        print(f"error: {args.data}: no usable image"
              + (f" modified since {args.since}" if since is not None else ""))
        return 1
    ds = CachedImages(cache, rows)
    scores = []
    with torch.no_grad():
        for x, _ in make_loader(ds, 64, shuffle=False):
            scores.append(predict(x.to(device)).cpu().numpy())
    scores = np.concatenate(scores)
    labels, meta = ds.labels(), with_acquired_size(cache.index.iloc[rows])  # headers once
    images = np.asarray(cache.images[rows])
    t = Thresholds(psi=args.psi, input_psi=args.input_psi, ks_alpha=args.ks_alpha,
                   auc_margin=args.auc_margin, auc_alpha=args.auc_alpha,
                   min_images=args.min_images)
    drift = compare(baseline, scores, images, float(cache.scale), meta, t)
    auc_rows, auc_alerts = windows(dates[rows], labels, scores, baseline, args.window_days, t)
    which = np.floor((dates[rows] - dates[rows].min()) / (args.window_days * 86400)).astype(int)
    window_drift = []
    for w in np.unique(which):
        sel = which == w
        d = compare(baseline, scores[sel], images[sel], float(cache.scale), meta.iloc[sel],
                    Thresholds(min_images=1))
        window_drift.append({"window": int(w), "n_images": int(sel.sum()),
                             "labels": d["labels"], "inputs": d["inputs"]})
    report = {"model": str(args.model), "site": Path(args.data).name, "since": args.since,
              "window_days": args.window_days,
              "baseline": {k: getattr(baseline, k) for k in (
                  "model", "site", "run_name", "image_size", "n_images", "auc")},
              "thresholds": asdict(t), "drift": drift, "windows": window_drift,
              "auc": auc_rows, "alerts": drift["alerts"] + auc_alerts,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "monitor.json", json.dumps(report, indent=1, default=float))
    html = Environment(autoescape=True).from_string(HTML).render(
        r={**report, "figure": _figure(window_drift, auc_rows)})
    write_text(out / "monitor.html", html)
    print(f"{len(rows)} new image(s) in {len(window_drift)} window(s); "
          + (f"{len(report['alerts'])} alert(s):" if report["alerts"] else "no alert"))
    for a in report["alerts"]:
        print(f"  ALERT {a}")
    print(f"wrote {out / 'monitor.json'} and {out / 'monitor.html'}")
    return EXIT_ALERT if report["alerts"] else 0


def _mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return float("nan")


def register_monitor(site: argparse._SubParsersAction) -> None:
    p = site.add_parser("monitor", help="drift and performance of a deployed model against "
                                        "its baseline (exit 4 when an alert fires)")
    p.add_argument("--model", required=True, help="a fedcxr checkpoint or a TorchScript file "
                                                  "from `fedcxr export`")
    p.add_argument("--data", required=True, help="the site's data folder (new images)")
    p.add_argument("--baseline", required=True,
                   help="BASELINE.json the run wrote at this site "
                        "(<state>/baselines/<run>/<model>.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--since", metavar="DATE",
                   help="only images whose file was modified on or after DATE (ISO)")
    p.add_argument("--window-days", type=positive, default=7.0)
    p.add_argument("--psi", type=positive, default=0.2, help="score PSI alert threshold")
    p.add_argument("--input-psi", type=positive, default=0.2,
                   help="intensity / view / manufacturer PSI alert threshold")
    p.add_argument("--ks-alpha", type=positive, default=0.01)
    p.add_argument("--auc-margin", type=float, default=0.05,
                   help="an AUC drop smaller than this never alerts")
    p.add_argument("--auc-alpha", type=positive, default=0.01,
                   help="one-sided test of a window's AUC drop, Holm across labels x windows")
    p.add_argument("--min-images", type=int, default=30)
    p.add_argument("--manifest")
    p.add_argument("--format")
    p.add_argument("--cache", help="cache folder (default DATA/.fedcxr/cache-SIZE)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)
