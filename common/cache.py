"""Decode once: every usable image resized into one memory-mapped array, plus an index.

Layout of a cache folder::

    cache.json        settings (size, dtype, preprocessing key) and counts
    images.u8|u16     N x size x size, row i is index row i
    index.csv         canonical rows of the usable images + fingerprint
    rejected.csv      rows that could not be used, with code and reason
    boxes.csv         annotated boxes (row, label, x0, y0, x1, y1, reader) in the cache's
                      pixels: each followed its image through crop, padding and resize

A fingerprint of (path, file size, mtime, preprocessing settings) lets a re-run copy unchanged
images from the old array instead of decoding them again. An interrupted ``prepare`` (Ctrl-C)
writes what it had decoded as a cache marked incomplete (``"complete": false``): a re-run
reuses it and decodes only the rest, and nothing trains on it meanwhile. Each image's content
hash is kept in the index: the same bytes under a second row (another name, another patient)
are rejected as ``duplicate_image``, so one image cannot sit in two splits.
Files are written under temporary
names and renamed, so a crash never leaves a half-written cache that looks valid. Reopening
is a memmap plus a small CSV read: milliseconds, which the per-message ClientApp relies on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xxhash

from common import atomic
from common.errors import FedcxrError
from common.imaging import ImageRejected, ImagingOptions, load
from common.labels import LABELS
from common.manifest.base import READER_RE
from common.parallel import parallel_map
from common.problems import Problem

CACHE_VERSION = 2  # 2: fingerprints relative to the data folder; content hashes
DTYPES = {"uint8": (np.uint8, 255, "images.u8"), "uint16": (np.uint16, 65535, "images.u16")}


def fingerprint(path: str, options: ImagingOptions, root: Path | None = None) -> str:
    """Changes when the file or the preprocessing changes (a missing file has none). The path
    counts relative to the data folder ``root``, so the same archive under another mount
    point (prepared on the host, used in the container) has the same fingerprints."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    key_path = path
    if root is not None:
        rel = os.path.relpath(path, root)
        key_path = path if rel.startswith("..") else rel
    key = f"{key_path}|{st.st_size}|{st.st_mtime_ns}|{options.key()}"
    return hashlib.sha1(key.encode()).hexdigest()


def content_hash(path: str) -> str:
    """A hash of the file's bytes (the same image under two names has one). XXH3-128: the
    duplicates it finds are accidents of an archive, not an adversary's collisions, and at
    0.02 ms for a 512 KB file (SHA-256: 0.36 ms) it costs the happy path nothing."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def _hash_or_none(path: str) -> str | None:
    try:
        return content_hash(path)
    except OSError:
        return None


def _decode_one(args: tuple[str, ImagingOptions, int]
                ) -> tuple[np.ndarray, str] | tuple[str, str]:
    path, options, scale = args
    try:
        img = load(Path(path), options)
        digest = content_hash(path)
    except ImageRejected as exc:
        return exc.code, exc.reason
    except OSError as exc:
        return "unreadable", f"cannot read the file ({exc.strerror})"
    return np.rint(img * scale).astype(np.uint16), digest


@dataclass
class PrepareStats:
    decoded: int = 0
    reused: int = 0
    rejected: list[Problem] = field(default_factory=list)
    box_problems: list[Problem] = field(default_factory=list)  # boxes not kept (image kept)


BOX_FILE_COLUMNS = ["row", "label", "x0", "y0", "x1", "y1", "reader"]


def cache_boxes(index: pd.DataFrame, boxes: pd.DataFrame | None, size: int,
                stats: PrepareStats) -> pd.DataFrame:
    """``boxes`` (by path, original pixels) in cache pixels, by index row. The original size
    comes from each file's header; a box outside the image is a ``box_outside_image``
    problem and is dropped."""
    from common.imaging import box_to_square, image_dimensions

    out: list[tuple] = []
    if boxes is None or not len(boxes):
        return pd.DataFrame(out, columns=BOX_FILE_COLUMNS)
    slot = {p: i for i, p in enumerate(index["path"])}
    dims: dict[str, tuple[int, int] | None] = {}
    for b in boxes.itertuples(index=False):
        if b.path not in slot:
            continue  # the image itself was not usable (its problem is already reported)
        if b.path not in dims:
            dims[b.path] = image_dimensions(Path(b.path))
        wh = dims[b.path]
        mapped = box_to_square((b.x0, b.y0, b.x1, b.y1), *wh, size) if wh else None
        if mapped is None:
            where = f"{wh[0]}x{wh[1]}" if wh else "of unknown size"
            stats.box_problems.append(Problem(
                "box_outside_image", f"{b.label} box ({b.x0:g}, {b.y0:g}, {b.x1:g}, {b.y1:g}) "
                f"is outside the {where} image; the box is not used", b.path))
            continue
        out.append((slot[b.path], b.label, *(round(v, 3) for v in mapped), b.reader))
    return pd.DataFrame(out, columns=BOX_FILE_COLUMNS)


@dataclass
class SiteCache:
    """An opened cache: ``images[i]`` is the image of ``index.iloc[i]``."""

    root: Path
    images: np.ndarray
    index: pd.DataFrame
    meta: dict

    @property
    def boxes(self) -> pd.DataFrame:
        """Annotated boxes in this cache's pixels (``BOX_FILE_COLUMNS``); empty if none."""
        path = self.root / "boxes.csv"
        if not path.is_file():
            return pd.DataFrame(columns=BOX_FILE_COLUMNS)
        return pd.read_csv(path, dtype={"label": str, "reader": str}, keep_default_na=False,
                           na_values={c: [""] for c in ("x0", "y0", "x1", "y1")})

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def scale(self) -> int:
        return int(DTYPES[self.meta["dtype"]][1])

    def labels(self) -> np.ndarray:
        """N x 14 float32 with NaN for unknown."""
        return self.index[list(LABELS)].to_numpy(dtype=np.float32)

    @property
    def complete(self) -> bool:
        """False for what an interrupted prepare kept: reusable, never trained on."""
        return bool(self.meta.get("complete", True))

    @property
    def fingerprint(self) -> str:
        """One hash of every cached image's fingerprint: identifies the data a model saw."""
        return hashlib.sha1("".join(self.index["fingerprint"]).encode()).hexdigest()[:16]


