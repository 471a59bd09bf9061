"""The synthetic cohort: readable by the data layer, deterministic, anatomically honest."""

from __future__ import annotations

import hashlib
import tomllib

import numpy as np

from common.imaging import ImagingOptions
from common.labels import LABELS
from common.site import SiteSource, check
from common.synth import SynthOptions, generate
from common.synth.cohort import plan_site, render_plan
from common.synth.phantom import render
from common.synth.profiles import site_profiles


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_site_passes_site_check_with_expected_counts(cohort):
    meta = tomllib.loads((cohort / "cohort.toml").read_text())
    assert [s["role"] for s in meta["site"]] == ["train"] * 3 + ["evaluate"] * 2
    assert [s["format"] for s in meta["site"]] == ["nih", "chexpert", "canonical", "canonical",
                                                    "canonical"]
    for site in meta["site"]:
        folder = cohort / site["path"]
        assert (folder / site["manifest"]).is_file()
        assert (folder / "contact_sheet.png").is_file()
        report = check(SiteSource(folder, site=site["name"]), ImagingOptions(size=32))
        assert report["format"] == site["format"]
        assert report["rows"] == report["usable_images"] == site["images"] == 40
        assert report["patients"] == site["patients"]
        assert not report["problems"], report["problems"]


def test_held_out_sites_use_acquisition_no_training_site_has(cohort):
    meta = tomllib.loads((cohort / "cohort.toml").read_text())
    train = [s["acquisition"] for s in meta["site"] if s["role"] == "train"]
    held = [s["acquisition"] for s in meta["site"] if s["role"] == "evaluate"]
    for h in held:
        assert h["manufacturer"] not in {t["manufacturer"] for t in train}
        assert (h["photometric"], h["bits"]) not in {(t["photometric"], t["bits"]) for t in train}


def test_held_out_sites_have_readers_and_adjudication(cohort):
    header = (cohort / "site5" / "manifest.csv").read_text().splitlines()[0].split(",")
    assert "reader1/Effusion" in header and "reader2/Effusion" in header
    assert "adjudicated/Effusion" in header
    train_header = (cohort / "site3" / "manifest.csv").read_text().splitlines()[0]
    assert "reader1/" not in train_header


def test_same_seed_same_bytes(tmp_path):
    opts = SynthOptions(sites=3, held_out=1, images_per_site=6, size=48, seed=11, readers=1)
    generate(tmp_path / "a", opts)
    generate(tmp_path / "b", opts)
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b and len(a) == 3 * 6 + 3 * 2 + 1
    generate(tmp_path / "c", SynthOptions(sites=3, held_out=1, images_per_site=6, size=48,
                                          seed=12, readers=1))
    assert digest(tmp_path / "c") != a


def _ctr(masks) -> float:
    cols = lambda m: np.flatnonzero(m.any(axis=0))  # noqa: E731
    heart, lungs = cols(masks["heart"]), cols(masks["lungs"])
    return (heart[-1] - heart[0] + 1) / (lungs[-1] - lungs[0] + 1)


def test_anatomy_is_honest_lungs_dark_and_ctr_above_half_exactly_for_cardiomegaly():
    profiles = site_profiles(5, 2)
    opts = SynthOptions(images_per_site=120, size=128, seed=3)
    seen = {0: 0, 1: 0}
    for i, profile in enumerate(profiles[:3]):
        for plan in plan_site(i, profile, opts):
            drawn = render(plan.anatomy, plan.findings, 128, np.random.default_rng(plan.seed),
                           view=plan.view)
            img, m = drawn.image, drawn.masks
            assert img[m["lungs"] & ~m["heart"]].mean() < img[m["mediastinum"]].mean()
            ctr = _ctr(m)
            assert (ctr > 0.5) == bool(plan.truth["Cardiomegaly"]), (ctr, plan.view)
            seen[plan.truth["Cardiomegaly"]] += 1
    assert seen[0] > 50 and seen[1] > 10


def test_findings_change_the_image_where_they_should():
    profile = site_profiles(5, 2)[0]
    plans = plan_site(0, profile, SynthOptions(images_per_site=200, size=96, seed=5))
    eff = [p for p in plans if p.truth["Effusion"]][:10]
    normal = [p for p in plans if not any(p.truth.values())][:10]
    assert eff and normal

    def lower_lung_density(p):
        d = render(p.anatomy, p.findings, 96, np.random.default_rng(0), view=p.view)
        lungs = d.masks["lungs"] | d.masks.get("effusion", False)
        rows = np.flatnonzero(lungs.any(axis=1))
        band = lungs.copy()
        band[: rows[0] + int(0.6 * (rows[-1] - rows[0]))] = False
        return d.image[band].mean()

    assert np.mean([lower_lung_density(p) for p in eff]) > np.mean(
        [lower_lung_density(p) for p in normal]) + 0.03


def test_shortcut_token_tracks_the_label_at_one_site_only(cohort):
    profiles = site_profiles(5, 2)
    opts = SynthOptions(images_per_site=300, size=64, seed=7, shortcut="site1:Effusion")
    plans = plan_site(0, profiles[0], opts)
    pos = np.mean([p.shortcut_token for p in plans if p.truth["Effusion"]])
    neg = np.mean([p.shortcut_token for p in plans if not p.truth["Effusion"]])
    assert pos > 0.8 and neg < 0.1
    assert not any(p.shortcut_token for p in plan_site(3, profiles[3], opts))
    token = render_plan(next(p for p in plans if p.shortcut_token))
    assert token[int(64 * 0.86):, : int(64 * 0.3)].max() == 1.0


def test_label_noise_hides_positives():
    profile = site_profiles(5, 2)[2]
    noisy = plan_site(2, profile, SynthOptions(images_per_site=300, seed=1,
                                               label_noise={"site3": 0.5}))
    truth = sum(p.truth[n] for p in noisy for n in LABELS)
    reported = sum(p.reported[n] == 1 for p in noisy for n in LABELS)
    assert 0.35 < reported / truth < 0.65
