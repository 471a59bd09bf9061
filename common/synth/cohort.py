"""Generate a synthetic multi-site cohort on disk: images, manifests, cohort.toml.

The parent process draws every random choice that defines the cohort (patients, labels,
severities, views, reader calls) from the seed, site by site; worker processes only render
and write pixels, each from its own per-image seed. So the bytes depend on the seed alone,
not on the number of workers.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.config import toml_value
from common.labels import (
    CHEXPERT_ALL_COLUMNS,
    CHEXPERT_COLUMNS,
    LABELS,
    MARKER_LABEL,
    NIH_BBOX_FINDINGS,
    VINDR_CLASSES,
)
from common.parallel import parallel_map
from common.synth.acquisition import acquire, marker_boxes
from common.synth.phantom import CARDIOMEGALY_CTR, Anatomy, Finding, render
from common.synth.profiles import (
    CHEXPERT_UNLABELLED,
    SiteProfile,
    intercepts_for,
    sample_labels,
    site_profiles,
)
from common.synth.scenarios import scenario, with_defaults
from common.synth.writers import DicomFacts, write_dicom, write_jpeg, write_png

MANIFEST = {"nih": "Data_Entry_2017.csv", "chexpert": "train.csv", "dicom": "manifest.csv"}
READERS_FILE = "annotations_readers.csv"  # VinDr-CXR's per-reader format
LESIONS_FILE = "BBox_List_2017.csv"  # NIH's box format: the lesions drawn
MARKERS_FILE = "markers_bbox.csv"  # NIH's box format, label Marker: burned-in markers
# What simulated readers call, in VinDr-CXR's vocabulary: its finding -> the canonical labels
# whose truth makes it present (VinDr's Nodule/Mass is one finding for two of the 14).
READER_FINDINGS: dict[str, tuple[str, ...]] = {
    **{v: (v,) for v in VINDR_CLASSES.values()}, "Nodule/Mass": ("Nodule", "Mass")}
VINDR_CLASS_ID = {name: i for i, name in enumerate(
    ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation",
     "ILD", "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
     "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding"])}
NIH_NAME = {v: k for k, v in NIH_BBOX_FINDINGS.items() if k != "Infiltration"}  # Infiltrate
FORMAT = {"nih": "nih", "chexpert": "chexpert", "dicom": "canonical"}
SHORTCUT_RATE = (0.90, 0.03)  # P(token | label positive), P(token | label negative)
ABBREV = {"Atelectasis": "Atel", "Cardiomegaly": "Card", "Effusion": "Eff",
          "Infiltration": "Inf", "Mass": "Mass", "Nodule": "Nod", "Pneumonia": "Pna",
          "Pneumothorax": "Ptx", "Consolidation": "Cons", "Edema": "Edem",
          "Emphysema": "Emph", "Fibrosis": "Fib", "Pleural_Thickening": "PT", "Hernia": "Hern"}


@dataclass(frozen=True)
class SynthOptions:
    sites: int = 5
    held_out: int = 2
    images_per_site: int = 500
    size: int = 256
    seed: int = 0
    shortcut: str | None = None  # "site1" or "site1:Effusion"
    readers: int = 0
    label_noise: dict[str, float] = field(default_factory=dict)  # site -> missed fraction
    laterals: bool = False
    enrich: float = 2.0  # multiplies published prevalences so 500 images hold enough positives
    scenario: str = ""  # a known-answer scenario (common.synth.scenarios); "": the default mix
    severity: tuple[float, float] = (0.15, 1.0)  # findings' strength, subtle ... obvious
    conspicuity: float = 1.0  # multiplies the opacity drawn findings add (phantom.render)
    # Each site's node config min-cell in simulation (0: the node default, 10). Tiny test
    # cohorts set 1: their validation splits of a few images would release nothing.
    min_cell: int = 0


@dataclass
class ImagePlan:
    """Everything needed to render and write one image, drawn in the parent process."""

    site_index: int
    index: int
    rel_path: str
    style: str
    patient_id: str
    study_id: str
    sex: str
    age: float
    view: str
    anatomy: Anatomy
    findings: dict[str, Finding]
    truth: dict[str, int]
    reported: dict[str, float]  # what the site's labeller wrote (1/0/-1/NaN)
    shortcut_token: bool
    readers: dict[str, float]
    seed: tuple[int, ...]
    profile: SiteProfile
    size: int
    uids: tuple[str, str, str]
    conspicuity: float = 1.0


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix="1.2.826.0.1.3680043.10.1387.",
                        entropy_srcs=[str(seed), *map(str, parts)])


def _shortcut(spec: str | None, profiles: list[SiteProfile]) -> tuple[str, str] | None:
    if not spec:
        return None
    site, _, label = spec.partition(":")
    label = label or "Effusion"
    names = [p.name for p in profiles]
    if site not in names:
        raise ValueError(f"--shortcut names {site!r}; sites are {', '.join(names)}")
    if label not in LABELS:
        raise ValueError(f"--shortcut label {label!r} is not one of the 14 labels")
    return site, label


def cohort_profiles(opts: SynthOptions) -> list[SiteProfile]:
    """Who the sites are: the scenario's, or the default mix of public-dataset profiles."""
    if opts.scenario:
        return scenario(opts.scenario).profiles(opts.sites, opts.held_out)
    return site_profiles(opts.sites, opts.held_out)