def open_cache(root: Path) -> SiteCache:
    root = Path(root)
    meta_path = root / "cache.json"
    if not meta_path.is_file():
        raise FedcxrError(f"{root}: no prepared cache here; run `fedcxr site prepare` first")
    meta = json.loads(meta_path.read_text())
    dtype, _scale, name = DTYPES[meta["dtype"]]
    n, size = int(meta["count"]), int(meta["size"])
    index = pd.read_csv(root / "index.csv", dtype={"patient_id": str, "study_id": str,
                                                   "content_hash": str},
                        keep_default_na=False, na_values={c: [""] for c in LABELS})
    for col in ("sex", "view", "manufacturer", "split", "site"):
        index[col] = index[col].astype(str).replace("nan", "")
    for col in index.columns:
        if READER_RE.match(col):  # reader calls: 1 / 0 / blank (not read)
            index[col] = pd.to_numeric(index[col].replace("", np.nan), errors="coerce")
    expected = n * size * size * np.dtype(dtype).itemsize
    if len(index) != n or (n and (root / name).stat().st_size != expected):
        raise FedcxrError(f"{root}: cache is incomplete; run `fedcxr site prepare` again")
    if n == 0:
        images = np.zeros((0, size, size), dtype=dtype)
    else:
        images = np.memmap(root / name, dtype=dtype, mode="r", shape=(n, size, size))
    return SiteCache(root=root, images=images, index=index, meta=meta)


