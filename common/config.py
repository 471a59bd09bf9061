"""Typed run and node configuration. One parser for both; unknown keys are an error.

Run config (``[tool.flwr.app.config]`` / ``--run-config``) describes the experiment; node
config (``flower-supernode --node-config``) describes the site. Keys are kebab-case in Flower
and snake_case here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_args

from common.errors import ConfigError
from common.evaluation.metrics import THRESHOLD_METHODS, ThresholdMethod
from common.labels import LABELS
from common.privacy import ACCOUNTANTS, PRIVACY_UNITS, Accountant, PrivacyUnit

# Enumerated config values, declared once as types; checked when a config is parsed.
Strategy = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"]
Role = Literal["train", "evaluate"]
Selection = Literal["best-val", "last"]  # model selection rule, the same for every arm
PrimaryMetric = Literal["macro-auc"]
Correction = Literal["holm", "bh"]
GradSampleMode = Literal["bk", "ghost", "hooks"]
TransportDtype = Literal["float32", "float16"]
ClientDP = Literal["off", "fixed-server", "fixed-client", "adaptive-server", "adaptive-client"]
# Which round checkpoints stay on disk (latest.pt always: it alone resumes a run and holds
# every arm's selected model). "last,best": the last round's file and the round of the
# federated arm's selected model; "all": every round (about 2 x 28 MB per arm and round).
KeepCheckpoints = Literal["last,best", "last", "all"]
STRATEGIES = get_args(Strategy)
ROLES = get_args(Role)

# field -> allowed values, for every enumerated run-config field (before any training).
CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": STRATEGIES,
    "grad_sample_mode": get_args(GradSampleMode),
    "transport_dtype": get_args(TransportDtype),
    "correction": get_args(Correction),
    "threshold_method": THRESHOLD_METHODS,
    "accountant": ACCOUNTANTS,
    "privacy_unit": PRIVACY_UNITS,
    "client_dp": get_args(ClientDP),
    "selection": get_args(Selection),
    "primary_metric": get_args(PrimaryMetric),
    "keep_checkpoints": get_args(KeepCheckpoints),
}


# field -> (low, high, low open, high open): every numeric run-config key's valid range,
# checked before any training (a batch size of -1 or an lr of nan must not reach the nodes).
INF = math.inf
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "num_rounds": (1, 10_000, False, False),
    "gradcam_max_images": (0, 100_000, False, False),
    "local_epochs": (1, 1_000, False, False),
    "image_size": (16, 1024, False, False),
    "batch_size": (1, 65_536, False, False),
    "lr": (0, 10, True, False),
    "proximal_mu": (0, INF, False, True),
    "trim_fraction": (0, 0.5, False, True),
    "fedadam_eta": (0, 10, True, False),
    "seed": (0, 2**63 - 1, False, False),
    "target_epsilon": (0, INF, True, True),
    "max_grad_norm": (0, INF, True, True),
    "count_noise_multiplier": (0, INF, True, True),
    "client_noise_multiplier": (0, INF, True, True),
    "client_clipping_norm": (0, INF, True, True),
    "min_train_sites": (1, 100_000, False, False),
    "screen_norm_factor": (0, INF, True, True),
    "threshold_target": (0, 1, True, True),
    "round_timeout": (0, INF, True, True),
    "max_in_flight": (0, 1_000_000, False, False),
    "max_images_per_site": (0, 2**63 - 1, False, False),
}


def check_ranges(obj, ranges: dict[str, tuple[float, float, bool, bool]], what: str) -> None:
    """A one-line ConfigError for the first value outside its range (nan is outside all)."""
    for name, (lo, hi, lo_open, hi_open) in ranges.items():
        value = getattr(obj, name)
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        if math.isnan(value) or below or above:
            interval = (f"{'(' if lo_open else '['}{lo:g}, "
                        f"{'inf' if hi == INF else f'{hi:g}'}{')' if hi_open else ']'}")
            raise ConfigError(f"{what} {name.replace('_', '-')} = {value!r}: use a value in "
                              f"{interval}")


def norm_for(dp: bool) -> str:
    """The model's normalisation: GroupNorm under DP (Opacus needs it), else BatchNorm."""
    return "group" if dp else "batch"


