"""The federation on Flower's real simulation engine (SuperLink + Ray) and its parts."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg

from cli.simulate import simulate
from common.config import RunConfig, as_flower
from common.errors import FedcxrError
from common.labels import LABELS
from common.model import build_model, save_checkpoint
from common.synth import SynthOptions, generate
from server.updates import UpdateStore
from tests.conftest import all_lists

CONFIG = {"num-rounds": 2, "image-size": 32, "batch-size": 16}


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """2 training sites + 1 held-out site, 40 images each."""
    out = tmp_path_factory.mktemp("fedcohort")
    generate(out, SynthOptions(sites=3, held_out=1, images_per_site=40, size=64, seed=5,
                               readers=2, min_cell=1))  # validation splits of ~5 images
    return out / "cohort.toml"


def flower_processes() -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "fedcxr-flwr-home" in cmd or "flower-superlink" in cmd or "flower-superexec" in cmd:
            found.append(cmd[:120])
    return found


@pytest.fixture(scope="module")
def run_a(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    audit = out / "audit.jsonl"
    torch.manual_seed(3)  # a model not trained in the run (GroupNorm: its norm travels too)
    save_checkpoint(build_model(norm="group"), out / "outside.pt")
    code = simulate(small_cohort, {**CONFIG, "out-dir": str(out), "run-name": "a",
                                   "extra-models": f"outside={out / 'outside.pt'}"},
                    extra_env={"FEDCXR_AUDIT_LOG": str(audit)})
    assert code == 0
    return out / "a", audit


def test_results_have_both_arms_external_metrics_and_verdict(run_a):
    run_dir, _ = run_a
    results = json.loads((run_dir / "results.json").read_text())
    arms = {a["name"]: a for a in results["arms"] if a["kind"] != "extra"}
    assert set(arms) == {"federated", "single:site1", "single:site2"}
    assert all(a["status"] == "complete" for a in arms.values())
    # One selection rule for every arm: each arm's best_round is the argmax of its own
    # validation history (single-site arms: validated at their own site).
    for arm in arms.values():
        assert arm["selection"] == "best-val" and isinstance(arm["best_round"], int)
        scored = [h for h in arm["history"] if h["val_auc"] is not None]
        assert arm["best_round"] == max(scored, key=lambda h: h["val_auc"])["round"], arm
    protocol = results["protocol"]
    assert protocol["selection"] == "best-val" and protocol["clustered_by"] == "patient"
    assert protocol["primary_metric"] == "macro-auc" and protocol["margin"] == 0.0
    annotated = [lb for lb in LABELS if all(
        c["prevalence"][lb] is not None for c in results["cohort"] if c["role"] == "train")]
    assert protocol["primary_labels"] == annotated
    # The primary family: held-out site x single-site model, never the extra model
    primary = results["verdict"]["primary"]
    assert {(r["site"], r["model_b"]) for r in primary} == {("site3", "single:site1"),
                                                            ("site3", "single:site2")}
    assert all(r["mdd"] > 0 and 0 <= r["p_adjusted"] <= 1 for r in primary)
    assert results["verdict"]["status"] in ("supported", "contradicted", "inconclusive")
    assert results["verdict"]["rule"].startswith("H1 is supported when")
    assert results["clustering"][0]["clustered_by"] == "patient"
    # Internal validation: every training site, every selected arm, on its test split
    internal = {(r["site"], r["model"]) for r in results["internal"]}
    assert internal == {(s, m) for s in ("site1", "site2") for m in arms}
    drops = {(d["model"], d["label"]) for d in results["internal_external"]}
    assert ("federated", "primary (macro-AUC)") in drops
    # The extra model is evaluated beside the arms and compared as secondary analysis only
    extra = [a for a in results["arms"] if a["kind"] == "extra"]
    assert [a["name"] for a in extra] == ["outside"]
    assert any(c["model_b"] == "outside" for c in results["comparisons"])
    history = arms["federated"]["history"]
    assert [h["round"] for h in history] == [1, 2]
    # Every global model was validated at both training sites: round 1's by the train
    # messages of round 2, round 2's with the single-site models before thresholds.
    assert all(h["val_auc"] is not None and h["sites_validated"] == 2
               and h["sites_trained"] == 2 for h in history), history
    best = max(history, key=lambda h: h["val_auc"])
    assert arms["federated"]["best_round"] == best["round"]
    assert results["provenance"]["config"]["validation_mean_auc"]["federated"] == \
        pytest.approx(best["val_auc"])
    models = {r["model"] for r in results["external"] if r["site"] == "site3"}
    assert models == set(arms) | {"outside"}
    assert any(r["auc"] is not None for r in results["external"])
    assert results["comparisons"] and all("p_adjusted" in c for c in results["comparisons"])
    assert {c["model_a"] for c in results["comparisons"]} == {"federated"}
    assert results["verdict"]["overall"].startswith("H1 ")
    assert results["screening"]["rejected"] == 0 and results["screening"]["failures"] == []
    probe = results["screening"]["role_probe"]
    assert [(p["site"], p["refused"]) for p in probe] == [("site3", True)], probe
    assert {c["site"]: c["role"] for c in results["cohort"]} == {
        "site1": "train", "site2": "train", "site3": "evaluate"}
    thresholds = results["provenance"]["config"]["thresholds"]
    assert set(thresholds) == set(arms) | {"outside"} and thresholds["federated"]
    assert (run_dir / "report.html").is_file()
    lines = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 2 * 3
    # keep-checkpoints "last,best" (the default): latest.pt, the last round and the round
    # of the federated arm's selected model, nothing else
    best = arms["federated"]["best_round"]
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "latest.pt", "round-002.pt", f"round-{best:03d}.pt", "weights"}
    # ... and the model files those name (every arm's current and selected model), no other
    from common.file_names import safe_name
    from server import checkpoint

    named = {w.path.name for p in (run_dir / "checkpoints").glob("*.pt")
             for w in checkpoint.load(str(p))["state"].stored()}
    assert {p.name for p in (run_dir / "checkpoints" / "weights").iterdir()} == named
    assert {f"{safe_name(f'round-002-{arm}')}.pkl" for arm in arms} <= named
    # status.json (fedcxr status) followed the run to its end
    from common.run_status import RunStatus

    status = RunStatus.read(run_dir)
    assert (status.state, status.phase, status.round) == ("finished", "finished", 2)
    assert status.sites == {"site1": "train", "site2": "train", "site3": "evaluate"}
    assert status.arms["federated"].sites_validated == 2 and status.failures == []
    assert set(status.node_ids) == set(status.sites)
    # metrics.csv is the history results.json reports, row for row
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = [{k: (None if v == "" else v) for k, v in r.items()} for r in csv.DictReader(fh)]
    reported = sorted((h for a in results["arms"] for h in a["history"]),
                      key=lambda h: (h["round"], h["arm"]))
    assert sorted((int(r["round"]), r["arm"], int(r["sites_trained"]),
                    int(r["sites_validated"])) for r in rows) == [
        (h["round"], h["arm"], h["sites_trained"], h["sites_validated"]) for h in reported]


def test_no_processes_left_behind(run_a):
    assert flower_processes() == []


def test_nothing_per_image_leaves_a_site(run_a, small_cohort):
    run_dir, audit = run_a
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = {e["type"] for e in entries}  # (the refused role probe sends no reply)
    assert kinds == {"query", "train", "evaluate.validate", "evaluate.internal",
                     "evaluate.score", "evaluate.external"}
    state = build_model().state_dict()  # the run's models (BatchNorm: dp is off)
    sizes = {"float": [sum(v.numel() for v in state.values() if v.is_floating_point())],
             "int": [sum(v.numel() for v in state.values() if not v.is_floating_point())]}
    allowed_config = {"role", "site", "format", "privacy-unit", "arm", "single-arm", "model",
                      "json"}
    site_sizes = {40}  # every site has 40 images; nothing may come back in a list that long
    for e in entries:
        for name, rec in e["records"].items():
            if rec["kind"] == "ArrayRecord":
                assert rec["body"] == sizes, name  # exactly one model's values, packed
            elif rec["kind"] == "MetricRecord":
                for key, value in rec["body"].items():
                    if isinstance(value, list):
                        assert len(value) in (14, 1001), (name, key, len(value))
            else:
                assert rec["kind"] == "ConfigRecord"
                assert set(rec["body"]) <= allowed_config, rec["body"].keys()
                if "json" in rec["body"]:
                    body = json.loads(rec["body"]["json"])
                    for lst in all_lists(body):
                        assert len(lst) not in site_sizes
                    text = rec["body"]["json"]
                    # no patient id (synthetic ids are site<k>-p<5 digits>), no id column,
                    # no file name; "clustered_by": "patient" names a method, not a patient
                    assert not re.search(r"-p\d{5}", text) and "patient_id" not in text
                    assert ".dcm" not in text and ".png" not in text
    # The held-out site's per-image scores exist, on its own disk only.
    stored = sorted((small_cohort.parent / "site3" / ".fedcxr" / "external" / "a").glob("*.npy"))
    assert [p.stem for p in stored] == ["federated", "outside", "single_site1", "single_site2"]
    assert all(np.load(p).shape == (40, 14) for p in stored)
    assert not (run_dir / "updates").exists()  # the coordinator's spilled updates are removed


def test_every_message_a_site_handles_is_in_its_audit_log(run_a, small_cohort, capsys):
    """Each node appends one line per message to audit.jsonl in its state folder: what was
    asked, what left (record names and byte sizes, never values), refusals with reason."""
    from cli.main import main

    root = small_cohort.parent
    site1 = [json.loads(x) for x in (root / "site1" / ".fedcxr" / "audit.jsonl")
             .read_text().splitlines()]
    assert {e["type"] for e in site1} >= {"query", "train", "evaluate.validate",
                                          "evaluate.internal"}
    trains = [e for e in site1 if e["type"] == "train"]
    assert sorted(e["round"] for e in trains) == [1, 2]
    assert all(e["arms"] == ["federated", "single:site1"] and e["outcome"] == "ok"
               for e in trains)
    state = build_model().state_dict()
    model_bytes = (4 * sum(v.numel() for v in state.values() if v.is_floating_point())
                   + 8 * sum(v.numel() for v in state.values() if not v.is_floating_point()))
    # one model's values (float32 and int64), plus the two arrays' serialisation headers
    assert 0 <= trains[0]["records"]["arrays"] - model_bytes < 1024
    held_out = [json.loads(x) for x in (root / "site3" / ".fedcxr" / "audit.jsonl")
                .read_text().splitlines()]
    refused = [e for e in held_out if e["type"] == "train"]
    assert refused and all(e["outcome"].startswith("refused (ROLE)") for e in refused)
    assert {"evaluate.score", "evaluate.external"} <= {e["type"] for e in held_out}
    text = (root / "site1" / ".fedcxr" / "audit.jsonl").read_text()
    assert not re.search(r"-p\d{5}", text) and ".png" not in text  # no ids, no files
    assert main(["site", "audit", str(root / "site3")]) == 0
    out = capsys.readouterr().out
    assert "refused (ROLE)" in out and "evaluate.external" in out


def test_a_simulation_scores_at_the_held_out_site_before_internal_validation(run_a,
                                                                           small_cohort):
    """``fedcxr simulate`` runs the sites on a few shared processes (it sets max-in-flight):
    the held-out side of validation (every model scored, then the statistics) is the
    phase's one chain, so its scoring goes first and every internal validation is handled
    after the last score (each site's audit log: when each message was handled)."""
    from common.run_status import RunStatus

    run_dir, _ = run_a
    status = RunStatus.read(run_dir)
    root = small_cohort.parent

    def handled(site: str, kind: str) -> list[float]:
        entries = [json.loads(x) for x in (root / site / ".fedcxr" / "audit.jsonl")
                   .read_text().splitlines()]
        return [e["time"] for e in entries
                if e["node"] == status.node_ids[site] and e["type"] == kind]

    scored = handled("site3", "evaluate.score")
    internal = handled("site1", "evaluate.internal") + handled("site2", "evaluate.internal")
    assert len(scored) == 4 and len(internal) == 6  # 3 arms and the outside model; 3 arms x 2
    assert max(scored) < min(internal)
    assert handled("site3", "evaluate.external")[0] > max(scored)


def test_the_analysis_loads_from_the_last_rounds_first_idle_core():
    """The rule ``train_round`` starts the analysis' import by in its last round: in a
    simulation (one site at a time per core: max-in-flight) once fewer sites are still
    training than cores; deployed nodes (max-in-flight 0) share no cores with the
    ServerApp, and never trigger it (it then starts at selection)."""
    from common.config import parse
    from server.app import a_core_idles

    simulated = parse(RunConfig, {"max-in-flight": 2}, what="run config")
    assert [a_core_idles(simulated, 3, k) for k in range(4)] == [False, False, True, False]
    assert [a_core_idles(simulated, 1, k) for k in range(2)] == [True, False]
    deployed = parse(RunConfig, {"max-in-flight": 0}, what="run config")
    assert not any(a_core_idles(deployed, 3, k) for k in range(4))


_LIGHT_VALIDATION_PROBE = """
import sys
import numpy as np
import pandas as pd
from common.evaluation.external import internal_validation
rng = np.random.default_rng(0)
labels = (rng.random((60, 14)) < 0.3).astype(float)
scores = {"m": rng.random((60, 14))}
meta = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(60)]})
result = internal_validation(labels, scores, meta, site="s", primary=["Effusion"])
assert result["internal"], result
print([m for m in ("scipy.stats", "sklearn", "statsmodels") if m in sys.modules])
"""


def test_internal_validation_loads_no_statistics_library():
    """A training site's internal validation (clustered AUCs with their CIs) and a held-out
    site's scoring import neither scipy.stats, scikit-learn nor statsmodels (1.2 s, which
    the first validation message in each simulated site process paid): the normal
    quantile is scipy.special's ``ndtri``, what ``scipy.stats.norm.ppf`` computes with.
    A fresh interpreter: this one has imported them all."""
    done = subprocess.run([sys.executable, "-c", _LIGHT_VALIDATION_PROBE], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_run_whose_arms_never_train_gives_no_verdict(small_cohort, tmp_path):
    """Every train message refused (a budget too small for one round): no round is
    aggregated, no arm is evaluated as if trained, and results.json says why instead of a
    verdict on initial weights; nothing is spent."""
    root = small_cohort.parent
    tiny = root / "cohort-tiny-budget.toml"
    tiny.write_text(re.sub(r'(role = "train"\n)', r'\1max-epsilon = 0.001\n',
                           small_cohort.read_text()))
    assert tiny.read_text().count("max-epsilon = 0.001") == 2
    for site in ("site1", "site2"):
        (root / site / ".fedcxr" / "ledger.jsonl").unlink(missing_ok=True)
    code = simulate(tiny, {**CONFIG, "out-dir": str(tmp_path), "run-name": "broke",
                           "dp": True})
    assert code == 0
    results = json.loads((tmp_path / "broke" / "results.json").read_text())
    arms = {a["name"]: a for a in results["arms"]}
    assert {a["status"] for a in arms.values()} == {"not trained"}
    assert "privacy budget" in arms["federated"]["reason"] or \
        "exceeded" in arms["single:site1"]["reason"]
    verdict = results["verdict"]
    assert verdict["status"] == "not testable" and "never trained" in verdict["overall"]
    assert results["external"] == [] and verdict["primary"] == []
    assert all(p["delta"] is not None and p["delta"] <= 1e-5 for p in results["privacy"])
    for site in ("site1", "site2"):
        assert not (root / site / ".fedcxr" / "ledger.jsonl").exists()


def checkpoint_arms(path: Path) -> dict:
    from server import checkpoint
    from server.weight_files import load

    return {arm: load(w) for arm, w in checkpoint.load(str(path))["state"].arms.items()}


def test_killed_and_resumed_run_ends_with_the_same_weights(run_a, small_cohort, tmp_path):
    reference, _ = run_a
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "simulate", "--cohort", str(small_cohort),
         "--run-config", " ".join(f"{k}={v}" for k, v in CONFIG.items()),
         "--run-config", f"out-dir={out} run-name=k"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "k" / "checkpoints" / "round-001.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert first.exists(), "no round-1 checkpoint appeared"
    os.kill(proc.pid, signal.SIGTERM)  # kill the whole run: SuperLink, ServerApp, nodes
    proc.wait(timeout=60)
    assert not (out / "k" / "results.json").exists()
    assert flower_processes() == []
    code = simulate(small_cohort, {**CONFIG, "out-dir": str(tmp_path / "resumed"),
                                   "resume-from": str(first)})
    assert code == 0
    resumed = checkpoint_arms(tmp_path / "resumed" / "k" / "checkpoints" / "round-002.pt")
    uninterrupted = checkpoint_arms(reference / "checkpoints" / "round-002.pt")
    for arm, weights in uninterrupted.items():
        diff = max(float(np.abs(weights[k].astype(np.float64)
                                - resumed[arm][k].astype(np.float64)).max()) for k in weights)
        assert diff <= 1e-5, (arm, diff)


def test_a_site_failing_mid_round_leaves_its_arm_incomplete(small_cohort, tmp_path):
    code = simulate(small_cohort, {**CONFIG, "out-dir": str(tmp_path), "run-name": "drop"},
                    extra_env={"FEDCXR_FAULT": "site2:2"})
    assert code == 0
    results = json.loads((tmp_path / "drop" / "results.json").read_text())
    arms = {a["name"]: a for a in results["arms"]}
    assert arms["single:site2"]["status"] == "incomplete"
    assert "round 2" in arms["single:site2"]["reason"]
    assert "injected fault" in arms["single:site2"]["reason"]
    assert arms["federated"]["status"] == "complete"
    assert arms["single:site1"]["status"] == "complete"
    failures = results["screening"]["failures"]
    assert {(f["arm"], f["round"]) for f in failures} == {("federated", 2),
                                                          ("single:site2", 2)}
    fed = [h for h in arms["federated"]["history"] if h["round"] == 2][0]
    assert fed["sites_validated"] == 2  # validation still at both; training from site1 only
    assert fed["sites_trained"] == 1


def test_dp_run_spends_from_each_sites_ledger(small_cohort, tmp_path):
    """dp=true on the simulation engine: GroupNorm models, both arms of every round spend
    from the training site's own ledger (on its disk), and the ε the run reports for each
    site is what that ledger composes to; the held-out site has no ledger."""
    from common.privacy import PrivacyLedger, Spend, compose_epsilon

    root = small_cohort.parent
    for site in ("site1", "site2", "site3"):
        (root / site / ".fedcxr" / "ledger.jsonl").unlink(missing_ok=True)
    code = simulate(small_cohort, {**CONFIG, "out-dir": str(tmp_path), "run-name": "dp",
                                   "dp": True, "target-epsilon": 4.0})
    assert code == 0
    results = json.loads((tmp_path / "dp" / "results.json").read_text())
    privacy = {p["site"]: p for p in results["privacy"]}
    assert set(privacy) == {"site1", "site2"}
    for site, row in privacy.items():
        ledger = PrivacyLedger(root / site / ".fedcxr" / "ledger.jsonl")
        done = [e for e in ledger.entries() if e["status"] == "completed"]
        counts = [e for e in done if e["arm"] == "label-counts"]
        done = [e for e in done if e["arm"] != "label-counts"]
        assert sorted((e["round"], e["arm"]) for e in done) == [
            (1, "federated"), (1, f"single:{site}"), (2, "federated"), (2, f"single:{site}")]
        assert all(e["run_id"] == "dp" for e in done)
        # the label counts behind pos_weight and prevalence: one noised release per run
        assert len(counts) == 1 and (counts[0]["steps"], counts[0]["sample_rate"]) == (1, 1.0)
        total = ledger.epsilon(done[0]["delta"])
        assert row["epsilon"] == pytest.approx(total, rel=1e-6)
        training = compose_epsilon([Spend(e["steps"], e["sample_rate"], e["noise_multiplier"])
                                    for e in done], done[0]["delta"], "prv")
        assert 0 < training <= 4.0 * 1.01  # the run's target, over its 4 units
        assert total > training  # the label-count release is composed in as well
        assert row["delta"] == done[0]["delta"] <= 1e-5
        released = {r["statistic"]: r for r in results["releases"] if r["site"] == site}
        assert released["model weights"]["covered_by_dp"]
        assert released["label counts (prevalence; pos_weight used in training)"][
            "covered_by_dp"]
        roc = released["validation ROC counts"]
        assert not roc["covered_by_dp"] and not roc["sent"] and "withheld" in roc["note"]
    # ... and indeed no site sent ROC counts: no threshold could be fixed from them
    assert all(t == {} for t in results["provenance"]["config"]["thresholds"].values())
    assert not (root / "site3" / ".fedcxr" / "ledger.jsonl").exists()
    arms = checkpoint_arms(tmp_path / "dp" / "checkpoints" / "round-002.pt")
    assert not any("running_mean" in k for k in arms["federated"])  # GroupNorm under DP


def test_held_out_node_refuses_to_train(small_cohort, task_identity):
    from client.app import app
    from common import protocol as wire

    run_config = {**as_flower(RunConfig()), **CONFIG, "cohort": str(small_cohort)}
    held_out = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 3},
                       state=RecordDict(), run_config=run_config)
    msg = Message(RecordDict({"config": ConfigRecord({"arm": "federated",
                                                      "server-round": 1})}),
                  dst_node_id=7, message_type="train")
    reply = app(msg, held_out)  # an error reply with our code, not an exception
    assert wire.refusal(reply) is wire.Refusal.ROLE and "never trains" in reply.error.reason


