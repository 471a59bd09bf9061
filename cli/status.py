"""``fedcxr status RUN_DIR``: the coordinator's view of a run while it goes.

Reads ``RUN_DIR/status.json`` (rewritten by the ServerApp at every phase and round): phase,
round, sites that trained and validated each arm in its latest round, failures and ε per
site. ``--watch N`` redraws every N seconds until the run finishes or fails; ``--json`` prints
the file as it is. Flower's own ``flwr supernode list`` shows node ids only: the site names
here come from the nodes' replies to discovery.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from cli.args import positive
from common.run_status import PHASES, RunStatus


def render(status: RunStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    phase = status.phase if status.phase != "training" else (
        f"training, round {status.round} of {status.num_rounds} done")
    lines = [f"run {status.run_name} ({status.run_dir})",
             f"  {status.state}: {phase} (phase {PHASES.index(status.phase) + 1} of "
             f"{len(PHASES) - 1}); started {_ago(now - status.started_at)}, "
             f"updated {_ago(now - status.updated_at)}"]
    if status.error:
        lines.append(f"  error: {status.error}")
    if status.sites:
        lines.append("  sites: " + ", ".join(
            f"{s} ({r}" + (f", node {status.node_ids[s]})" if s in status.node_ids else ")")
            for s, r in sorted(status.sites.items())))
    if status.arms:
        lines.append(f"  {'arm':<24} {'round':>5} {'trained':>8} {'validated':>10}")
        lines += [f"  {arm:<24} {a.round:>5} {a.sites_trained:>8} {a.sites_validated:>10}"
                  for arm, a in status.arms.items()]
    if status.epsilon:
        lines.append("  epsilon: " + ", ".join(f"{s} {e:.2f}"
                                                for s, e in sorted(status.epsilon.items())))
    lines.append(f"  failures: {len(status.failures)}")
    lines += [f"    round {f['round']} {f['arm']} at {f['site']}: {f['reason']}"
              for f in status.failures[-10:]]
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def run(args: argparse.Namespace) -> int:
    while True:
        status = RunStatus.read(Path(args.run_dir))
        print(json.dumps(asdict(status), indent=1) if args.json else render(status), flush=True)
        if not args.watch or status.state != "running":
            return 1 if status.state == "failed" else 0
        time.sleep(args.watch)
        print()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a run's phase, round, sites answered, failures and ε")
    p.add_argument("run_dir", help="the run folder (<out-dir>/<run-name>)")
    p.add_argument("--json", action="store_true", help="print status.json as it is")
    p.add_argument("--watch", type=positive, metavar="SECONDS",
                   help="redraw every SECONDS until the run finishes or fails")
    p.set_defaults(func=run)
