"""Problems found in a site's data: one stable code, one line of text, where it happened.

Bad rows and bad files never stop a run; they become Problems that the site tool groups by
code, and the good rows carry on. The codes are stable so hospital IT can grep for them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

# code -> what hospital IT should do about it
PROBLEM_ADVICE: dict[str, str] = {
    "missing_file": "the manifest names a file that is not on disk; fix the path or remove the row",
    "unreadable": "the file is truncated or not an image; re-export it",
    "no_pixel_data": "the DICOM has no PixelData element; re-export it with pixels",
    "not_cr_dx": "modality is not CR/DX (a CT, MR, ...); it does not belong in a CXR cohort",
    "not_chest": "BodyPartExamined is not CHEST; check the export filter",
    "multi_frame": "multi-frame DICOM; export single radiographs",
    "colour": "colour image; radiographs must be greyscale",
    "too_small": "image is smaller than the minimum side; export the full-resolution image",
    "lateral": "lateral view, excluded by default (use --include-laterals to keep)",
    "unsupported_format": "neither DICOM, PNG nor JPEG; convert it",
    "unknown_label_value": "a label cell holds a value the format does not define; it is unknown",
    "duplicate_row": "the same image is listed twice; the first row is kept",
    "patient_in_two_splits": "a patient appears in two given splits; all their rows use the first",
    "non_utf8_manifest": "the manifest is not UTF-8 and was read as Latin-1; save it as UTF-8",
    "bad_split": "the split column holds something other than train/val/test; split by patient",
    "bad_age": "age is not a number or DICOM age string, or outside 0-120; it is left unknown",
    "phi_in_header": "DICOM headers still fill in attributes of the PS3.15 basic "
                     "confidentiality profile (names listed, values never read out); "
                     "de-identify before any sharing",
    "permission_denied": "the site's user cannot read this file or folder; grant read access",
    "not_a_file": "not a regular file (a FIFO, device or folder); list image files only",
    "too_large": "the header declares more pixels than the budget (a decompression bomb or an "
                 "unusual export); check the file, raise --max-image-mb if it is genuine",
    "bad_header": "a DICOM header value cannot be used (not a number, nan); re-export the file",
    "decoder_failed": "the decoder failed on this file; re-export it",
    "window_ignored": "the header's window / VOI LUT is invalid; the image was windowed from "
                      "its pixel range instead (kept)",
    "blank_image": "the image is constant or nearly so; re-export it",
    "ambiguous_file": "several files have this name; give the row's path relative to the "
                      "data folder (e.g. images_001/x.png) so the manifest says which",
    "ragged_row": "the row has a different number of fields than the header; fix the row "
                  "(the others were read)",
    "outside_data_dir": "the path leads outside the data folder (../, absolute or a symlink); "
                        "move the file in, or pass --allow-outside",
    "duplicate_image": "the same image bytes are listed under two rows; remove the copy "
                       "(only the first is used; two patients or splits would leak)",
    "missing_patient_id": "rows without a patient id; each such image counts as its own "
                          "patient, so patient-level splits and DP cannot group them",
    "bad_box": "a box is not x0 < x1, y0 < y1 with no negative coordinate; fix the row "
               "(the finding's call is kept, the box is not used)",
    "box_outside_image": "the box lies outside the image (or outside what the centre crop "
                         "keeps); check its coordinates are the original image's pixels",
    "bad_annotation": "an annotation row names no image or no reader; fix the row",
    "unreadable_annotations": "the reader / box file cannot be read or its columns are not a "
                              "known format; fix or rename the file",
    "annotation_unmatched": "annotations name images that are not usable rows of the "
                            "manifest; check the file belongs to this site",
    "annotation_ambiguous": "an annotated image name matches several manifest rows; give the "
                            "images distinct file names",
    "non_chest_projection": "the projection is not a frontal chest view (COSTAL, OBLICUA, "
                            "...); the row is not used",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one row or file. ``where`` is a path or ``file:line``."""

    code: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def group_problems(problems: Iterable[Problem], examples: int = 3) -> dict[str, dict]:
    """Group problems by code as ``{code: {count, examples, advice}}`` (the check.json shape)."""
    grouped: dict[str, dict] = defaultdict(lambda: {"count": 0, "examples": []})
    for p in problems:
        entry = grouped[p.code]
        entry["count"] += 1
        if len(entry["examples"]) < examples:
            entry["examples"].append(str(p))
    return {
        code: {**entry, "advice": PROBLEM_ADVICE.get(code, "")}
        for code, entry in sorted(grouped.items())
    }
