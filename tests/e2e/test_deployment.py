"""The deployment, proven without Docker: docker-compose.yml's own commands as processes on
loopback. TLS on, SuperNode authentication on, 3 training + 2 held-out hospitals.

Every process is started in its own session and stopped by pid (plus a sweep of anything
carrying this test's FLWR_HOME) at the end, pass or fail. Loopback addresses only; every wait
is bounded.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cli.simulate import submit_and_wait
from common.approvals import fab_hash
from common.synth import SynthOptions, generate
from tests.e2e.compose import ROOT, Cluster, load_services, sweep, wait_for

SITES = [f"site{i}" for i in range(1, 6)]

FLWR = str(Path(sys.executable).parent / "flwr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_fab(project: Path, out: Path) -> Path:
    """``flwr build`` of ``project``: the .fab a coordinator sends its sites for review."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(project)],
                   check=True, capture_output=True, cwd=out)
    return next(out.glob("*.fab"))


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Federation:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), str(tmp / "certs")],
                       check=True, capture_output=True)
        for name in SITES + ["rogue"]:
            subprocess.run(["bash", str(ROOT / "deploy" / "site-key.sh"), str(tmp / "keys"),
                            name], check=True, capture_output=True)
        generate(tmp / "cohort", SynthOptions(images_per_site=30, size=64, seed=2))
        # Every node requires approval (docker-compose.yml): each site approves the app the
        # coordinator built, as a hospital would after review.
        self.fab = build_fab(ROOT, tmp / "fab")
        for site in SITES:
            subprocess.run([sys.executable, "-m", "cli.main", "site", "approve", str(self.fab),
                            "--state", str(tmp / "state" / site), "--note", "e2e"],
                           check=True, capture_output=True, cwd=ROOT)
        self.env = {"CERTS_DIR": str(tmp / "certs"), "KEYS_DIR": str(tmp / "keys"),
                    "STATE_DIR": str(tmp / "state"), "DATA_ROOT": str(tmp / "cohort"),
                    # The SuperLink's in-memory state: with five nodes on two cores, Flower
                    # 1.41's SQLite state answered "database is locked" (its 5 s busy
                    # timeout) and the 500s stopped SuperNodes, on disk and on a RAM disk.
                    "SUPERLINK_DB": ":flwr-in-memory:",
                    "BIND_HOST": "127.0.0.1", "SUPERLINK_HOST": "127.0.0.1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
                    # Five hospitals share two cores here: one math thread per process, as
                    # a CPU limit on each container would give.
                    "OMP_NUM_THREADS": "1"}
        for key in ["SUPERLINK_PORT", "HEALTH_PORT"] + [f"{s.upper()}_PORT" for s in SITES]:
            self.env[key] = str(free_port())
        for d in ("state", "logs", "homes/cli", "runs"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        self.port = int(self.env["SUPERLINK_PORT"])
        (tmp / "homes/cli/config.toml").write_text(
            f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{tmp}/certs/ca.pem"\n')
        self.cli_env = {**os.environ, **self.env, "FLWR_HOME": str(tmp / "homes/cli")}
        self.services = load_services(self.env)
        self.cluster = Cluster(self.env, tmp / "logs")

    def home(self, name: str) -> dict:
        path = self.tmp / "homes" / name
        path.mkdir(parents=True, exist_ok=True)
        return {"FLWR_HOME": str(path)}

    def start_superlink(self) -> None:
        svc = self.services["superlink"]
        self.cluster.start("superlink", svc["command"], {**svc["environment"],
                                                         **self.home("superlink")})
        wait_for(lambda: port_open(self.port), 60, "the SuperLink port")

    def start_site(self, site: str) -> None:
        svc = self.services[site]
        self.cluster.start(site, svc["command"], {**svc["environment"], **self.home(site)})

    def register_sites(self) -> None:
        """The coordinator registers each hospital's public key (COORDINATOR.md)."""
        for site in SITES:
            r = subprocess.run([FLWR, "supernode", "register",
                                str(self.tmp / "keys" / f"{site}.pub"), "e2e", "--name", site],
                               env=self.cli_env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr

    def online(self) -> int:
        r = subprocess.run([FLWR, "supernode", "list", "e2e", "--format", "json"],
                           env=self.cli_env, capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(r.stdout[r.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(n.get("status") == "online" for n in nodes)

    def wait_online(self, n: int = len(SITES), timeout: float = 120) -> None:
        """A run discovers the nodes connected when it starts: wait for all of them."""
        wait_for(lambda: self.online() >= n, timeout, f"{n} SuperNodes online", interval=3)

    def kill(self, name: str) -> None:
        self.cluster.kill(name)
        sweep(self.tmp / "homes" / name)

    def run(self, name: str, timeout: float = 400, **config) -> tuple[str, dict | None]:
        rc = self.tmp / f"{name}.toml"
        config = {"num-rounds": 2, "image-size": 32, "out-dir": str(self.tmp / "runs"),
                  "run-name": name, **config}
        rc.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        _, status = submit_and_wait(ROOT, "e2e", rc, self.cli_env, timeout=timeout,
                                    show_log=False)
        path = self.tmp / "runs" / name / "results.json"
        return status, json.loads(path.read_text()) if path.exists() else None

    def close(self) -> None:
        self.cluster.stop_all()
        sweep(self.tmp / "homes")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = Federation(tmp_path_factory.mktemp("deploy"))
    try:
        f.start_superlink()
        f.register_sites()
        for site in SITES:
            f.start_site(site)
        f.wait_online()
        yield f
    finally:
        f.close()


def test_only_tls_and_registered_keys_get_in(fed):
    svc = fed.services["site1"]["command"]

    def variant(name, *, drop=(), replace=None, add=()):
        cmd = [a for a in svc if not any(a.startswith(d) for d in drop)]
        for old, new in (replace or {}).items():
            cmd = [new if a.startswith(old) else a for a in cmd]
        cmd = [a if not a.startswith("--port=") else f"--port={free_port()}" for a in cmd]
        fed.cluster.start(name, cmd + list(add) + ["--max-retries=2"], fed.home(name))

    keys = fed.tmp / "keys"
    variant("unregistered", replace={
        "--auth-supernode-private-key": f"--auth-supernode-private-key={keys}/rogue",
        "--auth-supernode-public-key": f"--auth-supernode-public-key={keys}/rogue.pub"})
    variant("no-ca", drop=["--root-certificates"])
    variant("plaintext", drop=["--root-certificates"], add=["--insecure"])
    for name, evidence in (("unregistered", "Failed to activate SuperNode"),
                           ("no-ca", "CERTIFICATE_VERIFY_FAILED"),
                           ("plaintext", "requires a secure TLS connection")):
        code = fed.cluster.wait_exit(name, 120)
        assert code not in (None, 0), f"{name} did not exit"
        assert evidence in fed.cluster.log(name), fed.cluster.log(name)[-800:]
        if name == "unregistered":  # the site launcher says what Flower's message does not
            assert "rogue.pub" in fed.cluster.log(name) and "is not registered" in \
                fed.cluster.log(name), fed.cluster.log(name)[-800:]
        fed.kill(name)
    with pytest.raises(httpx.HTTPError):  # the SuperLink speaks TLS only
        httpx.get(f"http://127.0.0.1:{fed.port}/health", timeout=5)


def test_full_run_over_tls_with_node_auth(fed):
    status, results = fed.run("full")
    assert status == "finished:completed", status
    assert results is not None
    assert {a["name"]: a["status"] for a in results["arms"]} == {
        "federated": "complete", "single:site1": "complete", "single:site2": "complete",
        "single:site3": "complete"}
    assert {r["site"] for r in results["external"]} == {"site4", "site5"}
    # each training line once at the node (the first run of the module)
    assert fed.cluster.log("site1").count("site site1 arm federated round 1:") == 1
    probe = {p["site"]: p["refused"] for p in results["screening"]["role_probe"]}
    assert probe == {"site4": True, "site5": True}  # held-out nodes refuse to train
    # ... as an expected refusal: one line, no traceback, no Flower exit-code ERROR
    for site in ("site4", "site5"):
        log = fed.cluster.log(site)
        assert "Traceback" not in log and "Exit Code" not in log, log[-1500:]
    # the coordinator's status view followed the run to its end
    status = subprocess.run([sys.executable, "-m", "cli.main", "status",
                             str(fed.tmp / "runs" / "full")], capture_output=True, text=True,
                            cwd=ROOT)
    assert status.returncode == 0 and "finished: finished" in status.stdout, status.stdout
    assert (fed.tmp / "runs" / "full" / "report.html").is_file()
    assert results["verdict"]["overall"].startswith("H1")
    # each site's audit log names the approved app that handled every message
    audit = [json.loads(x) for x in (fed.tmp / "state" / "site1" / "audit.jsonl")
             .read_text().splitlines()]
    assert audit and {e["fab_hash"] for e in audit} == {fab_hash(fed.fab.read_bytes())}


def test_training_supernode_killed_mid_round(fed):
    """site3 dies while training in round 1. The round goes on without it after
    round-timeout; the run completes, and the results say which arm never trained and why.
    (Its hospital then restarts the node: the SuperLink accepts the key again once the dead
    node's heartbeat has expired.)"""
    name = "dropout"
    done = {}

    def run():
        done["result"] = fed.run(name, **{"round-timeout": 60.0})

    marker = "arm federated round 1"
    before = fed.cluster.log("site3").count(marker)  # earlier runs wrote it too
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_for(lambda: fed.cluster.log("site3").count(marker) > before, 300,
                 "site3 to train in round 1")
        fed.kill("site3")
        t.join(timeout=500)
        assert not t.is_alive(), "the run did not finish"
    finally:
        fed.start_site("site3")
    status, results = done["result"]
    assert status == "finished:completed"
    arms = {a["name"]: a for a in results["arms"]}
    # site3 never came back during the run: its own model never trained, so it is reported
    # as such and evaluated nowhere (no verdict on initial weights)
    assert arms["single:site3"]["status"] == "not trained"
    assert "site site3 failed in round 1" in arms["single:site3"]["reason"]
    assert "single:site3" in results["verdict"]["untrained"]
    assert not any(r["model"] == "single:site3" for r in results["external"])
    assert arms["federated"]["status"] == "complete"
    assert {f["site"] for f in results["screening"]["failures"]} == {"site3"}
    assert 1 in {f["round"] for f in results["screening"]["failures"]}


def test_an_app_the_sites_did_not_approve_never_runs(fed, tmp_path):
    """The same app with one byte changed has another FAB hash: every node's launcher
    refuses it before installing it, so none of its code runs; the refusal reaches the
    coordinator and the sites' caches, ledgers and audit logs are untouched."""
    import shutil

    copy = tmp_path / "app"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "runs", "*.egg-info", ".pytest_cache", "demo-cohort"))
    readme = copy / "README.md"
    readme.write_bytes(readme.read_bytes() + b" ")
    assert build_fab(copy, tmp_path / "fab").name != fed.fab.name  # another hash
    state = fed.tmp / "state"

    def snapshot() -> dict:
        return {str(p.relative_to(state)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in state.rglob("*") if p.is_file() and "approvals" not in p.name}

    before = snapshot()
    marks = {site: fed.cluster.log(site).count("has not approved this app") for site in SITES}
    rc = fed.tmp / "unapproved.toml"
    rc.write_text(f'num-rounds = 1\nimage-size = 32\nout-dir = "{fed.tmp / "runs"}"\n'
                  f'run-name = "unapproved"\nround-timeout = 60.0\n')
    _, status = submit_and_wait(copy, "e2e", rc, fed.cli_env, timeout=300, show_log=False)
    assert status != "finished:completed", status
    for site in SITES:
        wait_for(lambda s=site: fed.cluster.log(s).count("has not approved this app")
                 > marks[s], 60, f"{site} to refuse the unapproved app")
    assert snapshot() == before  # no cache, ledger, score or audit line written
    assert not (fed.tmp / "runs" / "unapproved" / "results.json").exists()


def test_superlink_killed_mid_run_then_resumed(fed):
    name = "crash"
    first = fed.tmp / "runs" / name / "checkpoints" / "round-001.pt"
    proc = {}

    def submit():
        try:
            proc["r"] = fed.run(name, timeout=300, **{"num-rounds": 2})
        except Exception as exc:  # noqa: BLE001 - the run is expected to die with the link
            proc["error"] = exc

    fed.wait_online(len(SITES) - 1)  # site3 may still be waiting to be let back in
    t = threading.Thread(target=submit, daemon=True)
    t.start()
    wait_for(first.exists, 300, "the round-1 checkpoint")
    fed.kill("superlink")  # SuperLink, its SuperExec and the ServerApp
    assert not (fed.tmp / "runs" / name / "results.json").exists()
    # In-memory SuperLink state: the restarted link has forgotten the nodes, so the keys are
    # registered again and the hospitals' nodes restarted (compose: restart: unless-stopped).
    fed.start_superlink()
    fed.register_sites()
    for site in SITES:
        fed.kill(site)
        fed.start_site(site)
    fed.wait_online()
    # resume-from names the run; it is found under out-dir, wherever the SuperLink runs
    status, results = fed.run(name, **{"num-rounds": 2, "resume-from": name})
    assert status == "finished:completed"
    assert results is not None
    fed_arm = next(a for a in results["arms"] if a["name"] == "federated")
    assert [h["round"] for h in fed_arm["history"]] == [1, 2]
    # metrics.csv agrees with results.json after the resume, row for row
    with open(fed.tmp / "runs" / name / "metrics.csv", newline="") as fh:
        rows = {(int(r["round"]), r["arm"]): (int(r["sites_trained"]), int(r["sites_validated"]))
                for r in csv.DictReader(fh)}
    assert rows == {(h["round"], h["arm"]): (h["sites_trained"], h["sites_validated"])
                    for a in results["arms"] for h in a["history"]}
    assert (fed.tmp / "runs" / name / "checkpoints" / "round-002.pt").exists()


def test_everything_stops(fed):
    fed.close()
    time.sleep(1)
    leftovers = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(fed.tmp).encode() in env and int(proc.name) != os.getpid():
            leftovers.append(proc.name)
    assert leftovers == []
    assert not port_open(fed.port)


def test_compose_file_is_what_the_test_ran():
    """The compose services the test starts are the documented topology."""
    services = load_services({})
    assert set(services) == {"superlink", *SITES}
    link = services["superlink"]["command"]
    assert "--enable-supernode-auth" in link and not any("--insecure" in a for a in link)
    roles = {}
    for site in SITES:
        cmd = services[site]["command"]
        assert any(a.startswith("--root-certificates=") for a in cmd)
        assert any(a.startswith("--auth-supernode-private-key=") for a in cmd)
        config = next(a for a in cmd if a.startswith("--node-config="))
        roles[site] = config.split('role="')[1].split('"')[0]
    assert roles == {"site1": "train", "site2": "train", "site3": "train",
                     "site4": "evaluate", "site5": "evaluate"}

