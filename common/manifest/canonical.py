"""The project's own canonical CSV.

Columns: ``path`` (relative to the data folder or absolute), ``patient_id``; optional
``study_id``, ``sex`` (M/F), ``age`` (years or DICOM age string), ``view`` (PA/AP/LATERAL),
``manufacturer``, ``split`` (train/val/test); any of the 14 label columns by canonical name with
1 / 0 / blank; optional reader columns ``reader<k>/<Label>`` and ``adjudicated/<Label>``.
Absent label columns are unknown (NaN).
"""

from __future__ import annotations

import math

import pandas as pd

from common.labels import LABELS, UnknownLabelValue, binary_value
from common.manifest.base import (
    READER_RE,
    Adapter,
    ReadContext,
    age_or_problem,
    canonical_frame,
    parse_sex,
    parse_view,
)


def binary_cells(values: dict, columns: list[str], ctx: ReadContext, i: int) -> dict[str, float]:
    """Read 1 / 0 / blank cells; an unknown value becomes NaN and a problem for that row."""
    out: dict[str, float] = {}
    for col in columns:
        try:
            out[col] = binary_value(values.get(col))
        except UnknownLabelValue as exc:
            ctx.problem(
                "unknown_label_value",
                f"column {col!r} holds {exc.args[0]!r}; expected 1, 0 or blank; label left unknown",
                i,
            )
            out[col] = math.nan
    return out


def read(table: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    label_cols = [c for c in LABELS if c in table.columns]
    reader_cols = [c for c in table.columns if READER_RE.match(c)]
    records = []
    for i, values in enumerate(table.to_dict(orient="records")):
        record = {
            "_line": ctx.line(i),
            "path": str(ctx.resolve(str(values["path"]).strip())),
            "patient_id": str(values["patient_id"]).strip(),
            "study_id": str(values.get("study_id", "") or "").strip(),
            "site": ctx.site,
            "sex": parse_sex(values.get("sex")),
            "age": age_or_problem(values.get("age"), ctx, i),
            "view": parse_view(values.get("view")),
            "manufacturer": str(values.get("manufacturer", "") or "").strip(),
            "split": str(values.get("split", "") or "").strip().lower(),
        }
        record.update(binary_cells(values, label_cols + reader_cols, ctx, i))
        records.append(record)
    return canonical_frame(records)


ADAPTER = Adapter(
    name="canonical",
    signature=frozenset({"path", "patient_id"}),
    read=read,
    description="fedcxr canonical CSV (path, patient_id, label columns)",
)
