"""Client mods: behaviour that wraps every handler, in Flower's own composable shape.

``role_mod`` enforces the node's role from its *own* config: a held-out (``evaluate``) node
answers any train message with an error reply (``Refusal.ROLE``), whatever the server asks.
"""

from __future__ import annotations

import json
import os

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common import protocol as wire
from common.config import NodeConfig, RunConfig, parse

REFUSED_TO_TRAIN = ("this node's role is 'evaluate' (held-out site): it never trains on its "
                    "data; the train message was refused")


def node_role(context: Context) -> str:
    from client.node import open_site

    run = parse(RunConfig, dict(context.run_config), what="run config")
    return open_site(context.node_config, run).role


def role_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    kind = message.metadata.message_type.split(".")[0]
    if kind == wire.TRAIN and node_role(context) != "train":
        # An expected refusal: an error reply with our code, no traceback at the node.
        return wire.refuse(message, wire.Refusal.ROLE, REFUSED_TO_TRAIN)
    return call_next(message, context)


def only_at(role: str):
    """A handler mod: the action runs only at nodes whose own config has ``role``; any other
    node answers ``Refusal.WRONG_ROLE`` (validation and internal validation need a
    training site's splits, scoring and external statistics a held-out site's data)."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        actual = node_role(context)
        if actual != role:
            return wire.refuse(message, wire.Refusal.WRONG_ROLE,
                               f"{message.metadata.message_type} runs only at {role} nodes; "
                               f"this node's role is {actual!r}")
        return call_next(message, context)

    return mod


def fault_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Chaos hook for tests and drills: FEDCXR_FAULT="SITE:ROUND" makes that site's node fail
    every train message of that round, as a node that crashed mid-round would."""
    spec = os.environ.get("FEDCXR_FAULT", "")
    if spec and message.metadata.message_type.startswith(wire.TRAIN):
        from client.node import open_site

        site, _, rnd = spec.partition(":")
        run = parse(RunConfig, dict(context.run_config), what="run config")
        this_round = wire.server_round(message.content)
        if open_site(context.node_config, run).name == site and str(this_round) == rnd:
            raise RuntimeError(f"injected fault at {site} in round {rnd} (FEDCXR_FAULT)")
    return call_next(message, context)


def reply_audit_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """When FEDCXR_AUDIT_LOG is set, append a description of every reply leaving this node:
    each record's type and keys, each array's shape, each metric and config value. Used by
    the test that proves nothing per-image leaves a site."""
    reply = call_next(message, context)
    path = os.environ.get("FEDCXR_AUDIT_LOG")
    if path and not reply.has_error():
        entry = {"node": context.node_id, "type": message.metadata.message_type,
                 "records": {}}
        for key, record in reply.content.items():
            kind = type(record).__name__
            if kind == "ArrayRecord":
                body = {k: list(v.shape) for k, v in record.items()}
            else:
                body = {k: v for k, v in record.items()}
            entry["records"][key] = {"kind": kind, "body": body}
        with open(path, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
    return reply


__all__ = ["NodeConfig", "fault_mod", "only_at", "reply_audit_mod", "role_mod"]
