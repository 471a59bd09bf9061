"""PadChest: ``Labels`` is a Python-list string of findings; age from birth year and study
date. Findings map to the 14 labels through ``common.labels.PADCHEST_SYNONYMS``.

The view comes from ``Projection`` (PA, AP, AP_horizontal, L, COSTAL, OBLICUA, ...), which
the file fills in for every row, with ``ViewPosition_DICOM`` as the fallback: the DICOM field
is 'nan' for about 21,700 lateral rows of the real file, so reading it alone keeps laterals as
frontals. Laterals become view LATERAL (excluded unless asked for); a projection that is not
a chest view at all is a ``non_chest_projection`` problem and the row is not used."""

from __future__ import annotations

import ast
import math

import pandas as pd

from common.labels import LABELS, PADCHEST_SYNONYMS
from common.manifest.base import (
    Adapter,
    ReadContext,
    age_or_problem,
    canonical_frame,
    empty_labels,
    parse_sex,
    parse_view,
)


def _age(values: dict, ctx: ReadContext, i: int) -> float:
    try:
        birth = int(float(values.get("PatientBirth")))
        year = int(str(values.get("StudyDate_DICOM"))[:4])
    except (TypeError, ValueError, OverflowError):
        return math.nan
    return age_or_problem(year - birth, ctx, i)


# Projection values of the real file that are not frontal or lateral chest views.
NON_CHEST_PROJECTIONS = {"COSTAL", "OBLICUA", "EXCLUDE", "PA_TRANSFER", "GENERICO"}


def view_of(values: dict) -> str | None:
    """PA / AP / LATERAL / "" (unknown), or None for a projection that is not a chest view."""
    projection = str(values.get("Projection", "") or "").strip().upper()
    if projection in NON_CHEST_PROJECTIONS:
        return None
    if projection in {"L", "LL", "RL", "LATERAL"}:
        return "LATERAL"
    view = parse_view(projection) if projection not in {"", "NAN", "UNK"} else ""
    return view or parse_view(values.get("ViewPosition_DICOM"))


def read(table: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    records = []
    for i, values in enumerate(table.to_dict(orient="records")):
        view = view_of(values)
        if view is None:
            ctx.problem("non_chest_projection",
                        f"Projection {str(values.get('Projection'))[:20]!r} is not a frontal or "
                        "lateral chest view; the row is not used", i)
            continue
        labels = empty_labels()
        raw = values.get("Labels")
        try:
            findings = ast.literal_eval(str(raw)) if isinstance(raw, str) else None
            if not isinstance(findings, list | tuple):
                raise ValueError
        except (ValueError, SyntaxError):
            ctx.problem(
                "unknown_label_value",
                f"Labels {raw!r} is not a list like ['cardiomegaly']; labels left unknown",
                i,
            )
        else:
            # PadChest reports every finding it sees: unlisted canonical labels are negative.
            labels = {name: 0.0 for name in LABELS}
            # (a PadChest finding with no ChestX-ray14 counterpart is simply not a label)
            for f in (str(f).strip().lower() for f in findings):
                if f in PADCHEST_SYNONYMS:
                    labels[PADCHEST_SYNONYMS[f]] = 1.0
        image_id = str(values["ImageID"]).strip()
        path = ctx.find_by_name(image_id, i)
        if path is None:
            continue
        records.append(
            {
                "_line": ctx.line(i),
                "path": str(path),
                "patient_id": str(values["PatientID"]),
                "study_id": str(values.get("StudyID", values["PatientID"])),
                "site": ctx.site,
                "sex": parse_sex(values.get("PatientSex_DICOM")),
                "age": _age(values, ctx, i),
                "view": view,
                "manufacturer": str(values.get("Modality_DICOM", "") or ""),
                "split": str(values.get("split", "") or "").strip().lower(),
                **labels,
            }
        )
    return canonical_frame(records)


ADAPTER = Adapter(
    name="padchest",
    signature=frozenset(
        {"ImageID", "PatientID", "Labels", "PatientSex_DICOM", "PatientBirth", "StudyDate_DICOM",
         "ViewPosition_DICOM"}
    ),
    read=read,
    description="PadChest PADCHEST_chest_x_ray_images_labels_160K.csv",
)
