"""Map a picklable function over items on all cores, in order, with a progress callback.

Ctrl-C (or the consumer stopping early) ends the workers at once: nothing more is sent and
running workers are terminated, so an interrupted ``site prepare`` returns in about a second
instead of finishing every queued file first (or hanging on a stuck decoder). Workers ignore
SIGINT themselves; the parent decides when they stop.

Why not ``concurrent.futures.ProcessPoolExecutor``: a worker terminated while it writes a
result leaves half a message in the pool's shared result pipe, the pool's manager thread
waits for the rest for ever, and the interpreter's exit joins that thread, so the process
never exits (CPython 3.11; ``tests/test_parallel.py`` reproduces it). Here each worker has a
pipe of its own and the parent has no threads: a killed worker's pipe is closed, never read
again, and nothing is left to join.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

SERIAL_BELOW = 32  # a process pool costs more than it saves on a handful of files
CHUNK = 8  # items per message: fewer round trips, still an even spread over workers


class WorkerDied(RuntimeError):
    """A worker process ended without answering (killed, out of memory, a crashing decoder)."""


def _worker(fn: Callable, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent went away
            return
        if job is None:
            return
        index, chunk = job
        try:
            reply = (index, [fn(x) for x in chunk], None)
        except BaseException as exc:  # noqa: BLE001 - the parent re-raises it
            reply = (index, None, exc)
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable result or exception: say what it was
            text = "".join(traceback.format_exception(exc))
            conn.send((index, None, RuntimeError(f"a worker could not send its reply:\n{text}")))


class _Pool:
    """Worker processes, one duplex pipe each; chunks go to whichever worker is free."""

    def __init__(self, fn: Callable, workers: int) -> None:
        ctx = mp.get_context()
        self.procs: dict[Connection, mp.process.BaseProcess] = {}
        for _ in range(workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(fn, theirs), daemon=True)
            proc.start()
            theirs.close()
            self.procs[mine] = proc

    def stop(self, *, graceful: bool) -> None:
        """Graceful: ask each worker to finish. Otherwise terminate them (not wait)."""
        for conn, proc in self.procs.items():
            if graceful:
                try:
                    conn.send(None)
                except OSError:
                    pass
            elif proc.is_alive():
                proc.terminate()
        for conn, proc in self.procs.items():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


def _pooled(fn: Callable[[T], R], items: Sequence[T], workers: int,
            progress: Callable[[int, int], None] | None) -> Iterator[R]:
    total = len(items)
    chunks = [items[i:i + CHUNK] for i in range(0, total, CHUNK)]
    pool = _Pool(fn, min(workers, len(chunks)))
    busy: dict[Connection, int] = {}
    sent, ready_chunks, next_out, done = 0, {}, 0, 0

    def feed(conn: Connection) -> None:
        nonlocal sent
        if sent < len(chunks):
            conn.send((sent, chunks[sent]))
            busy[conn] = sent
            sent += 1

    graceful = False
    try:
        for conn in pool.procs:
            feed(conn)
        while next_out < len(chunks):
            while next_out in ready_chunks:
                for result in ready_chunks.pop(next_out):
                    done += 1
                    if progress:
                        progress(done, total)
                    yield result
                next_out += 1
            if next_out == len(chunks):
                break
            for conn in wait(list(busy)):
                try:
                    index, results, error = conn.recv()
                except EOFError:
                    code = pool.procs[conn].exitcode
                    raise WorkerDied(f"a worker process ended without answering (exit code "
                                     f"{code}): killed, or out of memory?") from None
                del busy[conn]
                if error is not None:
                    raise error
                ready_chunks[index] = results
                feed(conn)
        graceful = True
    finally:  # Ctrl-C, an error, or the consumer closed the generator: stop at once
        pool.stop(graceful=graceful)


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[R]:
    """``fn`` over ``items``, results in the items' order; ``progress(done, total)`` after
    each. Runs in this process below ``SERIAL_BELOW`` items or with one worker."""
    workers = workers or os.cpu_count() or 1
    if len(items) >= SERIAL_BELOW and workers > 1:
        yield from _pooled(fn, items, workers, progress)
        return
    total = len(items)
    for done, item in enumerate(items, 1):
        result = fn(item)
        if progress:
            progress(done, total)
        yield result
