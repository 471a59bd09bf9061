"""Reader and box files in the public datasets' own formats: parsed, joined, and their boxes
carried through the cache's crop / pad / resize.

Each file is written here in its dataset's published header and quirks:
- VinDr-CXR ``annotations_train.csv`` (Nguyen et al. 2022, PhysioNet): a row per (image,
  radiologist, finding), ``No finding`` rows with empty boxes, rad_id ``R1``..``R17``;
- NIH ChestX-ray14 ``BBox_List_2017.csv``: header ``Image Index,Finding Label,Bbox [x,y,w,h]``
  plus three empty columns, ``Infiltrate`` for Infiltration;
- Google's expert labels for ChestX-ray14 (Majkowska et al. 2019): YES/NO, blank unread;
- RSNA Pneumonia Detection ``stage_2_train_labels.csv``: ``Target=0`` rows with blank boxes.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.annotations import find_annotations, join, read_annotations
from common.cache import open_cache, prepare
from common.errors import FedcxrError
from common.imaging import ImagingOptions, box_to_square, to_square
from common.site import SiteSource, check


def write(path, text: str):
    path.write_text(text)
    return path


VINDR = """image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max
img1,Pleural effusion,10,R8,10.0,40.0,30.0,60.0
img1,Nodule/Mass,8,R8,50.0,5.0,60.0,15.0
img1,No finding,14,R9,,,,
img1,Pleural effusion,10,R10,12.0,42.0,31.0,61.0
img2,No finding,14,R8,,,,
img2,Cardiomegaly,3,R9,20.5,30.5,50.5,45.5
img2,Nodules,99,R10,1,1,2,2
img2,Atelectasis,1,R10,30,30,20,40
"""


def test_vindr_rows_become_per_reader_calls_with_boxes(tmp_path):
    ann = read_annotations(write(tmp_path / "annotations_train.csv", VINDR))
    assert ann.format == "vindr"
    calls = {(k, r, lb): v for k, r, lb, v in ann.calls}
    assert calls[("img1", "R8", "Effusion")] == 1 and calls[("img1", "R9", "Effusion")] == 0
    assert calls[("img1", "R8", "Nodule/Mass")] == 1  # an extra label, under its own name
    assert calls[("img2", "R10", "Atelectasis")] == 1  # the call stands; its box is bad
    assert calls[("img2", "R9", "Cardiomegaly")] == 1 and calls[("img2", "R8", "Cardiomegaly")] == 0
    assert ("img1", "R8", "Nodule") not in calls  # never folded into one of the 14
    assert ("img1", "Effusion", 10.0, 40.0, 30.0, 60.0, "R8") in ann.boxes
    assert len(ann.boxes) == 4
    codes = {p.code: p.where for p in ann.problems}
    assert codes == {"unknown_label_value": "annotations_train.csv:8",
                     "bad_box": "annotations_train.csv:9"}


NIH_BBOX = """Image Index,Finding Label,Bbox [x,y,w,h],,,
00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,
00014716_007.png,Infiltrate,686.101694915254,131.543220338983,185.491525423729,313.491525423729,,,
00014716_007.png,Marker,10,10,5,8,,,
00029817_009.png,Calcified granuloma,1,1,2,2,,,
"""


def test_nih_bbox_list_with_its_split_header_and_infiltrate(tmp_path):
    ann = read_annotations(write(tmp_path / "BBox_List_2017.csv", NIH_BBOX))
    assert ann.format == "nih-bbox"
    (k, label, x0, y0, x1, y1, reader), infiltrate, marker = ann.boxes
    assert (k, label, reader) == ("00013118_008", "Atelectasis", "")
    assert (x0, y0) == pytest.approx((225.0847, 547.0192), abs=1e-3)
    assert (x1, y1) == pytest.approx((225.0847 + 86.7797, 547.0192 + 79.1864), abs=1e-3)
    assert infiltrate[1] == "Infiltration" and marker[1] == "Marker"
    assert [p.code for p in ann.problems] == ["unknown_label_value"]
    assert not ann.calls and not ann.adjudicated  # boxes say where, not who read what


GOOGLE = ("Image Index,Patient ID,Patient Age,Patient Gender,View Position,Fracture,"
          "Pneumothorax,Airspace opacity,Nodule or mass,Set Id\n") + """\
