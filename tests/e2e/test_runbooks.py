"""The runbooks run as written: every command block of deploy/HOSPITAL.md and
deploy/COORDINATOR.md, extracted from the Markdown.

There is no Docker engine here, so each command is taken as far as a machine without one can:
- ``deploy/*.sh`` and ``fedcxr site ...`` commands run for real, and so do the commands inside
  ``docker run`` lines, with the line's own ``-v`` mounts mapped to folders of the test
  (``/data/cxr`` holds a synthetic site; the container's ``/state`` is the host folder that
  is mounted there);
- ``flower-supernode`` is parsed by Flower's own argument parser and its ``--node-config``
  by Flower's config parser, then by fedcxr's node-config parser (role, budget, paths);
- every ``--run-config`` string is parsed by Flower's parser, then by fedcxr's run config;
- ``[superlink.*]`` TOML is checked by Flower's own connection validation (absolute
  certificate paths);
- ``docker build`` / ``compose`` lines must name Dockerfiles and compose files that exist and
  build the images the other commands run.
The node and SuperLink themselves run from compose's commands in test_deployment.py and
test_proxy.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from common.config import NodeConfig, RunConfig, parse
from common.synth import SynthOptions, generate
from tests.e2e.compose import ROOT

DOCS = {"hospital": ROOT / "deploy" / "HOSPITAL.md",
        "coordinator": ROOT / "deploy" / "COORDINATOR.md"}
FENCE = re.compile(r"^```(bash|toml)\n(.*?)^```", re.S | re.M)
BIN = Path(sys.executable).parent
STATEFUL = ("ledger", "audit", "approvals")  # read what a running node wrote
IMAGES = {"fedcxr-site:latest": "deploy/Dockerfile.site",
          "fedcxr-coordinator:latest": "deploy/Dockerfile.coordinator"}


def blocks(doc: Path, lang: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(doc.read_text()) if m.group(1) == lang]


def commands(block: str) -> list[list[str]]:
    """Shell lines of a block (continuations joined, comments dropped), as argv lists."""
    text = block.replace("\\\n", " ")
    return [argv for line in text.splitlines()
            if (argv := shlex.split(line, comments=True))]


def all_commands(doc: Path) -> list[list[str]]:
    return [argv for b in blocks(doc, "bash") for argv in commands(b)]


def docker_run(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """(container path -> host path, image, command) of a ``docker run`` line."""
    mounts, i = {}, 2
    while argv[i].startswith("-"):
        if argv[i] in ("-v", "--volume", "--name", "--restart", "-e"):
            if argv[i] in ("-v", "--volume"):
                host, container = argv[i + 1].split(":")[:2]
                mounts[container] = host
            i += 2
        else:
            i += 1
    return mounts, argv[i], argv[i + 1:]


def remap(arg: str, mounts: dict[str, str]) -> str:
    """``arg`` with container paths replaced by the mounted host paths (longest first)."""
    for container in sorted(mounts, key=len, reverse=True):
        if arg == container or arg.startswith(container + "/"):
            return mounts[container] + arg[len(container):]
        if "=" in arg and arg.split("=", 1)[1].startswith(container):
            key, value = arg.split("=", 1)
            return f"{key}={remap(value, mounts)}"
    return arg


class Host:
    """The test's stand-in for a hospital's or coordinator's machine: absolute paths of the
    runbooks (/data/cxr, /srv/fedcxr, deploy/...) map to folders under ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.paths = {"/data/cxr": str(tmp / "data"), "/srv/fedcxr": str(tmp / "srv"),
                      "deploy/certs": str(tmp / "certs")}
        generate(tmp / "cohort", SynthOptions(sites=1, held_out=0, images_per_site=12, size=64,
                                              seed=3))
        (tmp / "cohort" / "site1").rename(tmp / "data")
        (tmp / "srv").mkdir()

    def deployed_model(self, argv: list[str]) -> None:
        """The model file and the baseline a monitor line names: a fedcxr checkpoint and
        the baseline a run would have written for it on this site's images."""
        import numpy as np
        import torch

        from common.data import CachedImages
        from common.model import build_model, save_checkpoint
        from common.monitoring import make_baseline
        from common.site import SiteSource, ensure_cache

        model_path = Path(argv[argv.index("--model") + 1])
        baseline_path = Path(argv[argv.index("--baseline") + 1])
        torch.manual_seed(0)
        model = build_model().eval()
        save_checkpoint(model, model_path, image_size=32)
        cache = ensure_cache(SiteSource(self.tmp / "data"), 32, self.tmp / "baseline-cache")
        ds = CachedImages(cache)
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            scores = torch.sigmoid(model(x)).numpy()
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        make_baseline(model="federated", site="st-mary", run_name="trial-1", image_size=32,
                      scores=scores, labels=ds.labels(), images=np.asarray(cache.images),
                      scale=float(cache.scale), meta=cache.index).write(baseline_path)

    def map(self, arg: str) -> str:
        return remap(arg, self.paths)

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        argv = [self.map(a) for a in argv]
        if argv[0].startswith("deploy/"):
            argv = ["bash", str(ROOT / argv[0]), *argv[1:]]
        elif argv[0] in ("fedcxr", "flwr"):
            argv = [str(BIN / argv[0]), *argv[1:]]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Host:
    return Host(tmp_path_factory.mktemp("runbook"))


