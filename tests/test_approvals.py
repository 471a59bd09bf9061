"""Code approval: a site allows apps by the SHA-256 of their FAB; its launcher refuses the
rest before the app is installed (the loopback deployment test runs it against real nodes)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common.approvals import APPROVALS_FILE, Approvals, NotApproved, fab_hash
from common.errors import FedcxrError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fab(tmp_path_factory) -> Path:
    """The project's own FAB, as `flwr build` writes it (deterministic: same bytes twice)."""
    out = tmp_path_factory.mktemp("fab")
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(ROOT)], check=True, capture_output=True,
                   cwd=out)
    first = next(out.glob("*.fab"))
    data = first.read_bytes()
    first.unlink()
    subprocess.run([str(flwr), "build", "--app", str(ROOT)], check=True, capture_output=True,
                   cwd=out)
    again = next(out.glob("*.fab"))
    assert again.read_bytes() == data
    assert fab_hash(data).startswith(again.name.split(".")[-2])  # Flower names it by hash
    return again


def test_an_approved_fab_passes_and_one_changed_byte_does_not(fab, tmp_path):
    approvals = Approvals(tmp_path / APPROVALS_FILE)
    with pytest.raises(NotApproved, match="has not approved"):
        approvals.check(fab.read_bytes(), "st-mary")
    entry = approvals.approve(fab, "reviewed")
    assert approvals.check(fab.read_bytes(), "st-mary") == entry["hash"]
    changed = bytearray(fab.read_bytes())
    changed[len(changed) // 2] ^= 1
    with pytest.raises(NotApproved) as info:
        approvals.check(bytes(changed), "st-mary")
    message = str(info.value)
    assert fab_hash(bytes(changed)) in message and "fedcxr site approve" in message
    assert "\n" not in message


def test_only_a_fab_can_be_approved(tmp_path):
    approvals = Approvals(tmp_path / APPROVALS_FILE)
    (tmp_path / "notes.txt").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a.py", "print(1)")
    for path, message in ((tmp_path / "missing.fab", "no such file"),
                          (tmp_path / "notes.txt", "not a zip"),
                          (tmp_path / "other.zip", "no pyproject.toml")):
        with pytest.raises(FedcxrError, match=message):
            approvals.approve(path)
    assert approvals.entries() == []


def test_the_launcher_checks_only_where_the_node_requires_it(fab, tmp_path, cohort):
    from cli.clientapp_launcher import check

    node = {"data-path": str(cohort / "site1"), "cache-path": str(tmp_path / "state")}
    check(node, b"anything")  # require-approval unset: the launcher lets Flower go on
    with pytest.raises(NotApproved, match="site site1 has not approved"):
        check({**node, "require-approval": True}, fab.read_bytes())
    Approvals(tmp_path / "state" / APPROVALS_FILE).approve(fab)
    check({**node, "require-approval": True}, fab.read_bytes())


def test_site_approve_and_approvals_commands(fab, tmp_path, capsys):
    from cli.main import main

    assert main(["site", "approvals", "--state", str(tmp_path)]) == 0
    assert "no app approved" in capsys.readouterr().out
    assert main(["site", "approve", str(fab), "--state", str(tmp_path), "--note", "ok"]) == 0
    assert main(["site", "approvals", "--state", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert fab_hash(fab.read_bytes()) in out and fab.name in out
