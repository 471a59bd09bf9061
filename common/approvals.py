"""The site's code approvals: which Flower apps (by FAB hash) may run on this site's data.

A FAB is the zip ``flwr build`` writes; its SHA-256 is its identity (Flower names the file
after it, and ``flwr run`` sends the same bytes for the same project). A site approves an
app after reviewing it (``fedcxr site approve APP.fab``); the approval is one JSON line in
``approvals.jsonl`` in the site's state folder. The check itself runs in the site's own
launcher (``cli.clientapp_launcher``), before the app is installed or any of its code runs:
the code being checked never gets to take part in the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

from common.errors import FedcxrError

APPROVALS_FILE = "approvals.jsonl"
# Set by the site's launcher to the hash of the app it let run (read by the audit log);
# absent in simulation, where no launcher runs.
FAB_HASH_ENV = "FEDCXR_FAB_HASH"


class NotApproved(FedcxrError):
    """A run's app is not on the site's approval list: nothing of it runs."""


def fab_hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class Approvals:
    """The site's allowlist of app hashes (append-only JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def approve(self, fab: Path, note: str = "") -> dict:
        """Add ``fab``'s hash (after checking it is a FAB: a zip with a pyproject.toml)."""
        fab = Path(fab)
        if not fab.is_file():
            raise FedcxrError(f"{fab}: no such file; pass the .fab file `flwr build` wrote")
        try:
            with zipfile.ZipFile(fab) as z:
                names = set(z.namelist())
        except zipfile.BadZipFile:
            raise FedcxrError(f"{fab}: not a FAB (not a zip file); pass the file `flwr build` "
                              "wrote") from None
        if "pyproject.toml" not in names:
            raise FedcxrError(f"{fab}: not a FAB (no pyproject.toml inside)")
        entry = {"hash": fab_hash(fab.read_bytes()), "file": fab.name, "time": time.time(),
                 "note": note}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise FedcxrError(f"{self.path}:{n}: unreadable approval line; fix or remove "
                                  "it (only `fedcxr site approve` writes this file)") from None
        return out

    def check(self, content: bytes, site: str) -> str:
        """The app's hash if approved; NotApproved (one line, what to do) if not."""
        digest = fab_hash(content)
        if any(e.get("hash") == digest for e in self.entries()):
            return digest
        raise NotApproved(
            f"site {site} has not approved this app (FAB sha256 {digest}): nothing of it ran "
            f"and no data was read. To allow it, the site reviews the app and runs `fedcxr "
            f"site approve APP.fab --state {self.path.parent}` on the .fab the coordinator "
            "built with `flwr build`")
