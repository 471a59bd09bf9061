"""What every manifest adapter shares: the canonical row, the read context, small parsers."""

from __future__ import annotations

import hashlib
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
    # The file line of each table row (rows can span lines, and ragged or empty rows are
    # skipped, so row i is not always line i + 2).
    lines: list[int] | None = None
    _names: dict[str, list[Path]] | None = None
    _unreadable: list[str] = field(default_factory=list)

    def line(self, row_index: int) -> int:
        if self.lines is not None and 0 <= row_index < len(self.lines):
            return self.lines[row_index]
        return row_index + 2

    def where(self, row_index: int) -> str:
        """``file:line`` for a data row (header is line 1)."""
        return f"{self.manifest.name}:{self.line(row_index)}"

    def problem(self, code: str, message: str, row_index: int | None = None) -> None:
        where = self.where(row_index) if row_index is not None else str(self.manifest)
        self.problems.append(Problem(code, message, where))

    def _scan(self) -> dict[str, list[Path]]:
        if self._names is None:
            self._names = {}

            def unreadable(exc: OSError) -> None:
                where = os.path.relpath(exc.filename, self.data_dir) if exc.filename else "?"
                self._unreadable.append(where)
                self.problems.append(Problem(
                    "permission_denied", f"folder {where} cannot be read ({exc.strerror}); "
                    "its images are not listed", str(self.data_dir)))

            for root, dirs, files in os.walk(self.data_dir, onerror=unreadable):
                dirs.sort()
                for f in sorted(files):
                    self._names.setdefault(f, []).append(Path(root) / f)
        return self._names

    def find_by_name(self, name: str, row_index: int) -> Path | None:
        """Locate an image by file name anywhere under the data folder (NIH/PadChest layouts
        spread images over several sub-folders). The folder is scanned once per read. A name
        that is a relative path is taken as given. None (and a problem for the row) when
        several files have the name (a stale copy must not win silently) or when it is not
        found but some folder could not be read."""
        if "/" in name or "\\" in name:
            return self.resolve(name)
        copies = self._scan().get(name, [])
        if len(copies) > 1:
            shown = ", ".join(os.path.relpath(c, self.data_dir) for c in copies[:3])
            more = f" and {len(copies) - 3} more" if len(copies) > 3 else ""
            example = os.path.relpath(copies[0], self.data_dir)
            self.problem("ambiguous_file", f"{len(copies)} files are named {name} ({shown}"
                         f"{more}); write the row's path, e.g. {example}", row_index)
            return None
        if copies:
            return copies[0]
        if self._unreadable:
            self.problem("permission_denied", f"{name} was not found, and folder(s) "
                         f"{', '.join(self._unreadable[:3])} could not be read: it may be there",
                         row_index)
            return None
        return self.data_dir / name

    def resolve(self, rel: str) -> Path:
        """Resolve a manifest path relative to the data folder, tolerating a leading dataset
        folder name (CheXpert writes ``CheXpert-v1.0-small/train/...``)."""
        p = Path(rel)
        if p.is_absolute():
            return p
        direct = self.data_dir / p
        if _exists(direct) or len(p.parts) < 2:
            return direct
        stripped = self.data_dir / Path(*p.parts[1:])
        return stripped if _exists(stripped) else direct


def _exists(path: Path) -> bool:
    """Whether something is there; a path that cannot be examined (permission) counts as
    there, so the decoder reports *why* it cannot be read instead of "not found"."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def patient_ref(patient_id: str) -> str:
    """How a patient is named in check.json and logs: a hash prefix, never the id itself."""
    return "patient#" + hashlib.sha256(str(patient_id).encode()).hexdigest()[:8]


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
    if text in {"PA", "POSTERO_ANTERIOR", "POSTEROANTERIOR", "PA_HORIZONTAL"}:
        return "PA"
    if text.startswith("AP") or text in {"ANTEROPOSTERIOR", "ANTERO_POSTERIOR"}:
        return "AP"
    if text in {"LATERAL", "LL", "RL", "L", "LAT", "LLD", "RLD"}:
        return "LATERAL"
    return ""


MAX_AGE = 120.0


def age_or_problem(raw: object, ctx: ReadContext, i: int) -> float:
    try:
        age = parse_age(raw)
    except ValueError:
        ctx.problem("bad_age", f"age {str(raw)[:20]!r} is not a number or DICOM age string", i)
        return math.nan
    if not math.isnan(age) and not 0 <= age <= MAX_AGE:
        ctx.problem("bad_age", f"age {str(raw)[:20]!r} is outside 0-{MAX_AGE:g} years; "
                    "left unknown", i)
        return math.nan
    return age


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
