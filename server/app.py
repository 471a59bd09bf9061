"""Flower ServerApp: the H1 experiment protocol, phase by phase.

1. Discover: query every node for its role (from the node's own config), site, split sizes,
   prevalence and privacy budget.
2. Train, interleaved: each round every training site trains the global model (federated arm)
   and its own single-site model (baseline arm), same epochs, same seeds. Federated updates
   are screened, then aggregated by a Flower strategy. Each global model is validated at
   every training site; the best one by mean validation AUC is kept. Checkpoint every round.
   The global model of round r is validated by the train message of round r + 1, before the
   site trains it (and the last one in step 3): a round is one exchange with each site.
3. Fix operating points on training-site validation data (ROC counts, never per-image scores).
4. External validation: every held-out node receives every model, one per message, keeps
   its scores on its own disk, then receives the thresholds and returns aggregate
   statistics of all models (paired tests included).
5. Verdict (Holm-corrected) and report: runs/<run-name>/results.json, report.html.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, as_flower, label_list, model_specs, parse
from common.errors import ConfigError
from common.evaluation.external import combine_sites
from common.evaluation.metrics import choose_threshold
from common.evaluation.report import build_results, write_report
from common.evaluation.verdict import Protocol
from common.labels import LABELS
from common.model import build_model, load_checkpoint
from common.records import pack, record_arrays, to_record, unpack
from server import checkpoint
from server.exchange import send, stream_replies
from server.strategy import TrainNodesGrid, make_strategy, restore_strategy_state, strategy_state
from server.updates import UpdateStore

log = logging.getLogger("flwr")
app = ServerApp()
FEDERATED = "federated"


def single(site: str) -> str:
    return f"single:{site}"


@dataclass
class Node:
    node_id: int
    role: str
    site: str
    n_train: int
    n_images: int
    prevalence: list[float]
    format: str
    epsilon_left: float
    max_epsilon: float


@dataclass
class RunState:
    round: int = 0
    arms: dict[str, dict] = field(default_factory=dict)  # name -> state dict (numpy)
    # arm -> its selected model so far (selection rule of the run config): round,
    # mean_val_auc, pos, neg (pooled validation ROC counts, for thresholds), sites, weights
    selected: dict[str, dict] = field(default_factory=dict)
    strategy: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)


def _msg(records: dict, node: int, kind: str, rnd: int) -> Message:
    return Message(RecordDict(records), dst_node_id=node, message_type=kind, group_id=str(rnd))


def discover(grid: Grid, run: RunConfig) -> dict[int, Node]:
    ids = list(grid.get_node_ids())
    replies = send(grid, [_msg({"config": ConfigRecord({"purpose": "query"})}, n,
                                MessageType.QUERY, 0) for n in ids], run.round_timeout)
    nodes = {}
    for r in replies:
        if r.has_error():
            log.warning("discover: node %d failed: %s", r.metadata.src_node_id, r.error.reason)
            continue
        s, m = r.content["site"], r.content["metrics"]
        nodes[r.metadata.src_node_id] = Node(
            r.metadata.src_node_id, str(s["role"]), str(s["site"]), int(m["n-train"]),
            int(m["n-images"]), list(m["prevalence"]), str(s["format"]),
            float(m["epsilon-left"]), float(m["max-epsilon"]))
    for n in sorted(nodes.values(), key=lambda n: n.site):
        log.info("discover: %s role=%s images=%d train=%d", n.site, n.role, n.n_images,
                 n.n_train)
    return nodes


def probe_roles(grid: Grid, run: RunConfig, nodes: dict[int, Node]) -> list[dict]:
    """Send every held-out node a train message with no model: it must refuse by its own
    config. Proof in every run that held-out data cannot be trained on."""
    held = [n for n, v in nodes.items() if v.role == "evaluate"]
    msgs = [_msg({"config": ConfigRecord({"arm": "role-probe", "server-round": 0})}, n,
                 MessageType.TRAIN, 0) for n in held]
    out = []
    for r in send(grid, msgs, run.round_timeout):
        node = nodes[r.metadata.src_node_id]
        reason = r.error.reason if r.has_error() else "accepted a train message"
        refused = r.has_error() and "never trains" in reason
        out.append({"site": node.site, "refused": refused, "reason": reason[-300:]})
        (log.info if refused else log.error)("role probe: held-out %s %s", node.site,
                                            "refused to train" if refused else reason)
    return out


def _seed(run: RunConfig, rnd: int, arm: str) -> int:
    return (run.seed * 1_000_003 + rnd * 1009 + sum(map(ord, arm))) % 2**31


def _weights(state_dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state_dict.items()}


def _record(weights: dict[str, np.ndarray], run: RunConfig) -> ArrayRecord:
    return to_record(weights, run.transport_dtype)


def train_round(grid: Grid, run: RunConfig, rnd: int, nodes: dict[int, Node], st: RunState,
                strategy, run_name: str, run_dir: Path) -> None:
    started = time.monotonic()
    train_ids = sorted(n for n, node in nodes.items() if node.role == "train")
    sites = {n: nodes[n].site for n in train_ids}
    planned = run.num_rounds * 2  # federated + single-site arm both spend each round
    base = {"norm": run.norm, "run-name": run_name, "planned-units": planned}
    # Federated arm: the strategy configures its messages (on training nodes only).
    fed_msgs = list(strategy.configure_train(
        rnd, _record(st.arms[FEDERATED], run),
        ConfigRecord({**base, "arm": FEDERATED, "seed": _seed(run, rnd, FEDERATED),
                      "validate-received": rnd > 1}),
        TrainNodesGrid(grid, train_ids)))
    # Both arms of a site share one message (one ClientApp process per site and round).
    # New messages: the strategy's share one RecordDict between all nodes.
    fed_msgs = [_msg({"arrays": m.content["arrays"],
                      "config": ConfigRecord({**dict(m.content["config"]),
                                              "single-arm": single(sites[n]),
                                              "single-seed": _seed(run, rnd, "single")}),
                      "single/arrays": _record(st.arms[single(sites[n])], run)},
                     n, MessageType.TRAIN, rnd)
                for m in fed_msgs for n in [m.metadata.dst_node_id]]
    paired = {m.metadata.dst_node_id for m in fed_msgs}
    single_msgs = [_msg({"arrays": _record(st.arms[single(sites[n])], run),
                         "config": ConfigRecord({**base, "arm": single(sites[n]),
                                                 "server-round": rnd, "report-val": True,
                                                 "seed": _seed(run, rnd, "single")})},
                        n, MessageType.TRAIN, rnd) for n in train_ids if n not in paired]
    # Replies are taken one at a time: a federated update is checked, measured and spilled
    # to the coordinator's disk (UpdateStore) and dropped before the next one is pulled.
    store = UpdateStore(run_dir / "updates" / f"round-{rnd:03d}", pack(st.arms[FEDERATED]),
                        round=rnd, sites=sites)
    answered: dict[str, set[int]] = {FEDERATED: set()}
    errors: dict[int, str] = {}
    fed_metrics: dict[int, dict] = {}
    previous = _pooled()  # validation of the global model sent (round rnd - 1's)

    def take_arm(r: Message, arm: str, part: str) -> None:
        node = r.metadata.src_node_id
        answered.setdefault(arm, set()).add(node)
        m = r.content[f"{part}metrics"]
        metrics = {"loss": float(m["loss"]), "epsilon": float(m["epsilon"])}
        if metrics["epsilon"] >= 0 and node in sites:
            st.epsilon[sites[node]] = max(st.epsilon.get(sites[node], 0.0), metrics["epsilon"])
        if arm == FEDERATED:
            fed_metrics[node] = metrics
            store.add(r)
            return
        # Single-site arm: the site's own model, never averaged, validated at its own site
        # and selected by the same rule as the federated arm.
        st.arms[arm] = dict(unpack(record_arrays(r.content[f"{part}arrays"]), st.arms[arm]))
        _record_history(st, rnd, arm, [metrics], mean_val=float(m["val-auc-mean"]))
        own = _pooled()
        _pool(own, r.content[f"{part}val"], sites[node])
        _consider(st, arm, rnd, _finish(own), st.arms[arm], run.selection)

    def take(r: Message) -> None:
        if r.has_error():
            errors.setdefault(r.metadata.src_node_id, r.error.reason)
            return
        meta = r.content["meta"]
        if "val-received" in r.content:
            _pool(previous, r.content["val-received"], sites.get(r.metadata.src_node_id, "?"))
        take_arm(r, str(meta["arm"]), "")
        if "single-arm" in meta:
            take_arm(r, str(meta["single-arm"]), "single/")

    try:
        for reply in stream_replies(grid, fed_msgs + single_msgs, run.round_timeout):
            take(reply)
            del reply
        replied = time.monotonic()
        if rnd > 1:  # before aggregation replaces it: st.arms[FEDERATED] is what was sent
            _validated(st, rnd - 1, _finish(previous), st.arms[FEDERATED], run.selection)
        # Failures: every (arm, node) that was asked and did not answer with a result.
        for n in train_ids:
            for arm in (FEDERATED, single(sites[n])):
                if n not in answered.get(arm, set()):
                    reason = errors.get(n, "no reply before timeout")
                    st.failures.append({"round": rnd, "arm": arm, "site": sites[n], "node": n,
                                        "reason": reason})
                    log.warning("round %d: %s at %s failed: %s", rnd, arm, sites[n], reason)
        # Federated arm: screen, then aggregate with the Flower strategy.
        kept = store.screen(run.screen_norm_factor)
        st.rejections += [r.__dict__ for r in store.rejected]
        if len(kept) >= max(run.min_train_sites, 1):
            new = store.aggregate(strategy)
            if new is not None:
                st.arms[FEDERATED] = dict(unpack(new, st.arms[FEDERATED]))
        else:
            log.warning("round %d: only %d accepted federated updates (< min-train-sites %d); "
                        "global model unchanged", rnd, len(kept), run.min_train_sites)
    finally:
        store.close()
    # This round's global model is validated by the next round's train message.
    _record_history(st, rnd, FEDERATED, [fed_metrics[u.node] for u in kept], mean_val=None,
                    answered=0)
    prev = (f"; round {rnd - 1} global: mean val AUC {_auc(previous['mean'])} at "
            f"{len(previous['sites'])} sites" if rnd > 1 else "")
    log.info("round %d: federated %d/%d sites, rejected %d%s; eps %s; %.1f s (replies %.1f s)",
             rnd, len(kept), len(train_ids), len(store.rejected), prev,
             {k: round(v, 2) for k, v in st.epsilon.items()} or "n/a",
             time.monotonic() - started, replied - started)


def _upgrade(state: dict) -> dict:
    """A checkpoint written before every arm had a selected model kept only the best global
    model (``best``); it is the federated arm's selection."""
    state = dict(state)
    best = state.pop("best", None)
    if best is not None and "selected" not in state:
        state["selected"] = {FEDERATED: best} if best else {}
    return state