def test_evaluate_actions_run_only_at_their_role(small_cohort, task_identity):
    """External statistics asked of a training node, or validation of a held-out one: a
    WRONG_ROLE refusal before the handler runs, never data read for the wrong purpose."""
    from client.app import app
    from common import protocol as wire

    run_config = {**as_flower(RunConfig()), **CONFIG, "cohort": str(small_cohort)}

    def node(partition: int) -> Context:
        return Context(run_id=1, node_id=5, node_config={"partition-id": partition,
                                                         "num-partitions": 3},
                       state=RecordDict(), run_config=run_config)

    external = Message(wire.ExternalRequest("r", ["federated"], {"federated": {}}, [],
                                            []).encode(), dst_node_id=5,
                       message_type=wire.EXTERNAL)
    reply = app(external, node(0))  # site1 trains
    assert wire.refusal(reply) is wire.Refusal.WRONG_ROLE and "evaluate nodes" in \
        reply.error.reason
    validate = Message(wire.ValidateRequest({}, "batch").encode(), dst_node_id=5,
                       message_type=wire.VALIDATE)
    assert wire.refusal(app(validate, node(2))) is wire.Refusal.WRONG_ROLE  # site3 held out
    assert wire.refusal(app(validate, node(0))) is None  # and a training node answers


