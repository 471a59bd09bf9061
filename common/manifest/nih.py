"""NIH ChestX-ray14 ``Data_Entry_2017*.csv``: ``|``-separated findings, all 14 labels known."""

from __future__ import annotations

import pandas as pd

from common.labels import LABEL_INDEX, LABELS, NO_FINDING
from common.manifest.base import (
    Adapter,
    ReadContext,
    age_or_problem,
    canonical_frame,
    parse_sex,
    parse_view,
)


def read(table: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    records = []
    for i, row in enumerate(table.itertuples(index=False)):
        values = dict(zip(table.columns, row, strict=True))
        labels = {name: 0.0 for name in LABELS}  # NIH annotates all 14: absent means negative
        findings = [f.strip() for f in str(values["Finding Labels"]).split("|") if f.strip()]
        for f in findings:
            if f == NO_FINDING:
                continue
            if f in LABEL_INDEX:
                labels[f] = 1.0
            else:
                ctx.problem(
                    "unknown_label_value",
                    f"finding {f!r} is not one of the 14 ChestX-ray14 labels; row kept without it",
                    i,
                )
        name = str(values["Image Index"]).strip()
        patient = str(values["Patient ID"]).strip()
        path = ctx.find_by_name(name, i)
        if path is None:
            continue
        records.append(
            {
                "_line": ctx.line(i),
                "path": str(path),
                "patient_id": patient,
                "study_id": f"{patient}_{values.get('Follow-up #', i)}",
                "site": ctx.site,
                "sex": parse_sex(values.get("Patient Gender")),
                "age": age_or_problem(values.get("Patient Age"), ctx, i),
                "view": parse_view(values.get("View Position")),
                "manufacturer": "",
                "split": str(values.get("split", "") or "").strip().lower(),
                **labels,
            }
        )
    return canonical_frame(records)


ADAPTER = Adapter(
    name="nih",
    signature=frozenset(
        {"Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
         "View Position"}
    ),
    read=read,
    description="NIH ChestX-ray14 Data_Entry_2017.csv",
)
