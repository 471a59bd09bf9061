"""Loopback ports: a free one, and waiting until one accepts connections.

Kept apart from the modules that use it (``cli/simulate.py``, ``cli/wait_run.py``,
``cli/when_up.py``) so that the SuperExec's launcher imports nothing of Flower's CLI.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

from common.errors import FedcxrError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, *, what: str = "the SuperLink",
              check: Callable[[], None] | None = None) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; FedcxrError naming ``what`` after
    ``timeout`` seconds. ``check`` runs before each try (it raises when the process that
    should open the port has died). A refused connection costs nothing; a SuperLink opens
    its port in 1-3 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise FedcxrError(f"{what} did not open port {port} in {timeout:.0f} s")