def _reply(node: int, arrays: dict[str, np.ndarray], examples: int = 10) -> Message:
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": examples})}),
                  dst_node_id=0, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node  # as if it came from that node
    return msg


def _screen(tmp: Path, replies: list[Message], ref: dict, sites: dict) -> UpdateStore:
    store = UpdateStore(tmp, ref, round=1, sites=sites)
    for r in replies:
        store.add(r)
    store.screen(10.0)
    return store


def test_screening_rejects_nan_and_scaled_updates_and_median_stays_sane(task_identity,
                                                                        tmp_path):
    rng = np.random.default_rng(0)
    ref = {"w": np.zeros(50, np.float32), "count": np.array(3)}
    honest = [{"w": rng.normal(0, 0.1, 50).astype(np.float32), "count": np.array(4)}
              for _ in range(2)]
    nan = {"w": honest[0]["w"].copy(), "count": np.array(4)}
    nan["w"][3] = np.nan
    scaled = {"w": honest[1]["w"] * 100, "count": np.array(4)}
    replies = [_reply(1, honest[0]), _reply(2, honest[1]), _reply(3, nan), _reply(4, scaled)]
    store = _screen(tmp_path / "a", replies, ref, {1: "a", 2: "b", 3: "c", 4: "d"})
    assert [u.node for u in store.updates] == [1, 2]
    reasons = {r.site: r.reason for r in store.rejected}
    assert reasons["c"] == "non-finite values" and "over 10x" in reasons["d"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["node-1.bin", "node-2.bin"]
    store.close()
    assert not (tmp_path / "a").exists()
    # Two honest sites only: leave-one-out median still catches a scaled one
    store = _screen(tmp_path / "b", [_reply(1, honest[0]), _reply(4, scaled)], ref,
                    {1: "a", 4: "d"})
    assert [u.node for u in store.updates] == [1] and store.rejected[0].site == "d"
    # Without screening, FedMedian keeps the model sane where FedAvg does not.
    third = {"w": rng.normal(0, 0.1, 50).astype(np.float32), "count": np.array(4)}
    def unscreened():  # fresh messages per aggregator: aggregation consumes them
        return [_reply(1, honest[0]), _reply(2, honest[1]), _reply(5, third),
                _reply(4, scaled)]

    median, _ = FedMedian(min_available_nodes=1).aggregate_train(1, unscreened())
    mean, _ = FedAvg(min_available_nodes=1).aggregate_train(1, unscreened())
    assert np.abs(median.to_numpy_ndarrays()[0]).max() < 0.5
    assert np.abs(mean.to_numpy_ndarrays()[0]).max() > 2.0


@pytest.mark.parametrize("make", [
    lambda: FedAvg(min_available_nodes=1), lambda: FedMedian(min_available_nodes=1),
    lambda: FedTrimmedAvg(beta=0.2, min_available_nodes=1),
    lambda: FedAdam(eta=1e-2, min_available_nodes=1)], ids=["avg", "median", "trimmed", "adam"])
def test_aggregation_from_disk_in_key_groups_equals_flower_on_all_replies(make, task_identity,
                                                                          tmp_path):
    """Spilled, key-group-wise aggregation gives what the strategy gives on all replies at
    once (fp16 transport included), even with a budget that forces one key per group."""
    rng = np.random.default_rng(1)
    ref = {f"layer{i}": rng.normal(0, 1, (3, 4)).astype(np.float32) for i in range(5)}
    ref["count"] = np.array(7)
    updates = [({k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float16 if i == 2 else
                                                              np.float32)
                 if k != "count" else np.array(8) for k, v in ref.items()}, 10 + 5 * i)
               for i in range(5)]

    def replies():
        return [_reply(i + 1, a, n) for i, (a, n) in enumerate(updates)]

    expected_strategy, got_strategy = make(), make()
    for s in (expected_strategy, got_strategy):
        if isinstance(s, FedAdam):
            s.current_arrays = {k: v.astype(np.float32) for k, v in ref.items()}
    as32 = [_reply(i + 1, {k: v.astype(np.float32) if v.dtype == np.float16 else v
                           for k, v in a.items()}, n) for i, (a, n) in enumerate(updates)]
    expected, _ = expected_strategy.aggregate_train(1, as32)
    store = _screen(tmp_path, replies(), ref, {})
    assert len(store.updates) == 5
    got = store.aggregate(got_strategy, budget_bytes=1)
    assert set(got) == set(ref)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(got["layer0"] - ref["layer0"]).max() > 1e-3  # it did move


