"""PadChest: ``Labels`` is a Python-list string of findings; age from birth year and study
date. Findings map to the 14 labels through ``common.labels.PADCHEST_SYNONYMS``."""

from __future__ import annotations

import ast
import math

import pandas as pd

from common.labels import LABELS, PADCHEST_SYNONYMS
from common.manifest.base import (
    Adapter,
    ReadContext,
    canonical_frame,
    empty_labels,
    parse_sex,
    parse_view,
)


def _age(values: dict) -> float:
    try:
        birth = int(float(values.get("PatientBirth")))
        year = int(str(values.get("StudyDate_DICOM"))[:4])
    except (TypeError, ValueError):
        return math.nan
    return float(year - birth)


def read(table: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    records = []
    for i, values in enumerate(table.to_dict(orient="records")):
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
        records.append(
            {
                "path": str(ctx.find_by_name(image_id)),
                "patient_id": str(values["PatientID"]),
                "study_id": str(values.get("StudyID", values["PatientID"])),
                "site": ctx.site,
                "sex": parse_sex(values.get("PatientSex_DICOM")),
                "age": _age(values),
                "view": parse_view(values.get("ViewPosition_DICOM")),
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
