"""`fedcxr site check|prepare`: what hospital IT runs on their data before joining.

``check`` reads every manifest row and decodes every image (it never stops at the first bad
one), then prints what is usable and what is wrong, grouped by problem code with example paths,
and writes the same as ``check.json``. ``prepare`` builds the cache the trainer reads.
Nothing here imports Flower: a hospital can run it before installing anything else.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from common.annotations import find_annotations, join
from common.atomic import DiskFull
from common.cache import SiteCache, content_hash, duplicate_reason, open_cache, prepare
from common.data import assign_splits
from common.errors import FedcxrError
from common.evaluation.subgroups import age_band
from common.imaging import (
    MAX_IMAGE_MB,
    ImageRejected,
    ImagingOptions,
    decode,
)
from common.labels import LABELS
from common.manifest import READER_RE, ManifestResult, find_manifest, read_manifest
from common.parallel import parallel_map
from common.problems import Problem, group_problems
from common.progress import progress_bar

PROBLEM_ROWS = "problem_rows"


@dataclass(frozen=True)
class SiteSource:
    """Where a site's data is and how to read it."""

    data_dir: Path
    manifest: Path | None = None
    format: str | None = None
    uncertain: str | None = None
    site: str = ""
    allow_outside: bool = False  # data paths may resolve outside data_dir (site's opt-in)
    max_image_mb: float = MAX_IMAGE_MB  # the pixel budget of one file (see common.imaging)
    annotations: tuple[Path, ...] = ()  # reader / box files (default: found beside manifest)

    def read(self) -> ManifestResult:
        """The manifest's canonical rows, joined with the site's reader and box files."""
        manifest = self.manifest or find_manifest(self.data_dir)
        result = read_manifest(manifest, self.data_dir, format=self.format, site=self.site,
                               uncertain=self.uncertain, allow_outside=self.allow_outside)
        found, problems = find_annotations(self.data_dir, manifest, list(self.annotations))
        result.problems.extend(problems)
        if found:
            joined = join(result.rows, found)
            result.rows, result.boxes = joined.rows, joined.boxes
            result.annotation_files = joined.files
            result.problems.extend(joined.problems)
        return result


def default_cache_dir(data_dir: Path, size: int) -> Path:
    return Path(data_dir) / ".fedcxr" / f"cache-{size}"


def ensure_cache(source: SiteSource, size: int, cache_dir: Path | None = None) -> SiteCache:
    """Open the site's cache at ``size``, preparing it first when missing or stale."""
    cache_dir = cache_dir or default_cache_dir(source.data_dir, size)
    try:
        cache = open_cache(cache_dir)
        if cache.size == size and cache.complete:
            return cache
    except Exception:  # noqa: BLE001 - any unusable cache is rebuilt
        pass
    cache, _ = run_prepare(source, ImagingOptions(size=size, max_image_mb=source.max_image_mb),
                           cache_dir)
    return cache



@dataclass(frozen=True)
class Inspection:
    """What decoding one file found: its problem (code None: usable), what was worked
    around, the identifying DICOM attributes it fills in, and its content hash."""

    code: str | None
    reason: str = ""
    notes: tuple[tuple[str, str], ...] = ()
    phi: tuple[str, ...] = ()
    content: str = ""


def _inspect(args: tuple[str, ImagingOptions]) -> Inspection:
    """Decode one file fully. Never raises: whatever goes wrong is this file's problem."""
    path, options = args
    try:
        phi: list[str] = []
        notes: list[tuple[str, str]] = []
        try:
            decode(Path(path), options, notes, phi)
            digest = content_hash(path)
        except ImageRejected as exc:
            return Inspection(exc.code, exc.reason, tuple(notes), tuple(phi))
        return Inspection(None, "", tuple(notes), tuple(phi), digest)
    except Exception as exc:  # noqa: BLE001 - the tool never fails on one file
        return Inspection("decoder_failed", f"{type(exc).__name__}: {str(exc)[:100]}")


