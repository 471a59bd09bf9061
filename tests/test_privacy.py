"""The site's privacy ledger and what DP-SGD accounts: verified before any data is read (hash
chain, torn and malformed lines), one budget check for concurrent trainings, the sample
rate the sampler really uses, noise-only steps, patient-level sampling and clipping."""

from __future__ import annotations

import json
import math
import multiprocessing as mp

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.data import PatientImages, make_loader, patient_groups, split_datasets
from common.privacy import (
    BudgetExceeded,
    DPConfig,
    LedgerError,
    PlannedUnit,
    PrivacyLedger,
    Spend,
    compose_epsilon,
    default_delta,
    default_ledger_path,
)
from common.site import SiteSource, ensure_cache
from common.training import DPPlan, TrainConfig, local_train, noise_only_step


@pytest.fixture(scope="module")
def train(cohort):
    return split_datasets(ensure_cache(SiteSource(cohort / "site3"), 32), seed=0)["train"]


def _ledger(tmp_path, units: int = 3) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", site="s")
    for k in range(units):
        ledger.reserve([PlannedUnit(Spend(50 + k, 0.05, 1.1), "federated", k + 1, "r")], 1e-5,
                       math.inf)
    return ledger


def test_an_edited_line_breaks_the_hash_chain_and_is_named(tmp_path):
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["steps"] = 1  # someone lowers what was spent
    lines[1] = json.dumps(entry)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match=r"ledger.jsonl:3: does not follow line 2 .*hash "
                                          r"chain is broken.*restore"):
        ledger.verify()
    ledger.path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # a line removed
    with pytest.raises(LedgerError, match=r":2: does not follow line 1"):
        ledger.epsilon(1e-5)


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: e.pop("noise_multiplier"), "lacks noise_multiplier"),
    (lambda e: e.update(noise_multiplier=float("inf")), "malformed ledger entry"),
    (lambda e: e.update(noise_multiplier=float("nan")), "malformed ledger entry"),
    (lambda e: e.update(sample_rate=0), "malformed ledger entry"),
    (lambda e: e.update(steps="many"), "malformed ledger entry"),
])
def test_malformed_entries_are_one_line_errors_never_a_hang(tmp_path, change, message):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    entry = {"unit": "u", "status": "completed", "steps": 10, "sample_rate": 0.1,
             "noise_multiplier": 1.0, "prev": "0" * 64}
    change(entry)
    ledger.path.write_text(json.dumps(entry) + "\n")
    with pytest.raises(LedgerError, match=message) as info:
        ledger.epsilon(1e-5)
    assert "\n" not in str(info.value) and "ledger.jsonl:1" in str(info.value)


def test_a_torn_line_stops_training_until_repaired_and_repair_never_undercounts(tmp_path):
    ledger = _ledger(tmp_path, 2)
    unit = ledger.reserve([PlannedUnit(Spend(400, 0.05, 1.1), "single:s", 3, "r")], 1e-5,
                          math.inf)[0]  # a unit that started and then crashed
    full = ledger.epsilon(1e-5)
    with open(ledger.path, "a") as fh:  # power cut while the next unit's line was written
        fh.write('{"unit": "next", "status": "sta')
    with pytest.raises(LedgerError, match=r":4: torn last line.*fedcxr site ledger --repair"):
        ledger.reserve([PlannedUnit(Spend(1, 0.05, 1.1), "a", 4, "r")], 1e-5, math.inf)
    assert ledger.path.read_text().endswith('"sta')  # nothing written onto the torn line
    aside = ledger.repair()
    assert aside.read_text() == '{"unit": "next", "status": "sta'
    assert ledger.epsilon(1e-5) == pytest.approx(full)  # the crashed unit still counts in full
    assert unit in {e["unit"] for e in ledger.verify()}
    assert ledger.repair() is None  # nothing left to repair


def _race(path: str, budget: float, barrier, results) -> None:
    ledger = PrivacyLedger(path, site="s")
    barrier.wait()
    try:
        ledger.reserve([PlannedUnit(Spend(300, 0.05, 1.0), "federated", 1, "r")], 1e-5, budget)
        results.put("started")
    except BudgetExceeded as exc:
        results.put(str(exc))


def test_two_trainings_at_once_against_a_budget_that_fits_one(tmp_path):
    """Check and start are one critical section: with the check outside the lock, both
    processes read an empty ledger, both pass, and the site ends past its budget."""
    one = compose_epsilon([Spend(300, 0.05, 1.0)], 1e-5, "prv")
    two = compose_epsilon([Spend(300, 0.05, 1.0)] * 2, 1e-5, "prv")
    budget = round((one + two) / 2, 2)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "l.jsonl"), budget, barrier,
                                             results))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes[1] == "started" and "is left" in outcomes[0], outcomes
    assert f"{budget - one:.3f} is left" in outcomes[0]
    assert len(PrivacyLedger(tmp_path / "l.jsonl").verify()) == 1


