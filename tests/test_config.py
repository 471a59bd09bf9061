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
    with pytest.raises(ConfigError, match="'num-rounds' = 'many' is not a int"):
        parse(RunConfig, {"num-rounds": "many"}, what="run config")
    with pytest.raises(ConfigError, match="strategy"):
        parse(RunConfig, {"strategy": "fedbest"}, what="run config")
    with pytest.raises(ConfigError, match="role"):
        parse(NodeConfig, {"role": "admin"}, what="node config")
    run = parse(RunConfig, {"num-rounds": "3", "dp": "true", "lr": 0.01}, what="run config")
    assert (run.num_rounds, run.dp, run.lr) == (3, True, 0.01)
