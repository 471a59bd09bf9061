"""``fedcxr-supernode REAL_SUPERNODE ARGS...``: Flower's SuperNode with a hint for the operator.

The site image's ``flower-supernode`` (deploy/site-bin) runs this. It starts Flower's own
SuperNode with the same arguments, passes every output line through unchanged, forwards
SIGTERM/SIGINT, and exits with the SuperNode's code. One thing is added: when the SuperLink
refused to activate the node because it does not know the node's public key (Flower: "[code:
2004] Failed to activate SuperNode ... could not establish a connection", which reads like a
network fault), it prints one line saying so, with the key's file and fingerprint and what to
do. The SuperNode gets the kernel's parent-death signal, so it never outlives this launcher.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

NOT_REGISTERED = "[code: 2004]"  # Flower's ApiErrorCode for an unknown node key
PR_SET_PDEATHSIG = 1


def public_key_file(args: list[str]) -> Path | None:
    """The node's public key file: ``--auth-supernode-public-key``, else the private key's
    ``.pub`` beside it (site-key.sh writes both)."""
    values = {}
    for i, a in enumerate(args):
        for flag in ("--auth-supernode-public-key", "--auth-supernode-private-key"):
            if a.startswith(flag + "="):
                values[flag] = a.split("=", 1)[1]
            elif a == flag and i + 1 < len(args):
                values[flag] = args[i + 1]
    if "--auth-supernode-public-key" in values:
        return Path(values["--auth-supernode-public-key"])
    if "--auth-supernode-private-key" in values:
        return Path(values["--auth-supernode-private-key"] + ".pub")
    return None


def fingerprint(pub: Path) -> str:
    """OpenSSH's SHA256 fingerprint of a public key file (what ``ssh-keygen -lf`` prints)."""
    try:
        blob = base64.b64decode(pub.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return "unreadable"
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def hint(args: list[str]) -> str:
    pub = public_key_file(args)
    key = f"{pub} ({fingerprint(pub)})" if pub else "this node's public key"
    return (f"fedcxr: the SuperLink does not know {key}: it is not registered. Send the .pub "
            "file to the coordinator, who runs `flwr supernode register FILE <connection> "
            "--name SITE`; then start the node again.")


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the launcher still forwards signals
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: fedcxr-supernode REAL_FLOWER_SUPERNODE [ARGS...]", file=sys.stderr)
        return 2
    real, args = argv[0], argv[1:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([real, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    refused = False
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        refused = refused or NOT_REGISTERED.encode() in line
    code = proc.wait()
    if code != 0 and refused:
        print(hint(args), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