def test_the_ledger_records_the_sample_rate_the_sampler_uses(train, tmp_path):
    """Opacus' Poisson sampler draws with q = 1 / (batches per epoch), not B / n; the ledger
    and the noise calibration must use the q that ran."""
    plan = DPPlan(DPConfig(target_epsilon=4.0, max_epsilon=50.0),
                  PrivacyLedger(tmp_path / "l.jsonl"), privacy_unit="image")
    n, batch = len(train), 7
    assert batch / n != 1 / math.ceil(n / batch)
    local_train(build(), train, TrainConfig(epochs=1, batch_size=batch, max_steps=2), dp=plan)
    done = plan.ledger.verify()[-1]
    assert done["sample_rate"] == pytest.approx(1 / math.ceil(n / batch))
    assert done["privacy_unit"] == "image" and done["n"] == n


def build() -> nn.Module:
    from common.model import build_model

    torch.manual_seed(0)
    return build_model(norm="group")


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_an_empty_poisson_batch_takes_a_noise_only_step(mode):
    """Skipping the step would be a different mechanism from the one accounted: the step
    happens, with noise and no gradient, and the accountant counts it."""
    from opacus import PrivacyEngine

    from common.dp_grad_sample import BookkeepingPrivacyEngine, register

    register()
    model = nn.Sequential(nn.Linear(4, 3))
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 3))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    engine = (BookkeepingPrivacyEngine if mode == "bk" else PrivacyEngine)()
    private = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(),
                                                                           lr=1.0),
                                  data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                  grad_sample_mode="ghost" if mode == "bk" else mode)
    optimizer = private[1]
    before = [p.detach().clone() for p in model.parameters()]
    noise_only_step(optimizer, mode)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert sum(steps for _, _, steps in engine.accountant.history) == 1


