"""Local training and DP: masked loss, weights, learning, ledger, budget, accountant."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from common.data import split_datasets
from common.model import build_model
from common.privacy import (
    BudgetExceeded,
    DPConfig,
    PrivacyLedger,
    Spend,
    compose_epsilon,
)
from common.site import SiteSource, ensure_cache
from common.training import (
    DPPlan,
    TrainConfig,
    local_train,
    masked_bce,
    pos_weight_from,
    validate,
)


@pytest.fixture(scope="module")
def site(cohort):
    cache = ensure_cache(SiteSource(cohort / "site3"), 32)
    return split_datasets(cache, seed=0)


def test_masked_loss_equals_hand_computation():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    targets = torch.tensor([[1.0, math.nan, 0.0], [math.nan, math.nan, 1.0]])

    def bce(z, y, w=1.0):
        return -(w * y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(
            1 - 1 / (1 + math.exp(-z))))

    row1 = (bce(0.5, 1) + bce(2.0, 0)) / 2
    row2 = bce(-0.5, 1)
    assert masked_bce(logits, targets).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    w = torch.tensor([3.0, 1.0, 2.0])
    row1w = (bce(0.5, 1, 3.0) + bce(2.0, 0, 3.0 * 0 + 2.0)) / 2
    row2w = bce(-0.5, 1, 2.0)
    assert masked_bce(logits, targets, w).item() == pytest.approx((row1w + row2w) / 2, rel=1e-6)
    # gradient never flows from a NaN target
    z = logits.clone().requires_grad_(True)
    masked_bce(z, targets).backward()
    assert z.grad[0, 1] == 0 and z.grad[1, 0] == 0 and z.grad[1, 1] == 0


def test_pos_weight_from_prevalence_is_capped():
    y = np.array([[1, 0, np.nan], [0, 0, np.nan], [0, 0, 1], [0, 0, 0]] + [[0, 0, 0]] * 40,
                 dtype=float)
    w = pos_weight_from(y, cap=10.0)
    assert w[0].item() == pytest.approx(10.0)  # 43 negatives / 1 positive, capped
    assert w[1].item() == 1.0  # no positives
    assert w[2].item() == pytest.approx(10.0)
    y2 = np.array([[1], [0], [0], [0]], dtype=float)
    assert pos_weight_from(y2).item() == pytest.approx(3.0)


def test_loss_decreases_and_is_deterministic(site):
    def run():
        torch.manual_seed(0)
        model = build_model()
        r = local_train(model, site["train"], TrainConfig(epochs=4, batch_size=16, lr=2e-3,
                                                          augment=False, seed=3))
        return r, model

    r1, m1 = run()
    assert r1.epoch_losses[-1] < r1.epoch_losses[0] * 0.9
    r2, m2 = run()
    assert r1.epoch_losses == r2.epoch_losses
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    val = validate(m1, site["val"])
    assert val.n == len(site["val"]) and set(val.auc) == set(val.roc_counts)


def test_fedprox_pulls_towards_the_start(site):
    def drift(mu):
        torch.manual_seed(0)
        model = build_model()
        start = [p.detach().clone() for p in model.parameters()]
        local_train(model, site["train"], TrainConfig(epochs=1, batch_size=16, lr=5e-3,
                                                      proximal_mu=mu, augment=False))
        return sum(float(((p - s) ** 2).sum()) for p, s in zip(model.parameters(), start,
                                                               strict=True))

    assert drift(10.0) < drift(0.0)


def _dp(tmp_path, **kw):
    cfg = DPConfig(**{"target_epsilon": 4.0, "max_epsilon": 20.0, **kw})
    return DPPlan(cfg, PrivacyLedger(tmp_path / "ledger.jsonl", site="site3",
                                     accountant=cfg.accountant))


def test_dp_training_runs_and_writes_the_ledger(site, tmp_path):
    torch.manual_seed(0)
    model = build_model(norm="group")
    before = [p.detach().clone() for p in model.parameters()]
    plan = _dp(tmp_path)
    r = local_train(model, site["train"], TrainConfig(epochs=1, batch_size=8), dp=plan)
    assert r.epsilon == pytest.approx(4.0, rel=0.05) and r.noise_multiplier > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    entries = plan.ledger.entries()
    assert [e["status"] for e in entries] == ["started", "completed"]
    for key in ("steps", "sample_rate", "noise_multiplier", "accountant", "epsilon", "delta",
                "run_id", "arm", "round"):
        assert key in entries[-1]
    assert plan.ledger.epsilon(r.delta) == pytest.approx(r.epsilon)
    assert not hasattr(model, "_forward_counter")  # Opacus hooks removed from our model


def test_two_arms_on_the_same_data_both_spend(site, tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl", site="s")
    eps = []
    for arm in ("federated", "single"):
        plan = DPPlan(DPConfig(target_epsilon=3.0, max_epsilon=50.0), ledger, arm=arm,
                      planned_units=2)
        torch.manual_seed(0)
        r = local_train(build_model(norm="group"), site["train"],
                        TrainConfig(epochs=1, batch_size=8), dp=plan)
        eps.append(r.epsilon)
    assert eps[1] > eps[0] * 1.2
    assert eps[1] == pytest.approx(3.0, rel=0.05)  # target spread over both arms
    assert {e["arm"] for e in ledger.entries()} == {"federated", "single"}


def test_over_budget_is_refused_before_training(site, tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl", site="s")
    ledger._append({"unit": "old", "status": "completed", "steps": 200, "sample_rate": 0.2,
                    "noise_multiplier": 0.8})
    model = build_model(norm="group")
    before = [p.detach().clone() for p in model.parameters()]
    plan = DPPlan(DPConfig(target_epsilon=2.0, max_epsilon=3.0), ledger)
    with pytest.raises(BudgetExceeded) as info:
        local_train(model, site["train"], TrainConfig(epochs=1, batch_size=8), dp=plan)
    msg = str(info.value)
    assert "left" in msg and "above max-epsilon 3" in msg and str(ledger.path) in msg
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(ledger.entries()) == 1  # nothing recorded for refused work


def test_ledger_epsilon_matches_dp_accounting_rdp():
    from dp_accounting import dp_event, rdp

    spends = [Spend(300, 0.02, 1.1), Spend(500, 0.01, 0.9), Spend(120, 0.05, 1.5)]
    delta = 1e-5
    ours = compose_epsilon(spends, delta, "rdp")
    acc = rdp.RdpAccountant()
    for s in spends:
        acc.compose(dp_event.PoissonSampledDpEvent(
            s.sample_rate, dp_event.GaussianDpEvent(s.noise_multiplier)), s.steps)
    theirs = acc.get_epsilon(delta)
    assert ours == pytest.approx(theirs, rel=0.01)
    # PRV (the default) is tighter than RDP but in the same place
    prv = compose_epsilon(spends, delta, "prv")
    assert 0.5 * theirs < prv <= theirs * 1.01


def test_ledger_survives_a_kill_mid_round_and_never_undercounts(cohort, tmp_path):
    ledger_path = tmp_path / "ledger.jsonl"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from common.site import SiteSource, ensure_cache
        from common.data import split_datasets
        from common.model import build_model
        from common.privacy import DPConfig, PrivacyLedger
        from common.training import DPPlan, TrainConfig, local_train
        from pathlib import Path
        ds = split_datasets(ensure_cache(SiteSource(Path({str(cohort / 'site3')!r})), 32))
        ledger = PrivacyLedger(Path({str(ledger_path)!r}), site="s")
        cfg = TrainConfig(epochs=1, batch_size=4)
        plan = DPPlan(DPConfig(target_epsilon=2.0, max_epsilon=50.0), ledger, arm="a", round=1)
        local_train(build_model(norm="group"), ds["train"], cfg, dp=plan)   # round 1 completes
        plan = DPPlan(DPConfig(target_epsilon=2.0, max_epsilon=50.0), ledger, arm="a", round=2)
        def die(step, total):
            if step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        local_train(build_model(norm="group"), ds["train"], cfg, dp=plan, progress=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ledger = PrivacyLedger(ledger_path, site="s")
    entries = ledger.entries()
    assert [(e["round"], e["status"]) for e in entries] == [(1, "started"), (1, "completed"),
                                                            (2, "started")]
    delta = entries[0]["delta"]
    first = compose_epsilon([Spend(entries[1]["steps"], entries[1]["sample_rate"],
                                   entries[1]["noise_multiplier"])], delta, "prv")
    # The killed round counts in full (planned steps), so ε is at least two rounds' worth.
    assert ledger.epsilon(delta) > first * 1.2
    assert ledger.epsilon(delta) == pytest.approx(entries[2]["epsilon"], rel=1e-6)


@pytest.mark.parametrize("kernel,stride,padding,bias", [(1, 1, 0, False), (3, 1, 1, False),
                                                        (7, 2, 3, True), (3, 2, 0, True)])
def test_fast_conv_grad_sampler_matches_opacus(kernel, stride, padding, bias):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from common.dp_grad_sample import conv2d_grad_sample

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(5, 7, kernel, stride=stride, padding=padding, bias=bias)
    x = torch.randn(4, 5, 12, 12)
    out = layer(x)
    g = torch.randn_like(out)
    ours = conv2d_grad_sample(layer, [x], g)
    ref = compute_conv_grad_sample(layer, [x], g)
    assert set(ours) == set(ref)
    for p in ref:
        torch.testing.assert_close(ours[p], ref[p], rtol=1e-4, atol=1e-5)
    # and the per-sample gradients sum to the ordinary gradient
    (out * g).sum().backward()
    torch.testing.assert_close(ours[layer.weight].sum(0), layer.weight.grad, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding,bias,size", [
    (1, 1, 0, False, 2),   # tiny T: ghost (Gram) branch
    (3, 1, 1, False, 3),   # ghost branch with unfolding
    (1, 1, 0, True, 12),   # large T: explicit branch
    (7, 2, 3, True, 12)])
def test_conv_ghost_norms_equal_per_sample_gradient_norms(kernel, stride, padding, bias, size):
    from common.dp_grad_sample import conv2d_grad_sample, conv2d_norm_sample

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(40, 48, kernel, stride=stride, padding=padding, bias=bias)
    x = torch.randn(5, 40, size, size)
    g = torch.randn_like(layer(x))
    norms = conv2d_norm_sample(layer, [x], g)
    grads = conv2d_grad_sample(layer, [x], g)
    assert set(norms) == set(grads)
    for p, gs in grads.items():
        torch.testing.assert_close(norms[p], gs.reshape(5, -1).norm(dim=1), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_ghost_clipping_step_equals_per_sample_gradient_step(site, tmp_path, mode):
    """Same seed, same Poisson batches, same noise: ghost clipping (two backward passes,
    norms only) and book-keeping (one backward) train to the same weights as materialised
    per-sample gradients."""
    def trained(mode: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(norm="group")
        plan = _dp(tmp_path / mode, grad_sample_mode=mode)
        local_train(model, site["train"], TrainConfig(epochs=1, batch_size=8, max_steps=3,
                                                      augment=False), dp=plan)
        return [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    start = [p.detach().clone() for p in build_model(norm="group").parameters()]
    hooks, ghost_ = trained("hooks"), trained(mode)
    moved = max(float((a - s).abs().max()) for a, s in zip(hooks, start, strict=True))
    assert moved > 1e-4
    for a, b in zip(hooks, ghost_, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_bookkeeping_gradient_is_the_sum_of_clipped_per_image_gradients():
    """One step of bk mode leaves p.grad = sum_i min(1, C / |g_i|) g_i, with g_i each image's
    own gradient taken by a plain backward of that image alone -- for every layer kind it
    covers (1x1, 3x3 and strided 7x7 convolutions with and without bias, GroupNorm, Linear)
    and every way it forms a layer's part: a convolution's kept per-image gradients (a
    grouped weight-gradient kernel; a batched matmul, with the unfolded input at few
    positions) or its input and output gradient when the Gram norm was cheaper (the clipped
    sum a convolution's weight gradient, a matrix product for 1x1), and GroupNorm's per-image
    gradients from its native kernel or, at few positions, from tensor ops. Opacus' DP
    optimizer, handed that sum without a copy, then steps by it over the batch size (no
    noise here)."""
    from common.dp_grad_sample import (
        _BK_PARTS,
        BookkeepingPrivacyEngine,
        clipped_sum,
        norms_backward,
        register,
    )

    register()
    torch.manual_seed(0)

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(2, 8, 7, stride=2, padding=3, bias=True), torch.nn.GroupNorm(2, 8),
            torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, padding=1, bias=False),
            torch.nn.GroupNorm(3, 12), torch.nn.ReLU(),
            torch.nn.Conv2d(12, 40, 1, bias=False),  # 1x1 at 8x8: explicit per-image grads
            torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(40, 8, 3, padding=1, bias=False),  # 3x3 at 4x4: unfolded input
            torch.nn.GroupNorm(2, 8), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(8, 40, 1, bias=True),  # 1x1 at 2x2: Gram norm, clipped sum a matmul
            torch.nn.GroupNorm(4, 40),  # 2x2: tensor ops
            torch.nn.Conv2d(40, 40, 1, bias=False),  # the same, without a bias
            torch.nn.Flatten(), torch.nn.Linear(160, 3))

    model = net()
    reference = net()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 2, 16, 16), torch.randn(6, 3)
    per_image_grads = []
    for i in range(6):
        reference.zero_grad()
        ((reference(x[i:i + 1]) - y[i:i + 1]) ** 2).sum().backward()
        per_image_grads.append([p.grad.clone() for p in reference.parameters()])
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gs)) for gs in per_image_grads])
    clip = float(norms.median())  # some images clipped, some not
    expected = [sum(min(1.0, clip / float(norms[i])) * per_image_grads[i][k] for i in range(6))
                for k in range(len(per_image_grads[0]))]

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gsm, opt, _, _ = BookkeepingPrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=clip, poisson_sampling=False, grad_sample_mode="ghost")
    xb = x.clone().requires_grad_(True)
    norms_backward(((gsm(xb) - y) ** 2).sum(dim=1), xb)
    kept = {name: set(getattr(layer, _BK_PARTS)) for name, layer in model.named_children()
            if hasattr(layer, _BK_PARTS)}
    assert (kept.pop("12"), kept.pop("14")) == ({"io", "per_sample"}, {"io"})  # + a bias
    assert all(parts == {"per_sample"} for parts in kept.values()), sorted(kept.items())
    coef = clipped_sum(gsm)
    assert int((coef < 1).sum()) in range(1, 6)
    for (name, p), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5, msg=name)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, start, want in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(p.detach(), start - 0.1 * want / 6, rtol=1e-4, atol=1e-6)


def test_merged_ledger_history_gives_the_same_epsilon():
    """compose_epsilon adds the steps of units with the same noise and sample rate into one
    accountant entry: ε must equal Opacus' accountant fed the raw, one-entry-per-unit
    history."""
    from common.privacy import make_accountant

    spends = [Spend(40, 0.025, 0.9), Spend(40, 0.025, 0.9), Spend(13, 0.05, 1.2),
              Spend(40, 0.025, 0.9), Spend(0, 0.025, 0.9)]
    for kind in ("prv", "rdp"):
        acc = make_accountant(kind)
        acc.history = [s.as_history() for s in spends if s.steps]
        assert compose_epsilon(spends, 1e-5, kind) == pytest.approx(
            float(acc.get_epsilon(delta=1e-5)), rel=1e-6)


def test_bookkeeping_refuses_a_layer_used_twice_in_one_pass():
    """A shared layer would be clipped wrongly (one input and one output gradient kept);
    bk mode must refuse it, and still train a model whose layers each run once."""
    from common.dp_grad_sample import BookkeepingPrivacyEngine, register

    register()

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    def private(model):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 4)), batch_size=8)
        gsm, _, _, _ = BookkeepingPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode="ghost")
        return gsm

    with pytest.raises(RuntimeError, match="fc is used twice"):
        private(Shared())(torch.randn(8, 4, requires_grad=True))
    once = private(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
                                       torch.nn.Linear(4, 4)))
    for _ in range(2):  # every pass starts afresh
        once(torch.randn(8, 4, requires_grad=True))
