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

import functools
import json
import math
import re
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

from common.errors import MessageRejected
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
    MALFORMED = 4007  # the message's content fails its schema (see MessageRejected)


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


# ---------------------------------------------------------------- what a site accepts
# Every value that arrives is untrusted at the site. Names (models, arms, runs) are plain
# names: they end up in file names and logs. JSON fields are bounded before they are parsed.
NAME_RE = re.compile(r"^\w[\w .:+@-]{0,127}$")
MAX_JSON_CHARS = 1 << 20  # the largest JSON field a site parses (thresholds of many models)
MAX_MODELS = 256
MAX_ROUND = 1_000_000
NORMS = ("batch", "group")


def _reject(what: str, value, rule: str) -> MessageRejected:
    shown = repr(value)
    return MessageRejected(f"{what} = {shown[:60]}{'...' if len(shown) > 60 else ''}: {rule}")


def checked_name(value, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _reject(what, value, "not a plain name (letters, digits, space and ._:+@-, at "
                                   "most 128, starting with a letter or digit)")
    return value


def checked_text(value, what: str, max_len: int = 200) -> str:
    """A free text (a run name): bounded here; the site reduces it before it names a file."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len or "\x00" in value:
        raise _reject(what, value, f"not a text of 1 to {max_len} characters")
    return value


def checked_int(value, what: str, low: int = 0, high: int = MAX_ROUND) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _reject(what, value, f"not a whole number in [{low}, {high}]")
    return value


def checked_float(value, what: str, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not low <= value <= high:
        raise _reject(what, value, f"not a finite number in [{low:g}, {high:g}]")
    return float(value)


def checked_norm(value) -> str:
    if value not in NORMS:
        raise _reject("norm", value, f"not one of {', '.join(NORMS)}")
    return value


def checked_json(value, what: str):
    """Parse a JSON field after bounding its size (a 1 GB string is refused unparsed)."""
    if not isinstance(value, str) or len(value) > MAX_JSON_CHARS:
        size = len(value) if isinstance(value, str) else type(value).__name__
        raise _reject(what, f"<{size}>", f"not a JSON text of at most {MAX_JSON_CHARS} chars")
    try:
        return json.loads(value)
    except ValueError as exc:
        raise _reject(what, value, f"not valid JSON ({exc})") from exc


def checked_labels(value, what: str) -> list[str]:
    if not isinstance(value, list) or any(v not in LABELS for v in value) \
            or len(set(value)) != len(value):
        raise _reject(what, value, "not a list of distinct canonical label names")
    return value


def checked_names(value, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_MODELS:
        raise _reject(what, value, f"not a list of at most {MAX_MODELS} names")
    return [checked_name(v, what) for v in value]


def _schema(decode):
    """A decoder that turns any missing or mistyped key into MessageRejected (a refusal),
    never a traceback at the site."""

    @functools.wraps(decode)
    def wrapper(cls, content):
        try:
            return decode(cls, content)
        except MessageRejected:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MessageRejected(f"{cls.__name__}: the message content is missing or "
                                  f"mistypes a key ({type(exc).__name__}: {str(exc)[:80]})"
                                  ) from exc

    return wrapper


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
    @_schema
    def decode(cls, content: RecordDict) -> TrainRequest:
        c = content[CONFIG]
        seed_max = 2**63 - 1
        single = (ArmTask(checked_name(c["single-arm"], "single-arm"),
                          checked_int(c["single-seed"], "single-seed", 0, seed_max),
                          content[SINGLE + ARRAYS])
                  if SINGLE + ARRAYS in content else None)
        own = {"server-round", "norm", "run-name", "planned-units", "arm", "seed",
               "validate-received", "report-val", "proximal-mu", "single-arm", "single-seed"}
        return cls(checked_int(c["server-round"], "server-round"), checked_norm(c["norm"]),
                   checked_text(c["run-name"], "run-name"),
                   checked_int(c["planned-units"], "planned-units", 0, 2**40),
                   ArmTask(checked_name(c["arm"], "arm"),
                           checked_int(c["seed"], "seed", 0, seed_max), content[ARRAYS]),
                   single, bool(c.get("validate-received", False)),
                   bool(c.get("report-val", False)),
                   checked_float(c.get("proximal-mu", 0.0), "proximal-mu"),
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
    models = {checked_name(k.removeprefix(MODEL), "model name"): rec
              for k, rec in content.items() if k.startswith(MODEL)}
    if len(models) > MAX_MODELS:
        raise MessageRejected(f"{len(models)} models in one message; at most {MAX_MODELS}")
    if any(not isinstance(rec, ArrayRecord) for rec in models.values()):
        raise MessageRejected("a model's weights are not an array record")
    return models


def _one_model(content: RecordDict, kind: str) -> tuple[str, ArrayRecord]:
    models = _models_in(content)
    if len(models) != 1:
        raise MessageRejected(f"{kind} message carries one model, not {len(models)}")
    ((name, arrays),) = models.items()
    return name, arrays


@dataclass(frozen=True)
class ValidateRequest:
    """Validate each model on the training site's validation split."""

    models: dict[str, ArrayRecord]
    norm: str

    def encode(self) -> RecordDict:
        return RecordDict({**_models(self.models), CONFIG: ConfigRecord({"norm": self.norm})})

    @classmethod
    @_schema
    def decode(cls, content: RecordDict) -> ValidateRequest:
        return cls(_models_in(content), checked_norm(content[CONFIG]["norm"]))


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
    """Evaluate one selected model on the training site's own test split; the statistics
    come back at once (each model's are its own: no statistic of internal validation
    compares models). One model per message, as scoring: a message's size and the server's
    memory do not grow with the number of arms, which is the number of sites."""

    name: str
    arrays: ArrayRecord
    norm: str
    primary: list[str]
    run_name: str  # the site keeps the model's monitoring baseline under it

    def encode(self) -> RecordDict:
        return RecordDict({MODEL + self.name: self.arrays, CONFIG: ConfigRecord(
            {"norm": self.norm, "primary": _json(self.primary), "run-name": self.run_name})})

    @classmethod
    @_schema
    def decode(cls, content: RecordDict) -> InternalRequest:
        name, arrays = _one_model(content, "an internal validation")
        c = content[CONFIG]
        return cls(name, arrays, checked_norm(c["norm"]),
                   checked_labels(checked_json(c["primary"], "primary"), "primary"),
                   checked_text(c["run-name"], "run-name"))


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
    @_schema
    def decode(cls, content: RecordDict) -> ScoreRequest:
        name, arrays = _one_model(content, "a score")
        c = content[CONFIG]
        return cls(name, arrays, checked_norm(c["norm"]), checked_text(c["run-name"], "run-name"))


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
    @_schema
    def decode(cls, content: RecordDict) -> ExternalRequest:
        c = content[CONFIG]
        models = checked_names(checked_json(c["models"], "models"), "models")
        thresholds = checked_json(c["thresholds"], "thresholds")
        if not isinstance(thresholds, dict) or len(thresholds) > MAX_MODELS:
            raise _reject("thresholds", thresholds, "not an object of at most "
                          f"{MAX_MODELS} models")
        for name, per_label in thresholds.items():
            checked_name(name, "thresholds model")
            if not isinstance(per_label, dict):
                raise _reject(f"thresholds[{name}]", per_label, "not an object label -> number")
            checked_labels(list(per_label), f"thresholds[{name}]")
            for label, t in per_label.items():
                checked_float(t, f"thresholds[{name}][{label}]", -1.0, 2.0)
        pairs = checked_json(c["primary-pairs"], "primary-pairs")
        if not isinstance(pairs, list) or len(pairs) > MAX_MODELS \
                or any(not isinstance(p, list) or len(p) != 2 for p in pairs):
            raise _reject("primary-pairs", pairs, "not a list of [model, model] pairs")
        return cls(checked_text(c["run-name"], "run-name"), models, thresholds,
                   checked_labels(checked_json(c["primary"], "primary"), "primary"),
                   [(checked_name(a, "primary-pairs"), checked_name(b, "primary-pairs"))
                    for a, b in pairs])


@dataclass(frozen=True)
class StatisticsReply:
    """A site's aggregate statistics (the evaluator's tables) as one JSON document."""

    results: dict

    def encode(self) -> RecordDict:
        return RecordDict({RESULTS: ConfigRecord({"json": _json(self.results)})})

    @classmethod
    def decode(cls, content: RecordDict) -> StatisticsReply:
        return cls(json.loads(str(content[RESULTS]["json"])))
