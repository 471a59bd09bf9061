"""fedcxr site monitor: drift of a deployed model's inputs and outputs against its baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.model import build_model, save_checkpoint
from common.monitoring import (
    QUANTILES,
    Baseline,
    make_baseline,
    psi,
    score_ks,
    score_psi,
)
from common.synth import SynthOptions, generate

ROOT = Path(__file__).resolve().parents[1]


def test_psi_is_the_textbook_sum_and_ks_keeps_its_level_on_nulls():
    """PSI = sum((a - e) ln(a / e)); the KS test against a baseline kept as 101 quantiles
    rejects about alpha of null batches (simulation: 400 batches of 200)."""
    e, a = np.array([0.25, 0.25, 0.5]), np.array([0.2, 0.3, 0.5])
    by_hand = sum((y - x) * np.log(y / x) for x, y in zip(e, a, strict=True))
    assert psi(e, a) == pytest.approx(by_hand)
    rng = np.random.default_rng(0)
    base = np.quantile(rng.beta(2, 5, 20_000), QUANTILES).tolist()
    p = np.array([score_ks(base, rng.beta(2, 5, 200))[1] for _ in range(400)])
    rate = float(np.mean(p < 0.05))
    assert 0.02 <= rate <= 0.09, rate  # 0.05 +- 3 binomial SEs
    # a baseline of only 300 images is a sample too: counted as such (the two-sample null at
    # the effective size), the level holds where taking it as exact would reject too often
    two, one = [], []
    for _ in range(400):
        small = np.quantile(rng.beta(2, 5, 300), QUANTILES).tolist()
        batch = rng.beta(2, 5, 200)
        two.append(score_ks(small, batch, n_baseline=300)[1])
        one.append(score_ks(small, batch)[1])
    assert float(np.mean(np.array(two) < 0.05)) <= 0.09
    assert float(np.mean(np.array(one) < 0.05)) > float(np.mean(np.array(two) < 0.05))
    # ... and PSI of a null batch of 200 stays well under the 0.2 alert threshold
    assert max(score_psi(base, rng.beta(2, 5, 200)) for _ in range(100)) < 0.2
    # a shifted batch is caught by both
    shifted = rng.beta(3, 4, 200)
    assert score_ks(base, shifted)[1] < 1e-6 and score_psi(base, shifted) > 0.2


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Baseline acquisition (cohort A's site1), a fresh batch from the same acquisition
    (cohort B's site1: another seed, same vendor profile) and a changed acquisition (a
    held-out site's vendor, photometry and bit depth), a model and its baseline."""
    from common.data import CachedImages
    from common.site import SiteSource, ensure_cache

    tmp = tmp_path_factory.mktemp("monitor")
    for name, seed in (("a", 21), ("b", 22)):
        generate(tmp / name, SynthOptions(sites=2, held_out=1, images_per_site=200, size=64,
                                          seed=seed))
    torch.manual_seed(0)
    model = build_model().eval()
    save_checkpoint(model, tmp / "model.pt", image_size=32)
    cache = ensure_cache(SiteSource(tmp / "a" / "site1"), 32, tmp / "cache-a")
    ds = CachedImages(cache)
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.stack([ds[i][0] for i in range(len(ds))]))).numpy()
    baseline = make_baseline(model="federated", site="site1", run_name="r", image_size=32,
                             scores=scores, labels=ds.labels(), images=np.asarray(cache.images),
                             scale=float(cache.scale), meta=cache.index)
    baseline.write(tmp / "baseline.json")
    return tmp