def test_single_site_arm_is_not_tested_on_labels_its_site_never_annotated():
    from common.protocol import SiteFacts
    from server.app import Node, exclude_unlabelled

    prevalence = [0.1] * 14
    prevalence[10] = -1.0  # Emphysema unknown at site2 (CheXpert-style labeller)
    facts = SiteFacts("train", "site2", "chexpert", 10, 5, 5, 20, prevalence, -1, -1, 10)
    nodes = {1: Node(1, facts)}
    ev = {"external": [{"model": "single:site2", "label": "Emphysema", "status": "ok"},
                       {"model": "single:site2", "label": "Edema", "status": "ok"}],
          "comparisons": [{"model_b": "single:site2", "label": "Emphysema"},
                          {"model_b": "single:site2", "label": "Edema"}]}
    out = exclude_unlabelled(ev, nodes)
    assert [c["label"] for c in out["comparisons"]] == ["Edema"]
    assert out["external"][0]["status"].startswith("not trained")
    assert out["external"][1]["status"] == "ok"


def test_one_selection_rule_for_every_arm():
    """best-val keeps each arm's best validated round (the earliest on a tie) with that
    round's ROC counts; last keeps the last round whatever its AUC."""
    from server.app import PooledValidation, RunState, _consider

    def val(mean, tag):
        return PooledValidation(["s"], [] if mean is None else [mean], np.array([tag]),
                                np.array([tag]))

    aucs = {"federated": [0.6, 0.8, 0.8, 0.7], "single:s1": [0.9, None, 0.5, 0.6]}
    for rule, expected in (("best-val", {"federated": 2, "single:s1": 1}),
                           ("last", {"federated": 4, "single:s1": 4})):
        st = RunState()
        for arm, series in aucs.items():
            for rnd, mean in enumerate(series, start=1):
                _consider(st, arm, rnd, val(mean, rnd), {"w": np.full(2, rnd)}, rule)
        for arm, rnd in expected.items():
            sel = st.selected[arm]
            assert sel.round == rnd, (rule, arm)
            assert sel.pos[0] == rnd and sel.weights["w"][0] == rnd


