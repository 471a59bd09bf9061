"""What crosses the wire between the ServerApp and the ClientApp, defined once.

Every message kind is a small typed dataclass with ``encode`` (to a Flower ``RecordDict``)
and ``decode`` (from one); both apps use these and write no record key themselves. Messages
are routed by Flower's message-type actions (``evaluate.validate``, ...) rather than by a
string inside the content, and an expected refusal travels as a Flower ``Error`` with one of
our codes (``Refusal``), so the server never searches an error's text.

| message type          | request            | reply              | to                  |
| --------------------- | ------------------ | ------------------ | ------------------- |
| ``query``             | (empty)            | ``SiteFacts``      | every node          |
| ``train``             | ``TrainRequest``   | ``TrainReply``     | training nodes      |
| ``train`` (probe)     | ``role_probe()``   | ``Refusal.ROLE``   | held-out nodes      |
| ``evaluate.validate`` | ``ValidateRequest``| ``ValidateReply``  | training nodes      |
| ``evaluate.internal`` | ``InternalRequest``| ``StatisticsReply``| training nodes      |
| ``evaluate.score``    | ``ScoreRequest``   | ``ScoreReply``     | held-out nodes      |
| ``evaluate.external`` | ``ExternalRequest``| ``StatisticsReply``| held-out nodes      |

The federated arm of a train message uses the keys a Flower strategy reads and writes
(``arrays``, ``config``, ``metrics``, ``num-examples``), so ``configure_train`` and
``aggregate_train`` work on it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.labels import LABELS

QUERY = MessageType.QUERY
TRAIN = MessageType.TRAIN
VALIDATE = f"{MessageType.EVALUATE}.validate"
INTERNAL = f"{MessageType.EVALUATE}.internal"
SCORE = f"{MessageType.EVALUATE}.score"
EXTERNAL = f"{MessageType.EVALUATE}.external"
ACTIONS = {"validate": VALIDATE, "internal": INTERNAL, "score": SCORE, "external": EXTERNAL}

# Record names and keys (the strategy's own: ARRAYS, CONFIG, METRICS, EXAMPLES).
ARRAYS, CONFIG, METRICS, EXAMPLES = "arrays", "config", "metrics", "num-examples"
SITE, META, RESULTS, RECEIVED, VAL = "site", "meta", "results", "val-received", "val"
SINGLE = "single/"  # prefix of a train message's second (single-site) arm
MODEL = "model/"  # prefix of a model's weights in an evaluate message
VAL_OF = "val/"  # prefix of a model's validation in a validate reply
POS_GE, NEG_GE = "pos-ge/", "neg-ge/"  # prefixes of ROC counts, one key per label


class Refusal(IntEnum):
    """Error codes of expected refusals (Flower's own codes are below 100)."""

    ROLE = 4001  # a held-out node was asked to train: it never trains on its data
    WRONG_ROLE = 4002  # an evaluate action sent to a node of the other role
    DP_REQUIRED = 4003  # a train message without DP at a site whose node config sets a budget
    BUDGET = 4004  # the arms of a train message would take the site past its max-epsilon
    LEDGER = 4005  # the site's privacy ledger is torn, unreadable or edited: no DP training
    AUDIT = 4006  # the site's audit log cannot be written: no reply leaves unlogged


def refuse(msg: Message, code: Refusal, reason: str) -> Message:
    """The error reply of an expected refusal (no traceback at the node)."""
    return Message(Error(code=int(code), reason=reason), reply_to=msg)


def refusal(reply: Message) -> Refusal | None:
    """The refusal a reply carries, if it is one of ours."""
    if not reply.has_error():
        return None
    try:
        return Refusal(int(reply.error.code))
    except ValueError:
        return None


def _json(value) -> str:
    return json.dumps(value)


# ---------------------------------------------------------------- query


@dataclass(frozen=True)
class SiteFacts:
    """A node's answer to ``query``: its own config's role, its data's sizes and label
    prevalence (-1: label not annotated), and its privacy budget (-1: no DP)."""

    role: str
    site: str
    format: str
    n_train: int
    n_val: int
    n_test: int
    n_images: int
    prevalence: list[float]
    epsilon_spent: float
    epsilon_left: float
    max_epsilon: float
    # DP facts (a training site under DP): the δ its ε is at, what one privacy unit is, how
    # many units its training split has, and the most images one patient has there.
    delta: float = -1.0
    privacy_unit: str = ""
    n_units: int = 0
    max_images_per_patient: int = 0
    # What the site's releases rest on: its small-cell floor, whether its label counts left
    # exactly (node config release-exact-counts), the label-count release's own ε (-1: none),
    # and whether the prevalence was withheld (the release was refused: budget or ledger).
    min_cell: int = 10
    exact_counts: bool = True
    counts_epsilon: float = -1.0
    prevalence_withheld: bool = False

    def encode(self) -> RecordDict:
        return RecordDict({
            SITE: ConfigRecord({"role": self.role, "site": self.site, "format": self.format,
                                "privacy-unit": self.privacy_unit}),
            METRICS: MetricRecord({
                "n-train": self.n_train, "n-val": self.n_val, "n-test": self.n_test,
                "n-images": self.n_images, "prevalence": list(self.prevalence),
                "epsilon-spent": self.epsilon_spent, "epsilon-left": self.epsilon_left,
                "max-epsilon": self.max_epsilon, "delta": self.delta, "n-units": self.n_units,
                "max-images-per-patient": self.max_images_per_patient,
                "min-cell": self.min_cell, "exact-counts": int(self.exact_counts),
                "counts-epsilon": self.counts_epsilon,
                "prevalence-withheld": int(self.prevalence_withheld)}),
        })

    @classmethod
    def decode(cls, content: RecordDict) -> SiteFacts:
        s, m = content[SITE], content[METRICS]
        return cls(str(s["role"]), str(s["site"]), str(s["format"]), int(m["n-train"]),
                   int(m["n-val"]), int(m["n-test"]), int(m["n-images"]),
                   [float(p) for p in m["prevalence"]], float(m["epsilon-spent"]),
                   float(m["epsilon-left"]), float(m["max-epsilon"]), float(m["delta"]),
                   str(s["privacy-unit"]), int(m["n-units"]), int(m["max-images-per-patient"]),
                   int(m["min-cell"]), bool(m["exact-counts"]), float(m["counts-epsilon"]),
                   bool(m["prevalence-withheld"]))


# ---------------------------------------------------------------- validation summary


@dataclass(frozen=True)
class ValidationSummary:
    """Aggregate validation of one model at one site: per-label AUC (None: not estimable)
    and ROC counts on the fixed threshold grid (for pooled threshold choice)."""

    n: int
    mean_auc: float | None
    auc: list[float | None]
    pos_ge: dict[str, list[int]]
    neg_ge: dict[str, list[int]]

    def encode(self) -> MetricRecord:
        return MetricRecord({
            EXAMPLES: max(self.n, 1),
            "val-auc-mean": self.mean_auc if self.mean_auc is not None else -1.0,
            "val-auc": [a if a is not None else -1.0 for a in self.auc],
            **{POS_GE + lb: self.pos_ge[lb] for lb in LABELS},
            **{NEG_GE + lb: self.neg_ge[lb] for lb in LABELS},
        })

    @classmethod
    def decode(cls, rec: MetricRecord) -> ValidationSummary:
        mean = float(rec["val-auc-mean"])
        return cls(int(rec[EXAMPLES]), mean if mean >= 0 else None,
                   [float(a) if a >= 0 else None for a in rec["val-auc"]],
                   {lb: list(rec[POS_GE + lb]) for lb in LABELS},
                   {lb: list(rec[NEG_GE + lb]) for lb in LABELS})


# ---------------------------------------------------------------- train


@dataclass(frozen=True)
class ArmTask:
    """One arm to train: its name, weights and seed."""

    arm: str
    seed: int
    arrays: ArrayRecord


@dataclass(frozen=True)
class TrainRequest:
    """Up to two arms of one round for one site, trained one after the other: ``first``
    (the federated arm, in the strategy's keys, or a single-site arm alone) and ``single``
    (the site's own model sharing the message). ``validate_received`` asks for the
    validation of ``first`` as received (the previous round's global model); ``report_val``
    asks for the validation of each trained model (a single-site arm is selected on it)."""

    server_round: int
    norm: str
    run_name: str
    planned_units: int
    first: ArmTask
    single: ArmTask | None = None
    validate_received: bool = False
    report_val: bool = False
    proximal_mu: float = 0.0
    strategy_config: dict = field(default_factory=dict)  # what configure_train added

    def encode(self) -> RecordDict:
        config = {**self.strategy_config, "server-round": self.server_round, "norm": self.norm,
                  "run-name": self.run_name, "planned-units": self.planned_units,
                  "arm": self.first.arm, "seed": self.first.seed,
                  "validate-received": self.validate_received, "report-val": self.report_val,
                  "proximal-mu": self.proximal_mu}
        records = {ARRAYS: self.first.arrays}
        if self.single is not None:
            config.update({"single-arm": self.single.arm, "single-seed": self.single.seed})
            records[SINGLE + ARRAYS] = self.single.arrays
        return RecordDict({**records, CONFIG: ConfigRecord(config)})

    @classmethod
    def decode(cls, content: RecordDict) -> TrainRequest:
        c = content[CONFIG]
        single = (ArmTask(str(c["single-arm"]), int(c["single-seed"]), content[SINGLE + ARRAYS])
                  if SINGLE + ARRAYS in content else None)
        own = {"server-round", "norm", "run-name", "planned-units", "arm", "seed",
               "validate-received", "report-val", "proximal-mu", "single-arm", "single-seed"}
        return cls(int(c["server-round"]), str(c["norm"]), str(c["run-name"]),
                   int(c["planned-units"]), ArmTask(str(c["arm"]), int(c["seed"]),
                                                    content[ARRAYS]),
                   single, bool(c.get("validate-received", False)),
                   bool(c.get("report-val", False)), float(c.get("proximal-mu", 0.0)),
                   {k: v for k, v in c.items() if k not in own})


def from_strategy(message: Message) -> tuple[ArrayRecord, float, dict]:
    """What a Flower strategy's ``configure_train`` put in one node's message: the global
    weights, FedProx's proximal term (0 for the others) and any other config key."""
    config = dict(message.content[CONFIG])
    config.pop("server-round", None)
    return message.content[ARRAYS], float(config.pop("proximal-mu", 0.0)), config


def role_probe() -> RecordDict:
    """A train message with no model: every held-out node must refuse it by its own
    config (``Refusal.ROLE``), proof in every run that held-out data cannot be trained on."""
    return RecordDict({CONFIG: ConfigRecord({"arm": "role-probe", "server-round": 0})})


def message_arms(content: RecordDict) -> list[str]:
    """The arm(s) a train message asks for, without decoding its weights (for the audit)."""
    config = content.get(CONFIG) or {}
    return [str(config[k]) for k in ("arm", "single-arm") if k in config]


def server_round(content: RecordDict) -> int:
    """The round a train message belongs to (for mods that act per round)."""
    return int(content[CONFIG]["server-round"])


@dataclass(frozen=True)
class ArmResult:
    """One trained arm: weights and aggregate numbers (ε -1: no DP)."""

    arm: str
    arrays: ArrayRecord
    examples: int
    loss: float
    epsilon: float
    val_mean_auc: float | None
    val_auc: list[float | None]
    val: ValidationSummary | None = None  # with report_val

    def _metrics(self) -> MetricRecord:
        return MetricRecord({
            EXAMPLES: max(self.examples, 1), "loss": self.loss, "epsilon": self.epsilon,
            "val-auc-mean": self.val_mean_auc if self.val_mean_auc is not None else -1.0,
            "val-auc": [a if a is not None else -1.0 for a in self.val_auc]})

    def records(self, prefix: str) -> dict:
        out = {prefix + ARRAYS: self.arrays, prefix + METRICS: self._metrics()}
        if self.val is not None:
            out[prefix + VAL] = self.val.encode()
        return out

    @classmethod
    def from_records(cls, arm: str, content: RecordDict, prefix: str) -> ArmResult:
        m = content[prefix + METRICS]
        mean = float(m["val-auc-mean"])
        val = (ValidationSummary.decode(content[prefix + VAL]) if prefix + VAL in content
               else None)
        return cls(arm, content[prefix + ARRAYS], int(m[EXAMPLES]), float(m["loss"]),
                   float(m["epsilon"]), mean if mean >= 0 else None,
                   [float(a) if a >= 0 else None for a in m["val-auc"]], val)


@dataclass(frozen=True)
class TrainReply:
    """A site's results of a train message (aggregate numbers and weights only)."""

    site: str
    first: ArmResult
    single: ArmResult | None = None
    received: ValidationSummary | None = None

    def encode(self) -> RecordDict:
        meta = {"arm": self.first.arm, "site": self.site}
        records = self.first.records("")
        if self.single is not None:
            meta["single-arm"] = self.single.arm
            records.update(self.single.records(SINGLE))
        if self.received is not None:
            records[RECEIVED] = self.received.encode()
        return RecordDict({**records, META: ConfigRecord(meta)})

    @classmethod
    def decode(cls, content: RecordDict) -> TrainReply:
        meta = content[META]
        single = (ArmResult.from_records(str(meta["single-arm"]), content, SINGLE)
                  if "single-arm" in meta else None)
        received = (ValidationSummary.decode(content[RECEIVED]) if RECEIVED in content
                    else None)
        return cls(str(meta["site"]), ArmResult.from_records(str(meta["arm"]), content, ""),
                   single, received)


# ---------------------------------------------------------------- evaluate


def _models(models: dict[str, ArrayRecord]) -> dict:
    return {MODEL + name: rec for name, rec in models.items()}


def _models_in(content: RecordDict) -> dict[str, ArrayRecord]:
    return {k.removeprefix(MODEL): rec for k, rec in content.items() if k.startswith(MODEL)}


@dataclass(frozen=True)
class ValidateRequest:
    """Validate each model on the training site's validation split."""

    models: dict[str, ArrayRecord]
    norm: str

    def encode(self) -> RecordDict:
        return RecordDict({**_models(self.models), CONFIG: ConfigRecord({"norm": self.norm})})

    @classmethod
    def decode(cls, content: RecordDict) -> ValidateRequest:
        return cls(_models_in(content), str(content[CONFIG]["norm"]))


@dataclass(frozen=True)
class ValidateReply:
    site: str
    validations: dict[str, ValidationSummary]

    def encode(self) -> RecordDict:
        return RecordDict({META: ConfigRecord({"site": self.site}),
                           **{VAL_OF + name: v.encode() for name, v in self.validations.items()}})

    @classmethod
    def decode(cls, content: RecordDict) -> ValidateReply:
        return cls(str(content[META]["site"]),
                   {k.removeprefix(VAL_OF): ValidationSummary.decode(rec)
                    for k, rec in content.items() if k.startswith(VAL_OF)})


@dataclass(frozen=True)
class InternalRequest:
    """Evaluate every selected model on the training site's own test split (one message
    per site: each message starts a ClientApp process in deployment, and the models are
    scored in one pass over the split)."""

    models: dict[str, ArrayRecord]
    norm: str
    primary: list[str]

    def encode(self) -> RecordDict:
        return RecordDict({**_models(self.models), CONFIG: ConfigRecord(
            {"norm": self.norm, "primary": _json(self.primary)})})

    @classmethod
    def decode(cls, content: RecordDict) -> InternalRequest:
        c = content[CONFIG]
        return cls(_models_in(content), str(c["norm"]), json.loads(str(c["primary"])))


@dataclass(frozen=True)
class ScoreRequest:
    """Score one model at a held-out site; the scores stay on that site's disk."""

    name: str
    arrays: ArrayRecord
    norm: str
    run_name: str

    def encode(self) -> RecordDict:
        return RecordDict({MODEL + self.name: self.arrays, CONFIG: ConfigRecord(
            {"norm": self.norm, "run-name": self.run_name})})

    @classmethod
    def decode(cls, content: RecordDict) -> ScoreRequest:
        ((name, arrays),) = _models_in(content).items()
        c = content[CONFIG]
        return cls(name, arrays, str(c["norm"]), str(c["run-name"]))


@dataclass(frozen=True)
class ScoreReply:
    site: str
    model: str
    n_images: int

    def encode(self) -> RecordDict:
        return RecordDict({META: ConfigRecord({"site": self.site, "model": self.model}),
                           METRICS: MetricRecord({"n-images": self.n_images})})

    @classmethod
    def decode(cls, content: RecordDict) -> ScoreReply:
        return cls(str(content[META]["site"]), str(content[META]["model"]),
                   int(content[METRICS]["n-images"]))


@dataclass(frozen=True)
class ExternalRequest:
    """The statistics of every scored model at a held-out site, at the thresholds sent: the
    first model is compared with each other one (secondary), and each (model_a, model_b) of
    ``primary_pairs`` is compared on the primary endpoint over ``primary`` labels (the server
    decides which of those pairs form the verdict's family)."""

    run_name: str
    models: list[str]
    thresholds: dict[str, dict[str, float]]
    primary: list[str]
    primary_pairs: list[tuple[str, str]]

    def encode(self) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord({
            "run-name": self.run_name, "models": _json(self.models),
            "thresholds": _json(self.thresholds), "primary": _json(self.primary),
            "primary-pairs": _json([list(p) for p in self.primary_pairs])})})

    @classmethod
    def decode(cls, content: RecordDict) -> ExternalRequest:
        c = content[CONFIG]
        return cls(str(c["run-name"]), json.loads(str(c["models"])),
                   json.loads(str(c["thresholds"])), json.loads(str(c["primary"])),
                   [(str(a), str(b)) for a, b in json.loads(str(c["primary-pairs"]))])


@dataclass(frozen=True)
class StatisticsReply:
    """A site's aggregate statistics (the evaluator's tables) as one JSON document."""

    results: dict

    def encode(self) -> RecordDict:
        return RecordDict({RESULTS: ConfigRecord({"json": _json(self.results)})})

    @classmethod
    def decode(cls, content: RecordDict) -> StatisticsReply:
        return cls(json.loads(str(content[RESULTS]["json"])))