00000003_000.png,3,81,F,PA,NO,YES,NO,NO,test
00000013_005.png,13,56,M,AP,NO,NO,YES,,test
00000013_006.png,13,56,M,AP,MAYBE,NO,NO,NO,test
"""


def test_google_expert_labels_are_adjudicated_and_not_a_manifest(tmp_path):
    ann = read_annotations(write(tmp_path / "four_findings_expert_labels.csv", GOOGLE))
    assert ann.format == "google-expert"
    adj = {(k, lb): v for k, lb, v in ann.adjudicated}
    assert adj[("00000003_000", "Pneumothorax")] == 1.0
    assert adj[("00000013_005", "Airspace opacity")] == 1.0
    assert ("00000013_005", "Nodule or mass") not in adj  # blank: not adjudicated
    assert ("00000013_006", "Fracture") not in adj
    assert [p.code for p in ann.problems] == ["unknown_label_value"]


RSNA = """patientId,x,y,width,height,Target
0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0
00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1
00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1
00704310-78a8-4b38-8475-49f4573b2dbb,323.0,577.0,160.0,104.0,2
"""


def test_rsna_boxes_and_target_as_lung_opacity(tmp_path):
    ann = read_annotations(write(tmp_path / "stage_2_train_labels.csv", RSNA))
    assert ann.format == "rsna"
    assert len(ann.boxes) == 2 and {b[1] for b in ann.boxes} == {"Lung Opacity"}
    assert ann.boxes[1][2:6] == (562.0, 152.0, 818.0, 605.0)
    adj = {(k, lb): v for k, lb, v in ann.adjudicated}
    assert adj[("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "Lung Opacity")] == 0.0
    assert adj[("00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity")] == 1.0
    assert [p.code for p in ann.problems] == ["unknown_label_value"]


def test_an_unknown_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(FedcxrError, match=r"notes\.csv: not a reader or box file"):
        read_annotations(write(tmp_path / "notes.csv", "a,b\n1,2\n"))


def _rows(tmp_path, names):
    return pd.DataFrame({"path": [str(tmp_path / n) for n in names],
                         "patient_id": [f"p{i}" for i in range(len(names))]})


def test_join_makes_reader_columns_nan_where_unread_and_reports_unmatched(tmp_path):
    vindr = read_annotations(write(tmp_path / "a.csv", VINDR + "img9,No finding,14,R8,,,,\n"))
    google = read_annotations(write(tmp_path / "g.csv", GOOGLE.replace("00000003_000", "img1")))
    rows = _rows(tmp_path, ["img1.dicom", "img2.dicom", "img3.dicom"])
    joined = join(rows, [vindr, google])
    r = joined.rows
    assert r["reader8/Effusion"].tolist()[:2] == [1.0, 0.0]
    assert math.isnan(r.loc[2, "reader8/Effusion"])  # R8 did not read img3
    assert r["reader9/Cardiomegaly"].tolist()[:2] == [0.0, 1.0]
    assert r.loc[0, "adjudicated/Pneumothorax"] == 1.0
    assert set(joined.boxes["path"]) == {rows.loc[0, "path"], rows.loc[1, "path"]}
    codes = [p.code for p in joined.problems]
    assert "annotation_unmatched" in codes and "img9" in str(joined.problems)


def test_repeated_file_names_join_by_their_folders(tmp_path):
    """CheXpert's file names repeat (view1_frontal.jpg): an annotation giving the path
    under the site folder joins; the bare name is ambiguous and says so."""
    rows = _rows(tmp_path, ["train/patient1/study1/view1_frontal.jpg",
                            "train/patient2/study1/view1_frontal.jpg"])
    text = ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
            "train/patient2/study1/view1_frontal.jpg,Nodule,1,2,3,4,,,\n"
            "view1_frontal.jpg,Nodule,1,2,3,4,,,\n")
    joined = join(rows, [read_annotations(write(tmp_path / "b.csv", text))])
    assert joined.boxes["path"].tolist() == [rows.loc[1, "path"]]
    assert [p.code for p in joined.problems] == ["annotation_ambiguous"]


@pytest.mark.parametrize("shape", [(100, 200), (200, 100), (90, 90), (300, 120)])
def test_boxes_follow_the_image_through_crop_pad_and_resize(shape):
    """A bright rectangle drawn in the original lands where ``box_to_square`` says."""
    h, w = shape
    box = (0.3 * w, 0.45 * h, 0.62 * w, 0.7 * h)
    img = np.full((h, w), 0.2, dtype=np.float32)
    img[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = 1.0
    out = to_square(img, 64)
    bright = np.argwhere(out > 0.6)
    mapped = box_to_square(tuple(float(int(v)) for v in box), w, h, 64)
    (y0, x0), (y1, x1) = bright.min(axis=0), bright.max(axis=0) + 1
    assert mapped == pytest.approx((x0, y0, x1, y1), abs=1.0)


def test_a_box_outside_the_image_or_the_crop_is_none():
    assert box_to_square((300, 10, 320, 20), 200, 100, 64) is None  # right of the image
    assert box_to_square((10, 0, 20, 10), 100, 300, 64) is None  # in the cropped-off top
    assert box_to_square((20, 10, 10, 20), 100, 100, 64) is None  # not a box
    assert box_to_square((-10, -10, 10, 10), 100, 100, 64) == pytest.approx((0, 0, 6.4, 6.4))


def test_prepare_writes_boxes_in_cache_pixels_and_reports_outside_ones(tmp_path):
    for k, name in enumerate(("a", "b")):
        arr = np.zeros((100, 100), dtype=np.uint8)
        arr[20:40, 50:90] = 255
        arr[80:, :] = 128 + k  # two images, not one image twice
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    write(tmp_path / "manifest.csv", "path,patient_id,Nodule\na.png,p1,1\nb.png,p2,0\n")
    write(tmp_path / "BBox_List_2017.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
          "a.png,Nodule,50,20,40,20,,,\nb.png,Mass,150,20,40,20,,,\n")
    source = SiteSource(tmp_path)
    result = source.read()
    cache, stats = prepare(result.rows, tmp_path / "cache", ImagingOptions(size=50, min_side=32),
                           root=tmp_path, boxes=result.boxes)
    boxes = open_cache(tmp_path / "cache").boxes
    assert boxes[["row", "label"]].values.tolist() == [[0, "Nodule"]]
    assert boxes.iloc[0][["x0", "y0", "x1", "y1"]].tolist() == pytest.approx([25, 10, 45, 20])
    assert [p.code for p in stats.box_problems] == ["box_outside_image"]
    report = check(source, ImagingOptions(min_side=32))
    assert report["boxes"] == {"Nodule": 1}
    assert report["problems"]["box_outside_image"]["count"] == 1


def test_named_files_are_read_and_a_broken_one_is_a_problem(tmp_path):
    write(tmp_path / "manifest.csv", "path,patient_id\n")
    good = write(tmp_path / "elsewhere.csv", NIH_BBOX)
    bad = tmp_path / "missing.csv"
    found, problems = find_annotations(tmp_path, tmp_path / "manifest.csv", [good, bad])
    assert [a.format for a in found] == ["nih-bbox"]
    assert [p.code for p in problems] == ["unreadable_annotations"]
    assert "missing.csv" in problems[0].message


def test_a_fifo_beside_the_manifest_is_skipped_not_waited_on(tmp_path):
    """Hostile input: a FIFO named like a CSV would block a reader forever."""
    import os

    write(tmp_path / "manifest.csv", "path,patient_id,Nodule\n")
    os.mkfifo(tmp_path / "annotations_train.csv")
    found, problems = find_annotations(tmp_path, tmp_path / "manifest.csv", [])
    assert found == [] and problems == []
    found, problems = find_annotations(tmp_path, tmp_path / "manifest.csv",
                                       [tmp_path / "annotations_train.csv"])
    assert found == [] and [p.code for p in problems] == ["unreadable_annotations"]
    assert "not a regular file" in problems[0].message
