"""Layers point one way: ``common`` (library) <- ``client``, ``server`` <- ``cli`` (entry
points). Every import of every module is read, function-level (lazy) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import
ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "cli": {"common", "client", "server", "cli"},
}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of a project package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in ALLOWED]
    return found


def test_imports_point_one_way():
    wrong = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            for line, target in project_imports(path):
                if target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert wrong == [], "imports against the layer direction:\n" + "\n".join(wrong)


def test_the_layer_check_sees_lazy_imports(tmp_path):
    """The check would fail on a function-level import against the direction."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from client.site import x\n    import server.app\n")
    assert project_imports(bad) == [(2, "client"), (3, "server")]


def test_the_process_that_hosts_the_server_app_loads_no_torch():
    """Flower's simulation process imports the ServerApp and the ClientApp module (to check it
    loads); a deployed ServerApp imports the first. Neither may pull in torch, torchvision
    or Opacus: that process holds numpy weights for the whole run, and torch's memory would
    stay in it (server.model_files builds models in a child process)."""
    import subprocess
    import sys

    code = ("import sys, server.app, client.app; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'torchvision', 'opacus'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"
