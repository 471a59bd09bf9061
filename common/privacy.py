"""Differential privacy at a training site: Opacus DP-SGD and a persistent privacy ledger.

The ledger is a JSON-lines file on the site's own disk. Each unit of training on the site's
data (one arm, one round, one run) appends a ``started`` entry *before* it touches the data
and a ``completed`` entry before its result leaves the site; both are fsynced. The site's ε
is computed by composing the whole history in one Opacus accountant (every arm, every run:
they all spend from the same data's budget). A unit with only a ``started`` entry (the process
died mid-training) counts in full, so a crash can over-count but never under-count.

The ledger is verified whole before any data is read (a torn, unreadable, malformed or edited
line stops training with a message saying how to repair it: lines are hash-chained), and the
budget check and the ``started`` entries are written under one exclusive file lock.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from common.errors import FedcxrError

Accountant = Literal["prv", "rdp"]
PRV_MIN_NOISE = 0.05  # below this noise multiplier PRV's grid explodes; RDP is used
ACCOUNTANTS = get_args(Accountant)


class BudgetExceeded(FedcxrError):
    """Training would take the site past its max-epsilon; refused before it starts."""


@dataclass(frozen=True)
class DPConfig:
    """A site's DP settings. ``delta`` None means ``default_delta(n)``."""

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
        return self.delta if self.delta is not None else default_delta(n)


@dataclass(frozen=True)
class Spend:
    """One unit of DP training: ``steps`` noisy steps at this sample rate and noise."""

    steps: int
    sample_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (self.steps >= 0 and 0 < self.sample_rate <= 1
                and math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise FedcxrError(f"invalid DP spend {self}: steps >= 0, sample rate in (0, 1] and "
                              "a finite positive noise multiplier")

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


def full_batch_is_exact():
    """Opacus' PRV of the subsampled Gaussian takes ``log(1 - q)``; at sample rate 1 (a batch
    at least as large as the site's training set) that is -inf and numpy warns "divide by
    zero", though the comparison it feeds is then exact (every t lies above it: the plain
    Gaussian mechanism). The warning only misleads an operator, so it is silenced here."""
    import numpy as np

    return np.errstate(divide="ignore")


@functools.lru_cache(maxsize=256)
def _compose(history: tuple[tuple[tuple[float, float], int], ...], delta: float,
             accountant: str) -> float:
    if not history:
        return 0.0
    from common.dp_grad_sample import accountant_with_history

    if accountant == "prv" and min(noise for (noise, _), _ in history) < PRV_MIN_NOISE:
        # PRV's discretisation grows without bound as the noise vanishes (at 0.001 it was
        # killed for memory); at such noise ε is in the hundreds anyway: the RDP bound (an
        # upper bound, analytic) is reported instead, or infinity if even that overflows.
        accountant = "rdp"

    acc = accountant_with_history(make_accountant(accountant),
                                  [(noise, rate, steps) for (noise, rate), steps in history])
    try:
        with full_batch_is_exact():
            eps = float(acc.get_epsilon(delta=delta))
    except (ValueError, OverflowError, FloatingPointError, ZeroDivisionError):
        return math.inf
    return eps if math.isfinite(eps) else math.inf


@functools.lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                     accountant: str) -> float:
    """Noise multiplier that spends ``target_epsilon`` over ``total_steps`` (Opacus).
    Cached: both arms of a round ask the same question (seconds of PRV search each)."""
    from opacus.accountants.utils import get_noise_multiplier

    with full_batch_is_exact():
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=total_steps,
                                          accountant=accountant))


class LedgerError(FedcxrError):
    """The ledger cannot be trusted as it is (torn, unreadable, edited, malformed): nothing
    trains on the site's data until it is repaired or restored."""


# The privacy unit: what one clipped gradient (and the sample rate) is about.
PrivacyUnit = Literal["image", "patient"]
PRIVACY_UNITS = get_args(PrivacyUnit)
GENESIS = "0" * 64  # the `prev` of a ledger's first line
_FIELDS = ("unit", "status", "steps", "sample_rate", "noise_multiplier", "prev")


def default_delta(n: int) -> float:
    """δ when the site sets none: at most 1/(10 n) (well below the 1/n at which releasing one
    record in the clear would qualify) and never above 1e-5."""
    return min(0.1 / max(n, 1), 1e-5)


