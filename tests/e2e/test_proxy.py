"""The coordinator's controls are out of the hospitals' reach (deploy/compose.production.yml).

compose.production.yml's own SuperLink command and its proxy's nginx template, run as processes
on loopback with Debian's nginx (the Makefile installs it): a hospital's credentials (ca.pem and
its registered node key) reach the Fleet API through the hospitals' door and are refused by the
Control and Runtime APIs there; the coordinator's door reaches both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.compose import ROOT, Cluster, interpolate, sweep, wait_for
from tests.e2e.test_deployment import free_port, port_open

PRODUCTION = ROOT / "deploy" / "compose.production.yml"
TEMPLATE = ROOT / "deploy" / "proxy" / "fedcxr.conf.template"
FLWR = str(Path(sys.executable).parent / "flwr")
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None)

pytestmark = pytest.mark.slow


def production() -> dict:
    return yaml.safe_load(PRODUCTION.read_text())["services"]


def template_names() -> set[str]:
    """The ${NAMES} the template needs (nginx's own $variables have no braces)."""
    return set(re.findall(r"\$\{([A-Z0-9_]+)\}", TEMPLATE.read_text()))


def render(values: dict[str, str]) -> str:
    """What the nginx image's envsubst makes of the template: only the given names change."""
    return re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: values.get(m.group(1), m.group(0)),
                  TEMPLATE.read_text())