def site_images(opts: SynthOptions, profiles: list[SiteProfile]) -> dict[str, int]:
    """Images per site: ``images-per-site`` everywhere, or as the scenario sizes its sites."""
    if not opts.scenario:
        return {p.name: opts.images_per_site for p in profiles}
    s = scenario(opts.scenario)
    return {p.name: s.images(p, opts.images_per_site, i) for i, p in enumerate(profiles)}


def plan_site(site_index: int, profile: SiteProfile, opts: SynthOptions,
              site_size: int | None = None) -> list[ImagePlan]:
    rng = np.random.default_rng([opts.seed, site_index, 1])
    site_size = opts.images_per_site if site_size is None else site_size
    intercepts = intercepts_for(profile, opts.enrich, opts.seed)
    shortcut = _shortcut(opts.shortcut, cohort_profiles(opts))
    noise = opts.label_noise.get(profile.name, 0.0)
    n_readers = opts.readers if profile.role == "evaluate" else 0  # readers: held-out only
    # Radiologists: sensitivity 0.80-0.95 on obvious findings (less on subtle ones, below),
    # specificity 0.92-0.99 (Majkowska et al. 2019 report readers in these ranges).
    reader_skill = [(rng.uniform(0.80, 0.95), rng.uniform(0.92, 0.99)) for _ in range(n_readers)]
    plans: list[ImagePlan] = []
    patient = 0
    while len(plans) < site_size:
        patient += 1
        sex = "M" if rng.random() < 0.52 else "F"
        age = float(np.clip(rng.normal(profile.mean_age, 17), 1, 95))
        anatomy = Anatomy.sample(rng, sex=sex, age=age)
        sickness = rng.standard_normal()
        n_images = 1 + int(rng.poisson(0.35))
        for follow_up in range(n_images):
            if len(plans) >= site_size:
                break
            i = len(plans)
            ap_p = np.clip(profile.ap_fraction + 0.15 * sickness, 0.02, 0.98)
            view = "AP" if rng.random() < ap_p else "PA"
            if opts.laterals and rng.random() < 0.15:
                view = "LATERAL"
            truth = sample_labels(rng, profile, sickness, opts.enrich, intercepts)
            findings = {}
            for name in LABELS:
                if truth[name]:
                    findings[name] = Finding(
                        severity=float(rng.uniform(*opts.severity)),
                        side=int(rng.choice((-1, 1))),
                        x=float(rng.uniform(0.15, 0.85)),
                        y=float(rng.uniform(0.1, 0.9)),
                    )
            anat = Anatomy(**vars(anatomy))
            if truth["Cardiomegaly"]:
                anat.ctr = float(rng.uniform(*CARDIOMEGALY_CTR))
            findings.pop("Cardiomegaly", None)
            reported = _report(rng, profile, truth, findings, noise)
            readers = {}
            for r, (sens, spec) in enumerate(reader_skill, 1):
                for name, members in READER_FINDINGS.items():
                    present = [m for m in members if truth[m]]
                    sev = max((findings[m].severity for m in present if m in findings),
                              default=1.0)
                    hit = rng.random() < (sens * (0.7 + 0.3 * sev) if present else 1 - spec)
                    readers[f"reader{r}/{name}"] = float(hit)
            token = False
            if shortcut and shortcut[0] == profile.name:
                rate = SHORTCUT_RATE[0] if truth[shortcut[1]] else SHORTCUT_RATE[1]
                token = bool(rng.random() < rate)
            pid = f"{profile.name}-p{patient:05d}"
            plans.append(ImagePlan(
                site_index=site_index, index=i,
                rel_path=_rel_path(profile.style, patient, follow_up, i),
                style=profile.style, patient_id=pid, study_id=f"{pid}-s{follow_up + 1}",
                sex=sex, age=round(age + follow_up * 0.5, 1), view=view, anatomy=anat,
                findings=findings, truth=truth, reported=reported, shortcut_token=token,
                readers=readers, seed=(opts.seed, site_index, i, 2), profile=profile,
                size=opts.size, conspicuity=opts.conspicuity,
                uids=(_uid(opts.seed, site_index, patient, follow_up, "study"),
                      _uid(opts.seed, site_index, patient, follow_up, "series"),
                      _uid(opts.seed, site_index, i, "sop")),
            ))
    return plans