def check(source: SiteSource, options: ImagingOptions | None = None) -> dict:
    """Read and decode everything; return the check.json content."""
    options = options or ImagingOptions()
    result = source.read()
    rows = result.rows
    problems: list[Problem] = list(result.problems)
    usable = np.zeros(len(rows), dtype=bool)
    phi_counter: Counter[str] = Counter()
    jobs = [(p, options) for p in rows["path"]]
    first_copy: dict[str, int] = {}
    with progress_bar(f"checking {source.data_dir.name}") as update:
        for i, found in enumerate(parallel_map(_inspect, jobs, progress=update)):
            path = rows.at[i, "path"]
            code, reason = found.code, found.reason
            if code is None and rows.at[i, "view"] == "LATERAL" and not options.include_laterals:
                code, reason = "lateral", "lateral view (manifest)"
            if code is None:
                j = first_copy.setdefault(found.content, i)
                if j != i:
                    code, reason = "duplicate_image", duplicate_reason(rows, i, j)
            if code is None:
                usable[i] = True
            else:
                problems.append(Problem(code, reason, path))
            problems.extend(Problem(c, m, path) for c, m in found.notes)
            if found.phi:
                phi_counter.update(found.phi)
                problems.append(Problem("phi_in_header",
                                        "header fills in " + ", ".join(found.phi), path))
    good = rows[usable]
    labels = {}
    for name in LABELS:
        col = good[name]
        labels[name] = {
            "positive": int((col == 1).sum()),
            "negative": int((col == 0).sum()),
            "unknown": int(col.isna().sum()),
        }
    splits = assign_splits(good.reset_index(drop=True)) if len(good) else pd.Series([], dtype=str)

    def mix(values) -> dict[str, int]:
        return {str(k) if k else "unknown": int(v) for k, v in Counter(values).most_common()}

    readers, boxes = annotation_summary(good.reset_index(drop=True), result.boxes,
                                        options.size, problems)
    return {
        "site": result.rows["site"].iloc[0] if len(rows) else source.site,
        "data_dir": str(source.data_dir),
        "manifest": str(result.manifest),
        "format": result.format,
        "rows": result.rows_read,
        "usable_images": int(usable.sum()),
        "patients": int(good["patient_id"].nunique()),
        "labels": labels,
        "sex": mix(good["sex"]),
        "age_band": mix(age_band(a) for a in good["age"]),
        "view": mix(good["view"]),
        "manufacturer": mix(good["manufacturer"]),
        "splits": mix(splits),
        "phi_fields": dict(phi_counter),
        "annotation_files": result.annotation_files,
        "readers": readers,
        "boxes": boxes,
        "problems": group_problems(problems),
        # every problem row (check.json lists three examples a code): problems.csv
        PROBLEM_ROWS: [(p.code, p.where, p.message) for p in problems],
    }


def annotation_summary(good: pd.DataFrame, boxes: pd.DataFrame | None, size: int,
                       problems: list[Problem]) -> tuple[dict, dict[str, int]]:
    """check.json's ``readers`` (how many readers, images read, Fleiss' kappa per label) and
    ``boxes`` (usable boxes per label, after following their image into the cache's square;
    a box that falls outside is a problem)."""
    from common.cache import PrepareStats, cache_boxes
    from common.evaluation.readers import (
        fleiss_kappa,
        fleiss_table,
        reader_columns,
        reader_labels,
    )

    prefixes = {c.split("/", 1)[0] for c in good.columns if READER_RE.match(c)
                and not c.startswith("adjudicated/")}
    kappas: dict[str, float | None] = {}
    read = np.zeros(len(good), dtype=bool)
    for label in reader_labels(good):
        cols = reader_columns(good, label)
        if not cols:
            continue
        votes = good[cols].to_numpy(dtype=float)
        read |= np.any(~np.isnan(votes), axis=1)
        table, _ = fleiss_table(votes)
        value = fleiss_kappa(table) if len(table) >= 2 else float("nan")
        kappas[label] = round(value, 4) if np.isfinite(value) else None
    stats = PrepareStats()
    kept = cache_boxes(good, boxes, size, stats)
    problems.extend(stats.box_problems)
    return ({"n_readers": len(prefixes), "images_with_readers": int(read.sum()),
             "fleiss_kappa": kappas},
            {str(k): int(v) for k, v in Counter(kept["label"]).most_common()})


