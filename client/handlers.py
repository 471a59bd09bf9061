"""What a hospital's node does with each message: the ClientApp's handlers (``client.app``
routes each message here; ``client.mods`` guards every message first).

Replies carry model weights and aggregate numbers only; see ``tests/test_federation.py``.

Validation (``common.evaluation.external``) is imported by the handlers that compute it, not
with this module: a deployment runs each message in a process of its own, and a train
message or a query needs none of it. The statistics libraries (scipy.stats, scikit-learn,
statsmodels: 1.2 s to import) load only with the held-out site's statistics message;
internal validation and scoring need none of them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message

from client.node import open_site, prevalence
from common import protocol as wire
from common.config import RunConfig, parse
from common.data import patient_groups
from common.errors import MessageRejected
from common.evaluation.disclosure import merge_roc_cells
from common.file_names import safe_name
from common.labels import LABELS
from common.model import build_model
from common.privacy import BudgetExceeded, DPConfig, LedgerError, Spend
from common.records import from_record, to_record
from common.releases import LabelCounts, released_counts
from common.training import (
    DPPlan,
    TrainConfig,
    Validation,
    dp_dataset,
    local_train,
    validate,
)

if TYPE_CHECKING:  # validation's modules: imported by the handlers that compute statistics
    from common.evaluation.external import ScoreStore
    from common.evaluation.localisation import LocalisationOptions

log = logging.getLogger("flwr")


_WARM_UP: threading.Thread | None = None


def _warm_up() -> None:
    """Start importing, in a thread, what a training node's first train message would
    import on the critical path: ``torch._dynamo`` (torch.optim's ``Optimizer`` imports it
    at its first use; 1.6 s of a 2.2-s first local training here, then nothing). Started by
    a simulated training node's query: its process (a Ray actor) outlives the message and
    is otherwise idle while the server hears from the other nodes and probes the held-out
    ones. In a deployment each message has its own process, and nothing is started."""
    global _WARM_UP
    if _WARM_UP is None:
        _WARM_UP = threading.Thread(target=__import__, args=("torch._dynamo",),
                                    name="fedcxr-warm-up", daemon=True)
        _WARM_UP.start()


def _setup(context: Context, *, settled: bool = True):
    """The run config and this node's site. ``settled``: first wait for the warm-up import,
    so that no two threads import at once; only the query does not wait (it imports nothing
    that ``torch._dynamo`` does; under DP, where it reads the privacy ledger, no warm-up is
    started)."""
    if settled and _WARM_UP is not None:
        _WARM_UP.join()
    run = parse(RunConfig, dict(context.run_config), what="run config")
    site = open_site(context.node_config, run)
    if site.config.partition_id >= 0:
        # A virtual node uses the cores Ray gave it (`fedcxr simulate --cpus-per-site`), so
        # the machine's cores are not oversubscribed.
        torch.set_num_threads(int(os.environ.get("FEDCXR_SITE_THREADS", "1")))
    return run, site


def _model(record: ArrayRecord, norm: str):
    model = build_model(norm=norm)
    model.load_state_dict(from_record(record, model.state_dict()))
    return model


_EVAL_MODELS: dict[str, torch.nn.Module] = {}  # norm -> this process's model to evaluate


def _eval_model(record: ArrayRecord, norm: str):
    """A model to evaluate (validate, internal validation, scoring): built once per process
    and norm, every parameter and buffer then overwritten by ``record`` (a strict load).
    The ClientApp is re-created for every message but its process is not (a simulation's
    actor serves hundreds of one-model validation messages); building DenseNet-121, most
    of it random initialisation that the weights replace, was a large part of such a
    message's work at a site (``benchmarks/peers.py --sites 20`` prints the validation
    phase's time).
    Training builds its own model: Opacus wraps and hooks it."""
    model = _EVAL_MODELS.get(norm)
    if model is None:
        model = _EVAL_MODELS[norm] = build_model(norm=norm)
    model.load_state_dict(from_record(record, model.state_dict()))
    return model


def query(msg: Message, context: Context) -> Message:
    run, site = _setup(context, settled=False)
    splits = site.splits(run)
    labels = np.concatenate([ds.labels() for ds in splits.values()])
    prevalences = prevalence(labels)
    spent, left, delta, n_units, per_patient = -1.0, -1.0, -1.0, 0, 0
    counts_epsilon, withheld = -1.0, False
    private = run.dp and site.role == "train"
    if private:
        ledger = site.ledger(run.accountant)
        groups = patient_groups(splits["train"])
        n_units = len(groups) if run.privacy_unit == "patient" else len(splits["train"])
        per_patient = max(map(len, groups), default=0)
        delta = DPConfig(accountant=run.accountant).delta_for(n_units)
        annotated = np.array([p >= 0 for p in prevalences])  # the site's label schema
        if not site.config.release_exact_counts:
            try:  # prevalence from the run's noised label counts (training split)
                counts = label_counts(run, site, splits["train"], context.run_id)
                prevalences = counts.prevalence(annotated)
                counts_epsilon = counts.epsilon_alone or -1.0
            except (BudgetExceeded, LedgerError) as exc:
                log.warning("site %s: label counts withheld: %s", site.name, exc)
                prevalences = [0.0 if k else -1.0 for k in annotated]
                withheld = True
        try:
            spent = ledger.epsilon(delta)
            left = max(site.config.budget - spent, 0.0)
        except LedgerError as exc:  # reported here; every train message is refused
            log.warning("site %s: %s", site.name, exc)
            left = 0.0
    facts = wire.SiteFacts(
        role=site.role, site=site.name, format=site.source.format or "",
        n_train=len(splits["train"]), n_val=len(splits["val"]), n_test=len(splits["test"]),
        n_images=len(labels), prevalence=prevalences, epsilon_spent=spent,
        epsilon_left=left, max_epsilon=site.config.budget, delta=delta,
        privacy_unit=run.privacy_unit if run.dp else "", n_units=n_units,
        max_images_per_patient=per_patient, min_cell=site.config.min_cell,
        exact_counts=not private or site.config.release_exact_counts,
        counts_epsilon=counts_epsilon, prevalence_withheld=withheld)
    if site.role == "train" and site.config.partition_id >= 0 and not run.dp:
        _warm_up()
    return Message(facts.encode(), reply_to=msg)


def sends_roc_counts(run: RunConfig, site) -> bool:
    """Validation ROC counts are counts DP does not cover: under DP they leave only where
    the site's own config opts in (release-exact-counts = true)."""
    return not run.dp or site.config.release_exact_counts


