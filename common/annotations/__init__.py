"""Reader calls, adjudicated labels and boxes from the public datasets' own files, joined to
a site's canonical rows.

The files sit beside the label manifest (recognised from their columns, like manifests) or
are named (``--readers`` / ``--boxes``, node-config keys ``readers`` / ``boxes``). Joined,
reader calls become the canonical ``reader<k>/<Label>`` columns and adjudicated labels
``adjudicated/<Label>`` (NaN where a reader did not read the image), and boxes a table keyed
by the row's path (original pixels; ``common.cache`` maps them into the cache's pixels).
See the table in ``common.labels`` for how each dataset's findings map.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.annotations.formats import (
    FORMATS,
    Annotations,
    detect,
    image_key,
    reader_names,
)
from common.errors import FedcxrError
from common.problems import Problem

BOX_COLUMNS = ("path", "label", "x0", "y0", "x1", "y1", "reader")

__all__ = ["BOX_COLUMNS", "FORMATS", "Annotations", "Joined", "find_annotations", "join",
           "read_annotations"]


def read_annotations(path: Path) -> Annotations:
    """Parse one annotation file (format from its columns); unreadable or unrecognised is an
    ``FedcxrError`` naming the file."""
    from common.manifest import read_csv

    table, problems = read_csv(Path(path))
    return _parse(Path(path), table, problems)


def _parse(path: Path, table: pd.DataFrame, problems: list[Problem]) -> Annotations:
    fmt = detect(set(table.columns))
    if fmt is None:
        names = ", ".join(f"{f.name} ({', '.join(sorted(f.signature))})" for f in FORMATS)
        raise FedcxrError(f"{path}: not a reader or box file of a known format; the columns "
                          f"must include those of one of: {names}")
    ann = fmt.read(table, Path(path))
    ann.problems[:0] = problems
    return ann


def find_annotations(data_dir: Path, manifest: Path | None, named: list[Path]
                     ) -> tuple[list[Annotations], list[Problem]]:
    """Every CSV beside the manifest (top level of the data folder) whose columns are an
    annotation format, and the ``named`` files (which must be one). A file that cannot be
    read is a problem, not the end of the run."""
    from common.manifest import read_csv

    problems: list[Problem] = []
    found: list[Annotations] = []
    folder = Path(manifest).parent if manifest else Path(data_dir)
    named_set = {Path(p).resolve() for p in named}
    seen = {Path(manifest).resolve()} if manifest is not None else set()
    for path in [*sorted(folder.glob("*.csv")), *map(Path, named)]:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        must = path.resolve() in named_set
        try:
            try:
                table, read_problems = read_csv(path)
            except FedcxrError:
                if must:
                    raise
                continue  # not a table at all: not an annotation file either
            if not must and detect(set(table.columns)) is None:
                continue
            found.append(_parse(path, table, read_problems))
        except FedcxrError as exc:
            problems.append(Problem("unreadable_annotations", str(exc).split("\n")[0],
                                    str(path)))
        except OSError as exc:
            if must:
                problems.append(Problem("unreadable_annotations",
                                        f"{path}: cannot read ({exc.strerror})", str(path)))
    return found, problems


@dataclass
class Joined:
    """Rows with reader / adjudicated columns, the boxes of those rows, and what did not
    join."""

    rows: pd.DataFrame
    boxes: pd.DataFrame
    files: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def join(rows: pd.DataFrame, annotations: list[Annotations]) -> Joined:
    """Attach every file's calls, adjudications and boxes to the rows whose image they name.
    An annotation naming no row, or a row's key shared by several images, is a problem."""
    rows = rows.copy()
    counts: Counter[str] = Counter()
    owner: dict[str, int] = {}
    for i, p in zip(rows.index, rows["path"], strict=True):
        parts = Path(image_key(str(p))).parts
        for k in range(1, min(len(parts), 5) + 1):  # "name", "folder/name", ...
            key = "/".join(parts[-k:])
            counts[key] += 1
            owner[key] = i
    where = {k: owner[k] for k, n in counts.items() if n == 1}
    problems = [p for a in annotations for p in a.problems]
    box_rows: list[tuple] = []
    columns: dict[str, np.ndarray] = {}

    def column(name: str) -> np.ndarray:
        if name not in columns:  # a canonical manifest may have the column already
            columns[name] = (rows[name].to_numpy(dtype=float).copy() if name in rows
                             else np.full(len(rows), np.nan))
        return columns[name]

    for ann in annotations:
        missed: list[str] = []

        def at(key: str, missed: list[str] = missed) -> int | None:
            i = where.get(key)
            if i is None:
                missed.append(key)
                return None
            return rows.index.get_loc(i)

        names = reader_names(sorted({r for _, r, _, _ in ann.calls}))
        for key, reader, label, value in ann.calls:
            if (i := at(key)) is not None:
                column(f"{names[reader]}/{label}")[i] = value
        for key, label, value in ann.adjudicated:
            if (i := at(key)) is not None:
                col = column(f"adjudicated/{label}")
                if np.isnan(col[i]):  # the first file that adjudicates an image wins
                    col[i] = value
        for key, label, x0, y0, x1, y1, reader in ann.boxes:
            if (i := at(key)) is not None:
                box_rows.append((rows.iloc[i]["path"], label, x0, y0, x1, y1,
                                 names.get(reader, reader)))
        shared = [k for k in dict.fromkeys(missed) if k in counts]
        unknown = [k for k in dict.fromkeys(missed) if k not in counts]
        if unknown:
            problems.append(Problem(
                "annotation_unmatched", f"{len(unknown)} image(s) annotated here are not "
                f"usable rows of the manifest (e.g. {', '.join(unknown[:3])}); their "
                "annotations are not used", str(ann.path)))
        if shared:
            problems.append(Problem(
                "annotation_ambiguous", f"{len(shared)} annotated image name(s) belong to "
                f"several manifest rows (e.g. {', '.join(shared[:3])}); give the images "
                "distinct file names", str(ann.path)))
    for name in sorted(columns):
        rows[name] = columns[name]
    boxes = pd.DataFrame(box_rows, columns=list(BOX_COLUMNS))
    return Joined(rows, boxes, [str(a.path) for a in annotations], problems)
