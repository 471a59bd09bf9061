"""MLflow tracking (server/tracking.py), read back through MLflow's own client API."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from server.state import HistoryRow
from server.tracking import Tracker, default_uri

mlflow = pytest.importorskip("mlflow")


def rows(rnd: int, validated: int = 0) -> list[HistoryRow]:
    return [HistoryRow(rnd, "federated", 2, validated, 0.9 - rnd / 10, None, 1.5, 3.0),
            HistoryRow(rnd, "single:st-mary", 1, 1, 0.8 - rnd / 10, 0.6 + rnd / 10, 1.5)]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key))


def test_rounds_are_steps_logged_once_and_a_resume_continues_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    t = Tracker("", tmp_path)
    t.start("trial-1", {"num-rounds": 3, "dp": True})
    assert t.on and t.uri == default_uri(tmp_path)
    t.rounds(rows(1)[1:], {"st-mary": 1.5})  # round 1: the global model not validated yet
    t.rounds([*rows(1, validated=2), *rows(2)[1:]], {"st-mary": 2.5})
    first = t.run_id
    # the ServerApp dies; the resumed run continues the same MLflow run, logging only rows
    # its checkpoint had not logged
    again = Tracker("", tmp_path)
    again.start("trial-1", {"num-rounds": 3, "dp": True},
                logged={(1, "federated"), (1, "single:st-mary"), (2, "single:st-mary")})
    assert again.run_id == first
    again.rounds([*rows(1, validated=2), *rows(2, validated=2), *rows(3)[1:]],
                 {"st-mary": 3.5})
    client = MlflowClient(default_uri(tmp_path))
    run = client.get_run(first)
    assert run.data.params == {"num-rounds": "3", "dp": "True"}
    assert history(client, first, "federated/sites_validated") == [(1, 2.0), (2, 2.0)]
    assert history(client, first, "single_st-mary/val_auc") == [(1, 0.7), (2, 0.8), (3, 0.9)]
    assert history(client, first, "federated/round_seconds") == [(1, 3.0), (2, 3.0)]
    assert history(client, first, "epsilon_site/st-mary") == [(1, 1.5), (2, 2.5), (3, 3.5)]
    assert [r.info.run_name for r in client.search_runs(
        [client.get_experiment_by_name("fedcxr").experiment_id])] == ["trial-1"]
    # the end: verdict tags, the outputs, and the models the callback writes
    (tmp_path / "results.json").write_text("{}")

    def models(folder):
        (folder / "federated.pt").write_bytes(b"weights")
        return {"federated": folder / "federated.pt"}

    again.finish({"verdict": {"status": "supported", "overall": "H1 supported."},
                  "protocol": {"primary_metric": "macro-auc", "primary_labels": ["Effusion"]},
                  "primary_auc": [{"model": "single:st-mary", "site": "h1", "macro_auc": 0.7}]},
                 tmp_path, models)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["h1.verdict"] == "supported"
    assert run.data.tags["primary_endpoint"] == "macro-auc over Effusion"
    assert run.data.metrics["external_macro_auc/single_st-mary/h1"] == 0.7
    assert {a.path for a in client.list_artifacts(first)} == {"results.json", "models"}
    assert [a.path for a in client.list_artifacts(first, "models")] == ["models/federated.pt"]


def test_an_unreachable_store_never_stops_the_run_and_says_so_once(tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = Tracker(f"http://127.0.0.1:{port}", tmp_path)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        t.start("r", {"seed": 0})
        t.rounds(rows(1), {})
        t.finish({"verdict": {}}, tmp_path, lambda folder: {})
        t.failed()
    assert time.monotonic() - began < 30  # no minutes of retries
    assert not t.on
    warnings = [r.getMessage() for r in caplog.records if "tracking:" in r.getMessage()]
    assert len(warnings) == 1 and "goes on without MLflow tracking" in warnings[0]


def test_tracking_off_writes_nothing(tmp_path):
    t = Tracker("off", tmp_path)
    t.start("r", {"seed": 0})
    t.rounds(rows(1), {})
    assert not t.on and list(tmp_path.iterdir()) == []