def label_list(text: str, *, key: str) -> list[str]:
    """Comma-separated canonical label names; an unknown name is an error naming the key."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in LABELS]
    if bad:
        raise ConfigError(f"run config {key}: unknown label(s) {', '.join(bad)}; use "
                          f"{', '.join(LABELS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"run config {key}: a label is named twice")
    return names


def model_specs(text: str, *, key: str) -> dict[str, str]:
    """``name=path,...`` -> {name: path}; names must be unique and not an arm's name."""
    out: dict[str, str] = {}
    for spec in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"run config {key}: {spec!r} is not name=path")
        if name in out or name in ("federated", "centralised") or name.startswith("single:"):
            raise ConfigError(f"run config {key}: model name {name!r} is used twice or is an "
                              "arm's name; choose another")
        out[name] = path
    return out


@dataclass(frozen=True)
class RunConfig:
    num_rounds: int = 2
    local_epochs: int = 1
    image_size: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    strategy: Strategy = "fedavg"
    proximal_mu: float = 0.0
    trim_fraction: float = 0.2
    fedadam_eta: float = 0.01  # FedAdam's server learning rate
    seed: int = 0
    dp: bool = False
    target_epsilon: float = 8.0
    max_grad_norm: float = 1.0
    accountant: Accountant = "prv"
    # What DP protects: a patient (sampled as a whole, one clipped gradient per step however
    # many images it has) or an image (a patient with k images gets about k x ε).
    privacy_unit: PrivacyUnit = "patient"
    # Under DP: the noise multiplier of each site's one release of its label counts (for
    # pos_weight and prevalence; L2 sensitivity sqrt(14), accounted in the site's ledger).
    count_noise_multiplier: float = 10.0
    # Client-level DP of the federated arm (a whole site's contribution), by Flower's own
    # strategy wrappers: clipping of each site's update (fixed, or adaptive from this initial
    # norm) at the server or the client, Gaussian noise on the mean.
    client_dp: ClientDP = "off"
    client_noise_multiplier: float = 1.0
    client_clipping_norm: float = 1.0
    grad_sample_mode: GradSampleMode = "bk"  # DP per-image clipping (speed only)
    transport_dtype: TransportDtype = "float32"
    resume_from: str = ""
    keep_checkpoints: KeepCheckpoints = "last,best"
    # MLflow tracking store: "" = SQLite at <out-dir>/mlflow.db; an http(s):// server; "off"
    tracking_uri: str = ""
    out_dir: str = "runs"
    run_name: str = ""
    cohort: str = ""  # simulation: cohort.toml mapping partition id -> site
    min_train_sites: int = 1
    screen_norm_factor: float = 10.0
    threshold_method: ThresholdMethod = "specificity"
    threshold_target: float = 0.9
    correction: Correction = "holm"
    shift: bool = False
    round_timeout: float = 900.0
    # Messages that carry models, pushed at once per exchange (more as replies come); 0: one
    # to every site at once. `fedcxr simulate` sets it to the nodes the simulation runs at
    # once, so its process never holds more messages than are being worked on.
    max_in_flight: int = 0
    max_images_per_site: int = 0  # 0: all; a cap for smoke runs
    # Grad-CAM localisation (H3) at held-out sites: at most this many images per label and
    # model (each costs a forward and a backward); 0: no localisation.
    gradcam_max_images: int = 100
    init_weights: str = ""  # coordinator-local DenseNet-121 weights (torchvision format)
    # The prespecified analysis (results.json "protocol"), fixed before training.
    selection: Selection = "best-val"  # every arm: its best validation round, or the last round
    primary_labels: str = ""  # comma-separated; "": labels annotated at every training site
    primary_metric: PrimaryMetric = "macro-auc"
    h1_margin: float = 0.0  # federated must exceed each single-site model by more than this
    alpha: float = 0.05
    extra_models: str = ""  # name=path,... evaluated at held-out sites beside the arms
    # Simulation only: a model trained on the pooled training sites outside Flower
    # (`fedcxr simulate --pooled-reference`), compared with every arm at held-out sites.
    centralised_reference: str = ""

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"run config {name.replace('_', '-')} = {value!r}: use one of "
                                  f"{', '.join(allowed)}")
        check_ranges(self, RANGES, "run config")
        if self.client_dp != "off":
            if self.strategy not in ("fedavg", "fedprox"):
                raise ConfigError(f"run config client-dp = {self.client_dp!r} needs strategy "
                                  "fedavg or fedprox (its noise is calibrated to a mean)")
            if not (self.client_noise_multiplier > 0 and self.client_clipping_norm > 0):
                raise ConfigError("run config client-noise-multiplier and client-clipping-norm "
                                  "must be positive under client-dp")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"run config alpha = {self.alpha}: use a level in (0, 1)")
        if not -1 < self.h1_margin < 1:
            raise ConfigError(f"run config h1-margin = {self.h1_margin}: an AUC difference "
                              "in (-1, 1)")
        label_list(self.primary_labels, key="primary-labels")
        model_specs(self.extra_models, key="extra-models")

    @property
    def norm(self) -> str:
        """GroupNorm under sample-level DP (Opacus) and under client-level DP, where a site's
        whole update is clipped: BatchNorm's running statistics (and its integer step counter)
        would be part of that update."""
        return norm_for(self.dp or self.client_dp != "off")