def _rel_path(style: str, patient: int, follow_up: int, i: int) -> str:
    if style == "nih":
        return f"images/{patient:08d}_{follow_up:03d}.png"
    if style == "chexpert":
        return f"train/patient{patient:05d}/study{follow_up + 1}/view1_frontal.jpg"
    return f"images/{patient:05d}/{i:05d}.dcm"


def _report(rng, profile: SiteProfile, truth: dict[str, int], findings, noise: float):
    """What the site's labeller wrote: misses (label noise), CheXpert uncertainty, blanks."""
    out: dict[str, float] = {}
    for name in LABELS:
        y = float(truth[name])
        if y and noise and rng.random() < noise:
            y = 0.0
        if profile.style == "chexpert":
            if name in CHEXPERT_UNLABELLED:
                y = math.nan
            elif y and findings.get(name) and findings[name].severity < 0.35 and rng.random() < 0.5:
                y = -1.0  # "possible effusion": the labeller is unsure on subtle cases
            elif not y and rng.random() < 0.02:
                y = -1.0
            elif not y and rng.random() < 0.2:
                y = math.nan  # not mentioned in the report
        out[name] = y
    return out


Box = tuple[int, int, int, int]


def render_plan(plan: ImagePlan) -> np.ndarray:
    return render_with_boxes(plan)[0]


def render_with_boxes(plan: ImagePlan) -> tuple[np.ndarray, dict[str, Box], list[Box]]:
    """The image, the box of each finding it truly has (as drawn), and its markers' boxes."""
    rng = np.random.default_rng(plan.seed)
    drawn = render(plan.anatomy, plan.findings, plan.size, rng, view=plan.view,
                   conspicuity=plan.conspicuity)
    img = acquire(drawn.image, plan.profile.acquisition, rng,
                  shortcut_token=plan.shortcut_token)
    lesions = {k: b for k, b in drawn.boxes.items() if plan.truth.get(k)}
    return img, lesions, marker_boxes(plan.size, plan.profile.acquisition.marker,
                                      plan.shortcut_token)


def write_plan(args: tuple[ImagePlan, Path]) -> tuple[dict[str, Box], list[Box]]:
    """Render and write one image; returns its lesion and marker boxes (pixels)."""
    plan, site_dir = args
    img, lesions, markers = render_with_boxes(plan)
    path = site_dir / plan.rel_path
    if plan.style == "nih":
        write_png(path, img)
    elif plan.style == "chexpert":
        write_jpeg(path, img)
    else:
        # A research cohort's export: de-identified (no study date or accession number,
        # the patient id a pseudonym the header declares as such).
        facts = DicomFacts(
            patient_id=plan.patient_id, study_uid=plan.uids[0], series_uid=plan.uids[1],
            sop_uid=plan.uids[2], sex=plan.sex, age_years=plan.age, view=plan.view,
            study_date="", accession="", deidentified=True,
        )
        write_dicom(path, img, facts, plan.profile.acquisition)
    return lesions, markers


def _fmt(v: float) -> str:
    return "" if isinstance(v, float) and math.isnan(v) else str(int(v))


