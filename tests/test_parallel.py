"""common.parallel: order, progress, errors, dead workers, and an interrupted map that lets
the interpreter exit (ProcessPoolExecutor hung there: the CI run of stop 27 passed every test
and never exited)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.parallel import SERIAL_BELOW, WorkerDied, parallel_map

ROOT = Path(__file__).resolve().parents[1]


def square(x: int) -> int:
    return x * x


def fails_at_50(x: int) -> int:
    if x == 50:
        raise ValueError("item 50 is bad")
    return x


def dies_at_50(x: int) -> int:
    if x == 50:
        os._exit(3)
    return x


def test_results_come_in_order_with_progress_for_each_item():
    items = list(range(101))
    seen = []
    out = list(parallel_map(square, items, workers=2,
                            progress=lambda done, total: seen.append((done, total))))
    assert out == [x * x for x in items]
    assert seen == [(k, 101) for k in range(1, 102)]
    assert multiprocessing.active_children() == []


def test_few_items_run_in_this_process():
    pid = os.getpid()
    assert list(parallel_map(lambda _: os.getpid(), [0] * (SERIAL_BELOW - 1),
                             workers=2)) == [pid] * (SERIAL_BELOW - 1)


def test_an_error_in_a_worker_is_raised_here_and_the_workers_end():
    with pytest.raises(ValueError, match="item 50 is bad"):
        list(parallel_map(fails_at_50, list(range(100)), workers=2))
    assert multiprocessing.active_children() == []


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(WorkerDied, match="exit code 3"):
        list(parallel_map(dies_at_50, list(range(100)), workers=2))
    assert multiprocessing.active_children() == []


INTERRUPTED = textwrap.dedent("""
    import numpy as np
    from common.parallel import parallel_map

    def big(i):  # results of 4 MB: a worker is often terminated while it sends one
        return np.full(1_000_000, i, dtype=np.float32)

    def ctrl_c(done, total):  # where Ctrl-C lands in `site prepare`: its progress callback
        if done == 20:
            raise KeyboardInterrupt

    if __name__ == "__main__":
        try:
            for _ in parallel_map(big, list(range(200)), workers=2, progress=ctrl_c):
                pass
        except KeyboardInterrupt:
            print("stopped", flush=True)
""")


def test_an_interrupted_map_lets_the_interpreter_exit(tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for attempt in range(5):  # ProcessPoolExecutor hung in about half of them
        try:
            done = subprocess.run([sys.executable, str(script)], env=env, timeout=60,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            pytest.fail(f"attempt {attempt}: the process did not exit after the map stopped")
        assert done.returncode == 0 and "stopped" in done.stdout, done.stderr
