"""The model card of an exported model: ``model_card.json`` and ``model_card.md``.

Built from results.json alone (Mitchell et al. 2019's sections, in this study's terms):
intended use, the training sites and their sizes, the selection rule and round, internal and
external results with their CIs, the H1 verdict, the privacy spent per site, and the known
limitations that follow from how the run was made (synthetic data, labels as the sites'
manifests give them, held-out sites few). Every number is copied from results.json, so the
card cannot claim what the run did not measure.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import Environment

from common.atomic import write_text

INTENDED_USE = (
    "Research on federated training and external validation of chest X-ray classifiers "
    "(14 ChestX-ray14 findings, frontal views). Not a medical device; not for diagnosis, "
    "triage or any decision about a patient.")

TEMPLATE = """# Model card: {{ c.model }} ({{ c.run_name }})

## Intended use
{{ c.intended_use }}

## Model
DenseNet-121, {{ c.norm }} norm, input {{ c.image_size }} x {{ c.image_size }} grey image in
[0, 1]; output: a probability for each of {{ c.labels | length }} labels
({{ c.labels | join(", ") }}). Exported as {{ c.format }}: `{{ c.file }}`.

## Training
{% for s in c.training_sites -%}
- {{ s.site }}: {{ s.n_images }} images ({{ s.format }})
{% else -%}
- none recorded
{% endfor %}
Selection: {{ c.selection.rule }}; this model is round {{ c.selection.round }}
(validation AUC {{ fmt(c.selection.validation_auc) }}, training-site validation data).

## Operating points
Thresholds fixed on training-site validation data ({{ c.thresholds_rule }}):
{% for label, t in c.thresholds.items() -%}
{{ label }} {{ "%.3f" | format(t) }}{{ "; " if not loop.last }}
{%- else -%}
none fixed (validation ROC counts were withheld or too small).
{%- endfor %}

## Results
Primary endpoint: {{ c.primary_endpoint }}.

| setting | site | macro-AUC | 95% CI |
| --- | --- | --- | --- |
{% for r in c.internal -%}
| internal (own test split) | {{ cells(r) }} |
{% endfor -%}
{% for r in c.external -%}
| external (held out) | {{ cells(r) }} |
{% endfor %}
H1 verdict: {{ c.verdict }}

## Privacy
{% for p in c.privacy -%}
- {{ p.site }}: ε = {{ fmt(p.epsilon) }} at δ = {{ p.delta }} per {{ p.unit }} ({{ p.accountant }})
{% else -%}
- no differential privacy in this run: the weights carry no formal guarantee.
{% endfor %}
## Known limitations
{% for item in c.limitations -%}
- {{ item }}
{% endfor -%}
"""


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cells(row: dict) -> str:
    """site | macro-AUC | CI cells of a results row."""
    return (f"{row['site']} | {_fmt(row['macro_auc'])} | {_fmt(row['ci_low'])} to "
            f"{_fmt(row['ci_high'])}")


def model_card(results: dict, model: str, meta: dict, fmt: str, file: str) -> dict:
    """The card as a dict (model_card.json); ``meta`` is the exported file's metadata."""
    config = results.get("provenance", {}).get("config", {})
    protocol = results.get("protocol", {})
    arm = next(a for a in results.get("arms", []) if a["name"] == model)
    cohort = results.get("cohort", [])
    training = [c for c in cohort if c.get("role") == "train"]
    if model.startswith("single:"):
        training = [c for c in training if c["site"] == model.split(":", 1)[1]]
    held_out = [c for c in cohort if c.get("role") == "evaluate"]
    rows = results.get("internal_primary", [])
    internal = [r for r in rows if r.get("model") == model]
    external = [r for r in results.get("primary_auc", []) if r.get("model") == model]
    privacy = [{"site": p["site"], "epsilon": p.get("epsilon"), "delta": p.get("delta"),
                "unit": p.get("privacy_unit", "patient"), "accountant": p.get("accountant")}
               for p in results.get("privacy", [])
               if not model.startswith("single:") or p["site"] == model.split(":", 1)[1]]
    labels = protocol.get("primary_labels") or []
    limitations = []
    if any(str(c.get("format", "")).startswith("synthetic") for c in cohort) or \
            config.get("cohort"):
        limitations.append("Trained and validated on fedcxr's synthetic cohort: the results "
                           "say nothing about real chest X-rays.")
    limitations += [
        "Labels are the sites' manifest labels (NLP-mined in the public datasets), not "
        "re-annotated by radiologists for this run.",
        f"External validation at {len(held_out)} held-out site(s): performance at other "
        "hospitals, scanners and populations is unknown.",
        "Operating points were fixed on training-site validation data; recalibrate at a new "
        "site before any use.",
    ]
    if not privacy:
        limitations.append("No differential privacy: the weights may memorise training "
                           "images.")
    return {
        "model": model, "run_name": meta.get("run_name"), "format": fmt, "file": file,
        "intended_use": INTENDED_USE, "norm": meta.get("norm"),
        "image_size": meta.get("image_size"), "labels": meta.get("labels", []),
        "training_sites": [{"site": c["site"], "n_images": c.get("n_images"),
                            "format": c.get("format")} for c in training],
        "held_out_sites": [c["site"] for c in held_out],
        "selection": {"rule": protocol.get("selection", config.get("selection")),
                      "round": arm.get("best_round"),
                      "validation_auc": config.get("validation_mean_auc", {}).get(model)},
        "thresholds": meta.get("thresholds", {}),
        "thresholds_rule": f"{config.get('threshold-method', 'specificity')} "
                           f"{config.get('threshold-target', '')}".strip(),
        "primary_endpoint": f"{protocol.get('primary_metric', 'macro-auc')} over "
                            f"{', '.join(labels) if labels else 'the primary labels'}",
        "internal": [{k: r.get(k) for k in ("site", "macro_auc", "ci_low", "ci_high")}
                     for r in internal],
        "external": [{k: r.get(k) for k in ("site", "macro_auc", "ci_low", "ci_high")}
                     for r in external],
        "verdict": results.get("verdict", {}).get("overall", "none"),
        "privacy": privacy,
        "limitations": limitations,
    }


def write_model_card(card: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    jpath = write_text(out / "model_card.json", json.dumps(card, indent=1))
    env = Environment(autoescape=False, keep_trailing_newline=True)
    text = env.from_string(TEMPLATE).render(c=card, fmt=_fmt, cells=_cells)
    return jpath, write_text(out / "model_card.md", text)
