"""The run state of the ServerApp: what a resumed run needs, as typed records.

``RunState.to_checkpoint`` / ``from_checkpoint`` turn it into plain dicts, lists and arrays
(``server.checkpoint`` saves those atomically after every round) and back; a checkpoint
written before every arm had a selected model (it kept only the best global model, ``best``)
is read as the federated arm's selection. Models are ``StoredWeights`` (their file under
``checkpoints/weights``, ``server.weight_files``); a checkpoint of format 2 or earlier holds
them as arrays, which ``spill`` writes to files on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from common import protocol as wire
from common.labels import LABELS
from server.updates import Rejection
from server.weight_files import StoredWeights, WeightFiles, Weights

FEDERATED = "federated"
CENTRALISED = "centralised"  # the centralised reference (simulation only; cli.reference)
CENTRALISED_LABEL = "centralised (simulation only; impossible in a real federation)"


def single(site: str) -> str:
    return f"single:{site}"


@dataclass
class PooledValidation:
    """One model's validation summed over the training sites that validated it."""

    sites: list[str] = field(default_factory=list)
    aucs: list[float] = field(default_factory=list)
    pos: np.ndarray | None = None
    neg: np.ndarray | None = None

    def add(self, site: str, v: wire.ValidationSummary) -> None:
        self.sites.append(site)
        if v.mean_auc is not None:
            self.aucs.append(v.mean_auc)
        pos = np.array([v.pos_ge[lb] for lb in LABELS], dtype=np.int64)
        neg = np.array([v.neg_ge[lb] for lb in LABELS], dtype=np.int64)
        self.pos = pos if self.pos is None else self.pos + pos
        self.neg = neg if self.neg is None else self.neg + neg

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.aucs)) if self.aucs else None


@dataclass
class SelectedModel:
    """An arm's selected model so far: its round, validation and weights."""

    round: int
    mean_val_auc: float | None
    pos: np.ndarray | None  # pooled validation ROC counts (for thresholds)
    neg: np.ndarray | None
    sites: list[str]
    weights: StoredWeights | Weights


@dataclass
class HistoryRow:
    """One arm in one round (a metrics.csv row and a results.json history entry).

    ``sites_trained``: the sites whose update of this round went into the arm (the federated
    arm: accepted updates that were aggregated; a single-site arm: 1). ``sites_validated``:
    the sites that validated the arm's model of this round (the federated arm's round-r model
    is validated by round r+1's train messages, so a site can train in one round and not the
    other: the two counts differ after a failure or a resume)."""

    round: int
    arm: str
    sites_trained: int
    sites_validated: int
    loss: float | None
    val_auc: float | None
    epsilon: float | None
    seconds: float | None = None


@dataclass
class Failure:
    """An (arm, site) that was asked to train in a round and did not answer with a result."""

    round: int
    arm: str
    site: str
    node: int
    reason: str


@dataclass
class RunState:
    round: int = 0
    arms: dict[str, StoredWeights | Weights] = field(default_factory=dict)
    selected: dict[str, SelectedModel] = field(default_factory=dict)
    strategy: dict = field(default_factory=dict)
    history: list[HistoryRow] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    # arm -> the rounds in which its weights changed (the federated arm: an aggregate was
    # taken; a single-site arm: its site's trained model came back). Empty: never trained.
    trained: dict[str, list[int]] = field(default_factory=dict)

    def stored(self) -> list[StoredWeights]:
        """Every model file the state names (arms and selected models)."""
        models = [*self.arms.values(), *(s.weights for s in self.selected.values())]
        return [w for w in models if isinstance(w, StoredWeights)]

    def spill(self, files: WeightFiles) -> None:
        """Every model a file of ``files`` (on resume): models held as arrays (a checkpoint
        of format 2 or earlier) written once each (a selected model that shares its arm's
        arrays: the arm's file), files of another run folder linked in."""
        written: dict[int, StoredWeights] = {}

        def stored(name: str, weights):
            if isinstance(weights, StoredWeights):
                return files.adopt(weights)
            key = id(next(iter(weights.values()), None))  # the same arrays: the same file
            if key not in written:
                written[key] = files.put(f"resumed-{name}", weights)
            return written[key]

        self.map_models(stored)

    def map_models(self, fn: Callable[[str, StoredWeights | Weights], StoredWeights | Weights]
                   ) -> None:
        """Every model (each arm's, then each selected one) replaced by ``fn(name, model)``;
        ``name`` says which model it is."""
        self.arms = {arm: fn(arm, w) for arm, w in self.arms.items()}
        for arm, sel in self.selected.items():
            sel.weights = fn(f"{arm}-selected-round-{sel.round:03d}", sel.weights)

    def federated_row(self, rnd: int) -> HistoryRow:
        return next(h for h in self.history if h.round == rnd and h.arm == FEDERATED)

    def to_checkpoint(self) -> dict:
        """Plain dicts, lists and arrays (no copy of any array)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["selected"] = {arm: dict(vars(s)) for arm, s in self.selected.items()}
        for key in ("history", "rejections", "failures"):
            out[key] = [asdict(x) for x in out[key]]
        return out

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunState:
        state = dict(state)
        best = state.pop("best", None)
        if best is not None and "selected" not in state:
            state["selected"] = {FEDERATED: best} if best else {}
        state["selected"] = {arm: SelectedModel(**s)
                             for arm, s in state.get("selected", {}).items()}
        state["history"] = [HistoryRow(**_history_row(h)) for h in state.get("history", [])]
        state["rejections"] = [Rejection(**r) for r in state.get("rejections", [])]
        state["failures"] = [Failure(**f) for f in state.get("failures", [])]
        if "trained" not in state:  # a checkpoint from before: every arm trained every round
            state["trained"] = {arm: list(range(1, int(state.get("round", 0)) + 1))
                                for arm in state.get("arms", {})}
        return cls(**state)


def _history_row(h: dict) -> dict:
    """A history row of a checkpoint written before sites_trained / sites_validated: its one
    count was the validating sites of the federated arm and the training site of a single."""
    if "sites_answered" not in h:
        return h
    h = dict(h)
    answered = h.pop("sites_answered")
    h["sites_validated"] = answered
    h["sites_trained"] = answered if h["arm"] != FEDERATED else 0
    return h