def test_a_selected_model_is_its_rounds_file_and_the_arms_next_weights_are_a_new_one(
        tmp_path):
    """No copy of the selected weights (the largest state the server kept with an arm per
    site): the selection names the arm's file of that round; the arm's next weights are a
    new file, so the selection keeps its round's values, and the server holds no model."""
    from server.app import PooledValidation, RunState, _consider
    from server.weight_files import StoredWeights, WeightFiles

    files = WeightFiles(tmp_path / "weights")
    st = RunState()
    st.arms["a"] = files.put("round-001-a", {"w": np.full(3, 1.0)})
    _consider(st, "a", 1, PooledValidation(["s"], [0.9], None, None), st.arms["a"], "best-val")
    assert st.selected["a"].weights is st.arms["a"]
    assert isinstance(st.arms["a"], StoredWeights)
    st.arms["a"] = files.put("round-002-a", {"w": np.full(3, 2.0)})
    _consider(st, "a", 2, PooledValidation(["s"], [0.5], None, None), st.arms["a"], "best-val")
    assert st.selected["a"].round == 1 and st.selected["a"].weights.load()["w"][0] == 1.0
    assert st.arms["a"].load()["w"][0] == 2.0
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        "round-001-a.pkl", "round-002-a.pkl"]


def test_a_model_file_stays_in_its_folder_and_two_arms_never_share_one(tmp_path):
    """An arm's name holds the site's name, which the site reports: the file name keeps
    only safe characters, and names that differ only in the others get different files."""
    from server.weight_files import WeightFiles

    files = WeightFiles(tmp_path / "w")
    a = files.put("round-001-single:../../evil", {"w": np.zeros(1)})
    b = files.put("round-001-single:.._.._evil", {"w": np.ones(1)})
    assert a.path.parent == b.path.parent == (tmp_path / "w").resolve()
    assert a.path != b.path and a.load()["w"][0] == 0 and b.load()["w"][0] == 1
    assert files.put("round-001-federated", {"w": np.ones(1)}).path.name == \
        "round-001-federated.pkl"


def test_run_state_round_trips_through_a_checkpoint(tmp_path):
    """Typed run state -> checkpoint file -> the same typed state (arrays by value), and a
    checkpoint of the earlier shape (only the best global model) reads as the federated
    arm's selection."""
    from server import checkpoint
    from server.state import Failure, HistoryRow, RunState, SelectedModel
    from server.updates import Rejection

    w = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    st = RunState(round=2, arms={"federated": w},
                  selected={"single:s1": SelectedModel(1, 0.7, np.ones((14, 3), np.int64),
                                                       np.zeros((14, 3), np.int64), ["s1"], w)},
                  history=[HistoryRow(1, "federated", 2, 2, 0.5, 0.6, None, 3.2)],
                  rejections=[Rejection(1, 3, "s3", "non-finite values")],
                  failures=[Failure(2, "single:s2", "s2", 4, "no reply")], epsilon={"s1": 1.5})
    checkpoint.save("r", {"seed": 0}, st, tmp_path, 2)
    back = checkpoint.load(str(tmp_path))["state"]
    assert back.history == st.history and back.failures == st.failures
    assert back.rejections == st.rejections and back.epsilon == st.epsilon
    sel = back.selected["single:s1"]
    assert sel.round == 1 and np.array_equal(sel.pos, st.selected["single:s1"].pos)
    assert np.array_equal(back.arms["federated"]["a"], w["a"])
    old = RunState.from_checkpoint({"round": 1, "best": {
        "round": 1, "mean_val_auc": 0.6, "pos": None, "neg": None, "sites": [], "weights": w}})
    assert old.selected["federated"].mean_val_auc == 0.6
    # a history row of before sites_trained / sites_validated keeps its one count as validated
    older = RunState.from_checkpoint({"round": 1, "history": [
        {"round": 1, "arm": "federated", "sites_answered": 3, "loss": 0.5, "val_auc": 0.6,
         "epsilon": None, "seconds": 1.0}]})
    assert (older.history[0].sites_validated, older.history[0].sites_trained) == (3, 0)


