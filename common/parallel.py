"""Map a picklable function over items on all cores, in order, with a progress callback.

Ctrl-C (or the consumer stopping early) ends the workers at once: queued work is cancelled
and running workers are terminated, so an interrupted ``site prepare`` returns in about a
second instead of finishing every queued file first (or hanging on a stuck decoder). Workers
ignore SIGINT themselves; the parent decides when they stop.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

SERIAL_BELOW = 32  # a process pool costs more than it saves on a handful of files


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and terminate the workers (not wait for them)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


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
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
        try:
            for done, result in enumerate(pool.map(fn, items, chunksize=8), 1):
                if progress:
                    progress(done, total)
                yield result
        except BaseException:  # Ctrl-C, or the consumer closed the generator
            stop_pool(pool)
            raise
        pool.shutdown(wait=True)
    else:
        for done, item in enumerate(items, 1):
            result = fn(item)
            if progress:
                progress(done, total)
            yield result
