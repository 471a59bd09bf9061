"""``fedcxr site ledger`` and ``fedcxr site audit``: what a site's privacy officer reads.

``site ledger`` verifies the site's privacy ledger (hash chain, torn or malformed lines),
prints its units and the ε they compose to, and with ``--repair`` moves a torn last line
aside (the one repair that is always safe; anything else is a restore from backup).
``site audit`` prints the audit log of every message the site's node handled. ``site
approve`` / ``site approvals`` keep the list of apps (FAB hashes) the site allows to run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.errors import FedcxrError


def _state_dir(args: argparse.Namespace) -> Path:
    """The node's state folder for DATA_DIR: ``--state`` as the node's ledger-path folder or
    cache-path, else DATA_DIR/.fedcxr (the node's default)."""
    return Path(args.state) if args.state else Path(args.data_dir) / ".fedcxr"





def cmd_site_ledger(args: argparse.Namespace) -> int:
    from common.privacy import PrivacyLedger, default_ledger_path

    path = Path(args.ledger) if args.ledger else default_ledger_path(Path(args.data_dir))
    ledger = PrivacyLedger(path, accountant=args.accountant)
    if args.repair:
        aside = ledger.repair()
        print(f"moved the torn last line to {aside}; the ledger verifies" if aside else
              f"{path}: nothing torn; the ledger verifies")
        return 0
    entries = ledger.verify()
    if not entries:
        print(f"{path}: empty (no DP training on this data yet)")
        return 0
    print(f"{path}: {len(entries)} lines, hash chain intact")
    print(f"{'time':19}  {'run':28}  {'arm':18}  {'round':>5}  {'status':9}  {'steps':>6}  "
          f"{'q':>7}  {'noise':>6}  {'unit':7}  ε after")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0)))
        print(f"{when:19}  {str(e.get('run_id', ''))[:28]:28}  {str(e.get('arm', ''))[:18]:18}  "
              f"{e.get('round', ''):>5}  {e['status']:9}  {e['steps']:>6}  "
              f"{e['sample_rate']:>7.4f}  {e['noise_multiplier']:>6.3f}  "
              f"{e.get('privacy_unit', 'image'):7}  {e.get('epsilon', float('nan')):.3f}")
    delta = entries[-1].get("delta")
    if delta:
        units = ", ".join(sorted(ledger.privacy_units()))
        print(f"site total: ε = {ledger.epsilon(delta):.3f} at δ = {delta:.2e} "
              f"(privacy unit: {units}; accountant {args.accountant})")
    return 0


def cmd_site_audit(args: argparse.Namespace) -> int:
    from common.audit import AUDIT_FILE, AuditLog, table

    log = AuditLog(Path(args.audit) if args.audit else _state_dir(args) / AUDIT_FILE)
    entries = log.entries(args.run)
    if not entries:
        raise FedcxrError(f"{log.path}: no entry for run {args.run}" if args.run else
                          f"{log.path}: empty")
    print(table(entries))
    return 0


def cmd_site_approve(args: argparse.Namespace) -> int:
    from common.approvals import APPROVALS_FILE, Approvals

    entry = Approvals(_state_dir(args) / APPROVALS_FILE).approve(Path(args.fab), args.note)
    print(f"approved {entry['file']} (sha256 {entry['hash']}) in "
          f"{_state_dir(args) / APPROVALS_FILE}")
    return 0


def cmd_site_approvals(args: argparse.Namespace) -> int:
    from common.approvals import APPROVALS_FILE, Approvals

    approvals = Approvals(_state_dir(args) / APPROVALS_FILE)
    entries = approvals.entries()
    if not entries:
        print(f"{approvals.path}: no app approved (a node with require-approval=true runs "
              "nothing)")
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0)))
        print(f"{when}  {e['hash']}  {e.get('file', '')}  {e.get('note', '')}".rstrip())
    return 0


def register_site(site: argparse._SubParsersAction) -> None:
    p = site.add_parser("ledger", help="verify and print the site's privacy ledger")
    p.add_argument("data_dir", nargs="?", default=".", help="the site's data folder")
    p.add_argument("--ledger", help="ledger file (default DATA_DIR/.fedcxr/ledger.jsonl)")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--repair", action="store_true",
                   help="move a torn last line aside (after a crash or power cut)")
    p.set_defaults(func=cmd_site_ledger)
    p = site.add_parser("audit", help="every message the site's node handled, as a table")
    p.add_argument("data_dir", nargs="?", default=".", help="the site's data folder")
    p.add_argument("--state", help="the node's state folder (its ledger-path folder or "
                   "cache-path; default DATA_DIR/.fedcxr)")
    p.add_argument("--audit", help="the audit file itself")
    p.add_argument("--run", help="only this Flower run id")
    p.set_defaults(func=cmd_site_audit)
    for name, func, text in (
            ("approve", cmd_site_approve, "allow an app (its .fab, by hash) to run here"),
            ("approvals", cmd_site_approvals, "list the apps this site allows to run")):
        p = site.add_parser(name, help=text)
        if name == "approve":
            p.add_argument("fab", help="the .fab file the coordinator built (`flwr build`)")
            p.add_argument("--note", default="", help="why (review ticket, date, reviewer)")
        p.add_argument("--state", help="the node's state folder (its ledger-path folder or "
                       "cache-path; default DATA_DIR/.fedcxr)")
        p.add_argument("--data-dir", default=".", help="the site's data folder")
        p.set_defaults(func=func)