def write_manifest(site_dir: Path, plans: list[ImagePlan], style: str) -> Path:
    path = site_dir / MANIFEST[style]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        if style == "nih":
            w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                        "Patient Age", "Patient Gender", "View Position",
                        "OriginalImage[Width", "Height]"])
            for p in plans:
                found = [n for n in LABELS if p.reported[n] == 1.0]
                w.writerow([Path(p.rel_path).name, "|".join(found) or "No Finding",
                            int(Path(p.rel_path).stem.split("_")[1]),
                            int(p.patient_id.rsplit("p", 1)[1]), int(p.age), p.sex, p.view,
                            p.size, p.size])
        elif style == "chexpert":
            w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_ALL_COLUMNS])
            for p in plans:
                cells = []
                for col in CHEXPERT_ALL_COLUMNS:
                    label = CHEXPERT_COLUMNS.get(col)
                    if col == "No Finding":
                        cells.append("1" if not any(v == 1 for v in p.reported.values()) else "")
                    elif label is None:
                        cells.append("")
                    else:
                        cells.append(_fmt(p.reported[label]))
                sex = {"M": "Male", "F": "Female"}[p.sex]
                w.writerow([f"CheXpert-v1.0-small/{p.rel_path}", sex, int(p.age),
                            "Lateral" if p.view == "LATERAL" else "Frontal",
                            p.view if p.view != "LATERAL" else "", *cells])
        else:
            w.writerow(["path", "patient_id", "study_id", "sex", "age", "view", "manufacturer",
                        *LABELS])
            for p in plans:
                w.writerow([p.rel_path, p.patient_id, p.study_id, p.sex, p.age, p.view,
                            p.profile.acquisition.manufacturer,
                            *(_fmt(p.reported[n]) for n in LABELS)])
    return path


def image_id(plan: ImagePlan) -> str:
    """How annotation files name an image: its file name, or (CheXpert, whose file names
    repeat) its path under the site folder."""
    return plan.rel_path if plan.style == "chexpert" else Path(plan.rel_path).name


