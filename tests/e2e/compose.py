"""Run docker-compose.yml's services as plain processes on loopback (no Docker engine here).

Each service's ``command`` is taken from the compose file itself, with compose's own
``${VAR:-default}`` interpolation, and started in its own process session with its
``environment``; every process is stopped by pid at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def load_services(env: dict[str, str]) -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    out = {}
    for name, svc in spec["services"].items():
        out[name] = {"command": [interpolate(str(a), env) for a in svc["command"]],
                     "environment": {k: interpolate(str(v), env)
                                     for k, v in (svc.get("environment") or {}).items()}}
    return out


@dataclass
class Cluster:
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, command: list[str], environment: dict | None = None) -> None:
        env = {**os.environ, **self.env, **(environment or {})}
        # The site image's PATH: the site's own flwr-clientapp (code approval) comes first.
        env["PATH"] = os.pathsep.join([str(ROOT / "deploy" / "site-bin"),
                                       str(Path(sys.executable).parent), env.get("PATH", "")])
        log = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(command, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=self.logs)

    def start_service(self, name: str, services: dict, **override) -> None:
        svc = services[name]
        command = list(svc["command"])
        for old, new in override.get("replace", {}).items():
            command = [new if a.startswith(old) else a for a in command]
        command = [a for a in command if not any(a.startswith(d)
                                                 for d in override.get("drop", ()))]
        command += override.get("add", [])
        self.start(override.get("as_name", name), command, svc["environment"])

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_exit(self, name: str, timeout: float) -> int | None:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def sweep(marker_dir: Path) -> int:
    """SIGKILL every process whose FLWR_HOME lies under ``marker_dir`` (children that Flower
    starts in sessions of their own: SuperExec, ServerApp, ClientApp)."""
    killed = 0
    prefix = f"FLWR_HOME={marker_dir}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(prefix) for e in env) and int(proc.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
    return killed


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