def prepare(
    rows: pd.DataFrame,
    cache_dir: Path,
    options: ImagingOptions,
    *,
    dtype: str = "uint8",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    root: Path | None = None,
    boxes: pd.DataFrame | None = None,
) -> tuple[SiteCache, PrepareStats]:
    """Build or refresh the cache for ``rows`` (canonical rows) of the data folder ``root``.
    An image is reused from the old cache when its fingerprint is unchanged, or, failing
    that (a copy with new mtimes, a renamed file), when its bytes are (content hash; read only
    for files the fingerprint missed). Returns the cache opened."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np_dtype, scale, name = DTYPES[dtype]
    stats = PrepareStats()

    old: SiteCache | None = None
    try:
        old = open_cache(cache_dir)
        if old.meta.get("dtype") != dtype or old.size != options.size:
            old = None
    except (FedcxrError, OSError, ValueError, KeyError):
        old = None
    old_slots = {fp: i for i, fp in enumerate(old.index["fingerprint"])} if old else {}

    old_hashes = (dict(zip(old.index["fingerprint"], old.index["content_hash"], strict=True))
                  if old is not None and "content_hash" in old.index else {})
    old_slots = {fp: i for fp, i in old_slots.items() if fp in old_hashes}
    same_options = old is not None and old.meta.get("options") == options.key()
    by_content = ({h: i for i, h in enumerate(old.index["content_hash"])}
                  if same_options and "content_hash" in old.index else {})
    rows = rows.reset_index(drop=True).copy()
    rows["fingerprint"] = [fingerprint(p, options, root) for p in rows["path"]]
    todo: list[int] = []
    kept: list[int] = []
    moved: dict[int, int] = {}  # row -> old slot, found by content
    for i, (path, view, fp) in enumerate(zip(rows["path"], rows["view"], rows["fingerprint"],
                                               strict=True)):
        if not fp:
            stats.rejected.append(Problem("missing_file", "file not found", path))
        elif view == "LATERAL" and not options.include_laterals:
            stats.rejected.append(Problem("lateral", "lateral view (manifest)", path))
        else:
            kept.append(i)
            if fp in old_slots:
                continue
            digest = _hash_or_none(path) if by_content else None
            if digest in by_content:
                moved[i] = by_content[digest]
            else:
                todo.append(i)

    decoded: dict[int, np.ndarray] = {}
    hashes = {i: old_hashes[fp] for i, fp in enumerate(rows["fingerprint"]) if fp in old_slots}
    hashes.update({i: old.index.at[slot, "content_hash"] for i, slot in moved.items()})
    slot_of = {i: moved.get(i, old_slots.get(rows.at[i, "fingerprint"])) for i in kept}
    jobs = [(rows.at[i, "path"], options, scale) for i in todo]
    results = parallel_map(_decode_one, jobs, workers=workers, progress=progress)
    interrupted: BaseException | None = None
    try:
        for i, result in zip(todo, results, strict=True):
            if isinstance(result[0], str):
                stats.rejected.append(Problem(result[0], result[1], rows.at[i, "path"]))
            else:
                decoded[i], hashes[i] = result
    except KeyboardInterrupt as exc:  # keep what was decoded; a re-run continues from it
        interrupted = exc

    usable = [i for i in kept if i in decoded or slot_of[i] is not None]
    usable = _first_copies(usable, rows, hashes, stats)
    # From here on the folder is inconsistent until cache.json is rewritten last: remove it
    # first so a crash leaves "no cache" (rebuilt next time), never a wrong one.
    (cache_dir / "cache.json").unlink(missing_ok=True)
    if usable:
        with atomic.atomic_path(cache_dir / name) as tmp_images:
            out = np.memmap(tmp_images, dtype=np_dtype, mode="w+",
                            shape=(len(usable), options.size, options.size))
            for slot, i in enumerate(usable):
                if i in decoded:
                    out[slot] = decoded[i]
                    stats.decoded += 1
                else:
                    out[slot] = old.images[slot_of[i]]
                    stats.reused += 1
            out.flush()
            del out
    index = rows.iloc[usable].reset_index(drop=True)
    index["content_hash"] = [hashes[i] for i in usable]
    with atomic.atomic_path(cache_dir / "index.csv") as index_tmp:
        index.to_csv(index_tmp, index=False)
    with atomic.atomic_path(cache_dir / "boxes.csv") as boxes_tmp:
        cache_boxes(index, boxes, options.size, stats).to_csv(boxes_tmp, index=False)
    rejected = pd.DataFrame(
        [{"path": p.where, "code": p.code, "reason": p.message} for p in stats.rejected],
        columns=["path", "code", "reason"],
    )
    rejected.to_csv(cache_dir / "rejected.csv", index=False)
    meta = {
        "version": CACHE_VERSION,
        "size": options.size,
        "dtype": dtype,
        "options": options.key(),
        "count": len(usable),
        "rejected": len(stats.rejected),
        "complete": interrupted is None,
    }
    atomic.write_text(cache_dir / "cache.json", json.dumps(meta, indent=2))
    if interrupted is not None:
        raise PrepareInterrupted(stats.decoded + stats.reused, len(kept)) from interrupted
    return open_cache(cache_dir), stats


class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C during prepare, after what was decoded was kept (``kept`` of ``total``)."""

    def __init__(self, kept: int, total: int) -> None:
        super().__init__(f"interrupted: {kept} of {total} images are kept in the cache; run "
                         "the same command again to continue")
        self.kept, self.total = kept, total


def duplicate_reason(rows: pd.DataFrame, i: int, j: int) -> str:
    """Why row i is a duplicate of row j, and the split conflict it would cause (one wording
    for ``site check`` and ``prepare``)."""
    text = f"same bytes as {Path(rows.at[j, 'path']).name}"
    if rows.at[i, "patient_id"] != rows.at[j, "patient_id"]:
        text += " under another patient (the two could land in train and test)"
    elif rows.at[i, "split"] and rows.at[j, "split"] and rows.at[i, "split"] != rows.at[j, "split"]:
        text += f" in split {rows.at[i, 'split']} (the first is in {rows.at[j, 'split']})"
    return text + "; only the first is used"


def _first_copies(usable: list[int], rows: pd.DataFrame, hashes: dict[int, str],
                  stats: PrepareStats) -> list[int]:
    """Drop every later row whose image bytes equal an earlier row's (``duplicate_image``)."""
    first: dict[str, int] = {}
    out = []
    for i in usable:
        j = first.setdefault(hashes[i], i)
        if j == i:
            out.append(i)
            continue
        stats.rejected.append(Problem("duplicate_image", duplicate_reason(rows, i, j),
                                      rows.at[i, "path"]))
    return out