def _noise_step_optimizer(seed: int, noise_multiplier: float, n_params: int = 200_000):
    """A bk-mode DP optimizer (SGD, lr 1) over one parameter vector whose clipped sum is
    zero: each step moves the parameter by minus the noise / the expected batch (4)."""
    from common.dp_grad_sample import BookkeepingPrivacyEngine, register

    register()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_params // 10, 10, bias=False))
    data = torch.utils.data.TensorDataset(torch.randn(8, n_params // 10), torch.randn(8, 10))
    _, optimizer, _, _ = BookkeepingPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=torch.utils.data.DataLoader(data, batch_size=4),
        noise_multiplier=noise_multiplier, max_grad_norm=0.5, grad_sample_mode="ghost",
        noise_generator=torch.Generator().manual_seed(seed))
    return model, optimizer


def _noise_of_steps(seed: int, steps: int = 3, noise_multiplier: float = 1.5) -> list:
    model, optimizer = _noise_step_optimizer(seed, noise_multiplier)
    weight = model[0].weight
    drawn = []
    for _ in range(steps):
        before = weight.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
        drawn.append((before - weight.detach()).flatten() * 4)  # the noise itself
    return drawn


def test_the_noise_drawn_ahead_is_opacus_mechanism_fresh_each_step_and_seeded():
    """The whole-model noise step (drawn ahead in a thread) must add N(0, (sigma C)^2) to
    every coordinate, a new draw each step, and the same sequence for the same seed."""
    from scipy import stats

    first, again = _noise_of_steps(seed=7), _noise_of_steps(seed=7)
    std = 1.5 * 0.5
    for noise in first:
        n = len(noise)
        assert n == 200_000
        assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
        assert float(noise.std()) == pytest.approx(std, rel=0.01)  # sd of the sd: 0.16%
        assert stats.kstest(noise.numpy() / std, "norm").pvalue > 1e-4
    for a, b in zip(first, first[1:], strict=False):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02  # fresh draws
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the generator's own sequence
    other = _noise_of_steps(seed=8, steps=1)[0]
    assert not torch.equal(other, first[0])


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.3])
def test_our_noise_step_equals_opacus_own(noise_multiplier):
    """The clipped sum plus the noise, over the expected batch, is what Opacus' own add_noise
    and scale_grad give from the same generator: exactly without noise, and to float
    rounding (a fused multiply-add) with it."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    results = []
    for own in (False, True):
        model, optimizer = _noise_step_optimizer(seed=0, noise_multiplier=noise_multiplier,
                                                 n_params=2_000)
        if own:
            optimizer.__class__ = DPOptimizerFastGradientClipping
        torch.manual_seed(1)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            model[0].weight.grad = torch.randn_like(model[0].weight)
            optimizer.step()
        results.append(model[0].weight.detach().clone())
    exact = noise_multiplier == 0
    torch.testing.assert_close(results[0], results[1], rtol=0 if exact else 1e-6,
                               atol=0 if exact else 1e-7)


def test_patients_are_the_sampling_unit(train):
    groups = patient_groups(train)
    patients = train.cache.index["patient_id"].to_numpy()[train.rows]
    assert sum(len(g) for g in groups) == len(train)
    assert all(len(set(patients[g])) == 1 for g in groups)
    assert len({patients[g[0]] for g in groups}) == len(groups)
    data = PatientImages(train, seed=1)
    assert len(data) == len(groups) < len(train)  # the cohort has patients with 2+ images
    x, y = data[0]
    assert any(torch.equal(x, train[int(r)][0]) for r in groups[0])


def test_per_patient_clipping_matches_autograd_on_a_tiny_model(train):
    """Each sampled patient adds one clipped gradient (one of its images): the book-keeping
    clipped sum over a patient-sampled batch equals clip(grad) summed by plain autograd."""
    from common.dp_grad_sample import (
        BookkeepingGradSampleModule,
        clipped_backward,
        register,
    )
    from common.training import masked_bce

    register()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(),
                          nn.Linear(2 * 30 * 30, 14))
    data = PatientImages(train, seed=3)
    x, y = next(iter(make_loader(data, 6, shuffle=True, seed=2)))
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        grads = torch.autograd.grad(masked_bce(model(x[i:i + 1]), y[i:i + 1]),
                                    list(model.parameters()))
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, 0.5 / (float(norm) + 1e-6))
    gsm = BookkeepingGradSampleModule(model, max_grad_norm=0.5, loss_reduction="mean")
    inputs = x.clone().requires_grad_(True)
    clipped_backward(gsm, masked_bce(gsm(inputs), y, per_image=True), inputs)
    for e, p in zip(expected, model.parameters(), strict=True):
        # the clipped *sum* (the DP optimizer adds noise, then divides by the expected batch)
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    patients = train.cache.index["patient_id"].to_numpy()[train.rows]
    drawn = {i for i in range(len(train)) for k in range(len(x)) if torch.equal(train[i][0],
                                                                               x[k])}
    assert len({patients[i] for i in drawn}) == len(x)  # one image per sampled patient


def test_patient_level_training_spends_over_patients(train, tmp_path):
    plan = DPPlan(DPConfig(target_epsilon=4.0, max_epsilon=50.0),
                  PrivacyLedger(tmp_path / "l.jsonl"))
    assert plan.privacy_unit == "patient"
    r = local_train(build(), train, TrainConfig(epochs=1, batch_size=8), dp=plan)
    done = plan.ledger.verify()[-1]
    n_patients = len(patient_groups(train))
    assert done["privacy_unit"] == "patient" and done["n"] == n_patients
    assert done["sample_rate"] == pytest.approx(1 / math.ceil(n_patients / 8))
    assert r.delta == pytest.approx(default_delta(n_patients))
    assert r.epsilon == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("n", [10, 5_000, 10**7])
def test_the_default_delta_is_small_enough(n):
    assert default_delta(n) <= min(1 / (10 * n), 1e-5)
    assert default_delta(n) > 0
    assert DPConfig().delta_for(n) == default_delta(n)


def test_train_local_and_the_node_share_a_ledger_for_one_data_folder(cohort, tmp_path):
    """Spends by ``fedcxr train-local`` on a data folder land in the ledger the node on that
    folder composes (two ledgers for one data would each under-count)."""
    import shutil

    from cli.main import main
    from client.node import open_site
    from common.config import RunConfig

    data = tmp_path / "site1"
    shutil.copytree(cohort / "site1", data, ignore=shutil.ignore_patterns(".fedcxr"))
    assert main(["train-local", "--site", str(data), "--out", str(tmp_path / "out"), "--dp",
                 "--image-size", "32", "--batch-size", "16", "--target-epsilon", "2"]) == 0
    ledger = open_site({"data-path": str(data)}, RunConfig()).ledger("prv")
    assert ledger.path == default_ledger_path(data)
    done = [e for e in ledger.verify() if e["status"] == "completed"]
    assert [(e["run_id"], e["arm"]) for e in done] == [("train-local", "label-counts"),
                                                      ("train-local", "local")]
    assert all(e["privacy_unit"] == "patient" for e in done)


def test_an_image_level_release_states_the_group_privacy_bound_per_patient():
    """(ε, δ) per image gives a patient with k images (k ε, k e^((k-1) ε) δ): results.json
    states it for the site's largest k; at patient level the patient bound is ε itself."""
    from common import protocol as wire
    from common.config import RunConfig
    from server.app import Node, privacy_row

    facts = wire.SiteFacts("train", "s", "nih", 90, 10, 10, 110, [0.1] * 14, 1.0, 7.0, 8.0,
                           delta=1e-6, privacy_unit="image", n_units=90,
                           max_images_per_patient=3)
    row = privacy_row(RunConfig(dp=True, privacy_unit="image"), Node(1, facts), 1.5)
    assert row["delta"] == 1e-6 and row["privacy_unit"] == "image"
    assert row["patient_epsilon"] == pytest.approx(4.5)
    assert row["patient_delta"] == pytest.approx(3 * math.exp(3.0) * 1e-6)
    patient = wire.SiteFacts.decode(wire.SiteFacts(
        "train", "s", "nih", 90, 10, 10, 110, [0.1] * 14, 1.0, 7.0, 8.0, delta=2e-6,
        privacy_unit="patient", n_units=40, max_images_per_patient=3).encode())
    row = privacy_row(RunConfig(dp=True), Node(1, patient), 1.5)
    assert (row["patient_epsilon"], row["patient_delta"], row["n_units"]) == (1.5, 2e-6, 40)


