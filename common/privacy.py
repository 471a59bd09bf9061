"""Differential privacy at a training site: Opacus DP-SGD and a persistent privacy ledger.

The ledger is a JSON-lines file on the site's own disk. Each unit of training on the site's
data (one arm, one round, one run) appends a ``started`` entry *before* it touches the data
and a ``completed`` entry before its result leaves the site; both are fsynced. The site's ε
is computed by composing the whole history in one Opacus accountant (every arm, every run:
they all spend from the same data's budget). A unit with only a ``started`` entry (the process
died mid-training) counts in full, so a crash can over-count but never under-count.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from common.errors import FedcxrError

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS = get_args(Accountant)


class BudgetExceeded(FedcxrError):
    """Training would take the site past its max-epsilon; refused before it starts."""


@dataclass(frozen=True)
class DPConfig:
    """A site's DP settings. ``delta`` None means 0.1 / n (below 1/n)."""

    target_epsilon: float = 8.0
    max_epsilon: float = 10.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "bk"  # bk | ghost | hooks: how per-image clipping is computed

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise FedcxrError(f"accountant {self.accountant!r}: use prv or rdp")
        if self.target_epsilon <= 0 or self.max_epsilon <= 0:
            raise FedcxrError("target-epsilon and max-epsilon must be positive")

    def delta_for(self, n: int) -> float:
        return self.delta if self.delta is not None else 0.1 / max(n, 1)


@dataclass(frozen=True)
class Spend:
    """One unit of DP training: ``steps`` noisy steps at this sample rate and noise."""

    steps: int
    sample_rate: float
    noise_multiplier: float

    def as_history(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def make_accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"prv": PRVAccountant, "rdp": RDPAccountant}[kind]()


def compose_epsilon(spends: list[Spend], delta: float, accountant: str) -> float:
    """ε after all ``spends`` composed in one accountant.

    Units with the same noise multiplier and sample rate are one mechanism repeated, so
    their steps are added into one history entry: the same composition (identical ε, tested),
    but the PRV accountant's cost grows with the number of entries, and a site's ledger
    grows by two units every round."""
    merged: dict[tuple[float, float], int] = {}
    for s in spends:
        if s.steps > 0:
            key = (s.noise_multiplier, s.sample_rate)
            merged[key] = merged.get(key, 0) + s.steps
    return _compose(tuple(sorted(merged.items())), delta, accountant)


@functools.lru_cache(maxsize=256)
def _compose(history: tuple[tuple[tuple[float, float], int], ...], delta: float,
             accountant: str) -> float:
    if not history:
        return 0.0
    from common.dp_grad_sample import accountant_with_history

    acc = accountant_with_history(make_accountant(accountant),
                                  [(noise, rate, steps) for (noise, rate), steps in history])
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                     accountant: str) -> float:
    """Noise multiplier that spends ``target_epsilon`` over ``total_steps`` (Opacus).
    Cached: both arms of a round ask the same question (seconds of PRV search each)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=total_steps,
                                      accountant=accountant))


class PrivacyLedger:
    """The site's persistent record of every DP training unit on its data."""

    def __init__(self, path: Path, *, site: str = "", accountant: str = "prv") -> None:
        self.path = Path(path)
        self.site = site
        self.accountant = accountant

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path) as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    # A torn last line from a crash mid-write: the unit it describes has a
                    # `started` entry already (written first), so skipping it never under-counts.
                    if n != sum(1 for _ in open(self.path)):
                        raise FedcxrError(f"{self.path}:{n}: corrupt ledger line; restore the "
                                          "ledger from backup, never delete it") from None
        return out

    def spends(self) -> list[Spend]:
        """One Spend per unit: the completed entry if present, else the started one."""
        units: dict[str, dict] = {}
        for e in self.entries():
            if e["status"] == "completed" or e["unit"] not in units:
                units[e["unit"]] = e
        return [Spend(int(e["steps"]), float(e["sample_rate"]), float(e["noise_multiplier"]))
                for e in units.values()]

    def epsilon(self, delta: float) -> float:
        return compose_epsilon(self.spends(), delta, self.accountant)

    def check(self, planned: Spend | list[Spend], delta: float, max_epsilon: float,
              what: str = "") -> float:
        """ε after ``planned`` (one unit, or every unit a message will train); raises
        BudgetExceeded (before any training) past the max."""
        units = planned if isinstance(planned, list) else [planned]
        spends = self.spends()
        after = compose_epsilon(spends + units, delta, self.accountant)
        if after > max_epsilon + 1e-9:
            before = compose_epsilon(spends, delta, self.accountant)
            raise BudgetExceeded(
                f"privacy budget of site {self.site or self.path.parent.name} exceeded: "
                f"{what or 'this training'} ({sum(u.steps for u in units)} steps at noise "
                f"{units[0].noise_multiplier:.3f}, sample rate {units[0].sample_rate:.4f}) would "
                f"take ε from {before:.3f} to {after:.3f} (δ={delta:.2e}), above max-epsilon "
                f"{max_epsilon:g}; {max(max_epsilon - before, 0):.3f} is left. Ledger: {self.path}"
            )
        return after

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # make the file's directory entry durable too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def start(self, planned: Spend, delta: float, *, run_id: str, arm: str,
              round: int) -> str:
        """Record a unit before training; returns its id."""
        unit = uuid.uuid4().hex
        eps = compose_epsilon(self.spends() + [planned], delta, self.accountant)
        self._append({"unit": unit, "status": "started", "time": time.time(), "site": self.site,
                      "run_id": run_id, "arm": arm, "round": round, **asdict(planned),
                      "accountant": self.accountant, "delta": delta, "epsilon": eps})
        return unit

    def complete(self, unit: str, done: Spend, delta: float, *, run_id: str, arm: str,
                 round: int) -> float:
        """Record what was actually spent; call before the result leaves the site."""
        spends = [s for s in self.spends()]
        entries = {e["unit"]: e for e in self.entries()}
        started = entries.get(unit)
        if started is not None:  # replace the planned spend by the actual one
            spends.remove(Spend(int(started["steps"]), float(started["sample_rate"]),
                                float(started["noise_multiplier"])))
        eps = compose_epsilon(spends + [done], delta, self.accountant)
        self._append({"unit": unit, "status": "completed", "time": time.time(),
                      "site": self.site, "run_id": run_id, "arm": arm, "round": round,
                      **asdict(done), "accountant": self.accountant, "delta": delta,
                      "epsilon": eps})
        return eps
