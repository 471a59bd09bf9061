"""Run a console entry point once a local port accepts connections, its imports done before.

    python -m cli.when_up PORT [--file PATH] MODULE:FUNCTION [ARG ...]

``fedcxr simulate`` starts Flower's SuperExec this way beside the SuperLink it serves. The
SuperLink started it only once up itself (``--isolation subprocess``); the SuperExec then
imported Flower (about 2 s of CPU) before it could hand the run to the simulation, and the
run waited for that. Here the import happens while the SuperLink starts, on the core the
SuperLink leaves idle, and the SuperExec's first request finds the SuperLink up: Flower's
retry after a refused connection backs off for a second or more. ``--file``: also wait
until PATH is a non-empty file (the run's waiter writes the run's id there once submitted):
a SuperExec that asked for work just before would ask again only a second later. Exits 2,
with a one-line message, when they are not there within ``FEDCXR_WHEN_UP_TIMEOUT`` seconds
(120).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

from cli.ports import wait_file, wait_port
from common.errors import FedcxrError


def main(argv: list[str]) -> int:
    file = None
    if len(argv) > 2 and argv[1] == "--file":
        file, argv = Path(argv[2]), [argv[0], *argv[3:]]
    if len(argv) < 2 or ":" not in argv[1] or not argv[0].isdigit():
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    port, (module, function) = int(argv[0]), argv[1].split(":", 1)
    entry = getattr(importlib.import_module(module), function)
    timeout = float(os.environ.get("FEDCXR_WHEN_UP_TIMEOUT", "120"))
    try:
        start = time.monotonic()
        wait_port(port, timeout)
        if file is not None:
            wait_file(file, max(timeout - (time.monotonic() - start), 0.0))
    except FedcxrError as exc:
        print(f"{function}: {exc}", file=sys.stderr)
        return 2
    sys.argv = [function.replace("_", "-"), *argv[2:]]
    result = entry()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