def test_a_checkpoint_names_its_models_files_and_resumes_from_a_moved_folder(tmp_path):
    """Format 3: the models are files under checkpoints/weights (the pickle holds no
    array), read back by value; a run folder moved elsewhere still resumes from its own
    files; a missing file is one line naming it."""
    import shutil

    from server import checkpoint
    from server.state import RunState, SelectedModel
    from server.weight_files import StoredWeights

    run = tmp_path / "out" / "r"
    files = checkpoint.weight_files(run)
    w1 = files.put("round-001-federated", {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                           "n": np.array(7, np.int64),
                                           "big": np.zeros(250_000, np.float32)})
    w2 = files.put("round-002-federated", {"a": np.ones((2, 3), np.float32),
                                           "n": np.array(8, np.int64)})
    st = RunState(round=2, arms={"federated": w2},
                  selected={"federated": SelectedModel(1, 0.7, None, None, ["s1"], w1)})
    path = checkpoint.save("r", {}, st, run, 2)
    assert path.stat().st_size < 20_000  # names the 1 MB model, not its bytes
    moved = tmp_path / "elsewhere" / "r"
    shutil.move(run, moved)
    back = checkpoint.load(str(moved))["state"]
    assert isinstance(back.arms["federated"], StoredWeights)
    assert back.arms["federated"].path.parent == (moved / "checkpoints" / "weights").resolve()
    sel = back.selected["federated"].weights.load()
    assert sel["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and sel["n"].dtype == np.int64
    assert back.arms["federated"].load()["n"] == 8
    other = checkpoint.weight_files(tmp_path / "resumed-elsewhere")
    back.spill(other)  # resumed into another out-dir: its files become that run's own
    assert {p.name for p in other.folder.iterdir()} == {"round-001-federated.pkl",
                                                        "round-002-federated.pkl"}
    assert back.selected["federated"].weights.path.parent == other.folder.resolve()
    assert back.selected["federated"].weights.load()["n"] == 7
    (moved / "checkpoints" / "weights" / "round-001-federated.pkl").unlink()
    with pytest.raises(FedcxrError, match="round-001-federated.pkl: a model file .* is gone"):
        checkpoint.load(str(moved))["state"].selected["federated"].weights.load()


def test_a_format_2_checkpoint_resumes_with_its_arrays_written_to_files_once(tmp_path):
    """A checkpoint that held its models as arrays (format 2): on resume each distinct
    model becomes one file (arms that share the initial arrays, and a selected model that
    shares its arm's, share the file), with the same values."""
    import pickle

    from server import checkpoint
    from server.state import RunState, SelectedModel

    init = {"a": np.zeros(4, np.float32)}
    trained = {"a": np.full(4, 3.0, np.float32)}
    st = RunState(round=1, arms={"federated": trained, "single:s1": dict(init),
                                 "single:s2": dict(init)},
                  selected={"federated": SelectedModel(1, 0.6, None, None, [], trained)})
    folder = tmp_path / "r" / "checkpoints"
    folder.mkdir(parents=True)
    with open(folder / "latest.pt", "wb") as f:
        pickle.dump({"format": checkpoint.ARRAYS_FORMAT, "run_name": "r", "config": {},
                     "state": st.to_checkpoint(),
                     "rng": {"numpy": np.random.get_state(),
                             "python": __import__("random").getstate()}}, f, protocol=5)
    back = checkpoint.load(str(tmp_path / "r"))["state"]
    files = checkpoint.weight_files(tmp_path / "r")
    back.spill(files)
    assert len(list(files.folder.glob("*.pkl"))) == 2
    assert back.arms["single:s1"] == back.arms["single:s2"]
    assert back.selected["federated"].weights == back.arms["federated"]
    assert back.arms["federated"].load()["a"].tolist() == [3.0] * 4


@pytest.mark.parametrize("keep,best,kept", [
    ("all", 2, {1, 2, 3, 4}), ("last", 2, {4}), ("last,best", 2, {2, 4}),
    ("last,best", None, {4}), ("last,best", 4, {4})])
def test_checkpoints_kept_are_the_last_and_the_selected_round(tmp_path, keep, best, kept):
    """keep-checkpoints prunes round files after each save; latest.pt always resumes, and a
    run folder named relative to out-dir is found there (the SuperLink's working directory
    is not the coordinator's)."""
    from server import checkpoint
    from server.state import RunState

    files = checkpoint.weight_files(tmp_path / "out" / "r")
    st = RunState()
    for rnd in range(1, 5):
        st.round = rnd
        st.arms = {"federated": files.put(f"round-{rnd:03d}-federated",
                                          {"a": np.full(3, rnd, np.float32)})}
        checkpoint.save("r", {"seed": 0}, st, tmp_path / "out" / "r", rnd, keep=keep,
                        best_round=best if best is None or best <= rnd else None)
    names = {p.name for p in (tmp_path / "out" / "r" / "checkpoints").iterdir()}
    assert names == {"latest.pt", "weights"} | {f"round-{r:03d}.pt" for r in kept}
    # the model files no kept checkpoint names went with their checkpoints
    assert {p.name for p in files.folder.iterdir()} == {f"round-{r:03d}-federated.pkl"
                                                        for r in kept}
    assert checkpoint.load("r", tmp_path / "out")["state"].round == 4
    with pytest.raises(FedcxrError, match="no checkpoint there"):
        checkpoint.load("missing", tmp_path / "out")


@pytest.mark.parametrize("keep", ["all", "last", "last,best"])
def test_the_space_a_run_asks_for_bounds_the_model_files_it_holds(tmp_path, keep):
    """Brute force: random selections over 3 arms and 9 rounds, saved with keep-checkpoints
    pruning as the ServerApp does; the most model files on disk at once (a round's files
    written, before its checkpoint prunes) stays within ``space_needed``'s upper bound, and
    one round's files within its lower one."""
    from server import checkpoint
    from server.state import RunState, SelectedModel
    from server.weight_files import space_needed

    rng = np.random.default_rng(len(keep))
    arms, rounds = ["federated", "single:a", "single:b"], 9
    for trial in range(4):
        run_dir = tmp_path / keep.replace(",", "-") / str(trial)
        files = checkpoint.weight_files(run_dir)
        init = files.put("round-000-initial", {"w": np.zeros(1)})
        st = RunState(arms=dict.fromkeys(arms, init))
        peak = 0
        for rnd in range(1, rounds + 1):
            st.round = rnd
            for arm in arms:
                st.arms[arm] = files.put(f"round-{rnd:03d}-{arm}", {"w": np.full(1, rnd)})
                if rnd == 1 or rng.random() < 0.3:  # a better validation AUC: selected now
                    st.selected[arm] = SelectedModel(rnd, rng.random(), np.zeros((14, 3)),
                                                     np.zeros((14, 3)), ["s"], st.arms[arm])
            new = [p for p in files.folder.glob("*.pkl") if p.name != init.path.name]
            peak = max(peak, len(new))
            checkpoint.save("r", {"seed": 0}, st, run_dir, rnd, keep=keep,
                            best_round=st.selected["federated"].round)
        least, most = space_needed(1, len(arms), rounds, keep)
        assert least <= peak <= most, (keep, trial, peak, most)
    assert space_needed(1, 3, 0, keep) == (0, 0)  # nothing left to train: nothing to write


def test_a_run_whose_model_files_cannot_fit_stops_before_training(tmp_path, monkeypatch):
    """One line naming the folder, what the files need, what is free and what to do; a
    warning when only the worst case does not fit; nothing when it all fits."""
    import shutil
    from types import SimpleNamespace

    from common.atomic import DiskFull
    from server.weight_files import check_space

    def free(n):
        monkeypatch.setattr(shutil, "disk_usage", lambda _p: SimpleNamespace(free=n))

    mb = 2 ** 20
    free(10 ** 12)
    assert check_space(tmp_path, 28 * mb, 21, 20, "all", extra_copies=21) is None
    free(21 * 28 * mb + 1)  # one round's files fit, with pruning five rounds' do not
    warning = check_space(tmp_path, 28 * mb, 21, 20, "last,best")
    assert warning and str(tmp_path) in warning and "may need up to 2.87 GiB" in warning
    free(20 * 28 * mb)
    with pytest.raises(DiskFull, match=r"need at least 0\.57 GiB .*21 arm\(s\) x 28 MB.* "
                                       r"0\.55 GiB are free; free space, or set out-dir"):
        check_space(tmp_path, 28 * mb, 21, 20, "last")


def test_a_site_budget_means_dp_or_nothing_whatever_the_coordinator_says(small_cohort,
                                                                          task_identity):
    """A training node whose own config sets max-epsilon refuses a train message of a run
    with dp=false (the coordinator cannot switch DP off), before any data is read."""
    from client.app import app
    from common import protocol as wire

    run_config = {**as_flower(RunConfig()), **CONFIG, "cohort": str(small_cohort)}
    site = Context(run_id=1, node_id=7, node_config={
        "partition-id": 0, "num-partitions": 3, "data-path": str(small_cohort.parent / "nope"),
        "max-epsilon": 0.01}, state=RecordDict(), run_config=run_config)
    msg = Message(RecordDict({"config": ConfigRecord({"arm": "federated",
                                                      "server-round": 1})}),
                  dst_node_id=7, message_type="train")
    reply = app(msg, site)  # the data path does not even exist: nothing was read
    assert wire.refusal(reply) is wire.Refusal.DP_REQUIRED
    assert "max-epsilon=0.01" in reply.error.reason and "dp=true" in reply.error.reason


@pytest.mark.parametrize(("raw", "message"), [
    ({"max-epsilon": float("nan")}, "finite positive"),
    ({"max-epsilon": 0}, "finite positive"),
    ({"max-epsilon": "inf"}, "finite positive"),
])
def test_a_site_budget_must_be_finite_and_positive(raw, message):
    from common.config import NodeConfig, parse
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse(NodeConfig, raw, what="node config")
    assert parse(NodeConfig, {}, what="node config").requires_dp is False
    assert parse(NodeConfig, {"max-epsilon": "8"}, what="node config").budget == 8.0


@pytest.mark.parametrize("value", ["on", "ture", "", 2])
def test_a_boolean_that_is_not_one_is_an_error_not_false(value):
    from common.config import RunConfig, parse
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="'dp'.*use true or false"):
        parse(RunConfig, {"dp": value}, what="run config")
    assert parse(RunConfig, {"dp": "true"}, what="run config").dp is True
    assert parse(RunConfig, {"dp": False}, what="run config").dp is False