def render_check(report: dict, console: Console) -> None:
    """The human-readable version of check.json."""
    console.print(
        f"[bold]{report['site']}[/]  format={report['format']}  manifest={report['manifest']}\n"
        f"rows read: {report['rows']}   usable images: [bold]{report['usable_images']}[/]   "
        f"patients: {report['patients']}"
    )
    table = Table(title="Labels over usable images", show_lines=False)
    for col in ("label", "positive", "negative", "unknown", "prevalence"):
        table.add_column(col, justify="right" if col != "label" else "left")
    for name, c in report["labels"].items():
        known = c["positive"] + c["negative"]
        prev = f"{c['positive'] / known:.1%}" if known else "-"
        table.add_row(name, str(c["positive"]), str(c["negative"]), str(c["unknown"]), prev)
    console.print(table)
    mix = Table(title="Cohort mix")
    mix.add_column("field")
    mix.add_column("counts")
    for key in ("sex", "age_band", "view", "manufacturer", "splits"):
        mix.add_row(key, ", ".join(f"{k}: {v}" for k, v in report[key].items()))
    console.print(mix)
    readers = report.get("readers") or {}
    if readers.get("n_readers") or report.get("boxes"):
        ann = Table(title="Readers and boxes (" + ", ".join(
            Path(f).name for f in report.get("annotation_files", [])) + ")")
        ann.add_column("label")
        ann.add_column("Fleiss κ", justify="right")
        ann.add_column("boxes", justify="right")
        for label in dict.fromkeys([*readers.get("fleiss_kappa", {}), *report["boxes"]]):
            kappa = readers.get("fleiss_kappa", {}).get(label)
            ann.add_row(label, "-" if kappa is None else f"{kappa:.2f}",
                        str(report["boxes"].get(label, 0)))
        console.print(f"readers: {readers.get('n_readers', 0)}   images with reader calls: "
                      f"{readers.get('images_with_readers', 0)}")
        console.print(ann)
    if report["problems"]:
        probs = Table(title="Problems (good rows were kept)")
        for col in ("code", "count", "what to do", "examples"):
            probs.add_column(col)
        for code, p in report["problems"].items():
            probs.add_row(code, str(p["count"]), p["advice"], "\n".join(p["examples"]))
        console.print(probs)
    if report["phi_fields"]:
        console.print(
            "[yellow]warning:[/] DICOM headers still fill in attributes of the PS3.15 basic "
            "confidentiality profile (names only; no value was read out): "
            + ", ".join(f"{k} ({v} files)" for k, v in report["phi_fields"].items())
            + ". Images never leave the site, but de-identify before any other sharing."
        )
    else:
        console.print("[green]no problems found[/]" if not report["problems"] else "")


def write_check(report: dict, out_dir: Path) -> Path:
    """check.json (the summary) and problems.csv (every problem row, for fixing them all)."""
    path = out_dir / "check.json"
    rows = report.get(PROBLEM_ROWS, [])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v for k, v in report.items() if k != PROBLEM_ROWS},
                                   indent=2))
        pd.DataFrame(rows, columns=["code", "where", "message"]).to_csv(
            out_dir / "problems.csv", index=False)
    except OSError as exc:
        raise FedcxrError(f"{path}: cannot write check.json ({exc.strerror}); pass --out "
                          "with a writable folder") from exc
    return path


def writable_cache(cache_dir: Path, needed_bytes: int, given: bool) -> None:
    """Fail before decoding, in one line, when the cache cannot be written or would not fit
    (a read-only data folder, a full disk, an --image-size far above the images' own)."""
    hint = "pass --cache with a writable folder" if not given else "choose another --cache"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FedcxrError(f"{cache_dir}: cannot write the cache here ({exc.strerror}); "
                          f"{hint}") from exc
    free = shutil.disk_usage(cache_dir).free
    if needed_bytes > free:
        raise DiskFull(f"{cache_dir}: the cache needs about {needed_bytes / 2**30:.1f} GiB "
                       f"and {free / 2**30:.1f} GiB are free; free space, {hint}, or lower "
                       "--image-size")


def run_prepare(source: SiteSource, options: ImagingOptions, cache_dir: Path | None,
                dtype: str = "uint8") -> tuple[SiteCache, dict]:
    result = source.read()
    given = cache_dir is not None
    cache_dir = cache_dir or default_cache_dir(source.data_dir, options.size)
    itemsize = 2 if dtype == "uint16" else 1
    writable_cache(cache_dir, len(result.rows) * options.size**2 * itemsize, given)
    with progress_bar(f"decoding {source.data_dir.name}") as update:
        cache, stats = prepare(result.rows, cache_dir, options, dtype=dtype, progress=update,
                               root=source.data_dir, boxes=result.boxes)
    summary = {
        "cache": str(cache_dir),
        "images": len(cache.index),
        "decoded": stats.decoded,
        "reused": stats.reused,
        "rejected": group_problems(result.problems + stats.rejected),
        "boxes": int(len(cache.boxes)),
        "box_problems": group_problems(stats.box_problems),
    }
    return cache, summary