def _counts_store(site, run_id: int) -> Path:
    return site.state_dir / "releases" / f"label-counts-run{run_id}.json"


def label_counts(run: RunConfig, site, train, run_id: int) -> LabelCounts:
    """The run's one noised release of the training split's label counts (made on first
    use, in the ledger; ``common.releases``); used only under DP."""
    n_units = len(dp_dataset(train, run.privacy_unit))
    return released_counts(
        train, privacy_unit=run.privacy_unit, ledger=site.ledger(run.accountant),
        store=_counts_store(site, run_id),
        delta=DPConfig(accountant=run.accountant).delta_for(n_units),
        max_epsilon=site.config.budget, noise_multiplier=run.count_noise_multiplier,
        run_id=str(run_id), n_units=n_units)


def summary(v: Validation, min_cell: int, send_counts: bool = True
            ) -> wire.ValidationSummary:
    """Aggregate validation of one model: per-label AUC and ROC counts (for pooled
    threshold choice), never per-image scores. Small-cell control: every released ROC bin
    holds at least ``min_cell`` images, and a label known on fewer images releases no
    counts and no AUC. ``send_counts`` False (DP without release-exact-counts): the counts
    are withheld (zeros, as for an unannotated label)."""
    counts = {lb: merge_roc_cells(*v.roc_counts[lb], min_cell) for lb in LABELS}
    auc = {lb: v.auc[lb] if counts[lb][0][0] + counts[lb][1][0] > 0 else None for lb in LABELS}
    if not send_counts:
        counts = {lb: (np.zeros_like(p), np.zeros_like(n)) for lb, (p, n) in counts.items()}
    known = [a for a in auc.values() if a is not None]
    return wire.ValidationSummary(
        n=v.n, mean_auc=float(np.mean(known)) if known else None,
        auc=[auc[lb] for lb in LABELS],
        pos_ge={lb: counts[lb][0].tolist() for lb in LABELS},
        neg_ge={lb: counts[lb][1].tolist() for lb in LABELS})


