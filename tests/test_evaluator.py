"""The external evaluator: fixed thresholds only, aggregate output, verdict, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from cli.main import main
from common.evaluation.external import EvaluationOptions, evaluate_scores
from common.evaluation.gradcam import gradcam
from common.evaluation.metrics import ThresholdsRequired
from common.evaluation.report import adjust_comparisons
from common.evaluation.shift import SHIFTS, apply_shift
from common.evaluation.verdict import Protocol, primary_rows, primary_verdict, secondary_labels
from common.labels import LABELS
from common.model import build_model, save_checkpoint
from tests.conftest import all_lists

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def toy(n: int = 137, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    y[:, -1] = 0  # Hernia: no positives
    good = 1 / (1 + np.exp(-rng.normal(2 * y - 1, 1.0)))
    weak = 1 / (1 + np.exp(-rng.normal(0.3 * y, 1.0)))
    meta = pd.DataFrame({"sex": rng.choice(["M", "F"], n), "age": rng.uniform(20, 90, n),
                         "view": rng.choice(["PA", "AP"], n), "manufacturer": "X"})
    return y, {"fed": good, "single": weak}, meta


def test_evaluator_refuses_to_choose_thresholds():
    y, scores, _ = toy()
    with pytest.raises(ThresholdsRequired, match="never chooses an operating point"):
        evaluate_scores(y, scores, {"fed": {}}, site="s")


def test_result_is_aggregate_only_and_correct():
    y, scores, meta = toy()
    t = {m: {lb: 0.5 for lb in LABELS} for m in scores}
    out = evaluate_scores(y, scores, t, site="s", meta=meta,
                          options=EvaluationOptions(min_subgroup=40))
    text = json.dumps(out, default=float)
    for lst in all_lists(json.loads(text)):  # nothing the length of the image list
        assert len(lst) != len(y)
    ext = {(r["model"], r["label"]): r for r in out["external"]}
    assert ext[("fed", "Hernia")]["status"] == "not estimable"
    assert ext[("fed", "Effusion")]["auc"] > ext[("single", "Effusion")]["auc"]
    comp = [c for c in out["comparisons"] if c["label"] == "Effusion"][0]
    assert comp["model_a"] == "fed" and comp["p"] < 0.05
    groups = {(s["attribute"], s["group"]): s for s in out["subgroups"]
              if s["model"] == "fed" and s["label"] == "Effusion"}
    assert groups[("manufacturer", "X")]["status"] == "ok"
    assert ("age_band", "0-20") not in groups  # ages drawn from 20-90
    assert all(s["status"] == "too small" for s in groups.values() if s["n"] < 40)


def test_primary_verdict_supported_contradicted_inconclusive_and_mdd():
    def row(site, b, diff, sd):
        return {"site": site, "model_a": "fed", "model_b": b, "auc_a": 0.8,
                "auc_b": 0.8 - diff, "diff": diff, "diff_low": diff - 1.96 * sd,
                "diff_high": diff + 1.96 * sd, "sd": sd}

    protocol = Protocol(primary_labels=["Effusion", "Edema"])
    strong = primary_rows([row("s4", "b1", 0.10, 0.02), row("s5", "b1", 0.08, 0.02)])
    # Holm over the family of 2: the smaller p times 2, the other times 1 (then monotone)
    p = [2 * norm.sf(0.10 / 0.02), 2 * norm.sf(0.08 / 0.02)]
    assert [r["p_adjusted"] for r in strong] == pytest.approx([2 * p[0], 2 * p[0]]
                                                              if 2 * p[0] > p[1] else
                                                              [2 * p[0], p[1]])
    assert primary_verdict(strong, protocol)["status"] == "supported"
    # one comparison not significant: inconclusive, and the sentence states the MDD
    mixed = primary_rows([row("s4", "b1", 0.10, 0.02), row("s5", "b1", 0.01, 0.02)])
    v = primary_verdict(mixed, protocol)
    mdd = (norm.isf(0.05 / 2 / 2) + norm.ppf(0.8)) * 0.02
    assert v["status"] == "inconclusive" and mixed[1]["mdd"] == pytest.approx(mdd)
    assert f"{mdd:.3f}" in v["overall"] and "80% power" in v["overall"]
    worse = primary_rows([row("s4", "b1", -0.10, 0.02), row("s5", "b1", 0.10, 0.02)])
    assert primary_verdict(worse, protocol)["status"] == "contradicted"
    # a margin is tested, not only the sign: +0.02 with sd 0.01 clears 0 (z = 2) but is
    # significantly below a margin of 0.05 (z = -3)
    shifted = Protocol(primary_labels=["Effusion"], margin=0.05)
    rows = primary_rows([row("s4", "b1", 0.02, 0.01)], margin=0.05)
    assert primary_verdict(rows, shifted)["status"] == "contradicted"
    assert primary_verdict(primary_rows([row("s4", "b1", 0.02, 0.01)]),
                           protocol)["status"] == "supported"
    assert primary_verdict([], protocol)["status"] == "not testable"


def test_secondary_labels_are_their_own_family():
    def comp(label, diff, p):
        return {"site": "s", "label": label, "model_a": "fed", "model_b": "b", "auc_a": 0.8,
                "auc_b": 0.8 - diff, "diff": diff, "diff_low": diff - 0.1,
                "diff_high": diff + 0.1, "z": 1.0, "p": p}

    rows = adjust_comparisons([comp("Effusion", 0.1, 0.001), comp("Edema", 0.1, 0.002),
                               comp("Mass", 0.02, 0.4)])
    status = {x["label"]: x["status"] for x in secondary_labels(rows, "fed")}
    assert status == {"Effusion": "favours federated", "Mass": "no difference shown",
                      "Edema": "favours federated"}
    worse = secondary_labels(adjust_comparisons([comp("Effusion", -0.2, 0.0001)]), "fed")
    assert worse[0]["status"] == "against federated"


def test_gradcam_runs_through_hooks_and_points_at_the_signal():
    torch.manual_seed(0)
    model = build_model()
    x = torch.zeros(1, 1, 64, 64)
    heat = gradcam(model, x, 2)
    assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() <= 1


def test_shifts_change_images_deterministically():
    x = torch.rand(2, 1, 32, 32)
    for kind, strengths in SHIFTS.items():
        out = apply_shift(x, kind, strengths[-1], seed=3)
        assert out.shape == x.shape and not torch.allclose(out, x)
        assert torch.equal(out, apply_shift(x, kind, strengths[-1], seed=3))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(html: Path, shot: Path) -> list[str]:
    """Screenshot ``html``; return the JavaScript console messages Chromium logged."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium")
        pytest.skip("chromium not installed (make test installs it)")
    shot.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={shot.parent / 'chromium-profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,3000",
         f"--screenshot={shot}", html.as_uri()],
        capture_output=True, text=True, timeout=120)
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line]


