"""Label manifests of any supported format -> canonical rows.

One adapter per format (``nih``, ``chexpert``, ``mimic``, ``padchest``, ``dicom``,
``canonical``), each a small module behind ``ADAPTERS``. The format is detected from the
columns unless given. Bad rows become ``Problem``s; good rows always come through.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.errors import ManifestError, UnreadableManifest
from common.labels import UncertainPolicy, parse_uncertain_policy
from common.manifest import canonical, chexpert, dicom_folder, mimic, nih, padchest
from common.manifest.base import (
    CANONICAL_COLUMNS,
    META_COLUMNS,
    READER_RE,
    SPLITS,
    Adapter,
    ReadContext,
    patient_ref,
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
    # boxes of the rows' images, original pixels (common.annotations.BOX_COLUMNS); None: none
    boxes: pd.DataFrame | None = None
    annotation_files: list[str] = field(default_factory=list)


def read_csv(path: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Read a CSV as strings, row by row, so one bad row costs that row and no more.

    Not UTF-8? Read as Latin-1 and say so (rows are kept). A row with more or fewer fields
    than the header is a ``ragged_row`` problem naming its line; fields past the header that
    are all empty (Excel's trailing ``,,,,``) are dropped, and all-empty rows are skipped.
    ``table.attrs["lines"]`` holds each row's line in the file (for problem locations)."""
    problems: list[Problem] = []
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            raise UnreadableManifest(f"{path}: not a regular file (a FIFO, device or folder); "
                                     "give a CSV file")
        data = Path(path).read_bytes()
    except PermissionError as exc:
        raise UnreadableManifest(f"{path}: no permission to read the manifest; grant the "
                                 "site's user read access") from exc
    except OSError as exc:
        raise UnreadableManifest(f"{path}: cannot read the manifest ({exc.strerror})") from exc
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
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if header is None:
                raise UnreadableManifest(f"{path}:{start}: the header row is not readable "
                                         f"CSV ({exc}); check the delimiter") from exc
            problems.append(Problem("ragged_row", f"not readable CSV ({exc}); row skipped",
                                    f"{Path(path).name}:{start}"))
            continue
        if not any(f.strip() for f in fields):
            continue  # an all-empty row (Excel leaves them after the data)
        if header is None:
            header = _header(fields)
            continue
        if len(fields) > len(header) and not any(f.strip() for f in fields[len(header):]):
            fields = fields[:len(header)]
        if len(fields) != len(header):
            problems.append(Problem(
                "ragged_row", f"{len(fields)} fields where the header has {len(header)}; "
                "row skipped (a stray comma or an unquoted comma in a value?)",
                f"{Path(path).name}:{start}"))
            continue
        rows.append(fields)
        lines.append(start)
    if header is None:
        raise ManifestError(f"{path}: the manifest is empty; export it again with a header row")
    table = pd.DataFrame(rows, columns=header, dtype=str)
    table.attrs["lines"] = lines
    return table, problems


