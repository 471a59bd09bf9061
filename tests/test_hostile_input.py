"""The hospital side on hostile and messy input (issue: 20 failures of an adversarial trial).

Every input is built here, in the test: malformed DICOM header values, decompression bombs,
PadChest projections, unreadable folders, ambiguous names, ragged rows, paths out of the data
folder, FIFOs, blank and palette images, absurd ages, missing patient ids, bad CLI arguments,
hostile coordinator messages, and an interrupted prepare. Each must end as a problem row with
its code (or a one-line error, or a refusal), never a traceback, and never lose a good row.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from cli.main import main
from common.cache import PrepareInterrupted, open_cache, prepare
from common.imaging import ImagingOptions
from common.manifest import read_manifest
from common.site import SiteSource, check, run_prepare
from tests.conftest import write_test_dicom

ROOT = Path(__file__).resolve().parents[1]
OPTS = ImagingOptions(size=32, min_side=32)


def ramp_png(path: Path, side: int = 96, seed: int = 0) -> Path:
    """A small greyscale image with real content (not blank)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = (np.tile(np.linspace(20, 230, side), (side, 1)) + rng.normal(0, 5, (side, side)))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def canonical_site(d: Path, files: list[str]) -> Path:
    """A canonical manifest over ``files`` (one patient each) plus two good images."""
    ramp_png(d / "good0.png", seed=1)
    ramp_png(d / "good1.png", seed=2)
    rows = ["path,patient_id,Effusion"] + [f"good{i}.png,g{i},{i}" for i in range(2)]
    rows += [f"{f},p{k},0" for k, f in enumerate(files)]
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    return d


def codes_by_file(report: dict) -> dict[str, set[str]]:
    """Every problem code per file name (from check's full list of problem rows)."""
    out: dict[str, set[str]] = {}
    for code, where, _message in report["problem_rows"]:
        out.setdefault(Path(where.split(":")[0]).name, set()).add(code)
    return out