DEFAULT_MAX_EPSILON = 10.0


@dataclass(frozen=True)
class NodeConfig:
    role: Role = "train"
    site_name: str = ""
    data_path: str = ""
    manifest: str = ""
    format: str = ""
    cache_path: str = ""
    ledger_path: str = ""
    # The site's own privacy budget. Set, it is a promise the coordinator cannot loosen:
    # the node trains only under DP (a train message of a run with dp=false is refused) and
    # never past it. Unset: DP runs spend up to DEFAULT_MAX_EPSILON.
    max_epsilon: float | None = None
    # Small-cell control: no count or rate this site releases exactly rests on fewer images.
    min_cell: int = 10
    # Under DP, label counts (prevalence) leave noised and accounted unless this is true.
    release_exact_counts: bool = False
    # Run only apps whose FAB hash the site approved (`fedcxr site approve`); enforced by the
    # site's launcher (deploy/site-bin on the node's PATH), before any app code runs.
    require_approval: bool = False
    # Hostile-input controls: data paths may lead outside data-path only if the site says so,
    # and no file whose header declares more raw pixel bytes than this is decoded.
    allow_outside: bool = False
    max_image_mb: float = 64.0
    # Where the node trains and scores: auto (CUDA when this machine has it), cpu, cuda[:N].
    device: str = "auto"
    # Reader / box annotation files (comma-separated; "": found beside the manifest) and
    # whether Grad-CAM overlays are written under the site's state folder (never sent).
    readers: str = ""
    boxes: str = ""
    gradcam_overlays: bool = False
    # set by Flower's simulation engine
    partition_id: int = -1
    num_partitions: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"node config role={self.role!r}: use train or evaluate")
        if self.max_epsilon is not None and not (math.isfinite(self.max_epsilon)
                                                 and self.max_epsilon > 0):
            raise ConfigError(f"node config max-epsilon={self.max_epsilon!r}: use a finite "
                              "positive number (the site's privacy budget)")
        if self.min_cell < 1:
            raise ConfigError(f"node config min-cell={self.min_cell}: use a count of at least "
                              "1 (default 10)")
        check_ranges(self, {"max_image_mb": (0, 65_536, True, False)}, "node config")

    @property
    def requires_dp(self) -> bool:
        return self.max_epsilon is not None

    @property
    def budget(self) -> float:
        """The ε this site allows in total under DP."""
        return DEFAULT_MAX_EPSILON if self.max_epsilon is None else self.max_epsilon


T = TypeVar("T")


def parse(cls: type[T], raw: dict[str, Any], *, what: str) -> T:
    """Build ``cls`` from kebab-case keys, converting types; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            allowed = ", ".join(k.replace("_", "-") for k in known)
            raise ConfigError(f"{what}: unknown key {key!r}; known keys: {allowed}")
        kind = known[name].type
        try:
            if kind in ("bool", bool):
                values[name] = _boolean(value)
            elif kind == "float | None":
                values[name] = None if value is None or value == "" else float(value)
            elif kind in ("int", int):
                values[name] = _integer(value)
            elif kind in ("float", float):
                values[name] = float(value)
            else:
                values[name] = str(value)
        except (TypeError, ValueError) as exc:
            hint = "; use true or false" if kind in ("bool", bool) else ""
            noun = {"int": "whole number", "float": "number", "bool": "boolean",
                    "float | None": "number"}.get(str(getattr(kind, "__name__", kind)), kind)
            raise ConfigError(f"{what}: key {key!r} = {value!r} is not a {noun}{hint}") from exc
    return cls(**values)


def _integer(value: Any) -> int:
    """A whole number: 3, "3", 3.0; never 2.7 silently truncated to 2, nor true."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    return int(str(value).strip())


def _boolean(value: Any) -> bool:
    """true/false (TOML), 1/0, or the strings true/false/1/0/yes/no; anything else (``"on"``,
    a typo) is an error, never a silent false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0",
                                                            "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{value!r} is not a boolean")


def toml_value(v: Any) -> str:
    """One value as TOML (for the run-config and cohort files we write)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def as_flower(obj) -> dict[str, Any]:
    """Back to kebab-case keys (for logs, checkpoints and results.json)."""
    return {k.replace("_", "-"): v for k, v in dataclasses.asdict(obj).items()}