def test_a_budget_that_fits_one_arm_but_not_both_refuses_before_either_trains(
        small_cohort, task_identity, tmp_path):
    """Both arms of a train message are checked against the site's budget at once: none of
    them trains and nothing is written to the ledger when the pair would pass max-epsilon,
    even though the first arm alone would fit (it used to train, spend, then be discarded)."""
    from client.app import app
    from client.node import open_site
    from common import protocol as wire
    from common.privacy import DPConfig, PrivacyLedger, compose_epsilon
    from common.records import to_record
    from common.training import DPPlan, TrainConfig, dp_dataset, planned_spend

    run_config = {**as_flower(RunConfig()), **CONFIG, "cohort": str(small_cohort), "dp": True,
                  "target-epsilon": 4.0}
    run = RunConfig(**{k.replace("-", "_"): v for k, v in {**CONFIG, "dp": True}.items()},
                    cohort=str(small_cohort), target_epsilon=4.0)
    ledger_path = tmp_path / "ledger.jsonl"
    node_config = {"partition-id": 0, "num-partitions": 3, "ledger-path": str(ledger_path),
                   "max-epsilon": 3.0}
    train = open_site(node_config, run).splits(run)["train"]
    plan = DPPlan(DPConfig(target_epsilon=4.0, max_epsilon=3.0), PrivacyLedger(ledger_path),
                  planned_units=2)
    spend, delta = planned_spend(len(dp_dataset(train, run.privacy_unit)),
                                 TrainConfig(epochs=1, batch_size=16), plan)
    assert compose_epsilon([spend], delta, "prv") < 3.0 < compose_epsilon([spend] * 2, delta,
                                                                          "prv")
    weights = to_record(build_model(norm="group").state_dict())
    request = wire.TrainRequest(1, "group", "r", 2, wire.ArmTask("federated", 1, weights),
                                wire.ArmTask("single:site1", 2, weights))
    reply = app(Message(request.encode(), dst_node_id=7, message_type="train"),
                Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                        run_config=run_config))
    assert wire.refusal(reply) is wire.Refusal.BUDGET, reply.error.reason
    assert "federated, single:site1" in reply.error.reason and "is left" in reply.error.reason
    assert not ledger_path.exists()  # no unit started: no ε spent for nothing


@pytest.mark.parametrize("mode", ["fixed-server", "fixed-client", "adaptive-client"])
def test_client_level_dp_runs_flowers_wrappers_and_reports_the_sites_epsilon(
        small_cohort, tmp_path, mode):
    """client-dp wraps the federated strategy in Flower's own DP wrapper (clipping at the
    server, or by Flower's clipping mods at the clients, which see only the federated arm);
    with a tiny clipping norm the global model moves by at most that norm per round (a
    clipped mean plus negligible noise), the single-site arms are untouched by it, and
    results.json carries the client-level ε of the aggregated rounds."""
    from common.privacy import Spend, compose_epsilon, default_delta

    clip = 1e-3
    code = simulate(small_cohort, {**CONFIG, "out-dir": str(tmp_path), "run-name": "cdp",
                                   "client-dp": mode, "client-noise-multiplier": 1e-5,
                                   "keep-checkpoints": "all",
                                   "client-clipping-norm": clip})
    assert code == 0
    results = json.loads((tmp_path / "cdp" / "results.json").read_text())
    row = results["client_dp"]
    assert (row["mode"], row["rounds"], row["sites"]) == (mode, 2, 2)
    # noise 1e-5 (so that the noise, sigma C / sites per weight, stays below the clipping
    # bound over 7M weights): no meaningful ε, reported as such, never as a small number
    bound = compose_epsilon([Spend(2, 1.0, 1e-5)], default_delta(2), "prv")
    assert (row["epsilon"] is None and bound == math.inf) or row["epsilon"] == bound > 1e4
    ckpt = tmp_path / "cdp" / "checkpoints"
    one, two = checkpoint_arms(ckpt / "round-001.pt"), checkpoint_arms(ckpt / "round-002.pt")
    step = np.sqrt(sum(float(((two["federated"][k] - one["federated"][k]) ** 2).sum())
                       for k in one["federated"] if one["federated"][k].dtype.kind == "f"))
    bound = row["final_clipping_norm"] if mode.startswith("adaptive") else clip
    assert 0 < step <= bound * 1.05 + 1e-4, (step, bound)
    own = np.sqrt(sum(float(((two["single:site1"][k] - one["single:site1"][k]) ** 2).sum())
                      for k in one["single:site1"] if one["single:site1"][k].dtype.kind == "f"))
    assert own > 100 * clip  # the site's own model is not clipped
    if mode.startswith("adaptive"):
        assert row["final_clipping_norm"] != clip  # the norm adapted to the updates


