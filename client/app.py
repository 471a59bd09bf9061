"""Flower ClientApp: what a hospital's node does with each message.

- ``query``: role (from the node's own config), site name, split sizes, label prevalence,
  privacy budget spent and left.
- ``train``: train the arm's weights on the local training split (DP + ledger when asked),
  return weights and aggregate metrics. Refused by ``role_mod`` on held-out nodes. With
  ``validate-received`` set, the global model received is first validated as it arrived
  (``val-received``: the previous round's global model, validated without a message of its
  own).
- ``evaluate``: ``purpose=validation`` on a training node returns per-label validation AUC
  and ROC counts (for threshold choice) of each model sent. On a held-out node,
  ``purpose=external-score`` scores the one model sent and keeps the scores on the site's
  own disk (``ScoreStore``); ``purpose=external`` then runs the shared external-validation
  evaluator over the stored scores of the models named, at the thresholds sent, and returns
  its aggregate statistics as JSON. One model per message keeps every message model-sized.

Replies carry model weights and aggregate numbers only; see ``tests/test_federation.py``.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.mods import fault_mod, reply_audit_mod, role_mod
from client.node import open_site, prevalence
from common.config import RunConfig, parse
from common.evaluation.external import (
    EvaluationOptions,
    ScoreStore,
    evaluate_stored,
    internal_validation,
    score_dataset,
    score_into_store,
)
from common.labels import LABELS
from common.model import build_model
from common.privacy import DPConfig
from common.records import from_record, to_record
from common.training import DPPlan, TrainConfig, Validation, local_train, validate

log = logging.getLogger("flwr")
app = ClientApp(mods=[reply_audit_mod, role_mod, fault_mod])


def _setup(context: Context):
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


@app.query()
def query(msg: Message, context: Context) -> Message:
    run, site = _setup(context)
    splits = site.splits(run)
    labels = np.concatenate([ds.labels() for ds in splits.values()])
    spent, left = -1.0, -1.0
    if run.dp and site.role == "train":
        ledger = site.ledger(run.accountant)
        delta = DPConfig(accountant=run.accountant).delta_for(len(splits["train"]))
        spent = ledger.epsilon(delta)
        left = max(site.config.max_epsilon - spent, 0.0)
    config = ConfigRecord({"role": site.role, "site": site.name,
                           "format": site.source.format or ""})
    metrics = MetricRecord({"n-train": len(splits["train"]), "n-val": len(splits["val"]),
                            "n-test": len(splits["test"]), "n-images": len(labels),
                            "prevalence": prevalence(labels), "epsilon-spent": spent,
                            "epsilon-left": left, "max-epsilon": site.config.max_epsilon})
    return Message(RecordDict({"site": config, "metrics": metrics}), reply_to=msg)


def _aucs(v: Validation) -> dict:
    """Mean and per-label validation AUC (-1: not estimable)."""
    return {"val-auc-mean": float(v.mean_auc) if v.mean_auc is not None else -1.0,
            "val-auc": [float(x) if x is not None else -1.0 for x in v.auc.values()]}


def validation_record(v: Validation) -> MetricRecord:
    """Aggregate validation of one model: per-label AUC and ROC counts (for pooled
    threshold choice), never per-image scores."""
    return MetricRecord({
        "num-examples": max(v.n, 1), **_aucs(v),
        **{f"pos-ge/{lb}": v.roc_counts[lb][0] for lb in LABELS},
        **{f"neg-ge/{lb}": v.roc_counts[lb][1] for lb in LABELS},
    })


def _train_arm(run: RunConfig, site, splits, record: ArrayRecord, cfg, *, arm: str, seed: int,
               mu: float, validate_first: bool = False
               ) -> tuple[ArrayRecord, MetricRecord, MetricRecord | None, MetricRecord]:
    rnd = int(cfg["server-round"])
    model = _model(record, str(cfg["norm"]))
    received = validation_record(validate(model, splits["val"])) if validate_first else None
    dp = None
    if run.dp:
        dp = DPPlan(DPConfig(target_epsilon=run.target_epsilon,
                             max_epsilon=site.config.max_epsilon,
                             max_grad_norm=run.max_grad_norm, accountant=run.accountant,
                             grad_sample_mode=run.grad_sample_mode),
                    site.ledger(run.accountant), run_id=str(cfg["run-name"]), arm=arm,
                    round=rnd, planned_units=int(cfg["planned-units"]))
    tc = TrainConfig(epochs=run.local_epochs, batch_size=run.batch_size, lr=run.lr,
                     proximal_mu=mu, seed=seed)
    result = local_train(model, splits["train"], tc, dp=dp)
    val = validate(model, splits["val"])
    log.info("site %s arm %s round %d: %d images, loss %.4f, val AUC %s%s", site.name, arm,
             rnd, result.examples, result.loss,
             f"{val.mean_auc:.3f}" if val.mean_auc is not None else "n/a",
             f", ε {result.epsilon:.2f}" if result.epsilon is not None else "")
    metrics = MetricRecord({
        "num-examples": max(result.examples, 1), "loss": float(result.loss),
        "epsilon": float(result.epsilon) if result.epsilon is not None else -1.0, **_aucs(val),
    })
    # The trained model's validation with ROC counts: a single-site arm is selected (and its
    # thresholds fixed) from these, by the same rule as the federated arm.
    return (to_record(model.state_dict(), run.transport_dtype), metrics, received,
            validation_record(val))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the arm sent (``arrays``); a message may also carry this site's single-site
    model (``single/arrays``): both arms of a round then share one message and one ClientApp
    process (in deployment each message starts a process), trained one after the other and
    reported separately."""
    began = time.monotonic()
    run, site = _setup(context)
    cfg = msg.content["config"]
    splits = site.splits(run)
    arm = str(cfg["arm"])
    meta = ConfigRecord({"arm": arm, "site": site.name})
    arrays, metrics, received, val = _train_arm(
        run, site, splits, msg.content["arrays"], cfg, arm=arm, seed=int(cfg["seed"]),
        mu=float(cfg.get("proximal-mu", 0.0)),
        validate_first=bool(cfg.get("validate-received", False)))
    reply = RecordDict({"arrays": arrays, "metrics": metrics, "meta": meta})
    if received is not None:
        reply["val-received"] = received
    if bool(cfg.get("report-val", False)):  # a single-site arm sent on its own
        reply["val"] = val
    if "single/arrays" in msg.content:
        single_arm = str(cfg["single-arm"])
        reply["single/arrays"], reply["single/metrics"], _, reply["single/val"] = _train_arm(
            run, site, splits, msg.content["single/arrays"], cfg, arm=single_arm,
            seed=int(cfg["single-seed"]), mu=0.0)
        meta["single-arm"] = single_arm
    log.info("site %s round %s: train message handled in %.1f s", site.name,
             cfg["server-round"], time.monotonic() - began)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    run, site = _setup(context)
    cfg = msg.content["config"]
    purpose = str(cfg["purpose"])
    names = [k.removeprefix("model/") for k in msg.content if k.startswith("model/")]
    norm = str(cfg["norm"])
    if purpose == "validation":
        if site.role != "train":
            raise RuntimeError("validation is done on training sites' validation splits only")
        val_ds = site.splits(run)["val"]
        out = RecordDict({"meta": ConfigRecord({"site": site.name})})
        for name in names:
            out[f"val/{name}"] = validation_record(
                validate(_model(msg.content[f"model/{name}"], norm), val_ds))
        return Message(out, reply_to=msg)
    if purpose == "internal":
        # The selected models on this training site's own test split (the internal side of
        # the internal-to-external drop): aggregate AUCs only, clustered by patient.
        if site.role != "train":
            raise RuntimeError("internal validation runs only at training sites")
        test = site.splits(run)["test"]
        models = {name: _model(msg.content[f"model/{name}"], norm) for name in names}
        labels, scores = score_dataset(test, models, run.batch_size)
        result = internal_validation(labels, scores, test.cache.index.iloc[test.rows],
                                     site=site.name, primary=json.loads(str(cfg["primary"])))
        log.info("site %s: internal validation of %d models on %d test images", site.name,
                 len(models), len(labels))
        return Message(RecordDict({"results": ConfigRecord({"json": json.dumps(result)})}),
                       reply_to=msg)
    if purpose not in ("external-score", "external"):
        raise RuntimeError(f"unknown evaluate purpose {purpose!r}")
    if site.role != "evaluate":
        raise RuntimeError("external validation runs only at held-out (evaluate) sites")
    cache = site.cache(run.image_size)
    store = ScoreStore(site.state_dir / "external" / str(cfg["run-name"]))
    options = EvaluationOptions(shift=run.shift,
                                primary_labels=json.loads(str(cfg.get("primary", "null"))),
                                primary_against=json.loads(str(cfg.get("primary-against",
                                                                       "null"))))
    if purpose == "external-score":  # one model per message; its scores stay on this disk
        (name,) = names
        n = score_into_store(cache, name, _model(msg.content[f"model/{name}"], norm), store,
                             site=site.name, options=options)
        log.info("site %s: scored %s on %d images (kept locally)", site.name, name, n)
        return Message(RecordDict({"meta": ConfigRecord({"site": site.name, "model": name}),
                                   "metrics": MetricRecord({"n-images": n})}), reply_to=msg)
    # Statistics over every scored model, at the thresholds sent: aggregate values only.
    thresholds = json.loads(str(cfg["thresholds"]))
    models = json.loads(str(cfg["models"]))
    result = evaluate_stored(cache, store, models, thresholds, site=site.name, options=options)
    result["fingerprint"] = cache.fingerprint
    log.info("site %s: external validation of %d models on %d images", site.name,
             len(models), result["n_images"])
    return Message(RecordDict({"results": ConfigRecord({"json": json.dumps(result)})}),
                   reply_to=msg)