def _train_arm(run: RunConfig, site, splits, request: wire.TrainRequest, task: wire.ArmTask, *,
               mu: float, validate_first: bool = False, unit: str | None = None,
               pos_weight: np.ndarray | None = None
               ) -> tuple[wire.ArmResult, wire.ValidationSummary | None, wire.ValidationSummary]:
    rnd = request.server_round
    model = _model(task.arrays, request.norm)
    min_cell = site.config.min_cell
    counts = sends_roc_counts(run, site)
    device = site.device
    received = summary(validate(model, splits["val"], device=device), min_cell, counts) \
        if validate_first else None
    dp = _dp_plan(run, site, request, task, unit, pos_weight) if run.dp else None
    tc = replace(_train_config(run, task, mu), device=device)
    result = local_train(model, splits["train"], tc, dp=dp)
    val = validate(model, splits["val"], device=device)
    log.info("site %s arm %s round %d: %d images, loss %.4f, val AUC %s%s", site.name,
             task.arm, rnd, result.examples, result.loss,
             f"{val.mean_auc:.3f}" if val.mean_auc is not None else "n/a",
             f", ε {result.epsilon:.2f}" if result.epsilon is not None else "")
    # The trained model's validation with ROC counts: a single-site arm is selected (and its
    # thresholds fixed) from these, by the same rule as the federated arm.
    arm = wire.ArmResult(
        arm=task.arm, arrays=to_record(model.state_dict(), run.transport_dtype),
        examples=result.examples, loss=float(result.loss),
        epsilon=float(result.epsilon) if result.epsilon is not None else -1.0,
        val_mean_auc=val.mean_auc, val_auc=[val.auc[lb] for lb in LABELS])
    val_summary = summary(val, min_cell, counts)
    arm = replace(arm, val_mean_auc=val_summary.mean_auc, val_auc=val_summary.auc)
    return arm, received, val_summary


def _dp_plan(run: RunConfig, site, request: wire.TrainRequest, task: wire.ArmTask,
             unit: str | None = None, pos_weight: np.ndarray | None = None) -> DPPlan:
    return DPPlan(DPConfig(target_epsilon=run.target_epsilon, max_epsilon=site.config.budget,
                           max_grad_norm=run.max_grad_norm, accountant=run.accountant,
                           grad_sample_mode=run.grad_sample_mode),
                  site.ledger(run.accountant), run_id=request.run_name, arm=task.arm,
                  round=request.server_round, planned_units=request.planned_units,
                  privacy_unit=run.privacy_unit, unit=unit, pos_weight=pos_weight)


def _train_config(run: RunConfig, task: wire.ArmTask, mu: float) -> TrainConfig:
    return TrainConfig(epochs=run.local_epochs, batch_size=run.batch_size, lr=run.lr,
                       proximal_mu=mu, seed=task.seed)


def _planned(run: RunConfig, site, request: wire.TrainRequest, train):
    """The arms this message would train: (tasks, their DP plans, their planned units)."""
    tasks = [t for t in (request.first, request.single) if t is not None]
    plans = [_dp_plan(run, site, request, t) for t in tasks]
    planned = [p.planned(train, _train_config(run, t, 0.0))
               for t, p in zip(tasks, plans, strict=True)]
    return tasks, plans, planned


def check_message_budget(run: RunConfig, site, request: wire.TrainRequest, train,
                         run_id: int) -> None:
    """Before anything is released: the label-count release this run still needs (if any)
    and every arm of the message, against the site's budget together, so a budget that
    fits the counts but not the training spends nothing on either."""
    tasks, plans, planned = _planned(run, site, request, train)
    spends = [u.spend for u, _ in planned]
    if not _counts_store(site, run_id).exists():
        spends.append(Spend(1, 1.0, run.count_noise_multiplier))
    plans[0].ledger.check(spends, planned[0][1], site.config.budget,
                          f"round {request.server_round} ({', '.join(t.arm for t in tasks)}"
                          f"{', label counts' if len(spends) > len(tasks) else ''})")


def reserve_budget(run: RunConfig, site, request: wire.TrainRequest, train) -> dict[str, str]:
    """Every arm this message would train, checked against the site's budget at once and
    recorded as started, under the ledger's lock, before any trains: a budget that covers
    the federated arm but not both never spends ε on a reply that cannot leave
    (BudgetExceeded names what is left). Returns arm -> reserved ledger unit."""
    tasks, plans, planned = _planned(run, site, request, train)
    units = plans[0].ledger.reserve(
        [u for u, _ in planned], planned[0][1], site.config.budget,
        what=f"round {request.server_round} ({', '.join(t.arm for t in tasks)})",
        privacy_unit=run.privacy_unit, n=len(plans[0].dataset(train, 0)))
    return {t.arm: u for t, u in zip(tasks, units, strict=True)}


