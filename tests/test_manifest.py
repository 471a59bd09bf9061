"""Manifest adapters and every bad-manifest case: message, and the good rows still arrive."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from common.errors import ManifestError
from common.labels import LABELS
from common.manifest import find_manifest, read_manifest
from common.manifest.base import parse_age
from tests.conftest import write_test_dicom


def png(path, value=128, size=80):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def codes(result) -> list[str]:
    return [p.code for p in result.problems]


def test_nih_adapter(tmp_path):
    png(tmp_path / "images_001" / "images" / "00000001_000.png")
    png(tmp_path / "images_002" / "images" / "00000002_000.png")
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA\n"
        "00000002_000.png,No Finding,0,2,045Y,F,AP\n"
    )
    result = read_manifest(find_manifest(tmp_path))
    rows = result.rows
    assert result.format == "nih" and len(rows) == 2 and not result.problems
    assert rows.loc[0, "Cardiomegaly"] == 1 and rows.loc[0, "Effusion"] == 1
    assert rows.loc[0, "Atelectasis"] == 0  # NIH annotates all 14
    assert (rows.loc[1, list(LABELS)] == 0).all()
    assert rows.loc[1, "age"] == 45 and rows.loc[1, "sex"] == "F" and rows.loc[1, "view"] == "AP"
    assert rows.loc[0, "path"].endswith("images_001/images/00000001_000.png")


def test_nih_unknown_finding_keeps_the_row(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position\n"
        "a.png,Effusion|Dragon,1,50,M,PA\n"
    )
    result = read_manifest(tmp_path / "Data_Entry_2017.csv")
    assert codes(result) == ["unknown_label_value"]
    assert "Data_Entry_2017.csv:2" in str(result.problems[0])
    assert "Dragon" in str(result.problems[0])
    assert result.rows.loc[0, "Effusion"] == 1


CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Lung Lesion,Edema,"
                   "Atelectasis,Pleural Effusion\n")


def test_chexpert_adapter_and_uncertainty_policies(tmp_path):
    png(tmp_path / "train/patient00001/study1/view1_frontal.jpg")
    png(tmp_path / "train/patient00001/study1/view2_lateral.jpg")
    (tmp_path / "train.csv").write_text(
        CHEXPERT_HEADER
        + "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Male,70,Frontal,AP,"
        ",-1,1,,0,1\n"
        + "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg,Male,70,Lateral,,"
        ",0,,1,,\n"
    )
    result = read_manifest(tmp_path / "train.csv")
    r = result.rows
    assert result.format == "chexpert"
    assert math.isnan(r.loc[0, "Cardiomegaly"])  # -1 ignored by default
    assert r.loc[0, "Effusion"] == 1 and r.loc[0, "Atelectasis"] == 0
    assert math.isnan(r.loc[0, "Edema"])  # blank
    assert math.isnan(r.loc[0, "Mass"])  # Lung Lesion is not one of the 14
    assert r.loc[1, "view"] == "LATERAL" and r.loc[0, "view"] == "AP"
    assert r.loc[0, "patient_id"] == "patient00001"
    assert (tmp_path / "train/patient00001/study1/view1_frontal.jpg").samefile(r.loc[0, "path"])
    ones = read_manifest(tmp_path / "train.csv", uncertain="ones").rows
    assert ones.loc[0, "Cardiomegaly"] == 1
    mixed = read_manifest(tmp_path / "train.csv", uncertain="ignore,Cardiomegaly=zeros").rows
    assert mixed.loc[0, "Cardiomegaly"] == 0


def test_chexpert_unknown_value(tmp_path):
    png(tmp_path / "train/patient00001/study1/view1_frontal.jpg")
    (tmp_path / "train.csv").write_text(
        CHEXPERT_HEADER
        + "x/train/patient00001/study1/view1_frontal.jpg,Female,40,Frontal,PA,,maybe,,,,1\n"
    )
    result = read_manifest(tmp_path / "train.csv")
    assert codes(result) == ["unknown_label_value"] and "'maybe'" in str(result.problems[0])
    assert result.rows.loc[0, "Effusion"] == 1


def test_mimic_adapter_joins_labels_and_metadata(tmp_path):
    png(tmp_path / "files/p10/p10000032/s50414267/abc.jpg")
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nabc,10000032,50414267,PA\n"
    )
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id,Atelectasis,Cardiomegaly,Pleural Effusion,Edema\n"
        "10000032,50414267,-1.0,1.0,,0.0\n"
    )
    manifest = find_manifest(tmp_path)
    assert manifest.name == "mimic-cxr-2.0.0-metadata.csv"
    result = read_manifest(manifest, uncertain="zeros")
    r = result.rows.iloc[0]
    assert result.format == "mimic" and r["view"] == "PA" and r["patient_id"] == "10000032"
    assert r["Atelectasis"] == 0 and r["Cardiomegaly"] == 1 and math.isnan(r["Effusion"])
    assert r["path"].endswith("files/p10/p10000032/s50414267/abc.jpg")


def test_padchest_adapter(tmp_path):
    png(tmp_path / "0" / "img1.png")
    (tmp_path / "PADCHEST_labels.csv").write_text(
        "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
        "ViewPosition_DICOM,Modality_DICOM,Labels\n"
        "img1.png,0,20150302,S1,P1,1940.0,F,PA,CR,\"['cardiomegaly', 'scoliosis', "
        "'pleural effusion']\"\n"
        "img1.png,0,20150302,S2,P2,1950.0,M,AP_horizontal,CR,not a list\n"
    )
    result = read_manifest(tmp_path / "PADCHEST_labels.csv")
    r = result.rows
    assert result.format == "padchest"
    assert r.loc[0, "Cardiomegaly"] == 1 and r.loc[0, "Effusion"] == 1 and r.loc[0, "Mass"] == 0
    assert r.loc[0, "age"] == 75 and r.loc[0, "sex"] == "F"
    assert "unknown_label_value" in codes(result)
    assert "duplicate_row" in codes(result)  # the same image listed twice


def test_dicom_folder_with_sidecar_by_uid(tmp_path):
    write_test_dicom(tmp_path / "x" / "a.dcm", i=1, age_years=0.5, sex="M")
    write_test_dicom(tmp_path / "x" / "b.dcm", i=2, view="AP")
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,Effusion\n1.2.3.1.3,1\n1.2.3.2.3,0\n")
    result = read_manifest(tmp_path / "labels.csv")
    r = result.rows.set_index("patient_id")
    assert result.format == "dicom"
    assert r.loc["P0001", "Effusion"] == 1 and r.loc["P0002", "Effusion"] == 0
    assert r.loc["P0001", "age"] == 0.5  # '006M'
    assert r.loc["P0002", "view"] == "AP" and r.loc["P0001", "manufacturer"] == "Philips"
    assert math.isnan(r.loc["P0001", "Hernia"])


def test_canonical_with_readers(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text(
        "path,patient_id,sex,age,view,Effusion,reader1/Effusion,adjudicated/Effusion\n"
        "a.png,p1,M,60,PA,1,0,1\n"
    )
    r = read_manifest(tmp_path / "manifest.csv").rows
    assert r.loc[0, "Effusion"] == 1 and r.loc[0, "reader1/Effusion"] == 0
    assert r.loc[0, "adjudicated/Effusion"] == 1 and math.isnan(r.loc[0, "Edema"])


def test_duplicated_rows_keep_the_first(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,patient_id,Effusion\na.png,p1,1\na.png,p1,0\n")
    result = read_manifest(tmp_path / "m.csv")
    assert codes(result) == ["duplicate_row"] and "line 2" in str(result.problems[0])
    assert len(result.rows) == 1 and result.rows.loc[0, "Effusion"] == 1


def test_patient_in_two_given_splits(tmp_path):
    (tmp_path / "m.csv").write_text(
        "path,patient_id,split,Effusion\na.png,p1,train,1\nb.png,p1,test,0\nc.png,p2,test,0\n"
    )
    result = read_manifest(tmp_path / "m.csv")
    assert codes(result) == ["patient_in_two_splits"]
    from common.manifest.base import patient_ref

    text = str(result.problems[0])  # the patient named by a hash prefix, never by the id
    assert patient_ref("p1") in text and "p1" not in text.replace(patient_ref("p1"), "")
    assert list(result.rows["split"]) == ["train", "train", "test"]


def test_empty_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,patient_id,Effusion\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("")
    with pytest.raises(ManifestError, match="empty"):
        read_manifest(tmp_path / "n.csv")


def test_unrecognised_columns_name_closest_format(tmp_path):
    (tmp_path / "m.csv").write_text("Image Index,Finding Labels,Patient ID\nx.png,Mass,1\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "m.csv")
    message = str(info.value)
    assert "closest format is nih" in message
    assert "Patient Age" in message and "View Position" in message
    assert "\n" not in message


def test_non_utf8_manifest_is_read(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("path,patient_id,manufacturer,Effusion\n"
                                     "a.png,p1,Sch\xf6n Medizin,1\n".encode("latin-1"))
    result = read_manifest(tmp_path / "m.csv")
    assert codes(result) == ["non_utf8_manifest"]
    assert result.rows.loc[0, "manufacturer"] == "Schön Medizin"


@pytest.mark.parametrize("raw,years", [("045Y", 45), ("006M", 0.5), ("002W", 14 / 365.25),
                                       ("003D", 3 / 365.25), ("61", 61), (" 7 ", 7)])
def test_dicom_age_strings(raw, years):
    assert parse_age(raw) == pytest.approx(years, abs=1e-3)


@pytest.mark.parametrize("raw", ["45 years", "Y045", "-3Y"])
def test_bad_age_strings_raise(raw):
    with pytest.raises(ValueError):
        parse_age(raw)


def test_find_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no recognised manifest"):
        find_manifest(tmp_path)
    (tmp_path / "a.csv").write_text("path,patient_id\nx,1\n")
    (tmp_path / "b.csv").write_text("path,patient_id\ny,2\n")
    with pytest.raises(ManifestError, match="several manifests"):
        find_manifest(tmp_path)
