"""A folder of DICOM files with a sidecar label CSV keyed by ``SOPInstanceUID`` or ``file``.

Labels (and reader columns) come from the sidecar in the canonical column names; patient,
study, sex, age, view and manufacturer come from the DICOM headers themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from common.imaging import is_dicom, read_dicom_header
from common.labels import LABELS
from common.manifest.base import (
    READER_RE,
    Adapter,
    ReadContext,
    age_or_problem,
    canonical_frame,
    parse_sex,
    parse_view,
)
from common.manifest.canonical import binary_cells


def _index_by_uid(data_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for root, _dirs, files in os.walk(data_dir):
        for f in files:
            path = Path(root) / f
            if is_dicom(path):
                header = read_dicom_header(path)
                if header is not None and header.get("SOPInstanceUID"):
                    index[str(header["SOPInstanceUID"])] = path
    return index


def read(table: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    by_uid = _index_by_uid(ctx.data_dir) if "SOPInstanceUID" in table.columns else {}
    label_cols = [c for c in LABELS if c in table.columns]
    reader_cols = [c for c in table.columns if READER_RE.match(c)]
    records = []
    for i, values in enumerate(table.to_dict(orient="records")):
        if "file" in values and str(values["file"]).strip() not in {"", "nan"}:
            path = ctx.resolve(str(values["file"]).strip())
        else:
            uid = str(values.get("SOPInstanceUID", "")).strip()
            path = by_uid.get(uid, ctx.data_dir / f"{uid}.dcm")
        header = read_dicom_header(path) or {}
        record = {
            "_line": ctx.line(i),
            "path": str(path),
            "patient_id": str(header.get("PatientID", "") or path.stem),
            "study_id": str(header.get("StudyInstanceUID", "") or ""),
            "site": ctx.site,
            "sex": parse_sex(header.get("PatientSex")),
            "age": age_or_problem(header.get("PatientAge"), ctx, i),
            "view": parse_view(header.get("ViewPosition")),
            "manufacturer": str(header.get("Manufacturer", "") or ""),
            "split": str(values.get("split", "") or "").strip().lower(),
        }
        record.update(binary_cells(values, label_cols + reader_cols, ctx, i))
        records.append(record)
    return canonical_frame(records)


ADAPTER = Adapter(
    name="dicom",
    signature=frozenset(),
    any_of=frozenset({"SOPInstanceUID", "file"}),
    read=read,
    description="DICOM folder + sidecar labels CSV keyed by SOPInstanceUID or file",
)