def test_unit_label_counts_match_brute_force(train):
    from common.releases import unit_counts

    labels = train.labels()
    patients = train.cache.index["patient_id"].to_numpy()[train.rows]
    pos, neg = unit_counts(train, "patient")
    for k in range(labels.shape[1]):
        want_pos = want_neg = 0
        for pid in set(patients):
            values = labels[patients == pid, k]
            values = values[~np.isnan(values)]
            if len(values):
                want_pos += int((values == 1).any())
                want_neg += int(not (values == 1).any())
        assert (pos[k], neg[k]) == (want_pos, want_neg)
    img_pos, img_neg = unit_counts(train, "image")
    assert img_pos.tolist() == np.nansum(labels == 1, axis=0).tolist()


def test_the_label_count_release_is_accounted_once_and_noised_as_stated(train, tmp_path):
    """One release per run (a second use reads it back, spending nothing); its noise has the
    stated standard deviation z sqrt(14) (checked over repeated releases); its ε is the
    Gaussian mechanism's, as Google's dp-accounting computes it."""
    from dp_accounting import dp_event, pld

    from common.releases import SENSITIVITY, released_counts, unit_counts

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", site="s")
    kw = dict(privacy_unit="image", ledger=ledger, delta=1e-5, max_epsilon=50.0,
              noise_multiplier=2.0, run_id="r", n_units=len(train))
    first = released_counts(train, store=tmp_path / "c.json", **kw)
    again = released_counts(train, store=tmp_path / "c.json", **kw)
    assert again == first and first.noised
    assert [e["arm"] for e in ledger.verify()] == ["label-counts", "label-counts"]
    pld_acc = pld.PLDAccountant()
    pld_acc.compose(dp_event.GaussianDpEvent(2.0))
    assert first.epsilon_alone == pytest.approx(pld_acc.get_epsilon(1e-5), rel=0.02)
    exact, _ = unit_counts(train, "image")
    fast = {**kw, "max_epsilon": math.inf,  # the analytic accountant: 120 releases quickly
            "ledger": PrivacyLedger(tmp_path / "many.jsonl", accountant="rdp")}
    errors = np.array([
        np.asarray(released_counts(train, store=tmp_path / f"c{k}.json", **fast).pos) - exact
        for k in range(120)])
    assert abs(errors.mean()) < 0.3 * 2.0 * SENSITIVITY
    assert errors.std() == pytest.approx(2.0 * SENSITIVITY, rel=0.1)


def test_under_dp_class_weights_never_come_from_the_exact_labels(train, tmp_path,
                                                                 monkeypatch):
    import common.training as training

    def forbidden(*a, **k):
        raise AssertionError("pos_weight computed from the exact training labels under DP")

    monkeypatch.setattr(training, "pos_weight_from", forbidden)
    plan = DPPlan(DPConfig(target_epsilon=4.0, max_epsilon=50.0),
                  PrivacyLedger(tmp_path / "l.jsonl"), pos_weight=np.full(14, 3.0))
    local_train(build(), train, TrainConfig(epochs=1, batch_size=8, max_steps=1), dp=plan)
    with pytest.raises(AssertionError, match="exact training labels"):
        local_train(build(), train, TrainConfig(epochs=1, batch_size=8, max_steps=1))


