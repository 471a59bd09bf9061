"""Any radiograph file -> a normalised float32 image in [0, 1], air dark, square, resized.

The decoder is chosen from the file's bytes, not its name or the manifest format, so any
adapter's paths may point at DICOM, PNG or JPEG. DICOM goes through pydicom's own pixel
pipeline (modality LUT / rescale, then VOI LUT or window, else a robust percentile window);
compressed transfer syntaxes decode through the pylibjpeg plugins. Files that are not usable
chest radiographs raise ``ImageRejected`` with a stable code (see ``common.problems``).
"""

from __future__ import annotations

import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.deidentification import identifying_attributes

CHEST_MODALITIES = {"CR", "DX"}
PERCENTILE_WINDOW = (0.5, 99.5)
# The pixel budget: the raw pixel bytes a header may declare (rows x columns x frames x
# samples x bytes per sample) before anything is decoded. The largest detector panels
# (43 x 43 cm at 100 um, 16 bit) are about 35 MiB; decoding works in float64 (8 bytes a pixel
# and a few copies), so 64 MiB keeps one worker well under 2 GiB. `--max-image-mb` raises it.
MAX_IMAGE_MB = 64.0
# A decoded image whose spread (standard deviation on [0, 1]) is below this is blank: a black
# export, a constant DICOM, a RescaleSlope of 0. Real radiographs sit near 0.2.
BLANK_STD = 0.005


