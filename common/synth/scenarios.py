"""Cohorts with a known answer: the synthetic generator knows the truth, so fedcxr's verdict
can be checked against it the way a measuring instrument is calibrated.

Each scenario fixes who the sites are (acquisition, prevalence profile, size, label noise,
shortcut) and states its truth in one line, written to ``cohort.toml``:

- ``shift``: pooling truly helps on unseen institutions. Each training site is narrow (one
  vendor's intensity curve, a specialty prevalence profile rich in one of the three primary
  labels and nearly without the other two, a shortcut token at one site); the held-out sites
  use acquisitions no training site has and a balanced case mix. A model that saw every
  training site learns all three findings; a single-site model learns one.
- ``null-shift``: no site shift: every site is drawn from one distribution (one acquisition,
  one prevalence profile, one file format, equal sizes), so every arm's external performance
  must agree with its internal performance within the CIs.
- ``big-site``: one training site is large and acquires like the held-out sites; the others
  are tiny and their labellers miss 40% of positives. Pooling adds little to that site's model,
  so the verdict must not be "supported".

The truth of ``shift`` is established independently of the federated arm by the centralised
reference (``fedcxr simulate --pooled-reference``) beating every single-site model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common.synth.profiles import (
    HELD_OUT_ACQUISITIONS,
    SCENARIO_LABELS,
    TRAIN_ACQUISITIONS,
    Acquisition,
    SiteProfile,
)

PRIMARY_LABELS = SCENARIO_LABELS

# The shift scenario's held-out sites: vendors, photometry and bit depths no training site
# has, with intensity curves between the training sites' (a new vendor, not an alien one):
# what pooling several vendors can prepare a model for, and one vendor cannot.
SHIFT_HELD_OUT = (
    Acquisition("Fujifilm", "CR", "MONOCHROME1", 10, 0.93, 1.07, 0.015, 0.028, 0.7, 0.03,
                "none", 0.95),
    Acquisition("Siemens Healthineers", "DX", "MONOCHROME2", 14, 1.08, 0.97, -0.012, 0.022,
                0.6, 0.02, "tl", 0.9),
)

@dataclass(frozen=True)
class Scenario:
    name: str
    truth: str  # one line, written to cohort.toml
    expected: str  # "supported" | "not supported" | "no shift"
    primary_labels: tuple[str, ...] = PRIMARY_LABELS
    severity: tuple[float, float] = (0.6, 1.0)  # findings clear enough to learn in minutes
    conspicuity: float = 2.0  # (measured: at 1, Effusion and Mass stay near AUC 0.6 at 64 px)
    shortcut: str | None = None
    label_noise: dict[str, float] = field(default_factory=dict)
    held_out_scale: float = 2.0  # held-out sites' size relative to a training site's

    def profiles(self, n_sites: int, n_held_out: int) -> list[SiteProfile]:
        if n_held_out >= n_sites:
            raise ValueError("--held-out must be smaller than --sites")
        n_train = n_sites - n_held_out
        return [self._train(i, n_train) for i in range(n_train)] + [
            self._held_out(j, n_train) for j in range(n_held_out)]

    def _train(self, i: int, n_train: int) -> SiteProfile:
        specialties = ("cardiac", "pleural", "oncology")
        styles = ("nih", "dicom", "dicom")
        if self.name == "null-shift":
            return _site(i, "train", "dicom", "balanced", TRAIN_ACQUISITIONS[0])
        if self.name == "big-site":
            return _site(i, "train", styles[i % 3], "balanced",
                         HELD_OUT_ACQUISITIONS[0] if i == 0 else TRAIN_ACQUISITIONS[i % 4])
        return _site(i, "train", styles[i % 3], specialties[i % 3], TRAIN_ACQUISITIONS[i % 4])

    def _held_out(self, j: int, n_train: int) -> SiteProfile:
        i = n_train + j
        if self.name == "null-shift":
            return _site(i, "evaluate", "dicom", "balanced", TRAIN_ACQUISITIONS[0])
        if self.name == "big-site":
            return _site(i, "evaluate", "dicom", "balanced", HELD_OUT_ACQUISITIONS[0])
        return _site(i, "evaluate", "dicom", "balanced", SHIFT_HELD_OUT[j % len(SHIFT_HELD_OUT)])

    def images(self, profile: SiteProfile, base: int, index: int) -> int:
        """Images at this site when a training site of the default size has ``base``."""
        if self.name == "null-shift":
            return base
        if profile.role == "evaluate":
            return int(round(base * self.held_out_scale))
        if self.name == "big-site":
            return base * 3 if index == 0 else max(base // 3, 30)
        return base


def _site(i: int, role: str, style: str, prevalence: str, acquisition) -> SiteProfile:
    return SiteProfile(name=f"site{i + 1}", role=role, style=style, prevalence=prevalence,
                       acquisition=acquisition, ap_fraction=0.35, mean_age=55.0,
                       independent=True)


SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (
        Scenario("shift", "pooling truly helps: each training site is narrow (one vendor, rich "
                 "in 1 of 3 findings), held-out sites acquire like none of them; a model that "
                 "saw every site beats every single-site model at the held-out sites",
                 "supported", shortcut="site1:Cardiomegaly"),
        Scenario("null-shift", "no site shift: every site is drawn from one distribution (one "
                 "vendor, one case mix, equal sizes); each arm's external AUC equals its "
                 "internal AUC within the CIs", "no shift", held_out_scale=1.0),
        Scenario("big-site", "one training site is large and acquires like the held-out sites, "
                 "the others are tiny and miss 40% of positives; the federated model is not "
                 "better than that site's own model", "not supported",
                 label_noise={"site2": 0.4, "site3": 0.4}),
    )
}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; use one of "
                         f"{', '.join(SCENARIOS)}") from None


def with_defaults(opts):
    """``opts`` with the scenario's settings: its shortcut, label noise and finding strength
    (explicit --shortcut/--label-noise still win), and published-prevalence enrichment off
    (the scenario's profiles are final)."""
    s = scenario(opts.scenario)
    return dataclasses.replace(
        opts, enrich=1.0, severity=s.severity, conspicuity=s.conspicuity,
        shortcut=opts.shortcut if opts.shortcut else s.shortcut,
        label_noise={**s.label_noise, **opts.label_noise})