def edit(path: Path, **values) -> Path:
    """Set header values as raw bytes, including invalid ones pydicom would refuse to write
    (as a real export's bytes arrive)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    for keyword, (vr, value) in values.items():
        raw = value.encode() + (b" " if len(value) % 2 else b"")
        tag = pydicom.tag.Tag(tag_for_keyword(keyword))
        ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    ds.save_as(path)
    return path


# ---------------------------------------------------------------- 1. malformed header values


def test_malformed_header_values_are_problem_rows_and_good_rows_survive(tmp_path):
    d = tmp_path / "site"
    edit(write_test_dicom(d / "frames.dcm", i=1), NumberOfFrames=("IS", "1A"))
    edit(write_test_dicom(d / "slope.dcm", i=2), RescaleSlope=("DS", "abcd"))
    edit(write_test_dicom(d / "width0.dcm", i=3), WindowWidth=("DS", "0"))
    edit(write_test_dicom(d / "widthneg.dcm", i=4), WindowWidth=("DS", "-40"))
    edit(write_test_dicom(d / "centre.dcm", i=5), WindowCenter=("DS", "abcdef"))
    voi = write_test_dicom(d / "voi.dcm", i=6)
    ds = pydicom.dcmread(voi)
    item = pydicom.Dataset()
    item.add_new("LUTData", "US", [0, 100, 200])  # a VOI LUT item without its LUTDescriptor
    item.LUTExplanation = "no descriptor"
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.save_as(voi)
    canonical_site(d, ["frames.dcm", "slope.dcm", "width0.dcm", "widthneg.dcm", "centre.dcm",
                       "voi.dcm"])
    out = tmp_path / "out"
    assert main(["site", "check", str(d), "--out", str(out), "--min-side", "32"]) == 0
    report = json.loads((out / "check.json").read_text())
    report["problem_rows"] = pd.read_csv(out / "problems.csv").values.tolist()
    found = codes_by_file(report)
    assert found["frames.dcm"] == {"bad_header", "phi_in_header"}
    assert found["slope.dcm"] == {"bad_header", "phi_in_header"}
    for windowed in ("width0.dcm", "widthneg.dcm", "centre.dcm", "voi.dcm"):
        assert "window_ignored" in found[windowed], windowed  # kept, windowed from pixels
    assert report["usable_images"] == 2 + 4
    cache, summary = run_prepare(SiteSource(d), OPTS, tmp_path / "cache")
    assert len(cache.index) == 6 and set(summary["rejected"]) == {"bad_header"}
    # the fallback window is the percentile window: the image is not blank or saturated
    row = int(np.flatnonzero(cache.index["path"].str.endswith("width0.dcm"))[0])
    image = np.asarray(cache.images[row], dtype=float) / 255
    assert image.std() > 0.03 and 0.2 < image.mean() < 0.8


def test_a_decoder_that_raises_is_one_problem_row_not_a_crash(tmp_path, monkeypatch):
    """Any exception inside a decoder (pydicom's badVR-style surprises) is that file's
    ``decoder_failed`` problem; the other rows are checked and cached."""
    import common.imaging as imaging

    d = canonical_site(tmp_path / "site", ["odd.png"])
    ramp_png(d / "odd.png", seed=3)
    real = imaging.decode_raster

    def flaky(path, options=None):
        if Path(path).name == "odd.png":
            raise OverflowError("a decoder bug")
        return real(path, options)

    monkeypatch.setattr(imaging, "decode_raster", flaky)
    report = check(SiteSource(d), OPTS)
    assert codes_by_file(report)["odd.png"] == {"decoder_failed"}
    assert report["usable_images"] == 2


# ---------------------------------------------------------------- 2. decompression bombs


def deflated_bomb(path: Path, side: int) -> Path:
    """A Deflated Explicit VR DICOM declaring side x side 16-bit zeros, written by streaming
    deflate (never holding the pixels): a few hundred KB on disk."""
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = pydicom.dcmread(write_test_dicom(path, i=9))
    del src.PixelData
    src.Rows = src.Columns = side
    src.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, src)
    nbytes = side * side * 2
    pixel_header = (b"\xe0\x7f\x10\x00" + b"OW" + b"\x00\x00" + nbytes.to_bytes(4, "little"))
    head = pydicom.filebase.DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, src.file_meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        fh.write(head.getvalue())
        fh.write(deflater.compress(body.getvalue() + pixel_header))
        zeros = bytes(2**20)
        for _ in range(nbytes // len(zeros)):
            fh.write(deflater.compress(zeros))
        fh.write(deflater.compress(bytes(nbytes % len(zeros))))
        fh.write(deflater.flush())
    return path


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    d = tmp_path / "site"
    bomb = deflated_bomb(d / "bomb.dcm", 6000)  # 72 MB of pixels in about 70 KB
    assert bomb.stat().st_size < 2**20
    Image.new("L", (9000, 9000)).save(d / "zeros.png")  # 81 MB of pixels, a tiny file
    canonical_site(d, ["bomb.dcm", "zeros.png"])
    report = check(SiteSource(d), OPTS)
    found = codes_by_file(report)
    assert "too_large" in found["bomb.dcm"] and found["zeros.png"] == {"too_large"}
    assert report["usable_images"] == 2
    assert "--max-image-mb" in report["problems"]["too_large"]["examples"][0]
    # a budget raised by the site lets the big PNG through to the next check (it is blank)
    raised = check(SiteSource(d), ImagingOptions(size=32, min_side=32, max_image_mb=100))
    assert codes_by_file(raised)["zeros.png"] == {"blank_image"}


# ---------------------------------------------------------------- 3. PadChest views


def test_padchest_views_come_from_projection(tmp_path):
    for k, name in enumerate(("pa.png", "lat.png", "costal.png", "dicomonly.png", "ap.png")):
        ramp_png(tmp_path / "0" / name, seed=k)
    (tmp_path / "PADCHEST_labels.csv").write_text(
        "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
        "ViewPosition_DICOM,Modality_DICOM,Projection,Labels\n"
        "pa.png,0,20150302,S1,P1,1940.0,F,POSTEROANTERIOR,CR,PA,\"['normal']\"\n"
        "lat.png,0,20150302,S1,P1,1940.0,F,nan,CR,L,\"['normal']\"\n"
        "costal.png,0,20150302,S2,P2,1950.0,M,nan,CR,COSTAL,\"['normal']\"\n"
        "dicomonly.png,0,20150302,S3,P3,1950.0,M,ANTEROPOSTERIOR,CR,UNK,\"['normal']\"\n"
        "ap.png,0,20150302,S4,P4,1950.0,M,nan,CR,AP_horizontal,\"['normal']\"\n")
    result = read_manifest(tmp_path / "PADCHEST_labels.csv")
    views = dict(zip(result.rows["path"].map(lambda p: Path(p).name), result.rows["view"],
                     strict=True))
    assert views == {"pa.png": "PA", "lat.png": "LATERAL", "dicomonly.png": "AP", "ap.png": "AP"}
    assert [p.code for p in result.problems] == ["non_chest_projection"]
    assert result.problems[0].where.endswith(":4")
    report = check(SiteSource(tmp_path), OPTS)
    assert codes_by_file(report)["lat.png"] == {"lateral"} and report["usable_images"] == 3


# ---------------------------------------------------------------- 4. permissions


def _as_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI as a user without special rights (root reads everything, so as root the
    test drops to 'nobody' with setpriv)."""
    cmd = [sys.executable, "-m", "cli.main", *args]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot drop rights")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": "/tmp"})


