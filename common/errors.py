"""Errors a user can cause.

Every exception here carries a one-line message that names the file, row or key at fault and
says what to do. The CLI prints that line (never a traceback) and exits non-zero.
"""

from __future__ import annotations


class FedcxrError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""


class ManifestError(FedcxrError):
    """A manifest that cannot be read at all (as opposed to a bad row, which is a Problem)."""


class UnreadableManifest(ManifestError):
    """A CSV that cannot be read at all (permission, I/O, a header that is not CSV), as
    opposed to one that reads but is not a manifest: auto-detection names the former."""


class ConfigError(FedcxrError):
    """A config key that is unknown, missing or of the wrong type."""


class MessageRejected(ValueError):
    """A message whose content a site will not act on: a missing or mistyped key, a name that
    is not a plain name, JSON past its size bound or off its schema, weights that do not fit
    the site's model. The node answers it with a refusal (``Refusal.MALFORMED``), logged in
    its audit log; nothing of the message is loaded."""
