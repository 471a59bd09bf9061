"""Who the synthetic sites are: label prevalence, patient mix and acquisition.

Prevalence profiles follow the published label frequencies of three public datasets (the
fraction of images positive for each label): ChestX-ray14 (Wang et al. 2017), CheXpert
(Irvin et al. 2019, training set, uncertain counted as positive) and PadChest (Bustos et al.
2020, mapped through ``common.labels.PADCHEST_SYNONYMS``). Co-occurrence comes from one latent
"how sick" score per patient plus explicit clinical links (heart failure: cardiomegaly, edema,
effusion; pneumonia with consolidation). Acquisition settings differ by site; held-out sites
use vendors, photometry and curves that no training site has.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common.labels import LABELS

PREVALENCE: dict[str, dict[str, float]] = {
    "chestxray14": {
        "Atelectasis": 0.103, "Cardiomegaly": 0.025, "Effusion": 0.119, "Infiltration": 0.177,
        "Mass": 0.052, "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047,
        "Consolidation": 0.042, "Edema": 0.021, "Emphysema": 0.022, "Fibrosis": 0.015,
        "Pleural_Thickening": 0.030, "Hernia": 0.002,
    },
    "chexpert": {
        "Atelectasis": 0.149, "Cardiomegaly": 0.121, "Effusion": 0.386, "Infiltration": 0.0,
        "Mass": 0.0, "Nodule": 0.0, "Pneumonia": 0.027, "Pneumothorax": 0.087,
        "Consolidation": 0.066, "Edema": 0.234, "Emphysema": 0.0, "Fibrosis": 0.0,
        "Pleural_Thickening": 0.0, "Hernia": 0.0,
    },
    "padchest": {
        "Atelectasis": 0.034, "Cardiomegaly": 0.089, "Effusion": 0.040, "Infiltration": 0.042,
        "Mass": 0.006, "Nodule": 0.040, "Pneumonia": 0.030, "Pneumothorax": 0.004,
        "Consolidation": 0.012, "Edema": 0.004, "Emphysema": 0.020, "Fibrosis": 0.010,
        "Pleural_Thickening": 0.025, "Hernia": 0.015,
    },
}
# The known-answer scenarios' world (``common.synth.scenarios``): three findings that a
# DenseNet learns at 64 px in a few epochs (measured with benchmarks/h1_known_answer.py;
# Atelectasis, Pneumothorax, Consolidation and, drawn independently, Edema stay near AUC 0.5
# at that size). A specialty site is rich in one of them and nearly without the other two;
# held-out sites are balanced. Scenario sites draw findings independently (no shared sickness
# score, no clinical links), so a model cannot learn one finding from another that travels
# with it. (Mass is not a CheXpert label: scenario sites use the NIH and DICOM formats.)
SCENARIO_LABELS = ("Cardiomegaly", "Effusion", "Mass")
RICH, RARE = 0.40, 0.015
PREVALENCE |= {
    "cardiac": {"Cardiomegaly": RICH, "Effusion": RARE, "Mass": RARE},
    "pleural": {"Effusion": RICH, "Cardiomegaly": RARE, "Mass": RARE},
    "oncology": {"Mass": RICH, "Cardiomegaly": RARE, "Effusion": RARE},
    "balanced": {name: 0.2 for name in SCENARIO_LABELS},
}
# CheXpert's labeller does not annotate these; the CheXpert-style site leaves them blank.
CHEXPERT_UNLABELLED = ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis",
                       "Pleural_Thickening", "Hernia")
# How strongly each label follows the latent sickness score (inpatients, AP films).
SICKNESS_LOADING = {
    "Atelectasis": 0.5, "Cardiomegaly": 0.5, "Effusion": 0.8, "Infiltration": 0.4, "Mass": 0.2,
    "Nodule": 0.0, "Pneumonia": 0.7, "Pneumothorax": 0.4, "Consolidation": 0.7, "Edema": 0.9,
    "Emphysema": 0.2, "Fibrosis": 0.2, "Pleural_Thickening": 0.1, "Hernia": 0.0,
}


@dataclass(frozen=True)
class Acquisition:
    """How a site's equipment turns density into pixels."""

    manufacturer: str
    modality: str  # CR or DX
    photometric: str  # MONOCHROME1 or MONOCHROME2
    bits: int
    gamma: float
    contrast: float
    brightness: float
    noise: float
    blur_px: float  # at 256 px; scaled with size
    collimation: float  # fraction of the width masked at each side, typical
    marker: str  # where the burned-in laterality marker sits: "tl", "tr", "none"
    window_scale: float  # stored window width relative to the full range

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SiteProfile:
    name: str
    role: str  # train or evaluate
    style: str  # nih | chexpert | dicom: the file formats it writes
    prevalence: str
    acquisition: Acquisition
    ap_fraction: float
    label_noise: float = 0.0  # fraction of true positives the site's labeller misses
    mean_age: float = 55.0
    independent: bool = False  # findings drawn independently (no sickness score, no links)


