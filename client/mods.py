"""Client mods: behaviour that wraps every handler, in Flower's own composable shape.

``role_mod`` enforces the node's role from its *own* config: a held-out (``evaluate``) node
answers any train message with an error reply (``Refusal.ROLE``), whatever the server asks.
"""

from __future__ import annotations

import json
import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
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


def site_audit_mod(message: Message, context: Context, call_next: ClientAppCallable
                   ) -> Message:
    """Every message this node handles, one line in the site's ``audit.jsonl`` (its state
    folder), fsynced before the reply leaves: the run, what was asked, what left (record
    names and byte sizes), the ε it spent by the site's own ledger, and any refusal. The
    outermost mod, so refusals by the other mods are logged too."""
    from client.node import open_site
    from common.approvals import FAB_HASH_ENV
    from common.audit import AUDIT_FILE, AuditLog, record_sizes
    from common.errors import FedcxrError
    from common.privacy import LedgerError

    try:
        run = parse(RunConfig, dict(context.run_config), what="run config")
        site = open_site(context.node_config, run)
    except FedcxrError:
        return call_next(message, context)  # the handler reports the config error itself
    kind = message.metadata.message_type
    entry = {"run_id": context.run_id, "node": context.node_id, "site": site.name,
             "fab_hash": os.environ.get(FAB_HASH_ENV), "type": kind,
             "message_id": message.metadata.message_id}
    ledger = site.ledger(run.accountant) if run.dp and site.role == "train" else None

    def spent() -> float | None:
        if ledger is None or not kind.startswith(wire.TRAIN):
            return None
        try:
            return ledger.spent()
        except LedgerError:
            return None

    if kind.startswith(wire.TRAIN):
        try:  # hostile content is logged as what it is; the guard mod refuses it
            entry["arms"] = [a[:128] for a in wire.message_arms(message.content)]
            entry["round"] = wire.server_round(message.content)
        except Exception:  # noqa: BLE001
            entry["round"] = None
    before = spent()
    audit = AuditLog(site.state_dir / AUDIT_FILE)
    try:
        reply = call_next(message, context)
    except Exception as exc:
        audit.append({**entry, "outcome": f"error: {type(exc).__name__}: {exc}"})
        raise
    after = spent()
    if reply.has_error():
        code = wire.refusal(reply)
        entry["outcome"] = f"refused ({code.name if code else reply.error.code}): " \
                           f"{reply.error.reason}"
    else:
        entry["outcome"] = "ok"
        entry["records"] = record_sizes(reply.content)
    if after is not None:
        entry["epsilon_spent"] = max(after - (before or 0.0), 0.0)
        entry["epsilon_total"] = after
    try:
        audit.append(entry)
    except OSError as exc:  # fail closed: nothing leaves this site unlogged
        if reply.has_error():
            return reply
        return wire.refuse(message, wire.Refusal.AUDIT,
                           f"site {site.name}: its audit log {audit.path} cannot be written "
                           f"({exc.strerror}); nothing leaves the site unlogged: fix the "
                           "node's state folder (ledger-path / cache-path)")
    return reply


def message_guard_mod(message: Message, context: Context, call_next: ClientAppCallable
                      ) -> Message:
    """Every value in a message is untrusted at the site. The protocol's decoders and the
    weight loader raise ``MessageRejected`` for content off its schema (a missing key, a name
    that is not a plain name, JSON past its bound, weights that do not fit this node's
    model); this mod turns that into a refusal with its code (``Refusal.MALFORMED``), which
    the audit mod outside it logs. Nothing of such a message is loaded or written."""
    import logging

    from common.errors import MessageRejected

    try:
        return call_next(message, context)
    except MessageRejected as exc:
        logging.getLogger("flwr").warning("refused a malformed %s message: %s",
                                          message.metadata.message_type, exc)
        return wire.refuse(message, wire.Refusal.MALFORMED, f"malformed message: {exc}")


def client_dp_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client-level DP clipped at the client (run config ``client-dp = fixed-client`` or
    ``adaptive-client``): Flower's own ``fixedclipping_mod`` / ``adaptiveclipping_mod`` clip
    the federated arm's update before it leaves. Flower's mods expect a message with one
    model; a fedcxr train message may also carry the site's single-site arm, so the mod is
    given a view holding only the federated arm (its weights and the clipping norm the
    strategy wrapper sent) and its clipped result is put back into the full reply."""
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = message.content.get(wire.CONFIG) or {}
    if (not message.metadata.message_type.startswith(wire.TRAIN)
            or KEY_CLIPPING_NORM not in config):
        return call_next(message, context)
    run = parse(RunConfig, dict(context.run_config), what="run config")
    flower_mod = adaptiveclipping_mod if run.client_dp == "adaptive-client" else \
        fixedclipping_mod
    # The view is the same message object with its content swapped (a ClientApp cannot make
    # messages of its own), restored before the handler runs and after the mod returns.
    full_in = message.content
    message.content = RecordDict({wire.ARRAYS: full_in[wire.ARRAYS],
                                  wire.CONFIG: ConfigRecord({
                                      KEY_CLIPPING_NORM: config[KEY_CLIPPING_NORM]})})
    kept: dict[str, RecordDict] = {}

    def federated_arm_only(msg: Message, ctx: Context) -> Message:
        msg.content = full_in
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        kept["content"] = full = reply.content
        reply.content = RecordDict({wire.ARRAYS: full[wire.ARRAYS],
                                    wire.METRICS: full[wire.METRICS]})
        return reply

    try:
        out = flower_mod(message, context, federated_arm_only)
    finally:
        message.content = full_in
    if out.has_error() or "content" not in kept:
        return out
    full_out = kept["content"]
    full_out[wire.ARRAYS] = out.content[wire.ARRAYS]  # clipped
    full_out[wire.METRICS] = out.content[wire.METRICS]  # adaptive: with its norm bit
    out.content = full_out
    return out


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


__all__ = ["NodeConfig", "client_dp_mod", "fault_mod", "message_guard_mod", "only_at",
           "reply_audit_mod", "role_mod", "site_audit_mod"]