def test_hospital_runbook_runs_as_written(host):
    cmds = all_commands(DOCS["hospital"])
    kinds = {(a[0], a[1]) for a in cmds}
    assert ("docker", "build") in kinds and ("docker", "run") in kinds
    ran, parsed = [], []
    for argv in cmds:
        if argv[:2] == ["docker", "build"]:
            dockerfile = argv[argv.index("-f") + 1]
            tag = argv[argv.index("-t") + 1]
            assert IMAGES.get(tag) == dockerfile and (ROOT / dockerfile).is_file(), argv
            continue
        if argv[0] == "docker" and argv[1] == "exec":
            argv = ["docker", "run", "-v", "/srv/fedcxr:/state", "-v", "/data/cxr:/data",
                    "fedcxr-site:latest", *argv[3:]]  # the node's mounts (docker run -d above)
        if argv[:2] == ["docker", "run"]:
            mounts, image, inner = docker_run(argv)
            assert image in IMAGES, argv
            mounts = {c: host.map(h) for c, h in mounts.items()}
            inner = [remap(a, mounts) for a in inner]
            if inner[0] == "flower-supernode":
                check_supernode(inner, mounts)
                parsed.append(inner[0])
                continue
            if inner[:3] == ["fedcxr", "site", "monitor"]:
                host.deployed_model(inner)  # what a run and `fedcxr export` leave there
            if inner[:3] == ["fedcxr", "site", "approve"]:  # needs the coordinator's .fab
                assert "--state" in inner
                parsed.append(" ".join(inner[:3]))
                continue
            argv = inner
        r = host.run(argv)
        if argv[:2] == ["fedcxr", "site"] and argv[2] in STATEFUL and r.returncode == 2:
            # the node has handled no message here yet: the one-line answer names the file
            assert "no audit log" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        else:
            assert r.returncode == 0, (argv, r.stdout[-800:], r.stderr[-800:])
        ran.append(" ".join(argv[:3]))
    # the data was checked, prepared where the node reads it, the key made
    assert (host.tmp / "srv" / "check" / "check.json").is_file()
    assert any((host.tmp / "srv" / "site" / "cache-224").iterdir())
    assert (host.tmp / "srv" / "keys" / "st-mary.pub").is_file()
    assert (host.tmp / "srv" / "monitor" / "monitor.json").is_file()  # the model watched
    assert "flower-supernode" in parsed


def check_supernode(argv: list[str], mounts: dict[str, str]) -> None:
    """Flower's own parser takes the line; fedcxr's node config takes its --node-config."""
    from flwr.common.config import parse_config_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    args = _parse_args_run_supernode().parse_args(argv[1:])
    assert args.superlink.endswith(":8000") and args.root_certificates
    node = parse(NodeConfig, parse_config_args([args.node_config]), what="node config")
    assert node.role in ("train", "evaluate") and node.require_approval
    for path in (node.data_path, node.cache_path):
        assert Path(path).is_absolute()


def test_coordinator_runbook_runs_as_written(host):
    cmds = all_commands(DOCS["coordinator"])
    from flwr.cli.typing import SuperLinkConnection
    from flwr.common.config import parse_config_args

    for block in blocks(DOCS["coordinator"], "toml"):
        config = tomllib.loads(block)
        for name, conn in config["superlink"].items():
            if isinstance(conn, dict):  # raises on a relative root-certificates path
                SuperLinkConnection(name, address=conn["address"],
                                    root_certificates=conn["root-certificates"])
    run_configs = 0
    for argv in cmds:
        if argv[0] == "deploy/certs.sh":
            r = host.run(argv)
            assert r.returncode == 0, r.stderr
            assert {p.name for p in (host.tmp / "certs").iterdir()} >= {
                "ca.pem", "server.pem", "server.key"}
        elif argv[:2] == ["docker", "compose"]:
            compose = yaml.safe_load((ROOT / argv[argv.index("-f") + 1]).read_text())
            if "build" in argv:  # every fedcxr image the file runs is built by it
                built = {s["image"] for s in compose["services"].values() if "build" in s}
                assert {s["image"] for s in compose["services"].values()
                        if s["image"] in IMAGES} <= built
            if "exec" in argv:
                service = argv[argv.index("exec") + 1]
                assert service in compose["services"]
                inner = argv[argv.index("exec") + 2:]
                assert inner[0] == "fedcxr"
                from cli.main import build_parser

                build_parser().parse_args(inner[1:])
        elif argv[:2] == ["flwr", "run"]:
            i = argv.index("--run-config")
            parsed = parse_config_args([argv[i + 1]])  # Flower's parser: quoting
            parse(RunConfig, parsed, what="run config")  # ours: keys and values
            run_configs += 1
        elif argv[0] == "flwr":
            r = host.run([*argv[:3], "--help"] if argv[1] == "supernode" else
                         [*argv[:2], "--help"])
            assert r.returncode == 0, (argv, r.stdout[-400:])
    assert run_configs >= 2


def test_run_config_strings_in_the_readme_parse():
    """Every --run-config '...' in README.md and the runbooks is valid for Flower and fedcxr."""
    from flwr.common.config import parse_config_args

    found = 0
    for doc in (ROOT / "README.md", *DOCS.values()):
        for m in re.finditer(r"--run-config '([^']*)'", doc.read_text()):
            if "<" in m.group(1):  # a placeholder such as <run-name>
                continue
            parse(RunConfig, parse_config_args([m.group(1)]), what=f"{doc.name} run config")
            found += 1
    assert found >= 3