def write_boxes(path: Path, rows: list[tuple[str, str, Box]]) -> Path:
    """NIH's ``BBox_List_2017.csv`` layout: ``Bbox [x,y,w,h]`` spans four columns and every
    row ends in three empty ones, as in the published file."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""])
        for name, label, (x0, y0, x1, y1) in rows:
            w.writerow([name, label, f"{x0:.6f}", f"{y0:.6f}", f"{x1 - x0:.6f}",
                        f"{y1 - y0:.6f}", "", "", ""])
    return path


def write_reader_annotations(path: Path, plans: list[ImagePlan],
                             lesions: list[dict[str, Box]], seed: int) -> Path:
    """VinDr-CXR's ``annotations_*.csv``: a row per (image, reader, finding called), each
    true call with the drawn box jittered by the reader's hand, each false call with a box
    somewhere in the lungs; a reader who called nothing writes a ``No finding`` row."""
    vindr_name = {v: k for k, v in VINDR_CLASSES.items()}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max",
                    "y_max"])
        for p, boxes in zip(plans, lesions, strict=True):
            rng = np.random.default_rng([seed, p.site_index, p.index, 3])
            readers = sorted({c.split("/", 1)[0] for c in p.readers},
                             key=lambda r: int(r[6:]))
            for reader in readers:
                rad = f"R{int(reader[6:])}"
                called = [f for f in READER_FINDINGS if p.readers[f"{reader}/{f}"] == 1.0]
                if not called:
                    w.writerow([image_id(p), "No finding", 14, rad, "", "", "", ""])
                for finding in called:
                    drawn = [boxes[m] for m in READER_FINDINGS[finding] if m in boxes]
                    box = _jitter(drawn[0], p.size, rng) if drawn else _somewhere(p.size, rng)
                    name = vindr_name.get(finding, finding)
                    w.writerow([image_id(p), name, VINDR_CLASS_ID[name], rad,
                                *(f"{v:.1f}" for v in box)])
    return path


def _jitter(box: Box, size: int, rng: np.random.Generator) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    sd = 0.08 * max(x1 - x0, y1 - y0)
    x0, y0, x1, y1 = (np.array(box, float) + rng.normal(0, sd, 4))
    x0, x1 = sorted((float(np.clip(x0, 0, size - 1)), float(np.clip(x1, 1, size))))
    y0, y1 = sorted((float(np.clip(y0, 0, size - 1)), float(np.clip(y1, 1, size))))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _somewhere(size: int, rng: np.random.Generator) -> tuple[float, ...]:
    x0, y0 = rng.uniform(0.2, 0.7) * size, rng.uniform(0.2, 0.7) * size
    return x0, y0, x0 + 0.12 * size, y0 + 0.12 * size


def contact_sheet(site_dir: Path, plans: list[ImagePlan], n: int = 16, tile: int = 160) -> Path:
    """A 4x4 sheet of the site's first images, each captioned with its true findings."""
    cols = 4
    chosen = plans[:n]
    rows = math.ceil(len(chosen) / cols)
    sheet = Image.new("L", (cols * tile, rows * (tile + 14)), 0)
    draw = ImageDraw.Draw(sheet)
    for k, p in enumerate(chosen):
        img = render_plan(p)
        im = Image.fromarray(np.rint(img * 255).astype(np.uint8)).resize((tile, tile))
        x, y = (k % cols) * tile, (k // cols) * (tile + 14)
        sheet.paste(im, (x, y))
        found = [ABBREV[name] for name in LABELS if p.truth[name]] or ["normal"]
        draw.text((x + 2, y + tile + 1), f"{p.view} " + ",".join(found)[:26], fill=255)
    path = site_dir / "contact_sheet.png"
    sheet.save(path)
    return path



def write_cohort_toml(out: Path, opts: SynthOptions, profiles: list[SiteProfile],
                      counts: dict[str, dict]) -> Path:
    lines = ["# Synthetic multi-site CXR cohort written by `fedcxr synth`.",
             "# A test bed for the pipeline and the H1 protocol; not evidence about patients.",
             ""]
    if opts.scenario:
        s = scenario(opts.scenario)
        lines += [f"scenario = {toml_value(s.name)}",
                  f"truth = {toml_value(s.truth)}",
                  f"expected-verdict = {toml_value(s.expected)}",
                  "primary-labels = [" + ", ".join(map(toml_value, s.primary_labels)) + "]",
                  ""]
    lines.append("[generator]")
    for key in ("sites", "held_out", "images_per_site", "size", "seed", "readers", "enrich",
                "laterals"):
        lines.append(f"{key.replace('_', '-')} = {toml_value(getattr(opts, key))}")
    lines.append(f"shortcut = {toml_value(opts.shortcut or '')}")
    lines.append(f"severity = [{opts.severity[0]!r}, {opts.severity[1]!r}]")
    lines.append(f"conspicuity = {opts.conspicuity!r}")
    for p in profiles:
        lines += ["", "[[site]]",
                  f"name = {toml_value(p.name)}",
                  f"path = {toml_value(p.name)}",
                  f"manifest = {toml_value(MANIFEST[p.style])}",
                  f"format = {toml_value(FORMAT[p.style])}",
                  f"role = {toml_value(p.role)}",
                  f"prevalence-profile = {toml_value(p.prevalence)}",
                  f"label-noise = {toml_value(opts.label_noise.get(p.name, 0.0))}",
                  f"images = {counts[p.name]['images']}",
                  f"patients = {counts[p.name]['patients']}"]
        if opts.min_cell:
            lines.append(f"min-cell = {opts.min_cell}")
        lines.append("[site.acquisition]")
        for k, v in p.acquisition.as_dict().items():
            lines.append(f"{k.replace('_', '-')} = {toml_value(v)}")
    path = out / "cohort.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def generate(out: Path, opts: SynthOptions, progress=None) -> Path:
    """Write the cohort under ``out``; returns the path of cohort.toml."""
    out = Path(out)
    if opts.scenario:
        opts = with_defaults(opts)
    profiles = cohort_profiles(opts)
    _shortcut(opts.shortcut, profiles)  # validate before any work
    for site in opts.label_noise:
        if site not in {p.name for p in profiles}:
            raise ValueError(f"--label-noise names unknown site {site!r}")
    out.mkdir(parents=True, exist_ok=True)
    sizes = site_images(opts, profiles)
    plans_by_site = {p.name: plan_site(i, p, opts, sizes[p.name])
                     for i, p in enumerate(profiles)}
    jobs = [(plan, out / p.name) for p in profiles for plan in plans_by_site[p.name]]
    drawn = iter(list(parallel_map(write_plan, jobs, progress=progress)))
    counts = {}
    for p in profiles:
        plans = plans_by_site[p.name]
        boxes = [next(drawn) for _ in plans]
        write_manifest(out / p.name, plans, p.style)
        write_boxes(out / p.name / LESIONS_FILE,
                    [(image_id(q), NIH_NAME[k], b) for q, (lesions, _) in zip(plans, boxes,
                                                                               strict=True)
                     for k, b in lesions.items() if k in NIH_NAME])
        write_boxes(out / p.name / MARKERS_FILE,
                    [(image_id(q), MARKER_LABEL, b) for q, (_, markers) in zip(plans, boxes,
                                                                                strict=True)
                     for b in markers])
        if any(q.readers for q in plans):
            write_reader_annotations(out / p.name / READERS_FILE, plans,
                                     [lesions for lesions, _ in boxes], opts.seed)
        contact_sheet(out / p.name, plans)
        counts[p.name] = {"images": len(plans),
                          "patients": len({q.patient_id for q in plans})}
    return write_cohort_toml(out, opts, profiles, counts)