def test_the_production_topology_publishes_only_the_proxy():
    services = production()
    # the optional MLflow server is published on the host's loopback only
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert "ports" not in services["superlink"]  # reachable on the internal network only
    proxy = services["proxy"]
    published = [str(p) for p in proxy["ports"]]
    # the hospitals' door on every interface, the coordinator's on the host's loopback only
    assert "8000:8000" in published and "127.0.0.1:8001:8001" in published
    assert proxy["environment"]["FLEET_LISTEN"] == "8000"
    assert proxy["environment"]["CONTROL_LISTEN"] == "8001"
    # the compose file gives the template every name it uses, and no other
    assert set(proxy["environment"]) == template_names()
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            # certificates are mounted file by file: the CA's private key never enters
            assert "ca.key" not in source and source.rstrip("/") != "./certs", (name, volume)
    built = {svc["image"] for svc in services.values() if "build" in svc}
    assert {svc["image"] for svc in services.values()} - built == {"nginx:1.27-alpine"}


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed (make test installs Debian's nginx-light as root)")
    tmp = tmp_path_factory.mktemp("proxy")
    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), str(tmp / "certs")],
                   check=True, capture_output=True)
    for name in ("site1", "rogue"):
        subprocess.run(["bash", str(ROOT / "deploy" / "site-key.sh"), str(tmp / "keys"), name],
                       check=True, capture_output=True)
    ports = {k: free_port() for k in ("link", "fleet", "control")}
    env = {"CERTS_DIR": str(tmp / "certs"), "SUPERLINK_DB": ":flwr-in-memory:",
           "BIND_HOST": "127.0.0.1", "SUPERLINK_PORT": str(ports["link"]),
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    (tmp / "logs").mkdir()
    cluster = Cluster(env, tmp / "logs")
    link = [interpolate(str(a), env) for a in production()["superlink"]["command"]]
    cluster.start("superlink", link, {"FLWR_HOME": str(tmp / "homes" / "superlink")})

    nginx_dir = tmp / "nginx"
    nginx_dir.mkdir()
    values = {"FLEET_LISTEN": f"127.0.0.1:{ports['fleet']}",
              "CONTROL_LISTEN": f"127.0.0.1:{ports['control']}",
              "SUPERLINK_UPSTREAM": f"127.0.0.1:{ports['link']}",
              "CERTS_DIR": str(tmp / "certs")}
    (nginx_dir / "fedcxr.conf").write_text(render(values))
    # The nginx image's own nginx.conf, reduced: the template is included in its http block.
    (nginx_dir / "nginx.conf").write_text(
        "daemon off;\nworker_processes 1;\nuser root;\n"
        f"pid {nginx_dir}/nginx.pid;\nerror_log {nginx_dir}/error.log info;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n  access_log {nginx_dir}/access.log;\n"
        + "".join(f"  {kind}_temp_path {nginx_dir}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  include {nginx_dir}/fedcxr.conf;\n}}\n")
    check = subprocess.run([NGINX, "-t", "-c", str(nginx_dir / "nginx.conf"), "-p",
                            str(nginx_dir)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    cluster.start("nginx", [NGINX, "-c", str(nginx_dir / "nginx.conf"), "-p", str(nginx_dir)])

    home = tmp / "homes" / "cli"
    home.mkdir(parents=True)
    ca = tmp / "certs" / "ca.pem"
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "coordinator"\n\n'
        f'[superlink.coordinator]\naddress = "127.0.0.1:{ports["control"]}"\n'
        f'root-certificates = "{ca}"\n\n'
        f'[superlink.hospital]\naddress = "127.0.0.1:{ports["fleet"]}"\n'
        f'root-certificates = "{ca}"\n')
    try:
        for port in ports.values():
            wait_for(lambda p=port: port_open(p), 60, f"port {port}")
        yield {"tmp": tmp, "ports": ports, "cluster": cluster, "ca": ca,
               "cli_env": {**env, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                           "FLWR_HOME": str(home)}}
    finally:
        cluster.stop_all()
        sweep(tmp / "homes")


def flwr(doors, *args) -> subprocess.CompletedProcess:
    return subprocess.run([FLWR, *args], env=doors["cli_env"], capture_output=True, text=True,
                          timeout=90)


def nodes(doors) -> list[dict]:
    r = flwr(doors, "supernode", "list", "coordinator", "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout[r.stdout.index("{"):])["nodes"]


def test_hospitals_door_refuses_the_control_and_runtime_apis(doors):
    keys = doors["tmp"] / "keys"
    register = flwr(doors, "supernode", "register", str(keys / "rogue.pub"), "hospital",
                    "--name", "rogue")
    assert register.returncode != 0 and "403" in register.stdout + register.stderr
    listing = flwr(doors, "supernode", "list", "hospital")
    assert listing.returncode != 0 and "403" in listing.stdout + listing.stderr
    assert not any(n.get("name") == "rogue" for n in nodes(doors))  # nothing was registered
    fleet = f"https://127.0.0.1:{doors['ports']['fleet']}"
    with httpx.Client(verify=ssl.create_default_context(cafile=doors["ca"]), timeout=10) as http:
        for path in ("/v1/control/start-run", "/v1/control/list-nodes",
                     "/v1/runtime/acquire-task", "/v1/runtime/push-task-output"):
            r = http.post(fleet + path, content=b"")
            assert r.status_code == 403, (path, r.status_code)
            assert "hospitals' door" in r.text
        # the Fleet API is forwarded: the SuperLink itself answers (unsigned: not 403 by us)
        r = http.post(fleet + "/v1/fleet/create-node", content=b"")
        assert "hospitals' door" not in r.text
        assert http.get(fleet + "/health").status_code == 200


def test_a_registered_hospital_connects_through_its_door(doors):
    """The coordinator registers the key through its own door; the hospital's SuperNode,
    pointed at the hospitals' door, comes online (the node-auth signatures pass the proxy)."""
    keys = doors["tmp"] / "keys"
    r = flwr(doors, "supernode", "register", str(keys / "site1.pub"), "coordinator",
             "--name", "site1")
    assert r.returncode == 0, r.stdout + r.stderr
    doors["cluster"].start("site1", [
        str(Path(sys.executable).parent / "flower-supernode"),
        f"--superlink=127.0.0.1:{doors['ports']['fleet']}",
        f"--root-certificates={doors['ca']}",
        f"--auth-supernode-private-key={keys / 'site1'}",
        f"--auth-supernode-public-key={keys / 'site1.pub'}",
        "--isolation=subprocess", "--host=127.0.0.1", f"--port={free_port()}"],
        {"FLWR_HOME": str(doors["tmp"] / "homes" / "site1")})
    wait_for(lambda: any(n.get("status") == "online" for n in nodes(doors)), 90,
             "site1 online through the hospitals' door")
    # and nothing of the SuperLink's other APIs is forwarded even at the coordinator's door
    control = f"https://127.0.0.1:{doors['ports']['control']}"
    with httpx.Client(verify=ssl.create_default_context(cafile=doors["ca"]), timeout=10) as http:
        assert http.post(control + "/v1/runtime/acquire-task", content=b"").status_code == 403


def children_of(home: Path) -> list[str]:
    """Live processes (not zombies) whose FLWR_HOME is ``home``: a node's SuperExec and
    ClientApps inherit it from the SuperNode."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            name = (proc / "comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if f"FLWR_HOME={home}".encode() in env and state != "Z":
            found.append(f"{proc.name} {name}")
    return found


def test_a_killed_node_leaves_no_children(doors):
    """SIGKILL to the SuperNode alone, and nobody reaps it (a zombie, as under a supervisor
    that is slow to wait): its SuperExec still ends, by the parent-death signal that the
    site image's flower-superexec wrapper (deploy/site-bin) sets. Flower's own --parent-pid
    watch asks whether the pid exists, which a zombie's does."""
    home = doors["tmp"] / "homes" / "site1"
    node = doors["cluster"].procs["site1"]
    wait_for(lambda: any("superexe" in c for c in children_of(home)), 60, "site1's SuperExec")
    os.kill(node.pid, signal.SIGKILL)  # the node only, not its process group; not reaped
    wait_for(lambda: children_of(home) == [], 30, "site1's SuperExec to end with its node")
    node.wait(timeout=10)
