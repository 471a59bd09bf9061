"""Wait until a Flower run has finished, asking the SuperLink's Control API once a second.

    python -m cli.wait_run CONNECTION RUN_ID [--interval 1] [--timeout 3600]
                           [--status-file RUN_DIR/status.json --since EPOCH_SECONDS]

Prints the final status (``finished:completed``, ``finished:failed``, ...) and exits 0, or
exits 1 on timeout. The connection is read from ``$FLWR_HOME/config.toml`` with the ``flwr``
CLI's own client code. Why not ``flwr ls`` in a loop: each ``flwr ls`` is a new Python
process (about 1 s of CPU), and ``flwr log --stream`` makes the SuperLink poll its database
twice a second; on a 2-core machine shared with five nodes both cost more than the run.

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
import sys
import time
from pathlib import Path

from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.constant import Status, SubStatus
from flwr.common.serde import run_from_proto
from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

from common.errors import FedcxrError
from common.run_status import RunStatus

FILE_POLL = 0.1  # seconds between reads of the status file (a stat and a small read)


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("connection")
    ap.add_argument("run_id", type=int)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--status-file", type=Path, default=None,
                    help="the run's status.json: finished there ends the wait")
    ap.add_argument("--since", type=float, default=0.0,
                    help="ignore a status file whose run started before this (epoch s)")
    args = ap.parse_args()
    status = wait(args.connection, args.run_id, interval=args.interval, timeout=args.timeout,
                  status_file=args.status_file, since=args.since)
    if status is None:
        print(f"run {args.run_id} did not finish within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    print(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
