"""Wait until a Flower run has finished, asking the SuperLink's Control API once a second.

    python -m cli.wait_run CONNECTION RUN_ID [--interval 1] [--timeout 3600]

Prints the final status (``finished:completed``, ``finished:failed``, ...) and exits 0, or
exits 1 on timeout. The connection is read from ``$FLWR_HOME/config.toml`` with the ``flwr``
CLI's own client code. Why not ``flwr ls`` in a loop: each ``flwr ls`` is a new Python
process (about 1 s of CPU), and ``flwr log --stream`` makes the SuperLink poll its database
twice a second; on a 2-core machine shared with five nodes both cost more than the run.
"""

from __future__ import annotations

import argparse
import sys
import time

from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.constant import Status
from flwr.common.serde import run_from_proto
from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611


def wait(connection: str, run_id: int, *, interval: float, timeout: float) -> str | None:
    client = init_http_client_from_connection(read_superlink_connection(connection))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                res = client.ListRuns(ListRunsRequest(run_id=run_id))
            except Exception:  # noqa: BLE001 - a SuperLink restarting is not an answer
                res = None
            for proto in (res.run_dict.values() if res is not None else []):
                status = run_from_proto(proto).status
                if status.status == Status.FINISHED:
                    return f"{status.status}:{status.sub_status}"
            time.sleep(interval)
    finally:
        client.close()
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("connection")
    ap.add_argument("run_id", type=int)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args()
    status = wait(args.connection, args.run_id, interval=args.interval, timeout=args.timeout)
    if status is None:
        print(f"run {args.run_id} did not finish within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    print(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