TRAIN_ACQUISITIONS = (
    Acquisition("Carestream", "CR", "MONOCHROME2", 8, 1.00, 1.00, 0.00, 0.030, 0.8, 0.02,
                "tr", 1.0),
    Acquisition("GE Healthcare", "DX", "MONOCHROME2", 8, 0.85, 1.15, 0.03, 0.020, 0.5, 0.00,
                "tl", 1.0),
    Acquisition("Philips", "DX", "MONOCHROME2", 12, 1.15, 0.95, -0.02, 0.025, 1.0, 0.04,
                "tr", 0.9),
    Acquisition("Agfa", "CR", "MONOCHROME2", 12, 0.95, 1.05, 0.01, 0.035, 1.2, 0.03,
                "tl", 0.95),
)
HELD_OUT_ACQUISITIONS = (
    Acquisition("Fujifilm", "CR", "MONOCHROME1", 10, 1.35, 0.80, 0.05, 0.045, 1.6, 0.06,
                "none", 0.85),
    Acquisition("Siemens Healthineers", "DX", "MONOCHROME2", 14, 0.70, 1.30, -0.05, 0.015, 0.3,
                0.08, "tl", 0.8),
    Acquisition("Konica Minolta", "DX", "MONOCHROME1", 16, 1.25, 0.90, 0.04, 0.040, 1.4, 0.05,
                "tr", 0.9),
)


def site_profiles(n_sites: int, n_held_out: int) -> list[SiteProfile]:
    """Training sites first (NIH-style, CheXpert-style, then DICOM), then held-out DICOM sites."""
    if n_held_out >= n_sites:
        raise ValueError("--held-out must be smaller than --sites")
    n_train = n_sites - n_held_out
    styles = ["nih", "chexpert"] + ["dicom"] * n_train
    prevalences = ["chestxray14", "chexpert", "padchest"]
    profiles = []
    for i in range(n_train):
        acq = TRAIN_ACQUISITIONS[i % len(TRAIN_ACQUISITIONS)]
        profiles.append(SiteProfile(
            name=f"site{i + 1}", role="train", style=styles[i],
            prevalence=prevalences[i % 3], acquisition=acq,
            ap_fraction=(0.35, 0.55, 0.25)[i % 3], mean_age=(47.0, 60.0, 62.0)[i % 3],
        ))
    for j in range(n_held_out):
        acq = HELD_OUT_ACQUISITIONS[j % len(HELD_OUT_ACQUISITIONS)]
        profiles.append(SiteProfile(
            name=f"site{n_train + j + 1}", role="evaluate", style="dicom",
            prevalence=prevalences[(j + 2) % 3 if j % 2 else 0], acquisition=acq,
            ap_fraction=(0.4, 0.3)[j % 2], mean_age=(58.0, 52.0)[j % 2],
        ))
    return profiles


def _calibrated_intercepts(target: dict[str, float], enrich: float, seed: int,
                           loading: dict[str, float] = SICKNESS_LOADING) -> np.ndarray:
    """Logit intercepts such that the marginal prevalence matches target x enrich."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(20000)
    out = np.empty(len(LABELS))
    for k, name in enumerate(LABELS):
        p = min(target.get(name, 0.0) * enrich, 0.6)
        if p <= 0:
            out[k] = -np.inf
            continue
        lo, hi = -12.0, 6.0
        for _ in range(40):
            mid = (lo + hi) / 2
            prev = (1 / (1 + np.exp(-(mid + loading[name] * z)))).mean()
            lo, hi = (mid, hi) if prev < p else (lo, mid)
        out[k] = (lo + hi) / 2
    return out


def sample_labels(
    rng: np.random.Generator, profile: SiteProfile, sickness: float, enrich: float,
    intercepts: np.ndarray,
) -> dict[str, int]:
    """True findings for one image given the patient's latent sickness."""
    loadings = np.array([0.0 if profile.independent else SICKNESS_LOADING[n] for n in LABELS])
    p = 1 / (1 + np.exp(-(intercepts + loadings * sickness)))
    y = {name: int(rng.random() < p[k]) for k, name in enumerate(LABELS)}
    if profile.independent:
        return y
    # Clinical links: heart failure and pneumonia travel together.
    if y["Edema"] and rng.random() < 0.35:
        y["Cardiomegaly"] = 1
    if y["Edema"] and rng.random() < 0.3:
        y["Effusion"] = 1
    if y["Pneumonia"] and rng.random() < 0.5:
        y["Consolidation"] = 1
    for name in LABELS:
        if profile.prevalence == "chexpert" and name in CHEXPERT_UNLABELLED:
            y[name] = 0  # never drawn either, so images match what this labeller could see
    return y


def intercepts_for(profile: SiteProfile, enrich: float, seed: int) -> np.ndarray:
    loading = {n: 0.0 for n in LABELS} if profile.independent else SICKNESS_LOADING
    return _calibrated_intercepts(PREVALENCE[profile.prevalence], enrich, seed, loading)
