"""`fedcxr site check|prepare`: what hospital IT runs on their data before joining.

``check`` reads every manifest row and decodes every image (it never stops at the first bad
one), then prints what is usable and what is wrong, grouped by problem code with example paths,
and writes the same as ``check.json``. ``prepare`` builds the cache the trainer reads.
Nothing here imports Flower: a hospital can run it before installing anything else.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from common.cache import SiteCache, open_cache, prepare
from common.data import assign_splits
from common.evaluation.subgroups import age_band
from common.imaging import (
    ImageRejected,
    ImagingOptions,
    decode,
    is_dicom,
    phi_fields,
    read_dicom_header,
)
from common.labels import LABELS
from common.manifest import ManifestResult, find_manifest, read_manifest
from common.parallel import parallel_map
from common.problems import Problem, group_problems
from common.progress import progress_bar


@dataclass(frozen=True)
class SiteSource:
    """Where a site's data is and how to read it."""

    data_dir: Path
    manifest: Path | None = None
    format: str | None = None
    uncertain: str | None = None
    site: str = ""

    def read(self) -> ManifestResult:
        manifest = self.manifest or find_manifest(self.data_dir)
        return read_manifest(manifest, self.data_dir, format=self.format, site=self.site,
                             uncertain=self.uncertain)


def default_cache_dir(data_dir: Path, size: int) -> Path:
    return Path(data_dir) / ".fedcxr" / f"cache-{size}"


def ensure_cache(source: SiteSource, size: int, cache_dir: Path | None = None) -> SiteCache:
    """Open the site's cache at ``size``, preparing it first when missing or stale."""
    cache_dir = cache_dir or default_cache_dir(source.data_dir, size)
    try:
        cache = open_cache(cache_dir)
        if cache.size == size:
            return cache
    except Exception:  # noqa: BLE001 - any unusable cache is rebuilt
        pass
    cache, _ = run_prepare(source, ImagingOptions(size=size), cache_dir)
    return cache



def _inspect(args: tuple[str, ImagingOptions]) -> tuple[str | None, str, list[str]]:
    """Decode one file fully: (problem code or None, reason, identifying DICOM fields)."""
    path, options = args
    phi: list[str] = []
    if is_dicom(Path(path)):
        header = read_dicom_header(Path(path))
        phi = phi_fields(header) if header else []
    try:
        decode(Path(path), options)
    except ImageRejected as exc:
        return exc.code, exc.reason, phi
    return None, "", phi


def check(source: SiteSource, options: ImagingOptions | None = None) -> dict:
    """Read and decode everything; return the check.json content."""
    options = options or ImagingOptions()
    result = source.read()
    rows = result.rows
    problems: list[Problem] = list(result.problems)
    usable = np.zeros(len(rows), dtype=bool)
    phi_counter: Counter[str] = Counter()
    jobs = [(p, options) for p in rows["path"]]
    with progress_bar(f"checking {source.data_dir.name}") as update:
        for i, (code, reason, phi) in enumerate(parallel_map(_inspect, jobs, progress=update)):
            path = rows.at[i, "path"]
            if code is None and rows.at[i, "view"] == "LATERAL" and not options.include_laterals:
                code, reason = "lateral", "lateral view (manifest)"
            if code is None:
                usable[i] = True
            else:
                problems.append(Problem(code, reason, path))
            if phi:
                phi_counter.update(phi)
                problems.append(Problem("phi_in_header", "header carries " + ", ".join(phi), path))
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
        "problems": group_problems(problems),
    }


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
    if report["problems"]:
        probs = Table(title="Problems (good rows were kept)")
        for col in ("code", "count", "what to do", "examples"):
            probs.add_column(col)
        for code, p in report["problems"].items():
            probs.add_row(code, str(p["count"]), p["advice"], "\n".join(p["examples"]))
        console.print(probs)
    if report["phi_fields"]:
        console.print(
            "[yellow]warning:[/] DICOM headers still carry identifying values: "
            + ", ".join(f"{k} ({v} files)" for k, v in report["phi_fields"].items())
            + ". Images never leave the site, but de-identify before any other sharing."
        )
    else:
        console.print("[green]no problems found[/]" if not report["problems"] else "")


def write_check(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "check.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def run_prepare(source: SiteSource, options: ImagingOptions, cache_dir: Path | None,
                dtype: str = "uint8") -> tuple[SiteCache, dict]:
    result = source.read()
    cache_dir = cache_dir or default_cache_dir(source.data_dir, options.size)
    with progress_bar(f"decoding {source.data_dir.name}") as update:
        cache, stats = prepare(result.rows, cache_dir, options, dtype=dtype, progress=update)
    summary = {
        "cache": str(cache_dir),
        "images": len(cache.index),
        "decoded": stats.decoded,
        "reused": stats.reused,
        "rejected": group_problems(result.problems + stats.rejected),
    }
    return cache, summary
