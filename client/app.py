"""Flower ClientApp: what a hospital's node does with each message (``common.protocol``).

- ``query``: role (from the node's own config), site name, split sizes, label prevalence,
  privacy budget spent and left.
- ``train``: train the arm(s) sent on the local training split (DP + ledger when asked),
  return weights and aggregate metrics. Refused by ``role_mod`` on held-out nodes. With
  ``validate_received`` the global model received is first validated as it arrived (the
  previous round's global model, validated without a message of its own).
- ``evaluate.validate`` (training node): per-label validation AUC and ROC counts (for
  threshold choice) of each model sent.
- ``evaluate.internal`` (training node): one selected model on the site's own test split.
- ``evaluate.score`` (held-out node): score the one model sent, keep the scores on the
  site's own disk (``ScoreStore``); ``evaluate.external`` then runs the shared external-
  validation evaluator over the stored scores of the models named, at the thresholds sent.
  One model per message keeps every message model-sized.

Replies carry model weights and aggregate numbers only; see ``tests/test_federation.py``.

This module is the ClientApp and its routing only; the handlers are in ``client.handlers``,
imported by a node at its first message. Flower also loads this module in the process that
hosts the ServerApp (the simulation checks that the ClientApp loads), and torch there would
hold its memory in that process for the whole run (``benchmarks/peers.py`` prints its peak).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.mods import (
    client_dp_mod,
    fault_mod,
    message_guard_mod,
    only_at,
    reply_audit_mod,
    role_mod,
    site_audit_mod,
)

app = ClientApp(mods=[site_audit_mod, reply_audit_mod, message_guard_mod, role_mod,
                      client_dp_mod, fault_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.train(msg, context)


@app.evaluate("validate", mods=[only_at("train")])
def validate_models(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.validate_models(msg, context)


@app.evaluate("internal", mods=[only_at("train")])
def internal(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.internal(msg, context)


@app.evaluate("score", mods=[only_at("evaluate")])
def score(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.score(msg, context)


@app.evaluate("external", mods=[only_at("evaluate")])
def external(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.external(msg, context)
