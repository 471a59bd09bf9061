"""Map a picklable function over items on all cores, in order, with a progress callback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

SERIAL_BELOW = 32  # a process pool costs more than it saves on a handful of files


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[R]:
    workers = workers or os.cpu_count() or 1
    total = len(items)
    if total >= SERIAL_BELOW and workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done, result in enumerate(pool.map(fn, items, chunksize=8), 1):
                if progress:
                    progress(done, total)
                yield result
    else:
        for done, item in enumerate(items, 1):
            result = fn(item)
            if progress:
                progress(done, total)
            yield result
