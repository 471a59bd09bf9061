"""Write synthetic radiographs in the formats real sites have: 8-bit PNG (NIH), JPEG
(CheXpert) and DICOM with full headers (CR / DX, MONOCHROME1/2, 8-16 bits, rescale, window).
Everything is a function of its inputs (UIDs derive from the seed), so same seed, same bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.synth.profiles import Acquisition

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(path, optimize=False)


def write_jpeg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(path, quality=92)


@dataclass(frozen=True)
class DicomFacts:
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sex: str
    age_years: float
    view: str
    study_date: str
    accession: str
    institution: str = ""
    patient_name: str = ""
    # A research export de-identified by PS3.15's basic profile: no dates or accession
    # numbers, PatientID a pseudonym, declared by PatientIdentityRemoved = YES.
    deidentified: bool = False


def dicom_age(years: float) -> str:
    """DICOM AS value: ``045Y``, or months below two years (``006M``)."""
    if years < 2:
        return f"{max(int(round(years * 12)), 0):03d}M"
    return f"{int(years):03d}Y"


def write_dicom(path: Path, img: np.ndarray, facts: DicomFacts, acq: Acquisition) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    maxval = 2**acq.bits - 1
    stored = np.rint(img * maxval).astype(np.uint16 if acq.bits > 8 else np.uint8)
    if acq.photometric == "MONOCHROME1":
        stored = (maxval - stored).astype(stored.dtype)  # high values display dark
    meta = FileMetaDataset()
    sop_class = CR_STORAGE if acq.modality == "CR" else DX_STORAGE
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = facts.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1387.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = facts.sop_uid
    ds.StudyInstanceUID = facts.study_uid
    ds.SeriesInstanceUID = facts.series_uid
    ds.Modality = acq.modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = facts.view
    ds.PatientOrientation = ["R", "F"] if facts.view != "LATERAL" else ["A", "F"]
    ds.PatientID = facts.patient_id
    ds.PatientName = facts.patient_name
    ds.PatientSex = facts.sex
    ds.PatientAge = dicom_age(facts.age_years)
    ds.StudyDate = facts.study_date
    ds.AccessionNumber = facts.accession
    if facts.deidentified:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "PS3.15 Basic Application Level Confidentiality Profile"
    ds.Manufacturer = acq.manufacturer
    ds.InstitutionName = facts.institution
    ds.BurnedInAnnotation = "NO"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = acq.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16 if acq.bits > 8 else 8
    ds.BitsStored = acq.bits
    ds.HighBit = acq.bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    width = maxval * acq.window_scale
    ds.WindowCenter = round(maxval / 2, 1)
    ds.WindowWidth = round(width, 1)
    ds.PixelSpacing = [0.143 * 2048 / stored.shape[0]] * 2
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
