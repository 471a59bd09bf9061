"""The public datasets' reader and box files, each parsed into one shape.

Every parser takes the table as read by ``common.manifest.read_csv`` (strings, a row per
record) and returns an ``Annotations``: reader calls, adjudicated labels and boxes, keyed by
the image's file stem (VinDr's ``image_id`` is ``image_id.dicom``'s stem, RSNA's
``patientId`` the ``.dcm``'s). Boxes are ``(x0, y0, x1, y1)`` in the original image's pixels.
A bad row is a problem naming its line; the other rows come through.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.labels import (
    GOOGLE_EXPERT_COLUMNS,
    MARKER_LABEL,
    NIH_BBOX_FINDINGS,
    RSNA_LABEL,
    VINDR_CLASSES,
    VINDR_EXTRA,
    VINDR_NO_FINDING,
)
from common.problems import Problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def image_key(name: str) -> str:
    """How annotation files and manifest rows meet: the file name without its image suffix
    (with its folders, where the annotation gives them: CheXpert-style file names repeat)."""
    p = Path(str(name).strip().replace("\\", "/"))
    return p.with_suffix("").as_posix() if p.suffix.lower() in IMAGE_SUFFIXES else p.as_posix()


@dataclass
class Annotations:
    """What one annotation file says. ``calls``: (key, reader, label, value 1/0), one per
    label a reader could have called on an image they read; ``adjudicated``: (key, label,
    value); ``boxes``: (key, label, x0, y0, x1, y1, reader)."""

    format: str
    path: Path
    calls: list[tuple[str, str, str, float]] = field(default_factory=list)
    adjudicated: list[tuple[str, str, float]] = field(default_factory=list)
    boxes: list[tuple[str, str, float, float, float, float, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, code: str, message: str, table: pd.DataFrame, i: int) -> None:
        lines = table.attrs.get("lines") or []
        line = lines[i] if i < len(lines) else i + 2
        self.problems.append(Problem(code, message, f"{self.path.name}:{line}"))


def _number(text: object) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        return math.nan
    return value


def _box(ann: Annotations, table: pd.DataFrame, i: int, key: str, label: str,
         x0: object, y0: object, x1: object, y1: object, reader: str = "") -> None:
    """Keep a well-formed box; a malformed one is a ``bad_box`` problem (the call stays)."""
    values = [_number(v) for v in (x0, y0, x1, y1)]
    if not all(math.isfinite(v) for v in values) or values[2] <= values[0] \
            or values[3] <= values[1] or min(values) < 0:
        shown = ", ".join(str(v).strip()[:12] for v in (x0, y0, x1, y1))
        ann.problem("bad_box", f"box ({shown}) of {label} is not a box with x0 < x1, y0 < y1 "
                    "and no negative coordinate; the box is not used", table, i)
        return
    ann.boxes.append((key, label, *values, reader))


def _xywh_box(ann: Annotations, table: pd.DataFrame, i: int, key: str, label: str,
              xywh: tuple[object, object, object, object]) -> None:
    """A box given as corner, width and height (NIH, RSNA): ``_box`` with its far corner;
    a cell that is not a number leaves the far corner unknown, and so a ``bad_box``."""
    x, y, w, h = (_number(v) for v in xywh)
    _box(ann, table, i, key, label, *xywh[:2], x + w, y + h)


def _vindr_label(name: str) -> str | None:
    return VINDR_CLASSES.get(name) or (name if name in VINDR_EXTRA else None)


VINDR_VOCABULARY = tuple(dict.fromkeys([*VINDR_CLASSES.values(), *VINDR_EXTRA]))


def read_vindr(table: pd.DataFrame, path: Path) -> Annotations:
    """VinDr-CXR ``annotations_*.csv``: a row per (image, radiologist, finding); ``No finding``
    rows say the reader saw nothing. A reader who read an image and did not name a finding
    called it absent."""
    ann = Annotations("vindr", path)
    seen: dict[tuple[str, str], set[str]] = {}
    for i, row in enumerate(table.itertuples(index=False)):
        v = dict(zip(table.columns, row, strict=True))
        key, reader = image_key(v["image_id"]), str(v["rad_id"]).strip()
        if not key or not reader:
            ann.problem("bad_annotation", "row without image_id or rad_id; skipped", table, i)
            continue
        found = seen.setdefault((key, reader), set())
        name = str(v["class_name"]).strip()
        if name == VINDR_NO_FINDING:
            continue
        label = _vindr_label(name)
        if label is None:
            ann.problem("unknown_label_value", f"class_name {name!r} is not a VinDr-CXR "
                        "finding; the row is not used", table, i)
            continue
        found.add(label)
        if any(str(v.get(c, "")).strip() for c in ("x_min", "y_min", "x_max", "y_max")):
            _box(ann, table, i, key, label, v["x_min"], v["y_min"], v["x_max"], v["y_max"],
                 reader)
    for (key, reader), found in seen.items():
        ann.calls += [(key, reader, label, float(label in found)) for label in VINDR_VOCABULARY]
    return ann


def read_nih_bbox(table: pd.DataFrame, path: Path) -> Annotations:
    """NIH ChestX-ray14 ``BBox_List_2017.csv``: ``Image Index,Finding Label,Bbox [x,y,w,h]``
    (the header's brackets split it into ``Bbox [x``, ``y``, ``w``, ``h]``; trailing empty
    columns). ``Infiltrate`` is Infiltration. Label ``Marker`` is a burned-in marker."""
    ann = Annotations("nih-bbox", path)
    for i, row in enumerate(table.itertuples(index=False)):
        v = dict(zip(table.columns, row, strict=True))
        name = str(v["Finding Label"]).strip()
        label = MARKER_LABEL if name == MARKER_LABEL else NIH_BBOX_FINDINGS.get(name)
        if label is None:
            ann.problem("unknown_label_value", f"Finding Label {name!r} is not one of the "
                        "BBox list's findings; the row is not used", table, i)
            continue
        _xywh_box(ann, table, i, image_key(v["Image Index"]), label,
                  tuple(v[c] for c in ("Bbox [x", "y", "w", "h]")))
    return ann


_YES_NO = {"YES": 1.0, "NO": 0.0}


def read_google_expert(table: pd.DataFrame, path: Path) -> Annotations:
    """The Google 2019 expert labels for ChestX-ray14 (Majkowska et al.): adjudicated YES/NO
    per image for four findings; blank means not adjudicated."""
    ann = Annotations("google-expert", path)
    for i, row in enumerate(table.itertuples(index=False)):
        v = dict(zip(table.columns, row, strict=True))
        key = image_key(v["Image Index"])
        for column, label in GOOGLE_EXPERT_COLUMNS.items():
            text = str(v.get(column, "")).strip().upper()
            if not text:
                continue
            if text not in _YES_NO:
                ann.problem("unknown_label_value", f"{column} is {text[:12]!r}, not YES or NO;"
                            " left unknown", table, i)
                continue
            ann.adjudicated.append((key, label, _YES_NO[text]))
    return ann


def read_rsna(table: pd.DataFrame, path: Path) -> Annotations:
    """RSNA Pneumonia Detection ``stage_2_train_labels.csv``: a row per box of a
    ``Target=1`` image (blank box for ``Target=0``). The target is the adjudicated
    ``Lung Opacity`` label (an extra reference label: no ChestX-ray14 label matches it)."""
    ann = Annotations("rsna", path)
    target: dict[str, float] = {}
    for i, row in enumerate(table.itertuples(index=False)):
        v = dict(zip(table.columns, row, strict=True))
        key, t = image_key(v["patientId"]), str(v["Target"]).strip()
        if t not in ("0", "1"):
            ann.problem("unknown_label_value", f"Target {t[:12]!r} is not 0 or 1; row skipped",
                        table, i)
            continue
        target[key] = max(target.get(key, 0.0), float(t))
        if t == "1":
            _xywh_box(ann, table, i, key, RSNA_LABEL,
                      tuple(v[c] for c in ("x", "y", "width", "height")))
    ann.adjudicated += [(k, RSNA_LABEL, t) for k, t in target.items()]
    return ann


@dataclass(frozen=True)
class AnnotationFormat:
    name: str
    signature: frozenset[str]
    read: Callable[[pd.DataFrame, Path], Annotations]
    description: str


FORMATS: tuple[AnnotationFormat, ...] = (
    AnnotationFormat("vindr", frozenset({"image_id", "class_name", "rad_id", "x_min", "y_min",
                                         "x_max", "y_max"}), read_vindr,
                     "VinDr-CXR per-reader annotations"),
    AnnotationFormat("nih-bbox", frozenset({"Image Index", "Finding Label", "Bbox [x", "y", "w",
                                            "h]"}), read_nih_bbox,
                     "NIH ChestX-ray14 BBox_List_2017.csv"),
    AnnotationFormat("google-expert", frozenset({"Image Index", *GOOGLE_EXPERT_COLUMNS}),
                     read_google_expert, "Google 2019 expert labels for ChestX-ray14"),
    AnnotationFormat("rsna", frozenset({"patientId", "x", "y", "width", "height", "Target"}),
                     read_rsna, "RSNA Pneumonia Detection labels"),
)
_READER_ID = re.compile(r"^\D*(\d+)$")


def detect(columns: set[str]) -> AnnotationFormat | None:
    """The annotation format whose columns the table has, or None."""
    return next((f for f in FORMATS if f.signature <= columns), None)


def reader_names(ids: list[str]) -> dict[str, str]:
    """Each reader id as a ``reader<k>`` column prefix: the id's own number where every id
    has a distinct one (VinDr's ``R1`` .. ``R17``), else their sorted order."""
    numbers = {r: m.group(1) for r in ids if (m := _READER_ID.match(r))}
    if len(numbers) == len(ids) and len({int(n) for n in numbers.values()}) == len(ids):
        return {r: f"reader{int(n)}" for r, n in numbers.items()}
    return {r: f"reader{k}" for k, r in enumerate(sorted(ids), 1)}