def _header(fields: list[str]) -> list[str]:
    """Column names as pandas would give them: stripped, empty ones ``Unnamed: k``, repeated
    ones numbered (NIH's BBox file ends in empty columns)."""
    names: list[str] = []
    for k, raw in enumerate(fields):
        name = raw.strip() or f"Unnamed: {k}"
        base, n = name, 1
        while name in names:
            name, n = f"{base}.{n}", n + 1
        names.append(name)
    return names


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
    unreadable: list[str] = []
    for manifest in sorted(data_dir.glob("*.csv")):
        try:
            table, _ = read_csv(manifest)
            detect_format(set(table.columns), manifest)
        except UnreadableManifest as exc:
            unreadable.append(str(exc))
            continue
        except ManifestError:
            continue
        found.append(manifest)
    # MIMIC ships its labels CSV beside the metadata; the metadata file is the manifest.
    if any(p.name.endswith("metadata.csv") for p in found):
        found = [p for p in found if "chexpert" not in p.name and "negbio" not in p.name]
    if len(found) == 1:
        return found[0]
    if not found:
        why = f" ({unreadable[0]})" if unreadable else ""
        raise ManifestError(
            f"{data_dir}: no recognised manifest CSV here{why}; pass --manifest FILE "
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
            f"image {Path(rows.at[i, 'path']).name} already listed on line "
            f"{rows.at[first, '_line']}; this row is ignored",
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
            lines = ", ".join(f"{s} on line {rows.at[i, '_line']}"
                              for s in distinct for i in splits.index[splits == s][:3])
            ctx.problem(
                "patient_in_two_splits",
                f"{patient_ref(patient)} is in splits {', '.join(distinct)} ({lines}); "
                f"all their rows are put in {distinct[0]!r}",
                int(splits.index[0]),
            )
        rows.loc[rows["patient_id"] == patient, "split"] = distinct[0]
    return rows


def _confine(rows: pd.DataFrame, ctx: ReadContext, allow_outside: bool) -> pd.DataFrame:
    """Every path must resolve (symlinks followed) inside the data folder: a manifest row
    with ``../``, an absolute path or a symlink out of the folder would have the site read,
    and cache, files that are not its cohort's (``/etc/shadow`` was opened in a trial)."""
    if allow_outside or not len(rows):
        return rows
    root = os.path.realpath(ctx.data_dir)
    keep = []
    for line, path in zip(rows["_line"], rows["path"], strict=True):
        real = os.path.realpath(path)
        inside = real == root or real.startswith(root.rstrip(os.sep) + os.sep)
        if not inside:
            ctx.problems.append(Problem(
                "outside_data_dir", f"{Path(path).name} resolves outside the data folder; "
                "the row is not used (--allow-outside to permit it)",
                f"{ctx.manifest.name}:{line}"))
        keep.append(inside)
    return rows[keep]


def _own_patients(rows: pd.DataFrame, ctx: ReadContext) -> pd.DataFrame:
    """A row without a patient id is its own patient (a stable id from its path), with one
    warning: lumping them into one "" patient would make a giant patient, or worse, split
    nothing by patient."""
    blank = rows["patient_id"].astype(str).str.strip().isin(["", "nan"])
    if blank.any():
        rows.loc[blank, "patient_id"] = [
            "img-" + hashlib.sha256(p.encode()).hexdigest()[:12] for p in rows.loc[blank, "path"]]
        lines = ", ".join(str(v) for v in rows.loc[blank, "_line"][:3])
        ctx.problems.append(Problem(
            "missing_patient_id", f"{int(blank.sum())} row(s) have no patient id (lines {lines}"
            f"{', ...' if blank.sum() > 3 else ''}); each such image counts as its own patient",
            str(ctx.manifest)))
    return rows


def read_manifest(
    manifest: Path,
    data_dir: Path | None = None,
    *,
    format: str | None = None,
    site: str = "",
    uncertain: str | dict[str, UncertainPolicy] | None = None,
    allow_outside: bool = False,
) -> ManifestResult:
    """Read any supported manifest into canonical rows (paths resolved against ``data_dir``,
    and kept inside it unless ``allow_outside``)."""
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
    try:
        policy = (uncertain if isinstance(uncertain, dict)
                  else parse_uncertain_policy(uncertain))
    except ValueError as exc:
        raise ManifestError(f"--uncertain {uncertain!r}: {exc}") from exc
    ctx = ReadContext(
        manifest=manifest,
        data_dir=data_dir,
        site=site or data_dir.name,
        uncertain=policy,
        problems=problems,
        lines=table.attrs.get("lines"),
    )
    rows = adapter.read(table, ctx)
    if "_line" not in rows.columns:
        rows["_line"] = [ctx.line(i) for i in range(len(rows))]
    rows = _confine(rows, ctx, allow_outside).reset_index(drop=True)
    rows = _own_patients(rows, ctx)
    ctx.lines = [int(v) for v in rows["_line"]]  # from here on, row i of ``rows``
    rows = _drop_duplicates(rows, ctx)
    rows = _reconcile_splits(rows.copy(), ctx).reset_index(drop=True)
    rows = rows.drop(columns="_line")
    return ManifestResult(
        rows=rows.reset_index(drop=True),
        format=adapter.name,
        manifest=manifest,
        rows_read=len(table),
        problems=ctx.problems,
    )
