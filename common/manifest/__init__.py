"""Label manifests of any supported format -> canonical rows.

One adapter per format (``nih``, ``chexpert``, ``mimic``, ``padchest``, ``dicom``,
``canonical``), each a small module behind ``ADAPTERS``. The format is detected from the
columns unless given. Bad rows become ``Problem``s; good rows always come through.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.errors import ManifestError
from common.labels import UncertainPolicy, parse_uncertain_policy
from common.manifest import canonical, chexpert, dicom_folder, mimic, nih, padchest
from common.manifest.base import (
    CANONICAL_COLUMNS,
    META_COLUMNS,
    READER_RE,
    SPLITS,
    Adapter,
    ReadContext,
)
from common.problems import Problem

__all__ = [
    "ADAPTERS",
    "CANONICAL_COLUMNS",
    "META_COLUMNS",
    "READER_RE",
    "ManifestResult",
    "detect_format",
    "find_manifest",
    "read_csv",
    "read_manifest",
]

# Order matters only for ties: the more specific formats come first.
ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        nih.ADAPTER,
        chexpert.ADAPTER,
        mimic.ADAPTER,
        padchest.ADAPTER,
        canonical.ADAPTER,
        dicom_folder.ADAPTER,
    )
}


@dataclass
class ManifestResult:
    """Canonical rows plus everything that was wrong with the manifest's rows."""

    rows: pd.DataFrame
    format: str
    manifest: Path
    rows_read: int
    problems: list[Problem] = field(default_factory=list)


def read_csv(path: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Read a CSV as strings. Not UTF-8? Read it as Latin-1 and say so (rows are kept)."""
    problems: list[Problem] = []
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = data.decode("latin-1")
        problems.append(
            Problem(
                "non_utf8_manifest",
                f"not UTF-8 (byte {exc.start}); read as Latin-1 - save the file as UTF-8",
                str(path),
            )
        )
    if not text.strip():
        raise ManifestError(f"{path}: the manifest is empty; export it again with a header row")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc}); check the delimiter") from exc
    table.columns = [str(c).strip() for c in table.columns]
    return table, problems


def detect_format(columns: set[str], path: Path) -> Adapter:
    """The adapter whose signature the columns satisfy; otherwise name the closest format and
    the columns it is missing."""
    for adapter in ADAPTERS.values():
        if not adapter.missing(columns):
            return adapter

    def overlap(a: Adapter) -> float:
        wanted = a.signature | a.any_of
        return len(wanted & columns) / max(len(wanted), 1)

    closest = max(ADAPTERS.values(), key=overlap)
    missing = ", ".join(closest.missing(columns))
    raise ManifestError(
        f"{path}: columns not recognised; closest format is {closest.name} "
        f"({closest.description}), which also needs: {missing}. "
        "Rename the columns or pass --format."
    )


def find_manifest(data_dir: Path) -> Path:
    """The one recognised manifest in ``data_dir``; an error if there are none or several."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ManifestError(f"{data_dir}: not a folder; give the site's data folder")
    found = []
    for csv in sorted(data_dir.glob("*.csv")):
        try:
            table, _ = read_csv(csv)
            detect_format(set(table.columns), csv)
        except ManifestError:
            continue
        found.append(csv)
    # MIMIC ships its labels CSV beside the metadata; the metadata file is the manifest.
    if any(p.name.endswith("metadata.csv") for p in found):
        found = [p for p in found if "chexpert" not in p.name and "negbio" not in p.name]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ManifestError(
            f"{data_dir}: no recognised manifest CSV here; pass --manifest FILE "
            f"(formats: {', '.join(ADAPTERS)})"
        )
    names = ", ".join(p.name for p in found)
    raise ManifestError(f"{data_dir}: several manifests ({names}); pass --manifest FILE")


def _drop_duplicates(rows: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    dup = rows.duplicated(subset="path", keep="first")
    for i in rows.index[dup]:
        first = rows.index[(rows["path"] == rows.at[i, "path"])][0]
        ctx.problem(
            "duplicate_row",
            f"image {Path(rows.at[i, 'path']).name} already listed on line {first + 2}; "
            "this row is ignored",
            int(i),
        )
    return rows[~dup]


def _reconcile_splits(rows: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    """No patient in two splits. A patient whose given splits differ would leak between
    train and test: report it naming the rows, and put all their rows in the split of their
    first row. A patient with some rows given and some blank: the blank rows take the split
    the given rows have (a hash split could put them elsewhere)."""
    given = rows["split"].isin(SPLITS)
    bad_split = rows.index[(rows["split"] != "") & ~given]
    for i in bad_split:
        ctx.problem(
            "bad_split",
            f"split {rows.at[i, 'split']!r} is not train/val/test; the row is split by patient",
            int(i),
        )
    rows.loc[bad_split, "split"] = ""
    given = rows["split"].isin(SPLITS)
    for patient, splits in rows[given].groupby("patient_id")["split"]:
        distinct = list(dict.fromkeys(splits))
        if len(distinct) > 1:
            lines = ", ".join(f"{s} on line {int(i) + 2}"
                              for s in distinct for i in splits.index[splits == s][:3])
            ctx.problem(
                "patient_in_two_splits",
                f"patient {patient} is in splits {', '.join(distinct)} ({lines}); "
                f"all their rows are put in {distinct[0]!r}",
                int(splits.index[0]),
            )
        rows.loc[rows["patient_id"] == patient, "split"] = distinct[0]
    return rows


def read_manifest(
    manifest: Path,
    data_dir: Path | None = None,
    *,
    format: str | None = None,
    site: str = "",
    uncertain: str | dict[str, UncertainPolicy] | None = None,
) -> ManifestResult:
    """Read any supported manifest into canonical rows (paths resolved against ``data_dir``)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest not found; check --manifest")
    data_dir = Path(data_dir) if data_dir is not None else manifest.parent
    table, problems = read_csv(manifest)
    if len(table) == 0:
        raise ManifestError(f"{manifest}: the manifest has a header but no rows; nothing to use")
    if format is None:
        adapter = detect_format(set(table.columns), manifest)
    elif format not in ADAPTERS:
        raise ManifestError(f"--format {format!r} is not one of {', '.join(ADAPTERS)}")
    else:
        adapter = ADAPTERS[format]
        missing = adapter.missing(set(table.columns))
        if missing:
            raise ManifestError(
                f"{manifest}: format {format} needs columns {', '.join(missing)}; they are absent"
            )
    policy = uncertain if isinstance(uncertain, dict) else parse_uncertain_policy(uncertain)
    ctx = ReadContext(
        manifest=manifest,
        data_dir=data_dir,
        site=site or data_dir.name,
        uncertain=policy,
        problems=problems,
    )
    rows = adapter.read(table, ctx).reset_index(drop=True)
    rows = _drop_duplicates(rows, ctx)
    rows = _reconcile_splits(rows.copy(), ctx).reset_index(drop=True)
    return ManifestResult(
        rows=rows,
        format=adapter.name,
        manifest=manifest,
        rows_read=len(table),
        problems=ctx.problems,
    )
