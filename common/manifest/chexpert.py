"""CheXpert ``train.csv`` / ``valid.csv``: 1 / 0 / -1 (uncertain) / blank per label."""

from __future__ import annotations

import re

import pandas as pd

from common.labels import CHEXPERT_COLUMNS, UnknownLabelValue, chexpert_value
from common.manifest.base import (
    Adapter,
    ReadContext,
    age_or_problem,
    canonical_frame,
    empty_labels,
    parse_sex,
    parse_view,
)

_PATIENT = re.compile(r"patient(\d+)")
_STUDY = re.compile(r"study(\d+)")


def chexpert_labels(values: dict, ctx: ReadContext, i: int) -> dict[str, float]:
    """Map the CheXpert-labeller columns of one row; shared with MIMIC-CXR-JPG."""
    labels = empty_labels()
    for column, label in CHEXPERT_COLUMNS.items():
        if column not in values:
            continue
        try:
            labels[label] = chexpert_value(values[column], ctx.uncertain[label])
        except UnknownLabelValue as exc:
            ctx.problem(
                "unknown_label_value",
                f"column {column!r} holds {exc.args[0]!r}; expected 1, 0, -1 or blank; "
                "label left unknown",
                i,
            )
    return labels


def read(table: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    records = []
    for i, row in enumerate(table.itertuples(index=False)):
        values = dict(zip(table.columns, row, strict=True))
        rel = str(values["Path"]).strip()
        patient = _PATIENT.search(rel)
        study = _STUDY.search(rel)
        patient_id = patient.group(0) if patient else rel
        frontal = str(values.get("Frontal/Lateral", "")).strip().lower()
        view = "LATERAL" if frontal == "lateral" else parse_view(values.get("AP/PA"))
        records.append(
            {
                "_line": ctx.line(i),
                "path": str(ctx.resolve(rel)),
                "patient_id": patient_id,
                "study_id": f"{patient_id}/{study.group(0)}" if study else patient_id,
                "site": ctx.site,
                "sex": parse_sex(values.get("Sex")),
                "age": age_or_problem(values.get("Age"), ctx, i),
                "view": view,
                "manufacturer": "",
                "split": str(values.get("split", "") or "").strip().lower(),
                **chexpert_labels(values, ctx, i),
            }
        )
    return canonical_frame(records)


ADAPTER = Adapter(
    name="chexpert",
    signature=frozenset({"Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Pleural Effusion"}),
    read=read,
    description="CheXpert train.csv / valid.csv",
)