def test_unreadable_files_and_folders_are_permission_denied(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="fedcxr-perm-"))  # reachable by the dropped user
    try:
        os.chmod(base, 0o755)
        d = base / "site"
        ramp_png(d / "images_001" / "a.png", seed=1)
        ramp_png(d / "images_001" / "b.png", seed=2)
        ramp_png(d / "locked" / "c.png", seed=3)
        ramp_png(d / "d.png", seed=4)
        (d / "Data_Entry_2017.csv").write_text(
            "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
            "View Position\n"
            "a.png,No Finding,0,1,50,M,PA\nb.png,Effusion,0,2,60,F,PA\n"
            "c.png,No Finding,0,3,40,M,PA\nd.png,No Finding,0,4,40,M,PA\n")
        for path in [base, *base.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(d / "locked", 0o000)
        os.chmod(d / "d.png", 0o000)
        out = base / "out"
        out.mkdir()
        os.chmod(out, 0o777)
        proc = _as_unprivileged(["site", "check", str(d), "--out", str(out),
                                 "--min-side", "32"])
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        report = json.loads((out / "check.json").read_text())
        denied = report["problems"]["permission_denied"]
        assert denied["count"] == 3  # the folder, the row inside it, the mode-000 file
        text = " ".join(denied["examples"])
        assert "folder locked" in text and "c.png" in text and "d.png" in text
        assert report["usable_images"] == 2
    finally:
        for path in [base, *base.rglob("*")]:
            try:
                os.chmod(path, 0o755)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- 5. ambiguous names


def test_a_name_with_two_copies_is_ambiguous_until_the_manifest_says_which(tmp_path):
    Image.new("L", (96, 96)).save((tmp_path / "old_export").mkdir() or
                                  tmp_path / "old_export" / "x.png")  # a stale black copy
    ramp_png(tmp_path / "images_001" / "x.png")
    ramp_png(tmp_path / "images_001" / "y.png", seed=1)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position\n")
    (tmp_path / "Data_Entry_2017.csv").write_text(
        header + "x.png,Effusion,0,1,50,M,PA\ny.png,No Finding,0,2,50,M,PA\n")
    result = read_manifest(tmp_path / "Data_Entry_2017.csv")
    assert [p.code for p in result.problems] == ["ambiguous_file"]
    message = str(result.problems[0])
    assert "old_export/x.png" in message and "images_001/x.png" in message
    assert list(result.rows["path"].map(lambda p: Path(p).name)) == ["y.png"]
    (tmp_path / "Data_Entry_2017.csv").write_text(
        header + "images_001/x.png,Effusion,0,1,50,M,PA\ny.png,No Finding,0,2,50,M,PA\n")
    result = read_manifest(tmp_path / "Data_Entry_2017.csv")
    assert result.problems == [] and result.rows["path"].iloc[0].endswith("images_001/x.png")


# ---------------------------------------------------------------- 6. ragged rows


def test_a_ragged_row_costs_that_row_only_and_names_its_line(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        ramp_png(tmp_path / name)
    (tmp_path / "manifest.csv").write_text(
        "path,patient_id,Effusion\n"
        "a.png,p1,1\n"
        "b.png,p2,0,oops,extra\n"       # ragged: line 3
        "\"c.png\",p3,0,,,\n"           # Excel's trailing empty fields: kept
        ",,,,\n,,\n")                   # Excel's trailing empty rows: ignored
    manifest = SiteSource(tmp_path).read()  # auto-detection sees the format despite it
    assert manifest.format == "canonical"
    assert list(manifest.rows["patient_id"]) == ["p1", "p3"]
    assert [(p.code, p.where) for p in manifest.problems] == [("ragged_row", "manifest.csv:3")]


# ---------------------------------------------------------------- 7. paths and duplicates


def test_paths_outside_the_data_folder_are_refused_unless_allowed(tmp_path):
    outside = ramp_png(tmp_path / "elsewhere" / "o.png", seed=7)
    d = tmp_path / "site"
    ramp_png(d / "in.png")
    (d / "link.png").symlink_to(outside)
    (d / "manifest.csv").write_text(
        "path,patient_id,Effusion\nin.png,p1,1\n../elsewhere/o.png,p2,0\n"
        f"{outside},p3,0\nlink.png,p4,1\n/etc/shadow,p5,0\n")
    refused = SiteSource(d).read()
    assert list(refused.rows["patient_id"]) == ["p1"]
    assert [p.code for p in refused.problems] == ["outside_data_dir"] * 4
    assert [p.where for p in refused.problems] == [f"manifest.csv:{k}" for k in (3, 4, 5, 6)]
    allowed = SiteSource(d, allow_outside=True).read()
    assert len(allowed.rows) == 5


def test_the_same_image_twice_is_found_by_content_and_cached_once(tmp_path):
    d = tmp_path / "site"
    ramp_png(d / "a.png", seed=1)
    shutil.copy(d / "a.png", d / "copy_of_a.png")
    ramp_png(d / "b.png", seed=2)
    (d / "manifest.csv").write_text(
        "path,patient_id,split,Effusion\na.png,p1,train,1\ncopy_of_a.png,p2,test,1\n"
        "b.png,p3,,0\n")
    report = check(SiteSource(d), OPTS)
    dup = report["problems"]["duplicate_image"]
    assert dup["count"] == 1 and "another patient" in dup["examples"][0]
    assert "copy_of_a.png" in dup["examples"][0] and report["usable_images"] == 2
    cache, summary = run_prepare(SiteSource(d), OPTS, tmp_path / "cache")
    assert sorted(cache.index["patient_id"]) == ["p1", "p3"]
    assert summary["rejected"]["duplicate_image"]["count"] == 1
    again, summary = run_prepare(SiteSource(d), OPTS, tmp_path / "cache")  # reused: still once
    assert summary["reused"] == 2 and len(again.index) == 2


# ---------------------------------------------------------------- 8. FIFOs


def test_a_fifo_in_the_manifest_is_not_a_file_and_never_blocks(tmp_path):
    d = canonical_site(tmp_path / "site", ["pipe.png"])
    os.mkfifo(d / "pipe.png")

    def hang(*_):
        raise TimeoutError("reading the FIFO blocked")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        report = check(SiteSource(d), OPTS)
        cache, summary = run_prepare(SiteSource(d), OPTS, tmp_path / "cache")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert codes_by_file(report)["pipe.png"] == {"not_a_file"}
    assert "not_a_file" in summary["rejected"] and len(cache.index) == 2


# ---------------------------------------------------------------- 9. silent data quality


def test_blank_palette_alpha_images_ages_and_patient_ids(tmp_path):
    d = tmp_path / "site"
    d.mkdir()
    Image.new("L", (96, 96)).save(d / "black.png")
    write_test_dicom(d / "constant.dcm", img=np.full((96, 96), 0.4, np.float32))
    edit(write_test_dicom(d / "slope0.dcm", i=2), RescaleSlope=("DS", "0"))
    edit(write_test_dicom(d / "slopenan.dcm", i=3), RescaleSlope=("DS", "nan"))
    grey = np.tile(np.linspace(10, 240, 96).astype(np.uint8), (96, 1))
    alpha = np.full_like(grey, 255)
    Image.fromarray(np.stack([grey, alpha], axis=2), mode="LA").save(d / "la.png")
    pal = Image.fromarray(255 - grey, mode="P")  # index i shows grey 255 - i: the indices
    pal.putpalette([v for k in range(256) for v in (255 - k,) * 3])  # are the inverse
    pal.save(d / "palette.png")
    (d / "manifest.csv").write_text(
        "path,patient_id,age,Effusion\n"
        "black.png,p1,50,0\nconstant.dcm,p2,50,0\nslope0.dcm,p3,50,0\nslopenan.dcm,p4,50,0\n"
        "la.png,,-5,1\npalette.png,,999,0\n")
    report = check(SiteSource(d), OPTS)
    found = codes_by_file(report)
    assert found["black.png"] == {"blank_image"}
    assert "blank_image" in found["constant.dcm"] and "blank_image" in found["slope0.dcm"]
    assert "bad_header" in found["slopenan.dcm"]
    assert "la.png" not in found and "palette.png" not in found  # both read as grey
    assert report["problems"]["bad_age"]["count"] == 2
    assert report["problems"]["missing_patient_id"]["count"] == 1
    assert report["usable_images"] == 2 and report["patients"] == 2  # each its own patient
    from common.imaging import decode

    # the palette PNG is read through its palette: the grey ramp, not its (inverted) indices
    assert np.allclose(decode(d / "palette.png", OPTS), grey / 255.0, atol=1e-6)
    assert np.allclose(decode(d / "la.png", OPTS), grey / 255.0, atol=1e-6)
    rows = read_manifest(d / "manifest.csv").rows
    assert rows["age"].isna().sum() == 2 and rows["patient_id"].str.startswith("img-").sum() == 2
    assert math.isnan(rows.loc[rows["path"].str.endswith("la.png"), "age"].iloc[0])


def test_an_infinite_age_is_bad(tmp_path):
    ramp_png(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text("path,patient_id,age\na.png,p1,inf\n")
    result = read_manifest(tmp_path / "manifest.csv")
    assert [p.code for p in result.problems] == ["bad_age"]


# ---------------------------------------------------------------- 11. one-line errors


@pytest.mark.parametrize("args", [
    ["--image-size", "0"], ["--image-size", "-1"], ["--image-size", "5000"],
    ["--uncertain", "bogus"], ["--max-image-mb", "-3"], ["--min-side", "x"],
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args):
    d = canonical_site(tmp_path / "site", [])
    with pytest.raises(SystemExit) as info:
        main(["site", "prepare", str(d), "--cache", str(tmp_path / "c"), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedcxr site prepare: error: argument")
    assert "Traceback" not in "".join(err)


def test_unwritable_outputs_are_one_line_errors(tmp_path, capsys):
    d = canonical_site(tmp_path / "site", [])
    (tmp_path / "a-file").write_text("")
    assert main(["site", "check", str(d), "--out", str(tmp_path / "a-file"),
                 "--min-side", "32"]) == 2
    err = capsys.readouterr().err
    assert "cannot write check.json" in err and "--out" in err and "Traceback" not in err
    (d / ".fedcxr").write_text("")  # the default cache folder cannot be made
    assert main(["site", "prepare", str(d), "--image-size", "32", "--min-side", "32"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the cache" in err and "--cache" in err and "Traceback" not in err


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"),
                                    reason="needs /dev/full (Linux): a real ENOSPC")


def _full_disk_at(path: Path) -> Path:
    """Make the next atomic write of ``path`` go to /dev/full, whose writes fail with the
    kernel's own ENOSPC: its temporary file beside it is a link there."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.symlink_to("/dev/full")
    return tmp


@needs_dev_full
def test_a_full_disk_is_one_line_and_a_rerun_with_space_continues(tmp_path, capsys):
    """A site's cache and the coordinator's model files, written onto a full disk: one line
    naming the file and what to do (exit 2 from the CLI), the temporary file gone, the file
    that was there before unchanged; once there is space the same command works."""
    d = canonical_site(tmp_path / "site", [])
    cache = tmp_path / "cache"
    cache.mkdir()
    tmp = _full_disk_at(cache / "index.csv")
    args = ["site", "prepare", str(d), "--cache", str(cache), "--image-size", "32",
            "--min-side", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{cache / 'index.csv'}: no space left" in err and "free space" in err
    errors = [line for line in err.splitlines() if not line.startswith("decoding ")]
    assert "Traceback" not in err and len(errors) == 1  # progress lines, then one line
    assert not os.path.lexists(tmp)  # the temporary file is removed: its space is free
    assert main(args) == 0  # space again: the same command completes the cache
    assert (cache / "index.csv").exists()

    from common.atomic import DiskFull
    from server.weight_files import WeightFiles

    files = WeightFiles(tmp_path / "weights")
    kept = files.put("round-001-federated", {"w": np.arange(4.0)})
    before = kept.path.read_bytes()
    tmp = _full_disk_at(kept.path)
    with pytest.raises(DiskFull, match="no space left"):
        files.put("round-001-federated", {"w": np.zeros(1 << 20)})
    assert not os.path.lexists(tmp) and kept.path.read_bytes() == before


def test_exit_codes_tell_nothing_usable_from_the_tool_failing(tmp_path, monkeypatch, capsys):
    d = tmp_path / "site"
    d.mkdir()
    Image.new("L", (96, 96)).save(d / "black.png")
    (d / "manifest.csv").write_text("path,patient_id\nblack.png,p1\n")
    assert main(["site", "check", str(d), "--out", str(tmp_path)]) == 1  # nothing usable
    import common.site

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(common.site, "check", broken)
    assert main(["site", "check", str(d), "--out", str(tmp_path)]) == 3  # the tool failed
    assert "internal error" in capsys.readouterr().err


# ---------------------------------------------------------------- 13. interrupts


def test_an_interrupted_prepare_keeps_what_it_decoded_and_a_rerun_continues(tmp_path):
    d = tmp_path / "site"
    names = [f"i{k}.png" for k in range(48)]  # above SERIAL_BELOW: the process pool runs
    for k, name in enumerate(names):
        ramp_png(d / name, seed=k)
    (d / "manifest.csv").write_text(
        "path,patient_id\n" + "".join(f"{n},p{k}\n" for k, n in enumerate(names)))
    rows = SiteSource(d).read().rows

    def ctrl_c(done: int, total: int) -> None:
        if done == 20:
            raise KeyboardInterrupt

    with pytest.raises(PrepareInterrupted) as info:
        prepare(rows, tmp_path / "cache", OPTS, workers=2, progress=ctrl_c)
    assert info.value.kept == 19 and info.value.total == 48
    assert multiprocessing.active_children() == []  # the workers were ended, not awaited
    partial = open_cache(tmp_path / "cache")
    assert not partial.complete and len(partial.index) == 19
    from common.site import ensure_cache

    cache, stats = prepare(rows, tmp_path / "cache", OPTS, workers=2)
    assert stats.reused == 19 and stats.decoded == 48 - 19 and cache.complete
    assert ensure_cache(SiteSource(d), 32, tmp_path / "cache").complete


# ---------------------------------------------------------------- 12. hostile messages


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    from common.synth import SynthOptions, generate

    out = tmp_path_factory.mktemp("hostile-cohort")
    generate(out, SynthOptions(sites=2, held_out=1, images_per_site=24, size=64, seed=11,
                               min_cell=1))
    return out / "cohort.toml"


def _node(cohort: Path, partition: int):
    from flwr.app import Context, RecordDict

    from common.config import RunConfig, as_flower

    run_config = {**as_flower(RunConfig()), "image-size": 32, "cohort": str(cohort)}
    return Context(run_id=1, node_id=9, node_config={"partition-id": partition,
                                                     "num-partitions": 2},
                   state=RecordDict(), run_config=run_config)


def test_run_names_become_safe_folders_inside_the_state_folder(tmp_path):
    from client.handlers import run_folder

    parent = tmp_path / "external"
    for hostile in ("../../x", "/etc", "..", "a/../../b", "x\\..\\y", ".hidden"):
        folder = run_folder(parent, hostile)
        assert folder.parent == parent and folder.resolve().is_relative_to(parent.resolve())
    assert run_folder(parent, "run-2026.11") == parent / "run-2026.11"  # a plain name as is
    assert run_folder(parent, "a/b") != run_folder(parent, "a_b")  # never the same folder


def test_hostile_messages_are_refused_with_a_code_and_logged(tiny_cohort, task_identity):
    """Each kind of hostile content, sent straight to the ClientApp: a MALFORMED refusal
    (never a traceback, never a file written outside the state folder), in the audit log."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from client.app import app
    from common import protocol as wire
    from common.model import build_model
    from common.records import to_record

    held_out, trainer = _node(tiny_cohort, 1), _node(tiny_cohort, 0)
    weights = to_record(build_model(norm="batch").state_dict())

    def send(content: RecordDict, kind: str, node) -> Message:
        return app(Message(content, dst_node_id=9, message_type=kind), node)

    def score(arrays, name="federated", run_name="r1") -> RecordDict:
        return wire.ScoreRequest(name, arrays, "batch", run_name).encode()

    floats = weights["float"].numpy()
    hostile = {
        "wrong shape": score(ArrayRecord({"float": Array(floats[:-5]),
                                          "int": weights["int"]})),
        "wrong dtype": score(ArrayRecord({"float": Array(floats.astype(np.float64)),
                                          "int": weights["int"]})),
        "nan weights": score(ArrayRecord({"float": Array(np.full_like(floats, np.nan)),
                                          "int": weights["int"]})),
        "extra array": score(ArrayRecord({"float": weights["float"], "int": weights["int"],
                                          "evil": Array(np.zeros(3, np.float32))})),
        "path as model name": score(weights, name="../../model"),
        "missing key": RecordDict({"model/federated": weights,
                                   "config": ConfigRecord({"norm": "batch"})}),
        "bad norm": wire.ScoreRequest("federated", weights, "layer", "r1").encode(),
    }
    state = Path(tiny_cohort).parent
    before = {p for p in state.parent.rglob("*")}
    for what, content in hostile.items():
        reply = send(content, wire.SCORE, held_out)
        assert wire.refusal(reply) is wire.Refusal.MALFORMED, (what, reply.error.reason)
    external = wire.ExternalRequest("r1", ["federated"], {"federated": {}}, [], []).encode()
    external["config"]["thresholds"] = "x" * (wire.MAX_JSON_CHARS + 1)
    assert wire.refusal(send(external, wire.EXTERNAL, held_out)) is wire.Refusal.MALFORMED
    external = wire.ExternalRequest("r1", ["federated"], {"federated": {"Nope": 0.5}}, [],
                                    []).encode()
    assert wire.refusal(send(external, wire.EXTERNAL, held_out)) is wire.Refusal.MALFORMED
    train = RecordDict({"arrays": weights, "config": ConfigRecord(
        {"server-round": "1; rm -rf", "norm": "batch", "run-name": "r", "planned-units": 1,
         "arm": "federated", "seed": 0})})
    assert wire.refusal(send(train, wire.TRAIN, trainer)) is wire.Refusal.MALFORMED
    # a hostile run name is reduced, and the scores stay inside the site's state folder
    ok = send(score(weights, run_name="../../escaped"), wire.SCORE, held_out)
    assert not ok.has_error()
    created = {p for p in state.parent.rglob("*")} - before
    assert created and all(".fedcxr" in p.parts for p in created if p.suffix == ".npy")
    assert not list(state.parent.parent.glob("escaped*"))
    audit = [json.loads(line) for site_dir in state.glob("*/.fedcxr")
             for line in (site_dir / "audit.jsonl").read_text().splitlines()]
    assert sum("MALFORMED" in e["outcome"] for e in audit) == len(hostile) + 3
