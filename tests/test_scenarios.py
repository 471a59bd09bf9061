"""Known-answer scenarios: deterministic, and each one's stated truth holds on the data it
writes (measured from the written files, not from the generator's parameters)."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2_contingency

from cli.demo import matches_truth
from common.labels import LABELS
from common.site import SiteSource, ensure_cache
from common.synth import SynthOptions, generate
from common.synth.scenarios import SCENARIOS, scenario
from tests.test_synth import digest


def _cohort(root, name: str, n: int = 60, size: int = 64):
    generate(root, SynthOptions(images_per_site=n, size=size, seed=3, scenario=name))
    return tomllib.loads((root / "cohort.toml").read_text())


def _site_data(root, site: dict, size: int = 32):
    """(labels (N, 14) with NaN, mean pixel value per image) read back through the data
    layer, as a node would read them."""
    cache = ensure_cache(SiteSource(root / site["path"], root / site["path"] / site["manifest"],
                                    site["format"], site=site["name"]), size)
    images = np.asarray(cache.images, dtype=np.float32) / cache.scale
    return cache.labels(), images.mean(axis=(1, 2)), cache


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenarios")
    return {name: (root / name, _cohort(root / name, name)) for name in SCENARIOS}


def test_cohort_toml_states_the_scenario_and_its_truth(scenarios):
    for name, (_, meta) in scenarios.items():
        assert meta["scenario"] == name
        assert meta["truth"] == SCENARIOS[name].truth and len(meta["truth"]) > 40
        assert meta["expected-verdict"] == SCENARIOS[name].expected
        assert meta["primary-labels"] == list(SCENARIOS[name].primary_labels)
        assert set(meta["primary-labels"]) <= set(LABELS)


def test_scenario_generation_is_deterministic(tmp_path):
    opts = SynthOptions(sites=4, held_out=1, images_per_site=8, size=32, seed=5,
                        scenario="shift")
    generate(tmp_path / "a", opts)
    generate(tmp_path / "b", opts)
    a = digest(tmp_path / "a")
    assert a == digest(tmp_path / "b")
    generate(tmp_path / "c", SynthOptions(sites=4, held_out=1, images_per_site=8, size=32,
                                          seed=5, scenario="null-shift"))
    assert digest(tmp_path / "c") != a


def test_null_shift_sites_are_drawn_from_one_distribution(scenarios):
    root, meta = scenarios["null-shift"]
    sites = meta["site"]
    assert len({s["images"] for s in sites}) == 1, "equal sizes"
    assert len({tuple(sorted(s["acquisition"].items())) for s in sites}) == 1
    assert len({(s["format"], s["prevalence-profile"]) for s in sites}) == 1
    vendors = {s["name"]: set(pd.read_csv(root / s["path"] / s["manifest"])["manufacturer"])
               for s in sites}
    assert len(set(map(frozenset, vendors.values()))) == 1
    data = [_site_data(root, s) for s in sites]
    # Intensity: every site's mean pixel value within the spread of the others' images.
    means = np.array([d[1].mean() for d in data])
    sds = np.array([d[1].std(ddof=1) / np.sqrt(len(d[1])) for d in data])
    assert np.ptp(means) < 4 * np.sqrt(np.mean(sds**2)) * np.sqrt(2), means
    # Prevalence: no primary label's positives differ between sites (chi-square, 5 sites).
    for label in meta["primary-labels"]:
        k = LABELS.index(label)
        table = [[np.nansum(d[0][:, k] == 1), np.nansum(d[0][:, k] == 0)] for d in data]
        assert chi2_contingency(table)[1] > 0.001, (label, table)


def test_shift_held_out_acquisition_differs_from_every_training_site(scenarios):
    root, meta = scenarios["shift"]
    train = [s for s in meta["site"] if s["role"] == "train"]
    held = [s for s in meta["site"] if s["role"] == "evaluate"]
    for h in held:
        assert h["acquisition"]["manufacturer"] not in {t["acquisition"]["manufacturer"]
                                                         for t in train}
        written = set(pd.read_csv(root / h["path"] / h["manifest"])["manufacturer"])
        assert written == {h["acquisition"]["manufacturer"]}
    # Measured from the written DICOM headers: a photometry / bit depth / vendor triple no
    # training site wrote, and an intensity curve no training site has.
    import pydicom

    def header(site: dict) -> tuple:
        path = next((root / site["path"]).rglob("*.dcm"), None)
        if path is None:
            return (site["acquisition"]["manufacturer"], site["format"])
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return (str(ds.Manufacturer), str(ds.PhotometricInterpretation), int(ds.BitsStored))

    train_headers = {header(t) for t in train}
    curve = lambda a: (a["gamma"], a["contrast"], a["brightness"])  # noqa: E731
    for h in held:
        assert header(h) not in train_headers
        assert curve(h["acquisition"]) not in {curve(t["acquisition"]) for t in train}


def test_shift_training_sites_each_lack_most_primary_findings(scenarios):
    """Pooling helps because each training site is rich in a different finding: every
    primary label is common at exactly one training site and at every held-out site, and
    findings are drawn independently (one cannot be learnt from another it travels with)."""
    root, meta = scenarios["shift"]
    prevalence = {}
    for s in meta["site"]:
        labels = _site_data(root, s)[0]
        prevalence[s["name"]] = {lb: np.nanmean(labels[:, LABELS.index(lb)])
                                 for lb in meta["primary-labels"]}
    train = [s["name"] for s in meta["site"] if s["role"] == "train"]
    held = [s["name"] for s in meta["site"] if s["role"] == "evaluate"]
    for label in meta["primary-labels"]:
        rich = [t for t in train if prevalence[t][label] > 0.2]
        assert len(rich) == 1, (label, rich)
        assert all(prevalence[h][label] > 0.08 for h in held), label
    for t in train:
        assert sum(prevalence[t][lb] > 0.2 for lb in meta["primary-labels"]) == 1
    labels = np.concatenate([_site_data(root, s)[0] for s in meta["site"]
                             if s["role"] == "evaluate"])
    first, *rest = (LABELS.index(lb) for lb in meta["primary-labels"])
    for k in rest:
        table = [[np.sum((labels[:, first] == a) & (labels[:, k] == b)) for b in (0, 1)]
                 for a in (0, 1)]
        assert chi2_contingency(table)[1] > 0.001, table


def test_big_site_is_large_matches_held_out_acquisition_and_others_are_noisy(scenarios):
    root, meta = scenarios["big-site"]
    sites = {s["name"]: s for s in meta["site"]}
    big = sites["site1"]
    assert big["images"] > 2 * max(sites[n]["images"] for n in ("site2", "site3"))
    for held in (s for s in meta["site"] if s["role"] == "evaluate"):
        assert held["acquisition"] == big["acquisition"]
    assert sites["site2"]["label-noise"] == sites["site3"]["label-noise"] == 0.4


def test_unknown_scenario_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown scenario 'shfit'.*shift"):
        scenario("shfit")


def test_a_verdict_matches_a_scenarios_truth_only_as_stated():
    assert matches_truth("supported", "supported")
    assert not matches_truth("supported", "inconclusive")
    assert not matches_truth("not supported", "supported")
    assert matches_truth("not supported", "inconclusive")
    assert matches_truth("not supported", "contradicted")


def test_demo_refuses_a_cohort_of_another_scenario_with_what_to_do(tmp_path, capsys):
    from cli.main import main

    (tmp_path / "cohort.toml").write_text('[generator]\nsites = 5\n')
    assert main(["demo", "--cohort", str(tmp_path), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "without a scenario" in err and "pass --cohort NEW_FOLDER" in err
    assert not (tmp_path / "r").exists()
