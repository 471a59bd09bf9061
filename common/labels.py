"""The pathology vocabulary and how each public dataset's labels map onto it.

Canonical labels are the 14 ChestX-ray14 pathologies in their published order. A dataset that
does not annotate a label gives NaN for it, and NaN is masked out of the loss and the metrics,
so "not annotated" is never confused with "absent".
"""

from __future__ import annotations

import math
from enum import StrEnum

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}

NO_FINDING = "No Finding"

# CheXpert / MIMIC-CXR-JPG (CheXpert labeller) column -> canonical label.
# "Lung Lesion", "Lung Opacity", "Fracture", "Support Devices", "Enlarged Cardiomediastinum"
# and "Pleural Other" have no one-to-one ChestX-ray14 counterpart and are not mapped.
CHEXPERT_COLUMNS: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
}
CHEXPERT_ALL_COLUMNS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# PadChest finding (lower case, as in the `Labels` column) -> canonical label.
# PadChest annotates with a UMLS-based hierarchy; these are the terms whose meaning matches a
# ChestX-ray14 label. Everything else (e.g. "scoliosis", "aortic elongation") is ignored. Since
# PadChest annotates every finding it sees, a canonical label it does not list is 0, not NaN.
PADCHEST_SYNONYMS: dict[str, str] = {
    "atelectasis": "Atelectasis",
    "laminar atelectasis": "Atelectasis",
    "lobar atelectasis": "Atelectasis",
    "segmental atelectasis": "Atelectasis",
    "round atelectasis": "Atelectasis",
    "total atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural effusion": "Effusion",
    "loculated pleural effusion": "Effusion",
    "infiltrates": "Infiltration",
    "interstitial pattern": "Infiltration",
    "reticular interstitial pattern": "Infiltration",
    "mass": "Mass",
    "pulmonary mass": "Mass",
    "mediastinal mass": "Mass",
    "nodule": "Nodule",
    "multiple nodules": "Nodule",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "alveolar pattern": "Consolidation",
    "pulmonary edema": "Edema",
    "heart insufficiency": "Edema",
    "emphysema": "Emphysema",
    "bullas": "Emphysema",
    "pulmonary fibrosis": "Fibrosis",
    "post radiotherapy changes": "Fibrosis",
    "pleural thickening": "Pleural_Thickening",
    "apical pleural thickening": "Pleural_Thickening",
    "hiatal hernia": "Hernia",
    "hernia": "Hernia",
}


class UncertainPolicy(StrEnum):
    """What an uncertain (-1) CheXpert-labeller value becomes (Irvin et al. 2019, U-Ignore etc.)."""

    IGNORE = "ignore"
    ZEROS = "zeros"
    ONES = "ones"


def parse_uncertain_policy(spec: str | None) -> dict[str, UncertainPolicy]:
    """Parse ``"ignore"`` or ``"ignore,Atelectasis=ones,Edema=zeros"`` into a per-label policy."""
    policy = {name: UncertainPolicy.IGNORE for name in LABELS}
    if not spec:
        return policy
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if "=" in part:
            label, value = (s.strip() for s in part.split("=", 1))
            if label not in LABEL_INDEX:
                raise ValueError(
                    f"uncertain policy names unknown label {label!r}; "
                    f"use one of {', '.join(LABELS)}"
                )
            policy[label] = _policy(value)
        else:
            policy = {name: _policy(part) for name in LABELS}
    return policy


def _policy(value: str) -> UncertainPolicy:
    try:
        return UncertainPolicy(value)
    except ValueError:
        raise ValueError(f"uncertain policy {value!r} is not one of "
                         f"{', '.join(p.value for p in UncertainPolicy)}") from None


class UnknownLabelValue(ValueError):
    """A label cell that is neither 1, 0, -1 nor blank."""


def chexpert_value(raw: object, policy: UncertainPolicy) -> float:
    """Map a CheXpert-labeller cell (1, 0, -1, blank) to 1.0 / 0.0 / NaN."""
    if raw is None:
        return math.nan
    if isinstance(raw, float) and math.isnan(raw):
        return math.nan
    text = str(raw).strip()
    if text == "":
        return math.nan
    try:
        value = float(text)
    except ValueError as exc:
        raise UnknownLabelValue(text) from exc
    if value == 1.0:
        return 1.0
    if value == 0.0:
        return 0.0
    if value == -1.0:
        if policy is UncertainPolicy.ONES:
            return 1.0
        if policy is UncertainPolicy.ZEROS:
            return 0.0
        return math.nan
    raise UnknownLabelValue(text)


def binary_value(raw: object) -> float:
    """Map a canonical-CSV cell (1, 0, blank) to 1.0 / 0.0 / NaN."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return math.nan
    text = str(raw).strip().lower()
    if text in {"", "nan"}:
        return math.nan
    if text in {"1", "1.0", "true"}:
        return 1.0
    if text in {"0", "0.0", "false"}:
        return 0.0
    raise UnknownLabelValue(str(raw))


# Reader and box annotation findings -> canonical label. A finding with no one-to-one
# ChestX-ray14 label keeps its own name as an extra reference label (reader agreement and
# boxes are reported for it; no model output is ever scored against it): never folded into
# one of the 14.
VINDR_CLASSES: dict[str, str] = {  # VinDr-CXR annotations_*.csv class_name
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Infiltration": "Infiltration",
    "Pleural effusion": "Effusion",
    "Pleural thickening": "Pleural_Thickening",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary fibrosis": "Fibrosis",
}
VINDR_EXTRA: tuple[str, ...] = ("Aortic enlargement", "Calcification", "ILD", "Lung Opacity",
                                "Nodule/Mass", "Other lesion")
VINDR_NO_FINDING = "No finding"
NIH_BBOX_FINDINGS: dict[str, str] = {  # BBox_List_2017.csv Finding Label
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Effusion",
    "Infiltrate": "Infiltration",  # the BBox file's spelling
    "Infiltration": "Infiltration",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
GOOGLE_EXPERT_COLUMNS: dict[str, str] = {  # Majkowska et al. 2019 adjudicated labels
    "Pneumothorax": "Pneumothorax",
    "Fracture": "Fracture",
    "Airspace opacity": "Airspace opacity",
    "Nodule or mass": "Nodule or mass",
}
RSNA_LABEL = "Lung Opacity"  # RSNA Pneumonia Target=1 boxes: opacities suggesting pneumonia
MARKER_LABEL = "Marker"  # a burned-in marker's box (shortcut reliance), never a finding
