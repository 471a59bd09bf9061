"""The synthetic cohort: readable by the data layer, deterministic, anatomically honest."""

from __future__ import annotations

import hashlib
import tomllib

import numpy as np
import pytest

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


def test_held_out_sites_have_readers_in_vindr_format_and_every_site_has_boxes(cohort):
    from common.annotations import read_annotations
    from common.site import SiteSource

    readers = read_annotations(cohort / "site5" / "annotations_readers.csv")
    assert readers.format == "vindr" and not readers.problems
    assert {r for _, r, _, _ in readers.calls} == {"R1", "R2", "R3"}
    assert not (cohort / "site3" / "annotations_readers.csv").exists()  # training site
    rows = SiteSource(cohort / "site5").read().rows
    assert rows[["reader1/Effusion", "reader2/Effusion", "reader3/Effusion"]].notna().all().all()
    for site in ("site1", "site3", "site5"):
        result = SiteSource(cohort / site).read()
        assert {"Marker"} < set(result.boxes["label"]), site
        assert not [p for p in result.problems if "annotation" in p.code or "box" in p.code]


def test_same_seed_same_bytes(tmp_path):
    opts = SynthOptions(sites=3, held_out=1, images_per_site=6, size=48, seed=11, readers=1)
    generate(tmp_path / "a", opts)
    generate(tmp_path / "b", opts)
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b and len(a) == 3 * 6 + 3 * 2 + 1 + 3 * 2 + 1  # + boxes, markers, readers
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


def test_each_drawn_lesions_box_holds_the_lesion():
    """What a finding adds to the image lies inside the box the generator writes for it (a
    render with and without the finding, same anatomy and seed)."""
    from common.synth.phantom import Anatomy, Finding

    anatomy = Anatomy.sample(np.random.default_rng(1), sex="F", age=50)
    for name in ("Nodule", "Mass", "Effusion", "Infiltration", "Consolidation"):
        finding = {name: Finding(severity=0.8, side=1, x=0.4, y=0.6)}
        drawn = render(anatomy, finding, 128, np.random.default_rng(2))
        plain = render(anatomy, {}, 128, np.random.default_rng(2))
        diff = np.abs(drawn.image - plain.image)
        x0, y0, x1, y1 = drawn.boxes[name]
        inside = diff[y0:y1, x0:x1].sum() / diff.sum()
        assert inside > 0.8, (name, inside)
        assert (x1 - x0) * (y1 - y0) < 0.5 * 128 * 128, name  # a box, not the whole image


def test_readers_boxes_are_the_drawn_box_by_a_readers_hand(cohort):
    """VinDr rows of a true finding: near the NIH box of what was drawn, never identical."""
    import csv

    drawn = {}
    with open(cohort / "site5" / "BBox_List_2017.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            x, y, w, h = (float(row[k]) for k in ("Bbox [x", "y", "w", "h]"))
            drawn[(row["Image Index"], row["Finding Label"])] = (x, y, x + w, y + h)
    overlaps = []
    with open(cohort / "site5" / "annotations_readers.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["image_id"], {"Pleural effusion": "Effusion"}.get(row["class_name"],
                                                                          row["class_name"]))
            if key in drawn:
                a, b = drawn[key], tuple(float(row[k]) for k in ("x_min", "y_min", "x_max",
                                                                 "y_max"))
                ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
                iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
                union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
                overlaps.append((ix * iy / union, a == b))
    assert len(overlaps) >= 10
    assert np.median([o for o, _ in overlaps]) > 0.5 and not any(same for _, same in overlaps)


def test_site_check_reports_readers_and_boxes_in_check_json(cohort):
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    report = check(SiteSource(cohort / "site5"), ImagingOptions(size=64, min_side=32))
    readers = report["readers"]
    assert readers["n_readers"] == 3 and readers["images_with_readers"] == 40
    rows = SiteSource(cohort / "site5").read().rows
    calls = rows[[f"reader{k}/Effusion" for k in (1, 2, 3)]].to_numpy(dtype=int)
    expected = fleiss_kappa(aggregate_raters(calls, n_cat=2)[0])
    assert readers["fleiss_kappa"]["Effusion"] == pytest.approx(expected, abs=1e-4)
    assert report["boxes"]["Marker"] >= 40 and report["boxes"]["Effusion"] > 0
    assert "annotations_readers.csv" in " ".join(report["annotation_files"])
