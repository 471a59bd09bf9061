"""The known-answer machinery: the centralised reference (what it trains on, how it enters
results.json without touching the verdict's family), replicates, and the internal vs
external drop with its CI."""

from __future__ import annotations

import base64
import json
import re
import tomllib

import numpy as np
import pytest
from markupsafe import escape
from scipy import stats

import cli.reference as reference
from common.config import RunConfig
from common.evaluation.replicates import aggregate, sentence, t_interval
from common.evaluation.report import (
    PRIMARY,
    build_results,
    internal_external_drop,
    render_html,
    write_replicates,
)
from common.evaluation.verdict import Protocol

SINGLES = ["single:site1", "single:site2"]


def _row(site, a, b, diff, sd):
    return {"site": site, "model_a": a, "model_b": b, "auc_a": 0.7, "auc_b": 0.7 - diff,
            "diff": diff, "diff_low": diff - 1.96 * sd, "diff_high": diff + 1.96 * sd,
            "sd": sd, "labels": ["Effusion"], "n_clusters": 100}


def _arms(with_reference: bool = True) -> list[dict]:
    arms = [{"name": "federated", "kind": "federated"}] + [
        {"name": s, "kind": "single-site"} for s in SINGLES]
    if with_reference:
        arms.append({"name": "centralised", "kind": "centralised-reference"})
    return arms


def _results(family_diff: float, reference_diff: float, *, with_reference=True) -> dict:
    rows = [_row(site, "federated", s, family_diff, 0.02) for site in ("s4", "s5")
            for s in SINGLES]
    if with_reference:
        rows += [_row(site, "centralised", s, reference_diff, 0.02) for site in ("s4", "s5")
                 for s in SINGLES]
        rows += [_row(site, "federated", "centralised", family_diff - reference_diff, 0.02)
                 for site in ("s4", "s5")]
    comparisons = [{"site": "s4", "label": "Effusion", "model_a": "federated", "model_b": b,
                    "auc_a": 0.8, "auc_b": 0.8 - d, "diff": d, "diff_low": d - 0.05,
                    "diff_high": d + 0.05, "z": d / 0.025, "p": p}
                   for b, d, p in (("single:site1", 0.1, 1e-5), ("centralised", -0.2, 1e-9))
                   if with_reference or b != "centralised"]
    return build_results(cohort=[], arms=_arms(with_reference),
                         evaluation={"primary": rows, "comparisons": comparisons},
                         federated="federated", protocol=Protocol(primary_labels=["Effusion"]))


def test_reference_rows_never_enter_the_verdicts_family():
    """The same federated-vs-single rows give the same verdict with or without a centralised
    reference; the reference's own rows are judged in their own family."""
    alone = _results(0.0, 0.0, with_reference=False)["verdict"]
    helped = _results(0.0, 0.2)["verdict"]
    assert alone["status"] == helped["status"] == "inconclusive"
    assert [r["p_adjusted"] for r in alone["primary"]] == \
        [r["p_adjusted"] for r in helped["primary"]]
    assert {(r["model_a"], r["model_b"]) for r in helped["primary"]} == \
        {("federated", s) for s in SINGLES}
    ref = helped["reference"]
    assert ref["pooling_helps"] is True and len(ref["against_single"]) == 4
    assert "4 of 4" in ref["sentence"] and "-0.200" in ref["sentence"]
    assert len(ref["federated_vs_reference"]) == 2
    assert _results(0.1, 0.01)["verdict"]["reference"]["pooling_helps"] is False
    assert alone["reference"] is None
    # nor does the reference count in the per-label family (shown, never counted)
    (effusion,) = helped["labels"]
    assert effusion["status"] == "favours federated" and effusion["comparisons"] == 1


def test_first_screen_shows_forest_plot_reference_and_arm_drops():
    results = _results(0.1, 0.12)
    results["internal_external"] = [{"model": "federated", "label": PRIMARY,
                                     "internal_auc": 0.8, "external_auc": 0.75, "drop": 0.05,
                                     "drop_low": 0.01, "drop_high": 0.09}]
    page = render_html(json.loads(json.dumps(results)))
    first_screen = page[: page.index("Rule (prespecified)")]
    assert str(escape(results["verdict"]["overall"])) in first_screen
    assert "Centralised reference (simulation only)" in first_screen
    assert first_screen.count("data:image/svg+xml;base64") == 1  # the forest plot
    assert "+0.050 (+0.010, +0.090)" in first_screen
    # the figures' text stays text, and a report written again is the same bytes (matplotlib
    # would put a date and random ids in every SVG)
    forest = base64.b64decode(re.search(r"data:image/svg\+xml;base64,([^\"]+)",
                                        first_screen).group(1)).decode()
    assert "<text" in forest and "dc:date" not in forest
    assert render_html(json.loads(json.dumps(results))) == page


