"""Any radiograph file -> a normalised float32 image in [0, 1], air dark, square, resized.

The decoder is chosen from the file's bytes, not its name or the manifest format, so any
adapter's paths may point at DICOM, PNG or JPEG. DICOM goes through pydicom's own pixel
pipeline (modality LUT / rescale, then VOI LUT or window, else a robust percentile window);
compressed transfer syntaxes decode through the pylibjpeg plugins. Files that are not usable
chest radiographs raise ``ImageRejected`` with a stable code (see ``common.problems``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CHEST_MODALITIES = {"CR", "DX"}
PERCENTILE_WINDOW = (0.5, 99.5)
# Header fields that identify a patient or institution; warned about by the site tool.
PHI_FIELDS = ("PatientName", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName")


class ImageRejected(Exception):
    """A file that is not a usable chest radiograph; ``code`` is a stable problem code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class ImagingOptions:
    """Preprocessing settings; part of the cache fingerprint, so changing one re-decodes."""

    size: int = 224
    min_side: int = 64
    include_laterals: bool = False

    def key(self) -> str:
        return f"size={self.size};min_side={self.min_side};laterals={int(self.include_laterals)}"


def sniff(path: Path) -> str | None:
    """``"dicom"``, ``"png"``, ``"jpeg"`` or None, from the first bytes of the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def is_dicom(path: Path) -> bool:
    return sniff(path) == "dicom"


def read_dicom_header(path: Path) -> dict | None:
    """The header fields the data layer uses (no pixels read); None if not readable DICOM."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not a header"
        return None
    fields = (
        "SOPInstanceUID", "StudyInstanceUID", "PatientID", "PatientSex", "PatientAge",
        "ViewPosition", "Manufacturer", "Modality", "BodyPartExamined",
        "BurnedInAnnotation", *PHI_FIELDS,
    )
    return {f: str(ds.get(f, "") or "") for f in fields}


def phi_fields(header: dict) -> list[str]:
    """Identifying header fields that still hold a value (the site tool warns about these)."""
    found = [f for f in PHI_FIELDS if header.get(f, "").strip()]
    if header.get("BurnedInAnnotation", "").strip().upper() == "YES":
        found.append("BurnedInAnnotation=YES")
    return found


def _percentile_window(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, PERCENTILE_WINDOW)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def _voi_output_range(ds) -> tuple[float, float]:
    """The range pydicom's VOI step maps into (mirrors pydicom.pixels.processing)."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        lo, hi = 0.0, float(2**bits - 1)
    elif int(ds.PixelRepresentation) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def decode_dicom(path: Path, options: ImagingOptions) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("unreadable", f"not a readable DICOM file ({exc})") from exc
    modality = str(ds.get("Modality", "")).upper()
    if modality and modality not in CHEST_MODALITIES:
        raise ImageRejected("not_cr_dx", f"modality {modality} is not CR or DX")
    body = str(ds.get("BodyPartExamined", "") or "").upper()
    if body and "CHEST" not in body and "THORAX" not in body:
        raise ImageRejected("not_chest", f"BodyPartExamined is {body}, not CHEST")
    if "PixelData" not in ds:
        raise ImageRejected("no_pixel_data", "DICOM has no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageRejected("multi_frame", f"multi-frame DICOM ({ds.NumberOfFrames} frames)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        photometric = ds.get("PhotometricInterpretation", "")
        raise ImageRejected("colour", f"colour DICOM ({photometric})")
    view = str(ds.get("ViewPosition", "")).upper()
    if not options.include_laterals and view in {"LL", "RL", "LATERAL", "LAT"}:
        raise ImageRejected("lateral", f"lateral view ({view})")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, missing decoder, ...
        raise ImageRejected("unreadable", f"pixel data cannot be decoded ({exc})") from exc
    arr = apply_modality_lut(raw, ds).astype(np.float64)
    if ds.get("VOILUTSequence") or "WindowCenter" in ds:
        lo, hi = _voi_output_range(ds)
        arr = np.clip((apply_voi_lut(arr, ds) - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    else:
        arr = _percentile_window(arr)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1: high values are dark; flip so air is dark
    return arr.astype(np.float32)


def decode_raster(path: Path) -> np.ndarray:
    """PNG (8 or 16 bit) or JPEG via Pillow."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("unreadable", f"image cannot be decoded ({exc})") from exc
    if arr.ndim == 3:
        channels = arr[..., :3].astype(np.int32)
        if np.abs(channels - channels[..., :1]).max() > 3:
            raise ImageRejected("colour", f"colour image ({mode})")
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return _percentile_window(arr.astype(np.float64)).astype(np.float32)


def decode(path: Path, options: ImagingOptions) -> np.ndarray:
    """Native-resolution float32 image in [0, 1] with air dark; raises ImageRejected."""
    path = Path(path)
    if not path.exists():
        raise ImageRejected("missing_file", "file not found")
    kind = sniff(path)
    if kind == "dicom":
        arr = decode_dicom(path, options)
    elif kind in {"png", "jpeg"}:
        arr = decode_raster(path)
    elif path.stat().st_size == 0:
        raise ImageRejected("unreadable", "file is empty")
    else:
        raise ImageRejected("unsupported_format", "not DICOM, PNG or JPEG")
    if arr.ndim != 2:
        raise ImageRejected("colour", f"unexpected image shape {arr.shape}")
    if min(arr.shape) < options.min_side:
        raise ImageRejected(
            "too_small", f"image is {arr.shape[1]}x{arr.shape[0]}, below {options.min_side} px"
        )
    return arr


def to_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop the long side to at most 1.25x the short side, pad the rest to a square
    with black (air), then resize with an anti-aliased filter."""
    h, w = arr.shape
    short = min(h, w)
    limit = int(round(short * 1.25))
    if h > limit:
        top = (h - limit) // 2
        arr = arr[top : top + limit]
    if w > limit:
        left = (w - limit) // 2
        arr = arr[:, left : left + limit]
    h, w = arr.shape
    side = max(h, w)
    if h != w:
        canvas = np.zeros((side, side), dtype=np.float32)
        canvas[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = arr
        arr = canvas
    if side != size:
        im = Image.fromarray(arr.astype(np.float32), mode="F")
        arr = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(arr, 0.0, 1.0)


def load(path: Path, options: ImagingOptions) -> np.ndarray:
    """Decode, square and resize: the single entry point used by the cache and evaluator."""
    return to_square(decode(path, options), options.size)