class ImageRejected(Exception):
    """A file that is not a usable chest radiograph; ``code`` is a stable problem code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class ImagingOptions:
    """Preprocessing settings; part of the cache fingerprint, so changing one re-decodes.
    ``max_image_mb`` only refuses files (an accepted image decodes the same whatever it is),
    so it is not part of the fingerprint."""

    size: int = 224
    min_side: int = 64
    include_laterals: bool = False
    max_image_mb: float = MAX_IMAGE_MB

    def key(self) -> str:
        return f"size={self.size};min_side={self.min_side};laterals={int(self.include_laterals)}"

    @property
    def max_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)


# Notes: what was wrong but worked around (code, message); the site tool lists them.
Notes = list[tuple[str, str]]


def regular_file(path: Path) -> None:
    """Refuse anything but a readable regular file before it is opened: a FIFO would block
    the reader forever, a device could be endless."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise ImageRejected("missing_file", "file not found") from exc
    except PermissionError as exc:
        raise ImageRejected("permission_denied", "no permission to reach the file (or its "
                            "folder); give the site's user read access") from exc
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot stat the file ({exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageRejected("not_a_file", "not a regular file (a FIFO, device or folder)")


def sniff(path: Path) -> str | None:
    """``"dicom"``, ``"png"``, ``"jpeg"`` or None, from the first bytes of the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except PermissionError as exc:
        raise ImageRejected("permission_denied", "no permission to read the file; give the "
                            "site's user read access") from exc
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
    try:
        regular_file(path)
        return sniff(path) == "dicom"
    except ImageRejected:
        return False


def _too_large(nbytes: float, options: ImagingOptions, what: str) -> ImageRejected:
    return ImageRejected("too_large", f"{what} declares {nbytes / 2**20:.0f} MiB of pixels, "
                         f"over the {options.max_image_mb:g} MiB budget (a decompression bomb "
                         "or an unusual export); raise --max-image-mb if it is genuine")


def _check_deflated(path: Path, options: ImagingOptions) -> None:
    """pydicom inflates a Deflated Explicit VR dataset whole before parsing it (274 KB on
    disk can be 288 MB inflated): count the inflated bytes in bounded chunks first."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED

    try:
        with open(path, "rb") as fh:
            if DEFLATED.encode() not in fh.read(4096):  # the file meta group is up front
                return
            fh.seek(0)
            read_preamble(fh, False)
            meta = _read_file_meta_info(fh)
            if meta.get("TransferSyntaxUID") != DEFLATED:
                return
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total, limit = 0, options.max_bytes + 2**20  # header slack
            while chunk := fh.read(2**16):
                data = inflater.decompress(chunk, 2**20)
                total += len(data)
                while inflater.unconsumed_tail and total <= limit:
                    data = inflater.decompress(inflater.unconsumed_tail, 2**20)
                    total += len(data)
                if total > limit:
                    raise _too_large(total, options, "the deflated DICOM")
    except ImageRejected:
        raise
    except (OSError, zlib.error, pydicom.errors.InvalidDicomError, ValueError, KeyError):
        return  # not deflated DICOM we can judge; dcmread reports it


def _header(path: Path, options: ImagingOptions | None = None):
    """The pydicom dataset without pixels; raises on anything that is not readable DICOM."""
    import pydicom

    regular_file(path)
    _check_deflated(path, options or ImagingOptions())
    return pydicom.dcmread(path, stop_before_pixels=True)


def read_dicom_header(path: Path, options: ImagingOptions | None = None) -> dict | None:
    """The header fields the data layer uses (no pixels read); None if not readable DICOM."""
    try:
        ds = _header(path, options)
        fields = (
            "SOPInstanceUID", "StudyInstanceUID", "PatientID", "PatientSex", "PatientAge",
            "ViewPosition", "Manufacturer", "Modality", "BodyPartExamined",
        )
        return {f: _text(ds, f) for f in fields}
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not a header"
        return None


def image_dimensions(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` as acquired, from the header (DICOM Columns and Rows, a PNG's or
    JPEG's own header; no pixels read), or None when the file cannot say."""
    try:
        if sniff(path) == "dicom":
            ds = _header(path)
            size = _int_field(ds, "Columns", 0), _int_field(ds, "Rows", 0)
        else:
            with Image.open(path) as im:
                size = im.size
    except Exception:  # noqa: BLE001 - a file that cannot say is unknown, never an error
        return None
    return (int(size[0]), int(size[1])) if min(size) > 0 else None


def stored_size(path: Path) -> str:
    """The image's size as acquired, ``"<columns>x<rows>"``, or ``"unknown"``."""
    dims = image_dimensions(path)
    return f"{dims[0]}x{dims[1]}" if dims else "unknown"


def phi_fields(path: Path) -> list[str]:
    """The de-identification profile's attributes a DICOM file's header still fills in
    (names only); [] for a file that is not readable DICOM. ``site check`` gets the same
    from ``decode(..., identifying=...)`` without parsing the header twice."""
    try:
        return identifying_attributes(_header(Path(path)))
    except Exception:  # noqa: BLE001
        return []


def _text(ds, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "")
    except Exception:  # noqa: BLE001 - an unparsable value reads as absent
        return ""


def _int_field(ds, keyword: str, default: int) -> int:
    raw = ds.get(keyword, default)
    try:
        value = int(str(raw if raw not in (None, "") else default).strip())
    except (TypeError, ValueError) as exc:
        raise ImageRejected("bad_header", f"{keyword} is {str(raw)[:20]!r}, not a whole number; "
                            "re-export the file") from exc
    if value < 0:
        raise ImageRejected("bad_header", f"{keyword} is {value}; re-export the file")
    return value


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


def _first(value) -> float:
    """The first of a possibly multi-valued DS (WindowCenter may list several windows)."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window(arr: np.ndarray, ds, notes: Notes) -> np.ndarray:
    """The header's VOI LUT or window where it is valid; otherwise (a window of width <= 0,
    a centre that is not a number, a LUT without its descriptor: all seen in real exports)
    the robust percentile window, with a note. DICOM requires width >= 1 (PS3.3 C.11.2.1.2)."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence") or "WindowCenter" in ds or "WindowWidth" in ds:
        try:
            if not ds.get("VOILUTSequence"):
                center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
                if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
                    raise ValueError(f"window centre {center:g}, width {width:g}")
            lo, hi = _voi_output_range(ds)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ValueError("the VOI output range is not finite")
            return np.clip((apply_voi_lut(arr, ds) - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
        except Exception as exc:  # noqa: BLE001 - any invalid VOI falls back, with a note
            detail = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            notes.append(("window_ignored", f"the header's window / VOI LUT is unusable "
                                            f"({detail}); windowed from the pixel range"))
    return _percentile_window(arr)


def decode_dicom(path: Path, options: ImagingOptions, notes: Notes | None = None,
                 identifying: list[str] | None = None) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    notes = [] if notes is None else notes
    _check_deflated(path, options)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("unreadable", f"not a readable DICOM file ({exc})") from exc
    if identifying is not None:  # from the header just read: no second parse of the file
        identifying.extend(identifying_attributes(ds))
    modality = _text(ds, "Modality").upper()
    if modality and modality not in CHEST_MODALITIES:
        raise ImageRejected("not_cr_dx", f"modality {modality} is not CR or DX")
    body = _text(ds, "BodyPartExamined").upper()
    if body and "CHEST" not in body and "THORAX" not in body:
        raise ImageRejected("not_chest", f"BodyPartExamined is {body}, not CHEST")
    if "PixelData" not in ds:
        raise ImageRejected("no_pixel_data", "DICOM has no pixel data")
    frames = _int_field(ds, "NumberOfFrames", 1) or 1
    samples = _int_field(ds, "SamplesPerPixel", 1) or 1
    rows, cols = _int_field(ds, "Rows", 0), _int_field(ds, "Columns", 0)
    bits = _int_field(ds, "BitsAllocated", 16)
    declared = rows * cols * frames * samples * max((bits + 7) // 8, 1)
    if declared > options.max_bytes:
        raise _too_large(declared, options, f"the header ({cols} x {rows} x {frames} frames)")
    if frames > 1:
        raise ImageRejected("multi_frame", f"multi-frame DICOM ({frames} frames)")
    if samples != 1:
        photometric = _text(ds, "PhotometricInterpretation")
        raise ImageRejected("colour", f"colour DICOM ({photometric})")
    view = _text(ds, "ViewPosition").upper()
    if not options.include_laterals and view in {"LL", "RL", "LATERAL", "LAT"}:
        raise ImageRejected("lateral", f"lateral view ({view})")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, missing decoder, ...
        raise ImageRejected("unreadable", f"pixel data cannot be decoded ({exc})") from exc
    try:
        rescale = [float(ds.get(k, 0) or 0) for k in ("RescaleSlope", "RescaleIntercept")]
        arr = apply_modality_lut(raw, ds).astype(np.float64)
    except Exception as exc:  # noqa: BLE001 - RescaleSlope 'abcd', a broken modality LUT
        raise ImageRejected("bad_header", "RescaleSlope / RescaleIntercept or the modality "
                            f"LUT cannot be applied ({str(exc)[:80]}); re-export the file"
                            ) from exc
    if not all(np.isfinite(rescale)):  # judged on the header, not by scanning the pixels
        raise ImageRejected("bad_header", "RescaleSlope / RescaleIntercept is nan or inf; "
                            "re-export the file")
    arr = _window(arr, ds, notes)
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1: high values are dark; flip so air is dark
    return arr.astype(np.float32)


# Bytes per pixel of Pillow's modes (what the budget counts); anything else counts 4.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2,
               "I;16L": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4,
               "CMYK": 4, "I": 4, "F": 4}


def decode_raster(path: Path, options: ImagingOptions | None = None) -> np.ndarray:
    """PNG (8 or 16 bit, grey, grey+alpha or palette) or JPEG via Pillow. The size comes from
    the header and is checked against the pixel budget before any pixel is decoded."""
    options = options or ImagingOptions()
    try:
        with Image.open(path) as im:
            w, h = im.size
            declared = w * h * _MODE_BYTES.get(im.mode, 4)
            if declared > options.max_bytes:
                raise _too_large(declared, options, f"the image ({w} x {h}, {im.mode})")
            mode = im.mode
            if mode in ("P", "PA"):  # palette: the pixels are indices; read the colours
                im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
            elif mode in ("LA", "La"):  # grey + alpha: the grey channel is the image
                im = im.convert("L")
            im.load()
            arr = np.asarray(im)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise _too_large(float("nan"), options, "the image") from exc
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("unreadable", f"image cannot be decoded ({exc})") from exc
    if arr.ndim == 3:
        channels = arr[..., :3].astype(np.int32)
        if channels.shape[-1] >= 3 and np.abs(channels - channels[..., :1]).max() > 3:
            raise ImageRejected("colour", f"colour image ({mode})")
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    return _percentile_window(arr.astype(np.float64)).astype(np.float32)


def _is_blank(arr: np.ndarray) -> bool:
    """Constant or near-constant, judged on every 4th pixel (cheap; blank is blank anywhere)."""
    sample = arr[::4, ::4] if min(arr.shape) >= 64 else arr
    return float(sample.std()) < BLANK_STD


def decode(path: Path, options: ImagingOptions, notes: Notes | None = None,
           identifying: list[str] | None = None) -> np.ndarray:
    """Native-resolution float32 image in [0, 1] with air dark; raises ImageRejected, and
    only that: a decoder's own failure on one odd file is that file's problem
    (``decoder_failed``), never the run's. ``notes`` collects what was worked around;
    ``identifying`` the de-identification profile's attributes a DICOM header fills in."""
    path = Path(path)
    try:
        regular_file(path)
        kind = sniff(path)
        if kind == "dicom":
            arr = decode_dicom(path, options, notes, identifying)
        elif kind in {"png", "jpeg"}:
            arr = decode_raster(path, options)
        elif path.stat().st_size == 0:
            raise ImageRejected("unreadable", "file is empty")
        else:
            raise ImageRejected("unsupported_format", "not DICOM, PNG or JPEG")
    except ImageRejected:
        raise
    except MemoryError as exc:
        raise ImageRejected("too_large", "decoding ran out of memory; lower the worker count "
                            "or --max-image-mb") from exc
    except Exception as exc:  # noqa: BLE001 - one file's decoder failure is one problem row
        raise ImageRejected("decoder_failed", f"the decoder failed ({type(exc).__name__}: "
                            f"{str(exc)[:100]}); re-export the file") from exc
    if arr.ndim != 2:
        raise ImageRejected("colour", f"unexpected image shape {arr.shape}")
    if min(arr.shape) < options.min_side:
        raise ImageRejected(
            "too_small", f"image is {arr.shape[1]}x{arr.shape[0]}, below {options.min_side} px"
        )
    if _is_blank(arr):
        raise ImageRejected("blank_image", "the image is constant or nearly so (a black or "
                            "empty export); re-export it")
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


def box_to_square(box: tuple[float, float, float, float], width: int, height: int,
                  size: int) -> tuple[float, float, float, float] | None:
    """A box ``(x0, y0, x1, y1)`` in the original image's pixels (``width`` x ``height``) in
    the pixels of ``to_square``'s output: the same centre crop, padding and scale. Clipped to
    what the crop kept; None when nothing of it is left (or it was never inside the image)."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0) or x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None
    limit = int(round(min(width, height) * 1.25))
    top = (height - limit) // 2 if height > limit else 0
    left = (width - limit) // 2 if width > limit else 0
    h, w = min(height, limit), min(width, limit)
    side = max(h, w)
    off_y, off_x = (side - h) // 2 - top, (side - w) // 2 - left
    lo_x, lo_y = (side - w) // 2, (side - h) // 2  # what the crop kept, in canvas pixels
    cx0, cx1 = max(x0 + off_x, lo_x), min(x1 + off_x, lo_x + w)
    cy0, cy1 = max(y0 + off_y, lo_y), min(y1 + off_y, lo_y + h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    k = size / side
    return cx0 * k, cy0 * k, cx1 * k, cy1 * k


def load(path: Path, options: ImagingOptions, notes: Notes | None = None) -> np.ndarray:
    """Decode, square and resize: the single entry point used by the cache and evaluator."""
    return to_square(decode(path, options, notes), options.size)