def release_unused(run: RunConfig, site, request: wire.TrainRequest, train,
                   reserved: dict[str, str], begun: set[str]) -> None:
    """Reserved units whose arm never began training (an earlier arm failed) are completed
    with no steps: the ledger then says what happened instead of charging them in full. An
    arm that began and failed keeps its ``started`` entry, which counts in full."""
    for task in (request.first, request.single):
        if task is not None and task.arm in reserved and task.arm not in begun:
            plan = _dp_plan(run, site, request, task)
            _, delta = plan.planned(train, _train_config(run, task, 0.0))
            plan.ledger.complete(reserved[task.arm], Spend(0, 1.0, 1.0), delta,
                                 run_id=request.run_name, arm=task.arm,
                                 round=request.server_round)


def train(msg: Message, context: Context) -> Message:
    """Train the arm sent; a message may also carry this site's single-site model: both
    arms of a round then share one message and one ClientApp process (in deployment each
    message starts a process), trained one after the other and reported separately."""
    began = time.monotonic()
    run, site = _setup(context)
    if site.config.requires_dp and not run.dp:
        # The site's own config decides: a budget set there means DP or nothing, whatever the
        # run config says. Refused before any data is read.
        log.warning("site %s: refused a train message without DP (node config max-epsilon=%g)",
                    site.name, site.config.max_epsilon)
        return wire.refuse(msg, wire.Refusal.DP_REQUIRED,
                           f"site {site.name} trains only under differential privacy (its node "
                           f"config sets max-epsilon={site.config.max_epsilon:g}); this run has "
                           "dp=false: run with dp=true")
    request = wire.TrainRequest.decode(msg.content)
    if run.dp:
        try:  # the ledger is verified whole before any data is read
            site.ledger(run.accountant).verify()
        except LedgerError as exc:
            log.warning("site %s: %s", site.name, exc)
            return wire.refuse(msg, wire.Refusal.LEDGER, str(exc))
    splits = site.splits(run)
    reserved: dict[str, str] = {}
    begun: set[str] = set()
    pos_weight = None
    try:
        if run.dp:
            check_message_budget(run, site, request, splits["train"], context.run_id)
            pos_weight = label_counts(run, site, splits["train"], context.run_id).pos_weight(
                TrainConfig().pos_weight_cap)
            reserved = reserve_budget(run, site, request, splits["train"])
        begun.add(request.first.arm)
        first, received, first_val = _train_arm(run, site, splits, request, request.first,
                                                mu=request.proximal_mu,
                                                validate_first=request.validate_received,
                                                unit=reserved.get(request.first.arm),
                                                pos_weight=pos_weight)
        if request.report_val:  # a single-site arm sent on its own
            first = replace(first, val=first_val)
        single = None
        if request.single is not None:
            begun.add(request.single.arm)
            single, _, single_val = _train_arm(run, site, splits, request, request.single,
                                               mu=0.0, unit=reserved.get(request.single.arm),
                                               pos_weight=pos_weight)
            single = replace(single, val=single_val)
    except BudgetExceeded as exc:
        log.warning("site %s: %s", site.name, exc)
        return wire.refuse(msg, wire.Refusal.BUDGET, str(exc))
    except LedgerError as exc:  # torn between the check above and now (another process)
        log.warning("site %s: %s", site.name, exc)
        return wire.refuse(msg, wire.Refusal.LEDGER, str(exc))
    finally:
        release_unused(run, site, request, splits["train"], reserved, begun)
    log.info("site %s round %s: train message handled in %.1f s", site.name,
             request.server_round, time.monotonic() - began)
    return Message(wire.TrainReply(site.name, first, single, received).encode(), reply_to=msg)


def validate_models(msg: Message, context: Context) -> Message:
    run, site = _setup(context)
    request = wire.ValidateRequest.decode(msg.content)
    val_ds = site.splits(run)["val"]
    return Message(wire.ValidateReply(site.name, {
        name: summary(validate(_eval_model(rec, request.norm), val_ds, device=site.device),
                      site.config.min_cell, sends_roc_counts(run, site))
        for name, rec in request.models.items()}).encode(), reply_to=msg)