def _federated_row(st: RunState, rnd: int) -> dict:
    return next(h for h in st.history if h["round"] == rnd and h["arm"] == FEDERATED)


def _auc(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


def _validated(st: RunState, rnd: int, val: dict, weights: dict[str, np.ndarray],
               rule: str) -> None:
    """Round ``rnd``'s global model (``weights``) was validated: fill its history row and
    consider it for selection."""
    row = _federated_row(st, rnd)
    row["val_auc"], row["sites_answered"] = val["mean"], len(val["sites"])
    _consider(st, FEDERATED, rnd, val, weights, rule)


def _consider(st: RunState, arm: str, rnd: int, val: dict, weights: dict[str, np.ndarray],
              rule: str) -> None:
    """One selection rule for every arm: keep round ``rnd``'s model of ``arm``, with its
    pooled validation ROC counts (for thresholds), when it is the last (``last``) or has the
    best validation AUC so far (``best-val``; the earliest round wins a tie). The federated
    arm is validated at every training site, a single-site arm at its own site."""
    current = st.selected.get(arm)
    mean = val["mean"]
    better = mean is not None and (current is None or current["mean_val_auc"] is None
                                   or mean > current["mean_val_auc"])
    if rule == "last" or better:
        st.selected[arm] = {"round": rnd, "mean_val_auc": mean, "pos": val["pos"],
                            "neg": val["neg"], "sites": list(val["sites"]),
                            "weights": {k: v.copy() for k, v in weights.items()}}


def _record_history(st: RunState, rnd: int, arm: str, metrics: list[dict], *,
                    mean_val: float | None, answered: int | None = None) -> None:
    losses = [m["loss"] for m in metrics]
    eps = [m["epsilon"] for m in metrics if m["epsilon"] >= 0]
    st.history.append({"round": rnd, "arm": arm,
                       "sites_answered": answered if answered is not None else len(metrics),
                       "loss": float(np.mean(losses)) if losses else None,
                       "val_auc": mean_val if mean_val is not None and mean_val >= 0 else None,
                       "epsilon": max(eps) if eps else None})


def validate_models(grid: Grid, run: RunConfig, rnd: int, models: dict[str, dict],
                    targets: dict[str, list[int]], norm: str) -> dict[str, dict]:
    """Validation AUC and pooled ROC counts of each model over its target training nodes."""
    per_node: dict[int, list[str]] = {}
    for name, ids in targets.items():
        for n in ids:
            per_node.setdefault(n, []).append(name)
    msgs = [_msg({**{f"model/{name}": _record(models[name], run) for name in names},
                  "config": ConfigRecord({"purpose": "validation", "norm": norm})},
                 n, MessageType.EVALUATE, rnd) for n, names in per_node.items()]
    out = {name: _pooled() for name in models}
    for r in send(grid, msgs, run.round_timeout):
        if r.has_error():
            log.warning("validation at node %d failed: %s", r.metadata.src_node_id,
                        r.error.reason)
            continue
        for key, rec in r.content.items():
            if key.startswith("val/"):
                _pool(out[key.removeprefix("val/")], rec, str(r.content["meta"]["site"]))
    return {name: _finish(o) for name, o in out.items()}


def _pooled() -> dict:
    return {"sites": [], "aucs": [], "pos": None, "neg": None, "mean": None}


def _pool(o: dict, rec, site: str) -> None:
    """Add one site's validation of a model (a ``validation_record``) to ``o``."""
    o["sites"].append(site)
    if float(rec["val-auc-mean"]) >= 0:
        o["aucs"].append(float(rec["val-auc-mean"]))
    pos = np.array([rec[f"pos-ge/{lb}"] for lb in LABELS], dtype=np.int64)
    neg = np.array([rec[f"neg-ge/{lb}"] for lb in LABELS], dtype=np.int64)
    o["pos"] = pos if o["pos"] is None else o["pos"] + pos
    o["neg"] = neg if o["neg"] is None else o["neg"] + neg


def _finish(o: dict) -> dict:
    o["mean"] = float(np.mean(o["aucs"])) if o["aucs"] else None
    return o


def fix_thresholds(run: RunConfig, val: dict[str, dict]) -> dict[str, dict[str, float]]:
    out = {}
    for name, o in val.items():
        out[name] = {}
        if o["pos"] is None:
            continue
        for k, lb in enumerate(LABELS):
            if o["pos"][k][0] > 0 and o["neg"][k][0] > 0:
                out[name][lb] = choose_threshold(o["pos"][k], o["neg"][k], run.threshold_method,
                                                 run.threshold_target)
    return out


def internal_validation(grid: Grid, run: RunConfig, final: dict[str, dict],
                        train_nodes: dict[int, Node], primary: list[str]) -> dict:
    """Every training site evaluates every selected model on its own test split, one model
    per message (aggregate AUCs only): the internal side of the internal-to-external drop."""
    rnd = run.num_rounds + 2
    results: dict[int, dict] = {}
    for name, weights in final.items():
        msgs = [_msg({f"model/{name}": _record(weights, run),
                      "config": ConfigRecord({"purpose": "internal", "norm": run.norm,
                                              "primary": json.dumps(primary)})},
                     n, MessageType.EVALUATE, rnd) for n in train_nodes]
        for r in send(grid, msgs, run.round_timeout):
            node = r.metadata.src_node_id
            if r.has_error():
                log.warning("internal validation of %s at %s failed: %s", name,
                            train_nodes[node].site if node in train_nodes else node,
                            r.error.reason)
                continue
            part = json.loads(str(r.content["results"]["json"]))
            if node in results:
                for key in ("internal", "internal_primary"):
                    results[node][key] += part[key]
            else:
                results[node] = part
    return combine_sites(list(results.values()))


def external_validation(grid: Grid, run: RunConfig, run_name: str, final: dict[str, dict],
                        norms: dict[str, str], thresholds: dict, held_out: dict[int, Node],
                        primary: list[str], primary_against: list[str]) -> list[dict]:
    """Every held-out node scores every model (one per message, scores kept at the site),
    then returns the statistics of all: per-label (secondary) and the primary endpoint."""
    rnd = run.num_rounds + 3
    base = {"run-name": run_name, "norm": run.norm}
    scored: dict[int, set[str]] = {n: set() for n in held_out}
    for name, weights in final.items():
        msgs = [_msg({f"model/{name}": _record(weights, run),
                      "config": ConfigRecord({**base, "purpose": "external-score",
                                              "norm": norms[name]})},
                     n, MessageType.EVALUATE, rnd) for n in held_out]
        for r in send(grid, msgs, run.round_timeout):
            node = r.metadata.src_node_id
            if r.has_error():
                log.warning("external scoring of %s at %s failed: %s", name,
                            held_out[node].site if node in held_out else node, r.error.reason)
            elif node in scored:
                scored[node].add(name)
    msgs = [_msg({"config": ConfigRecord({**base, "purpose": "external",
                                          "models": json.dumps(list(final)),
                                          "thresholds": json.dumps(thresholds),
                                          "primary": json.dumps(primary),
                                          "primary-against": json.dumps(primary_against)})},
                 n, MessageType.EVALUATE, rnd) for n, names in scored.items()
            if names == set(final)]
    out = []
    for r in send(grid, msgs, run.round_timeout):
        if r.has_error():
            log.warning("external validation at node %d failed: %s", r.metadata.src_node_id,
                        r.error.reason)
            continue
        out.append(json.loads(str(r.content["results"]["json"])))
    return out


def resolve_primary_labels(run: RunConfig, train_nodes: dict[int, Node]) -> list[str]:
    """The primary endpoint's labels, fixed before training: those the run config names, or
    by default every label annotated at every training site. A named label that some
    training site does not annotate is an error now, not after training."""
    annotated = [lb for k, lb in enumerate(LABELS)
                 if all(v.prevalence[k] >= 0 for v in train_nodes.values())]
    asked = label_list(run.primary_labels, key="primary-labels")
    missing = [lb for lb in asked if lb not in annotated]
    if missing:
        raise ConfigError(f"run config primary-labels: {', '.join(missing)} not annotated at "
                          "every training site (a single-site model would be untrained on it);"
                          f" annotated everywhere: {', '.join(annotated) or 'none'}")
    if not (asked or annotated):
        raise ConfigError("no label is annotated at every training site: set primary-labels "
                          "to labels the training sites share")
    return asked or annotated


def load_extra_models(run: RunConfig) -> tuple[dict[str, dict], dict[str, str]]:
    """Models not trained in this run (``extra-models``, files on the coordinator's disk,
    torchvision or fedcxr format): weights and norm of each, loaded before training so a bad
    file fails the run at once."""
    weights, norms = {}, {}
    for name, path in model_specs(run.extra_models, key="extra-models").items():
        model = load_checkpoint(Path(path))
        weights[name], norms[name] = _weights(model.state_dict()), model.norm
    return weights, norms


def exclude_unlabelled(evaluation: dict, train_nodes: dict[int, Node]) -> dict:
    """A single-site model says nothing about a label its site never annotated (its output
    for that label was never trained): mark its rows and leave it out of the tests."""
    unlabelled = {(single(v.site), lb) for v in train_nodes.values()
                  for lb, p in zip(LABELS, v.prevalence, strict=True) if p < 0}
    for row in evaluation["external"]:
        if (row["model"], row["label"]) in unlabelled:
            row["status"] = "not trained on this label (site does not annotate it)"
    evaluation["comparisons"] = [c for c in evaluation["comparisons"]
                                 if (c["model_b"], c["label"]) not in unlabelled]
    return evaluation


def _write_metrics_csv(run_dir: Path, st: RunState) -> None:
    path = run_dir / "metrics.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["round", "arm", "sites_answered", "loss", "val_auc",
                                           "epsilon", "seconds"])
        w.writeheader()
        w.writerows(st.history)
    tmp.replace(path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = parse(RunConfig, dict(context.run_config), what="run config")
    started = time.time()
    st = RunState()
    if run.resume_from:
        saved = checkpoint.load(run.resume_from)
        run_name = saved["run_name"]
        st = RunState(**_upgrade(saved["state"]))
        log.info("resume: continuing %s after round %d (%s)", run_name, st.round, saved["path"])
    else:
        run_name = run.run_name or f"run-{context.run_id}"
    run_dir = Path(run.out_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("fedcxr: run %s -> %s", run_name, run_dir.resolve())

    # 1. Discover.
    nodes = discover(grid, run)
    train_nodes = {n: v for n, v in nodes.items() if v.role == "train"}
    held_out = {n: v for n, v in nodes.items() if v.role == "evaluate"}
    if not train_nodes:
        raise RuntimeError("no node has role=train; nothing to train")
    role_probe = probe_roles(grid, run, nodes)
    log.info("discovery and role probe done (%.1f s into the run)", time.time() - started)
    # The prespecified analysis is fixed (and checked) before any training.
    primary = resolve_primary_labels(run, train_nodes)
    extra, extra_norms = load_extra_models(run)
    log.info("protocol: primary endpoint %s over %s; selection %s; margin %g; alpha %g (%s)%s",
             run.primary_metric, ", ".join(primary), run.selection, run.h1_margin, run.alpha,
             run.correction, f"; extra models {', '.join(extra)}" if extra else "")
    strategy = make_strategy(run, len(train_nodes))
    if not run.resume_from:
        torch.manual_seed(run.seed)
        init = _weights(build_model(norm=run.norm, init_weights=run.init_weights or None)
                        .state_dict())
        st.arms = {FEDERATED: init, **{single(v.site): {k: a.copy() for k, a in init.items()}
                                        for v in train_nodes.values()}}
    else:
        restore_strategy_state(strategy, st.strategy)
        # A training site that was not in the run before the crash has no single-site arm
        # to continue: it sits this run out rather than join mid-experiment.
        for n, v in list(train_nodes.items()):
            if single(v.site) not in st.arms:
                log.warning("resume: %s was not in this run before round %d; it does not "
                            "train in the rest of it", v.site, st.round)
                del train_nodes[n], nodes[n]
        if not train_nodes:
            raise RuntimeError("resume: none of the run's training sites is connected")

    # 2. Train, interleaved, checkpoint every round.
    for rnd in range(st.round + 1, run.num_rounds + 1):
        began = time.monotonic()
        train_round(grid, run, rnd, nodes, st, strategy, run_name, run_dir)
        st.round = rnd
        st.strategy = strategy_state(strategy)
        saving = time.monotonic()
        path = checkpoint.save({"run_name": run_name, "config": as_flower(run),
                                "state": st.__dict__}, run_dir, rnd)
        done = time.monotonic()
        # The round's wall time, first message to checkpoint written.
        _federated_row(st, rnd)["seconds"] = round(done - began, 2)
        _write_metrics_csv(run_dir, st)
        log.info("round %d: checkpoint %s (%.1f s)", rnd, path.name, done - saving)

    # 3. Select every arm's model by the same rule and fix its operating points on
    # training-site validation data only. One message per site validates the last global
    # model (not yet validated); single-site models were validated as they were trained.
    val = validate_models(grid, run, run.num_rounds + 1, {FEDERATED: st.arms[FEDERATED]},
                          {FEDERATED: list(train_nodes)}, run.norm)
    _validated(st, run.num_rounds, val[FEDERATED], st.arms[FEDERATED], run.selection)
    _write_metrics_csv(run_dir, st)
    arm_names = [FEDERATED] + [single(v.site) for v in train_nodes.values()]
    final, chosen, selected_val = {}, {}, {}
    for arm in arm_names:
        sel = st.selected.get(arm)
        final[arm] = sel["weights"] if sel else st.arms[arm]
        chosen[arm] = sel["round"] if sel else run.num_rounds
        selected_val[arm] = sel or _pooled()
    log.info("selection (%s): %s", run.selection,
             ", ".join(f"{a} round {chosen[a]}" + ("" if a in st.selected else
                                                   " (no estimable AUC; last round)")
                       for a in arm_names))
    thresholds = fix_thresholds(run, selected_val)
    log.info("thresholds fixed on training-site validation data (%s, target %.2f; %.1f s "
             "into the run)", run.threshold_method, run.threshold_target, time.time() - started)

    # 4. Internal validation: every training site, every selected model, its test split.
    internal = internal_validation(grid, run, final, train_nodes, primary)
    log.info("internal validation done at %d training site(s) (%.1f s into the run)",
             len(internal["clustering"]), time.time() - started)

    # 5. External validation at every held-out node: one model per message (scores stay at
    # the site), then one statistics message naming every model, with the thresholds. Extra
    # models (not trained here) come after the arms: secondary analysis only.
    models = {**final, **extra}
    norms = {**{a: run.norm for a in final}, **extra_norms}
    thresholds.update({name: {} for name in extra if name not in thresholds})
    site_results = external_validation(grid, run, run_name, models, norms, thresholds,
                                       held_out, primary, arm_names[1:])
    evaluation = exclude_unlabelled(combine_sites(site_results), train_nodes)
    log.info("external validation done at %d held-out site(s) (%.1f s into the run)",
             len(site_results), time.time() - started)

    # 6. Verdict and report.
    failed = {}
    for f in st.failures:
        failed.setdefault(f["arm"], f)
    arms = []
    for name in final:
        kind = "federated" if name == FEDERATED else "single-site"
        last_fail = failed.get(name)
        arms.append({
            "name": name, "kind": kind,
            "site": None if name == FEDERATED else name.split(":", 1)[1],
            "status": "incomplete" if last_fail and name != FEDERATED else "complete",
            "reason": (f"site {last_fail['site']} failed in round {last_fail['round']}: "
                       f"{last_fail['reason']}") if last_fail else None,
            "selection": run.selection, "best_round": int(chosen[name]),
            "history": [h for h in st.history if h["arm"] == name],
        })
    arms += [{"name": name, "kind": "extra", "site": None, "status": "complete",
              "reason": None, "selection": "given", "best_round": None, "history": [],
              "path": path}
             for name, path in model_specs(run.extra_models, key="extra-models").items()]
    cohort = [{"site": v.site, "role": v.role, "n_images": v.n_images, "format": v.format,
               "prevalence": {lb: (p if p >= 0 else None)
                              for lb, p in zip(LABELS, v.prevalence, strict=True)}}
              for v in sorted(nodes.values(), key=lambda v: v.site)]
    privacy = [{"site": v.site, "epsilon": st.epsilon.get(v.site), "max_epsilon": v.max_epsilon,
                "accountant": run.accountant if run.dp else None,
                "delta": None} for v in train_nodes.values()] if run.dp else []
    protocol = Protocol(primary_labels=primary, selection=run.selection, margin=run.h1_margin,
                        alpha=run.alpha, correction=run.correction,
                        primary_metric=run.primary_metric)
    results = build_results(
        cohort=cohort, arms=arms, evaluation=evaluation, federated=FEDERATED, privacy=privacy,
        protocol=protocol, internal=internal,
        screening={"rejected": len(st.rejections), "rejections": st.rejections,
                   "failures": st.failures, "role_probe": role_probe},
        config={**as_flower(run), "thresholds": thresholds,
                "validation_mean_auc": {k: v["mean_val_auc"] if "mean_val_auc" in v
                                        else v.get("mean") for k, v in selected_val.items()}},
        fingerprints={r["site"]: r.get("fingerprint") for r in site_results})
    results["provenance"]["seeds"] = {"seed": run.seed}
    results["provenance"]["seconds"] = round(time.time() - started, 1)
    rpath, hpath = write_report(results, run_dir)
    log.info("%s", results["verdict"]["overall"])
    log.info("results: %s ; report: %s (%.1f s)", rpath.resolve(), hpath.resolve(),
             time.time() - started)