def monitor(sites: Path, data: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "site", "monitor", "--model", str(sites / "model.pt"),
         "--data", str(data), "--baseline", str(sites / "baseline.json"), "--out",
         str(sites / out), "--cache", str(sites / f"cache-{out}"), "--device", "cpu", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_fresh_batch_from_the_same_acquisition_raises_no_alert(sites):
    r = monitor(sites, sites / "b" / "site1", "fresh")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((sites / "fresh" / "monitor.json").read_text())
    assert report["alerts"] == [] and report["drift"]["n_images"] == 200
    assert report["drift"]["inputs"]["intensity"] < 0.2
    assert "No alert." in (sites / "fresh" / "monitor.html").read_text()


def test_a_changed_acquisition_fires_the_alert(sites):
    r = monitor(sites, sites / "b" / "site2", "changed")  # the held-out vendor's images
    assert r.returncode == 4, r.stdout + r.stderr
    report = json.loads((sites / "changed" / "monitor.json").read_text())
    assert any(a.startswith("input intensity: PSI") for a in report["alerts"]), report["alerts"]
    assert "ALERT input intensity" in r.stdout
    html = (sites / "changed" / "monitor.html").read_text()
    assert "data:image/png;base64," in html and "alert(s)" in html


def test_since_and_time_windows(sites):
    """Images are dated by their file's modification time: --since keeps the later ones, and
    windows of --window-days split them (AUC per window where labels exist)."""
    data = sites / "b" / "site1"
    files = sorted((data / "images").iterdir())
    day = 86400.0
    start = 1_780_000_000.0  # 2026-05-28
    for i, f in enumerate(files):
        os.utime(f, (start + (i % 4) * 7 * day, start + (i % 4) * 7 * day))
    r = monitor(sites, data, "windows", "--since", "2026-06-01", "--window-days", "7",
                "--min-images", "10")
    assert r.returncode in (0, 4), r.stdout + r.stderr
    report = json.loads((sites / "windows" / "monitor.json").read_text())
    assert report["drift"]["n_images"] == 150  # the first week's quarter is before --since
    assert [w["window"] for w in report["windows"]] == [0, 1, 2]
    assert all(w["n_images"] == 50 for w in report["windows"])
    for row in report["auc"]:
        assert row["ci_low"] <= row["auc"] <= row["ci_high"] and row["window"] in (0, 1, 2)


@pytest.mark.parametrize("args,message", [
    (["--since", "last week"], "--since 'last week': use a date"),
])
def test_bad_monitor_input_is_one_line(sites, args, message):
    r = monitor(sites, sites / "b" / "site1", "bad", *args)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_baseline_is_refused_when_it_is_not_one(tmp_path):
    (tmp_path / "b.json").write_text('{"version": "x"}')
    from common.errors import FedcxrError

    with pytest.raises(FedcxrError, match="not a fedcxr baseline"):
        Baseline.read(tmp_path / "b.json")


def test_a_new_detector_size_is_input_drift(tmp_path):
    """The acquired image size comes from each file's header (DICOM Rows/Columns, PNG size);
    a batch from a detector of another size fires the size alert, the same size does not."""
    import pandas as pd
    from PIL import Image

    from common.imaging import stored_size
    from common.monitoring import Thresholds, compare
    from tests.conftest import write_test_dicom

    dcm = write_test_dicom(tmp_path / "a.dcm", np.full((96, 80), 0.5, np.float32))
    assert stored_size(dcm) == "80x96"
    for i, size in enumerate([(64, 64)] * 40 + [(128, 100)] * 40):
        Image.fromarray(np.full(size[::-1], 100, np.uint8)).save(tmp_path / f"{i}.png")
    assert stored_size(tmp_path / "41.png") == "128x100"
    assert stored_size(tmp_path / "missing.png") == "unknown"
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(40, 14))
    images = rng.integers(0, 255, size=(40, 8, 8)).astype(np.uint8)
    meta = pd.DataFrame({"path": [str(tmp_path / f"{i}.png") for i in range(40)]})
    base = make_baseline(model="m", site="s", run_name="r", image_size=8, scores=scores,
                         labels=np.full((40, 14), np.nan), images=images, scale=255.0,
                         meta=meta)
    assert base.acquired_size == {"64x64": 1.0}
    same = compare(base, scores, images, 255.0, meta, Thresholds())
    assert same["inputs"]["acquired_size"] == pytest.approx(0.0)
    assert not any("acquired_size" in a for a in same["alerts"])
    moved = meta.assign(path=[str(tmp_path / f"{i}.png") for i in range(40, 80)])
    drift = compare(base, scores, images, 255.0, moved, Thresholds())
    assert any(a.startswith("input acquired_size: PSI") for a in drift["alerts"])
