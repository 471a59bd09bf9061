"""Run and node config: one typed parser, unknown keys are errors, docs match the code."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from common.config import NodeConfig, RunConfig, parse
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_and_readme_document_every_run_config_key():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    documented = pyproject["tool"]["flwr"]["app"]["config"]
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    assert documented == fields
    readme = (ROOT / "README.md").read_text()
    for key in fields:
        assert f"| `{key}` |" in readme, key


def test_unknown_and_badly_typed_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown key 'num-round'"):
        parse(RunConfig, {"num-round": 3}, what="run config")
    with pytest.raises(ConfigError, match="'num-rounds' = 'many' is not a whole number"):
        parse(RunConfig, {"num-rounds": "many"}, what="run config")
    with pytest.raises(ConfigError, match="strategy"):
        parse(RunConfig, {"strategy": "fedbest"}, what="run config")
    with pytest.raises(ConfigError, match="role"):
        parse(NodeConfig, {"role": "admin"}, what="node config")
    run = parse(RunConfig, {"num-rounds": "3", "dp": "true", "lr": 0.01}, what="run config")
    assert (run.num_rounds, run.dp, run.lr) == (3, True, 0.01)


@pytest.mark.parametrize("key,value", [
    ("image-size", 0), ("image-size", 5000), ("batch-size", -1), ("lr", -1), ("lr", "nan"),
    ("trim-fraction", -0.5), ("min-train-sites", -1), ("round-timeout", -1),
    ("max-grad-norm", 0), ("num-rounds", 2.7), ("num-rounds", 0), ("local-epochs", True),
])
def test_every_numeric_run_config_key_is_range_checked(key, value):
    """Out-of-range and non-whole values are one-line errors naming the key (2.7 rounds
    used to become 2 silently)."""
    with pytest.raises(ConfigError, match=key) as info:
        parse(RunConfig, {key: value}, what="run config")
    assert "\n" not in str(info.value)


def test_ranges_name_only_numeric_fields_and_accept_the_defaults():
    from common.config import RANGES

    kinds = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    assert set(RANGES) <= set(kinds)
    assert all(kinds[name] in ("int", "float") for name in RANGES)
    numeric = {n for n, k in kinds.items() if k in ("int", "float")}
    assert numeric - set(RANGES) <= {"h1_margin", "alpha"}  # checked by their own rules
    RunConfig()  # every default is in range


def test_node_config_pixel_budget_is_checked():
    with pytest.raises(ConfigError, match="max-image-mb"):
        parse(NodeConfig, {"max-image-mb": 0}, what="node config")
    assert parse(NodeConfig, {"allow-outside": "true"}, what="node config").allow_outside
