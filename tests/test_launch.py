"""How ``fedcxr simulate`` starts a run: its SuperExec (``cli/when_up.py``) and the waiter that
submits the run (``cli/wait_run.py --submit``) start beside a SuperLink that is still coming
up, so each must wait for what it needs, and say so in one line when it never comes. The whole
path, with a real SuperLink, runs in every simulation test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.simulate import RunWaiter, free_port
from common.errors import FedcxrError

ROOT = Path(__file__).resolve().parents[1]


def _when_up(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.when_up", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_the_entry_point_runs_only_once_the_port_is_open_and_the_file_written(tmp_path):
    data = tmp_path / "in.json"
    data.write_text('{"b": 1}')
    submitted = tmp_path / "submitted"
    submitted.write_text("")  # created empty, as the waiter's result file is
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        proc = _when_up(str(port), "--file", str(submitted), "json.tool:main", str(data))
        time.sleep(2.0)  # its imports are long done; the port is open, the file still empty
        assert proc.poll() is None, proc.communicate()
        submitted.write_text("run 7\n")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"b": 1}  # json.tool's own output: it ran, with its arguments


def test_a_port_that_never_opens_is_one_line_and_exit_2():
    port = free_port()  # nobody listens there
    proc = _when_up(str(port), "json.tool:main", env={"FEDCXR_WHEN_UP_TIMEOUT": "0.5"})
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and out == ""
    assert err.strip().splitlines() == [f"main: the SuperLink did not open port {port} in 0 s"]


def _waiter(tmp_path: Path, *, timeout: float, port: int) -> RunWaiter:
    config = tmp_path / "run-config.toml"
    config.write_text("num-rounds = 1\n")
    env = {**os.environ, "FLWR_HOME": str(tmp_path)}
    return RunWaiter(tmp_path, "fedcxr", config, env, timeout=timeout, show_log=False,
                     wait_port=port)


def test_a_run_that_could_not_be_submitted_says_why(tmp_path):
    port = free_port()
    with pytest.raises(FedcxrError, match=rf"not started: .*did not open port {port}"):
        _waiter(tmp_path, timeout=0.5, port=port).result()


def test_the_wait_ends_when_a_process_the_run_needs_exits(tmp_path):
    """A SuperExec (or SuperLink) that dies leaves a run nobody will start or finish: the
    wait ends at once with its exit code and its log's last lines, not at the timeout."""
    log = tmp_path / "superexec.log"
    log.write_text("Traceback (most recent call last):\nImportError: no flwr here\n")
    dead = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    waiter = _waiter(tmp_path, timeout=600, port=free_port())
    started = time.monotonic()
    try:
        with pytest.raises(FedcxrError, match="the SuperExec exited with code 3 before the "
                                              "run ended: .*ImportError: no flwr here"):
            waiter.result(watch=((dead, log, "the SuperExec"),))
    finally:
        waiter.stop()
    assert time.monotonic() - started < 60
