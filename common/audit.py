"""The site's audit log: one JSON line per message a node handled, on the site's own disk.

A hospital's privacy officer reads it to answer "which runs touched our data, with which
code, what did they ask for, and what left": time, run, the app's FAB hash (set by the site's
launcher; null in simulation), message type and action, arm(s) and round, the reply's
record keys with their byte sizes, the ε the message spent (from the site's own ledger), and
refusals with their reason. Each line is fsynced before the reply leaves the node. It never
holds images, patient or image ids, or per-image values: only names and sizes of what left.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from common.errors import FedcxrError

AUDIT_FILE = "audit.jsonl"
COLUMNS = ("time", "run_id", "type", "arms", "round", "outcome", "epsilon_spent", "bytes_out")


def record_sizes(content) -> dict[str, int]:
    """Byte size of each record of a reply (arrays: their buffers; metrics and configs: their
    JSON text), keyed by record name; what left, measured, never its values."""
    sizes = {}
    for key, record in content.items():
        if type(record).__name__ == "ArrayRecord":
            sizes[key] = sum(len(a.data) for a in record.values())
        else:
            sizes[key] = len(json.dumps(dict(record), default=str))
    return sizes


class AuditLog:
    """Append-only JSON lines (``audit.jsonl`` in the site's state folder)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, entry: dict) -> None:
        """One line, under an exclusive lock (nodes of one site may run messages at once),
        fsynced before returning. The state folder is created, never the folders above it
        (a node pointed at a data folder that does not exist creates nothing there)."""
        self.path.parent.mkdir(exist_ok=True)
        line = json.dumps({"time": time.time(), **entry}, default=str) + "\n"
        with open(self.path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def entries(self, run_id: str | None = None) -> list[dict]:
        """Every readable line (of one run when asked); an unreadable line is an error that
        names it (the log is the site's evidence: it is never silently skipped), except a
        torn last line, which is reported as such."""
        if not self.path.exists():
            raise FedcxrError(f"{self.path}: no audit log (no message was handled with this "
                              "state folder); check the node's ledger-path/cache-path")
        out = []
        lines = self.path.read_text(errors="replace").split("\n")
        tail = lines.pop()
        for n, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise FedcxrError(f"{self.path}:{n}: unreadable audit line; keep the file as "
                                  "evidence and restore it from backup") from None
            if run_id is None or str(entry.get("run_id")) == str(run_id):
                out.append(entry)
        if tail:
            out.append({"time": None, "run_id": "?", "type": "?", "outcome":
                        f"torn last line {len(lines) + 1} (the node stopped mid-write)"})
        return out


def table(entries: list[dict]) -> str:
    """The audit log as a fixed-width table for a terminal."""
    rows = [list(COLUMNS)]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])) \
            if e.get("time") else "?"
        eps = e.get("epsilon_spent")
        rows.append([when, str(e.get("run_id", "")), str(e.get("type", "")),
                     ",".join(e.get("arms") or []) or "-", str(e.get("round") or "-"),
                     str(e.get("outcome", "")),
                     f"{eps:.3f}" if isinstance(eps, int | float) else "-",
                     str(sum((e.get("records") or {}).values()))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
