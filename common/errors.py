"""Errors a user can cause.

Every exception here carries a one-line message that names the file, row or key at fault and
says what to do. The CLI prints that line (never a traceback) and exits non-zero.
"""

from __future__ import annotations


class FedcxrError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""


class ManifestError(FedcxrError):
    """A manifest that cannot be read at all (as opposed to a bad row, which is a Problem)."""


class ConfigError(FedcxrError):
    """A config key that is unknown, missing or of the wrong type."""