@pytest.fixture(scope="module")
def evaluated(cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_checkpoint(build_model(), tmp / "fed.pt", image_size=32)
    save_checkpoint(build_model(norm="group"), tmp / "site1.pt", image_size=32)
    (tmp / "t.json").write_text(json.dumps({lb: 0.5 for lb in LABELS}))
    out = tmp / "run"
    code = main(["evaluate", "--model", f"federated={tmp / 'fed.pt'}", "--model",
                 f"single:site1={tmp / 'site1.pt'}", "--site", str(cohort / "site5"),
                 "--thresholds", str(tmp / "t.json"), "--out", str(out), "--gradcam",
                 "--cache", str(tmp / "cache")])
    assert code == 0
    return out


def test_cli_evaluate_writes_schema_and_keeps_heatmaps_local(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    for key in ("schema_version", "cohort", "arms", "external", "comparisons", "verdict",
                "privacy", "provenance"):
        assert key in results
    row = results["external"][0]
    assert {"site", "model", "label", "auc", "ci_low", "ci_high", "n_pos", "n_neg"} <= set(row)
    assert {"site", "label", "model_a", "model_b", "z", "p", "p_adjusted"} <= set(
        results["comparisons"][0])
    assert results["verdict"]["overall"].startswith("H1")
    # the offline evaluator takes the same protocol: primary rows, clustered by patient
    assert results["protocol"]["primary_metric"] == "macro-auc"
    (primary,) = results["verdict"]["primary"]
    assert (primary["model_a"], primary["model_b"]) == ("federated", "single:site1")
    assert {"diff", "diff_low", "diff_high", "p_value", "p_adjusted", "mdd"} <= set(primary)
    assert results["clustering"] == [{"site": "site5", "clustered_by": "patient"}]
    # H2: the readers' majority is the truth at site5 (VinDr-format reader file, 3 readers);
    # the primary endpoint against the site's own labels is beside it
    studies = {s["label"]: s for s in results["readers"]}
    assert studies["Effusion"]["reference"] == "majority" and studies["Effusion"]["readers"] == 3
    assert "Nodule/Mass" in studies and not studies["Nodule/Mass"]["models"]  # extra label
    assert {r["label"] for r in results["reference_standard"]} == {
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Pneumothorax",
        "Consolidation", "Fibrosis", "Pleural_Thickening"}
    assert [r["model"] for r in results["primary_auc_site_labels"]] == ["federated",
                                                                         "single:site1"]
    # H3 at 32 px: DenseNet's last block is one cell, so no map: said, not computed
    # (tests/test_h2h3_federation.py runs it at 64 px through Flower)
    skipped = results["localisation_skipped"]
    assert {r["model"] for r in skipped} == {"federated", "single:site1"}
    assert "one cell" in skipped[0]["reason"]
    assert results["localisation"] == [] and results["shortcut"] == []
    assert {r["shift"] for r in results["shift"]} == set(SHIFTS)
    assert list((evaluated / "gradcam").glob("*.png"))
    assert "gradcam" not in json.dumps(results["external"])


def test_report_renders_in_chromium_without_console_errors(evaluated):
    assert main(["report", str(evaluated)]) == 0
    html = (evaluated / "report.html").read_text()
    assert "H1" in html and "data:image/svg+xml;base64" in html and "<script" not in html
    shot = ARTIFACTS / "report.png"
    console = render_in_chromium(evaluated / "report.html", shot)
    assert console == []
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_evaluate_rejects_bad_thresholds(cohort, tmp_path, capsys):
    save_checkpoint(build_model(), tmp_path / "m.pt")
    (tmp_path / "t.json").write_text('{"Effusion": 0.5, "Dragon": 0.1}')
    code = main(["evaluate", "--model", str(tmp_path / "m.pt"), "--site", str(cohort / "site4"),
                 "--thresholds", str(tmp_path / "t.json"), "--out", str(tmp_path / "o")])
    assert code == 2 and "Dragon" in capsys.readouterr().err


def test_report_template_escapes_names_and_shows_the_primary_endpoint(evaluated):
    """A hostile site or model name is text on the page, never markup; the primary rows,
    the rule and the internal-vs-external section are rendered from results.json."""
    from markupsafe import escape

    from common.evaluation.report import render_html

    results = json.loads((evaluated / "results.json").read_text())
    results["cohort"][0]["site"] = "<script>alert(1)</script>"
    results["internal_external"] = [{"model": "federated", "label": "primary (macro-AUC)",
                                     "internal_auc": 0.9, "external_auc": 0.7, "drop": 0.2}]
    page = render_html(results)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert str(escape(results["verdict"]["rule"])) in page
    assert "Primary endpoint" in page and "single:site1" in page
    assert "0.900 → 0.700 (-0.200)" in page


def test_a_models_internal_statistics_are_its_own():
    """Internal validation sends one model per message: each model's rows must be what the
    site computes with every model at once (no statistic of it compares models)."""
    from common.evaluation.external import internal_validation

    rng = np.random.default_rng(3)
    n = 120
    labels = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    labels[rng.random((n, len(LABELS))) < 0.1] = np.nan  # unannotated
    labels[:, 2] = 0.0  # a label with no positives: not estimable
    scores = {m: np.clip(labels * s + rng.normal(0.5, 0.3, labels.shape), 0, 1)
              for m, s in (("federated", 0.4), ("single:a", 0.1), ("single:b", 0.0))}
    scores = {m: np.nan_to_num(v, nan=0.5) for m, v in scores.items()}
    meta = pd.DataFrame({"patient_id": [f"p{k // 3}" for k in range(n)]})
    primary = [LABELS[0], LABELS[1]]
    together = internal_validation(labels, scores, meta, site="s", primary=primary)
    assert together["clustered_by"] == "patient"
    for name in scores:
        alone = internal_validation(labels, {name: scores[name]}, meta, site="s",
                                    primary=primary)
        for key in ("internal", "internal_primary"):
            mine = [r for r in together[key] if r["model"] == name]
            assert mine and len(alone[key]) == len(mine), (name, key)
            for a, b in zip(alone[key], mine, strict=True):  # equal to rounding
                assert a == {k: pytest.approx(v, rel=1e-12) if isinstance(v, float) else v
                             for k, v in b.items()}, (name, key)


def test_report_figures_laid_out_in_advance_keep_their_text_inside(monkeypatch):
    """The ROC and calibration figures are drawn once, at fixed margins, not cropped to what
    they draw: with the longest label names in every panel, each text they draw (panel
    titles, axis and tick labels, the legend) lies inside the figure and no two panel
    titles overlap."""
    import matplotlib.text

    import common.evaluation.report as report

    report.load_report_libraries()
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch.setattr(report, "_figure_tag",
                        lambda fig, tight=True: drawn.append((fig, tight)) or "")
    labels = sorted(LABELS, key=len, reverse=True)[:report.FIGURE_LABELS]
    models = ["federated", "single:a-site-with-a-long-name"]
    results = {
        "roc": [{"site": "s", "label": lb, "model": m, "fpr": [0, 0.5, 1], "tpr": [0, 0.7, 1]}
                for lb in labels for m in models],
        "readers": [],
        "calibration": [{"site": "s", "model": models[0], "label": lb, "ece": 0.123,
                         "reliability": {"mean_predicted": [0.1, 0.9], "observed": [0.2, 0.8],
                                         "count": [5, 5]}} for lb in labels]}
    report._roc_figure(results, "s", labels)
    report._calibration_figure(results, "s", models[0], labels)
    assert [tight for _, tight in drawn] == [False, False]
    for fig, _ in drawn:
        fig.canvas.draw()
        box = fig.bbox
        texts = [t for t in fig.findobj(matplotlib.text.Text)
                 if t.get_visible() and t.get_text()]
        assert len(texts) > 2 * len(labels)  # titles, tick labels, legend entries
        for t in texts:
            e = t.get_window_extent()
            assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, \
                (t.get_text(), e, box)
        titles = sorted((ax.title.get_window_extent() for ax in fig.axes), key=lambda e: e.x0)
        assert all(a.x1 < b.x0 for a, b in zip(titles, titles[1:], strict=False))
        plt.close(fig)
