"""Local training at one site: masked multi-label BCE, class re-weighting, Adam, FedProx,
gradient clipping, optional DP-SGD (Opacus), and validation AUC after training.

Loss: for each image, the mean BCE over its *known* labels (NaN targets are masked per
element), then the mean over the batch. The per-image normaliser keeps each image's loss a
function of that image alone, which DP-SGD's per-sample clipping assumes.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import CachedImages, PatientImages, augment_batch, make_loader
from common.evaluation.delong import NotEstimable, delong_components
from common.evaluation.metrics import roc_counts
from common.labels import LABELS
from common.model import predict
from common.privacy import DPConfig, PlannedUnit, PrivacyLedger, Spend, noise_for_target

log = logging.getLogger(__name__)

# Opacus' reminders are for production keys, not per-round noise: say it once in the docs.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    pos_weight_cap: float = 10.0
    proximal_mu: float = 0.0
    clip_norm: float = 5.0
    seed: int = 0
    augment: bool = True
    max_steps: int | None = None  # cap per call (tests, smoke runs)
    device: str = "cpu"  # a torch device (common.model.resolve_device turns "auto" into one)


@dataclass
class DPPlan:
    """DP for one call of local_train: the site's ledger, and how this unit is labelled."""

    config: DPConfig
    ledger: PrivacyLedger
    run_id: str = "local"
    arm: str = "local"
    round: int = 0
    planned_units: int = 1  # units the target ε is spread over (rounds x arms)
    # "patient": the sampler draws patients and each adds one clipped gradient (one of its
    # images); "image": images are the unit (a patient with k images gets k x ε, roughly).
    privacy_unit: str = "patient"
    unit: str | None = None  # already reserved in the ledger (a message's arms, together)
    # Class weights from the run's noised label counts (``common.releases``); None: no
    # re-weighting. Never from the exact training labels: that would make each image's
    # clipped gradient depend on every other image's label.
    pos_weight: np.ndarray | None = None

    def dataset(self, train: CachedImages, seed: int) -> CachedImages | PatientImages:
        return dp_dataset(train, self.privacy_unit, seed)

    def planned(self, train: CachedImages, config: TrainConfig) -> tuple[PlannedUnit, float]:
        """This unit as the ledger will record it, and its δ."""
        spend, delta = planned_spend(len(self.dataset(train, config.seed)), config, self)
        return PlannedUnit(spend, self.arm, self.round, self.run_id), delta


@dataclass
class TrainResult:
    examples: int
    steps: int
    loss: float
    epoch_losses: list[float] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    seconds: float = 0.0
    setup_seconds: float = 0.0  # before the first step (DP: noise calibration, ledger check)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor,
               pos_weight: torch.Tensor | None = None, *, per_image: bool = False
               ) -> torch.Tensor:
    """Mean over images of each image's mean BCE over its known labels (``per_image``:
    the (B,) vector before that mean, which ghost clipping needs)."""
    known = ~torch.isnan(targets)
    safe = torch.where(known, targets, torch.zeros_like(targets))
    per = F.binary_cross_entropy_with_logits(logits, safe, pos_weight=pos_weight,
                                             reduction="none")
    per = per * known
    losses = per.sum(dim=1) / known.sum(dim=1).clamp(min=1)
    return losses if per_image else losses.mean()


def pos_weight_from(labels: np.ndarray, cap: float = 10.0) -> torch.Tensor:
    """negatives / positives per label, capped; 1 where a label has no positives."""
    pos = np.nansum(labels == 1, axis=0).astype(float)
    neg = np.nansum(labels == 0, axis=0).astype(float)
    w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(w, 1.0, cap), dtype=torch.float32)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _proximal(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))


def dp_dataset(train: CachedImages, privacy_unit: str, seed: int = 0
               ) -> CachedImages | PatientImages:
    """What DP-SGD samples from: the images, or the patients (its length is the n of δ and
    of the sample rate)."""
    return PatientImages(train, seed) if privacy_unit == "patient" else train


