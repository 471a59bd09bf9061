"""Typed run and node configuration. One parser for both; unknown keys are an error.

Run config (``[tool.flwr.app.config]`` / ``--run-config``) describes the experiment; node
config (``flower-supernode --node-config``) describes the site. Keys are kebab-case in Flower
and snake_case here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from common.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
ROLES = ("train", "evaluate")


@dataclass(frozen=True)
class RunConfig:
    num_rounds: int = 2
    local_epochs: int = 1
    image_size: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    trim_fraction: float = 0.2
    seed: int = 0
    dp: bool = False
    target_epsilon: float = 8.0
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "bk"  # DP per-image clipping: bk | ghost | hooks (speed only)
    transport_dtype: str = "float32"
    resume_from: str = ""
    out_dir: str = "runs"
    run_name: str = ""
    cohort: str = ""  # simulation: cohort.toml mapping partition id -> site
    min_train_sites: int = 1
    screen_norm_factor: float = 10.0
    threshold_method: str = "specificity"
    threshold_target: float = 0.9
    correction: str = "holm"
    shift: bool = False
    round_timeout: float = 900.0
    max_images_per_site: int = 0  # 0: all; a cap for smoke runs
    init_weights: str = ""  # coordinator-local DenseNet-121 weights (torchvision format)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.grad_sample_mode not in ("hooks", "ghost", "bk"):
            raise ConfigError("grad-sample-mode must be bk, ghost or hooks")
        if self.transport_dtype not in ("float32", "float16"):
            raise ConfigError("transport-dtype must be float32 or float16")
        if self.num_rounds < 1 or self.local_epochs < 1:
            raise ConfigError("num-rounds and local-epochs must be at least 1")
        if self.correction not in ("holm", "bh"):
            raise ConfigError("correction must be holm or bh")


@dataclass(frozen=True)
class NodeConfig:
    role: str = "train"
    site_name: str = ""
    data_path: str = ""
    manifest: str = ""
    format: str = ""
    cache_path: str = ""
    ledger_path: str = ""
    max_epsilon: float = 10.0
    # set by Flower's simulation engine
    partition_id: int = -1
    num_partitions: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"node config role={self.role!r}: use train or evaluate")


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
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes")
                values[name] = bool(value)
            elif kind in ("int", int):
                values[name] = int(value)
            elif kind in ("float", float):
                values[name] = float(value)
            else:
                values[name] = str(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: key {key!r} = {value!r} is not a {kind}") from exc
    return cls(**values)


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
