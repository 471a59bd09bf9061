"""The site tool on a mixed folder: every bad file reported, every good row cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cli.main import main
from common.cache import open_cache
from common.data import CachedImages, assign_splits, augment_batch, split_datasets
from common.imaging import ImagingOptions
from common.site import SiteSource, check, run_prepare
from tests.conftest import write_test_dicom

GOOD = 6


@pytest.fixture()
def mixed_site(tmp_path):
    """Six good DICOMs plus one of each kind of bad file, in a canonical manifest."""
    d = tmp_path / "hospital"
    rows = ["path,patient_id,split,Effusion,Cardiomegaly"]
    for i in range(GOOD):
        write_test_dicom(d / f"good{i}.dcm", i=i)
        rows.append(f"good{i}.dcm,p{i},,{i % 2},0")
    bad = {}
    p = write_test_dicom(d / "trunc.dcm", i=50)
    p.write_bytes(p.read_bytes()[:-4000])  # cut inside the pixel data
    bad["trunc.dcm"] = "unreadable"
    p = write_test_dicom(d / "ct.dcm", i=51)
    ds = pydicom.dcmread(p)
    ds.Modality = "CT"
    ds.save_as(p)
    bad["ct.dcm"] = "not_cr_dx"
    p = write_test_dicom(d / "nopix.dcm", i=52)
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    bad["nopix.dcm"] = "no_pixel_data"
    write_test_dicom(d / "phi.dcm", i=53, patient_name="Doe^John")
    rows.append("phi.dcm,p53,,1,1")
    for name in bad:
        rows.append(f"{name},{name},,1,0")
    rows.append("missing.dcm,p99,,0,0")
    rows.append("good0.dcm,p0,,0,0")  # duplicate
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    return d, bad


def test_check_reports_every_problem_and_counts_good_rows(mixed_site):
    d, bad = mixed_site
    report = check(SiteSource(d), ImagingOptions(size=32, min_side=32))
    problems = report["problems"]
    for code in set(bad.values()) | {"missing_file", "duplicate_row", "phi_in_header"}:
        assert code in problems, code
    assert problems["missing_file"]["examples"][0].endswith("missing.dcm: file not found")
    assert report["rows"] == GOOD + 1 + len(bad) + 2
    assert report["usable_images"] == GOOD + 1  # six good + the one with PHI in its header
    assert report["labels"]["Effusion"] == {"positive": 4, "negative": 3, "unknown": 0}
    # every DICOM fills in PatientID, StudyDate and AccessionNumber; one also PatientName
    dicoms = GOOD + 1 + len(bad)
    assert report["phi_fields"] == {"PatientName": 1, "PatientID": dicoms,
                                    "StudyDate": dicoms, "AccessionNumber": dicoms}
    assert "Doe^John" not in json.dumps(report)  # names of attributes, never their values
    assert report["format"] == "canonical"


def test_prepare_caches_the_good_rows_and_reuses_them(mixed_site, tmp_path):
    d, _ = mixed_site
    cache_dir = tmp_path / "cache"
    cache, summary = run_prepare(SiteSource(d), ImagingOptions(size=32, min_side=32), cache_dir)
    assert len(cache.index) == GOOD + 1 and summary["decoded"] == GOOD + 1
    assert cache.images.shape == (GOOD + 1, 32, 32) and cache.images.dtype == np.uint8
    assert {"unreadable", "not_cr_dx", "no_pixel_data", "missing_file"} <= set(summary["rejected"])
    again, summary2 = run_prepare(SiteSource(d), ImagingOptions(size=32, min_side=32), cache_dir)
    assert summary2["decoded"] == 0 and summary2["reused"] == GOOD + 1
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(cache.images))
    st = os.stat(d / "good3.dcm")
    os.utime(d / "good3.dcm", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, summary3 = run_prepare(SiteSource(d), ImagingOptions(size=32, min_side=32), cache_dir)
    assert summary3["decoded"] == 0  # touched, same bytes: found by content
    write_test_dicom(d / "good3.dcm", i=33)  # new bytes
    _, summary4 = run_prepare(SiteSource(d), ImagingOptions(size=32, min_side=32), cache_dir)
    assert summary4["decoded"] == 1 and summary4["reused"] == GOOD


def test_cli_check_writes_json_and_exit_codes(mixed_site, tmp_path, capsys):
    d, _ = mixed_site
    assert main(["site", "check", str(d), "--min-side", "32", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["usable_images"] == GOOD + 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.csv").write_text("path,patient_id\nnothing.dcm,p1\n")
    assert main(["site", "check", str(empty), "--out", str(tmp_path / "o")]) == 1
    capsys.readouterr()
    assert main(["site", "check", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nowhere" in err[0]


def test_splits_are_by_patient_and_deterministic(cohort):
    cache, _ = run_prepare(SiteSource(cohort / "site4"), ImagingOptions(size=32), None)
    splits = assign_splits(cache.index, seed=3)
    per_patient = splits.groupby(cache.index["patient_id"]).nunique()
    assert (per_patient == 1).all()
    assert splits.equals(assign_splits(cache.index.sample(frac=1, random_state=0), seed=3)
                         .sort_index())
    ds = split_datasets(open_cache(cache.root), seed=3)
    assert sum(len(v) for v in ds.values()) == len(cache.index)
    x, y = ds["train"][0]
    assert x.shape == (1, 32, 32) and y.shape == (14,)
    assert 0 <= float(x.min()) <= float(x.max()) <= 1


def test_augmentation_is_small_and_seeded(cohort):
    import torch

    cache = open_cache(cohort / "site4" / ".fedcxr" / "cache-32")
    x = torch.stack([CachedImages(cache)[i][0] for i in range(8)])
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert 0 < (a - x).abs().mean() < 0.15


def test_partly_given_splits_never_put_a_patient_in_two_splits(tmp_path):
    """Blank split rows follow their patient's given split; a patient given two splits is a
    problem naming the lines, and every row of theirs lands in one split."""
    import pandas as pd

    from common.manifest import read_manifest

    rows = ["path,patient_id,split,Effusion"]
    for p in range(20):
        for k in range(3):
            split = ("train" if p % 2 else "test") if k == 0 else ""
            rows.append(f"p{p}_{k}.png,P{p},{split},0")
    rows.append("conflict_0.png,PX,train,1")
    rows.append("conflict_1.png,PX,test,0")
    rows.append("conflict_2.png,PX,,0")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    result = read_manifest(tmp_path / "manifest.csv", tmp_path, format="canonical")
    index = result.rows
    problems = [p for p in result.problems if p.code == "patient_in_two_splits"]
    from common.manifest.base import patient_ref

    assert len(problems) == 1 and patient_ref("PX") in problems[0].message
    assert "line 62" in problems[0].message and "line 63" in problems[0].message
    splits = assign_splits(index.reset_index(drop=True), seed=0)
    per_patient = splits.groupby(index["patient_id"].to_numpy()).nunique()
    assert (per_patient == 1).all(), per_patient[per_patient > 1]
    # blank rows follow the given split, not the hash, even straight from a cache index
    raw = pd.DataFrame({"patient_id": ["A", "A", "A", "B", "B"],
                        "split": ["", "val", "", "test", "train"]})
    assert assign_splits(raw).tolist() == ["val", "val", "val", "test", "test"]


def test_a_moved_or_copied_site_reuses_its_cache(mixed_site, tmp_path):
    """Fingerprints count paths relative to the data folder, and a file whose fingerprint
    changed but whose bytes did not is found by content: preparing on the host and running
    in a container (another mount point), or copying the archive (new mtimes), decodes
    nothing again."""
    import shutil

    d, _ = mixed_site
    opts = ImagingOptions(size=32, min_side=32)
    cache, first = run_prepare(SiteSource(d), opts, None)  # DATA_DIR/.fedcxr/cache-32
    assert first["decoded"] == GOOD + 1
    moved = shutil.move(d, tmp_path / "mounted-elsewhere")
    again, summary = run_prepare(SiteSource(Path(moved)), opts, None)
    assert summary["decoded"] == 0 and summary["reused"] == GOOD + 1
    assert again.fingerprint == cache.fingerprint  # the data a model saw: the same data
    copied = tmp_path / "copied"
    shutil.copytree(moved, copied, copy_function=shutil.copyfile)  # new mtimes everywhere
    _, summary = run_prepare(SiteSource(copied), opts, None)
    assert summary["decoded"] == 0 and summary["reused"] == GOOD + 1
    (copied / "good2.dcm").write_bytes((copied / "good3.dcm").read_bytes()[:-2] + b"\0\1")
    _, summary = run_prepare(SiteSource(copied), opts, None)
    assert summary["decoded"] == 1  # changed bytes: decoded again
