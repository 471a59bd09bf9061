"""Wait until a Flower run has finished, asking the SuperLink's Control API once a second.

    python -m cli.wait_run CONNECTION RUN_ID [--interval 1] [--timeout 3600]
                           [--status-file RUN_DIR/status.json --since EPOCH_SECONDS]
                           [--stream-log] [--result FILE]
    python -m cli.wait_run CONNECTION --submit APP --run-config FILE
                           [--federation-config "K=V ..."] [--wait-port PORT] [...]

Prints the final status (``finished:completed``, ``finished:failed``, ...), or writes it to
``--result`` FILE (after a ``run RUN_ID`` line), and exits 0, or exits 1 on timeout.

``--submit``: start the run first, with Flower's own ``flwr run`` command called in this
process (``--format json``), once the SuperLink's ``--wait-port`` accepts connections. A
``flwr run`` process of its own imported Flower's CLI (about 1.5 s of CPU) only after the
SuperLink was up, beside the SuperExec's start that the run waits for, and this waiter then
imported it again beside the simulation's; started with the SuperLink, this process does
both imports once, while the SuperLink starts on one core and the other idles. Exits 2 when
the run could not be started (the reason on stderr). ``--stream-log`` prints the run's
log meanwhile, with Flower's own ``flwr log --stream`` code in a thread of this process:
a second process for it paid Python's and the ``flwr`` CLI's start-up (about 1 s of CPU)
again, just as the run's simulation starts on the same cores. The connection is read from
``$FLWR_HOME/config.toml`` with the ``flwr`` CLI's own client code. Why not ``flwr ls`` in
a loop: each ``flwr ls`` is a new Python process (about 1 s of CPU), and a log stream makes
the SuperLink poll its database twice a second: not a way to learn the run's end.

``--status-file``: the run's own ``status.json`` (``common.run_status``), read ten times a
second. Once the ServerApp has written it as finished (its last act, after results.json,
the report and the tracker), the run's outcome is on disk and this prints
``finished:completed`` without waiting for Flower: after the ServerApp returns, Flower's
simulation stops Ray, sleeps a second for its log uploader and only then reports the run
finished, 3-4 s in which ``fedcxr simulate`` (which stops the whole federation next) had
nothing left to wait for. A file older than ``--since`` (an earlier run under the same name)
is not this run's; a failed run is still read from the SuperLink.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# Flower's CLI app (the `flwr run` that --submit calls) is imported with the module, before
# the wait for the SuperLink's port, not after it, where the run's start waited 0.3 s for it.
from flwr.cli.app import app as flwr_cli
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.constant import Status, SubStatus
from flwr.common.serde import run_from_proto
from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

from cli.ports import wait_port
from common.errors import FedcxrError
from common.run_status import LAST_LOG_LINE, RunStatus

FILE_POLL = 0.1  # seconds between reads of the status file (a stat and a small read)
# Seconds the log stream may take to print the run's last lines once the run has finished
# (the ServerApp uploads its log at most every 0.2 s; the SuperLink streams it every 0.5 s).
LOG_GRACE = 3.0


def finished_on_disk(status_file: Path, since: float) -> bool:
    """True when ``status_file`` is a run status written by a ServerApp that started at or
    after ``since`` and says it finished. Missing, torn or foreign files are not finished."""
    try:
        status = RunStatus.read(status_file.parent)
    except FedcxrError:
        return False
    return status.state == "finished" and status.started_at >= since


def wait(connection: str, run_id: int, *, interval: float, timeout: float,
         status_file: Path | None = None, since: float = 0.0) -> str | None:
    client = init_http_client_from_connection(read_superlink_connection(connection))
    deadline = time.monotonic() + timeout
    next_ask = 0.0
    try:
        while (now := time.monotonic()) < deadline:
            if status_file is not None and finished_on_disk(status_file, since):
                return f"{Status.FINISHED}:{SubStatus.COMPLETED}"
            if now >= next_ask:
                next_ask = now + interval
                try:
                    res = client.ListRuns(ListRunsRequest(run_id=run_id))
                except Exception:  # noqa: BLE001 - a SuperLink restarting is not an answer
                    res = None
                for proto in (res.run_dict.values() if res is not None else []):
                    status = run_from_proto(proto).status
                    if status.status == Status.FINISHED:
                        return f"{status.status}:{status.sub_status}"
            time.sleep(FILE_POLL if status_file is not None else interval)
    finally:
        client.close()
    return None


def submit(app: Path, connection: str, run_config: Path,
           federation_config: str | None = None) -> int:
    """Start a run with Flower's own ``flwr run APP CONNECTION --run-config FILE --format
    json`` in this process; its run id. FedcxrError with the CLI's message when no run
    started. The JSON answer goes to the process's standard output itself (``rich``, past
    any ``sys.stdout`` redirection), so it is read from a file put under descriptor 1."""
    args = ["run", str(app), connection, "--run-config", str(run_config), "--format", "json"]
    if federation_config:
        args += ["--federation-config", federation_config]
    with tempfile.TemporaryFile(mode="w+b") as answer:
        for stream in (sys.stdout, sys.__stdout__):
            stream.flush()
        saved = os.dup(1)
        os.dup2(answer.fileno(), 1)
        failure = ""
        try:
            flwr_cli(args, standalone_mode=False)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - named below if no JSON came
            failure = f" ({type(exc).__name__}: {exc})"
        finally:
            for stream in (sys.stdout, sys.__stdout__):
                stream.flush()
            os.dup2(saved, 1)
            os.close(saved)
        answer.seek(0)
        text = answer.read().decode(errors="replace")
    try:
        return int(json.loads(text[text.index("{"): text.rindex("}") + 1])["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FedcxrError(f"flwr run did not start a run: {text.strip()[-500:]}{failure}"
                          ) from None


class MarkedOutput:
    """A text stream passing everything on to ``out`` and setting ``seen`` once ``marker``
    has gone through (also when it came in pieces)."""

    def __init__(self, out, marker: str) -> None:
        self.out, self.marker, self.seen = out, marker, threading.Event()
        self._tail = ""

    def write(self, text: str) -> int:
        self._tail = (self._tail + text)[-(len(self.marker) + 4096):]
        if self.marker in self._tail:
            self.seen.set()
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


class LogFollower:
    """Print the run's log as it comes (``flwr log RUN_ID --stream``'s own function), in a
    daemon thread with its own Control API client, noting when the ServerApp's last line
    (``LAST_LOG_LINE``) has been printed."""

    def __init__(self, connection: str, run_id: int) -> None:
        self._out = sys.stdout
        self.output = MarkedOutput(self._out, LAST_LOG_LINE)
        sys.stdout = self.output  # start_stream prints each chunk of the log
        self._thread = threading.Thread(target=self._follow, args=(connection, run_id),
                                        name="log-stream", daemon=True)
        self._thread.start()

    def _follow(self, connection: str, run_id: int) -> None:
        from flwr.cli.log import start_stream

        client = init_http_client_from_connection(read_superlink_connection(connection))
        try:
            start_stream(run_id, client)
        except Exception as exc:  # noqa: BLE001 - the log is a courtesy; the wait goes on
            print(f"(the run's log stream stopped: {exc})", file=sys.stderr)
        finally:
            client.close()

    def finish(self, completed: bool) -> None:
        """Let the stream print the run's last lines: up to ``LOG_GRACE`` seconds for the
        ServerApp's last line when the run completed (its status file can say so before
        Flower ends the stream), else for the stream to end."""
        if completed:
            self.output.seen.wait(LOG_GRACE)
        else:
            self._thread.join(LOG_GRACE)
        sys.stdout = self._out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("connection")
    ap.add_argument("run_id", type=int, nargs="?", help="the run to wait for (or --submit)")
    ap.add_argument("--submit", type=Path, default=None, metavar="APP",
                    help="start a run of this app first (flwr run), then wait for it")
    ap.add_argument("--run-config", type=Path, default=None, help="with --submit")
    ap.add_argument("--federation-config", default=None, help="with --submit")
    ap.add_argument("--wait-port", type=int, default=None,
                    help="with --submit: first wait until the SuperLink opens this port")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--status-file", type=Path, default=None,
                    help="the run's status.json: finished there ends the wait")
    ap.add_argument("--since", type=float, default=0.0,
                    help="ignore a status file whose run started before this (epoch s)")
    ap.add_argument("--stream-log", action="store_true", help="print the run's log meanwhile")
    ap.add_argument("--result", type=Path, default=None, help="also write the status here")
    args = ap.parse_args()
    if (args.run_id is None) == (args.submit is None):
        ap.error("give either RUN_ID or --submit APP")
    if args.submit is not None:
        if args.run_config is None:
            ap.error("--submit needs --run-config")
        try:
            if args.wait_port is not None:
                wait_port(args.wait_port, min(args.timeout, 120.0))
            args.run_id = submit(args.submit, args.connection, args.run_config,
                                 args.federation_config)
            if args.result is not None:  # the run's id first (cli/when_up.py waits for it)
                args.result.write_text(f"run {args.run_id}\n")
        except FedcxrError as exc:
            print(exc, file=sys.stderr)
            return 2
    log = LogFollower(args.connection, args.run_id) if args.stream_log else None
    status = wait(args.connection, args.run_id, interval=args.interval, timeout=args.timeout,
                  status_file=args.status_file, since=args.since)
    if log is not None:
        log.finish(completed=status == f"{Status.FINISHED}:{SubStatus.COMPLETED}")
    if status is None:
        print(f"run {args.run_id} did not finish within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    if args.result is not None:
        args.result.write_text(f"run {args.run_id}\n{status}\n")
    else:
        print(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
