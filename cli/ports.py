"""Loopback ports: a free one, and waiting until one accepts connections (or a file is
written: the same deadline-bound poll).

Kept apart from the modules that use it (``cli/simulate.py``, ``cli/wait_run.py``,
``cli/when_up.py``) so that the SuperExec's launcher imports nothing of Flower's CLI.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import FedcxrError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], timeout: float, failure: str, *,
               interval: float = 0.05, check: Callable[[], None] | None = None) -> None:
    """Return once ``ready()`` is true; FedcxrError(``failure``) after ``timeout`` seconds.
    ``check`` runs before each try (it raises when the process that should make ``ready``
    true has died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        if ready():
            return
        time.sleep(interval)
    raise FedcxrError(failure)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def wait_port(port: int, timeout: float, *, what: str = "the SuperLink",
              check: Callable[[], None] | None = None) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; FedcxrError naming ``what`` after
    ``timeout`` seconds. A refused connection costs nothing; a SuperLink opens its port in
    1-3 s."""
    wait_until(lambda: _accepts(port), timeout,
               f"{what} did not open port {port} in {timeout:.0f} s", check=check)


def wait_file(path: Path, timeout: float) -> None:
    """Return once ``path`` is a non-empty file; FedcxrError after ``timeout`` seconds."""
    wait_until(lambda: path.is_file() and path.stat().st_size > 0, timeout,
               f"{path} was not written in {timeout:.0f} s", interval=0.02)
