"""What every manifest adapter shares: the canonical row, the read context, small parsers."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.labels import LABELS, UncertainPolicy
from common.problems import Problem

# The canonical manifest: one row per image. Label columns hold 1.0 / 0.0 / NaN. Optional
# reader columns are named "reader<k>/<Label>" and "adjudicated/<Label>".
META_COLUMNS: tuple[str, ...] = (
    "path",
    "patient_id",
    "study_id",
    "site",
    "sex",
    "age",
    "view",
    "manufacturer",
    "split",
)
CANONICAL_COLUMNS: tuple[str, ...] = META_COLUMNS + LABELS
READER_RE = re.compile(r"^(reader\d+|adjudicated)/(.+)$")
SPLITS = ("train", "val", "test")


@dataclass
class ReadContext:
    """Everything an adapter may need besides the table itself."""

    manifest: Path
    data_dir: Path
    site: str
    uncertain: dict[str, UncertainPolicy]
    problems: list[Problem] = field(default_factory=list)
    _names: dict[str, Path] | None = None

    def where(self, row_index: int) -> str:
        """``file:line`` for a data row (header is line 1)."""
        return f"{self.manifest.name}:{row_index + 2}"

    def problem(self, code: str, message: str, row_index: int | None = None) -> None:
        where = self.where(row_index) if row_index is not None else str(self.manifest)
        self.problems.append(Problem(code, message, where))

    def find_by_name(self, name: str) -> Path:
        """Locate an image by file name anywhere under the data folder (NIH/PadChest layouts
        spread images over several sub-folders). The folder is scanned once per read."""
        if self._names is None:
            self._names = {}
            for root, _dirs, files in os.walk(self.data_dir):
                for f in files:
                    self._names.setdefault(f, Path(root) / f)
        return self._names.get(name, self.data_dir / name)

    def resolve(self, rel: str) -> Path:
        """Resolve a manifest path relative to the data folder, tolerating a leading dataset
        folder name (CheXpert writes ``CheXpert-v1.0-small/train/...``)."""
        p = Path(rel)
        if p.is_absolute():
            return p
        direct = self.data_dir / p
        if direct.exists() or len(p.parts) < 2:
            return direct
        stripped = self.data_dir / Path(*p.parts[1:])
        return stripped if stripped.exists() else direct


@dataclass(frozen=True)
class Adapter:
    """One manifest format. ``signature`` columns identify it; ``read`` maps it to canonical
    rows (a DataFrame with CANONICAL_COLUMNS plus optional reader columns)."""

    name: str
    signature: frozenset[str]
    read: Callable[[pd.DataFrame, ReadContext], pd.DataFrame]
    description: str = ""
    any_of: frozenset[str] = frozenset()  # at least one of these must be present too

    def missing(self, columns: set[str]) -> list[str]:
        """Columns this format needs that the table lacks (empty list: it matches)."""
        missing = sorted(self.signature - columns)
        if self.any_of and not (self.any_of & columns):
            missing.append(" or ".join(sorted(self.any_of)))
        return missing


def parse_sex(raw: object) -> str:
    text = "" if raw is None else str(raw).strip().upper()
    if text in {"M", "MALE"}:
        return "M"
    if text in {"F", "FEMALE"}:
        return "F"
    return ""


_AGE_RE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_AGE_UNIT = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def parse_age(raw: object) -> float:
    """Years from a number or a DICOM age string (``045Y``, ``006M``, ``010W``, ``003D``).

    Raises ValueError for anything else, so the caller can report the row.
    """
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return math.nan
    if isinstance(raw, int | float):
        return float(raw)
    text = str(raw).strip().upper()
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        pass
    m = _AGE_RE.match(text)
    if not m:
        raise ValueError(text)
    return round(int(m.group(1)) * _AGE_UNIT[m.group(2)], 3)


def parse_view(raw: object) -> str:
    text = "" if raw is None else str(raw).strip().upper()
    if text in {"PA", "POSTERO_ANTERIOR", "PA_HORIZONTAL"}:
        return "PA"
    if text.startswith("AP"):
        return "AP"
    if text in {"LATERAL", "LL", "RL", "L", "LAT", "LLD", "RLD"}:
        return "LATERAL"
    return ""


def age_or_problem(raw: object, ctx: ReadContext, i: int) -> float:
    try:
        return parse_age(raw)
    except ValueError:
        ctx.problem("bad_age", f"age {raw!r} is not a number or DICOM age string", i)
        return math.nan


def empty_labels() -> dict[str, float]:
    return {name: math.nan for name in LABELS}


def canonical_frame(records: list[dict]) -> pd.DataFrame:
    """Build a canonical DataFrame from records, in canonical column order (+ extra columns)."""
    frame = pd.DataFrame.from_records(records)
    for col in CANONICAL_COLUMNS:
        if col not in frame.columns:
            frame[col] = math.nan if col in LABELS or col == "age" else ""
    extra = [c for c in frame.columns if c not in CANONICAL_COLUMNS]
    frame = frame[list(CANONICAL_COLUMNS) + extra]
    for col in LABELS:
        frame[col] = frame[col].astype("float64")
    frame["age"] = frame["age"].astype("float64")
    return frame
