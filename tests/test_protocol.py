"""The wire protocol is defined once: every message kind encodes and decodes to itself, and
no record key is written as a string anywhere but ``common/protocol.py``."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common import protocol as wire
from common.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]


def arrays(seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({"float": Array(rng.normal(size=7).astype(np.float32)),
                        "int": Array(np.arange(3))})


def same(a, b) -> bool:
    """Dataclass equality with ArrayRecords compared by value."""
    if isinstance(a, ArrayRecord):
        return list(a) == list(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name))
                                          for f in fields(a))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def summary(seed: int, mean: float | None = 0.7) -> wire.ValidationSummary:
    rng = np.random.default_rng(seed)
    return wire.ValidationSummary(
        n=12, mean_auc=mean, auc=[None if k % 5 == 0 else float(rng.random())
                                  for k in range(len(LABELS))],
        pos_ge={lb: [int(x) for x in rng.integers(0, 9, 4)] for lb in LABELS},
        neg_ge={lb: [int(x) for x in rng.integers(0, 9, 4)] for lb in LABELS})


def arm_result(arm: str, seed: int, val=None) -> wire.ArmResult:
    return wire.ArmResult(arm, arrays(seed), 33, 0.25, -1.0, None,
                          [0.5] * len(LABELS), val)


MESSAGES = [
    wire.SiteFacts("train", "st-mary", "nih", 70, 15, 15, 100, [0.1] * 13 + [-1.0], 1.5, 6.5,
                   8.0),
    summary(1),
    summary(2, mean=None),
    wire.TrainRequest(3, "group", "run-a", 6, wire.ArmTask("federated", 11, arrays(1)),
                      wire.ArmTask("single:st-mary", 12, arrays(2)), validate_received=True,
                      proximal_mu=0.1, strategy_config={"lr-decay": 0.5}),
    wire.TrainRequest(1, "batch", "run-a", 6, wire.ArmTask("single:x", 5, arrays(3)),
                      report_val=True),
    wire.TrainReply("st-mary", arm_result("federated", 4),
                    arm_result("single:st-mary", 5, summary(3)), summary(4)),
    wire.TrainReply("x", arm_result("single:x", 6, summary(5))),
    wire.ValidateRequest({"federated": arrays(7), "single:x": arrays(8)}, "batch"),
    wire.ValidateReply("x", {"federated": summary(6), "single:x": summary(7, None)}),
    wire.InternalRequest("single:x", arrays(9), "group", ["Effusion", "Edema"], "run-a"),
    wire.ScoreRequest("federated", arrays(10), "batch", "run-a"),
    wire.ScoreReply("site5", "federated", 300),
    wire.ExternalRequest("run-a", ["federated", "single:x"],
                         {"federated": {"Effusion": 0.4}, "single:x": {}}, ["Effusion"],
                         [("federated", "single:x"), ("centralised", "single:x")]),
    wire.StatisticsReply({"site": "site5", "external": [{"auc": 0.8}], "primary": []}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_kind_decodes_to_itself(message):
    encoded = message.encode()
    assert isinstance(encoded, RecordDict | wire.MetricRecord)
    assert same(type(message).decode(encoded), message)


def test_train_request_keeps_the_strategys_keys_for_the_federated_arm():
    """configure_train / aggregate_train read these keys: the federated arm must use them."""
    request = MESSAGES[3].encode()
    assert wire.ARRAYS in request and request[wire.CONFIG]["server-round"] == 3
    reply = MESSAGES[5].encode()
    assert reply[wire.METRICS][wire.EXAMPLES] == 33 and wire.ARRAYS in reply


def test_refusals_carry_a_code_not_a_sentence(task_identity):
    msg = Message(wire.role_probe(), dst_node_id=3, message_type=wire.TRAIN)
    reply = wire.refuse(msg, wire.Refusal.ROLE, "any wording at all")
    assert wire.refusal(reply) is wire.Refusal.ROLE
    other = wire.refuse(msg, wire.Refusal.WRONG_ROLE, "never trains")  # text is not searched
    assert wire.refusal(other) is wire.Refusal.WRONG_ROLE
    ok = Message(RecordDict({"x": ConfigRecord({"a": 1})}), reply_to=msg)
    assert wire.refusal(ok) is None


def protocol_keys() -> set[str]:
    """Every record name, key and key prefix the protocol writes."""
    keys = {v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str)}
    for message in MESSAGES:
        encoded = message.encode()
        records = [encoded] if isinstance(encoded, wire.MetricRecord) else encoded.values()
        if not isinstance(encoded, wire.MetricRecord):
            keys |= set(encoded)
        for rec in records:
            if not isinstance(rec, ArrayRecord):
                keys |= set(rec)
    # Keys that carry a label or model name after a prefix are covered by the prefix.
    keys = {k for k in keys if not any(k.endswith(lb) and k != lb for lb in LABELS)}
    return {k for k in keys if not k.startswith(wire.MODEL) and not k.startswith(wire.VAL_OF)
            or k in (wire.MODEL, wire.VAL_OF)}


def string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and n.body
                  and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


# Words that are record keys and also the domain's own vocabulary (split, role and arm
# names, history-row, checkpoint and results.json fields): a literal of these in the apps
# is not taken as a key.
VOCABULARY = {"train", "val", "site", "role", "format", "norm", "seed", "loss", "epsilon",
              "arm", "model", "models", "json", "primary", "thresholds", "prevalence",
              "config"}
APPS = ["client/app.py", "client/handlers.py", "client/mods.py", "server/app.py",
        "server/exchange.py", "server/strategy.py"]


def test_no_record_key_is_written_outside_the_protocol():
    keys = protocol_keys() - VOCABULARY
    assert {"arrays", "val-received", "pos-ge/", "model/", "single/", "server-round"} <= keys
    found = []
    for path in (ROOT / p for p in APPS):
        for line, text in string_literals(path):
            if text in keys or any(text.startswith(k) for k in keys if k.endswith("/")):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert found == [], "record keys written outside common/protocol.py:\n" + "\n".join(found)


def test_the_key_scan_would_catch_a_literal(tmp_path):
    bad = tmp_path / "app.py"
    bad.write_text('"""Doc with "arrays"."""\nx = content["val-received"]\ny = f"pos-ge/{lb}"\n')
    texts = [t for _, t in string_literals(bad)]
    assert "val-received" in texts and "pos-ge/" in texts and "arrays" not in texts