@pytest.mark.parametrize("n", [3, 9, 10, 25, 300])
def test_released_roc_bins_hold_at_least_min_cell_images(n):
    from common.evaluation.disclosure import merge_roc_cells, released_bins
    from common.evaluation.metrics import choose_threshold, roc_counts

    rng = np.random.default_rng(n)
    y = rng.integers(0, 2, n).astype(float)
    y[0], y[-1] = 0, 1
    pos, neg = roc_counts(y, rng.random(n))
    mpos, mneg = merge_roc_cells(pos, neg, 10)
    bins = released_bins(mpos, mneg)
    if n < 10:
        assert bins == [] and mpos.sum() == 0 and mneg.sum() == 0
        return
    assert min(bins) >= 10 and sum(bins) == n
    assert (mpos[0], mneg[0]) == (pos[0], neg[0])  # totals kept
    assert np.all(np.diff(mpos) <= 0) and np.all(np.diff(mneg) <= 0)
    assert 0.0 <= choose_threshold(mpos, mneg, "youden") <= 1.0


def test_subgroup_cells_under_min_cell_release_no_count():
    import pandas as pd

    from common.evaluation.subgroups import subgroup_table, subgroups

    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"sex": ["F"] * 4 + ["M"] * 60, "age": [50.0] * 64,
                         "view": ["PA"] * 64, "manufacturer": ["x"] * 64})
    y = rng.integers(0, 2, 64).astype(float)
    rows = subgroup_table(subgroups(meta), y, rng.random(64), 0.5, min_size=30, min_cell=10)
    women = next(r for r in rows if r["attribute"] == "sex" and r["group"] == "F")
    men = next(r for r in rows if r["attribute"] == "sex" and r["group"] == "M")
    assert women["n"] is None and women["prevalence"] is None and "suppressed" in \
        women["status"]
    assert men["n"] == 60 and men["status"] == "ok"


def test_vanishing_noise_falls_back_to_the_rdp_bound_instead_of_exhausting_memory():
    """PRV's grid grows without bound as the noise vanishes (noise 0.001 was killed for
    memory): below PRV_MIN_NOISE the analytic RDP upper bound is used."""
    from common.privacy import PRV_MIN_NOISE

    tiny = [Spend(2, 1.0, PRV_MIN_NOISE / 50)]
    assert compose_epsilon(tiny, 1e-5, "prv") == compose_epsilon(tiny, 1e-5, "rdp") > 1e4
    fine = [Spend(2, 1.0, 1.0)]
    assert compose_epsilon(fine, 1e-5, "prv") < compose_epsilon(fine, 1e-5, "rdp")


def test_the_ledgers_running_epsilon_is_its_composition(tmp_path):
    """Each line records the ε of the whole ledger as of that line; the audit log reads it
    instead of recomposing: it must be what composing the ledger gives."""
    ledger = _ledger(tmp_path, 2)
    unit = ledger.reserve([PlannedUnit(Spend(80, 0.05, 1.1), "single:s", 3, "r")], 1e-5,
                          math.inf)[0]
    assert ledger.spent() == pytest.approx(ledger.epsilon(1e-5))
    ledger.complete(unit, Spend(20, 0.05, 1.1), 1e-5, run_id="r", arm="single:s", round=3)
    assert ledger.spent() == pytest.approx(ledger.epsilon(1e-5))
    assert PrivacyLedger(tmp_path / "none.jsonl").spent() == 0.0


def test_a_full_batch_is_the_gaussian_mechanism_without_a_warning():
    """Sample rate 1 (batch >= the site's training set): PRV's ε is the exact ε of the
    composed Gaussian mechanism (Balle & Wang 2018, Theorem 8: mu = sqrt(k) / sigma), and
    Opacus' log(1 - q) = -inf raises no divide-by-zero warning at the operator."""
    import warnings

    from scipy.optimize import brentq
    from scipy.stats import norm

    from common.privacy import Spend, compose_epsilon, noise_for_target

    steps, sigma, delta = 20, 2.0, 1e-5
    mu = steps ** 0.5 / sigma

    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    exact = brentq(gap, 1e-6, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "divide by zero"
        eps = compose_epsilon([Spend(steps, 1.0, sigma)], delta, "prv")
        noise = noise_for_target(exact, delta, 1.0, steps, "prv")
    assert eps == pytest.approx(exact, rel=0.02)
    assert noise == pytest.approx(sigma, rel=0.02)
