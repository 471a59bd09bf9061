"""Progress bars for long work (decoding, training) that stay quiet when not on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """Yield ``update(done, total)``; a live bar on a TTY, a line per 25% otherwise."""
    if console.is_terminal:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=console, transient=True,
        ) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return
    last = [-1]

    def update_plain(done: int, total: int) -> None:
        quarter = (4 * done) // max(total, 1)
        if quarter != last[0]:
            last[0] = quarter
            print(f"{description}: {done}/{total}", file=sys.stderr, flush=True)

    yield update_plain
