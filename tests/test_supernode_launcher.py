"""The site image's SuperNode launcher (deploy/site-bin/flower-supernode): Flower's process
and output unchanged, plus a one-line hint when the SuperLink does not know the node's key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE_BIN = ROOT / "deploy" / "site-bin"

# What Flower 1.41's SuperNode prints when the SuperLink refuses an unknown key (exit 305).
UNKNOWN_KEY = ("ERROR :     Exit Code: 305\nFailed to initialize the connection to the "
               "SuperLink.\n[code: 2004] Failed to activate SuperNode.\nThe SuperNode could "
               "not establish a connection to the SuperLink.\n")


def fake_supernode(tmp: Path, output: str, code: int) -> Path:
    """A stand-in for Flower's flower-supernode on PATH after site-bin: prints ``output``
    and its own argv, exits ``code``."""
    bin_dir = tmp / "flower-bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "flower-supernode"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({output!r})\n"
                   f"print('argv', sys.argv[1:])\nsys.exit({code})\n")
    exe.chmod(0o755)
    return bin_dir


def run_wrapper(tmp: Path, output: str, code: int, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(SITE_BIN), str(fake_supernode(tmp, output, code)),
                            str(Path(sys.executable).parent), os.environ["PATH"]])
    return subprocess.run([str(SITE_BIN / "flower-supernode"), *args], capture_output=True,
                          text=True, env={**os.environ, "PATH": path}, timeout=60)


def test_an_unknown_key_gets_a_hint_with_its_fingerprint(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run(["bash", str(ROOT / "deploy" / "site-key.sh"), str(keys), "st-mary"],
                   check=True, capture_output=True)
    r = run_wrapper(tmp_path, UNKNOWN_KEY, 1, f"--auth-supernode-private-key={keys}/st-mary",
                    "--superlink=fl.example.org:8000")
    assert r.returncode == 1  # Flower's own exit code
    assert UNKNOWN_KEY in r.stdout  # its output unchanged
    # the real SuperNode got the same arguments
    assert f"'--auth-supernode-private-key={keys}/st-mary'" in r.stdout
    hint = r.stdout.strip().splitlines()[-1]
    assert "is not registered" in hint and str(keys / "st-mary.pub") in hint
    # the fingerprint is OpenSSH's own
    expected = subprocess.run(["ssh-keygen", "-lf", str(keys / "st-mary.pub")],
                              capture_output=True, text=True, check=True).stdout.split()[1]
    assert expected in hint


def test_no_hint_when_the_node_runs_or_fails_otherwise(tmp_path):
    ok = run_wrapper(tmp_path, "INFO : Starting Flower SuperNode\n", 0, "--insecure")
    assert ok.returncode == 0 and "fedcxr:" not in ok.stdout
    other = run_wrapper(tmp_path, "CERTIFICATE_VERIFY_FAILED\n", 1, "--insecure")
    assert other.returncode == 1 and "not registered" not in other.stdout
