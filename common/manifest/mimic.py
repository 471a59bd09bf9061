"""MIMIC-CXR-JPG: the ``*-chexpert.csv`` labels joined with ``*-metadata.csv`` on
(subject_id, study_id). The manifest given is the metadata file (one row per image); the
labels file is found beside it."""

from __future__ import annotations

import pandas as pd

from common.errors import ManifestError
from common.manifest.base import Adapter, ReadContext, canonical_frame, parse_view
from common.manifest.chexpert import chexpert_labels


def _labels_file(ctx: ReadContext):
    candidates = sorted(ctx.manifest.parent.glob("*chexpert*.csv")) + sorted(
        ctx.manifest.parent.glob("*negbio*.csv")
    )
    if not candidates:
        raise ManifestError(
            f"{ctx.manifest}: MIMIC-CXR-JPG metadata found but no *-chexpert.csv labels file "
            "beside it; copy mimic-cxr-2.0.0-chexpert.csv into the same folder"
        )
    return candidates[0]


def read(table: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    from common.manifest import read_csv  # late import: the registry imports this module

    labels_path = _labels_file(ctx)
    labels_table, problems = read_csv(labels_path)
    ctx.problems.extend(problems)
    by_study = {
        (str(r["subject_id"]), str(r["study_id"])): r
        for r in labels_table.to_dict(orient="records")
    }
    records = []
    for i, values in enumerate(table.to_dict(orient="records")):
        subject, study = str(values["subject_id"]), str(values["study_id"])
        label_row = by_study.get((subject, study), {})
        dicom_id = str(values["dicom_id"])
        rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
        records.append(
            {
                "_line": ctx.line(i),
                "path": str(ctx.resolve(rel)),
                "patient_id": subject,
                "study_id": study,
                "site": ctx.site,
                "sex": "",
                "age": float("nan"),
                "view": parse_view(values.get("ViewPosition")),
                "manufacturer": "",
                "split": str(values.get("split", "") or "").strip().lower(),
                **chexpert_labels(label_row, ctx, i),
            }
        )
    return canonical_frame(records)


ADAPTER = Adapter(
    name="mimic",
    signature=frozenset({"dicom_id", "subject_id", "study_id", "ViewPosition"}),
    read=read,
    description="MIMIC-CXR-JPG metadata + chexpert labels",
)