def planned_spend(n_units: int, config: TrainConfig, dp: DPPlan) -> tuple[Spend, float]:
    """What one ``local_train`` call over ``n_units`` privacy units (images or patients) will
    record in the ledger (steps, sample rate, the noise that spends this unit's share of the
    target ε) and its δ: so a message that trains several arms can be checked against the
    budget as a whole, before any of them trains. The sample rate is the one Opacus' Poisson
    sampler uses, 1 / (batches per epoch), not B / n."""
    if n_units == 0:
        raise ValueError("no training images")
    delta = dp.config.delta_for(n_units)
    per_epoch = max(math.ceil(n_units / config.batch_size), 1)
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    sample_rate = 1.0 / per_epoch
    noise = noise_for_target(dp.config.target_epsilon, delta, sample_rate,
                             total * dp.planned_units, dp.config.accountant)
    return Spend(total, sample_rate, noise), delta


def local_train(
    model: nn.Module,
    train: CachedImages,
    config: TrainConfig,
    *,
    dp: DPPlan | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train``; with ``dp``, under DP-SGD and the site ledger.

    Under DP the ledger is checked *before* training (BudgetExceeded if this unit would pass
    max-epsilon) and written before returning.
    """
    seed_everything(config.seed)
    start = time.perf_counter()
    device = torch.device(config.device)
    model.to(device)  # in place; moved back to the CPU (where weights are read) at the end
    model.train()  # whatever ran before (a validation) left; Opacus refuses eval mode
    if dp is None:
        pos_weight = pos_weight_from(train.labels(), config.pos_weight_cap)
    else:
        pos_weight = torch.ones(len(LABELS)) if dp.pos_weight is None else \
            torch.as_tensor(dp.pos_weight, dtype=torch.float32)
    pos_weight = pos_weight.to(device)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    data = dp.dataset(train, config.seed) if dp is not None else train
    loader = make_loader(data, config.batch_size, shuffle=True, seed=config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = max(len(loader), 1)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    engine = unit = None
    net = model
    mode = None
    if dp is not None:
        from opacus import PrivacyEngine
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        from common.dp_grad_sample import (
            BookkeepingPrivacyEngine,
            clipped_backward,
            covers,
            register,
        )

        register()
        mode = dp.config.grad_sample_mode
        if mode == "bk" and (layer := covers(model)) is not None:
            log.warning("book-keeping clipping does not cover layer %s; using Opacus' "
                        "two-pass ghost clipping", layer)
            mode = "ghost"
        planned, delta = planned_spend(len(data), config, dp)  # data: what DP-SGD samples
        noise = planned.noise_multiplier
        unit = dp.unit or dp.ledger.reserve(
            [PlannedUnit(planned, dp.arm, dp.round, dp.run_id)], delta, dp.config.max_epsilon,
            what=f"arm {dp.arm} round {dp.round}",
            privacy_unit=dp.privacy_unit, n=len(data))[0]
        engine = (BookkeepingPrivacyEngine if mode == "bk" else PrivacyEngine)(
            accountant=dp.config.accountant)
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
            max_grad_norm=dp.config.max_grad_norm, poisson_sampling=True,
            grad_sample_mode="ghost" if mode == "bk" else mode,
            noise_generator=torch.Generator(device=device).manual_seed(config.seed + 2),
        )
        if mode in ("ghost", "bk"):  # Opacus' fast-gradient-clipping objects (+ criterion)
            net, optimizer, _, loader = private
        else:
            net, optimizer, loader = private
        if not math.isclose(loader.sample_rate, planned.sample_rate):
            raise RuntimeError(f"the ledger would record sample rate {planned.sample_rate} but "
                               f"Opacus' sampler uses {loader.sample_rate}")
    setup_seconds = time.perf_counter() - start
    step, examples, epoch_losses = 0, 0, []
    for epoch in range(config.epochs):
        running, batches = 0.0, 0
        for x, y in loader:
            if step >= total:
                break
            if len(x) == 0:  # Poisson sampling can draw an empty batch: noise only
                if dp is not None:
                    noise_only_step(optimizer, mode)
                step += 1
                if progress:
                    progress(step, total)
                continue
            if config.augment:
                x = augment_batch(x, aug_gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if mode == "bk":
                # One backward: per-image norms and the clipped gradient sum (book-keeping).
                x.requires_grad_(True)
                per_image = masked_bce(net(x), y, pos_weight, per_image=True)
                clipped_backward(net, per_image, x)
                loss = per_image.detach().mean()
            elif mode == "ghost":
                # Opacus' two-pass ghost clipping: the first backward only measures each
                # image's gradient norm, the second backpropagates the clipped losses.
                loss = DPTensorFastGradientClipping(
                    net, optimizer, masked_bce(net(x), y, pos_weight, per_image=True), "mean")
                loss.backward()
            else:  # no DP, or Opacus' per-sample gradients (hooks)
                loss = masked_bce(net(x), y, pos_weight)
                if anchor is not None and dp is None:
                    loss = loss + config.proximal_mu / 2 * _proximal(model, anchor)
                loss.backward()
            if dp is None and config.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            if anchor is not None and dp is not None:
                # FedProx under DP: the proximal pull uses only public weights, so it is
                # applied after the private step (post-processing, no privacy cost).
                with torch.no_grad():
                    for p, a in zip(model.parameters(), anchor, strict=True):
                        p -= config.lr * config.proximal_mu * (p - a)
            running += loss.item()
            batches += 1
            examples += len(x)
            step += 1
            if progress:
                progress(step, total)
        epoch_losses.append(running / max(batches, 1))
        log.info("epoch %d/%d: loss %.4f, %d images, %.1f s", epoch + 1, config.epochs,
                 epoch_losses[-1], examples, time.perf_counter() - start)
        if step >= total:
            break
    result = TrainResult(examples=examples, steps=step,
                         loss=epoch_losses[-1] if epoch_losses else math.nan,
                         epoch_losses=epoch_losses, seconds=time.perf_counter() - start,
                         setup_seconds=setup_seconds)
    if dp is not None:
        done = Spend(step, planned.sample_rate, planned.noise_multiplier)
        result.epsilon = dp.ledger.complete(unit, done, delta, run_id=dp.run_id, arm=dp.arm,
                                            round=dp.round)
        result.delta, result.noise_multiplier = delta, planned.noise_multiplier
        if hasattr(net, "_close"):
            net._close()  # remove Opacus hooks; `model` is trained in place
    model.to("cpu")
    return result


def noise_only_step(optimizer, mode: str | None) -> None:
    """A DP step on an empty Poisson batch: the sum of no clipped gradients is zero, and the
    mechanism the accountant counts still adds its noise and takes the step (skipping it
    would be a different mechanism from the one accounted)."""
    for p in optimizer.params:
        if mode in ("ghost", "bk"):
            p.grad = torch.zeros_like(p)
        else:  # Opacus' hooks optimizer clips per-sample gradients: there are none
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    optimizer.step()


@dataclass
class Validation:
    auc: dict[str, float | None]
    mean_auc: float | None
    n: int
    roc_counts: dict[str, tuple[list[int], list[int]]]  # for pooled threshold choice


def validate(model: nn.Module, val: CachedImages, batch_size: int = 64,
             device: str = "cpu") -> Validation:
    """Per-label AUC on the local validation split, plus ROC counts (aggregate only)."""
    probs, labels = predict(model.to(device), make_loader(val, batch_size, shuffle=False),
                            device=device)
    model.to("cpu")
    probs, labels = probs.numpy(), labels.numpy()
    aucs: dict[str, float | None] = {}
    counts = {}
    for k, name in enumerate(LABELS):
        try:
            a, _, _, _ = delong_components(labels[:, k], probs[:, k])
            aucs[name] = float(a[0])
        except NotEstimable:
            aucs[name] = None
        pos, neg = roc_counts(labels[:, k], probs[:, k])
        counts[name] = (pos.tolist(), neg.tolist())
    known = [v for v in aucs.values() if v is not None]
    return Validation(aucs, float(np.mean(known)) if known else None, len(val), counts)