def default_ledger_path(data_dir: Path) -> Path:
    """One ledger per data folder, whoever trains on it (the node, ``fedcxr train-local``):
    the two compose only if they write to the same file."""
    return Path(data_dir) / ".fedcxr" / "ledger.jsonl"


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True)
class PlannedUnit:
    """One unit of training a message (or a local run) is about to start."""

    spend: Spend
    arm: str
    round: int
    run_id: str


class PrivacyLedger:
    """The site's persistent record of every DP training unit on its data.

    Every line carries ``prev``, the SHA-256 of the line before it (``GENESIS`` for the
    first), so an edited, removed or reordered line is named on the next read. The ledger is
    verified whole before every check; reading it and starting units happen under an
    exclusive lock (``<ledger>.lock``), so two trainings started at once cannot both pass a
    budget that fits one."""

    def __init__(self, path: Path, *, site: str = "", accountant: str = "prv") -> None:
        self.path = Path(path)
        self.site = site
        self.accountant = accountant

    # --- reading -------------------------------------------------------------------------

    def verify(self) -> list[dict]:
        """Every entry, after checking the whole file; LedgerError names the first bad line
        and how to repair it. Nothing is ever skipped: a line that cannot be read may be ε
        that was spent."""
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise LedgerError(f"{self.path}: the privacy ledger is not a regular file; move it "
                              "aside and restore the ledger from backup")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        if torn:
            raise LedgerError(
                f"{self.path}:{len(lines) + 1}: torn last line (a write was cut off, e.g. by "
                "a power cut); no training until it is repaired: run `fedcxr site ledger "
                f"--repair --ledger {self.path}` (it moves the fragment aside; the unit it was "
                "writing never started training, and a unit it was completing still counts "
                "in full)")
        out, prev = [], GENESIS
        for n, raw in enumerate(lines, 1):
            where = f"{self.path}:{n}"
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LedgerError(f"{where}: unreadable ledger line (not JSON); restore the "
                                  "ledger from backup, never delete a line: each is ε spent"
                                  ) from None
            if not isinstance(entry, dict):
                raise LedgerError(f"{where}: a ledger line must be a JSON object; restore the "
                                  "ledger from backup")
            missing = [f for f in _FIELDS if f not in entry]
            if missing:
                raise LedgerError(f"{where}: ledger entry lacks {', '.join(missing)}; restore "
                                  "the ledger from backup (entries are written by fedcxr only)")
            if entry["prev"] != prev:
                raise LedgerError(f"{where}: does not follow line {n - 1} (its hash chain is "
                                  "broken): the ledger was edited, or lines were removed or "
                                  "reordered; restore it from backup")
            _check_values(entry, where)
            out.append(entry)
            prev = _line_hash(raw)
        return out

    def entries(self) -> list[dict]:
        return self.verify()

    def spends(self, entries: list[dict] | None = None) -> list[Spend]:
        """One Spend per unit: the completed entry if present, else the started one (a unit
        that never completed counts in full)."""
        units: dict[str, dict] = {}
        for e in self.entries() if entries is None else entries:
            if e["status"] == "completed" or e["unit"] not in units:
                units[e["unit"]] = e
        return [Spend(int(e["steps"]), float(e["sample_rate"]), float(e["noise_multiplier"]))
                for e in units.values()]

    def epsilon(self, delta: float) -> float:
        return compose_epsilon(self.spends(), delta, self.accountant)

    def spent(self) -> float:
        """The site's ε so far, at the δ its last entry was accounted at (0: nothing yet).
        Every entry records the ε of the whole ledger as of that line (hash-chained, so it is
        what was computed then): read, not recomposed."""
        entries = self.verify()
        if not entries:
            return 0.0
        last = entries[-1]
        if isinstance(last.get("epsilon"), int | float) and last.get("delta"):
            return float(last["epsilon"])
        return compose_epsilon(self.spends(entries), last["delta"], self.accountant) \
            if last.get("delta") else 0.0

    def privacy_units(self) -> set[str]:
        """The privacy units the ledger's entries were trained at (entries written before the
        unit was recorded were image-level)."""
        return {e.get("privacy_unit", "image") for e in self.entries()}

    def check(self, planned: Spend | list[Spend], delta: float, max_epsilon: float,
              what: str = "") -> float:
        """ε after ``planned`` (one unit, or every unit a message will train); raises
        BudgetExceeded (before any training) past the max."""
        return self._check(self.spends(), planned, delta, max_epsilon, what)

    def _check(self, spends: list[Spend], planned: Spend | list[Spend], delta: float,
               max_epsilon: float, what: str) -> float:
        units = planned if isinstance(planned, list) else [planned]
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

    # --- writing -------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[list[dict]]:
        """Hold the ledger's exclusive lock; yields its verified entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self.verify()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _append(self, entry: dict, entries: list[dict] | None = None) -> None:
        """Append one entry chained to the last line (call under ``locked``, which verified
        the file: a torn tail is never written onto)."""
        new = not self.path.exists()
        last = b""
        if not new:
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                raise LedgerError(f"{self.path}: torn last line; run `fedcxr site ledger "
                                  f"--repair --ledger {self.path}`")
            last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        entry = {**entry, "prev": _line_hash(last) if last else GENESIS}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:
            fh.write(json.dumps(entry).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # make the file's directory entry durable too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def reserve(self, planned: list[PlannedUnit], delta: float, max_epsilon: float, *,
                what: str = "", privacy_unit: str = "image", n: int = 0) -> list[str]:
        """Check every planned unit against the budget and record each as ``started``, in
        one critical section, before any of them touches the data. Returns the unit ids."""
        with self.locked() as entries:
            spends = self.spends(entries)
            self._check(spends, [p.spend for p in planned], delta, max_epsilon, what)
            ids = []
            for p in planned:
                spends.append(p.spend)
                ids.append(uuid.uuid4().hex)
                self._append({"unit": ids[-1], "status": "started", "time": time.time(),
                              "site": self.site, "run_id": p.run_id, "arm": p.arm,
                              "round": p.round, **asdict(p.spend), "accountant": self.accountant,
                              "privacy_unit": privacy_unit, "n": n, "delta": delta,
                              "epsilon": compose_epsilon(spends, delta, self.accountant)})
        return ids

    def start(self, planned: Spend, delta: float, *, run_id: str, arm: str,
              round: int) -> str:
        """Record one unit before training (no budget check); returns its id."""
        return self.reserve([PlannedUnit(planned, arm, round, run_id)], delta, math.inf)[0]

    def complete(self, unit: str, done: Spend, delta: float, *, run_id: str, arm: str,
                 round: int) -> float:
        """Record what was actually spent (0 steps: reserved, never trained); call before
        the result leaves the site."""
        with self.locked() as entries:
            started = next((e for e in entries if e["unit"] == unit), None)
            spends = self.spends(entries)
            if started is not None:  # replace the planned spend by the actual one
                spends.remove(Spend(int(started["steps"]), float(started["sample_rate"]),
                                    float(started["noise_multiplier"])))
            eps = compose_epsilon(spends + [done], delta, self.accountant)
            extra = {k: started[k] for k in ("privacy_unit", "n") if started and k in started}
            self._append({"unit": unit, "status": "completed", "time": time.time(),
                          "site": self.site, "run_id": run_id, "arm": arm, "round": round,
                          **asdict(done), "accountant": self.accountant, **extra,
                          "delta": delta, "epsilon": eps})
        return eps

    def repair(self) -> Path | None:
        """Move a torn last line aside (to ``<ledger>.torn-<time>``) and cut the file back to
        its last whole line; anything else wrong is left for a restore from backup. Safe:
        a line is torn only when its process died writing it, so a torn ``started`` line's
        unit never trained, and a torn ``completed`` line's unit still counts in full through
        its ``started`` line. Returns the fragment's file, or None when nothing was torn."""
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            data = self.path.read_bytes() if self.path.exists() else b""
            if not data or data.endswith(b"\n"):
                return None
            cut = data.rfind(b"\n") + 1
            aside = self.path.with_name(f"{self.path.name}.torn-{int(time.time())}")
            aside.write_bytes(data[cut:])
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
        self.verify()  # what is left must be whole
        return aside


def _check_values(entry: dict, where: str) -> None:
    """Types and ranges of one entry's accounting fields (a NaN or infinite value would make
    the accountant return nonsense or never return)."""
    try:
        steps, rate, noise = entry["steps"], entry["sample_rate"], entry["noise_multiplier"]
        ok = (isinstance(steps, int) and steps >= 0
              and isinstance(rate, int | float) and 0 < rate <= 1
              and isinstance(noise, int | float) and math.isfinite(noise) and noise > 0
              and entry["status"] in ("started", "completed"))
    except TypeError:
        ok = False
    if not ok:
        raise LedgerError(f"{where}: malformed ledger entry (status {entry.get('status')!r}, "
                          f"steps {entry.get('steps')!r}, sample_rate "
                          f"{entry.get('sample_rate')!r}, noise_multiplier "
                          f"{entry.get('noise_multiplier')!r}); restore the ledger from backup")