def internal(msg: Message, context: Context) -> Message:
    """One selected model on this training site's own test split (the internal side of the
    internal-to-external drop): aggregate AUCs only, clustered by patient."""
    from common.evaluation.external import internal_validation, localise_site, score_dataset

    run, site = _setup(context)
    request = wire.InternalRequest.decode(msg.content)
    test = site.splits(run)["test"]
    model = _eval_model(request.arrays, request.norm)
    labels, scores = score_dataset(test, {request.name: model}, run.batch_size,
                                   device=site.device)
    result = internal_validation(labels, scores, test.cache.index.iloc[test.rows],
                                 site=site.name, primary=request.primary)
    options = _localisation(run, site, run_folder(site.state_dir / "internal",
                                                  request.run_name))
    if options is not None:  # boxes on the test split: localisation and shortcut reliance
        for key, rows in localise_site(test.cache, request.name, model, site=site.name,
                                       options=options, rows=test.rows).items():
            result.setdefault(key, []).extend(rows)
    write_baselines(site, request.run_name, run.image_size, test, labels, scores)
    log.info("site %s: internal validation of %s on %d test images", site.name, request.name,
             len(labels))
    return Message(wire.StatisticsReply(result).encode(), reply_to=msg)


def write_baselines(site, run_name: str, image_size: int, test, labels: np.ndarray,
                    scores: dict[str, np.ndarray]) -> Path:
    """Each model's monitoring baseline on this site's test split, kept on this site's disk
    (``<state>/baselines/<run>/<model>.json``; read by ``fedcxr site monitor``)."""
    from common.monitoring import make_baseline, with_acquired_size

    folder = run_folder(site.state_dir / "baselines", run_name)
    folder.mkdir(parents=True, exist_ok=True)
    images = np.asarray(test.cache.images[test.rows])
    meta = with_acquired_size(test.cache.index.iloc[test.rows])  # headers read once
    for name, s in scores.items():
        make_baseline(model=name, site=site.name, run_name=run_name, image_size=image_size,
                      scores=s, labels=labels, images=images, scale=float(test.cache.scale),
                      meta=meta).write(folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.json")
    return folder


def run_folder(parent: Path, run_name: str) -> Path:
    """The folder a run's name becomes under ``parent``: the name reduced to a safe character
    set (plus a hash of the original when that changed it, so two names never share a
    folder), and checked to stay inside ``parent`` whatever the coordinator sent."""
    folder = parent / safe_name(run_name)
    if not folder.resolve().is_relative_to(parent.resolve()):
        raise MessageRejected(f"run-name {run_name[:60]!r} leads outside the site's state folder")
    return folder


def _localisation(run: RunConfig, site, folder: Path) -> LocalisationOptions | None:
    """Grad-CAM against the site's boxes (H3), bounded by the run's gradcam-max-images;
    overlays under ``folder``/gradcam only when the site's own config asks."""
    from common.evaluation.localisation import LocalisationOptions

    if run.gradcam_max_images <= 0:
        return None
    return LocalisationOptions(max_images=run.gradcam_max_images,
                               min_cell=site.config.min_cell, device=site.device,
                               overlays=folder / "gradcam" if site.config.gradcam_overlays
                               else None)


def _external_store(site, run_name: str) -> ScoreStore:
    from common.evaluation.external import ScoreStore

    return ScoreStore(run_folder(site.state_dir / "external", run_name))


def score(msg: Message, context: Context) -> Message:
    """Score one model on the whole held-out site; its scores stay on this disk."""
    from common.evaluation.external import EvaluationOptions, score_into_store

    run, site = _setup(context)
    request = wire.ScoreRequest.decode(msg.content)
    store = _external_store(site, request.run_name)
    n = score_into_store(site.cache(run.image_size), request.name,
                         _eval_model(request.arrays, request.norm), store, site=site.name,
                         options=EvaluationOptions(
                             shift=run.shift, device=site.device,
                             min_cell=site.config.min_cell,
                             localisation=_localisation(run, site, store.directory)))
    log.info("site %s: scored %s on %d images (kept locally)", site.name, request.name, n)
    return Message(wire.ScoreReply(site.name, request.name, n).encode(), reply_to=msg)


def external(msg: Message, context: Context) -> Message:
    """Statistics over every scored model, at the thresholds sent: aggregate values only."""
    from common.evaluation.external import EvaluationOptions, evaluate_stored

    run, site = _setup(context)
    request = wire.ExternalRequest.decode(msg.content)
    cache = site.cache(run.image_size)
    options = EvaluationOptions(shift=run.shift, primary_labels=request.primary,
                                primary_pairs=request.primary_pairs,
                                min_cell=site.config.min_cell)
    result = evaluate_stored(cache, _external_store(site, request.run_name), request.models,
                             request.thresholds, site=site.name, options=options)
    result["fingerprint"] = cache.fingerprint
    log.info("site %s: external validation of %d models on %d images", site.name,
             len(request.models), result["n_images"])
    return Message(wire.StatisticsReply(result).encode(), reply_to=msg)
