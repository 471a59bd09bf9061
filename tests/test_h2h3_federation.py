"""H2 and H3 in a real federated run (Flower's simulation engine) at 64 px, the smallest size
where DenseNet's last block has a spatial map: the held-out sites judge against their
readers' reference standard, every model is localised at every held-out site, the shortcut
site measures marker reliance on its own test split, and only aggregates come back."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cli.simulate import simulate
from tests.conftest import all_lists

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def h3_run(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("h3") / "cohort"
    shutil.copytree(cohort, root, ignore=shutil.ignore_patterns(".fedcxr"))
    toml = root / "cohort.toml"
    toml.write_text(re.sub(r'(role = "(train|evaluate)"\n)', r"\1min-cell = 2\n",
                           toml.read_text()))
    audit = root.parent / "audit.jsonl"
    out = root.parent / "runs"
    code = simulate(toml, {"num-rounds": 1, "image-size": 64, "batch-size": 16,
                           "gradcam-max-images": 8, "out-dir": str(out), "run-name": "h3"},
                    extra_env={"FEDCXR_AUDIT_LOG": str(audit)})
    assert code == 0
    return json.loads((out / "h3" / "results.json").read_text()), audit, out / "h3"


def test_held_out_sites_use_their_readers_and_report_the_site_label_answer(h3_run):
    results, _, _ = h3_run
    assert {r["site"] for r in results["reference_standard"]} == {"site4", "site5"}
    assert {r["source"] for r in results["reference_standard"]} == {"readers' majority"}
    assert {(r["site"], r["model_b"]) for r in results["primary_site_labels"]} == {
        (s, f"single:site{k}") for s in ("site4", "site5") for k in (1, 2, 3)}
    studies = [s for s in results["readers"] if s["label"] == "Effusion"]
    assert {s["site"] for s in studies} == {"site4", "site5"}
    assert all(s["readers"] == 3 and set(s["models"]) >= {"federated"} for s in studies)
    assert all(s["fleiss"]["readers_per_image"] == 3 for s in studies)


def test_every_model_is_localised_at_every_held_out_site(h3_run):
    results, _, run_dir = h3_run
    models = {"federated", "single:site1", "single:site2", "single:site3"}
    external = [r for r in results["localisation"] if r["setting"] == "external"]
    assert {(r["site"], r["model"]) for r in external} == {
        (s, m) for s in ("site4", "site5") for m in models}
    assert all(r["n_images"] <= 8 for r in external)  # gradcam-max-images
    released = [r for r in external if r["status"] == "ok"]
    assert released and all(0 <= r["hit_rate"] <= 1 and 0 <= r["iou"] <= 1 for r in released)
    # shortcut reliance where markers are: held-out sites and the training sites' test splits
    internal = {(r["site"], r["model"]) for r in results["shortcut"]
                if r["setting"] == "internal"}
    assert ("site1", "single:site1") in internal and ("site1", "federated") in internal
    html = (run_dir / "report.html").read_text()
    assert "Where the models look (H3)" in html and "Reference standard and readers" in html


def test_only_aggregates_leave_the_sites(h3_run):
    """The localisation travels in the statistics replies: no list as long as a site's
    images, no file name, no patient id, no heatmap."""
    _, audit, _ = h3_run
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    stats = [rec["body"]["json"] for e in entries for rec in e["records"].values()
             if rec["kind"] == "ConfigRecord" and "json" in rec["body"]]
    assert any('"localisation"' in text for text in stats)
    for text in stats:
        assert not re.search(r"-p\d{5}", text) and ".dcm" not in text and ".png" not in text
        for value in all_lists(json.loads(text)):  # every site has 40 images
            numbers = all(isinstance(v, int | float) or v is None for v in value)
            assert not (numbers and len(value) == 40), value


def test_overlays_stay_on_the_site_only_when_its_config_asks(h3_run):
    _, _, run_dir = h3_run
    root = run_dir.parent.parent / "cohort"
    assert not list(root.rglob("gradcam"))  # gradcam-overlays is off by default
    assert not list(run_dir.rglob("*.png"))
    assert Path(root / "site5" / ".fedcxr" / "external").is_dir()