def test_internal_external_drop_ci_adds_the_variances_of_the_two_site_means():
    internal = [{"model": "m", "macro_auc": 0.80, "sd": 0.03},
                {"model": "m", "macro_auc": 0.84, "sd": 0.04}]
    external = [{"model": "m", "macro_auc": 0.70, "sd": 0.02}]
    (row,) = internal_external_drop([], internal, [], external)
    sd_in = np.sqrt(0.03**2 + 0.04**2) / 2
    half = stats.norm.ppf(0.975) * np.sqrt(sd_in**2 + 0.02**2)
    assert row["drop"] == pytest.approx(0.12)
    assert row["drop_low"] == pytest.approx(0.12 - half, abs=1e-6)
    assert row["drop_high"] == pytest.approx(0.12 + half, abs=1e-6)


def test_replicates_aggregate_against_the_t_formula(tmp_path):
    diffs = [0.05, 0.11, 0.08]
    runs = [(seed, _results(d, d + 0.02)) for seed, d in zip((0, 1, 2), diffs, strict=True)]
    summary = aggregate(runs)
    x = np.array(diffs)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    m = summary["mean_primary_diff"]
    assert m["mean_diff"] == pytest.approx(x.mean())
    assert (m["t_low"], m["t_high"]) == pytest.approx((x.mean() - half, x.mean() + half))
    assert m["within_low"] == pytest.approx(np.mean(x - 1.96 * 0.02))
    assert summary["seeds"] == [0, 1, 2]
    assert sum(summary["verdicts"].values()) == 3
    by = {(c["site"], c["model_a"], c["model_b"]): c for c in summary["comparisons"]}
    assert by[("s4", "centralised", "single:site1")]["diffs"] == pytest.approx(
        [d + 0.02 for d in diffs])
    assert len(by) == 2 * 2 + 2 * 2 + 2
    assert "3 replicates" in sentence(summary)
    jpath, hpath = write_replicates({**summary, "runs": ["r1", "r2", "r3"]}, tmp_path)
    assert json.loads(jpath.read_text())["seeds"] == [0, 1, 2]
    assert "t-interval across replicates" in hpath.read_text()
    assert t_interval([0.1]) is None


def test_pooled_reference_trains_on_exactly_the_union_of_train_splits(cohort, tmp_path,
                                                                       monkeypatch):
    """Every training site's own train split (the rows its node trains on), nothing of a
    held-out site and nothing of any test split; validation on the union of val splits."""
    seen = {"train": [], "val": []}
    real_train, real_validate = reference.local_train, reference.validate

    def spy_train(model, data, config, **kw):
        seen["train"].append([(p.cache.root, tuple(p.rows)) for p in data.parts])
        return real_train(model, data, config, **kw)

    def spy_validate(model, data, *a, **kw):
        seen["val"].append([(p.cache.root, tuple(p.rows)) for p in data.parts])
        return real_validate(model, data, *a, **kw)

    monkeypatch.setattr(reference, "local_train", spy_train)
    monkeypatch.setattr(reference, "validate", spy_validate)
    run = RunConfig(image_size=32, num_rounds=2, batch_size=16, cohort=str(cohort /
                                                                              "cohort.toml"))
    result = reference.train_reference(cohort / "cohort.toml", run, tmp_path / "ref.pt")

    meta = tomllib.loads((cohort / "cohort.toml").read_text())
    from client.node import open_site

    expected = {"train": [], "val": []}
    for i, s in enumerate(meta["site"]):
        if s["role"] != "train":
            continue
        splits = open_site({"partition-id": i, "num-partitions": 5}, run).splits(run)
        for name in expected:
            expected[name].append((splits[name].cache.root, tuple(splits[name].rows)))
    assert seen["train"] == [expected["train"]] * 2  # every round, the same union
    assert seen["val"] == [expected["val"]] * 2
    held_out = {str(cohort / s["path"]) for s in meta["site"] if s["role"] == "evaluate"}
    assert not any(str(root).startswith(tuple(held_out)) for root, _ in expected["train"])
    assert result.n_train == sum(len(rows) for _, rows in expected["train"])
    record = json.loads((tmp_path / "ref.pt.json").read_text())
    assert record["kind"] == "centralised-reference" and record["sites"] == [
        "site1", "site2", "site3"]
    assert record["best_round"] == result.selected_round in (1, 2)
    assert len(record["history"]) == 2