def test_client_level_epsilon_matches_dp_accounting():
    """The client-level ε: rounds of the Gaussian mechanism (every site each round), as
    Google's dp-accounting composes them."""
    from dp_accounting import dp_event, pld

    from common.config import RunConfig
    from server.app import client_dp_row
    from server.state import RunState

    run = RunConfig(client_dp="fixed-server", client_noise_multiplier=1.2)
    st = RunState(trained={"federated": [1, 2, 3, 5]}, strategy={"clipping_norm": 0.7})
    row = client_dp_row(run, st, 4)
    acc = pld.PLDAccountant()
    acc.compose(dp_event.GaussianDpEvent(1.2), 4)
    assert row["rounds"] == 4 and row["delta"] == pytest.approx(1e-5)
    assert row["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.02)
    assert row["final_clipping_norm"] == 0.7
    assert client_dp_row(RunConfig(), st, 4) is None


def test_the_run_is_tracked_in_mlflow(run_a):
    """The ServerApp logged the run to the default store (SQLite under out-dir): params,
    rounds as steps, the verdict, the outputs and every arm's selected model."""
    from mlflow.tracking import MlflowClient

    from common.model import load_checkpoint

    run_dir, _ = run_a
    results = json.loads((run_dir / "results.json").read_text())
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedcxr")
    (run,) = client.search_runs([exp.experiment_id], "tags.`fedcxr.run_name` = 'a'")
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.params["num-rounds"] == "2"
    assert run.data.tags["h1.verdict"] == results["verdict"]["status"]
    arms = {a["name"]: a for a in results["arms"]}
    for arm, key in (("federated", "federated"), ("single:site1", "single_site1")):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(rid, f"{key}/val_auc"))
        expected = [(h["round"], h["val_auc"]) for h in arms[arm]["history"]
                    if h["val_auc"] is not None]
        assert [s for s, _ in logged] == [r for r, _ in expected]  # each round once
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected])
    for row in results["primary_auc"]:
        key = f"external_macro_auc/{row['model'].replace(':', '_')}/{row['site']}"
        if row["macro_auc"] is not None:
            assert run.data.metrics[key] == pytest.approx(row["macro_auc"])
    assert {a.path for a in client.list_artifacts(rid)} >= {
        "results.json", "report.html", "metrics.csv", "status.json", "models"}
    models = {a.path for a in client.list_artifacts(rid, "models")}
    assert models == {"models/federated.pt", "models/single_site1.pt", "models/single_site2.pt"}
    local = client.download_artifacts(rid, "models/federated.pt", str(run_dir.parent / "dl"))
    assert load_checkpoint(local).norm == "batch"


def test_the_mlflow_ui_shows_the_run_and_its_charts(run_a, tmp_path):
    """`mlflow server` on the run's store, the run page rendered in headless Chromium: the
    run is listed by name and its round metrics are drawn as charts."""
    import shutil
    import socket

    import httpx

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium")
        pytest.skip("chromium not installed (make test installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    from mlflow.tracking import MlflowClient

    run_dir, _ = run_a
    store = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("fedcxr").experiment_id
    (run,) = client.search_runs([exp], "tags.`fedcxr.run_name` = 'a'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(tmp_path / "mlflow.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        with playwright.sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=browser, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"])
            page = chromium.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(f"{base}/#/experiments/{exp}/runs")
            page.get_by_role("link", name="a", exact=True).first.wait_for(timeout=90_000)
            page.goto(f"{base}/#/experiments/{exp}/runs/{run.info.run_id}/model-metrics")
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            # the federated arm's validation AUC per round, drawn as a chart (charts below
            # the fold render lazily: the page's own search brings this one up)
            page.get_by_placeholder("Search metric charts").fill("federated/val_auc")
            page.get_by_text("a (federated/val_auc)").wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "mlflow-run.png"))
            assert page.locator(".js-plotly-plot").count() == 1
            chromium.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_each_training_site_keeps_its_monitoring_baselines(run_a, small_cohort):
    """Internal validation leaves, at each training site and on its disk only, a baseline
    per selected model (what `fedcxr site monitor` compares new images with)."""
    from common.monitoring import QUANTILES, Baseline

    run_dir, _ = run_a
    results = json.loads((run_dir / "results.json").read_text())
    models = {a["name"] for a in results["arms"] if a["kind"] != "extra"}
    for site in ("site1", "site2"):
        folder = small_cohort.parent / site / ".fedcxr" / "baselines" / "a"
        found = {p.stem for p in folder.glob("*.json")}
        assert found == {m.replace(":", "_") for m in models}, found
        b = Baseline.read(folder / "federated.json")
        assert (b.model, b.site, b.run_name, b.image_size) == ("federated", site, "a", 32)
        assert 0 < b.n_images < 40  # the site's test split
        assert all(len(q) == len(QUANTILES) for q in b.score_quantiles.values())
        assert sum(b.intensity) == pytest.approx(1.0)
    assert not (small_cohort.parent / "site3" / ".fedcxr" / "baselines").exists()


_WARM_UP_PROBE = """
import json, sys
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
from client.app import app
from client import handlers
assert "torch._dynamo" not in sys.modules, "imported before any message"
run_config, partition = json.loads(sys.argv[1]), int(sys.argv[2])
ctx = Context(run_id=1, node_id=5, node_config={"partition-id": partition,
              "num-partitions": 3}, state=RecordDict(), run_config=run_config)
reply = app(Message(RecordDict(), dst_node_id=5, message_type="query"), ctx)
assert not reply.has_error(), reply.error.reason
started = handlers._WARM_UP is not None
statistics = [m for m in ("scipy.stats", "sklearn", "statsmodels") if m in sys.modules]
handlers._setup(ctx)  # what every later handler does first
print(json.dumps({"started": started, "imported": "torch._dynamo" in sys.modules,
                  "finished": started and not handlers._WARM_UP.is_alive(),
                  "statistics": statistics}))
"""


@pytest.mark.parametrize("partition, dp, started", [(0, False, True), (2, False, False),
                                                     (0, True, False)])
def test_a_simulated_training_node_imports_torch_dynamo_after_its_query(small_cohort, tmp_path,
                                                                       partition, dp,
                                                                       started):
    """A training node's query starts importing torch._dynamo in a thread (its first train
    message would import it: torch.optim's Optimizer), and the next handler waits for it
    to finish before its own work. A held-out node starts nothing (it never trains), nor
    does a DP run (its query reads the privacy ledger: no import beside it). Without DP the
    query imports none of validation's statistics libraries, which a train message never
    needs either (a deployment runs each message in its own process). A fresh interpreter
    each: this one has imported everything already; a copy of the cohort (a DP
    query releases label counts into the site's ledger)."""
    import shutil

    cohort = tmp_path / "cohort"
    shutil.copytree(small_cohort.parent, cohort)
    run_config = {**as_flower(RunConfig()), **CONFIG, "cohort": str(cohort / "cohort.toml"),
                  "dp": dp}
    done = subprocess.run([sys.executable, "-c", _WARM_UP_PROBE, json.dumps(run_config),
                           str(partition)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["started"] is started
    assert seen["finished"] is started
    if started:
        assert seen["imported"]
    if not dp:  # a query (a train message neither) imports no statistics library
        assert seen["statistics"] == []
