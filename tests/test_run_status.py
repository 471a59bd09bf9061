"""status.json and ``fedcxr status``: the coordinator's view of a run while it goes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main
from common.run_status import ArmRound, RunStatus

ROOT = Path(__file__).resolve().parents[1]


def board(tmp_path: Path) -> RunStatus:
    return RunStatus("r", str(tmp_path), time.time() - 300, num_rounds=5)


def test_status_follows_the_phases_and_names_the_failure(tmp_path, capsys):
    b = board(tmp_path)
    with b.tracking():
        b.sites = {"st-mary": "train", "north": "evaluate"}
        b.node_ids = {"st-mary": 8113}
        b.enter("training")
        b.round = 2
        b.arms = {"federated": ArmRound(2, 2, 3), "single:st-mary": ArmRound(2, 1, 1)}
        b.failures = [{"round": 2, "arm": "federated", "site": "east", "reason": "timeout"}]
        b.epsilon = {"st-mary": 1.25}
        b.write()
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "running: training, round 2 of 5 done (phase 2 of 5)" in out
    assert "st-mary (train, node 8113)" in out and "north (evaluate)" in out
    assert "federated" in out and "st-mary 1.25" in out
    assert "round 2 federated at east: timeout" in out
    with pytest.raises(RuntimeError), b.tracking():
        raise RuntimeError("no node has role=train; nothing to train")
    back = RunStatus.read(tmp_path)
    assert back.state == "failed" and "no node has role=train" in back.error
    assert back.arms["federated"] == ArmRound(2, 2, 3)
    assert main(["status", str(tmp_path), "--watch", "0.1"]) == 1  # failed: stops watching
    assert json.loads(subprocess.run(
        [sys.executable, "-m", "cli.main", "status", str(tmp_path), "--json"], cwd=ROOT,
        capture_output=True, text=True, check=False).stdout)["state"] == "failed"


@pytest.mark.parametrize("content,message", [
    (None, "no such file"), ("{torn", "unreadable"), ('{"run_name": 3}', "not a fedcxr status")])
def test_a_missing_or_torn_status_file_is_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "status.json").write_text(content)
    r = subprocess.run([sys.executable, "-m", "cli.main", "status", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_node_that_stopped_heartbeating_is_reported_disconnected(task_identity):
    from flwr.app import Error, Message, RecordDict
    from flwr.common.constant import ErrorCode

    from server.exchange import failure_reason

    sent = Message(RecordDict(), dst_node_id=7, message_type="train", group_id="1")
    gone = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
                   reply_to=sent)
    assert failure_reason(gone).startswith("disconnected: the node stopped sending heartbeats")
    refused = Message(Error(code=4001, reason="held-out site"), reply_to=sent)
    assert failure_reason(refused) == "held-out site"



def test_the_simulation_waiter_takes_a_finished_status_file_of_this_run_only(tmp_path):
    """``fedcxr simulate`` stops waiting for Flower once the ServerApp wrote status.json as
    finished (cli/wait_run.py): only a finished file of a ServerApp started after the
    submission counts; running, failed, earlier, missing and torn files do not."""
    from cli.wait_run import finished_on_disk

    path = tmp_path / "status.json"
    since = time.time()
    assert not finished_on_disk(path, since)  # not written yet
    path.write_text('{"state": "fini')  # torn
    assert not finished_on_disk(path, since)
    earlier = RunStatus("r", str(tmp_path), since - 60, num_rounds=2)
    earlier.enter("finished")  # the last run under this name
    assert not finished_on_disk(path, since)
    b = RunStatus("r", str(tmp_path), since + 0.01, num_rounds=2)
    with b.tracking():
        b.enter("training")
        assert not finished_on_disk(path, since)
        b.enter("report")
        assert not finished_on_disk(path, since)
        b.enter("finished")
    assert finished_on_disk(path, since)
    with pytest.raises(ValueError), b.tracking():
        raise ValueError("broke")  # a failure after "finished" is a failed run
    assert not finished_on_disk(path, since)


def test_simulate_ends_with_the_verdict_and_the_results_paths(tmp_path):
    """``fedcxr simulate``'s last lines come from results.json, not from the log stream (which
    can miss the ServerApp's last lines: the federation stops as soon as status.json says
    finished); an unreadable file is named."""
    from cli.simulate import outcome

    (tmp_path / "results.json").write_text(json.dumps(
        {"verdict": {"overall": "H1 supported: the federated model ..."}}))
    lines = outcome(tmp_path).splitlines()
    assert lines == ["H1 supported: the federated model ...",
                     f"results: {tmp_path / 'results.json'} ; report: {tmp_path / 'report.html'}"]
    (tmp_path / "results.json").write_text("{")
    assert "results.json unreadable" in outcome(tmp_path)


def test_the_log_follower_notes_the_serverapps_last_line_even_in_pieces():
    """The waiter lets the log stream print until the ServerApp's last line has gone through
    (``LAST_LOG_LINE``, which the ServerApp logs right before status.json says finished);
    the stream's chunks can split it."""
    import io

    from cli.wait_run import MarkedOutput
    from common.run_status import LAST_LOG_LINE

    out = io.StringIO()
    marked = MarkedOutput(out, LAST_LOG_LINE)
    marked.write("INFO: results.json and report.html written (9.1 s)\nINFO: " + LAST_LOG_LINE[:4])
    assert not marked.seen.is_set()
    marked.write(LAST_LOG_LINE[4:] + " (9.2 s into the run)\n")
    assert marked.seen.is_set()
    assert out.getvalue().endswith(LAST_LOG_LINE + " (9.2 s into the run)\n")
    source = (ROOT / "server" / "app.py").read_text()
    assert 'log.info("%s (%s)", LAST_LOG_LINE' in source  # the ServerApp logs it
