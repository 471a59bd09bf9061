"""Atomic file writes: write beside the target, then rename over it.

A reader (or a process that crashes and restarts) sees either the old file or the new one,
never half of one. One helper for every file the project rewrites in place: checkpoints,
caches, results, metrics, stored scores. A full disk is the user's to fix, so it comes out
as one line naming the file (``DiskFull``), never as a half-written file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import FedcxrError

# What a write on a full disk, or over the user's quota, fails with.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFull(FedcxrError):
    """A write failed for want of space; the file it was writing is left as it was."""


@contextmanager
def atomic_path(path: Path | str, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (fsynced
    first when asked), on error it is removed and ``path`` is untouched; a full disk raises
    ``DiskFull`` (the temporary file removed first, which frees what it took)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise DiskFull(f"{path}: no space left on its disk to write it ({exc.strerror}); "
                           "free space there (or write somewhere else) and run again") from exc
        raise


def write_text(path: Path | str, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
