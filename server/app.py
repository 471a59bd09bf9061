"""Flower ServerApp: the H1 experiment protocol, phase by phase (``main`` reads as it).

1. Discover: query every node for its role (from the node's own config), site, split sizes,
   prevalence and privacy budget; probe that every held-out node refuses to train; fix the
   protocol (primary labels, extra models) before any training.
2. Train, interleaved: each round every training site trains the global model (federated arm)
   and its own single-site model (baseline arm), same epochs, same seeds. Federated updates
   are screened, then aggregated by a Flower strategy. The global model of round r is
   validated by the train message of round r + 1, before the site trains it (and the last
   one in phase 3): a round is one exchange with each site. Checkpoint every round.
3. Select every arm's model by one rule and fix its operating points on training-site
   validation data (ROC counts, never per-image scores).
4. Internal validation: every training site evaluates every selected model on its test split.
5. External validation: every held-out node receives every model, one per message, keeps
   its scores on its own disk, then returns aggregate statistics of all models.
6. Verdict (``common.evaluation.verdict``) and report: runs/<run-name>/results.json,
   report.html.

Every message is built and read through ``common.protocol``.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import protocol as wire
from common.atomic import atomic_path
from common.config import RunConfig, as_flower, label_list, model_specs, parse
from common.errors import ConfigError
from common.evaluation.combine import combine_sites
from common.evaluation.metrics import choose_threshold
from common.labels import LABELS
from common.privacy import Spend, compose_epsilon, default_delta
from common.records import pack, record_arrays, to_record, unpack
from common.releases import release_rows
from common.run_status import LAST_LOG_LINE, ArmRound, RunStatus
from common.seeds import arm_seed
from server import checkpoint, model_files
from server.exchange import Exchange, failure_reason, interleave, send, stream_replies
from server.state import (
    CENTRALISED,
    CENTRALISED_LABEL,
    FEDERATED,
    Failure,
    HistoryRow,
    PooledValidation,
    RunState,
    SelectedModel,
    single,
)
from server.strategy import TrainNodesGrid, make_strategy, restore_strategy_state, strategy_state
from server.tracking import Tracker
from server.updates import UpdateStore
from server.weight_files import (
    StoredWeights,
    WeightFiles,
    Weights,
    check_space,
    load,
    shape_template,
)

log = logging.getLogger("flwr")
app = ServerApp()
# Message group ids of the phases after training (rounds are 1..num-rounds).
PHASE_AFTER_TRAINING = {"select": 1, "internal": 2, "external": 3}
# The validation phase's exchanges (see validate_everywhere).
_INTERNAL, _SCORING, _EXTERNAL = "internal", "scoring", "external"


@dataclass(frozen=True)
class Node:
    """A connected node and what it said of itself (``query``)."""

    node_id: int
    facts: wire.SiteFacts

    @property
    def role(self) -> str:
        return self.facts.role

    @property
    def site(self) -> str:
        return self.facts.site


def _msg(content: RecordDict, node: int, kind: str, group: int) -> Message:
    return Message(content, dst_node_id=node, message_type=kind, group_id=str(group))


def _record(weights: StoredWeights | Weights, run: RunConfig) -> ArrayRecord:
    """A model as a record, read from its file now (dropped with the message)."""
    return to_record(load(weights), run.transport_dtype)


def _train_window(run: RunConfig) -> int:
    """The training rounds' window: ``max-in-flight`` plus one message waiting, so that the
    node that finishes first starts the next site's training at once instead of idling
    while the server pulls its reply and pushes the next message (0.3-0.4 s per site after
    the first wave, in a trace of the sites' handlers). One more two-model message is all
    it holds (0: every site at once)."""
    return run.max_in_flight + 1 if run.max_in_flight else 0


def _queued(run: RunConfig) -> int:
    """The window of the validation phase's one-model messages: twice ``max-in-flight``, so
    that a node finishing one has the next waiting. They take a fraction of a second each;
    with exactly one per node, every one waited for the server's next poll (up to a second
    then; ``server.exchange.poll_wait`` now) with the node idle (``benchmarks/peers.py
    --sites 20`` prints the phase's time)."""
    return 2 * run.max_in_flight


def _memory() -> str:
    """This process's resident memory now and at its peak (the kernel's VmRSS / VmHWM; Linux
    only, else nothing): the phase log doubles as a memory breakdown."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return ""
    kb = {k: int(v) / 2**20 for k, v in
          re.findall(r"^(VmRSS|VmHWM|RssShmem):\s+(\d+) kB", status, re.M)}
    if "VmRSS" not in kb or "VmHWM" not in kb:
        return ""
    # Shared memory (Ray's object store, in a simulation) is counted in RSS too.
    shared = f" ({kb['RssShmem']:.2f} shared)" if kb.get("RssShmem") else ""
    return f"; ServerApp RSS {kb['VmRSS']:.2f} GiB{shared}, peak {kb['VmHWM']:.2f} GiB"


def _process_age() -> str:
    """Seconds since this process started (Linux; else nothing): at the ServerApp's start,
    what Flower's start-up (simulation process, Ray, loading the apps) cost before it."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return ""
    return f"; ServerApp main {uptime - start / os.sysconf('SC_CLK_TCK'):.1f} s after its " \
        "process started"


def _into(started: float) -> str:
    """How far into the run, and the memory (``benchmarks/peers.py`` reads both)."""
    return f"{time.time() - started:.1f} s into the run{_memory()}"


def _auc(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


# ---------------------------------------------------------------- phase 1: discover


def discover(grid: Grid, run: RunConfig) -> dict[int, Node]:
    """Ask every node its facts. Logs when the first and the last reply came: in a simulation
    the first one waits for Flower's start-up (Ray and the site processes), a cost of its own
    that ``benchmarks/peers.py`` reads apart from fedcxr's."""
    ids = list(grid.get_node_ids())
    asked, replies, arrived = time.monotonic(), [], []  # arrived: s after asking, per reply
    for r in stream_replies(grid, [_msg(RecordDict(), n, wire.QUERY, 0) for n in ids],
                            run.round_timeout):
        replies.append(r)
        arrived.append(time.monotonic() - asked)
    if arrived:
        log.info("discover: %d of %d node(s) answered, the first %.1f s and the last %.1f s "
                 "after asking", len(replies), len(ids), arrived[0], arrived[-1])
    else:
        log.warning("discover: none of %d node(s) answered within round-timeout (%g s)",
                    len(ids), run.round_timeout)
    nodes = {}
    for r in replies:
        if r.has_error():
            log.warning("discover: node %d failed: %s", r.metadata.src_node_id, r.error.reason)
            continue
        nodes[r.metadata.src_node_id] = Node(r.metadata.src_node_id,
                                             wire.SiteFacts.decode(r.content))
    for n in sorted(nodes.values(), key=lambda n: n.site):
        log.info("discover: %s node %d role=%s images=%d train=%d", n.site, n.node_id, n.role,
                 n.facts.n_images, n.facts.n_train)
    return nodes


def probe_roles(grid: Grid, run: RunConfig, nodes: dict[int, Node]) -> list[dict]:
    """Send every held-out node a train message with no model: it must refuse by its own
    config (``Refusal.ROLE``). Proof in every run that held-out data cannot be trained on."""
    held = [n for n, v in nodes.items() if v.role == "evaluate"]
    out = []
    for r in send(grid, [_msg(wire.role_probe(), n, wire.TRAIN, 0) for n in held],
                  run.round_timeout):
        node = nodes[r.metadata.src_node_id]
        refused = wire.refusal(r) is wire.Refusal.ROLE
        reason = r.error.reason if r.has_error() else "accepted a train message"
        out.append({"site": node.site, "refused": refused, "reason": reason[-300:]})
        (log.info if refused else log.error)("role probe: held-out %s %s", node.site,
                                            "refused to train" if refused else reason)
    return out


def resolve_primary_labels(run: RunConfig, train_nodes: dict[int, Node]) -> list[str]:
    """The primary endpoint's labels, fixed before training: those the run config names, or
    by default every label annotated at every training site. A named label that some
    training site does not annotate is an error now, not after training."""
    annotated = [lb for k, lb in enumerate(LABELS)
                 if all(v.facts.prevalence[k] >= 0 for v in train_nodes.values())]
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
    """Models not trained in this run (the centralised reference, then ``extra-models``;
    files on the coordinator's disk, torchvision or fedcxr format): weights and norm of each,
    loaded before training so a bad file fails the run at once."""
    weights, norms = {}, {}
    specs = model_specs(run.extra_models, key="extra-models")
    if run.centralised_reference:
        specs = {CENTRALISED: run.centralised_reference, **specs}
    for name, path in specs.items():
        weights[name], norms[name] = model_files.read(path)
    return weights, norms


def protocol_phase(grid: Grid, run: RunConfig, board: RunStatus, started: float):
    """Phase 1: the nodes and their roles, the held-out nodes' refusal to train, and the
    prespecified analysis (primary labels, extra models), fixed and checked before any
    training. Returns (nodes, training nodes, role probe, primary labels, extra models'
    weights and norms)."""
    nodes = discover(grid, run)
    train_nodes = {n: v for n, v in nodes.items() if v.role == "train"}
    board.sites = {v.site: v.role for v in nodes.values()}
    board.node_ids = {v.site: n for n, v in nodes.items()}
    if not train_nodes:
        raise RuntimeError("no node has role=train; nothing to train")
    role_probe = probe_roles(grid, run, nodes)
    primary = resolve_primary_labels(run, train_nodes)
    extra, extra_norms = load_extra_models(run)
    log.info("protocol: primary endpoint %s over %s; selection %s; margin %g; alpha %g (%s)%s"
             " (%s)", run.primary_metric, ", ".join(primary), run.selection,
             run.h1_margin, run.alpha, run.correction,
             f"; extra models {', '.join(extra)}" if extra else "", _into(started))
    return nodes, train_nodes, role_probe, primary, extra, extra_norms


# ---------------------------------------------------------------- phase 2: train


def open_run(run: RunConfig, context: Context) -> tuple[str, Path, RunState]:
    """A new run, or the one ``resume-from`` names with its state after its last round."""
    st = RunState()
    if run.resume_from:
        saved = checkpoint.load(run.resume_from, run.out_dir)
        run_name = saved["run_name"]
        st = saved["state"]
        log.info("resume: continuing %s after round %d (%s)", run_name, st.round, saved["path"])
    else:
        run_name = run.run_name or f"run-{context.run_id}"
    run_dir = Path(run.out_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("fedcxr: run %s -> %s%s", run_name, run_dir.resolve(), _process_age())
    return run_name, run_dir, st


def prepare_arms(run: RunConfig, st: RunState, train_nodes: dict[int, Node],
                 initial: model_files.InitialWeights, files: WeightFiles, tracker: Tracker):
    """The Flower strategy and every arm's starting weights (fresh, built by ``initial``, or
    as resumed). A training site that was not in a resumed run before the crash has no
    single-site arm to continue: it sits the rest out rather than join mid-experiment. A run
    whose model files cannot fit under ``out-dir`` stops here (``check_space``)."""
    strategy = make_strategy(run, len(train_nodes))
    if not run.resume_from:
        # One file of the identical starting weights, every arm's until its first trained
        # weights replace it.
        init = files.put("round-000-initial", initial.result())
        st.arms = {FEDERATED: init, **{single(v.site): init for v in train_nodes.values()}}
    else:
        st.spill(files)  # models as arrays (format 2), or files of another run folder
        restore_strategy_state(strategy, st.strategy)
        for n, v in list(train_nodes.items()):
            if single(v.site) not in st.arms:
                log.warning("resume: %s was not in this run before round %d; it does not "
                            "train in the rest of it", v.site, st.round)
                del train_nodes[n]
        if not train_nodes:
            raise RuntimeError("resume: none of the run's training sites is connected")
    # Before any round: a run whose model files cannot fit stops now, not at its last round.
    arms = 1 + len(train_nodes)
    if warning := check_space(files.folder, st.stored()[0].path.stat().st_size, arms,
                              run.num_rounds - st.round, run.keep_checkpoints,
                              extra_copies=arms if tracker.stores_here else 0):
        log.warning("%s", warning)
    return strategy


def train_rounds(grid: Grid, run: RunConfig, st: RunState, strategy,
                 train_nodes: dict[int, Node], run_name: str, run_dir: Path,
                 board: RunStatus, tracker: Tracker, files: WeightFiles,
                 analysis: AnalysisLoad) -> None:
    """Every remaining round, each followed by a checkpoint and metrics.csv."""
    for rnd in range(st.round + 1, run.num_rounds + 1):
        began = time.monotonic()
        train_round(grid, run, rnd, train_nodes, st, strategy, run_name, run_dir, files,
                    analysis if rnd == run.num_rounds else None)
        st.round = rnd
        st.strategy = strategy_state(strategy)
        saving = time.monotonic()
        best = st.selected.get(FEDERATED)
        path = checkpoint.save(run_name, as_flower(run), st, run_dir, rnd,
                               keep=run.keep_checkpoints, best_round=best and best.round)
        done = time.monotonic()
        # The round's wall time, first message to checkpoint written.
        st.federated_row(rnd).seconds = round(done - began, 2)
        _write_metrics_csv(run_dir, st)
        follow(board, st)
        final = final_rows(st, rnd)
        tracker.rounds([h for h in st.history if (h.round, h.arm) in final], st.epsilon)
        log.info("round %d: checkpoint %s (%.1f s%s)", rnd, path.name, done - saving, _memory())


def final_rows(st: RunState, rnd: int) -> set[tuple[int, str]]:
    """The (round, arm) history rows that no later round changes, after round ``rnd``: every
    arm's up to ``rnd`` but round ``rnd``'s global model, which the next round's train
    messages validate."""
    return {(h.round, h.arm) for h in st.history if h.round < rnd or h.arm != FEDERATED}


def train_requests(run: RunConfig, rnd: int, st: RunState, strategy, grid: Grid,
                   sites: dict[int, str], run_name: str) -> Iterator[Message]:
    """One message per training site with both arms (one ClientApp process per site and
    round); the strategy configures the federated arm (on training nodes only). Each is
    built when it is sent (``max-in-flight``): a site's own arm is a model-sized record."""
    planned = run.num_rounds * 2  # federated + single-site arm both spend each round
    common = {"server_round": rnd, "norm": run.norm, "run_name": run_name,
              "planned_units": planned}
    configured = list(strategy.configure_train(rnd, _record(st.arms[FEDERATED], run),
                                               ConfigRecord(), TrainNodesGrid(grid, sites)))
    for m in configured:
        node = m.metadata.dst_node_id
        weights, mu, strategy_config = wire.from_strategy(m)
        request = wire.TrainRequest(
            **common, first=wire.ArmTask(FEDERATED, arm_seed(run.seed, rnd, FEDERATED), weights),
            single=wire.ArmTask(single(sites[node]), arm_seed(run.seed, rnd, "single"),
                                _record(st.arms[single(sites[node])], run)),
            validate_received=rnd > 1, proximal_mu=mu, strategy_config=strategy_config)
        yield _msg(request.encode(), node, wire.TRAIN, rnd)
    paired = {m.metadata.dst_node_id for m in configured}
    for node in sorted(set(sites) - paired):  # the strategy sampled this site out
        request = wire.TrainRequest(
            **common, first=wire.ArmTask(single(sites[node]), arm_seed(run.seed, rnd, "single"),
                                         _record(st.arms[single(sites[node])], run)),
            report_val=True)
        yield _msg(request.encode(), node, wire.TRAIN, rnd)


def a_core_idles(run: RunConfig, sites: int, replied: int) -> bool:
    """Whether fewer of a round's ``sites`` are still training, ``replied`` having replied,
    than the simulation runs at once (``max-in-flight``, one per core): from then on a
    core is idle until the round ends. Deployed nodes (``max-in-flight`` 0) share no
    cores with the ServerApp."""
    return 0 < sites - replied < run.max_in_flight


def train_round(grid: Grid, run: RunConfig, rnd: int, train_nodes: dict[int, Node],
                st: RunState, strategy, run_name: str, run_dir: Path,
                files: WeightFiles, analysis: AnalysisLoad | None = None) -> None:
    """One round. ``analysis`` (given in the last round) starts loading as soon as a core
    idles (``a_core_idles``): the ServerApp's next phases, selection and validation, keep
    both cores busy, and the import (2.3 s of CPU) took its share of them there."""
    started = time.monotonic()
    train_ids = sorted(train_nodes)
    sites = {n: train_nodes[n].site for n in train_ids}
    msgs = train_requests(run, rnd, st, strategy, grid, sites, run_name)
    # Replies are taken one at a time: a federated update is checked, measured and spilled
    # to the coordinator's disk (UpdateStore) and dropped before the next one is pulled.
    global_model = load(st.arms[FEDERATED])
    template = shape_template(global_model)  # keys, shapes and dtypes: no values
    store = UpdateStore(run_dir / "updates" / f"round-{rnd:03d}", pack(global_model),
                        round=rnd, sites=sites)
    del global_model
    answered: dict[str, set[int]] = {FEDERATED: set()}
    errors: dict[int, str] = {}
    fed_metrics: dict[int, dict] = {}
    previous = PooledValidation()  # validation of the global model sent (round rnd - 1's)

    def take_arm(r: Message, result: wire.ArmResult) -> None:
        node = r.metadata.src_node_id
        answered.setdefault(result.arm, set()).add(node)
        metrics = {"loss": result.loss, "epsilon": result.epsilon}
        if result.epsilon >= 0 and node in sites:
            st.epsilon[sites[node]] = max(st.epsilon.get(sites[node], 0.0), result.epsilon)
        if result.arm == FEDERATED:
            fed_metrics[node] = metrics
            store.add(r)
            return
        # Single-site arm: the site's own model, never averaged, validated at its own site
        # and selected by the same rule as the federated arm.
        arm = result.arm
        st.arms[arm] = files.put(f"round-{rnd:03d}-{arm}",
                                 unpack(record_arrays(result.arrays), template))
        st.trained.setdefault(arm, []).append(rnd)
        _record_history(st, rnd, arm, [metrics], mean_val=result.val_mean_auc,
                        validated=int(result.val_mean_auc is not None))
        own = PooledValidation()
        own.add(sites[node], result.val)
        _consider(st, arm, rnd, own, st.arms[arm], run.selection)

    def take(r: Message) -> None:
        if r.has_error():
            errors.setdefault(r.metadata.src_node_id, failure_reason(r))
            return
        reply = wire.TrainReply.decode(r.content)
        if reply.received is not None:
            previous.add(sites.get(r.metadata.src_node_id, "?"), reply.received)
        take_arm(r, reply.first)
        if reply.single is not None:
            take_arm(r, reply.single)

    def spare_a_core(replies: int) -> None:
        if analysis is not None and a_core_idles(run, len(train_ids), replies):
            analysis.start()

    try:
        replies = 0
        spare_a_core(replies)  # fewer sites than cores: one is idle from the start
        for reply in stream_replies(grid, msgs, run.round_timeout, window=_train_window(run)):
            take(reply)
            del reply
            replies += 1
            spare_a_core(replies)
        replied = time.monotonic()
        if rnd - 1 in st.trained.get(FEDERATED, []):
            # Before aggregation replaces it: st.arms[FEDERATED] is round rnd - 1's aggregate.
            _validated(st, rnd - 1, previous, st.arms[FEDERATED], run.selection)
        # Failures: every (arm, node) that was asked and did not answer with a result.
        for n in train_ids:
            for arm in (FEDERATED, single(sites[n])):
                if n not in answered.get(arm, set()):
                    reason = errors.get(n, "no reply before timeout")
                    st.failures.append(Failure(rnd, arm, sites[n], n, reason))
                    log.warning("round %d: %s at %s failed: %s", rnd, arm, sites[n], reason)
        # Federated arm: screen, then aggregate with the Flower strategy.
        kept = store.screen(run.screen_norm_factor)
        st.rejections += store.rejected
        if len(kept) >= max(run.min_train_sites, 1):
            new = store.aggregate(strategy)
            if new is not None:
                st.arms[FEDERATED] = files.put(f"round-{rnd:03d}-{FEDERATED}",
                                               unpack(new, template))
                del new
                st.trained.setdefault(FEDERATED, []).append(rnd)
        else:  # no aggregate: the round is not a round of the federated arm
            log.warning("round %d: only %d accepted federated updates (< min-train-sites %d); "
                        "not aggregated, global model unchanged", rnd, len(kept),
                        max(run.min_train_sites, 1))
    finally:
        store.close()
    # This round's global model is validated by the next round's train message.
    aggregated = rnd in st.trained.get(FEDERATED, [])
    _record_history(st, rnd, FEDERATED, [fed_metrics[u.node] for u in kept] if aggregated
                    else [], mean_val=None, validated=0)
    prev = (f"; round {rnd - 1} global: mean val AUC {_auc(previous.mean)} at "
            f"{len(previous.sites)} sites" if rnd > 1 else "")
    log.info("round %d: federated %d/%d sites trained, rejected %d%s; eps %s; %.1f s "
             "(replies %.1f s)", rnd, len(kept) if aggregated else 0, len(train_ids),
             len(store.rejected), prev,
             {k: round(v, 2) for k, v in st.epsilon.items()} or "n/a",
             time.monotonic() - started, replied - started)
    singles = [h for h in st.history if h.round == rnd and h.arm != FEDERATED]
    log.info("round %d: single-site arms %s", rnd, "; ".join(
        f"{h.arm} loss {_auc(h.loss)} val AUC {_auc(h.val_auc)}" for h in singles) or "none")


def _validated(st: RunState, rnd: int, val: PooledValidation,
               weights: StoredWeights | Weights, rule: str) -> None:
    """Round ``rnd``'s global model (``weights``) was validated: fill its history row and
    consider it for selection."""
    row = st.federated_row(rnd)
    row.val_auc, row.sites_validated = val.mean, len(val.sites)
    _consider(st, FEDERATED, rnd, val, weights, rule)


def _consider(st: RunState, arm: str, rnd: int, val: PooledValidation,
              weights: StoredWeights | Weights, rule: str) -> None:
    """One selection rule for every arm: keep round ``rnd``'s model of ``arm``, with its
    pooled validation ROC counts (for thresholds), when it is the last (``last``) or has the
    best validation AUC so far (``best-val``; the earliest round wins a tie). The federated
    arm is validated at every training site, a single-site arm at its own site."""
    current = st.selected.get(arm)
    mean = val.mean
    better = mean is not None and (current is None or current.mean_val_auc is None
                                   or mean > current.mean_val_auc)
    if rule == "last" or better:
        # No copy: the selected model is the arm's model of that round, the same file; the
        # arm's next weights are a new file (server.weight_files).
        st.selected[arm] = SelectedModel(rnd, mean, val.pos, val.neg, list(val.sites),
                                         weights)


def _record_history(st: RunState, rnd: int, arm: str, metrics: list[dict], *,
                    mean_val: float | None, validated: int) -> None:
    """One arm's row of round ``rnd`` from the metrics of the updates it took."""
    losses = [m["loss"] for m in metrics]
    eps = [m["epsilon"] for m in metrics if m["epsilon"] >= 0]
    st.history.append(HistoryRow(
        round=rnd, arm=arm, sites_trained=len(metrics), sites_validated=validated,
        loss=float(np.mean(losses)) if losses else None, val_auc=mean_val,
        epsilon=max(eps) if eps else None))


def _write_metrics_csv(run_dir: Path, st: RunState) -> None:
    with atomic_path(run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[f.name for f in fields(HistoryRow)])
        w.writeheader()
        w.writerows(asdict(h) for h in st.history)


# ---------------------------------------------------------------- phase 3: select


def validate_global(grid: Grid, run: RunConfig, weights: StoredWeights | Weights,
                    train_nodes: dict[int, Node]) -> PooledValidation:
    """The last global model's validation at every training site (the earlier ones were
    validated by the next round's train message)."""
    request = wire.ValidateRequest({FEDERATED: _record(weights, run)}, run.norm).encode()
    msgs = (_msg(request, n, wire.VALIDATE, run.num_rounds + PHASE_AFTER_TRAINING["select"])
            for n in train_nodes)
    out = PooledValidation()
    for r in stream_replies(grid, msgs, run.round_timeout, window=_queued(run)):
        if r.has_error():
            log.warning("validation at node %d failed: %s", r.metadata.src_node_id,
                        r.error.reason)
            continue
        reply = wire.ValidateReply.decode(r.content)
        out.add(reply.site, reply.validations[FEDERATED])
    return out


@dataclass(frozen=True)
class Selection:
    """Every arm's selected model, the round it came from, and its operating points."""

    weights: dict[str, StoredWeights | Weights]
    rounds: dict[str, int]
    validation_auc: dict[str, float | None]
    thresholds: dict[str, dict[str, float]]


def select_arms(grid: Grid, run: RunConfig, st: RunState, train_nodes: dict[int, Node],
                run_dir: Path) -> Selection:
    """Phase 3: one selection rule for every arm; thresholds from the validation ROC counts
    of the round each arm selected (training-site validation data only)."""
    if run.num_rounds in st.trained.get(FEDERATED, []):
        val = validate_global(grid, run, st.arms[FEDERATED], train_nodes)
        _validated(st, run.num_rounds, val, st.arms[FEDERATED], run.selection)
    _write_metrics_csv(run_dir, st)
    arms = [FEDERATED] + [single(v.site) for v in train_nodes.values()]
    never = [a for a in arms if not st.trained.get(a)]
    if never:  # no model of theirs is evaluated: there is nothing but initial weights
        log.warning("never trained (no verdict on them): %s", ", ".join(never))
    arms = [a for a in arms if a not in never]
    weights, rounds, aucs, thresholds = {}, {}, {}, {}
    for arm in arms:
        sel = st.selected.get(arm)
        weights[arm] = sel.weights if sel else st.arms[arm]
        rounds[arm] = sel.round if sel else run.num_rounds
        aucs[arm] = sel.mean_val_auc if sel else None
        thresholds[arm] = fix_thresholds(run, sel.pos, sel.neg) if sel else {}
    log.info("selection (%s): %s", run.selection,
             ", ".join(f"{a} round {rounds[a]}" + ("" if a in st.selected else
                                                   " (no estimable AUC; last round)")
                       for a in arms))
    return Selection(weights, rounds, aucs, thresholds)


def fix_thresholds(run: RunConfig, pos: np.ndarray | None, neg: np.ndarray | None
                   ) -> dict[str, float]:
    """Per-label operating points from pooled validation ROC counts."""
    if pos is None:
        return {}
    return {lb: choose_threshold(pos[k], neg[k], run.threshold_method, run.threshold_target)
            for k, lb in enumerate(LABELS) if pos[k][0] > 0 and neg[k][0] > 0}


# ---------------------------------------------------------------- phases 4 and 5


def model_by_model(grid: Grid, run: RunConfig, models: dict[str, StoredWeights | Weights],
                   nodes: dict[int, Node],
                   kind: str, phase: str, request: Callable[[str, ArrayRecord], RecordDict]
                   ) -> Exchange:
    """Every node gets every model, one model per message and model by model: each record
    is built when its first message goes out, and a node that finishes one model gets the
    next without waiting for the others (the window: ``_queued``)."""
    group = run.num_rounds + PHASE_AFTER_TRAINING[phase]

    def messages() -> Iterator[Message]:
        for name, weights in models.items():
            content = request(name, _record(weights, run))
            for n in nodes:
                yield _msg(content, n, kind, group)

    return Exchange(grid, messages(), run.round_timeout, window=_queued(run) or len(nodes))


def model_of(reply: Message, exchange: Exchange, names: list[str], nodes: dict) -> str:
    """Which model a reply of ``model_by_model`` answers."""
    return names[exchange.order[reply.metadata.reply_to_message_id] // len(nodes)]


def start_internal_validation(grid: Grid, run: RunConfig, models: dict[str, dict],
                              train_nodes: dict[int, Node], primary: list[str], run_name: str
                              ) -> Exchange:
    """Every training site evaluates every selected model on its own test split (aggregate
    AUCs only): the internal side of the internal-to-external drop. One model per message:
    with one arm per site, a message of every model would grow with the sites, and so would
    the server's memory."""
    return model_by_model(grid, run, models, train_nodes, wire.INTERNAL, "internal",
                          lambda name, record: wire.InternalRequest(
                              name, record, run.norm, primary, run_name).encode())


def internal_results(replies: list[Message], exchange: Exchange, names: list[str],
                     train_nodes: dict[int, Node]) -> dict:
    """The sites' internal statistics as one set of tables, in site then model order (as if
    each site had sent all its models' statistics at once)."""
    per_site: dict[int, list[tuple[int, dict]]] = {}
    for r in replies:
        node = r.metadata.src_node_id
        name = model_of(r, exchange, names, train_nodes)
        if r.has_error():
            log.warning("internal validation of %s at %s failed: %s", name,
                        train_nodes[node].site if node in train_nodes else node,
                        r.error.reason)
            continue
        per_site.setdefault(node, []).append((names.index(name),
                                              wire.StatisticsReply.decode(r.content).results))
    results = []
    label_order = {lb: k for k, lb in enumerate(LABELS)}
    for node in [n for n in train_nodes if n in per_site]:
        site = [res for _, res in sorted(per_site[node], key=lambda x: x[0])]
        merged = combine_sites(site)
        merged["internal"].sort(key=lambda row: label_order.get(row["label"], len(LABELS)))
        results.append({**merged, "site": site[0]["site"], "n_images": site[0]["n_images"],
                        "clustered_by": site[0].get("clustered_by", "image")})
    return combine_sites(results)


def primary_pairs(arms: list[str], reference: dict) -> list[tuple[str, str]]:
    """The primary endpoint's comparisons: the federated arm against each single-site arm
    (the verdict's family), and with a centralised reference, the federated arm against it
    and it against each single-site arm (the known-answer check; its own family)."""
    singles = [a for a in arms if a != FEDERATED]
    trained = FEDERATED in arms  # an arm that never trained is compared with nothing
    pairs = [(FEDERATED, s) for s in singles] if trained else []
    if reference:
        pairs += ([(FEDERATED, CENTRALISED)] if trained else []) + [(CENTRALISED, s)
                                                                   for s in singles]
    return pairs


def start_scoring(grid: Grid, run: RunConfig, run_name: str, models: dict[str, dict],
                  norms: dict[str, str], held_out: dict[int, Node]) -> Exchange:
    """Every held-out node scores every model, one per message; the scores stay at the
    site until the statistics message."""
    return model_by_model(grid, run, models, held_out, wire.SCORE, "external",
                          lambda name, record: wire.ScoreRequest(
                              name, record, norms[name], run_name).encode())


def scored_models(replies: list[Message], exchange: Exchange, names: list[str],
                  held_out: dict[int, Node]) -> dict[int, set[str]]:
    """Which models each held-out node has scored."""
    scored: dict[int, set[str]] = {n: set() for n in held_out}
    for r in replies:
        node = r.metadata.src_node_id
        name = model_of(r, exchange, names, held_out)
        if r.has_error():
            log.warning("external scoring of %s at %s failed: %s", name,
                        held_out[node].site if node in held_out else node, r.error.reason)
        elif node in scored:
            scored[node].add(name)
    return scored


def start_external_statistics(grid: Grid, run: RunConfig, run_name: str, models: list[str],
                              thresholds: dict, scored: dict[int, set[str]],
                              primary: list[str], pairs: list[tuple[str, str]]) -> Exchange:
    """Every held-out node that scored every model returns the statistics of all: per-label
    (secondary) and the primary endpoint."""
    group = run.num_rounds + PHASE_AFTER_TRAINING["external"]
    request = wire.ExternalRequest(run_name, models, thresholds, primary, pairs).encode()
    return Exchange(grid, [_msg(request, n, wire.EXTERNAL, group)
                           for n, done in scored.items() if done == set(models)],
                    run.round_timeout)


def external_results(replies: list[Message]) -> list[dict]:
    out = []
    for r in replies:
        if r.has_error():
            log.warning("external validation at node %d failed: %s", r.metadata.src_node_id,
                        r.error.reason)
            continue
        out.append(wire.StatisticsReply.decode(r.content).results)
    return out


def validate_everywhere(grid: Grid, run: RunConfig, run_name: str, selection: Selection,
                        extra: dict[str, dict], extra_norms: dict[str, str],
                        nodes: tuple[dict[int, Node], dict[int, Node]], primary: list[str]
                        ) -> tuple[list[dict], dict, dict]:
    """Phases 4 and 5 (disjoint sites): internal validation of every selected model (and a
    centralised reference) at every training site, and scoring of every model at every
    held-out site, then the held-out sites' statistics as soon as their scoring is done,
    the phases' messages interleaved. Extra models (not trained here) come after the arms:
    secondary analysis only. Returns the held-out sites' results, the internal tables and
    the thresholds used.

    Deployed nodes (``max-in-flight`` 0) work side by side: both phases start at once. Nodes
    that share a few processes (``max-in-flight`` > 0: ``fedcxr simulate``) serve whichever
    messages come first, and the held-out side is the phase's one chain: every model
    scored, then the statistics (the longest message, which loads the statistics
    libraries). Started beside internal validation, its scoring is served one message in
    as many as there are nodes (Flower's simulation takes one message per node in turn)
    and the statistics come last, alone; there scoring goes first, and internal validation
    starts with the statistics."""
    train_nodes, held_out = nodes
    reference = {n: w for n, w in extra.items() if n == CENTRALISED}
    internal_models = {**selection.weights, **reference}
    models = {**selection.weights, **extra}
    norms = {**{a: run.norm for a in selection.weights}, **extra_norms}
    thresholds = {**{name: {} for name in extra}, **selection.thresholds}
    exchanges: list[Exchange] = []
    kinds: list[str] = []  # which phase each exchange is
    replies: dict[str, list[Message]] = {_INTERNAL: [], _SCORING: [], _EXTERNAL: []}

    def begin(name: str) -> None:
        if name == _INTERNAL:
            exchange = start_internal_validation(grid, run, internal_models, train_nodes,
                                                 primary, run_name)
        elif name == _SCORING:
            exchange = start_scoring(grid, run, run_name, models, norms, held_out)
        else:
            scored = scored_models(replies[_SCORING], exchanges[kinds.index(_SCORING)],
                                   list(models), held_out)
            exchange = start_external_statistics(
                grid, run, run_name, list(models), thresholds, scored, primary,
                primary_pairs(list(selection.weights), reference))
        exchanges.append(exchange)  # the two lists stay in step, whatever a start raises
        kinds.append(name)

    held_out_first = run.max_in_flight > 0 and bool(held_out) and bool(models)
    begin(_SCORING)
    if not held_out_first:
        begin(_INTERNAL)
    for which, reply in interleave(exchanges):  # served in this same loop as they begin
        replies[kinds[which]].append(reply)  # small: statistics, or a count of scored images
        if kinds[which] == _SCORING and exchanges[which].answered:
            if models:
                begin(_EXTERNAL)
            if _INTERNAL not in kinds:
                begin(_INTERNAL)
    for name in (_EXTERNAL, _INTERNAL):  # scoring ran out of time: what is left, after it
        if name not in kinds and (models or name == _INTERNAL):
            begin(name)
            replies[name].extend(exchanges[-1].replies())
    return (external_results(replies[_EXTERNAL]),
            internal_results(replies[_INTERNAL], exchanges[kinds.index(_INTERNAL)],
                             list(internal_models), train_nodes),
            thresholds)


def exclude_unlabelled(evaluation: dict, train_nodes: dict[int, Node]) -> dict:
    """A single-site model says nothing about a label its site never annotated (its output
    for that label was never trained): mark its rows and leave it out of the tests."""
    unlabelled = {(single(v.site), lb) for v in train_nodes.values()
                  for lb, p in zip(LABELS, v.facts.prevalence, strict=True) if p < 0}
    for row in evaluation["external"]:
        if (row["model"], row["label"]) in unlabelled:
            row["status"] = "not trained on this label (site does not annotate it)"
    evaluation["comparisons"] = [c for c in evaluation["comparisons"]
                                 if (c["model_b"], c["label"]) not in unlabelled]
    return evaluation


# ---------------------------------------------------------------- phase 6: verdict, report


def arm_rows(run: RunConfig, st: RunState, selection: Selection) -> list[dict]:
    """results.json ``arms``: every trained arm (status, selection, history), then every
    extra model."""
    failed: dict[str, Failure] = {}
    for f in st.failures:
        failed.setdefault(f.arm, f)
    rows = []
    arms = [FEDERATED] + sorted(a for a in st.arms if a != FEDERATED)
    for name in (a for a in arms if a not in selection.weights):
        fail = failed.get(name)
        rows.append({
            "name": name, "kind": "federated" if name == FEDERATED else "single-site",
            "site": None if name == FEDERATED else name.split(":", 1)[1],
            "status": "not trained", "reason": (
                f"never trained: site {fail.site} failed in round {fail.round}: "
                f"{fail.reason}") if fail else "never trained (no update was aggregated)",
            "selection": run.selection, "best_round": None, "trained_rounds": [],
            "history": [asdict(h) for h in st.history if h.arm == name]})
    for name in selection.weights:
        last_fail = failed.get(name)
        rows.append({
            "name": name, "kind": "federated" if name == FEDERATED else "single-site",
            "site": None if name == FEDERATED else name.split(":", 1)[1],
            "status": "incomplete" if last_fail and name != FEDERATED else "complete",
            "reason": (f"site {last_fail.site} failed in round {last_fail.round}: "
                       f"{last_fail.reason}") if last_fail else None,
            "selection": run.selection, "best_round": int(selection.rounds[name]),
            "trained_rounds": st.trained.get(name, []),
            "history": [asdict(h) for h in st.history if h.arm == name],
        })
    if run.centralised_reference:
        rows.append(reference_row(Path(run.centralised_reference)))
    rows += [{"name": name, "kind": "extra", "site": None, "status": "complete",
              "reason": None, "selection": "given", "best_round": None, "history": [],
              "path": path}
             for name, path in model_specs(run.extra_models, key="extra-models").items()]
    return rows


def privacy_row(run: RunConfig, node: Node, epsilon: float | None) -> dict:
    """A training site's ε in results.json, at its δ and privacy unit. With ``image`` as the
    unit, a patient with k images is protected only by group privacy: (k ε, k e^((k-1) ε) δ)
    for the site's largest k, stated beside it."""
    f = node.facts
    delta = f.delta if f.delta >= 0 else None
    row = dict(site=node.site, epsilon=epsilon, delta=delta, max_epsilon=f.max_epsilon,
               accountant=run.accountant, privacy_unit=f.privacy_unit or run.privacy_unit,
               n_units=f.n_units, max_images_per_patient=f.max_images_per_patient,
               patient_epsilon=epsilon, patient_delta=delta)
    k = f.max_images_per_patient
    if row["privacy_unit"] == "image" and epsilon is not None and k > 1 and f.delta >= 0:
        row["patient_epsilon"] = k * epsilon
        row["patient_delta"] = min(k * math.exp((k - 1) * epsilon) * f.delta, 1.0)
    return row


def client_dp_row(run: RunConfig, st: RunState, n_sites: int) -> dict | None:
    """The federated arm's client-level (whole-site) guarantee under ``client-dp``: each
    aggregated round is one Gaussian mechanism on the mean of clipped site updates, every
    training site taking part (sample rate 1), composed over the rounds in the same Opacus
    accountant as the sites' ledgers, at δ = min(1/(10 sites), 1e-5)."""
    if run.client_dp == "off":
        return None
    rounds = len(st.trained.get(FEDERATED, []))
    delta = default_delta(n_sites)
    epsilon = compose_epsilon([Spend(rounds, 1.0, run.client_noise_multiplier)], delta,
                              run.accountant) if rounds else 0.0
    bounded = math.isfinite(epsilon)
    return dict(mode=run.client_dp, unit="site", noise_multiplier=run.client_noise_multiplier,
                clipping_norm=run.client_clipping_norm,
                final_clipping_norm=float(st.strategy.get("clipping_norm",
                                                          run.client_clipping_norm)),
                rounds=rounds, sites=n_sites, sample_rate=1.0, accountant=run.accountant,
                epsilon=epsilon if bounded else None, delta=delta,
                note="" if bounded else "no finite ε at this noise multiplier")


def reference_row(path: Path) -> dict:
    """The centralised reference's ``arms`` row, from the record written beside its
    weights (``<path>.json``: selection, selected round, history)."""
    record: dict = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(Path(f"{path}.json").read_text())
    return {"name": CENTRALISED, "kind": "centralised-reference", "site": None,
            "label": CENTRALISED_LABEL,
            "status": "complete", "reason": None, "selection": record.get("selection"),
            "best_round": record.get("best_round"),
            "history": [{"round": h["round"], "arm": CENTRALISED, "val_auc": h["val_mean_auc"],
                         "loss": h["loss"]} for h in record.get("history", [])],
            "sites": record.get("sites"), "path": str(path)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = parse(RunConfig, dict(context.run_config), what="run config")
    started = time.time()
    run_name, run_dir, st = open_run(run, context)
    board = RunStatus(run_name, str(run_dir.resolve()), started, run.num_rounds)
    tracker = Tracker(run.tracking_uri, Path(run.out_dir))
    tracker.start(run_name, as_flower(run), logged=final_rows(st, st.round)
                  if run.resume_from else None)
    with board.tracking():
        try:
            experiment(grid, run, st, run_name, run_dir, started, board, tracker)
        except BaseException:
            tracker.failed()
            raise


def experiment(grid: Grid, run: RunConfig, st: RunState, run_name: str, run_dir: Path,
               started: float, board: RunStatus, tracker: Tracker) -> None:
    """The protocol, phase by phase; ``board`` (status.json) and ``tracker`` (MLflow) follow
    it for the coordinator."""
    # 1. Discover; the prespecified analysis is fixed (and checked) before any training. The
    # arms' initial weights are built meanwhile, in a child process (server.model_files).
    with model_files.InitialWeights(run.seed, run.norm, run.init_weights or None,
                                    needed=not run.resume_from) as initial:
        nodes, train_nodes, role_probe, primary, extra, extra_norms = protocol_phase(
            grid, run, board, started)

        # 2. Train, interleaved, checkpoint every round.
        board.enter("training")
        files = checkpoint.weight_files(run_dir)
        strategy = prepare_arms(run, st, train_nodes, initial, files, tracker)
    held_out = {n: v for n, v in nodes.items() if v.role == "evaluate"}
    nodes = {n: v for n, v in nodes.items() if v.role != "train" or n in train_nodes}
    analysis = AnalysisLoad()
    train_rounds(grid, run, st, strategy, train_nodes, run_name, run_dir, board, tracker,
                 files, analysis)
    log.info("training done: %d round(s) (%s)", st.round, _into(started))

    # 3. Select every arm by one rule; operating points from training-site validation only.
    # The analysis' libraries load meanwhile (``AnalysisLoad``), unless they already are.
    board.enter("selection")
    analysis.start()
    selection = select_arms(grid, run, st, train_nodes, run_dir)
    follow(board, st)
    tracker.rounds(st.history, st.epsilon)  # the last global model is validated now
    log.info("thresholds fixed on training-site validation data (%s, target %.2f; %s)",
             run.threshold_method, run.threshold_target, _into(started))

    # 4-5. Internal validation (every training site, every selected model, its test split)
    # and external validation (every held-out node), at the same time: disjoint sites.
    board.enter("validation")
    site_results, internal, thresholds = validate_everywhere(
        grid, run, run_name, selection, extra, extra_norms, (train_nodes, held_out), primary)
    evaluation = exclude_unlabelled(combine_sites(site_results), train_nodes)
    log.info("validation done at %d held-out and %d training site(s) (%s)",
             len(site_results), len(internal["clustering"]), _into(started))

    # 6. Verdict and report.
    board.enter("report")
    spare_the_collector()
    results = report(run, st, selection, nodes, evaluation, internal, site_results, primary,
                     thresholds, role_probe, run_dir, started)
    log.info("results.json and report.html written (%s)", _into(started))
    tracker.finish(results, run_dir, lambda folder: save_selected(selection, run, folder))
    log.info("%s (%s)", LAST_LOG_LINE, _into(started))
    board.enter("finished")


class AnalysisLoad:
    """``load_the_analysis`` in a thread, started once: in the last round as soon as a core
    idles (simulation), else as the arms are selected."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            log.info("loading the analysis' libraries")
            self._thread = threading.Thread(target=load_the_analysis, name="load-the-analysis",
                                            daemon=True)
            self._thread.start()


def load_the_analysis() -> None:
    """Import the verdict's and the report's libraries (scipy.stats, statsmodels, pandas,
    matplotlib: 2.3 s of CPU on this session's host), in a thread (``AnalysisLoad``): in a
    simulation from the last round's first idle core, else as the arms are selected, while
    the training sites validate the last global model and then every site validates the
    selected ones. Imported with this module they delayed the ServerApp's main, while
    Flower's simulation starts Ray on the same cores; loaded as training began they raised
    the peak of the process hosting the ServerApp, which holds the arms' weights then (1.28
    against 1.17 GiB in two ``benchmarks/peers.py`` runs of session 18); from the last
    round's idle core, about 0.1 GiB (its log's peak, session 21). ``report`` imports them
    again, which waits for this thread if it is still importing."""
    from common.evaluation.report import load_report_libraries

    load_report_libraries()


def spare_the_collector() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach
    (``gc.freeze``) before the statistics. statsmodels' Holm adjustment runs a full
    collection per call (``gc.collect``) that walks this process's whole heap (Flower, Ray's
    driver, gRPC, matplotlib, pandas: 0.17 s a call in a profile of a demo-sized run) to
    free a few small arrays of its own. Frozen objects are still freed by their reference
    counts; only cycles among them are never collected, and this process ends with the
    run."""
    gc.freeze()


def save_selected(selection: Selection, run: RunConfig, folder: Path) -> dict[str, Path]:
    """Every arm's selected model as a fedcxr checkpoint (for the tracker's artifacts)."""
    return model_files.write(
        {arm: (weights, {"image_size": run.image_size, "arm": arm,
                         "round": selection.rounds.get(arm)})
         for arm, weights in selection.weights.items()}, run.norm, folder)


def follow(board: RunStatus, st: RunState) -> None:
    """status.json after a round: every arm's latest row, the failures and ε so far."""
    board.round = st.round
    for h in st.history:
        board.arms[h.arm] = ArmRound(h.round, h.sites_trained, h.sites_validated)
    board.failures = [{"round": f.round, "arm": f.arm, "site": f.site, "reason": f.reason}
                      for f in st.failures]
    board.epsilon = dict(st.epsilon)
    board.write()


def report(run: RunConfig, st: RunState, selection: Selection, nodes: dict[int, Node],
           evaluation: dict, internal: dict, site_results: list[dict], primary: list[str],
           thresholds: dict, role_probe: list[dict], run_dir: Path, started: float) -> dict:
    """Phase 6: results.json (the verdict decided by ``common.evaluation.verdict``) and
    report.html; returns the results."""
    from common.evaluation.report import build_results, write_report
    from common.evaluation.verdict import Protocol

    train_nodes = [v for v in nodes.values() if v.role == "train"]
    cohort = [{"site": v.site, "role": v.role, "n_images": v.facts.n_images,
               "format": v.facts.format, "prevalence_withheld": v.facts.prevalence_withheld,
               "prevalence": {lb: (p if p >= 0 and not v.facts.prevalence_withheld else None)
                              for lb, p in zip(LABELS, v.facts.prevalence, strict=True)}}
              for v in sorted(nodes.values(), key=lambda v: v.site)]
    privacy = [privacy_row(run, v, st.epsilon.get(v.site)) for v in train_nodes] \
        if run.dp else []
    releases = [{"site": v.site, "role": v.role, **row}
                for v in sorted(nodes.values(), key=lambda v: v.site)
                for row in release_rows(
                    v.role, dp=run.dp, exact_counts=v.facts.exact_counts,
                    site_epsilon=st.epsilon.get(v.site),
                    counts_epsilon=v.facts.counts_epsilon if v.facts.counts_epsilon >= 0
                    else None, min_cell=v.facts.min_cell)]
    protocol = Protocol(primary_labels=primary, selection=run.selection, margin=run.h1_margin,
                        alpha=run.alpha, correction=run.correction,
                        primary_metric=run.primary_metric)
    results = build_results(
        cohort=cohort, arms=arm_rows(run, st, selection), evaluation=evaluation,
        federated=FEDERATED, privacy=privacy, protocol=protocol, internal=internal,
        screening={"rejected": len(st.rejections),
                   "rejections": [asdict(r) for r in st.rejections],
                   "failures": [asdict(f) for f in st.failures], "role_probe": role_probe},
        config={**as_flower(run), "thresholds": thresholds,
                "validation_mean_auc": selection.validation_auc},
        fingerprints={r["site"]: r.get("fingerprint") for r in site_results},
        releases=releases, client_dp=client_dp_row(run, st, len(train_nodes)))
    results["provenance"]["seeds"] = {"seed": run.seed}
    results["provenance"]["seconds"] = round(time.time() - started, 1)
    rpath, hpath = write_report(results, run_dir)
    log.info("%s", results["verdict"]["overall"])
    log.info("results: %s ; report: %s (%.1f s)", rpath.resolve(), hpath.resolve(),
             time.time() - started)
    return results
