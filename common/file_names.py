"""A name from elsewhere (a run name the coordinator sends, a site's self-reported name inside
an arm's name) as one safe file or folder name."""

from __future__ import annotations

import hashlib
import re


def safe_name(name: str, empty: str = "run") -> str:
    """``name`` reduced to letters, digits and ``._-`` (no leading dot, at most 100
    characters; ``empty`` when nothing is left), plus a hash of the original when that
    changed it, so that two names never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:100] or empty
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