def test_pooled_reference_starts_from_the_federated_arms_initial_weights(monkeypatch, cohort,
                                                                          tmp_path):
    """Same seed policy: the model the reference trains first is ``build_model`` right after
    ``torch.manual_seed(seed)``, as the server's prepare_arms builds the federated arm."""
    import torch

    from common.model import build_model

    first = {}

    def spy_train(model, data, config, **kw):
        first.setdefault("weights", {k: v.clone() for k, v in model.state_dict().items()})
        raise RuntimeError("stop")

    monkeypatch.setattr(reference, "local_train", spy_train)
    run = RunConfig(image_size=32, num_rounds=1, seed=5)
    with pytest.raises(RuntimeError, match="stop"):
        reference.train_reference(cohort / "cohort.toml", run, tmp_path / "ref.pt")
    torch.manual_seed(5)
    expected = build_model().state_dict()
    assert all(torch.equal(first["weights"][k], expected[k]) for k in expected)


@pytest.mark.slow
def test_replicates_of_a_tiny_run_with_the_pooled_reference(tmp_path, capfd):
    """Two real replicates (Flower simulation) of a tiny shift cohort, the centralised
    reference on: replicates.json aggregates exactly what each replicate's results.json
    says, and the reference is an arm of its own kind, internally and externally validated,
    outside the verdict's family. The run's streamed log (what a newcomer sees) shows the
    held-out site's expected refusal as one line and no Python traceback."""
    from cli.simulate import run_replicates
    from common.synth import SynthOptions, generate

    generate(tmp_path / "cohort", SynthOptions(sites=3, held_out=1, images_per_site=40,
                                               size=64, seed=2, scenario="shift",
                                               min_cell=1))
    cohort = tmp_path / "cohort" / "cohort.toml"
    labels = ",".join(tomllib.loads(cohort.read_text())["primary-labels"])
    root = run_replicates(cohort, {"num-rounds": 1, "image-size": 32, "batch-size": 16,
                                   "out-dir": str(tmp_path / "runs"), "run-name": "rep",
                                   "primary-labels": labels, "seed": 4},
                          2, pooled_reference=True, say=lambda *_: None)
    log = capfd.readouterr()
    seen = log.out + log.err
    assert "Traceback" not in seen and "RuntimeWarning" not in seen
    assert seen.count("role probe: held-out site3 refused to train") == 2  # once per replicate
    summary = json.loads((root / "replicates.json").read_text())
    assert summary["seeds"] == [4, 5] and summary["runs"] == ["replicate-1", "replicate-2"]
    runs = [json.loads((root / r / "results.json").read_text()) for r in summary["runs"]]
    assert [r["provenance"]["config"]["seed"] for r in runs] == [4, 5]
    assert [s["status"] for s in summary["replicates"]] == [r["verdict"]["status"]
                                                            for r in runs]
    per_run = [np.mean([p["diff"] for p in r["verdict"]["primary"]]) for r in runs]
    assert summary["mean_primary_diff"]["mean_diff"] == pytest.approx(np.mean(per_run))
    assert summary["mean_primary_diff"]["diffs"] == pytest.approx(per_run)
    assert (root / "replicates.html").is_file()
    results = runs[0]
    (ref,) = [a for a in results["arms"] if a["kind"] == "centralised-reference"]
    assert ref["name"] == "centralised" and "impossible in a real federation" in ref["label"]
    assert ref["sites"] == ["site1", "site2"] and ref["best_round"] == 1
    assert {"centralised"} <= {r["model"] for r in results["primary_auc"]}
    assert "centralised" in {r["model"] for r in results["internal"]}
    assert all(p["model_b"].startswith("single:") for p in results["verdict"]["primary"])
    check = results["verdict"]["reference"]
    assert [(r["model_a"], r["model_b"]) for r in check["federated_vs_reference"]] == [
        ("federated", "centralised")]
    assert {r["model_b"] for r in check["against_single"]} == {"single:site1", "single:site2"}
    assert "Centralised reference (simulation only)" in (root / "replicate-1" /
                                                         "report.html").read_text()
